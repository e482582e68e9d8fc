//! Storage engine tests: round trips across rolls, crash simulation, corruption, fsync failure,
//! retention, group commit, and a seeded property test of crash recovery.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use ringmq::storage::mem::{Fault, FaultOp, Rng};
use ringmq::storage::{
    batch, BatchMeta, CommitPolicy, DmaStorage, Durability, FormatTag, Log, LogConfig, MemStorage,
    Storage, StorageError,
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
    let _ = std::fs::remove_dir_all(&dir);
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

fn replicated_cfg() -> LogConfig {
    LogConfig {
        commit_policy: CommitPolicy::External,
        ..small_cfg()
    }
}

/// Appends `n` batches of 1 record (700-byte payloads: several segments); returns base offsets.
async fn fill<S: Storage>(log: &Log<S>, n: u64) -> Vec<u64> {
    let mut bases = Vec::new();
    for i in 0..n {
        let info = log
            .append(meta(1, 1_000 + i as i64), &payload(i, 700))
            .await;
        bases.push(info.unwrap().base_offset);
    }
    bases
}

#[test]
fn the_commit_index_gates_readers_and_never_goes_back() {
    run(|| async {
        let log = Log::open(
            MemStorage::new(),
            Path::new("/mem/commit"),
            replicated_cfg(),
        )
        .await
        .unwrap();
        log.set_leader_term(3);
        fill(&log, 10).await;
        assert_eq!(
            (log.log_end(), log.durable_end(), log.end_offset()),
            (10, 10, 0)
        );
        assert!(
            read_all(&log, 0).await.unwrap().is_empty(),
            "nothing committed yet"
        );
        log.advance_commit(4).unwrap();
        let seen = read_all(&log, 0).await.unwrap();
        assert_eq!(seen.len(), 4, "readers see exactly the committed prefix");
        let r = log.read(0, 1 << 20).await.unwrap();
        let h = batch::decode_verified(&r.batches[0]).unwrap();
        assert_eq!(h.leader_term, 3, "batches carry the leader's term");
        assert!(matches!(
            log.advance_commit(11),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        // A waiter resolves when the commit index passes its batch.
        let info = log.append(meta(1, 1), b"w").await.unwrap();
        log.advance_commit(info.next_offset).unwrap();
        log.wait_committed(info).await.unwrap();
        assert_eq!(log.end_offset(), 11);
        // Committed data cannot be truncated.
        assert!(matches!(
            log.truncate_suffix(7).await,
            Err(StorageError::InvalidTruncation(_))
        ));
        assert_eq!(log.log_end(), 11, "a refused truncation changes nothing");
    });
}

#[test]
#[should_panic]
fn a_commit_index_moving_back_is_a_bug_that_stops_the_log() {
    run(|| async {
        let log = Log::open(MemStorage::new(), Path::new("/mem/back"), replicated_cfg())
            .await
            .unwrap();
        fill(&log, 5).await;
        log.advance_commit(5).unwrap();
        let _ = log.advance_commit(4);
    });
}

#[test]
fn truncate_suffix_removes_the_uncommitted_tail_and_appends_continue_there() {
    run(|| async {
        let storage = MemStorage::new();
        let dir = Path::new("/mem/trunc-basic");
        let log = Log::open(storage.clone(), dir, replicated_cfg())
            .await
            .unwrap();
        let bases = fill(&log, 60).await;
        log.advance_commit(20).unwrap();
        assert!(log.segment_count() > 2, "the cut spans segments");
        assert!(matches!(
            log.truncate_suffix(60 + 1).await,
            Err(StorageError::InvalidTruncation(_))
        ));
        log.truncate_suffix(bases[25]).await.unwrap();
        assert_eq!(log.log_end(), 25);
        assert_eq!(log.durable_end(), 25);
        // New appends take the freed offsets; a new leader's term is stamped on them.
        log.set_leader_term(2);
        let info = log.append(meta(1, 5), b"new").await.unwrap();
        assert_eq!(info.base_offset, 25);
        log.advance_commit(26).unwrap();
        let all = read_all(&log, 0).await.unwrap();
        assert_eq!(all.len(), 26);
        assert_eq!(all[25].1, b"new".to_vec());
        drop(log);
        // After a restart the same log is found.
        let reopened = Log::open(storage, dir, small_cfg()).await.unwrap();
        let again = read_all(&reopened, 0).await.unwrap();
        assert_eq!(again, all);
    });
}

#[test]
fn buffered_batches_waiting_for_a_flush_get_truncated_errors() {
    run(|| async {
        let storage = MemStorage::new();
        storage.set_sync_delay(Some(std::time::Duration::from_millis(20)));
        let log = Rc::new(
            Log::open(
                storage.clone(),
                Path::new("/mem/trunc-wait"),
                replicated_cfg(),
            )
            .await
            .unwrap(),
        );
        fill(&log, 3).await;
        // Buffer two more without waiting, then cut them before any flush.
        let a = log.append_buffered(meta(1, 1), b"a").unwrap();
        let b = log.append_buffered(meta(1, 1), b"b").unwrap();
        log.truncate_suffix(a.base_offset).await.unwrap();
        assert_eq!(log.log_end(), 3);
        assert!(matches!(
            log.wait_durable(b).await,
            Err(StorageError::Truncated { .. })
        ));
        assert!(matches!(
            log.wait_committed(b).await,
            Err(StorageError::Truncated { .. })
        ));
    });
}

/// A crash before each mutating step of a truncation (file create/remove, dir sync, truncate,
/// fdatasync) recovers to the whole log or to the cut log, never to anything else.
#[test]
fn truncate_suffix_crash_at_every_step_recovers_to_one_side() {
    let mut sides = [0usize; 2];
    for step in 0..40u64 {
        let side = run(move || async move {
            let storage = MemStorage::new();
            let dir = Path::new("/mem/trunc-crash");
            let log = Log::open(storage.clone(), dir, replicated_cfg())
                .await
                .unwrap();
            let bases = fill(&log, 60).await;
            log.advance_commit(20).unwrap();
            let whole = {
                let view = Log::open(storage.clone(), dir, small_cfg()).await.unwrap();
                read_all(&view, 0).await.unwrap()
            };
            storage.inject(Fault {
                op: FaultOp::Any,
                after: step,
                kind: std::io::ErrorKind::Other,
            });
            let res = log.truncate_suffix(bases[25]).await;
            drop(log);
            storage.clear_faults();
            storage.crash(step);
            let view = Log::open(storage.clone(), dir, small_cfg()).await.unwrap();
            let found = read_all(&view, 0).await.unwrap();
            if found == whole {
                assert!(
                    res.is_err(),
                    "step {step}: a finished truncation must stay done"
                );
                0
            } else {
                assert_eq!(
                    found,
                    whole[..25].to_vec(),
                    "step {step}: a mix of both sides"
                );
                1
            }
        });
        sides[side] += 1;
    }
    eprintln!("crash steps ending whole / cut: {sides:?}");
    assert!(
        sides[0] > 0 && sides[1] > 0,
        "both sides reached: {sides:?}"
    );
}

/// A waiter whose batch was cut learns it even when a new leader's batches reach the same
/// offsets before it looks.
#[test]
fn a_cut_batch_is_never_acknowledged_after_a_re_append_at_its_offsets() {
    run(|| async {
        let log = Log::open(
            MemStorage::new(),
            Path::new("/mem/reappend"),
            replicated_cfg(),
        )
        .await
        .unwrap();
        fill(&log, 3).await;
        let old = log.append_buffered(meta(1, 1), b"old").unwrap();
        log.truncate_suffix(old.base_offset).await.unwrap();
        let new = log.append(meta(1, 1), b"new").await.unwrap();
        assert_eq!(
            (new.base_offset, new.next_offset),
            (old.base_offset, old.next_offset)
        );
        log.advance_commit(new.next_offset).unwrap();
        assert!(matches!(
            log.wait_durable(old).await,
            Err(StorageError::Truncated { .. })
        ));
        assert!(matches!(
            log.wait_committed(old).await,
            Err(StorageError::Truncated { .. })
        ));
        log.wait_committed(new).await.unwrap();
    });
}
