//! Queue (shared subscription) handlers on the shard that owns the partition: fetch with
//! leases, settle (ack / nack / extend), dead-lettering, consumer disconnects, counters.
//!
//! Owns: the order "ack durable in the state log, then applied, then answered" and the
//! dead-letter path (typed internal calls). Must not touch: sockets, or a subscription's state
//! except through `Partition` methods.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::VerifiedFrame;

use super::{LocalPartition, Shard};
use crate::limits;
use crate::partition::{QueueAcks, Reason, Settle, SubConfig};
use crate::protocol::queue::{self as q, SubStatsOut};
use crate::protocol::{self as proto, fb, RecordIn, VerifiedBatch};
use crate::router::route::{Dest, Target, CONTROLLER_SHARD};
use crate::router::Internal;
use crate::server::wire_error;

/// (topic, subscription, partition).
pub type QKey = (String, String, u32);

/// Why an ack was not recorded.
#[derive(Debug)]
pub enum AckError {
    Partition(crate::partition::PartitionError),
    StateLogClosed,
    /// The state-log append failed: nothing was applied.
    StateLog(String),
}

impl std::fmt::Display for AckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Partition(e) => write!(f, "{e}"),
            Self::StateLogClosed => write!(f, "state log not open"),
            Self::StateLog(e) => write!(f, "state log: {e}"),
        }
    }
}

fn invalid(corr: u64, msg: &str) -> Bytes {
    proto::encode_error(corr, fb::ErrorCode::InvalidRequest, msg)
}

impl Shard {
    /// Queue states of this shard for compaction snapshots: every subscription of every open
    /// partition (used since the restart or not), and restored state still waiting for one of
    /// this shard's partitions (one that failed to open keeps its acks for the next start).
    pub fn queue_snapshot(&self) -> Vec<(QKey, QueueAcks)> {
        let mut out = Vec::new();
        for part in self.open_partitions() {
            for (sub, acks) in part.subscription_acks() {
                out.push(((part.topic().to_string(), sub, part.id()), acks));
            }
        }
        // Every shard replays every shard's state log at boot, so this map also holds other
        // shards' partitions: only this shard's own may go into its snapshot (a stale copy
        // in another shard's log would override the owner's newer acks at the next boot).
        let waiting = self.restored_queues.borrow();
        let mine = waiting.iter().filter(|((topic, _, partition), _)| {
            let t = Target::Partition {
                topic,
                partition: *partition,
            };
            self.route(t)
                .is_ok_and(|(_, d)| d == Dest::local(self.id()))
        });
        out.extend(mine.map(|(k, a)| (k.clone(), a.clone())));
        out
    }

    /// A consumer's connection closed: its leases return to their queues at once.
    pub fn release_connection(&self, conn: u64) {
        for part in self.open_partitions() {
            part.release_consumer(conn);
        }
    }

    pub(super) async fn queue_fetch(
        self: &Rc<Self>,
        corr: u64,
        partition: u32,
        conn: u64,
        frame: VerifiedFrame,
    ) -> Bytes {
        let Some(f) = frame.view().body_as_queue_fetch() else {
            return invalid(corr, "not a queue fetch");
        };
        let topic = f.topic().to_string();
        let sub = f.subscription().to_string();
        if let Err(e) = crate::metadata::validate_topic_name(&sub) {
            return invalid(corr, &format!("subscription name: {e}"));
        }
        let credit = f.max_messages().min(10_000) as usize;
        let wait_ms = f.max_wait_ms().min(limits::FETCH_WAIT_MS_MAX);
        let cfg = SubConfig {
            key_shared: f.key_shared(),
            ack_timeout_ms: u64::from(f.ack_timeout_ms().max(1)),
            max_deliveries: f.max_deliveries(),
            dead_letter_topic: f
                .dead_letter_topic()
                .map(String::from)
                .unwrap_or_else(|| format!("{topic}.dlq")),
            max_unacked: (f.max_unacked() as usize).clamp(1, limits::QUEUE_UNACKED_MAX),
        };
        if let Err(e) = crate::metadata::validate_topic_name(&cfg.dead_letter_topic) {
            return invalid(corr, &format!("dead-letter topic name: {e}"));
        }
        let latest = f.initial_position() == 1;
        let part = match self.partition(corr, &topic, partition) {
            Ok(p) => p,
            Err(e) => return e,
        };
        if let Err(e) = part.subscribe(&sub, cfg, latest) {
            return wire_error::frame(corr, &e);
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms));
        loop {
            let data = part.data_changed();
            let changed = part.queue_changed();
            if let Err(e) = part.refill(&sub, credit).await {
                return wire_error::frame(corr, &e);
            }
            let Some(d) = part.dispatch(&sub, conn, credit) else {
                return invalid(corr, "subscription vanished");
            };
            if !d.dispatch.dead.is_empty() {
                self.dead_letter(&part, &sub, d.dispatch.dead).await;
            }
            if !d.dispatch.deliver.is_empty() {
                return deliver(corr, &part, &d.dispatch.deliver).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.is_shutting_down() {
                return q::encode_queue_fetch_response(corr, partition, &[]);
            }
            let until_event = d
                .next_event_ms
                .map(|t| Duration::from_millis(t.saturating_sub(d.now_ms).max(1)))
                .unwrap_or(left);
            let timer = crate::runtime::sleep(left.min(until_event));
            let stop = self.shutdown.wait();
            futures_lite::future::or(
                futures_lite::future::or(data, changed),
                futures_lite::future::or(stop, timer),
            )
            .await;
        }
    }

    /// Moves messages to the dead-letter topic (created if missing) with their origin in
    /// headers, then acks them on the source. On failure they return to pending.
    async fn dead_letter(
        self: &Rc<Self>,
        part: &LocalPartition,
        sub: &str,
        dead: Vec<(u64, u32, Reason)>,
    ) {
        let Some(dlq) = part.dead_letter_topic(sub) else {
            return;
        };
        let offsets: Vec<u64> = dead.iter().map(|d| d.0).collect();
        let loaded = part.records(offsets.iter().copied()).await;
        let mut records = Vec::new();
        for (o, count, reason) in &dead {
            let Some((ts, r)) = loaded.find(*o) else {
                continue;
            };
            let mut headers: Vec<(String, Vec<u8>)> = r
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key().to_string(),
                                h.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            for (k, v) in [
                ("rq-origin-topic", part.topic().to_string()),
                ("rq-origin-partition", part.id().to_string()),
                ("rq-origin-offset", o.to_string()),
                ("rq-origin-subscription", sub.to_string()),
                ("rq-delivery-count", count.to_string()),
                ("rq-reason", reason.as_str().to_string()),
            ] {
                headers.push((k.to_string(), v.into_bytes()));
            }
            records.push(RecordIn {
                key: r.key().map(|k| k.bytes().to_vec()),
                value: r.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
                headers,
                timestamp_ms: ts,
            });
        }
        if let Err(e) = self.produce_internal(&dlq, &records).await {
            eprintln!("ringmq: dead-lettering to {dlq}: {e}");
            part.dead_letter_failed(sub, &offsets);
            return;
        }
        // Stored in the dead-letter topic: ack on the source (durable, then applied). If the
        // ack cannot be recorded the message goes back to pending and is dead-lettered again
        // later (at-least-once into the dead-letter topic).
        let state = self.state.borrow().clone();
        let Some(state) = state else {
            return;
        };
        let ticket = self.state_order.begin().await;
        let durable = state
            .append_acks(part.topic(), sub, part.id(), &offsets)
            .await;
        self.state_order.wait_turn(ticket).await;
        match durable {
            Ok(()) => {
                part.apply_ack(sub, &offsets);
            }
            Err(e) => {
                eprintln!("ringmq: recording dead-letter acks: {e}");
                part.dead_letter_failed(sub, &offsets);
            }
        }
        self.state_order.finish(ticket);
    }

    /// Produces records to `topic` from inside the broker (creating the topic if missing),
    /// with typed calls to the controller and the owning shard.
    async fn produce_internal(
        self: &Rc<Self>,
        topic: &str,
        records: &[RecordIn],
    ) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        if self.meta.borrow().get(topic).is_none() {
            let ensure = Internal::EnsureTopic {
                name: topic.to_string(),
                partitions: 1,
            };
            self.call_internal(Dest::local(CONTROLLER_SHARD), ensure)
                .await
                .map_err(|e| format!("creating dead-letter topic {topic}: {e}"))?;
        }
        let bytes = Bytes::from(proto::encode_record_batch(records));
        let batch = VerifiedBatch::verify(bytes).map_err(|e| e.to_string())?;
        let target = Target::Produce {
            topic,
            partition: None,
            key: None,
        };
        let (partition, dest) = self.route(target).map_err(|e| e.to_string())?;
        let append = Internal::Append {
            topic: topic.to_string(),
            partition,
            batch,
        };
        self.call_internal(dest, append).await
    }

    pub(super) async fn queue_settle(
        &self,
        corr: u64,
        partition: u32,
        frame: VerifiedFrame,
    ) -> Bytes {
        let Some(f) = frame.view().body_as_queue_settle() else {
            return invalid(corr, "not a settle");
        };
        let (topic, sub) = (f.topic().to_string(), f.subscription().to_string());
        let offsets: Vec<u64> = f.offsets().iter().collect();
        let (action, delay) = (f.action(), u64::from(f.delay_ms()));
        let part = match self.partition(corr, &topic, partition) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let settled = match action {
            0 => match self.ack(&part, &sub, &offsets).await {
                Ok(n) => n,
                Err(e) => return wire_error::frame(corr, &e),
            },
            1 => part.settle(&sub, Settle::Nack { delay_ms: delay }, &offsets),
            2 => part.settle(&sub, Settle::Extend { ms: delay }, &offsets),
            other => return invalid(corr, &format!("unknown settle action {other}")),
        };
        q::encode_queue_settle_response(corr, settled as u32)
    }

    /// Acks: durable in the state log, then applied, then answered. If the append fails the
    /// client gets an error and the messages stay leased (redelivered at their timeout).
    async fn ack(
        &self,
        part: &LocalPartition,
        sub: &str,
        offsets: &[u64],
    ) -> Result<usize, AckError> {
        let ackable = part.ackable(sub, offsets).map_err(AckError::Partition)?;
        let state = self
            .state
            .borrow()
            .clone()
            .ok_or(AckError::StateLogClosed)?;
        let ticket = self.state_order.begin().await;
        let durable = state
            .append_acks(part.topic(), sub, part.id(), &ackable)
            .await;
        self.state_order.wait_turn(ticket).await;
        let n = match &durable {
            Ok(()) => part.apply_ack(sub, &ackable),
            Err(_) => 0,
        };
        self.state_order.finish(ticket);
        durable.map_err(|e| AckError::StateLog(e.to_string()))?;
        self.maybe_compact_state().await;
        Ok(n)
    }

    /// Counters of this shard's subscriptions of a topic (summed over partitions).
    pub(super) fn subscription_info_local(&self, corr: u64, frame: &VerifiedFrame) -> Bytes {
        let Some(f) = frame.view().body_as_subscription_info() else {
            return invalid(corr, "not a subscription info");
        };
        let want = f.subscription();
        let mut by: BTreeMap<String, SubStatsOut> = BTreeMap::new();
        for part in self.open_partitions() {
            if part.topic() != f.topic() {
                continue;
            }
            for st in part.subscription_stats(want) {
                match by.get_mut(&st.subscription) {
                    Some(e) => e.absorb(&st),
                    None => {
                        by.insert(st.subscription.clone(), st);
                    }
                }
            }
        }
        let v: Vec<SubStatsOut> = by.into_values().collect();
        q::encode_subscription_info_response(corr, &v)
    }

    /// Expires leases everywhere (ticker) so waiting fetches see redeliveries.
    pub fn expire_leases(&self) {
        for part in self.open_partitions() {
            part.expire_leases();
        }
    }
}

/// A queue-fetch response delivering `offsets` ((offset, delivery count)) of `part`.
async fn deliver(corr: u64, part: &LocalPartition, offsets: &[(u64, u32)]) -> Bytes {
    let loaded = part.records(offsets.iter().map(|(o, _)| *o)).await;
    let mut msgs = Vec::with_capacity(offsets.len());
    for (o, count) in offsets {
        if let Some((ts, r)) = loaded.find(*o) {
            msgs.push((*o, *count, ts, r));
        }
    }
    q::encode_queue_fetch_response(corr, part.id(), &msgs)
}
