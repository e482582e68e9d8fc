//! Topic metadata: topics, their partitions and each partition's shard (placement).
//!
//! Owns: the in-memory table every shard keeps a copy of, and name validation. Must not touch:
//! files (persistence is `storage::meta_file`) or partitions. Changes are made by the
//! controller shard (shard 0) and broadcast to the others as [`MetaChange`]s.

use std::collections::BTreeMap;

use crate::limits;

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMeta {
    pub name: String,
    /// `shards[p]` is the shard that owns partition `p` (as placed at creation).
    pub shards: Vec<u32>,
    /// -1 = unlimited.
    pub retention_bytes: i64,
    /// -1 = unlimited.
    pub retention_ms: i64,
}

impl TopicMeta {
    pub fn partitions(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The shard owning `partition` on a broker with `shard_count` shards. A placement made
    /// with more shards than run now wraps around (the log directory is shard-independent).
    pub fn shard_of(&self, partition: u32, shard_count: usize) -> Option<usize> {
        self.shards
            .get(partition as usize)
            .map(|&s| s as usize % shard_count.max(1))
    }
}

/// A change broadcast from the controller.
#[derive(Debug, Clone)]
pub enum MetaChange {
    Upsert(TopicMeta),
    Remove(String),
}

/// The topic table (the placement of every partition).
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub topics: BTreeMap<String, TopicMeta>,
    /// Bumped by the controller for each change; a shard's copy ignores an update that is not
    /// newer than what it has (a late or repeated broadcast). Starts at 0 at boot on every
    /// shard (all load the same file).
    pub version: u64,
}

impl Metadata {
    /// Applies a versioned change from the controller; `false` (and nothing changes) when it
    /// is not newer than this copy.
    pub fn apply_versioned(&mut self, version: u64, change: &MetaChange) -> bool {
        if version <= self.version {
            return false;
        }
        self.version = version;
        self.apply(change);
        true
    }

    pub fn apply(&mut self, change: &MetaChange) {
        match change {
            MetaChange::Upsert(t) => {
                self.topics.insert(t.name.clone(), t.clone());
            }
            MetaChange::Remove(name) => {
                self.topics.remove(name);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&TopicMeta> {
        self.topics.get(name)
    }
}

/// Checks a topic name: 1..=249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > limits::TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name must be 1 to {} characters",
            limits::TOPIC_NAME_BYTES_MAX
        ));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be '.' or '..'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} has {c:?}; allowed are letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a subscription pattern: dot-separated tokens, `*` = exactly one token, `>` = one or
/// more trailing tokens (only as the last token).
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("pattern {pattern:?} has an empty token"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!(
                "pattern {pattern:?}: '>' may only be the last token"
            ));
        }
        if *t != "*" && *t != ">" {
            validate_topic_name(t).map_err(|e| format!("pattern {pattern:?}: {e}"))?;
        }
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (see [`validate_pattern`]).
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Places `partitions` partitions round-robin over `shard_count` shards, starting at a shard
/// chosen from the name so that many single-partition topics spread out.
pub fn place(name: &str, partitions: u32, shard_count: usize) -> Vec<u32> {
    let start = (crc32fast::hash(name.as_bytes()) as usize) % shard_count.max(1);
    (0..partitions as usize)
        .map(|p| ((start + p) % shard_count.max(1)) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_topic_name("orders.eu-1_x").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("a/b").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("orders.*.eu", "orders.x.eu"));
        assert!(!pattern_matches("orders.*.eu", "orders.x.y.eu"));
        assert!(!pattern_matches("orders.*.eu", "orders.eu"));
        assert!(pattern_matches("telemetry.>", "telemetry.a"));
        assert!(pattern_matches("telemetry.>", "telemetry.a.b.c"));
        assert!(!pattern_matches("telemetry.>", "telemetry"));
        assert!(!pattern_matches("telemetry.>", "telemetryx.a"));
        assert!(pattern_matches("a.b", "a.b"));
        assert!(!pattern_matches("a.b", "a.b.c"));
        assert!(validate_pattern("a.>.b").is_err());
        assert!(validate_pattern("a..b").is_err());
        assert!(validate_pattern("orders.*.eu").is_ok());
    }

    #[test]
    fn placement_spreads_and_wraps() {
        let p = place("t", 4, 2);
        assert_eq!(p.iter().filter(|&&s| s == 0).count(), 2);
        let t = TopicMeta {
            name: "t".into(),
            shards: vec![3],
            retention_bytes: -1,
            retention_ms: -1,
        };
        assert_eq!(t.shard_of(0, 2), Some(1));
        assert_eq!(t.shard_of(1, 2), None);
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    fn topic(name: &str, partitions: usize) -> MetaChange {
        MetaChange::Upsert(TopicMeta {
            name: name.into(),
            shards: vec![0; partitions],
            retention_bytes: -1,
            retention_ms: -1,
        })
    }

    #[test]
    fn stale_updates_are_ignored() {
        let mut m = Metadata::default();
        assert!(m.apply_versioned(1, &topic("a", 1)));
        assert!(m.apply_versioned(2, &topic("a", 3)));
        assert!(!m.apply_versioned(1, &topic("a", 1)), "older");
        assert!(
            !m.apply_versioned(2, &MetaChange::Remove("a".into())),
            "repeated"
        );
        assert_eq!(m.get("a").map(|t| t.partitions()), Some(3));
        assert_eq!(m.version, 2);
    }
}
