//! A client for a cluster that sends each partition's requests straight to the node leading
//! it, as Kafka clients do: leaders come from metadata (`PartitionInfo.leader_address`), one
//! connection per node is opened on first use, and a `NotLeader` or `NodeUnavailable` answer
//! refreshes the metadata (the request is then sent to the new leader once). On a single node
//! metadata names no leader address and everything goes to the one connection.
//!
//! Owns: the connections by address and the leader table. Must not touch: the wire format
//! (that is `Client`'s) or server internals.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::{Client, ClientError, Fetched, ProduceAck};
use crate::limits;
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
    /// Partitions with more than one replica (a new leader takes over when one dies).
    replicated: std::collections::BTreeSet<(String, u32)>,
    /// This client's idempotent producer id (random, non-zero; replaced after a produce
    /// whose outcome stayed unknown) and the next batch sequence number per partition.
    producer_id: u64,
    sequences: BTreeMap<(String, u32), i64>,
    /// Leader addresses that failed to connect, and when: skipped for
    /// [`limits::CLIENT_LEADER_RETRY_MS`].
    failed: HashMap<String, Instant>,
}

/// Whether an answer means "ask the metadata again": the partition moved or its node is down
/// (the request was not carried out, so any request may be sent again).
pub fn leader_moved(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(fb::ErrorCode::NotLeader | fb::ErrorCode::NodeUnavailable)
    )
}

/// Whether the request may have been carried out without its answer arriving (a broken
/// connection, or `OutcomeUnknown`): only a request that may be repeated is sent again.
fn outcome_unknown(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(_)) || e.code() == Some(fb::ErrorCode::OutcomeUnknown)
}

/// A random non-zero 63-bit producer id (the std hasher's per-process random keys mixed with
/// the time: unique in practice, as Kafka's broker-assigned ids are by construction).
pub fn new_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    (h.finish() >> 1).max(1)
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
            replicated: std::collections::BTreeSet::new(),
            producer_id: new_producer_id(),
            sequences: BTreeMap::new(),
            failed: HashMap::new(),
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
            let timeout = Duration::from_millis(limits::CLIENT_LEADER_CONNECT_TIMEOUT_MS);
            let c = Client::connect_within(addr, timeout)?;
            c.set_read_timeout(Some(Duration::from_millis(
                limits::CLIENT_LEADER_READ_TIMEOUT_MS,
            )))?;
            self.conns.insert(addr.to_string(), c);
        }
        self.conns
            .get_mut(addr)
            .ok_or_else(|| ClientError::Protocol(format!("no connection to {addr}")))
    }

    /// Reads `topic`'s partitions and their leaders; returns the partition count.
    pub fn refresh(&mut self, topic: &str) -> Result<u32, ClientError> {
        let meta = match self.bootstrap()?.metadata(&[topic]) {
            Ok(m) => m,
            Err(e) => {
                if matches!(e, ClientError::Io(_)) {
                    // Reconnected on the next call.
                    let b = self.bootstrap.clone();
                    self.conns.remove(&b);
                }
                return Err(e);
            }
        };
        let Some(t) = meta.into_iter().find(|t| t.name == topic) else {
            return Err(ClientError::Protocol(format!("no metadata for {topic:?}")));
        };
        let n = t.partitions.len() as u32;
        self.leaders.retain(|(name, _), _| name != topic);
        self.replicated.retain(|(name, _)| name != topic);
        for p in t.partitions {
            if p.replicas.len() > 1 {
                self.replicated.insert((topic.to_string(), p.partition));
            }
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
    /// (which forwards, or says the node is down). An address that failed is not tried again
    /// for [`limits::CLIENT_LEADER_RETRY_MS`].
    pub fn reachable(&mut self, addr: &str) -> String {
        if self.conns.contains_key(addr) {
            return addr.to_string();
        }
        let retry = Duration::from_millis(limits::CLIENT_LEADER_RETRY_MS);
        if self.failed.get(addr).is_some_and(|t| t.elapsed() < retry) {
            return self.bootstrap.clone();
        }
        match self.conn(addr) {
            Ok(_) => {
                self.failed.remove(addr);
                addr.to_string()
            }
            Err(_) => {
                self.failed.insert(addr.to_string(), Instant::now());
                self.bootstrap.clone()
            }
        }
    }

    /// Forgets the connection to `addr` (it broke; the next use reconnects).
    pub fn forget(&mut self, addr: &str) {
        self.conns.remove(addr);
    }

    /// The open connection to `addr` (opening it if needed).
    pub fn at(&mut self, addr: &str) -> Result<&mut Client, ClientError> {
        self.conn(addr)
    }

    /// Runs `op` on the leader's connection. After `NotLeader`/`NodeUnavailable` (not carried
    /// out) it refreshes the metadata and runs `op` again on the leader named then: once for a
    /// partition with one replica (its node is down until it returns), and for a replicated
    /// one with a growing pause for up to [`limits::CLIENT_LEADER_WAIT_MS`] (a failover: a
    /// follower takes over). After a broken connection or `OutcomeUnknown` it does so only
    /// for an `idempotent` request (a read): a produce is never sent twice here.
    pub fn with_leader<T>(
        &mut self,
        topic: &str,
        p: u32,
        idempotent: bool,
        mut op: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let began = Instant::now();
        let wait = Duration::from_millis(limits::CLIENT_LEADER_WAIT_MS);
        let mut pause_ms = 50;
        let mut refreshed = false;
        loop {
            let addr = self.address_of(topic, p);
            let addr = self.reachable(&addr);
            let r = op(self.conn(&addr)?);
            match r {
                Err(e) if leader_moved(&e) || (idempotent && outcome_unknown(&e)) => {
                    if matches!(e, ClientError::Io(_)) {
                        self.conns.remove(&addr);
                    }
                    let failover = self.replicated.contains(&(topic.to_string(), p));
                    if refreshed && (!failover || began.elapsed() >= wait) {
                        return self.drop_if_broken(&addr, Err(e));
                    }
                    if refreshed {
                        std::thread::sleep(Duration::from_millis(pause_ms));
                        pause_ms = (pause_ms * 2).min(200);
                        // The failed mark is for picking a reachable node; a failover needs
                        // the leader's address tried again.
                        self.failed.clear();
                    }
                    refreshed = true;
                    if let Err(re) = self.refresh(topic) {
                        if began.elapsed() >= wait {
                            return Err(re);
                        }
                    }
                }
                r => return self.drop_if_broken(&addr, r),
            }
        }
    }

    /// [`Self::with_leader`] for a produce's partition choice: an explicit partition goes to
    /// its leader (retried as there); any other choice to the bootstrap node, once.
    pub fn with_partition_leader<T>(
        &mut self,
        topic: &str,
        choice: PartitionChoice<'_>,
        repeatable: bool,
        mut op: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        match choice {
            PartitionChoice::Explicit(p) => self.with_leader(topic, p, repeatable, op),
            _ => {
                let addr = self.bootstrap.clone();
                let r = op(self.conn(&addr)?);
                self.drop_if_broken(&addr, r)
            }
        }
    }

    /// Drops the connection to `addr` after an error that leaves it unusable: a broken
    /// connection, or an answer out of step (a late answer to a timed-out request).
    fn drop_if_broken<T>(
        &mut self,
        addr: &str,
        r: Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        if matches!(r, Err(ClientError::Io(_)) | Err(ClientError::Protocol(_))) {
            self.conns.remove(addr);
        }
        r
    }

    /// Produces `records` to partition `p` through its leader. To a replicated partition the
    /// batch carries this client's producer id and the partition's next sequence number, so
    /// it is sent again after a broken connection or an unknown outcome (the leader stores it
    /// once); to a partition with one replica it is never sent twice.
    pub fn produce(
        &mut self,
        topic: &str,
        p: u32,
        records: &[RecordIn],
    ) -> Result<ProduceAck, ClientError> {
        self.partitions(topic)?;
        let Some(producer) = self.take_sequence(topic, p) else {
            return self.with_leader(topic, p, false, |c| {
                c.produce(topic, PartitionChoice::Explicit(p), records)
            });
        };
        let batch = crate::protocol::encode_record_batch_as(records, Some(producer));
        let r = self.with_leader(topic, p, true, |c| {
            c.call(|corr| {
                crate::protocol::encode_produce(corr, topic, PartitionChoice::Explicit(p), &batch)
            })
            .and_then(|r| super::produce_ack(&r))
        });
        self.settle_sequence(&r);
        r
    }

    /// The (producer id, sequence) for the next batch to `topic`-`p`, taken, if the partition
    /// is replicated (idempotence is checked there); `None` otherwise. Batches must be sent
    /// in the order their sequences were taken.
    pub fn take_sequence(&mut self, topic: &str, p: u32) -> Option<(u64, i64)> {
        let key = (topic.to_string(), p);
        if !self.replicated.contains(&key) {
            return None;
        }
        let s = self.sequences.entry(key).or_insert(0);
        let seq = *s;
        *s += 1;
        Some((self.producer_id, seq))
    }

    /// After a batch that took a sequence finally failed: the producer starts over with a new
    /// id, so no later batch is mistaken for it (whether or not it landed) and no gap is left.
    pub fn settle_sequence<T>(&mut self, r: &Result<T, ClientError>) {
        if r.is_err() {
            self.producer_id = new_producer_id();
            self.sequences.clear();
        }
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
        self.with_leader(topic, p, true, |c| {
            c.fetch_filtered(topic, p, offset, max_bytes, max_wait_ms, filter)
        })
    }

    /// The offset for a timestamp (ms), or -1 = start, -2 = end, through the leader.
    pub fn list_offset(&mut self, topic: &str, p: u32, at: i64) -> Result<u64, ClientError> {
        self.with_leader(topic, p, true, |c| c.list_offset(topic, p, at))
    }
}
