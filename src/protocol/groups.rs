//! Encoders and decoders of the consumer-group and offset-lookup bodies.
//!
//! Owns: turning group values into frames and back. Must not touch: I/O or group state.

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, WIPOffset};

use super::codec::finish;
use super::fb;

/// A topic's partitions (assignments).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicParts {
    pub topic: String,
    pub partitions: Vec<u32>,
}

/// A member's assignment as the coordinator sends it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssignmentOut {
    pub member_id: String,
    pub generation: u64,
    pub assignments: Vec<TopicParts>,
    pub rebalancing: bool,
}

/// (topic, partition, offset); offset -1 = none committed.
pub type OffsetOut = (String, u32, i64);

/// One member in a group description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberOut {
    pub member_id: String,
    pub client_id: String,
    pub topics: Vec<String>,
    pub assignments: Vec<TopicParts>,
}

/// A group description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupOut {
    pub group: String,
    pub generation: u64,
    pub members: Vec<MemberOut>,
    pub offsets: Vec<OffsetOut>,
}

fn strings<'a>(
    b: &mut FlatBufferBuilder<'a>,
    v: &[String],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>> {
    let offs: Vec<_> = v.iter().map(|s| b.create_string(s)).collect();
    b.create_vector(&offs)
}

fn topic_parts<'a>(
    b: &mut FlatBufferBuilder<'a>,
    v: &[TopicParts],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::TopicPartitions<'a>>>> {
    let offs: Vec<_> = v
        .iter()
        .map(|t| {
            let topic = b.create_string(&t.topic);
            let parts = b.create_vector(&t.partitions);
            fb::TopicPartitions::create(
                b,
                &fb::TopicPartitionsArgs {
                    topic: Some(topic),
                    partitions: Some(parts),
                },
            )
        })
        .collect();
    b.create_vector(&offs)
}

fn offsets<'a>(
    b: &mut FlatBufferBuilder<'a>,
    v: &[OffsetOut],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::PartitionOffset<'a>>>> {
    let offs: Vec<_> = v
        .iter()
        .map(|(t, p, o)| {
            let topic = b.create_string(t);
            fb::PartitionOffset::create(
                b,
                &fb::PartitionOffsetArgs {
                    topic: Some(topic),
                    partition: *p,
                    offset: *o,
                },
            )
        })
        .collect();
    b.create_vector(&offs)
}

pub fn decode_topic_parts(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::TopicPartitions<'_>>>>,
) -> Vec<TopicParts> {
    v.map(|v| {
        v.iter()
            .map(|t| TopicParts {
                topic: t.topic().to_string(),
                partitions: t
                    .partitions()
                    .map(|p| p.iter().collect())
                    .unwrap_or_default(),
            })
            .collect()
    })
    .unwrap_or_default()
}

pub fn decode_offsets(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::PartitionOffset<'_>>>>,
) -> Vec<OffsetOut> {
    v.map(|v| {
        v.iter()
            .map(|o| (o.topic().to_string(), o.partition(), o.offset()))
            .collect()
    })
    .unwrap_or_default()
}

pub fn decode_strings(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<&str>>>,
) -> Vec<String> {
    v.map(|v| v.iter().map(String::from).collect())
        .unwrap_or_default()
}

pub fn encode_join_group(
    corr: u64,
    group: &str,
    topics: &[String],
    member_id: &str,
    client_id: &str,
    session_timeout_ms: u32,
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let g = b.create_string(group);
    let t = strings(&mut b, topics);
    let m = b.create_string(member_id);
    let c = b.create_string(client_id);
    let j = fb::JoinGroup::create(
        &mut b,
        &fb::JoinGroupArgs {
            group: Some(g),
            topics: Some(t),
            member_id: Some(m),
            client_id: Some(c),
            session_timeout_ms,
        },
    );
    finish(b, corr, fb::Body::JoinGroup, j.as_union_value())
}

pub fn encode_heartbeat(corr: u64, group: &str, member_id: &str, generation: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let g = b.create_string(group);
    let m = b.create_string(member_id);
    let h = fb::Heartbeat::create(
        &mut b,
        &fb::HeartbeatArgs {
            group: Some(g),
            member_id: Some(m),
            generation,
        },
    );
    finish(b, corr, fb::Body::Heartbeat, h.as_union_value())
}

pub fn encode_group_assignment(corr: u64, a: &AssignmentOut) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let m = b.create_string(&a.member_id);
    let t = topic_parts(&mut b, &a.assignments);
    let g = fb::GroupAssignment::create(
        &mut b,
        &fb::GroupAssignmentArgs {
            member_id: Some(m),
            generation: a.generation,
            assignments: Some(t),
            rebalancing: a.rebalancing,
        },
    );
    finish(b, corr, fb::Body::GroupAssignment, g.as_union_value())
}

pub fn decode_group_assignment(g: fb::GroupAssignment<'_>) -> AssignmentOut {
    AssignmentOut {
        member_id: g.member_id().unwrap_or_default().to_string(),
        generation: g.generation(),
        assignments: decode_topic_parts(g.assignments()),
        rebalancing: g.rebalancing(),
    }
}

pub fn encode_leave_group(corr: u64, group: &str, member_id: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let g = b.create_string(group);
    let m = b.create_string(member_id);
    let l = fb::LeaveGroup::create(
        &mut b,
        &fb::LeaveGroupArgs {
            group: Some(g),
            member_id: Some(m),
        },
    );
    finish(b, corr, fb::Body::LeaveGroup, l.as_union_value())
}

pub fn encode_leave_group_response(corr: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let l = fb::LeaveGroupResponse::create(&mut b, &fb::LeaveGroupResponseArgs {});
    finish(b, corr, fb::Body::LeaveGroupResponse, l.as_union_value())
}

pub fn encode_commit_offsets(
    corr: u64,
    group: &str,
    member_id: &str,
    generation: u64,
    offs: &[OffsetOut],
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let g = b.create_string(group);
    let m = b.create_string(member_id);
    let o = offsets(&mut b, offs);
    let c = fb::CommitOffsets::create(
        &mut b,
        &fb::CommitOffsetsArgs {
            group: Some(g),
            member_id: Some(m),
            generation,
            offsets: Some(o),
        },
    );
    finish(b, corr, fb::Body::CommitOffsets, c.as_union_value())
}

pub fn encode_commit_offsets_response(corr: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let c = fb::CommitOffsetsResponse::create(&mut b, &fb::CommitOffsetsResponseArgs {});
    finish(b, corr, fb::Body::CommitOffsetsResponse, c.as_union_value())
}

pub fn encode_fetch_offsets(corr: u64, group: &str, topics: &[String]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let g = b.create_string(group);
    let t = strings(&mut b, topics);
    let f = fb::FetchOffsets::create(
        &mut b,
        &fb::FetchOffsetsArgs {
            group: Some(g),
            topics: Some(t),
        },
    );
    finish(b, corr, fb::Body::FetchOffsets, f.as_union_value())
}

pub fn encode_fetch_offsets_response(corr: u64, offs: &[OffsetOut]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let o = offsets(&mut b, offs);
    let f = fb::FetchOffsetsResponse::create(
        &mut b,
        &fb::FetchOffsetsResponseArgs { offsets: Some(o) },
    );
    finish(b, corr, fb::Body::FetchOffsetsResponse, f.as_union_value())
}

pub fn encode_list_groups(corr: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let l = fb::ListGroups::create(&mut b, &fb::ListGroupsArgs {});
    finish(b, corr, fb::Body::ListGroups, l.as_union_value())
}

pub fn encode_list_groups_response(corr: u64, groups: &[String]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let g = strings(&mut b, groups);
    let l = fb::ListGroupsResponse::create(&mut b, &fb::ListGroupsResponseArgs { groups: Some(g) });
    finish(b, corr, fb::Body::ListGroupsResponse, l.as_union_value())
}

pub fn encode_describe_group(corr: u64, group: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let g = b.create_string(group);
    let d = fb::DescribeGroup::create(&mut b, &fb::DescribeGroupArgs { group: Some(g) });
    finish(b, corr, fb::Body::DescribeGroup, d.as_union_value())
}

pub fn encode_describe_group_response(corr: u64, d: &GroupOut) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(512);
    let members: Vec<_> = d
        .members
        .iter()
        .map(|m| {
            let id = b.create_string(&m.member_id);
            let c = b.create_string(&m.client_id);
            let t = strings(&mut b, &m.topics);
            let a = topic_parts(&mut b, &m.assignments);
            fb::MemberInfo::create(
                &mut b,
                &fb::MemberInfoArgs {
                    member_id: Some(id),
                    client_id: Some(c),
                    topics: Some(t),
                    assignments: Some(a),
                },
            )
        })
        .collect();
    let members = b.create_vector(&members);
    let o = offsets(&mut b, &d.offsets);
    let g = b.create_string(&d.group);
    let r = fb::DescribeGroupResponse::create(
        &mut b,
        &fb::DescribeGroupResponseArgs {
            group: Some(g),
            generation: d.generation,
            members: Some(members),
            offsets: Some(o),
        },
    );
    finish(b, corr, fb::Body::DescribeGroupResponse, r.as_union_value())
}

pub fn decode_describe_group_response(r: fb::DescribeGroupResponse<'_>) -> GroupOut {
    GroupOut {
        group: r.group().unwrap_or_default().to_string(),
        generation: r.generation(),
        members: r
            .members()
            .map(|ms| {
                ms.iter()
                    .map(|m| MemberOut {
                        member_id: m.member_id().unwrap_or_default().to_string(),
                        client_id: m.client_id().unwrap_or_default().to_string(),
                        topics: decode_strings(m.topics()),
                        assignments: decode_topic_parts(m.assignments()),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        offsets: decode_offsets(r.offsets()),
    }
}

pub fn encode_list_offset(corr: u64, topic: &str, partition: u32, timestamp_ms: i64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let t = b.create_string(topic);
    let l = fb::ListOffset::create(
        &mut b,
        &fb::ListOffsetArgs {
            topic: Some(t),
            partition,
            timestamp_ms,
        },
    );
    finish(b, corr, fb::Body::ListOffset, l.as_union_value())
}

pub fn encode_list_offset_response(corr: u64, partition: u32, offset: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let l =
        fb::ListOffsetResponse::create(&mut b, &fb::ListOffsetResponseArgs { partition, offset });
    finish(b, corr, fb::Body::ListOffsetResponse, l.as_union_value())
}
