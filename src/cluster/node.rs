//! A cluster node's runtime, on shard 0: the peer listener, links to the other nodes,
//! heartbeats and liveness, the controller replica (voters only), proposals, and turning the
//! controller's metadata into this node's topic table for every shard.
//!
//! How a cluster forms: every node says Hello to the addresses in `--seeds` (and later to
//! every node it learns of) every [`limits::NODE_HEARTBEAT_MS`]. A node whose `--peer-listen`
//! is a seed is a voter: once it has heard the id of every seed it starts the controller with
//! those ids as voters (the same set on every seed node). A voter restarting finds its voters
//! in its controller file. Every node registers itself through the controller leader; the
//! leader pushes the whole metadata to nodes that are not voters. A Hello also carries the
//! metadata version the sender has applied, so a topic change can wait until every live node
//! has it before it is answered.
//!
//! Owns: everything above; peer frame kinds and their payloads. Must not touch: partitions,
//! client sockets; it changes the topic table only through `Shard::publish_table`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message;

use super::controller::{ControllerNode, ElectionTicks, ProposeError};
use super::membership::{Change, Membership};
use super::meta::{ClusterMeta, MetaCommand, NodeInfo};
use super::raft_store::FileRaftStore;
use super::transport::{serve_peers, PeerFrame, PeerLink};
use super::wire::{put_str, Reader};
use crate::limits;
use crate::metadata::{self, ClusterView, Metadata, NodeView, TopicMeta};
use crate::runtime::config::ClusterConfig;
use crate::runtime::{oneshot, Notify};
use crate::shard::Shard;

const K_HELLO: u8 = 1;
const K_RAFT: u8 = 2;
const K_PROPOSE: u8 = 3;
const K_RESULT: u8 = 4;
const K_META: u8 = 5;
/// Partition replica messages (see `replication`).
const K_REPLICA: u8 = super::replication::K_REPLICA;
/// Partition leaderships a node saw: count, then (topic, partition, incarnation, term, leader).
const K_LEADER: u8 = 7;

const RESULT_OK: u8 = 0;
const RESULT_REFUSED: u8 = 1;
const RESULT_UNAVAILABLE: u8 = 2;

/// How often the controller leader pushes the metadata to nodes that do not vote.
const META_PUSH_MS: u64 = 1_000;
/// How often a node not (correctly) registered asks the controller to register it.
const REGISTER_RETRY_MS: u64 = 1_000;

/// Why a proposal did not take effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeFailure {
    /// No controller leader, a leader change, or no answer in time: retry.
    Unavailable(String),
    /// The controller applied it and refused it (the reason is the state machine's).
    Refused(String),
}

impl std::fmt::Display for ProposeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(e) | Self::Refused(e) => f.write_str(e),
        }
    }
}

type Outcome = Result<u64, ProposeFailure>;

/// What a derived table depends on: metadata version, controller leader, live nodes, voters
/// known, partition leaderships seen.
type TableKey = (u64, Option<u32>, Vec<u32>, usize, u64);

/// Partition leaderships: (topic, partition) → (incarnation, term, leader node).
type LeaderMap = BTreeMap<(String, u32), (u64, u64, u32)>;

enum ReplyTo {
    Local(oneshot::Sender<Outcome>),
    Remote { node: u32, req_id: u64 },
}

/// A proposal made on this (leader) replica, waiting to be applied at `index`.
struct Waiter {
    index: u64,
    cmd: MetaCommand,
    reply: ReplyTo,
}

/// What a Hello says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hello {
    from: u32,
    meta_version: u64,
    voter: bool,
    client_addr: String,
    peer_addr: String,
    /// The controller leader the sender knows (0 = none).
    controller: u32,
}

pub struct ClusterNode {
    cfg: ClusterConfig,
    shard_count: usize,
    links: RefCell<BTreeMap<String, PeerLink>>,
    /// The last Hello of each node.
    hellos: RefCell<BTreeMap<u32, Hello>>,
    /// Seed peer address → the id that answered there.
    seed_ids: RefCell<BTreeMap<String, u32>>,
    /// The controller file, until the controller starts on it (voters only).
    store: RefCell<Option<FileRaftStore>>,
    controller: RefCell<Option<ControllerNode<FileRaftStore>>>,
    voters: RefCell<Vec<u32>>,
    meta: RefCell<ClusterMeta>,
    leader: Cell<Option<u32>>,
    membership: RefCell<Membership>,
    inbox: RefCell<VecDeque<PeerFrame>>,
    inbox_ready: Notify,
    dropped_frames: Cell<u64>,
    /// Proposals handed to the leader: request id → (leader node, the waiting caller).
    pending: RefCell<HashMap<u64, (u32, oneshot::Sender<Outcome>)>>,
    waiters: RefCell<Vec<Waiter>>,
    next_req_id: Cell<u64>,
    /// The metadata version of the table last handed to the shards.
    published_version: Cell<u64>,
    /// The metadata version of the table file at boot: an older metadata (a controller still
    /// replaying) is never published, so no topic seems deleted.
    floor_version: u64,
    /// The newest derived table not yet handed to the shards, with its metadata version.
    to_publish: RefCell<Option<(u64, Metadata)>>,
    publish_ready: Notify,
    /// (metadata version, controller leader, live nodes) of the last table derived.
    last_key: RefCell<Option<TableKey>>,
    applied_changed: Notify,
    stop: Rc<Cell<bool>>,
    started: Instant,
    /// Replication messages that arrived, for the shards owning their partitions.
    replica_in: RefCell<Vec<super::replication::Addressed>>,
    /// The newest leadership seen of each replicated partition, and a counter of changes.
    leaders: RefCell<LeaderMap>,
    leaders_version: Cell<u64>,
}

impl ClusterNode {
    /// Binds the peer listener, opens the controller file (voters) and starts the node's loop
    /// on this executor (shard 0). `floor_version` is the metadata version of the table file.
    pub async fn start(
        shard: Rc<Shard>,
        cfg: ClusterConfig,
        data_dir: PathBuf,
        floor_version: u64,
    ) -> Result<Rc<Self>, String> {
        let listener = glommio::net::TcpListener::bind(cfg.peer_listen)
            .map_err(|e| format!("--peer-listen {}: {e}", cfg.peer_listen))?;
        let store = if cfg.is_voter() {
            let dir = data_dir.join("cluster");
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let (store, cut) = FileRaftStore::open(&dir.join("controller.raft"))?;
            if cut > 0 {
                eprintln!("ringmq: controller file: cut a torn tail of {cut} bytes");
            }
            Some(store)
        } else {
            None
        };
        let me = cfg.node_id;
        let node = Rc::new(Self {
            membership: RefCell::new(Membership::new(me, cfg.node_failure_timeout_ms)),
            shard_count: shard.count(),
            links: RefCell::new(BTreeMap::new()),
            hellos: RefCell::new(BTreeMap::new()),
            seed_ids: RefCell::new(BTreeMap::new()),
            store: RefCell::new(store),
            controller: RefCell::new(None),
            voters: RefCell::new(Vec::new()),
            meta: RefCell::new(ClusterMeta::default()),
            leader: Cell::new(None),
            inbox: RefCell::new(VecDeque::new()),
            inbox_ready: Notify::new(),
            dropped_frames: Cell::new(0),
            pending: RefCell::new(HashMap::new()),
            waiters: RefCell::new(Vec::new()),
            next_req_id: Cell::new(1),
            published_version: Cell::new(0),
            floor_version,
            to_publish: RefCell::new(None),
            publish_ready: Notify::new(),
            last_key: RefCell::new(None),
            applied_changed: Notify::new(),
            stop: Rc::new(Cell::new(false)),
            started: Instant::now(),
            replica_in: RefCell::new(Vec::new()),
            leaders: RefCell::new(BTreeMap::new()),
            leaders_version: Cell::new(0),
            cfg,
        });
        node.seed_ids
            .borrow_mut()
            .insert(node.cfg.peer_listen.to_string(), me);
        node.resume_controller()?;
        let inbox = node.clone();
        let handle: Rc<dyn Fn(PeerFrame)> = Rc::new(move |f| inbox.receive(f));
        glommio::spawn_local(serve_peers(listener, handle, node.stop.clone())).detach();
        eprintln!(
            "ringmq: cluster node {me}: peers on {}, seeds {}, {}",
            node.cfg.peer_listen,
            node.cfg
                .seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
            if node.cfg.is_voter() {
                "controller voter"
            } else {
                "follows the controller"
            }
        );
        glommio::spawn_local(node.clone().run_publisher(shard.clone())).detach();
        glommio::spawn_local(node.clone().run(shard)).detach();
        Ok(node)
    }

    fn me(&self) -> u32 {
        self.cfg.node_id
    }

    /// A voter that has run before: its voters are in its file.
    fn resume_controller(&self) -> Result<(), String> {
        let Some(store) = self.store.borrow().clone() else {
            return Ok(());
        };
        if ControllerNode::<FileRaftStore>::is_new_store(&store)? {
            return Ok(());
        }
        let c = ControllerNode::open(u64::from(self.me()), &[], store, ElectionTicks::default())?;
        *self.voters.borrow_mut() = c.voters().iter().map(|&v| v as u32).collect();
        eprintln!(
            "ringmq: controller resumed; voters {:?}",
            self.voters.borrow()
        );
        *self.controller.borrow_mut() = Some(c);
        *self.store.borrow_mut() = None;
        Ok(())
    }

    /// A peer frame arrived (called by the listener; handled by the loop).
    fn receive(&self, f: PeerFrame) {
        if self.inbox.borrow().len() >= limits::CLUSTER_INBOX_FRAMES {
            self.dropped_frames.set(self.dropped_frames.get() + 1);
            return;
        }
        self.inbox.borrow_mut().push_back(f);
        self.inbox_ready.notify_all();
    }

    async fn run(self: Rc<Self>, shard: Rc<Shard>) {
        let tick = Duration::from_millis(limits::CONTROLLER_TICK_MS);
        let mut next_tick = Instant::now() + tick;
        let mut next_hello = Instant::now();
        let mut next_push = Instant::now();
        let mut next_register = Instant::now();
        let mut pushed_version = u64::MAX;
        while !shard.is_shutting_down() {
            let now = Instant::now();
            if self.inbox.borrow().is_empty() && now < next_tick {
                let wait = self.inbox_ready.wait();
                futures_lite::future::or(wait, crate::runtime::sleep(next_tick - now)).await;
            }
            self.handle_inbox();
            self.dispatch_replica_messages(&shard);
            let now = Instant::now();
            if now >= next_tick {
                next_tick = (next_tick + tick).max(now);
                if let Some(c) = self.controller.borrow_mut().as_mut() {
                    c.tick();
                }
            }
            if now >= next_hello {
                next_hello = now + Duration::from_millis(limits::NODE_HEARTBEAT_MS);
                self.say_hello();
            }
            self.maybe_bootstrap();
            self.drive();
            let leader_now = self.leader.get() == Some(self.me());
            let version = self.meta.borrow().version;
            if leader_now && (now >= next_push || version != pushed_version) {
                next_push = now + Duration::from_millis(META_PUSH_MS);
                pushed_version = version;
                self.push_meta();
            }
            if now >= next_register && self.needs_registering() {
                next_register = now + Duration::from_millis(REGISTER_RETRY_MS);
                let me = self.clone();
                glommio::spawn_local(async move { me.register().await }).detach();
            }
            self.refresh_table();
        }
        self.stop.set(true);
        self.links.borrow_mut().clear();
    }

    // ---- frames in -------------------------------------------------------------------------

    fn handle_inbox(&self) {
        loop {
            let next = self.inbox.borrow_mut().pop_front();
            let Some(f) = next else {
                return;
            };
            if let Err(e) = self.handle(f) {
                eprintln!("ringmq: cluster: a bad peer frame: {e}");
            }
        }
    }

    fn handle(&self, f: PeerFrame) -> Result<(), String> {
        let mut r = Reader::new(&f.payload);
        let from = r.u32()?;
        let now_ms = self.started.elapsed().as_millis() as u64;
        if from != self.me() {
            self.membership.borrow_mut().heard(from, now_ms);
        }
        match f.kind {
            K_HELLO => self.on_hello(Hello {
                from,
                meta_version: r.u64()?,
                voter: r.u8()? == 1,
                controller: r.u32()?,
                client_addr: r.str()?,
                peer_addr: r.str()?,
            }),
            K_RAFT => {
                let m = Message::parse_from_bytes(r.rest())
                    .map_err(|e| format!("raft message from node {from}: {e}"))?;
                if m.from != u64::from(from) || m.to != u64::from(self.me()) {
                    return Err(format!(
                        "raft message from {} to {} arrived from node {from} at node {}",
                        m.from,
                        m.to,
                        self.me()
                    ));
                }
                self.step(m, from);
            }
            K_PROPOSE => {
                let req_id = r.u64()?;
                let cmd = MetaCommand::decode(r.rest())?;
                self.submit(cmd, ReplyTo::Remote { node: from, req_id }, req_id);
            }
            K_RESULT => {
                let req_id = r.u64()?;
                let status = r.u8()?;
                let version = r.u64()?;
                let msg = r.str()?;
                let outcome = match status {
                    RESULT_OK => Ok(version),
                    RESULT_REFUSED => Err(ProposeFailure::Refused(msg)),
                    _ => Err(ProposeFailure::Unavailable(msg)),
                };
                if let Some((_, tx)) = self.pending.borrow_mut().remove(&req_id) {
                    tx.send(outcome);
                }
            }
            K_META => {
                let leader = r.u32()?;
                let n = r.u32()? as usize;
                if n > limits::CONTROLLER_VOTERS_MAX {
                    return Err(format!("a metadata push with {n} voters"));
                }
                let voters = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
                let meta = ClusterMeta::decode(r.rest())?;
                if self.controller.borrow().is_none() && meta.version >= self.meta.borrow().version
                {
                    *self.meta.borrow_mut() = meta;
                    *self.voters.borrow_mut() = voters;
                    self.leader.set(Some(leader));
                }
            }
            K_REPLICA => {
                let msgs = super::replication::decode_frame(&mut r, from, self.me())?;
                let mut q = self.replica_in.borrow_mut();
                if q.len() + msgs.len() > limits::REPLICA_INBOX_MESSAGES {
                    self.dropped_frames.set(self.dropped_frames.get() + 1);
                } else {
                    q.extend(msgs);
                }
            }
            K_LEADER => {
                let n = r.count(24)?;
                let mut seen = Vec::with_capacity(n);
                for _ in 0..n {
                    seen.push((r.str()?, r.u32()?, r.u64()?, r.u64()?, r.u32()?));
                }
                self.learn_leaders(seen);
            }
            k => return Err(format!("unknown peer frame kind {k} from node {from}")),
        }
        Ok(())
    }

    /// Hands a peer's Raft message to the controller. raft-rs panics on a message that
    /// contradicts its log (only a node of another cluster, or a corrupted peer, sends one);
    /// the panic is caught and this replica stops instead of the broker.
    fn step(&self, m: Message, from: u32) {
        let mut guard = self.controller.borrow_mut();
        let Some(c) = guard.as_mut() else {
            return;
        };
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.step(m)));
        match stepped {
            // Messages of an old term or for a removed peer are Raft's to ignore.
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("ringmq: controller: message from node {from}: {e}"),
            Err(_) => {
                eprintln!(
                    "ringmq: controller: a message from node {from} contradicts this replica's log (another cluster on the peer port?); this replica stops"
                );
                *guard = None;
                drop(guard);
                self.fail_waiters("this node's controller replica stopped");
            }
        }
    }

    fn on_hello(&self, h: Hello) {
        if h.from == self.me() {
            return;
        }
        if self.hellos.borrow().len() >= limits::CLUSTER_NODES_MAX
            && !self.hellos.borrow().contains_key(&h.from)
        {
            return;
        }
        if self.cfg.seeds.iter().any(|s| s.to_string() == h.peer_addr) {
            let mut ids = self.seed_ids.borrow_mut();
            if let Some(&other) = ids.get(&h.peer_addr) {
                if other != h.from {
                    eprintln!(
                        "ringmq: cluster: {} was node {other} and now says it is node {}",
                        h.peer_addr, h.from
                    );
                }
            }
            ids.insert(h.peer_addr.clone(), h.from);
        }
        // Followers learn the controller leader from the voters.
        if self.controller.borrow().is_none() && h.voter && h.controller != 0 {
            self.leader.set(Some(h.controller));
        }
        self.membership.borrow_mut().add_peer(h.from);
        self.hellos.borrow_mut().insert(h.from, h);
        self.applied_changed.notify_all();
    }

    /// Hands arrived replication messages to the shards owning their partitions.
    fn dispatch_replica_messages(&self, shard: &Rc<Shard>) {
        let msgs = std::mem::take(&mut *self.replica_in.borrow_mut());
        if msgs.is_empty() {
            return;
        }
        let mut per_shard: BTreeMap<usize, Vec<super::replication::Addressed>> = BTreeMap::new();
        {
            let table = shard.table();
            for m in msgs {
                if let Some(s) = table.get(&m.0).and_then(|t| t.shard_of(m.1, shard.count())) {
                    per_shard.entry(s).or_default().push(m);
                }
            }
        }
        for (to, msgs) in per_shard {
            shard.deliver_replica_messages(to, msgs);
        }
    }

    // ---- partition leaderships ---------------------------------------------------------------

    /// Leaderships this node's shards saw: learned, and told to every other node.
    pub fn note_leaders(&self, seen: Vec<super::replication::LeaderReport>) {
        if seen.is_empty() {
            return;
        }
        let mut p = self.header();
        p.extend_from_slice(&(seen.len() as u32).to_le_bytes());
        for (topic, partition, incarnation, term, leader) in &seen {
            put_str(&mut p, topic);
            p.extend_from_slice(&partition.to_le_bytes());
            p.extend_from_slice(&incarnation.to_le_bytes());
            p.extend_from_slice(&term.to_le_bytes());
            p.extend_from_slice(&leader.to_le_bytes());
        }
        let others: Vec<u32> = self
            .meta
            .borrow()
            .nodes
            .keys()
            .copied()
            .filter(|&n| n != self.me())
            .collect();
        for n in others {
            self.send_to_node(n, K_LEADER, p.clone());
        }
        self.learn_leaders(seen);
    }

    /// Keeps, per partition, the leadership of the highest term (of the newest incarnation).
    fn learn_leaders(&self, seen: Vec<super::replication::LeaderReport>) {
        let mut leaders = self.leaders.borrow_mut();
        let mut changed = false;
        for (topic, partition, incarnation, term, leader) in seen {
            if leaders.len() >= limits::REPLICAS_PER_SHARD_MAX * self.shard_count.max(1)
                && !leaders.contains_key(&(topic.clone(), partition))
            {
                continue;
            }
            let e = leaders.entry((topic, partition)).or_insert((0, 0, 0));
            if (incarnation, term) > (e.0, e.1) || ((incarnation, term) == (e.0, e.1) && e.2 == 0) {
                changed |= e.2 != leader || e.0 != incarnation;
                *e = (incarnation, term, leader);
            }
        }
        if changed {
            self.leaders_version.set(self.leaders_version.get() + 1);
        }
    }

    // ---- frames out ------------------------------------------------------------------------

    fn send_to_addr(&self, addr: &str, kind: u8, payload: Vec<u8>) -> bool {
        let mut links = self.links.borrow_mut();
        let link = links
            .entry(addr.to_string())
            .or_insert_with(|| PeerLink::start(addr));
        link.send(PeerFrame { kind, payload })
    }

    /// The peer address of node `id` (registered, or from its Hello).
    fn peer_addr_of(&self, id: u32) -> Option<String> {
        if let Some(n) = self.meta.borrow().nodes.get(&id) {
            return Some(n.peer_addr.clone());
        }
        self.hellos.borrow().get(&id).map(|h| h.peer_addr.clone())
    }

    fn send_to_node(&self, id: u32, kind: u8, payload: Vec<u8>) -> bool {
        match self.peer_addr_of(id) {
            Some(addr) => self.send_to_addr(&addr, kind, payload),
            None => false,
        }
    }

    fn header(&self) -> Vec<u8> {
        self.me().to_le_bytes().to_vec()
    }

    /// A Hello to every seed and every node known.
    fn say_hello(&self) {
        let mut p = self.header();
        p.extend_from_slice(&self.published_version.get().to_le_bytes());
        p.push(u8::from(self.cfg.is_voter()));
        p.extend_from_slice(&self.leader.get().unwrap_or(0).to_le_bytes());
        put_str(&mut p, &self.cfg.advertise);
        put_str(&mut p, &self.cfg.peer_listen.to_string());
        let mut addrs: Vec<String> = self.cfg.seeds.iter().map(|s| s.to_string()).collect();
        addrs.extend(
            self.meta
                .borrow()
                .nodes
                .values()
                .map(|n| n.peer_addr.clone()),
        );
        addrs.extend(self.hellos.borrow().values().map(|h| h.peer_addr.clone()));
        addrs.sort();
        addrs.dedup();
        let mine = self.cfg.peer_listen.to_string();
        for a in addrs.iter().filter(|a| **a != mine) {
            self.send_to_addr(a, K_HELLO, p.clone());
        }
    }

    fn push_meta(&self) {
        let voters = self.voters.borrow().clone();
        let mut p = self.header();
        p.extend_from_slice(&self.me().to_le_bytes());
        p.extend_from_slice(&(voters.len() as u32).to_le_bytes());
        for v in &voters {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(&self.meta.borrow().encode());
        let followers: Vec<u32> = self
            .meta
            .borrow()
            .nodes
            .keys()
            .copied()
            .chain(self.hellos.borrow().keys().copied())
            .filter(|n| !voters.contains(n) && *n != self.me())
            .collect();
        for n in followers {
            self.send_to_node(n, K_META, p.clone());
        }
    }

    // ---- the controller --------------------------------------------------------------------

    /// A voter without a controller starts it once every seed's id is known.
    fn maybe_bootstrap(&self) {
        if self.controller.borrow().is_some() || self.store.borrow().is_none() {
            return;
        }
        let ids = self.seed_ids.borrow();
        let mut voters: Vec<u32> = Vec::new();
        for s in &self.cfg.seeds {
            match ids.get(&s.to_string()) {
                Some(&id) => voters.push(id),
                None => return,
            }
        }
        voters.sort_unstable();
        let n = voters.len();
        voters.dedup();
        if voters.len() != n {
            eprintln!("ringmq: cluster: two seeds have the same node id; not starting");
            return;
        }
        let Some(store) = self.store.borrow_mut().take() else {
            return;
        };
        let ids64: Vec<u64> = voters.iter().map(|&v| u64::from(v)).collect();
        match ControllerNode::open(
            u64::from(self.me()),
            &ids64,
            store,
            ElectionTicks::default(),
        ) {
            Ok(c) => {
                eprintln!("ringmq: controller started; voters {voters:?}");
                *self.controller.borrow_mut() = Some(c);
                *self.voters.borrow_mut() = voters;
            }
            Err(e) => eprintln!("ringmq: controller: {e}"),
        }
    }

    /// Runs the controller's Ready loop: persists, sends, applies, answers proposals.
    fn drive(&self) {
        let mut guard = self.controller.borrow_mut();
        let Some(c) = guard.as_mut() else {
            return;
        };
        let messages = match c.drive() {
            Ok(m) => m,
            Err(e) => {
                // The store failed: this replica stops (the others carry on without it).
                eprintln!("ringmq: controller stopped: {e}");
                *guard = None;
                drop(guard);
                self.fail_waiters("this node's controller replica failed");
                return;
            }
        };
        let was_leader = self.leader.get() == Some(self.me());
        let leader = c.leader_id() as u32;
        self.leader.set((leader != 0).then_some(leader));
        let version_before = self.meta.borrow().version;
        let applied = c.drain_applied();
        if !applied.is_empty() {
            *self.meta.borrow_mut() = c.meta().clone();
        }
        drop(guard);
        for m in messages {
            let to = m.to as u32;
            match m.write_to_bytes() {
                Ok(bytes) => {
                    let mut p = self.header();
                    p.extend_from_slice(&bytes);
                    self.send_to_node(to, K_RAFT, p);
                }
                Err(e) => eprintln!("ringmq: controller: encoding a message: {e}"),
            }
        }
        for (i, (index, cmd, outcome)) in applied.iter().enumerate() {
            let version = version_before + i as u64 + 1;
            self.resolve(*index, cmd, outcome, version);
        }
        if was_leader && self.leader.get() != Some(self.me()) {
            self.fail_waiters("the controller leader changed; retry");
        }
    }

    fn resolve(&self, index: u64, cmd: &MetaCommand, outcome: &Result<(), String>, version: u64) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        let (done, keep): (Vec<Waiter>, Vec<Waiter>) =
            waiters.into_iter().partition(|w| w.index <= index);
        *self.waiters.borrow_mut() = keep;
        for w in done {
            let result = if w.index == index && w.cmd == *cmd {
                outcome
                    .clone()
                    .map(|()| version)
                    .map_err(ProposeFailure::Refused)
            } else {
                Err(ProposeFailure::Unavailable(
                    "the proposal was overwritten by a new controller leader; retry".into(),
                ))
            };
            self.answer(w.reply, result);
        }
    }

    /// Proposals handed to a node that is now down will not be answered: fail them now.
    fn fail_pending_to(&self, node: u32) {
        let mut pending = self.pending.borrow_mut();
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, (n, _))| *n == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, tx)) = pending.remove(&id) {
                let e = format!("the controller leader (node {node}) went down; retry");
                tx.send(Err(ProposeFailure::Unavailable(e)));
            }
        }
    }

    fn fail_waiters(&self, why: &str) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            self.answer(w.reply, Err(ProposeFailure::Unavailable(why.into())));
        }
    }

    fn answer(&self, reply: ReplyTo, result: Outcome) {
        match reply {
            ReplyTo::Local(tx) => tx.send(result),
            ReplyTo::Remote { node, req_id } => {
                let mut p = self.header();
                p.extend_from_slice(&req_id.to_le_bytes());
                let (status, version, msg) = match result {
                    Ok(v) => (RESULT_OK, v, String::new()),
                    Err(ProposeFailure::Refused(m)) => (RESULT_REFUSED, 0, m),
                    Err(ProposeFailure::Unavailable(m)) => (RESULT_UNAVAILABLE, 0, m),
                };
                p.push(status);
                p.extend_from_slice(&version.to_le_bytes());
                put_str(&mut p, &msg);
                self.send_to_node(node, K_RESULT, p);
            }
        }
    }

    /// Proposes on this replica if it leads, else hands the command to the leader (local
    /// callers only, under `req_id`: a forwarded proposal is never forwarded again).
    fn submit(&self, cmd: MetaCommand, reply: ReplyTo, req_id: u64) {
        if self.waiters.borrow().len() >= limits::CONTROLLER_PENDING_MAX {
            let e = "the controller has too many proposals waiting; retry";
            return self.answer(reply, Err(ProposeFailure::Unavailable(e.into())));
        }
        let proposed = self
            .controller
            .borrow_mut()
            .as_mut()
            .map(|c| c.propose(&cmd));
        match proposed {
            Some(Ok(index)) => {
                self.waiters.borrow_mut().push(Waiter { index, cmd, reply });
                // Drive at once: the entry goes to the followers now, not at the next tick.
                self.inbox_ready.notify_all();
            }
            Some(Err(ProposeError::Refused(e))) => {
                self.answer(reply, Err(ProposeFailure::Unavailable(e)))
            }
            Some(Err(ProposeError::NotLeader { .. })) | None => match (reply, self.leader.get()) {
                (ReplyTo::Local(tx), Some(l))
                    if l != self.me() && self.membership.borrow().is_alive(l) =>
                {
                    self.forward(cmd, tx, l, req_id)
                }
                (reply, _) => self.answer(
                    reply,
                    Err(ProposeFailure::Unavailable(
                        "the controller has no leader right now (an election); retry".into(),
                    )),
                ),
            },
        }
    }

    fn forward(&self, cmd: MetaCommand, tx: oneshot::Sender<Outcome>, leader: u32, req_id: u64) {
        if self.pending.borrow().len() >= limits::CONTROLLER_PENDING_MAX {
            let e = "too many proposals waiting for the controller; retry";
            return tx.send(Err(ProposeFailure::Unavailable(e.into())));
        }
        let mut p = self.header();
        p.extend_from_slice(&req_id.to_le_bytes());
        p.extend_from_slice(&cmd.encode());
        if self.send_to_node(leader, K_PROPOSE, p) {
            self.pending.borrow_mut().insert(req_id, (leader, tx));
        } else {
            let e = format!("the controller leader (node {leader}) cannot be reached; retry");
            tx.send(Err(ProposeFailure::Unavailable(e)));
        }
    }

    /// Proposes `cmd` and waits until the controller applied it: the metadata version it
    /// made, or why not. Bounded by [`limits::CONTROLLER_PROPOSE_TIMEOUT_MS`].
    pub async fn propose(&self, cmd: MetaCommand) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let req_id = self.next_req_id.get();
        self.next_req_id.set(req_id + 1);
        self.submit(cmd, ReplyTo::Local(tx), req_id);
        let timeout = async {
            crate::runtime::sleep(Duration::from_millis(limits::CONTROLLER_PROPOSE_TIMEOUT_MS))
                .await;
            None
        };
        let answer = futures_lite::future::or(async { Some(rx.await) }, timeout).await;
        match answer {
            Some(Some(outcome)) => outcome,
            Some(None) => Err(ProposeFailure::Unavailable(
                "the controller dropped the proposal; retry".into(),
            )),
            None => {
                // A forwarded proposal's slot (it was given `req_id`) is freed.
                self.pending.borrow_mut().remove(&req_id);
                Err(ProposeFailure::Unavailable(format!(
                    "the controller did not answer within {} ms; retry",
                    limits::CONTROLLER_PROPOSE_TIMEOUT_MS
                )))
            }
        }
    }

    /// Waits (at most [`limits::CONTROLLER_APPLY_WAIT_MS`]) until this node and every live
    /// node have applied metadata `version`; returns the nodes that had not.
    pub async fn wait_applied(&self, version: u64) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_millis(limits::CONTROLLER_APPLY_WAIT_MS);
        loop {
            let lagging = self.lagging(version);
            let now = Instant::now();
            if lagging.is_empty() || now >= deadline {
                return lagging;
            }
            let wait = self.applied_changed.wait();
            futures_lite::future::or(wait, crate::runtime::sleep(Duration::from_millis(20))).await;
        }
    }

    fn lagging(&self, version: u64) -> Vec<u32> {
        let mut out = Vec::new();
        if self.published_version.get() < version {
            out.push(self.me());
        }
        let membership = self.membership.borrow();
        for (id, h) in self.hellos.borrow().iter() {
            if membership.is_alive(*id) && h.meta_version < version {
                out.push(*id);
            }
        }
        out
    }

    fn needs_registering(&self) -> bool {
        let want = NodeInfo {
            client_addr: self.cfg.advertise.clone(),
            peer_addr: self.cfg.peer_listen.to_string(),
        };
        self.leader.get().is_some() && self.meta.borrow().nodes.get(&self.me()) != Some(&want)
    }

    async fn register(self: Rc<Self>) {
        let cmd = MetaCommand::RegisterNode {
            id: self.me(),
            client_addr: self.cfg.advertise.clone(),
            peer_addr: self.cfg.peer_listen.to_string(),
        };
        match self.propose(cmd).await {
            Ok(v) => eprintln!(
                "ringmq: node {} registered (metadata version {v})",
                self.me()
            ),
            Err(e) => eprintln!("ringmq: node {} not registered yet: {e}", self.me()),
        }
    }

    // ---- the topic table -------------------------------------------------------------------

    /// The nodes a new topic's partitions go to: those alive now (this one included).
    pub fn live_nodes(&self) -> Vec<u32> {
        let membership = self.membership.borrow();
        self.meta
            .borrow()
            .nodes
            .keys()
            .copied()
            .filter(|&n| n == self.me() || membership.is_alive(n))
            .collect()
    }

    /// Whether the metadata has a topic (this node's copy).
    pub fn has_topic(&self, name: &str) -> bool {
        self.meta.borrow().topics.contains_key(name)
    }

    /// Notes liveness changes, and hands the publisher a new table when the metadata or
    /// liveness changed (the loop does not wait for it to be applied).
    fn refresh_table(&self) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        {
            let mut m = self.membership.borrow_mut();
            for id in self.meta.borrow().nodes.keys() {
                m.add_peer(*id);
            }
            for change in m.check(now_ms) {
                eprintln!("ringmq: cluster: {change:?}");
                if let Change::Down(id) = change {
                    self.fail_pending_to(id);
                }
            }
        }
        let version = self.meta.borrow().version;
        if version < self.floor_version {
            return;
        }
        let key = (
            version,
            self.leader.get(),
            self.live_nodes(),
            self.voters.borrow().len(),
            self.leaders_version.get(),
        );
        if self.last_key.borrow().as_ref() == Some(&key) {
            return;
        }
        *self.last_key.borrow_mut() = Some(key);
        *self.to_publish.borrow_mut() = Some((version, self.derive()));
        self.publish_ready.notify_all();
    }

    /// Applies the newest derived table on every shard, one at a time; a table that could not
    /// be applied is derived and tried again on the next tick.
    async fn run_publisher(self: Rc<Self>, shard: Rc<Shard>) {
        while !shard.is_shutting_down() {
            let next = self.to_publish.borrow_mut().take();
            let Some((version, table)) = next else {
                let wait = self.publish_ready.wait();
                let tick = Duration::from_millis(limits::CONTROLLER_TICK_MS);
                futures_lite::future::or(wait, crate::runtime::sleep(tick)).await;
                continue;
            };
            match shard.publish_table(table).await {
                Ok(failed) => {
                    if !failed.is_empty() {
                        eprintln!(
                            "ringmq: cluster: metadata version {version} applied; {}",
                            failed.join("; ")
                        );
                    }
                    if self.published_version.get() != version {
                        self.published_version.set(version);
                        // Tell the others at once (a topic change may be waiting for us).
                        self.say_hello();
                    }
                    self.applied_changed.notify_all();
                }
                Err(e) => {
                    eprintln!(
                        "ringmq: cluster: metadata version {version} not applied ({e}); retrying"
                    );
                    *self.last_key.borrow_mut() = None;
                }
            }
        }
    }

    /// This node's topic table from the metadata and its view of liveness.
    fn derive(&self) -> Metadata {
        let meta = self.meta.borrow();
        let me = self.me();
        let voters = self.voters.borrow();
        let membership = self.membership.borrow();
        let leaders = self.leaders.borrow();
        let topics = meta
            .topics
            .iter()
            .map(|(name, t)| {
                let tm = TopicMeta {
                    name: name.clone(),
                    shards: metadata::place_on_node(name, &t.replicas, me, self.shard_count),
                    retention_bytes: t.retention_bytes,
                    retention_ms: t.retention_ms,
                    replicas: leader_first(name, t.incarnation, &t.replicas, &leaders),
                    incarnation: t.incarnation,
                };
                (name.clone(), tm)
            })
            .collect();
        let nodes = meta
            .nodes
            .iter()
            .map(|(&id, n)| {
                // The controller's own voter set (a voter's replica, or the leader's push):
                // groups are placed over it, so every node must see the same.
                let view = NodeView {
                    client_addr: n.client_addr.clone(),
                    peer_addr: n.peer_addr.clone(),
                    alive: id == me || membership.is_alive(id),
                    voter: voters.contains(&id),
                };
                (id, view)
            })
            .collect();
        Metadata {
            topics,
            version: 0,
            cluster: Some(ClusterView {
                me,
                controller: self.leader.get(),
                meta_version: meta.version,
                nodes,
                deleted: meta.deleted.clone(),
                voters: {
                    let mut v = voters.clone();
                    v.sort_unstable();
                    v
                },
            }),
        }
    }
}

/// A topic's replicas with each partition's current leader (as last reported) first; the
/// controller's order (the preferred leader first) where none is known.
fn leader_first(
    name: &str,
    incarnation: u64,
    replicas: &[Vec<u32>],
    leaders: &LeaderMap,
) -> Vec<Vec<u32>> {
    replicas
        .iter()
        .enumerate()
        .map(|(p, r)| {
            let mut r = r.clone();
            let known = leaders
                .get(&(name.to_string(), p as u32))
                .filter(|l| l.0 == incarnation)
                .map(|l| l.2);
            if let Some(i) = known.and_then(|l| r.iter().position(|&n| n == l)) {
                r[..=i].rotate_right(1);
            }
            r
        })
        .collect()
}
