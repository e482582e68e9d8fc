//! Multicast fan-out on one shard: the same 100-record batch appended to 1, 10 and 100 logs
//! (in-memory storage, `Never`: the fan-out's own CPU cost, no disk).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringmq::protocol::{encode_record_batch, RecordIn};
use ringmq::storage::{BatchMeta, Durability, FormatTag, Log, LogConfig, MemStorage};

fn run(logs: usize, iters: u64) -> Duration {
    ringmq::runtime::block_on(move || {
        Box::pin(async move {
            let st = MemStorage::new();
            let cfg = LogConfig {
                durability: Durability::Never,
                ..LogConfig::default()
            };
            let mut v = Vec::new();
            for i in 0..logs {
                v.push(Rc::new(
                    Log::open(st.clone(), &PathBuf::from(format!("/mem/{i}")), cfg.clone())
                        .await
                        .expect("open"),
                ));
            }
            let recs: Vec<RecordIn> = (0..100)
                .map(|_| RecordIn {
                    value: vec![7; 100],
                    ..Default::default()
                })
                .collect();
            let batch = encode_record_batch(&recs);
            let meta = BatchMeta {
                format: FormatTag::RingmqFlatbuffers,
                record_count: 100,
                first_timestamp_ms: 1,
                max_timestamp_ms: 1,
            };
            let start = Instant::now();
            for _ in 0..iters {
                for l in &v {
                    l.append_buffered(meta, &batch).expect("append");
                }
                for l in &v {
                    l.tick(Instant::now()).await.expect("tick");
                }
            }
            start.elapsed()
        })
    })
    .expect("executor")
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("multicast_fanout_100x100B");
    for n in [1usize, 10, 100] {
        g.throughput(Throughput::Elements(n as u64 * 100));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| run(n, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
