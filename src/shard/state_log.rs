//! A shard's durable consumer state: committed group offsets, appended to the shard's own log
//! (`<data>/state/shard-<id>`), replayed at boot, compacted by snapshot.
//!
//! Owns: the record format and the state log of this shard. Must not touch: partition logs.
//!
//! Record format: one batch per commit, text lines `C\t<seq>\t<group>\t<topic>\t<partition>\t<offset>`.
//! `seq` grows across the broker's life; at replay the highest seq per (group, topic,
//! partition) wins, so a group whose coordinator moved (after a `--cores` change) keeps its
//! newest offsets. Group and topic names cannot hold tabs or newlines (validated at the edge).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::limits;
use crate::protocol::groups::OffsetOut;
use crate::storage::{
    self, BatchMeta, DmaStorage, Durability, FormatTag, Log, LogConfig, StorageError,
};

/// A restored offset: (group, topic, partition) → (seq, offset).
pub type Restored = BTreeMap<(String, String, u32), (u64, i64)>;

pub struct StateLog {
    log: Log<DmaStorage>,
    next_seq: Cell<u64>,
}

fn state_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("state")
}

/// Replays every shard's state log (read-only).
pub fn load_all(data_dir: &Path) -> Result<Restored, String> {
    let mut out = Restored::new();
    let dir = state_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    for e in entries.filter_map(|e| e.ok()) {
        for stored in storage::readonly::read_batches(&e.path())? {
            let payload = storage::readonly::payload(&stored);
            for line in String::from_utf8_lossy(&payload).lines() {
                if let Some((key, val)) = parse_line(line) {
                    if out.get(&key).is_none_or(|(s, _)| *s < val.0) {
                        out.insert(key, val);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// ((group, topic, partition), (seq, offset)).
type Entry = ((String, String, u32), (u64, i64));

fn parse_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 6 || f[0] != "C" {
        return None;
    }
    Some((
        (f[2].to_string(), f[3].to_string(), f[4].parse().ok()?),
        (f[1].parse().ok()?, f[5].parse().ok()?),
    ))
}

impl StateLog {
    pub async fn open(data_dir: &Path, shard: usize, first_seq: u64) -> Result<Self, StorageError> {
        let cfg = LogConfig {
            segment_bytes_max: limits::STATE_LOG_SEGMENT_BYTES,
            durability: Durability::Always,
            ..LogConfig::default()
        };
        let log = Log::open(
            DmaStorage,
            &state_dir(data_dir).join(format!("shard-{shard}")),
            cfg,
        )
        .await?;
        Ok(Self {
            log,
            next_seq: Cell::new(first_seq),
        })
    }

    fn encode(&self, records: &[(String, OffsetOut)]) -> String {
        let mut text = String::new();
        for (group, (t, p, o)) in records {
            let seq = self.next_seq.get();
            self.next_seq.set(seq + 1);
            text.push_str(&format!("C\t{seq}\t{group}\t{t}\t{p}\t{o}\n"));
        }
        text
    }

    /// Appends commits durably (group commit with other appends of this shard).
    pub async fn append(&self, records: &[(String, OffsetOut)]) -> Result<(), StorageError> {
        if records.is_empty() {
            return Ok(());
        }
        let text = self.encode(records);
        let meta = BatchMeta {
            format: FormatTag::Opaque,
            record_count: records.len() as u32,
            first_timestamp_ms: crate::shard::now_ms(),
            max_timestamp_ms: crate::shard::now_ms(),
        };
        self.log.append(meta, text.as_bytes()).await.map(|_| ())
    }

    pub async fn sync(&self) -> Result<(), StorageError> {
        self.log.sync().await
    }

    /// Past the size limit: writes `snapshot` (every live offset) and deletes older segments.
    pub async fn maybe_compact(
        &self,
        snapshot: &[(String, OffsetOut)],
    ) -> Result<bool, StorageError> {
        if self.log.size_bytes() < limits::STATE_LOG_COMPACT_BYTES {
            return Ok(false);
        }
        let before = self.log.end_offset();
        for chunk in snapshot.chunks(10_000) {
            self.append(chunk).await?;
        }
        self.log.delete_before(before).await?;
        Ok(true)
    }
}
