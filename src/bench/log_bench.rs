//! The `log` scenario: N concurrent appenders on one partition log, no broker, no network.
//! Measures append→durable latency, throughput, and appends per fdatasync (group commit).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{histogram, LatencyUs, Report};
use crate::runtime::config::parse_fsync;
use crate::storage::{BatchMeta, DmaStorage, FormatTag, Log, LogConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct LogBenchArgs {
    /// Directory for the log (removed afterwards; must be a real filesystem).
    #[arg(long, default_value = "./ringmq-bench-log")]
    pub dir: PathBuf,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 1)]
    pub appenders: usize,
    /// Bytes per appended batch.
    #[arg(long, default_value_t = 1024)]
    pub batch_bytes: usize,
    /// always | never | MS.
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
}

/// Runs the scenario on one glommio executor.
pub fn run_log(a: LogBenchArgs) -> Result<Report, String> {
    let durability = parse_fsync(&a.fsync)?;
    if a.appenders == 0 || a.batch_bytes == 0 {
        return Err("--appenders and --batch-bytes must be at least 1".into());
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    let args = a.clone();
    let result = crate::runtime::block_on(move || {
        Box::pin(async move {
            let cfg = LogConfig {
                durability,
                ..LogConfig::default()
            };
            let log = Rc::new(
                Log::open(DmaStorage, &args.dir, cfg)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            let hist = Rc::new(RefCell::new(histogram()));
            let payload = Rc::new(vec![0x5Au8; args.batch_bytes]);
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(args.seconds);
            let mut tasks = Vec::new();
            for _ in 0..args.appenders {
                let (log, hist, payload) = (log.clone(), hist.clone(), payload.clone());
                tasks.push(glommio::spawn_local(async move {
                    let meta = BatchMeta {
                        format: FormatTag::Opaque,
                        record_count: 1,
                        first_timestamp_ms: 0,
                        max_timestamp_ms: 0,
                    };
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        log.append(meta, &payload)
                            .await
                            .map_err(|e| e.to_string())?;
                        let us = t0.elapsed().as_micros() as u64;
                        let _ = hist.borrow_mut().record(us.max(1));
                        n += 1;
                        if n.is_multiple_of(64) {
                            glommio::yield_if_needed().await;
                        }
                    }
                    Ok::<u64, String>(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await?;
            }
            log.sync().await.map_err(|e| e.to_string())?;
            let seconds = start.elapsed().as_secs_f64();
            let stats = log.stats();
            let latency = LatencyUs::from_histogram(&hist.borrow());
            Ok::<_, String>((total, seconds, stats, latency))
        })
    })
    .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&a.dir);
    let (total, seconds, stats, latency) = result?;
    Ok(Report {
        scenario: "log".into(),
        params: vec![
            ("appenders".into(), a.appenders.to_string()),
            ("batch_bytes".into(), a.batch_bytes.to_string()),
            ("fsync".into(), a.fsync.clone()),
        ],
        messages: total,
        bytes: total * a.batch_bytes as u64,
        seconds,
        latency_us: latency,
        extra: vec![
            ("fdatasyncs".into(), stats.fdatasyncs as f64),
            (
                "appends_per_fdatasync".into(),
                if stats.fdatasyncs > 0 {
                    stats.appends as f64 / stats.fdatasyncs as f64
                } else {
                    0.0
                },
            ),
            (
                "disk_mb_per_s".into(),
                stats.bytes_written as f64 / seconds / 1e6,
            ),
        ],
    })
}
