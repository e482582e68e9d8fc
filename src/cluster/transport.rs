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
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("peer closed inside a frame: {e}"))?;
    let kind = body[0];
    body.remove(0);
    Ok(Some(PeerFrame {
        kind,
        payload: body,
    }))
}

/// Accepts peer connections on `listener` and calls `handle(frame)` for every frame, until
/// `stop` is set. A connection that sends a bad frame is closed; others are unaffected.
pub async fn serve_peers(
    listener: TcpListener,
    handle: Rc<dyn Fn(PeerFrame)>,
    stop: Rc<Cell<bool>>,
) {
    while !stop.get() {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            crate::runtime::sleep(Duration::from_millis(50)).await;
            None
        })
        .await;
        let Some(Ok(mut s)) = accepted else { continue };
        let (handle, stop) = (handle.clone(), stop.clone());
        glommio::spawn_local(async move {
            while !stop.get() {
                match read_frame(&mut s).await {
                    Ok(Some(f)) => handle(f),
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("ringmq: peer connection: {e}; closing it");
                        break;
                    }
                }
            }
        })
        .detach();
    }
}

/// One node's outbound link to a peer address.
pub struct PeerLink {
    addr: String,
    queue: RefCell<VecDeque<PeerFrame>>,
    queued: Notify,
    closed: Cell<bool>,
    /// Frames refused because the queue was full.
    pub refused: Cell<u64>,
    /// Connections made (the first and every reconnect).
    pub connects: Cell<u64>,
}

impl PeerLink {
    /// A link to `addr` and the task that keeps it connected (runs until [`PeerLink::close`]).
    pub fn start(addr: &str) -> Rc<Self> {
        let link = Rc::new(Self {
            addr: addr.to_string(),
            queue: RefCell::new(VecDeque::new()),
            queued: Notify::new(),
            closed: Cell::new(false),
            refused: Cell::new(0),
            connects: Cell::new(0),
        });
        glommio::spawn_local(link.clone().run()).detach();
        link
    }

    /// Queues a frame; `false` (and counted) if [`limits::PEER_QUEUE_FRAMES`] are waiting.
    pub fn send(&self, f: PeerFrame) -> bool {
        let mut q = self.queue.borrow_mut();
        if q.len() >= limits::PEER_QUEUE_FRAMES {
            self.refused.set(self.refused.get() + 1);
            return false;
        }
        q.push_back(f);
        drop(q);
        self.queued.notify_all();
        true
    }

    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    pub fn close(&self) {
        self.closed.set(true);
        self.queued.notify_all();
    }

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
            backoff_ms = limits::PEER_RECONNECT_MIN_MS;
            self.write_until_broken(&mut s).await;
        }
    }

    /// Writes queued frames (several per write) until the connection breaks or the link closes.
    async fn write_until_broken(&self, s: &mut TcpStream) {
        loop {
            let wait = self.queued.wait();
            if self.closed.get() {
                return;
            }
            let mut buf = Vec::new();
            while let Some(f) = self.queue.borrow_mut().pop_front() {
                buf.extend_from_slice(&encode(&f));
                if buf.len() >= limits::WRITE_COALESCE_BYTES {
                    break;
                }
            }
            if buf.is_empty() {
                wait.await;
                continue;
            }
            if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
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
                let connects = link.connects.get();
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
                let r = (link.refused.get(), link.queued());
                link.close();
                r
            })
        })
        .expect("executor");
        assert_eq!(refused, 10);
        assert_eq!(queued, limits::PEER_QUEUE_FRAMES);
    }
}
