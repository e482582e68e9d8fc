//! One shard's replication loop (issue 14): the partition replicas ([`Replica`]) this shard
//! owns, one tick timer for all of them, their Ready loops, and their messages to other
//! nodes. Messages for one node are packed into as few peer frames as fit
//! ([`limits::REPLICA_FRAME_BYTES`]) per flush, on this shard's own link to that node's peer
//! listener; the receiving node's shard 0 hands each message to the shard owning the
//! partition there. Leadership changes are reported to the node runtime (shard 0), which
//! tells every node (`K_LEADER`), so every table names each partition's current leader.
//!
//! Frame body (after the sender's node id): message count (u32), then per message the topic
//! (u32 length + bytes), the partition (u32), the incarnation (u64) and the protobuf bytes
//! (u32 length + bytes).
//!
//! Owns: the replicas of this shard and their outbound links. Must not touch: partitions'
//! data other than through their replica, client sockets, the controller.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message;

use super::replica::{LeaderView, Replica, ReplicaTiming};
use super::transport::{PeerFrame, PeerLink};
use super::wire::{put_str, Reader};
use crate::limits;
use crate::runtime::Notify;
use crate::storage::DmaStorage;

/// Peer frame kind of replication messages (see `node.rs` for the others).
pub const K_REPLICA: u8 = 6;

/// A partition replica on a shard, keyed by topic and partition.
pub type Key = (String, u32);

/// One Raft message for a partition replica: (topic, partition, incarnation, message).
pub type Addressed = (String, u32, u64, Message);

/// A leadership a replica saw: (topic, partition, incarnation, term, leader node).
pub type LeaderReport = (String, u32, u64, u64, u32);

/// How often each shard repeats the leaderships it holds to the node runtime (which tells
/// every node), so a node that restarted learns them.
const LEADER_REPEAT_MS: u64 = 2_000;

struct Group {
    replica: Rc<Replica<DmaStorage>>,
    incarnation: u64,
}

/// Frames and bytes sent to one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub frames: u64,
    pub bytes: u64,
    pub messages: u64,
}

pub struct Replication {
    me: u32,
    pub timing: ReplicaTiming,
    groups: RefCell<BTreeMap<Key, Group>>,
    inbox: RefCell<VecDeque<Addressed>>,
    outbox: RefCell<BTreeMap<u32, Vec<Addressed>>>,
    links: RefCell<BTreeMap<u32, (String, PeerLink)>>,
    wake: Notify,
    reported: RefCell<BTreeMap<Key, LeaderView>>,
    /// Leaderships seen and not yet handed to the node runtime.
    reports: RefCell<Vec<LeaderReport>>,
    counters: RefCell<BTreeMap<u32, PeerCounters>>,
    dropped: Cell<u64>,
}

impl Replication {
    pub fn new(me: u32, timing: ReplicaTiming) -> Self {
        Self {
            me,
            timing,
            groups: RefCell::new(BTreeMap::new()),
            inbox: RefCell::new(VecDeque::new()),
            outbox: RefCell::new(BTreeMap::new()),
            links: RefCell::new(BTreeMap::new()),
            wake: Notify::new(),
            reported: RefCell::new(BTreeMap::new()),
            reports: RefCell::new(Vec::new()),
            counters: RefCell::new(BTreeMap::new()),
            dropped: Cell::new(0),
        }
    }

    /// Adds a replica (its partition was opened on this shard).
    pub fn add(&self, replica: Rc<Replica<DmaStorage>>, incarnation: u64, peers: Vec<u32>) {
        let key = (replica.topic.clone(), replica.partition);
        replica.campaign_if_new_preferred(peers.first().copied() == Some(self.me));
        self.groups.borrow_mut().insert(
            key,
            Group {
                replica,
                incarnation,
            },
        );
        self.wake.notify_all();
    }

    /// Drops the replicas of `topic` (deleted, or no longer placed here).
    pub fn remove_topic(&self, topic: &str) {
        self.groups.borrow_mut().retain(|(t, _), _| t != topic);
        self.reported.borrow_mut().retain(|(t, _), _| t != topic);
    }

    pub fn get(&self, topic: &str, partition: u32) -> Option<Rc<Replica<DmaStorage>>> {
        self.groups
            .borrow()
            .get(&(topic.to_string(), partition))
            .map(|g| g.replica.clone())
    }

    pub fn len(&self) -> usize {
        self.groups.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.borrow().is_empty()
    }

    /// Something changed (a proposal): run the loop now.
    pub fn wake(&self) {
        self.wake.notify_all();
    }

    /// Messages from a peer for replicas of this shard.
    pub fn deliver(&self, msgs: Vec<Addressed>) {
        let mut inbox = self.inbox.borrow_mut();
        for m in msgs {
            if inbox.len() >= limits::REPLICA_INBOX_MESSAGES {
                self.dropped.set(self.dropped.get() + 1);
                continue;
            }
            inbox.push_back(m);
        }
        drop(inbox);
        self.wake.notify_all();
    }

    /// Frames, bytes and messages sent per node, and messages dropped on arrival.
    pub fn counters(&self) -> (BTreeMap<u32, PeerCounters>, u64) {
        (self.counters.borrow().clone(), self.dropped.get())
    }

    /// This shard's replication counters added to its stats.
    pub fn add_stats(
        &self,
        mut s: crate::protocol::multicast::ShardStatsOut,
    ) -> crate::protocol::multicast::ShardStatsOut {
        let groups = self.groups.borrow();
        s.replicas = groups.len() as u32;
        s.replicas_leading = groups.values().filter(|g| g.replica.is_leader()).count() as u32;
        s.replica_peers = self
            .counters
            .borrow()
            .iter()
            .map(|(&node, c)| crate::protocol::multicast::ReplicaPeerOut {
                node,
                frames: c.frames,
                bytes: c.bytes,
                messages: c.messages,
            })
            .collect();
        s.replica_messages_dropped = self.dropped.get();
        s
    }

    /// Leaderships to hand to the node runtime.
    fn take_reports(&self) -> Vec<LeaderReport> {
        std::mem::take(&mut self.reports.borrow_mut())
    }

    /// The loop: ticks, inbound messages, Ready loops (each replica's in its own task, so
    /// the fdatasyncs of several partitions overlap), outbound frames. `peer_addr` gives a
    /// node's peer address from the shard's table.
    pub async fn run(
        self: Rc<Self>,
        stop: Rc<dyn Fn() -> bool>,
        peer_addr: Rc<dyn Fn(u32) -> Option<String>>,
        on_reports: Rc<dyn Fn(Vec<LeaderReport>)>,
    ) {
        let tick = Duration::from_millis(self.timing.tick_ms);
        let mut next_tick = Instant::now() + tick;
        let mut next_repeat = Instant::now();
        while !stop() {
            let now = Instant::now();
            if !self.busy() && now < next_tick {
                let wait = self.wake.wait();
                futures_lite::future::or(wait, crate::runtime::sleep(next_tick - now)).await;
            }
            self.step_inbox();
            let now = Instant::now();
            if now >= next_tick {
                next_tick = (next_tick + tick).max(now);
                for g in self.groups.borrow().values() {
                    g.replica.tick();
                }
            }
            self.start_drives();
            self.flush(&*peer_addr);
            let repeat = now >= next_repeat;
            if repeat {
                next_repeat = now + Duration::from_millis(LEADER_REPEAT_MS);
            }
            self.note_leaders(repeat);
            on_reports(self.take_reports());
            // Let the drive tasks and links run before looking again.
            glommio::yield_if_needed().await;
        }
        self.links.borrow_mut().clear();
    }

    fn busy(&self) -> bool {
        !self.inbox.borrow().is_empty()
            || !self.outbox.borrow().is_empty()
            || self.groups.borrow().values().any(|g| g.replica.has_ready())
    }

    fn step_inbox(&self) {
        loop {
            let next = self.inbox.borrow_mut().pop_front();
            let Some((topic, partition, incarnation, m)) = next else {
                return;
            };
            let replica = self
                .groups
                .borrow()
                .get(&(topic, partition))
                .filter(|g| g.incarnation == incarnation)
                .map(|g| g.replica.clone());
            // A message for a replica this shard does not have (yet, or any more) is dropped;
            // Raft sends again.
            if let Some(r) = replica {
                r.step(m);
            }
        }
    }

    fn start_drives(self: &Rc<Self>) {
        let ready: Vec<(Rc<Replica<DmaStorage>>, u64)> = self
            .groups
            .borrow()
            .values()
            .filter(|g| g.replica.has_ready())
            .map(|g| (g.replica.clone(), g.incarnation))
            .collect();
        for (r, incarnation) in ready {
            let me = self.clone();
            glommio::spawn_local(async move {
                let sink = me.clone();
                let (topic, partition) = (r.topic.clone(), r.partition);
                let send = move |msgs: Vec<Message>| {
                    if msgs.is_empty() {
                        return;
                    }
                    let mut out = sink.outbox.borrow_mut();
                    for m in msgs {
                        let to = u32::try_from(m.to).unwrap_or(0);
                        let addressed = (topic.clone(), partition, incarnation, m);
                        out.entry(to).or_default().push(addressed);
                    }
                    drop(out);
                    sink.wake.notify_all();
                };
                r.drive(&send).await;
                me.wake.notify_all();
            })
            .detach();
        }
    }

    /// Sends what the replicas produced, packed per node.
    fn flush(&self, peer_addr: &dyn Fn(u32) -> Option<String>) {
        let out = std::mem::take(&mut *self.outbox.borrow_mut());
        for (node, msgs) in out {
            let Some(addr) = peer_addr(node) else {
                continue;
            };
            for payload in encode_frames(self.me, &msgs) {
                let bytes = payload.len() as u64;
                let sent = self.send(
                    node,
                    &addr,
                    PeerFrame {
                        kind: K_REPLICA,
                        payload,
                    },
                );
                if sent {
                    let mut c = self.counters.borrow_mut();
                    let e = c.entry(node).or_default();
                    e.frames += 1;
                    e.bytes += bytes;
                }
            }
            let mut c = self.counters.borrow_mut();
            c.entry(node).or_default().messages += msgs.len() as u64;
        }
    }

    /// Queues a frame on this shard's link to `node` (a new link when its address changed).
    fn send(&self, node: u32, addr: &str, frame: PeerFrame) -> bool {
        let mut links = self.links.borrow_mut();
        if links.get(&node).is_some_and(|(a, _)| a != addr) {
            if let Some((_, old)) = links.remove(&node) {
                old.close();
            }
        }
        let (_, link) = links
            .entry(node)
            .or_insert_with(|| (addr.to_string(), PeerLink::start(addr)));
        link.send(frame)
    }

    /// Queues leadership changes (or, on `repeat`, every leadership held here) for the node
    /// runtime.
    fn note_leaders(&self, repeat: bool) {
        let groups = self.groups.borrow();
        let mut reported = self.reported.borrow_mut();
        let mut reports = self.reports.borrow_mut();
        for (key, g) in groups.iter() {
            let view = g.replica.leader();
            if view.leader == 0 {
                continue;
            }
            let changed = reported.get(key) != Some(&view);
            let mine = view.leader == u64::from(self.me);
            if changed || (repeat && mine) {
                reported.insert(key.clone(), view);
                reports.push((
                    key.0.clone(),
                    key.1,
                    g.incarnation,
                    view.term,
                    u32::try_from(view.leader).unwrap_or(0),
                ));
            }
        }
    }
}

/// Packs messages into frame bodies of at most about [`limits::REPLICA_FRAME_BYTES`].
pub fn encode_frames(me: u32, msgs: &[Addressed]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    let mut count = 0u32;
    let finish = |body: &mut Vec<u8>, count: &mut u32, frames: &mut Vec<Vec<u8>>| {
        if *count == 0 {
            return;
        }
        let mut f = Vec::with_capacity(8 + body.len());
        f.extend_from_slice(&me.to_le_bytes());
        f.extend_from_slice(&count.to_le_bytes());
        f.append(body);
        frames.push(f);
        *count = 0;
    };
    for (topic, partition, incarnation, m) in msgs {
        let Ok(bytes) = m.write_to_bytes() else {
            continue;
        };
        if !body.is_empty() && body.len() + bytes.len() > limits::REPLICA_FRAME_BYTES {
            finish(&mut body, &mut count, &mut frames);
        }
        put_str(&mut body, topic);
        body.extend_from_slice(&partition.to_le_bytes());
        body.extend_from_slice(&incarnation.to_le_bytes());
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(&bytes);
        count += 1;
    }
    finish(&mut body, &mut count, &mut frames);
    frames
}

/// Decodes a frame body after the sender's id (which the caller read): the messages, each
/// checked to come from `from` and be for `me`.
pub fn decode_frame(r: &mut Reader<'_>, from: u32, me: u32) -> Result<Vec<Addressed>, String> {
    let n = r.count(16)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let topic = r.str()?;
        let partition = r.u32()?;
        let incarnation = r.u64()?;
        let len = r.u32()? as usize;
        let bytes = r.bytes(len)?;
        let m = Message::parse_from_bytes(bytes)
            .map_err(|e| format!("replication message from node {from}: {e}"))?;
        if m.from != u64::from(from) || m.to != u64::from(me) {
            return Err(format!(
                "replication message from {} to {} arrived from node {from} at node {me}",
                m.from, m.to
            ));
        }
        out.push((topic, partition, incarnation, m));
    }
    Ok(out)
}
