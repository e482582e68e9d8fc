//! The cluster: a node's runtime on shard 0 ([`node`]: peers, heartbeats, the controller
//! replica, proposals, the node's topic table), the controller's replicated metadata state
//! machine ([`meta`]), the Raft replica that drives it ([`controller`]) and its durable
//! storage ([`raft_store`]), exercised by a seeded simulation (`tests/sim.rs`,
//! `controller_simulation`); the node-to-node frame transport ([`transport`]); the liveness
//! view from heartbeats ([`membership`]); and the per-connection links that carry a client's
//! requests to the node that owns them ([`forward`]). A broker started without `--seeds` runs
//! none of this code.
//!
//! Owns: cluster metadata, consensus and node-to-node traffic. Must not touch: partitions (the
//! node changes them only through the shard's typed methods, e.g. `Shard::publish_table`),
//! the shard's request handling.

pub mod controller;
pub mod forward;
pub mod membership;
pub mod meta;
pub mod node;
pub mod producers;
pub mod raft_store;
pub mod replica;
pub mod replica_log;
pub mod replica_recovery;
pub mod replica_state;
pub mod replication;
pub mod transport;
pub mod wire;
