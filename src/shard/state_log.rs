//! A shard's durable consumer state — committed group offsets and queue acks — appended to the
//! shard's own log (`<data>/state/shard-<id>`), replayed at boot, compacted by snapshot.
//!
//! Owns: the record format and the state log of this shard. Must not touch: partition logs.
//!
//! Records are text lines, one batch per durable change:
//! - `C\t<seq>\t<group>\t<topic>\t<partition>\t<offset>`: a committed group offset;
//! - `Q\t<seq>\t<topic>\t<subscription>\t<partition>\t<offset,offset,...>`: queue acks;
//! - `QS\t<seq>\t<topic>\t<subscription>\t<partition>\t<floor>\t<offset,...>`: a queue snapshot
//!   (everything below floor acked, plus the listed offsets).
//!
//! `seq` grows across the broker's life; at replay, records are applied in seq order across all
//! shards' logs, so state whose owner moved (after a `--cores` change) keeps its newest value.
//! Names cannot hold tabs or newlines (validated at the edge).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::limits;
use crate::protocol::groups::OffsetOut;
use crate::storage::{
    self, BatchMeta, DmaStorage, Durability, FormatTag, Log, LogConfig, StorageError,
};

pub use crate::partition::queue::QueueAcks;

/// Everything replayed at boot.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// (group, topic, partition) → (seq, offset).
    pub offsets: BTreeMap<(String, String, u32), (u64, i64)>,
    /// (topic, subscription, partition) → acks.
    pub queues: BTreeMap<(String, String, u32), QueueAcks>,
    pub max_seq: u64,
}

pub struct StateLog {
    log: Log<DmaStorage>,
    next_seq: Cell<u64>,
    compact_bytes: u64,
}

fn state_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("state")
}

fn csv(offsets: impl IntoIterator<Item = u64>) -> String {
    offsets
        .into_iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_csv(s: &str) -> Vec<u64> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// Replays every shard's state log (read-only).
pub fn load_all(data_dir: &Path) -> Result<Restored, String> {
    let mut out = Restored::default();
    let dir = state_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut queue_lines: Vec<(u64, Vec<String>)> = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        for stored in storage::readonly::read_batches(&e.path())? {
            let payload = storage::readonly::payload(&stored);
            for line in String::from_utf8_lossy(&payload).lines() {
                let f: Vec<&str> = line.split('\t').collect();
                let Some(seq) = f.get(1).and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                out.max_seq = out.max_seq.max(seq);
                match (f[0], f.len()) {
                    ("C", 6) => {
                        let (Ok(p), Ok(o)) = (f[4].parse::<u32>(), f[5].parse::<i64>()) else {
                            continue;
                        };
                        let key = (f[2].to_string(), f[3].to_string(), p);
                        if out.offsets.get(&key).is_none_or(|(s, _)| *s < seq) {
                            out.offsets.insert(key, (seq, o));
                        }
                    }
                    ("Q", 6) | ("QS", 7) => {
                        queue_lines.push((seq, f.iter().map(|s| s.to_string()).collect()))
                    }
                    _ => {}
                }
            }
        }
    }
    queue_lines.sort_by_key(|(s, _)| *s);
    for (_, f) in queue_lines {
        let Ok(p) = f[4].parse::<u32>() else { continue };
        let st = out
            .queues
            .entry((f[2].clone(), f[3].clone(), p))
            .or_default();
        if f[0] == "QS" {
            st.floor = f[5].parse().unwrap_or(0);
            st.acked = parse_csv(&f[6]).into_iter().collect();
        } else {
            st.acked.extend(parse_csv(&f[5]));
        }
        while st.acked.remove(&st.floor) {
            st.floor += 1;
        }
    }
    Ok(out)
}

impl StateLog {
    pub async fn open(
        data_dir: &Path,
        shard: usize,
        first_seq: u64,
        compact_bytes: u64,
    ) -> Result<Self, StorageError> {
        let cfg = LogConfig {
            // Several segments per compaction interval, so compaction can delete whole ones.
            segment_bytes_max: limits::STATE_LOG_SEGMENT_BYTES
                .min(compact_bytes / 4)
                .max(16 * 1024),
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
            compact_bytes,
        })
    }

    fn seq(&self) -> u64 {
        let s = self.next_seq.get();
        self.next_seq.set(s + 1);
        s
    }

    async fn append_text(&self, text: String, lines: usize) -> Result<(), StorageError> {
        if lines == 0 {
            return Ok(());
        }
        let meta = BatchMeta {
            format: FormatTag::Opaque,
            record_count: lines as u32,
            first_timestamp_ms: crate::runtime::clock::system_now_ms(),
            max_timestamp_ms: crate::runtime::clock::system_now_ms(),
        };
        self.log.append(meta, text.as_bytes()).await.map(|_| ())
    }

    /// Appends group commits durably (group commit with other appends of this shard).
    pub async fn append(&self, records: &[(String, OffsetOut)]) -> Result<(), StorageError> {
        let mut text = String::new();
        for (group, (t, p, o)) in records {
            text.push_str(&format!("C\t{}\t{group}\t{t}\t{p}\t{o}\n", self.seq()));
        }
        self.append_text(text, records.len()).await
    }

    /// Appends queue acks durably.
    pub async fn append_acks(
        &self,
        topic: &str,
        sub: &str,
        partition: u32,
        offsets: &[u64],
    ) -> Result<(), StorageError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let text = format!(
            "Q\t{}\t{topic}\t{sub}\t{partition}\t{}\n",
            self.seq(),
            csv(offsets.iter().copied())
        );
        self.append_text(text, 1).await
    }

    pub async fn sync(&self) -> Result<(), StorageError> {
        self.log.sync().await
    }

    /// Whether the log is past its compaction size.
    pub fn needs_compaction(&self) -> bool {
        self.log.size_bytes() >= self.compact_bytes
    }

    /// Encodes a snapshot of every live offset and queue state *now*, taking their sequence
    /// numbers now: any record appended later has a higher sequence and wins at replay. The
    /// caller must have applied to memory everything it appended before (apply, then append).
    /// Returns the batches to append and the log offset below which segments may go.
    pub fn snapshot(
        &self,
        offsets: &[(String, OffsetOut)],
        queues: &[((String, String, u32), QueueAcks)],
    ) -> (Vec<(String, usize)>, u64) {
        let before = self.log.end_offset();
        let mut chunks = Vec::new();
        for chunk in offsets.chunks(10_000) {
            let mut text = String::new();
            for (group, (t, p, o)) in chunk {
                text.push_str(&format!("C\t{}\t{group}\t{t}\t{p}\t{o}\n", self.seq()));
            }
            chunks.push((text, chunk.len()));
        }
        for chunk in queues.chunks(1_000) {
            let mut text = String::new();
            for ((t, s, p), q) in chunk {
                text.push_str(&format!(
                    "QS\t{}\t{t}\t{s}\t{p}\t{}\t{}\n",
                    self.seq(),
                    q.floor,
                    csv(q.acked.iter().copied())
                ));
            }
            chunks.push((text, chunk.len()));
        }
        (chunks, before)
    }

    /// Appends a snapshot made by [`StateLog::snapshot`], then deletes the segments below it.
    pub async fn compact(
        &self,
        chunks: Vec<(String, usize)>,
        before: u64,
    ) -> Result<(), StorageError> {
        for (text, lines) in chunks {
            self.append_text(text, lines).await?;
        }
        self.log.delete_before(before).await?;
        Ok(())
    }
}

/// "Durable, then applied, then acknowledged" for state-log changes, applied in the order they
/// were appended (the order replay uses), and a count of changes between the two so that a
/// compaction snapshot is taken only when memory holds every durable change.
///
/// Use: `let t = order.begin().await;` right before the append (no await between, so tickets
/// follow sequence numbers); await the append; `order.wait_turn(t).await`; apply if it
/// succeeded; `order.finish(t)`. `finish` must run for every ticket, failed or not.
///
/// A compaction closes the gate ([`ApplyOrder::close_gate`]): new changes wait at `begin`
/// while those in flight drain, so a snapshot is never starved by a steady stream of changes.
#[derive(Default)]
pub struct ApplyOrder {
    next_ticket: Cell<u64>,
    next_apply: Cell<u64>,
    turn: crate::runtime::Notify,
    gate_closed: Cell<bool>,
    gate: crate::runtime::Notify,
}

impl ApplyOrder {
    /// Takes the next ticket (a change is now in flight), after the gate opens.
    pub async fn begin(&self) -> u64 {
        while self.gate_closed.get() {
            let w = self.gate.wait();
            if !self.gate_closed.get() {
                break;
            }
            w.await;
        }
        let t = self.next_ticket.get();
        self.next_ticket.set(t + 1);
        t
    }

    /// Holds new changes at `begin` (a snapshot is about to be taken).
    pub fn close_gate(&self) {
        self.gate_closed.set(true);
    }

    /// Lets changes in again.
    pub fn open_gate(&self) {
        self.gate_closed.set(false);
        self.gate.notify_all();
    }

    /// Waits until no change is between its append and its apply.
    pub async fn drained(&self) {
        loop {
            let w = self.turn.wait();
            if self.in_flight() == 0 {
                return;
            }
            w.await;
        }
    }

    /// Waits until every earlier ticket has been applied or abandoned.
    pub async fn wait_turn(&self, ticket: u64) {
        loop {
            let w = self.turn.wait();
            if self.next_apply.get() >= ticket {
                return;
            }
            w.await;
        }
    }

    /// Marks `ticket` done (applied, or abandoned after a failed append).
    pub fn finish(&self, ticket: u64) {
        debug_assert_eq!(self.next_apply.get(), ticket, "finish in ticket order");
        self.next_apply.set(ticket + 1);
        self.turn.notify_all();
    }

    /// Changes appended (or being appended) and not yet applied.
    pub fn in_flight(&self) -> u64 {
        self.next_ticket.get() - self.next_apply.get()
    }
}

#[cfg(test)]
mod apply_order_tests {
    use super::ApplyOrder;
    use std::rc::Rc;

    #[test]
    fn later_tickets_wait_for_earlier_ones() {
        let log = crate::runtime::block_on(|| {
            Box::pin(async {
                let order = Rc::new(ApplyOrder::default());
                let applied = Rc::new(std::cell::RefCell::new(Vec::new()));
                let (a, b) = (order.begin().await, order.begin().await);
                assert_eq!(order.in_flight(), 2);
                // b's append finishes first; it must still apply after a.
                let (o, ap) = (order.clone(), applied.clone());
                let late = glommio::spawn_local(async move {
                    o.wait_turn(b).await;
                    ap.borrow_mut().push(b);
                    o.finish(b);
                });
                crate::runtime::sleep(std::time::Duration::from_millis(5)).await;
                assert!(applied.borrow().is_empty(), "b waited for a");
                order.wait_turn(a).await;
                applied.borrow_mut().push(a);
                order.finish(a);
                late.await;
                assert_eq!(order.in_flight(), 0);
                let v = applied.borrow().clone();
                v
            })
        })
        .expect("executor");
        assert_eq!(log, vec![0, 1]);
    }
}
