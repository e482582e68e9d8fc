//! Every named bound and default of ringmq, in one place.
//!
//! Owns: constants only. Must not touch: anything with state. When a bound is reached, the code
//! that enforces it says what happens (reject, backpressure, or drop-and-count); the doc comment
//! here says which.

/// Write alignment of the log format. Every flush (group commit) starts on a fresh block of this
/// size, so a block that holds acknowledged bytes is never rewritten. Part of the on-disk format:
/// recovery skips zero padding up to the next multiple of this.
pub const LOG_BLOCK_BYTES: u64 = 4096;

/// Default segment size before a roll (1 GiB).
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 1 << 30;

/// Default distance in bytes between sparse index entries.
pub const INDEX_INTERVAL_BYTES_DEFAULT: u64 = 4096;

/// Largest record batch accepted by a log (16 MiB). Larger appends are rejected with an error.
pub const BATCH_BYTES_MAX: usize = 16 << 20;

/// Default bytes of recent batches kept in memory per partition for consumer reads (8 MiB).
pub const TAIL_CACHE_BYTES_DEFAULT: usize = 8 << 20;

/// Default bytes buffered in memory before a write is issued (1 MiB). Appenders that find twice
/// this much pending wait for the flush to drain it (backpressure).
pub const WRITE_BUFFER_BYTES_DEFAULT: usize = 1 << 20;

/// Bytes read from a segment per DMA read during recovery scans (1 MiB).
pub const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// glommio io memory per executor (1 MiB). With `ulimit -l` = 8 MiB and glommio pinning this
/// three times per executor for a non-root user, 2 executors use 6 MiB. glommio refuses to start
/// below 512 KiB. Configurable with `ringmq serve --io-memory-kib`.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 1 << 20;

/// io_uring ring depth per executor.
pub const RING_DEPTH_DEFAULT: usize = 128;

const _: () = assert!(WRITE_BUFFER_BYTES_DEFAULT * 2 <= TAIL_CACHE_BYTES_DEFAULT);
const _: () = assert!(LOG_BLOCK_BYTES.is_power_of_two());
const _: () = assert!(IO_MEMORY_BYTES_DEFAULT >= 512 * 1024);

/// Default largest frame accepted from a client (16 MiB). Larger: Error{FrameTooLarge}, close.
pub const MAX_FRAME_BYTES_DEFAULT: usize = 16 << 20;

/// Default connection limit for the whole broker (split evenly across shards). Beyond it a
/// new connection gets Error{TooManyConnections} and is closed.
pub const MAX_CONNECTIONS_DEFAULT: usize = 10_000;

/// Default requests in flight per connection. At the limit the server stops reading that
/// connection until a response is written (backpressure).
pub const MAX_IN_FLIGHT_DEFAULT: usize = 64;

/// Envelopes buffered per ordered pair of shards in the channel mesh. A full channel makes the
/// sender wait (backpressure).
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

/// Replies buffered per ordered pair of shards on the mesh's reply lane. Each reply answers a
/// request the receiver made and is drained at once (no handler runs on it), so a reply
/// never waits behind requests; a full lane makes the replier wait.
pub const MESH_REPLY_CHANNEL_CAPACITY: usize = 1024;

/// Responses queued per connection for its writer task (bounded; equals max in flight + 1).
pub const WRITE_QUEUE_FRAMES_EXTRA: usize = 1;

/// Bytes a connection writer coalesces into one socket write.
pub const WRITE_COALESCE_BYTES: usize = 256 * 1024;

/// Longest long-poll wait a fetch may ask for (30 s); longer requests are capped.
pub const FETCH_WAIT_MS_MAX: u32 = 30_000;

/// Partitions per topic at most.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 1024;

/// Topic name length at most (as Kafka).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

/// How often a shard ticks its logs (writes for `--fsync never`, syncs for `--fsync MS`).
pub const LOG_TICK_MS: u64 = 5;

/// How often a shard enforces retention.
pub const RETENTION_CHECK_MS: u64 = 10_000;

/// How long shutdown waits for in-flight requests before syncing logs and exiting.
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// Largest response frame the client accepts (64 MiB).
pub const CLIENT_MAX_FRAME_BYTES: usize = 64 << 20;

/// Segment size of a shard's state log (consumer offsets): small so compaction can delete.
pub const STATE_LOG_SEGMENT_BYTES: u64 = 4 << 20;

/// A shard's state log is compacted (snapshot, then older segments deleted) past this size.
pub const STATE_LOG_COMPACT_BYTES: u64 = 64 << 20;

/// Consumer-group session timeout bounds (ms) and default.
pub const SESSION_TIMEOUT_MS_MIN: u32 = 100;
pub const SESSION_TIMEOUT_MS_MAX: u32 = 300_000;
pub const SESSION_TIMEOUT_MS_DEFAULT: u32 = 10_000;

/// How often a coordinator checks for expired group members.
pub const GROUP_EXPIRY_CHECK_MS: u64 = 50;

/// Upper bound of a subscription's `max_unacked` (tracked unacked + acked-out-of-order offsets
/// per partition). At a subscription's limit, dispatch of new messages pauses.
pub const QUEUE_UNACKED_MAX: usize = 1 << 20;

/// Largest `max_bytes` a fetch may ask for (16 MiB); larger requests are capped.
pub const FETCH_BYTES_MAX: u32 = 16 << 20;

/// Response bytes a connection may have queued for its writer (a consumer that stops reading).
/// At the limit the server stops reading that connection's requests (backpressure).
pub const OUTBOX_BYTES_MAX: usize = 32 << 20;

/// Memory budget of one connection (64 MiB): request bodies being processed plus the bytes
/// reserved for their responses (a fetch reserves its capped `max_bytes`). At the limit the
/// server stops reading the connection (backpressure). Raised automatically to fit
/// `--max-frame-bytes` plus one maximal fetch.
pub const CONNECTION_BYTES_MAX: usize = 64 << 20;

/// The first piece of a frame body (or the whole frame, if smaller): an ordinary produce batch
/// arrives in one allocation. A declared length is never allocated up front: a peer that
/// declares 16 MiB and sends nothing holds this much at most (charged to the budgets).
pub const FRAME_FIRST_ALLOC_BYTES: usize = 256 << 10;

/// After the first piece, a frame body is read (and charged to the budgets) this much at a
/// time.
pub const READ_CHUNK_BYTES: usize = 64 << 10;

/// Each connection reads the socket into a buffer this large, so one read can bring several
/// small pipelined requests (one syscall for many frames). Allocated when the connection
/// opens; 10,000 connections hold 80 MiB of it. Frame bodies are copied out into their own
/// allocation of exactly their length, charged to the budgets.
pub const READ_BUFFER_BYTES: usize = 8 << 10;

/// Node-to-node transport: the largest frame a peer may send (a bigger one closes that peer
/// connection with an error).
pub const PEER_FRAME_BYTES_MAX: usize = 32 << 20;

/// Frames queued per outbound peer link while its peer is slow or unreachable. Beyond it new
/// frames are refused and counted (Raft retransmits what it still needs).
pub const PEER_QUEUE_FRAMES: usize = 4_096;

/// A node heartbeats each peer this often.
pub const NODE_HEARTBEAT_MS: u64 = 200;

/// A peer silent this long is down (about 1 s, as issue 13 asks; five missed heartbeats).
pub const NODE_FAILURE_TIMEOUT_MS_DEFAULT: u64 = 1_000;

/// Frame bytes queued per outbound peer link at most (with [`PEER_QUEUE_FRAMES`]).
pub const PEER_QUEUE_BYTES_MAX: usize = 64 << 20;

/// Peer connections a node accepts at once; more are closed at once.
pub const PEER_CONNECTIONS_MAX: usize = 256;

/// A write to a peer that takes longer than this (the peer stopped reading) drops the
/// connection; the link reconnects.
pub const PEER_WRITE_TIMEOUT_MS: u64 = 5_000;

/// Reconnect backoff of a peer link: starts here, doubles per failed attempt, up to the max.
pub const PEER_RECONNECT_MIN_MS: u64 = 50;
pub const PEER_RECONNECT_MAX_MS: u64 = 2_000;

/// `--poll adaptive` without `--spin-before-park-us`: µs an idle shard spins before parking.
pub const POLL_ADAPTIVE_SPIN_US_DEFAULT: u64 = 100;

/// Default time a connection may be stalled before it is closed (`--stalled-connection-ms`):
/// sitting mid-frame with no bytes arriving or waiting for memory, or with a response it does
/// not read (a write making no progress). Connections idle between frames are never closed
/// for time.
pub const STALLED_CONNECTION_MS_DEFAULT: u64 = 30_000;

/// Default share of physical memory for `--memory-max-bytes`: request bodies being read or
/// processed plus reserved response bytes, over all connections (split evenly across shards).
/// At the limit the broker stops reading connections (backpressure).
pub const MEMORY_MAX_RAM_DIVISOR: u64 = 4;

/// `--memory-max-bytes` is at least this per shard: one largest frame plus one largest fetch
/// and slack must fit, or such a request could never be served.
pub const MEMORY_PER_SHARD_BYTES_MIN: u64 = 64 << 20;

const _: () = assert!(
    MEMORY_PER_SHARD_BYTES_MIN >= (MAX_FRAME_BYTES_DEFAULT as u64) + (FETCH_BYTES_MAX as u64)
);

/// How long a starting broker waits for a listener left by a broker that just died to vanish
/// (io_uring closes a dead process's sockets asynchronously) before refusing the address.
pub const PORT_RELEASE_WAIT_MS: u64 = 3_000;

/// While a connection waits for memory (budget full), how often the server checks that its
/// peer has not reset it, so a vanished client stops waiting and gives its bytes back.
pub const PEER_CHECK_MS: u64 = 100;

/// Topics in the broker at most (created by clients, or dead-letter topics created on first
/// use). Beyond: the create is refused with InvalidRequest naming the limit.
pub const TOPICS_MAX: usize = 10_000;

/// Queue subscriptions (shared or key-shared) per partition at most. Each holds ack state up to
/// its `max_unacked`. Beyond: the queue fetch that would create one is refused (InvalidRequest).
pub const SUBSCRIPTIONS_PER_PARTITION_MAX: usize = 1_024;

/// Consumer groups one coordinator shard holds at most (with members or committed offsets).
/// Beyond: a join that would create a group is refused (InvalidRequest). A group with neither
/// members nor committed offsets is forgotten at once.
pub const GROUPS_PER_SHARD_MAX: usize = 10_000;

/// glibc malloc: allocations at least this large get their own mapping, returned to the OS when
/// freed (fixed: glibc would otherwise raise it after large frees). Large enough that an
/// ordinary produce batch never pays an mmap per request; small enough that 16 MiB responses
/// do not pile up in the arenas.
pub const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// glibc malloc: free memory at the top of an arena is given back to the OS on `free` only
/// beyond this much. glibc's 128 KiB default gave back (and re-faulted, page by page) the
/// memory of every ~100 KB produce batch: 7% of broker CPU and 23 page faults per request at
/// 1000-message batches. At most this much free memory per arena stays mapped; the rest is
/// still returned by `malloc_trim` after connections close.
pub const MALLOC_TRIM_THRESHOLD_BYTES: i32 = 8 << 20;

/// Recent truncations a partition log remembers, so an appender waiting since before them
/// learns whether its batch was cut. One that waited through more is told it was (it retries).
pub const TRUNCATIONS_REMEMBERED: usize = 64;

/// Controller voters at most (`--seeds` lists them): 3 or 5 is the usual choice.
pub const CONTROLLER_VOTERS_MAX: usize = 5;

/// The controller's Raft tick. Election after 10..20 ticks without a leader (0.5..1 s),
/// heartbeats every 2.
pub const CONTROLLER_TICK_MS: u64 = 50;

/// A proposal to the controller (a topic change, a node registering) waits this long for the
/// leader's answer before the request gets `ControllerUnavailable`.
pub const CONTROLLER_PROPOSE_TIMEOUT_MS: u64 = 5_000;

/// After a topic change commits, the controller waits at most this long for every live node
/// to apply it before answering (so a client can use the topic on any node at once).
pub const CONTROLLER_APPLY_WAIT_MS: u64 = 2_000;

/// Proposals waiting for an answer on one node at most; more are refused at once.
pub const CONTROLLER_PENDING_MAX: usize = 1_024;

/// Peer frames received and not yet handled by the cluster loop at most; beyond, frames are
/// dropped (Raft retransmits; heartbeats come again).
pub const CLUSTER_INBOX_FRAMES: usize = 8_192;

/// Forwarded requests awaiting an answer on one client connection's link to one node; the
/// client's own in-flight limit bounds it first.
pub const FORWARD_PENDING_MAX: usize = 65_536;

/// How long a forwarding link waits to connect to the owning node.
pub const FORWARD_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Deleted topic names the cluster metadata remembers (so a node that was away deletes their
/// data when it returns); the oldest by name order are forgotten first, and a node then keeps
/// (moves aside) such a topic's data instead of deleting it.
pub const DELETED_TOPICS_REMEMBERED: usize = 10_000;

/// Cluster nodes a node keeps track of (hellos, liveness, links) at most; hellos from more
/// are ignored.
pub const CLUSTER_NODES_MAX: usize = 256;

/// A forwarded request's answer is awaited at most this long (longer than the longest fetch
/// long-poll); then the link is dropped and the request answered `OutcomeUnknown`.
pub const FORWARD_ANSWER_TIMEOUT_MS: u64 = FETCH_WAIT_MS_MAX as u64 + 30_000;

/// Entry data (stored batch bytes) a partition replica keeps in memory beyond its unapplied
/// entries, for followers a little behind; older entries are read back from the log.
pub const REPLICA_CACHE_BYTES: usize = 8 << 20;

/// While a forwarded request waits for its answer, how often it checks whether the node it
/// went to has been seen down (then it is answered `OutcomeUnknown` at once).
pub const FORWARD_NODE_CHECK_MS: u64 = 200;

/// Entries read back from a partition log for lagging followers, held until raft-rs reads
/// them, at most (per replica).
pub const REPLICA_FETCHED_ENTRIES_MAX: usize = 4_096;

/// Ranges a replica waits to have read back from its log at most (per replica); the oldest
/// are dropped (raft-rs asks again on its next attempt to send).
pub const REPLICA_WANTED_MAX: usize = 64;

/// A cluster client (`client::leaders`) connects to a partition's leader within this long,
/// else it asks through its bootstrap node.
pub const CLIENT_LEADER_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// A cluster client waits this long for an answer on a leader's connection (longer than a
/// forwarding node waits, so the client sees that node's `OutcomeUnknown`) before it drops
/// the connection.
pub const CLIENT_LEADER_READ_TIMEOUT_MS: u64 = FORWARD_ANSWER_TIMEOUT_MS + 10_000;

/// After a leader's address failed to connect, a cluster client goes through its bootstrap
/// node for this long before trying that address again.
pub const CLIENT_LEADER_RETRY_MS: u64 = 1_000;

/// A client asks the metadata again and retries a request whose partition has no reachable
/// leader (`NotLeader`, `NodeUnavailable`) for this long: longer than a node failure timeout
/// plus an election.
pub const CLIENT_LEADER_WAIT_MS: u64 = 15_000;

/// The replication loop's tick: Raft election and heartbeat timeouts of partition replicas
/// are counted in these.
pub const REPLICA_TICK_MS: u64 = 100;

/// A replicated produce waits this long for its batch to be committed; then the producer is
/// told the outcome is unknown (it may still be committed).
pub const REPLICA_COMMIT_WAIT_MS: u64 = 10_000;

/// Bytes read from a partition log per step when replica entries are read back.
pub const REPLICA_READ_BYTES: usize = 1 << 20;

/// Entry bytes per Raft append message at most (at least one entry is always sent).
pub const REPLICA_MSG_BYTES_MAX: u64 = 1 << 20;

/// Append messages in flight to one follower at most.
pub const REPLICA_INFLIGHT_MSGS: usize = 256;

/// Bytes proposed to one replica and not yet committed at most: beyond, produces are refused
/// (the producer retries) until followers catch up.
pub const REPLICA_UNCOMMITTED_BYTES: u64 = 64 << 20;

/// Raft messages waiting in one shard's replication inbox at most; beyond, new ones are
/// dropped (Raft retransmits).
pub const REPLICA_INBOX_MESSAGES: usize = 65_536;

/// Bytes of Raft messages for one node packed into one peer frame at most.
pub const REPLICA_FRAME_BYTES: usize = 4 << 20;

/// Partition replicas one shard holds at most.
pub const REPLICAS_PER_SHARD_MAX: usize = 4_096;

/// Default `--election-timeout-ms`: a replicated partition elects a new leader after this
/// long without hearing one.
pub const ELECTION_TIMEOUT_MS_DEFAULT: u64 = 1_000;

/// Replicas per partition at most (`topic create --replicas`): a Raft group of 1 to 5.
pub const REPLICATION_FACTOR_MAX: u32 = 5;

/// Batches per idempotent producer a replicated partition remembers: a batch sent again among
/// these is answered with where its first copy went. Kafka keeps 5 and caps a producer's
/// requests in flight at 5; ringmq clients pipeline up to this many (`produce --window`).
pub const PRODUCER_BATCHES_REMEMBERED: usize = 64;

/// Idempotent producers one replicated partition remembers at most; beyond, the one unused
/// longest is forgotten (its next batch is taken as the start of a new sequence).
pub const PRODUCERS_PER_PARTITION_MAX: usize = 1_000;

/// Raft entries read back at start to rebuild a replica's producer table (the newest ones).
pub const PRODUCER_REBUILD_ENTRIES: u64 = 100_000;

/// A replica saves its applied index as the commit this often (in entries), so a restart
/// re-reads at most about this many entries (plus what was not committed).
pub const REPLICA_COMMIT_SAVE_ENTRIES: u64 = 4_096;
