//! A seeded, deterministic simulation of the partition logic and the cluster controller:
//! - a replicated-style partition log over `MemStorage` (commit index moved from outside,
//!   uncommitted suffixes truncated, power lost at random points);
//! - a queue subscription's state machine under a fake clock (dispatch, ack, nack, lease
//!   expiry, consumer loss, dead letters);
//! - the broker's own `Partition` type over `MemStorage` with a manual clock: produce, fetch,
//!   subscribe, dispatch, ack (durable first, in a model state log), nack, extend, consumer
//!   loss, clock jumps, and power loss with recovery;
//! - the cluster controller: 3 Raft replicas (tikv `raft`) of the metadata state machine over
//!   a network that drops, duplicates, delays and reorders, with crashes (a restarted replica
//!   keeps only what it persisted) and isolated nodes; checked: replicas never apply different
//!   commands at the same position, one leader per term, and after the faults stop every
//!   replica converges on the same log and metadata. (Mutation check: a replica that forgets
//!   its vote across a crash gives two leaders in one term at seed 197.) A seed replays
//!   exactly: raft-rs's own unseeded election jitter is fixed, and seeded tick jitter breaks
//!   ties instead;
//! - partition replication (first step): 3 replicas of one partition, raft-rs over
//!   `cluster::replica_log` and a model of each partition log, with the same network faults
//!   and crashes; checked: committed entries agree, commit never goes back, every
//!   acknowledged batch is committed once and in order, replicas converge.
//! - partition replication as the broker runs it: 3 `cluster::replica::Replica`s, each over a
//!   real `Partition` on its own `MemStorage` (power loss tears unsynced writes), with the same
//!   network faults and isolations; checked: no replica ever shows readers another record at
//!   an offset than the longest committed view seen, which never shrinks; every acknowledged
//!   record ends up committed at the offset it was acknowledged with; no record is stored
//!   twice; all replicas converge. (Mutation check: `RINGMQ_SIM_MUTATE_NO_SYNC=1` answers
//!   appends before they are durable; seed 1 fails.)
//!
//! Checked after every step: every committed batch is present once, in order, with its bytes,
//! across crashes and truncations; the commit index and the high watermark never go back;
//! readers never see past it; an acked queue message is never delivered again (also after a
//! restart); at the end every message was acked or dead-lettered exactly once.
//!
//!     cargo test --release --test sim                       # 300 seeds (CI)
//!     RINGMQ_SIM_SEEDS=20000 cargo test --release --test sim -- --nocapture   # long run
//!     RINGMQ_SIM_SEED=N cargo test --release --test sim -- --nocapture       # replay one

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use std::rc::Rc;

use bytes::Bytes;
use ringmq::partition::{Partition, QueueAcks, QueueState, Settle, SubConfig};
use ringmq::protocol::{encode_record_batch, RecordIn, VerifiedBatch};
use ringmq::runtime::clock::ManualClock;
use ringmq::storage::mem::{Fault, FaultOp, Rng};
use ringmq::storage::{
    batch, BatchMeta, CommitPolicy, Durability, FormatTag, Log, LogConfig, MemStorage, StorageError,
};

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("RINGMQ_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("RINGMQ_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    (1..=n).collect()
}

fn run<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    ringmq::runtime::block_on(move || Box::pin(f())).expect("executor")
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        index_interval_bytes: 512,
        tail_cache_bytes_max: 8 * 1024,
        write_buffer_bytes_max: 4 * 1024,
        durability: Durability::Always,
        commit_policy: CommitPolicy::External,
        ..LogConfig::default()
    }
}

fn meta(count: u32) -> BatchMeta {
    BatchMeta {
        format: FormatTag::Opaque,
        record_count: count,
        first_timestamp_ms: 1,
        max_timestamp_ms: 1,
    }
}

/// Every batch readable below the commit index: (base offset, payload).
async fn committed_view(log: &Log<MemStorage>) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let mut out = Vec::new();
    let mut at = log.start_offset();
    loop {
        let r = log.read(at, 1 << 20).await?;
        if r.batches.is_empty() {
            return Ok(out);
        }
        for b in &r.batches {
            let h = batch::decode_verified(b).expect("reads return verified batches");
            assert!(
                h.next_offset() <= log.end_offset(),
                "a read past the commit index"
            );
            out.push((h.base_offset, batch::payload(b).to_vec()));
        }
        at = r.next_offset;
    }
}

/// Power loss and restart: unsynced writes torn or lost; the commit index comes back from the
/// cluster, and nothing below it may be missing.
async fn restart(
    storage: &MemStorage,
    dir: &Path,
    log: Log<MemStorage>,
    rng: &mut Rng,
    commit_end: u64,
) -> Log<MemStorage> {
    drop(log);
    storage.crash(rng.next_u64());
    let log = Log::open(storage.clone(), dir, cfg()).await.unwrap();
    let end = log.log_end();
    assert!(
        end >= commit_end,
        "committed data lost ({end} < {commit_end})"
    );
    log.advance_commit(commit_end).unwrap();
    log
}

/// One seed of the partition-log simulation. Returns a line describing what it did.
async fn log_sim(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let storage = MemStorage::new();
    let dir = Path::new("/sim/p0");
    let mut log = Log::open(storage.clone(), dir, cfg()).await.unwrap();
    // The model: batches the "cluster" committed (base -> payload), and all appended ones.
    let mut committed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut appended: BTreeMap<u64, (u32, Vec<u8>)> = BTreeMap::new();
    let mut commit_end = 0u64;
    let (mut crashes, mut truncations, mut appends) = (0, 0, 0);
    for step in 0..300u32 {
        match rng.below(100) {
            0..=54 => {
                let count = 1 + rng.below(4) as u32;
                let len = 1 + rng.below(900) as usize;
                let payload: Vec<u8> = (0..len).map(|i| (seed as usize + i) as u8).collect();
                let info = if rng.below(2) == 0 {
                    log.append(meta(count), &payload).await
                } else {
                    log.append_buffered(meta(count), &payload)
                };
                let info = info.unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                appended.insert(info.base_offset, (count, payload));
                appends += 1;
            }
            55..=69 => {
                // A majority (here: this node) persisted up to its durable end.
                log.sync().await.unwrap();
                let durable = log.durable_end();
                let bases: Vec<u64> = appended
                    .range(commit_end..)
                    .map(|(b, (c, _))| b + u64::from(*c))
                    .filter(|&e| e <= durable)
                    .collect();
                if let Some(&to) = bases.get(rng.below(bases.len() as u64 + 1) as usize) {
                    log.advance_commit(to).unwrap();
                    for (b, (_, p)) in appended.range(commit_end..to) {
                        committed.insert(*b, p.clone());
                    }
                    commit_end = to;
                }
            }
            70..=84 => {
                // A new leader's log diverges: cut an uncommitted suffix at a batch boundary.
                let cuts: Vec<u64> = appended.range(commit_end..).map(|(b, _)| *b).collect();
                if let Some(&cut) = cuts.get(rng.below(cuts.len() as u64 + 1) as usize) {
                    // Sometimes the power goes out in the middle of the truncation.
                    let dies = rng.below(4) == 0;
                    if dies {
                        storage.inject(Fault {
                            op: FaultOp::Any,
                            after: rng.below(12),
                            kind: std::io::ErrorKind::Other,
                        });
                    }
                    match log.truncate_suffix(cut).await {
                        Ok(()) => {
                            appended.retain(|&b, _| b < cut);
                            assert_eq!(log.log_end(), cut, "seed {seed} step {step}");
                            truncations += 1;
                        }
                        Err(e) if dies => {
                            let _ = e;
                            storage.clear_faults();
                            log = restart(&storage, dir, log, &mut rng, commit_end).await;
                            let end = log.log_end();
                            appended.retain(|&b, (c, _)| b + u64::from(*c) <= end);
                            crashes += 1;
                        }
                        Err(e) => panic!("seed {seed} step {step}: {e}"),
                    }
                    storage.clear_faults();
                }
            }
            _ => {
                log = restart(&storage, dir, log, &mut rng, commit_end).await;
                let end = log.log_end();
                appended.retain(|&b, (c, _)| b + u64::from(*c) <= end);
                crashes += 1;
            }
        }
        let seen = committed_view(&log).await.unwrap();
        let want: Vec<(u64, Vec<u8>)> = committed.iter().map(|(b, p)| (*b, p.clone())).collect();
        assert_eq!(seen, want, "seed {seed} step {step}: committed batches");
        assert_eq!(log.end_offset(), commit_end, "seed {seed} step {step}");
    }
    format!("{appends} appends, {truncations} truncations, {crashes} crashes, commit {commit_end}")
}

#[test]
fn partition_log_simulation() {
    let seeds = seeds();
    let n = seeds.len();
    let last = run(move || async move {
        let mut last = String::new();
        for seed in seeds {
            last = log_sim(seed).await;
        }
        last
    });
    eprintln!("{n} seeds; last: {last}");
}

/// One seed of the queue-subscription simulation.
fn queue_sim(seed: u64) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let max_deliveries = rng.below(4) as u32; // 0 = never dead-letter
    let cfg = SubConfig {
        key_shared: rng.below(2) == 0,
        ack_timeout_ms: 100 + rng.below(400),
        max_deliveries,
        dead_letter_topic: "t.dlq".into(),
        max_unacked: 64,
    };
    let mut q = QueueState::new(cfg, 0);
    let mut now = 0u64;
    let total = 40 + rng.below(60);
    let mut read = 0u64;
    let mut leased: BTreeMap<u64, u64> = BTreeMap::new(); // offset -> consumer
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut dead: BTreeSet<u64> = BTreeSet::new();
    for step in 0..2_000u32 {
        now += rng.below(50);
        q.expire(now);
        match rng.below(10) {
            0..=1 if read < total => {
                let (from, room) = q.read_window();
                assert_eq!(from, read, "seed {seed}: reads continue where they stopped");
                for _ in 0..room.min((total - read) as usize).min(8) {
                    let key = Some(vec![(read % 5) as u8]);
                    q.add_read(read, key, now);
                    read += 1;
                }
            }
            2..=4 => {
                let consumer = 1 + rng.below(3);
                let d = q.dispatch(consumer, 1 + rng.below(5) as usize, now);
                for (o, _) in d.deliver {
                    assert!(
                        !acked.contains(&o),
                        "seed {seed} step {step}: acked offset {o} delivered again"
                    );
                    leased.insert(o, consumer);
                }
                for (o, _, _) in d.dead {
                    // The dead-letter append succeeds, then the source acks it.
                    assert!(dead.insert(o), "seed {seed}: {o} dead-lettered twice");
                    assert_eq!(q.apply_ack(&[o]), 1);
                }
            }
            5..=6 => {
                let picks: Vec<u64> = leased
                    .keys()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                let ackable = q.ackable(&picks);
                q.apply_ack(&ackable);
                for o in ackable {
                    leased.remove(&o);
                    assert!(acked.insert(o), "seed {seed}: {o} acked twice");
                }
            }
            7 => {
                let picks: Vec<u64> = leased
                    .keys()
                    .copied()
                    .filter(|_| rng.below(3) == 0)
                    .collect();
                q.nack(&picks, rng.below(100), now);
            }
            8 => {
                let consumer = 1 + rng.below(3);
                q.release_consumer(consumer, now);
            }
            _ => {
                let picks: Vec<u64> = leased.keys().copied().collect();
                q.extend(&picks, rng.below(300), now);
            }
        }
        assert!(
            q.in_flight() + q.pending() <= 64 + 8,
            "seed {seed}: ack state bounded"
        );
    }
    // Drain: one patient consumer acks everything that comes.
    for _ in 0..100_000 {
        if acked.len() + dead.len() == total as usize {
            break;
        }
        now += 1_000;
        q.expire(now);
        let (from, room) = q.read_window();
        for o in from..(from + room as u64).min(total) {
            q.add_read(o, Some(vec![(o % 5) as u8]), now);
        }
        let d = q.dispatch(9, 64, now);
        for (o, _, _) in d.dead {
            assert!(dead.insert(o), "seed {seed}: {o} dead-lettered twice");
            q.apply_ack(&[o]);
        }
        let offsets: Vec<u64> = d.deliver.iter().map(|(o, _)| *o).collect();
        for &o in &offsets {
            assert!(
                !acked.contains(&o),
                "seed {seed}: acked offset {o} delivered again"
            );
        }
        q.apply_ack(&offsets);
        acked.extend(offsets);
    }
    assert!(
        acked.is_disjoint(&dead),
        "seed {seed}: acked and dead-lettered"
    );
    assert_eq!(
        acked.len() + dead.len(),
        total as usize,
        "seed {seed}: every message settled once"
    );
    (acked.len() as u64, dead.len() as u64)
}

#[test]
fn queue_subscription_simulation() {
    let (mut acked, mut dead) = (0, 0);
    let seeds = seeds();
    for &seed in &seeds {
        let (a, d) = queue_sim(seed);
        acked += a;
        dead += d;
    }
    eprintln!("{} seeds: {acked} acked, {dead} dead-lettered", seeds.len());
}

fn partition_cfg() -> LogConfig {
    LogConfig {
        commit_policy: CommitPolicy::FollowDurability,
        ..cfg()
    }
}

/// A verified batch whose record values are the ids `first..first + count` (8 bytes each).
fn id_batch(first: u64, count: u64) -> VerifiedBatch {
    let records: Vec<RecordIn> = (first..first + count)
        .map(|id| RecordIn {
            key: Some(vec![(id % 4) as u8]),
            value: id.to_le_bytes().to_vec(),
            headers: Vec::new(),
            timestamp_ms: 0,
        })
        .collect();
    VerifiedBatch::verify(Bytes::from(encode_record_batch(&records))).expect("valid batch")
}

/// Every record id readable through `fetch` (committed only), in offset order: (offset, id);
/// replication control records are skipped.
async fn fetched_ids(p: &Partition<MemStorage>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = p.log().start_offset();
    loop {
        let r = p.fetch(at, 1 << 20).await.expect("fetch");
        if r.batches.is_empty() {
            return out;
        }
        for b in &r.batches {
            let h = batch::decode_verified(b).expect("verified batch");
            if h.format == FormatTag::Control {
                continue; // a replication control record: no message
            }
            let rb = flatbuffers::root::<ringmq::protocol::fb::RecordBatch>(batch::payload(b))
                .expect("stored flatbuffer");
            for (i, rec) in rb.records().iter().enumerate() {
                let v = rec.value().expect("value").bytes();
                let id = u64::from_le_bytes(v.try_into().expect("8-byte id"));
                out.push((h.base_offset + i as u64, id));
            }
        }
        at = r.next_offset;
    }
}

/// The model's durable ack state as the state log would replay it: acks, and the acks that
/// follow a dead letter's append.
fn durable_acks(acked: &BTreeSet<u64>, dead: &BTreeSet<u64>) -> QueueAcks {
    QueueAcks {
        floor: 0,
        acked: acked.union(dead).copied().collect(),
    }
}

/// One seed of the `Partition` simulation. Returns what it did.
async fn partition_sim(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let storage = MemStorage::new();
    let dir = Path::new("/sim/t-0");
    let clock = Rc::new(ManualClock::new(1_000_000));
    let sub_cfg = SubConfig {
        key_shared: rng.below(2) == 0,
        ack_timeout_ms: 100 + rng.below(400),
        max_deliveries: rng.below(4) as u32,
        dead_letter_topic: "t.dlq".into(),
        max_unacked: 32,
    };
    let open = |storage: MemStorage, clock: Rc<ManualClock>| async move {
        Partition::open(storage, dir, partition_cfg(), "t", 0, clock)
            .await
            .expect("open")
    };
    let mut p = open(storage.clone(), clock.clone()).await;
    p.subscribe("s", sub_cfg.clone(), false).unwrap();
    let mut next_id = 0u64;
    let mut acknowledged: BTreeSet<u64> = BTreeSet::new(); // record ids
    let mut acked: BTreeSet<u64> = BTreeSet::new(); // offsets, durable in the "state log"
    let mut dead: BTreeSet<u64> = BTreeSet::new();
    let mut leased: BTreeMap<u64, u64> = BTreeMap::new(); // offset -> consumer
    let mut high_watermark = 0u64;
    let mut crashes = 0;
    for step in 0..400u32 {
        clock.advance(rng.below(60) as i64);
        match rng.below(100) {
            0..=29 => {
                // A producer sends 1..3 batches back to back, then waits for their acks.
                let mut waiting = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    let count = 1 + rng.below(4);
                    let a = p.produce(&id_batch(next_id, count)).await.unwrap();
                    waiting.push((next_id, count, a));
                    next_id += count;
                }
                for (first, count, a) in waiting {
                    p.acknowledged(&a).await.unwrap();
                    acknowledged.extend(first..first + count);
                }
            }
            30..=54 => {
                let consumer = 1 + rng.below(3);
                let credit = 1 + rng.below(6) as usize;
                p.refill("s", credit).await.unwrap();
                let d = p.dispatch("s", consumer, credit).expect("subscribed");
                for (o, _) in d.dispatch.deliver {
                    assert!(
                        !acked.contains(&o) && !dead.contains(&o),
                        "seed {seed} step {step}: settled offset {o} delivered again"
                    );
                    leased.insert(o, consumer);
                }
                for (o, _, _) in d.dispatch.dead {
                    // Appended to the dead-letter topic, then acked durably, then applied.
                    assert!(dead.insert(o), "seed {seed}: {o} dead-lettered twice");
                    assert!(!acked.contains(&o), "seed {seed}: {o} acked and dead");
                    p.apply_ack("s", &[o]);
                    leased.remove(&o);
                }
            }
            55..=69 => {
                let picks: Vec<u64> = leased
                    .keys()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                let ackable = p.ackable("s", &picks).unwrap();
                // Durable first (the model state log), then applied.
                for &o in &ackable {
                    assert!(acked.insert(o), "seed {seed} step {step}: {o} acked twice");
                    assert!(!dead.contains(&o), "seed {seed}: {o} dead and acked");
                }
                p.apply_ack("s", &ackable);
                for o in ackable {
                    leased.remove(&o);
                }
            }
            70..=77 => {
                let picks: Vec<u64> = leased
                    .keys()
                    .copied()
                    .filter(|_| rng.below(3) == 0)
                    .collect();
                p.settle(
                    "s",
                    Settle::Nack {
                        delay_ms: rng.below(100),
                    },
                    &picks,
                );
            }
            78..=83 => {
                let picks: Vec<u64> = leased.keys().copied().collect();
                p.settle("s", Settle::Extend { ms: rng.below(300) }, &picks);
            }
            84..=89 => {
                p.release_consumer(1 + rng.below(3));
            }
            90..=93 => {
                clock.advance(rng.below(2_000) as i64);
                p.expire_leases();
            }
            _ => {
                // Power loss: unsynced bytes torn or lost; acks come back from the state log.
                drop(p);
                storage.crash(rng.next_u64());
                p = open(storage.clone(), clock.clone()).await;
                p.restore_subscriptions([("s".to_string(), durable_acks(&acked, &dead))]);
                p.subscribe("s", sub_cfg.clone(), false).unwrap();
                leased.clear();
                crashes += 1;
                // Ids produced but never acknowledged may be gone; new ones continue after.
            }
        }
        let seen = fetched_ids(&p).await;
        let ids: Vec<u64> = seen.iter().map(|x| x.1).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "seed {seed} step {step}: records out of order or duplicated: {ids:?}"
        );
        let present: BTreeSet<u64> = ids.iter().copied().collect();
        assert!(
            acknowledged.is_subset(&present),
            "seed {seed} step {step}: acknowledged records missing: {:?}",
            acknowledged.difference(&present).collect::<Vec<_>>()
        );
        let hw = p.log().end_offset();
        assert!(
            hw >= high_watermark,
            "seed {seed} step {step}: high watermark went back"
        );
        high_watermark = hw;
    }
    // Drain: one patient consumer takes and acks everything left.
    let end = p.log().end_offset();
    for _ in 0..10_000 {
        if (0..end).all(|o| acked.contains(&o) || dead.contains(&o)) {
            break;
        }
        clock.advance(1_000);
        p.refill("s", 64).await.unwrap();
        let d = p.dispatch("s", 9, 64).expect("subscribed");
        for (o, _, _) in d.dispatch.dead {
            assert!(dead.insert(o), "seed {seed}: {o} dead-lettered twice");
            p.apply_ack("s", &[o]);
        }
        let offsets: Vec<u64> = d.dispatch.deliver.iter().map(|x| x.0).collect();
        for &o in &offsets {
            assert!(
                !acked.contains(&o) && !dead.contains(&o),
                "seed {seed}: settled offset {o} delivered again"
            );
            acked.insert(o);
        }
        p.apply_ack("s", &offsets);
    }
    let settled = (0..end)
        .filter(|o| acked.contains(o) || dead.contains(o))
        .count() as u64;
    assert_eq!(settled, end, "seed {seed}: every message settled once");
    format!(
        "{} records, {} acked, {} dead-lettered, {crashes} crashes",
        end,
        acked.len(),
        dead.len()
    )
}

#[test]
fn partition_simulation() {
    let seeds = seeds();
    let n = seeds.len();
    let last = run(move || async move {
        let mut last = String::new();
        for seed in seeds {
            last = partition_sim(seed).await;
        }
        last
    });
    eprintln!("{n} seeds; last: {last}");
}

// ---- the controller: 3 Raft replicas of the cluster metadata over a faulty network --------

use ringmq::cluster::controller::{ControllerNode, ElectionTicks};
use ringmq::cluster::meta::MetaCommand;

/// A message in flight: (delivery step, to, message).
type InFlight = (u32, u64, raft::eraftpb::Message);

/// Runs `sim` for every seed (the first twice: it must replay exactly) and prints the last
/// seed's summary.
fn run_seeds(sim: fn(u64) -> String) {
    let seeds = seeds();
    let first = seeds[0];
    assert_eq!(
        sim(first),
        sim(first),
        "seed {first} does not replay exactly"
    );
    let n = seeds.len();
    let mut last = String::new();
    for seed in seeds {
        last = sim(seed);
    }
    eprintln!("{n} seeds; last: {last}");
}

/// A node (1..=3) cut off from the others until a step.
struct Isolation(Option<(u64, u32)>);

impl Isolation {
    /// Ends an isolation that is over (or every one once faults stop) and, while faults run,
    /// starts one with chance 1/`one_in`, lasting 10 + up to `max_extra` steps. Returns whether
    /// one started.
    fn step(&mut self, rng: &mut Rng, at: (u32, bool), one_in: u64, max_extra: u64) -> bool {
        let (step, faults) = at;
        if self.0.is_some_and(|(_, until)| step >= until || !faults) {
            self.0 = None;
        }
        if faults && self.0.is_none() && rng.below(one_in) == 0 {
            self.0 = Some((1 + rng.below(3), step + 10 + rng.below(max_extra) as u32));
            return true;
        }
        false
    }

    /// Whether a message between `from` and `to` is cut.
    fn cuts(&self, from: u64, to: u64) -> bool {
        self.0.is_some_and(|(n, _)| n == from || n == to)
    }
}

/// The messages due at `step`, as (to, message) in a seeded random order (the rest stay in
/// flight).
fn take_due(
    net: &mut Vec<InFlight>,
    rng: &mut Rng,
    step: u32,
) -> Vec<(u64, raft::eraftpb::Message)> {
    let (mut due, later): (Vec<InFlight>, Vec<InFlight>) = net.drain(..).partition(|m| m.0 <= step);
    *net = later;
    let mut out = Vec::with_capacity(due.len());
    while !due.is_empty() {
        let k = rng.below(due.len() as u64) as usize;
        let (_, to, msg) = due.swap_remove(k);
        out.push((to, msg));
    }
    out
}

/// Puts a node's outgoing messages on the network: while faults run, each is dropped with
/// chance 1/10, delayed up to 3 steps and duplicated with chance 1/20; messages to or from
/// an isolated node are dropped. Returns how many were dropped.
fn send_faulty(
    net: &mut Vec<InFlight>,
    rng: &mut Rng,
    out: Vec<raft::eraftpb::Message>,
    at: (u32, bool),
    isolated: &Isolation,
) -> u32 {
    let (step, faults) = at;
    let mut drops = 0;
    for m in out {
        if (faults && rng.below(10) == 0) || isolated.cuts(m.from, m.to) {
            drops += 1;
            continue;
        }
        let delay = if faults { rng.below(4) as u32 } else { 0 };
        let copies = if faults && rng.below(20) == 0 { 2 } else { 1 };
        for _ in 0..copies {
            net.push((step + 1 + delay, m.to, m.clone()));
        }
    }
    drops
}

/// Checks that every two replicas applied the same commands at the same indexes as far as both
/// got (state-machine safety).
fn check_applied_prefixes(logs: &BTreeMap<u64, Vec<String>>, seed: u64, step: u32) {
    let all: Vec<&Vec<String>> = logs.values().collect();
    for a in &all {
        for b in &all {
            let n = a.len().min(b.len());
            assert_eq!(
                a[..n],
                b[..n],
                "seed {seed} step {step}: replicas applied different commands"
            );
        }
    }
}

fn describe(a: &ringmq::cluster::controller::Applied) -> String {
    format!("{}:{:?}:{:?}", a.0, a.1, a.2)
}

/// One seed: ticks, proposals at whoever leads, message drops / duplicates / delays /
/// reordering, crashes and restarts (a restarted replica keeps only what it persisted); then
/// the faults stop and every replica must converge.
type SimController = ControllerNode<raft::storage::MemStorage>;

/// A fixed election timeout: raft-rs draws the randomized one from an unseeded generator,
/// which would make a seed unreplayable. Ties are broken by seeded tick jitter instead.
const SIM_ELECTION: ElectionTicks = ElectionTicks { min: 10, max: 11 };

fn controller_sim(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let voters = [1u64, 2, 3];
    let mut stores: BTreeMap<u64, raft::storage::MemStorage> = BTreeMap::new();
    let mut nodes: Vec<Option<SimController>> = Vec::new();
    for &id in &voters {
        let s = raft::storage::MemStorage::new();
        nodes.push(Some(
            ControllerNode::open(id, &voters, s.clone(), SIM_ELECTION).expect("open"),
        ));
        stores.insert(id, s);
    }
    // Every replica's applied log, as seen across its restarts (a restart re-applies from the
    // start, so the log is replaced by the replayed one).
    let mut logs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut net: Vec<InFlight> = Vec::new();
    let mut leaders_by_term: BTreeMap<u64, u64> = BTreeMap::new();
    let mut proposed = 0u32;
    let (mut crashes, mut drops, mut partitions) = (0, 0, 0);
    let mut isolated = Isolation(None);
    let steps = 1_500u32;
    for step in 0..steps {
        let faults = step < steps - 500;
        if isolated.step(&mut rng, (step, faults), 100, 60) {
            partitions += 1;
        }
        // Crash or restart.
        if faults && rng.below(40) == 0 {
            // Often the leader: elections and leader changes are where safety is at stake.
            let leader = nodes
                .iter()
                .position(|n| n.as_ref().is_some_and(|n| n.is_leader()));
            let i = match leader {
                Some(l) if rng.below(2) == 0 => l,
                _ => rng.below(3) as usize,
            };
            if nodes[i].is_some() && nodes.iter().filter(|n| n.is_none()).count() < 1 {
                nodes[i] = None;
                crashes += 1;
            }
        }
        for i in 0..3 {
            if nodes[i].is_none() && (!faults || rng.below(15) == 0) {
                let id = voters[i];
                nodes[i] = Some(
                    ControllerNode::open(id, &voters, stores[&id].clone(), SIM_ELECTION)
                        .expect("reopen"),
                );
            }
        }
        // Time passes for everyone alive; clocks drift (a tick is sometimes late).
        for n in nodes.iter_mut().flatten() {
            if rng.below(10) != 0 {
                n.tick();
            }
        }
        // A client proposes at a random replica; only a leader takes it.
        if step < steps - 100 && rng.below(4) == 0 {
            let i = rng.below(3) as usize;
            if let Some(n) = nodes[i].as_mut() {
                let cmd = match rng.below(3) {
                    0 => MetaCommand::RegisterNode {
                        id: 1 + rng.below(5) as u32,
                        client_addr: format!("127.0.0.1:{}", 9400 + rng.below(5)),
                        peer_addr: format!("127.0.0.1:{}", 9500 + rng.below(5)),
                    },
                    1 => MetaCommand::CreateTopic {
                        name: format!("t{}", rng.below(20)),
                        partitions: 1 + rng.below(8) as u32,
                        replicas: 1 + rng.below(3) as u32,
                        retention_bytes: -1,
                        retention_ms: -1,
                        nodes: vec![],
                    },
                    _ => MetaCommand::DeleteTopic {
                        name: format!("t{}", rng.below(20)),
                    },
                };
                if n.propose(&cmd).is_ok() {
                    proposed += 1;
                }
            }
        }
        // Deliver what is due (in random order among those due).
        for (to, msg) in take_due(&mut net, &mut rng, step) {
            if let Some(n) = nodes[(to - 1) as usize].as_mut() {
                let _ = n.step(msg);
            }
        }
        // Each live replica handles its Ready; its messages enter the network.
        for n in nodes.iter_mut().flatten() {
            let out = n.drive().expect("in-memory storage does not fail");
            drops += send_faulty(&mut net, &mut rng, out, (step, faults), &isolated);
            if n.is_leader() {
                let prev = leaders_by_term.insert(n.term(), n.id());
                assert!(
                    prev.is_none() || prev == Some(n.id()),
                    "seed {seed} step {step}: two leaders in term {}",
                    n.term()
                );
            }
            logs.insert(n.id(), n.applied().iter().map(describe).collect());
        }
        check_applied_prefixes(&logs, seed, step);
    }
    // Faults stopped 500 steps ago and proposals 100 steps ago: everyone is up and has applied
    // the same log.
    let finals: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            n.as_ref()
                .expect("all up")
                .applied()
                .iter()
                .map(describe)
                .collect()
        })
        .collect();
    assert!(
        finals.iter().all(|f| f == &finals[0]),
        "seed {seed}: replicas did not converge: {:?}",
        finals.iter().map(|f| f.len()).collect::<Vec<_>>()
    );
    let metas: Vec<_> = nodes
        .iter()
        .map(|n| n.as_ref().expect("up").meta().clone())
        .collect();
    assert!(
        metas.iter().all(|m| m == &metas[0]),
        "seed {seed}: metadata differs"
    );
    assert!(
        nodes.iter().flatten().any(|n| n.is_leader()),
        "seed {seed}: no leader after the faults stopped"
    );
    format!(
        "{proposed} proposals, {} applied, {crashes} crashes, {partitions} partitions, {drops} drops, {} terms",
        finals[0].len(),
        leaders_by_term.len()
    )
}

#[test]
fn controller_simulation() {
    run_seeds(controller_sim);
}

// ---- partition replication (issue 14, first step) ------------------------------------------
//
// Three replicas of one partition: real raft-rs over `cluster::replica_log::ReplicaStorage`,
// each over a model of its partition log (one stored batch per Raft entry, an empty entry as
// one control record). A replica's durable state is its log and HardState, written before any
// message that depends on them is sent; a crash keeps exactly that, and a restart rebuilds the
// index from the log. Network faults as in the controller simulation. Checked after every
// step: replicas agree on every committed entry (index, term, offset, bytes); a replica's
// commit index never goes back; every acknowledged batch is in the committed log once, in the
// order acknowledged. After the faults stop, all replicas converge. (Mutation check: a replica
// that loses, in a crash, an entry it had acknowledged as persisted makes raft-rs panic with
// "to_commit out of range" within 300 seeds.)

use ringmq::cluster::replica_log::{EntryMeta, ReplicaIndex, ReplicaStorage};

/// One stored batch: (raft index, term, first offset, bytes; empty = a control record).
type SimBatch = (u64, u64, u64, Bytes);

/// What survives a crash.
#[derive(Clone, Default)]
struct ReplicaDurable {
    log: Vec<SimBatch>,
    hard_state: raft::eraftpb::HardState,
}

struct SimReplica {
    raw: raft::RawNode<ReplicaStorage>,
    store: ReplicaStorage,
}

fn replica_open(id: u64, d: &ReplicaDurable, cache_bytes: usize) -> SimReplica {
    let mut index = ReplicaIndex::default();
    for b in &d.log {
        let m = EntryMeta {
            term: b.1,
            base_offset: b.2,
            records: 1,
        };
        index.push(b.0, m).expect("the durable log is consistent");
    }
    let applied = d.hard_state.commit;
    let cs = raft::eraftpb::ConfState::from((vec![1, 2, 3], vec![]));
    let store = ReplicaStorage::new(index, d.hard_state.clone(), cs, applied)
        .with_cache_budget(cache_bytes);
    // Entries above the applied index are read synchronously by raft-rs: preload them.
    store.preload(
        d.log
            .iter()
            .filter(|b| b.0 > applied)
            .map(sim_entry)
            .collect(),
    );
    let cfg = raft::Config {
        id,
        election_tick: 10,
        min_election_tick: 10,
        max_election_tick: 11,
        heartbeat_tick: 2,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 4096,
        max_inflight_msgs: 32,
        applied,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = raft::RawNode::new(&cfg, store.clone(), &logger).expect("raft node");
    SimReplica { raw, store }
}

fn sim_entry(b: &SimBatch) -> raft::eraftpb::Entry {
    raft::eraftpb::Entry {
        index: b.0,
        term: b.1,
        data: b.3.clone(),
        ..Default::default()
    }
}

/// Appends raft entries to the durable log, cutting a conflicting suffix at its offset first
/// (as `Log::truncate_suffix` does), then tells the storage where they went.
fn replica_persist(r: &SimReplica, d: &mut ReplicaDurable, entries: &[raft::eraftpb::Entry]) {
    let Some(first) = entries.first() else {
        return;
    };
    if let Some(cut) = r.store.conflict_offset(first.index) {
        d.log.retain(|b| b.2 < cut);
    }
    let mut metas = Vec::new();
    for e in entries {
        let base = d.log.last().map_or(0, |b| b.2 + 1);
        d.log.push((e.index, e.term, base, e.data.clone()));
        metas.push(EntryMeta {
            term: e.term,
            base_offset: base,
            records: 1,
        });
    }
    r.store.append(entries, &metas).expect("append");
}

/// One replica's Ready loop: persist before send; misses read back from the log.
fn replica_drive(r: &mut SimReplica, d: &mut ReplicaDurable) -> Vec<raft::eraftpb::Message> {
    let mut out = Vec::new();
    while r.raw.has_ready() {
        let mut rd = r.raw.ready();
        out.extend(rd.take_messages());
        let committed = rd.take_committed_entries();
        replica_persist(r, d, rd.entries());
        if let Some(hs) = rd.hs() {
            d.hard_state = hs.clone();
            r.store.set_hard_state(hs);
        }
        out.extend(rd.take_persisted_messages());
        let mut light = r.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            d.hard_state.commit = c;
            r.store.set_hard_state(&d.hard_state);
        }
        out.extend(light.take_messages());
        let more = light.take_committed_entries();
        if let Some(last) = committed.last().or(more.last()) {
            r.store
                .set_applied(last.index.max(more.last().map_or(0, |e| e.index)));
        }
        r.raw.advance_apply();
        for (lo, hi, ctx) in r.store.take_wanted() {
            let got = d
                .log
                .iter()
                .filter(|b| b.0 >= lo && b.0 < hi)
                .map(sim_entry)
                .collect();
            r.store.fill(got);
            r.raw.on_entries_fetched(ctx);
        }
    }
    out
}

fn committed_prefix(d: &ReplicaDurable) -> Vec<SimBatch> {
    d.log
        .iter()
        .filter(|b| b.0 <= d.hard_state.commit)
        .cloned()
        .collect()
}

fn replica_sim(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    // Small caches so lagging followers are served from the log.
    let cache_bytes = 64 + rng.below(256) as usize;
    let mut durable: Vec<ReplicaDurable> = vec![ReplicaDurable::default(); 3];
    let mut nodes: Vec<Option<SimReplica>> = (0..3)
        .map(|i| Some(replica_open(i as u64 + 1, &durable[i], cache_bytes)))
        .collect();
    let mut net: Vec<InFlight> = Vec::new();
    // Proposed and not yet known: value -> (index, term) it was given.
    let mut pending: BTreeMap<Bytes, (u64, u64)> = BTreeMap::new();
    let mut acked: Vec<Bytes> = Vec::new();
    let mut commits = [0u64; 3];
    let (mut crashes, mut drops, mut partitions, mut next_value) = (0, 0, 0, 0u64);
    let mut misses = 0u64;
    let mut isolated = Isolation(None);
    let steps = 1_200u32;
    for step in 0..steps {
        let faults = step < steps - 400;
        if isolated.step(&mut rng, (step, faults), 80, 80) {
            partitions += 1;
        }
        if faults && rng.below(50) == 0 {
            let i = rng.below(3) as usize;
            if nodes.iter().all(|n| n.is_some()) {
                if let Some(n) = nodes[i].take() {
                    misses += n.store.misses();
                    crashes += 1;
                }
            }
        }
        for i in 0..3 {
            if nodes[i].is_none() && (!faults || rng.below(10) == 0) {
                nodes[i] = Some(replica_open(i as u64 + 1, &durable[i], cache_bytes));
            }
        }
        for n in nodes.iter_mut().flatten() {
            if rng.below(10) != 0 {
                n.raw.tick();
            }
        }
        // A producer sends a batch to whoever leads.
        if step < steps - 100 && rng.below(3) == 0 {
            if let Some(n) = nodes
                .iter_mut()
                .flatten()
                .find(|n| n.raw.raft.state == raft::StateRole::Leader)
            {
                // 40 bytes each: the small caches hold only a few applied entries.
                let v = Bytes::from(format!("v{next_value:06}-{}", "x".repeat(32)));
                next_value += 1;
                if n.raw.propose(vec![], v.to_vec()).is_ok() {
                    let at = (n.raw.raft.raft_log.last_index(), n.raw.raft.term);
                    pending.insert(v, at);
                }
            }
        }
        for (to, msg) in take_due(&mut net, &mut rng, step) {
            if let Some(n) = nodes[(to - 1) as usize].as_mut() {
                let _ = n.raw.step(msg);
            }
        }
        for i in 0..3 {
            let Some(n) = nodes[i].as_mut() else {
                continue;
            };
            let out = replica_drive(n, &mut durable[i]);
            drops += send_faulty(&mut net, &mut rng, out, (step, faults), &isolated);
            assert!(
                durable[i].hard_state.commit >= commits[i],
                "seed {seed} step {step}: replica {} commit went back",
                i + 1
            );
            commits[i] = durable[i].hard_state.commit;
        }
        // Acknowledged: a proposal whose (index, term) is committed on the leader's log.
        let leader = (0..3).find(|&i| {
            nodes[i]
                .as_ref()
                .is_some_and(|n| n.raw.raft.state == raft::StateRole::Leader)
        });
        if let Some(l) = leader {
            let log = committed_prefix(&durable[l]);
            let mut newly: Vec<(u64, Bytes)> = Vec::new();
            pending.retain(|v, (idx, term)| match log.iter().find(|b| b.0 == *idx) {
                Some(b) if b.1 == *term && b.3 == *v => {
                    newly.push((*idx, v.clone()));
                    false
                }
                Some(_) => false, // that index holds another entry: not acknowledged, dropped
                None => true,
            });
            newly.sort();
            acked.extend(newly.into_iter().map(|(_, v)| v));
        }
        // Replicas agree on every entry both have committed.
        let prefixes: Vec<Vec<SimBatch>> = durable.iter().map(committed_prefix).collect();
        for a in &prefixes {
            for b in &prefixes {
                let n = a.len().min(b.len());
                assert_eq!(
                    a[..n],
                    b[..n],
                    "seed {seed} step {step}: committed logs differ"
                );
            }
        }
        // Every acknowledged batch is committed somewhere, once, in acknowledgement order.
        let longest = prefixes
            .iter()
            .max_by_key(|p| p.len())
            .cloned()
            .unwrap_or_default();
        let values: Vec<&Bytes> = longest
            .iter()
            .map(|b| &b.3)
            .filter(|v| !v.is_empty())
            .collect();
        let mut at = 0usize;
        for v in &acked {
            let pos = values[at..].iter().position(|x| *x == v);
            assert!(
                pos.is_some(),
                "seed {seed} step {step}: acknowledged {v:?} lost or out of order"
            );
            at += pos.unwrap_or(0) + 1;
            assert_eq!(
                values.iter().filter(|x| **x == v).count(),
                1,
                "seed {seed}: {v:?} twice"
            );
        }
    }
    let finals: Vec<Vec<SimBatch>> = durable.iter().map(committed_prefix).collect();
    assert!(
        finals.iter().all(|f| f == &finals[0]),
        "seed {seed}: replicas did not converge: {:?}",
        finals.iter().map(Vec::len).collect::<Vec<_>>()
    );
    misses += nodes
        .iter()
        .flatten()
        .map(|n| n.store.misses())
        .sum::<u64>();
    format!(
        "{} acked of {next_value} proposed, {} committed entries, {crashes} crashes, {partitions} partitions, {drops} drops, {misses} cache misses served from the log",
        acked.len(),
        finals[0].len()
    )
}

#[test]
fn replica_simulation() {
    run_seeds(replica_sim);
}

// ---- partition replication: the broker's own replica over the partition log ------------------

use ringmq::cluster::replica::{Replica, ReplicaTiming};

type OpenReplica = (Rc<Partition<MemStorage>>, Rc<Replica<MemStorage>>);

/// One node of the replicated-partition simulation: its storage survives a crash; the
/// partition and replica are reopened from it.
struct SimNode {
    storage: MemStorage,
    state_dir: std::path::PathBuf,
    open: Option<OpenReplica>,
}

fn sim_timing() -> ReplicaTiming {
    ReplicaTiming {
        tick_ms: 100,
        election_ticks: 10,
        heartbeat_ticks: 2,
        randomized_election: false,
    }
}

async fn open_node(n: &SimNode, id: u64, retention: bool) -> OpenReplica {
    let clock = Rc::new(ManualClock::new(1_000_000));
    // With retention (every other seed), about three 16 KiB segments stay: a follower away
    // long enough finds the entries it lacks deleted on the leader and skips to where the
    // leader's log starts.
    let cfg = LogConfig {
        retention_bytes: retention.then_some(40 * 1024),
        ..cfg()
    };
    let part = Partition::open(n.storage.clone(), Path::new("/r/t-0"), cfg, "t", 0, clock)
        .await
        .expect("open partition");
    let part = Rc::new(part);
    let replica = Replica::open(
        part.clone(),
        &n.state_dir,
        id,
        vec![1, 2, 3],
        sim_timing(),
        std::env::var("RINGMQ_SIM_MUTATE_NO_SYNC").is_err(),
    )
    .await
    .expect("open replica");
    (part, Rc::new(replica))
}

/// A proposal whose outcome is not known yet: (node index, raft index, term, first id, count).
type Proposal = (usize, u64, u64, u64, u64);

/// Everything any replica ever showed readers: offset → id, and id → offset. A record never
/// changes offset, and no offset ever shows two records.
#[derive(Default)]
struct Shown {
    at: BTreeMap<u64, u64>,
    of: BTreeMap<u64, u64>,
}

impl Shown {
    fn add(&mut self, view: &[(u64, u64)], seed: u64, step: u32) {
        for &(o, id) in view {
            let x = *self.at.entry(o).or_insert(id);
            assert_eq!(
                x, id,
                "seed {seed} step {step}: offset {o} showed {x}, now {id}"
            );
            let y = *self.of.entry(id).or_insert(o);
            assert_eq!(
                y, o,
                "seed {seed} step {step}: id {id} at offsets {y} and {o}"
            );
        }
    }
}

async fn partition_replication_sim(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let retention = seed.is_multiple_of(2);
    let root = std::env::temp_dir().join(format!("ringmq-rsim-{}-{seed}", std::process::id()));
    let mut nodes: Vec<SimNode> = (0..3)
        .map(|i| {
            let state_dir = root.join(format!("n{i}"));
            std::fs::create_dir_all(&state_dir).expect("state dir");
            SimNode {
                storage: MemStorage::new(),
                state_dir,
                open: None,
            }
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.open = Some(open_node(n, i as u64 + 1, retention).await);
    }
    let mut net: Vec<InFlight> = Vec::new();
    let mut pending: Vec<Proposal> = Vec::new();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut shown = Shown::default();
    let (mut crashes, mut drops, mut partitions, mut next_id) = (0, 0, 0, 0u64);
    let (mut deleted_segments, mut skips) = (0, 0);
    let mut isolated = Isolation(None);
    let steps = 900u32;
    for step in 0..steps {
        let faults = step < steps - 300;
        if isolated.step(&mut rng, (step, faults), 80, 60) {
            partitions += 1;
        }
        // Power loss on one node (never two at once), and restarts.
        if faults && rng.below(60) == 0 && nodes.iter().all(|n| n.open.is_some()) {
            let i = rng.below(3) as usize;
            skips += nodes[i].open.take().map_or(0, |n| n.1.skips());
            nodes[i].storage.crash(rng.next_u64());
            pending.retain(|p| p.0 != i);
            crashes += 1;
        }
        for (i, n) in nodes.iter_mut().enumerate() {
            // A node stays down longer now and then, so retention overtakes it.
            let back = if rng.below(4) == 0 { 40 } else { 10 };
            if n.open.is_none() && (!faults || rng.below(back) == 0) {
                n.open = Some(open_node(n, i as u64 + 1, retention).await);
            }
        }
        for n in nodes.iter().filter_map(|n| n.open.as_ref()) {
            if rng.below(10) != 0 {
                n.1.tick();
            }
            if step % 25 == 0 {
                deleted_segments += n.1.enforce_retention(0).await.expect("retention");
            }
        }
        // A producer sends a batch of 1-3 records (about 1 KiB) to whoever leads.
        if step < steps - 100 && rng.below(3) == 0 {
            if let Some(i) =
                (0..3).find(|&i| nodes[i].open.as_ref().is_some_and(|n| n.1.is_leader()))
            {
                let (part, r) = nodes[i].open.as_ref().expect("open");
                let count = 1 + rng.below(3);
                let data = part.entry_data(&id_batch(next_id, count));
                if let Ok((index, term)) = r.propose(data) {
                    pending.push((i, index, term, next_id, count));
                }
                next_id += count;
            }
        }
        for (to, msg) in take_due(&mut net, &mut rng, step) {
            if let Some(n) = nodes[(to - 1) as usize].open.as_ref() {
                n.1.step(msg);
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            let Some((part, r)) = n.open.clone() else {
                continue;
            };
            let out = std::cell::RefCell::new(Vec::new());
            // Now and then a produce arrives while this replica's write is in flight (the
            // second hand-over of messages comes after the write, before raft-rs hears of it):
            // the broker's Ready loop must cope, as it does under pipelined load.
            let mid =
                (step < steps - 100 && rng.below(4) == 0).then(|| (next_id, 1 + rng.below(3)));
            let calls = std::cell::Cell::new(0);
            let proposed = std::cell::Cell::new(None);
            r.drive(&|m| {
                out.borrow_mut().extend(m);
                calls.set(calls.get() + 1);
                if let (2, Some((first, count)), true) = (calls.get(), mid, r.is_leader()) {
                    if let Ok(at) = r.propose(part.entry_data(&id_batch(first, count))) {
                        proposed.set(Some(at));
                    }
                }
            })
            .await;
            if let (Some((first, count)), Some((index, term))) = (mid, proposed.get()) {
                next_id = first + count;
                pending.push((i, index, term, first, count));
            }
            assert!(
                r.failure().is_none(),
                "seed {seed} step {step}: {:?}",
                r.failure()
            );
            drops += send_faulty(
                &mut net,
                &mut rng,
                out.into_inner(),
                (step, faults),
                &isolated,
            );
        }
        // Outcomes: acknowledged at the offsets the leader reports.
        pending.retain(|&(i, index, term, first, count)| {
            let Some((_, r)) = nodes[i].open.as_ref() else {
                return false;
            };
            match r.outcome(index, term) {
                None => true,
                Some(Ok(c)) => {
                    assert_eq!(u64::from(c.records), count, "seed {seed}");
                    acked.extend((0..count).map(|k| (c.base_offset + k, first + k)));
                    false
                }
                Some(Err(_)) => false,
            }
        });
        // What replicas show readers never contradicts itself (read every few steps:
        // reading whole logs each step would dominate the run).
        if step % 8 == 0 {
            for n in nodes.iter().filter_map(|n| n.open.as_ref()) {
                shown.add(&fetched_ids(&n.0).await, seed, step);
            }
            // An acknowledged offset never shows another record.
            for (o, id) in &acked {
                if let Some(x) = shown.at.get(o) {
                    assert_eq!(
                        x, id,
                        "seed {seed} step {step}: offset {o} acknowledged {id}"
                    );
                }
            }
        }
    }
    // After the faults: every replica converged on one log, which holds every acknowledged
    // record retention has not deleted, at its acknowledged offset.
    let mut finals = Vec::new();
    for n in nodes.iter().filter_map(|n| n.open.as_ref()) {
        let view = fetched_ids(&n.0).await;
        shown.add(&view, seed, steps);
        finals.push((n.0.log().start_offset(), n.0.log().end_offset(), view));
        skips += n.1.skips();
    }
    let start = finals.iter().map(|f| f.0).max().unwrap_or(0);
    let ends: Vec<u64> = finals.iter().map(|f| f.1).collect();
    assert!(
        ends.iter().all(|&e| e == ends[0]),
        "seed {seed}: ends differ: {ends:?}"
    );
    let tails: Vec<Vec<(u64, u64)>> = finals
        .iter()
        .map(|f| f.2.iter().copied().filter(|x| x.0 >= start).collect())
        .collect();
    assert!(
        tails.iter().all(|t| *t == tails[0]),
        "seed {seed}: replicas did not converge"
    );
    let last: BTreeMap<u64, u64> = tails[0].iter().copied().collect();
    for (o, id) in acked.iter().filter(|a| a.0 >= start) {
        assert_eq!(
            last.get(o),
            Some(id),
            "seed {seed}: acknowledged id {id} at offset {o} lost"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    format!(
        "{} records acked of {next_id} proposed, {} shown, final log {start}..{}, {deleted_segments} segments deleted by retention, {skips} skips to the leader's start, {crashes} crashes, {partitions} partitions, {drops} drops",
        acked.len(),
        shown.at.len(),
        ends[0]
    )
}

#[test]
fn partition_replication_simulation() {
    run_seeds(|seed| run(move || partition_replication_sim(seed)));
}
