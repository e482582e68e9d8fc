//! One partition: its log and the queue subscriptions on it, behind typed methods.
//!
//! Owns: the partition's [`Log`] (append in arrival order, acknowledge on commit, read up to
//! the commit index), the [`QueueState`] of each subscription on it (leases, acks, nacks,
//! redelivery), and the rules that tie them together (a subscription reads only committed
//! records, ack state restored from disk never goes below the log start). Generic over
//! [`Storage`] and reading time from an injected [`Clock`], so the simulation runs the very
//! same code over `MemStorage` with a manual clock.
//!
//! Must not touch: frames or sockets (callers pass verified batches and typed arguments and
//! get typed results; wire codes are the server edge's business), the shard's state log (a
//! caller makes an ack durable, then calls [`Partition::apply_ack`]), other partitions.

pub mod queue;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;

use crate::limits;
use crate::protocol::queue::{SubStatsOut, DELIVER_AT_HEADER};
use crate::protocol::{self as proto, fb, FrameError, VerifiedBatch};
use crate::runtime::clock::Clock;
use crate::runtime::Notify;
use crate::storage::{
    batch, AppendInfo, BatchMeta, CommitPolicy, FormatTag, Log, LogConfig, ReadBatches, Storage,
    StorageError,
};
pub use queue::{Dispatch, QueueAcks, QueueState, Reason, SubConfig};

/// Bytes read from the log per refill of a subscription's pending set.
const QUEUE_READ_BYTES: usize = 256 * 1024;

/// What a partition refuses, by cause. The server edge maps each to one wire code.
#[derive(Debug)]
pub enum PartitionError {
    /// The log failed or refused (offset out of range, batch too large, disk error, cut by a
    /// truncation before it was committed).
    Storage(StorageError),
    /// A batch breaks a rule the verifier does not check (no records).
    Batch(FrameError),
    /// The partition holds [`limits::SUBSCRIPTIONS_PER_PARTITION_MAX`] subscriptions.
    TooManySubscriptions { partition: String, have: usize },
    /// A settle for a subscription this partition has never seen.
    UnknownSubscription(String),
    /// A list-offset timestamp that is neither ≥ 0, -1 (start) nor -2 (end).
    InvalidTimestamp(i64),
}

impl std::fmt::Display for PartitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Storage(e) => write!(f, "{e}"),
            Self::Batch(e) => write!(f, "{e}"),
            Self::TooManySubscriptions { partition, have } => write!(
                f,
                "partition {partition} has {have} subscriptions, its limit ({})",
                limits::SUBSCRIPTIONS_PER_PARTITION_MAX
            ),
            Self::UnknownSubscription(s) => {
                write!(f, "no subscription {s:?} on this partition")
            }
            Self::InvalidTimestamp(t) => {
                write!(f, "timestamp {t}: must be ≥ 0, -1 (start) or -2 (end)")
            }
        }
    }
}

impl std::error::Error for PartitionError {}

impl From<StorageError> for PartitionError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

/// A batch appended to the log, not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub info: AppendInfo,
    pub record_count: u32,
}

/// The non-durable ways to settle a lease (an ack goes through the state log first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Return to pending, deliverable again after `delay_ms`.
    Nack { delay_ms: u64 },
    /// Keep the lease `ms` longer from now.
    Extend { ms: u64 },
}

/// One dispatch: what to deliver or dead-letter now, and when something next becomes due.
#[derive(Debug, Default)]
pub struct Dispatched {
    pub dispatch: Dispatch,
    /// Wall-clock ms of the next lease expiry or delayed message, if any.
    pub next_event_ms: Option<u64>,
    pub now_ms: u64,
}

/// One partition of a topic.
pub struct Partition<S: Storage> {
    topic: String,
    id: u32,
    log: Log<S>,
    subs: RefCell<BTreeMap<String, QueueState>>,
    /// Durable ack state from the state log, taken by a subscription on first use.
    restored: RefCell<BTreeMap<String, QueueAcks>>,
    /// Woken when a subscription's state changes (acks, nacks, disconnects, expiries).
    queue_changed: Notify,
    clock: Rc<dyn Clock>,
}

impl<S: Storage> Partition<S> {
    /// Opens (recovers) the partition's log in `dir`.
    pub async fn open(
        storage: S,
        dir: &Path,
        cfg: LogConfig,
        topic: &str,
        id: u32,
        clock: Rc<dyn Clock>,
    ) -> Result<Self, StorageError> {
        let log = Log::open(storage, dir, cfg).await?;
        Ok(Self {
            topic: topic.to_string(),
            id,
            log,
            subs: RefCell::new(BTreeMap::new()),
            restored: RefCell::new(BTreeMap::new()),
            queue_changed: Notify::new(),
            clock,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The log, for offsets, health and periodic work (ticks, retention, sync).
    pub fn log(&self) -> &Log<S> {
        &self.log
    }

    /// Wakes when committed data or the log's state changes.
    pub fn data_changed(&self) -> crate::runtime::notify::Wait<'_> {
        self.log.data_changed()
    }

    /// Wakes when a subscription's state changes.
    pub fn queue_changed(&self) -> crate::runtime::notify::Wait<'_> {
        self.queue_changed.wait()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now_ms()).unwrap_or(0)
    }

    // ---- stream ------------------------------------------------------------------------

    /// Appends a verified batch (in call order). Records without a timestamp get the
    /// partition clock's time. The batch is not acknowledged yet: see [`Self::acknowledged`].
    pub async fn produce(&self, batch: &VerifiedBatch) -> Result<Appended, PartitionError> {
        self.log.reserve().await?;
        self.append(batch)
    }

    /// The stored-batch metadata of a verified batch: records without a timestamp get the
    /// partition clock's time.
    fn batch_meta(&self, batch: &VerifiedBatch) -> BatchMeta {
        let facts = batch.facts();
        let (first, max) = if facts.max_timestamp_ms > 0 {
            (facts.first_timestamp_ms, facts.max_timestamp_ms)
        } else {
            let now = self.clock.now_ms();
            (now, now)
        };
        BatchMeta {
            format: FormatTag::RingmqFlatbuffers,
            record_count: facts.record_count,
            first_timestamp_ms: first,
            max_timestamp_ms: max,
        }
    }

    /// A replicated partition: the Raft entry data of a verified batch (a stored batch with
    /// base offset and term 0; each replica stamps its own when it stores it).
    pub fn entry_data(&self, batch: &VerifiedBatch) -> Vec<u8> {
        batch::encode_with_term(&self.batch_meta(batch), 0, 0, batch.bytes())
    }

    /// [`Self::produce`] without waiting for room in the write buffer (the caller reserved).
    fn append(&self, batch: &VerifiedBatch) -> Result<Appended, PartitionError> {
        if self.log.config().commit_policy == CommitPolicy::External {
            // Every append to a replicated log goes through its Raft group (entry_data).
            return Err(PartitionError::Storage(StorageError::InvalidBatch(
                "a replicated partition takes appends only through its Raft group".into(),
            )));
        }
        let facts = batch.facts();
        let meta = self.batch_meta(batch);
        let info = self.log.append_buffered(meta, batch.bytes())?;
        Ok(Appended {
            info,
            record_count: facts.record_count,
        })
    }

    /// Resolves once the batch is committed: on one node when it is durable under the log's
    /// durability; with an external commit policy (replication) when the commit index passes
    /// it. `Storage(Truncated)` if it was cut before that.
    pub async fn acknowledged(&self, a: &Appended) -> Result<(), PartitionError> {
        match self.log.config().commit_policy {
            CommitPolicy::FollowDurability => self.log.wait_durable(a.info).await?,
            CommitPolicy::External => self.log.wait_committed(a.info).await?,
        }
        Ok(())
    }

    /// Whole committed batches from `offset`, up to about `max_bytes`.
    pub async fn fetch(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadBatches, PartitionError> {
        Ok(self.log.read(offset, max_bytes).await?)
    }

    /// -1: the log start; -2: the end (next offset); otherwise the first offset whose
    /// timestamp is ≥ `timestamp_ms`.
    pub async fn list_offset(&self, timestamp_ms: i64) -> Result<u64, PartitionError> {
        match timestamp_ms {
            -1 => Ok(self.log.start_offset()),
            -2 => Ok(self.log.end_offset()),
            t if t >= 0 => Ok(self.log.offset_for_timestamp(t).await?),
            t => Err(PartitionError::InvalidTimestamp(t)),
        }
    }

    // ---- queue subscriptions ------------------------------------------------------------

    /// Hands over the durable ack state recovered from the state log.
    pub fn restore_subscriptions(&self, acks: impl IntoIterator<Item = (String, QueueAcks)>) {
        self.restored.borrow_mut().extend(acks);
    }

    /// Creates the subscription on first use (at the log start, or its end with `latest`),
    /// from its restored ack state if there is one; within
    /// [`limits::SUBSCRIPTIONS_PER_PARTITION_MAX`]. An existing subscription keeps its config.
    pub fn subscribe(&self, sub: &str, cfg: SubConfig, latest: bool) -> Result<(), PartitionError> {
        let have = self.subs.borrow().len();
        if self.subs.borrow().contains_key(sub) {
            return Ok(());
        }
        if have >= limits::SUBSCRIPTIONS_PER_PARTITION_MAX {
            return Err(PartitionError::TooManySubscriptions {
                partition: format!("{}-{}", self.topic, self.id),
                have,
            });
        }
        let start = if latest {
            self.log.end_offset()
        } else {
            self.log.start_offset()
        };
        let mut st = QueueState::new(cfg, start);
        if let Some(r) = self.restored.borrow_mut().remove(sub) {
            st.restore(r.floor.max(self.log.start_offset()), r.acked);
        }
        self.subs.borrow_mut().insert(sub.to_string(), st);
        Ok(())
    }

    /// The dead-letter topic of a subscription.
    pub fn dead_letter_topic(&self, sub: &str) -> Option<String> {
        self.subs
            .borrow()
            .get(sub)
            .map(|s| s.cfg.dead_letter_topic.clone())
    }

    /// Reads new committed records into the subscription's pending set, within its ack-state
    /// room, and only as far ahead as `credit` needs.
    pub async fn refill(&self, sub: &str, credit: usize) -> Result<(), PartitionError> {
        let (cursor, room, pending) = match self.subs.borrow().get(sub) {
            Some(s) => {
                let (c, r) = s.read_window();
                (c, r, s.pending())
            }
            None => return Ok(()),
        };
        if room == 0 || pending >= credit.max(1) * 2 || cursor >= self.log.end_offset() {
            return Ok(());
        }
        let from = cursor.max(self.log.start_offset());
        let r = self.log.read(from, QUEUE_READ_BYTES).await?;
        let mut subs = self.subs.borrow_mut();
        let Some(s) = subs.get_mut(sub) else {
            return Ok(());
        };
        if from > cursor {
            s.skip_to(from);
        }
        let mut added = 0;
        for stored in &r.batches {
            if let Some(h) = control_batch(stored) {
                // No message at these offsets: settled as if acknowledged.
                s.skip_control(h.base_offset, h.next_offset());
                continue;
            }
            let Some((h, rb)) = stored_batch(stored) else {
                continue;
            };
            for (i, rec) in rb.records().iter().enumerate() {
                let o = h.base_offset + i as u64;
                if o < s.read_window().0 {
                    continue;
                }
                if added >= room {
                    return Ok(());
                }
                s.add_read(
                    o,
                    rec.key().map(|k| k.bytes().to_vec()),
                    deliver_at_ms(&rec),
                );
                added += 1;
            }
        }
        Ok(())
    }

    /// Expires overdue leases, then leases up to `credit` messages to `consumer`. `None` if the
    /// subscription does not exist.
    pub fn dispatch(&self, sub: &str, consumer: u64, credit: usize) -> Option<Dispatched> {
        let now_ms = self.now_ms();
        let mut subs = self.subs.borrow_mut();
        let s = subs.get_mut(sub)?;
        s.expire(now_ms);
        let dispatch = s.dispatch(consumer, credit, now_ms);
        Some(Dispatched {
            dispatch,
            next_event_ms: s.next_event_ms(),
            now_ms,
        })
    }

    /// Of `offsets`, those the subscription would ack now (in flight or pending).
    pub fn ackable(&self, sub: &str, offsets: &[u64]) -> Result<Vec<u64>, PartitionError> {
        match self.subs.borrow().get(sub) {
            Some(s) => Ok(s.ackable(offsets)),
            None => Err(PartitionError::UnknownSubscription(sub.to_string())),
        }
    }

    /// Applies acks that are durable in the state log; returns how many were newly acked.
    pub fn apply_ack(&self, sub: &str, offsets: &[u64]) -> usize {
        let n = self
            .subs
            .borrow_mut()
            .get_mut(sub)
            .map(|s| s.apply_ack(offsets))
            .unwrap_or(0);
        self.queue_changed.notify_all();
        n
    }

    /// Nack or extend leases; returns how many were in flight.
    pub fn settle(&self, sub: &str, how: Settle, offsets: &[u64]) -> usize {
        let now = self.now_ms();
        let n = self
            .subs
            .borrow_mut()
            .get_mut(sub)
            .map(|s| match how {
                Settle::Nack { delay_ms } => s.nack(offsets, delay_ms, now),
                Settle::Extend { ms } => s.extend(offsets, ms, now),
            })
            .unwrap_or(0);
        self.queue_changed.notify_all();
        n
    }

    /// Dead-lettering failed (or its ack could not be recorded): the messages return to
    /// pending and are dead-lettered again later.
    pub fn dead_letter_failed(&self, sub: &str, offsets: &[u64]) {
        let now = self.now_ms();
        if let Some(s) = self.subs.borrow_mut().get_mut(sub) {
            for o in offsets {
                s.dead_letter_failed(*o, now);
            }
        }
        self.queue_changed.notify_all();
    }

    /// A consumer went away: its leases return at once. Returns how many.
    pub fn release_consumer(&self, consumer: u64) -> usize {
        let now = self.now_ms();
        let n: usize = self
            .subs
            .borrow_mut()
            .values_mut()
            .map(|s| s.release_consumer(consumer, now))
            .sum();
        if n > 0 {
            self.queue_changed.notify_all();
        }
        n
    }

    /// Expires overdue leases of every subscription, waking waiting fetches if any expired.
    pub fn expire_leases(&self) {
        let now = self.now_ms();
        let mut any = false;
        for s in self.subs.borrow_mut().values_mut() {
            let before = s.in_flight();
            s.expire(now);
            any |= s.in_flight() != before;
        }
        if any {
            self.queue_changed.notify_all();
        }
    }

    /// The durable ack state of every subscription (state-log compaction), including the
    /// restored state of subscriptions nobody has fetched from since the restart (a snapshot
    /// without it would forget their acks).
    pub fn subscription_acks(&self) -> Vec<(String, QueueAcks)> {
        let mut out: Vec<(String, QueueAcks)> = self
            .subs
            .borrow()
            .iter()
            .map(|(name, s)| {
                let acks = QueueAcks {
                    floor: s.floor(),
                    acked: s.acked_above_floor().copied().collect(),
                };
                (name.clone(), acks)
            })
            .collect();
        let restored = self.restored.borrow();
        out.extend(restored.iter().map(|(n, a)| (n.clone(), a.clone())));
        out
    }

    /// Counters of the subscriptions on this partition (all, or only `only`).
    pub fn subscription_stats(&self, only: Option<&str>) -> Vec<SubStatsOut> {
        let end = self.log.end_offset();
        self.subs
            .borrow()
            .iter()
            .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
            .map(|(name, s)| SubStatsOut {
                topic: self.topic.clone(),
                subscription: name.clone(),
                key_shared: s.cfg.key_shared,
                backlog: s.backlog(end),
                in_flight: s.in_flight() as u64,
                redeliveries: s.redeliveries,
                dead_lettered: s.dead_lettered,
                acked: s.acked_total,
            })
            .collect()
    }

    /// Loads the stored batches holding `offsets`, to build a delivery or a dead letter.
    pub async fn records(&self, offsets: impl IntoIterator<Item = u64>) -> Records {
        let mut r = Records(Vec::new());
        for o in offsets {
            r.load(&self.log, o).await;
        }
        r
    }
}

/// The delivery time a record asks for in its `DELIVER_AT_HEADER` (0 = now).
fn deliver_at_ms(rec: &fb::Record<'_>) -> u64 {
    rec.headers()
        .and_then(|hs| hs.iter().find(|x| x.key() == DELIVER_AT_HEADER))
        .and_then(|x| {
            std::str::from_utf8(x.value()?.bytes())
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
}

/// The header of a replication control batch (no messages at its offsets), `None` for others.
fn control_batch(stored: &[u8]) -> Option<batch::BatchHeader> {
    batch::decode_header(stored)
        .ok()
        .filter(|h| h.format == FormatTag::Control)
}

/// The header and `RecordBatch` of a stored batch read from a partition's own log; `None` for
/// batches in another format or whose record count disagrees with the header.
fn stored_batch(stored: &[u8]) -> Option<(batch::BatchHeader, fb::RecordBatch<'_>)> {
    let h = batch::decode_header(stored).ok()?;
    if h.format != FormatTag::RingmqFlatbuffers || stored.len() < h.stored_len() {
        return None;
    }
    // SAFETY: a RingmqFlatbuffers batch in this log was appended from a `VerifiedBatch`, and
    // reads check the batch CRC.
    let rb =
        unsafe { proto::stored_record_batch(&batch::payload(stored)[..h.payload_len as usize]) };
    if rb.records().len() as u64 != u64::from(h.record_count) {
        return None;
    }
    Some((h, rb))
}

/// Stored batches loaded to build a response: (base offset, next offset, max timestamp,
/// stored bytes), sorted by base offset.
pub struct Records(Vec<(u64, u64, i64, Bytes)>);

impl Records {
    /// The record at `offset` and its timestamp (the batch's when the record has none).
    pub fn find(&self, offset: u64) -> Option<(i64, fb::Record<'_>)> {
        let i = self.0.partition_point(|b| b.1 <= offset);
        let (base, next, max_ts, bytes) = self.0.get(i)?;
        if offset < *base || offset >= *next {
            return None;
        }
        let (_, rb) = stored_batch(bytes)?;
        let r = rb.records().get((offset - base) as usize);
        let ts = if r.timestamp_ms() > 0 {
            r.timestamp_ms()
        } else {
            *max_ts
        };
        Some((ts, r))
    }

    async fn load<S: Storage>(&mut self, log: &Log<S>, offset: u64) {
        if self.find(offset).is_some() {
            return;
        }
        let Ok(r) = log.read(offset, 1).await else {
            return;
        };
        for b in r.batches {
            let Some((h, _)) = stored_batch(&b) else {
                continue;
            };
            if self.0.iter().any(|x| x.0 == h.base_offset) {
                continue;
            }
            let i = self.0.partition_point(|x| x.0 < h.base_offset);
            let entry = (h.base_offset, h.next_offset(), h.max_timestamp_ms, b);
            self.0.insert(i, entry);
        }
    }
}
