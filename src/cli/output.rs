//! How the command line prints: records as text or JSON, and error codes.
//!
//! Owns: output formatting. Must not touch: the network (callers pass what they read).

use std::io::Write;

use super::args::ConsumeArgs;
use crate::client::ClientError;
use crate::protocol::{self as proto, fb};

pub fn print_record(
    out: &mut impl Write,
    a: &ConsumeArgs,
    topic: &str,
    partition: u32,
    r: &proto::RecordOut,
) -> std::io::Result<()> {
    let fields = JsonRecord {
        topic,
        partition,
        offset: r.offset,
        key: r.key.as_deref(),
        value: &r.value,
        timestamp_ms: r.timestamp_ms,
        headers: &r.headers,
    };
    fields.print(out, a, None)
}

/// One consumed message as a JSON object (the `--format json` line).
pub struct JsonRecord<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub timestamp_ms: i64,
    pub headers: &'a [(String, Vec<u8>)],
}

impl JsonRecord<'_> {
    /// One line: the value as text, or the JSON object with `--format json`.
    pub fn print(
        &self,
        out: &mut impl Write,
        a: &ConsumeArgs,
        delivery_count: Option<u32>,
    ) -> std::io::Result<()> {
        if a.format != "json" {
            out.write_all(self.value)?;
            return out.write_all(b"\n");
        }
        writeln!(out, "{}", self.to_json(delivery_count))
    }

    /// The object; `delivery_count` is added for queue messages.
    pub fn to_json(&self, delivery_count: Option<u32>) -> String {
        let text = |b: &[u8]| json_string(&String::from_utf8_lossy(b));
        let key = self.key.map(text).unwrap_or_else(|| "null".to_string());
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), text(v)))
            .collect();
        let count = delivery_count
            .map(|c| format!(",\"delivery_count\":{c}"))
            .unwrap_or_default();
        format!(
            "{{\"topic\":{},\"partition\":{},\"offset\":{},\"key\":{key},\"value\":{},\"timestamp\":{}{count},\"headers\":{{{}}}}}",
            json_string(self.topic),
            self.partition,
            self.offset,
            text(self.value),
            self.timestamp_ms,
            headers.join(",")
        )
    }
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Maps a client error for callers that want the wire code.
pub fn error_code(e: &ClientError) -> Option<fb::ErrorCode> {
    e.code()
}
