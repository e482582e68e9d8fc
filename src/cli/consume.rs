//! `ringmq consume` without a group (one topic or a pattern, optional filter) and
//! `ringmq stats`.
//!
//! Owns: positions per (topic, partition), pattern refresh, printing. Must not touch: broker
//! internals.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::args::ConsumeArgs;
use super::common::{
    connect, connect_leaders, parse_from, unavailable_for_now, From, Subscription,
    PATTERN_REFRESH_MS,
};
use super::output::print_record;
use crate::client::leaders::Leaders;
use crate::protocol::fb;

pub fn consume(server: &str, a: &ConsumeArgs) -> Result<(), String> {
    let sub = Subscription::from_args(a)?;
    if let Some(g) = &a.group {
        return super::group::consume_group(server, a, g, &sub);
    }
    if let Some(s) = &a.shared {
        return super::queue::consume_shared(server, a, s, &sub);
    }
    let from = parse_from(a.from.as_deref().unwrap_or("latest"))?;
    // Each partition is read from its leader (one connection per node in a cluster).
    let mut c = connect_leaders(server)?;
    let mut positions: BTreeMap<(String, u32), u64> = BTreeMap::new();
    let mut waiting = Waiting::default();
    add_new(&mut c, &sub, a, from, (&mut positions, &mut waiting))?;
    if positions.is_empty() && waiting.starts.is_empty() && matches!(sub, Subscription::Topic(_)) {
        return Err(format!(
            "{} has no partition {:?}",
            sub.label(),
            a.partition
        ));
    }
    let mut printed = 0u64;
    let mut idle_since = Instant::now();
    let mut refreshed = Instant::now();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        if matches!(sub, Subscription::Pattern(_))
            && refreshed.elapsed() >= Duration::from_millis(PATTERN_REFRESH_MS)
        {
            refreshed = Instant::now();
            // Topics created after the subscription started are read from their start.
            add_new(
                &mut c,
                &sub,
                a,
                From::Earliest,
                (&mut positions, &mut waiting),
            )?;
        }
        waiting.retry(&mut c, &mut positions)?;
        let wait_ms = if positions.len() == 1 { 200 } else { 20 };
        let mut got_any = false;
        let mut asked = 0usize;
        let keys: Vec<(String, u32)> = positions.keys().cloned().collect();
        for (topic, p) in keys {
            // A partition whose node is down is asked again only every retry interval.
            if !waiting.due(&topic, p) {
                continue;
            }
            asked += 1;
            let at = positions[&(topic.clone(), p)];
            let fetched = match c.fetch(&topic, p, at, 1 << 20, wait_ms, a.filter.as_deref()) {
                Ok(f) => f,
                Err(e)
                    if e.code() == Some(fb::ErrorCode::OffsetOutOfRange)
                        && matches!(from, From::Earliest) =>
                {
                    let start = start_via(&mut c, &topic, p, From::Earliest).map_err(|e| {
                        format!("finding the start of {topic:?} partition {p}: {e}")
                    })?;
                    positions.insert((topic, p), start);
                    continue;
                }
                Err(e)
                    if e.code() == Some(fb::ErrorCode::UnknownTopic)
                        && matches!(sub, Subscription::Pattern(_)) =>
                {
                    positions.retain(|(t, _), _| *t != topic);
                    continue;
                }
                Err(e)
                    if unavailable_for_now(&e)
                        || e.code() == Some(fb::ErrorCode::OutcomeUnknown) =>
                {
                    waiting.warn(&topic, p, &e);
                    continue;
                }
                Err(e) => return Err(format!("consuming {topic:?} partition {p}: {e}")),
            };
            waiting.recovered(&topic, p);
            positions.insert((topic.clone(), p), fetched.next_offset.max(at));
            for r in fetched.records {
                got_any = true;
                print_record(&mut out, a, &topic, p, &r).map_err(|e| e.to_string())?;
                printed += 1;
                if a.max.is_some_and(|m| printed >= m) {
                    out.flush().map_err(|e| e.to_string())?;
                    return Ok(());
                }
            }
        }
        out.flush().map_err(|e| e.to_string())?;
        if super::common::idle_for_long(a.idle_ms, got_any, &mut idle_since) {
            return Ok(());
        } else if !got_any && (positions.is_empty() || asked == 0) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Cluster: partitions skipped for now because their node is down (each warned about once
/// until it answers again), and those whose start is still to be found.
#[derive(Default)]
struct Waiting {
    /// Partitions warned about, and when they were last asked.
    warned: BTreeMap<(String, u32), Instant>,
    starts: BTreeMap<(String, u32), From>,
    last_try: Option<Instant>,
}

/// How often a consumer retries partitions whose node was down.
const UNAVAILABLE_RETRY_MS: u64 = 500;

impl Waiting {
    fn warn(&mut self, topic: &str, p: u32, e: &crate::client::ClientError) {
        let first = self
            .warned
            .insert((topic.to_string(), p), Instant::now())
            .is_none();
        if first {
            eprintln!("ringmq: {topic} partition {p} unavailable for now ({e}); reading the others and retrying it");
        }
    }

    fn recovered(&mut self, topic: &str, p: u32) {
        if self.warned.remove(&(topic.to_string(), p)).is_some() {
            eprintln!("ringmq: {topic} partition {p} is available again");
        }
    }

    /// Whether to ask partition `p` now: always, unless it was unavailable less than
    /// [`UNAVAILABLE_RETRY_MS`] ago.
    fn due(&self, topic: &str, p: u32) -> bool {
        self.warned
            .get(&(topic.to_string(), p))
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(UNAVAILABLE_RETRY_MS))
    }

    /// Tries again (every [`UNAVAILABLE_RETRY_MS`]) to find the start of waiting partitions.
    fn retry(
        &mut self,
        c: &mut Leaders,
        positions: &mut BTreeMap<(String, u32), u64>,
    ) -> Result<(), String> {
        if self.starts.is_empty()
            || self
                .last_try
                .is_some_and(|t| t.elapsed() < Duration::from_millis(UNAVAILABLE_RETRY_MS))
        {
            return Ok(());
        }
        self.last_try = Some(Instant::now());
        let starts = std::mem::take(&mut self.starts);
        for ((topic, p), from) in starts {
            self.start(c, (&topic, p, from), positions)?;
        }
        Ok(())
    }

    /// Finds where partition `p` starts and tracks it, or keeps it waiting while its node is
    /// down.
    fn start(
        &mut self,
        c: &mut Leaders,
        at: (&str, u32, From),
        positions: &mut BTreeMap<(String, u32), u64>,
    ) -> Result<(), String> {
        let (topic, p, from) = at;
        match start_via(c, topic, p, from) {
            Ok(start) => {
                self.recovered(topic, p);
                positions.insert((topic.to_string(), p), start);
            }
            Err(e)
                if unavailable_for_now(&e) || e.code() == Some(fb::ErrorCode::OutcomeUnknown) =>
            {
                self.warn(topic, p, &e);
                self.starts.insert((topic.to_string(), p), from);
            }
            Err(e) => return Err(format!("finding the start of {topic:?} partition {p}: {e}")),
        }
        Ok(())
    }
}

/// The start offset of `p` under `from`, asked of its leader.
fn start_via(
    c: &mut Leaders,
    topic: &str,
    p: u32,
    from: From,
) -> Result<u64, crate::client::ClientError> {
    match from {
        From::Earliest => c.list_offset(topic, p, -1),
        From::Latest => c.list_offset(topic, p, -2),
        From::Offset(o) => Ok(o),
        From::Time(ms) => c.list_offset(topic, p, ms.max(0)),
    }
}

/// Adds positions for matching partitions not tracked yet, starting at `from`.
fn add_new(
    c: &mut Leaders,
    sub: &Subscription,
    a: &ConsumeArgs,
    from: From,
    track: (&mut BTreeMap<(String, u32), u64>, &mut Waiting),
) -> Result<(), String> {
    let (positions, waiting) = track;
    for (topic, n) in sub.topics(c.bootstrap().map_err(|e| e.to_string())?)? {
        if !positions.keys().any(|(t, _)| *t == topic) {
            // Leaders of a topic seen for the first time.
            c.refresh(&topic)
                .map_err(|e| format!("consuming {topic:?}: {e}"))?;
        }
        for p in 0..n {
            let key = (topic.clone(), p);
            if a.partition.is_some_and(|want| want != p)
                || positions.contains_key(&key)
                || waiting.starts.contains_key(&key)
            {
                continue;
            }
            waiting.start(c, (&topic, p, from), positions)?;
        }
    }
    Ok(())
}

pub fn stats(server: &str) -> Result<(), String> {
    let mut c = connect(server)?;
    let stats = c.stats().map_err(|e| format!("reading stats: {e}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "SHARD FORWARDS MULTICAST_COPIES REPLIES META FANOUT_APPENDS NODE_FORWARDS NODE_MULTICAST_COPIES NODE_FORWARDED_IN REPLICAS LEADING REPLICATION_OUT"
    )
    .map_err(|e| e.to_string())?;
    for s in stats {
        writeln!(
            out,
            "{} {} {} {} {} {} {} {} {} {} {} {}",
            s.shard,
            s.forwards,
            s.multicast_copies,
            s.replies,
            s.meta,
            s.fanout_appends,
            s.node_forwards,
            s.node_multicast_copies,
            s.node_forwarded_in,
            s.replicas,
            s.replicas_leading,
            replication_out(&s.replica_peers)
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Replication traffic per node as `node:frames/bytes/messages,...` (`-` for none).
fn replication_out(peers: &[crate::protocol::multicast::ReplicaPeerOut]) -> String {
    if peers.is_empty() {
        return "-".into();
    }
    peers
        .iter()
        .map(|p| format!("{}:{}/{}/{}", p.node, p.frames, p.bytes, p.messages))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn status(server: &str) -> Result<(), String> {
    let mut c = connect(server)?;
    let parts = c.status().map_err(|e| format!("reading status: {e}"))?;
    let mut out = std::io::stdout().lock();
    let mut bad = 0;
    for p in &parts {
        if !p.healthy {
            bad += 1;
        }
        writeln!(
            out,
            "{} {} {} {} {}",
            p.topic,
            p.partition,
            p.shard,
            if p.healthy { "ok" } else { "UNAVAILABLE" },
            p.message
        )
        .map_err(|e| e.to_string())?;
    }
    if bad > 0 {
        return Err(format!("{bad} of {} partitions unavailable", parts.len()));
    }
    Ok(())
}
