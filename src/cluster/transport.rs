//! Node-to-node transport: length-prefixed frames over TCP between brokers' peer listeners.
//! A [`PeerLink`] is one node's outbound connection to a peer: a bounded queue of frames and a
//! task that connects, reconnects with backoff, and writes what is queued. A [`serve_peers`]
//! loop accepts a peer listener's connections and hands each frame to a handler.
//!
//! Delivery is best effort, in order per link while a connection lasts: a frame queued while
//! the peer is unreachable waits (up to [`limits::PEER_QUEUE_FRAMES`]; beyond, new frames are
//! refused and counted), and a frame being written when a connection breaks may be lost.
//! That is what Raft expects of its network (it retransmits); requests that need an answer
//! carry their own ids and time out above this layer.
//!
//! Owns: peer sockets and their buffers. Must not touch: Raft, partitions, client sockets.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::limits;
use crate::runtime::Notify;

/// One frame between nodes: a kind (what the payload is) and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFrame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

const FRAME_HEADER_BYTES: usize = 5;

fn encode(f: &PeerFrame) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + f.payload.len());
    out.extend_from_slice(&((f.payload.len() + 1) as u32).to_le_bytes());
    out.push(f.kind);
    out.extend_from_slice(&f.payload);
    out
}

/// Reads one frame; `Ok(None)` at a clean end of stream; an error for a frame over
/// [`limits::PEER_FRAME_BYTES_MAX`] or a stream cut inside a frame.
async fn read_frame(s: &mut TcpStream) -> Result<Option<PeerFrame>, String> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = s.read(&mut len[got..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err("peer closed inside a frame".into())
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > limits::PEER_FRAME_BYTES_MAX {
        return Err(format!(
            "peer frame of {len} bytes (1..={})",
            limits::PEER_FRAME_BYTES_MAX
        ));
    }
    // Allocated as the bytes arrive, never from the declared length alone.
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        let want = (len - start).min(limits::READ_CHUNK_BYTES);
        body.resize(start + want, 0);
        s.read_exact(&mut body[start..])
            .await
            .map_err(|e| format!("peer closed inside a frame: {e}"))?;
    }
    let kind = body[0];
    body.remove(0);
    Ok(Some(PeerFrame {
        kind,
        payload: body,
    }))
}

/// Resolves once `stop` is set (checked every 50 ms).
async fn stopped(stop: &Cell<bool>) {
    while !stop.get() {
        crate::runtime::sleep(Duration::from_millis(50)).await;
    }
}

/// Accepts peer connections on `listener` (at most [`limits::PEER_CONNECTIONS_MAX`] at once;
/// more are closed at once) and calls `handle(frame)` for every frame, until `stop` is set;
/// then every connection closes. A connection that sends a bad frame is closed; others are
/// unaffected.
pub async fn serve_peers(
    listener: TcpListener,
    handle: Rc<dyn Fn(PeerFrame)>,
    stop: Rc<Cell<bool>>,
) {
    let open = Rc::new(Cell::new(0usize));
    while !stop.get() {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stopped(&stop).await;
            None
        })
        .await;
        let mut s = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                eprintln!("ringmq: peer accept: {e}");
                crate::runtime::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= limits::PEER_CONNECTIONS_MAX {
            continue; // dropped: closed
        }
        open.set(open.get() + 1);
        let (handle, stop, open) = (handle.clone(), stop.clone(), open.clone());
        glommio::spawn_local(async move {
            loop {
                let read = async { Some(read_frame(&mut s).await) };
                let next = futures_lite::future::or(read, async {
                    stopped(&stop).await;
                    None
                })
                .await;
                match next {
                    Some(Ok(Some(f))) => handle(f),
                    None | Some(Ok(None)) => break,
                    Some(Err(e)) => {
                        eprintln!("ringmq: peer connection: {e}; closing it");
                        break;
                    }
                }
            }
            open.set(open.get() - 1);
        })
        .detach();
    }
}

/// One node's outbound link to a peer address. Dropping it (or [`PeerLink::close`]) stops
/// its task.
pub struct PeerLink {
    inner: Rc<LinkState>,
}

struct LinkState {
    addr: String,
    queue: RefCell<VecDeque<PeerFrame>>,
    queued_bytes: Cell<usize>,
    queued: Notify,
    closed: Cell<bool>,
    refused: Cell<u64>,
    connects: Cell<u64>,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.close();
    }
}

impl PeerLink {
    /// A link to `addr` and the task that keeps it connected.
    pub fn start(addr: &str) -> Self {
        let inner = Rc::new(LinkState {
            addr: addr.to_string(),
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            queued: Notify::new(),
            closed: Cell::new(false),
            refused: Cell::new(0),
            connects: Cell::new(0),
        });
        glommio::spawn_local(inner.clone().run()).detach();
        Self { inner }
    }

    /// Queues a frame; `false` (and counted) if it is over [`limits::PEER_FRAME_BYTES_MAX`],
    /// the link is closed, or the queue holds [`limits::PEER_QUEUE_FRAMES`] frames or
    /// [`limits::PEER_QUEUE_BYTES_MAX`] bytes.
    pub fn send(&self, f: PeerFrame) -> bool {
        let st = &self.inner;
        let bytes = f.payload.len() + 1;
        let full = st.queue.borrow().len() >= limits::PEER_QUEUE_FRAMES
            || st.queued_bytes.get() + bytes > limits::PEER_QUEUE_BYTES_MAX;
        if bytes > limits::PEER_FRAME_BYTES_MAX || full || st.closed.get() {
            st.refused.set(st.refused.get() + 1);
            return false;
        }
        st.queued_bytes.set(st.queued_bytes.get() + bytes);
        st.queue.borrow_mut().push_back(f);
        st.queued.notify_all();
        true
    }

    pub fn queued(&self) -> usize {
        self.inner.queue.borrow().len()
    }

    /// Frames refused (queue full, frame too large, link closed).
    pub fn refused(&self) -> u64 {
        self.inner.refused.get()
    }

    /// Connections made (the first and every reconnect).
    pub fn connects(&self) -> u64 {
        self.inner.connects.get()
    }

    pub fn close(&self) {
        self.inner.closed.set(true);
        self.inner.queued.notify_all();
    }
}

impl LinkState {
    async fn run(self: Rc<Self>) {
        let mut backoff_ms = limits::PEER_RECONNECT_MIN_MS;
        while !self.closed.get() {
            let Ok(mut s) = TcpStream::connect(self.addr.as_str()).await else {
                crate::runtime::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(limits::PEER_RECONNECT_MAX_MS);
                continue;
            };
            let _ = s.set_nodelay(true);
            self.connects.set(self.connects.get() + 1);
            let began = std::time::Instant::now();
            self.write_until_broken(&mut s).await;
            // A peer that accepts and drops at once is retried with backoff, not in a loop.
            if began.elapsed() >= Duration::from_secs(1) {
                backoff_ms = limits::PEER_RECONNECT_MIN_MS;
            } else if !self.closed.get() {
                crate::runtime::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(limits::PEER_RECONNECT_MAX_MS);
            }
        }
    }

    /// Writes queued frames (several per write) until the connection breaks, a write takes
    /// longer than [`limits::PEER_WRITE_TIMEOUT_MS`] (a peer that stopped reading), or the
    /// link closes.
    async fn write_until_broken(&self, s: &mut TcpStream) {
        loop {
            let wait = self.queued.wait();
            if self.closed.get() {
                return;
            }
            let mut buf = Vec::new();
            while let Some(f) = self.queue.borrow_mut().pop_front() {
                let left = self.queued_bytes.get() - (f.payload.len() + 1);
                self.queued_bytes.set(left);
                buf.extend_from_slice(&encode(&f));
                if buf.len() >= limits::WRITE_COALESCE_BYTES {
                    break;
                }
            }
            if buf.is_empty() {
                wait.await;
                continue;
            }
            let timeout = Duration::from_millis(limits::PEER_WRITE_TIMEOUT_MS);
            let write = async { Some(s.write_all(&buf).await.is_ok() && s.flush().await.is_ok()) };
            let written = futures_lite::future::or(write, async {
                crate::runtime::sleep(timeout).await;
                None
            })
            .await;
            if written != Some(true) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_arrive_in_order_and_a_link_reconnects_after_its_peer_restarts() {
        let got = crate::runtime::block_on(|| {
            Box::pin(async {
                let seen: Rc<RefCell<Vec<PeerFrame>>> = Rc::new(RefCell::new(Vec::new()));
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = listener.local_addr().expect("addr");
                let stop = Rc::new(Cell::new(false));
                let sink = seen.clone();
                let handle: Rc<dyn Fn(PeerFrame)> = Rc::new(move |f| sink.borrow_mut().push(f));
                glommio::spawn_local(serve_peers(listener, handle.clone(), stop.clone())).detach();
                let link = PeerLink::start(&addr.to_string());
                for i in 0..100u32 {
                    assert!(link.send(PeerFrame {
                        kind: 7,
                        payload: i.to_le_bytes().to_vec(),
                    }));
                }
                for _ in 0..200 {
                    if seen.borrow().len() == 100 {
                        break;
                    }
                    crate::runtime::sleep(Duration::from_millis(10)).await;
                }
                let first: Vec<PeerFrame> = seen.borrow().clone();
                // The peer goes away; frames queue; a new peer on the same address gets them.
                stop.set(true);
                crate::runtime::sleep(Duration::from_millis(200)).await;
                let queued_while_down = 5u32;
                for i in 0..queued_while_down {
                    link.send(PeerFrame {
                        kind: 8,
                        payload: i.to_le_bytes().to_vec(),
                    });
                }
                // io_uring closes the old listener asynchronously: retry the bind for a while.
                let mut listener = None;
                for _ in 0..300 {
                    if let Ok(l) = TcpListener::bind(addr) {
                        listener = Some(l);
                        break;
                    }
                    crate::runtime::sleep(Duration::from_millis(10)).await;
                }
                let listener = listener.expect("rebind within 3 s");
                let stop2 = Rc::new(Cell::new(false));
                seen.borrow_mut().clear();
                glommio::spawn_local(serve_peers(listener, handle, stop2.clone())).detach();
                for i in queued_while_down..queued_while_down + 20 {
                    link.send(PeerFrame {
                        kind: 8,
                        payload: i.to_le_bytes().to_vec(),
                    });
                    crate::runtime::sleep(Duration::from_millis(20)).await;
                }
                for _ in 0..300 {
                    if seen
                        .borrow()
                        .last()
                        .is_some_and(|f| f.payload[..4] == 24u32.to_le_bytes())
                    {
                        break;
                    }
                    crate::runtime::sleep(Duration::from_millis(10)).await;
                }
                let second: Vec<PeerFrame> = seen.borrow().clone();
                let connects = link.connects();
                link.close();
                stop2.set(true);
                (first, second, connects)
            })
        })
        .expect("executor");
        let (first, second, connects) = got;
        let want: Vec<PeerFrame> = (0..100u32)
            .map(|i| PeerFrame {
                kind: 7,
                payload: i.to_le_bytes().to_vec(),
            })
            .collect();
        assert_eq!(first, want, "every frame once, in order");
        assert!(
            connects >= 2,
            "reconnected after the peer restarted ({connects})"
        );
        // After the reconnect frames flow again, in order (some queued while the peer was
        // down may have been written to the dying connection and lost: best effort).
        let ids: Vec<u32> = second
            .iter()
            .map(|f| u32::from_le_bytes(f.payload[..4].try_into().unwrap()))
            .collect();
        assert!(ids.len() >= 15, "frames after the restart: {ids:?}");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
        assert_eq!(*ids.last().unwrap(), 24);
    }

    #[test]
    fn a_bad_frame_closes_only_its_connection() {
        let (closed, delivered) = crate::runtime::block_on(|| {
            Box::pin(async {
                let seen = Rc::new(Cell::new(0u32));
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = listener.local_addr().expect("addr");
                let stop = Rc::new(Cell::new(false));
                let sink = seen.clone();
                let handle: Rc<dyn Fn(PeerFrame)> = Rc::new(move |_| sink.set(sink.get() + 1));
                glommio::spawn_local(serve_peers(listener, handle, stop.clone())).detach();
                let mut bad = TcpStream::connect(addr).await.expect("connect");
                let len = (limits::PEER_FRAME_BYTES_MAX as u32 + 1).to_le_bytes();
                bad.write_all(&len).await.expect("write");
                let mut one = [0u8; 1];
                let closed = matches!(bad.read(&mut one).await, Ok(0) | Err(_));
                let link = PeerLink::start(&addr.to_string());
                link.send(PeerFrame {
                    kind: 1,
                    payload: vec![1, 2, 3],
                });
                for _ in 0..200 {
                    if seen.get() == 1 {
                        break;
                    }
                    crate::runtime::sleep(Duration::from_millis(10)).await;
                }
                link.close();
                stop.set(true);
                (closed, seen.get())
            })
        })
        .expect("executor");
        assert!(closed, "the oversized frame's connection is closed");
        assert_eq!(delivered, 1, "another link still delivers");
    }

    #[test]
    fn a_full_queue_refuses_and_counts() {
        let (refused, queued) = crate::runtime::block_on(|| {
            Box::pin(async {
                // Nobody listens here: every frame waits in the queue.
                let link = PeerLink::start("127.0.0.1:1");
                let mut ok = 0;
                for _ in 0..limits::PEER_QUEUE_FRAMES + 10 {
                    if link.send(PeerFrame {
                        kind: 1,
                        payload: vec![0],
                    }) {
                        ok += 1;
                    }
                }
                assert_eq!(ok, limits::PEER_QUEUE_FRAMES);
                let r = (link.refused(), link.queued());
                link.close();
                r
            })
        })
        .expect("executor");
        assert_eq!(refused, 10);
        assert_eq!(queued, limits::PEER_QUEUE_FRAMES);
    }
}
