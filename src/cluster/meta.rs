//! The cluster metadata the controller replicates: nodes, and topics with the nodes that hold
//! each partition's replicas. A deterministic state machine: every controller node applies the
//! same committed commands in the same order and reaches the same state, and a command that is
//! refused (a topic that exists, more replicas than nodes) is refused identically everywhere.
//!
//! Owns: [`ClusterMeta`], [`MetaCommand`] and the commands' byte encoding (the Raft entry
//! data). Must not touch: Raft, I/O, time.

use std::collections::BTreeMap;

use super::wire::{put_str, Reader};

/// One change to the cluster metadata, as proposed to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaCommand {
    /// A node joined (or came back with new addresses).
    RegisterNode {
        id: u32,
        client_addr: String,
        peer_addr: String,
    },
    CreateTopic {
        name: String,
        partitions: u32,
        replicas: u32,
        /// -1 = unlimited.
        retention_bytes: i64,
        retention_ms: i64,
        /// The nodes to place replicas on, chosen by the proposer from the nodes it sees
        /// alive (so the choice is in the command and every replica applies the same);
        /// empty = every registered node. Nodes not registered are refused.
        nodes: Vec<u32>,
    },
    DeleteTopic {
        name: String,
    },
}

/// A node as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub client_addr: String,
    pub peer_addr: String,
}

/// A topic and, per partition, the nodes holding its replicas (the first is the preferred
/// leader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPlacement {
    pub replicas: Vec<Vec<u32>>,
    pub retention_bytes: i64,
    pub retention_ms: i64,
    /// The metadata version that created it: a topic deleted and created again under the
    /// same name is a different incarnation, so nodes drop the old one's data.
    pub incarnation: u64,
}

/// The replicated metadata; `version` counts applied commands (refused ones included, so every
/// node's version names the same state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterMeta {
    pub version: u64,
    pub nodes: BTreeMap<u32, NodeInfo>,
    pub topics: BTreeMap<String, TopicPlacement>,
    /// Topics deleted (and not created again), the most recent
    /// [`crate::limits::DELETED_TOPICS_REMEMBERED`] by name order: a node deletes a topic's
    /// data only when it is listed here, never because a topic is merely absent.
    pub deleted: std::collections::BTreeSet<String>,
}

impl ClusterMeta {
    /// Applies one committed command; `Err` says why it was refused (the state then only
    /// gains a version).
    pub fn apply(&mut self, cmd: &MetaCommand) -> Result<(), String> {
        self.version += 1;
        match cmd {
            MetaCommand::RegisterNode {
                id,
                client_addr,
                peer_addr,
            } => {
                let info = NodeInfo {
                    client_addr: client_addr.clone(),
                    peer_addr: peer_addr.clone(),
                };
                self.nodes.insert(*id, info);
                Ok(())
            }
            MetaCommand::CreateTopic {
                name,
                partitions,
                replicas,
                retention_bytes,
                retention_ms,
                nodes,
            } => {
                if self.topics.contains_key(name) {
                    return Err(format!("topic {name:?} already exists"));
                }
                let candidates = if nodes.is_empty() {
                    self.node_ids()
                } else if let Some(n) = nodes.iter().find(|n| !self.nodes.contains_key(n)) {
                    return Err(format!("node {n} is not registered"));
                } else {
                    let mut c = nodes.clone();
                    c.sort_unstable();
                    c.dedup();
                    c
                };
                let replicas = place(name, *partitions, *replicas, &candidates)?;
                let placement = TopicPlacement {
                    replicas,
                    retention_bytes: *retention_bytes,
                    retention_ms: *retention_ms,
                    incarnation: self.version,
                };
                self.topics.insert(name.clone(), placement);
                self.deleted.remove(name);
                Ok(())
            }
            MetaCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => {
                    self.deleted.insert(name.clone());
                    while self.deleted.len() > crate::limits::DELETED_TOPICS_REMEMBERED {
                        self.deleted.pop_first();
                    }
                    Ok(())
                }
                None => Err(format!("unknown topic {name:?}")),
            },
        }
    }

    fn node_ids(&self) -> Vec<u32> {
        self.nodes.keys().copied().collect()
    }
}

/// Replicas of each partition on `replicas` distinct nodes: partition p starts at node
/// (start + p) mod n, so leaders (the first replica) spread evenly over nodes.
fn place(
    name: &str,
    partitions: u32,
    replicas: u32,
    nodes: &[u32],
) -> Result<Vec<Vec<u32>>, String> {
    if partitions == 0 || replicas == 0 {
        return Err("partitions and replicas must be at least 1".into());
    }
    if replicas as usize > nodes.len() {
        return Err(format!(
            "{replicas} replicas need {replicas} nodes; the cluster has {}",
            nodes.len()
        ));
    }
    let n = nodes.len();
    let start = name
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    Ok((0..partitions as usize)
        .map(|p| {
            (0..replicas as usize)
                .map(|r| nodes[(start + p + r) % n])
                .collect()
        })
        .collect())
}

// ---- encoding: tag byte, then u32 (LE) and length-prefixed UTF-8 fields -------------------

const TAG_REGISTER: u8 = 1;
const TAG_CREATE: u8 = 2;
const TAG_DELETE: u8 = 3;

impl MetaCommand {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::RegisterNode {
                id,
                client_addr,
                peer_addr,
            } => {
                out.push(TAG_REGISTER);
                out.extend_from_slice(&id.to_le_bytes());
                put_str(&mut out, client_addr);
                put_str(&mut out, peer_addr);
            }
            Self::CreateTopic {
                name,
                partitions,
                replicas,
                retention_bytes,
                retention_ms,
                nodes,
            } => {
                out.push(TAG_CREATE);
                put_str(&mut out, name);
                out.extend_from_slice(&partitions.to_le_bytes());
                out.extend_from_slice(&replicas.to_le_bytes());
                out.extend_from_slice(&retention_bytes.to_le_bytes());
                out.extend_from_slice(&retention_ms.to_le_bytes());
                out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
                for n in nodes {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
            Self::DeleteTopic { name } => {
                out.push(TAG_DELETE);
                put_str(&mut out, name);
            }
        }
        out
    }

    /// Decodes [`MetaCommand::encode`]'s bytes; an error names what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let cmd = match r.u8()? {
            TAG_REGISTER => Self::RegisterNode {
                id: r.u32()?,
                client_addr: r.str()?,
                peer_addr: r.str()?,
            },
            TAG_CREATE => Self::CreateTopic {
                name: r.str()?,
                partitions: r.u32()?,
                replicas: r.u32()?,
                retention_bytes: r.i64()?,
                retention_ms: r.i64()?,
                nodes: r.u32_list()?,
            },
            TAG_DELETE => Self::DeleteTopic { name: r.str()? },
            t => return Err(format!("unknown metadata command tag {t}")),
        };
        if !r.is_empty() {
            return Err(format!(
                "{} trailing bytes after a metadata command",
                r.remaining()
            ));
        }
        Ok(cmd)
    }
}

impl ClusterMeta {
    /// The whole state as bytes (what the controller leader sends to nodes that follow the
    /// metadata without voting).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.nodes.len() as u32).to_le_bytes());
        for (id, n) in &self.nodes {
            out.extend_from_slice(&id.to_le_bytes());
            put_str(&mut out, &n.client_addr);
            put_str(&mut out, &n.peer_addr);
        }
        out.extend_from_slice(&(self.topics.len() as u32).to_le_bytes());
        for (name, t) in &self.topics {
            put_str(&mut out, name);
            out.extend_from_slice(&t.retention_bytes.to_le_bytes());
            out.extend_from_slice(&t.retention_ms.to_le_bytes());
            out.extend_from_slice(&t.incarnation.to_le_bytes());
            out.extend_from_slice(&(t.replicas.len() as u32).to_le_bytes());
            for r in &t.replicas {
                out.extend_from_slice(&(r.len() as u32).to_le_bytes());
                for n in r {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        out.extend_from_slice(&(self.deleted.len() as u32).to_le_bytes());
        for name in &self.deleted {
            put_str(&mut out, name);
        }
        out
    }

    /// Decodes [`ClusterMeta::encode`]'s bytes; every count is bounded by the bytes present.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let mut m = ClusterMeta {
            version: r.u64()?,
            ..Default::default()
        };
        for _ in 0..r.count(12)? {
            let id = r.u32()?;
            let info = NodeInfo {
                client_addr: r.str()?,
                peer_addr: r.str()?,
            };
            m.nodes.insert(id, info);
        }
        for _ in 0..r.count(32)? {
            let name = r.str()?;
            let retention_bytes = r.i64()?;
            let retention_ms = r.i64()?;
            let incarnation = r.u64()?;
            let replicas = (0..r.count(4)?)
                .map(|_| r.u32_list())
                .collect::<Result<Vec<_>, _>>()?;
            let t = TopicPlacement {
                replicas,
                retention_bytes,
                retention_ms,
                incarnation,
            };
            m.topics.insert(name, t);
        }
        for _ in 0..r.count(4)? {
            m.deleted.insert(r.str()?);
        }
        if !r.is_empty() {
            return Err("trailing bytes after the cluster metadata".into());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_bytes_are_errors() {
        let cmds = [
            MetaCommand::RegisterNode {
                id: 7,
                client_addr: "127.0.0.1:9400".into(),
                peer_addr: "127.0.0.1:9500".into(),
            },
            MetaCommand::CreateTopic {
                name: "orders".into(),
                partitions: 4,
                replicas: 3,
                retention_bytes: -1,
                retention_ms: 86_400_000,
                nodes: vec![1, 2, 3],
            },
            MetaCommand::DeleteTopic { name: "x".into() },
        ];
        for c in &cmds {
            let b = c.encode();
            assert_eq!(&MetaCommand::decode(&b).unwrap(), c);
            assert!(MetaCommand::decode(&b[..b.len() - 1]).is_err());
        }
        assert!(MetaCommand::decode(&[9]).is_err());
        assert!(MetaCommand::decode(&[]).is_err());
    }

    #[test]
    fn placement_uses_distinct_nodes_and_spreads_leaders() {
        let mut m = ClusterMeta::default();
        for id in 1..=3 {
            let c = MetaCommand::RegisterNode {
                id,
                client_addr: String::new(),
                peer_addr: String::new(),
            };
            m.apply(&c).unwrap();
        }
        let create = MetaCommand::CreateTopic {
            name: "t".into(),
            partitions: 6,
            replicas: 3,
            retention_bytes: -1,
            retention_ms: -1,
            nodes: vec![],
        };
        m.apply(&create).unwrap();
        let t = &m.topics["t"];
        let mut leaders = BTreeMap::new();
        for r in &t.replicas {
            let mut d = r.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "replicas on distinct nodes: {r:?}");
            *leaders.entry(r[0]).or_insert(0) += 1;
        }
        assert!(leaders.values().all(|&n| n == 2), "{leaders:?}");
        assert!(m.apply(&create).unwrap_err().contains("already exists"));
        let too_many = MetaCommand::CreateTopic {
            name: "u".into(),
            partitions: 1,
            replicas: 4,
            retention_bytes: -1,
            retention_ms: -1,
            nodes: vec![],
        };
        assert!(m.apply(&too_many).unwrap_err().contains("need 4 nodes"));
        let on_live = MetaCommand::CreateTopic {
            name: "v".into(),
            partitions: 4,
            replicas: 1,
            retention_bytes: -1,
            retention_ms: -1,
            nodes: vec![3, 1],
        };
        m.apply(&on_live).unwrap();
        assert!(m.topics["v"].replicas.iter().all(|r| r[0] != 2));
        let unknown = MetaCommand::CreateTopic {
            name: "w".into(),
            partitions: 1,
            replicas: 1,
            retention_bytes: -1,
            retention_ms: -1,
            nodes: vec![9],
        };
        assert!(m.apply(&unknown).unwrap_err().contains("not registered"));
        assert_eq!(m.version, 8);
        let bytes = m.encode();
        assert_eq!(ClusterMeta::decode(&bytes).unwrap(), m);
        assert!(ClusterMeta::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ClusterMeta::decode(&huge).is_err());
    }
}
