//! The cluster (issue 13, in steps). Today: the controller's replicated metadata state machine
//! ([`meta`]), the Raft replica that drives it ([`controller`]) and its durable storage
//! ([`raft_store`]), exercised by a seeded simulation (`tests/sim.rs`,
//! `controller_simulation`); the node-to-node frame transport ([`transport`]); the liveness
//! view from heartbeats ([`membership`]). Not yet: wiring them into a broker (the controller
//! on shard 0, `--seeds`, `ringmq cluster status`); a broker started without `--seeds` runs
//! none of this code.
//!
//! Owns: cluster metadata and consensus. Must not touch: partitions, sockets, the shard's
//! request handling (those call in through typed methods once the cluster is wired up).

pub mod controller;
pub mod forward;
pub mod membership;
pub mod meta;
pub mod node;
pub mod raft_store;
pub mod transport;
