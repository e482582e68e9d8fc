//! The partition log: append with group commit, reads from the tail cache or segments,
//! recovery on open, retention, and the refusal to acknowledge after an I/O error.
//!
//! Owns: the segments of one directory and the in-memory state around them. Must not touch:
//! other logs, the network, timers (the caller drives [`Log::tick`] and passes the time).
//!
//! Group commit: an appender pushes its batch on `pending` and calls `commit`. If no flush is
//! running it becomes the flusher: it takes everything pending, writes it as one aligned write
//! at the next block boundary and (under `Always`) fdatasyncs once. Appends that arrive while a
//! flush runs wait and share the next one.
//!
//! Three offsets, never decreasing except where said: `log_end` (offsets assigned),
//! `durable_end` (fdatasynced), and `committed_end`, the high watermark: readers see only
//! offsets below it. Under [`CommitPolicy::FollowDurability`] (a single node) it follows the
//! durability policy exactly as before; under [`CommitPolicy::External`] (replication) only
//! [`Log::advance_commit`] moves it. It never goes back (asserted in release builds). Only an
//! uncommitted suffix can be removed ([`Log::truncate_suffix`]), and that moves `log_end` and
//! `durable_end` back to the cut.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::batch::{self, BatchHeader, BatchMeta};
use super::io::{Storage, StorageFile};
use super::segment::{self, align_up, Segment};
use super::StorageError;
use crate::limits;
use crate::runtime::Notify;

/// When an append is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After fdatasync; concurrent appends share one (group commit). The default.
    Always,
    /// After buffering; [`Log::tick`] writes and fdatasyncs at most every this many ms.
    IntervalMs(u64),
    /// After buffering; [`Log::tick`] writes without fdatasync.
    Never,
}

/// Who moves the commit index (the high watermark readers see and acknowledgements wait for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitPolicy {
    /// A single node: committed as soon as durable under the log's [`Durability`]
    /// (`Always`: fdatasynced; `IntervalMs` / `Never`: buffered).
    #[default]
    FollowDurability,
    /// Replicated: only [`Log::advance_commit`] moves it (after a majority persisted).
    External,
}

/// Configuration of one log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub segment_bytes_max: u64,
    pub index_interval_bytes: u64,
    pub durability: Durability,
    pub tail_cache_bytes_max: usize,
    pub write_buffer_bytes_max: usize,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    pub commit_policy: CommitPolicy,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: limits::SEGMENT_BYTES_MAX_DEFAULT,
            index_interval_bytes: limits::INDEX_INTERVAL_BYTES_DEFAULT,
            durability: Durability::Always,
            tail_cache_bytes_max: limits::TAIL_CACHE_BYTES_DEFAULT,
            write_buffer_bytes_max: limits::WRITE_BUFFER_BYTES_DEFAULT,
            retention_bytes: None,
            retention_ms: None,
            commit_policy: CommitPolicy::FollowDurability,
        }
    }
}

/// The result of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    /// Offset after the batch's last record.
    pub next_offset: u64,
    /// How many truncations the log had seen when the batch was appended: a waiter whose
    /// batch was cut learns it even if new batches have since reached the same offsets.
    pub epoch: u64,
}

/// Whole stored batches (header + payload, as written) from a read.
#[derive(Clone, Debug, Default)]
pub struct ReadBatches {
    pub batches: Vec<Bytes>,
    /// Offset to read next.
    pub next_offset: u64,
    pub log_start: u64,
    pub log_end: u64,
}

/// What recovery cut from the active segment.
#[derive(Clone, Debug)]
pub struct Truncation {
    pub segment: PathBuf,
    pub at_pos: u64,
    pub cut_bytes: u64,
    pub reason: String,
}

/// What [`Log::open`] found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub truncated: Option<Truncation>,
    pub rebuilt_indexes: Vec<PathBuf>,
}

#[derive(Clone)]
struct StoredBatch {
    header: BatchHeader,
    bytes: Bytes,
}

/// Counters of one log since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appends: u64,
    pub flushes: u64,
    pub fdatasyncs: u64,
    pub bytes_written: u64,
}

struct State<F> {
    stats: LogStats,
    segments: BTreeMap<u64, Segment<F>>,
    next_offset: u64,
    log_start: u64,
    pending: Vec<StoredBatch>,
    pending_bytes: usize,
    written_end: u64,
    durable_end: u64,
    /// The high watermark: readers see offsets below it; see the module doc.
    committed_end: u64,
    /// A truncation is running: the commit index and retention wait (they would race it).
    truncating: bool,
    /// Truncations so far, and the recent cuts as (epoch after the cut, cut offset).
    truncation_epoch: u64,
    recent_cuts: VecDeque<(u64, u64)>,
    /// The term stamped on batches appended now (replication sets it; 0 on a single node).
    leader_term: u32,
    unsynced_writes: bool,
    flushing: bool,
    failed: Option<String>,
    cache: VecDeque<StoredBatch>,
    cache_bytes: usize,
    last_sync: Instant,
}

/// One partition's log. Share it on one executor with `Rc<Log<S>>`.
pub struct Log<S: Storage> {
    storage: S,
    dir: PathBuf,
    cfg: LogConfig,
    st: RefCell<State<S::File>>,
    flushed: Notify,
    data: Notify,
    report: RecoveryReport,
}

impl<S: Storage> Log<S> {
    /// Opens (or creates) the log in `dir`, recovering as described in the module doc.
    pub async fn open(storage: S, dir: &Path, cfg: LogConfig) -> Result<Self, StorageError> {
        storage
            .create_dir_all(dir)
            .await
            .map_err(|e| StorageError::io(dir, "create dir", e))?;
        let names = storage
            .list_dir(dir)
            .await
            .map_err(|e| StorageError::io(dir, "list dir", e))?;
        let mut bases: Vec<u64> = names
            .iter()
            .filter_map(|n| segment::parse_segment_file_name(n))
            .collect();
        bases.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segments = BTreeMap::new();
        if bases.is_empty() {
            let seg = create_segment(&storage, dir, 0).await?;
            segments.insert(0, seg);
        }
        let mut expected: Option<u64> = None;
        for (i, &base) in bases.iter().enumerate() {
            if let Some(exp) = expected {
                if exp != base {
                    return Err(StorageError::Corrupt {
                        path: dir.join(segment::segment_file_name(base)),
                        pos: 0,
                        reason: format!("segment starts at offset {base}, previous ends at {exp}"),
                    });
                }
            }
            let active = i + 1 == bases.len();
            let seg = if active {
                recover_active(&storage, dir, base, &mut report).await?
            } else {
                recover_sealed(&storage, dir, base, &mut report).await?
            };
            expected = Some(seg.next_offset);
            segments.insert(base, seg);
        }
        let log_start = *segments.keys().next().unwrap_or(&0);
        let next_offset = segments
            .values()
            .next_back()
            .map(|s| s.next_offset)
            .unwrap_or(0);
        // A replicated log learns its commit index from replication after a restart.
        let committed_end = match cfg.commit_policy {
            CommitPolicy::FollowDurability => next_offset,
            CommitPolicy::External => log_start,
        };
        let intents: Vec<u64> = names.iter().filter_map(|n| parse_intent(n)).collect();
        let log = Self {
            storage,
            dir: dir.to_path_buf(),
            cfg,
            st: RefCell::new(State {
                stats: LogStats::default(),
                segments,
                next_offset,
                log_start,
                pending: Vec::new(),
                pending_bytes: 0,
                written_end: next_offset,
                durable_end: next_offset,
                committed_end,
                truncating: false,
                truncation_epoch: 0,
                recent_cuts: VecDeque::new(),
                leader_term: 0,
                unsynced_writes: false,
                flushing: false,
                failed: None,
                cache: VecDeque::new(),
                cache_bytes: 0,
                last_sync: Instant::now(),
            }),
            flushed: Notify::new(),
            data: Notify::new(),
            report,
        };
        log.finish_truncations(&intents).await?;
        Ok(log)
    }

    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// Changes retention (topic config) at run time.
    pub fn set_retention(&mut self, bytes: Option<u64>, ms: Option<u64>) {
        self.cfg.retention_bytes = bytes;
        self.cfg.retention_ms = ms;
    }

    /// First offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.st.borrow().log_start
    }

    /// Offset after the last record readers may see: the commit index (high watermark).
    pub fn end_offset(&self) -> u64 {
        self.st.borrow().committed_end
    }

    /// Offset after the last record assigned (committed or not).
    pub fn log_end(&self) -> u64 {
        self.st.borrow().next_offset
    }

    /// Offset after the last record fdatasynced.
    pub fn durable_end(&self) -> u64 {
        self.st.borrow().durable_end
    }

    /// The term stamped on batches appended from now on.
    pub fn set_leader_term(&self, term: u32) {
        self.st.borrow_mut().leader_term = term;
    }

    /// Moves the commit index up to `offset` (replication: a majority persisted everything
    /// below it). Panics if it would move back: that is a bug in the caller, and serving a
    /// high watermark that went back could show readers data that later disappears.
    pub fn advance_commit(&self, offset: u64) -> Result<(), StorageError> {
        {
            let mut st = self.st.borrow_mut();
            assert!(
                offset >= st.committed_end,
                "commit index of {} would move back from {} to {offset}",
                self.dir.display(),
                st.committed_end
            );
            if self.cfg.commit_policy != CommitPolicy::External {
                return Err(StorageError::InvalidTruncation(
                    "the commit index follows durability on this log".into(),
                ));
            }
            if st.truncating {
                return Err(StorageError::InvalidTruncation(
                    "a truncation is running; commit after it".into(),
                ));
            }
            if offset > st.next_offset {
                return Err(StorageError::OffsetOutOfRange {
                    offset,
                    start: st.committed_end,
                    end: st.next_offset,
                });
            }
            st.committed_end = offset;
        }
        self.data.notify_all();
        Ok(())
    }

    /// Resolves once the batch of `info` is committed; `Truncated` if it was removed first
    /// (even if other batches have since reached the same offsets).
    pub async fn wait_committed(&self, info: AppendInfo) -> Result<(), StorageError> {
        let offset = info.next_offset;
        loop {
            let wait = self.data.wait();
            self.check_not_cut(&info)?;
            {
                let st = self.st.borrow();
                check_failed(&st)?;
                if st.committed_end >= offset {
                    return Ok(());
                }
                if st.next_offset < offset {
                    return Err(StorageError::Truncated {
                        offset: st.next_offset,
                    });
                }
            }
            wait.await;
        }
    }

    /// Total bytes of segment files.
    pub fn size_bytes(&self) -> u64 {
        self.st
            .borrow()
            .segments
            .values()
            .map(|s| s.write_pos)
            .sum()
    }

    pub fn segment_count(&self) -> usize {
        self.st.borrow().segments.len()
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        self.st.borrow().stats
    }

    /// Why the log refuses appends, if it does.
    pub fn failure(&self) -> Option<String> {
        self.st.borrow().failed.clone()
    }

    /// Completes when new data may have become visible (or the log failed). Create the future
    /// before checking `end_offset` to not miss a wakeup.
    pub fn data_changed(&self) -> crate::runtime::notify::Wait<'_> {
        self.data.wait()
    }

    /// Appends one batch; resolves once it is durable under the log's [`Durability`].
    pub async fn append(
        &self,
        meta: BatchMeta,
        payload: &[u8],
    ) -> Result<AppendInfo, StorageError> {
        self.reserve().await?;
        let info = self.append_buffered(meta, payload)?;
        self.wait_durable(info).await?;
        Ok(info)
    }

    /// Backpressure: with twice the write buffer pending, help flush before adding more.
    /// Callers that must keep appends in order await this, then call
    /// [`Log::append_buffered`] with no await in between.
    pub async fn reserve(&self) -> Result<(), StorageError> {
        loop {
            let (over, target) = {
                let st = self.st.borrow();
                check_failed(&st)?;
                (
                    st.pending_bytes >= self.cfg.write_buffer_bytes_max * 2,
                    st.next_offset,
                )
            };
            if !over {
                return Ok(());
            }
            self.commit(target, false).await?;
        }
    }

    /// Assigns offsets and buffers the batch, without waiting. Appends are ordered by the
    /// order of these calls. Not yet acknowledged: await [`Log::wait_durable`] for that.
    pub fn append_buffered(
        &self,
        meta: BatchMeta,
        payload: &[u8],
    ) -> Result<AppendInfo, StorageError> {
        if payload.len() > limits::BATCH_BYTES_MAX {
            return Err(StorageError::BatchTooLarge {
                bytes: payload.len(),
                max: limits::BATCH_BYTES_MAX,
            });
        }
        if meta.record_count == 0 {
            return Err(StorageError::InvalidBatch("zero records".into()));
        }
        let info = self.push_pending(meta, payload)?;
        if self.cfg.durability != Durability::Always {
            self.data.notify_all();
        }
        Ok(info)
    }

    /// Resolves once the batch of `info` is durable under the log's [`Durability`];
    /// `Truncated` if it was cut first.
    pub async fn wait_durable(&self, info: AppendInfo) -> Result<(), StorageError> {
        self.check_not_cut(&info)?;
        self.wait_durable_offsets(info).await?;
        self.check_not_cut(&info)
    }

    /// `Truncated` if a truncation since `info`'s append removed its batch.
    fn check_not_cut(&self, info: &AppendInfo) -> Result<(), StorageError> {
        let st = self.st.borrow();
        if info.epoch == st.truncation_epoch {
            return Ok(());
        }
        let known_since = st.recent_cuts.front().map(|c| c.0 <= info.epoch + 1);
        let cut = st
            .recent_cuts
            .iter()
            .filter(|(e, _)| *e > info.epoch)
            .map(|c| c.1)
            .min();
        match (known_since, cut) {
            (Some(true), Some(c)) if c > info.base_offset => Ok(()),
            (Some(true), None) => Ok(()),
            // Cut at or below the batch, or too many truncations ago to tell: removed.
            _ => Err(StorageError::Truncated {
                offset: cut.unwrap_or(info.base_offset),
            }),
        }
    }

    async fn wait_durable_offsets(&self, info: AppendInfo) -> Result<(), StorageError> {
        match self.cfg.durability {
            Durability::Always => self.commit(info.next_offset, true).await,
            Durability::IntervalMs(_) | Durability::Never => {
                let over = self.st.borrow().pending_bytes >= self.cfg.write_buffer_bytes_max;
                if over {
                    self.commit(info.next_offset, false).await?;
                }
                Ok(())
            }
        }
    }

    fn push_pending(&self, meta: BatchMeta, payload: &[u8]) -> Result<AppendInfo, StorageError> {
        let mut st = self.st.borrow_mut();
        check_failed(&st)?;
        let base = st.next_offset;
        let bytes = Bytes::from(batch::encode_with_term(
            &meta,
            base,
            st.leader_term,
            payload,
        ));
        let header =
            batch::decode_header(&bytes).map_err(|e| StorageError::InvalidBatch(e.to_string()))?;
        let sb = StoredBatch { header, bytes };
        st.next_offset = header.next_offset();
        st.stats.appends += 1;
        st.pending_bytes += sb.bytes.len();
        st.cache_bytes += sb.bytes.len();
        st.pending.push(sb.clone());
        st.cache.push_back(sb);
        evict_cache(&mut st, self.cfg.tail_cache_bytes_max);
        follow_durability(&mut st, &self.cfg);
        let info = AppendInfo {
            base_offset: base,
            next_offset: header.next_offset(),
            epoch: st.truncation_epoch,
        };
        Ok(info)
    }

    /// Ensures all offsets below `target` are written (and synced if `sync`), becoming the
    /// flusher if none runs.
    async fn commit(&self, target: u64, sync: bool) -> Result<(), StorageError> {
        loop {
            let wait = {
                let st = self.st.borrow();
                check_failed(&st)?;
                if st.next_offset < target {
                    return Err(StorageError::Truncated {
                        offset: st.next_offset,
                    });
                }
                if st.written_end >= target && (!sync || st.durable_end >= target) {
                    return Ok(());
                }
                st.flushing
            };
            if wait {
                self.flushed.wait().await;
                continue;
            }
            self.st.borrow_mut().flushing = true;
            let res = self.flush_once(sync).await;
            {
                let mut st = self.st.borrow_mut();
                st.flushing = false;
                if let Err(e) = &res {
                    st.failed = Some(e.to_string());
                }
                evict_cache(&mut st, self.cfg.tail_cache_bytes_max);
            }
            self.flushed.notify_all();
            self.data.notify_all();
            res?;
        }
    }

    /// Writes everything pending (rolling segments as needed) and fdatasyncs if `sync`.
    async fn flush_once(&self, sync: bool) -> Result<(), StorageError> {
        let batches = {
            let mut st = self.st.borrow_mut();
            st.pending_bytes = 0;
            std::mem::take(&mut st.pending)
        };
        let mut i = 0;
        while i < batches.len() {
            let taken = self.write_into_active(&batches[i..]).await?;
            i += taken;
            if i < batches.len() {
                self.roll(batches[i].header.base_offset).await?;
            }
        }
        if sync {
            let (file, path, dirty, written) = {
                let st = self.st.borrow();
                let seg = active(&st);
                (
                    seg.file.clone(),
                    seg.path.clone(),
                    st.unsynced_writes,
                    st.written_end,
                )
            };
            if dirty {
                file.sync_data()
                    .await
                    .map_err(|e| StorageError::io(&path, "fdatasync", e))?;
                self.st.borrow_mut().stats.fdatasyncs += 1;
            }
            let mut st = self.st.borrow_mut();
            st.durable_end = written;
            st.unsynced_writes = false;
            st.last_sync = Instant::now();
            follow_durability(&mut st, &self.cfg);
        }
        Ok(())
    }

    /// Writes a prefix of `batches` that fits the active segment as one aligned write; returns
    /// how many were written (0 means: roll first).
    async fn write_into_active(&self, batches: &[StoredBatch]) -> Result<usize, StorageError> {
        let (file, path, start_pos, seg_empty) = {
            let st = self.st.borrow();
            let seg = active(&st);
            (
                seg.file.clone(),
                seg.path.clone(),
                seg.write_pos,
                seg.is_empty(),
            )
        };
        let mut buf = Vec::new();
        let mut placed = Vec::new();
        for b in batches {
            let end = start_pos + buf.len() as u64 + b.bytes.len() as u64;
            let fits = end <= self.cfg.segment_bytes_max || (seg_empty && placed.is_empty());
            if !fits {
                break;
            }
            placed.push((b.header, start_pos + buf.len() as u64));
            buf.extend_from_slice(&b.bytes);
        }
        if placed.is_empty() {
            return Ok(0);
        }
        buf.resize(align_up(buf.len() as u64) as usize, 0);
        file.write_at(start_pos, &buf)
            .await
            .map_err(|e| StorageError::io(&path, "write", e))?;
        let mut st = self.st.borrow_mut();
        st.stats.flushes += 1;
        st.stats.bytes_written += buf.len() as u64;
        let interval = self.cfg.index_interval_bytes;
        let seg = active_mut(&mut st);
        for (h, pos) in &placed {
            seg.record_batch(h, *pos, interval);
        }
        seg.write_pos = start_pos + buf.len() as u64;
        let next = seg.next_offset;
        st.written_end = next;
        st.unsynced_writes = true;
        Ok(placed.len())
    }

    /// Seals the active segment (synced, indexes written) and starts one at `new_base`.
    async fn roll(&self, new_base: u64) -> Result<(), StorageError> {
        let (file, path) = {
            let st = self.st.borrow();
            let seg = active(&st);
            (seg.file.clone(), seg.path.clone())
        };
        file.sync_data()
            .await
            .map_err(|e| StorageError::io(&path, "fdatasync", e))?;
        {
            let mut st = self.st.borrow_mut();
            st.stats.fdatasyncs += 1;
            st.durable_end = st.written_end;
            st.unsynced_writes = false;
            follow_durability(&mut st, &self.cfg);
        }
        // Index files are written from a snapshot so no borrow is held across the awaits.
        let snapshot = {
            let st = self.st.borrow();
            let seg = active(&st);
            let mut s = Segment::new(seg.base_offset, seg.file.clone(), seg.path.clone());
            s.offset_index = seg.offset_index.clone();
            s.time_index = seg.time_index.clone();
            s.data_end = seg.data_end;
            s.next_offset = seg.next_offset;
            s.max_timestamp_ms = seg.max_timestamp_ms;
            s
        };
        snapshot.write_indexes(&self.storage, &self.dir).await?;
        let seg = create_segment(&self.storage, &self.dir, new_base).await?;
        let mut st = self.st.borrow_mut();
        active_mut(&mut st).sealed = true;
        st.segments.insert(new_base, seg);
        Ok(())
    }

    /// Periodic work under `IntervalMs` and `Never`: write what is buffered, and fdatasync when
    /// the interval has passed. Call every few ms from the owning shard.
    pub async fn tick(&self, now: Instant) -> Result<(), StorageError> {
        let (target, due_sync) = {
            let st = self.st.borrow();
            if st.failed.is_some() {
                return Ok(());
            }
            let due = match self.cfg.durability {
                Durability::IntervalMs(ms) => {
                    let dirty = st.unsynced_writes || !st.pending.is_empty();
                    dirty && now.duration_since(st.last_sync) >= Duration::from_millis(ms)
                }
                _ => false,
            };
            (st.next_offset, due)
        };
        match self.cfg.durability {
            Durability::Always => Ok(()),
            _ => self.commit(target, due_sync).await,
        }
    }

    /// Writes and fdatasyncs everything appended so far (shutdown, tests).
    pub async fn sync(&self) -> Result<(), StorageError> {
        let target = self.st.borrow().next_offset;
        self.commit(target, true).await
    }

    /// Removes every batch at or after `offset`, which must be a batch boundary at or above
    /// the commit index (a replication follower whose uncommitted suffix diverged). Appenders
    /// waiting on removed batches get [`StorageError::Truncated`].
    ///
    /// Crash-safe: before anything on disk changes, an intent file names the cut, and
    /// [`Log::open`] finishes an interrupted truncation, so a crash recovers to the cut log,
    /// never to a mix; a crash before the intent file is durable recovers the whole log.
    pub async fn truncate_suffix(&self, offset: u64) -> Result<(), StorageError> {
        self.become_flusher().await?;
        let res = self.truncate_exclusive(offset).await;
        {
            let mut st = self.st.borrow_mut();
            st.flushing = false;
            // After a change on disk, any error leaves memory and disk apart: stop the log.
            if let Err(e @ (StorageError::Io { .. } | StorageError::Corrupt { .. })) = &res {
                st.failed = Some(e.to_string());
            }
        }
        self.flushed.notify_all();
        self.data.notify_all();
        res
    }

    /// Drops every batch and starts the log empty at `offset`: a replica whose leader's
    /// retention deleted the entries it lacks skips to where the leader's log starts (Kafka's
    /// follower does the same when it falls behind the leader's log start). Waiters on dropped
    /// batches get [`StorageError::Truncated`].
    ///
    /// Crash: segments go oldest first, then the new one is created; a crash in between leaves
    /// a shorter or empty log, which the caller finishes by calling this again (the replica
    /// state, saved first, says where the log must start).
    pub async fn reset_to(&self, offset: u64) -> Result<(), StorageError> {
        self.become_flusher().await?;
        self.st.borrow_mut().truncating = true;
        let res = self.reset_inner(offset).await;
        {
            let mut st = self.st.borrow_mut();
            st.truncating = false;
            st.flushing = false;
            if let Err(e) = &res {
                st.failed = Some(e.to_string());
            }
        }
        self.flushed.notify_all();
        self.data.notify_all();
        res
    }

    async fn reset_inner(&self, offset: u64) -> Result<(), StorageError> {
        let bases: Vec<u64> = self.st.borrow().segments.keys().copied().collect();
        for &base in &bases {
            self.remove_segment_files(base).await?;
        }
        let seg = create_segment(&self.storage, &self.dir, offset).await?;
        let mut st = self.st.borrow_mut();
        st.segments.clear();
        st.segments.insert(offset, seg);
        st.log_start = offset;
        st.pending.clear();
        st.pending_bytes = 0;
        st.cache.clear();
        st.cache_bytes = 0;
        st.next_offset = offset;
        st.written_end = offset;
        st.durable_end = offset;
        st.committed_end = offset;
        st.unsynced_writes = false;
        record_cut(&mut st, offset);
        Ok(())
    }

    /// Waits until no flush runs and takes the flusher role (no write interleaves).
    async fn become_flusher(&self) -> Result<(), StorageError> {
        loop {
            let wait = self.flushed.wait();
            {
                let mut st = self.st.borrow_mut();
                check_failed(&st)?;
                if !st.flushing {
                    st.flushing = true;
                    return Ok(());
                }
            }
            wait.await;
        }
    }

    async fn truncate_exclusive(&self, offset: u64) -> Result<(), StorageError> {
        self.st.borrow_mut().truncating = true;
        let res = self.truncate_inner(offset).await;
        self.st.borrow_mut().truncating = false;
        res
    }

    async fn truncate_inner(&self, offset: u64) -> Result<(), StorageError> {
        let (committed, next, written) = {
            let st = self.st.borrow();
            (st.committed_end, st.next_offset, st.written_end)
        };
        if offset < committed {
            return Err(StorageError::InvalidTruncation(format!(
                "offset {offset} is below the commit index {committed}"
            )));
        }
        if offset > next {
            return Err(StorageError::InvalidTruncation(format!(
                "offset {offset} is past the log end {next}"
            )));
        }
        if offset == next {
            return Ok(());
        }
        if offset >= written {
            return self.truncate_buffered(offset);
        }
        // Find the cut before anything changes: a wrong offset changes nothing.
        let cut = self.locate(offset).await?;
        let intent = self.dir.join(intent_file_name(offset));
        self.storage
            .open_file(&intent, true)
            .await
            .map_err(|e| StorageError::io(&intent, "create", e))?;
        self.sync_dir().await?;
        self.cut_on_disk(offset, cut).await?;
        self.storage
            .remove_file(&intent)
            .await
            .map_err(|e| StorageError::io(&intent, "remove", e))?;
        self.sync_dir().await
    }

    /// Drops buffered (never written) batches at or after `offset`.
    fn truncate_buffered(&self, offset: u64) -> Result<(), StorageError> {
        let mut st = self.st.borrow_mut();
        if !st.pending.iter().any(|b| b.header.base_offset == offset) {
            return Err(StorageError::InvalidTruncation(format!(
                "offset {offset} is not the start of a batch"
            )));
        }
        st.pending.retain(|b| b.header.base_offset < offset);
        st.pending_bytes = st.pending.iter().map(|b| b.bytes.len()).sum();
        drop_cached_from(&mut st, offset);
        st.next_offset = offset;
        record_cut(&mut st, offset);
        Ok(())
    }

    /// The segment holding `offset` and the file position of the batch starting there (`None`
    /// when the segment starts at `offset`).
    async fn locate(&self, offset: u64) -> Result<(u64, Option<u64>), StorageError> {
        let (base, file, path) = {
            let st = self.st.borrow();
            let Some((&base, seg)) = st.segments.range(..=offset).next_back() else {
                return Err(StorageError::InvalidTruncation(format!(
                    "offset {offset} is before the log start {}",
                    st.log_start
                )));
            };
            (base, seg.file.clone(), seg.path.clone())
        };
        if base == offset {
            return Ok((base, None));
        }
        let mut at = None;
        segment::scan(&*file, 0, base, false, |h, pos, _| {
            if h.base_offset == offset {
                at = Some(pos);
            }
            h.base_offset < offset
        })
        .await
        .map_err(|e| StorageError::io(&path, "scan", e))?;
        match at {
            Some(pos) => Ok((base, Some(pos))),
            None => Err(StorageError::InvalidTruncation(format!(
                "offset {offset} is not the start of a batch"
            ))),
        }
    }

    /// Removes the segments after the cut, cuts the one holding it, and rebuilds the in-memory
    /// state from what is left on disk (synced).
    async fn cut_on_disk(&self, offset: u64, cut: (u64, Option<u64>)) -> Result<(), StorageError> {
        let (base, pos) = cut;
        // A cut at a segment's base empties that segment in place (never delete and recreate:
        // a crash between the two would leave no segment, and the log would restart at 0).
        let pos = pos.unwrap_or(0);
        let doomed: Vec<u64> = {
            let st = self.st.borrow();
            st.segments
                .keys()
                .rev()
                .copied()
                .filter(|&b| b > base)
                .collect()
        };
        for b in doomed {
            self.st.borrow_mut().segments.remove(&b);
            self.remove_segment_files(b).await?;
        }
        let mut report = RecoveryReport::default();
        let (file, path) = {
            let st = self.st.borrow();
            let seg = st.segments.get(&base).ok_or_else(|| {
                StorageError::InvalidTruncation(format!("segment {base} vanished"))
            })?;
            (seg.file.clone(), seg.path.clone())
        };
        file.truncate(pos)
            .await
            .map_err(|e| StorageError::io(&path, "truncate", e))?;
        file.sync_data()
            .await
            .map_err(|e| StorageError::io(&path, "fdatasync", e))?;
        // Rescan what is left: indexes, next offset, write position (unsealed again).
        let seg = recover_active(&self.storage, &self.dir, base, &mut report).await?;
        let mut st = self.st.borrow_mut();
        st.segments.insert(seg.base_offset, seg);
        st.log_start = *st.segments.keys().next().unwrap_or(&offset);
        st.pending.clear();
        st.pending_bytes = 0;
        drop_cached_from(&mut st, offset);
        st.next_offset = offset;
        st.written_end = offset;
        st.durable_end = offset;
        st.unsynced_writes = false;
        record_cut(&mut st, offset);
        Ok(())
    }

    /// Finishes truncations that a crash interrupted (their intent files survived).
    async fn finish_truncations(&self, intents: &[u64]) -> Result<(), StorageError> {
        for &offset in intents {
            let next = self.st.borrow().next_offset;
            if offset < next {
                let cut = self.locate(offset).await?;
                self.cut_on_disk(offset, cut).await?;
                let mut st = self.st.borrow_mut();
                if st.committed_end > offset {
                    st.committed_end = offset;
                }
            }
            let intent = self.dir.join(intent_file_name(offset));
            self.storage
                .remove_file(&intent)
                .await
                .map_err(|e| StorageError::io(&intent, "remove", e))?;
            self.sync_dir().await?;
        }
        Ok(())
    }

    async fn sync_dir(&self) -> Result<(), StorageError> {
        self.storage
            .sync_dir(&self.dir)
            .await
            .map_err(|e| StorageError::io(&self.dir, "sync dir", e))
    }

    /// Reads whole stored batches starting with the one containing `offset`, up to `max_bytes`
    /// (at least one batch if any is there), below the commit index: what readers may see.
    pub async fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadBatches, StorageError> {
        let end = self.st.borrow().committed_end;
        self.read_below(offset, max_bytes, end).await
    }

    /// Like [`Self::read`], up to the durable end instead: committed or not (a replica
    /// rebuilding its Raft index at start; never for readers).
    pub async fn read_durable(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadBatches, StorageError> {
        let end = self.st.borrow().durable_end;
        self.read_below(offset, max_bytes, end).await
    }

    /// Like [`Self::read`], up to everything appended (written or still buffered): a
    /// replica reading back its own Raft entries, whatever the fsync policy; never for
    /// readers.
    pub async fn read_appended(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadBatches, StorageError> {
        let end = self.st.borrow().next_offset;
        self.read_below(offset, max_bytes, end).await
    }

    async fn read_below(
        &self,
        offset: u64,
        max_bytes: usize,
        end: u64,
    ) -> Result<ReadBatches, StorageError> {
        let start = self.st.borrow().log_start;
        let mut out = ReadBatches {
            batches: Vec::new(),
            next_offset: offset,
            log_start: start,
            log_end: end,
        };
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange { offset, start, end });
        }
        if offset == end {
            return Ok(out);
        }
        if self.read_from_cache(offset, max_bytes, end, &mut out) {
            return Ok(out);
        }
        self.read_from_segment(offset, max_bytes, end, &mut out)
            .await?;
        Ok(out)
    }

    fn read_from_cache(
        &self,
        offset: u64,
        max_bytes: usize,
        end: u64,
        out: &mut ReadBatches,
    ) -> bool {
        let st = self.st.borrow();
        match st.cache.front() {
            Some(f) if f.header.base_offset <= offset => {}
            _ => return false,
        }
        let i = st
            .cache
            .partition_point(|b| b.header.next_offset() <= offset);
        let mut bytes = 0;
        for b in st.cache.iter().skip(i) {
            if b.header.next_offset() > end
                || (!out.batches.is_empty() && bytes + b.bytes.len() > max_bytes)
            {
                break;
            }
            bytes += b.bytes.len();
            out.next_offset = b.header.next_offset();
            out.batches.push(b.bytes.clone());
        }
        true
    }

    async fn read_from_segment(
        &self,
        offset: u64,
        max_bytes: usize,
        end: u64,
        out: &mut ReadBatches,
    ) -> Result<(), StorageError> {
        let (file, path, pos, base, seg_end) = {
            let st = self.st.borrow();
            let Some((_, seg)) = st.segments.range(..=offset).next_back() else {
                return Err(StorageError::OffsetOutOfRange {
                    offset,
                    start: st.log_start,
                    end,
                });
            };
            let pos = seg.position_for(offset);
            let i = seg.offset_index.partition_point(|&(o, _)| o <= offset);
            let base = if i == 0 {
                seg.base_offset
            } else {
                seg.offset_index[i - 1].0
            };
            (seg.file.clone(), seg.path.clone(), pos, base, seg.data_end)
        };
        let mut bytes = 0usize;
        let mut corrupt = None;
        let outcome = segment::scan(&*file, pos, base, false, |h, at, stored| {
            if at >= seg_end || h.next_offset() > end {
                return false;
            }
            if h.next_offset() <= offset {
                return true;
            }
            if !out.batches.is_empty() && bytes + stored.len() > max_bytes {
                return false;
            }
            if let Err(e) = batch::decode_verified(stored) {
                corrupt = Some((at, e.to_string()));
                return false;
            }
            bytes += stored.len();
            out.next_offset = h.next_offset();
            out.batches.push(Bytes::copy_from_slice(stored));
            true
        })
        .await
        .map_err(|e| StorageError::io(&path, "read", e))?;
        if let Some((pos, reason)) = corrupt.or_else(|| {
            outcome
                .stopped
                .filter(|(p, _)| *p < seg_end && out.batches.is_empty())
        }) {
            return Err(StorageError::Corrupt { path, pos, reason });
        }
        Ok(())
    }

    /// The first offset whose batch has a max timestamp ≥ `ts_ms`, or the end offset if none.
    pub async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64, StorageError> {
        let candidate = {
            let st = self.st.borrow();
            st.segments
                .values()
                .find(|s| !s.is_empty() && s.max_timestamp_ms >= ts_ms)
                .map(|s| {
                    let from = s.offset_for_time_scan(ts_ms);
                    (
                        s.file.clone(),
                        s.path.clone(),
                        s.position_for(from),
                        s.offset_index.clone(),
                        from,
                    )
                })
        };
        if let Some((file, path, pos, index, from)) = candidate {
            let i = index.partition_point(|&(o, _)| o <= from);
            let base = if i == 0 { from } else { index[i - 1].0 };
            let mut found = None;
            segment::scan(&*file, pos, base, false, |h, _, _| {
                if h.max_timestamp_ms >= ts_ms {
                    found = Some(h.base_offset);
                    return false;
                }
                true
            })
            .await
            .map_err(|e| StorageError::io(&path, "read", e))?;
            if let Some(o) = found {
                return Ok(o);
            }
        }
        let st = self.st.borrow();
        let end = st.committed_end;
        Ok(st
            .cache
            .iter()
            .filter(|b| b.header.base_offset >= st.written_end.min(end))
            .find(|b| b.header.max_timestamp_ms >= ts_ms && b.header.next_offset() <= end)
            .map(|b| b.header.base_offset)
            .unwrap_or(end))
    }

    /// Deletes the sealed segments that hold only offsets below `offset` (compaction of state
    /// logs after a snapshot). Returns how many were deleted.
    pub async fn delete_before(&self, offset: u64) -> Result<usize, StorageError> {
        let victims: Vec<u64> = {
            let st = self.st.borrow();
            if st.truncating {
                return Ok(0);
            }
            let bases: Vec<u64> = st.segments.keys().copied().collect();
            bases
                .windows(2)
                .filter(|w| w[1] <= offset)
                .map(|w| w[0])
                .collect()
        };
        for &base in &victims {
            {
                let mut st = self.st.borrow_mut();
                st.segments.remove(&base);
                st.log_start = *st.segments.keys().next().unwrap_or(&base);
            }
            self.remove_segment_files(base).await?;
        }
        Ok(victims.len())
    }

    async fn remove_segment_files(&self, base: u64) -> Result<(), StorageError> {
        for name in [
            segment::segment_file_name(base),
            segment::index_file_name(base),
            segment::time_index_file_name(base),
        ] {
            // A missing index file is fine: it may never have been written.
            let _ = self.storage.remove_file(&self.dir.join(name)).await;
        }
        self.storage
            .sync_dir(&self.dir)
            .await
            .map_err(|e| StorageError::io(&self.dir, "sync dir", e))
    }

    /// Where the log would start if retention deleted, at `now_ms`, every segment it may and
    /// none holding an offset at or above `limit` (a replicated log keeps what is not
    /// applied): a segment base, or the current start.
    pub fn retention_start(&self, now_ms: i64, limit: u64) -> u64 {
        let st = self.st.borrow();
        let segs: Vec<(u64, u64, i64)> = st
            .segments
            .values()
            .map(|s| (s.base_offset, s.write_pos, s.max_timestamp_ms))
            .collect();
        let mut total: u64 = segs.iter().map(|s| s.1).sum();
        let mut start = st.log_start;
        for w in segs.windows(2) {
            let ((_, bytes, max_ts), (next_base, _, _)) = (w[0], w[1]);
            let by_bytes = self
                .cfg
                .retention_bytes
                .is_some_and(|max| total - bytes >= max);
            let by_age = self
                .cfg
                .retention_ms
                .is_some_and(|ms| max_ts < now_ms.saturating_sub(ms as i64));
            if !(by_bytes || by_age) || next_base > limit {
                break;
            }
            total -= bytes;
            start = next_base;
        }
        start
    }

    /// Deletes whole sealed segments beyond the retention bytes or older than retention ms
    /// (by their max timestamp). Never the active segment. Returns how many were deleted.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<usize, StorageError> {
        let mut deleted = 0;
        if self.st.borrow().truncating {
            return Ok(0); // next time
        }
        loop {
            let victim = {
                let st = self.st.borrow();
                if st.segments.len() <= 1 {
                    None
                } else {
                    let total: u64 = st.segments.values().map(|s| s.write_pos).sum();
                    st.segments
                        .values()
                        .next()
                        .filter(|oldest| {
                            let by_bytes = self
                                .cfg
                                .retention_bytes
                                .is_some_and(|max| total - oldest.write_pos >= max);
                            let by_age = self.cfg.retention_ms.is_some_and(|ms| {
                                oldest.max_timestamp_ms < now_ms.saturating_sub(ms as i64)
                            });
                            by_bytes || by_age
                        })
                        .map(|s| s.base_offset)
                }
            };
            let Some(base) = victim else { break };
            {
                let mut st = self.st.borrow_mut();
                st.segments.remove(&base);
                st.log_start = *st.segments.keys().next().unwrap_or(&base);
            }
            self.remove_segment_files(base).await?;
            deleted += 1;
        }
        Ok(deleted)
    }
}

fn check_failed<F>(st: &State<F>) -> Result<(), StorageError> {
    match &st.failed {
        Some(why) => Err(StorageError::Failed(why.clone())),
        None => Ok(()),
    }
}

/// Under [`CommitPolicy::FollowDurability`], moves the commit index up to what the durability
/// policy makes visible: fdatasynced under `Always`, buffered otherwise.
fn follow_durability<F>(st: &mut State<F>, cfg: &LogConfig) {
    if cfg.commit_policy != CommitPolicy::FollowDurability {
        return;
    }
    let target = match cfg.durability {
        Durability::Always => st.durable_end,
        _ => st.next_offset,
    };
    if target > st.committed_end {
        st.committed_end = target;
    }
}

/// The name of the file that records an interrupted truncation at `offset`.
fn intent_file_name(offset: u64) -> String {
    format!("truncate-{offset:020}.intent")
}

fn parse_intent(name: &str) -> Option<u64> {
    name.strip_prefix("truncate-")?
        .strip_suffix(".intent")?
        .parse()
        .ok()
}

/// Counts a truncation at `offset` (for waiters appended before it).
fn record_cut<F>(st: &mut State<F>, offset: u64) {
    st.truncation_epoch += 1;
    st.recent_cuts.push_back((st.truncation_epoch, offset));
    if st.recent_cuts.len() > limits::TRUNCATIONS_REMEMBERED {
        st.recent_cuts.pop_front();
    }
}

/// Forgets cached batches at or after `offset`.
fn drop_cached_from<F>(st: &mut State<F>, offset: u64) {
    st.cache.retain(|b| b.header.base_offset < offset);
    st.cache_bytes = st.cache.iter().map(|b| b.bytes.len()).sum();
}

fn active<F>(st: &State<F>) -> &Segment<F> {
    // There is always at least one segment: open creates one and retention keeps the last.
    st.segments
        .values()
        .next_back()
        .expect("a log always has an active segment")
}

fn active_mut<F>(st: &mut State<F>) -> &mut Segment<F> {
    st.segments
        .values_mut()
        .next_back()
        .expect("a log always has an active segment")
}

/// Drops the oldest cached batches over the limit, but never one not yet written.
fn evict_cache<F>(st: &mut State<F>, max_bytes: usize) {
    while st.cache_bytes > max_bytes {
        match st.cache.front() {
            Some(b) if b.header.next_offset() <= st.written_end => {
                st.cache_bytes -= b.bytes.len();
                st.cache.pop_front();
            }
            _ => break,
        }
    }
}

async fn create_segment<S: Storage>(
    storage: &S,
    dir: &Path,
    base: u64,
) -> Result<Segment<S::File>, StorageError> {
    let path = dir.join(segment::segment_file_name(base));
    let file = storage
        .open_file(&path, true)
        .await
        .map_err(|e| StorageError::io(&path, "create segment", e))?;
    storage
        .sync_dir(dir)
        .await
        .map_err(|e| StorageError::io(dir, "sync dir", e))?;
    Ok(Segment::new(base, Rc::new(file), path))
}

async fn open_segment<S: Storage>(
    storage: &S,
    dir: &Path,
    base: u64,
) -> Result<(Segment<S::File>, u64), StorageError> {
    let path = dir.join(segment::segment_file_name(base));
    let file = storage
        .open_file(&path, false)
        .await
        .map_err(|e| StorageError::io(&path, "open segment", e))?;
    let size = file
        .size()
        .await
        .map_err(|e| StorageError::io(&path, "stat segment", e))?;
    Ok((Segment::new(base, Rc::new(file), path), size))
}

/// Scans a segment from the start, verifying CRCs and rebuilding its in-memory index.
async fn scan_rebuild<F: StorageFile>(
    seg: &mut Segment<F>,
) -> Result<segment::ScanOutcome, StorageError> {
    let interval = limits::INDEX_INTERVAL_BYTES_DEFAULT;
    let file = seg.file.clone();
    let mut found = Vec::new();
    let outcome = segment::scan(&*file, 0, seg.base_offset, true, |h, pos, _| {
        found.push((*h, pos));
        true
    })
    .await
    .map_err(|e| StorageError::io(&seg.path, "scan", e))?;
    for (h, pos) in found {
        seg.record_batch(&h, pos, interval);
    }
    seg.write_pos = align_up(seg.data_end);
    Ok(outcome)
}

async fn recover_sealed<S: Storage>(
    storage: &S,
    dir: &Path,
    base: u64,
    report: &mut RecoveryReport,
) -> Result<Segment<S::File>, StorageError> {
    let (mut seg, size) = open_segment(storage, dir, base).await?;
    seg.sealed = true;
    if seg.load_indexes(storage, dir, size).await {
        return Ok(seg);
    }
    let outcome = scan_rebuild(&mut seg).await?;
    if let Some((pos, reason)) = outcome.stopped {
        return Err(StorageError::Corrupt {
            path: seg.path.clone(),
            pos,
            reason: format!("sealed segment: {reason}"),
        });
    }
    seg.write_indexes(storage, dir).await?;
    report.rebuilt_indexes.push(seg.path.clone());
    Ok(seg)
}

async fn recover_active<S: Storage>(
    storage: &S,
    dir: &Path,
    base: u64,
    report: &mut RecoveryReport,
) -> Result<Segment<S::File>, StorageError> {
    let (mut seg, size) = open_segment(storage, dir, base).await?;
    let outcome = scan_rebuild(&mut seg).await?;
    let clean_size = align_up(outcome.valid_end);
    if outcome.stopped.is_some() || size > clean_size {
        let (at_pos, reason) = outcome.stopped.clone().unwrap_or((
            outcome.valid_end,
            "unwritten block before later data".into(),
        ));
        seg.file
            .truncate(outcome.valid_end)
            .await
            .map_err(|e| StorageError::io(&seg.path, "truncate", e))?;
        seg.file
            .sync_data()
            .await
            .map_err(|e| StorageError::io(&seg.path, "fdatasync", e))?;
        let t = Truncation {
            segment: seg.path.clone(),
            at_pos,
            cut_bytes: size.saturating_sub(outcome.valid_end),
            reason,
        };
        eprintln!(
            "ringmq: recovery cut {} bytes from {} at byte {}: {}",
            t.cut_bytes,
            t.segment.display(),
            t.at_pos,
            t.reason
        );
        report.truncated = Some(t);
    }
    // Index files of the active segment are rebuilt in memory; stale ones on disk are removed.
    for name in [
        segment::index_file_name(base),
        segment::time_index_file_name(base),
    ] {
        let _ = storage.remove_file(&dir.join(name)).await;
    }
    Ok(seg)
}
