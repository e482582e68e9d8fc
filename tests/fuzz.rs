//! Fuzz loops (seeded, structure-aware mutation) for the frame decoder, the filter parser and log
//! recovery. CI runs a short version; a long run:
//!
//!     RINGMQ_FUZZ_ITERS=10000000 cargo test --release --test fuzz -- --nocapture
//!
//! A failure prints the seed and input; `RINGMQ_FUZZ_SEED=N` replays from that seed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use bytes::Bytes;
use ringmq::filter::{Filter, MapFields};
use ringmq::protocol::{
    self as proto, fb, groups as g, multicast as mc, queue as q, PartitionChoice, RecordIn,
};
use ringmq::storage::mem::Rng;
use ringmq::storage::{batch, BatchMeta, FormatTag, Log, LogConfig, MemStorage, Storage};

fn iters(default: u64) -> u64 {
    std::env::var("RINGMQ_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("RINGMQ_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xF022)
}

fn mutate(r: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + r.below(4) {
        if v.is_empty() {
            v.push(r.next_u64() as u8);
            continue;
        }
        let at = r.below(v.len() as u64) as usize;
        match r.below(7) {
            0 => v[at] ^= 1 << r.below(8),
            1 => v[at] = r.next_u64() as u8,
            2 => v.truncate(at),
            3 => v.insert(at, r.next_u64() as u8),
            4 => {
                let x = [0u8, 0xff, 0x7f, 0x80][r.below(4) as usize];
                for b in v.iter_mut().skip(at).take(4) {
                    *b = x;
                }
            }
            5 => {
                let n = (r.below(8) as usize).min(v.len() - at);
                let chunk: Vec<u8> = v[at..at + n].to_vec();
                let to = r.below(v.len() as u64) as usize;
                for (i, b) in chunk.into_iter().enumerate() {
                    if to + i < v.len() {
                        v[to + i] = b;
                    }
                }
            }
            _ => v.extend((0..r.below(16)).map(|_| r.next_u64() as u8)),
        }
    }
    v
}

fn corpus() -> Vec<Vec<u8>> {
    let recs = vec![
        RecordIn {
            key: Some(b"k".to_vec()),
            value: b"value".to_vec(),
            headers: vec![("h".into(), b"1".to_vec())],
            timestamp_ms: 5,
        },
        RecordIn {
            value: b"x".to_vec(),
            ..Default::default()
        },
    ];
    let batch_bytes = proto::encode_record_batch(&recs);
    let meta = BatchMeta {
        format: FormatTag::RingmqFlatbuffers,
        record_count: 2,
        first_timestamp_ms: 5,
        max_timestamp_ms: 5,
    };
    let stored = Bytes::from(batch::encode(&meta, 3, &batch_bytes));
    let pos = proto::FetchPosition {
        partition: 0,
        log_start: 0,
        log_end: 5,
        next_offset: 5,
    };
    let frames: Vec<Bytes> = vec![
        proto::encode_handshake(1, "c"),
        proto::encode_create_topic(2, "t", 3, -1, 100, 0),
        proto::encode_metadata(3, &["a", "b"]),
        proto::encode_produce(4, "t", PartitionChoice::Key(b"key"), &batch_bytes),
        proto::encode_fetch(
            5,
            &proto::FetchArgsOut {
                topic: "t",
                partition: 1,
                offset: 2,
                max_bytes: 100,
                max_wait_ms: 0,
                filter: Some("a == 1"),
            },
        ),
        proto::encode_fetch_response(6, pos, std::slice::from_ref(&stored)),
        proto::encode_error(7, fb::ErrorCode::UnknownTopic, "no"),
        g::encode_join_group(8, "g", &["t".into()], "", "c", 1000),
        g::encode_commit_offsets(9, "g", "m", 1, &[("t".into(), 0, 5)]),
        mc::encode_multicast_produce(10, &[("a", None), ("b", Some(1))], None, &batch_bytes),
        q::encode_queue_fetch(11, &q::QueueFetchOut::new("t", "s", 0)),
        q::encode_queue_settle(12, "t", "s", 0, &[1, 2], q::Settle::Nack { delay_ms: 5 }),
    ];
    frames.into_iter().map(|f| f[4..].to_vec()).collect()
}

/// Everything a server or client does with a frame after verification.
fn exercise(bytes: &[u8]) {
    let Ok(f) = proto::verify_frame(bytes) else {
        return;
    };
    let _ = f.correlation_id();
    if let Some(p) = f.body_as_produce() {
        let _ = p.topic();
        let _ = proto::verify_record_batch(p.batch().bytes());
    }
    if let Some(x) = f.body_as_fetch_response() {
        if let Some(b) = x.batches() {
            let _ = proto::decode_fetched_records(b.bytes(), 0);
        }
        if let Some(r) = x.records() {
            let _ = proto::decode_filtered_records(r);
        }
    }
    if let Some(x) = f.body_as_fetch() {
        if let Some(src) = x.filter() {
            let _ = Filter::compile(src);
        }
    }
    if let Some(m) = f.body_as_metadata_response() {
        let _ = proto::decode_metadata_response(m);
    }
    if let Some(x) = f.body_as_commit_offsets() {
        let _ = g::decode_offsets(Some(x.offsets()));
    }
    if let Some(x) = f.body_as_multicast_produce() {
        for d in x.destinations() {
            let _ = (d.topic(), d.partition());
        }
    }
    if let Some(x) = f.body_as_queue_settle() {
        let _: Vec<u64> = x.offsets().iter().collect();
    }
    if let Some(e) = f.body_as_error() {
        let _ = e.message();
    }
}

#[test]
fn fuzz_frame_decoder() {
    let corpus = corpus();
    let mut r = Rng::new(seed());
    let n = iters(20_000);
    for i in 0..n {
        let base = &corpus[r.below(corpus.len() as u64) as usize];
        let input = mutate(&mut r, base);
        if catch_unwind(AssertUnwindSafe(|| {
            let _ = proto::frame_len([input.first().copied().unwrap_or(0), 1, 2, 3], 1 << 20);
            exercise(&input);
        }))
        .is_err()
        {
            panic!(
                "frame decoder panicked: seed {} iteration {i} input {input:02x?}",
                seed()
            );
        }
    }
    eprintln!("fuzz_frame_decoder: {n} inputs");
}

#[test]
fn fuzz_filter_parser() {
    let valid = [
        "region == \"eu\" && qty > 100",
        "NOT (a IN (1, 2, 'x')) OR $key STARTS WITH \"u\"",
        "EXISTS b AND c.d-e != -1.5e3",
        "((a < b) || !(c >= 'q'))",
    ];
    let alphabet: Vec<&str> = vec![
        "(", ")", " ", "==", "!=", "<", ">=", "&&", "||", "!", "AND", "or", "NOT", "IN", "EXISTS",
        "STARTS", "WITH", "$key", "a", "b.c", "\"s\"", "'t'", "1", "-2.5", "1e308", "1e999", ",",
        "\"", "\\", "é", "$", "=", "&",
    ];
    let mut r = Rng::new(seed());
    let n = iters(20_000);
    let m = MapFields {
        key: Some(b"k".to_vec()),
        headers: vec![("a".into(), b"1".to_vec()), ("b.c".into(), b"x".to_vec())],
    };
    for i in 0..n {
        let src: String = if r.below(2) == 0 {
            let base = valid[r.below(valid.len() as u64) as usize];
            String::from_utf8_lossy(&mutate(&mut r, base.as_bytes())).into_owned()
        } else {
            (0..r.below(24))
                .map(|_| alphabet[r.below(alphabet.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(if r.below(2) == 0 { " " } else { "" })
        };
        if catch_unwind(AssertUnwindSafe(|| {
            if let Ok(f) = Filter::compile(&src) {
                let _ = f.matches(&m);
            }
        }))
        .is_err()
        {
            panic!(
                "filter parser panicked: seed {} iteration {i} input {src:?}",
                seed()
            );
        }
    }
    eprintln!("fuzz_filter_parser: {n} inputs");
}

/// Log recovery on damaged segment files: never panics; what it recovers is a prefix of what
/// was written (or an error for a damaged sealed segment).
#[test]
fn fuzz_log_recovery() {
    let n = iters(20_000) / 50;
    let s = seed();
    ringmq::runtime::block_on(move || {
        Box::pin(async move {
            let mut r = Rng::new(s);
            for i in 0..n {
                let st = MemStorage::new();
                let dir = PathBuf::from("/mem/fuzz");
                let cfg = LogConfig {
                    segment_bytes_max: 8192 + r.below(16384),
                    index_interval_bytes: 512,
                    ..LogConfig::default()
                };
                let mut written = Vec::new();
                {
                    let log = Log::open(st.clone(), &dir, cfg.clone())
                        .await
                        .expect("open fresh");
                    for k in 0..1 + r.below(30) {
                        let p: Vec<u8> = (0..1 + r.below(900)).map(|j| (k * 7 + j) as u8).collect();
                        let meta = BatchMeta {
                            format: FormatTag::Opaque,
                            record_count: 1,
                            first_timestamp_ms: k as i64,
                            max_timestamp_ms: k as i64,
                        };
                        log.append(meta, &p).await.expect("append");
                        written.push(p);
                    }
                }
                let paths = st.paths();
                for _ in 0..1 + r.below(3) {
                    let path = &paths[r.below(paths.len() as u64) as usize];
                    let bytes = st.contents(path).unwrap_or_default();
                    let damaged = mutate(&mut r, &bytes);
                    st.cut(path, 0);
                    let f = st.open_file(path, true).await.expect("reopen");
                    let mut padded = damaged.clone();
                    padded.resize(padded.len().div_ceil(4096) * 4096, 0);
                    if !padded.is_empty() {
                        ringmq::storage::StorageFile::write_at(&f, 0, &padded)
                            .await
                            .expect("write");
                        st.cut(path, damaged.len());
                    }
                }
                match Log::open(st.clone(), &dir, cfg).await {
                    Err(_) => {} // a damaged sealed segment or index: reported, not a panic
                    Ok(log) => {
                        let mut at = log.start_offset();
                        loop {
                            match log.read(at, 4096).await {
                                Ok(rb) if !rb.batches.is_empty() => {
                                    for b in &rb.batches {
                                        let h =
                                            batch::decode_verified(b).expect("reads are verified");
                                        let o = h.base_offset as usize;
                                        assert!(
                                            o < written.len(),
                                            "seed {s} case {i}: offset {o} was never written"
                                        );
                                        assert_eq!(
                                            batch::payload(b),
                                            &written[o][..],
                                            "seed {s} case {i}: offset {o} differs"
                                        );
                                    }
                                    at = rb.next_offset;
                                }
                                _ => break,
                            }
                        }
                    }
                }
            }
            n
        })
    })
    .map(|n| eprintln!("fuzz_log_recovery: {n} damaged logs"))
    .expect("no panic in log recovery");
}
