//! Frame codec: length prefix, verification, and encoders for every body.
//!
//! Owns: turning bytes into verified `fb::Frame` views and typed values into frame bytes.
//! Must not touch: I/O. Every frame from the network passes [`verify_frame`] before use.

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::fb;
use crate::storage::batch as stored;

/// Why a frame was rejected. Each maps to a wire [`fb::ErrorCode`] at the server edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    TooLarge { len: usize, max: usize },
    Malformed(String),
    UnknownRequest(u8),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes over the limit of {max} bytes")
            }
            Self::Malformed(why) => write!(f, "malformed frame: {why}"),
            Self::UnknownRequest(t) => write!(f, "unknown request type {t}"),
        }
    }
}

/// Bytes in the length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;

/// Reads the length prefix; rejects zero and lengths over `max_frame_bytes`.
pub fn frame_len(prefix: [u8; 4], max_frame_bytes: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Malformed("zero-length frame".into()));
    }
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(len)
}

/// Request body types a server accepts.
pub fn is_request(t: fb::Body) -> bool {
    matches!(
        t,
        fb::Body::Handshake
            | fb::Body::CreateTopic
            | fb::Body::DeleteTopic
            | fb::Body::Metadata
            | fb::Body::Produce
            | fb::Body::Fetch
            | fb::Body::JoinGroup
            | fb::Body::Heartbeat
            | fb::Body::LeaveGroup
            | fb::Body::CommitOffsets
            | fb::Body::FetchOffsets
            | fb::Body::ListGroups
            | fb::Body::DescribeGroup
            | fb::Body::ListOffset
            | fb::Body::MulticastProduce
            | fb::Body::Stats
            | fb::Body::QueueFetch
            | fb::Body::QueueSettle
            | fb::Body::Forwarded
            | fb::Body::ClusterStatus
            | fb::Body::SubscriptionInfo
            | fb::Body::Status
    )
}

/// A request frame (without its length prefix) that passed [`verify_frame`]. Only this module
/// makes one, so holding one is the proof that it was verified, once, at the edge; inner code
/// reads it with [`VerifiedFrame::view`] at no further cost. Cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct VerifiedFrame(Bytes);

impl VerifiedFrame {
    /// Verifies `bytes` (a frame without its length prefix).
    pub fn verify(bytes: Bytes) -> Result<Self, FrameError> {
        verify_frame(&bytes)?;
        Ok(Self(bytes))
    }

    /// Verifies a frame made by one of this module's encoders (length prefix included): the
    /// broker's own internal requests.
    pub fn verify_encoded(frame: &Bytes) -> Result<Self, FrameError> {
        Self::verify(frame.slice(LEN_PREFIX_BYTES.min(frame.len())..))
    }

    /// The frame's flatbuffers view.
    pub fn view(&self) -> fb::Frame<'_> {
        // SAFETY: `self.0` passed `verify_frame` (which also verifies a produce's nested
        // batch) when this value was made, and `Bytes` is immutable.
        unsafe { fb::root_as_frame_unchecked(&self.0) }
    }

    /// The frame's bytes (to slice a nested batch out without copying).
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// A `Forwarded` frame's parts: the partition the sender resolved, the multicast
    /// destination indexes, and the inner client frame (sliced out without copying; it was
    /// verified with this one).
    pub fn forwarded(&self) -> Option<Forwarded> {
        let f = self.view().body_as_forwarded()?;
        let inner = self.0.slice_ref(f.frame().bytes());
        Some(Forwarded {
            partition: f.partition(),
            dests: f.dests().map(|d| d.iter().collect()).unwrap_or_default(),
            from_node: f.from_node(),
            frame: VerifiedFrame(inner),
        })
    }

    /// The record batch of a produce or multicast frame, sliced out without copying; `None`
    /// for other requests, an error if the batch breaks a rule the verifier does not check
    /// (no records).
    pub fn batch(&self) -> Option<Result<VerifiedBatch, FrameError>> {
        let f = self.view();
        let nested = match f.body_type() {
            fb::Body::Produce => f.body_as_produce()?.batch().bytes(),
            fb::Body::MulticastProduce => f.body_as_multicast_produce()?.batch().bytes(),
            _ => return None,
        };
        // SAFETY: `verify_frame` verified this nested batch when `self` was made.
        let facts = batch_facts(unsafe { flatbuffers::root_unchecked::<fb::RecordBatch>(nested) });
        Some(facts.map(|facts| VerifiedBatch {
            bytes: self.0.slice_ref(nested),
            facts,
        }))
    }
}

/// A record batch that passed the flatbuffers verifier, with the facts its log header needs.
/// Only this module makes one (from a [`VerifiedFrame`], or by verifying bytes the broker
/// built itself), so a partition can store it without looking inside again. Owned and
/// cheap to clone (the bytes are shared), so it can cross cores.
#[derive(Clone, Debug)]
pub struct VerifiedBatch {
    bytes: Bytes,
    facts: BatchFacts,
}

impl VerifiedBatch {
    /// Verifies batch bytes built inside the broker (a dead-letter batch).
    pub fn verify(bytes: Bytes) -> Result<Self, FrameError> {
        let facts = verify_record_batch(&bytes)?;
        Ok(Self { bytes, facts })
    }

    /// The flatbuffers bytes, as they will be stored.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn facts(&self) -> BatchFacts {
        self.facts
    }
}

/// The `RecordBatch` of a batch payload read back from a partition's own log.
///
/// # Safety
/// `payload` must be the payload of a stored batch whose format tag says RingmqFlatbuffers:
/// those bytes came from a [`VerifiedBatch`] and reads check the batch CRC (the tail cache
/// holds the very bytes that were verified).
pub unsafe fn stored_record_batch(payload: &[u8]) -> fb::RecordBatch<'_> {
    // SAFETY: the caller's contract above.
    unsafe { flatbuffers::root_unchecked::<fb::RecordBatch>(payload) }
}

/// Verifies a frame (without its length prefix). For a produce, also verifies the nested batch.
/// The parts of a `Forwarded` frame (see [`VerifiedFrame::forwarded`]).
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub partition: u32,
    pub dests: Vec<u32>,
    pub from_node: u32,
    pub frame: VerifiedFrame,
}

/// A client's verified frame wrapped for the node that owns its partition (length prefix
/// included). The inner bytes are copied once into the new frame, never re-encoded.
pub fn encode_forwarded(
    correlation_id: u64,
    from_node: u32,
    partition: u32,
    dests: &[u32],
    inner: &VerifiedFrame,
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(inner.bytes().len() + 128);
    let frame = b.create_vector(inner.bytes());
    let dests = (!dests.is_empty()).then(|| b.create_vector(dests));
    let f = fb::Forwarded::create(
        &mut b,
        &fb::ForwardedArgs {
            partition,
            dests,
            from_node,
            frame: Some(frame),
        },
    );
    finish(b, correlation_id, fb::Body::Forwarded, f.as_union_value())
}

pub fn verify_frame(bytes: &[u8]) -> Result<fb::Frame<'_>, FrameError> {
    let frame = fb::root_as_frame(bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let t = frame.body_type();
    if t == fb::Body::NONE {
        return Err(FrameError::Malformed("frame has no body".into()));
    }
    if t.0 > fb::Body::ENUM_MAX {
        return Err(FrameError::UnknownRequest(t.0));
    }
    if frame.body().is_none() {
        return Err(FrameError::Malformed("frame body missing".into()));
    }
    if let Some(p) = frame.body_as_produce() {
        verify_record_batch(p.batch().bytes())?;
    }
    if let Some(f) = frame.body_as_forwarded() {
        // The inner frame is verified as a frame of its own; one level only.
        let inner = verify_frame(f.frame().bytes())?;
        if inner.body_type() == fb::Body::Forwarded {
            return Err(FrameError::Malformed(
                "a forwarded frame inside another".into(),
            ));
        }
    }
    if let Some(m) = frame.body_as_multicast_produce() {
        verify_record_batch(m.batch().bytes())?;
        if m.destinations().is_empty() {
            return Err(FrameError::Malformed(
                "multicast without destinations".into(),
            ));
        }
    }
    Ok(frame)
}

/// Facts of a verified record batch that the log header needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFacts {
    pub record_count: u32,
    /// Min and max of non-zero record timestamps; 0 when every record left it to the broker.
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// An idempotent producer's (id, sequence number for the partition).
    pub producer: Option<(u64, i64)>,
}

/// An idempotent producer's (id, sequence) from a batch; `None` for others.
pub fn producer_of(b: &fb::RecordBatch<'_>) -> Option<(u64, i64)> {
    (b.producer_id() != 0 && b.sequence() >= 0).then(|| (b.producer_id(), b.sequence()))
}

/// Verifies nested `RecordBatch` bytes: a valid flatbuffer with at least one record.
pub fn verify_record_batch(bytes: &[u8]) -> Result<BatchFacts, FrameError> {
    let b = flatbuffers::root::<fb::RecordBatch>(bytes)
        .map_err(|e| FrameError::Malformed(format!("record batch: {e}")))?;
    batch_facts(b)
}

fn batch_facts(b: fb::RecordBatch<'_>) -> Result<BatchFacts, FrameError> {
    let records = b.records();
    if records.is_empty() {
        return Err(FrameError::Malformed("record batch has no records".into()));
    }
    let count = u32::try_from(records.len())
        .map_err(|_| FrameError::Malformed("too many records".into()))?;
    let mut first = 0i64;
    let mut max = 0i64;
    for r in records {
        let ts = r.timestamp_ms();
        if ts > 0 {
            first = if first == 0 { ts } else { first.min(ts) };
            max = max.max(ts);
        }
    }
    Ok(BatchFacts {
        record_count: count,
        first_timestamp_ms: first,
        max_timestamp_ms: max,
        producer: producer_of(&b),
    })
}

/// Finishes a frame with its length prefix and returns the bytes to send.
pub(crate) fn finish(
    mut b: FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: fb::Body,
    body: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) -> Bytes {
    let frame = fb::Frame::create(
        &mut b,
        &fb::FrameArgs {
            correlation_id,
            body_type,
            body: Some(body),
        },
    );
    b.finish(frame, None);
    let (mut vec, head) = b.collapse();
    let len = ((vec.len() - head) as u32).to_le_bytes();
    // The builder writes back to front, so there is usually room in front of the frame for
    // the length prefix; the frame's alignment stays relative to its own first byte.
    if head >= LEN_PREFIX_BYTES {
        vec[head - LEN_PREFIX_BYTES..head].copy_from_slice(&len);
        return Bytes::from(vec).slice(head - LEN_PREFIX_BYTES..);
    }
    let mut out = Vec::with_capacity(vec.len() - head + LEN_PREFIX_BYTES);
    out.extend_from_slice(&len);
    out.extend_from_slice(&vec[head..]);
    Bytes::from(out)
}

pub fn encode_handshake(correlation_id: u64, client_id: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let cid = b.create_string(client_id);
    let h = fb::Handshake::create(
        &mut b,
        &fb::HandshakeArgs {
            protocol_version: super::PROTOCOL_VERSION,
            client_id: Some(cid),
        },
    );
    finish(b, correlation_id, fb::Body::Handshake, h.as_union_value())
}

pub fn encode_handshake_response(correlation_id: u64, shard: u32, shard_count: u32) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let v = b.create_string(env!("CARGO_PKG_VERSION"));
    let h = fb::HandshakeResponse::create(
        &mut b,
        &fb::HandshakeResponseArgs {
            protocol_version: super::PROTOCOL_VERSION,
            server_version: Some(v),
            shard,
            shard_count,
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::HandshakeResponse,
        h.as_union_value(),
    )
}

pub fn encode_create_topic(
    correlation_id: u64,
    name: &str,
    partitions: u32,
    retention_bytes: i64,
    retention_ms: i64,
    replicas: u32,
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let n = b.create_string(name);
    let c = fb::CreateTopic::create(
        &mut b,
        &fb::CreateTopicArgs {
            name: Some(n),
            partitions,
            retention_bytes,
            retention_ms,
            replicas,
        },
    );
    finish(b, correlation_id, fb::Body::CreateTopic, c.as_union_value())
}

pub fn encode_create_topic_response(correlation_id: u64, name: &str, partitions: u32) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let n = b.create_string(name);
    let c = fb::CreateTopicResponse::create(
        &mut b,
        &fb::CreateTopicResponseArgs {
            name: Some(n),
            partitions,
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::CreateTopicResponse,
        c.as_union_value(),
    )
}

pub fn encode_delete_topic(correlation_id: u64, name: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let n = b.create_string(name);
    let d = fb::DeleteTopic::create(&mut b, &fb::DeleteTopicArgs { name: Some(n) });
    finish(b, correlation_id, fb::Body::DeleteTopic, d.as_union_value())
}

pub fn encode_delete_topic_response(correlation_id: u64, name: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let n = b.create_string(name);
    let d = fb::DeleteTopicResponse::create(&mut b, &fb::DeleteTopicResponseArgs { name: Some(n) });
    finish(
        b,
        correlation_id,
        fb::Body::DeleteTopicResponse,
        d.as_union_value(),
    )
}

pub fn encode_metadata(correlation_id: u64, topics: &[&str]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let names: Vec<_> = topics.iter().map(|t| b.create_string(t)).collect();
    let v = b.create_vector(&names);
    let m = fb::Metadata::create(&mut b, &fb::MetadataArgs { topics: Some(v) });
    finish(b, correlation_id, fb::Body::Metadata, m.as_union_value())
}

/// One partition in a metadata response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionMetaOut {
    pub partition: u32,
    pub shard: u32,
    pub start_offset: u64,
    pub end_offset: u64,
    /// Cluster: the leader node (-1: none alive; 0 on a single node), its client address
    /// (empty on a single node) and the replica nodes (empty on a single node).
    pub leader: i32,
    pub leader_address: String,
    pub replicas: Vec<u32>,
}

/// One topic in a metadata response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetaOut {
    pub name: String,
    pub partitions: Vec<PartitionMetaOut>,
    pub retention_bytes: i64,
    pub retention_ms: i64,
}

pub fn encode_metadata_response(correlation_id: u64, topics: &[TopicMetaOut]) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let mut tops = Vec::with_capacity(topics.len());
    for t in topics {
        let parts: Vec<_> = t
            .partitions
            .iter()
            .map(|p| {
                let leader_address =
                    (!p.leader_address.is_empty()).then(|| b.create_string(&p.leader_address));
                let replicas = (!p.replicas.is_empty()).then(|| b.create_vector(&p.replicas));
                fb::PartitionInfo::create(
                    &mut b,
                    &fb::PartitionInfoArgs {
                        partition: p.partition,
                        shard: p.shard,
                        start_offset: p.start_offset,
                        end_offset: p.end_offset,
                        leader: p.leader,
                        leader_address,
                        replicas,
                    },
                )
            })
            .collect();
        let parts = b.create_vector(&parts);
        let name = b.create_string(&t.name);
        tops.push(fb::TopicInfo::create(
            &mut b,
            &fb::TopicInfoArgs {
                name: Some(name),
                partitions: Some(parts),
                retention_bytes: t.retention_bytes,
                retention_ms: t.retention_ms,
            },
        ));
    }
    let tops = b.create_vector(&tops);
    let m = fb::MetadataResponse::create(&mut b, &fb::MetadataResponseArgs { topics: Some(tops) });
    finish(
        b,
        correlation_id,
        fb::Body::MetadataResponse,
        m.as_union_value(),
    )
}

/// Decodes a metadata response into owned values.
pub fn decode_metadata_response(m: fb::MetadataResponse<'_>) -> Vec<TopicMetaOut> {
    m.topics()
        .map(|ts| {
            ts.iter()
                .map(|t| TopicMetaOut {
                    name: t.name().unwrap_or_default().to_string(),
                    retention_bytes: t.retention_bytes(),
                    retention_ms: t.retention_ms(),
                    partitions: t
                        .partitions()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| PartitionMetaOut {
                                    partition: p.partition(),
                                    shard: p.shard(),
                                    start_offset: p.start_offset(),
                                    end_offset: p.end_offset(),
                                    leader: p.leader(),
                                    leader_address: p
                                        .leader_address()
                                        .unwrap_or_default()
                                        .to_string(),
                                    replicas: p
                                        .replicas()
                                        .map(|r| r.iter().collect())
                                        .unwrap_or_default(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordIn {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// 0 = broker time.
    pub timestamp_ms: i64,
}

/// Encodes records as a `RecordBatch` flatbuffer (the bytes that go in `Produce.batch`).
pub fn encode_record_batch(records: &[RecordIn]) -> Vec<u8> {
    encode_record_batch_as(records, None)
}

/// [`encode_record_batch`] for an idempotent producer: its id and this batch's sequence
/// number for the partition.
pub fn encode_record_batch_as(records: &[RecordIn], producer: Option<(u64, i64)>) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.value.len() + 64).sum();
    let mut b = FlatBufferBuilder::with_capacity(size + 64);
    let mut offs = Vec::with_capacity(records.len());
    for r in records {
        let key = r.key.as_ref().map(|k| b.create_vector(k));
        let value = b.create_vector(&r.value);
        let headers = if r.headers.is_empty() {
            None
        } else {
            let hs: Vec<_> = r
                .headers
                .iter()
                .map(|(k, v)| {
                    let k = b.create_string(k);
                    let v = b.create_vector(v);
                    fb::Header::create(
                        &mut b,
                        &fb::HeaderArgs {
                            key: Some(k),
                            value: Some(v),
                        },
                    )
                })
                .collect();
            Some(b.create_vector(&hs))
        };
        offs.push(fb::Record::create(
            &mut b,
            &fb::RecordArgs {
                key,
                value: Some(value),
                headers,
                timestamp_ms: r.timestamp_ms,
            },
        ));
    }
    let v = b.create_vector(&offs);
    let (producer_id, sequence) = producer.unwrap_or((0, -1));
    let batch = fb::RecordBatch::create(
        &mut b,
        &fb::RecordBatchArgs {
            records: Some(v),
            producer_id,
            sequence,
        },
    );
    b.finish(batch, None);
    b.finished_data().to_vec()
}

/// Where a produce goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionChoice<'a> {
    Explicit(u32),
    Key(&'a [u8]),
    RoundRobin,
}

pub fn encode_produce(
    correlation_id: u64,
    topic: &str,
    choice: PartitionChoice<'_>,
    batch: &[u8],
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(batch.len() + 128);
    let t = b.create_string(topic);
    let (partition, key) = match choice {
        PartitionChoice::Explicit(p) => (p as i32, None),
        PartitionChoice::Key(k) => (-1, Some(b.create_vector(k))),
        PartitionChoice::RoundRobin => (-1, None),
    };
    let batch = b.create_vector(batch);
    let p = fb::Produce::create(
        &mut b,
        &fb::ProduceArgs {
            topic: Some(t),
            partition,
            key,
            batch: Some(batch),
        },
    );
    finish(b, correlation_id, fb::Body::Produce, p.as_union_value())
}

pub fn encode_produce_response(
    correlation_id: u64,
    partition: u32,
    base_offset: u64,
    record_count: u32,
) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let p = fb::ProduceResponse::create(
        &mut b,
        &fb::ProduceResponseArgs {
            partition,
            base_offset,
            record_count,
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::ProduceResponse,
        p.as_union_value(),
    )
}

/// A fetch request's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchArgsOut<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub max_bytes: u32,
    pub max_wait_ms: u32,
    /// Content filter evaluated on the broker.
    pub filter: Option<&'a str>,
}

pub fn encode_fetch(correlation_id: u64, f: &FetchArgsOut<'_>) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let t = b.create_string(f.topic);
    let filter = f.filter.map(|x| b.create_string(x));
    let x = fb::Fetch::create(
        &mut b,
        &fb::FetchArgs {
            topic: Some(t),
            partition: f.partition,
            offset: f.offset,
            max_bytes: f.max_bytes,
            max_wait_ms: f.max_wait_ms,
            filter,
        },
    );
    finish(b, correlation_id, fb::Body::Fetch, x.as_union_value())
}

/// The numbers of a fetch response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPosition {
    pub partition: u32,
    pub log_start: u64,
    pub log_end: u64,
    pub next_offset: u64,
}

/// Encodes a fetch response carrying stored batches verbatim.
pub fn encode_fetch_response(correlation_id: u64, pos: FetchPosition, batches: &[Bytes]) -> Bytes {
    let total: usize = batches.iter().map(|b| b.len()).sum();
    let mut b = FlatBufferBuilder::with_capacity(total + 128);
    let v = match batches {
        [one] => b.create_vector(&one[..]),
        many => {
            let mut all = Vec::with_capacity(total);
            for chunk in many {
                all.extend_from_slice(chunk);
            }
            b.create_vector(&all)
        }
    };
    let f = fb::FetchResponse::create(
        &mut b,
        &fb::FetchResponseArgs {
            partition: pos.partition,
            log_start: pos.log_start,
            log_end: pos.log_end,
            next_offset: pos.next_offset,
            batches: Some(v),
            records: None,
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::FetchResponse,
        f.as_union_value(),
    )
}

pub fn encode_error(correlation_id: u64, code: fb::ErrorCode, message: &str) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(message.len() + 64);
    let m = b.create_string(message);
    let e = fb::Error::create(
        &mut b,
        &fb::ErrorArgs {
            code,
            message: Some(m),
        },
    );
    finish(b, correlation_id, fb::Body::Error, e.as_union_value())
}

/// A consumed record with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordOut {
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp, or the batch's broker-assigned one if the record had none.
    pub timestamp_ms: i64,
}

/// Splits `FetchResponse.batches` into records at offsets ≥ `from_offset`, checking each
/// batch's CRC and verifying its nested flatbuffer.
pub fn decode_fetched_records(bytes: &[u8], from_offset: u64) -> Result<Vec<RecordOut>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let h = stored::decode_verified(&bytes[at..]).map_err(|e| e.to_string())?;
        if h.format == stored::FormatTag::Control {
            // A replication control record: an offset with no message.
            at += h.stored_len();
            continue;
        }
        let payload = &bytes[at + stored::HEADER_BYTES..at + h.stored_len()];
        let batch = flatbuffers::root::<fb::RecordBatch>(payload).map_err(|e| e.to_string())?;
        for (i, r) in batch.records().iter().enumerate() {
            let offset = h.base_offset + i as u64;
            if offset < from_offset {
                continue;
            }
            let ts = if r.timestamp_ms() > 0 {
                r.timestamp_ms()
            } else {
                h.max_timestamp_ms
            };
            out.push(RecordOut {
                offset,
                key: r.key().map(|k| k.bytes().to_vec()),
                value: r.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
                headers: owned_headers(r.headers()),
                timestamp_ms: ts,
            });
        }
        at += h.stored_len();
    }
    Ok(out)
}

/// Offsets of a record's key, value and headers copied into `b` (filtered and queue fetches).
pub(crate) type RecordParts<'a> = (
    Option<flatbuffers::WIPOffset<flatbuffers::Vector<'a, u8>>>,
    Option<flatbuffers::WIPOffset<flatbuffers::Vector<'a, u8>>>,
    Option<
        flatbuffers::WIPOffset<
            flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::Header<'a>>>,
        >,
    >,
);

pub(crate) fn copy_record_parts<'a>(
    b: &mut FlatBufferBuilder<'a>,
    r: &fb::Record<'_>,
) -> RecordParts<'a> {
    let key = r.key().map(|k| b.create_vector(k.bytes()));
    let value = r.value().map(|v| b.create_vector(v.bytes()));
    let headers = r.headers().map(|hs| {
        let hs: Vec<_> = hs
            .iter()
            .map(|h| {
                let k = b.create_string(h.key());
                let v = h.value().map(|v| b.create_vector(v.bytes()));
                fb::Header::create(
                    b,
                    &fb::HeaderArgs {
                        key: Some(k),
                        value: v,
                    },
                )
            })
            .collect();
        b.create_vector(&hs)
    });
    (key, value, headers)
}

/// Owned headers of a record.
pub(crate) fn owned_headers(
    hs: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::Header<'_>>>>,
) -> Vec<(String, Vec<u8>)> {
    hs.map(|hs| {
        hs.iter()
            .map(|h| {
                (
                    h.key().to_string(),
                    h.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
                )
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Encodes a filtered fetch response: the matching records with their offsets and timestamps.
pub fn encode_filtered_fetch_response(
    correlation_id: u64,
    pos: FetchPosition,
    records: &[(u64, i64, fb::Record<'_>)],
) -> Bytes {
    let size: usize = records
        .iter()
        .map(|(_, _, r)| r.value().map(|v| v.len()).unwrap_or(0) + 64)
        .sum();
    let mut b = FlatBufferBuilder::with_capacity(size + 128);
    let mut offs = Vec::with_capacity(records.len());
    for (offset, ts, r) in records {
        let (key, value, headers) = copy_record_parts(&mut b, r);
        offs.push(fb::FetchedRecord::create(
            &mut b,
            &fb::FetchedRecordArgs {
                offset: *offset,
                timestamp_ms: *ts,
                key,
                value,
                headers,
            },
        ));
    }
    let recs = b.create_vector(&offs);
    let f = fb::FetchResponse::create(
        &mut b,
        &fb::FetchResponseArgs {
            partition: pos.partition,
            log_start: pos.log_start,
            log_end: pos.log_end,
            next_offset: pos.next_offset,
            batches: None,
            records: Some(recs),
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::FetchResponse,
        f.as_union_value(),
    )
}

/// Records of a filtered fetch response.
pub fn decode_filtered_records(
    v: flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::FetchedRecord<'_>>>,
) -> Vec<RecordOut> {
    v.iter()
        .map(|r| RecordOut {
            offset: r.offset(),
            key: r.key().map(|k| k.bytes().to_vec()),
            value: r.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
            headers: owned_headers(r.headers()),
            timestamp_ms: r.timestamp_ms(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(b: &Bytes) -> &[u8] {
        let len = frame_len([b[0], b[1], b[2], b[3]], 1 << 20).unwrap();
        assert_eq!(len, b.len() - 4);
        &b[4..]
    }

    #[test]
    fn produce_round_trip() {
        let batch = encode_record_batch(&[RecordIn {
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![("h".into(), b"x".to_vec())],
            timestamp_ms: 5,
        }]);
        let f = encode_produce(9, "t", PartitionChoice::Key(b"k"), &batch);
        let frame = verify_frame(strip(&f)).unwrap();
        assert_eq!(frame.correlation_id(), 9);
        let p = frame.body_as_produce().unwrap();
        assert_eq!(p.topic(), "t");
        assert_eq!(p.partition(), -1);
        let facts = verify_record_batch(p.batch().bytes()).unwrap();
        assert_eq!(facts.record_count, 1);
        assert_eq!(facts.max_timestamp_ms, 5);
    }

    #[test]
    fn garbage_and_empty_batches_are_rejected() {
        assert!(verify_frame(b"garbage bytes here").is_err());
        assert!(verify_frame(&[0u8; 3]).is_err());
        let empty = encode_record_batch(&[]);
        let f = encode_produce(1, "t", PartitionChoice::RoundRobin, &empty);
        assert!(matches!(
            verify_frame(strip(&f)),
            Err(FrameError::Malformed(_))
        ));
        let f = encode_produce(1, "t", PartitionChoice::RoundRobin, b"not a flatbuffer");
        assert!(verify_frame(strip(&f)).is_err());
    }

    #[test]
    fn length_limits() {
        assert!(matches!(
            frame_len([0; 4], 10),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            frame_len(11u32.to_le_bytes(), 10),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(frame_len(10u32.to_le_bytes(), 10), Ok(10));
    }

    #[test]
    fn fetch_response_carries_stored_batches_verbatim() {
        let batch = encode_record_batch(&[
            RecordIn {
                value: b"a".to_vec(),
                ..Default::default()
            },
            RecordIn {
                value: b"b".to_vec(),
                ..Default::default()
            },
        ]);
        let meta = stored::BatchMeta {
            format: stored::FormatTag::RingmqFlatbuffers,
            record_count: 2,
            first_timestamp_ms: 7,
            max_timestamp_ms: 7,
        };
        let s = Bytes::from(stored::encode(&meta, 10, &batch));
        let pos = FetchPosition {
            partition: 0,
            log_start: 0,
            log_end: 12,
            next_offset: 12,
        };
        let f = encode_fetch_response(3, pos, std::slice::from_ref(&s));
        let frame = verify_frame(strip(&f)).unwrap();
        let r = frame.body_as_fetch_response().unwrap();
        assert_eq!(r.batches().unwrap().bytes(), &s[..]);
        let recs = decode_fetched_records(r.batches().unwrap().bytes(), 11).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].offset, 11);
        assert_eq!(recs[0].value, b"b");
        assert_eq!(recs[0].timestamp_ms, 7);
    }
}

/// One node in a cluster status answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatusOut {
    pub id: u32,
    pub address: String,
    pub peer_address: String,
    pub alive: bool,
    pub leaders: u32,
    pub replicas: u32,
    pub voter: bool,
}

/// A cluster status answer: the answering node, the controller leader (-1: none), the
/// metadata version and the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStatusOut {
    pub node_id: u32,
    pub controller: i32,
    pub version: u64,
    pub nodes: Vec<NodeStatusOut>,
}

pub fn encode_cluster_status(correlation_id: u64) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let s = fb::ClusterStatus::create(&mut b, &fb::ClusterStatusArgs {});
    finish(
        b,
        correlation_id,
        fb::Body::ClusterStatus,
        s.as_union_value(),
    )
}

pub fn encode_cluster_status_response(correlation_id: u64, st: &ClusterStatusOut) -> Bytes {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let nodes: Vec<_> = st
        .nodes
        .iter()
        .map(|n| {
            let address = b.create_string(&n.address);
            let peer_address = b.create_string(&n.peer_address);
            fb::NodeStatus::create(
                &mut b,
                &fb::NodeStatusArgs {
                    id: n.id,
                    address: Some(address),
                    peer_address: Some(peer_address),
                    alive: n.alive,
                    leaders: n.leaders,
                    replicas: n.replicas,
                    voter: n.voter,
                },
            )
        })
        .collect();
    let nodes = b.create_vector(&nodes);
    let r = fb::ClusterStatusResponse::create(
        &mut b,
        &fb::ClusterStatusResponseArgs {
            node_id: st.node_id,
            controller: st.controller,
            version: st.version,
            nodes: Some(nodes),
        },
    );
    finish(
        b,
        correlation_id,
        fb::Body::ClusterStatusResponse,
        r.as_union_value(),
    )
}

pub fn decode_cluster_status_response(r: fb::ClusterStatusResponse<'_>) -> ClusterStatusOut {
    ClusterStatusOut {
        node_id: r.node_id(),
        controller: r.controller(),
        version: r.version(),
        nodes: r
            .nodes()
            .map(|ns| {
                ns.iter()
                    .map(|n| NodeStatusOut {
                        id: n.id(),
                        address: n.address().unwrap_or_default().to_string(),
                        peer_address: n.peer_address().unwrap_or_default().to_string(),
                        alive: n.alive(),
                        leaders: n.leaders(),
                        replicas: n.replicas(),
                        voter: n.voter(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
