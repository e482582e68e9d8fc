//! The on-disk batch header: the fixed 48 bytes in front of every stored record batch.
//!
//! Owns: encoding, decoding and CRC checking of one stored batch. Must not touch: files.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `RQB1` (never zero: zero means padding) |
//! | 4..8 | CRC32 (crc32fast) over bytes 8..48 and the payload |
//! | 8 | header version (1) |
//! | 9 | format tag of the payload ([`FormatTag`]) |
//! | 10..12 | flags (0) |
//! | 12..16 | payload length in bytes |
//! | 16..24 | base offset (assigned by the log) |
//! | 24..28 | record count (≥ 1) |
//! | 28..32 | leader term that appended the batch (0 on a single node; replication sets it) |
//! | 32..40 | first timestamp, ms since the Unix epoch |
//! | 40..48 | max timestamp, ms since the Unix epoch |
//!
//! The payload follows verbatim: the producer's batch as it came off the wire.

use crate::limits;

pub const HEADER_BYTES: usize = 48;
pub const MAGIC: u32 = u32::from_le_bytes(*b"RQB1");
pub const HEADER_VERSION: u8 = 1;

/// What the payload bytes are. Storage never looks inside; the protocol edge converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FormatTag {
    /// A ringmq flatbuffers `RecordBatch`.
    RingmqFlatbuffers = 1,
    /// Kafka RecordBatch v2 bytes (reserved for a later Kafka listener).
    KafkaRecordBatchV2 = 2,
    /// A replication control record (a Raft entry with no batch: a new leader's first entry,
    /// a membership change). It holds one offset and no payload; readers skip it, as Kafka
    /// consumers skip control batches.
    Control = 3,
    /// Opaque bytes (tests, benches).
    Opaque = 255,
}

impl FormatTag {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::RingmqFlatbuffers),
            2 => Some(Self::KafkaRecordBatchV2),
            3 => Some(Self::Control),
            255 => Some(Self::Opaque),
            _ => None,
        }
    }
}

/// The decoded header of one stored batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub crc: u32,
    pub format: FormatTag,
    pub payload_len: u32,
    pub base_offset: u64,
    pub record_count: u32,
    /// The Raft term of the leader that assigned this batch its offsets (0: no replication).
    pub leader_term: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
}

impl BatchHeader {
    /// Offset after the last record of this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    /// Header plus payload.
    pub fn stored_len(&self) -> usize {
        HEADER_BYTES + self.payload_len as usize
    }
}

/// Metadata of a batch to append; the log fills in the base offset.
#[derive(Clone, Copy, Debug)]
pub struct BatchMeta {
    pub format: FormatTag,
    pub record_count: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
}

/// Why bytes are not a valid stored batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header, or than the header says the batch has.
    Incomplete {
        needed: usize,
    },
    BadMagic(u32),
    BadVersion(u8),
    BadFormat(u8),
    BadLength(u32),
    BadCount,
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Incomplete { needed } => write!(f, "incomplete batch (needs {needed} bytes)"),
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            Self::BadVersion(v) => write!(f, "unknown header version {v}"),
            Self::BadFormat(t) => write!(f, "unknown format tag {t}"),
            Self::BadLength(l) => write!(f, "payload length {l} over the limit"),
            Self::BadCount => write!(f, "record count 0"),
            Self::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
        }
    }
}

/// Encodes header + payload into one buffer (the stored form), with leader term 0.
pub fn encode(meta: &BatchMeta, base_offset: u64, payload: &[u8]) -> Vec<u8> {
    encode_with_term(meta, base_offset, 0, payload)
}

/// Encodes header + payload, stamped with the term of the leader that assigned the offsets.
pub fn encode_with_term(
    meta: &BatchMeta,
    base_offset: u64,
    leader_term: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // CRC, filled below
    out.push(HEADER_VERSION);
    out.push(meta.format as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&base_offset.to_le_bytes());
    out.extend_from_slice(&meta.record_count.to_le_bytes());
    out.extend_from_slice(&leader_term.to_le_bytes());
    out.extend_from_slice(&meta.first_timestamp_ms.to_le_bytes());
    out.extend_from_slice(&meta.max_timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a header without checking the CRC (the payload may not be in `buf`).
pub fn decode_header(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Err(DecodeError::Incomplete {
            needed: HEADER_BYTES,
        });
    }
    let magic = u32_at(buf, 0);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf[8] != HEADER_VERSION {
        return Err(DecodeError::BadVersion(buf[8]));
    }
    let format = FormatTag::from_u8(buf[9]).ok_or(DecodeError::BadFormat(buf[9]))?;
    let payload_len = u32_at(buf, 12);
    if payload_len as usize > limits::BATCH_BYTES_MAX {
        return Err(DecodeError::BadLength(payload_len));
    }
    let record_count = u32_at(buf, 24);
    if record_count == 0 {
        return Err(DecodeError::BadCount);
    }
    Ok(BatchHeader {
        crc: u32_at(buf, 4),
        format,
        payload_len,
        base_offset: u64_at(buf, 16),
        record_count,
        leader_term: u32_at(buf, 28),
        first_timestamp_ms: u64_at(buf, 32) as i64,
        max_timestamp_ms: u64_at(buf, 40) as i64,
    })
}

/// Decodes a header and checks the CRC of the whole stored batch at the start of `buf`.
pub fn decode_verified(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    let h = decode_header(buf)?;
    let len = h.stored_len();
    if buf.len() < len {
        return Err(DecodeError::Incomplete { needed: len });
    }
    let computed = crc32fast::hash(&buf[8..len]);
    if computed != h.crc {
        return Err(DecodeError::CrcMismatch {
            stored: h.crc,
            computed,
        });
    }
    Ok(h)
}

/// The payload of a verified stored batch.
pub fn payload(stored: &[u8]) -> &[u8] {
    &stored[HEADER_BYTES.min(stored.len())..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> BatchMeta {
        BatchMeta {
            format: FormatTag::Opaque,
            record_count: 3,
            first_timestamp_ms: 10,
            max_timestamp_ms: 20,
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(&meta(), 42, b"hello");
        let h = decode_verified(&b).expect("valid");
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.next_offset(), 45);
        assert_eq!(h.max_timestamp_ms, 20);
        assert_eq!(payload(&b), b"hello");
        assert_eq!(h.leader_term, 0, "a single node stamps no term");
    }

    #[test]
    fn the_leader_term_is_stored_and_covered_by_the_crc() {
        let mut b = encode_with_term(&meta(), 42, 7, b"hello");
        assert_eq!(decode_verified(&b).expect("valid").leader_term, 7);
        b[28] ^= 1;
        assert!(matches!(
            decode_verified(&b),
            Err(DecodeError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let b = encode(&meta(), 7, b"payload bytes");
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode_verified(&c).is_err(), "flip of bit {i} not detected");
        }
    }

    #[test]
    fn truncated_is_incomplete() {
        let b = encode(&meta(), 7, b"payload bytes");
        assert!(matches!(
            decode_verified(&b[..b.len() - 1]),
            Err(DecodeError::Incomplete { .. })
        ));
    }
}
