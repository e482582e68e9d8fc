//! Sparse index lookups of a segment with 100,000 entries: offset → file position and
//! timestamp → scan start.

use std::path::PathBuf;
use std::rc::Rc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use ringmq::storage::batch::{BatchHeader, FormatTag};
use ringmq::storage::segment::Segment;
use ringmq::storage::StorageFile;

/// Index lookups never touch the file.
struct NoFile;

impl StorageFile for NoFile {
    async fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("unused"))
    }
    async fn read_at(&self, _: u64, _: usize) -> std::io::Result<Bytes> {
        Err(std::io::Error::other("unused"))
    }
    async fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    async fn truncate(&self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    async fn size(&self) -> std::io::Result<u64> {
        Ok(0)
    }
}

fn index(c: &mut Criterion) {
    let mut seg = Segment::new(0, Rc::new(NoFile), PathBuf::from("/mem/x"));
    for i in 0..100_000u64 {
        let h = BatchHeader {
            crc: 0,
            format: FormatTag::Opaque,
            payload_len: 4048,
            base_offset: i * 10,
            record_count: 10,
            leader_term: 0,
            first_timestamp_ms: i as i64,
            max_timestamp_ms: i as i64,
        };
        seg.record_batch(&h, i * 4096, 4096);
    }
    let mut x = 0u64;
    c.bench_function("index_position_for_100k", |b| {
        b.iter(|| {
            x = (x + 7919) % 1_000_000;
            seg.position_for(std::hint::black_box(x))
        })
    });
    c.bench_function("index_time_lookup_100k", |b| {
        b.iter(|| {
            x = (x + 7919) % 100_000;
            seg.offset_for_time_scan(std::hint::black_box(x as i64))
        })
    });
}

criterion_group!(benches, index);
criterion_main!(benches);
