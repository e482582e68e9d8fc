//! `ringmq consume` without a group (one topic or a pattern, optional filter) and
//! `ringmq stats`.
//!
//! Owns: positions per (topic, partition), pattern refresh, printing. Must not touch: broker
//! internals.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::cli::{parse_from, print_record, start_offset, ConsumeArgs, From};
use crate::client::Client;
use crate::filter::Filter;
use crate::metadata::{pattern_matches, validate_pattern};
use crate::protocol::fb;

/// How often a pattern subscription looks for new topics.
pub const PATTERN_REFRESH_MS: u64 = 500;

pub fn connect(server: &str) -> Result<Client, String> {
    Client::connect(server).map_err(|e| format!("cannot reach the broker at {server}: {e}"))
}

/// What a consumer reads: one topic or every topic matching a pattern.
pub enum Subscription {
    Topic(String),
    Pattern(String),
}

impl Subscription {
    pub fn from_args(a: &ConsumeArgs) -> Result<Self, String> {
        if let Some(f) = &a.filter {
            Filter::compile(f).map_err(|e| format!("--filter: {e}"))?;
        }
        match (&a.topic, &a.pattern) {
            (_, Some(p)) => {
                validate_pattern(p)?;
                Ok(Self::Pattern(p.clone()))
            }
            (Some(t), None) => Ok(Self::Topic(t.clone())),
            (None, None) => Err("give a TOPIC or --pattern".into()),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Topic(t) => format!("{t:?}"),
            Self::Pattern(p) => format!("pattern {p:?}"),
        }
    }

    /// Matching topics with their partition counts. A named topic must exist.
    pub fn topics(&self, c: &mut Client) -> Result<Vec<(String, u32)>, String> {
        let meta = match self {
            Self::Topic(t) => c.metadata(&[t.as_str()]),
            Self::Pattern(_) => c.metadata(&[]),
        }
        .map_err(|e| format!("consuming {}: {e}", self.label()))?;
        Ok(meta
            .into_iter()
            .filter(|t| match self {
                Self::Topic(name) => &t.name == name,
                Self::Pattern(p) => pattern_matches(p, &t.name),
            })
            .map(|t| (t.name, t.partitions.len() as u32))
            .collect())
    }
}

pub fn consume(server: &str, a: &ConsumeArgs) -> Result<(), String> {
    let sub = Subscription::from_args(a)?;
    if let Some(g) = &a.group {
        return crate::cli_group::consume_group(server, a, g, &sub);
    }
    if let Some(s) = &a.shared {
        return crate::cli_queue::consume_shared(server, a, s, &sub);
    }
    let from = parse_from(a.from.as_deref().unwrap_or("latest"))?;
    let mut c = connect(server)?;
    let mut positions: BTreeMap<(String, u32), u64> = BTreeMap::new();
    add_new(&mut c, &sub, a, from, &mut positions)?;
    if positions.is_empty() && matches!(sub, Subscription::Topic(_)) {
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
            add_new(&mut c, &sub, a, From::Earliest, &mut positions)?;
        }
        let wait_ms = if positions.len() == 1 { 200 } else { 20 };
        let mut got_any = false;
        let keys: Vec<(String, u32)> = positions.keys().cloned().collect();
        for (topic, p) in keys {
            let at = positions[&(topic.clone(), p)];
            let fetched =
                match c.fetch_filtered(&topic, p, at, 1 << 20, wait_ms, a.filter.as_deref()) {
                    Ok(f) => f,
                    Err(e)
                        if e.code() == Some(fb::ErrorCode::OffsetOutOfRange)
                            && matches!(from, From::Earliest) =>
                    {
                        let start = start_offset(&mut c, &topic, p, From::Earliest)?;
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
                    Err(e) => return Err(format!("consuming {topic:?} partition {p}: {e}")),
                };
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
        if got_any {
            idle_since = Instant::now();
        } else if a
            .idle_ms
            .is_some_and(|ms| idle_since.elapsed().as_millis() as u64 >= ms)
        {
            return Ok(());
        } else if positions.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Adds positions for matching partitions not tracked yet, starting at `from`.
fn add_new(
    c: &mut Client,
    sub: &Subscription,
    a: &ConsumeArgs,
    from: From,
    positions: &mut BTreeMap<(String, u32), u64>,
) -> Result<(), String> {
    for (topic, n) in sub.topics(c)? {
        for p in 0..n {
            if a.partition.is_some_and(|want| want != p)
                || positions.contains_key(&(topic.clone(), p))
            {
                continue;
            }
            let start = start_offset(c, &topic, p, from)?;
            positions.insert((topic.clone(), p), start);
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
        "SHARD FORWARDS MULTICAST_COPIES REPLIES META FANOUT_APPENDS"
    )
    .map_err(|e| e.to_string())?;
    for s in stats {
        writeln!(
            out,
            "{} {} {} {} {} {}",
            s.shard, s.forwards, s.multicast_copies, s.replies, s.meta, s.fanout_appends
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
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
