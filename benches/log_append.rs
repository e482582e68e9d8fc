//! Log append: 1 KiB and 64 KiB batches with `Never` and `Always` on DMA files, on the
//! in-memory storage (no disk: the log's own CPU cost), and the group-commit factor
//! (appends per fdatasync) with 1, 8 and 64 concurrent appenders.
//!
//! `cargo bench --bench log_append`. Data goes under target/ (a real filesystem).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringmq::storage::{
    BatchMeta, DmaStorage, Durability, FormatTag, Log, LogConfig, MemStorage, Storage,
};

const META: BatchMeta = BatchMeta {
    format: FormatTag::Opaque,
    record_count: 1,
    first_timestamp_ms: 0,
    max_timestamp_ms: 0,
};

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench-data")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Appends `iters` batches with `appenders` concurrent tasks; returns elapsed time and
/// appends per fdatasync.
fn run<S: Storage>(
    make_storage: fn() -> S,
    path: PathBuf,
    durability: Durability,
    batch_bytes: usize,
    appenders: u64,
    iters: u64,
) -> (Duration, f64) {
    ringmq::runtime::block_on(move || {
        Box::pin(async move {
            let cfg = LogConfig {
                durability,
                ..LogConfig::default()
            };
            let log = Rc::new(Log::open(make_storage(), &path, cfg).await.expect("open"));
            let payload = Rc::new(vec![7u8; batch_bytes]);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for a in 0..appenders {
                let (log, payload) = (log.clone(), payload.clone());
                let n = iters / appenders + u64::from(a < iters % appenders);
                tasks.push(glommio::spawn_local(async move {
                    for _ in 0..n {
                        log.append(META, &payload).await.expect("append");
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            log.sync().await.expect("sync");
            let elapsed = start.elapsed();
            let s = log.stats();
            (elapsed, s.appends as f64 / s.fdatasyncs.max(1) as f64)
        })
    })
    .expect("executor")
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("log_append");
    g.sample_size(10);
    for &bytes in &[1024usize, 64 * 1024] {
        g.throughput(Throughput::Bytes(bytes as u64));
        for (name, d) in [("never", Durability::Never), ("always", Durability::Always)] {
            g.bench_with_input(
                BenchmarkId::new(format!("dma_{name}"), bytes),
                &bytes,
                |b, &bytes| {
                    b.iter_custom(|iters| run(|| DmaStorage, dir("append"), d, bytes, 1, iters).0)
                },
            );
        }
        g.bench_with_input(
            BenchmarkId::new("mem_always", bytes),
            &bytes,
            |b, &bytes| {
                b.iter_custom(|iters| {
                    run(
                        MemStorage::new,
                        PathBuf::from("/mem/b"),
                        Durability::Always,
                        bytes,
                        1,
                        iters,
                    )
                    .0
                })
            },
        );
    }
    g.finish();
}

fn group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_commit_1KiB_always");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    for &appenders in &[1u64, 8, 64] {
        g.bench_with_input(
            BenchmarkId::from_parameter(appenders),
            &appenders,
            |b, &appenders| {
                b.iter_custom(|iters| {
                    let (t, factor) = run(
                        || DmaStorage,
                        dir("group"),
                        Durability::Always,
                        1024,
                        appenders,
                        iters.max(appenders),
                    );
                    eprintln!("appenders {appenders}: {factor:.1} appends per fdatasync");
                    t
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, append, group_commit);
criterion_main!(benches);
