//! ringmq — a thread-per-core message broker on io_uring.
//!
//! # Data path
//!
//! client → `server` (sockets of one core) → `protocol` (verify the frame once) → `router`
//! (which shard owns the partition; the channel mesh) → `shard` (the only code that mutates a
//! partition) → `storage` (one partition's log on disk) → back along the same path.
//!
//! # Module map
//!
//! | module | owns | must not touch |
//! |---|---|---|
//! | [`limits`] | every named bound and default | anything with state |
//! | [`runtime`] | the thin layer over glommio: executors, timers, notify | broker logic |
//! | [`storage`] | segment files, indexes, recovery, retention of one partition log | shards, sockets |
//!
//! # Ownership rules
//!
//! One owner per partition: a shard. State on a shard is `!Send` (`Rc`, `RefCell`); only owned
//! envelopes (`Bytes` + a header) cross cores. No locks between cores.

pub mod limits;
pub mod runtime;
pub mod storage;
