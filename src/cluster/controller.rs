//! One controller replica: a Raft group member (tikv `raft`, sans-I/O) whose committed entries
//! are [`MetaCommand`]s applied to a [`ClusterMeta`]. The caller owns time and the network:
//! it calls [`ControllerNode::tick`] on its timer, [`ControllerNode::step`] with messages from
//! peers, and sends what [`ControllerNode::drive`] returns.
//!
//! Owns: the `RawNode`, the Ready loop in the order raft-rs requires (persist entries and
//! HardState before sending the messages that depend on them: a follower answers an append or
//! a vote only after persisting), and the applied state. Must not touch: sockets, timers,
//! files (its [`ControllerStore`] is handed in: a file in a broker, raft's in-memory storage
//! in the simulation, which treats it as the durable part that survives a crash).

use raft::eraftpb::{Entry, EntryType, Message};
use raft::{Config, RawNode, StateRole};

use super::meta::{ClusterMeta, MetaCommand};
use super::raft_store::ControllerStore;

/// Raft timing of the controller, in ticks of the caller's timer.
pub const HEARTBEAT_TICKS: usize = 2;

/// How long a follower waits for a leader before it campaigns, in ticks: a random value in
/// `min..max`, drawn by raft-rs from its own (unseeded) generator. The simulation passes a
/// range of one value, so a seed replays exactly, and breaks ties with seeded tick jitter.
#[derive(Debug, Clone, Copy)]
pub struct ElectionTicks {
    pub min: usize,
    pub max: usize,
}

impl Default for ElectionTicks {
    fn default() -> Self {
        Self { min: 10, max: 20 }
    }
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// This replica is not the leader; the hint is the leader it knows of (0 = none).
    NotLeader { leader_hint: u64 },
    /// Raft refused it (e.g. a leader transfer is in progress).
    Refused(String),
}

/// A committed command as this replica applied it: (Raft index, command, outcome).
pub type Applied = (u64, MetaCommand, Result<(), String>);

pub struct ControllerNode<S: ControllerStore> {
    raw: RawNode<S>,
    meta: ClusterMeta,
    /// Every command applied, in order (the simulation compares replicas with it).
    applied: Vec<Applied>,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl<S: ControllerStore> ControllerNode<S> {
    /// A replica `id` of a controller whose voters are `voters`, over `storage` (new, or what a
    /// crashed replica had persisted). Committed entries are applied again from the start, so
    /// the metadata is rebuilt deterministically.
    pub fn open(
        id: u64,
        voters: &[u64],
        storage: S,
        election: ElectionTicks,
    ) -> Result<Self, String> {
        let state = storage
            .initial_state()
            .map_err(|e| format!("controller storage: {e}"))?;
        let last = storage
            .last_index()
            .map_err(|e| format!("controller storage: {e}"))?;
        if state.hard_state.commit > last {
            return Err(format!(
                "controller storage: commit index {} beyond the last entry {last}",
                state.hard_state.commit
            ));
        }
        if state.conf_state.voters.is_empty() {
            // A new replica: the voters are the configured ones.
            let cs = raft::prelude::ConfState::from((voters.to_vec(), vec![]));
            storage.set_conf_state(&cs)?;
            storage.persist()?;
        }
        let cfg = Config {
            id,
            election_tick: election.min,
            min_election_tick: election.min,
            max_election_tick: election.max,
            heartbeat_tick: HEARTBEAT_TICKS,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            applied: 0,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| format!("controller config: {e}"))?;
        let raw = RawNode::new(&cfg, storage, &logger()).map_err(|e| format!("controller: {e}"))?;
        Ok(Self {
            raw,
            meta: ClusterMeta::default(),
            applied: Vec::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn meta(&self) -> &ClusterMeta {
        &self.meta
    }

    pub fn applied(&self) -> &[Applied] {
        &self.applied
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The storage (what survives a crash).
    pub fn storage(&self) -> S {
        self.raw.store().clone()
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from a peer. Messages for another term or a stale one are Raft's to ignore;
    /// an error means the message was malformed for this group.
    pub fn step(&mut self, m: Message) -> Result<(), String> {
        self.raw.step(m).map_err(|e| e.to_string())
    }

    /// Proposes a command; it takes effect when committed and applied (see [`Self::applied`]).
    /// Returns the Raft index it was given (if another leader overwrites that index, the
    /// command applied there is a different one).
    pub fn propose(&mut self, cmd: &MetaCommand) -> Result<u64, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader_id(),
            });
        }
        self.raw
            .propose(vec![], cmd.encode())
            .map_err(|e| ProposeError::Refused(e.to_string()))?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// Takes the commands applied since the last call (a broker calls this after every
    /// [`Self::drive`], so the history does not grow; the simulation reads [`Self::applied`]).
    pub fn drain_applied(&mut self) -> Vec<Applied> {
        std::mem::take(&mut self.applied)
    }

    /// The voters of the controller group.
    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// Whether the storage this replica was opened on had never been bootstrapped.
    pub fn is_new_store(storage: &S) -> Result<bool, String> {
        let state = storage
            .initial_state()
            .map_err(|e| format!("controller storage: {e}"))?;
        Ok(state.conf_state.voters.is_empty())
    }

    /// Handles everything Raft has ready: persists, applies, and returns the messages to send
    /// (each only once what it depends on is persisted). An error means the storage failed:
    /// nothing that depends on the failed write was sent, and this replica must stop.
    pub fn drive(&mut self) -> Result<Vec<Message>, String> {
        let mut out = Vec::new();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        if !rd.snapshot().is_empty() {
            // The controller's log is never compacted, so no peer sends one yet.
            return Err("controller: snapshots are not supported yet".into());
        }
        // A leader's messages may go before its own persistence (Raft thesis 10.2.1).
        out.extend(rd.take_messages());
        self.apply(rd.take_committed_entries());
        let store = self.raw.store().clone();
        store.append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs)?;
        }
        store.persist()?;
        // Answers to appends and votes: only now that their entries and HardState are durable.
        out.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = store
                .initial_state()
                .map_err(|e| format!("controller storage: {e}"))?
                .hard_state;
            hs.commit = commit;
            store.set_hard_state(&hs)?;
            store.persist()?;
        }
        out.extend(light.take_messages());
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            match MetaCommand::decode(&e.data) {
                Ok(cmd) => {
                    let outcome = self.meta.apply(&cmd);
                    self.applied.push((e.index, cmd, outcome));
                }
                Err(why) => {
                    eprintln!(
                        "ringmq: controller {}: entry {} is not a metadata command ({why}); skipped",
                        self.id(),
                        e.index
                    );
                }
            }
        }
    }
}
