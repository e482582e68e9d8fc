//! The command line's argument types (clap): every flag, its default and its help.
//!
//! Owns: types only. Must not touch: behaviour (the command modules act on these).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::limits;

#[derive(Parser, Debug)]
#[command(
    name = "ringmq",
    version,
    about = "A thread-per-core message broker on io_uring"
)]
pub struct Cli {
    /// Broker address for client commands; a comma-separated list is tried in order and the
    /// first that answers is used.
    #[arg(
        long,
        global = true,
        env = "RINGMQ_SERVER",
        default_value = "127.0.0.1:9400"
    )]
    pub server: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create, list or delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce each line of stdin as one message.
    Produce(ProduceArgs),
    /// Print messages of a topic.
    Consume(ConsumeArgs),
    /// Cross-core batch copy counters per shard (forward, multicast, fan-out).
    Stats,
    /// Health of every partition: `TOPIC PARTITION SHARD ok|UNAVAILABLE MESSAGE`; exits 1 if
    /// any partition is unavailable or failed.
    Status,
    /// Cluster: nodes, liveness, the controller leader.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Shared subscriptions of a topic: list, describe.
    Subscription {
        #[command(subcommand)]
        command: SubscriptionCommand,
    },
    /// Consumer groups: list, describe.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Measure throughput and latency (see `ringmq bench --help`).
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        scenario: BenchScenario,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchScenario {
    /// The machine's loopback floor: a blocking 64 B TCP ping-pong (no broker), paced like
    /// `produce` with `--rate`; every latency target is a ratio to it.
    Floor(crate::bench::FloorBenchArgs),
    /// Append to one partition log directly (no broker, no network): latency to durable,
    /// throughput, appends per fdatasync.
    Log(crate::bench::LogBenchArgs),
    /// P producers send batches to a broker (`--server`, or one started here on a temporary
    /// directory): msgs/s, MB/s and produce→ack latency; `--rate` for a fixed schedule
    /// (latency corrected for coordinated omission).
    Produce(crate::bench::ProduceBenchArgs),
    /// Consumer-group rebalance time when a member joins and when one dies (stops
    /// heartbeating; includes the session timeout), median of `--runs`. The latency columns
    /// are the join times.
    Rebalance(crate::bench::RebalanceBenchArgs),
    /// Pub/sub: publish→subscriber latency of a pattern subscriber, with or without a
    /// broker-side filter (`--mode pattern`); multicast throughput and cross-core copies per
    /// request to N destinations (`--mode multicast`). Latency columns: publish→subscriber, or
    /// multicast request→ack.
    Fanout(crate::bench::FanoutBenchArgs),
    /// Read a prepared backlog as fast as possible with N stream consumers.
    Consume(crate::bench::ConsumeBenchArgs),
    /// End to end: one producer at a fixed `--rate` (one message per request), one consumer
    /// long-polling; produce→receive latency from the intended send time (corrected for
    /// coordinated omission). Same options as `fanout --mode pattern`.
    E2e(crate::bench::FanoutBenchArgs),
    /// Shared-subscription acked throughput with N competing consumers on a prepared backlog,
    /// against one stream consumer of the same backlog in the same run. Latency columns: one
    /// fetch+ack round.
    Queue(crate::bench::QueueBenchArgs),
}

/// `--poll`: how an idle shard waits for work.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    Park,
    Adaptive,
    Spin,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Data directory (on a real filesystem: O_DIRECT does not work on tmpfs).
    #[arg(long, default_value = "./ringmq-data")]
    pub data: PathBuf,
    /// Address to listen on (every shard listens on it with SO_REUSEPORT).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub listen: std::net::SocketAddr,
    /// Shards (one pinned executor per core); default all cores.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Durability: always (ack after fdatasync, group commit), never, or MS (sync every MS ms).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// Largest frame accepted from a client.
    #[arg(long, default_value_t = limits::MAX_FRAME_BYTES_DEFAULT)]
    pub max_frame_bytes: usize,
    /// Connection limit for the whole broker.
    #[arg(long, default_value_t = limits::MAX_CONNECTIONS_DEFAULT)]
    pub max_connections: usize,
    /// Requests in flight per connection (then the server stops reading it).
    #[arg(long, default_value_t = limits::MAX_IN_FLIGHT_DEFAULT)]
    pub max_in_flight: usize,
    /// glommio io memory per executor in KiB (must fit `ulimit -l`; at least 512).
    #[arg(long, default_value_t = limits::IO_MEMORY_BYTES_DEFAULT / 1024)]
    pub io_memory_kib: usize,
    /// How an idle shard waits for work. `park` (the default): sleep in the kernel at once, no
    /// CPU while idle; best whenever cores are shared with clients or other programs.
    /// `adaptive`: after work, spin `--spin-before-park-us` (default 100) before parking;
    /// trades CPU for wake-up latency on cores mostly left to the broker. `spin`: never park;
    /// every shard's core runs at 100% all the time, idle or not: only for cores dedicated to
    /// the broker (`--cores N` of an isolated set).
    #[arg(long, value_enum)]
    pub poll: Option<PollMode>,
    /// With `--poll adaptive` (implied when given alone): µs to spin before parking.
    #[arg(long)]
    pub spin_before_park_us: Option<u64>,
    /// Segment size before a roll.
    #[arg(long, default_value_t = limits::SEGMENT_BYTES_MAX_DEFAULT)]
    pub segment_bytes: u64,
    /// How often retention deletes old segments.
    #[arg(long, default_value_t = limits::RETENTION_CHECK_MS)]
    pub retention_check_ms: u64,
    /// Compact a shard's state log (consumer offsets, queue acks) past this size.
    #[arg(long, default_value_t = limits::STATE_LOG_COMPACT_BYTES)]
    pub state_compact_bytes: u64,
    /// Memory for request bodies being read or processed and reserved responses, over all
    /// connections (split evenly across cores); at the limit connections are not read
    /// (backpressure). Default: a quarter of physical memory.
    #[arg(long)]
    pub memory_max_bytes: Option<u64>,
    /// Close a connection stalled this long: mid-frame with no bytes arriving, or not reading
    /// a response the broker is writing to it.
    #[arg(long, default_value_t = limits::STALLED_CONNECTION_MS_DEFAULT)]
    pub stalled_connection_ms: u64,
    /// Cluster: peer addresses of some members, comma-separated IP:PORT (may include this
    /// node's own `--peer-listen`). The nodes listed are the controller's voters (3 or 5 is
    /// usual); a node not listed joins through them. Without it: a single node, no cluster.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Cluster: this node's id, unique in the cluster, at least 1.
    #[arg(long, requires = "seeds")]
    pub node_id: Option<u32>,
    /// Cluster: where other nodes reach this one (IP:PORT).
    #[arg(long, requires = "seeds")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Cluster: the client address other nodes hand out for this one (default `--listen`).
    #[arg(long, requires = "seeds")]
    pub advertise: Option<String>,
    /// Cluster: a node silent this long is down.
    #[arg(long, default_value_t = limits::NODE_FAILURE_TIMEOUT_MS_DEFAULT)]
    pub node_failure_timeout_ms: u64,
    /// Cluster: a replicated partition whose leader is silent this long elects a new one
    /// (Raft election timeout; pre-vote and check-quorum are on).
    #[arg(long, default_value_t = limits::ELECTION_TIMEOUT_MS_DEFAULT)]
    pub election_timeout_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Keep at most this many bytes per partition (whole segments are deleted).
        #[arg(long)]
        retention_bytes: Option<i64>,
        /// Delete segments whose newest message is older than this many ms.
        #[arg(long)]
        retention_ms: Option<i64>,
        /// Cluster: nodes holding each partition, 1 to 5 (default min(3, live nodes)). With
        /// more than one, a produce is acknowledged once a majority persisted it and a
        /// follower takes over when the leader's node dies.
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// List topics: `NAME PARTITIONS` per line.
    List,
    /// Partitions of a topic: offsets, leader node and replicas.
    Describe {
        name: String,
        /// `text` (one line per partition) or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Delete a topic and its data.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes (id, client and peer address, alive, partitions led), the controller leader and
    /// the metadata version, as the node asked sees them.
    Status {
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List groups, one per line.
    List,
    /// Members, assignments, committed offsets and lag of a group.
    Describe { group: String },
}

#[derive(Subcommand, Debug)]
pub enum SubscriptionCommand {
    /// `NAME TYPE` per line.
    List { topic: String },
    /// Backlog, in flight, redeliveries, dead-lettered, acked.
    Describe { topic: String, subscription: String },
}

#[derive(clap::Args, Debug)]
pub struct ProduceArgs {
    /// The topic (or use --to).
    #[arg(required_unless_present = "to")]
    pub topic: Option<String>,
    /// Multicast: produce each batch to all of these topics (comma-separated). One copy goes
    /// to each shard that owns some of them; each destination succeeds or fails on its own.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["topic", "partition", "key_separator"])]
    pub to: Vec<String>,
    /// A header K=V on every message (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    pub headers: Vec<String>,
    /// Delayed delivery: shared subscriptions do not dispatch these messages before now + D ms.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Target partition (default: by key if given, else round-robin).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Key for every message (partition = murmur2(key) mod partitions).
    #[arg(long, conflicts_with = "partition")]
    pub key: Option<String>,
    /// Split each line at the first SEP: the text before is the key, after is the value.
    #[arg(long, conflicts_with = "key")]
    pub key_separator: Option<String>,
    /// Messages per produce request at most.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight at once (per connection; at most 64, the batches a replicated
    /// partition remembers per producer to store a resent one once).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
}

#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// The topic (or use --pattern).
    #[arg(required_unless_present = "pattern")]
    pub topic: Option<String>,
    /// Subscribe to every topic matching PATTERN (`*` one token, `>` one or more trailing
    /// tokens), including topics created later (read from their start).
    #[arg(long, conflicts_with = "topic")]
    pub pattern: Option<String>,
    /// Content filter evaluated on the broker, e.g. `region == "eu" && qty > 100`.
    #[arg(long)]
    pub filter: Option<String>,
    /// Only this partition (default: all).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to start: earliest, latest, an offset, or @UNIX_MS (the first message at or after
    /// that time). Default latest. With --group it applies where the group has no committed
    /// offset; with --shared it places a new subscription (earliest or latest; default earliest).
    #[arg(long)]
    pub from: Option<String>,
    /// Consume as one of the competing consumers of shared subscription SUB (queue semantics:
    /// each message to one consumer, acked one by one).
    #[arg(long, conflicts_with_all = ["group", "filter"])]
    pub shared: Option<String>,
    /// With --shared: all messages of one key go to one consumer at a time, in order.
    #[arg(long, requires = "shared")]
    pub key_shared: bool,
    /// With --shared: most messages leased to this consumer and not yet acked.
    #[arg(long, default_value_t = 100)]
    pub prefetch: usize,
    /// With --shared: auto (ack after printing), none (never ack; exiting lets the broker
    /// redeliver), nack (nack each, for redelivery).
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "nack"])]
    pub ack: String,
    /// With --shared (new subscriptions): visibility timeout before an unacked message is
    /// redelivered.
    #[arg(long, default_value_t = 30_000)]
    pub ack_timeout_ms: u32,
    /// With --shared (new subscriptions): deliveries before a message moves to `<topic>.dlq`.
    #[arg(long, default_value_t = 5)]
    pub max_deliveries: u32,
    /// With --ack nack: redeliver after this delay.
    #[arg(long, default_value_t = 0)]
    pub nack_delay_ms: u32,
    /// Join consumer group G: consume only its assigned partitions, commit after printing,
    /// leave on exit.
    #[arg(long, conflicts_with = "partition")]
    pub group: Option<String>,
    /// Group session timeout: the member is removed after this long without a heartbeat.
    #[arg(long, default_value_t = limits::SESSION_TIMEOUT_MS_DEFAULT)]
    pub session_timeout_ms: u32,
    /// Exit after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
    /// Exit after this many ms with nothing new (default: wait forever).
    #[arg(long)]
    pub idle_ms: Option<u64>,
    /// Output: value (one value per line) or json (one object per line).
    #[arg(long, default_value = "value", value_parser = ["value", "json"])]
    pub format: String,
}
