//! Queue (shared subscription) handlers on the shard that owns the partition: fetch with
//! leases, settle (ack / nack / extend), dead-lettering, consumer disconnects, counters.
//!
//! Owns: the `QueueState`s of this shard's partitions and the order "ack durable in the state
//! log, then applied, then answered". Must not touch: sockets.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::VerifiedFrame;

use super::queue_state::{QueueState, Reason, SubConfig};
use super::state_log::QueueAcks;
use super::{storage_error, PartitionLog, Shard};
use crate::limits;
use crate::protocol::queue::{self as q, SubStatsOut, DELIVER_AT_HEADER};
use crate::protocol::{self as proto, fb, PartitionChoice, RecordIn};
use crate::router::route::{Target, CONTROLLER_SHARD};
use crate::router::Envelope;
use crate::storage::batch;

/// (topic, subscription, partition).
pub type QKey = (String, String, u32);

/// Bytes read from the log per refill of a queue's pending set.
const QUEUE_READ_BYTES: usize = 256 * 1024;

fn invalid(corr: u64, msg: &str) -> Bytes {
    proto::encode_error(corr, fb::ErrorCode::InvalidRequest, msg)
}

/// The RecordBatch of a stored batch read from this shard's own log, without verifying it
/// again: its payload passed `verify_frame` when it was produced, and reads from disk check the
/// batch CRC (the tail cache holds the very bytes that were verified). Only batches whose
/// format tag says RingmqFlatbuffers are interpreted.
fn stored_batch(stored: &[u8]) -> Option<fb::RecordBatch<'_>> {
    let h = batch::decode_header(stored).ok()?;
    if h.format != batch::FormatTag::RingmqFlatbuffers || stored.len() < h.stored_len() {
        return None;
    }
    // SAFETY: see above: these bytes passed the flatbuffers verifier before they were stored,
    // and are CRC-checked when read back from disk.
    Some(unsafe {
        flatbuffers::root_unchecked::<fb::RecordBatch>(
            &batch::payload(stored)[..h.payload_len as usize],
        )
    })
}

/// Stored batches loaded for building a response: (base offset, next offset, max timestamp,
/// stored bytes), sorted by base offset; each batch's flatbuffer verified once when loaded.
struct Loaded(Vec<(u64, u64, i64, Bytes)>);

impl Loaded {
    fn find(&self, offset: u64) -> Option<(i64, fb::Record<'_>)> {
        let i = self.0.partition_point(|b| b.1 <= offset);
        let (base, next, max_ts, bytes) = self.0.get(i)?;
        if offset < *base || offset >= *next {
            return None;
        }
        let rb = stored_batch(bytes)?;
        let r = rb.records().get((offset - base) as usize);
        let ts = if r.timestamp_ms() > 0 {
            r.timestamp_ms()
        } else {
            *max_ts
        };
        Some((ts, r))
    }

    async fn load(&mut self, log: &PartitionLog, offset: u64) -> bool {
        if self.find(offset).is_some() {
            return true;
        }
        let Ok(r) = log.read(offset, 1).await else {
            return false;
        };
        for b in r.batches {
            let Ok(h) = batch::decode_header(&b) else {
                continue;
            };
            let ok = stored_batch(&b)
                .is_some_and(|rb| rb.records().len() as u64 == u64::from(h.record_count));
            if !ok || self.0.iter().any(|x| x.0 == h.base_offset) {
                continue;
            }
            let i = self.0.partition_point(|x| x.0 < h.base_offset);
            self.0
                .insert(i, (h.base_offset, h.next_offset(), h.max_timestamp_ms, b));
        }
        self.find(offset).is_some()
    }
}

impl Shard {
    /// Queue states of this shard for compaction snapshots.
    pub fn queue_snapshot(&self) -> Vec<(QKey, QueueAcks)> {
        self.queues
            .borrow()
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    QueueAcks {
                        floor: s.floor(),
                        acked: s.acked_above_floor().copied().collect(),
                    },
                )
            })
            .collect()
    }

    /// A consumer's connection closed: its leases return to their queues at once.
    pub fn release_connection(&self, conn: u64) {
        let now = self.now_ms() as u64;
        let mut n = 0;
        for s in self.queues.borrow_mut().values_mut() {
            n += s.release_consumer(conn, now);
        }
        if n > 0 {
            self.queue_changed.notify_all();
        }
    }

    /// Creates the subscription's state on first use, within
    /// [`limits::SUBSCRIPTIONS_PER_PARTITION_MAX`].
    fn ensure_queue(
        &self,
        key: &QKey,
        cfg: SubConfig,
        log: &PartitionLog,
        latest: bool,
    ) -> Result<(), String> {
        if self.queues.borrow().contains_key(key) {
            return Ok(());
        }
        let here = self
            .queues
            .borrow()
            .keys()
            .filter(|(t, _, p)| *t == key.0 && *p == key.2)
            .count();
        if here >= limits::SUBSCRIPTIONS_PER_PARTITION_MAX {
            return Err(format!(
                "partition {}-{} has {here} subscriptions, its limit ({})",
                key.0,
                key.2,
                limits::SUBSCRIPTIONS_PER_PARTITION_MAX
            ));
        }
        let start = if latest {
            log.end_offset()
        } else {
            log.start_offset()
        };
        let mut st = QueueState::new(cfg, start);
        if let Some(r) = self.restored_queues.borrow_mut().remove(key) {
            st.restore(r.floor.max(log.start_offset()), r.acked);
        }
        self.queues.borrow_mut().insert(key.clone(), st);
        Ok(())
    }

    /// Reads new messages into the queue's pending set, within its ack-state room.
    async fn refill(
        &self,
        key: &QKey,
        log: &PartitionLog,
        credit: usize,
    ) -> Result<(), crate::storage::StorageError> {
        let (cursor, room, pending) = match self.queues.borrow().get(key) {
            Some(s) => {
                let (c, r) = s.read_window();
                (c, r, s.pending())
            }
            None => return Ok(()),
        };
        // Read ahead only as far as dispatch needs: pending stays small.
        if room == 0 || pending >= credit.max(1) * 2 || cursor >= log.end_offset() {
            return Ok(());
        }
        let from = cursor.max(log.start_offset());
        let r = log.read(from, QUEUE_READ_BYTES).await?;
        let mut qs = self.queues.borrow_mut();
        let Some(s) = qs.get_mut(key) else {
            return Ok(());
        };
        if from > cursor {
            s.skip_to(from);
        }
        let mut added = 0;
        'outer: for stored in &r.batches {
            let Ok(h) = batch::decode_header(stored) else {
                continue;
            };
            let Some(rb) = stored_batch(stored) else {
                continue;
            };
            for (i, rec) in rb.records().iter().enumerate() {
                let o = h.base_offset + i as u64;
                if o < s.read_window().0 {
                    continue;
                }
                if added >= room {
                    break 'outer;
                }
                let ready_at = rec
                    .headers()
                    .and_then(|hs| hs.iter().find(|x| x.key() == DELIVER_AT_HEADER))
                    .and_then(|x| {
                        std::str::from_utf8(x.value()?.bytes())
                            .ok()?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0);
                s.add_read(o, rec.key().map(|k| k.bytes().to_vec()), ready_at);
                added += 1;
            }
        }
        Ok(())
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
        let log = match self.log(corr, &topic, partition) {
            Ok(l) => l,
            Err(e) => return e,
        };
        let key: QKey = (topic.clone(), sub.clone(), partition);
        if let Err(msg) = self.ensure_queue(&key, cfg, &log, latest) {
            return invalid(corr, &msg);
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms));
        loop {
            let data = log.data_changed();
            let changed = self.queue_changed.wait();
            if let Err(e) = self.refill(&key, &log, credit).await {
                return storage_error(corr, &e);
            }
            let now = self.now_ms() as u64;
            let (d, next_event) = {
                let mut qs = self.queues.borrow_mut();
                let Some(s) = qs.get_mut(&key) else {
                    return invalid(corr, "subscription vanished");
                };
                s.expire(now);
                (s.dispatch(conn, credit, now), s.next_event_ms())
            };
            if !d.dead.is_empty() {
                self.dead_letter(&key, &log, d.dead).await;
            }
            if !d.deliver.is_empty() {
                return self.deliver(corr, partition, &log, &d.deliver).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.is_shutting_down() {
                return q::encode_queue_fetch_response(corr, partition, &[]);
            }
            let until_event = next_event
                .map(|t| Duration::from_millis(t.saturating_sub(now).max(1)))
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

    async fn deliver(
        &self,
        corr: u64,
        partition: u32,
        log: &PartitionLog,
        offsets: &[(u64, u32)],
    ) -> Bytes {
        let mut loaded = Loaded(Vec::new());
        for (o, _) in offsets {
            loaded.load(log, *o).await;
        }
        let mut msgs = Vec::with_capacity(offsets.len());
        for (o, count) in offsets {
            if let Some((ts, r)) = loaded.find(*o) {
                msgs.push((*o, *count, ts, r));
            }
        }
        q::encode_queue_fetch_response(corr, partition, &msgs)
    }

    /// Moves messages to the dead-letter topic (created if missing) with their origin in
    /// headers, then acks them on the source. On failure they return to pending.
    async fn dead_letter(
        self: &Rc<Self>,
        key: &QKey,
        log: &PartitionLog,
        dead: Vec<(u64, u32, Reason)>,
    ) {
        let dlq = match self.queues.borrow().get(key) {
            Some(s) => s.cfg.dead_letter_topic.clone(),
            None => return,
        };
        let mut loaded = Loaded(Vec::new());
        let mut records = Vec::new();
        for (o, count, reason) in &dead {
            loaded.load(log, *o).await;
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
                ("rq-origin-topic", key.0.clone()),
                ("rq-origin-partition", key.2.to_string()),
                ("rq-origin-offset", o.to_string()),
                ("rq-origin-subscription", key.1.clone()),
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
        let ok = self.produce_internal(&dlq, &records).await;
        let offsets: Vec<u64> = dead.iter().map(|d| d.0).collect();
        let now = self.now_ms() as u64;
        if let Err(e) = &ok {
            eprintln!("ringmq: dead-lettering to {dlq}: {e}");
            if let Some(s) = self.queues.borrow_mut().get_mut(key) {
                for o in offsets {
                    s.dead_letter_failed(o, now);
                }
            }
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
        let durable = state.append_acks(&key.0, &key.1, key.2, &offsets).await;
        self.state_order.wait_turn(ticket).await;
        match durable {
            Ok(()) => {
                if let Some(s) = self.queues.borrow_mut().get_mut(key) {
                    s.apply_ack(&offsets);
                }
            }
            Err(e) => {
                eprintln!("ringmq: recording dead-letter acks: {e}");
                if let Some(s) = self.queues.borrow_mut().get_mut(key) {
                    for o in &offsets {
                        s.dead_letter_failed(*o, now);
                    }
                }
            }
        }
        self.state_order.finish(ticket);
    }

    /// Produces records to `topic` from inside the broker (creating the topic if missing).
    async fn produce_internal(
        self: &Rc<Self>,
        topic: &str,
        records: &[RecordIn],
    ) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        if self.meta.borrow().get(topic).is_none() {
            let create = proto::encode_create_topic(0, topic, 1, -1, -1);
            let reply = self.call_shard(CONTROLLER_SHARD, 0, create).await;
            let exists = proto::verify_frame(&reply[proto::LEN_PREFIX_BYTES..])
                .ok()
                .and_then(|f| f.body_as_error())
                .map(|e| e.code() == fb::ErrorCode::TopicExists);
            if exists == Some(false) {
                return Err(format!("creating dead-letter topic {topic}"));
            }
        }
        let batch_bytes = proto::encode_record_batch(records);
        let frame = proto::encode_produce(0, topic, PartitionChoice::RoundRobin, &batch_bytes);
        let target = Target::Produce {
            topic,
            partition: None,
            key: None,
        };
        let (partition, dest) = self.route(target).map_err(|e| e.to_string())?;
        let owner = dest.shard;
        let reply = self.call_shard(owner, partition, frame).await;
        match proto::verify_frame(&reply[proto::LEN_PREFIX_BYTES..])
            .ok()
            .and_then(|f| f.body_as_error())
        {
            Some(e) => Err(e.message().unwrap_or_default().to_string()),
            None => Ok(()),
        }
    }

    /// Runs a request built here (with its length prefix) on shard `to`; returns the reply.
    /// The request is verified like any other before a shard sees it.
    async fn call_shard(self: &Rc<Self>, to: usize, partition: u32, prefixed: Bytes) -> Bytes {
        let frame = match VerifiedFrame::verify_encoded(&prefixed) {
            Ok(f) => f,
            Err(e) => return proto::encode_error(0, fb::ErrorCode::Internal, &e.to_string()),
        };
        if to == self.id() {
            return self.start(partition, 0, frame).await.await;
        }
        let from = self.id();
        match self
            .router
            .call(to, move |req_id| Envelope::Request {
                from,
                req_id,
                partition,
                conn: 0,
                frame,
            })
            .await
        {
            Ok(rx) => match rx.await {
                Some(Envelope::Response { frame, .. }) => frame,
                _ => proto::encode_error(0, fb::ErrorCode::Internal, "no reply"),
            },
            Err(e) => proto::encode_error(0, fb::ErrorCode::Internal, &e),
        }
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
        let key: QKey = (
            f.topic().to_string(),
            f.subscription().to_string(),
            partition,
        );
        let offsets: Vec<u64> = f.offsets().iter().collect();
        let (action, delay) = (f.action(), u64::from(f.delay_ms()));
        let now = self.now_ms() as u64;
        let settled = match action {
            0 => {
                let ackable = match self.queues.borrow().get(&key) {
                    Some(s) => s.ackable(&offsets),
                    None => {
                        return proto::encode_error(
                            corr,
                            fb::ErrorCode::InvalidRequest,
                            "no such subscription on this partition",
                        )
                    }
                };
                let Some(state) = self.state.borrow().clone() else {
                    return proto::encode_error(
                        corr,
                        fb::ErrorCode::Internal,
                        "state log not open",
                    );
                };
                // Durable, then applied, then acknowledged. If the append fails the client
                // gets an error and the messages stay leased (redelivered at their timeout).
                let ticket = self.state_order.begin().await;
                let durable = state.append_acks(&key.0, &key.1, partition, &ackable).await;
                self.state_order.wait_turn(ticket).await;
                let n = match &durable {
                    Ok(()) => self
                        .queues
                        .borrow_mut()
                        .get_mut(&key)
                        .map(|s| s.apply_ack(&ackable))
                        .unwrap_or(0),
                    Err(_) => 0,
                };
                self.state_order.finish(ticket);
                if let Err(e) = durable {
                    return proto::encode_error(
                        corr,
                        fb::ErrorCode::StorageFailed,
                        &format!("state log: {e}"),
                    );
                }
                self.maybe_compact_state().await;
                n
            }
            1 => self
                .queues
                .borrow_mut()
                .get_mut(&key)
                .map(|s| s.nack(&offsets, delay, now))
                .unwrap_or(0),
            2 => self
                .queues
                .borrow_mut()
                .get_mut(&key)
                .map(|s| s.extend(&offsets, delay, now))
                .unwrap_or(0),
            other => return invalid(corr, &format!("unknown settle action {other}")),
        };
        self.queue_changed.notify_all();
        q::encode_queue_settle_response(corr, settled as u32)
    }

    /// Counters of this shard's subscriptions of a topic (summed over partitions).
    pub(super) fn subscription_info_local(&self, corr: u64, frame: &VerifiedFrame) -> Bytes {
        let Some(f) = frame.view().body_as_subscription_info() else {
            return invalid(corr, "not a subscription info");
        };
        let want = f.subscription().map(String::from);
        let mut by: BTreeMap<String, SubStatsOut> = BTreeMap::new();
        for ((t, s, p), st) in self.queues.borrow().iter() {
            if t != f.topic() || want.as_ref().is_some_and(|w| w != s) {
                continue;
            }
            let end = match self.log(corr, t, *p) {
                Ok(l) => l.end_offset(),
                Err(_) => 0,
            };
            let e = by.entry(s.clone()).or_insert_with(|| SubStatsOut {
                topic: t.clone(),
                subscription: s.clone(),
                key_shared: st.cfg.key_shared,
                ..Default::default()
            });
            e.backlog += st.backlog(end);
            e.in_flight += st.in_flight() as u64;
            e.redeliveries += st.redeliveries;
            e.dead_lettered += st.dead_lettered;
            e.acked += st.acked_total;
        }
        let v: Vec<SubStatsOut> = by.into_values().collect();
        q::encode_subscription_info_response(corr, &v)
    }

    /// Expires leases everywhere (ticker) so waiting fetches see redeliveries.
    pub fn expire_leases(&self) {
        let now = self.now_ms() as u64;
        let mut any = false;
        for s in self.queues.borrow_mut().values_mut() {
            let before = s.in_flight();
            s.expire(now);
            any |= s.in_flight() != before;
        }
        if any {
            self.queue_changed.notify_all();
        }
    }
}
