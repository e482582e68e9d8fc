//! `ringmq bench`: load scenarios that report throughput and latency percentiles
//! (hdrhistogram), as a table or `--json`.
//!
//! Owns: load generation and reporting. Must not touch: broker internals — the `produce`
//! scenario speaks only through `client::Client` to a broker process (one it starts on a
//! temporary directory when `--server` is not given); the `log` scenario drives one
//! `storage::Log` directly, without a broker.

mod consume_bench;
mod fanout_bench;
mod floor_bench;
mod log_bench;
mod produce_bench;
mod queue_bench;
mod rebalance_bench;

pub use consume_bench::{run_consume, ConsumeBenchArgs};
pub use fanout_bench::{run_fanout, FanoutBenchArgs};
pub use floor_bench::{run_floor, FloorBenchArgs};
pub use log_bench::{run_log, LogBenchArgs};
pub use produce_bench::{run_produce, ProduceBenchArgs};
pub use queue_bench::{run_queue, QueueBenchArgs};
pub use rebalance_bench::{run_rebalance, RebalanceBenchArgs};

use hdrhistogram::Histogram;

/// When send number `i` of a schedule that began at `start` is due (`interval` between sends;
/// `None`: now, back to back).
pub fn intended_at(
    start: std::time::Instant,
    interval: Option<std::time::Duration>,
    i: u64,
) -> std::time::Instant {
    match interval {
        Some(iv) => start + iv.mul_f64(i as f64),
        None => std::time::Instant::now(),
    }
}

/// One step of waiting for a paced send `left` from now, as every paced scenario waits: sleep
/// most of the gap, spin the last 200 µs (thread wake-ups overshoot by ~100 µs on this kind of
/// machine, which would count against the latency measured). Call until the time is reached.
pub fn pace_step(left: std::time::Duration) {
    let spin = std::time::Duration::from_micros(200);
    if left > spin {
        std::thread::sleep(left - spin);
    } else {
        std::hint::spin_loop();
    }
}

/// A new latency histogram in µs (1 µs .. 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One scenario's results.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub params: Vec<(String, String)>,
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub latency_us: LatencyUs,
    pub extra: Vec<(String, f64)>,
}

/// Latency percentiles in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyUs {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl LatencyUs {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

impl Report {
    pub fn print(&self, json: bool) {
        let rate = self.messages as f64 / self.seconds.max(1e-9);
        let mbps = self.bytes as f64 / self.seconds.max(1e-9) / 1e6;
        let l = &self.latency_us;
        if json {
            let params: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        crate::cli::output::json_string(k),
                        crate::cli::output::json_string(v)
                    )
                })
                .collect();
            let extra: Vec<String> = self
                .extra
                .iter()
                .map(|(k, v)| format!("{}:{v:.3}", crate::cli::output::json_string(k)))
                .collect();
            println!(
                "{{\"scenario\":{},\"params\":{{{}}},\"messages\":{},\"seconds\":{:.3},\"msgs_per_s\":{rate:.1},\"mb_per_s\":{mbps:.2},\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{},\"count\":{}}},\"extra\":{{{}}}}}",
                crate::cli::output::json_string(&self.scenario),
                params.join(","),
                self.messages,
                self.seconds,
                l.p50, l.p90, l.p99, l.p999, l.max, l.count,
                extra.join(",")
            );
            return;
        }
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("scenario   {} ({})", self.scenario, params.join(" "));
        println!("messages   {} in {:.2} s", self.messages, self.seconds);
        println!("throughput {rate:.0} msgs/s, {mbps:.1} MB/s");
        println!(
            "latency µs p50 {} | p90 {} | p99 {} | p99.9 {} | max {} ({} samples)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        for (k, v) in &self.extra {
            println!("{k:<10} {v:.2}");
        }
    }
}
