//! `ringmq produce`: lines from stdin to one topic, or a multicast to a destination list.
//!
//! Owns: batching lines into records and printing acknowledgements. Must not touch: other
//! commands.

use std::io::BufRead;

use super::args::ProduceArgs;
use super::common::connect;
use crate::client::{produce_ack, Client};
use crate::protocol::{self as proto, fb, PartitionChoice, RecordIn};

/// Batches of records per partition choice, sent pipelined; every ack is awaited.
struct Sender<'a> {
    client: Client,
    topic: &'a str,
    window: usize,
    in_flight: usize,
    acked: u64,
}

impl Sender<'_> {
    fn send(&mut self, choice: PartitionChoice<'_>, records: &[RecordIn]) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        if self.in_flight >= self.window {
            self.recv_one()?;
        }
        let batch = proto::encode_record_batch(records);
        let topic = self.topic;
        self.client
            .send(|c| proto::encode_produce(c, topic, choice, &batch))
            .map_err(|e| format!("producing to {topic:?}: {e}"))?;
        self.client.flush().map_err(|e| e.to_string())?;
        self.in_flight += 1;
        Ok(())
    }

    fn recv_one(&mut self) -> Result<(), String> {
        let r = self
            .client
            .recv()
            .map_err(|e| format!("producing to {:?}: {e}", self.topic))?;
        let ack = produce_ack(&r).map_err(|e| format!("producing to {:?}: {e}", self.topic))?;
        self.acked += u64::from(ack.record_count);
        self.in_flight -= 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<u64, String> {
        while self.in_flight > 0 {
            self.recv_one()?;
        }
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
    let mut client = connect(server)?;
    let partitions = client
        .metadata(&[topic.as_str()])
        .map_err(|e| format!("producing to {topic:?}: {e}"))?
        .first()
        .map(|t| t.partitions.len() as u32)
        .unwrap_or(1);
    let mut s = Sender {
        client,
        topic: &topic,
        window: a.window.max(1),
        in_flight: 0,
        acked: 0,
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
