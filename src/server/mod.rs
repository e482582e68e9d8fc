//! The sockets of one core: accept, read and verify frames, dispatch to the owning shard
//! (here or across the mesh) or, in a cluster, to the owning node (a `Forwarded` frame over
//! the connection's link; see `cluster::forward`), write responses back. Fan-out requests
//! (metadata, status, lists) ask every shard and, in a cluster, every live node.
//!
//! Owns: this shard's listener and connections, and the mesh receive loops. Must not touch:
//! partitions (it asks `shard::Shard`). Frames are verified here, once, before anything else
//! sees them. A malformed frame gets an Error frame and the connection closes; other
//! connections never notice.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

use crate::protocol::VerifiedFrame;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::channel_mesh::Receivers;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::cluster::forward::ForwardLinks;
use crate::limits;
use crate::protocol::{self as proto, fb, FrameError};
use crate::router::route::{Dest, Target};
use crate::router::Transport;
use crate::router::{Envelope, Reply};
use crate::runtime::budget::{Budget, Reservation};
use crate::runtime::Notify;
use crate::shard::{Pending, Shard};

pub mod wire_error;
use wire_error::WireCode;

/// What the sweeper knows of one open connection.
struct Watch {
    fd: RawFd,
    /// Set while a frame has been started but not fully read.
    mid_frame: Cell<bool>,
    /// When the write in progress started (a client that does not read stalls it).
    writing_since: Cell<Option<Instant>>,
    /// Since when the reader waits for memory (the budget is spent).
    waiting_since: Cell<Option<Instant>>,
    /// Last time bytes arrived (or a frame began).
    last_read: Cell<Instant>,
    /// The read side was shut down by the sweeper; the reason for the close.
    closed_why: RefCell<Option<String>>,
    /// Woken when the read side is shut down (a reader waiting for budget stops waiting).
    kill: Notify,
}

impl Watch {
    /// Shuts the read side: the reader drains what the kernel already holds, then sees EOF.
    fn shut_read(&self, why: String) {
        self.shut(libc::SHUT_RD, why);
    }

    fn shut(&self, how: libc::c_int, why: String) {
        if self.closed_why.borrow().is_some() && how == libc::SHUT_RD {
            return;
        }
        self.closed_why.borrow_mut().get_or_insert(why);
        // SAFETY: `fd` belongs to a stream that is open while this watch is registered (the
        // connection removes its watch before its stream is dropped); shutdown() only changes
        // the socket's state.
        unsafe {
            libc::shutdown(self.fd, how);
        }
        self.kill.notify_all();
    }
}

/// This shard's open connections, for the sweeper.
type Watches = Rc<RefCell<std::collections::HashMap<u64, Rc<Watch>>>>;

/// Closes connections idle mid-frame past `--stalled-connection-ms`, and on shutdown shuts the
/// read side of every connection so each answers what it already received, then closes.
async fn sweep_loop(shard: Rc<Shard>, watches: Watches) {
    let idle_ms = shard.cfg.stalled_connection_ms;
    let period = Duration::from_millis((idle_ms / 4).clamp(5, 1000));
    let mut shut_all = false;
    let mut open_before = 0;
    loop {
        let stop = shard.shutdown.wait();
        let open_now = watches.borrow().len();
        if open_now < open_before {
            return_freed_memory();
        }
        open_before = open_now;
        if shard.is_shutting_down() && !shut_all {
            shut_all = true;
            for w in watches.borrow().values() {
                w.shut_read("the broker is shutting down".into());
            }
        }
        if shut_all && watches.borrow().is_empty() {
            return;
        }
        let now = Instant::now();
        let limit = Duration::from_millis(idle_ms);
        for w in watches.borrow().values() {
            let idle = now.saturating_duration_since(w.last_read.get());
            if w.mid_frame.get() && idle >= limit {
                w.shut_read(format!(
                    "closed: a partial frame was stalled for {} ms (--stalled-connection-ms {idle_ms})",
                    idle.as_millis()
                ));
            }
            let waiting = w
                .waiting_since
                .get()
                .map(|t| now.saturating_duration_since(t));
            if waiting.is_some_and(|d| d >= limit) {
                // Memory never came (every byte of the budget held by requests that wait too):
                // give this connection's bytes back so the others can go on.
                w.shut_read(format!(
                    "closed: no memory for {idle_ms} ms (--memory-max-bytes)"
                ));
            }
            let writing = w
                .writing_since
                .get()
                .map(|t| now.saturating_duration_since(t));
            if writing.is_some_and(|d| d >= limit) {
                // The client does not read its responses: drop it, freeing what it holds.
                w.shut(
                    libc::SHUT_RDWR,
                    format!(
                    "closed: a response was not read for {idle_ms} ms (--stalled-connection-ms)"
                ),
                );
            }
        }
        futures_lite::future::or(crate::runtime::sleep(period), stop).await;
    }
}

/// Connections closed since the last sweep: hand the memory their buffers used back to the
/// OS (glibc keeps freed small chunks in its per-thread arenas otherwise, and RSS ratchets up
/// across connection storms). At most once per sweep period.
fn return_freed_memory() {
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Accepts connections until shutdown.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let watches: Watches = Rc::new(RefCell::new(Default::default()));
    glommio::spawn_local(sweep_loop(shard.clone(), watches.clone())).detach();
    loop {
        let stop = shard.shutdown.wait();
        if shard.is_shutting_down() {
            return;
        }
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stop.await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                eprintln!("ringmq: shard {}: accept: {e}", shard.id());
                crate::runtime::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.connections.get() >= shard.cfg.connections_per_shard() {
            glommio::spawn_local(refuse(stream)).detach();
            continue;
        }
        shard.connections.set(shard.connections.get() + 1);
        let s = shard.clone();
        let watches = watches.clone();
        glommio::spawn_local(async move {
            Connection::run(s.clone(), stream, watches).await;
            s.connections.set(s.connections.get() - 1);
        })
        .detach();
    }
}

async fn refuse(mut stream: TcpStream) {
    let f = proto::encode_error(
        0,
        fb::ErrorCode::TooManyConnections,
        "the broker is at its connection limit (--max-connections)",
    );
    let _ = stream.write_all(&f).await;
    let _ = stream.close().await;
}

/// What a request holds until its response is written: its in-flight slot and the bytes it
/// reserved from the connection's memory budget (request body + response reservation).
pub struct Held {
    _slot: StaticPermit,
    _bytes: [Bytes2; 2],
}

/// Bytes held from both budgets at once: the connection's and the shard's (broker-wide share).
struct Bytes2 {
    conn: Reservation,
    shard: Reservation,
}

impl Bytes2 {
    fn empty(conn: &Rc<Budget>, shard: &Rc<Budget>) -> Self {
        Self {
            conn: conn.empty(),
            shard: shard.empty(),
        }
    }

    /// Grows both reservations; `false` when `n` more bytes can never fit.
    async fn grow(&mut self, n: u64) -> bool {
        self.conn.grow(n).await.is_ok() && self.shard.grow(n).await.is_ok()
    }

    /// Grows both if both fit now.
    fn try_grow(&mut self, n: u64) -> bool {
        if !self.conn.try_grow(n) {
            return false;
        }
        if self.shard.try_grow(n) {
            return true;
        }
        self.conn.shrink(n);
        false
    }

    /// Grows both, waiting for room (backpressure) while the peer is still there; `false`
    /// when the bytes can never fit, the peer reset the connection, or the sweeper closed it.
    async fn grow_while_connected(&mut self, n: u64, watch: &Watch) -> bool {
        if self.try_grow(n) {
            return true;
        }
        let gone = async {
            loop {
                let kill = watch.kill.wait();
                let tick = crate::runtime::sleep(Duration::from_millis(limits::PEER_CHECK_MS));
                futures_lite::future::or(tick, kill).await;
                if watch.closed_why.borrow().is_some() || peer_reset(watch.fd) {
                    return false;
                }
            }
        };
        watch.waiting_since.set(Some(Instant::now()));
        let got = futures_lite::future::or(self.grow(n), gone).await;
        watch.waiting_since.set(None);
        got
    }
}

/// Whether the peer reset the connection (it closed with unread data, or vanished). A peer
/// that only half-closed still reads its answers, so end-of-stream alone is not "gone".
fn peer_reset(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local buffer on a socket this connection owns.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return false;
    }
    let e = std::io::Error::last_os_error().raw_os_error();
    !matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// Bytes reserved for the response of a request before it is dispatched.
fn response_reservation(f: &fb::Frame<'_>) -> u64 {
    match f.body_type() {
        fb::Body::Fetch => {
            f.body_as_fetch()
                .map(|x| u64::from(x.max_bytes().min(limits::FETCH_BYTES_MAX)))
                .unwrap_or(0)
                + 4096
        }
        fb::Body::QueueFetch => 1 << 20,
        // A forwarded request's answer is the inner request's.
        fb::Body::Forwarded => f
            .body_as_forwarded()
            .map(|x| {
                // SAFETY: `f` is a verified frame, and verification of a Forwarded frame
                // verifies its inner frame too (`protocol::verify_frame`).
                let inner = unsafe { fb::root_as_frame_unchecked(x.frame().bytes()) };
                response_reservation(&inner)
            })
            .unwrap_or(4096),
        _ => 4096,
    }
}

/// Responses waiting for the writer, each holding its in-flight permit until written.
struct Outbox {
    queue: RefCell<VecDeque<(Bytes, Option<Held>)>>,
    ready: Notify,
    closed: Cell<bool>,
    /// Bytes queued and not yet written (bounded by `OUTBOX_BYTES_MAX` via the reader).
    bytes: Cell<usize>,
    drained: Notify,
    /// Requests dispatched whose responses are not pushed yet; the writer waits for them.
    pending: Cell<usize>,
    /// A write failed (the peer is gone): responses are dropped instead of queued.
    failed: Cell<bool>,
}

impl Outbox {
    fn push(&self, frame: Bytes, permit: Option<Held>) {
        if self.failed.get() {
            return; // nobody will write it: its memory goes back now
        }
        self.bytes.set(self.bytes.get() + frame.len());
        self.queue.borrow_mut().push_back((frame, permit));
        self.ready.notify_all();
    }

    fn written(&self, n: usize) {
        self.bytes.set(self.bytes.get().saturating_sub(n));
        self.drained.notify_all();
    }

    /// Backpressure on a client that does not read its responses.
    async fn wait_for_room(&self) {
        while self.bytes.get() >= limits::OUTBOX_BYTES_MAX && !self.closed.get() {
            let w = self.drained.wait();
            if self.bytes.get() < limits::OUTBOX_BYTES_MAX || self.closed.get() {
                break;
            }
            w.await;
        }
    }
}

struct Connection;

impl Connection {
    async fn run(shard: Rc<Shard>, stream: TcpStream, watches: Watches) {
        let _ = stream.set_nodelay(true);
        let conn = shard.next_connection_id();
        let watch = Rc::new(Watch {
            fd: stream.as_raw_fd(),
            mid_frame: Cell::new(false),
            writing_since: Cell::new(None),
            waiting_since: Cell::new(None),
            last_read: Cell::new(Instant::now()),
            closed_why: RefCell::new(None),
            kill: Notify::new(),
        });
        watches.borrow_mut().insert(conn, watch.clone());
        if shard.is_shutting_down() {
            watch.shut_read("the broker is shutting down".into());
        }
        let (mut reader, writer) = futures_lite::io::split(stream);
        let outbox = Rc::new(Outbox {
            queue: RefCell::new(VecDeque::new()),
            ready: Notify::new(),
            closed: Cell::new(false),
            bytes: Cell::new(0),
            drained: Notify::new(),
            pending: Cell::new(0),
            failed: Cell::new(false),
        });
        let writer_task = glommio::spawn_local(write_loop(writer, outbox.clone(), watch.clone()));
        let used_queues = Self::serve_requests(&shard, &mut reader, &outbox, &watch, conn).await;
        // Every request read before the end of input is answered before the socket closes.
        outbox.closed.set(true);
        outbox.ready.notify_all();
        writer_task.await;
        watches.borrow_mut().remove(&conn);
        if used_queues {
            // Its leases return to their queues now, not at their visibility timeout.
            shard.release_connection(conn);
            shard.router.broadcast_closed(conn).await;
        }
    }

    /// Reads, verifies and dispatches requests until the input ends or a frame is bad.
    /// Returns whether the connection used queue fetches.
    async fn serve_requests(
        shard: &Rc<Shard>,
        reader: &mut futures_lite::io::ReadHalf<TcpStream>,
        outbox: &Rc<Outbox>,
        watch: &Rc<Watch>,
        conn: u64,
    ) -> bool {
        let permits = Rc::new(Semaphore::new(shard.cfg.max_in_flight as u64));
        // Memory budget of this connection: request bodies being processed plus reserved
        // response bytes. At the limit the connection is not read (backpressure). The shard's
        // budget (its share of --memory-max-bytes) bounds all connections together.
        let budget_bytes = (limits::CONNECTION_BYTES_MAX as u64)
            .max(shard.cfg.max_frame_bytes as u64 + u64::from(limits::FETCH_BYTES_MAX) + (1 << 20));
        let budget = Budget::new(budget_bytes);
        let mut handshaken = false;
        let mut used_queues = false;
        let mut rb = ReadBuf::new();
        // Cluster: this connection's links to other nodes (opened on first use).
        let links = Rc::new(ForwardLinks::default());
        loop {
            outbox.wait_for_room().await;
            let read = read_frame(reader, &mut rb, shard, &budget, watch).await;
            let (frame, body_bytes) = match read {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(FrameOrIo::Io) => break,
                Err(FrameOrIo::Frame(e)) => {
                    outbox.push(wire_error::frame(0, &e), None);
                    break;
                }
            };
            let Ok(slot) = permits.acquire_static_permit(1).await else {
                break;
            };
            // Verified here, once: everything after holds a VerifiedFrame.
            let frame = match VerifiedFrame::verify(frame) {
                Ok(f) => f,
                Err(e) => {
                    outbox.push(wire_error::frame(0, &e), None);
                    break;
                }
            };
            let (corr, body, reserve) = {
                let f = frame.view();
                (f.correlation_id(), f.body_type(), response_reservation(&f))
            };
            if !proto::is_request(body) {
                let msg = format!("body type {} is not a request", body.0);
                outbox.push(
                    proto::encode_error(corr, fb::ErrorCode::UnknownRequest, &msg),
                    None,
                );
                break;
            }
            if !handshaken {
                if body != fb::Body::Handshake {
                    let msg = "the first request must be a Handshake";
                    outbox.push(
                        proto::encode_error(corr, fb::ErrorCode::HandshakeRequired, msg),
                        None,
                    );
                    break;
                }
                handshaken = true;
            }
            let mut reply_bytes = Bytes2::empty(&budget, &shard.memory);
            if shard.is_shutting_down() {
                // Answered at once, with no memory to wait for.
                let msg = "the broker is shutting down";
                let held = Held {
                    _slot: slot,
                    _bytes: [body_bytes, reply_bytes],
                };
                outbox.push(
                    proto::encode_error(corr, fb::ErrorCode::ShuttingDown, msg),
                    Some(held),
                );
                continue;
            }
            if !reply_bytes.grow_while_connected(reserve, watch).await {
                let why = watch.closed_why.borrow().clone();
                let why = why.unwrap_or_else(|| "closed while waiting for memory".into());
                let code = if shard.is_shutting_down() {
                    fb::ErrorCode::ShuttingDown
                } else {
                    fb::ErrorCode::Internal
                };
                outbox.push(proto::encode_error(corr, code, &why), None);
                break;
            }
            let permit = Held {
                _slot: slot,
                _bytes: [body_bytes, reply_bytes],
            };
            if shard.is_shutting_down() {
                let msg = "the broker is shutting down";
                outbox.push(
                    proto::encode_error(corr, fb::ErrorCode::ShuttingDown, msg),
                    Some(permit),
                );
                continue;
            }
            // A forwarding node's link may carry queue fetches for its clients.
            used_queues |= body == fb::Body::QueueFetch || body == fb::Body::Forwarded;
            let pending = dispatch(shard, corr, body, frame, (conn, &links)).await;
            spawn_reply(shard, pending, outbox.clone(), permit);
        }
        used_queues
    }
}

enum FrameOrIo {
    Io,
    Frame(FrameError),
}

/// Reads from the socket, noting progress for the sweeper; an error once the sweeper shut the
/// read side for an idle partial frame.
async fn read_some(
    reader: &mut futures_lite::io::ReadHalf<TcpStream>,
    watch: &Watch,
    buf: &mut [u8],
) -> Result<usize, FrameOrIo> {
    let n = reader.read(buf).await.map_err(|_| FrameOrIo::Io)?;
    watch.last_read.set(Instant::now());
    if n == 0 && watch.mid_frame.get() {
        let why = watch.closed_why.borrow().clone();
        return Err(FrameOrIo::Frame(FrameError::Malformed(why.unwrap_or_else(
            || "truncated frame: the connection closed mid-frame".into(),
        ))));
    }
    Ok(n)
}

/// Bytes read from the socket and not yet consumed. One read fills as much of it as the kernel
/// has, so pipelined small requests cost one syscall for many frames instead of two each.
struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            buf: vec![0u8; limits::READ_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes after those buffered; 0 at the end of input.
    async fn fill(
        &mut self,
        reader: &mut futures_lite::io::ReadHalf<TcpStream>,
        watch: &Watch,
    ) -> Result<usize, FrameOrIo> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = read_some(reader, watch, &mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Marks the connection as inside a frame when `inside`. A frame that begins from bytes
/// already buffered starts its stall clock now, not at the read that brought them (the
/// reader may have paused long since, waiting for a slot or for memory).
fn begin_frame_if(watch: &Watch, inside: bool) {
    if inside && !watch.mid_frame.get() {
        watch.last_read.set(Instant::now());
    }
    watch.mid_frame.set(inside);
}

/// Reads one frame (without its length prefix); `None` at a clean end of stream. The body is
/// charged to the budgets and filled as its bytes arrive, never allocated up front from the
/// declared length: a peer that declares 16 MiB and sends nothing holds at most the first
/// piece ([`limits::FRAME_FIRST_ALLOC_BYTES`]). Bytes beyond the frame stay in `rb` for the
/// next call.
async fn read_frame(
    reader: &mut futures_lite::io::ReadHalf<TcpStream>,
    rb: &mut ReadBuf,
    shard: &Shard,
    budget: &Rc<Budget>,
    watch: &Watch,
) -> Result<Option<(Bytes, Bytes2)>, FrameOrIo> {
    while rb.available().len() < 4 {
        begin_frame_if(watch, !rb.available().is_empty());
        if rb.fill(reader, watch).await? == 0 {
            return Ok(None);
        }
    }
    begin_frame_if(watch, true);
    let prefix = [
        rb.available()[0],
        rb.available()[1],
        rb.available()[2],
        rb.available()[3],
    ];
    let len = proto::frame_len(prefix, shard.cfg.max_frame_bytes).map_err(FrameOrIo::Frame)?;
    rb.consume(4);
    // Nothing is allocated until the body's first bytes are here.
    while rb.available().is_empty() {
        rb.fill(reader, watch).await?;
    }
    let mut held = Bytes2::empty(budget, &shard.memory);
    let mut body: Vec<u8> = Vec::new();
    while body.len() < len {
        // An ordinary frame arrives in one piece; a larger one in chunks, each charged to the
        // budgets before its bytes are zeroed and read. Capacity doubles (few reallocations);
        // reserved capacity is not touched, so memory in use follows the bytes that arrived.
        let step = if body.is_empty() {
            limits::FRAME_FIRST_ALLOC_BYTES
        } else {
            limits::READ_CHUNK_BYTES
        };
        let want = (len - body.len()).min(step);
        if !held.grow_while_connected(want as u64, watch).await {
            return match watch.closed_why.borrow().clone() {
                Some(why) => Err(FrameOrIo::Frame(FrameError::Malformed(why))),
                None => Err(FrameOrIo::Io),
            };
        }
        let start = body.len();
        if body.capacity() < start + want {
            let target = (body.capacity() * 2).clamp(start + want, len);
            body.reserve_exact(target - start);
        }
        let buffered = rb.available().len().min(want);
        body.extend_from_slice(&rb.available()[..buffered]);
        rb.consume(buffered);
        if buffered < want {
            body.resize(start + want, 0);
            let mut filled = start + buffered;
            while filled < start + want {
                filled += read_some(reader, watch, &mut body[filled..start + want]).await?;
            }
        }
    }
    watch.mid_frame.set(false);
    Ok(Some((Bytes::from(body), held)))
}

fn spawn_reply(shard: &Rc<Shard>, pending: Pending, outbox: Rc<Outbox>, permit: Held) {
    let s = shard.clone();
    s.requests_in_flight.set(s.requests_in_flight.get() + 1);
    outbox.pending.set(outbox.pending.get() + 1);
    glommio::spawn_local(async move {
        let frame = pending.await;
        outbox.pending.set(outbox.pending.get() - 1);
        outbox.push(frame, Some(permit));
        s.requests_in_flight.set(s.requests_in_flight.get() - 1);
    })
    .detach();
}

/// Routes a verified request. Awaited in arrival order: appends of one connection keep order.
/// `conn` is the connection's id and its links to other nodes.
async fn dispatch(
    shard: &Rc<Shard>,
    corr: u64,
    body: fb::Body,
    frame: VerifiedFrame,
    conn: (u64, &Rc<ForwardLinks>),
) -> Pending {
    let (conn, links) = conn;
    match body {
        fb::Body::Handshake => return Box::pin(ready(handshake(shard, corr, &frame))),
        fb::Body::MulticastProduce => return multicast(shard, corr, frame, None, links).await,
        fb::Body::ClusterStatus => return Box::pin(ready(shard.cluster_status(corr))),
        fb::Body::ListGroups
        | fb::Body::Stats
        | fb::Body::Status
        | fb::Body::SubscriptionInfo
        | fb::Body::Metadata => {
            let scope = Scope {
                links,
                whole_cluster: true,
            };
            return fanout(shard, corr, body, frame, scope).await;
        }
        fb::Body::Forwarded => return forwarded_in(shard, frame, conn, links).await,
        _ => {}
    }
    let routed = {
        let f = frame.view();
        target_of(&f).map(|t| shard.route(t))
    };
    let (partition, dest) = match routed {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            let e = wire_error::frame(corr, &e);
            return Box::pin(ready(e));
        }
        None => {
            let e = proto::encode_error(
                corr,
                fb::ErrorCode::Malformed,
                "request could not be routed",
            );
            return Box::pin(ready(e));
        }
    };
    if !dest.is_local() {
        return forward_to_node(shard, links, (dest.node, partition, &[]), corr, &frame).await;
    }
    if dest.shard == shard.id() {
        return shard.start(partition, conn, frame).await;
    }
    forward(shard, (dest, partition, conn), frame, corr).await
}

/// Cluster: hands a request to the node that owns it, as one `Forwarded` frame on this
/// connection's link to that node; the owner's answer is the reply.
async fn forward_to_node(
    shard: &Rc<Shard>,
    links: &Rc<ForwardLinks>,
    to: (u32, u32, &[u32]),
    corr: u64,
    frame: &VerifiedFrame,
) -> Pending {
    let (node, partition, dests) = to;
    let unavailable = |msg: String| -> Pending {
        let e = proto::encode_error(corr, fb::ErrorCode::NodeUnavailable, &msg);
        Box::pin(ready(e))
    };
    let (addr, me) = {
        let table = shard.table();
        let me = table.node_id().unwrap_or(0);
        match table.node(node) {
            Some(n) if n.alive => (n.client_addr.clone(), me),
            Some(n) => {
                return unavailable(format!(
                    "node {node} ({}) is down; retry after failover",
                    n.client_addr
                ))
            }
            None => return unavailable(format!("node {node} is not known to this node yet")),
        }
    };
    let wrapped = proto::encode_forwarded(corr, me, partition, dests, frame);
    let limit = shard.cfg.max_frame_bytes;
    if wrapped.len() - proto::LEN_PREFIX_BYTES > limit {
        let msg = format!(
            "a request of {} bytes is over --max-frame-bytes {limit} once wrapped for node {node}; send it to that node ({addr}) directly, or in smaller batches",
            frame.bytes().len()
        );
        return Box::pin(ready(proto::encode_error(
            corr,
            fb::ErrorCode::FrameTooLarge,
            &msg,
        )));
    }
    if dests.is_empty() {
        crate::router::bump(&shard.router.copies.node_forwards);
    } else {
        crate::router::bump(&shard.router.copies.node_multicast);
    }
    match links.send(node, &addr, corr, &wrapped).await {
        Ok(answer) => {
            let me = shard.clone();
            Box::pin(async move {
                // A node seen down (stopped, cut off) will not answer: say so now rather than
                // at the answer timeout. The request was sent, so it may have taken effect.
                let got = answer.get_or(node_goes_down(&me, node)).await;
                got.unwrap_or_else(|| {
                    let msg = format!(
                        "node {node} did not answer (it went down, the link broke, or it timed out); the request may or may not have taken effect"
                    );
                    proto::encode_error(corr, fb::ErrorCode::OutcomeUnknown, &msg)
                })
            })
        }
        // Part of the frame may have reached the node: it may have carried it out.
        Err(e) if e.maybe_sent() => Box::pin(ready(proto::encode_error(
            corr,
            fb::ErrorCode::OutcomeUnknown,
            &format!("{e}; the request may or may not have taken effect"),
        ))),
        Err(e) => unavailable(e.to_string()),
    }
}

/// Resolves once this node's table says `node` is down (checked every
/// [`limits::FORWARD_NODE_CHECK_MS`]).
async fn node_goes_down(shard: &Shard, node: u32) {
    loop {
        crate::runtime::sleep(Duration::from_millis(limits::FORWARD_NODE_CHECK_MS)).await;
        if shard.table().node(node).is_some_and(|n| !n.alive) {
            return;
        }
    }
}

/// Cluster: a request another node handed to this one. It is served here (on the owning
/// shard) or refused with `NotLeader`; never forwarded again.
async fn forwarded_in(
    shard: &Rc<Shard>,
    frame: VerifiedFrame,
    conn: u64,
    links: &Rc<ForwardLinks>,
) -> Pending {
    let corr = frame.view().correlation_id();
    let Some(fwd) = frame.forwarded() else {
        let e = proto::encode_error(corr, fb::ErrorCode::Malformed, "not a forwarded frame");
        return Box::pin(ready(e));
    };
    crate::router::bump(&shard.router.copies.node_forwarded_in);
    let inner = fwd.frame;
    let (icorr, ibody) = {
        let f = inner.view();
        (f.correlation_id(), f.body_type())
    };
    if ibody == fb::Body::MulticastProduce {
        return multicast(shard, icorr, inner, Some(&fwd.dests), links).await;
    }
    if matches!(
        ibody,
        fb::Body::ListGroups
            | fb::Body::Stats
            | fb::Body::Status
            | fb::Body::SubscriptionInfo
            | fb::Body::Metadata
    ) {
        // This node's part of a cluster-wide answer.
        let scope = Scope {
            links,
            whole_cluster: false,
        };
        return fanout(shard, icorr, ibody, inner, scope).await;
    }
    let routed = {
        let f = inner.view();
        target_of(&f).map(|t| match t {
            Target::Produce {
                topic,
                partition: None,
                ..
            } => shard.route(Target::Partition {
                topic,
                partition: fwd.partition,
            }),
            t => shard.route(t),
        })
    };
    let e =
        |code, msg: String| -> Pending { Box::pin(ready(proto::encode_error(icorr, code, &msg))) };
    match routed {
        Some(Ok((p, dest))) if dest.is_local() => {
            if dest.shard == shard.id() {
                shard.start(p, conn, inner).await
            } else {
                forward(shard, (dest, p, conn), inner, icorr).await
            }
        }
        Some(Ok((p, dest))) => e(
            fb::ErrorCode::NotLeader,
            format!(
                "node {} does not own this (partition {p}); node {} does, by its metadata; refresh and retry",
                shard.table().node_id().unwrap_or(0),
                dest.node
            ),
        ),
        Some(Err(err)) => Box::pin(ready(wire_error::frame(icorr, &err))),
        None => e(
            fb::ErrorCode::InvalidRequest,
            format!("request type {} cannot be forwarded", ibody.0),
        ),
    }
}

async fn ready(frame: Bytes) -> Bytes {
    frame
}

/// The handshake answer: this shard and the shard count, or the version we speak.
fn handshake(shard: &Shard, corr: u64, frame: &VerifiedFrame) -> Bytes {
    let version = frame
        .view()
        .body_as_handshake()
        .map(|h| h.protocol_version())
        .unwrap_or(0);
    if version == proto::PROTOCOL_VERSION {
        return proto::encode_handshake_response(corr, shard.id() as u32, shard.count() as u32);
    }
    proto::encode_error(
        corr,
        fb::ErrorCode::UnsupportedVersion,
        &format!(
            "protocol version {version} not supported; this broker speaks {}",
            proto::PROTOCOL_VERSION
        ),
    )
}

/// What a single-destination request addresses, for the router.
fn target_of<'a>(f: &fb::Frame<'a>) -> Option<Target<'a>> {
    let partition = |topic, partition| Target::Partition { topic, partition };
    match f.body_type() {
        fb::Body::Produce => f.body_as_produce().map(|p| Target::Produce {
            topic: p.topic(),
            partition: (p.partition() >= 0).then_some(p.partition() as u32),
            key: p.key().map(|k| k.bytes()),
        }),
        fb::Body::Fetch => f
            .body_as_fetch()
            .map(|x| partition(x.topic(), x.partition())),
        fb::Body::ListOffset => f
            .body_as_list_offset()
            .map(|x| partition(x.topic(), x.partition())),
        fb::Body::QueueFetch => f
            .body_as_queue_fetch()
            .map(|x| partition(x.topic(), x.partition())),
        fb::Body::QueueSettle => f
            .body_as_queue_settle()
            .map(|x| partition(x.topic(), x.partition())),
        fb::Body::CreateTopic | fb::Body::DeleteTopic => Some(Target::Controller),
        fb::Body::JoinGroup
        | fb::Body::Heartbeat
        | fb::Body::LeaveGroup
        | fb::Body::CommitOffsets
        | fb::Body::FetchOffsets
        | fb::Body::DescribeGroup => group_of(f).map(Target::Group),
        _ => None,
    }
}

/// Sends a request to its owning shard; the returned future yields the owner's reply.
async fn forward(
    shard: &Rc<Shard>,
    to: (Dest, u32, u64),
    frame: VerifiedFrame,
    corr: u64,
) -> Pending {
    let (dest, partition, conn) = to;
    let from = shard.id();
    let rx = shard
        .router
        .send_request(dest, move |req_id| Envelope::Request {
            from,
            req_id,
            partition,
            conn,
            frame,
        })
        .await;
    Box::pin(async move {
        match rx {
            Ok(rx) => match rx.await {
                Some(Reply::Response { frame, .. }) => frame,
                _ => {
                    proto::encode_error(corr, fb::ErrorCode::Internal, "owning shard did not reply")
                }
            },
            Err(e) => proto::encode_error(corr, fb::ErrorCode::Internal, &e),
        }
    })
}

/// Metadata needs every shard's partitions: ask all, merge the answers.
async fn metadata_fanout(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    let wanted: Vec<String> = Some(frame.view())
        .and_then(|f| f.body_as_metadata())
        .and_then(|m| m.topics())
        .map(|ts| ts.iter().map(String::from).collect())
        .unwrap_or_default();
    let missing = shard.missing_topics(&wanted);
    if !missing.is_empty() {
        let e = proto::encode_error(
            corr,
            fb::ErrorCode::UnknownTopic,
            &format!("unknown topic(s): {}", missing.join(", ")),
        );
        return Box::pin(async move { e });
    }
    let whole_cluster = scope.whole_cluster;
    let replies = ask_scope(shard, corr, frame, scope).await;
    let me = shard.clone();
    Box::pin(async move {
        let mut merged: Vec<proto::TopicMetaOut> = Vec::new();
        for r in replies {
            let Some(x) = reply_body(&r.await, |f| {
                f.body_as_metadata_response()
                    .map(proto::decode_metadata_response)
            }) else {
                continue;
            };
            for t in x {
                match merged.iter_mut().find(|m| m.name == t.name) {
                    Some(m) => m.partitions.extend(t.partitions),
                    None => merged.push(t),
                }
            }
        }
        merged.sort_by(|a, b| a.name.cmp(&b.name));
        if whole_cluster {
            // Leaders and replicas, and partitions of nodes that did not answer.
            me.add_cluster_placement(&mut merged);
        }
        for m in &mut merged {
            m.partitions.sort_by_key(|p| p.partition);
            m.partitions.dedup_by_key(|p| p.partition);
        }
        proto::encode_metadata_response(corr, &merged)
    })
}

/// Which nodes a fan-out request asks: this node's shards only (a request another node
/// forwarded here, or `Stats`, which counts per node), or every live node of the cluster.
#[derive(Clone, Copy)]
struct Scope<'a> {
    links: &'a Rc<ForwardLinks>,
    whole_cluster: bool,
}

/// A request every shard (and, in a cluster, every node) answers in part.
async fn fanout(
    shard: &Rc<Shard>,
    corr: u64,
    body: fb::Body,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    match body {
        fb::Body::ListGroups => list_groups_fanout(shard, corr, frame, scope).await,
        // Counters are per node: `ringmq stats` shows the node it asks.
        fb::Body::Stats => {
            let local = Scope {
                whole_cluster: false,
                ..scope
            };
            stats_fanout(shard, corr, frame, local).await
        }
        fb::Body::Status => status_fanout(shard, corr, frame, scope).await,
        fb::Body::SubscriptionInfo => subscriptions_fanout(shard, corr, frame, scope).await,
        _ => metadata_fanout(shard, corr, frame, scope).await,
    }
}

/// Asks every shard of this node and, for a whole-cluster scope, every other live node (one
/// forwarded frame each; a node that cannot answer is left out of the merge).
async fn ask_scope(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Vec<Pending> {
    let mut replies = ask_all(shard, corr, frame.clone()).await;
    if !scope.whole_cluster {
        return replies;
    }
    let others: Vec<u32> = {
        let table = shard.table();
        let me = table.node_id();
        match &table.cluster {
            Some(c) => c
                .nodes
                .iter()
                .filter(|(id, n)| Some(**id) != me && n.alive)
                .map(|(id, _)| *id)
                .collect(),
            None => Vec::new(),
        }
    };
    // All nodes at once: one that is slow to connect or answer does not delay the others.
    for node in others {
        let (me, links, frame) = (shard.clone(), scope.links.clone(), frame.clone());
        let task = glommio::spawn_local(async move {
            forward_to_node(&me, &links, (node, 0, &[]), corr, &frame)
                .await
                .await
        });
        replies.push(Box::pin(task));
    }
    replies
}

/// Asks every shard (this one directly, the others over the mesh) and returns their replies.
async fn ask_all(shard: &Rc<Shard>, corr: u64, frame: VerifiedFrame) -> Vec<Pending> {
    let mut replies = Vec::with_capacity(shard.count());
    for s in 0..shard.count() {
        if s == shard.id() {
            replies.push(shard.start(0, 0, frame.clone()).await);
        } else {
            replies.push(forward(shard, (Dest::local(s), 0, 0), frame.clone(), corr).await);
        }
    }
    replies
}

/// Reads a value out of a shard's reply frame (length prefix included).
fn reply_body<T>(bytes: &Bytes, read: impl FnOnce(fb::Frame<'_>) -> Option<T>) -> Option<T> {
    proto::verify_frame(&bytes[proto::LEN_PREFIX_BYTES.min(bytes.len())..])
        .ok()
        .and_then(read)
}

/// Subscriptions live on every shard owning a partition of the topic: ask all, sum per name.
async fn subscriptions_fanout(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    let replies = ask_scope(shard, corr, frame, scope).await;
    Box::pin(async move {
        let mut by: std::collections::BTreeMap<String, proto::queue::SubStatsOut> =
            Default::default();
        for r in replies {
            let subs = reply_body(&r.await, |f| {
                f.body_as_subscription_info_response()
                    .map(proto::queue::decode_subscription_info_response)
            });
            for s in subs.unwrap_or_default() {
                match by.get_mut(&s.subscription) {
                    Some(e) => e.absorb(&s),
                    None => {
                        by.insert(s.subscription.clone(), s);
                    }
                }
            }
        }
        let v: Vec<_> = by.into_values().collect();
        proto::queue::encode_subscription_info_response(corr, &v)
    })
}

/// Concatenates the lists read from every shard's reply, sorted, as one response.
async fn merged<T>(
    replies: Vec<Pending>,
    read: impl Fn(fb::Frame<'_>) -> Option<Vec<T>>,
    sort: impl FnOnce(&mut Vec<T>),
    encode: impl FnOnce(&[T]) -> Bytes,
) -> Bytes {
    let mut all = Vec::new();
    for r in replies {
        all.extend(reply_body(&r.await, &read).unwrap_or_default());
    }
    sort(&mut all);
    encode(&all)
}

/// Every shard's partition health, merged.
async fn status_fanout(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    let replies = ask_scope(shard, corr, frame, scope).await;
    Box::pin(merged(
        replies,
        |f| {
            f.body_as_status_response()
                .map(proto::multicast::decode_status_response)
        },
        |v| v.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition))),
        move |v| proto::multicast::encode_status_response(corr, v),
    ))
}

/// Every shard's counters, merged.
async fn stats_fanout(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    let replies = ask_scope(shard, corr, frame, scope).await;
    Box::pin(merged(
        replies,
        |f| {
            f.body_as_stats_response()
                .map(proto::multicast::decode_stats_response)
        },
        |v| v.sort_by_key(|s| s.shard),
        move |v| proto::multicast::encode_stats_response(corr, v),
    ))
}

/// Every shard coordinates some groups: ask all, merge the names.
async fn list_groups_fanout(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    scope: Scope<'_>,
) -> Pending {
    let replies = ask_scope(shard, corr, frame, scope).await;
    Box::pin(merged(
        replies,
        |f| {
            f.body_as_list_groups_response()
                .map(|l| proto::groups::decode_strings(l.groups()))
        },
        |v| v.sort(),
        move |v| proto::groups::encode_list_groups_response(corr, v),
    ))
}

/// A multicast: resolve each destination, send ONE copy of the frame to each other shard that
/// owns some destinations (with its list) and, in a cluster, ONE copy to each other node that
/// owns some (with the indexes of its destinations; it splits them by shard), append locally
/// to ours, and gather per-destination results in request order. `only` (a multicast another
/// node forwarded here) limits it to those destination indexes, all of which must be here.
async fn multicast(
    shard: &Rc<Shard>,
    corr: u64,
    frame: VerifiedFrame,
    only: Option<&[u32]>,
    links: &Rc<ForwardLinks>,
) -> Pending {
    use proto::multicast::DestResult;
    use std::collections::BTreeMap;
    let mut results: Vec<Option<DestResult>> = Vec::new();
    let mut by_shard: BTreeMap<usize, Vec<(usize, String, u32)>> = BTreeMap::new();
    let mut by_node: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    {
        let Some(m) = frame.view().body_as_multicast_produce() else {
            let e = proto::encode_error(corr, fb::ErrorCode::Malformed, "not a multicast");
            return Box::pin(async move { e });
        };
        let key = m.key().map(|k| k.bytes());
        let dests = m.destinations();
        let indexes: Vec<usize> = match only {
            Some(ix) => ix
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| i < dests.len())
                .collect(),
            None => (0..dests.len()).collect(),
        };
        for (slot, i) in indexes.into_iter().enumerate() {
            let d = dests.get(i);
            let partition = (d.partition() >= 0).then_some(d.partition() as u32);
            results.push(None);
            let target = Target::Produce {
                topic: d.topic(),
                partition,
                key,
            };
            let failed = |code: u16, msg: String| DestResult {
                topic: d.topic().to_string(),
                partition: partition.unwrap_or(0),
                outcome: Err((code, msg)),
            };
            match shard.route(target) {
                Ok((p, dest)) if dest.is_local() => {
                    by_shard
                        .entry(dest.shard)
                        .or_default()
                        .push((slot, d.topic().to_string(), p))
                }
                Ok((_, dest)) if only.is_none() => by_node.entry(dest.node).or_default().push(slot),
                Ok((p, dest)) => {
                    let msg = format!(
                        "partition {p} is led by node {} by this node's metadata",
                        dest.node
                    );
                    results[slot] = Some(failed(fb::ErrorCode::NotLeader.0, msg));
                }
                Err(e) => results[slot] = Some(failed(e.wire_code().0, e.to_string())),
            }
        }
    }
    let mut waits: Vec<(Vec<usize>, crate::shard::pubsub::PendingResults)> = Vec::new();
    for (node, slots) in by_node {
        // Slots are destination indexes here (no `only` on the sending side).
        let ix: Vec<u32> = slots.iter().map(|&i| i as u32).collect();
        let reply = forward_to_node(shard, links, (node, 0, &ix), corr, &frame).await;
        let n = slots.len();
        waits.push((
            slots,
            Box::pin(async move {
                let bytes = reply.await;
                let from_node = reply_body(&bytes, |f| {
                    f.body_as_multicast_produce_response()
                        .map(proto::multicast::decode_multicast_response)
                });
                match from_node {
                    Some(r) if r.len() == n => r,
                    _ => {
                        let why = reply_body(&bytes, |f| {
                            f.body_as_error()
                                .map(|e| (e.code().0, e.message().unwrap_or_default().to_string()))
                        })
                        .unwrap_or((
                            fb::ErrorCode::Internal.0,
                            format!("node {node} gave no multicast answer"),
                        ));
                        vec![
                            DestResult {
                                topic: String::new(),
                                partition: 0,
                                outcome: Err(why),
                            };
                            n
                        ]
                    }
                }
            }),
        ));
    }
    for (owner, dests) in by_shard {
        let idx: Vec<usize> = dests.iter().map(|d| d.0).collect();
        let list: Vec<(String, u32)> = dests.into_iter().map(|d| (d.1, d.2)).collect();
        if owner == shard.id() {
            waits.push((idx, shard.multicast_start(frame.clone(), list).await));
            continue;
        }
        let from = shard.id();
        let f = frame.clone();
        let rx = shard
            .router
            .call(owner, move |req_id| Envelope::Multicast {
                from,
                req_id,
                frame: f,
                dests: list.clone(),
            })
            .await;
        let n = idx.len();
        waits.push((
            idx,
            Box::pin(async move {
                match rx {
                    Ok(rx) => match rx.await {
                        Some(Reply::MulticastResult { results, .. }) => results,
                        _ => vec![
                            DestResult {
                                topic: String::new(),
                                partition: 0,
                                outcome: Err((
                                    fb::ErrorCode::Internal.0,
                                    "owning shard did not reply".into()
                                ))
                            };
                            n
                        ],
                    },
                    Err(e) => vec![
                        DestResult {
                            topic: String::new(),
                            partition: 0,
                            outcome: Err((fb::ErrorCode::Internal.0, e))
                        };
                        n
                    ],
                }
            }),
        ));
    }
    Box::pin(async move {
        for (idx, w) in waits {
            for (i, r) in idx.into_iter().zip(w.await) {
                results[i] = Some(r);
            }
        }
        let out: Vec<DestResult> = results.into_iter().flatten().collect();
        proto::multicast::encode_multicast_response(corr, &out)
    })
}

/// The group a group request names.
fn group_of<'a>(f: &fb::Frame<'a>) -> Option<&'a str> {
    f.body_as_join_group()
        .map(|x| x.group())
        .or_else(|| f.body_as_heartbeat().map(|x| x.group()))
        .or_else(|| f.body_as_leave_group().map(|x| x.group()))
        .or_else(|| f.body_as_commit_offsets().map(|x| x.group()))
        .or_else(|| f.body_as_fetch_offsets().map(|x| x.group()))
        .or_else(|| f.body_as_describe_group().map(|x| x.group()))
}

async fn write_loop(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    outbox: Rc<Outbox>,
    watch: Rc<Watch>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(limits::WRITE_COALESCE_BYTES);
    loop {
        let wait = outbox.ready.wait();
        let batch: Vec<(Bytes, Option<Held>)> = {
            let mut q = outbox.queue.borrow_mut();
            let mut bytes = 0;
            let mut out = Vec::new();
            while let Some((f, _)) = q.front() {
                if !out.is_empty() && bytes + f.len() > limits::WRITE_COALESCE_BYTES {
                    break;
                }
                bytes += f.len();
                if let Some(item) = q.pop_front() {
                    out.push(item);
                }
            }
            out
        };
        if batch.is_empty() {
            if outbox.closed.get() && outbox.pending.get() == 0 {
                break;
            }
            wait.await;
            continue;
        }
        let ok = if batch.len() == 1 {
            write_timed(&mut writer, &watch, &batch[0].0).await
        } else {
            buf.clear();
            for (f, _) in &batch {
                buf.extend_from_slice(f);
            }
            write_timed(&mut writer, &watch, &buf).await
        };
        watch.writing_since.set(None);
        let n: usize = batch.iter().map(|(f, _)| f.len()).sum();
        drop(batch);
        outbox.written(n);
        if !ok || writer.flush().await.is_err() {
            // The peer is gone: drop what is queued so permits are released, and stop the
            // reader (it may be waiting for memory that only this connection holds).
            outbox.failed.set(true);
            outbox.queue.borrow_mut().clear();
            watch.shut(libc::SHUT_RDWR, "the client went away".into());
            outbox.closed.set(true);
            outbox.written(usize::MAX);
            break;
        }
    }
    let _ = writer.close().await;
}

/// Writes `data` in pieces, timing each for the stall sweeper: a client that reads a large
/// response slowly but steadily is not stalled; one that reads nothing is.
async fn write_timed(
    writer: &mut futures_lite::io::WriteHalf<TcpStream>,
    watch: &Watch,
    data: &[u8],
) -> bool {
    for piece in data.chunks(limits::WRITE_COALESCE_BYTES) {
        watch.writing_since.set(Some(Instant::now()));
        let ok = writer.write_all(piece).await.is_ok();
        watch.writing_since.set(None);
        if !ok {
            return false;
        }
    }
    true
}

/// Serves envelopes from one peer shard until the mesh closes.
pub async fn mesh_loop(
    shard: Rc<Shard>,
    rx: glommio::channels::shared_channel::ConnectedReceiver<Envelope>,
) {
    while let Some(env) = rx.recv().await {
        match env {
            Envelope::ConnectionClosed { conn } => shard.release_connection(conn),
            Envelope::Request {
                from,
                req_id,
                partition,
                conn,
                frame,
            } => {
                let pending = shard.start(partition, conn, frame).await;
                let s = shard.clone();
                glommio::spawn_local(async move {
                    let frame = pending.await;
                    s.router
                        .reply(from, Reply::Response { req_id, frame })
                        .await;
                })
                .detach();
            }
            Envelope::Internal { from, req_id, call } => {
                let s = shard.clone();
                glommio::spawn_local(async move {
                    let result = s.internal(call).await;
                    s.router
                        .reply(from, Reply::Internal { req_id, result })
                        .await;
                })
                .detach();
            }
            Envelope::Multicast {
                from,
                req_id,
                frame,
                dests,
            } => {
                let pending = shard.multicast_start(frame, dests).await;
                let s = shard.clone();
                glommio::spawn_local(async move {
                    let results = pending.await;
                    s.router
                        .reply(from, Reply::MulticastResult { req_id, results })
                        .await;
                })
                .detach();
            }
            Envelope::Meta {
                from,
                req_id,
                version,
                change,
            } => {
                let s = shard.clone();
                glommio::spawn_local(async move {
                    let error = s.apply_meta_update(version, &change).await.err();
                    s.router.reply(from, Reply::Ack { req_id, error }).await;
                })
                .detach();
            }
        }
    }
}

/// Hands replies from one peer shard to the tasks awaiting them until the mesh closes. Runs
/// no handler, so the reply lane never backs up behind requests.
pub async fn reply_loop(
    shard: Rc<Shard>,
    rx: glommio::channels::shared_channel::ConnectedReceiver<Reply>,
) {
    while let Some(reply) = rx.recv().await {
        shard.router.complete(reply);
    }
}

/// Takes this shard's receivers of both lanes and spawns one loop per peer and lane.
pub fn spawn_mesh_loops(
    shard: &Rc<Shard>,
    mut requests: Receivers<Envelope>,
    mut replies: Receivers<Reply>,
) {
    for (_, rx) in requests.streams() {
        glommio::spawn_local(mesh_loop(shard.clone(), rx)).detach();
    }
    for (_, rx) in replies.streams() {
        glommio::spawn_local(reply_loop(shard.clone(), rx)).detach();
    }
}
