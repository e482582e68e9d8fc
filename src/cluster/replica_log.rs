//! A partition replica's Raft log as raft-rs sees it (issue 14, first step): the partition
//! log *is* the Raft log, so this holds no second copy of the data. It keeps, per Raft entry
//! (one stored batch), its term, first offset and record count ([`ReplicaIndex`]), plus the
//! HardState and ConfState, and implements `raft::Storage` over them ([`ReplicaStorage`]).
//!
//! Entry data (the batch bytes) is served from a cache: every entry not yet applied is always
//! in it (raft-rs reads those synchronously when it builds a Ready), and recently applied ones
//! stay while they fit in [`limits::REPLICA_CACHE_BYTES`]. An older entry that a lagging
//! follower needs is a cache miss: for a context that allows it the storage answers
//! `LogTemporarilyUnavailable` and records the range in [`ReplicaStorage::take_wanted`]; the
//! shard reads those batches from the partition log (asynchronously), hands them back with
//! [`ReplicaStorage::fill`] and calls `RawNode::on_entries_fetched`.
//!
//! Two rules for the driver, or raft-rs stops the replica (`fatal!` on a synchronous miss):
//! call [`ReplicaStorage::set_applied`] with exactly the index it passes to
//! `RawNode::advance_apply_to` (never ahead of what raft-rs considers applied), and start the
//! `RawNode` with `Config::applied` equal to the `applied` given to [`ReplicaStorage::new`]
//! after [`ReplicaStorage::preload`]ing every entry above it.
//!
//! Owns: the index and the cache. Must not touch: files or the partition log (the shard's
//! Raft loop appends, truncates and reads the log and reports here what it did).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::limits;

/// Where one Raft entry's batch lives in the partition log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub term: u64,
    /// Offset of the batch's first record.
    pub base_offset: u64,
    pub records: u32,
}

/// Raft index → [`EntryMeta`] for the entries after the last compaction point.
#[derive(Debug, Clone, Default)]
pub struct ReplicaIndex {
    /// Index and term of the last entry compacted away (0, 0 for a log never compacted).
    compacted_index: u64,
    compacted_term: u64,
    /// Offset after the last compacted entry: where the first entry starts.
    compacted_end: u64,
    /// Entry `compacted_index + 1 + i` is `entries[i]`.
    entries: VecDeque<EntryMeta>,
}

impl ReplicaIndex {
    /// An index whose first entry will be `first_index`, the entry before it having had
    /// `prev_term` (a log whose start was cut by retention).
    pub fn starting_at(first_index: u64, prev_term: u64) -> Self {
        Self {
            compacted_index: first_index.saturating_sub(1),
            compacted_term: prev_term,
            compacted_end: 0,
            entries: VecDeque::new(),
        }
    }

    /// The same empty index, its first entry starting at `offset` (a log cut by retention).
    pub fn with_first_offset(mut self, offset: u64) -> Self {
        self.compacted_end = offset;
        self
    }

    /// The offset after entry `idx` (`first_index() - 1` is the compaction point).
    pub fn end_offset(&self, idx: u64) -> Option<u64> {
        if idx == self.compacted_index {
            return Some(self.compacted_end);
        }
        self.get(idx).map(|e| e.base_offset + u64::from(e.records))
    }

    pub fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.compacted_index + self.entries.len() as u64
    }

    /// The term of entry `idx`, for `first_index() - 1 ..= last_index()`.
    pub fn term(&self, idx: u64) -> Option<u64> {
        if idx == self.compacted_index {
            return Some(self.compacted_term);
        }
        self.get(idx).map(|e| e.term)
    }

    pub fn get(&self, idx: u64) -> Option<&EntryMeta> {
        let i = idx.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(i).ok()?)
    }

    /// Records entry `idx`. It must follow the last one (cut a conflicting suffix first with
    /// [`Self::truncate_from`]), start where the previous batch ended, and hold at least one
    /// record: Raft's empty entries (a new leader's first) are stored as one control record,
    /// so every entry has an offset of its own and a cut at an offset never takes an entry
    /// before it.
    pub fn push(&mut self, idx: u64, meta: EntryMeta) -> Result<(), String> {
        if meta.records == 0 {
            return Err(format!("raft entry {idx} holds no record"));
        }
        if idx != self.last_index() + 1 {
            return Err(format!(
                "raft entry {idx} does not follow the last one ({})",
                self.last_index()
            ));
        }
        if let Some(prev) = self.entries.back() {
            let end = prev.base_offset + u64::from(prev.records);
            if meta.base_offset != end {
                return Err(format!(
                    "raft entry {idx} starts at offset {}, the previous one ends at {end}",
                    meta.base_offset
                ));
            }
            if meta.term < prev.term {
                return Err(format!(
                    "raft entry {idx} has term {} below the previous one's {}",
                    meta.term, prev.term
                ));
            }
        }
        self.entries.push_back(meta);
        Ok(())
    }

    /// Drops entries `idx..` and returns the offset the partition log must be cut at (the
    /// first record of entry `idx`), or `None` if there was nothing from `idx` on. Entries up
    /// to the compaction point cannot be cut (they are committed).
    pub fn truncate_from(&mut self, idx: u64) -> Result<Option<u64>, String> {
        if idx <= self.compacted_index {
            return Err(format!(
                "cannot cut raft entries from {idx}: entries up to {} are compacted (committed)",
                self.compacted_index
            ));
        }
        let keep = (idx - self.first_index()) as usize;
        let cut_at = self.entries.get(keep).map(|e| e.base_offset);
        self.entries.truncate(keep);
        Ok(cut_at)
    }

    /// Forgets entries up to `idx` (their batches were deleted by retention, or are covered
    /// by a snapshot).
    pub fn compact_to(&mut self, idx: u64) {
        while self.compacted_index < idx {
            match self.entries.pop_front() {
                Some(e) => {
                    self.compacted_index += 1;
                    self.compacted_term = e.term;
                    self.compacted_end = e.base_offset + u64::from(e.records);
                }
                None => break,
            }
        }
    }

    /// The entry holding `offset`, by binary search.
    pub fn index_of_offset(&self, offset: u64) -> Option<u64> {
        let i = self
            .entries
            .partition_point(|e| e.base_offset + u64::from(e.records) <= offset);
        let e = self.entries.get(i)?;
        (e.base_offset <= offset).then(|| self.first_index() + i as u64)
    }
}

struct Inner {
    hard_state: HardState,
    conf_state: ConfState,
    index: ReplicaIndex,
    /// Entry data by index: every entry above `applied`, and recent applied ones.
    cache: BTreeMap<u64, Entry>,
    cache_bytes: usize,
    /// Applied entries are dropped from the cache beyond this many bytes.
    cache_budget_bytes: usize,
    applied: u64,
    /// Ranges raft-rs asked for that were not cached, with the context to hand back.
    wanted: Vec<(u64, u64, GetEntriesContext)>,
    /// Entries filled in for a wanted range, kept until raft-rs read them once.
    fetched: BTreeMap<u64, Entry>,
    /// Reads that missed the cache and were asked of the log.
    misses: u64,
}

/// A replica's `raft::Storage`; cheap to clone (one shared state).
#[derive(Clone)]
pub struct ReplicaStorage {
    inner: Rc<RefCell<Inner>>,
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl ReplicaStorage {
    /// A replica whose log has the entries of `index`, whose persisted Raft state is
    /// `hard_state` / `conf_state`, and of which everything up to `applied` is applied.
    pub fn new(
        index: ReplicaIndex,
        hard_state: HardState,
        conf_state: ConfState,
        applied: u64,
    ) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                hard_state,
                conf_state,
                index,
                cache: BTreeMap::new(),
                cache_bytes: 0,
                cache_budget_bytes: limits::REPLICA_CACHE_BYTES,
                applied,
                wanted: Vec::new(),
                fetched: BTreeMap::new(),
                misses: 0,
            })),
        }
    }

    /// The same storage with a smaller cache (tests and the simulation make followers miss).
    pub fn with_cache_budget(self, bytes: usize) -> Self {
        self.inner.borrow_mut().cache_budget_bytes = bytes;
        self
    }

    /// Appends entries the partition log now holds at `metas` (same order). A first entry at
    /// or below the last index replaces the suffix from there: the caller cut the log at
    /// [`Self::conflict_offset`] first.
    pub fn append(&self, entries: &[Entry], metas: &[EntryMeta]) -> Result<(), String> {
        if entries.len() != metas.len() {
            return Err("entries and their places differ in number".into());
        }
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut st = self.inner.borrow_mut();
        if first.index <= st.index.last_index() {
            st.index.truncate_from(first.index)?;
            let drop: Vec<u64> = st.cache.range(first.index..).map(|(i, _)| *i).collect();
            for i in drop {
                if let Some(e) = st.cache.remove(&i) {
                    st.cache_bytes -= e.data.len();
                }
            }
            // Reads of the cut entries must never be served from what was fetched for them.
            let at = first.index;
            st.fetched.retain(|i, _| *i < at);
            st.wanted.retain(|(lo, _, _)| *lo < at);
        }
        for (e, m) in entries.iter().zip(metas) {
            if e.term != m.term {
                return Err(format!(
                    "raft entry {} has term {} but its batch says {}",
                    e.index, e.term, m.term
                ));
            }
            st.index.push(e.index, *m)?;
            st.cache_bytes += e.data.len();
            st.cache.insert(e.index, e.clone());
        }
        Ok(())
    }

    /// Where the partition log must be cut before entries from `idx` are appended (`None`:
    /// nothing to cut).
    pub fn conflict_offset(&self, idx: u64) -> Option<u64> {
        let st = self.inner.borrow();
        (idx <= st.index.last_index())
            .then(|| st.index.get(idx).map(|m| m.base_offset))
            .flatten()
    }

    pub fn set_hard_state(&self, hs: &HardState) {
        self.inner.borrow_mut().hard_state = hs.clone();
    }

    pub fn set_conf_state(&self, cs: &ConfState) {
        self.inner.borrow_mut().conf_state = cs.clone();
    }

    /// Entries up to `idx` are applied: applied ones beyond the cache budget are dropped
    /// (oldest first).
    pub fn set_applied(&self, idx: u64) {
        let mut st = self.inner.borrow_mut();
        st.applied = st.applied.max(idx);
        while st.cache_bytes > st.cache_budget_bytes {
            let Some((&i, _)) = st.cache.iter().next() else {
                break;
            };
            if i > st.applied {
                break;
            }
            if let Some(e) = st.cache.remove(&i) {
                st.cache_bytes -= e.data.len();
            }
        }
    }

    /// Ranges raft-rs could not read from the cache (read them from the partition log, then
    /// [`Self::fill`] and `RawNode::on_entries_fetched(context)`).
    pub fn take_wanted(&self) -> Vec<(u64, u64, GetEntriesContext)> {
        std::mem::take(&mut self.inner.borrow_mut().wanted)
    }

    /// Puts entries in the cache without recording them (a restarted replica preloads the
    /// entries above its applied index, which raft-rs will read synchronously).
    pub fn preload(&self, entries: Vec<Entry>) {
        let mut st = self.inner.borrow_mut();
        for e in entries {
            st.cache_bytes += e.data.len();
            st.cache.insert(e.index, e);
        }
    }

    /// Entries read back from the partition log for a wanted range. Only entries that still
    /// match the index (same term at that index) are kept, at most
    /// [`limits::REPLICA_FETCHED_ENTRIES_MAX`].
    pub fn fill(&self, entries: Vec<Entry>) {
        let mut st = self.inner.borrow_mut();
        for e in entries {
            if st.index.term(e.index) != Some(e.term) {
                continue;
            }
            // The oldest fetched go first: a reader that moved on never reads them.
            while st.fetched.len() >= limits::REPLICA_FETCHED_ENTRIES_MAX {
                st.fetched.pop_first();
            }
            st.fetched.insert(e.index, e);
        }
    }

    /// Forgets entries up to `idx` (retention deleted their batches) and their cached data.
    pub fn compact_to(&self, idx: u64) {
        let mut st = self.inner.borrow_mut();
        st.index.compact_to(idx);
        let drop: Vec<u64> = st.cache.range(..=idx).map(|(i, _)| *i).collect();
        for i in drop {
            if let Some(e) = st.cache.remove(&i) {
                st.cache_bytes -= e.data.len();
            }
        }
        st.fetched.retain(|i, _| *i > idx);
    }

    /// The entry holding `offset`.
    pub fn index_of_offset(&self, offset: u64) -> Option<u64> {
        self.inner.borrow().index.index_of_offset(offset)
    }

    /// The term of entry `idx` (or of the compaction point).
    pub fn term_of(&self, idx: u64) -> Option<u64> {
        self.inner.borrow().index.term(idx)
    }

    /// Replaces everything with an empty log whose first entry will be `index + 1`, starting
    /// at `first_offset`, the entry before it having `term` (a snapshot was applied).
    pub fn reset(&self, index: u64, term: u64, first_offset: u64, conf_state: &ConfState) {
        let mut st = self.inner.borrow_mut();
        st.index = ReplicaIndex::starting_at(index + 1, term).with_first_offset(first_offset);
        st.cache.clear();
        st.cache_bytes = 0;
        st.fetched.clear();
        st.wanted.clear();
        st.conf_state = conf_state.clone();
        st.applied = st.applied.max(index);
        if st.hard_state.commit < index {
            st.hard_state.commit = index;
        }
    }

    /// Where entry `idx` was stored, if the index has it.
    pub fn entry_meta(&self, idx: u64) -> Option<EntryMeta> {
        self.inner.borrow().index.get(idx).copied()
    }

    /// The offset after entry `idx - 1`: where entry `idx` must start.
    pub fn end_offset_before(&self, idx: u64) -> Option<u64> {
        self.inner.borrow().index.end_offset(idx.checked_sub(1)?)
    }

    /// The index (terms and offsets).
    pub fn index(&self) -> ReplicaIndex {
        self.inner.borrow().index.clone()
    }

    /// Reads that missed the cache and were asked of the log.
    pub fn misses(&self) -> u64 {
        self.inner.borrow().misses
    }

    /// Entry data bytes held in the cache.
    pub fn cache_bytes(&self) -> usize {
        self.inner.borrow().cache_bytes
    }
}

impl raft::Storage for ReplicaStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.inner.borrow();
        Ok(RaftState {
            hard_state: st.hard_state.clone(),
            conf_state: st.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let mut st = self.inner.borrow_mut();
        if low < st.index.first_index() {
            return Err(store_err(StorageError::Compacted));
        }
        if high > st.index.last_index() + 1 {
            return Err(store_err(StorageError::Unavailable));
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let e = match st.cache.get(&i).or_else(|| st.fetched.get(&i)) {
                Some(e) => e.clone(),
                None => {
                    if context.can_async() {
                        st.misses += 1;
                        // One wanted range per reader at most: raft-rs asks again after
                        // `on_entries_fetched`, so the oldest are dropped beyond the bound.
                        if st.wanted.len() >= limits::REPLICA_WANTED_MAX {
                            st.wanted.remove(0);
                        }
                        st.wanted.push((i, high, context));
                        return Err(store_err(StorageError::LogTemporarilyUnavailable));
                    }
                    // Unapplied entries are always cached; a synchronous read of an older one
                    // has nothing to wait for.
                    return Err(store_err(StorageError::Unavailable));
                }
            };
            size += e.data.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
        }
        // What was fetched for this read is not kept beyond it.
        if let (Some(first), Some(last)) = (out.first(), out.last()) {
            let (a, b) = (first.index, last.index);
            st.fetched.retain(|i, _| *i < a || *i > b);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.inner.borrow();
        if idx < st.index.first_index().saturating_sub(1) {
            return Err(store_err(StorageError::Compacted));
        }
        st.index
            .term(idx)
            .ok_or_else(|| store_err(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.borrow().index.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.borrow().index.last_index())
    }

    /// A follower needs entries retention deleted: the "snapshot" is where this log starts
    /// (index and term of the entry before its first, the offset of its first, the voters),
    /// with no data; the follower empties its log and continues from there.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let st = self.inner.borrow();
        let mut snap = Snapshot::default();
        let m = snap.mut_metadata();
        m.index = st.index.compacted_index;
        m.term = st.index.compacted_term;
        m.set_conf_state(st.conf_state.clone());
        snap.data = bytes::Bytes::copy_from_slice(&st.index.compacted_end.to_le_bytes());
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(term: u64, base_offset: u64, records: u32) -> EntryMeta {
        EntryMeta {
            term,
            base_offset,
            records,
        }
    }

    #[test]
    fn the_index_maps_entries_to_offsets_and_cuts_suffixes() {
        let mut ix = ReplicaIndex::default();
        assert_eq!((ix.first_index(), ix.last_index()), (1, 0));
        assert!(
            ix.push(1, meta(1, 0, 0)).is_err(),
            "an entry holds a record"
        );
        ix.push(1, meta(1, 0, 3)).unwrap();
        ix.push(2, meta(1, 3, 2)).unwrap();
        ix.push(3, meta(2, 5, 1)).unwrap();
        assert!(ix.push(5, meta(2, 6, 1)).is_err(), "a gap");
        assert!(ix.push(4, meta(2, 7, 1)).is_err(), "offsets must follow");
        assert!(ix.push(4, meta(1, 6, 1)).is_err(), "terms never go back");
        assert_eq!(ix.index_of_offset(0), Some(1));
        assert_eq!(ix.index_of_offset(4), Some(2));
        assert_eq!(ix.index_of_offset(5), Some(3));
        assert_eq!(ix.index_of_offset(6), None);
        assert_eq!(ix.truncate_from(2), Ok(Some(3)));
        assert_eq!(ix.last_index(), 1);
        assert_eq!(ix.truncate_from(2), Ok(None));
        ix.push(2, meta(3, 3, 4)).unwrap();
        ix.compact_to(1);
        assert_eq!(
            (ix.first_index(), ix.term(1), ix.term(2)),
            (2, Some(1), Some(3))
        );
        assert!(
            ix.truncate_from(1).is_err(),
            "compacted entries are committed"
        );
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: bytes::Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    #[test]
    fn misses_are_asked_for_and_served_once_filled() {
        use raft::Storage;
        let s = ReplicaStorage::new(
            ReplicaIndex::default(),
            HardState::default(),
            ConfState::default(),
            0,
        );
        let es: Vec<Entry> = (1..=4).map(|i| entry(i, 1, &[i as u8; 10])).collect();
        let ms: Vec<EntryMeta> = (0..4).map(|i| meta(1, i, 1)).collect();
        s.append(&es, &ms).unwrap();
        assert_eq!(
            s.entries(1, 5, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
        // Applied entries beyond the budget leave the cache; a reader that can wait gets
        // LogTemporarilyUnavailable and the range is wanted.
        let removed = s.inner.borrow_mut().cache.remove(&2);
        if let Some(e) = removed {
            s.inner.borrow_mut().cache_bytes -= e.data.len();
        }
        s.set_applied(4);
        let miss = s.entries(2, 4, None, GetEntriesContext::empty(true));
        assert!(matches!(
            miss,
            Err(raft::Error::Store(StorageError::LogTemporarilyUnavailable))
        ));
        let wanted = s.take_wanted();
        assert_eq!((wanted.len(), wanted[0].0, wanted[0].1), (1, 2, 4));
        s.fill(vec![entry(2, 1, &[2; 10])]);
        let got = s
            .entries(2, 4, None, GetEntriesContext::empty(true))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
        // Read back with a term the index no longer has (a cut entry): not kept, not served.
        s.fill(vec![entry(2, 9, b"stale")]);
        assert!(s.inner.borrow().fetched.is_empty());
        // A conflicting append from index 3 cuts the suffix at entry 3's first offset.
        assert_eq!(s.conflict_offset(3), Some(2));
        s.append(&[entry(3, 2, b"new")], &[meta(2, 2, 1)]).unwrap();
        assert_eq!((s.last_index().unwrap(), s.term(3).unwrap()), (3, 2));
        assert!(s.append(&[entry(4, 1, b"x")], &[meta(1, 3, 1)]).is_err());
    }

    /// A replica driven the way the shard's Raft loop will drive it, over a model of the
    /// partition log (batches in order, each with its raft index and term).
    struct Replica {
        raw: raft::RawNode<ReplicaStorage>,
        store: ReplicaStorage,
        /// The partition log: (raft index, term, first offset, batch bytes).
        log: Vec<(u64, u64, u64, bytes::Bytes)>,
        committed: u64,
    }

    impl Replica {
        fn new(id: u64, budget: usize) -> Self {
            let cs = ConfState::from((vec![1, 2, 3], vec![]));
            let store = ReplicaStorage::new(ReplicaIndex::default(), HardState::default(), cs, 0)
                .with_cache_budget(budget);
            let cfg = raft::Config {
                id,
                election_tick: 10,
                heartbeat_tick: 2,
                max_size_per_msg: 1 << 20,
                max_inflight_msgs: 64,
                ..Default::default()
            };
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            let raw = raft::RawNode::new(&cfg, store.clone(), &logger).unwrap();
            Self {
                raw,
                store,
                log: Vec::new(),
                committed: 0,
            }
        }

        fn end_offset(&self) -> u64 {
            self.log.last().map_or(0, |b| b.2 + 1)
        }

        /// Appends raft entries to the log model (one record per non-empty entry), cutting a
        /// conflicting suffix first, then tells the storage where they went.
        fn persist(&mut self, entries: &[Entry]) {
            let Some(first) = entries.first() else {
                return;
            };
            // As `Log::truncate_suffix(cut)` does to the real log.
            if let Some(cut) = self.store.conflict_offset(first.index) {
                self.log.retain(|b| b.2 < cut);
            }
            let mut metas = Vec::new();
            for e in entries {
                // One record each; an empty entry is a control record.
                let base = self.end_offset();
                self.log.push((e.index, e.term, base, e.data.clone()));
                metas.push(meta(e.term, base, 1));
            }
            self.store.append(entries, &metas).unwrap();
        }

        /// One Ready round; the messages to send (persisted ones only after persisting).
        fn drive(&mut self) -> Vec<raft::eraftpb::Message> {
            let mut out = Vec::new();
            while self.raw.has_ready() {
                let mut rd = self.raw.ready();
                out.extend(rd.take_messages());
                self.apply(rd.take_committed_entries());
                self.persist(rd.entries());
                if let Some(hs) = rd.hs() {
                    self.store.set_hard_state(hs);
                }
                out.extend(rd.take_persisted_messages());
                let mut light = self.raw.advance(rd);
                out.extend(light.take_messages());
                self.apply(light.take_committed_entries());
                self.raw.advance_apply();
                // Misses are read back from the log model and handed to raft.
                for (lo, hi, ctx) in self.store.take_wanted() {
                    let got: Vec<Entry> = (lo..hi)
                        .filter_map(|i| {
                            let term = self.store.index().term(i)?;
                            let data = self
                                .log
                                .iter()
                                .find(|b| b.0 == i)
                                .map(|b| b.3.clone())
                                .unwrap_or_default();
                            let mut e = entry(i, term, &[]);
                            e.data = data;
                            Some(e)
                        })
                        .collect();
                    self.store.fill(got);
                    self.raw.on_entries_fetched(ctx);
                }
            }
            out
        }

        fn apply(&mut self, entries: Vec<Entry>) {
            if let Some(last) = entries.last() {
                self.committed = last.index;
                self.store.set_applied(last.index);
            }
        }

        fn committed_values(&self) -> Vec<bytes::Bytes> {
            self.log
                .iter()
                .filter(|b| b.0 <= self.committed && !b.3.is_empty())
                .map(|b| b.3.clone())
                .collect()
        }
    }

    /// Delivers messages among the replicas until quiet; `cut` replicas neither send nor
    /// receive.
    fn settle(rs: &mut [Replica], cut: &[u64]) {
        for _ in 0..200 {
            let mut msgs = Vec::new();
            for r in rs.iter_mut() {
                msgs.extend(r.drive());
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if cut.contains(&m.to) || cut.contains(&m.from) {
                    continue;
                }
                let _ = rs[(m.to - 1) as usize].raw.step(m);
            }
        }
    }

    #[test]
    fn a_follower_far_behind_catches_up_from_the_log_through_the_fetch_path() {
        // A cache of 64 bytes: almost every applied entry leaves it.
        let mut rs: Vec<Replica> = (1..=3).map(|id| Replica::new(id, 64)).collect();
        rs[0].raw.campaign().unwrap();
        settle(&mut rs, &[]);
        assert!(rs[0].raw.raft.state == raft::StateRole::Leader);
        // Replica 3 is cut off while 40 batches commit on the other two.
        let mut sent = Vec::new();
        for i in 0..40u32 {
            let v = bytes::Bytes::from(format!("batch-{i:02}-{}", "x".repeat(20)));
            rs[0].raw.propose(vec![], v.to_vec()).unwrap();
            sent.push(v);
            settle(&mut rs, &[3]);
        }
        assert_eq!(rs[0].committed_values(), sent);
        assert_eq!(rs[1].committed_values(), sent);
        assert!(rs[2].committed_values().is_empty());
        assert!(
            rs[0].store.cache_bytes() <= 64 + 40,
            "the leader's cache stays bounded"
        );
        // Healed: the leader reads what replica 3 misses back from its log.
        for _ in 0..5 {
            for r in rs.iter_mut() {
                for _ in 0..2 {
                    r.raw.tick();
                }
            }
            settle(&mut rs, &[]);
        }
        assert_eq!(rs[2].committed_values(), sent, "replica 3 caught up");
        assert!(
            rs[0].store.misses() > 0,
            "through reads of the leader's log"
        );
        // Every replica's committed log: the same batches, once, in order, same offsets.
        let offsets = |r: &Replica| r.log.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>();
        assert_eq!(offsets(&rs[0]), offsets(&rs[2]));
    }

    #[test]
    fn an_old_leaders_uncommitted_suffix_is_cut_and_replaced() {
        let mut rs: Vec<Replica> = (1..=3).map(|id| Replica::new(id, 1 << 20)).collect();
        rs[0].raw.campaign().unwrap();
        settle(&mut rs, &[]);
        rs[0].raw.propose(vec![], b"committed".to_vec()).unwrap();
        settle(&mut rs, &[]);
        // Replica 1 leads alone: its next two batches reach no one and never commit.
        for v in [b"lost-1".to_vec(), b"lost-2".to_vec()] {
            rs[0].raw.propose(vec![], v).unwrap();
            settle(&mut rs, &[1]);
        }
        // Its log: the election's empty entry, "committed", and the two lost batches.
        assert_eq!(rs[0].log.len(), 4, "appended locally");
        // Replicas 2 and 3 elect 2, which commits other batches.
        rs[1].raw.campaign().unwrap();
        settle(&mut rs, &[1]);
        assert!(rs[1].raw.raft.state == raft::StateRole::Leader);
        for v in [b"new-1".to_vec(), b"new-2".to_vec(), b"new-3".to_vec()] {
            rs[1].raw.propose(vec![], v).unwrap();
            settle(&mut rs, &[1]);
        }
        // Healed: replica 1 cuts its suffix at the conflict and takes the leader's entries.
        for _ in 0..5 {
            for r in rs.iter_mut() {
                for _ in 0..2 {
                    r.raw.tick();
                }
            }
            settle(&mut rs, &[]);
        }
        let want: Vec<bytes::Bytes> = ["committed", "new-1", "new-2", "new-3"]
            .iter()
            .map(|v| bytes::Bytes::from(v.to_string()))
            .collect();
        for r in &rs {
            assert_eq!(r.committed_values(), want);
        }
        // Offsets follow entries (control records included); replica 1's were reassigned
        // from the cut, so every replica has the same offsets.
        let offsets = |r: &Replica| r.log.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>();
        assert_eq!(offsets(&rs[0]), offsets(&rs[1]));
        assert_eq!(offsets(&rs[0]), offsets(&rs[2]));
    }
}
