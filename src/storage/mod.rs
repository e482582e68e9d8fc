//! One partition's log on disk: segments, sparse indexes, group commit, recovery, retention.
//!
//! Owns: the files of one log directory. Must not touch: shards, sockets, the wire format of
//! records (a batch payload is opaque bytes here, behind the header of [`batch`]).
//!
//! Invariants: offsets only move forward; a block holding acknowledged bytes is never
//! rewritten (every flush starts on a fresh [`LOG_BLOCK_BYTES`](crate::limits::LOG_BLOCK_BYTES)
//! block); after any write or fsync error the log acknowledges nothing more.

pub mod batch;
pub mod io;
mod log;
pub mod mem;
pub mod meta_file;
pub mod readonly;
pub mod segment;

pub use batch::{BatchHeader, BatchMeta, FormatTag};
pub use io::{DmaStorage, Storage, StorageFile};
pub use log::{
    AppendInfo, CommitPolicy, Durability, Log, LogConfig, LogStats, ReadBatches, RecoveryReport,
    Truncation,
};
pub use mem::MemStorage;

use std::path::{Path, PathBuf};

/// Errors of the storage layer.
#[derive(Debug)]
pub enum StorageError {
    /// An I/O call failed.
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// The log refused the call because an earlier write or fsync failed.
    Failed(String),
    /// A sealed segment (or a read) found bytes that fail their checks.
    Corrupt {
        path: PathBuf,
        pos: u64,
        reason: String,
    },
    /// The offset is outside `[start, end]`.
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    /// An append larger than the limit.
    BatchTooLarge { bytes: usize, max: usize },
    /// An append whose metadata is invalid (e.g. zero records).
    InvalidBatch(String),
    /// The batch was removed by [`Log::truncate_suffix`] before it was committed.
    Truncated { offset: u64 },
    /// A truncation that may not happen (below the commit index, not at a batch boundary).
    InvalidTruncation(String),
}

impl StorageError {
    pub fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, op, source } => write!(f, "{op} {}: {source}", path.display()),
            Self::Failed(why) => write!(f, "log is failed after an I/O error: {why}"),
            Self::Corrupt { path, pos, reason } => {
                write!(
                    f,
                    "corrupt data in {} at byte {pos}: {reason}",
                    path.display()
                )
            }
            Self::OffsetOutOfRange { offset, start, end } => {
                write!(f, "offset {offset} out of range [{start}, {end}]")
            }
            Self::BatchTooLarge { bytes, max } => {
                write!(f, "batch of {bytes} bytes over the limit of {max}")
            }
            Self::InvalidBatch(why) => write!(f, "invalid batch: {why}"),
            Self::Truncated { offset } => {
                write!(
                    f,
                    "the log was truncated at offset {offset} before this batch committed"
                )
            }
            Self::InvalidTruncation(why) => write!(f, "invalid truncation: {why}"),
        }
    }
}

impl std::error::Error for StorageError {}
