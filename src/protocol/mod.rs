//! The wire protocol: bytes ⇄ typed views, sans I/O (no sockets, no files).
//!
//! Owns: frame length handling, flatbuffers verification of frames and nested record batches,
//! encoders for every request and response, the key partitioner. Must not touch: sockets,
//! shards, storage. Generated code from `schema/ringmq.fbs` lives in `ringmq_generated.rs`
//! (regenerate with `flatc --rust -o src/protocol/ schema/ringmq.fbs`; see `tests/schema.rs`).

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    non_camel_case_types,
    mismatched_lifetime_syntaxes,
    unsafe_op_in_unsafe_fn
)]
#[rustfmt::skip]
mod ringmq_generated;

pub mod codec;
pub mod groups;
pub mod multicast;
pub mod partitioner;
pub mod queue;

pub use codec::*;
/// The generated flatbuffers types (`fb::Frame`, `fb::Produce`, ...).
pub use ringmq_generated::ringmq::wire as fb;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
