//! The `queue` scenario: a prepared backlog of `--messages` on `--partitions` partitions is
//! consumed by `--consumers` competing consumers of one shared subscription (each fetches up
//! to `--prefetch` per partition and acks every batch), and for comparison by one stream
//! consumer (plain fetches) in the same run. Reports acked msgs/s and the ratio.

use std::time::Instant;

use super::{histogram, LatencyUs, Report};
use crate::client::Client;
use crate::protocol::queue::{QueueFetchOut, Settle};

#[derive(clap::Args, Debug, Clone)]
pub struct QueueBenchArgs {
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    #[arg(long, default_value_t = 400_000)]
    pub messages: u64,
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    #[arg(long, default_value_t = 500)]
    pub prefetch: u32,
    /// For a broker started here.
    #[arg(long, default_value = "always")]
    pub fsync: String,
    #[arg(long, default_value = "./ringmq-bench-data")]
    pub data: std::path::PathBuf,
}

pub fn run_queue(server: Option<&str>, a: QueueBenchArgs) -> Result<Report, String> {
    // `_broker` keeps a broker started here alive until the scenario ends.
    let (_broker, addr, mut c) = super::produce_bench::target(server, &a.data, &a.fsync, None)?;
    let topic = format!("bench-queue-{}", std::process::id());
    c.create_topic(&topic, a.partitions, -1, -1)
        .map_err(|e| e.to_string())?;
    let total = super::consume_bench::prepare_backlog(
        &mut c,
        &topic,
        a.partitions,
        a.messages,
        a.message_bytes,
    )?;
    // Stream consumption of the same backlog, one consumer, for the ratio.
    let t0 = Instant::now();
    let mut streamed = 0u64;
    for p in 0..a.partitions {
        let mut at = 0;
        loop {
            let f = c
                .fetch(&topic, p, at, 1 << 20, 0)
                .map_err(|e| e.to_string())?;
            if f.records.is_empty() {
                break;
            }
            streamed += f.records.len() as u64;
            at = f.next_offset;
        }
    }
    let stream_s = t0.elapsed().as_secs_f64();
    // Shared consumption.
    let t1 = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..a.consumers.max(1) {
        let (addr, topic, a) = (addr.clone(), topic.clone(), a.clone());
        threads.push(std::thread::spawn(
            move || -> Result<(u64, hdrhistogram::Histogram<u64>), String> {
                let mut c = Client::connect(addr.as_str()).map_err(|e| e.to_string())?;
                let mut h = histogram();
                let mut n = 0;
                let mut idle = 0;
                while idle < 3 {
                    let mut any = false;
                    for p in 0..a.partitions {
                        let mut q = QueueFetchOut::new(&topic, "bench", p);
                        q.max_messages = a.prefetch;
                        q.max_unacked = 1 << 20;
                        let ts = Instant::now();
                        let msgs = c.queue_fetch(&q).map_err(|e| e.to_string())?;
                        if msgs.is_empty() {
                            continue;
                        }
                        any = true;
                        let offs: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
                        c.queue_settle(&topic, "bench", p, &offs, Settle::Ack)
                            .map_err(|e| e.to_string())?;
                        let _ = h.record((ts.elapsed().as_micros() as u64).max(1));
                        n += offs.len() as u64;
                    }
                    idle = if any { 0 } else { idle + 1 };
                }
                Ok((n, h))
            },
        ));
    }
    let mut acked = 0;
    let mut h = histogram();
    for t in threads {
        let (n, x) = t.join().map_err(|_| "consumer panicked".to_string())??;
        acked += n;
        h.add(&x).map_err(|e| e.to_string())?;
    }
    let shared_s = t1.elapsed().as_secs_f64();
    let _ = c.delete_topic(&topic);
    let stream_rate = streamed as f64 / stream_s.max(1e-9);
    let shared_rate = acked as f64 / shared_s.max(1e-9);
    Ok(Report {
        scenario: "queue".into(),
        params: vec![
            ("consumers".into(), a.consumers.to_string()),
            ("partitions".into(), a.partitions.to_string()),
            ("messages".into(), total.to_string()),
            ("prefetch".into(), a.prefetch.to_string()),
            (
                "fsync".into(),
                if server.is_some() {
                    "(server's)".into()
                } else {
                    a.fsync.clone()
                },
            ),
        ],
        messages: acked,
        bytes: acked * a.message_bytes as u64,
        seconds: shared_s,
        latency_us: LatencyUs::from_histogram(&h),
        extra: vec![
            ("stream_msgs_per_s".into(), stream_rate),
            (
                "shared_vs_stream".into(),
                shared_rate / stream_rate.max(1e-9),
            ),
        ],
    })
}
