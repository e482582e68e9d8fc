//! The `rebalance` scenario: how long until partitions are settled on the members after a
//! member joins, and after a member dies (stops heartbeating: includes the session timeout).
//! Members heartbeat every `--heartbeat-ms`; repeated `--runs` times, median reported.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::produce_bench::BenchBroker;
use super::{histogram, LatencyUs, Report};
use crate::client::Client;
use crate::protocol::groups::AssignmentOut;

#[derive(clap::Args, Debug, Clone)]
pub struct RebalanceBenchArgs {
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, default_value_t = 10)]
    pub heartbeat_ms: u64,
    #[arg(long, default_value_t = 1000)]
    pub session_timeout_ms: u32,
    /// For a broker started here: its data directory (removed afterwards).
    #[arg(long, default_value = "./ringmq-bench-data")]
    pub data: std::path::PathBuf,
}

fn owned(a: &AssignmentOut) -> BTreeSet<u32> {
    a.assignments
        .iter()
        .flat_map(|t| t.partitions.clone())
        .collect()
}

struct M {
    c: Client,
    id: String,
    gen: u64,
    parts: BTreeSet<u32>,
    rebalancing: bool,
}

impl M {
    fn beat(&mut self, group: &str) -> Result<(), String> {
        let a = self
            .c
            .heartbeat(group, &self.id, self.gen)
            .map_err(|e| e.to_string())?;
        self.gen = a.generation;
        self.parts = owned(&a);
        self.rebalancing = a.rebalancing;
        Ok(())
    }
}

fn join(addr: &str, group: &str, topic: &str, session: u32) -> Result<M, String> {
    let mut c = Client::connect(addr).map_err(|e| e.to_string())?;
    let a = c
        .join_group(group, &[topic.to_string()], "", session)
        .map_err(|e| e.to_string())?;
    Ok(M {
        c,
        id: a.member_id.clone(),
        gen: a.generation,
        parts: owned(&a),
        rebalancing: a.rebalancing,
    })
}

pub fn run_rebalance(server: Option<&str>, a: RebalanceBenchArgs) -> Result<Report, String> {
    let broker = match server {
        Some(_) => None,
        None => Some(BenchBroker::start(&a.data, "always", None)?),
    };
    let addr = server
        .map(String::from)
        .or(broker.as_ref().map(|b| b.addr.clone()))
        .unwrap_or_default();
    let topic = format!("bench-rebalance-{}", std::process::id());
    let mut admin = Client::connect(addr.as_str())
        .map_err(|e| format!("cannot reach the broker at {addr}: {e}"))?;
    admin
        .create_topic(&topic, a.partitions, -1, -1)
        .map_err(|e| e.to_string())?;
    let beat = Duration::from_millis(a.heartbeat_ms);
    let mut joins = histogram();
    let mut deaths = histogram();
    for run in 0..a.runs {
        let group = format!("g{run}");
        let mut x = join(&addr, &group, &topic, a.session_timeout_ms)?;
        let t0 = Instant::now();
        let mut y = join(&addr, &group, &topic, a.session_timeout_ms)?;
        loop {
            x.beat(&group)?;
            y.beat(&group)?;
            if !x.rebalancing
                && !y.rebalancing
                && !y.parts.is_empty()
                && x.parts.len() + y.parts.len() == a.partitions as usize
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err("join rebalance did not settle in 60 s".into());
            }
            std::thread::sleep(beat);
        }
        let _ = joins.record(t0.elapsed().as_micros() as u64);
        // y dies: it stops heartbeating.
        let t1 = Instant::now();
        loop {
            x.beat(&group)?;
            if x.parts.len() == a.partitions as usize {
                break;
            }
            if t1.elapsed() > Duration::from_secs(60) {
                return Err("death rebalance did not settle in 60 s".into());
            }
            std::thread::sleep(beat);
        }
        let _ = deaths.record(t1.elapsed().as_micros() as u64);
        let _ = x.c.leave_group(&group, &x.id);
    }
    let _ = admin.delete_topic(&topic);
    let j = LatencyUs::from_histogram(&joins);
    let d = LatencyUs::from_histogram(&deaths);
    Ok(Report {
        scenario: "rebalance".into(),
        params: vec![
            ("partitions".into(), a.partitions.to_string()),
            ("runs".into(), a.runs.to_string()),
            ("heartbeat_ms".into(), a.heartbeat_ms.to_string()),
            (
                "session_timeout_ms".into(),
                a.session_timeout_ms.to_string(),
            ),
        ],
        messages: a.runs as u64,
        bytes: 0,
        seconds: 1.0,
        latency_us: j,
        extra: vec![
            ("join_median_ms".into(), j.p50 as f64 / 1000.0),
            ("join_max_ms".into(), j.max as f64 / 1000.0),
            ("death_median_ms".into(), d.p50 as f64 / 1000.0),
            ("death_max_ms".into(), d.max as f64 / 1000.0),
        ],
    })
}
