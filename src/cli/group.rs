//! The consumer-group side of the CLI: `consume --group` (one topic or a pattern, optional
//! filter) and `group list|describe`.
//!
//! Owns: the group consumer loop (join, apply assignments, fetch, print, commit, leave);
//! heartbeats run on their own thread (`client::heartbeat`). Must not touch: broker internals.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use super::args::{ConsumeArgs, GroupCommand};
use super::common::{connect, parse_from, start_offset, From, Subscription, PATTERN_REFRESH_MS};
use super::output::print_record;
use crate::client::heartbeat::{
    assigned, commit_positions, heartbeat_interval, Event, Heartbeater, Pos, Tp,
};
use crate::client::{Client, ClientError};
use crate::protocol::fb;
use crate::protocol::groups::{AssignmentOut, OffsetOut};

/// How long joining a group retries while its coordinator is unknown or down (a cluster).
const JOIN_RETRY_MS: u64 = 15_000;

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

/// One member's consumer loop state. Positions live in the `Membership` shared with the
/// heartbeat thread, which keeps the member alive and hands over revoked partitions the loop
/// is not working on; the loop applies the rest between records.
struct Member<'a> {
    c: Client,
    hb: Heartbeater,
    group: &'a str,
    topics: Vec<String>,
    session_ms: u32,
    member_id: String,
    /// Newest assignment generation this loop applied (sent with commits).
    generation: u64,
    from: From,
}

/// What delivering one partition's fetch led to.
enum Flow {
    /// Go on with the next partition; whether anything was printed.
    Next(bool),
    /// The assignment changed: start a new pass.
    Restart(bool),
    /// `--max` reached.
    Done,
}

impl Member<'_> {
    fn join(&mut self, member_id: &str) -> Result<(), String> {
        // In a cluster the coordinator may be briefly unknown (the node is still learning the
        // controller's voters) or down: retry for a while, as Kafka consumers do.
        let deadline = Instant::now() + Duration::from_millis(JOIN_RETRY_MS);
        let a = loop {
            match self
                .c
                .join_group(self.group, &self.topics, member_id, self.session_ms)
            {
                Err(e)
                    if matches!(
                        e.code(),
                        Some(fb::ErrorCode::ControllerUnavailable | fb::ErrorCode::NodeUnavailable)
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => break r.map_err(|e| format!("joining group {:?}: {e}", self.group))?,
            }
        };
        debug(&a);
        if a.member_id != self.member_id {
            self.hb.joined(&a.member_id);
            self.generation = 0;
        }
        self.member_id = a.member_id.clone();
        self.apply(a)
    }

    /// Applies an assignment: commit and drop revoked partitions, start assigned ones, then
    /// confirm (the heartbeat thread tells the coordinator at once).
    fn apply(&mut self, a: AssignmentOut) -> Result<(), String> {
        let keep = assigned(&a);
        let taken = {
            let mut st = self.hb.lock();
            if a.generation < st.applied_generation {
                // Older than what the heartbeat thread already confirmed: the newer one is
                // (or was) applied instead; applying this would re-add revoked partitions.
                return Ok(());
            }
            st.applying = true;
            let revoked = st.revoked_by(&a);
            st.take(&revoked)
        };
        let result = self.apply_taken(&a, &keep, &taken);
        self.hb.lock().applying = false;
        result
    }

    fn apply_taken(
        &mut self,
        a: &AssignmentOut,
        keep: &BTreeSet<Tp>,
        taken: &[(Tp, Pos)],
    ) -> Result<(), String> {
        match commit_positions(
            &mut self.c,
            self.group,
            &self.member_id,
            self.generation,
            taken,
        ) {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => {
                // Fenced: never confirm giving up what could not be committed; the coordinator
                // expires the revocation, and the heartbeat thread reports the fencing.
                self.hb.lock().refused += refused;
                return Ok(());
            }
            Err(e) => return Err(format!("committing offsets: {e}")),
        }
        let new: Vec<Tp> = {
            let st = self.hb.lock();
            keep.iter()
                .filter(|k| !st.positions.contains_key(*k))
                .cloned()
                .collect()
        };
        if !new.is_empty() {
            let committed: Vec<OffsetOut> = self
                .c
                .fetch_offsets(self.group, &self.topics)
                .map_err(|e| format!("fetching committed offsets: {e}"))?;
            let mut starts = Vec::new();
            for (t, p) in new {
                let start = match committed
                    .iter()
                    .find(|(ct, cp, o)| *ct == t && *cp == p && *o >= 0)
                {
                    Some((_, _, o)) => *o as u64,
                    None => start_offset(&mut self.c, &t, p, self.from)?,
                };
                starts.push(((t, p), start));
            }
            let mut st = self.hb.lock();
            for (tp, start) in starts {
                st.positions.entry(tp).or_insert(Pos {
                    next: start,
                    committed: start,
                    delivered_uncommitted: 0,
                });
            }
        }
        self.generation = self.generation.max(a.generation);
        self.hb.confirm(a.generation);
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
        let mut st = self.hb.lock();
        let lost: u64 = st.positions.values().map(|p| p.delivered_uncommitted).sum();
        st.refused += lost;
        st.positions.clear();
    }

    /// Commits the positions of `keys` that moved since the last commit. A refused commit
    /// (fenced) drops those partitions and rejoins: this member stops delivering them.
    fn commit(&mut self, keys: &[Tp]) -> Result<(), String> {
        let snapshot: Vec<(Tp, Pos)> = {
            let st = self.hb.lock();
            keys.iter()
                .filter_map(|k| st.positions.get(k).map(|p| (k.clone(), *p)))
                .collect()
        };
        let committed = commit_positions(
            &mut self.c,
            self.group,
            &self.member_id,
            self.generation,
            &snapshot,
        );
        match committed {
            Ok(Ok(())) => {
                let mut st = self.hb.lock();
                for (k, at) in snapshot {
                    if let Some(pos) = st.positions.get_mut(&k) {
                        pos.committed = at.next;
                        pos.delivered_uncommitted -=
                            at.delivered_uncommitted.min(pos.delivered_uncommitted);
                    }
                }
                Ok(())
            }
            Ok(Err(_)) => {
                eprintln!("ringmq: dropping the partition(s) and rejoining");
                {
                    let mut st = self.hb.lock();
                    let lost = st.take(keys);
                    st.refused += lost
                        .iter()
                        .map(|(_, p)| p.delivered_uncommitted)
                        .sum::<u64>();
                }
                // Save what can still be saved before rejoining under a new id.
                let rest: Vec<(Tp, Pos)> = {
                    let st = self.hb.lock();
                    st.positions.iter().map(|(k, p)| (k.clone(), *p)).collect()
                };
                let saved = commit_positions(
                    &mut self.c,
                    self.group,
                    &self.member_id,
                    self.generation,
                    &rest,
                );
                if matches!(saved, Ok(Ok(()))) {
                    self.hb.lock().positions.clear();
                } else {
                    self.lose_all();
                }
                let old = std::mem::take(&mut self.member_id);
                let _ = self.c.leave_group(self.group, &old);
                self.join("")
            }
            Err(e) => Err(format!("committing offsets: {e}")),
        }
    }

    fn commit_all(&mut self) -> Result<(), String> {
        let all: Vec<Tp> = self.hb.lock().positions.keys().cloned().collect();
        self.commit(&all)
    }

    /// Fetches one partition, prints its records (applying assignment changes between
    /// records) and commits what was printed.
    fn deliver(
        &mut self,
        tp: &Tp,
        a: &ConsumeArgs,
        wait_ms: u32,
        out: &mut impl Write,
        printed: &mut u64,
    ) -> Result<Flow, String> {
        let (topic, p) = (&tp.0, tp.1);
        let Some(next) = self.hb.lock().positions.get(tp).map(|pos| pos.next) else {
            return Ok(Flow::Next(false));
        };
        let fetched = match self.c.fetch_filtered(
            topic,
            p,
            next,
            1 << 20,
            wait_ms,
            a.filter.as_deref(),
        ) {
            Ok(f) => f,
            Err(e) if e.code() == Some(fb::ErrorCode::OffsetOutOfRange) => {
                let start = start_offset(&mut self.c, topic, p, From::Earliest)?;
                eprintln!("ringmq: {topic} partition {p}: offset {next} out of range; resetting to {start}");
                if let Some(pos) = self.hb.lock().positions.get_mut(tp) {
                    pos.next = start;
                }
                return Ok(Flow::Next(false));
            }
            Err(e) => return Err(format!("consuming {topic:?} partition {p}: {e}")),
        };
        let mut printed_here = false;
        let mut restart = false;
        for r in &fetched.records {
            // Between records: a revocation or fencing stops this partition at once.
            if self.sync()? {
                restart = true;
                break;
            }
            printed_here = true;
            print_record(out, a, topic, p, r).map_err(|e| e.to_string())?;
            if let Some(pos) = self.hb.lock().positions.get_mut(tp) {
                pos.next = r.offset + 1;
                pos.delivered_uncommitted += 1;
            }
            *printed += 1;
            if a.max.is_some_and(|n| *printed >= n) {
                out.flush().map_err(|e| e.to_string())?;
                return Ok(Flow::Done);
            }
        }
        if !restart {
            // A filtered fetch moves past non-matching messages too.
            if let Some(pos) = self.hb.lock().positions.get_mut(tp) {
                pos.next = pos.next.max(fetched.next_offset);
            }
        }
        if printed_here {
            out.flush().map_err(|e| e.to_string())?;
        }
        self.commit(std::slice::from_ref(tp))?;
        Ok(if restart {
            Flow::Restart(printed_here)
        } else {
            Flow::Next(printed_here)
        })
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
        from,
    };
    // Whatever fails after joining, the member leaves: no ghost member keeps partitions.
    let result = m.join("").and_then(|()| run_member(&mut m, a, sub));
    m.hb.stop();
    let commit = m.commit_all();
    let leave = if m.member_id.is_empty() {
        Ok(())
    } else {
        m.c.leave_group(group, &m.member_id)
            .map_err(|e: ClientError| format!("leaving group {group:?}: {e}"))
    };
    let refused = m.hb.lock().refused;
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
        let keys: Vec<Tp> = m.hb.lock().positions.keys().cloned().collect();
        let wait_ms =
            (heartbeat_every.as_millis() as u32 / 4).clamp(5, 100) / (keys.len().max(1) as u32);
        for tp in keys {
            m.hb.lock().delivering = Some(tp.clone());
            let flow = m.deliver(&tp, a, wait_ms, &mut out, &mut printed);
            m.hb.lock().delivering = None;
            match flow? {
                Flow::Next(got) => got_any |= got,
                Flow::Restart(got) => {
                    got_any |= got;
                    break;
                }
                Flow::Done => return Ok(()),
            }
        }
        if got_any || m.hb.rebalancing() {
            // Waiting for partitions that are moving to us is not idleness.
            idle_since = Instant::now();
        } else if a
            .idle_ms
            .is_some_and(|ms| idle_since.elapsed().as_millis() as u64 >= ms)
        {
            return Ok(());
        } else if m.hb.lock().positions.is_empty() {
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
