//! The blocking Rust client over `std::net::TcpStream`, used by the CLI and the tests.
//!
//! Owns: one connection, correlation ids, and turning response frames into values. Must not
//! touch: server internals; it speaks only the wire protocol of `protocol/`. Pipelining: send
//! several requests with [`Client::send`] and collect their responses with [`Client::recv`].

pub mod heartbeat;
pub mod leaders;

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;

use crate::limits;
use crate::protocol::groups as g;
use crate::protocol::{
    self as proto, fb, FetchArgsOut, PartitionChoice, RecordIn, RecordOut, TopicMetaOut,
};

/// Errors a client call can return.
#[derive(Debug)]
pub enum ClientError {
    /// Could not connect, or the connection broke.
    Io(std::io::Error),
    /// The broker answered with an Error frame.
    Server {
        code: u16,
        name: String,
        message: String,
    },
    /// The broker's answer made no sense (wrong type, bad frame).
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Server { name, message, .. } => write!(f, "{message} ({name})"),
            Self::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl ClientError {
    /// The wire error code, if the broker sent one.
    pub fn code(&self) -> Option<fb::ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(fb::ErrorCode(*code)),
            _ => None,
        }
    }
}

/// Acknowledgement of a produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceAck {
    pub partition: u32,
    pub base_offset: u64,
    pub record_count: u32,
}

/// Records from a fetch.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub records: Vec<RecordOut>,
    pub next_offset: u64,
    pub log_start: u64,
    pub log_end: u64,
}

/// One connection to a broker.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    next_correlation_id: u64,
    /// The shard this connection landed on, and the broker's shard count.
    pub shard: u32,
    pub shard_count: u32,
}

/// A response frame: its bytes (no prefix); view it with [`Response::frame`].
pub struct Response {
    bytes: Bytes,
}

impl Response {
    pub fn frame(&self) -> fb::Frame<'_> {
        // Verified in `recv` before a Response is made.
        proto::verify_frame(&self.bytes).expect("verified in recv")
    }

    /// The error this response carries, if it is an Error frame.
    pub fn error(&self) -> Option<ClientError> {
        self.frame().body_as_error().map(|e| ClientError::Server {
            code: e.code().0,
            name: e.code().variant_name().unwrap_or("Unknown").to_string(),
            message: e.message().unwrap_or_default().to_string(),
        })
    }
}

impl Client {
    /// Connects and handshakes.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)?;
        Self::over(stream)
    }

    /// Connects within `timeout` (per address the name resolves to) and handshakes.
    pub fn connect_within(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => return Self::over(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(ClientError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no address"))
        })))
    }

    fn over(stream: TcpStream) -> Result<Self, ClientError> {
        stream.set_nodelay(true)?;
        let mut c = Self {
            reader: BufReader::with_capacity(256 * 1024, stream.try_clone()?),
            writer: BufWriter::with_capacity(256 * 1024, stream),
            next_correlation_id: 1,
            shard: 0,
            shard_count: 0,
        };
        let r = c.call(|corr| proto::encode_handshake(corr, "ringmq-rust-client"))?;
        let h = r
            .frame()
            .body_as_handshake_response()
            .ok_or_else(|| ClientError::Protocol("expected a HandshakeResponse".into()))?;
        c.shard = h.shard();
        c.shard_count = h.shard_count();
        Ok(c)
    }

    /// Sets a read timeout on the socket (None = block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(t)?;
        Ok(())
    }

    /// Waits up to `timeout` for response bytes; true if a `recv` would find some.
    pub fn wait_readable(&mut self, timeout: Duration) -> Result<bool, ClientError> {
        use std::os::fd::AsRawFd;
        if !self.reader.buffer().is_empty() {
            return Ok(true);
        }
        let mut fds = libc::pollfd {
            fd: self.reader.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: one valid pollfd for a socket this client owns; a valid timespec; no sigmask.
        let n = unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
        if n < 0 {
            return Err(ClientError::Io(std::io::Error::last_os_error()));
        }
        Ok(n > 0)
    }

    /// Writes a request made by `make(correlation_id)` without waiting; returns the id.
    /// Call [`Client::flush`] before waiting for responses.
    pub fn send(&mut self, make: impl FnOnce(u64) -> Bytes) -> Result<u64, ClientError> {
        let corr = self.next_correlation_id;
        self.next_correlation_id += 1;
        self.writer.write_all(&make(corr))?;
        Ok(corr)
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.writer.flush()?;
        Ok(())
    }

    /// Reads the next response frame, verified.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let mut prefix = [0u8; 4];
        self.reader.read_exact(&mut prefix)?;
        let len = proto::frame_len(prefix, limits::CLIENT_MAX_FRAME_BYTES)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        proto::verify_frame(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Response {
            bytes: Bytes::from(body),
        })
    }

    /// Sends one request and waits for its response; an Error frame becomes `Err`.
    pub fn call(&mut self, make: impl FnOnce(u64) -> Bytes) -> Result<Response, ClientError> {
        let corr = self.send(make)?;
        self.flush()?;
        let r = self.recv()?;
        if let Some(e) = r.error() {
            return Err(e);
        }
        let got = r.frame().correlation_id();
        if got != corr {
            return Err(ClientError::Protocol(format!(
                "correlation id {got}, expected {corr}"
            )));
        }
        Ok(r)
    }

    pub fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        retention_bytes: i64,
        retention_ms: i64,
    ) -> Result<(), ClientError> {
        self.create_topic_replicated(name, partitions, retention_bytes, retention_ms, 0)
    }

    /// Creates a topic with `replicas` replicas per partition (0 = the broker's default).
    pub fn create_topic_replicated(
        &mut self,
        name: &str,
        partitions: u32,
        retention_bytes: i64,
        retention_ms: i64,
        replicas: u32,
    ) -> Result<(), ClientError> {
        self.call(|c| {
            proto::encode_create_topic(c, name, partitions, retention_bytes, retention_ms, replicas)
        })?;
        Ok(())
    }

    /// The cluster's nodes and controller as the node asked sees them.
    pub fn cluster_status(&mut self) -> Result<proto::ClusterStatusOut, ClientError> {
        let r = self.call(proto::encode_cluster_status)?;
        let s = r
            .frame()
            .body_as_cluster_status_response()
            .ok_or_else(|| ClientError::Protocol("expected a ClusterStatusResponse".into()))?;
        Ok(proto::decode_cluster_status_response(s))
    }

    pub fn delete_topic(&mut self, name: &str) -> Result<(), ClientError> {
        self.call(|c| proto::encode_delete_topic(c, name))?;
        Ok(())
    }

    /// Topics with partitions and offsets; empty `topics` = all.
    pub fn metadata(&mut self, topics: &[&str]) -> Result<Vec<TopicMetaOut>, ClientError> {
        let r = self.call(|c| proto::encode_metadata(c, topics))?;
        let m = r
            .frame()
            .body_as_metadata_response()
            .ok_or_else(|| ClientError::Protocol("expected a MetadataResponse".into()))?;
        Ok(proto::decode_metadata_response(m))
    }

    /// Produces records as one batch and waits for the acknowledgement.
    pub fn produce(
        &mut self,
        topic: &str,
        choice: PartitionChoice<'_>,
        records: &[RecordIn],
    ) -> Result<ProduceAck, ClientError> {
        let batch = proto::encode_record_batch(records);
        let r = self.call(|c| proto::encode_produce(c, topic, choice, &batch))?;
        produce_ack(&r)
    }

    /// Fetches records at `offset` or later (long poll up to `max_wait_ms`).
    pub fn fetch(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Fetched, ClientError> {
        self.fetch_filtered(topic, partition, offset, max_bytes, max_wait_ms, None)
    }

    /// Like [`Client::fetch`] with an optional content filter evaluated on the broker.
    pub fn fetch_filtered(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
        filter: Option<&str>,
    ) -> Result<Fetched, ClientError> {
        let args = FetchArgsOut {
            topic,
            partition,
            offset,
            max_bytes,
            max_wait_ms,
            filter,
        };
        let r = self.call(|c| proto::encode_fetch(c, &args))?;
        let f = r
            .frame()
            .body_as_fetch_response()
            .ok_or_else(|| ClientError::Protocol("expected a FetchResponse".into()))?;
        let records = match (f.batches(), f.records()) {
            (_, Some(r)) => proto::decode_filtered_records(r),
            (Some(b), None) => {
                proto::decode_fetched_records(b.bytes(), offset).map_err(ClientError::Protocol)?
            }
            (None, None) => Vec::new(),
        };
        Ok(Fetched {
            records,
            next_offset: f.next_offset(),
            log_start: f.log_start(),
            log_end: f.log_end(),
        })
    }
}

impl Client {
    /// Joins `group` subscribing to `topics`; returns the member's assignment.
    pub fn join_group(
        &mut self,
        group: &str,
        topics: &[String],
        member_id: &str,
        session_timeout_ms: u32,
    ) -> Result<g::AssignmentOut, ClientError> {
        let r = self.call(|c| {
            g::encode_join_group(
                c,
                group,
                topics,
                member_id,
                "ringmq-cli",
                session_timeout_ms,
            )
        })?;
        assignment_of(&r)
    }

    /// Heartbeats; `generation` = the newest assignment applied. Returns the current one.
    pub fn heartbeat(
        &mut self,
        group: &str,
        member_id: &str,
        generation: u64,
    ) -> Result<g::AssignmentOut, ClientError> {
        let r = self.call(|c| g::encode_heartbeat(c, group, member_id, generation))?;
        assignment_of(&r)
    }

    pub fn leave_group(&mut self, group: &str, member_id: &str) -> Result<(), ClientError> {
        self.call(|c| g::encode_leave_group(c, group, member_id))?;
        Ok(())
    }

    /// Commits next offsets to consume.
    pub fn commit_offsets(
        &mut self,
        group: &str,
        member_id: &str,
        generation: u64,
        offsets: &[g::OffsetOut],
    ) -> Result<(), ClientError> {
        self.call(|c| g::encode_commit_offsets(c, group, member_id, generation, offsets))?;
        Ok(())
    }

    /// Committed offsets of a group (for `topics`, or all).
    pub fn fetch_offsets(
        &mut self,
        group: &str,
        topics: &[String],
    ) -> Result<Vec<g::OffsetOut>, ClientError> {
        let r = self.call(|c| g::encode_fetch_offsets(c, group, topics))?;
        let f = r
            .frame()
            .body_as_fetch_offsets_response()
            .ok_or_else(|| ClientError::Protocol("expected a FetchOffsetsResponse".into()))?;
        Ok(g::decode_offsets(f.offsets()))
    }

    pub fn list_groups(&mut self) -> Result<Vec<String>, ClientError> {
        let r = self.call(g::encode_list_groups)?;
        let l = r
            .frame()
            .body_as_list_groups_response()
            .ok_or_else(|| ClientError::Protocol("expected a ListGroupsResponse".into()))?;
        Ok(g::decode_strings(l.groups()))
    }

    pub fn describe_group(&mut self, group: &str) -> Result<g::GroupOut, ClientError> {
        let r = self.call(|c| g::encode_describe_group(c, group))?;
        let d = r
            .frame()
            .body_as_describe_group_response()
            .ok_or_else(|| ClientError::Protocol("expected a DescribeGroupResponse".into()))?;
        Ok(g::decode_describe_group_response(d))
    }

    /// Offset for a timestamp (ms), or -1 = start, -2 = end.
    pub fn list_offset(
        &mut self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<u64, ClientError> {
        let r = self.call(|c| g::encode_list_offset(c, topic, partition, timestamp_ms))?;
        let l = r
            .frame()
            .body_as_list_offset_response()
            .ok_or_else(|| ClientError::Protocol("expected a ListOffsetResponse".into()))?;
        Ok(l.offset())
    }
}

impl Client {
    /// Produces one batch to several destinations; one result per destination, in order.
    pub fn multicast(
        &mut self,
        dests: &[proto::multicast::DestOut<'_>],
        key: Option<&[u8]>,
        records: &[RecordIn],
    ) -> Result<Vec<proto::multicast::DestResult>, ClientError> {
        let batch = proto::encode_record_batch(records);
        let r = self.call(|c| proto::multicast::encode_multicast_produce(c, dests, key, &batch))?;
        let m = r
            .frame()
            .body_as_multicast_produce_response()
            .ok_or_else(|| ClientError::Protocol("expected a MulticastProduceResponse".into()))?;
        Ok(proto::multicast::decode_multicast_response(m))
    }

    /// Health of every partition.
    pub fn status(&mut self) -> Result<Vec<proto::multicast::PartitionStatusOut>, ClientError> {
        let r = self.call(proto::multicast::encode_status)?;
        let s = r
            .frame()
            .body_as_status_response()
            .ok_or_else(|| ClientError::Protocol("expected a StatusResponse".into()))?;
        Ok(proto::multicast::decode_status_response(s))
    }

    /// Every shard's cross-core copy counters.
    pub fn stats(&mut self) -> Result<Vec<proto::multicast::ShardStatsOut>, ClientError> {
        let r = self.call(proto::multicast::encode_stats)?;
        let s = r
            .frame()
            .body_as_stats_response()
            .ok_or_else(|| ClientError::Protocol("expected a StatsResponse".into()))?;
        Ok(proto::multicast::decode_stats_response(s))
    }
}

impl Client {
    /// Leases up to `q.max_messages` messages of one partition of a shared subscription.
    pub fn queue_fetch(
        &mut self,
        q: &proto::queue::QueueFetchOut<'_>,
    ) -> Result<Vec<proto::queue::QueueMessageOut>, ClientError> {
        let r = self.call(|c| proto::queue::encode_queue_fetch(c, q))?;
        let f = r
            .frame()
            .body_as_queue_fetch_response()
            .ok_or_else(|| ClientError::Protocol("expected a QueueFetchResponse".into()))?;
        Ok(proto::queue::decode_queue_fetch_response(f))
    }

    /// Acks, nacks or extends leased messages; returns how many were settled.
    pub fn queue_settle(
        &mut self,
        topic: &str,
        sub: &str,
        partition: u32,
        offsets: &[u64],
        how: proto::queue::Settle,
    ) -> Result<u32, ClientError> {
        let r = self
            .call(|c| proto::queue::encode_queue_settle(c, topic, sub, partition, offsets, how))?;
        let f = r
            .frame()
            .body_as_queue_settle_response()
            .ok_or_else(|| ClientError::Protocol("expected a QueueSettleResponse".into()))?;
        Ok(f.settled())
    }

    /// Counters of a topic's subscriptions (`sub` = one, or all).
    pub fn subscription_info(
        &mut self,
        topic: &str,
        sub: Option<&str>,
    ) -> Result<Vec<proto::queue::SubStatsOut>, ClientError> {
        let r = self.call(|c| proto::queue::encode_subscription_info(c, topic, sub))?;
        let f = r
            .frame()
            .body_as_subscription_info_response()
            .ok_or_else(|| ClientError::Protocol("expected a SubscriptionInfoResponse".into()))?;
        Ok(proto::queue::decode_subscription_info_response(f))
    }
}

fn assignment_of(r: &Response) -> Result<g::AssignmentOut, ClientError> {
    let a = r
        .frame()
        .body_as_group_assignment()
        .ok_or_else(|| ClientError::Protocol("expected a GroupAssignment".into()))?;
    Ok(g::decode_group_assignment(a))
}

/// Reads a produce acknowledgement out of a response (an Error frame becomes `Err`).
pub fn produce_ack(r: &Response) -> Result<ProduceAck, ClientError> {
    if let Some(e) = r.error() {
        return Err(e);
    }
    let p = r
        .frame()
        .body_as_produce_response()
        .ok_or_else(|| ClientError::Protocol("expected a ProduceResponse".into()))?;
    Ok(ProduceAck {
        partition: p.partition(),
        base_offset: p.base_offset(),
        record_count: p.record_count(),
    })
}
