//! Who owns a partition and how to get there: the channel mesh between shards, request
//! forwarding and the replies that come back.
//!
//! Owns: this shard's mesh senders (two lanes: requests, and replies, so a reply never queues
//! behind requests), the table of requests awaiting a reply from another shard, and the
//! cross-core copy counters. Must not touch: partitions or sockets. Every envelope is
//! owned data (`Bytes`, strings); nothing borrowed crosses a core.

pub mod route;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use bytes::Bytes;

use crate::protocol::{VerifiedBatch, VerifiedFrame};
use glommio::channels::channel_mesh::Senders;

use crate::metadata::MetaChange;
use crate::protocol::multicast::DestResult;
use crate::runtime::oneshot;
use route::Dest;

/// What travels between shards on the request lane; each kind that wants an answer gets one
/// [`Reply`] on the reply lane.
#[derive(Debug)]
pub enum Envelope {
    /// A client request (verified frame bytes, no length prefix) for a partition the receiver
    /// owns, or an admin/metadata request. `partition` is resolved by the sender.
    Request {
        from: usize,
        req_id: u64,
        partition: u32,
        /// The client connection (broker-wide id) the request came from; 0 = internal.
        conn: u64,
        frame: VerifiedFrame,
    },
    /// A client connection closed: release its queue leases. No reply.
    ConnectionClosed { conn: u64 },
    /// A typed request the broker makes of itself (no frame); answered with
    /// `Reply::Internal`.
    Internal {
        from: usize,
        req_id: u64,
        call: Internal,
    },
    /// A metadata change from the controller, with the table version it makes; answered
    /// with `Ack` (a stale version is acknowledged and ignored).
    Meta {
        from: usize,
        req_id: u64,
        version: u64,
        change: MetaChange,
    },
    /// One copy of a multicast batch (the verified frame) for the receiver's destinations.
    Multicast {
        from: usize,
        req_id: u64,
        frame: VerifiedFrame,
        dests: Vec<(String, u32)>,
    },
}

/// Requests the broker makes of its own shards, as typed calls.
#[derive(Debug)]
pub enum Internal {
    /// Create the topic if it does not exist (the controller shard only): a dead-letter topic.
    EnsureTopic { name: String, partitions: u32 },
    /// Append a verified batch to a partition the receiver owns and wait until it is
    /// acknowledged: a dead letter.
    Append {
        topic: String,
        partition: u32,
        batch: VerifiedBatch,
    },
    /// Raft messages from other nodes for partition replicas the receiver owns.
    ReplicaMessages {
        msgs: Vec<crate::cluster::replication::Addressed>,
    },
    /// Partition leaderships a shard saw (to shard 0, which tells the other nodes).
    LeaderReports {
        reports: Vec<crate::cluster::replication::LeaderReport>,
    },
}

/// What travels back on the reply lane.
#[derive(Debug)]
pub enum Reply {
    /// The answer to a `Request`: a complete response frame, length prefix included.
    Response { req_id: u64, frame: Bytes },
    /// The answer to `Meta`: `None` or why applying failed on that shard.
    Ack { req_id: u64, error: Option<String> },
    /// Per-destination outcomes of a `Multicast`, in its order.
    MulticastResult {
        req_id: u64,
        results: Vec<DestResult>,
    },
    /// The answer to an `Internal` call: done, or why not.
    Internal {
        req_id: u64,
        result: Result<(), String>,
    },
}

impl Reply {
    fn req_id(&self) -> u64 {
        match self {
            Self::Response { req_id, .. }
            | Self::Ack { req_id, .. }
            | Self::MulticastResult { req_id, .. }
            | Self::Internal { req_id, .. } => *req_id,
        }
    }
}

/// Counters of batch copies sent to other cores, by reason.
#[derive(Debug, Default)]
pub struct CopyCounters {
    pub forwards: Cell<u64>,
    pub multicast: Cell<u64>,
    pub replies: Cell<u64>,
    pub meta: Cell<u64>,
    /// Cluster: requests forwarded to another node, multicast copies sent to another node,
    /// forwarded frames received from other nodes.
    pub node_forwards: Cell<u64>,
    pub node_multicast: Cell<u64>,
    pub node_forwarded_in: Cell<u64>,
}

/// This shard's end of the mesh.
pub struct Router {
    pub shard_id: usize,
    pub shard_count: usize,
    senders: Senders<Envelope>,
    reply_senders: Senders<Reply>,
    pending: RefCell<HashMap<u64, oneshot::Sender<Reply>>>,
    next_req_id: Cell<u64>,
    pub copies: CopyCounters,
}

impl Router {
    /// This shard's ends of the two lanes. Both meshes number their peers the same way
    /// (glommio orders peers by executor id), which is checked here.
    pub fn new(senders: Senders<Envelope>, reply_senders: Senders<Reply>) -> Result<Self, String> {
        if senders.peer_id() != reply_senders.peer_id()
            || senders.nr_consumers() != reply_senders.nr_consumers()
        {
            return Err(format!(
                "the request and reply meshes disagree on this shard's id ({} vs {})",
                senders.peer_id(),
                reply_senders.peer_id()
            ));
        }
        Ok(Self {
            shard_id: senders.peer_id(),
            shard_count: senders.nr_consumers(),
            senders,
            reply_senders,
            pending: RefCell::new(HashMap::new()),
            next_req_id: Cell::new(1),
            copies: CopyCounters::default(),
        })
    }

    fn new_req_id(&self) -> u64 {
        let id = self.next_req_id.get();
        self.next_req_id.set(id + 1);
        id
    }

    /// Sends a request-like envelope made by `make(req_id)` to shard `to` (waiting while the
    /// channel is full) and returns the receiver of its reply. Sending is in call order.
    pub async fn call(
        &self,
        to: usize,
        make: impl FnOnce(u64) -> Envelope,
    ) -> Result<oneshot::Receiver<Reply>, String> {
        let req_id = self.new_req_id();
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(req_id, tx);
        let env = make(req_id);
        match &env {
            Envelope::Request { .. } => bump(&self.copies.forwards),
            Envelope::Meta { .. } => bump(&self.copies.meta),
            Envelope::Multicast { .. } => bump(&self.copies.multicast),
            _ => {}
        }
        if let Err(e) = self.senders.send_to(to, env).await {
            self.pending.borrow_mut().remove(&req_id);
            return Err(format!("shard {to} unreachable: {e}"));
        }
        Ok(rx)
    }

    /// Sends a reply back to shard `to` on the reply lane.
    pub async fn reply(&self, to: usize, reply: Reply) {
        bump(&self.copies.replies);
        // A closed mesh means shutdown; the requester is going away too.
        let _ = self.reply_senders.send_to(to, reply).await;
    }

    /// Tells every other shard that connection `conn` closed.
    pub async fn broadcast_closed(&self, conn: u64) {
        for s in (0..self.shard_count).filter(|&s| s != self.shard_id) {
            let _ = self
                .senders
                .send_to(s, Envelope::ConnectionClosed { conn })
                .await;
        }
    }

    /// Hands a reply to the task awaiting it.
    pub fn complete(&self, reply: Reply) {
        if let Some(tx) = self.pending.borrow_mut().remove(&reply.req_id()) {
            tx.send(reply);
        }
    }

    pub fn close(&self) {
        self.senders.close();
        self.reply_senders.close();
    }
}

/// How a request reaches the shard (and, once the cluster lands, the node) that owns it, and
/// how its reply comes back. Today the only transport is this node's mesh ([`Router`]); the
/// cluster adds node-to-node. Callers route with `route::route` and hand the [`Dest`] here,
/// so a cross-core or cross-node hop is visible at the call site.
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// Sends the envelope made by `make(req_id)` to `to` (waiting while its channel is full)
    /// and returns the receiver of the reply.
    async fn send_request(
        &self,
        to: Dest,
        make: impl FnOnce(u64) -> Envelope,
    ) -> Result<oneshot::Receiver<Reply>, String>;
}

impl Transport for Router {
    async fn send_request(
        &self,
        to: Dest,
        make: impl FnOnce(u64) -> Envelope,
    ) -> Result<oneshot::Receiver<Reply>, String> {
        if to.node != route::LOCAL_NODE {
            return Err(format!(
                "node {} is not reachable: node-to-node transport is not built yet",
                to.node
            ));
        }
        self.call(to.shard, make).await
    }
}

pub fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}
