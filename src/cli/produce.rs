//! `ringmq produce`: lines from stdin to one topic, or a multicast to a destination list.
//!
//! Owns: batching lines into records and printing acknowledgements. Must not touch: other
//! commands.

use std::io::BufRead;

use super::args::ProduceArgs;
use super::common::{connect, connect_leaders};
use crate::client::leaders::{leader_moved, Leaders};
use crate::client::{produce_ack, Client, ClientError};
use crate::protocol::{self as proto, fb, PartitionChoice, RecordIn};
use std::collections::BTreeMap;

/// Batches of records per partition choice, sent pipelined to each partition's leader (one
/// connection per node in a cluster, `window` requests in flight on each); every ack is
/// awaited. A partition's batches all go over one connection, so they keep their order.
struct Sender<'a> {
    leaders: Leaders,
    topic: &'a str,
    window: usize,
    /// Requests in flight per connection (by address).
    in_flight: BTreeMap<String, usize>,
    acked: u64,
    /// The next partition for keyless lines in a cluster (chosen here, so they go straight
    /// to a live leader).
    round_robin: u32,
    /// The connection each partition's batches use, fixed at its first batch: batches of one
    /// partition never race each other over two connections.
    pinned: BTreeMap<u32, String>,
    /// Batches sent on each connection and not answered yet, in order.
    sent: BTreeMap<String, std::collections::VecDeque<Batch>>,
    /// Batches refused with NotLeader / NodeUnavailable (not stored), to send again in order.
    refused: Vec<Batch>,
}

/// A batch as sent: where it was meant to go, its encoded bytes, and whether it carries a
/// producer sequence (then sending it again is safe: the leader stores it once).
struct Batch {
    choice: PartitionChoice<'static>,
    bytes: Vec<u8>,
    repeatable: bool,
}

impl Sender<'_> {
    /// Where a batch goes: its partition choice and the connection's address.
    fn route(&mut self, choice: PartitionChoice<'static>) -> (PartitionChoice<'static>, String) {
        let topic = self.topic;
        let choice = match choice {
            PartitionChoice::RoundRobin if self.leaders.is_cluster(topic) => {
                let n = self.leaders.partitions(topic).unwrap_or(1).max(1);
                let start = self.round_robin;
                self.round_robin = self.round_robin.wrapping_add(1);
                let p = (0..n)
                    .map(|i| start.wrapping_add(i) % n)
                    .find(|&p| self.leaders.has_leader(topic, p))
                    .unwrap_or(start % n);
                PartitionChoice::Explicit(p)
            }
            c => c,
        };
        let addr = match choice {
            PartitionChoice::Explicit(p) => match self.pinned.get(&p) {
                Some(a) => return (choice, a.clone()),
                None => {
                    let leader = self.leaders.address_of(topic, p);
                    let a = self.leaders.reachable(&leader);
                    self.pinned.insert(p, a.clone());
                    return (choice, a);
                }
            },
            _ => self.leaders.bootstrap_address().to_string(),
        };
        (choice, addr)
    }

    fn send(
        &mut self,
        choice: PartitionChoice<'static>,
        records: &[RecordIn],
    ) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        // Refused batches go again before any new one (a partition's order, and no gap in
        // its sequence numbers).
        self.resend_refused()?;
        let (choice, addr) = self.route(choice);
        if self.in_flight.get(&addr).copied().unwrap_or(0) >= self.window {
            self.recv_one(&addr)?;
            self.resend_refused()?;
        }
        let (choice, addr) = self.route(choice);
        let topic = self.topic;
        let producer = match choice {
            PartitionChoice::Explicit(p) => self.leaders.take_sequence(topic, p),
            _ => None,
        };
        let batch = Batch {
            choice,
            bytes: proto::encode_record_batch_as(records, producer),
            repeatable: producer.is_some(),
        };
        let c = self.leaders.at(&addr).map_err(|e| e.to_string())?;
        let sent = c
            .send(|corr| proto::encode_produce(corr, topic, choice, &batch.bytes))
            .and_then(|_| c.flush());
        *self.in_flight.entry(addr.clone()).or_default() += 1;
        self.sent.entry(addr.clone()).or_default().push_back(batch);
        if let Err(e) = sent {
            return self.connection_broke(&addr, e);
        }
        Ok(())
    }

    fn recv_one(&mut self, addr: &str) -> Result<(), String> {
        let topic = self.topic;
        let c = self.leaders.at(addr).map_err(|e| e.to_string())?;
        let r = match c.recv() {
            Ok(r) => r,
            Err(e) => return self.connection_broke(addr, e),
        };
        if let Some(n) = self.in_flight.get_mut(addr) {
            *n = n.saturating_sub(1);
        }
        let batch = self.sent.get_mut(addr).and_then(|q| q.pop_front());
        match (produce_ack(&r), batch) {
            (Ok(ack), _) => self.acked += u64::from(ack.record_count),
            // Not stored (or stored once whatever happens): sent again once this
            // connection's other batches are answered.
            (Err(e), Some(b))
                if leader_moved(&e)
                    || (b.repeatable && e.code() == Some(proto::fb::ErrorCode::OutcomeUnknown)) =>
            {
                self.refused.push(b);
            }
            (Err(e), _) => return Err(format!("producing to {topic:?}: {e}")),
        }
        Ok(())
    }

    /// The connection to `addr` broke with batches in flight: their outcome is unknown. If
    /// every one carries a producer sequence they are sent again (stored once); otherwise
    /// producing stops here (sending them again could store some twice).
    fn connection_broke(&mut self, addr: &str, e: ClientError) -> Result<(), String> {
        let topic = self.topic;
        let lost = self.sent.remove(addr).unwrap_or_default();
        self.in_flight.remove(addr);
        self.leaders.forget(addr);
        self.pinned.retain(|_, a| a != addr);
        if lost.iter().any(|b| !b.repeatable) {
            return Err(format!("producing to {topic:?}: {e}"));
        }
        self.refused.extend(lost);
        Ok(())
    }

    /// Sends refused batches again, in their order, one at a time, each to the leader the
    /// metadata names then: after every batch still in flight is answered (a partition's
    /// later batches on the same connection were refused too, and queue behind). A replicated
    /// partition is retried while a new leader is elected (up to
    /// [`crate::limits::CLIENT_LEADER_WAIT_MS`]); one whose only node is down fails at once.
    fn resend_refused(&mut self) -> Result<(), String> {
        if self.refused.is_empty() {
            return Ok(());
        }
        let addrs: Vec<String> = self.in_flight.keys().cloned().collect();
        for addr in addrs {
            while self.in_flight.get(&addr).copied().unwrap_or(0) > 0 {
                self.recv_one(&addr)?;
            }
        }
        let topic = self.topic;
        for b in std::mem::take(&mut self.refused) {
            if let PartitionChoice::Explicit(p) = b.choice {
                self.pinned.remove(&p);
            }
            let choice = b.choice;
            let ack = self
                .leaders
                .with_partition_leader(topic, choice, b.repeatable, |c| {
                    c.call(|corr| proto::encode_produce(corr, topic, choice, &b.bytes))
                        .and_then(|r| produce_ack(&r))
                })
                .map_err(|e| format!("producing to {topic:?}: {e}"))?;
            self.acked += u64::from(ack.record_count);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<u64, String> {
        let addrs: Vec<String> = self.in_flight.keys().cloned().collect();
        for addr in addrs {
            while self.in_flight.get(&addr).copied().unwrap_or(0) > 0 {
                self.recv_one(&addr)?;
            }
        }
        self.resend_refused()?;
        Ok(self.acked)
    }
}

fn parse_headers(hs: &[String]) -> Result<Vec<(String, Vec<u8>)>, String> {
    hs.iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.as_bytes().to_vec())),
            _ => Err(format!("--header must be K=V, not {h:?}")),
        })
        .collect()
}

/// One stdin line as a record: (key, value) per the key flags, plus the headers.
fn line_record(line: String, a: &ProduceArgs, headers: &[(String, Vec<u8>)]) -> RecordIn {
    let (key, value) = match (&a.key_separator, &a.key) {
        (Some(sep), _) => match line.split_once(sep.as_str()) {
            Some((k, v)) => (Some(k.as_bytes().to_vec()), v.as_bytes().to_vec()),
            None => (None, line.into_bytes()),
        },
        (None, Some(k)) => (Some(k.as_bytes().to_vec()), line.into_bytes()),
        (None, None) => (None, line.into_bytes()),
    };
    RecordIn {
        key,
        value,
        headers: headers.to_vec(),
        ..Default::default()
    }
}

pub fn produce(server: &str, a: ProduceArgs) -> Result<(), String> {
    let mut headers = parse_headers(&a.headers)?;
    if let Some(d) = a.delay_ms {
        let at = crate::runtime::clock::system_now_ms().max(0) as u64 + d;
        headers.push((
            crate::protocol::queue::DELIVER_AT_HEADER.to_string(),
            at.to_string().into_bytes(),
        ));
    }
    if !a.to.is_empty() {
        return produce_multicast(server, &a, &headers);
    }
    let topic = a.topic.clone().unwrap_or_default();
    let mut leaders = connect_leaders(server)?;
    let partitions = leaders
        .refresh(&topic)
        .map_err(|e| format!("producing to {topic:?}: {e}"))?
        .max(1);
    let mut s = Sender {
        leaders,
        topic: &topic,
        window: a
            .window
            .clamp(1, crate::limits::PRODUCER_BATCHES_REMEMBERED),
        in_flight: BTreeMap::new(),
        acked: 0,
        round_robin: std::process::id(),
        pinned: BTreeMap::new(),
        sent: BTreeMap::new(),
        refused: Vec::new(),
    };
    let batch_max = a.batch.clamp(1, 100_000);
    let mut read = 0u64;
    let sent = send_lines(&mut s, &a, &headers, partitions, batch_max, &mut read);
    match sent.and_then(|()| s.finish()) {
        Ok(n) => {
            eprintln!("produced {n} messages");
            Ok(())
        }
        // Exactly the acknowledged count: a user re-sending after a failure knows what landed
        // (messages acknowledged later than the failure are not counted, so this is a floor).
        Err(e) => Err(format!(
            "{e}; {} of the {read} messages read were acknowledged",
            s.acked
        )),
    }
}

/// Reads stdin and sends it in batches grouped by target partition; `read` counts lines.
fn send_lines(
    s: &mut Sender<'_>,
    a: &ProduceArgs,
    headers: &[(String, Vec<u8>)],
    partitions: u32,
    batch_max: usize,
    read: &mut u64,
) -> Result<(), String> {
    // Records grouped by target partition (None = let the broker choose).
    let mut groups: std::collections::BTreeMap<Option<u32>, Vec<RecordIn>> = Default::default();
    let fixed = a.partition.or(a
        .key
        .as_ref()
        .map(|k| proto::partitioner::partition_for_key(k.as_bytes(), partitions)));
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        *read += 1;
        let rec = line_record(line, a, headers);
        let target = match (&rec.key, fixed) {
            (_, Some(p)) => Some(p),
            (Some(k), None) => Some(proto::partitioner::partition_for_key(k, partitions)),
            (None, None) => None,
        };
        let g = groups.entry(target).or_default();
        g.push(rec);
        if g.len() >= batch_max {
            let recs = std::mem::take(g);
            s.send(choice(target), &recs)?;
        }
    }
    for (target, recs) in std::mem::take(&mut groups) {
        s.send(choice(target), &recs)?;
    }
    Ok(())
}

/// `produce --to T1,T2,...`: batches multicast to every destination.
fn produce_multicast(
    server: &str,
    a: &ProduceArgs,
    headers: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let mut c = connect(server)?;
    let dests: Vec<(&str, Option<u32>)> = a.to.iter().map(|t| (t.as_str(), None)).collect();
    let batch_max = a.batch.clamp(1, 100_000);
    let mut produced = 0u64;
    let mut failures: std::collections::BTreeMap<String, String> = Default::default();
    let mut send = |recs: &[RecordIn], c: &mut Client| -> Result<(), String> {
        if recs.is_empty() {
            return Ok(());
        }
        let key = a.key.as_deref().map(str::as_bytes);
        let results = c
            .multicast(&dests, key, recs)
            .map_err(|e| format!("multicast: {e}"))?;
        for r in results {
            match r.outcome {
                Ok((_, n)) => produced += u64::from(n),
                Err((code, msg)) => {
                    let name = fb::ErrorCode(code).variant_name().unwrap_or("Unknown");
                    failures.insert(r.topic.clone(), format!("{}: {msg} ({name})", r.topic));
                }
            }
        }
        Ok(())
    };
    let mut batch = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        batch.push(line_record(line, a, headers));
        if batch.len() >= batch_max {
            send(&batch, &mut c)?;
            batch.clear();
        }
    }
    send(&batch, &mut c)?;
    eprintln!(
        "produced {produced} messages over {} destinations",
        dests.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = failures.into_values().collect();
        Err(format!(
            "{} of {} destinations failed: {}",
            list.len(),
            dests.len(),
            list.join("; ")
        ))
    }
}

fn choice(target: Option<u32>) -> PartitionChoice<'static> {
    match target {
        Some(p) => PartitionChoice::Explicit(p),
        None => PartitionChoice::RoundRobin,
    }
}
