//! Encoders and decoders of multicast produce and per-shard stats.
//!
//! Owns: turning those values into frames and back. Must not touch: I/O.

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::codec::finish;
use super::fb;

/// One destination's outcome: Ok((base offset, record count)) or Err((error code, message)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestResult {
    pub topic: String,
    pub partition: u32,
    pub outcome: Result<(u64, u32), (u16, String)>,
}

/// A destination to encode: topic and optional partition.
pub type DestOut<'a> = (&'a str, Option<u32>);

pub fn encode_multicast_produce(
    corr: u64,
    dests: &[DestOut<'_>],
    key: Option<&[u8]>,
    batch: &[u8],
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(batch.len() + 64 * dests.len() + 128);
    let ds: Vec<_> = dests
        .iter()
        .map(|(t, p)| {
            let t = b.create_string(t);
            fb::Destination::create(
                &mut b,
                &fb::DestinationArgs {
                    topic: Some(t),
                    partition: p.map(|p| p as i32).unwrap_or(-1),
                },
            )
        })
        .collect();
    let ds = b.create_vector(&ds);
    let key = key.map(|k| b.create_vector(k));
    let batch = b.create_vector(batch);
    let m = fb::MulticastProduce::create(
        &mut b,
        &fb::MulticastProduceArgs {
            destinations: Some(ds),
            key,
            batch: Some(batch),
        },
    );
    finish(b, corr, fb::Body::MulticastProduce, m.as_union_value())
}

pub fn encode_multicast_response(corr: u64, results: &[DestResult]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64 * results.len() + 64);
    let rs: Vec<_> = results
        .iter()
        .map(|r| {
            let t = b.create_string(&r.topic);
            let (base, count, code, msg) = match &r.outcome {
                Ok((base, count)) => (*base, *count, fb::ErrorCode::None, None),
                Err((code, m)) => (0, 0, fb::ErrorCode(*code), Some(b.create_string(m))),
            };
            fb::DestinationResult::create(
                &mut b,
                &fb::DestinationResultArgs {
                    topic: Some(t),
                    partition: r.partition,
                    base_offset: base,
                    record_count: count,
                    error_code: code,
                    error_message: msg,
                },
            )
        })
        .collect();
    let rs = b.create_vector(&rs);
    let m = fb::MulticastProduceResponse::create(
        &mut b,
        &fb::MulticastProduceResponseArgs { results: Some(rs) },
    );
    finish(
        b,
        corr,
        fb::Body::MulticastProduceResponse,
        m.as_union_value(),
    )
}

pub fn decode_multicast_response(m: fb::MulticastProduceResponse<'_>) -> Vec<DestResult> {
    m.results()
        .map(|rs| {
            rs.iter()
                .map(|r| DestResult {
                    topic: r.topic().unwrap_or_default().to_string(),
                    partition: r.partition(),
                    outcome: if r.error_code() == fb::ErrorCode::None {
                        Ok((r.base_offset(), r.record_count()))
                    } else {
                        Err((
                            r.error_code().0,
                            r.error_message().unwrap_or_default().to_string(),
                        ))
                    },
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Replication traffic from one shard to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaPeerOut {
    pub node: u32,
    pub frames: u64,
    pub bytes: u64,
    pub messages: u64,
}

/// Counters of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardStatsOut {
    pub shard: u32,
    pub forwards: u64,
    pub multicast_copies: u64,
    pub replies: u64,
    pub meta: u64,
    pub fanout_appends: u64,
    /// Cluster: requests forwarded to other nodes, multicast copies sent to other nodes (one
    /// per node), forwarded frames received.
    pub node_forwards: u64,
    pub node_multicast_copies: u64,
    pub node_forwarded_in: u64,
    /// Cluster: replicas here (of partitions with more than one) and how many lead.
    pub replicas: u32,
    pub replicas_leading: u32,
    pub replica_peers: Vec<ReplicaPeerOut>,
    pub replica_messages_dropped: u64,
}

pub fn encode_stats(corr: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let s = fb::Stats::create(&mut b, &fb::StatsArgs {});
    finish(b, corr, fb::Body::Stats, s.as_union_value())
}

pub fn encode_stats_response(corr: u64, shards: &[ShardStatsOut]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64 * shards.len() + 64);
    let ss: Vec<_> = shards
        .iter()
        .map(|s| {
            let peers: Vec<_> = s
                .replica_peers
                .iter()
                .map(|p| {
                    fb::ReplicaPeerStats::create(
                        &mut b,
                        &fb::ReplicaPeerStatsArgs {
                            node: p.node,
                            frames: p.frames,
                            bytes: p.bytes,
                            messages: p.messages,
                        },
                    )
                })
                .collect();
            let peers = b.create_vector(&peers);
            fb::ShardStats::create(
                &mut b,
                &fb::ShardStatsArgs {
                    replicas: s.replicas,
                    replicas_leading: s.replicas_leading,
                    replica_peers: Some(peers),
                    replica_messages_dropped: s.replica_messages_dropped,
                    shard: s.shard,
                    forwards: s.forwards,
                    multicast_copies: s.multicast_copies,
                    replies: s.replies,
                    meta: s.meta,
                    node_forwards: s.node_forwards,
                    node_multicast_copies: s.node_multicast_copies,
                    node_forwarded_in: s.node_forwarded_in,
                    fanout_appends: s.fanout_appends,
                },
            )
        })
        .collect();
    let ss = b.create_vector(&ss);
    let r = fb::StatsResponse::create(&mut b, &fb::StatsResponseArgs { shards: Some(ss) });
    finish(b, corr, fb::Body::StatsResponse, r.as_union_value())
}

pub fn decode_stats_response(r: fb::StatsResponse<'_>) -> Vec<ShardStatsOut> {
    r.shards()
        .map(|ss| {
            ss.iter()
                .map(|s| ShardStatsOut {
                    shard: s.shard(),
                    forwards: s.forwards(),
                    multicast_copies: s.multicast_copies(),
                    replies: s.replies(),
                    meta: s.meta(),
                    fanout_appends: s.fanout_appends(),
                    node_forwards: s.node_forwards(),
                    node_multicast_copies: s.node_multicast_copies(),
                    node_forwarded_in: s.node_forwarded_in(),
                    replicas: s.replicas(),
                    replicas_leading: s.replicas_leading(),
                    replica_peers: s
                        .replica_peers()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| ReplicaPeerOut {
                                    node: p.node(),
                                    frames: p.frames(),
                                    bytes: p.bytes(),
                                    messages: p.messages(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    replica_messages_dropped: s.replica_messages_dropped(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Health of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionStatusOut {
    pub topic: String,
    pub partition: u32,
    pub shard: u32,
    pub healthy: bool,
    pub message: String,
}

pub fn encode_status(corr: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let s = fb::Status::create(&mut b, &fb::StatusArgs {});
    finish(b, corr, fb::Body::Status, s.as_union_value())
}

pub fn encode_status_response(corr: u64, parts: &[PartitionStatusOut]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128 * parts.len() + 64);
    let v: Vec<_> = parts
        .iter()
        .map(|p| {
            let t = b.create_string(&p.topic);
            let m = b.create_string(&p.message);
            fb::PartitionStatus::create(
                &mut b,
                &fb::PartitionStatusArgs {
                    topic: Some(t),
                    partition: p.partition,
                    shard: p.shard,
                    healthy: p.healthy,
                    message: Some(m),
                },
            )
        })
        .collect();
    let v = b.create_vector(&v);
    let r = fb::StatusResponse::create(
        &mut b,
        &fb::StatusResponseArgs {
            partitions: Some(v),
        },
    );
    finish(b, corr, fb::Body::StatusResponse, r.as_union_value())
}

pub fn decode_status_response(r: fb::StatusResponse<'_>) -> Vec<PartitionStatusOut> {
    r.partitions()
        .map(|v| {
            v.iter()
                .map(|p| PartitionStatusOut {
                    topic: p.topic().unwrap_or_default().to_string(),
                    partition: p.partition(),
                    shard: p.shard(),
                    healthy: p.healthy(),
                    message: p.message().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}
