//! Storage engine tests: round trips across rolls, crash simulation, corruption, fsync failure,
//! retention, group commit, and a seeded property test of crash recovery.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use ringmq::storage::mem::{Fault, FaultOp, Rng};
use ringmq::storage::{
    batch, BatchMeta, DmaStorage, Durability, FormatTag, Log, LogConfig, MemStorage, Storage,
    StorageError,
};

fn run<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    ringmq::runtime::block_on(move || Box::pin(f())).expect("executor")
}

fn meta(count: u32, ts: i64) -> BatchMeta {
    BatchMeta {
        format: FormatTag::Opaque,
        record_count: count,
        first_timestamp_ms: ts,
        max_timestamp_ms: ts,
    }
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(31).wrapping_add(j as u64)) as u8)
        .collect()
}

fn small_cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        index_interval_bytes: 512,
        tail_cache_bytes_max: 8 * 1024,
        write_buffer_bytes_max: 4 * 1024,
        ..LogConfig::default()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Reads the whole log from `from` and returns (base offset, payload) per batch.
async fn read_all<S: Storage>(
    log: &Log<S>,
    from: u64,
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let r = log.read(at, 4096).await?;
        if r.batches.is_empty() {
            return Ok(out);
        }
        for b in &r.batches {
            let h = batch::decode_verified(b).expect("reads return verified batches");
            out.push((h.base_offset, batch::payload(b).to_vec()));
        }
        at = r.next_offset;
    }
}

async fn round_trip_on<S: Storage + Clone>(storage: S, dir: PathBuf) {
    let mut expected = Vec::new();
    {
        let log = Log::open(storage.clone(), &dir, small_cfg()).await.unwrap();
        for i in 0..300u64 {
            let p = payload(i, 10 + (i as usize * 37) % 900);
            let info = log
                .append(meta(2, 1_000 + i as i64 * 10), &p)
                .await
                .unwrap();
            assert_eq!(
                info.base_offset,
                i * 2,
                "offsets are dense and assigned by the log"
            );
            expected.push((i * 2, p));
        }
        assert!(log.segment_count() > 5, "segments rolled");
        assert_eq!(read_all(&log, 0).await.unwrap(), expected);
        // A read from the middle of a batch starts at the batch containing the offset.
        let r = log.read(101, 1).await.unwrap();
        let h = batch::decode_verified(&r.batches[0]).unwrap();
        assert_eq!(h.base_offset, 100);
        assert_eq!(
            r.batches.len(),
            1,
            "max_bytes smaller than a batch still returns one"
        );
        log.sync().await.unwrap();
    }
    let log = Log::open(storage, &dir, small_cfg()).await.unwrap();
    assert!(log.recovery_report().truncated.is_none());
    assert_eq!(log.end_offset(), 600);
    assert_eq!(
        read_all(&log, 0).await.unwrap(),
        expected,
        "after reopen, from disk"
    );
    for i in [0u64, 1, 77, 150, 299] {
        let got = read_all(&log, i * 2).await.unwrap();
        assert_eq!(got[0], expected[i as usize]);
    }
    // By timestamp: batch i has timestamp 1000 + 10 i.
    assert_eq!(log.offset_for_timestamp(0).await.unwrap(), 0);
    assert_eq!(log.offset_for_timestamp(1_000 + 1230).await.unwrap(), 246);
    assert_eq!(log.offset_for_timestamp(1_000 + 1235).await.unwrap(), 248);
    assert_eq!(log.offset_for_timestamp(99_999).await.unwrap(), 600);
}

#[test]
fn round_trip_across_rolls_dma() {
    let dir = temp_dir("roundtrip");
    let d = dir.clone();
    run(move || round_trip_on(DmaStorage, d));
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"00000000000000000000.log".to_string()));
    assert!(names.contains(&"00000000000000000000.index".to_string()));
    assert!(names.contains(&"00000000000000000000.timeindex".to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn round_trip_across_rolls_mem() {
    run(|| round_trip_on(MemStorage::new(), PathBuf::from("/mem/rt")));
}

async fn write_batches(log: &Log<MemStorage>, n: u64) -> Vec<(u64, Vec<u8>)> {
    let mut v = Vec::new();
    for i in 0..n {
        let p = payload(i, 300);
        let info = log.append(meta(1, i as i64), &p).await.unwrap();
        v.push((info.base_offset, p));
    }
    v
}

fn seg0(dir: &Path) -> PathBuf {
    dir.join("00000000000000000000.log")
}

#[test]
fn cut_mid_batch_recovers_the_valid_prefix() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/cut");
        let cfg = LogConfig {
            segment_bytes_max: 1 << 20,
            ..small_cfg()
        };
        let written = {
            let log = Log::open(st.clone(), &dir, cfg.clone()).await.unwrap();
            write_batches(&log, 10).await
        };
        // Every batch is in its own block (each append was synced): cut batch 7 in half.
        let len = st.contents(&seg0(&dir)).unwrap().len();
        assert_eq!(len, 10 * 4096);
        st.cut(&seg0(&dir), 7 * 4096 + 100);
        let log = Log::open(st.clone(), &dir, cfg).await.unwrap();
        let t = log
            .recovery_report()
            .truncated
            .clone()
            .expect("reports the cut");
        assert_eq!(t.at_pos, 7 * 4096);
        assert_eq!(log.end_offset(), 7);
        assert_eq!(read_all(&log, 0).await.unwrap(), written[..7].to_vec());
        // The log accepts appends after the cut and they survive another reopen.
        log.append(meta(1, 0), b"after").await.unwrap();
        drop(log);
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        assert!(log.recovery_report().truncated.is_none());
        assert_eq!(log.end_offset(), 8);
    });
}

#[test]
fn flipped_byte_in_active_tail_truncates_there() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/flip");
        let cfg = LogConfig {
            segment_bytes_max: 1 << 20,
            ..small_cfg()
        };
        let written = {
            let log = Log::open(st.clone(), &dir, cfg.clone()).await.unwrap();
            write_batches(&log, 10).await
        };
        assert!(st.flip_bit(&seg0(&dir), 8 * 4096 + 200, 3));
        let log = Log::open(st.clone(), &dir, cfg).await.unwrap();
        let t = log
            .recovery_report()
            .truncated
            .clone()
            .expect("reports the cut");
        assert_eq!(t.at_pos, 8 * 4096);
        assert!(t.reason.contains("CRC"), "{}", t.reason);
        assert_eq!(read_all(&log, 0).await.unwrap(), written[..8].to_vec());
    });
}

#[test]
fn flipped_byte_in_sealed_segment_is_an_error_not_silent_loss() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/sealed");
        {
            let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
            write_batches(&log, 40).await;
            assert!(log.segment_count() >= 3);
        }
        assert!(st.flip_bit(&seg0(&dir), 4096 + 100, 0));
        // With its index intact, open succeeds and the read of the damaged batch fails loudly.
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        match log.read(1, 100).await {
            Err(StorageError::Corrupt { .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let end = log.end_offset();
        assert_eq!(end, 40, "nothing was truncated");
        drop(log);
        // Without its index, open must scan the sealed segment and refuse it.
        st.remove_file(&dir.join("00000000000000000000.index"))
            .await
            .unwrap();
        match Log::open(st.clone(), &dir, small_cfg()).await {
            Err(StorageError::Corrupt { reason, .. }) => assert!(reason.contains("sealed")),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("expected Corrupt, got a log"),
        }
    });
}

#[test]
fn missing_indexes_are_rebuilt() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/reindex");
        let written = {
            let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
            write_batches(&log, 40).await
        };
        for p in st.paths() {
            if p.extension()
                .is_some_and(|e| e == "index" || e == "timeindex")
            {
                st.remove_file(&p).await.unwrap();
            }
        }
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        assert!(!log.recovery_report().rebuilt_indexes.is_empty());
        assert_eq!(read_all(&log, 0).await.unwrap(), written);
    });
}

#[test]
fn fsync_failure_fails_that_append_and_all_later_ones() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/fsyncfail");
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        let acked = write_batches(&log, 3).await;
        st.inject(Fault {
            op: FaultOp::Sync,
            after: 0,
            kind: std::io::ErrorKind::Other,
        });
        assert!(log.append(meta(1, 0), b"x").await.is_err());
        st.clear_faults();
        match log.append(meta(1, 0), b"y").await {
            Err(StorageError::Failed(_)) => {}
            other => panic!("append after an fsync error must fail, got {other:?}"),
        }
        assert!(log.failure().is_some());
        // Reads of acknowledged data still work, and nothing unacknowledged is visible.
        assert_eq!(read_all(&log, 0).await.unwrap(), acked);
        drop(log);
        st.crash(1);
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        let got = read_all(&log, 0).await.unwrap();
        assert_eq!(&got[..3], &acked[..], "acknowledged data survives");
    });
}

#[test]
fn enospc_on_write_fails_the_log() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/enospc");
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        write_batches(&log, 2).await;
        st.inject(Fault {
            op: FaultOp::Write,
            after: 0,
            kind: std::io::ErrorKind::StorageFull,
        });
        let e = log.append(meta(1, 0), b"x").await.unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(log.append(meta(1, 0), b"y").await.is_err());
    });
}

#[test]
fn retention_by_size_and_by_age() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/retention");
        let mut log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        for i in 0..100u64 {
            log.append(meta(1, i as i64 * 1000), &payload(i, 500))
                .await
                .unwrap();
        }
        let segs = log.segment_count();
        assert!(segs >= 5);
        log.set_retention(Some(3 * 16 * 1024), None);
        let deleted = log.enforce_retention(0).await.unwrap();
        assert!(deleted > 0);
        assert!(
            log.size_bytes() >= 3 * 16 * 1024,
            "keeps at least the retention bytes"
        );
        assert!(log.size_bytes() < 5 * 16 * 1024);
        let start = log.start_offset();
        assert!(start > 0);
        match log.read(0, 100).await {
            Err(StorageError::OffsetOutOfRange { start: s, .. }) => assert_eq!(s, start),
            other => panic!("expected out of range, got {other:?}"),
        }
        assert_eq!(
            read_all(&log, start).await.unwrap().len() as u64,
            100 - start
        );
        // By age: all but the active segment are older than now - 1 ms.
        log.set_retention(None, Some(1));
        log.enforce_retention(10_000_000).await.unwrap();
        assert_eq!(log.segment_count(), 1, "never the active segment");
        assert_eq!(log.end_offset(), 100);
        // Deleted files are gone from the directory and reopen agrees.
        drop(log);
        let log = Log::open(st.clone(), &dir, small_cfg()).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.end_offset(), 100);
    });
}

#[test]
fn concurrent_appends_share_fdatasyncs() {
    run(|| async {
        let st = MemStorage::new();
        st.set_sync_delay(Some(std::time::Duration::from_millis(2)));
        let dir = PathBuf::from("/mem/group");
        let log = Rc::new(
            Log::open(st.clone(), &dir, LogConfig::default())
                .await
                .unwrap(),
        );
        let before = st.sync_count();
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                log.append(meta(1, 0), &payload(i, 100)).await.unwrap()
            }));
        }
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.push(t.await.base_offset);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..64).collect::<Vec<_>>());
        let syncs = st.sync_count() - before;
        assert!(syncs <= 4, "64 concurrent appends took {syncs} fdatasyncs");
    });
}

#[test]
fn never_mode_acks_before_write_and_tick_writes() {
    run(|| async {
        let st = MemStorage::new();
        let dir = PathBuf::from("/mem/never");
        let cfg = LogConfig {
            durability: Durability::Never,
            ..small_cfg()
        };
        let log = Log::open(st.clone(), &dir, cfg.clone()).await.unwrap();
        log.append(meta(1, 0), b"hello").await.unwrap();
        assert_eq!(log.end_offset(), 1, "visible at once");
        assert_eq!(
            st.contents(&seg0(&dir)).unwrap().len(),
            0,
            "not yet written"
        );
        log.tick(std::time::Instant::now()).await.unwrap();
        assert_eq!(st.contents(&seg0(&dir)).unwrap().len(), 4096);
        assert_eq!(st.sync_count(), 0, "never mode does not fdatasync");
    });
}

/// Random appends (some concurrent), reads and crash points. After every crash the reopened log
/// is a prefix of what was appended and holds every acknowledged batch. Replays from the seed.
#[test]
fn property_crash_recovery_keeps_every_acknowledged_batch() {
    let seeds: Vec<u64> = match std::env::var("RINGMQ_PROPTEST_SEED") {
        Ok(s) => vec![s.parse().expect("RINGMQ_PROPTEST_SEED is a number")],
        Err(_) => (1..=40).collect(),
    };
    for seed in seeds {
        run(move || crash_case(seed));
    }
}

async fn crash_case(seed: u64) {
    let mut rng = Rng::new(seed);
    let st = MemStorage::new();
    let dir = PathBuf::from("/mem/prop");
    let cfg = LogConfig {
        segment_bytes_max: 8 * 1024 + rng.below(16 * 1024),
        index_interval_bytes: 256,
        tail_cache_bytes_max: 4 * 1024,
        write_buffer_bytes_max: 2 * 1024,
        ..LogConfig::default()
    };
    // written[i] = payload of the batch with base offset i (one record per batch).
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut acked = 0usize;
    for round in 0..4 {
        st.set_sync_delay(Some(std::time::Duration::from_micros(rng.below(300))));
        let log = Rc::new(Log::open(st.clone(), &dir, cfg.clone()).await.unwrap());
        let end = log.end_offset() as usize;
        assert!(
            end >= acked,
            "seed {seed} round {round}: lost acknowledged data ({end} < {acked})"
        );
        assert!(
            end <= written.len(),
            "seed {seed}: log longer than what was written"
        );
        written.truncate(end);
        let got = read_all(&log, 0).await.unwrap();
        assert_eq!(got.len(), end, "seed {seed}");
        for (o, p) in &got {
            assert_eq!(p, &written[*o as usize], "seed {seed}: batch {o} differs");
        }
        acked = end;
        let appends = 1 + rng.below(60) as usize;
        let mut tasks = Vec::new();
        for k in 0..appends {
            let p = payload(rng.next_u64(), 1 + rng.below(700) as usize);
            let log2 = log.clone();
            let p2 = p.clone();
            let t = glommio::spawn_local(async move { log2.append(meta(1, 0), &p2).await });
            if rng.below(3) == 0 || k + 1 == appends {
                // Await this and every earlier task: their acks are now known.
                for t in tasks.drain(..).chain(std::iter::once(t)) {
                    let info: ringmq::storage::AppendInfo = t.await.unwrap();
                    let o = info.base_offset as usize;
                    if written.len() <= o {
                        written.resize(o + 1, Vec::new());
                    }
                    acked = acked.max(o + 1);
                }
            } else {
                tasks.push(t);
            }
            let _ = p;
        }
        // Record payloads by offset by reading back what the log holds before the crash.
        let now = read_all(&log, 0).await.unwrap();
        for (o, p) in now {
            if written.len() <= o as usize {
                written.resize(o as usize + 1, Vec::new());
            }
            written[o as usize] = p;
        }
        drop(log);
        st.crash(rng.next_u64());
    }
}
