//! What a shard answers about the cluster from its copy of the topic table: `ClusterStatus`,
//! and the leader and replicas of every partition in a metadata answer.
//!
//! Owns: those two answers. Must not touch: the controller (shard 0's `cluster::node`), the
//! table itself (read only).

use bytes::Bytes;

use crate::protocol as proto;

use super::Shard;

impl Shard {
    /// Nodes, liveness, the controller leader and the metadata version, as this node sees
    /// them. A single node answers with itself as node 0 and no controller.
    pub fn cluster_status(&self, corr: u64) -> Bytes {
        let table = self.table();
        let Some(c) = &table.cluster else {
            let partitions: usize = table.topics.values().map(|t| t.partitions() as usize).sum();
            let me = proto::NodeStatusOut {
                id: 0,
                address: self.cfg.listen.to_string(),
                peer_address: String::new(),
                alive: true,
                leaders: partitions as u32,
                replicas: partitions as u32,
                voter: false,
            };
            let st = proto::ClusterStatusOut {
                node_id: 0,
                controller: -1,
                version: table.version,
                nodes: vec![me],
            };
            return proto::encode_cluster_status_response(corr, &st);
        };
        let mut nodes: Vec<proto::NodeStatusOut> = c
            .nodes
            .iter()
            .map(|(&id, n)| proto::NodeStatusOut {
                id,
                address: n.client_addr.clone(),
                peer_address: n.peer_addr.clone(),
                alive: n.alive,
                leaders: 0,
                replicas: 0,
                voter: n.voter,
            })
            .collect();
        for t in table.topics.values() {
            for r in &t.replicas {
                for (i, id) in r.iter().enumerate() {
                    if let Some(n) = nodes.iter_mut().find(|n| n.id == *id) {
                        n.replicas += 1;
                        if i == 0 && n.alive {
                            n.leaders += 1;
                        }
                    }
                }
            }
        }
        let st = proto::ClusterStatusOut {
            node_id: c.me,
            controller: c.controller.map_or(-1, |l| l as i32),
            version: c.meta_version,
            nodes,
        };
        proto::encode_cluster_status_response(corr, &st)
    }

    /// Cluster: adds to a merged metadata answer (this node's partitions, from its shards)
    /// every partition of the listed topics that lives on other nodes, and each partition's
    /// leader (-1 while its node is down), leader address and replicas. Offsets of
    /// partitions on other nodes are 0 here; ask their leader.
    pub fn add_cluster_placement(&self, topics: &mut [proto::TopicMetaOut]) {
        let table = self.table();
        if table.cluster.is_none() {
            return;
        }
        for out in topics.iter_mut() {
            let Some(t) = table.get(&out.name) else {
                continue;
            };
            for p in 0..t.partitions() {
                let replicas = t.replicas.get(p as usize).cloned().unwrap_or_default();
                let leader = t
                    .leader_node(p)
                    .and_then(|id| table.node(id).map(|n| (id, n)));
                let (leader, leader_address) = match leader {
                    Some((id, n)) if n.alive => (id as i32, n.client_addr.clone()),
                    _ => (-1, String::new()),
                };
                match out.partitions.iter_mut().find(|x| x.partition == p) {
                    Some(x) => {
                        x.leader = leader;
                        x.leader_address = leader_address;
                        x.replicas = replicas;
                    }
                    None => out.partitions.push(proto::PartitionMetaOut {
                        partition: p,
                        leader,
                        leader_address,
                        replicas,
                        ..Default::default()
                    }),
                }
            }
        }
    }
}
