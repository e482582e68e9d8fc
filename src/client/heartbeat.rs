//! A consumer-group member's liveness, on its own thread and connection, so a member stays
//! alive and gives partitions up promptly however slowly its owner consumes (a blocked stdout,
//! slow processing).
//!
//! Owns: one `Client` used for heartbeats and for committing partitions it hands over, and the
//! [`Membership`] state shared with the consumer loop. Must not touch: fetches (the loop's).
//!
//! Invariants:
//! - A heartbeat carries only a generation whose revocations are done: the partitions taken
//!   away were removed from `positions` and their positions committed before the generation
//!   was recorded as applied. So the coordinator never hands a partition on while this member
//!   may still deliver it.
//! - The thread never touches the partition the loop is working on (`delivering`), nor any
//!   while the loop applies an assignment (`applying`): those revocations wait for the loop,
//!   which checks between records. All others are committed and confirmed by the thread at
//!   once, so a loop blocked on one partition does not hold up the rest of the group.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Client, ClientError};
use crate::protocol::fb;
use crate::protocol::groups::{AssignmentOut, OffsetOut};

/// (topic, partition).
pub type Tp = (String, u32);

/// Where a member is in one assigned partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    /// Next offset to deliver.
    pub next: u64,
    /// Last committed next offset.
    pub committed: u64,
    /// Messages delivered since the last successful commit.
    pub delivered_uncommitted: u64,
}

/// State shared by the consumer loop and the heartbeat thread (one lock, held briefly).
#[derive(Default)]
pub struct Membership {
    pub member_id: String,
    /// Newest generation whose revocations are done (sent with heartbeats).
    pub applied_generation: u64,
    pub positions: BTreeMap<Tp, Pos>,
    /// The partition the loop is fetching, delivering or committing right now.
    pub delivering: Option<Tp>,
    /// The loop is applying an assignment.
    pub applying: bool,
    /// Delivered messages whose commit was refused or failed (another member may redeliver).
    pub refused: u64,
    /// Newest assignment heard, for the loop (new partitions; revocations left to it).
    latest: Option<AssignmentOut>,
    fenced: Option<String>,
    failed: Option<String>,
    rebalancing: bool,
    beat_now: bool,
    stop: bool,
}

impl Membership {
    /// The partitions held now that assignment `a` takes away.
    pub fn revoked_by(&self, a: &AssignmentOut) -> Vec<Tp> {
        let keep = assigned(a);
        self.positions
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect()
    }

    /// Removes `keys` from the positions; returns them (for a commit).
    pub fn take(&mut self, keys: &[Tp]) -> Vec<(Tp, Pos)> {
        keys.iter()
            .filter_map(|k| self.positions.remove(k).map(|p| (k.clone(), p)))
            .collect()
    }

    /// Records that `generation`'s revocations are done; the next heartbeat goes at once.
    pub fn applied(&mut self, generation: u64) {
        self.applied_generation = self.applied_generation.max(generation);
        self.beat_now = true;
    }
}

/// What the heartbeat thread learned since the last poll.
#[derive(Debug)]
pub enum Event {
    Nothing,
    /// An assignment whose changes the loop must apply (new partitions, or revocations the
    /// thread could not do itself).
    Assignment(AssignmentOut),
    /// The coordinator no longer knows this member (expired): its positions are lost; join
    /// again.
    Fenced(String),
    /// Heartbeats failed for a whole session (broker unreachable).
    Failed(String),
}

/// The partitions an assignment gives.
pub fn assigned(a: &AssignmentOut) -> BTreeSet<Tp> {
    a.assignments
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p)))
        .collect()
}

/// Commits the positions that moved. `Ok(refused)`: the commit went through (0) or the
/// coordinator fenced it (the count of delivered messages it leaves uncommitted).
pub fn commit_positions(
    c: &mut Client,
    group: &str,
    member_id: &str,
    generation: u64,
    taken: &[(Tp, Pos)],
) -> Result<Result<(), u64>, ClientError> {
    let offsets: Vec<OffsetOut> = taken
        .iter()
        .filter(|(_, p)| p.next != p.committed)
        .map(|((t, p), pos)| (t.clone(), *p, pos.next as i64))
        .collect();
    if offsets.is_empty() {
        return Ok(Ok(()));
    }
    match c.commit_offsets(group, member_id, generation, &offsets) {
        Ok(()) => Ok(Ok(())),
        Err(e) if e.code() == Some(fb::ErrorCode::FencedMember) => {
            eprintln!("ringmq: commit rejected: {e}");
            Ok(Err(taken
                .iter()
                .map(|(_, p)| p.delivered_uncommitted)
                .sum()))
        }
        Err(e) => Err(e),
    }
}

struct Shared {
    state: Mutex<Membership>,
    wake: Condvar,
}

/// Keeps one group member alive from a background thread.
pub struct Heartbeater {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The heartbeat period for a session timeout: a fifth of it, 20..=500 ms.
pub fn heartbeat_interval(session_timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(session_timeout_ms / 5).clamp(20, 500))
}

impl Heartbeater {
    /// Connects a dedicated client to `addr` and starts the thread (idle until a member id is
    /// set with [`Heartbeater::joined`]).
    pub fn start(addr: &str, group: &str, session_timeout_ms: u32) -> Result<Self, ClientError> {
        let client = Client::connect(addr)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(Membership::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let (addr, group) = (addr.to_string(), group.to_string());
        let thread = std::thread::Builder::new()
            .name("ringmq-heartbeat".into())
            .spawn(move || run(s, client, &addr, &group, session_timeout_ms))
            .map_err(ClientError::Io)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The shared state, for the consumer loop. Hold it briefly (never across I/O).
    pub fn lock(&self) -> MutexGuard<'_, Membership> {
        // A poisoned lock means the other side panicked mid-update; the flags are still
        // meaningful, and the panic itself ends the consumer.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `generation`'s revocations are done and confirms at once.
    pub fn confirm(&self, generation: u64) {
        self.lock().applied(generation);
        self.shared.wake.notify_all();
    }

    /// A (re)joined member: new id, no positions yet, nothing pending from the old one.
    pub fn joined(&self, member_id: &str) {
        let mut st = self.lock();
        st.member_id = member_id.to_string();
        st.applied_generation = 0;
        st.positions.clear();
        st.latest = None;
        st.fenced = None;
    }

    /// Takes what the thread learned: failure first, then fencing, then an assignment.
    pub fn poll(&self) -> Event {
        let mut st = self.lock();
        if let Some(e) = st.failed.take() {
            return Event::Failed(e);
        }
        if let Some(why) = st.fenced.take() {
            st.latest = None;
            return Event::Fenced(why);
        }
        match st.latest.take() {
            Some(a) => Event::Assignment(a),
            None => Event::Nothing,
        }
    }

    /// Whether the group is moving partitions (from the latest heartbeat).
    pub fn rebalancing(&self) -> bool {
        self.lock().rebalancing
    }

    /// Stops the thread (before the member's last commit and leave).
    pub fn stop(&mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Heartbeater {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Membership> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for the next beat; `None` when stopped.
fn next_beat(shared: &Shared, every: Duration) -> Option<(String, u64)> {
    let mut st = lock(shared);
    loop {
        let due = if st.rebalancing { every / 4 } else { every };
        let deadline = Instant::now() + due;
        while !st.stop && !st.beat_now && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            st = match shared.wake.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if st.stop {
            return None;
        }
        st.beat_now = false;
        if !st.member_id.is_empty() && st.fenced.is_none() {
            return Some((st.member_id.clone(), st.applied_generation));
        }
    }
}

fn run(shared: Arc<Shared>, mut client: Client, addr: &str, group: &str, session_ms: u32) {
    let every = heartbeat_interval(session_ms);
    let mut last_ok = Instant::now();
    while let Some((member, generation)) = next_beat(&shared, every) {
        let result = client.heartbeat(group, &member, generation);
        let mut st = lock(&shared);
        if st.member_id != member {
            continue; // the loop rejoined meanwhile; this answer is about the old member
        }
        match result {
            Ok(a) => {
                last_ok = Instant::now();
                st.rebalancing = a.rebalancing;
                if a.generation > st.applied_generation {
                    drop(st);
                    hand_over(&shared, &mut client, group, a);
                }
            }
            Err(e) if e.code() == Some(fb::ErrorCode::FencedMember) => {
                st.fenced = Some(e.to_string());
            }
            Err(e) => {
                if last_ok.elapsed() >= Duration::from_millis(u64::from(session_ms)) {
                    st.failed = Some(format!("heartbeats failed for a whole session: {e}"));
                }
                drop(st);
                if matches!(e, ClientError::Io(_)) {
                    if let Ok(c) = Client::connect(addr) {
                        client = c;
                    }
                }
            }
        }
    }
}

/// A newer assignment: gives up revoked partitions the loop is not working on (commit, then
/// confirm) and leaves the assignment for the loop.
fn hand_over(shared: &Shared, client: &mut Client, group: &str, a: AssignmentOut) {
    let mut st = lock(shared);
    let revoked = st.revoked_by(&a);
    let blocked = st.applying || st.delivering.as_ref().is_some_and(|d| revoked.contains(d));
    if blocked {
        st.latest = Some(a);
        return;
    }
    let taken = st.take(&revoked);
    let (member, generation) = (st.member_id.clone(), st.applied_generation);
    drop(st);
    let committed = commit_positions(client, group, &member, generation, &taken);
    let mut st = lock(shared);
    if st.member_id != member {
        return;
    }
    match committed {
        Ok(Ok(())) => st.applied(a.generation),
        Ok(Err(_)) | Err(_) => {
            // Not confirmed: the positions go back, and the loop retries the commit when it
            // applies the assignment (and does not confirm if that is refused too).
            for (k, p) in taken {
                st.positions.entry(k).or_insert(p);
            }
        }
    }
    st.latest = Some(a);
}
