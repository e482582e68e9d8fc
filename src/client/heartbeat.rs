//! A consumer-group member's heartbeats, on their own thread and connection, so a member stays
//! alive however slowly its owner consumes (a blocked stdout, slow processing).
//!
//! Owns: one `Client` used only for heartbeats, and the state shared with the consumer loop.
//! Must not touch: offsets or fetches (the consumer loop's). Invariant: a heartbeat carries only
//! the generation the consumer loop has *applied* ([`Heartbeater::set_member`]), so the
//! coordinator never hears "partitions given up" before the loop has stopped and committed them.
//! New assignments, fencing and failures are handed to the loop through [`Heartbeater::poll`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Client, ClientError};
use crate::protocol::fb;
use crate::protocol::groups::AssignmentOut;

/// What the heartbeat thread learned since the last poll.
#[derive(Debug)]
pub enum Event {
    Nothing,
    /// A newer assignment than the one applied: apply it, then `set_member` with its generation.
    Assignment(AssignmentOut),
    /// The coordinator no longer knows this member (expired, or stuck in a revocation):
    /// uncommitted positions are lost; join again.
    Fenced(String),
    /// Heartbeats failed for a whole session (broker unreachable).
    Failed(String),
}

#[derive(Default)]
struct State {
    member_id: String,
    applied_generation: u64,
    latest: Option<AssignmentOut>,
    fenced: Option<String>,
    failed: Option<String>,
    rebalancing: bool,
    beat_now: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means the other side panicked; its state is still consistent enough
        // to read flags from.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
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
    /// Connects a dedicated client to `addr` and starts the thread (idle until `set_member`).
    pub fn start(addr: &str, group: &str, session_timeout_ms: u32) -> Result<Self, ClientError> {
        let client = Client::connect(addr)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
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

    /// The member id and the generation the consumer loop has applied; heartbeats at once
    /// (confirming revocations without waiting a period).
    pub fn set_member(&self, member_id: &str, applied_generation: u64) {
        let mut st = self.shared.lock();
        if st.member_id != member_id {
            st.fenced = None;
            st.latest = None;
        }
        st.member_id = member_id.to_string();
        st.applied_generation = applied_generation;
        if st
            .latest
            .as_ref()
            .is_some_and(|a| a.generation == applied_generation)
        {
            st.latest = None;
        }
        st.beat_now = true;
        self.shared.wake.notify_all();
    }

    /// Takes what the thread learned: failure first, then fencing, then a new assignment.
    pub fn poll(&self) -> Event {
        let mut st = self.shared.lock();
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
        self.shared.lock().rebalancing
    }

    /// Stops the thread (before the member leaves the group).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.lock().stop = true;
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

fn run(shared: Arc<Shared>, mut client: Client, addr: &str, group: &str, session_ms: u32) {
    let every = heartbeat_interval(session_ms);
    let mut last_ok = Instant::now();
    loop {
        let (member, generation) = {
            let mut st = shared.lock();
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
                return;
            }
            st.beat_now = false;
            if st.member_id.is_empty() || st.fenced.is_some() {
                continue;
            }
            (st.member_id.clone(), st.applied_generation)
        };
        let result = client.heartbeat(group, &member, generation);
        let mut st = shared.lock();
        if st.member_id != member {
            continue; // the loop rejoined meanwhile; this answer is about the old member
        }
        match result {
            Ok(a) => {
                last_ok = Instant::now();
                st.rebalancing = a.rebalancing;
                if a.generation != st.applied_generation {
                    st.latest = Some(a);
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
