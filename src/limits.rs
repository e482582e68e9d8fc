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
