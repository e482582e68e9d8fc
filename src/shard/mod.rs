//! The partitions of one core and the handling of requests for them.
//!
//! Owns: this shard's [`Partition`]s (slots: ready, failed, opening), its copy of the topic
//! table, the controller role (shard 0 makes topic changes and broadcasts them), the group
//! coordinator, the state log, and the handlers that turn a verified request frame into a call
//! on a partition and its typed result into a response frame (wire codes come from
//! `server::wire_error`). Must not touch: sockets (the server's), a partition's internals
//! (only its methods), or another shard's state (only envelopes through the router).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::VerifiedFrame;

use crate::cluster::replica::{Proposed, Replica, ReplicaTiming};
use crate::cluster::replication::{Addressed, LeaderReport, Replication};
use crate::limits;
use crate::metadata::{self, MetaChange, Metadata, TopicMeta};
use crate::partition::Partition;
use crate::protocol::{self as proto, fb};
use crate::router::route::{self, Dest, RouteError, Target};
use crate::router::{Envelope, Internal, Reply, Router, Transport};
use crate::runtime::clock::Clock;
use crate::runtime::config::ServeConfig;
use crate::runtime::Notify;
use crate::server::wire_error;
use crate::storage::{self, meta_file, DmaStorage, LogConfig};

mod cluster_api;
pub mod group_api;
pub mod groups;
pub mod pubsub;
pub mod queue_api;
pub mod state_log;

/// A partition of this shard: its log is on the data directory's filesystem.
pub type LocalPartition = Partition<DmaStorage>;

/// The rest of a request's work, run as its own task; yields the response frame.
pub type Pending = Pin<Box<dyn Future<Output = Bytes>>>;

enum Slot {
    Ready(Rc<LocalPartition>),
    /// The log could not be opened (e.g. a corrupt sealed segment); other partitions serve on.
    Failed(String),
    /// The log is being opened (recovery scan); requests get a retryable PartitionUnavailable.
    Opening,
}

/// One line per partition opened: what recovery found and how long it took.
fn log_recovery(topic: &str, partition: u32, part: &LocalPartition, took: Duration) {
    let log = part.log();
    let r = log.recovery_report();
    let cut = match &r.truncated {
        Some(t) => format!(", cut a torn/corrupt tail: {t:?}"),
        None => String::new(),
    };
    eprintln!(
        "ringmq: partition {topic}-{partition} recovered: offsets {}..{}, {} bytes in {} segment(s), {} ms{cut}",
        log.start_offset(),
        log.end_offset(),
        log.size_bytes(),
        log.segment_count(),
        took.as_millis()
    );
}

/// Why a request cannot reach a partition on this shard.
#[derive(Debug)]
pub enum Unavailable {
    /// The route has none (unknown topic or partition).
    Route(RouteError),
    /// Its log could not be opened.
    Failed(String),
    /// Its log is being recovered (retryable).
    Recovering(String),
    /// Placed here by the table but not open yet: being created (retryable).
    NotOpenYet(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Route(e) => write!(f, "{e}"),
            Self::Failed(why) => write!(f, "{why}"),
            Self::Recovering(p) => write!(f, "partition {p} is still recovering; retry shortly"),
            Self::NotOpenYet(p) => write!(f, "partition {p} is not open yet; retry shortly"),
        }
    }
}

/// A topic to create.
#[derive(Debug, Clone)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    /// Replicas per partition; 0 = the default (a cluster: min(3, live nodes); one node: 1).
    pub replicas: u32,
    /// -1 = unlimited.
    pub retention_bytes: i64,
    pub retention_ms: i64,
}

/// Why a topic change was refused.
#[derive(Debug)]
pub enum AdminError {
    InvalidName(String),
    InvalidPartitions(u32),
    Exists(String),
    Unknown(String),
    TooManyTopics,
    /// Persisting or applying the change failed.
    Storage(String),
    /// More than one replica asked for (and whether this is a cluster).
    Replicas(u32, bool),
    /// Cluster: the controller has no leader or did not answer (retry).
    ControllerUnavailable(String),
    /// Cluster: the controller refused the change.
    Refused(String),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidName(e) => write!(f, "{e}"),
            Self::InvalidPartitions(n) => write!(
                f,
                "partitions must be 1..={}, not {n}",
                limits::PARTITIONS_PER_TOPIC_MAX
            ),
            Self::Exists(name) => write!(f, "topic {name:?} already exists"),
            Self::Unknown(name) => write!(f, "unknown topic {name:?}"),
            Self::TooManyTopics => write!(
                f,
                "the broker holds {} topics, its limit; delete some first",
                limits::TOPICS_MAX
            ),
            Self::Storage(e) => write!(f, "{e}"),
            Self::Replicas(n, true) => write!(
                f,
                "--replicas {n}: at most {} replicas per partition",
                limits::REPLICATION_FACTOR_MAX
            ),
            Self::Replicas(n, false) => write!(
                f,
                "--replicas {n}: a single node holds one replica of each partition; more need a cluster (--seeds)"
            ),
            Self::ControllerUnavailable(e) => write!(f, "{e}"),
            Self::Refused(e) => write!(f, "{e}"),
        }
    }
}

/// One core's shard.
pub struct Shard {
    pub cfg: Rc<ServeConfig>,
    pub router: Router,
    meta: RefCell<Metadata>,
    partitions: RefCell<HashMap<(String, u32), Slot>>,
    round_robin: Cell<u32>,
    admin_lock: glommio::sync::Semaphore,
    shutting_down: Cell<bool>,
    pub shutdown: Notify,
    pub connections: Cell<usize>,
    connection_counter: Cell<u64>,
    pub requests_in_flight: Cell<usize>,
    /// This shard's share of `--memory-max-bytes`: request bodies and reserved responses of
    /// all its connections. At the limit connections are not read (backpressure).
    pub memory: Rc<crate::runtime::budget::Budget>,
    /// Wall-clock time: message timestamps, lease and delay deadlines, retention by age.
    clock: Rc<dyn Clock>,
    coordinator: RefCell<groups::Coordinator>,
    /// Destination appends made here from multicasts.
    fanout_appends: Cell<u64>,
    /// Durable queue ack state from the state log, handed to each partition as it opens.
    restored_queues: RefCell<std::collections::BTreeMap<queue_api::QKey, state_log::QueueAcks>>,
    /// A state-log compaction is running.
    compacting: Cell<bool>,
    /// Order and count of state-log changes between durable and applied.
    state_order: state_log::ApplyOrder,
    state: RefCell<Option<Rc<state_log::StateLog>>>,
    started: Instant,
    /// Shard 0 of a cluster node: the node's cluster runtime (controller, peers).
    cluster: RefCell<Option<Rc<crate::cluster::node::ClusterNode>>>,
    /// A cluster node: this shard's partition replicas and their Raft loop.
    replication: Option<Rc<Replication>>,
}

fn ready(frame: Bytes) -> Pending {
    Box::pin(async move { frame })
}

impl Shard {
    pub fn new(cfg: Rc<ServeConfig>, router: Router) -> Self {
        Self::with_clock(cfg, router, Rc::new(crate::runtime::clock::SystemClock))
    }

    /// A shard reading wall-clock time from `clock` (tests and simulation pass a manual one).
    pub fn with_clock(cfg: Rc<ServeConfig>, router: Router, clock: Rc<dyn Clock>) -> Self {
        let memory = crate::runtime::budget::Budget::new(cfg.memory_per_shard_bytes());
        let replication = cfg.cluster.as_ref().map(|c| {
            let timing = ReplicaTiming::from_election_timeout_ms(c.election_timeout_ms);
            Rc::new(Replication::new(c.node_id, timing))
        });
        Self {
            cfg,
            router,
            meta: RefCell::new(Metadata::default()),
            partitions: RefCell::new(HashMap::new()),
            round_robin: Cell::new(0),
            admin_lock: glommio::sync::Semaphore::new(1),
            shutting_down: Cell::new(false),
            shutdown: Notify::new(),
            connections: Cell::new(0),
            connection_counter: Cell::new(0),
            requests_in_flight: Cell::new(0),
            memory,
            clock,
            coordinator: RefCell::new(groups::Coordinator::new()),
            fanout_appends: Cell::new(0),
            restored_queues: RefCell::new(std::collections::BTreeMap::new()),
            compacting: Cell::new(false),
            state_order: state_log::ApplyOrder::default(),
            state: RefCell::new(None),
            started: Instant::now(),
            cluster: RefCell::new(None),
            replication,
        }
    }

    /// Shard 0 of a cluster node: the cluster runtime started on it.
    pub fn set_cluster(&self, node: Rc<crate::cluster::node::ClusterNode>) {
        *self.cluster.borrow_mut() = Some(node);
    }

    fn cluster_node(&self) -> Option<Rc<crate::cluster::node::ClusterNode>> {
        self.cluster.borrow().clone()
    }

    /// A cluster node: this shard's partition replicas.
    pub fn replication(&self) -> Option<Rc<Replication>> {
        self.replication.clone()
    }

    /// Starts this shard's replication loop (a cluster node).
    pub fn start_replication(self: &Rc<Self>) {
        let Some(r) = self.replication() else {
            return;
        };
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        let stop: Rc<dyn Fn() -> bool> = Rc::new(move || a.is_shutting_down());
        let peer_addr: Rc<dyn Fn(u32) -> Option<String>> =
            Rc::new(move |id| b.table().node(id).map(|n| n.peer_addr.clone()));
        let on_reports: Rc<dyn Fn(Vec<LeaderReport>)> =
            Rc::new(move |reports| c.report_leaders(reports));
        glommio::spawn_local(r.run(stop, peer_addr, on_reports)).detach();
    }

    /// Hands partition leaderships this shard saw to the node runtime on shard 0.
    fn report_leaders(self: &Rc<Self>, reports: Vec<LeaderReport>) {
        if reports.is_empty() {
            return;
        }
        if let Some(node) = self.cluster_node() {
            node.note_leaders(reports);
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let call = Internal::LeaderReports { reports };
            if let Err(e) = me.call_internal(Dest::local(0), call).await {
                eprintln!("ringmq: shard {}: reporting leaderships: {e}", me.id());
            }
        })
        .detach();
    }

    /// Replication messages from a peer for partitions on shard `to`.
    pub fn deliver_replica_messages(self: &Rc<Self>, to: usize, msgs: Vec<Addressed>) {
        if to == self.id() {
            if let Some(r) = self.replication() {
                r.deliver(msgs);
            }
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let call = Internal::ReplicaMessages { msgs };
            // Lost only if the shard is gone (shutting down); Raft sends again.
            let _ = me.call_internal(Dest::local(to), call).await;
        })
        .detach();
    }

    /// A copy of this shard's topic table.
    pub fn table(&self) -> std::cell::Ref<'_, Metadata> {
        self.meta.borrow()
    }

    /// A broker-wide connection id: the shard in the top 16 bits, a counter below.
    pub fn next_connection_id(&self) -> u64 {
        let n = self.connection_counter.get() + 1;
        self.connection_counter.set(n);
        ((self.id() as u64) << 48) | n
    }

    /// Milliseconds since the Unix epoch, from this shard's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn id(&self) -> usize {
        self.router.shard_id
    }

    pub fn count(&self) -> usize {
        self.router.shard_count
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        self.shutdown.notify_all();
    }

    /// Opens the logs this shard owns according to the stored topic table.
    pub async fn load(&self) -> Result<(), String> {
        let meta = meta_file::load(&self.cfg.data_dir)?;
        if let Some(c) = &self.cfg.cluster {
            // A cluster node opens the partitions placed on it; the controller's metadata
            // replaces this table once it is at least as new.
            let view = metadata::ClusterView {
                me: c.node_id,
                meta_version: meta.cluster.as_ref().map_or(0, |v| v.meta_version),
                ..Default::default()
            };
            self.meta.borrow_mut().cluster = Some(view);
        }
        for t in meta.topics.values() {
            let mut t = t.clone();
            if let Some(c) = &self.cfg.cluster {
                // Placed over this node's shards now (the file's may come from another
                // --cores), exactly as the controller's table will place them.
                if !t.replicas.is_empty() {
                    t.shards =
                        metadata::place_on_node(&t.name, &t.replicas, c.node_id, self.count());
                }
            }
            if let Err(e) = self.apply_meta(&MetaChange::Upsert(t)).await {
                eprintln!("ringmq: shard {}: {e}", self.id());
            }
        }
        Ok(())
    }

    fn partition_dir(&self, topic: &str, partition: u32) -> PathBuf {
        self.cfg
            .data_dir
            .join("topics")
            .join(format!("{topic}-{partition}"))
    }

    fn log_config(&self, t: &TopicMeta) -> LogConfig {
        LogConfig {
            segment_bytes_max: self.cfg.segment_bytes_max,
            durability: self.cfg.durability,
            retention_bytes: u64::try_from(t.retention_bytes).ok(),
            retention_ms: u64::try_from(t.retention_ms).ok(),
            ..LogConfig::default()
        }
    }

    /// A cluster partition with more than one replica: the replicas' node ids. `None` for a
    /// partition with one replica (no Raft) or on a single node.
    fn replica_peers(&self, t: &TopicMeta, p: u32) -> Option<Vec<u32>> {
        self.replication.as_ref()?;
        t.replicas.get(p as usize).filter(|r| r.len() > 1).cloned()
    }

    /// Starts the Raft replica of a replicated partition whose log was just opened.
    async fn open_replica(
        &self,
        part: Rc<LocalPartition>,
        dir: &std::path::Path,
        t: &TopicMeta,
        peers: Vec<u32>,
    ) -> Result<Rc<LocalPartition>, String> {
        let Some(rep) = self.replication() else {
            return Err("not a cluster node".into());
        };
        if rep.len() >= limits::REPLICAS_PER_SHARD_MAX {
            return Err(format!(
                "this shard holds {} partition replicas, its limit",
                limits::REPLICAS_PER_SHARD_MAX
            ));
        }
        let me = self.cfg.cluster.as_ref().map_or(0, |c| c.node_id);
        let mut voters: Vec<u64> = peers.iter().map(|&n| u64::from(n)).collect();
        voters.sort_unstable();
        let sync = self.cfg.durability == storage::Durability::Always;
        let replica =
            Replica::open(part.clone(), dir, u64::from(me), voters, rep.timing, sync).await?;
        rep.add(Rc::new(replica), t.incarnation, peers);
        Ok(part)
    }

    /// Applies a versioned change from the controller, unless this copy already has it.
    pub async fn apply_meta_update(&self, version: u64, change: &MetaChange) -> Result<(), String> {
        if version <= self.meta.borrow().version {
            return Ok(());
        }
        self.meta.borrow_mut().version = version;
        self.apply_meta(change).await
    }

    /// Applies a topic change to this shard: its table copy and the logs it owns.
    /// Returns the errors of partitions whose logs could not be opened.
    pub async fn apply_meta(&self, change: &MetaChange) -> Result<(), String> {
        let removed = match change {
            MetaChange::Replace(m) => self.removed_by(m),
            _ => Vec::new(),
        };
        self.meta.borrow_mut().apply(change);
        match change {
            MetaChange::Upsert(t) => self.open_owned(t).await,
            MetaChange::Remove(name) => {
                self.remove_owned(name);
                Ok(())
            }
            MetaChange::Replace(m) => {
                // Before anything opens: a new incarnation must not find the old one's files.
                for (old, deleted) in removed {
                    self.dispose_owned(&old, deleted);
                }
                let mut errors = Vec::new();
                for t in m.topics.values() {
                    if let Err(e) = self.open_owned(t).await {
                        errors.push(e);
                    }
                }
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("; "))
                }
            }
        }
    }

    /// Topics this table has that `next` drops, their partition count, and whether each was
    /// deleted by the cluster (then its data goes): listed as deleted, or created again (a
    /// new incarnation). A topic merely absent keeps its data, set aside.
    fn removed_by(&self, next: &Metadata) -> Vec<(TopicMeta, bool)> {
        let deleted = |name: &str| {
            next.cluster
                .as_ref()
                .is_some_and(|c| c.deleted.contains(name))
        };
        self.meta
            .borrow()
            .topics
            .values()
            .filter_map(|t| match next.topics.get(&t.name) {
                None => Some((t.clone(), deleted(&t.name))),
                Some(n) if t.incarnation != 0 && n.incarnation != t.incarnation => {
                    Some((t.clone(), true))
                }
                Some(_) => None,
            })
            .collect()
    }

    /// Closes this shard's partitions of a removed topic and disposes of the directories of
    /// the partitions the old table placed on this shard (open or not).
    fn dispose_owned(&self, old: &TopicMeta, deleted: bool) {
        if let Some(r) = &self.replication {
            r.remove_topic(&old.name);
        }
        self.partitions
            .borrow_mut()
            .retain(|(t, _), _| *t != old.name);
        for p in 0..old.partitions() {
            if old.shard_of(p, self.count()) == Some(self.id()) {
                self.dispose_dir(&old.name, p, deleted);
            }
        }
    }

    /// Cluster: deletes a partition directory of a topic the cluster deleted, or moves that
    /// of a topic it merely does not have to `<data>/orphaned/` (data is never deleted on an
    /// absence alone).
    fn dispose_dir(&self, name: &str, p: u32, deleted: bool) {
        let dir = self.partition_dir(name, p);
        if !dir.exists() {
            return;
        }
        if deleted {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("ringmq: removing {}: {e}", dir.display());
            }
            return;
        }
        let aside = self.cfg.data_dir.join("orphaned");
        let to = aside.join(format!("{name}-{p}.{}", self.now_ms()));
        match std::fs::create_dir_all(&aside).and_then(|()| std::fs::rename(&dir, &to)) {
            Ok(()) => eprintln!(
                "ringmq: partition {name}-{p} is not in the cluster metadata; its data is kept in {}",
                to.display()
            ),
            Err(e) => eprintln!(
                "ringmq: partition {name}-{p} is not in the cluster metadata; closed, data left in {} ({e})",
                dir.display()
            ),
        }
    }

    async fn open_owned(&self, t: &TopicMeta) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in 0..t.partitions() {
            let here = self.meta.borrow().is_here(t, p);
            if !here || t.shard_of(p, self.count()) != Some(self.id()) {
                continue;
            }
            let key = (t.name.clone(), p);
            if self.partitions.borrow().contains_key(&key) {
                continue;
            }
            let dir = self.partition_dir(&t.name, p);
            // Requests that reach it while its log opens get a retryable error, never
            // UnknownPartition.
            self.partitions
                .borrow_mut()
                .insert(key.clone(), Slot::Opening);
            let began = Instant::now();
            let peers = self.replica_peers(t, p);
            let mut cfg = self.log_config(t);
            if peers.is_some() {
                cfg.commit_policy = storage::CommitPolicy::External;
            }
            let opened = Partition::open(DmaStorage, &dir, cfg, &t.name, p, self.clock.clone())
                .await
                .map_err(|e| e.to_string());
            let opened = match (opened, peers) {
                (Ok(part), Some(peers)) => self.open_replica(Rc::new(part), &dir, t, peers).await,
                (Ok(part), None) => Ok(Rc::new(part)),
                (Err(e), _) => Err(e),
            };
            let slot = match opened {
                Ok(part) => {
                    log_recovery(&t.name, p, &part, began.elapsed());
                    part.restore_subscriptions(self.take_restored_queues(&t.name, p));
                    Slot::Ready(part)
                }
                Err(e) => {
                    let msg = format!("partition {}-{p} unavailable: {e}", t.name);
                    eprintln!("ringmq: {msg}");
                    errors.push(msg.clone());
                    Slot::Failed(msg)
                }
            };
            self.partitions.borrow_mut().insert(key, slot);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn remove_owned(&self, name: &str) {
        let keys: Vec<(String, u32)> = self
            .partitions
            .borrow()
            .keys()
            .filter(|(t, _)| t == name)
            .cloned()
            .collect();
        for key in keys {
            self.partitions.borrow_mut().remove(&key);
            let dir = self.partition_dir(&key.0, key.1);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("ringmq: removing {}: {e}", dir.display());
            }
        }
    }

    /// The durable queue ack state recovered for one partition (taken once).
    fn take_restored_queues(
        &self,
        topic: &str,
        partition: u32,
    ) -> Vec<(String, state_log::QueueAcks)> {
        let mut restored = self.restored_queues.borrow_mut();
        let keys: Vec<queue_api::QKey> = restored
            .keys()
            .filter(|(t, _, p)| t == topic && *p == partition)
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| restored.remove(&k).map(|acks| (k.1, acks)))
            .collect()
    }

    /// The open partition, or the error frame saying why there is none.
    fn partition(
        &self,
        corr: u64,
        topic: &str,
        partition: u32,
    ) -> Result<Rc<LocalPartition>, Bytes> {
        self.open_partition(topic, partition)
            .map_err(|e| wire_error::frame(corr, &e))
    }

    /// The open partition, or why there is none.
    fn open_partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Rc<LocalPartition>, Unavailable> {
        let name = || format!("{topic}-{partition}");
        match self
            .partitions
            .borrow()
            .get(&(topic.to_string(), partition))
        {
            Some(Slot::Ready(part)) => Ok(part.clone()),
            Some(Slot::Failed(why)) => Err(Unavailable::Failed(why.clone())),
            Some(Slot::Opening) => Err(Unavailable::Recovering(name())),
            None => {
                let t = Target::Partition { topic, partition };
                match route::route(&self.meta.borrow(), self.count(), t, 0) {
                    Err(e) => Err(Unavailable::Route(e)),
                    // Placed here by the table but not open: a partition being created.
                    Ok(_) => Err(Unavailable::NotOpenYet(name())),
                }
            }
        }
    }

    /// Routes a request with this shard's copy of the placement table (see
    /// `router::route`); keyless produces without a partition take the next round-robin slot.
    pub fn route(&self, target: Target<'_>) -> Result<(u32, Dest), RouteError> {
        let rr = self.round_robin.get();
        if let Target::Produce {
            partition: None,
            key: None,
            ..
        } = target
        {
            self.round_robin.set(rr.wrapping_add(1));
        }
        route::route(&self.meta.borrow(), self.count(), target, rr)
    }

    /// Starts a request this shard owns. Awaited in arrival order (so appends keep the order of
    /// a connection); the returned future finishes it and is run as its own task.
    pub async fn start(
        self: &Rc<Self>,
        partition: u32,
        conn: u64,
        frame: VerifiedFrame,
    ) -> Pending {
        let f = frame.view();
        let corr = f.correlation_id();
        match f.body_type() {
            fb::Body::Produce => self.start_produce(corr, partition, frame).await,
            fb::Body::Fetch => {
                let me = self.clone();
                Box::pin(async move { me.fetch(corr, partition, frame).await })
            }
            fb::Body::Metadata => ready(self.metadata_local(corr, &frame)),
            fb::Body::Stats => ready(self.stats_local(corr)),
            fb::Body::Status => ready(self.status_local(corr)),
            fb::Body::SubscriptionInfo => ready(self.subscription_info_local(corr, &frame)),
            fb::Body::QueueFetch => {
                let me = self.clone();
                Box::pin(async move { me.queue_fetch(corr, partition, conn, frame).await })
            }
            fb::Body::QueueSettle => {
                let me = self.clone();
                Box::pin(async move { me.queue_settle(corr, partition, frame).await })
            }
            fb::Body::CreateTopic => {
                let me = self.clone();
                Box::pin(async move { me.create_topic(corr, frame).await })
            }
            fb::Body::DeleteTopic => {
                let me = self.clone();
                Box::pin(async move { me.delete_topic(corr, frame).await })
            }
            fb::Body::ListOffset => {
                let me = self.clone();
                Box::pin(async move { me.list_offset(corr, partition, frame).await })
            }
            fb::Body::JoinGroup
            | fb::Body::Heartbeat
            | fb::Body::LeaveGroup
            | fb::Body::CommitOffsets
            | fb::Body::FetchOffsets
            | fb::Body::ListGroups
            | fb::Body::DescribeGroup => {
                let me = self.clone();
                Box::pin(async move { me.group_request(corr, frame).await })
            }
            other => ready(proto::encode_error(
                corr,
                fb::ErrorCode::UnknownRequest,
                &format!("request type {} not handled by a shard", other.0),
            )),
        }
    }

    async fn start_produce(&self, corr: u64, partition: u32, frame: VerifiedFrame) -> Pending {
        let (Some(p), Some(batch)) = (frame.view().body_as_produce(), frame.batch()) else {
            return ready(proto::encode_error(
                corr,
                fb::ErrorCode::Internal,
                "not a produce",
            ));
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return ready(wire_error::frame(corr, &e)),
        };
        let part = match self.partition(corr, p.topic(), partition) {
            Ok(part) => part,
            Err(e) => return ready(e),
        };
        if let Some(r) = self.replica(p.topic(), partition) {
            return self.produce_replicated(corr, partition, &part, r, &batch);
        }
        match part.produce(&batch).await {
            Err(e) => ready(wire_error::frame(corr, &e)),
            Ok(appended) => Box::pin(async move {
                match part.acknowledged(&appended).await {
                    Ok(()) => proto::encode_produce_response(
                        corr,
                        partition,
                        appended.info.base_offset,
                        appended.record_count,
                    ),
                    Err(e) => wire_error::frame(corr, &e),
                }
            }),
        }
    }

    /// The replica of a replicated partition on this shard.
    pub(crate) fn replica(&self, topic: &str, partition: u32) -> Option<Rc<Replica<DmaStorage>>> {
        self.replication.as_ref()?.get(topic, partition)
    }

    pub(crate) fn replication_wake(&self) {
        if let Some(r) = &self.replication {
            r.wake();
        }
    }

    /// A replicated partition: proposes the batch now (in the connection's order) and answers
    /// once it is committed on a majority.
    fn produce_replicated(
        &self,
        corr: u64,
        partition: u32,
        part: &LocalPartition,
        r: Rc<Replica<DmaStorage>>,
        batch: &crate::protocol::VerifiedBatch,
    ) -> Pending {
        let producer = batch.facts().producer;
        let (index, term) = match r.propose_batch(part.entry_data(batch), producer) {
            Ok(Proposed::New(index, term)) => (index, term),
            // Sent before (a retry): answered with where the first copy went.
            Ok(Proposed::Duplicate(index, term)) => (index, term),
            Err(e) => return ready(wire_error::frame(corr, &e)),
        };
        self.replication_wake();
        Box::pin(async move {
            match r.wait_committed(index, term).await {
                Ok(c) => proto::encode_produce_response(corr, partition, c.base_offset, c.records),
                Err(e) => wire_error::frame(corr, &e),
            }
        })
    }

    async fn fetch(&self, corr: u64, partition: u32, frame: VerifiedFrame) -> Bytes {
        let Some(f) = frame.view().body_as_fetch() else {
            return proto::encode_error(corr, fb::ErrorCode::Internal, "not a fetch");
        };
        let (topic, offset, max_bytes) = (
            f.topic().to_string(),
            f.offset(),
            f.max_bytes().min(limits::FETCH_BYTES_MAX),
        );
        let wait_ms = f.max_wait_ms().min(limits::FETCH_WAIT_MS_MAX);
        let filter = f.filter().map(String::from);
        let part = match self.partition(corr, &topic, partition) {
            Ok(p) => p,
            Err(e) => return e,
        };
        if let Some(src) = filter {
            return self
                .fetch_filtered(corr, (part, offset, max_bytes, wait_ms), &src)
                .await;
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms));
        loop {
            let changed = part.data_changed();
            let r = match part.fetch(offset, max_bytes as usize).await {
                Ok(r) => r,
                Err(e) => return wire_error::frame(corr, &e),
            };
            let now = Instant::now();
            if !r.batches.is_empty() || now >= deadline || self.is_shutting_down() {
                let pos = proto::FetchPosition {
                    partition,
                    log_start: r.log_start,
                    log_end: r.log_end,
                    next_offset: r.next_offset,
                };
                return proto::encode_fetch_response(corr, pos, &r.batches);
            }
            let stop = self.shutdown.wait();
            let timer = crate::runtime::sleep(deadline - now);
            futures_lite::future::or(futures_lite::future::or(changed, stop), timer).await;
        }
    }

    /// A metadata response holding only the partitions this shard owns.
    pub fn metadata_local(&self, corr: u64, frame: &VerifiedFrame) -> Bytes {
        let wanted: Vec<String> = frame
            .view()
            .body_as_metadata()
            .and_then(|m| m.topics())
            .map(|ts| ts.iter().map(String::from).collect())
            .unwrap_or_default();
        let meta = self.meta.borrow();
        let parts = self.partitions.borrow();
        let mut out = Vec::new();
        for t in meta.topics.values() {
            if !wanted.is_empty() && !wanted.contains(&t.name) {
                continue;
            }
            let mut partitions = Vec::new();
            for p in 0..t.partitions() {
                let follower = self.replica(&t.name, p).is_some_and(|r| !r.is_leader());
                if follower {
                    // The leader answers for it (the cluster placement fills it in).
                    continue;
                }
                if let Some(Slot::Ready(part)) = parts.get(&(t.name.clone(), p)) {
                    let log = part.log();
                    partitions.push(proto::PartitionMetaOut {
                        partition: p,
                        shard: self.id() as u32,
                        start_offset: log.start_offset(),
                        end_offset: log.end_offset(),
                        ..Default::default()
                    });
                } else if meta.is_here(t, p) && t.shard_of(p, self.count()) == Some(self.id()) {
                    partitions.push(proto::PartitionMetaOut {
                        partition: p,
                        shard: self.id() as u32,
                        ..Default::default()
                    });
                }
            }
            out.push(proto::TopicMetaOut {
                name: t.name.clone(),
                partitions,
                retention_bytes: t.retention_bytes,
                retention_ms: t.retention_ms,
            });
        }
        proto::encode_metadata_response(corr, &out)
    }

    /// Health of this shard's partitions.
    pub fn status_local(&self, corr: u64) -> Bytes {
        let parts = self.partitions.borrow();
        let mut out: Vec<proto::multicast::PartitionStatusOut> = parts
            .iter()
            .map(|((t, p), slot)| {
                let (healthy, message) = match slot {
                    Slot::Ready(part) => (
                        true,
                        part.log()
                            .recovery_report()
                            .truncated
                            .as_ref()
                            .map(|x| {
                                format!(
                                    "recovered: cut {} bytes at byte {} of {}: {}",
                                    x.cut_bytes,
                                    x.at_pos,
                                    x.segment.display(),
                                    x.reason
                                )
                            })
                            .or_else(|| part.log().failure().map(|f| format!("failed: {f}")))
                            .unwrap_or_default(),
                    ),
                    Slot::Failed(why) => (false, why.clone()),
                    Slot::Opening => (false, "recovering".to_string()),
                };
                let healthy = healthy && !message.starts_with("failed:");
                proto::multicast::PartitionStatusOut {
                    topic: t.clone(),
                    partition: *p,
                    shard: self.id() as u32,
                    healthy,
                    message,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        proto::multicast::encode_status_response(corr, &out)
    }

    /// Names of requested topics that do not exist.
    pub fn missing_topics(&self, names: &[String]) -> Vec<String> {
        let meta = self.meta.borrow();
        names
            .iter()
            .filter(|n| meta.get(n).is_none())
            .cloned()
            .collect()
    }

    async fn create_topic(&self, corr: u64, frame: VerifiedFrame) -> Bytes {
        let Some(c) = frame.view().body_as_create_topic() else {
            return proto::encode_error(corr, fb::ErrorCode::Internal, "not a create");
        };
        let topic = NewTopic {
            name: c.name().to_string(),
            partitions: c.partitions(),
            replicas: c.replicas(),
            retention_bytes: c.retention_bytes(),
            retention_ms: c.retention_ms(),
        };
        match self.create(&topic).await {
            Ok(()) => proto::encode_create_topic_response(corr, &topic.name, topic.partitions),
            Err(e) => wire_error::frame(corr, &e),
        }
    }

    /// Controller only: creates a topic and waits until every shard has applied it.
    async fn create(&self, t: &NewTopic) -> Result<(), AdminError> {
        metadata::validate_topic_name(&t.name).map_err(AdminError::InvalidName)?;
        if t.partitions == 0 || t.partitions > limits::PARTITIONS_PER_TOPIC_MAX {
            return Err(AdminError::InvalidPartitions(t.partitions));
        }
        if t.replicas > 1 && self.cfg.cluster.is_none() {
            return Err(AdminError::Replicas(t.replicas, false));
        }
        if t.replicas > limits::REPLICATION_FACTOR_MAX {
            return Err(AdminError::Replicas(t.replicas, true));
        }
        if let Some(node) = self.cluster_node() {
            return self.create_in_cluster(&node, t).await;
        }
        let _guard = self.admin_lock.acquire_permit(1).await;
        if self.meta.borrow().get(&t.name).is_some() {
            return Err(AdminError::Exists(t.name.clone()));
        }
        if self.meta.borrow().topics.len() >= limits::TOPICS_MAX {
            return Err(AdminError::TooManyTopics);
        }
        let topic = TopicMeta {
            shards: metadata::place(&t.name, t.partitions, self.count()),
            name: t.name.clone(),
            retention_bytes: t.retention_bytes,
            retention_ms: t.retention_ms,
            replicas: Vec::new(),
            incarnation: 0,
        };
        self.commit_change(MetaChange::Upsert(topic))
            .await
            .map_err(AdminError::Storage)
    }

    async fn delete_topic(&self, corr: u64, frame: VerifiedFrame) -> Bytes {
        let Some(d) = frame.view().body_as_delete_topic() else {
            return proto::encode_error(corr, fb::ErrorCode::Internal, "not a delete");
        };
        let name = d.name().to_string();
        if let Some(node) = self.cluster_node() {
            return match self.delete_in_cluster(&node, &name).await {
                Ok(()) => proto::encode_delete_topic_response(corr, &name),
                Err(e) => wire_error::frame(corr, &e),
            };
        }
        let _guard = self.admin_lock.acquire_permit(1).await;
        if self.meta.borrow().get(&name).is_none() {
            return wire_error::frame(corr, &AdminError::Unknown(name));
        }
        match self.commit_change(MetaChange::Remove(name.clone())).await {
            Ok(()) => proto::encode_delete_topic_response(corr, &name),
            Err(e) => wire_error::frame(corr, &AdminError::Storage(e)),
        }
    }

    /// Runs a typed request the broker made of this shard (see [`Internal`]).
    pub async fn internal(self: &Rc<Self>, call: Internal) -> Result<(), String> {
        match call {
            Internal::EnsureTopic { name, partitions } => {
                let t = NewTopic {
                    name,
                    partitions,
                    replicas: 0,
                    retention_bytes: -1,
                    retention_ms: -1,
                };
                match self.create(&t).await {
                    Ok(()) | Err(AdminError::Exists(_)) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Internal::Append {
                topic,
                partition,
                batch,
            } => {
                let part = self
                    .open_partition(&topic, partition)
                    .map_err(|e| e.to_string())?;
                if let Some(r) = self.replica(&topic, partition) {
                    let (index, term) = r
                        .propose(part.entry_data(&batch))
                        .map_err(|e| e.to_string())?;
                    self.replication_wake();
                    return r
                        .wait_committed(index, term)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                }
                let appended = part.produce(&batch).await.map_err(|e| e.to_string())?;
                part.acknowledged(&appended)
                    .await
                    .map_err(|e| e.to_string())
            }
            Internal::ReplicaMessages { msgs } => {
                if let Some(r) = self.replication() {
                    r.deliver(msgs);
                }
                Ok(())
            }
            Internal::LeaderReports { reports } => {
                match self.cluster_node() {
                    Some(node) => node.note_leaders(reports),
                    None => {
                        return Err(
                            "leaderships reported to a shard without the node runtime".into()
                        )
                    }
                }
                Ok(())
            }
        }
    }

    /// Makes a typed call on `to` (this shard directly, others through the transport) and
    /// waits for its answer.
    pub async fn call_internal(self: &Rc<Self>, to: Dest, call: Internal) -> Result<(), String> {
        if to == Dest::local(self.id()) {
            return self.internal(call).await;
        }
        let from = self.id();
        let rx = self
            .router
            .send_request(to, move |req_id| Envelope::Internal { from, req_id, call })
            .await?;
        match rx.await {
            Some(Reply::Internal { result, .. }) => result,
            _ => Err(format!("shard {} did not answer", to.shard)),
        }
    }

    /// Cluster, shard 0: proposes the topic to the controller and waits until it is applied
    /// (here and, within a bound, on every live node).
    async fn create_in_cluster(
        &self,
        node: &crate::cluster::node::ClusterNode,
        t: &NewTopic,
    ) -> Result<(), AdminError> {
        if node.has_topic(&t.name) {
            return Err(AdminError::Exists(t.name.clone()));
        }
        let nodes = node.live_nodes();
        // The default, as the issue asks: three replicas where three nodes are alive.
        let replicas = match t.replicas {
            0 => (nodes.len() as u32).clamp(1, 3),
            n => n,
        };
        let cmd = crate::cluster::meta::MetaCommand::CreateTopic {
            name: t.name.clone(),
            partitions: t.partitions,
            replicas,
            retention_bytes: t.retention_bytes,
            retention_ms: t.retention_ms,
            nodes,
        };
        self.settle_proposal(node, cmd).await
    }

    async fn delete_in_cluster(
        &self,
        node: &crate::cluster::node::ClusterNode,
        name: &str,
    ) -> Result<(), AdminError> {
        if !node.has_topic(name) {
            return Err(AdminError::Unknown(name.to_string()));
        }
        let cmd = crate::cluster::meta::MetaCommand::DeleteTopic {
            name: name.to_string(),
        };
        self.settle_proposal(node, cmd).await
    }

    async fn settle_proposal(
        &self,
        node: &crate::cluster::node::ClusterNode,
        cmd: crate::cluster::meta::MetaCommand,
    ) -> Result<(), AdminError> {
        use crate::cluster::node::ProposeFailure;
        let version = node.propose(cmd).await.map_err(|e| match e {
            ProposeFailure::Unavailable(m) => AdminError::ControllerUnavailable(m),
            ProposeFailure::Refused(m) => AdminError::Refused(m),
        })?;
        let lagging = node.wait_applied(version).await;
        if !lagging.is_empty() {
            eprintln!(
                "ringmq: metadata version {version} not yet applied on node(s) {lagging:?} after {} ms",
                limits::CONTROLLER_APPLY_WAIT_MS
            );
        }
        Ok(())
    }

    /// Cluster, shard 0: makes `table` (derived from the controller's metadata) this node's
    /// table: persisted, then applied on every shard. `Err`: not applied (try again); `Ok`
    /// with the partitions that failed to open (they are marked failed; see `status`).
    pub async fn publish_table(&self, table: Metadata) -> Result<Vec<String>, String> {
        self.persist_and_apply(MetaChange::Replace(Box::new(table)))
            .await
    }

    /// Controller only: persists a change, applies it here and on every other shard, and waits
    /// for all of them.
    async fn commit_change(&self, change: MetaChange) -> Result<(), String> {
        let errors = self.persist_and_apply(change).await?;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Saves the changed table and applies it on every shard. `Err`: not saved or not handed
    /// to every shard (try again); `Ok` lists what failed while applying (partitions that
    /// could not be opened are marked failed: the table itself is applied).
    async fn persist_and_apply(&self, change: MetaChange) -> Result<Vec<String>, String> {
        let mut next = self.meta.borrow().clone();
        let version = next.version + 1;
        next.apply_versioned(version, &change);
        meta_file::save(&self.cfg.data_dir, &next)
            .map_err(|e| format!("saving the topic table: {e}"))?;
        let mut acks = Vec::new();
        for s in (0..self.count()).filter(|&s| s != self.id()) {
            let from = self.id();
            let c = change.clone();
            let rx = self
                .router
                .call(s, move |req_id| Envelope::Meta {
                    from,
                    req_id,
                    version,
                    change: c,
                })
                .await?;
            acks.push(rx);
        }
        let mut errors = Vec::new();
        if let Err(e) = self.apply_meta_update(version, &change).await {
            errors.push(e);
        }
        for rx in acks {
            match rx.await {
                Some(Reply::Ack { error: Some(e), .. }) => errors.push(e),
                Some(_) => {}
                None => return Err("a shard did not answer".into()),
            }
        }
        Ok(errors)
    }

    /// The open partitions of this shard.
    pub fn open_partitions(&self) -> Vec<Rc<LocalPartition>> {
        self.partitions
            .borrow()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(p) => Some(p.clone()),
                Slot::Failed(_) | Slot::Opening => None,
            })
            .collect()
    }

    /// Periodic log work: writes/syncs for `--fsync never|MS`, and retention.
    pub async fn run_ticker(self: Rc<Self>) {
        // Expiry runs in its own task: a slow log tick (fsync) or retention pass must not look
        // like a stall of the coordinator (which forgives members the time it did not run).
        let expiry = self.clone();
        glommio::spawn_local(async move {
            while !expiry.is_shutting_down() {
                crate::runtime::sleep(Duration::from_millis(limits::GROUP_EXPIRY_CHECK_MS)).await;
                expiry.expire_members();
                expiry.expire_leases();
            }
        })
        .detach();
        let mut last_retention = Instant::now();
        while !self.is_shutting_down() {
            crate::runtime::sleep(Duration::from_millis(limits::LOG_TICK_MS)).await;
            let now = Instant::now();
            if self.cfg.durability != storage::Durability::Always {
                for part in self.open_partitions() {
                    let log = part.log();
                    if let Err(e) = log.tick(now).await {
                        eprintln!("ringmq: {}: {e}", log.dir().display());
                    }
                }
            }
            if now.duration_since(last_retention)
                >= Duration::from_millis(self.cfg.retention_check_ms)
            {
                last_retention = now;
                for part in self.open_partitions() {
                    let log = part.log();
                    let result = match self.replica(part.topic(), part.id()) {
                        // A replicated log: its replica keeps the Raft index in step.
                        Some(r) => r.enforce_retention(self.now_ms()).await,
                        None => log
                            .enforce_retention(self.now_ms())
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    if let Err(e) = result {
                        eprintln!("ringmq: retention {}: {e}", log.dir().display());
                    }
                }
            }
        }
    }

    /// Writes and syncs every log (shutdown).
    pub async fn sync_all(&self) {
        let state = self.state.borrow().clone();
        if let Some(s) = state {
            if let Err(e) = s.sync().await {
                eprintln!("ringmq: sync state log: {e}");
            }
        }
        for part in self.open_partitions() {
            let log = part.log();
            if let Err(e) = log.sync().await {
                eprintln!("ringmq: sync {}: {e}", log.dir().display());
            }
        }
    }
}
