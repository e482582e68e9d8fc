//! Read-only scan of a log directory with std I/O: every valid batch in offset order, without
//! recovery or truncation (boot-time replay of state logs, which may belong to another shard).
//!
//! Owns: nothing persistent. Must not touch: writes. Stops at the first invalid batch of the
//! last segment (a torn tail that the owning log's own recovery will cut).

use std::path::Path;

use bytes::Bytes;

use super::batch::{self, HEADER_BYTES};
use super::segment::{align_up, parse_segment_file_name};
use crate::limits::LOG_BLOCK_BYTES;

/// The stored batches (header + payload) of every segment in `dir`, in order.
pub fn read_batches(dir: &Path) -> Result<Vec<Bytes>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut bases: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(parse_segment_file_name))
        .collect();
    bases.sort_unstable();
    let mut out = Vec::new();
    for base in bases {
        let path = dir.join(super::segment::segment_file_name(base));
        let data = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let data = Bytes::from(data);
        let mut pos = 0usize;
        while pos + 4 <= data.len() {
            if data[pos..pos + 4] == [0, 0, 0, 0] {
                if (pos as u64).is_multiple_of(LOG_BLOCK_BYTES) {
                    break;
                }
                pos = align_up(pos as u64) as usize;
                continue;
            }
            match batch::decode_verified(&data[pos..]) {
                Ok(h) => {
                    out.push(data.slice(pos..pos + h.stored_len()));
                    pos += h.stored_len();
                }
                Err(_) => break,
            }
        }
    }
    Ok(out)
}

/// The payload of a stored batch.
pub fn payload(stored: &Bytes) -> Bytes {
    stored.slice(HEADER_BYTES.min(stored.len())..)
}
