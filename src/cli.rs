//! The `ringmq` command line: parsing and the one-shot commands (topic, produce, consume).
//!
//! Owns: flags, their defaults and help, and printing. Must not touch: broker internals; the
//! client commands speak only through `client::Client`. Every failure is one line on stderr
//! and a non-zero exit.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::client::{produce_ack, Client, ClientError};
use crate::limits;
use crate::protocol::{self as proto, fb, PartitionChoice, RecordIn};
use crate::runtime::config::{parse_fsync, ServeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ringmq",
    version,
    about = "A thread-per-core message broker on io_uring"
)]
pub struct Cli {
    /// Broker address for client commands.
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
    /// Spin this many µs before parking an idle executor (0 = park at once). Lower cross-core
    /// latency for more CPU.
    #[arg(long, default_value_t = 0)]
    pub spin_before_park_us: u64,
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
    },
    /// List topics: `NAME PARTITIONS` per line.
    List,
    /// Delete a topic and its data.
    Delete { name: String },
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
    /// Requests in flight at once.
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

/// A progress line on stderr (elapsed seconds) while a benchmark runs; off with `--json`.
struct Progress {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(quiet: bool) -> Self {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let thread = (!quiet).then(|| {
            std::thread::spawn(move || {
                let start = std::time::Instant::now();
                let mut shown = false;
                while !d.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    let s = start.elapsed().as_secs();
                    if s >= 1 && start.elapsed().subsec_millis() < 100 {
                        eprint!("\rbench running: {s} s");
                        shown = true;
                    }
                }
                if shown {
                    eprintln!();
                }
            })
        });
        Self { done, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the parsed command; `Err` is the one-line message to print.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(a) => crate::runtime::boot::serve(serve_config(a)?),
        Command::Topic { command } => topic(&cli.server, command),
        Command::Produce(a) => produce(&cli.server, a),
        Command::Consume(a) => crate::cli_consume::consume(&cli.server, &a),
        Command::Stats => crate::cli_consume::stats(&cli.server),
        Command::Status => crate::cli_consume::status(&cli.server),
        Command::Subscription { command } => crate::cli_queue::subscription(&cli.server, command),
        Command::Group { command } => crate::cli_group::group(&cli.server, command),
        Command::Bench { json, scenario } => {
            let progress = Progress::start(json);
            let server_given = std::env::args()
                .any(|a| a == "--server" || a.starts_with("--server="))
                || std::env::var_os("RINGMQ_SERVER").is_some();
            let report = match scenario {
                BenchScenario::Log(a) => crate::bench::run_log(a)?,
                BenchScenario::Produce(a) => {
                    crate::bench::run_produce(server_given.then_some(cli.server.as_str()), a)?
                }
                BenchScenario::Consume(a) => {
                    crate::bench::run_consume(server_given.then_some(cli.server.as_str()), a)?
                }
                BenchScenario::E2e(mut a) => {
                    a.mode = "pattern".into();
                    a.reject_percent = 0;
                    let mut r =
                        crate::bench::run_fanout(server_given.then_some(cli.server.as_str()), a)?;
                    r.scenario = "e2e".into();
                    r
                }
                BenchScenario::Queue(a) => {
                    crate::bench::run_queue(server_given.then_some(cli.server.as_str()), a)?
                }
                BenchScenario::Fanout(a) => {
                    crate::bench::run_fanout(server_given.then_some(cli.server.as_str()), a)?
                }
                BenchScenario::Rebalance(a) => {
                    crate::bench::run_rebalance(server_given.then_some(cli.server.as_str()), a)?
                }
            };
            drop(progress);
            report.print(json);
            Ok(())
        }
    }
}

fn serve_config(a: ServeArgs) -> Result<ServeConfig, String> {
    let d = ServeConfig::default();
    Ok(ServeConfig {
        data_dir: a.data,
        listen: a.listen,
        cores: a.cores.unwrap_or(d.cores),
        durability: parse_fsync(&a.fsync)?,
        max_frame_bytes: a.max_frame_bytes,
        max_connections: a.max_connections,
        max_in_flight: a.max_in_flight,
        io_memory_bytes: a.io_memory_kib.saturating_mul(1024),
        spin_before_park_us: a.spin_before_park_us,
        segment_bytes_max: a.segment_bytes,
        retention_check_ms: a.retention_check_ms,
        state_compact_bytes: a.state_compact_bytes,
        memory_max_bytes: a.memory_max_bytes.unwrap_or(d.memory_max_bytes),
        stalled_connection_ms: a.stalled_connection_ms,
    })
}

fn connect(server: &str) -> Result<Client, String> {
    Client::connect(server).map_err(|e| format!("cannot reach the broker at {server}: {e}"))
}

fn topic(server: &str, cmd: TopicCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_bytes,
            retention_ms,
        } => {
            c.create_topic(
                &name,
                partitions,
                retention_bytes.unwrap_or(-1),
                retention_ms.unwrap_or(-1),
            )
            .map_err(|e| format!("creating topic {name:?}: {e}"))?;
            eprintln!("created topic {name} with {partitions} partition(s)");
        }
        TopicCommand::List => {
            let topics = c
                .metadata(&[])
                .map_err(|e| format!("listing topics: {e}"))?;
            let mut out = std::io::stdout().lock();
            for t in topics {
                writeln!(out, "{} {}", t.name, t.partitions.len()).map_err(|e| e.to_string())?;
            }
        }
        TopicCommand::Delete { name } => {
            c.delete_topic(&name)
                .map_err(|e| format!("deleting topic {name:?}: {e}"))?;
            eprintln!("deleted topic {name}");
        }
    }
    Ok(())
}

/// Batches of records per partition choice, sent pipelined; every ack is awaited.
struct Sender<'a> {
    client: Client,
    topic: &'a str,
    window: usize,
    in_flight: usize,
    acked: u64,
}

impl Sender<'_> {
    fn send(&mut self, choice: PartitionChoice<'_>, records: &[RecordIn]) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        if self.in_flight >= self.window {
            self.recv_one()?;
        }
        let batch = proto::encode_record_batch(records);
        let topic = self.topic;
        self.client
            .send(|c| proto::encode_produce(c, topic, choice, &batch))
            .map_err(|e| format!("producing to {topic:?}: {e}"))?;
        self.client.flush().map_err(|e| e.to_string())?;
        self.in_flight += 1;
        Ok(())
    }

    fn recv_one(&mut self) -> Result<(), String> {
        let r = self
            .client
            .recv()
            .map_err(|e| format!("producing to {:?}: {e}", self.topic))?;
        let ack = produce_ack(&r).map_err(|e| format!("producing to {:?}: {e}", self.topic))?;
        self.acked += u64::from(ack.record_count);
        self.in_flight -= 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<u64, String> {
        while self.in_flight > 0 {
            self.recv_one()?;
        }
        Ok(self.acked)
    }
}

fn parse_headers(hs: &[String]) -> Result<Vec<(String, Vec<u8>)>, String> {
    hs.iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.as_bytes().to_vec())),
            _ => Err(format!("--header must be K=V, not {h:?}")),
        })
        .collect()
}

/// One stdin line as a record: (key, value) per the key flags, plus the headers.
fn line_record(line: String, a: &ProduceArgs, headers: &[(String, Vec<u8>)]) -> RecordIn {
    let (key, value) = match (&a.key_separator, &a.key) {
        (Some(sep), _) => match line.split_once(sep.as_str()) {
            Some((k, v)) => (Some(k.as_bytes().to_vec()), v.as_bytes().to_vec()),
            None => (None, line.into_bytes()),
        },
        (None, Some(k)) => (Some(k.as_bytes().to_vec()), line.into_bytes()),
        (None, None) => (None, line.into_bytes()),
    };
    RecordIn {
        key,
        value,
        headers: headers.to_vec(),
        ..Default::default()
    }
}

fn produce(server: &str, a: ProduceArgs) -> Result<(), String> {
    let mut headers = parse_headers(&a.headers)?;
    if let Some(d) = a.delay_ms {
        let at = crate::shard::now_ms().max(0) as u64 + d;
        headers.push((
            crate::protocol::queue::DELIVER_AT_HEADER.to_string(),
            at.to_string().into_bytes(),
        ));
    }
    if !a.to.is_empty() {
        return produce_multicast(server, &a, &headers);
    }
    let topic = a.topic.clone().unwrap_or_default();
    let mut client = connect(server)?;
    let partitions = client
        .metadata(&[topic.as_str()])
        .map_err(|e| format!("producing to {topic:?}: {e}"))?
        .first()
        .map(|t| t.partitions.len() as u32)
        .unwrap_or(1);
    let mut s = Sender {
        client,
        topic: &topic,
        window: a.window.max(1),
        in_flight: 0,
        acked: 0,
    };
    let batch_max = a.batch.clamp(1, 100_000);
    // Records grouped by target partition (None = let the broker choose).
    let mut groups: std::collections::BTreeMap<Option<u32>, Vec<RecordIn>> = Default::default();
    let fixed = a.partition.or(a
        .key
        .as_ref()
        .map(|k| proto::partitioner::partition_for_key(k.as_bytes(), partitions)));
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let rec = line_record(line, &a, &headers);
        let target = match (&rec.key, fixed) {
            (_, Some(p)) => Some(p),
            (Some(k), None) => Some(proto::partitioner::partition_for_key(k, partitions)),
            (None, None) => None,
        };
        let g = groups.entry(target).or_default();
        g.push(rec);
        if g.len() >= batch_max {
            let recs = std::mem::take(g);
            s.send(choice(target), &recs)?;
        }
    }
    for (target, recs) in std::mem::take(&mut groups) {
        s.send(choice(target), &recs)?;
    }
    let n = s.finish()?;
    eprintln!("produced {n} messages");
    Ok(())
}

/// `produce --to T1,T2,...`: batches multicast to every destination.
fn produce_multicast(
    server: &str,
    a: &ProduceArgs,
    headers: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let mut c = connect(server)?;
    let dests: Vec<(&str, Option<u32>)> = a.to.iter().map(|t| (t.as_str(), None)).collect();
    let batch_max = a.batch.clamp(1, 100_000);
    let mut produced = 0u64;
    let mut failures: std::collections::BTreeMap<String, String> = Default::default();
    let mut send = |recs: &[RecordIn], c: &mut Client| -> Result<(), String> {
        if recs.is_empty() {
            return Ok(());
        }
        let key = a.key.as_deref().map(str::as_bytes);
        let results = c
            .multicast(&dests, key, recs)
            .map_err(|e| format!("multicast: {e}"))?;
        for r in results {
            match r.outcome {
                Ok((_, n)) => produced += u64::from(n),
                Err((code, msg)) => {
                    let name = fb::ErrorCode(code).variant_name().unwrap_or("Unknown");
                    failures.insert(r.topic.clone(), format!("{}: {msg} ({name})", r.topic));
                }
            }
        }
        Ok(())
    };
    let mut batch = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        batch.push(line_record(line, a, headers));
        if batch.len() >= batch_max {
            send(&batch, &mut c)?;
            batch.clear();
        }
    }
    send(&batch, &mut c)?;
    eprintln!(
        "produced {produced} messages over {} destinations",
        dests.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = failures.into_values().collect();
        Err(format!(
            "{} of {} destinations failed: {}",
            list.len(),
            dests.len(),
            list.join("; ")
        ))
    }
}

fn choice(target: Option<u32>) -> PartitionChoice<'static> {
    match target {
        Some(p) => PartitionChoice::Explicit(p),
        None => PartitionChoice::RoundRobin,
    }
}

/// Where a consumer starts.
#[derive(Clone, Copy, Debug)]
pub enum From {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

pub fn parse_from(s: &str) -> Result<From, String> {
    match s {
        "earliest" => Ok(From::Earliest),
        "latest" => Ok(From::Latest),
        t if t.starts_with('@') => t[1..]
            .parse()
            .map(From::Time)
            .map_err(|_| format!("--from @UNIX_MS needs a number of ms, not {t:?}")),
        n => n.parse().map(From::Offset).map_err(|_| {
            format!("--from must be earliest, latest, an offset or @UNIX_MS, not {n:?}")
        }),
    }
}

/// The start offset of `partition` under `from`.
pub fn start_offset(
    c: &mut Client,
    topic: &str,
    partition: u32,
    from: From,
) -> Result<u64, String> {
    let r = match from {
        From::Earliest => c.list_offset(topic, partition, -1),
        From::Latest => c.list_offset(topic, partition, -2),
        From::Offset(o) => return Ok(o),
        From::Time(ms) => c.list_offset(topic, partition, ms.max(0)),
    };
    r.map_err(|e| format!("finding the start of {topic:?} partition {partition}: {e}"))
}

pub fn print_record(
    out: &mut impl Write,
    a: &ConsumeArgs,
    topic: &str,
    partition: u32,
    r: &proto::RecordOut,
) -> std::io::Result<()> {
    if a.format != "json" {
        out.write_all(&r.value)?;
        return out.write_all(b"\n");
    }
    let fields = JsonRecord {
        topic,
        partition,
        offset: r.offset,
        key: r.key.as_deref(),
        value: &r.value,
        timestamp_ms: r.timestamp_ms,
        headers: &r.headers,
    };
    writeln!(out, "{}", fields.to_json(None))
}

/// One consumed message as a JSON object (the `--format json` line).
pub struct JsonRecord<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub timestamp_ms: i64,
    pub headers: &'a [(String, Vec<u8>)],
}

impl JsonRecord<'_> {
    /// The object; `delivery_count` is added for queue messages.
    pub fn to_json(&self, delivery_count: Option<u32>) -> String {
        let text = |b: &[u8]| json_string(&String::from_utf8_lossy(b));
        let key = self.key.map(text).unwrap_or_else(|| "null".to_string());
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), text(v)))
            .collect();
        let count = delivery_count
            .map(|c| format!(",\"delivery_count\":{c}"))
            .unwrap_or_default();
        format!(
            "{{\"topic\":{},\"partition\":{},\"offset\":{},\"key\":{key},\"value\":{},\"timestamp\":{}{count},\"headers\":{{{}}}}}",
            json_string(self.topic),
            self.partition,
            self.offset,
            text(self.value),
            self.timestamp_ms,
            headers.join(",")
        )
    }
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Maps a client error for callers that want the wire code.
pub fn error_code(e: &ClientError) -> Option<fb::ErrorCode> {
    e.code()
}
