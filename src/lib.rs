//! ringmq — a thread-per-core message broker on io_uring.
//!
//! # Data path
//!
//! client → [`server`] (sockets of one core; verifies each frame once with [`protocol`]) →
//! [`router`] (which shard owns the partition; the channel mesh) → [`shard`] (request
//! handling on the owning core) → [`partition`] (one partition's log and queue subscriptions,
//! typed methods) → [`storage`] (one partition's log on disk) → back the same way.
//!
//! # Module map
//!
//! | module | owns | must not touch |
//! |---|---|---|
//! | [`limits`] | every named bound and default | anything with state |
//! | [`protocol`] | frames ⇄ typed views, verification, encoders, partitioner (sans I/O) | sockets, files |
//! | [`metadata`] | the topic table each shard keeps a copy of | files, partitions |
//! | [`server`] | listeners, connections, frame reading, response writing, wire error codes | partitions |
//! | [`router`] | the mesh between shards, forwarding, replies, copy counters | partitions, sockets |
//! | [`shard`] | the partitions of one core, the request handlers, groups, the state log | sockets, other shards' state |
//! | [`partition`] | one partition: its log and queue subscriptions (generic over storage and clock) | frames, sockets, the state log |
//! | [`storage`] | segment files, indexes, recovery, retention of one partition log | shards, sockets |
//! | [`client`] | the blocking Rust client | server internals |
//! | [`cluster`] | cluster metadata and the controller's Raft replica (sans-I/O) | partitions, sockets |
//! | [`runtime`] | glommio (executors, timers, notify), config, boot and shutdown | request handling |
//!
//! # Ownership rules
//!
//! One owner per partition: a shard. State on a shard is `!Send` (`Rc`, `RefCell`); only owned
//! envelopes (`Bytes` + a header) cross cores. No locks between cores.

pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod filter;
pub mod limits;
pub mod metadata;
pub mod partition;
pub mod protocol;
pub mod router;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod storage;
