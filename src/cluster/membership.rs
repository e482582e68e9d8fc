//! Which nodes are alive, from what this node hears: every peer frame (heartbeats included)
//! counts, and a peer silent for `failure_timeout_ms` is down until it is heard again. Sans-I/O:
//! the caller passes the time, sends heartbeats every [`limits::NODE_HEARTBEAT_MS`] and acts on
//! the [`Change`]s.
//!
//! Owns: the liveness view of one node. Must not touch: sockets, timers, Raft (the controller
//! decides what a dead node means for placement; this only reports it).

use std::collections::BTreeMap;

use crate::limits;

/// A peer's liveness changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Up(u32),
    Down(u32),
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    last_heard_ms: Option<u64>,
    alive: bool,
}

/// One node's view of the others.
#[derive(Debug, Clone)]
pub struct Membership {
    me: u32,
    failure_timeout_ms: u64,
    peers: BTreeMap<u32, Peer>,
}

impl Membership {
    /// `failure_timeout_ms` 0 means the default ([`limits::NODE_FAILURE_TIMEOUT_MS_DEFAULT`]).
    pub fn new(me: u32, failure_timeout_ms: u64) -> Self {
        let failure_timeout_ms = if failure_timeout_ms == 0 {
            limits::NODE_FAILURE_TIMEOUT_MS_DEFAULT
        } else {
            failure_timeout_ms
        };
        Self {
            me,
            failure_timeout_ms,
            peers: BTreeMap::new(),
        }
    }

    /// A peer this node should hear from (e.g. from the metadata); down until heard.
    pub fn add_peer(&mut self, id: u32) {
        if id != self.me {
            self.peers.entry(id).or_insert(Peer {
                last_heard_ms: None,
                alive: false,
            });
        }
    }

    /// Something arrived from `id` at `now_ms`: `Up` if it was not alive (or unknown).
    pub fn heard(&mut self, id: u32, now_ms: u64) -> Option<Change> {
        if id == self.me {
            return None;
        }
        let p = self.peers.entry(id).or_insert(Peer {
            last_heard_ms: None,
            alive: false,
        });
        p.last_heard_ms = Some(p.last_heard_ms.map_or(now_ms, |t| t.max(now_ms)));
        if p.alive {
            return None;
        }
        p.alive = true;
        Some(Change::Up(id))
    }

    /// Peers silent for longer than the failure timeout go down (each reported once).
    pub fn check(&mut self, now_ms: u64) -> Vec<Change> {
        let timeout = self.failure_timeout_ms;
        let mut out = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let silent = p
                .last_heard_ms
                .is_none_or(|t| now_ms.saturating_sub(t) > timeout);
            if p.alive && silent {
                p.alive = false;
                out.push(Change::Down(*id));
            }
        }
        out
    }

    pub fn is_alive(&self, id: u32) -> bool {
        id == self.me || self.peers.get(&id).is_some_and(|p| p.alive)
    }

    /// Every node this one knows, itself included, with whether it is alive.
    pub fn nodes(&self) -> Vec<(u32, bool)> {
        let mut out: Vec<(u32, bool)> = self.peers.iter().map(|(id, p)| (*id, p.alive)).collect();
        out.push((self.me, true));
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_go_down_after_the_timeout_and_up_when_heard_each_reported_once() {
        let mut m = Membership::new(1, 1_000);
        m.add_peer(2);
        m.add_peer(1); // itself: ignored
        assert!(!m.is_alive(2), "a peer never heard from is down");
        assert!(m.is_alive(1), "a node is alive to itself");
        assert_eq!(m.heard(2, 100), Some(Change::Up(2)));
        assert_eq!(m.heard(2, 600), None);
        assert_eq!(
            m.check(1_600),
            vec![],
            "exactly the timeout is not yet silence"
        );
        assert_eq!(m.check(1_601), vec![Change::Down(2)]);
        assert_eq!(m.check(5_000), vec![], "reported once");
        assert!(!m.is_alive(2));
        // A late, reordered report of an old time does not move the clock back.
        assert_eq!(m.heard(2, 6_000), Some(Change::Up(2)));
        m.heard(2, 5_500);
        assert_eq!(m.check(6_900), vec![]);
        // An unknown node that speaks is added.
        assert_eq!(m.heard(3, 7_000), Some(Change::Up(3)));
        assert_eq!(m.nodes(), vec![(1, true), (2, true), (3, true)]);
        assert_eq!(m.check(8_001), vec![Change::Down(2), Change::Down(3)]);
        assert_eq!(
            Membership::new(1, 0).failure_timeout_ms,
            limits::NODE_FAILURE_TIMEOUT_MS_DEFAULT
        );
    }
}
