//! The `ringmq` command line: `run` dispatches a parsed [`Cli`] to one module per command.
//!
//! Layout (imports go one way, no cycle): the leaves `args` (flags, defaults, help),
//! `output` (printing records and errors) and `common` (connection helper, start positions,
//! subscriptions); the commands `topic`, `produce`, `consume` (which hands group and shared
//! consumption to `group` and `queue`); `bench/` beside this folder runs the benchmarks.
//!
//! Owns: dispatch and the benchmark progress line. Must not touch: broker internals; the
//! client commands speak only through `client::Client`. Every failure is one line on stderr
//! and a non-zero exit.

pub mod args;
pub mod common;
pub mod consume;
pub mod group;
pub mod output;
pub mod produce;
pub mod queue;
pub mod topic;

pub use args::*;

use crate::limits;
use crate::runtime::config::{parse_fsync, parse_seeds, ClusterConfig, ServeConfig};

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
        Command::Topic { command } => topic::topic(&cli.server, command),
        Command::Produce(a) => produce::produce(&cli.server, a),
        Command::Consume(a) => consume::consume(&cli.server, &a),
        Command::Stats => consume::stats(&cli.server),
        Command::Status => consume::status(&cli.server),
        Command::Subscription { command } => queue::subscription(&cli.server, command),
        Command::Cluster { command } => topic::cluster(&cli.server, command),
        Command::Group { command } => group::group(&cli.server, command),
        Command::Bench { json, scenario } => {
            let progress = Progress::start(json);
            let server_given = std::env::args()
                .any(|a| a == "--server" || a.starts_with("--server="))
                || std::env::var_os("RINGMQ_SERVER").is_some();
            let report = match scenario {
                BenchScenario::Log(a) => crate::bench::run_log(a)?,
                BenchScenario::Floor(a) => crate::bench::run_floor(a)?,
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

/// The executor's spin before parking for a `--poll` mode (`u64::MAX`: never park).
fn spin_before_park_us(poll: Option<PollMode>, spin_us: Option<u64>) -> Result<u64, String> {
    match (poll, spin_us) {
        (None | Some(PollMode::Park), None) => Ok(0),
        (Some(PollMode::Park), Some(_)) => {
            Err("--spin-before-park-us applies to --poll adaptive, not --poll park".into())
        }
        (None | Some(PollMode::Adaptive), Some(0)) => {
            Err("--spin-before-park-us must be at least 1 (0 is --poll park)".into())
        }
        (None | Some(PollMode::Adaptive), Some(us)) => Ok(us),
        (Some(PollMode::Adaptive), None) => Ok(limits::POLL_ADAPTIVE_SPIN_US_DEFAULT),
        (Some(PollMode::Spin), None) => Ok(u64::MAX),
        (Some(PollMode::Spin), Some(_)) => {
            Err("--poll spin never parks; --spin-before-park-us does not apply".into())
        }
    }
}

fn serve_config(a: ServeArgs) -> Result<ServeConfig, String> {
    let d = ServeConfig::default();
    let cluster = cluster_config(&a)?;
    Ok(ServeConfig {
        data_dir: a.data,
        listen: a.listen,
        cores: a.cores.unwrap_or(d.cores),
        durability: parse_fsync(&a.fsync)?,
        max_frame_bytes: a.max_frame_bytes,
        max_connections: a.max_connections,
        max_in_flight: a.max_in_flight,
        io_memory_bytes: a.io_memory_kib.saturating_mul(1024),
        spin_before_park_us: spin_before_park_us(a.poll, a.spin_before_park_us)?,
        segment_bytes_max: a.segment_bytes,
        retention_check_ms: a.retention_check_ms,
        state_compact_bytes: a.state_compact_bytes,
        memory_max_bytes: a.memory_max_bytes.unwrap_or(d.memory_max_bytes),
        stalled_connection_ms: a.stalled_connection_ms,
        cluster,
    })
}

/// The cluster settings when `--seeds` is given (then `--node-id` and `--peer-listen` are
/// required too).
fn cluster_config(a: &ServeArgs) -> Result<Option<ClusterConfig>, String> {
    let Some(seeds) = &a.seeds else {
        return Ok(None);
    };
    let node_id = a
        .node_id
        .ok_or("--seeds needs --node-id N (unique in the cluster, at least 1)")?;
    let peer_listen = a
        .peer_listen
        .ok_or("--seeds needs --peer-listen IP:PORT (where other nodes reach this one)")?;
    let advertise = match &a.advertise {
        Some(x) => {
            crate::cli::common::check_host_port(x, "--advertise")?;
            x.clone()
        }
        None => a.listen.to_string(),
    };
    Ok(Some(ClusterConfig {
        node_id,
        peer_listen,
        seeds: parse_seeds(seeds)?,
        advertise,
        node_failure_timeout_ms: a.node_failure_timeout_ms,
        election_timeout_ms: a.election_timeout_ms,
    }))
}
