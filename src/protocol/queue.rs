//! Encoders and decoders of the queue (shared subscription) bodies.
//!
//! Owns: turning queue values into frames and back. Must not touch: I/O or queue state.

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::codec::finish;
use super::fb;

/// Header a producer sets to delay delivery: the earliest dispatch time, ms since the epoch.
pub const DELIVER_AT_HEADER: &str = "rq-deliver-at";

/// Settings of a queue fetch (and of the subscription, when it creates it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFetchOut<'a> {
    pub topic: &'a str,
    pub subscription: &'a str,
    pub partition: u32,
    pub max_messages: u32,
    pub max_wait_ms: u32,
    pub key_shared: bool,
    pub ack_timeout_ms: u32,
    pub max_deliveries: u32,
    pub dead_letter_topic: Option<&'a str>,
    pub max_unacked: u32,
    pub initial_latest: bool,
}

impl<'a> QueueFetchOut<'a> {
    /// Defaults as in the schema.
    pub fn new(topic: &'a str, subscription: &'a str, partition: u32) -> Self {
        Self {
            topic,
            subscription,
            partition,
            max_messages: 100,
            max_wait_ms: 0,
            key_shared: false,
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            dead_letter_topic: None,
            max_unacked: 65_536,
            initial_latest: false,
        }
    }
}

pub fn encode_queue_fetch(corr: u64, q: &QueueFetchOut<'_>) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let t = b.create_string(q.topic);
    let s = b.create_string(q.subscription);
    let d = q.dead_letter_topic.map(|d| b.create_string(d));
    let f = fb::QueueFetch::create(
        &mut b,
        &fb::QueueFetchArgs {
            topic: Some(t),
            subscription: Some(s),
            partition: q.partition,
            max_messages: q.max_messages,
            max_wait_ms: q.max_wait_ms,
            key_shared: q.key_shared,
            ack_timeout_ms: q.ack_timeout_ms,
            max_deliveries: q.max_deliveries,
            dead_letter_topic: d,
            max_unacked: q.max_unacked,
            initial_position: u8::from(q.initial_latest),
        },
    );
    finish(b, corr, fb::Body::QueueFetch, f.as_union_value())
}

/// A leased message as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessageOut {
    pub offset: u64,
    pub delivery_count: u32,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Encodes leased messages: (offset, delivery count, timestamp, record).
pub fn encode_queue_fetch_response(
    corr: u64,
    partition: u32,
    msgs: &[(u64, u32, i64, fb::Record<'_>)],
) -> Bytes {
    let size: usize = msgs
        .iter()
        .map(|(_, _, _, r)| r.value().map(|v| v.len()).unwrap_or(0) + 64)
        .sum();
    let mut b = FlatBufferBuilder::with_capacity(size + 128);
    let mut offs = Vec::with_capacity(msgs.len());
    for (offset, count, ts, r) in msgs {
        let (key, value, headers) = super::codec::copy_record_parts(&mut b, r);
        offs.push(fb::QueueMessage::create(
            &mut b,
            &fb::QueueMessageArgs {
                offset: *offset,
                delivery_count: *count,
                timestamp_ms: *ts,
                key,
                value,
                headers,
            },
        ));
    }
    let v = b.create_vector(&offs);
    let r = fb::QueueFetchResponse::create(
        &mut b,
        &fb::QueueFetchResponseArgs {
            partition,
            messages: Some(v),
        },
    );
    finish(b, corr, fb::Body::QueueFetchResponse, r.as_union_value())
}

pub fn decode_queue_fetch_response(r: fb::QueueFetchResponse<'_>) -> Vec<QueueMessageOut> {
    r.messages()
        .map(|ms| {
            ms.iter()
                .map(|m| QueueMessageOut {
                    offset: m.offset(),
                    delivery_count: m.delivery_count(),
                    timestamp_ms: m.timestamp_ms(),
                    key: m.key().map(|k| k.bytes().to_vec()),
                    value: m.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
                    headers: m
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
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What a settle does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Nack { delay_ms: u32 },
    Extend { ms: u32 },
}

pub fn encode_queue_settle(
    corr: u64,
    topic: &str,
    sub: &str,
    partition: u32,
    offsets: &[u64],
    s: Settle,
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128 + offsets.len() * 8);
    let t = b.create_string(topic);
    let n = b.create_string(sub);
    let o = b.create_vector(offsets);
    let (action, delay_ms) = match s {
        Settle::Ack => (0, 0),
        Settle::Nack { delay_ms } => (1, delay_ms),
        Settle::Extend { ms } => (2, ms),
    };
    let q = fb::QueueSettle::create(
        &mut b,
        &fb::QueueSettleArgs {
            topic: Some(t),
            subscription: Some(n),
            partition,
            offsets: Some(o),
            action,
            delay_ms,
        },
    );
    finish(b, corr, fb::Body::QueueSettle, q.as_union_value())
}

pub fn encode_queue_settle_response(corr: u64, settled: u32) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let r = fb::QueueSettleResponse::create(&mut b, &fb::QueueSettleResponseArgs { settled });
    finish(b, corr, fb::Body::QueueSettleResponse, r.as_union_value())
}

/// Counters of one subscription (summed over partitions by the connection's shard).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubStatsOut {
    pub topic: String,
    pub subscription: String,
    pub key_shared: bool,
    pub backlog: u64,
    pub in_flight: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
    pub acked: u64,
}

impl SubStatsOut {
    /// Adds the counters of the same subscription on another partition.
    pub fn absorb(&mut self, o: &SubStatsOut) {
        self.backlog += o.backlog;
        self.in_flight += o.in_flight;
        self.redeliveries += o.redeliveries;
        self.dead_lettered += o.dead_lettered;
        self.acked += o.acked;
    }
}

pub fn encode_subscription_info(corr: u64, topic: &str, sub: Option<&str>) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let t = b.create_string(topic);
    let s = sub.map(|s| b.create_string(s));
    let q = fb::SubscriptionInfo::create(
        &mut b,
        &fb::SubscriptionInfoArgs {
            topic: Some(t),
            subscription: s,
        },
    );
    finish(b, corr, fb::Body::SubscriptionInfo, q.as_union_value())
}

pub fn encode_subscription_info_response(corr: u64, subs: &[SubStatsOut]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128 * subs.len() + 64);
    let v: Vec<_> = subs
        .iter()
        .map(|s| {
            let t = b.create_string(&s.topic);
            let n = b.create_string(&s.subscription);
            fb::SubscriptionStats::create(
                &mut b,
                &fb::SubscriptionStatsArgs {
                    topic: Some(t),
                    subscription: Some(n),
                    key_shared: s.key_shared,
                    backlog: s.backlog,
                    in_flight: s.in_flight,
                    redeliveries: s.redeliveries,
                    dead_lettered: s.dead_lettered,
                    acked: s.acked,
                },
            )
        })
        .collect();
    let v = b.create_vector(&v);
    let r = fb::SubscriptionInfoResponse::create(
        &mut b,
        &fb::SubscriptionInfoResponseArgs {
            subscriptions: Some(v),
        },
    );
    finish(
        b,
        corr,
        fb::Body::SubscriptionInfoResponse,
        r.as_union_value(),
    )
}

pub fn decode_subscription_info_response(r: fb::SubscriptionInfoResponse<'_>) -> Vec<SubStatsOut> {
    r.subscriptions()
        .map(|v| {
            v.iter()
                .map(|s| SubStatsOut {
                    topic: s.topic().unwrap_or_default().to_string(),
                    subscription: s.subscription().unwrap_or_default().to_string(),
                    key_shared: s.key_shared(),
                    backlog: s.backlog(),
                    in_flight: s.in_flight(),
                    redeliveries: s.redeliveries(),
                    dead_lettered: s.dead_lettered(),
                    acked: s.acked(),
                })
                .collect()
        })
        .unwrap_or_default()
}
