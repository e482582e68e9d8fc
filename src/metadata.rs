//! Topic metadata: topics, their partitions and each partition's shard (placement); in a
//! cluster also each partition's replica nodes and the nodes themselves ([`ClusterView`]).
//!
//! Owns: the in-memory table every shard keeps a copy of, and name validation. Must not touch:
//! files (persistence is `storage::meta_file`) or partitions. Changes are made by shard 0
//! (alone on a single node; from the cluster controller's metadata in a cluster) and
//! broadcast to the others as [`MetaChange`]s.

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
    /// Cluster: `replicas[p]` are the nodes holding partition `p`, the leader first. Empty on
    /// a single node (every partition is here).
    pub replicas: Vec<Vec<u32>>,
    /// Cluster: the controller metadata version that created this topic (0: unknown, or a
    /// single node). A different incarnation under the same name is a new topic.
    pub incarnation: u64,
}

impl TopicMeta {
    /// The node leading `partition` (its first replica; replication is not built yet, so
    /// the only replica), or `None` on a single node.
    pub fn leader_node(&self, partition: u32) -> Option<u32> {
        self.replicas
            .get(partition as usize)
            .and_then(|r| r.first().copied())
    }

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
    /// Cluster: the whole table, derived from the controller's metadata and this node's view
    /// of liveness.
    Replace(Box<Metadata>),
}

/// Where a consumer group is coordinated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupHome {
    /// A single node: here.
    ThisNode,
    /// Cluster: this node (if it is this node's id) or another.
    Node(u32),
    /// Cluster: not known yet.
    Unknown,
}

/// A cluster node as this node's table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The address clients (and forwarding nodes) use.
    pub client_addr: String,
    pub peer_addr: String,
    /// Heard from within the failure timeout (always true for this node).
    pub alive: bool,
    pub voter: bool,
}

/// What a cluster node knows of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's id.
    pub me: u32,
    /// The controller leader as this node last heard.
    pub controller: Option<u32>,
    /// The controller metadata version this table was derived from.
    pub meta_version: u64,
    pub nodes: BTreeMap<u32, NodeView>,
    /// Topics the controller deleted (recently): their data may be deleted here.
    pub deleted: std::collections::BTreeSet<String>,
    /// The controller's voters (fixed when the cluster formed; registered or not), sorted.
    pub voters: Vec<u32>,
}

/// The topic table (the placement of every partition).
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub topics: BTreeMap<String, TopicMeta>,
    /// Bumped by the controller for each change; a shard's copy ignores an update that is not
    /// newer than what it has (a late or repeated broadcast). Starts at 0 at boot on every
    /// shard (all load the same file).
    pub version: u64,
    /// `Some` on a cluster node.
    pub cluster: Option<ClusterView>,
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
            MetaChange::Replace(m) => {
                let version = self.version;
                *self = (**m).clone();
                self.version = version;
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&TopicMeta> {
        self.topics.get(name)
    }

    /// This node's id in the cluster; `None` on a single node.
    pub fn node_id(&self) -> Option<u32> {
        self.cluster.as_ref().map(|c| c.me)
    }

    /// Whether partition `p` of `t` lives on this node.
    pub fn is_here(&self, t: &TopicMeta, partition: u32) -> bool {
        match (self.node_id(), t.replicas.get(partition as usize)) {
            (Some(me), Some(r)) => r.contains(&me),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// Cluster: the node coordinating `group`: crc32 of the name over the controller's
    /// voters in id order (a set fixed when the cluster formed, so nodes joining later do not
    /// move groups and their committed offsets). `Unknown` while this node does not know the
    /// voters yet (it must not coordinate on its own meanwhile).
    pub fn group_node(&self, group: &str) -> GroupHome {
        let Some(c) = self.cluster.as_ref() else {
            return GroupHome::ThisNode;
        };
        // The voter list itself, not the voters that have registered so far: every node
        // hashes over the same set from the moment it knows the voters.
        let ids = &c.voters;
        if ids.is_empty() {
            return GroupHome::Unknown;
        }
        GroupHome::Node(ids[(crc32fast::hash(group.as_bytes()) as usize) % ids.len()])
    }

    /// Cluster: a node's client address and whether it is alive.
    pub fn node(&self, id: u32) -> Option<&NodeView> {
        self.cluster.as_ref().and_then(|c| c.nodes.get(&id))
    }
}

/// Cluster: places the partitions of a topic that live on node `me` over `shard_count`
/// shards, round-robin in partition order from a shard chosen by the name, so this node's
/// share spreads evenly over its shards. Partitions elsewhere get shard 0 (unused here).
pub fn place_on_node(name: &str, replicas: &[Vec<u32>], me: u32, shard_count: usize) -> Vec<u32> {
    let start = (crc32fast::hash(name.as_bytes()) as usize) % shard_count.max(1);
    let mut rank = 0usize;
    replicas
        .iter()
        .map(|r| {
            if r.contains(&me) {
                let s = (start + rank) % shard_count.max(1);
                rank += 1;
                s as u32
            } else {
                0
            }
        })
        .collect()
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
            replicas: vec![],
            incarnation: 0,
        };
        assert_eq!(t.shard_of(0, 2), Some(1));
        assert_eq!(t.shard_of(1, 2), None);
    }

    #[test]
    fn a_nodes_share_spreads_over_its_shards() {
        // Node 1 holds every other partition; its four spread two per shard.
        let replicas: Vec<Vec<u32>> = (0..8).map(|p| vec![1 + (p % 2)]).collect();
        let s = place_on_node("t", &replicas, 1, 2);
        let mine: Vec<u32> = (0..8).filter(|p| p % 2 == 0).map(|p| s[p]).collect();
        assert_eq!(mine.iter().filter(|&&x| x == 0).count(), 2, "{mine:?}");
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
            replicas: vec![],
            incarnation: 0,
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
