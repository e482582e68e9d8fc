//! A client for a cluster that sends each partition's requests straight to the node leading
//! it, as Kafka clients do: leaders come from metadata (`PartitionInfo.leader_address`), one
//! connection per node is opened on first use, and a `NotLeader` or `NodeUnavailable` answer
//! refreshes the metadata (the request is then sent to the new leader once). On a single node
//! metadata names no leader address and everything goes to the one connection.
//!
//! Owns: the connections by address and the leader table. Must not touch: the wire format
//! (that is `Client`'s) or server internals.

use std::collections::{BTreeMap, HashMap};

use super::{Client, ClientError, Fetched, ProduceAck};
use crate::protocol::{fb, PartitionChoice, RecordIn};

/// Connections to a cluster's nodes and the leader of each partition seen so far.
pub struct Leaders {
    /// The address the first connection went to (for metadata and unplaced requests).
    bootstrap: String,
    conns: HashMap<String, Client>,
    /// (topic, partition) → leader's client address; absent or empty = the bootstrap node.
    leaders: BTreeMap<(String, u32), String>,
    /// Partitions per topic, from the last metadata.
    partitions: BTreeMap<String, u32>,
}

/// Whether an answer means "ask the metadata again": the partition moved or its node is down.
pub fn leader_moved(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(fb::ErrorCode::NotLeader | fb::ErrorCode::NodeUnavailable)
    )
}

impl Leaders {
    /// Starts from an open connection to any node at `addr`.
    pub fn new(addr: &str, first: Client) -> Self {
        let mut conns = HashMap::new();
        conns.insert(addr.to_string(), first);
        Self {
            bootstrap: addr.to_string(),
            conns,
            leaders: BTreeMap::new(),
            partitions: BTreeMap::new(),
        }
    }

    /// The bootstrap node's address.
    pub fn bootstrap_address(&self) -> &str {
        &self.bootstrap
    }

    /// The connection to the bootstrap node (metadata, groups, admin).
    pub fn bootstrap(&mut self) -> Result<&mut Client, ClientError> {
        let addr = self.bootstrap.clone();
        self.conn(&addr)
    }

    fn conn(&mut self, addr: &str) -> Result<&mut Client, ClientError> {
        if !self.conns.contains_key(addr) {
            let c = Client::connect(addr)?;
            self.conns.insert(addr.to_string(), c);
        }
        self.conns
            .get_mut(addr)
            .ok_or_else(|| ClientError::Protocol(format!("no connection to {addr}")))
    }

    /// Reads `topic`'s partitions and their leaders; returns the partition count.
    pub fn refresh(&mut self, topic: &str) -> Result<u32, ClientError> {
        let meta = self.bootstrap()?.metadata(&[topic])?;
        let Some(t) = meta.into_iter().find(|t| t.name == topic) else {
            return Err(ClientError::Protocol(format!("no metadata for {topic:?}")));
        };
        let n = t.partitions.len() as u32;
        self.leaders.retain(|(name, _), _| name != topic);
        for p in t.partitions {
            if !p.leader_address.is_empty() {
                self.leaders
                    .insert((topic.to_string(), p.partition), p.leader_address);
            }
        }
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    /// Partitions of `topic` (from metadata, read once).
    pub fn partitions(&mut self, topic: &str) -> Result<u32, ClientError> {
        match self.partitions.get(topic) {
            Some(&n) => Ok(n),
            None => self.refresh(topic),
        }
    }

    /// Whether any partition of `topic` has a known leader address (a cluster).
    pub fn is_cluster(&self, topic: &str) -> bool {
        self.leaders.keys().any(|(t, _)| t == topic)
    }

    /// Whether partition `p` of `topic` has a live leader (always true on a single node).
    pub fn has_leader(&self, topic: &str, p: u32) -> bool {
        !self.is_cluster(topic) || self.leaders.contains_key(&(topic.to_string(), p))
    }

    /// The address requests for `topic`-`p` go to.
    pub fn address_of(&self, topic: &str, p: u32) -> String {
        self.leaders
            .get(&(topic.to_string(), p))
            .cloned()
            .unwrap_or_else(|| self.bootstrap.clone())
    }

    /// `addr` if a connection to it is open or can be opened, else the bootstrap node's
    /// (which forwards, or says the node is down).
    pub fn reachable(&mut self, addr: &str) -> String {
        if self.conns.contains_key(addr) {
            return addr.to_string();
        }
        match Client::connect(addr) {
            Ok(c) => {
                self.conns.insert(addr.to_string(), c);
                addr.to_string()
            }
            Err(_) => self.bootstrap.clone(),
        }
    }

    /// The open connection to `addr` (opening it if needed).
    pub fn at(&mut self, addr: &str) -> Result<&mut Client, ClientError> {
        self.conn(addr)
    }

    /// The connection to the leader of `topic`-`p` (the bootstrap node when none is known or
    /// the leader cannot be reached).
    pub fn leader(&mut self, topic: &str, p: u32) -> Result<&mut Client, ClientError> {
        let addr = self.address_of(topic, p);
        let addr = self.reachable(&addr);
        self.conn(&addr)
    }

    /// Runs `op` on the leader's connection; after `NotLeader`/`NodeUnavailable` (or a broken
    /// connection) refreshes the metadata and runs it once more on the new leader.
    pub fn with_leader<T>(
        &mut self,
        topic: &str,
        p: u32,
        mut op: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let first = op(self.leader(topic, p)?);
        match first {
            Err(e) if leader_moved(&e) || matches!(e, ClientError::Io(_)) => {
                if matches!(e, ClientError::Io(_)) {
                    let addr = self.address_of(topic, p);
                    self.conns.remove(&addr);
                }
                self.refresh(topic)?;
                op(self.leader(topic, p)?)
            }
            r => r,
        }
    }

    /// Produces `records` to partition `p` through its leader.
    pub fn produce(
        &mut self,
        topic: &str,
        p: u32,
        records: &[RecordIn],
    ) -> Result<ProduceAck, ClientError> {
        self.with_leader(topic, p, |c| {
            c.produce(topic, PartitionChoice::Explicit(p), records)
        })
    }

    /// Fetches from partition `p` through its leader.
    pub fn fetch(
        &mut self,
        topic: &str,
        p: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
        filter: Option<&str>,
    ) -> Result<Fetched, ClientError> {
        self.with_leader(topic, p, |c| {
            c.fetch_filtered(topic, p, offset, max_bytes, max_wait_ms, filter)
        })
    }

    /// The offset for a timestamp (ms), or -1 = start, -2 = end, through the leader.
    pub fn list_offset(&mut self, topic: &str, p: u32, at: i64) -> Result<u64, ClientError> {
        self.with_leader(topic, p, |c| c.list_offset(topic, p, at))
    }
}
