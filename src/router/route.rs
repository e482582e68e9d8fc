//! The routing decision, as one pure function: which partition a request addresses and which
//! shard (and, once the cluster lands, which node) owns it.
//!
//! Owns: [`Dest`], [`Target`], [`route`] and [`RouteError`]. Must not touch: sockets, channels,
//! partitions: it reads the placement table and returns an answer, so every rule is unit-tested
//! here. Callers map [`RouteError`] to wire codes at the edge.

use crate::metadata::{GroupHome, Metadata};
use crate::protocol::partitioner;

/// This node. Cluster node ids start at 1, so a [`Dest`] with node 0 never leaves the node.
pub const LOCAL_NODE: u32 = 0;

/// The shard that makes topic changes (the controller of this node's placement table).
pub const CONTROLLER_SHARD: usize = 0;

/// Where a request goes: a node and a shard on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    pub node: u32,
    pub shard: usize,
}

impl Dest {
    pub fn local(shard: usize) -> Self {
        Self {
            node: LOCAL_NODE,
            shard,
        }
    }

    /// Another cluster node; which of its shards owns the request is that node's decision.
    pub fn remote(node: u32) -> Self {
        Self { node, shard: 0 }
    }

    pub fn is_local(&self) -> bool {
        self.node == LOCAL_NODE
    }
}

/// What a request addresses, as far as routing cares.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A produce (or one multicast destination): an explicit partition, else by key (murmur2,
    /// as Kafka), else round robin.
    Produce {
        topic: &'a str,
        partition: Option<u32>,
        key: Option<&'a [u8]>,
    },
    /// A request for one partition (fetch, list offset, queue fetch and settle).
    Partition { topic: &'a str, partition: u32 },
    /// A consumer-group request: the group's coordinator (crc32 of the name).
    Group(&'a str),
    /// Topic administration: the controller.
    Controller,
}

/// Why a request has nowhere to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// Cluster: this node has not received the controller's metadata yet (retry).
    ClusterNotReady,
    UnknownTopic(String),
    UnknownPartition {
        topic: String,
        partitions: u32,
        partition: u32,
    },
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClusterNotReady => write!(
                f,
                "this node has not received the cluster's metadata yet; retry shortly"
            ),
            Self::UnknownTopic(t) => write!(f, "unknown topic {t:?}"),
            Self::UnknownPartition {
                topic,
                partitions,
                partition,
            } => write!(
                f,
                "topic {topic:?} has partitions 0..{partitions}, not {partition}"
            ),
        }
    }
}

/// A keyless produce's partition: the round-robin slot, skipping (in a cluster) partitions
/// whose leader node is down, as Kafka's partitioner skips unavailable partitions; when
/// every leader is down, the slot as it is (the request then says why).
fn round_robin_available(table: &Metadata, t: &crate::metadata::TopicMeta, rr: u32) -> u32 {
    let n = t.partitions().max(1);
    if table.cluster.is_none() {
        return rr % n;
    }
    (0..n)
        .map(|i| rr.wrapping_add(i) % n)
        .find(|&p| match t.leader_node(p) {
            Some(id) => table.node_id() == Some(id) || table.node(id).is_some_and(|x| x.alive),
            None => true,
        })
        .unwrap_or(rr % n)
}

/// The shard coordinating `group` among `shards`.
pub fn coordinator_of(group: &str, shards: usize) -> usize {
    (crc32fast::hash(group.as_bytes()) as usize) % shards.max(1)
}

/// Routes `target` over `table` on a node of `shards` shards. `round_robin` is the caller's
/// counter value, used only by a keyless produce without a partition. Returns the partition
/// addressed (0 for group and controller requests) and its destination.
pub fn route(
    table: &Metadata,
    shards: usize,
    target: Target<'_>,
    round_robin: u32,
) -> Result<(u32, Dest), RouteError> {
    let (topic, partition) = match target {
        Target::Group(g) => {
            return match table.group_node(g) {
                GroupHome::Node(n) if Some(n) != table.node_id() => Ok((0, Dest::remote(n))),
                GroupHome::Node(_) | GroupHome::ThisNode => {
                    Ok((0, Dest::local(coordinator_of(g, shards))))
                }
                GroupHome::Unknown => Err(RouteError::ClusterNotReady),
            }
        }
        Target::Controller => return Ok((0, Dest::local(CONTROLLER_SHARD))),
        Target::Partition { topic, partition } => (topic, Some(partition)),
        Target::Produce {
            topic,
            partition: Some(p),
            ..
        } => (topic, Some(p)),
        Target::Produce {
            topic,
            partition: None,
            key,
        } => {
            let t = table
                .get(topic)
                .ok_or_else(|| RouteError::UnknownTopic(topic.into()))?;
            let n = t.partitions();
            let p = match key {
                Some(k) => partitioner::partition_for_key(k, n),
                None => round_robin_available(table, t, round_robin),
            };
            (topic, Some(p))
        }
    };
    let partition = partition.unwrap_or(0);
    let t = table
        .get(topic)
        .ok_or_else(|| RouteError::UnknownTopic(topic.into()))?;
    let unknown = || RouteError::UnknownPartition {
        topic: topic.into(),
        partitions: t.partitions(),
        partition,
    };
    // In a cluster a partition is served by its leader (the first replica in the table, which
    // names the leader last reported); followers of a replicated partition forward too.
    if table.node_id().is_some() {
        let leader = t.leader_node(partition).ok_or_else(unknown)?;
        if Some(leader) != table.node_id() {
            return Ok((partition, Dest::remote(leader)));
        }
    }
    t.shard_of(partition, shards)
        .map(|s| (partition, Dest::local(s)))
        .ok_or_else(unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{MetaChange, TopicMeta};

    fn table() -> Metadata {
        let mut m = Metadata::default();
        m.apply(&MetaChange::Upsert(TopicMeta {
            name: "t".into(),
            shards: vec![1, 0, 1, 0],
            retention_bytes: -1,
            retention_ms: -1,
            replicas: vec![],
            incarnation: 0,
        }));
        m
    }

    #[test]
    fn explicit_partitions_go_to_their_placed_shard() {
        let m = table();
        for (p, shard) in [(0, 1), (1, 0), (2, 1), (3, 0)] {
            let t = Target::Partition {
                topic: "t",
                partition: p,
            };
            assert_eq!(route(&m, 2, t, 0), Ok((p, Dest::local(shard))));
            let t = Target::Produce {
                topic: "t",
                partition: Some(p),
                key: Some(b"ignored when a partition is named"),
            };
            assert_eq!(route(&m, 2, t, 7), Ok((p, Dest::local(shard))));
        }
    }

    #[test]
    fn keys_use_murmur2_and_keyless_produces_round_robin() {
        let m = table();
        let keyed = Target::Produce {
            topic: "t",
            partition: None,
            key: Some(b"user-42"),
        };
        let want = partitioner::partition_for_key(b"user-42", 4);
        assert_eq!(route(&m, 2, keyed, 0).map(|r| r.0), Ok(want));
        assert_eq!(route(&m, 2, keyed, 99).map(|r| r.0), Ok(want));
        let rr = |n| {
            let t = Target::Produce {
                topic: "t",
                partition: None,
                key: None,
            };
            route(&m, 2, t, n).map(|r| r.0)
        };
        assert_eq!((rr(0), rr(1), rr(5)), (Ok(0), Ok(1), Ok(1)));
    }

    #[test]
    fn placements_made_with_more_shards_wrap_around() {
        let m = table();
        let t = Target::Partition {
            topic: "t",
            partition: 0,
        };
        assert_eq!(route(&m, 1, t, 0), Ok((0, Dest::local(0))));
    }

    #[test]
    fn unknown_topics_and_partitions_are_errors() {
        let m = table();
        let t = Target::Partition {
            topic: "nope",
            partition: 0,
        };
        assert_eq!(
            route(&m, 2, t, 0),
            Err(RouteError::UnknownTopic("nope".into()))
        );
        let t = Target::Produce {
            topic: "t",
            partition: Some(4),
            key: None,
        };
        let e = route(&m, 2, t, 0).unwrap_err();
        assert_eq!(e.to_string(), "topic \"t\" has partitions 0..4, not 4");
    }

    fn cluster_table(me: u32) -> Metadata {
        use crate::metadata::{ClusterView, NodeView};
        let mut m = Metadata::default();
        m.apply(&MetaChange::Upsert(TopicMeta {
            name: "t".into(),
            shards: vec![0, 1, 0],
            retention_bytes: -1,
            retention_ms: -1,
            replicas: vec![vec![1], vec![2], vec![1]],
            incarnation: 1,
        }));
        let node = |addr: &str| NodeView {
            client_addr: addr.into(),
            peer_addr: String::new(),
            alive: true,
            voter: true,
        };
        let learner = NodeView {
            voter: false,
            ..node("c:3")
        };
        m.cluster = Some(ClusterView {
            me,
            controller: Some(1),
            meta_version: 3,
            nodes: [(1, node("a:1")), (2, node("b:2")), (3, learner)]
                .into_iter()
                .collect(),
            deleted: Default::default(),
            voters: vec![1, 2],
        });
        m
    }

    #[test]
    fn partitions_led_elsewhere_route_to_their_node() {
        let m = cluster_table(1);
        let at = |p| Target::Partition {
            topic: "t",
            partition: p,
        };
        assert_eq!(route(&m, 2, at(0), 0), Ok((0, Dest::local(0))));
        assert_eq!(route(&m, 2, at(1), 0), Ok((1, Dest::remote(2))));
        assert_eq!(route(&m, 2, at(2), 0), Ok((2, Dest::local(0))));
        let m2 = cluster_table(2);
        assert_eq!(route(&m2, 2, at(0), 0), Ok((0, Dest::remote(1))));
        assert_eq!(route(&m2, 2, at(1), 0), Ok((1, Dest::local(1))));
        // A keyless produce skips partitions whose leader is down.
        let mut down = cluster_table(1);
        if let Some(c) = down.cluster.as_mut() {
            c.nodes.get_mut(&2).expect("node 2").alive = false;
        }
        let keyless = Target::Produce {
            topic: "t",
            partition: None,
            key: None,
        };
        let picks: Vec<u32> = (0..6)
            .map(|rr| route(&down, 2, keyless, rr).unwrap().0)
            .collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // A group lives on one voter node for the whole cluster (node 3 does not vote).
        let m3 = cluster_table(3);
        for g in ["billing", "audit", "x", "y"] {
            let (_, d1) = route(&m, 2, Target::Group(g), 0).unwrap();
            let (_, d2) = route(&m2, 2, Target::Group(g), 0).unwrap();
            assert!(d1.is_local() != d2.is_local(), "{g}: {d1:?} {d2:?}");
            let (_, d3) = route(&m3, 2, Target::Group(g), 0).unwrap();
            assert!(!d3.is_local(), "{g}: {d3:?}");
        }
        // A voter that has not registered yet still counts: the home does not move.
        let mut partial = cluster_table(1);
        if let Some(c) = partial.cluster.as_mut() {
            c.nodes.remove(&2);
        }
        for g in ["billing", "audit", "x", "y"] {
            assert_eq!(partial.group_node(g), m.group_node(g), "{g}");
        }
        // Before a node knows the voters, it coordinates nothing on its own.
        let mut blind = cluster_table(3);
        if let Some(c) = blind.cluster.as_mut() {
            c.voters.clear();
        }
        assert_eq!(
            route(&blind, 2, Target::Group("g"), 0),
            Err(RouteError::ClusterNotReady)
        );
    }

    #[test]
    fn groups_go_to_their_coordinator_and_admin_to_the_controller() {
        let m = table();
        for g in ["billing", "audit", "x"] {
            let (_, d) = route(&m, 3, Target::Group(g), 0).unwrap();
            assert_eq!(d, Dest::local(coordinator_of(g, 3)));
            assert!(d.shard < 3);
        }
        assert_eq!(
            route(&m, 3, Target::Controller, 0),
            Ok((0, Dest::local(CONTROLLER_SHARD)))
        );
    }
}
