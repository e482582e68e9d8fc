//! The `consume` scenario: a prepared backlog of `--messages` on `--partitions` partitions read
//! as fast as possible by `--consumers` stream consumers (partitions split between them).
//! Latency columns: one fetch.

use std::time::Instant;

use super::{histogram, LatencyUs, Report};
use crate::client::{produce_ack, Client};
use crate::protocol::{self as proto, PartitionChoice, RecordIn};

#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeBenchArgs {
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    #[arg(long, default_value_t = 2_000_000)]
    pub messages: u64,
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// Bytes asked per fetch.
    #[arg(long, default_value_t = 1 << 20)]
    pub fetch_bytes: u32,
    #[arg(long, default_value = "never")]
    pub fsync: String,
    #[arg(long)]
    pub cores: Option<usize>,
    #[arg(long, default_value = "./ringmq-bench-data")]
    pub data: std::path::PathBuf,
}

/// Produces `messages` (batches of 1000) round-robin over the partitions; returns the count.
pub fn prepare_backlog(
    c: &mut Client,
    topic: &str,
    partitions: u32,
    messages: u64,
    message_bytes: usize,
) -> Result<u64, String> {
    let per_batch = 1000u64;
    let recs: Vec<RecordIn> = (0..per_batch)
        .map(|_| RecordIn {
            value: vec![b'x'; message_bytes],
            ..Default::default()
        })
        .collect();
    let batch = proto::encode_record_batch(&recs);
    let batches = messages.div_ceil(per_batch);
    let mut in_flight = 0;
    for i in 0..batches {
        let p = (i % u64::from(partitions)) as u32;
        c.send(|corr| proto::encode_produce(corr, topic, PartitionChoice::Explicit(p), &batch))
            .map_err(|e| e.to_string())?;
        in_flight += 1;
        if in_flight >= 16 {
            c.flush().map_err(|e| e.to_string())?;
            produce_ack(&c.recv().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            in_flight -= 1;
        }
    }
    c.flush().map_err(|e| e.to_string())?;
    for _ in 0..in_flight {
        produce_ack(&c.recv().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    Ok(batches * per_batch)
}

pub fn run_consume(server: Option<&str>, a: ConsumeBenchArgs) -> Result<Report, String> {
    // `_broker` keeps a broker started here alive until the scenario ends.
    let (_broker, addr, mut c) = super::produce_bench::target(server, &a.data, &a.fsync, a.cores)?;
    let topic = format!("bench-consume-{}", std::process::id());
    c.create_topic(&topic, a.partitions, -1, -1)
        .map_err(|e| e.to_string())?;
    let total = prepare_backlog(&mut c, &topic, a.partitions, a.messages, a.message_bytes)?;
    let start = Instant::now();
    let n = a.consumers.clamp(1, a.partitions as usize);
    let mut threads = Vec::new();
    for k in 0..n {
        let (addr, topic, a) = (addr.clone(), topic.clone(), a.clone());
        threads.push(std::thread::spawn(
            move || -> Result<(u64, hdrhistogram::Histogram<u64>), String> {
                let mut c = Client::connect(addr.as_str()).map_err(|e| e.to_string())?;
                let mut h = histogram();
                let mut got = 0;
                for p in (0..a.partitions).filter(|p| *p as usize % n == k) {
                    let mut at = 0;
                    loop {
                        let t = Instant::now();
                        let f = c
                            .fetch(&topic, p, at, a.fetch_bytes, 0)
                            .map_err(|e| e.to_string())?;
                        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                        if f.records.is_empty() {
                            break;
                        }
                        got += f.records.len() as u64;
                        at = f.next_offset;
                    }
                }
                Ok((got, h))
            },
        ));
    }
    let mut got = 0;
    let mut h = histogram();
    for t in threads {
        let (g, x) = t.join().map_err(|_| "consumer panicked".to_string())??;
        got += g;
        h.add(&x).map_err(|e| e.to_string())?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = c.delete_topic(&topic);
    if got != total {
        return Err(format!("read {got} of {total} messages"));
    }
    Ok(Report {
        scenario: "consume".into(),
        params: vec![
            ("consumers".into(), n.to_string()),
            ("partitions".into(), a.partitions.to_string()),
            ("messages".into(), total.to_string()),
            ("message_bytes".into(), a.message_bytes.to_string()),
        ],
        messages: got,
        bytes: got * a.message_bytes as u64,
        seconds,
        latency_us: LatencyUs::from_histogram(&h),
        extra: vec![],
    })
}
