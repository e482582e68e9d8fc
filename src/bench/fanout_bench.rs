//! The `fanout` scenario.
//!
//! `--mode pattern`: one producer sends single-message requests at `--rate` to a topic that a
//! pattern subscriber (`fan.>`) long-polls, optionally with a broker-side filter that rejects
//! `--reject-percent` of the messages; reports publish→subscriber latency (from the intended
//! send time: corrected for coordinated omission) of the delivered messages.
//!
//! `--mode multicast`: one producer multicasts batches to `--destinations` topics as fast as
//! it can; reports destination-messages per second and cross-core copies per request.

use std::time::{Duration, Instant};

use super::{histogram, LatencyUs, Report};
use crate::client::{produce_ack, Client};
use crate::metadata::pattern_matches;
use crate::protocol::{self as proto, PartitionChoice, RecordIn};

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutBenchArgs {
    /// pattern | multicast.
    #[arg(long, default_value = "pattern", value_parser = ["pattern", "multicast"])]
    pub mode: String,
    /// Pattern mode: messages per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Pattern mode: share of messages the subscriber's filter rejects (0 = no filter).
    #[arg(long, default_value_t = 0)]
    pub reject_percent: u32,
    /// Multicast mode: destination topics.
    #[arg(long, default_value_t = 10)]
    pub destinations: usize,
    /// Multicast mode: records per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// For a broker started here.
    #[arg(long, default_value = "never")]
    pub fsync: String,
    #[arg(long, default_value = "./ringmq-bench-data")]
    pub data: std::path::PathBuf,
}

pub fn run_fanout(server: Option<&str>, a: FanoutBenchArgs) -> Result<Report, String> {
    // `_broker` keeps a broker started here alive until the scenario ends.
    let (_broker, addr, mut admin) = super::produce_bench::target(server, &a.data, &a.fsync, None)?;
    if a.mode == "multicast" {
        multicast(&addr, &mut admin, &a)
    } else {
        pattern(&addr, &mut admin, &a)
    }
}

fn pattern(addr: &str, admin: &mut Client, a: &FanoutBenchArgs) -> Result<Report, String> {
    let topic = format!("fan.p{}", std::process::id());
    admin
        .create_topic(&topic, 1, -1, -1)
        .map_err(|e| e.to_string())?;
    let accept = 100u32.saturating_sub(a.reject_percent.min(100));
    let filter = (a.reject_percent > 0).then(|| format!("sel < {accept}"));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let sub_addr = addr.to_string();
    let sub = std::thread::spawn(
        move || -> Result<(u64, hdrhistogram::Histogram<u64>), String> {
            let mut c = Client::connect(sub_addr.as_str()).map_err(|e| e.to_string())?;
            let topics: Vec<String> = c
                .metadata(&[])
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|t| pattern_matches("fan.>", &t.name))
                .map(|t| t.name)
                .collect();
            let t = topics.first().cloned().ok_or("no topic matches fan.>")?;
            let mut h = histogram();
            let mut n = 0;
            let mut at = 0;
            while Instant::now() < deadline + Duration::from_millis(200) {
                let f = c
                    .fetch_filtered(&t, 0, at, 1 << 20, 50, filter.as_deref())
                    .map_err(|e| e.to_string())?;
                let now_ns = start.elapsed().as_nanos() as u64;
                for r in &f.records {
                    let sent = r
                        .headers
                        .iter()
                        .find(|(k, _)| k == "t_ns")
                        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                    if let Some(sent) = sent {
                        let _ = h.record((now_ns.saturating_sub(sent) / 1000).max(1));
                        n += 1;
                    }
                }
                at = f.next_offset.max(at);
            }
            Ok((n, h))
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Client::connect(addr).map_err(|e| e.to_string())?;
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let send_start = Instant::now();
    let mut in_flight = 0usize;
    let mut sent = 0u64;
    let value = vec![b'x'; a.message_bytes];
    loop {
        let intended = send_start + interval.mul_f64(sent as f64);
        if intended >= deadline {
            break;
        }
        while Instant::now() < intended {
            let left = intended.saturating_duration_since(Instant::now());
            if in_flight > 0 && c.wait_readable(left).map_err(|e| e.to_string())? {
                produce_ack(&c.recv().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                in_flight -= 1;
            } else if in_flight == 0 && left > Duration::from_micros(200) {
                std::thread::sleep(left - Duration::from_micros(200));
            }
        }
        while in_flight >= 64 {
            produce_ack(&c.recv().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            in_flight -= 1;
        }
        let t_ns = intended.duration_since(start).as_nanos() as u64;
        let rec = RecordIn {
            value: value.clone(),
            headers: vec![
                ("t_ns".into(), t_ns.to_string().into_bytes()),
                ("sel".into(), (sent % 100).to_string().into_bytes()),
            ],
            ..Default::default()
        };
        let batch = proto::encode_record_batch(std::slice::from_ref(&rec));
        c.send(|corr| proto::encode_produce(corr, &topic, PartitionChoice::Explicit(0), &batch))
            .map_err(|e| e.to_string())?;
        c.flush().map_err(|e| e.to_string())?;
        in_flight += 1;
        sent += 1;
    }
    while in_flight > 0 {
        produce_ack(&c.recv().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        in_flight -= 1;
    }
    let (received, h) = sub
        .join()
        .map_err(|_| "subscriber panicked".to_string())??;
    let _ = admin.delete_topic(&topic);
    Ok(Report {
        scenario: "fanout-pattern".into(),
        params: vec![
            ("rate".into(), a.rate.to_string()),
            ("reject_percent".into(), a.reject_percent.to_string()),
            ("message_bytes".into(), a.message_bytes.to_string()),
        ],
        messages: received,
        bytes: received * a.message_bytes as u64,
        seconds: a.seconds,
        latency_us: LatencyUs::from_histogram(&h),
        extra: vec![
            ("sent".into(), sent as f64),
            ("delivered".into(), received as f64),
        ],
    })
}

fn multicast(addr: &str, admin: &mut Client, a: &FanoutBenchArgs) -> Result<Report, String> {
    let topics: Vec<String> = (0..a.destinations.max(1))
        .map(|i| format!("fan.m{}.{i}", std::process::id()))
        .collect();
    for t in &topics {
        admin
            .create_topic(t, 1, -1, -1)
            .map_err(|e| e.to_string())?;
    }
    let mut c = Client::connect(addr).map_err(|e| e.to_string())?;
    let copies = |c: &mut Client| -> Result<u64, String> {
        Ok(c.stats()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|s| s.multicast_copies)
            .sum())
    };
    let copies0 = copies(&mut c)?;
    let dests: Vec<(&str, Option<u32>)> = topics.iter().map(|t| (t.as_str(), None)).collect();
    let recs: Vec<RecordIn> = (0..a.batch.max(1))
        .map(|_| RecordIn {
            value: vec![b'x'; a.message_bytes],
            ..Default::default()
        })
        .collect();
    let mut h = histogram();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let mut requests = 0u64;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let results = c
            .multicast(&dests, None, &recs)
            .map_err(|e| e.to_string())?;
        if let Some(bad) = results.iter().find(|r| r.outcome.is_err()) {
            return Err(format!(
                "multicast to {} failed: {:?}",
                bad.topic, bad.outcome
            ));
        }
        let _ = h.record((t0.elapsed().as_micros() as u64).max(1));
        requests += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let copies = copies(&mut c)? - copies0;
    for t in &topics {
        let _ = admin.delete_topic(t);
    }
    let delivered = requests * recs.len() as u64 * topics.len() as u64;
    Ok(Report {
        scenario: "fanout-multicast".into(),
        params: vec![
            ("destinations".into(), topics.len().to_string()),
            ("batch".into(), recs.len().to_string()),
            ("message_bytes".into(), a.message_bytes.to_string()),
        ],
        messages: delivered,
        bytes: delivered * a.message_bytes as u64,
        seconds,
        latency_us: LatencyUs::from_histogram(&h),
        extra: vec![
            ("requests".into(), requests as f64),
            (
                "copies_per_request".into(),
                copies as f64 / requests.max(1) as f64,
            ),
        ],
    })
}
