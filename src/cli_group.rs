//! The consumer-group side of the CLI: `consume --group` (one topic or a pattern, optional
//! filter) and `group list|describe`.
//!
//! Owns: the group consumer loop (join, apply assignments, fetch, print, commit, leave);
//! heartbeats run on their own thread (`client::heartbeat`). Must not touch: broker internals.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use crate::cli::{parse_from, print_record, start_offset, ConsumeArgs, From, GroupCommand};
use crate::cli_consume::{connect, Subscription, PATTERN_REFRESH_MS};
use crate::client::heartbeat::{heartbeat_interval, Event, Heartbeater};
use crate::client::{Client, ClientError};
use crate::protocol::fb;
use crate::protocol::groups::{AssignmentOut, OffsetOut};

pub fn group(server: &str, cmd: GroupCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    let mut out = std::io::stdout().lock();
    let w = |e: std::io::Error| e.to_string();
    match cmd {
        GroupCommand::List => {
            for g in c
                .list_groups()
                .map_err(|e| format!("listing groups: {e}"))?
            {
                writeln!(out, "{g}").map_err(w)?;
            }
        }
        GroupCommand::Describe { group } => {
            let d = c
                .describe_group(&group)
                .map_err(|e| format!("describing group {group:?}: {e}"))?;
            writeln!(
                out,
                "group {} generation {} members {}",
                d.group,
                d.generation,
                d.members.len()
            )
            .map_err(w)?;
            for m in &d.members {
                let parts: Vec<String> = m
                    .assignments
                    .iter()
                    .map(|t| {
                        let ps: Vec<String> = t.partitions.iter().map(|p| p.to_string()).collect();
                        format!("{}:{}", t.topic, ps.join(","))
                    })
                    .collect();
                writeln!(
                    out,
                    "member {} client {} assigned {}",
                    m.member_id,
                    m.client_id,
                    parts.join(" ")
                )
                .map_err(w)?;
            }
            writeln!(out, "TOPIC PARTITION COMMITTED END LAG").map_err(w)?;
            let mut ends: BTreeMap<(String, u32), u64> = BTreeMap::new();
            if !d.offsets.is_empty() {
                for t in c.metadata(&[]).map_err(|e| e.to_string())? {
                    for p in t.partitions {
                        ends.insert((t.name.clone(), p.partition), p.end_offset);
                    }
                }
            }
            for (t, p, o) in &d.offsets {
                let end = ends.get(&(t.clone(), *p)).copied();
                let lag = end
                    .map(|e| (e as i64 - o).max(0).to_string())
                    .unwrap_or_else(|| "?".into());
                let end = end.map(|e| e.to_string()).unwrap_or_else(|| "?".into());
                writeln!(out, "{t} {p} {o} {end} {lag}").map_err(w)?;
            }
        }
    }
    Ok(())
}

/// Where a member is in one assigned partition.
#[derive(Clone, Copy, Debug)]
struct Pos {
    /// Next offset to consume.
    next: u64,
    /// Last committed next offset.
    committed: u64,
    /// Messages printed since the last successful commit.
    printed_uncommitted: u64,
}

/// One member's consumer state. Heartbeats run on their own thread ([`Heartbeater`]); this
/// loop applies what they bring between records.
struct Member<'a> {
    c: Client,
    hb: Heartbeater,
    group: &'a str,
    topics: Vec<String>,
    session_ms: u32,
    member_id: String,
    generation: u64,
    positions: BTreeMap<(String, u32), Pos>,
    from: From,
    /// Printed messages whose commit the coordinator refused (they may be delivered again).
    refused: u64,
}

impl Member<'_> {
    fn join(&mut self, member_id: &str) -> Result<(), String> {
        let a = self
            .c
            .join_group(self.group, &self.topics, member_id, self.session_ms)
            .map_err(|e| format!("joining group {:?}: {e}", self.group))?;
        debug(&a);
        if a.member_id != self.member_id {
            self.positions.clear();
            self.generation = 0;
        }
        self.member_id = a.member_id.clone();
        self.apply(a)
    }

    /// Applies an assignment: commit and drop revoked partitions, start assigned ones, then
    /// tell the heartbeat thread (which confirms the revocation at once).
    fn apply(&mut self, a: AssignmentOut) -> Result<(), String> {
        let assigned: BTreeSet<(String, u32)> = a
            .assignments
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p)))
            .collect();
        let revoked: Vec<(String, u32)> = self
            .positions
            .keys()
            .filter(|k| !assigned.contains(*k))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            self.commit(&revoked)?;
            for k in &revoked {
                self.positions.remove(k);
            }
        }
        let new: Vec<(String, u32)> = assigned
            .into_iter()
            .filter(|k| !self.positions.contains_key(k))
            .collect();
        if !new.is_empty() {
            let committed: Vec<OffsetOut> = self
                .c
                .fetch_offsets(self.group, &self.topics)
                .map_err(|e| format!("fetching committed offsets: {e}"))?;
            for (t, p) in new {
                let start = match committed
                    .iter()
                    .find(|(ct, cp, o)| *ct == t && *cp == p && *o >= 0)
                {
                    Some((_, _, o)) => *o as u64,
                    None => start_offset(&mut self.c, &t, p, self.from)?,
                };
                let pos = Pos {
                    next: start,
                    committed: start,
                    printed_uncommitted: 0,
                };
                self.positions.insert((t, p), pos);
            }
        }
        self.generation = a.generation;
        self.hb.set_member(&self.member_id, self.generation);
        Ok(())
    }

    /// Applies what the heartbeat thread learned. Returns whether the assignment changed (the
    /// caller restarts its pass over partitions).
    fn sync(&mut self) -> Result<bool, String> {
        match self.hb.poll() {
            Event::Nothing => Ok(false),
            Event::Assignment(a) => {
                debug(&a);
                self.apply(a)?;
                Ok(true)
            }
            Event::Fenced(why) => {
                eprintln!(
                    "ringmq: fenced from group {:?} ({why}); rejoining",
                    self.group
                );
                self.lose_all();
                self.member_id.clear();
                self.join("")?;
                Ok(true)
            }
            Event::Failed(e) => Err(e),
        }
    }

    /// The member was fenced: its positions are no longer its to commit.
    fn lose_all(&mut self) {
        let keys: Vec<(String, u32)> = self.positions.keys().cloned().collect();
        self.lose(&keys);
    }

    fn lose(&mut self, keys: &[(String, u32)]) {
        for k in keys {
            if let Some(pos) = self.positions.remove(k) {
                self.refused += pos.printed_uncommitted;
            }
        }
    }

    /// Commits the positions of `keys` that moved since the last commit. A refused commit
    /// (fenced) drops those partitions and rejoins: this member stops delivering them.
    fn commit(&mut self, keys: &[(String, u32)]) -> Result<(), String> {
        let offsets: Vec<OffsetOut> = keys
            .iter()
            .filter_map(|k| {
                self.positions
                    .get(k)
                    .filter(|pos| pos.next != pos.committed)
                    .map(|pos| (k.0.clone(), k.1, pos.next as i64))
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        match self
            .c
            .commit_offsets(self.group, &self.member_id, self.generation, &offsets)
        {
            Ok(()) => {
                for (t, p, o) in offsets {
                    if let Some(pos) = self.positions.get_mut(&(t, p)) {
                        pos.committed = o as u64;
                        pos.printed_uncommitted = 0;
                    }
                }
                Ok(())
            }
            Err(e) if e.code() == Some(fb::ErrorCode::FencedMember) => {
                eprintln!("ringmq: commit rejected ({e}); dropping the partition(s) and rejoining");
                let keys: Vec<(String, u32)> =
                    offsets.into_iter().map(|(t, p, _)| (t, p)).collect();
                self.lose(&keys);
                let old = std::mem::take(&mut self.member_id);
                let _ = self.c.leave_group(self.group, &old);
                self.join("")
            }
            Err(e) => Err(format!("committing offsets: {e}")),
        }
    }

    fn commit_all(&mut self) -> Result<(), String> {
        let all: Vec<(String, u32)> = self.positions.keys().cloned().collect();
        self.commit(&all)
    }
}

pub fn consume_group(
    server: &str,
    a: &ConsumeArgs,
    group: &str,
    sub: &Subscription,
) -> Result<(), String> {
    let from = parse_from(a.from.as_deref().unwrap_or("latest"))?;
    let mut c = connect(server)?;
    let topics: Vec<String> = sub.topics(&mut c)?.into_iter().map(|t| t.0).collect();
    if topics.is_empty() {
        return Err(format!("no topic matches {}", sub.label()));
    }
    let hb = Heartbeater::start(server, group, a.session_timeout_ms)
        .map_err(|e| format!("cannot reach the broker at {server}: {e}"))?;
    let mut m = Member {
        c,
        hb,
        group,
        topics,
        session_ms: a.session_timeout_ms,
        member_id: String::new(),
        generation: 0,
        positions: BTreeMap::new(),
        from,
        refused: 0,
    };
    m.join("")?;
    let result = run_member(&mut m, a, sub);
    let commit = m.commit_all();
    let Member {
        mut c,
        hb,
        member_id,
        refused,
        ..
    } = m;
    hb.stop();
    let leave = c
        .leave_group(group, &member_id)
        .map_err(|e: ClientError| format!("leaving group {group:?}: {e}"));
    let refused = if refused > 0 {
        Err(format!(
            "{refused} printed message(s) could not be committed (this member was fenced from group {group:?}); another member may deliver them again"
        ))
    } else {
        Ok(())
    };
    result.and(commit).and(leave).and(refused)
}

fn run_member(m: &mut Member<'_>, a: &ConsumeArgs, sub: &Subscription) -> Result<(), String> {
    let heartbeat_every = heartbeat_interval(m.session_ms);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = 0u64;
    let mut idle_since = Instant::now();
    let mut refreshed = Instant::now();
    loop {
        if matches!(sub, Subscription::Pattern(_))
            && refreshed.elapsed() >= Duration::from_millis(PATTERN_REFRESH_MS)
        {
            refreshed = Instant::now();
            let topics: Vec<String> = sub.topics(&mut m.c)?.into_iter().map(|t| t.0).collect();
            if topics != m.topics {
                // New topics: join again with the same member id and the new subscription.
                m.topics = topics;
                m.from = From::Earliest;
                let id = m.member_id.clone();
                m.join(&id)?;
            }
        }
        m.sync()?;
        let mut got_any = false;
        let keys: Vec<(String, u32)> = m.positions.keys().cloned().collect();
        let wait_ms =
            (heartbeat_every.as_millis() as u32 / 4).clamp(5, 100) / (keys.len().max(1) as u32);
        'pass: for (topic, p) in keys {
            let Some(next) = m.positions.get(&(topic.clone(), p)).map(|pos| pos.next) else {
                continue;
            };
            let fetched = match m.c.fetch_filtered(
                &topic,
                p,
                next,
                1 << 20,
                wait_ms,
                a.filter.as_deref(),
            ) {
                Ok(f) => f,
                Err(e) if e.code() == Some(fb::ErrorCode::OffsetOutOfRange) => {
                    let start = start_offset(&mut m.c, &topic, p, From::Earliest)?;
                    eprintln!("ringmq: {topic} partition {p}: offset {next} out of range; resetting to {start}");
                    if let Some(pos) = m.positions.get_mut(&(topic.clone(), p)) {
                        pos.next = start;
                    }
                    continue;
                }
                Err(e) => return Err(format!("consuming {topic:?} partition {p}: {e}")),
            };
            let mut printed_here = false;
            for r in &fetched.records {
                // Between records: a revocation or fencing stops this partition at once.
                if m.sync()? {
                    out.flush().map_err(|e| e.to_string())?;
                    got_any |= printed_here;
                    break 'pass;
                }
                printed_here = true;
                print_record(&mut out, a, &topic, p, r).map_err(|e| e.to_string())?;
                if let Some(pos) = m.positions.get_mut(&(topic.clone(), p)) {
                    pos.next = r.offset + 1;
                    pos.printed_uncommitted += 1;
                }
                printed += 1;
                if a.max.is_some_and(|n| printed >= n) {
                    out.flush().map_err(|e| e.to_string())?;
                    return Ok(());
                }
            }
            // A filtered fetch moves past non-matching messages too.
            if let Some(pos) = m.positions.get_mut(&(topic.clone(), p)) {
                pos.next = pos.next.max(fetched.next_offset);
            }
            if printed_here {
                got_any = true;
                out.flush().map_err(|e| e.to_string())?;
            }
            m.commit(&[(topic.clone(), p)])?;
        }
        if got_any || m.hb.rebalancing() {
            // Waiting for partitions that are moving to us is not idleness.
            idle_since = Instant::now();
        } else if a
            .idle_ms
            .is_some_and(|ms| idle_since.elapsed().as_millis() as u64 >= ms)
        {
            return Ok(());
        } else if m.positions.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// With RINGMQ_DEBUG set, prints each assignment received to stderr.
fn debug(a: &AssignmentOut) {
    if std::env::var_os("RINGMQ_DEBUG").is_some() {
        eprintln!("ringmq: assignment {a:?}");
    }
}
