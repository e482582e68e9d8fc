//! One segment: a file of stored batches named by its base offset, its sparse offset and time
//! indexes, and the scanner that walks a segment's bytes (recovery, index rebuild, time lookup).
//!
//! Owns: the in-memory state of one segment and the index file format. Must not touch: other
//! segments, group commit, the tail cache (those are the log's).
//!
//! Index file format (both `.index` and `.timeindex`): a 40-byte header — magic `RQI1`, CRC32 of
//! the rest, entry count (u64), the segment's data end (u64), next offset (u64), max timestamp
//! (i64) — then `count` pairs of u64 (offset index: offset, file position; time index: max
//! timestamp of all earlier batches in the segment, offset). Padded with zeros to a block.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;

use super::batch::{self, BatchHeader, DecodeError, HEADER_BYTES};
use super::io::{Storage, StorageFile};
use super::StorageError;
use crate::limits::{LOG_BLOCK_BYTES, SCAN_CHUNK_BYTES};

const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"RQI1");
const INDEX_HEADER_BYTES: usize = 40;

pub fn align_up(v: u64) -> u64 {
    v.div_ceil(LOG_BLOCK_BYTES) * LOG_BLOCK_BYTES
}

pub fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

pub fn index_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.index")
}

pub fn time_index_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.timeindex")
}

/// Parses `00000000000000000042.log` into 42.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One segment's state.
pub struct Segment<F> {
    pub base_offset: u64,
    pub file: Rc<F>,
    pub path: PathBuf,
    /// End of the last batch (unpadded).
    pub data_end: u64,
    /// Where the next write starts: always a block boundary.
    pub write_pos: u64,
    /// Offset after the last batch written here.
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
    /// (offset, file position), ascending.
    pub offset_index: Vec<(u64, u64)>,
    /// (max timestamp of all earlier batches in this segment, offset), ascending by offset.
    pub time_index: Vec<(i64, u64)>,
    bytes_since_index: u64,
    pub sealed: bool,
}

impl<F: StorageFile> Segment<F> {
    pub fn new(base_offset: u64, file: Rc<F>, path: PathBuf) -> Self {
        Self {
            base_offset,
            file,
            path,
            data_end: 0,
            write_pos: 0,
            next_offset: base_offset,
            max_timestamp_ms: i64::MIN,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            sealed: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.next_offset == self.base_offset
    }

    /// Records a batch written at `pos`, adding sparse index entries every `interval_bytes`.
    pub fn record_batch(&mut self, h: &BatchHeader, pos: u64, interval_bytes: u64) {
        debug_assert_eq!(
            h.base_offset, self.next_offset,
            "offsets move forward by one"
        );
        if self.offset_index.is_empty() || self.bytes_since_index >= interval_bytes {
            self.offset_index.push((h.base_offset, pos));
            self.time_index.push((self.max_timestamp_ms, h.base_offset));
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += h.stored_len() as u64;
        self.data_end = pos + h.stored_len() as u64;
        self.next_offset = h.next_offset();
        self.max_timestamp_ms = self.max_timestamp_ms.max(h.max_timestamp_ms);
    }

    /// File position to start scanning from for `offset`.
    pub fn position_for(&self, offset: u64) -> u64 {
        let i = self.offset_index.partition_point(|&(o, _)| o <= offset);
        if i == 0 {
            0
        } else {
            self.offset_index[i - 1].1
        }
    }

    /// Offset to start scanning from for the first batch with max timestamp ≥ `ts`.
    pub fn offset_for_time_scan(&self, ts: i64) -> u64 {
        let i = self.time_index.partition_point(|&(t, _)| t < ts);
        if i == 0 {
            self.base_offset
        } else {
            self.time_index[i - 1].1
        }
    }
}

/// How a scan of a segment ended.
#[derive(Debug, Clone)]
pub struct ScanOutcome {
    /// End of the last valid batch.
    pub valid_end: u64,
    pub next_offset: u64,
    pub file_size: u64,
    /// Where and why the scan stopped before the end of the data, if it did.
    pub stopped: Option<(u64, String)>,
}

/// Walks the batches of a segment file from `start_pos`, expecting `expected_offset` first.
/// Calls `on_batch(header, pos, stored_bytes)`; it returns false to stop early. Skips zero
/// padding up to block boundaries; an all-zero block start is the end of data.
pub async fn scan<F: StorageFile>(
    file: &F,
    start_pos: u64,
    expected_offset: u64,
    verify_crc: bool,
    mut on_batch: impl FnMut(&BatchHeader, u64, &[u8]) -> bool,
) -> Result<ScanOutcome, std::io::Error> {
    let file_size = file.size().await?;
    let mut buf = Bytes::new();
    let mut buf_start = 0u64;
    let mut pos = start_pos;
    let mut expected = expected_offset;
    let mut out = ScanOutcome {
        valid_end: start_pos,
        next_offset: expected_offset,
        file_size,
        stopped: None,
    };
    while pos < file_size {
        let want = (HEADER_BYTES as u64).min(file_size - pos) as usize;
        ensure(file, &mut buf, &mut buf_start, pos, want, file_size).await?;
        let at = &buf[(pos - buf_start) as usize..];
        if at.len() >= 4 && at[..4] == [0, 0, 0, 0] {
            if pos.is_multiple_of(LOG_BLOCK_BYTES) {
                break; // an unwritten block: end of data
            }
            let next = align_up(pos).min(file_size);
            let pad = (next - pos) as usize;
            ensure(file, &mut buf, &mut buf_start, pos, pad, file_size).await?;
            let at = &buf[(pos - buf_start) as usize..];
            if at[..pad].iter().any(|&b| b != 0) {
                out.stopped = Some((pos, "non-zero bytes in block padding".into()));
                return Ok(out);
            }
            pos = next;
            continue;
        }
        let header = match batch::decode_header(at) {
            Ok(h) => h,
            Err(DecodeError::Incomplete { .. }) => {
                out.stopped = Some((pos, "torn batch header at end of file".into()));
                return Ok(out);
            }
            Err(e) => {
                out.stopped = Some((pos, e.to_string()));
                return Ok(out);
            }
        };
        if header.base_offset != expected {
            out.stopped = Some((
                pos,
                format!(
                    "batch base offset {} where {expected} was expected",
                    header.base_offset
                ),
            ));
            return Ok(out);
        }
        let len = header.stored_len();
        if pos + len as u64 > file_size {
            out.stopped = Some((pos, format!("torn batch: {len} bytes past end of file")));
            return Ok(out);
        }
        ensure(file, &mut buf, &mut buf_start, pos, len, file_size).await?;
        let stored = &buf[(pos - buf_start) as usize..(pos - buf_start) as usize + len];
        if verify_crc {
            if let Err(e) = batch::decode_verified(stored) {
                out.stopped = Some((pos, e.to_string()));
                return Ok(out);
            }
        }
        pos += len as u64;
        expected = header.next_offset();
        out.valid_end = pos;
        out.next_offset = expected;
        if !on_batch(&header, pos - len as u64, stored) {
            break;
        }
    }
    Ok(out)
}

/// Makes `buf` (which starts at file position `buf_start`) cover `[pos, pos + len)`.
async fn ensure<F: StorageFile>(
    file: &F,
    buf: &mut Bytes,
    buf_start: &mut u64,
    pos: u64,
    len: usize,
    file_size: u64,
) -> Result<(), std::io::Error> {
    let have_end = *buf_start + buf.len() as u64;
    if pos >= *buf_start && pos + len as u64 <= have_end {
        return Ok(());
    }
    let read_len = len.max(SCAN_CHUNK_BYTES).min((file_size - pos) as usize);
    *buf = file.read_at(pos, read_len).await?;
    *buf_start = pos;
    if buf.len() < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("short read: {} of {len} bytes at {pos}", buf.len()),
        ));
    }
    Ok(())
}

/// Serializes an index (pairs of u64) with its header, padded to a block.
fn encode_index(pairs: &[(u64, u64)], seg: &SegmentSummary) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_BYTES + pairs.len() * 16);
    out.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    out.extend_from_slice(&seg.data_end.to_le_bytes());
    out.extend_from_slice(&seg.next_offset.to_le_bytes());
    out.extend_from_slice(&seg.max_timestamp_ms.to_le_bytes());
    for (a, b) in pairs {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out.resize(align_up(out.len() as u64) as usize, 0);
    out
}

/// The facts an index file vouches for; a mismatch with the segment file means stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    pub data_end: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
}

fn decode_index(bytes: &[u8]) -> Option<(SegmentSummary, Vec<(u64, u64)>)> {
    let u64_at = |at: usize| -> Option<u64> {
        let s = bytes.get(at..at + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Some(u64::from_le_bytes(a))
    };
    if bytes.len() < INDEX_HEADER_BYTES || bytes[..4] != INDEX_MAGIC.to_le_bytes() {
        return None;
    }
    let count = usize::try_from(u64_at(8)?).ok()?;
    let end = INDEX_HEADER_BYTES.checked_add(count.checked_mul(16)?)?;
    if bytes.len() < end {
        return None;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[4..8]);
    if crc32fast::hash(&bytes[8..end]) != u32::from_le_bytes(crc) {
        return None;
    }
    let summary = SegmentSummary {
        data_end: u64_at(16)?,
        next_offset: u64_at(24)?,
        max_timestamp_ms: u64_at(32)? as i64,
    };
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let at = INDEX_HEADER_BYTES + i * 16;
        pairs.push((u64_at(at)?, u64_at(at + 8)?));
    }
    Some((summary, pairs))
}

impl<F: StorageFile> Segment<F> {
    pub fn summary(&self) -> SegmentSummary {
        SegmentSummary {
            data_end: self.data_end,
            next_offset: self.next_offset,
            max_timestamp_ms: self.max_timestamp_ms,
        }
    }

    /// Writes and syncs this segment's two index files.
    pub async fn write_indexes<S: Storage<File = F>>(
        &self,
        storage: &S,
        dir: &Path,
    ) -> Result<(), StorageError> {
        let summary = self.summary();
        let time_pairs: Vec<(u64, u64)> = self
            .time_index
            .iter()
            .map(|&(t, o)| (t as u64, o))
            .collect();
        for (name, pairs) in [
            (index_file_name(self.base_offset), &self.offset_index),
            (time_index_file_name(self.base_offset), &time_pairs),
        ] {
            let path = dir.join(name);
            let bytes = encode_index(pairs, &summary);
            let f = storage
                .open_file(&path, true)
                .await
                .map_err(|e| StorageError::io(&path, "create index", e))?;
            f.write_at(0, &bytes)
                .await
                .map_err(|e| StorageError::io(&path, "write index", e))?;
            f.sync_data()
                .await
                .map_err(|e| StorageError::io(&path, "sync index", e))?;
        }
        Ok(())
    }

    /// Loads both index files if present and consistent with `file_size`; false if missing or
    /// stale (the caller rebuilds by scanning).
    pub async fn load_indexes<S: Storage<File = F>>(
        &mut self,
        storage: &S,
        dir: &Path,
        file_size: u64,
    ) -> bool {
        let mut loaded = Vec::new();
        for name in [
            index_file_name(self.base_offset),
            time_index_file_name(self.base_offset),
        ] {
            let path = dir.join(name);
            let Ok(f) = storage.open_file(&path, false).await else {
                return false;
            };
            let Ok(size) = f.size().await else {
                return false;
            };
            let Ok(bytes) = f.read_at(0, size as usize).await else {
                return false;
            };
            match decode_index(&bytes) {
                Some(x) => loaded.push(x),
                None => return false,
            }
        }
        let (s1, offsets) = loaded.swap_remove(0);
        let (s2, times) = loaded.swap_remove(0);
        if s1 != s2 || align_up(s1.data_end) != file_size || s1.next_offset < self.base_offset {
            return false;
        }
        self.data_end = s1.data_end;
        self.write_pos = align_up(s1.data_end);
        self.next_offset = s1.next_offset;
        self.max_timestamp_ms = s1.max_timestamp_ms;
        self.offset_index = offsets;
        self.time_index = times.into_iter().map(|(t, o)| (t as i64, o)).collect();
        true
    }
}
