//! A partition replica at start: its Raft index rebuilt from its log (issue 14). Every stored
//! batch from the log's first offset is one Raft entry, in order, starting at the first index
//! the replica's state file records; the batch header carries the entry's term.
//!
//! Owns: that scan. Must not touch: Raft, the state file (the caller loads it), writes to the
//! log.

use super::replica_log::{EntryMeta, ReplicaIndex};
use super::replica_state::ReplicaState;
use crate::storage::{batch, Log, Storage};

/// Bytes read per step of the scan.
const SCAN_READ_BYTES: usize = 1 << 20;

/// The index of every entry the log holds durably (committed or not), or why the log and the
/// state disagree (never a silently shorter index: raft-rs must not lose entries it was told
/// were persisted).
pub async fn rebuild_index<S: Storage>(
    log: &Log<S>,
    state: &ReplicaState,
) -> Result<ReplicaIndex, String> {
    let dir = log.dir().display().to_string();
    // Retention saves the state's new start before deleting segments, so a crash between
    // the two leaves the log starting earlier than the state: scan from the state's start.
    if log.start_offset() > state.first_offset {
        return Err(format!(
            "{dir}: the log starts at offset {} but the replica state says {}",
            log.start_offset(),
            state.first_offset
        ));
    }
    let mut index = ReplicaIndex::starting_at(state.first_index, state.prev_term)
        .with_first_offset(state.first_offset);
    let mut at = state.first_offset;
    loop {
        let r = log
            .read_durable(at, SCAN_READ_BYTES)
            .await
            .map_err(|e| format!("{dir}: reading the log to rebuild the raft index: {e}"))?;
        if r.batches.is_empty() {
            return Ok(index);
        }
        for b in &r.batches {
            let h = batch::decode_verified(b).map_err(|e| format!("{dir}: {e:?}"))?;
            let meta = EntryMeta {
                term: u64::from(h.leader_term),
                base_offset: h.base_offset,
                records: h.record_count,
            };
            index
                .push(index.last_index() + 1, meta)
                .map_err(|e| format!("{dir}: {e}"))?;
        }
        at = r.next_offset;
    }
}

/// The HardState to start Raft with: the saved one, its commit index no lower than the last
/// entry retention deleted and no higher than the last entry the log holds (the commit is saved lazily and may have been written before the
/// entries it covers were durable; the leader sends it again).
pub fn start_hard_state(state: &ReplicaState, index: &ReplicaIndex) -> raft::eraftpb::HardState {
    let mut hs = state.hard_state.clone();
    // Entries retention deleted were applied, hence committed.
    hs.commit = hs
        .commit
        .min(index.last_index())
        .max(index.first_index() - 1);
    hs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{BatchMeta, CommitPolicy, Durability, FormatTag, LogConfig, MemStorage};

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes_max: 16 * 1024,
            durability: Durability::Always,
            commit_policy: CommitPolicy::External,
            ..LogConfig::default()
        }
    }

    fn meta(records: u32) -> BatchMeta {
        BatchMeta {
            format: FormatTag::Opaque,
            record_count: records,
            first_timestamp_ms: 1,
            max_timestamp_ms: 1,
        }
    }

    #[test]
    fn the_index_comes_back_from_the_log_committed_or_not() {
        let out = crate::runtime::block_on(|| {
            Box::pin(async {
                let storage = MemStorage::new();
                let dir = std::path::Path::new("/replica");
                let log = Log::open(storage.clone(), dir, cfg()).await.expect("open");
                // Terms 1, 1, 2, 3 with 3, 1, 2, 1 records; nothing is committed.
                for (term, records) in [(1u32, 3u32), (1, 1), (2, 2), (3, 1)] {
                    log.set_leader_term(term);
                    log.append(meta(records), &[7u8; 40]).await.expect("append");
                }
                drop(log);
                let log = Log::open(storage.clone(), dir, cfg())
                    .await
                    .expect("reopen");
                let state = ReplicaState::new(vec![1, 2, 3]);
                let ix = rebuild_index(&log, &state).await.expect("rebuild");
                let got: Vec<(u64, EntryMeta)> = (ix.first_index()..=ix.last_index())
                    .filter_map(|i| ix.get(i).map(|m| (i, *m)))
                    .collect();
                let mut late = state.clone();
                late.first_offset = 0;
                late.hard_state.commit = 99;
                let ix = rebuild_index(&log, &late).await.expect("rebuild");
                let commit = start_hard_state(&late, &ix).commit;
                (got, commit)
            })
        })
        .expect("executor");
        let m = |term, base_offset, records| EntryMeta {
            term,
            base_offset,
            records,
        };
        assert_eq!(
            out.0,
            vec![
                (1, m(1, 0, 3)),
                (2, m(1, 3, 1)),
                (3, m(2, 4, 2)),
                (4, m(3, 6, 1))
            ]
        );
        assert_eq!(
            out.1, 4,
            "a saved commit past the log is clamped to its last entry"
        );
    }
}
