//! The one mapping from typed errors to wire error codes, at the edge where responses are
//! encoded. Inner modules return their own error types (`StorageError`, `PartitionError`,
//! `RouteError`, `FrameError`); only this module decides which code a client sees.
//!
//! Owns: that mapping and the error frame built from it. Must not touch: anything with state.

use bytes::Bytes;

use crate::partition::PartitionError;
use crate::protocol::{self as proto, fb, FrameError};
use crate::router::route::RouteError;
use crate::shard::queue_api::AckError;
use crate::shard::{AdminError, Unavailable};
use crate::storage::StorageError;

/// An error a client may see: its wire code (the message is its `Display`).
pub trait WireCode: std::fmt::Display {
    fn wire_code(&self) -> fb::ErrorCode;
}

impl WireCode for FrameError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::TooLarge { .. } => fb::ErrorCode::FrameTooLarge,
            Self::Malformed(_) => fb::ErrorCode::Malformed,
            Self::UnknownRequest(_) => fb::ErrorCode::UnknownRequest,
        }
    }
}

impl WireCode for RouteError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::ClusterNotReady => fb::ErrorCode::ControllerUnavailable,
            Self::UnknownTopic(_) => fb::ErrorCode::UnknownTopic,
            Self::UnknownPartition { .. } => fb::ErrorCode::UnknownPartition,
        }
    }
}

impl WireCode for StorageError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::OffsetOutOfRange { .. } => fb::ErrorCode::OffsetOutOfRange,
            Self::BatchTooLarge { .. } => fb::ErrorCode::BatchTooLarge,
            Self::InvalidBatch(_) => fb::ErrorCode::InvalidRequest,
            // Not committed before a leader change removed it: the producer retries.
            Self::Truncated { .. } => fb::ErrorCode::PartitionUnavailable,
            Self::InvalidTruncation(_) => fb::ErrorCode::Internal,
            Self::Failed(_) | Self::Io { .. } | Self::Corrupt { .. } => {
                fb::ErrorCode::StorageFailed
            }
        }
    }
}

impl WireCode for crate::cluster::replica::ReplicaError {
    fn wire_code(&self) -> fb::ErrorCode {
        use crate::cluster::replica::ReplicaError as E;
        match self {
            // Not stored: the producer asks for the leader again and retries.
            E::NotLeader { .. } | E::Superseded => fb::ErrorCode::NotLeader,
            E::Timeout => fb::ErrorCode::OutcomeUnknown,
            E::Stopped(_) => fb::ErrorCode::PartitionUnavailable,
            E::OutOfOrder { .. } => fb::ErrorCode::OutOfOrderSequence,
            E::TooOld { .. } => fb::ErrorCode::InvalidRequest,
        }
    }
}

impl WireCode for PartitionError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::Storage(e) => e.wire_code(),
            Self::Batch(e) => e.wire_code(),
            Self::TooManySubscriptions { .. }
            | Self::UnknownSubscription(_)
            | Self::InvalidTimestamp(_) => fb::ErrorCode::InvalidRequest,
        }
    }
}

impl WireCode for Unavailable {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::Route(e) => e.wire_code(),
            Self::Failed(_) | Self::Recovering(_) | Self::NotOpenYet(_) => {
                fb::ErrorCode::PartitionUnavailable
            }
        }
    }
}

impl WireCode for AckError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::Partition(e) => e.wire_code(),
            Self::StateLogClosed => fb::ErrorCode::Internal,
            Self::StateLog(_) => fb::ErrorCode::StorageFailed,
        }
    }
}

impl WireCode for AdminError {
    fn wire_code(&self) -> fb::ErrorCode {
        match self {
            Self::InvalidName(_)
            | Self::InvalidPartitions(_)
            | Self::TooManyTopics
            | Self::Replicas(..) => fb::ErrorCode::InvalidRequest,
            Self::Exists(_) => fb::ErrorCode::TopicExists,
            // The controller applies a create refused for an existing topic (a race between
            // two creates): the same answer as when this node saw it first.
            Self::Refused(m) if m.contains("already exists") => fb::ErrorCode::TopicExists,
            Self::Refused(_) => fb::ErrorCode::InvalidRequest,
            Self::Unknown(_) => fb::ErrorCode::UnknownTopic,
            Self::Storage(_) => fb::ErrorCode::StorageFailed,
            Self::ControllerUnavailable(_) => fb::ErrorCode::ControllerUnavailable,
        }
    }
}

/// The error frame answering request `corr` with `e`.
pub fn frame(corr: u64, e: &impl WireCode) -> Bytes {
    proto::encode_error(corr, e.wire_code(), &e.to_string())
}
