//! The consumer-group side of the CLI: `consume --group` and `group list|describe`.
//!
//! Owns: the group consumer loop (join, heartbeat, apply assignments, fetch, print, commit,
//! leave). Must not touch: broker internals.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::cli::{parse_from, print_record, start_offset, ConsumeArgs, GroupCommand};
use crate::client::{Client, ClientError};
use crate::protocol::fb;
use crate::protocol::groups::AssignmentOut;

fn connect(server: &str) -> Result<Client, String> {
    Client::connect(server).map_err(|e| format!("cannot reach the broker at {server}: {e}"))
}

pub fn group(server: &str, cmd: GroupCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        GroupCommand::List => {
            for g in c
                .list_groups()
                .map_err(|e| format!("listing groups: {e}"))?
            {
                writeln!(out, "{g}").map_err(|e| e.to_string())?;
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
            .map_err(|e| e.to_string())?;
            for m in &d.members {
                let parts: Vec<String> = m
                    .assignments
                    .iter()
                    .map(|t| {
                        format!(
                            "{}:{}",
                            t.topic,
                            t.partitions
                                .iter()
                                .map(|p| p.to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .collect();
                writeln!(
                    out,
                    "member {} client {} assigned {}",
                    m.member_id,
                    m.client_id,
                    parts.join(" ")
                )
                .map_err(|e| e.to_string())?;
            }
            writeln!(out, "TOPIC PARTITION COMMITTED END LAG").map_err(|e| e.to_string())?;
            let mut ends: BTreeMap<(String, u32), u64> = BTreeMap::new();
            let topics: Vec<&str> = d.offsets.iter().map(|(t, _, _)| t.as_str()).collect();
            if !topics.is_empty() {
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
                writeln!(out, "{t} {p} {o} {end} {lag}").map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// One member's consumer state.
struct Member<'a> {
    c: Client,
    group: &'a str,
    topic: &'a str,
    session_ms: u32,
    member_id: String,
    generation: u64,
    rebalancing: bool,
    /// Next offset to consume per assigned partition, and the last committed one.
    positions: BTreeMap<u32, (u64, u64)>,
    last_heartbeat: Instant,
}

impl Member<'_> {
    fn join(&mut self) -> Result<(), String> {
        let a = self
            .c
            .join_group(self.group, &[self.topic.to_string()], "", self.session_ms)
            .map_err(|e| format!("joining group {:?}: {e}", self.group))?;
        self.member_id = a.member_id.clone();
        self.positions.clear();
        self.generation = 0;
        self.apply(a, &parse_from("earliest")?)
    }

    /// Applies an assignment: commit and drop revoked partitions, start assigned ones.
    fn apply(&mut self, a: AssignmentOut, from: &crate::cli::From) -> Result<(), String> {
        let assigned: Vec<u32> = a
            .assignments
            .iter()
            .filter(|t| t.topic == self.topic)
            .flat_map(|t| t.partitions.clone())
            .collect();
        let revoked: Vec<u32> = self
            .positions
            .keys()
            .filter(|p| !assigned.contains(p))
            .copied()
            .collect();
        if !revoked.is_empty() {
            self.commit(&revoked)?;
            for p in &revoked {
                self.positions.remove(p);
            }
        }
        let new: Vec<u32> = assigned
            .iter()
            .filter(|p| !self.positions.contains_key(p))
            .copied()
            .collect();
        if !new.is_empty() {
            let committed = self
                .c
                .fetch_offsets(self.group, &[self.topic.to_string()])
                .map_err(|e| format!("fetching committed offsets: {e}"))?;
            for p in new {
                let start = match committed
                    .iter()
                    .find(|(t, q, o)| t == self.topic && *q == p && *o >= 0)
                {
                    Some((_, _, o)) => *o as u64,
                    None => start_offset(&mut self.c, self.topic, p, *from)?,
                };
                self.positions.insert(p, (start, start));
            }
        }
        self.generation = a.generation;
        self.rebalancing = a.rebalancing;
        Ok(())
    }

    fn heartbeat(&mut self, from: &crate::cli::From) -> Result<(), String> {
        self.last_heartbeat = Instant::now();
        match self
            .c
            .heartbeat(self.group, &self.member_id, self.generation)
        {
            Ok(a) => {
                debug(&a);
                let changed = a.generation != self.generation;
                self.apply(a, from)?;
                if changed {
                    // Confirm at once that revoked partitions are stopped and committed.
                    let a = self
                        .c
                        .heartbeat(self.group, &self.member_id, self.generation)
                        .map_err(|e| e.to_string())?;
                    self.apply(a, from)?;
                }
                Ok(())
            }
            Err(e) if e.code() == Some(fb::ErrorCode::FencedMember) => {
                eprintln!(
                    "ringmq: fenced from group {:?} ({e}); rejoining",
                    self.group
                );
                self.join()
            }
            Err(e) => Err(format!("heartbeat: {e}")),
        }
    }

    /// Commits the positions of `partitions` that moved since the last commit.
    fn commit(&mut self, partitions: &[u32]) -> Result<(), String> {
        let offsets: Vec<(String, u32, i64)> = partitions
            .iter()
            .filter_map(|p| {
                self.positions
                    .get(p)
                    .filter(|(next, done)| next != done)
                    .map(|(next, _)| (self.topic.to_string(), *p, *next as i64))
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
                for (_, p, o) in offsets {
                    if let Some(pos) = self.positions.get_mut(&p) {
                        pos.1 = o as u64;
                    }
                }
                Ok(())
            }
            Err(e) if e.code() == Some(fb::ErrorCode::FencedMember) => {
                eprintln!("ringmq: commit rejected, fenced: {e}");
                Ok(())
            }
            Err(e) => Err(format!("committing offsets: {e}")),
        }
    }

    fn commit_all(&mut self) -> Result<(), String> {
        let all: Vec<u32> = self.positions.keys().copied().collect();
        self.commit(&all)
    }
}

pub fn consume_group(server: &str, a: &ConsumeArgs, group: &str) -> Result<(), String> {
    let from = parse_from(&a.from)?;
    let c = connect(server)?;
    let mut m = Member {
        c,
        group,
        topic: &a.topic,
        session_ms: a.session_timeout_ms,
        member_id: String::new(),
        generation: 0,
        rebalancing: false,
        positions: BTreeMap::new(),
        last_heartbeat: Instant::now(),
    };
    let joined =
        m.c.join_group(
            group,
            std::slice::from_ref(&a.topic),
            "",
            a.session_timeout_ms,
        )
        .map_err(|e| format!("joining group {group:?}: {e}"))?;
    m.member_id = joined.member_id.clone();
    debug(&joined);
    m.apply(joined, &from)?;
    let result = run_member(&mut m, a, &from);
    let commit = m.commit_all();
    let leave =
        m.c.leave_group(group, &m.member_id)
            .map_err(|e: ClientError| format!("leaving group {group:?}: {e}"));
    result.and(commit).and(leave)
}

fn run_member(m: &mut Member<'_>, a: &ConsumeArgs, from: &crate::cli::From) -> Result<(), String> {
    // At most every 500 ms: a rebalance waits for members to hear of it.
    let heartbeat_every = Duration::from_millis(u64::from(m.session_ms / 5).clamp(20, 500));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = 0u64;
    let mut idle_since = Instant::now();
    loop {
        let due = if m.rebalancing {
            heartbeat_every / 4
        } else {
            heartbeat_every
        };
        if m.last_heartbeat.elapsed() >= due {
            m.heartbeat(from)?;
        }
        let mut got_any = false;
        let partitions: Vec<u32> = m.positions.keys().copied().collect();
        let wait_ms = (heartbeat_every.as_millis() as u32 / 4).clamp(5, 100)
            / (partitions.len().max(1) as u32);
        for p in partitions {
            let Some(&(next, _)) = m.positions.get(&p) else {
                continue;
            };
            let fetched = match m.c.fetch(m.topic, p, next, 1 << 20, wait_ms) {
                Ok(f) => f,
                Err(e) if e.code() == Some(fb::ErrorCode::OffsetOutOfRange) => {
                    let start = start_offset(&mut m.c, m.topic, p, crate::cli::From::Earliest)?;
                    eprintln!(
                        "ringmq: partition {p}: offset {next} out of range; resetting to {start}"
                    );
                    if let Some(pos) = m.positions.get_mut(&p) {
                        pos.0 = start;
                    }
                    continue;
                }
                Err(e) => return Err(format!("consuming {:?} partition {p}: {e}", m.topic)),
            };
            for r in fetched.records {
                got_any = true;
                print_record(&mut out, a, p, &r).map_err(|e| e.to_string())?;
                if let Some(pos) = m.positions.get_mut(&p) {
                    pos.0 = r.offset + 1;
                }
                printed += 1;
                if a.max.is_some_and(|n| printed >= n) {
                    out.flush().map_err(|e| e.to_string())?;
                    return Ok(());
                }
            }
            if got_any {
                out.flush().map_err(|e| e.to_string())?;
                m.commit(&[p])?;
            }
        }
        if got_any || m.rebalancing {
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
