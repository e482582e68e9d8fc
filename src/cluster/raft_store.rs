//! Where a controller replica keeps its Raft state: [`ControllerStore`], implemented by raft's
//! in-memory `MemStorage` (the simulation) and by [`FileRaftStore`] (a broker), which keeps the
//! same in-memory copy for Raft's reads and makes every change durable in one append-only file
//! before the replica answers anyone.
//!
//! File format: records of `[len u32 LE][crc32 u32 LE][kind u8][payload]`, where the CRC covers
//! kind and payload; kinds: entries (a `u32` count, then length-prefixed protobuf `Entry`s),
//! HardState (protobuf), ConfState (protobuf). Replaying the records in order through
//! `MemStorage` rebuilds the state (an entries record that starts at or below the last index
//! replaces the suffix, as Raft asked). A torn or corrupt tail — only the last record can be,
//! since each record is synced before anything depends on it — is cut on open.
//!
//! Owns: that file. Must not touch: Raft's decisions (it stores what the Ready says).
//! Blocking file I/O: the controller writes only on metadata changes and elections.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::storage::MemStorage;
use raft::Storage;

/// The writes a controller replica makes to its Raft state, in Ready order, then `persist`.
pub trait ControllerStore: Storage + Clone {
    fn append(&self, entries: &[Entry]) -> Result<(), String>;
    fn set_hard_state(&self, hs: &HardState) -> Result<(), String>;
    fn set_conf_state(&self, cs: &ConfState) -> Result<(), String>;
    /// Everything written so far is durable when this returns.
    fn persist(&self) -> Result<(), String>;
}

/// Checks that `entries` continue the log of `mem` (MemStorage panics otherwise).
fn check_continuous(mem: &MemStorage, entries: &[Entry]) -> Result<(), String> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let (lo, hi) = (
        mem.first_index().unwrap_or(1),
        mem.last_index().unwrap_or(0),
    );
    if first.index < lo || first.index > hi + 1 {
        return Err(format!(
            "controller entries from index {} do not continue the log ({lo}..={hi})",
            first.index
        ));
    }
    Ok(())
}

impl ControllerStore for MemStorage {
    fn append(&self, entries: &[Entry]) -> Result<(), String> {
        check_continuous(self, entries)?;
        self.wl().append(entries).map_err(|e| e.to_string())
    }

    fn set_hard_state(&self, hs: &HardState) -> Result<(), String> {
        self.wl().set_hardstate(hs.clone());
        Ok(())
    }

    fn set_conf_state(&self, cs: &ConfState) -> Result<(), String> {
        self.wl().set_conf_state(cs.clone());
        Ok(())
    }

    fn persist(&self) -> Result<(), String> {
        Ok(())
    }
}

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const RECORD_HEADER_BYTES: usize = 8;
/// A record larger than this is corruption, not data (the controller's entries are small).
const RECORD_BYTES_MAX: usize = 64 << 20;

/// A controller replica's Raft state in one file, with an in-memory copy for reads.
#[derive(Clone)]
pub struct FileRaftStore {
    mem: MemStorage,
    file: std::rc::Rc<std::cell::RefCell<File>>,
    path: PathBuf,
    /// Set after a failed write: the file may end in a partial record, so nothing more is
    /// written (later records would sit behind it and be cut on replay).
    failed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl FileRaftStore {
    /// Opens (or creates) `path`, replays it and cuts a torn tail. Returns the store and how
    /// many tail bytes were cut.
    pub fn open(path: &Path) -> Result<(Self, u64), String> {
        let io = |op: &str, e: std::io::Error| format!("{op} {}: {e}", path.display());
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("reading", e))?;
        let mem = MemStorage::new();
        let good = replay(&mem, &bytes)?;
        let cut = (bytes.len() - good) as u64;
        if cut > 0 {
            file.set_len(good as u64)
                .map_err(|e| io("cutting the torn tail of", e))?;
            file.sync_data().map_err(|e| io("syncing", e))?;
        }
        if created {
            // The new file's directory entry must survive a crash too, or a persisted vote
            // could vanish with it.
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("syncing the directory of", e))?;
            }
        }
        let store = Self {
            mem,
            file: std::rc::Rc::new(std::cell::RefCell::new(file)),
            path: path.to_path_buf(),
            failed: std::rc::Rc::new(std::cell::Cell::new(false)),
        };
        Ok((store, cut))
    }

    fn write_record(&self, kind: u8, payload: &[u8]) -> Result<(), String> {
        if self.failed.get() {
            return Err(format!("{}: an earlier write failed", self.path.display()));
        }
        if 1 + payload.len() > RECORD_BYTES_MAX {
            return Err(format!(
                "controller record of {} bytes over the limit of {RECORD_BYTES_MAX}",
                1 + payload.len()
            ));
        }
        let mut body = Vec::with_capacity(1 + payload.len());
        body.push(kind);
        body.extend_from_slice(payload);
        let mut rec = Vec::with_capacity(RECORD_HEADER_BYTES + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        let written = self.file.borrow_mut().write_all(&rec);
        written.map_err(|e| {
            self.failed.set(true);
            format!("writing {}: {e}", self.path.display())
        })
    }
}

/// The whole, CRC-valid record at `at`: (kind and payload, its end).
fn record_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if bytes.len().saturating_sub(at) < RECORD_HEADER_BYTES {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (len, crc) = (word(at) as usize, word(at + 4));
    let start = at + RECORD_HEADER_BYTES;
    if len == 0 || len > RECORD_BYTES_MAX || bytes.len() - start < len {
        return None;
    }
    let body = &bytes[start..start + len];
    (crc32fast::hash(body) == crc).then_some((body, start + len))
}

/// Applies the records of `bytes` to `mem`; returns the length of the valid prefix. Only the
/// last record can be torn (each is synced before anything depends on it): a bad record
/// followed by a valid one is corruption of synced data, an error rather than a cut.
fn replay(mem: &MemStorage, bytes: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    while let Some((body, end)) = record_at(bytes, at) {
        apply_record(mem, body[0], &body[1..])?;
        at = end;
    }
    if at < bytes.len() {
        let declared = bytes
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize);
        let next = declared.map(|len| at + RECORD_HEADER_BYTES + len);
        if next.is_some_and(|n| record_at(bytes, n).is_some()) {
            return Err(format!(
                "controller log: a corrupt record at byte {at} is followed by valid ones; \
                 refusing to cut synced state"
            ));
        }
    }
    Ok(at)
}

fn apply_record(mem: &MemStorage, kind: u8, payload: &[u8]) -> Result<(), String> {
    let bad = |what: &str, e: protobuf::ProtobufError| format!("controller log {what}: {e}");
    match kind {
        KIND_ENTRIES => {
            let entries = decode_entries(payload)?;
            ControllerStore::append(mem, &entries)
        }
        KIND_HARD_STATE => {
            let hs = HardState::parse_from_bytes(payload).map_err(|e| bad("HardState", e))?;
            ControllerStore::set_hard_state(mem, &hs)
        }
        KIND_CONF_STATE => {
            let cs = ConfState::parse_from_bytes(payload).map_err(|e| bad("ConfState", e))?;
            ControllerStore::set_conf_state(mem, &cs)
        }
        k => Err(format!("controller log: unknown record kind {k}")),
    }
}

fn encode_entries(entries: &[Entry]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        let b = e.write_to_bytes().map_err(|e| e.to_string())?;
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    Ok(out)
}

fn decode_entries(mut b: &[u8]) -> Result<Vec<Entry>, String> {
    let mut take = |n: usize| -> Result<&[u8], String> {
        if b.len() < n {
            return Err("controller log: entries record cut short".into());
        }
        let (head, rest) = b.split_at(n);
        b = rest;
        Ok(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "count")?) as usize;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let n = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "length")?) as usize;
        let e =
            Entry::parse_from_bytes(take(n)?).map_err(|e| format!("controller log entry: {e}"))?;
        out.push(e);
    }
    Ok(out)
}

impl Storage for FileRaftStore {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<raft::eraftpb::Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

impl ControllerStore for FileRaftStore {
    fn append(&self, entries: &[Entry]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        check_continuous(&self.mem, entries)?;
        self.write_record(KIND_ENTRIES, &encode_entries(entries)?)?;
        ControllerStore::append(&self.mem, entries)
    }

    fn set_hard_state(&self, hs: &HardState) -> Result<(), String> {
        let b = hs.write_to_bytes().map_err(|e| e.to_string())?;
        self.write_record(KIND_HARD_STATE, &b)?;
        ControllerStore::set_hard_state(&self.mem, hs)
    }

    fn set_conf_state(&self, cs: &ConfState) -> Result<(), String> {
        let b = cs.write_to_bytes().map_err(|e| e.to_string())?;
        self.write_record(KIND_CONF_STATE, &b)?;
        ControllerStore::set_conf_state(&self.mem, cs)
    }

    fn persist(&self) -> Result<(), String> {
        self.file
            .borrow()
            .sync_data()
            .map_err(|e| format!("syncing {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn state(s: &FileRaftStore) -> (u64, u64, u64, Vec<(u64, u64)>) {
        let hs = s.initial_state().unwrap().hard_state;
        let last = s.last_index().unwrap();
        let ents = if last == 0 {
            vec![]
        } else {
            s.entries(1, last + 1, None, raft::GetEntriesContext::empty(false))
                .unwrap()
        };
        (
            hs.term,
            hs.vote,
            hs.commit,
            ents.iter().map(|e| (e.index, e.term)).collect(),
        )
    }

    #[test]
    fn state_survives_reopen_and_a_torn_tail_is_cut_to_the_last_whole_record() {
        let dir = std::env::temp_dir().join(format!("ringmq-raftstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("controller.raft");
        let (s, cut) = FileRaftStore::open(&path).unwrap();
        assert_eq!(cut, 0);
        let cs = ConfState::from((vec![1, 2, 3], vec![]));
        s.set_conf_state(&cs).unwrap();
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 1,
            ..Default::default()
        };
        s.set_hard_state(&hs).unwrap();
        // A new leader replaces the uncommitted suffix.
        s.append(&[entry(3, 2, b"c2"), entry(4, 2, b"d")]).unwrap();
        s.persist().unwrap();
        let want = state(&s);
        assert_eq!(want, (2, 3, 1, vec![(1, 1), (2, 1), (3, 2), (4, 2)]));
        drop(s);
        let (again, cut) = FileRaftStore::open(&path).unwrap();
        assert_eq!((state(&again), cut), (want.clone(), 0));
        assert_eq!(
            again.initial_state().unwrap().conf_state.voters,
            vec![1, 2, 3]
        );
        drop(again);
        // Cut the file inside the last record at every length: the state is that before it.
        let full = std::fs::read(&path).unwrap();
        let before_last = (2, 3, 1, vec![(1, 1), (2, 1), (3, 1)]);
        let last_start = {
            let mem = MemStorage::new();
            let mut at = 0;
            let mut starts = Vec::new();
            while at < full.len() {
                starts.push(at);
                let len = u32::from_le_bytes(full[at..at + 4].try_into().unwrap()) as usize;
                at += RECORD_HEADER_BYTES + len;
            }
            let _ = replay(&mem, &full);
            *starts.last().unwrap()
        };
        for len in last_start..full.len() {
            std::fs::write(&path, &full[..len]).unwrap();
            let (s, cut) = FileRaftStore::open(&path).unwrap();
            assert_eq!(state(&s), before_last, "cut at {len}");
            assert_eq!(cut as usize, len - last_start, "cut at {len}");
            assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, last_start);
        }
        // A flipped byte in the last record is a corrupt tail, cut the same way.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let (s, _) = FileRaftStore::open(&path).unwrap();
        assert_eq!(state(&s), before_last);
        drop(s);
        // A flipped byte in an earlier record, with valid records after it, is an error.
        let mut bad = full.clone();
        bad[RECORD_HEADER_BYTES + 1] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let err = FileRaftStore::open(&path).err().expect("refused");
        assert!(err.contains("followed by valid ones"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
