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

use super::{LocalPartition, Shard};
use crate::cluster::replica::{Proposed, Replica};
use crate::filter::{Filter, RecordFields};
use crate::limits;
use crate::partition::Appended;
use crate::protocol::multicast::{self as mc, DestResult, ShardStatsOut};
use crate::protocol::{self as proto, fb};
use crate::server::wire_error::{self, WireCode};
use crate::storage::{batch, DmaStorage};

/// A destination append that was buffered (partition, what was appended), proposed to a
/// replicated partition's Raft group (replica, index, term), or failed at once.
enum Taken {
    Appended(Rc<LocalPartition>, Appended),
    Proposed(Rc<Replica<DmaStorage>>, u64, u64),
}
type Started = Result<Taken, DestResult>;

/// Where a filtered fetch reads: (partition, offset, max bytes, wait ms).
pub(super) type FetchAt = (Rc<LocalPartition>, u64, u32, u32);

/// The rest of a multicast's work on this shard.
pub type PendingResults = Pin<Box<dyn Future<Output = Vec<DestResult>>>>;

fn err_result(topic: &str, partition: u32, e: &impl WireCode) -> DestResult {
    DestResult {
        topic: topic.to_string(),
        partition,
        outcome: Err((e.wire_code().0, e.to_string())),
    }
}

impl Shard {
    /// Appends the multicast's batch to each of `dests` owned here, in order; the returned
    /// future waits until each is acknowledged (committed).
    pub async fn multicast_start(
        self: &Rc<Self>,
        frame: VerifiedFrame,
        dests: Vec<(String, u32)>,
    ) -> PendingResults {
        let batch = frame.batch();
        let mut started: Vec<(String, u32, Started)> = Vec::new();
        for (topic, p) in dests {
            let r = match &batch {
                Some(Ok(batch)) => self.multicast_append(&topic, p, batch).await,
                Some(Err(e)) => Err(err_result(&topic, p, e)),
                None => Err(DestResult {
                    topic: topic.clone(),
                    partition: p,
                    outcome: Err((fb::ErrorCode::Internal.0, "not a multicast".into())),
                }),
            };
            started.push((topic, p, r));
        }
        Box::pin(async move {
            let mut out = Vec::with_capacity(started.len());
            for (topic, p, r) in started {
                out.push(match r {
                    Err(r) => r,
                    Ok(Taken::Appended(part, appended)) => {
                        match part.acknowledged(&appended).await {
                            Ok(()) => DestResult {
                                topic,
                                partition: p,
                                outcome: Ok((appended.info.base_offset, appended.record_count)),
                            },
                            Err(e) => err_result(&topic, p, &e),
                        }
                    }
                    Ok(Taken::Proposed(r, index, term)) => {
                        match r.wait_committed(index, term).await {
                            Ok(c) => DestResult {
                                topic,
                                partition: p,
                                outcome: Ok((c.base_offset, c.records)),
                            },
                            Err(e) => err_result(&topic, p, &e),
                        }
                    }
                });
            }
            out
        })
    }

    /// Appends one multicast copy to destination `topic`-`p` owned here.
    async fn multicast_append(&self, topic: &str, p: u32, batch: &proto::VerifiedBatch) -> Started {
        let part = self
            .open_partition(topic, p)
            .map_err(|e| err_result(topic, p, &e))?;
        if let Some(r) = self.replica(topic, p) {
            let producer = batch.facts().producer;
            let (index, term) = match r.propose_batch(part.entry_data(batch), producer) {
                Ok(Proposed::New(i, t) | Proposed::Duplicate(i, t)) => (i, t),
                Err(e) => return Err(err_result(topic, p, &e)),
            };
            self.replication_wake();
            self.fanout_appends.set(self.fanout_appends.get() + 1);
            return Ok(Taken::Proposed(r, index, term));
        }
        match part.produce(batch).await {
            Ok(appended) => {
                self.fanout_appends.set(self.fanout_appends.get() + 1);
                Ok(Taken::Appended(part, appended))
            }
            Err(e) => Err(err_result(topic, p, &e)),
        }
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
            node_forwards: c.node_forwards.get(),
            node_multicast_copies: c.node_multicast.get(),
            node_forwarded_in: c.node_forwarded_in.get(),
            ..Default::default()
        };
        let s = match self.replication() {
            Some(r) => r.add_stats(s),
            None => s,
        };
        mc::encode_stats_response(corr, &[s])
    }

    /// A fetch with a content filter: scans forward past non-matching messages (until a match,
    /// the end of the log, or the deadline) and returns only matching records.
    pub(super) async fn fetch_filtered(&self, corr: u64, at: FetchAt, filter_src: &str) -> Bytes {
        let (part, mut offset, max_bytes, wait_ms) = at;
        let partition = part.id();
        let filter = match Filter::compile(filter_src) {
            Ok(f) => f,
            Err(e) => {
                return proto::encode_error(corr, fb::ErrorCode::InvalidRequest, &e.to_string())
            }
        };
        let deadline = Instant::now()
            + Duration::from_millis(u64::from(wait_ms.min(limits::FETCH_WAIT_MS_MAX)));
        loop {
            let changed = part.data_changed();
            let r = match part.fetch(offset, max_bytes as usize).await {
                Ok(r) => r,
                Err(e) => return wire_error::frame(corr, &e),
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
