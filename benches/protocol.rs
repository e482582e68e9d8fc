//! Frame hot paths: encode a produce, verify a frame (with its nested batch), encode a fetch
//! response of stored batches, decode fetched records, and the key partitioner.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmq::protocol::{self as proto, PartitionChoice, RecordIn};
use ringmq::storage::batch;

fn records(n: usize, bytes: usize) -> Vec<RecordIn> {
    (0..n)
        .map(|_| RecordIn {
            value: vec![1; bytes],
            ..Default::default()
        })
        .collect()
}

fn frames(c: &mut Criterion) {
    let recs = records(1000, 100);
    let batch_bytes = proto::encode_record_batch(&recs);
    let frame = proto::encode_produce(1, "topic", PartitionChoice::Explicit(0), &batch_bytes);
    let body = frame.slice(4..);
    let mut g = c.benchmark_group("protocol");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("encode_record_batch_1000x100B", |b| {
        b.iter(|| proto::encode_record_batch(std::hint::black_box(&recs)))
    });
    g.bench_function("verify_produce_frame_1000x100B", |b| {
        b.iter(|| proto::verify_frame(std::hint::black_box(&body)).is_ok())
    });
    let meta = batch::BatchMeta {
        format: batch::FormatTag::RingmqFlatbuffers,
        record_count: 1000,
        first_timestamp_ms: 1,
        max_timestamp_ms: 1,
    };
    let stored = Bytes::from(batch::encode(&meta, 0, &batch_bytes));
    let pos = proto::FetchPosition {
        partition: 0,
        log_start: 0,
        log_end: 1000,
        next_offset: 1000,
    };
    g.bench_function("encode_fetch_response_1000x100B", |b| {
        b.iter(|| {
            proto::encode_fetch_response(
                1,
                pos,
                std::slice::from_ref(std::hint::black_box(&stored)),
            )
        })
    });
    g.bench_function("decode_fetched_records_1000x100B", |b| {
        b.iter(|| proto::decode_fetched_records(std::hint::black_box(&stored), 0).map(|r| r.len()))
    });
    g.finish();
    c.bench_function("murmur2_partition_16B_key", |b| {
        b.iter(|| {
            proto::partitioner::partition_for_key(std::hint::black_box(b"user-0123456789ab"), 64)
        })
    });
}

criterion_group!(benches, frames);
criterion_main!(benches);
