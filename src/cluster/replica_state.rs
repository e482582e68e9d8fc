//! A partition replica's Raft state beside its log (issue 14): the HardState (term, vote,
//! commit), the voters and learners, and where the log's Raft entries start (the index and
//! offset of its first entry, which move when retention deletes segments). The log holds the
//! entries themselves, one stored batch each, so with this file a restarted replica rebuilds
//! its `ReplicaIndex` by scanning the log.
//!
//! `<partition dir>/replica.state`, rewritten whole (temp file, fsync, rename, fsync dir), so
//! a crash leaves the old or the new state, never a mix. Term, vote and membership must be
//! durable before a vote or an append is answered ([`ReplicaState::must_sync_before_send`]);
//! the commit index may be saved lazily (a restarted replica learns it again from the leader,
//! and its commit never goes below what was saved).
//!
//! Format: `RQR1`, a u32 CRC32 of the rest, then little-endian term, vote, commit, first
//! index, first offset, the term before the first entry (u64 each), voter count and ids, learner count and ids (u32 count,
//! u64 ids).
//!
//! Owns: that one file. Must not touch: the log, Raft itself.

use std::io::Write;
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, HardState};

const MAGIC: &[u8; 4] = b"RQR1";
const FILE: &str = "replica.state";
/// Voters and learners together at most (a bound on what a file may hold).
const MEMBERS_MAX: usize = 64;

/// What a replica keeps of its Raft state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Raft index and first offset of the log's first entry (1 and 0 for a log never cut by
    /// retention), and the term of the entry just before it (0 before any cut).
    pub first_index: u64,
    pub first_offset: u64,
    pub prev_term: u64,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

impl ReplicaState {
    /// A new replica of a group with these voters.
    pub fn new(voters: Vec<u64>) -> Self {
        Self {
            hard_state: HardState::default(),
            conf_state: ConfState::from((voters, vec![])),
            first_index: 1,
            first_offset: 0,
            prev_term: 0,
        }
    }

    /// Whether going from `self` to `next` must be durable before any message that follows
    /// is sent: a new term or vote, a membership change, or a moved log start. A commit
    /// index alone may be saved later.
    pub fn must_sync_before_send(&self, next: &ReplicaState) -> bool {
        self.hard_state.term != next.hard_state.term
            || self.hard_state.vote != next.hard_state.vote
            || self.conf_state != next.conf_state
            || self.first_index != next.first_index
            || self.first_offset != next.first_offset
            || self.prev_term != next.prev_term
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let hs = &self.hard_state;
        for v in [
            hs.term,
            hs.vote,
            hs.commit,
            self.first_index,
            self.first_offset,
            self.prev_term,
        ] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        for ids in [&self.conf_state.voters, &self.conf_state.learners] {
            body.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                body.extend_from_slice(&id.to_le_bytes());
            }
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err("not a replica state file".into());
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[4..8]);
        let body = &bytes[8..];
        if crc32fast::hash(body) != u32::from_le_bytes(crc) {
            return Err("checksum mismatch (corrupt)".into());
        }
        let mut r = super::wire::Reader::new(body);
        let hs = HardState {
            term: r.u64()?,
            vote: r.u64()?,
            commit: r.u64()?,
            ..Default::default()
        };
        let (first_index, first_offset, prev_term) = (r.u64()?, r.u64()?, r.u64()?);
        let mut members = Vec::new();
        for _ in 0..2 {
            let n = r.count(8)?;
            let total = n + members.iter().map(Vec::len).sum::<usize>();
            if total > MEMBERS_MAX {
                return Err(format!("{total} members (at most {MEMBERS_MAX})"));
            }
            members.push((0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?);
        }
        if !r.is_empty() {
            return Err("trailing bytes".into());
        }
        let learners = members.pop().unwrap_or_default();
        let voters = members.pop().unwrap_or_default();
        if first_index == 0 {
            return Err("first index 0 (Raft indexes start at 1)".into());
        }
        Ok(Self {
            hard_state: hs,
            conf_state: ConfState::from((voters, learners)),
            first_index,
            first_offset,
            prev_term,
        })
    }

    /// Replaces the state file in `dir` durably (blocking std I/O: a shard's Raft loop must
    /// call it off its reactor or accept the stall; term and vote change rarely).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let members = self.conf_state.voters.len() + self.conf_state.learners.len();
        if members > MEMBERS_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{members} members; a replica state holds at most {MEMBERS_MAX}"),
            ));
        }
        let tmp = dir.join(format!("{FILE}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path(dir))?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// The state saved in `dir`; `None` if there is none (a replica never started); an error
    /// naming the file if it cannot be read or is corrupt (never a silent fresh start: a
    /// replica that forgot its vote could vote twice in a term).
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let p = path(dir);
        // A state file is a few hundred bytes; a large one is not ours (never read whole).
        let max_bytes = 64 + 8 * (8 + MEMBERS_MAX as u64);
        if std::fs::metadata(&p).is_ok_and(|m| m.len() > max_bytes) {
            return Err(format!(
                "{}: larger than a replica state can be",
                p.display()
            ));
        }
        match std::fs::read(&p) {
            Ok(bytes) => Self::decode(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", p.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringmq-rstate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn saved_state_loads_back_and_corruption_is_an_error() {
        let d = dir("rt");
        assert_eq!(ReplicaState::load(&d).unwrap(), None);
        let mut s = ReplicaState::new(vec![1, 2, 3]);
        s.hard_state.term = 7;
        s.hard_state.vote = 2;
        s.hard_state.commit = 41;
        s.first_index = 10;
        s.first_offset = 900;
        s.prev_term = 6;
        s.save(&d).unwrap();
        assert_eq!(ReplicaState::load(&d).unwrap(), Some(s.clone()));
        // A leftover temp file (a crash before the rename) changes nothing.
        std::fs::write(d.join("replica.state.tmp"), b"torn").unwrap();
        assert_eq!(ReplicaState::load(&d).unwrap(), Some(s.clone()));
        let mut bytes = std::fs::read(d.join("replica.state")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(d.join("replica.state"), &bytes).unwrap();
        let e = ReplicaState::load(&d).unwrap_err();
        assert!(e.contains("replica.state") && e.contains("corrupt"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_term_vote_membership_and_log_start_must_sync_before_sending() {
        let a = ReplicaState::new(vec![1, 2, 3]);
        let mut b = a.clone();
        b.hard_state.commit = 5;
        assert!(!a.must_sync_before_send(&b), "commit alone is lazy");
        b.hard_state.vote = 3;
        assert!(a.must_sync_before_send(&b));
        let mut c = a.clone();
        c.conf_state = ConfState::from((vec![1, 2], vec![3]));
        assert!(a.must_sync_before_send(&c));
        let mut d = a.clone();
        d.first_index = 2;
        assert!(a.must_sync_before_send(&d));
    }
}
