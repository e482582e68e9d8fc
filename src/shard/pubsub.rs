//! Publish/subscribe on the owning shard: multicast appends to this shard's destinations,
//! filtered fetches (the filter runs here, so non-matching messages never leave the shard),
//! and the per-shard counters.
//!
//! Owns: those handlers. Must not touch: sockets, other shards.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::VerifiedFrame;

use super::{storage_error, PartitionLog, Shard};
use crate::filter::{Filter, RecordFields};
use crate::limits;
use crate::protocol::multicast::{self as mc, DestResult, ShardStatsOut};
use crate::protocol::{self as proto, fb};
use crate::storage::{batch, BatchMeta, FormatTag, StorageError};

/// A destination append that was buffered (log, offsets, record count) or failed at once.
type Started = Result<(Rc<PartitionLog>, crate::storage::AppendInfo, u32), DestResult>;

/// Where a filtered fetch reads: (partition, log, offset, max bytes, wait ms).
pub(super) type FetchAt = (u32, Rc<PartitionLog>, u64, u32, u32);

/// The rest of a multicast's work on this shard.
pub type PendingResults = Pin<Box<dyn Future<Output = Vec<DestResult>>>>;

fn err_result(topic: &str, partition: u32, code: fb::ErrorCode, msg: String) -> DestResult {
    DestResult {
        topic: topic.to_string(),
        partition,
        outcome: Err((code.0, msg)),
    }
}

fn storage_result(topic: &str, partition: u32, e: &StorageError) -> DestResult {
    err_result(
        topic,
        partition,
        super::storage_error_code(e),
        e.to_string(),
    )
}

impl Shard {
    /// Appends the multicast's batch to each of `dests` owned here, in order; the returned
    /// future waits until each is durable.
    pub async fn multicast_start(
        self: &Rc<Self>,
        frame: VerifiedFrame,
        dests: Vec<(String, u32)>,
    ) -> PendingResults {
        let mut started: Vec<(String, u32, Started)> = Vec::new();
        for (topic, p) in dests {
            let log = match self.partitions_log(&topic, p) {
                Ok(l) => l,
                Err(r) => {
                    started.push((topic, p, Err(r)));
                    continue;
                }
            };
            if let Err(e) = log.reserve().await {
                let r = storage_result(&topic, p, &e);
                started.push((topic, p, Err(r)));
                continue;
            }
            let Some(m) = frame.view().body_as_multicast_produce() else {
                let r = err_result(&topic, p, fb::ErrorCode::Internal, "not a multicast".into());
                started.push((topic, p, Err(r)));
                continue;
            };
            let batch_bytes = m.batch().bytes();
            // SAFETY: the frame passed `verify_frame`, which verifies the nested batch.
            let facts = match unsafe { proto::verified_batch_facts(batch_bytes) } {
                Ok(f) => f,
                Err(e) => {
                    let r = err_result(&topic, p, e.code(), e.to_string());
                    started.push((topic, p, Err(r)));
                    continue;
                }
            };
            let (first, max) = if facts.max_timestamp_ms > 0 {
                (facts.first_timestamp_ms, facts.max_timestamp_ms)
            } else {
                let now = self.now_ms();
                (now, now)
            };
            let meta = BatchMeta {
                format: FormatTag::RingmqFlatbuffers,
                record_count: facts.record_count,
                first_timestamp_ms: first,
                max_timestamp_ms: max,
            };
            let r = match log.append_buffered(meta, batch_bytes) {
                Ok(info) => {
                    self.fanout_appends.set(self.fanout_appends.get() + 1);
                    Ok((log, info, facts.record_count))
                }
                Err(e) => Err(storage_result(&topic, p, &e)),
            };
            started.push((topic, p, r));
        }
        Box::pin(async move {
            let mut out = Vec::with_capacity(started.len());
            for (topic, p, r) in started {
                out.push(match r {
                    Err(r) => r,
                    Ok((log, info, count)) => match log.wait_durable(info).await {
                        Ok(()) => DestResult {
                            topic,
                            partition: p,
                            outcome: Ok((info.base_offset, count)),
                        },
                        Err(e) => storage_result(&topic, p, &e),
                    },
                });
            }
            out
        })
    }

    fn partitions_log(&self, topic: &str, partition: u32) -> Result<Rc<PartitionLog>, DestResult> {
        self.log(0, topic, partition).map_err(|frame| {
            let (code, msg) = proto::verify_frame(&frame[proto::LEN_PREFIX_BYTES..])
                .ok()
                .and_then(|f| f.body_as_error())
                .map(|e| (e.code(), e.message().unwrap_or_default().to_string()))
                .unwrap_or((fb::ErrorCode::Internal, "unavailable".into()));
            err_result(topic, partition, code, msg)
        })
    }

    /// This shard's counters.
    pub fn stats_local(&self, corr: u64) -> Bytes {
        let c = &self.router.copies;
        let s = ShardStatsOut {
            shard: self.id() as u32,
            forwards: c.forwards.get(),
            multicast_copies: c.multicast.get(),
            replies: c.replies.get(),
            meta: c.meta.get(),
            fanout_appends: self.fanout_appends.get(),
        };
        mc::encode_stats_response(corr, &[s])
    }

    /// A fetch with a content filter: scans forward past non-matching messages (until a match,
    /// the end of the log, or the deadline) and returns only matching records.
    pub(super) async fn fetch_filtered(&self, corr: u64, at: FetchAt, filter_src: &str) -> Bytes {
        let (partition, log, mut offset, max_bytes, wait_ms) = at;
        let filter = match Filter::compile(filter_src) {
            Ok(f) => f,
            Err(e) => {
                return proto::encode_error(corr, fb::ErrorCode::InvalidRequest, &e.to_string())
            }
        };
        let deadline = Instant::now()
            + Duration::from_millis(u64::from(wait_ms.min(limits::FETCH_WAIT_MS_MAX)));
        loop {
            let changed = log.data_changed();
            let r = match log.read(offset, max_bytes as usize).await {
                Ok(r) => r,
                Err(e) => return storage_error(corr, &e),
            };
            let mut matched = Vec::new();
            for stored in &r.batches {
                let Ok(h) = batch::decode_header(stored) else {
                    continue;
                };
                let Ok(rb) = flatbuffers::root::<fb::RecordBatch>(batch::payload(stored)) else {
                    continue;
                };
                for (i, rec) in rb.records().iter().enumerate() {
                    let o = h.base_offset + i as u64;
                    if o >= offset && filter.matches(&RecordFields(rec)) {
                        let ts = if rec.timestamp_ms() > 0 {
                            rec.timestamp_ms()
                        } else {
                            h.max_timestamp_ms
                        };
                        matched.push((o, ts, rec));
                    }
                }
            }
            let now = Instant::now();
            if !matched.is_empty() || now >= deadline || self.is_shutting_down() {
                let pos = proto::FetchPosition {
                    partition,
                    log_start: r.log_start,
                    log_end: r.log_end,
                    next_offset: r.next_offset,
                };
                return proto::encode_filtered_fetch_response(corr, pos, &matched);
            }
            if !r.batches.is_empty() {
                offset = r.next_offset;
                glommio::yield_if_needed().await;
                continue;
            }
            let stop = self.shutdown.wait();
            let timer = crate::runtime::sleep(deadline - now);
            futures_lite::future::or(futures_lite::future::or(changed, stop), timer).await;
        }
    }
}
