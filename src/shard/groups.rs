//! Consumer-group coordination as a pure state machine (no I/O, time passed in).
//!
//! Owns: the groups whose coordinator is this shard — members, partition owners, pending
//! revocations, committed offsets. Must not touch: logs or sockets (the caller persists
//! commits before acknowledging them).
//!
//! Incremental (cooperative) rebalancing: when a partition must move from member A to B, it is
//! first *revoked* from A (removed from A's assignment, generation bumped). A keeps the right to
//! commit it until it heartbeats with that generation (meaning it stopped and committed), or
//! leaves, or expires; only then is the partition given to B. Partitions that do not move are
//! never paused. A commit is accepted only from a live member that owns (or is giving up) the
//! partition: a fenced or expired member's late commit is rejected.

use std::collections::{BTreeMap, BTreeSet};

use crate::protocol::groups::{AssignmentOut, GroupOut, MemberOut, OffsetOut, TopicParts};

/// (topic, partition).
pub type Tp = (String, u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupError {
    UnknownGroup(String),
    /// Unknown member, or it does not own a partition it commits.
    Fenced(String),
    /// A new group would exceed [`crate::limits::GROUPS_PER_SHARD_MAX`].
    TooManyGroups(usize),
}

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownGroup(g) => write!(f, "unknown group {g:?}"),
            Self::Fenced(why) => write!(f, "fenced: {why}"),
            Self::TooManyGroups(n) => write!(
                f,
                "this coordinator holds {n} groups, its limit; groups without members or \
                 committed offsets are forgotten"
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    client_id: String,
    topics: Vec<String>,
    session_timeout_ms: u64,
    last_seen_ms: u64,
}

#[derive(Debug, Clone, Default)]
struct Group {
    generation: u64,
    members: BTreeMap<String, Member>,
    /// Current owner of each assigned partition.
    owners: BTreeMap<Tp, String>,
    /// Partitions taken from a member that has not yet confirmed:
    /// (member, generation, since_ms). A member that does not confirm within its session
    /// timeout is expired (it is stuck), so the partition moves on.
    revoking: BTreeMap<Tp, (String, u64, u64)>,
    /// Committed next offsets.
    offsets: BTreeMap<Tp, i64>,
}

/// All groups coordinated by one shard.
#[derive(Debug, Default)]
pub struct Coordinator {
    groups: BTreeMap<String, Group>,
    next_member: u64,
    /// When `expire` last ran: a longer gap means the coordinator itself was not running
    /// (process stopped, machine stalled), and that time is not held against members.
    last_expire_ms: Option<u64>,
}

/// A gap between two expiry checks longer than this is a stall of the coordinator.
pub const STALL_MS: u64 = 1_000;

impl Coordinator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a committed offset (startup replay of the state log).
    pub fn restore_offset(&mut self, group: &str, tp: Tp, offset: i64) {
        self.groups
            .entry(group.to_string())
            .or_default()
            .offsets
            .insert(tp, offset);
    }

    /// Whether `group` exists or one more group fits.
    pub fn may_join(&self, group: &str) -> Result<(), GroupError> {
        if self.groups.contains_key(group)
            || self.groups.len() < crate::limits::GROUPS_PER_SHARD_MAX
        {
            Ok(())
        } else {
            Err(GroupError::TooManyGroups(self.groups.len()))
        }
    }

    /// Forgets groups with neither members nor committed offsets.
    fn forget_empty(&mut self) {
        self.groups
            .retain(|_, g| !g.members.is_empty() || !g.offsets.is_empty());
    }

    pub fn group_names(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Adds (or refreshes) a member and rebalances.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        group: &str,
        member_id: &str,
        client_id: &str,
        topics: Vec<String>,
        session_timeout_ms: u64,
        now_ms: u64,
        partitions_of: &dyn Fn(&str) -> u32,
    ) -> AssignmentOut {
        let id = if member_id.is_empty() {
            self.next_member += 1;
            format!(
                "{}-{}-{}",
                if client_id.is_empty() {
                    "member"
                } else {
                    client_id
                },
                now_ms,
                self.next_member
            )
        } else {
            member_id.to_string()
        };
        let g = self.groups.entry(group.to_string()).or_default();
        g.members.insert(
            id.clone(),
            Member {
                client_id: client_id.to_string(),
                topics,
                session_timeout_ms,
                last_seen_ms: now_ms,
            },
        );
        rebalance_at(g, partitions_of, now_ms);
        assignment(g, &id)
    }

    /// Keeps a member alive; `generation` is the newest assignment it has applied.
    pub fn heartbeat(
        &mut self,
        group: &str,
        member_id: &str,
        generation: u64,
        now_ms: u64,
        partitions_of: &dyn Fn(&str) -> u32,
    ) -> Result<AssignmentOut, GroupError> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| GroupError::UnknownGroup(group.into()))?;
        let m = g.members.get_mut(member_id).ok_or_else(|| {
            GroupError::Fenced(format!("member {member_id:?} is not in group {group:?}"))
        })?;
        m.last_seen_ms = now_ms;
        let before = g.revoking.len();
        g.revoking
            .retain(|_, (from, gen, _)| !(from == member_id && generation >= *gen));
        if g.revoking.len() != before {
            rebalance_at(g, partitions_of, now_ms);
        }
        Ok(assignment(g, member_id))
    }

    pub fn leave(
        &mut self,
        group: &str,
        member_id: &str,
        now_ms: u64,
        partitions_of: &dyn Fn(&str) -> u32,
    ) -> Result<(), GroupError> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| GroupError::UnknownGroup(group.into()))?;
        if g.members.remove(member_id).is_none() {
            return Err(GroupError::Fenced(format!(
                "member {member_id:?} is not in group {group:?}"
            )));
        }
        rebalance_at(g, partitions_of, now_ms);
        self.forget_empty();
        Ok(())
    }

    /// Removes members whose session timed out, and members that did not confirm a
    /// revocation within their session timeout; returns how many. Time during which the
    /// coordinator itself did not run (a gap over [`STALL_MS`] since the last call) is
    /// forgiven: members get their whole session to deliver the heartbeats waiting for us.
    pub fn expire(&mut self, now_ms: u64, partitions_of: &dyn Fn(&str) -> u32) -> usize {
        if let Some(last) = self.last_expire_ms {
            let gap = now_ms.saturating_sub(last);
            if gap > STALL_MS {
                self.forgive(gap, now_ms);
            }
        }
        self.last_expire_ms = Some(now_ms);
        let mut n = 0;
        for g in self.groups.values_mut() {
            let before = g.members.len();
            let stuck: BTreeSet<String> = g
                .revoking
                .values()
                .filter(|(m, _, since)| {
                    g.members
                        .get(m)
                        .is_some_and(|mm| now_ms.saturating_sub(*since) > mm.session_timeout_ms)
                })
                .map(|(m, _, _)| m.clone())
                .collect();
            g.members.retain(|id, m| {
                now_ms.saturating_sub(m.last_seen_ms) <= m.session_timeout_ms && !stuck.contains(id)
            });
            if g.members.len() != before {
                n += before - g.members.len();
                rebalance_at(g, partitions_of, now_ms);
            }
        }
        if n > 0 {
            self.forget_empty();
        }
        n
    }

    /// Moves every member's last-seen time and revocation start forward by `gap_ms`, never
    /// past `now_ms`.
    fn forgive(&mut self, gap_ms: u64, now_ms: u64) {
        for g in self.groups.values_mut() {
            for m in g.members.values_mut() {
                m.last_seen_ms = (m.last_seen_ms + gap_ms).min(now_ms);
            }
            for r in g.revoking.values_mut() {
                r.2 = (r.2 + gap_ms).min(now_ms);
            }
        }
    }

    /// Checks that `member_id` may commit these partitions.
    pub fn check_commit(&self, group: &str, member_id: &str, tps: &[Tp]) -> Result<(), GroupError> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| GroupError::UnknownGroup(group.into()))?;
        if !g.members.contains_key(member_id) {
            return Err(GroupError::Fenced(format!(
                "member {member_id:?} is not in group {group:?} (expired or left)"
            )));
        }
        for tp in tps {
            let owns = g.owners.get(tp).is_some_and(|o| o == member_id)
                || g.revoking.get(tp).is_some_and(|(o, _, _)| o == member_id);
            if !owns {
                return Err(GroupError::Fenced(format!(
                    "member {member_id:?} does not own {}-{} in group {group:?}",
                    tp.0, tp.1
                )));
            }
        }
        Ok(())
    }

    /// Records committed offsets (after they are durable).
    pub fn apply_commit(&mut self, group: &str, offsets: &[OffsetOut]) {
        let g = self.groups.entry(group.to_string()).or_default();
        for (t, p, o) in offsets {
            g.offsets.insert((t.clone(), *p), *o);
        }
    }

    /// Committed offsets; empty `topics` = all.
    pub fn committed(&self, group: &str, topics: &[String]) -> Vec<OffsetOut> {
        self.groups
            .get(group)
            .map(|g| {
                g.offsets
                    .iter()
                    .filter(|((t, _), _)| topics.is_empty() || topics.contains(t))
                    .map(|((t, p), o)| (t.clone(), *p, *o))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every committed offset of every group (state-log compaction).
    pub fn all_offsets(&self) -> Vec<(String, OffsetOut)> {
        let mut out = Vec::new();
        for (name, g) in &self.groups {
            for ((t, p), o) in &g.offsets {
                out.push((name.clone(), (t.clone(), *p, *o)));
            }
        }
        out
    }

    pub fn describe(&self, group: &str) -> Option<GroupOut> {
        let g = self.groups.get(group)?;
        Some(GroupOut {
            group: group.to_string(),
            generation: g.generation,
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberOut {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    topics: m.topics.clone(),
                    assignments: assignment(g, id).assignments,
                })
                .collect(),
            offsets: self.committed(group, &[]),
        })
    }
}

fn assignment(g: &Group, member: &str) -> AssignmentOut {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for ((t, p), o) in &g.owners {
        if o == member {
            by_topic.entry(t).or_default().push(*p);
        }
    }
    AssignmentOut {
        member_id: member.to_string(),
        generation: g.generation,
        assignments: by_topic
            .into_iter()
            .map(|(t, partitions)| TopicParts {
                topic: t.to_string(),
                partitions,
            })
            .collect(),
        rebalancing: !g.revoking.is_empty(),
    }
}

/// Sticky, balanced assignment with revoke-before-reassign. Bumps the generation if anything
/// changed. Revocations started now are stamped `now_ms`.
fn rebalance_at(g: &mut Group, partitions_of: &dyn Fn(&str) -> u32, now_ms: u64) {
    let next_gen = g.generation + 1;
    let mut changed = false;
    let subscribed = |g: &Group, m: &str, t: &str| {
        g.members
            .get(m)
            .is_some_and(|m| m.topics.iter().any(|x| x == t))
    };
    let topics: BTreeSet<String> = g
        .members
        .values()
        .flat_map(|m| m.topics.iter().cloned())
        .collect();
    let all: Vec<Tp> = topics
        .iter()
        .flat_map(|t| (0..partitions_of(t)).map(move |p| (t.clone(), p)))
        .collect();
    let all_set: BTreeSet<&Tp> = all.iter().collect();
    // Forget owners and revocations of members that are gone or no longer subscribed.
    let before = (g.owners.len(), g.revoking.len());
    let owners: BTreeMap<Tp, String> = std::mem::take(&mut g.owners)
        .into_iter()
        .filter(|(tp, m)| subscribed(g, m, &tp.0) && all_set.contains(tp))
        .collect();
    g.owners = owners;
    let revoking: BTreeMap<Tp, (String, u64, u64)> = std::mem::take(&mut g.revoking)
        .into_iter()
        .filter(|(_, (m, _, _))| g.members.contains_key(m))
        .collect();
    g.revoking = revoking;
    changed |= before != (g.owners.len(), g.revoking.len());
    if g.members.is_empty() {
        if changed {
            g.generation = next_gen;
        }
        return;
    }
    // Quota: an even share of the partitions (eligible members approximated by all members).
    let quota = all.len().div_ceil(g.members.len());
    let mut counts: BTreeMap<String, usize> = g.members.keys().map(|m| (m.clone(), 0)).collect();
    for m in g.owners.values() {
        *counts.entry(m.clone()).or_default() += 1;
    }
    // Revoke the excess of members over quota (their highest partitions first).
    let over: Vec<(String, usize)> = counts
        .iter()
        .filter(|(_, &c)| c > quota)
        .map(|(m, &c)| (m.clone(), c - quota))
        .collect();
    for (m, excess) in over {
        let mine: Vec<Tp> = g
            .owners
            .iter()
            .filter(|(_, o)| **o == m)
            .map(|(tp, _)| tp.clone())
            .rev()
            .take(excess)
            .collect();
        for tp in mine {
            g.owners.remove(&tp);
            g.revoking.insert(tp, (m.clone(), next_gen, now_ms));
            changed = true;
        }
        if let Some(c) = counts.get_mut(&m) {
            *c -= excess;
        }
    }
    // Give free partitions to the least loaded subscribed member.
    for tp in &all {
        if g.owners.contains_key(tp) || g.revoking.contains_key(tp) {
            continue;
        }
        let best = counts
            .iter()
            .filter(|(m, _)| subscribed(g, m, &tp.0))
            .min_by_key(|(m, c)| (**c, (*m).clone()))
            .map(|(m, _)| m.clone());
        if let Some(m) = best {
            g.owners.insert(tp.clone(), m.clone());
            *counts.entry(m).or_default() += 1;
            changed = true;
        }
    }
    if changed {
        g.generation = next_gen;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four(_: &str) -> u32 {
        4
    }

    fn parts(a: &AssignmentOut) -> Vec<u32> {
        a.assignments
            .iter()
            .flat_map(|t| t.partitions.clone())
            .collect()
    }

    #[test]
    fn second_member_gets_half_after_revocation() {
        let mut c = Coordinator::new();
        let a = c.join("g", "", "a", vec!["t".into()], 1000, 0, &four);
        assert_eq!(parts(&a), vec![0, 1, 2, 3]);
        let b = c.join("g", "", "b", vec!["t".into()], 1000, 1, &four);
        assert!(
            parts(&b).is_empty(),
            "nothing moves before the revocation is confirmed"
        );
        let a2 = c
            .heartbeat("g", &a.member_id, a.generation, 2, &four)
            .unwrap();
        assert_eq!(parts(&a2), vec![0, 1], "partitions 0 and 1 kept flowing");
        assert!(a2.rebalancing);
        // A commits the revoked ones while still giving them up.
        c.check_commit("g", &a.member_id, &[("t".into(), 3)])
            .unwrap();
        let a3 = c
            .heartbeat("g", &a.member_id, a2.generation, 3, &four)
            .unwrap();
        assert!(!a3.rebalancing);
        let b2 = c
            .heartbeat("g", &b.member_id, b.generation, 3, &four)
            .unwrap();
        assert_eq!(parts(&b2), vec![2, 3]);
        // Now A may not commit 3.
        assert!(c
            .check_commit("g", &a.member_id, &[("t".into(), 3)])
            .is_err());
    }

    #[test]
    fn expired_member_is_fenced_and_its_partitions_move() {
        let mut c = Coordinator::new();
        let a = c.join("g", "", "a", vec!["t".into()], 100, 0, &four);
        let b = c.join("g", "", "b", vec!["t".into()], 10_000, 0, &four);
        let a2 = c
            .heartbeat("g", &a.member_id, a.generation, 10, &four)
            .unwrap();
        c.heartbeat("g", &a.member_id, a2.generation, 20, &four)
            .unwrap();
        assert_eq!(c.expire(500, &four), 1);
        let b2 = c.heartbeat("g", &b.member_id, 0, 500, &four).unwrap();
        assert_eq!(parts(&b2), vec![0, 1, 2, 3]);
        assert!(matches!(
            c.check_commit("g", &a.member_id, &[("t".into(), 0)]),
            Err(GroupError::Fenced(_))
        ));
    }

    #[test]
    fn every_partition_has_exactly_one_owner() {
        let mut c = Coordinator::new();
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                c.join("g", "", &format!("m{i}"), vec!["t".into()], 1000, 0, &|_| 7)
                    .member_id,
            );
        }
        for round in 0..5u64 {
            for id in &ids {
                let g = c.heartbeat("g", id, u64::MAX, round, &|_| 7).unwrap();
                let _ = g;
            }
        }
        let d = c.describe("g").unwrap();
        let mut all: Vec<u32> = d
            .members
            .iter()
            .flat_map(|m| m.assignments.iter().flat_map(|t| t.partitions.clone()))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        for m in &d.members {
            let n: usize = m.assignments.iter().map(|t| t.partitions.len()).sum();
            assert!((2..=3).contains(&n), "balanced: {n}");
        }
    }

    #[test]
    fn a_coordinator_stall_expires_nobody() {
        let mut c = Coordinator::new();
        let a = c.join("g", "", "a", vec!["t".into()], 5_000, 0, &four);
        let b = c.join("g", "", "b", vec!["t".into()], 5_000, 0, &four);
        assert_eq!(c.expire(50, &four), 0);
        // The process was stopped for 10 s (twice the session): nobody's fault but ours.
        assert_eq!(c.expire(10_050, &four), 0, "a stall is forgiven");
        // The heartbeats that waited in the sockets arrive now and are accepted.
        assert!(c
            .heartbeat("g", &a.member_id, a.generation, 10_060, &four)
            .is_ok());
        assert!(c
            .heartbeat("g", &b.member_id, b.generation, 10_060, &four)
            .is_ok());
        // Ordinary expiry still works afterwards: b stays silent for a whole session.
        let mut now = 10_060;
        while now < 16_000 {
            now += 50;
            c.heartbeat("g", &a.member_id, u64::MAX, now, &four)
                .unwrap();
            c.expire(now, &four);
        }
        let d = c.describe("g").unwrap();
        assert_eq!(d.members.len(), 1, "b expired after a real silence");
        assert_eq!(d.members[0].member_id, a.member_id);
    }

    #[test]
    fn a_member_that_never_confirms_a_revocation_is_expired() {
        let mut c = Coordinator::new();
        let a = c.join("g", "", "a", vec!["t".into()], 1_000, 0, &four);
        let b = c.join("g", "", "b", vec!["t".into()], 1_000, 0, &four);
        assert!(parts(&b).is_empty());
        // a keeps heartbeating with its old generation (its consumer loop is stuck, so it
        // never confirms giving partitions up); b waits.
        let mut now = 0;
        while now < 900 {
            now += 50;
            c.heartbeat("g", &a.member_id, a.generation, now, &four)
                .unwrap();
            c.heartbeat("g", &b.member_id, 0, now, &four).unwrap();
            assert_eq!(c.expire(now, &four), 0);
        }
        while now < 1_200 {
            now += 50;
            let _ = c.heartbeat("g", &a.member_id, a.generation, now, &four);
            c.heartbeat("g", &b.member_id, 0, now, &four).unwrap();
            c.expire(now, &four);
        }
        let bb = c.heartbeat("g", &b.member_id, 0, now, &four).unwrap();
        assert_eq!(
            parts(&bb),
            vec![0, 1, 2, 3],
            "b took over from the stuck member"
        );
        assert!(
            c.check_commit("g", &a.member_id, &[("t".into(), 0)])
                .is_err(),
            "the stuck member's late commit is fenced"
        );
    }

    #[test]
    fn groups_are_bounded_and_empty_ones_forgotten() {
        let mut c = Coordinator::new();
        let a = c.join("g", "", "a", vec!["t".into()], 1_000, 0, &four);
        c.leave("g", &a.member_id, 1, &four).unwrap();
        assert!(
            c.group_names().is_empty(),
            "no members, no offsets: forgotten"
        );
        let a = c.join("g", "", "a", vec!["t".into()], 1_000, 0, &four);
        c.apply_commit("g", &[("t".into(), 0, 5)]);
        c.leave("g", &a.member_id, 1, &four).unwrap();
        assert_eq!(c.group_names(), vec!["g".to_string()], "offsets keep it");
        for i in 0..crate::limits::GROUPS_PER_SHARD_MAX as u64 - 1 {
            c.restore_offset(&format!("x{i}"), ("t".into(), 0), 1);
        }
        assert!(
            c.may_join("g").is_ok(),
            "an existing group may always be joined"
        );
        assert!(matches!(
            c.may_join("new"),
            Err(GroupError::TooManyGroups(_))
        ));
    }
}
