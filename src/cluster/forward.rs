//! Forwarding client requests to the node that owns them. A client connection that asks for a
//! partition (or group) led by another node gets, lazily, one link to that node's client
//! address; each request crosses it as one `Forwarded` frame carrying the client's verified
//! bytes verbatim (copied once, never re-encoded), and the owner's response frame comes back
//! on the same link and goes to the client as it is.
//!
//! One link per (client connection, node): the client's correlation ids stay unique on it,
//! its requests keep their order (they are written in arrival order), and when the client
//! leaves, the link closes and the owner releases what the connection held (queue leases).
//!
//! Owns: the links of one client connection and their sockets. Must not touch: partitions,
//! the metadata (callers resolve the node and its address).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::limits;
use crate::protocol as proto;
use crate::runtime::oneshot;

/// Correlation id of the link's own handshake (never a client's in-flight id: a client
/// request with it is refused on this link).
const HANDSHAKE_CORR: u64 = u64::MAX;

type PendingMap = Rc<RefCell<HashMap<u64, oneshot::Sender<Bytes>>>>;

/// One link to one node's client address.
struct Link {
    writer: RefCell<Option<futures_lite::io::WriteHalf<TcpStream>>>,
    /// One frame is written at a time (requests of one connection, and its fan-outs).
    write_lock: glommio::sync::Semaphore,
    pending: PendingMap,
    broken: Rc<Cell<bool>>,
    fd: i32,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Only while this link still holds its write half is the fd surely its own (after a
        // failed write the half is gone and the number may already belong to another socket).
        if self.writer.borrow().is_some() {
            // The reader task sees the end and fails whatever is left.
            // SAFETY: the write half held in `self.writer` keeps the stream, and so `fd`,
            // open until after this call.
            unsafe {
                libc::shutdown(self.fd, libc::SHUT_RDWR);
            }
        }
    }
}

/// The answer to one forwarded request, awaited with a deadline.
pub struct Answer {
    rx: oneshot::Receiver<Bytes>,
    link: Rc<Link>,
    corr: u64,
}

impl Answer {
    /// The answer frame; `None` if the link broke first, `give_up` resolved (the node was
    /// seen down), or no answer came within [`limits::FORWARD_ANSWER_TIMEOUT_MS`]. In the last
    /// two cases the link is given up (the next request opens a new one).
    pub async fn get_or(self, give_up: impl std::future::Future<Output = ()>) -> Option<Bytes> {
        let timeout = async {
            let limit = Duration::from_millis(limits::FORWARD_ANSWER_TIMEOUT_MS);
            futures_lite::future::or(crate::runtime::sleep(limit), give_up).await;
            None
        };
        let got = futures_lite::future::or(self.rx, timeout).await;
        if got.is_none() {
            self.link.broken.set(true);
            self.link.pending.borrow_mut().remove(&self.corr);
        }
        got
    }
}

/// The forwarding links of one client connection, by node id.
#[derive(Default)]
pub struct ForwardLinks {
    links: RefCell<HashMap<u32, Rc<Link>>>,
}

/// Why a request could not be handed to its node, and whether some of it may have been
/// written (then the node may have received and carried it out).
#[derive(Debug)]
pub struct ForwardError(pub String, pub bool);

impl ForwardError {
    fn not_sent(msg: String) -> Self {
        Self(msg, false)
    }

    /// Whether the request may have reached the node.
    pub fn maybe_sent(&self) -> bool {
        self.1
    }
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ForwardLinks {
    /// Writes `frame` (a complete frame, length prefix included, whose answer carries
    /// correlation id `corr`) to node `node` at `addr` and returns the receiver of the answer
    /// (`None` if the link broke first). Returns once the frame is written, so calls in order
    /// reach the node in order.
    pub async fn send(
        &self,
        node: u32,
        addr: &str,
        corr: u64,
        frame: &[u8],
    ) -> Result<Answer, ForwardError> {
        let link = self.link(node, addr).await?;
        if corr == HANDSHAKE_CORR || link.pending.borrow().contains_key(&corr) {
            return Err(ForwardError::not_sent(format!(
                "correlation id {corr} is already in flight on this connection"
            )));
        }
        if link.pending.borrow().len() >= limits::FORWARD_PENDING_MAX {
            return Err(ForwardError::not_sent(
                "too many forwarded requests in flight".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        link.pending.borrow_mut().insert(corr, tx);
        if let Err((started, e)) = link.write(frame).await {
            link.pending.borrow_mut().remove(&corr);
            self.forget(node, &link);
            return Err(ForwardError(format!("node {node} at {addr}: {e}"), started));
        }
        Ok(Answer { rx, link, corr })
    }

    /// Drops `link` from the map if it is still the one for `node` (a newer link stays).
    fn forget(&self, node: u32, link: &Rc<Link>) {
        let mut links = self.links.borrow_mut();
        if links.get(&node).is_some_and(|l| Rc::ptr_eq(l, link)) {
            links.remove(&node);
        }
    }

    /// The open link to `node`, connecting (with the handshake) if there is none or the last
    /// one broke. Two requests connecting at once (a fan-out and the next request) end up on
    /// one link: the second to finish uses the first's.
    async fn link(&self, node: u32, addr: &str) -> Result<Rc<Link>, ForwardError> {
        let usable =
            |links: &HashMap<u32, Rc<Link>>| links.get(&node).filter(|l| !l.broken.get()).cloned();
        if let Some(l) = usable(&self.links.borrow()) {
            return Ok(l);
        }
        let l = Rc::new(Link::connect(addr).await.map_err(|e| {
            ForwardError::not_sent(format!("node {node} at {addr} cannot be reached: {e}"))
        })?);
        if let Some(first) = usable(&self.links.borrow()) {
            return Ok(first);
        }
        self.links.borrow_mut().insert(node, l.clone());
        Ok(l)
    }
}

impl Link {
    async fn connect(addr: &str) -> Result<Self, String> {
        let connect = async { Some(TcpStream::connect(addr).await) };
        let timeout = async {
            crate::runtime::sleep(Duration::from_millis(limits::FORWARD_CONNECT_TIMEOUT_MS)).await;
            None
        };
        let stream = match futures_lite::future::or(connect, timeout).await {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(e.to_string()),
            None => {
                return Err(format!(
                    "no connection within {} ms",
                    limits::FORWARD_CONNECT_TIMEOUT_MS
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let (reader, writer) = futures_lite::io::split(stream);
        let link = Self {
            writer: RefCell::new(Some(writer)),
            write_lock: glommio::sync::Semaphore::new(1),
            pending: Rc::new(RefCell::new(HashMap::new())),
            broken: Rc::new(Cell::new(false)),
            fd,
        };
        // The handshake's answer is read (and dropped) by the reader like any other.
        let (tx, _rx) = oneshot::channel();
        link.pending.borrow_mut().insert(HANDSHAKE_CORR, tx);
        let hello = proto::encode_handshake(HANDSHAKE_CORR, "ringmq-node-forward");
        link.write(&hello).await.map_err(|(_, e)| e)?;
        glommio::spawn_local(read_answers(
            reader,
            link.pending.clone(),
            link.broken.clone(),
        ))
        .detach();
        Ok(link)
    }

    /// Writes one frame, within [`limits::PEER_WRITE_TIMEOUT_MS`] (a node that stopped
    /// reading breaks the link instead of stalling the client's connection). An error says
    /// whether writing had started (then some of the frame, or all, may have arrived).
    async fn write(&self, frame: &[u8]) -> Result<(), (bool, String)> {
        let _turn = self
            .write_lock
            .acquire_permit(1)
            .await
            .map_err(|e| (false, e.to_string()))?;
        if self.broken.get() {
            return Err((false, "the link broke".into()));
        }
        let Some(mut w) = self.writer.borrow_mut().take() else {
            return Err((false, "the link is busy or broken".into()));
        };
        let write = async {
            w.write_all(frame).await?;
            w.flush().await
        };
        let timeout = async {
            crate::runtime::sleep(Duration::from_millis(limits::PEER_WRITE_TIMEOUT_MS)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not written within {} ms", limits::PEER_WRITE_TIMEOUT_MS),
            ))
        };
        match futures_lite::future::or(write, timeout).await {
            Ok(()) => {
                *self.writer.borrow_mut() = Some(w);
                Ok(())
            }
            Err(e) => {
                self.broken.set(true);
                // The half is kept (and the fd with it) until the link is dropped.
                *self.writer.borrow_mut() = Some(w);
                Err((true, e.to_string()))
            }
        }
    }
}

/// Reads answer frames and hands each to the request with its correlation id; at the end of
/// the stream (or a bad frame) the link is broken and every waiting request gets `None`.
async fn read_answers(
    mut r: futures_lite::io::ReadHalf<TcpStream>,
    pending: PendingMap,
    broken: Rc<Cell<bool>>,
) {
    loop {
        let mut len = [0u8; proto::LEN_PREFIX_BYTES];
        if r.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 || n > limits::PEER_FRAME_BYTES_MAX {
            eprintln!("ringmq: forwarding link: answer of {n} bytes; closing the link");
            break;
        }
        let mut frame = vec![0u8; proto::LEN_PREFIX_BYTES + n];
        frame[..proto::LEN_PREFIX_BYTES].copy_from_slice(&len);
        if r.read_exact(&mut frame[proto::LEN_PREFIX_BYTES..])
            .await
            .is_err()
        {
            break;
        }
        let corr = match proto::verify_frame(&frame[proto::LEN_PREFIX_BYTES..]) {
            Ok(f) => f.correlation_id(),
            Err(e) => {
                eprintln!("ringmq: forwarding link: bad answer ({e}); closing the link");
                break;
            }
        };
        // An answer nobody waits for (a timed-out request) is dropped.
        if let Some(tx) = pending.borrow_mut().remove(&corr) {
            tx.send(Bytes::from(frame));
        }
    }
    broken.set(true);
    pending.borrow_mut().clear();
}
