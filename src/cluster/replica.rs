//! One replicated partition on the shard that owns it (issue 14): a Raft group member (tikv
//! `raft`, `RawNode`) whose log *is* the partition log. Every Raft entry is one stored batch;
//! an entry's data is the stored batch as the leader encoded it (header and payload), and each
//! replica stores it at the offset that follows the previous entry, with the entry's term in
//! the header. Offsets are therefore a function of the Raft log prefix, and Raft's log
//! matching makes every replica put the same batch at the same offsets. An entry without
//! data (a new leader's first entry) is stored as one control record ([`FormatTag::Control`]).
//!
//! The Ready loop ([`Replica::drive`]) keeps the order raft-rs requires: append the entries
//! (cutting a conflicting uncommitted suffix first), fdatasync under `--fsync always`, save a
//! new term or vote to `replica.state`, and only then hand out the messages that depend on
//! them; committed entries move the log's commit index (the high watermark readers see and
//! acknowledgements wait for).
//!
//! Owns: the `RawNode`, its [`ReplicaStorage`] and the `replica.state` file. Must not touch:
//! sockets (the shard's replication loop sends what `drive` returns), other partitions.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Entry, Message};
use raft::{Config, RawNode, StateRole};

use super::producers::{Check, Placed, Producers};
use super::replica_log::{EntryMeta, ReplicaIndex, ReplicaStorage};
use super::replica_recovery::{rebuild_index, start_hard_state};
use super::replica_state::ReplicaState;
use crate::limits;
use crate::partition::Partition;
use crate::runtime::Notify;
use crate::storage::{batch, BatchMeta, FormatTag, Log, Storage};

/// Raft timing of partition replicas, in ticks of the replication loop.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaTiming {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// raft-rs draws each election timeout from `election_ticks..1.5 * election_ticks` with
    /// its own unseeded generator; `false` fixes it (the simulation breaks ties with seeded tick
    /// jitter instead, so a seed replays).
    pub randomized_election: bool,
}

impl ReplicaTiming {
    /// Election after `election_timeout_ms` without a leader (at least 3 ticks).
    pub fn from_election_timeout_ms(election_timeout_ms: u64) -> Self {
        let tick_ms = limits::REPLICA_TICK_MS;
        let election_ticks = (election_timeout_ms / tick_ms).max(3) as usize;
        Self {
            tick_ms,
            election_ticks,
            heartbeat_ticks: (election_ticks / 5).max(1),
            randomized_election: true,
        }
    }
}

/// Why a produce was not taken, or its outcome is not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    /// This replica does not lead; the node it believes leads (0: none known).
    NotLeader { leader: u64 },
    /// Taken, but a new leader replaced it before it was committed: not stored; retry.
    Superseded,
    /// Taken, and not committed in time: it may still be (retrying may store it twice).
    Timeout,
    /// The replica stopped (a storage error, or a peer contradicting its log).
    Stopped(String),
    /// An idempotent producer skipped a sequence number.
    OutOfOrder {
        producer: u64,
        expected: i64,
        got: i64,
    },
    /// An idempotent producer's batch sent before, too long ago to say where it went.
    TooOld {
        producer: u64,
        sequence: i64,
        oldest: i64,
    },
}

impl std::fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLeader { leader: 0 } => {
                write!(
                    f,
                    "this node does not lead the partition; no leader is known yet"
                )
            }
            Self::NotLeader { leader } => {
                write!(
                    f,
                    "this node does not lead the partition; node {leader} does"
                )
            }
            Self::Superseded => write!(
                f,
                "a new leader took over before the batch was committed; it was not stored"
            ),
            Self::Timeout => write!(
                f,
                "the batch was not committed within {} ms; it may or may not be stored",
                limits::REPLICA_COMMIT_WAIT_MS
            ),
            Self::Stopped(why) => write!(f, "the partition replica stopped: {why}"),
            Self::OutOfOrder {
                producer,
                expected,
                got,
            } => write!(
                f,
                "producer {producer:#x}: batch sequence {got}, but {expected} was due (an earlier batch was not stored)"
            ),
            Self::TooOld {
                producer,
                sequence,
                oldest,
            } => write!(
                f,
                "producer {producer:#x}: batch sequence {sequence} was stored before; only the last {} (from {oldest}) are remembered, so where is unknown",
                limits::PRODUCER_BATCHES_REMEMBERED
            ),
        }
    }
}

/// A committed batch: where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub base_offset: u64,
    pub records: u32,
}

/// Who leads, as this replica last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaderView {
    pub leader: u64,
    pub term: u64,
}

pub struct Replica<S: Storage> {
    pub topic: String,
    pub partition: u32,
    id: u64,
    raw: RefCell<RawNode<ReplicaStorage>>,
    store: ReplicaStorage,
    part: Rc<Partition<S>>,
    dir: PathBuf,
    /// The state last written to `replica.state`.
    saved: RefCell<ReplicaState>,
    /// fdatasync entries before answering (`--fsync always`).
    sync_entries: bool,
    driving: Cell<bool>,
    applied: Cell<u64>,
    applied_changed: Notify,
    leader: Cell<LeaderView>,
    failed: RefCell<Option<String>>,
    /// Times this replica skipped to its leader's log start (a snapshot).
    skips: Cell<u64>,
    /// Idempotent producers' recent batches in this log.
    producers: RefCell<Producers>,
    /// A snapshot is staged and its files are being written.
    snapshot_pending: Cell<bool>,
}

/// A produce taken by [`Replica::propose_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposed {
    /// Proposed now at (index, term).
    New(u64, u64),
    /// Sent before: the first copy is at (index, term).
    Duplicate(u64, u64),
}

/// Present while a snapshot empties the log (written after the state file names the new
/// start, removed once the log restarted there): a crash in between finishes the reset.
const RESET_INTENT: &str = "reset.intent";

fn remove_durably(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn write_durably(path: &Path) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// The batch to store for a Raft entry: its metadata and payload. Empty data is a control
/// record; other data must be a whole stored batch with a valid CRC (a peer's bytes).
fn entry_batch(e: &Entry) -> Result<(BatchMeta, &[u8]), String> {
    if e.data.is_empty() {
        let meta = BatchMeta {
            format: FormatTag::Control,
            record_count: 1,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
        };
        return Ok((meta, &[]));
    }
    let h = batch::decode_verified(&e.data)
        .map_err(|err| format!("raft entry {} is not a stored batch: {err}", e.index))?;
    let meta = BatchMeta {
        format: h.format,
        record_count: h.record_count,
        first_timestamp_ms: h.first_timestamp_ms,
        max_timestamp_ms: h.max_timestamp_ms,
    };
    let payload = &batch::payload(&e.data)[..h.payload_len as usize];
    Ok((meta, payload))
}

/// The Raft entry for a stored batch read back from the log.
fn batch_entry(index: u64, term: u64, stored: Bytes) -> Result<Entry, String> {
    let h = batch::decode_verified(&stored).map_err(|e| format!("{e}"))?;
    let data = if h.format == FormatTag::Control {
        Bytes::new()
    } else {
        stored.slice(..h.stored_len())
    };
    Ok(Entry {
        index,
        term,
        data,
        ..Default::default()
    })
}

/// The entries `lo..hi` of `index`, read from `log` (everything appended, written or not),
/// stopping after about `max_bytes` (at least one entry).
async fn read_entries<S: Storage>(
    log: &Log<S>,
    index: &ReplicaIndex,
    lo: u64,
    hi: u64,
    max_bytes: usize,
) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut i = lo;
    while i < hi && (out.is_empty() || bytes < max_bytes) {
        let Some(m) = index.get(i) else {
            break;
        };
        let r = log
            .read_appended(m.base_offset, limits::REPLICA_READ_BYTES)
            .await
            .map_err(|e| format!("reading raft entry {i}: {e}"))?;
        if r.batches.is_empty() {
            return Err(format!("raft entry {i} is not in the log"));
        }
        for b in r.batches {
            let Some(m) = index.get(i).filter(|_| i < hi) else {
                break;
            };
            let e = batch_entry(i, m.term, b)?;
            bytes += e.data.len();
            out.push(e);
            i += 1;
        }
    }
    Ok(out)
}

/// An idempotent producer's (id, sequence) in a Raft entry's batch.
fn entry_producer(e: &Entry) -> Option<(u64, i64)> {
    if e.data.is_empty() {
        return None;
    }
    let h = batch::decode_header(&e.data).ok()?;
    if h.format != FormatTag::RingmqFlatbuffers {
        return None;
    }
    let payload = batch::payload(&e.data).get(..h.payload_len as usize)?;
    // Verified: the bytes came from a peer (a CRC proves they are what it sent, not that
    // it built them right).
    let rb = flatbuffers::root::<crate::protocol::fb::RecordBatch>(payload).ok()?;
    crate::protocol::producer_of(&rb)
}

/// Records an idempotent producer's batch stored as entry `e` at `base_offset`.
fn note_producer(table: &mut Producers, e: &Entry, base_offset: u64) {
    if let Some((id, sequence)) = entry_producer(e) {
        let placed = Placed {
            sequence,
            index: e.index,
            term: e.term,
            base_offset: Some(base_offset),
        };
        table.note(id, placed);
    }
}

/// The producer table from the last [`limits::PRODUCER_REBUILD_ENTRIES`] entries of the log
/// (a batch is sent again within seconds; older ones are not looked for).
async fn rebuild_producers<S: Storage>(
    log: &Log<S>,
    index: &ReplicaIndex,
) -> Result<Producers, String> {
    let mut table = Producers::default();
    let last = index.last_index();
    let mut lo = index
        .first_index()
        .max((last + 1).saturating_sub(limits::PRODUCER_REBUILD_ENTRIES));
    while lo <= last {
        let hi = (lo + 1024).min(last + 1);
        for e in read_entries(log, index, lo, hi, usize::MAX).await? {
            if let Some(m) = index.get(e.index) {
                note_producer(&mut table, &e, m.base_offset);
            }
        }
        lo = hi;
    }
    Ok(table)
}

impl<S: Storage> Replica<S> {
    /// Opens the replica of partition `part` (its log opened with an external commit policy)
    /// in `dir`: a new group of `voters` if the directory has no state file, else the saved
    /// state and the entries the log holds. `me` is this node's id.
    pub async fn open(
        part: Rc<Partition<S>>,
        dir: &Path,
        me: u64,
        voters: Vec<u64>,
        timing: ReplicaTiming,
        sync_entries: bool,
    ) -> Result<Self, String> {
        let log = part.log();
        let state = match ReplicaState::load(dir)? {
            Some(s) => s,
            None => {
                if log.log_end() > log.start_offset() {
                    return Err(format!(
                        "{}: the log holds offsets {}..{} but there is no replica state",
                        dir.display(),
                        log.start_offset(),
                        log.log_end()
                    ));
                }
                let s = ReplicaState::new(voters);
                s.save(dir)
                    .map_err(|e| format!("{}: saving the replica state: {e}", dir.display()))?;
                s
            }
        };
        let intent = dir.join(RESET_INTENT);
        if intent.exists() || log.log_end() < state.first_offset {
            // A crash while the log was restarting after a snapshot: finish it.
            log.reset_to(state.first_offset)
                .await
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            remove_durably(&intent)?;
        }
        let index = rebuild_index(log, &state).await?;
        let hs = start_hard_state(&state, &index);
        let applied = hs.commit.max(index.first_index() - 1);
        if let Some(m) = index.get(applied) {
            log.advance_commit(m.base_offset + u64::from(m.records))
                .map_err(|e| e.to_string())?;
        }
        let unapplied =
            read_entries(log, &index, applied + 1, index.last_index() + 1, usize::MAX).await?;
        let producers = rebuild_producers(log, &index).await?;
        let store = ReplicaStorage::new(index, hs, state.conf_state.clone(), applied);
        store.preload(unapplied);
        let (min_election_tick, max_election_tick) = if timing.randomized_election {
            // A follower campaigns 1 to 1.5 election timeouts after its leader went silent
            // (raft-rs's default range, 1 to 2, makes failover slower for no gain here).
            let e = timing.election_ticks;
            (e, e + e / 2 + 1)
        } else {
            (timing.election_ticks, timing.election_ticks + 1)
        };
        let cfg = Config {
            id: me,
            election_tick: timing.election_ticks,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: timing.heartbeat_ticks,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: limits::REPLICA_MSG_BYTES_MAX,
            max_inflight_msgs: limits::REPLICA_INFLIGHT_MSGS,
            max_uncommitted_size: limits::REPLICA_UNCOMMITTED_BYTES,
            max_committed_size_per_ready: limits::REPLICA_MSG_BYTES_MAX * 16,
            applied,
            ..Default::default()
        };
        let raw = RawNode::new(&cfg, store.clone(), &logger())
            .map_err(|e| format!("{}: starting raft: {e}", dir.display()))?;
        Ok(Self {
            topic: part.topic().to_string(),
            partition: part.id(),
            id: me,
            raw: RefCell::new(raw),
            store,
            part,
            dir: dir.to_path_buf(),
            saved: RefCell::new(state),
            sync_entries,
            driving: Cell::new(false),
            applied: Cell::new(applied),
            applied_changed: Notify::new(),
            leader: Cell::new(LeaderView::default()),
            failed: RefCell::new(None),
            skips: Cell::new(0),
            producers: RefCell::new(producers),
            snapshot_pending: Cell::new(false),
        })
    }

    /// A group never used yet (term 0): its preferred leader campaigns at once instead of
    /// waiting an election timeout.
    pub fn campaign_if_new_preferred(&self, preferred: bool) {
        let mut raw = self.raw.borrow_mut();
        if preferred && raw.raft.term == 0 {
            let _ = raw.campaign();
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    fn fail(&self, why: String) {
        eprintln!(
            "ringmq: partition {}-{} replica stopped: {why}",
            self.topic, self.partition
        );
        *self.failed.borrow_mut() = Some(why);
        self.applied_changed.notify_all();
    }

    /// Who leads, as this replica last saw it.
    pub fn leader(&self) -> LeaderView {
        self.leader.get()
    }

    pub fn is_leader(&self) -> bool {
        self.raw.borrow().raft.state == StateRole::Leader
    }

    pub fn tick(&self) {
        // While a snapshot is being written raft-rs's applied index is below its log start:
        // an election now would read compacted entries (and panic). Time stands still.
        if self.failed.borrow().is_none() && !self.snapshot_pending.get() {
            self.raw.borrow_mut().tick();
        }
    }

    /// Hands a peer's message to Raft. raft-rs panics on a message that contradicts this
    /// replica's log (only a corrupted peer or another cluster sends one): the panic is caught
    /// and this replica stops instead of the broker.
    pub fn step(&self, m: Message) {
        // Dropped while a snapshot is written (see `tick`); Raft sends again.
        if self.failed.borrow().is_some() || self.snapshot_pending.get() {
            return;
        }
        let from = m.from;
        let stepped = {
            let mut raw = self.raw.borrow_mut();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| raw.step(m)))
        };
        match stepped {
            Ok(_) => {}
            Err(_) => self.fail(format!(
                "a message from node {from} contradicts this replica's log"
            )),
        }
    }

    /// Whether [`Self::drive`] has work.
    pub fn has_ready(&self) -> bool {
        self.failed.borrow().is_none() && !self.driving.get() && self.raw.borrow().has_ready()
    }

    /// Proposes a stored batch (encoded with base offset and term 0; each replica stamps
    /// them). Returns the Raft index and term it was given.
    pub fn propose(&self, entry_data: Vec<u8>) -> Result<(u64, u64), ReplicaError> {
        if let Some(why) = self.failure() {
            return Err(ReplicaError::Stopped(why));
        }
        let mut raw = self.raw.borrow_mut();
        if raw.raft.state != StateRole::Leader {
            return Err(ReplicaError::NotLeader {
                leader: raw.raft.leader_id,
            });
        }
        let before = raw.raft.raft_log.last_index();
        if raw.propose(Vec::new(), entry_data).is_err() {
            return Err(ReplicaError::NotLeader {
                leader: raw.raft.leader_id,
            });
        }
        let index = raw.raft.raft_log.last_index();
        if index != before + 1 {
            return Err(ReplicaError::NotLeader {
                leader: raw.raft.leader_id,
            });
        }
        Ok((index, raw.raft.term))
    }

    /// The outcome of the entry proposed at (`index`, `term`) if it is known: committed (and
    /// applied) with where it was stored, or replaced by another leader's entry.
    pub fn outcome(&self, index: u64, term: u64) -> Option<Result<Committed, ReplicaError>> {
        if let Some(why) = self.failure() {
            return Some(Err(ReplicaError::Stopped(why)));
        }
        let meta = self.store.entry_meta(index);
        if self.applied.get() >= index {
            return Some(match meta {
                Some(m) if m.term == term => Ok(Committed {
                    base_offset: m.base_offset,
                    records: m.records,
                }),
                Some(_) => Err(ReplicaError::Superseded),
                // Compacted away (retention, a snapshot): committed or not, nobody can say.
                None => Err(ReplicaError::Timeout),
            });
        }
        meta.filter(|m| m.term != term)
            .map(|_| Err(ReplicaError::Superseded))
    }

    /// Proposes a produce: an idempotent producer's batch sent before is not proposed again
    /// (the caller waits for the first copy), a gap in its sequence is refused.
    pub fn propose_batch(
        &self,
        entry_data: Vec<u8>,
        producer: Option<(u64, i64)>,
    ) -> Result<Proposed, ReplicaError> {
        let Some((id, sequence)) = producer else {
            let (index, term) = self.propose(entry_data)?;
            return Ok(Proposed::New(index, term));
        };
        if !self.is_leader() {
            // A follower's table may lack what its leader proposed: let the leader decide.
            return Err(ReplicaError::NotLeader {
                leader: self.raw.borrow().raft.leader_id,
            });
        }
        match self.producers.borrow().check(id, sequence) {
            Check::New => {}
            Check::Duplicate(p) => return Ok(Proposed::Duplicate(p.index, p.term)),
            Check::OutOfOrder { expected } => {
                return Err(ReplicaError::OutOfOrder {
                    producer: id,
                    expected,
                    got: sequence,
                })
            }
            Check::TooOld { oldest } => {
                return Err(ReplicaError::TooOld {
                    producer: id,
                    sequence,
                    oldest,
                })
            }
        }
        let (index, term) = self.propose(entry_data)?;
        let placed = Placed {
            sequence,
            index,
            term,
            base_offset: None,
        };
        self.producers.borrow_mut().note(id, placed);
        Ok(Proposed::New(index, term))
    }

    /// Resolves when the entry proposed at (`index`, `term`) is committed and applied, with
    /// where it was stored.
    pub async fn wait_committed(&self, index: u64, term: u64) -> Result<Committed, ReplicaError> {
        let deadline = Instant::now() + Duration::from_millis(limits::REPLICA_COMMIT_WAIT_MS);
        loop {
            let changed = self.applied_changed.wait();
            if let Some(outcome) = self.outcome(index, term) {
                return outcome;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ReplicaError::Timeout);
            }
            futures_lite::future::or(changed, crate::runtime::sleep(deadline - now)).await;
        }
    }

    /// Runs the Ready loop until Raft has nothing more, handing messages to `send` as soon as
    /// they may go (a leader's appends at once, answers after the entries they acknowledge are
    /// durable). Uses raft-rs's asynchronous persistence (`advance_append_async`, then
    /// `on_persist_ready`), so messages stepped in while a write is in flight are fine. On a
    /// storage error the replica stops.
    pub async fn drive(&self, send: &dyn Fn(Vec<Message>)) {
        if self.driving.replace(true) {
            return;
        }
        if let Err(e) = self.drive_inner(send).await {
            self.fail(e);
        }
        self.driving.set(false);
    }

    async fn drive_inner(&self, send: &dyn Fn(Vec<Message>)) -> Result<(), String> {
        loop {
            let mut rd = {
                let mut raw = self.raw.borrow_mut();
                if self.failed.borrow().is_some() || !raw.has_ready() {
                    return Ok(());
                }
                raw.ready()
            };
            let number = rd.number();
            if rd.ss().is_some() {
                let raw = self.raw.borrow();
                self.leader.set(LeaderView {
                    leader: raw.raft.leader_id,
                    term: raw.raft.term,
                });
            }
            let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
            self.send_noting_snapshots(send, rd.take_messages());
            // Committed entries in a Ready are already durable here (raft-rs hands out no
            // more than min(committed, persisted)).
            let committed = rd.take_committed_entries();
            let entries = rd.take_entries();
            let hs = rd.hs().cloned();
            let after_persist = rd.take_persisted_messages();
            // raft-rs reads what it hands over from the storage once it is advanced: the
            // index and cache take the snapshot and entries first, the files follow.
            let first_offset = match &snapshot {
                Some(snap) => Some(self.stage_snapshot(snap)?),
                None => None,
            };
            let staged = self.stage(&entries)?;
            self.raw.borrow_mut().advance_append_async(rd);
            if let (Some(snap), Some(offset)) = (&snapshot, first_offset) {
                self.write_snapshot(snap, offset).await?;
            }
            self.apply(&committed)?;
            self.write_entries(&entries, staged).await?;
            if let Some(hs) = hs {
                self.save_hard_state(&hs)?;
            }
            self.send_noting_snapshots(send, after_persist);
            self.raw.borrow_mut().on_persist_ready(number);
            if let Some(snap) = &snapshot {
                let index = snap.get_metadata().index;
                if self.applied.get() < index {
                    self.store.set_applied(index);
                    self.raw.borrow_mut().advance_apply_to(index);
                    self.applied.set(index);
                    self.applied_changed.notify_all();
                }
                self.snapshot_pending.set(false);
            }
            self.fetch_wanted().await?;
        }
    }

    /// Sends `msgs`; a snapshot (where this log starts: a few bytes, in the message itself) is
    /// reported sent at once, so Raft probes the follower again instead of waiting for it
    /// (a lost one is noticed by the probe and sent again).
    fn send_noting_snapshots(&self, send: &dyn Fn(Vec<Message>), msgs: Vec<Message>) {
        let snapshots: Vec<u64> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        send(msgs);
        let mut raw = self.raw.borrow_mut();
        for to in snapshots {
            raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
    }

    /// The leader's retention deleted entries this replica lacks: the snapshot says where the
    /// leader's log starts (nothing below exists on the leader any more). The index restarts
    /// there now; [`Self::write_snapshot`] does the same to the files. Returns that offset.
    fn stage_snapshot(&self, snap: &raft::eraftpb::Snapshot) -> Result<u64, String> {
        let m = snap.get_metadata();
        let first_offset = <[u8; 8]>::try_from(&snap.data[..])
            .map(u64::from_le_bytes)
            .map_err(|_| format!("a snapshot of {} bytes (8 expected)", snap.data.len()))?;
        self.store
            .reset(m.index, m.term, first_offset, m.get_conf_state());
        // The batches it described are gone from this replica.
        *self.producers.borrow_mut() = Producers::default();
        self.snapshot_pending.set(true);
        Ok(first_offset)
    }

    /// Records the snapshot's start in the state file, then restarts the log empty there.
    async fn write_snapshot(
        &self,
        snap: &raft::eraftpb::Snapshot,
        first_offset: u64,
    ) -> Result<(), String> {
        let m = snap.get_metadata();
        let mut next = self.saved.borrow().clone();
        next.first_index = m.index + 1;
        next.first_offset = first_offset;
        next.prev_term = m.term;
        next.conf_state = m.get_conf_state().clone();
        next.hard_state.commit = next.hard_state.commit.max(m.index);
        next.save(&self.dir)
            .map_err(|e| format!("saving {}: {e}", self.dir.display()))?;
        *self.saved.borrow_mut() = next;
        let intent = self.dir.join(RESET_INTENT);
        write_durably(&intent)?;
        self.part
            .log()
            .reset_to(first_offset)
            .await
            .map_err(|e| format!("restarting the log at offset {first_offset}: {e}"))?;
        remove_durably(&intent)?;
        self.skips.set(self.skips.get() + 1);
        eprintln!(
            "ringmq: partition {}-{}: caught up by skipping to offset {first_offset} (raft index {}), where the leader's log starts",
            self.topic,
            self.partition,
            m.index + 1
        );
        Ok(())
    }

    /// Puts entries in the index and cache at the offsets that follow the previous entry
    /// (cutting a conflicting suffix from the index). Returns where the log must be cut
    /// first, if anywhere.
    fn stage(&self, entries: &[Entry]) -> Result<Option<u64>, String> {
        let Some(first) = entries.first() else {
            return Ok(None);
        };
        let cut = self.store.conflict_offset(first.index);
        let mut base = self.store.end_offset_before(first.index).ok_or_else(|| {
            format!(
                "raft entry {} does not follow the entries this replica has",
                first.index
            )
        })?;
        let mut metas = Vec::with_capacity(entries.len());
        for e in entries {
            let (meta, _) = entry_batch(e)?;
            metas.push(EntryMeta {
                term: e.term,
                base_offset: base,
                records: meta.record_count,
            });
            base += u64::from(meta.record_count);
        }
        self.store.append(entries, &metas)?;
        let mut producers = self.producers.borrow_mut();
        producers.cut_from(first.index);
        for (e, m) in entries.iter().zip(&metas) {
            note_producer(&mut producers, e, m.base_offset);
        }
        Ok(cut)
    }

    /// Writes staged entries to the log (cutting a conflicting suffix first) and fdatasyncs
    /// under `--fsync always`; each must land at the offset it was staged at.
    async fn write_entries(&self, entries: &[Entry], cut: Option<u64>) -> Result<(), String> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let log = self.part.log();
        if let Some(cut) = cut {
            log.truncate_suffix(cut)
                .await
                .map_err(|e| format!("cutting the log at offset {cut}: {e}"))?;
        }
        for e in entries {
            let term = u32::try_from(e.term).map_err(|_| format!("term {} too large", e.term))?;
            let (meta, payload) = entry_batch(e)?;
            let want = self
                .store
                .entry_meta(e.index)
                .map(|m| m.base_offset)
                .ok_or_else(|| format!("raft entry {} was not staged", e.index))?;
            log.reserve().await.map_err(|e| e.to_string())?;
            log.set_leader_term(term);
            if log.log_end() != want {
                return Err(format!(
                    "raft entry {} (first of this write: {}) belongs at offset {want} but the log ends at {}",
                    e.index,
                    first.index,
                    log.log_end()
                ));
            }
            log.append_buffered(meta, payload)
                .map_err(|e| e.to_string())?;
        }
        if self.sync_entries {
            log.sync().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Saves a new term, vote or commit index (blocking file I/O: a term or vote changes
    /// rarely; the commit index alone is never saved here, only along with them).
    fn save_hard_state(&self, hs: &raft::eraftpb::HardState) -> Result<(), String> {
        self.store.set_hard_state(hs);
        let mut next = self.saved.borrow().clone();
        next.hard_state = hs.clone();
        if self.saved.borrow().must_sync_before_send(&next) {
            next.save(&self.dir)
                .map_err(|e| format!("saving {}: {e}", self.dir.display()))?;
            *self.saved.borrow_mut() = next;
        }
        Ok(())
    }

    /// Moves the log's commit index past the committed entries.
    fn apply(&self, committed: &[Entry]) -> Result<(), String> {
        let Some(last) = committed.last() else {
            return Ok(());
        };
        let m = self
            .store
            .entry_meta(last.index)
            .ok_or_else(|| format!("committed raft entry {} is not in the index", last.index))?;
        let end = m.base_offset + u64::from(m.records);
        if end > self.part.log().end_offset() {
            self.part
                .log()
                .advance_commit(end)
                .map_err(|e| e.to_string())?;
        }
        self.store.set_applied(last.index);
        self.raw.borrow_mut().advance_apply_to(last.index);
        self.applied.set(last.index);
        self.applied_changed.notify_all();
        self.save_commit_now_and_then(last.index)
    }

    /// Saves the applied index as the commit every [`limits::REPLICA_COMMIT_SAVE_ENTRIES`]
    /// entries, so a restart reads back (and re-applies) only the entries since (the commit
    /// may be saved late; never ahead of what is applied).
    fn save_commit_now_and_then(&self, applied: u64) -> Result<(), String> {
        let saved = self.saved.borrow().hard_state.commit;
        if applied < saved + limits::REPLICA_COMMIT_SAVE_ENTRIES {
            return Ok(());
        }
        let mut next = self.saved.borrow().clone();
        next.hard_state.commit = applied;
        next.save(&self.dir)
            .map_err(|e| format!("saving {}: {e}", self.dir.display()))?;
        *self.saved.borrow_mut() = next;
        Ok(())
    }

    /// Reads back from the log the entries raft-rs wanted but the cache no longer had.
    async fn fetch_wanted(&self) -> Result<(), String> {
        for (lo, hi, ctx) in self.store.take_wanted() {
            let index = self.store.index();
            let read = limits::REPLICA_MSG_BYTES_MAX as usize;
            // A read that fails (retention deleted the entries meanwhile) fills nothing:
            // raft-rs asks again and then finds them compacted (and sends a snapshot).
            if let Ok(entries) = read_entries(self.part.log(), &index, lo, hi, read).await {
                self.store.fill(entries);
            }
            self.raw.borrow_mut().on_entries_fetched(ctx);
        }
        Ok(())
    }

    /// Deletes the sealed segments retention allows, only below what is applied. The state
    /// file records the new start (index, offset, previous term) before any segment goes, so a
    /// crash in between recovers (the scan starts at the state's start). Returns how many
    /// segments were deleted.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<usize, String> {
        let log = self.part.log();
        let applied_end = self
            .store
            .end_offset_before(self.applied.get() + 1)
            .unwrap_or(0);
        let start = log.retention_start(now_ms, applied_end);
        if start <= log.start_offset() {
            return Ok(0);
        }
        let Some(first_index) = self.store.index_of_offset(start) else {
            return Ok(0);
        };
        if self.store.entry_meta(first_index).map(|m| m.base_offset) != Some(start) {
            return Err(format!(
                "retention would start the log at offset {start}, inside raft entry {first_index}"
            ));
        }
        let prev_term = self.store.term_of(first_index - 1).unwrap_or(0);
        let mut next = self.saved.borrow().clone();
        next.first_index = first_index;
        next.first_offset = start;
        next.prev_term = prev_term;
        next.save(&self.dir)
            .map_err(|e| format!("saving {}: {e}", self.dir.display()))?;
        *self.saved.borrow_mut() = next;
        // The index forgets them first: no read of them starts while files go.
        self.store.compact_to(first_index - 1);
        let deleted = log.delete_before(start).await.map_err(|e| e.to_string())?;
        Ok(deleted)
    }

    /// Times this replica skipped to its leader's log start (entries it lacked were deleted
    /// by the leader's retention).
    pub fn skips(&self) -> u64 {
        self.skips.get()
    }

    /// This replica's node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// (last index, applied index, commit index) for status.
    pub fn progress(&self) -> (u64, u64, u64) {
        let raw = self.raw.borrow();
        (
            raw.raft.raft_log.last_index(),
            self.applied.get(),
            raw.raft.raft_log.committed,
        )
    }
}
