//! Queue semantics for one (subscription, partition) as a pure state machine: leases, acks,
//! nacks, visibility timeouts, redelivery, delivery counts, dead-letter decisions, key-shared
//! ordering, delayed delivery, and the bounded ack state. No I/O; time is passed in.
//!
//! Owns: that state. Must not touch: logs (the partition reads records; the shard persists
//! acks).
//!
//! Invariants: an offset is in at most one of {pending, in flight, acked}; a message is in
//! flight at one consumer at a time; below `floor` everything is acked; with `key_shared`, a
//! key has at most one message in flight and its messages are dispatched in offset order (so
//! per-key order holds across nacks and redeliveries); the number of tracked offsets is bounded
//! by `max_unacked`: at the bound no new message is read (nothing is dropped).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The durable ack state of one subscription on one partition: everything below `floor` is
/// acked, and so are the offsets in `acked`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueAcks {
    pub floor: u64,
    pub acked: BTreeSet<u64>,
}

/// Settings fixed when the subscription is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubConfig {
    pub key_shared: bool,
    pub ack_timeout_ms: u64,
    /// 0 = never dead-letter.
    pub max_deliveries: u32,
    pub dead_letter_topic: String,
    pub max_unacked: usize,
}

/// Why a message was last returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Nack,
    Timeout,
    Disconnect,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Nack => "nack",
            Reason::Timeout => "ack-timeout",
            Reason::Disconnect => "consumer-disconnected",
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    ready_at_ms: u64,
    key: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Lease {
    consumer: u64,
    deadline_ms: u64,
    key: Option<Vec<u8>>,
}

/// One (subscription, partition).
#[derive(Debug, Clone)]
pub struct QueueState {
    pub cfg: SubConfig,
    floor: u64,
    acked: BTreeSet<u64>,
    pending: BTreeMap<u64, Pending>,
    in_flight: BTreeMap<u64, Lease>,
    /// Offsets handed to the dead-letter path, awaiting its durable append.
    dead: BTreeSet<u64>,
    counts: HashMap<u64, u32>,
    last_reason: HashMap<u64, Reason>,
    /// Next offset never read into `pending`.
    cursor: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
    pub acked_total: u64,
}

/// What one dispatch decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// (offset, delivery count) leased to the consumer, in offset order.
    pub deliver: Vec<(u64, u32)>,
    /// (offset, deliveries so far, last reason) to move to the dead-letter topic.
    pub dead: Vec<(u64, u32, Reason)>,
}

impl QueueState {
    pub fn new(cfg: SubConfig, start: u64) -> Self {
        Self {
            cfg,
            floor: start,
            acked: BTreeSet::new(),
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            dead: BTreeSet::new(),
            counts: HashMap::new(),
            last_reason: HashMap::new(),
            cursor: start,
            redeliveries: 0,
            dead_lettered: 0,
            acked_total: 0,
        }
    }

    /// Restores durable ack state (floor and acked offsets above it).
    pub fn restore(&mut self, floor: u64, acked: impl IntoIterator<Item = u64>) {
        self.floor = floor;
        self.cursor = floor;
        self.acked = acked.into_iter().filter(|&o| o >= floor).collect();
        self.advance_floor();
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn acked_above_floor(&self) -> impl Iterator<Item = &u64> {
        self.acked.iter()
    }

    /// Messages read and waiting for dispatch.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn tracked(&self) -> usize {
        self.acked.len() + self.pending.len() + self.in_flight.len() + self.dead.len()
    }

    /// Where to read new messages from, and how many more may be tracked (0 = at the limit).
    pub fn read_window(&self) -> (u64, usize) {
        (
            self.cursor,
            self.cfg.max_unacked.saturating_sub(self.tracked()),
        )
    }

    /// Adds a message read from the log at `offset` (must be `cursor`, or skipped if acked).
    pub fn add_read(&mut self, offset: u64, key: Option<Vec<u8>>, ready_at_ms: u64) {
        debug_assert!(offset >= self.cursor, "reads move forward");
        self.cursor = offset + 1;
        if offset < self.floor || self.acked.contains(&offset) {
            return;
        }
        let key = if self.cfg.key_shared { key } else { None };
        self.pending.insert(offset, Pending { ready_at_ms, key });
    }

    /// Moves the read cursor past offsets that are not messages (log end, retention gaps).
    pub fn skip_to(&mut self, offset: u64) {
        self.cursor = self.cursor.max(offset);
        self.floor = self.floor.max(offset.min(self.first_unsettled()));
    }

    /// Offsets `base..next` hold no message (a replication control record): read and settled.
    pub fn skip_control(&mut self, base: u64, next: u64) {
        if next <= self.cursor {
            return;
        }
        let from = base.max(self.cursor);
        self.cursor = next;
        if from <= self.floor && self.floor < next {
            self.floor = next;
        } else if from > self.floor {
            self.acked.extend(from..next);
        }
        self.advance_floor();
    }

    fn first_unsettled(&self) -> u64 {
        let mut m = self.cursor;
        if let Some((&o, _)) = self.pending.iter().next() {
            m = m.min(o);
        }
        if let Some((&o, _)) = self.in_flight.iter().next() {
            m = m.min(o);
        }
        if let Some(&o) = self.dead.iter().next() {
            m = m.min(o);
        }
        m
    }

    /// Returns expired leases to pending.
    pub fn expire(&mut self, now_ms: u64) {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(o, _)| *o)
            .collect();
        for o in expired {
            self.unlease(o, now_ms, Reason::Timeout);
        }
    }

    /// Returns every lease of `consumer` (it disconnected).
    pub fn release_consumer(&mut self, consumer: u64, now_ms: u64) -> usize {
        let mine: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, l)| l.consumer == consumer)
            .map(|(o, _)| *o)
            .collect();
        for &o in &mine {
            self.unlease(o, now_ms, Reason::Disconnect);
        }
        mine.len()
    }

    fn unlease(&mut self, offset: u64, ready_at_ms: u64, reason: Reason) {
        if let Some(l) = self.in_flight.remove(&offset) {
            self.pending.insert(
                offset,
                Pending {
                    ready_at_ms,
                    key: l.key,
                },
            );
            self.last_reason.insert(offset, reason);
            self.redeliveries += 1;
        }
    }

    /// Leases up to `credit` ready messages to `consumer` and picks those to dead-letter.
    pub fn dispatch(&mut self, consumer: u64, credit: usize, now_ms: u64) -> Dispatch {
        let mut out = Dispatch::default();
        let mut blocked: HashSet<Vec<u8>> = self
            .in_flight
            .values()
            .filter_map(|l| l.key.clone())
            .collect();
        let mut chosen = Vec::new();
        for (&o, p) in &self.pending {
            if chosen.len() >= credit {
                break;
            }
            if let Some(k) = &p.key {
                // Only the earliest unsettled message of a key may go, and only when ready.
                if !blocked.insert(k.clone()) {
                    continue;
                }
            }
            if p.ready_at_ms <= now_ms {
                chosen.push(o);
            }
        }
        for o in chosen {
            let Some(p) = self.pending.remove(&o) else {
                continue;
            };
            let count = self.counts.get(&o).copied().unwrap_or(0);
            if self.cfg.max_deliveries > 0 && count >= self.cfg.max_deliveries {
                let reason = self.last_reason.get(&o).copied().unwrap_or(Reason::Nack);
                self.dead.insert(o);
                out.dead.push((o, count, reason));
                continue;
            }
            self.counts.insert(o, count + 1);
            self.in_flight.insert(
                o,
                Lease {
                    consumer,
                    deadline_ms: now_ms + self.cfg.ack_timeout_ms,
                    key: p.key,
                },
            );
            out.deliver.push((o, count + 1));
        }
        out
    }

    /// Offsets of `offsets` that an ack would settle (leased, pending or dead-lettering).
    pub fn ackable(&self, offsets: &[u64]) -> Vec<u64> {
        let mut v: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|o| self.in_flight.contains_key(o) || self.pending.contains_key(o))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Marks offsets acked (after the ack is durable). Also used when a dead letter is stored.
    pub fn apply_ack(&mut self, offsets: &[u64]) -> usize {
        let mut n = 0;
        for &o in offsets {
            let was_dead = self.dead.remove(&o);
            if self.in_flight.remove(&o).is_some() || self.pending.remove(&o).is_some() || was_dead
            {
                if was_dead {
                    self.dead_lettered += 1;
                } else {
                    self.acked_total += 1;
                }
                self.counts.remove(&o);
                self.last_reason.remove(&o);
                if o >= self.floor {
                    self.acked.insert(o);
                }
                n += 1;
            }
        }
        self.advance_floor();
        n
    }

    /// A dead-letter append failed: the message goes back to pending.
    pub fn dead_letter_failed(&mut self, offset: u64, now_ms: u64) {
        if self.dead.remove(&offset) {
            self.pending.insert(
                offset,
                Pending {
                    ready_at_ms: now_ms + 1000,
                    key: None,
                },
            );
        }
    }

    fn advance_floor(&mut self) {
        while self.acked.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// Nack: leased offsets go back, ready after `delay_ms`.
    pub fn nack(&mut self, offsets: &[u64], delay_ms: u64, now_ms: u64) -> usize {
        let mut n = 0;
        for &o in offsets {
            if self.in_flight.contains_key(&o) {
                self.unlease(o, now_ms + delay_ms, Reason::Nack);
                n += 1;
            }
        }
        n
    }

    /// Extends leases by `ms` from now.
    pub fn extend(&mut self, offsets: &[u64], ms: u64, now_ms: u64) -> usize {
        let mut n = 0;
        for o in offsets {
            if let Some(l) = self.in_flight.get_mut(o) {
                l.deadline_ms = now_ms + ms;
                n += 1;
            }
        }
        n
    }

    /// The soonest time something becomes ready or a lease expires (for long-poll wakeups).
    pub fn next_event_ms(&self) -> Option<u64> {
        let p = self.pending.values().map(|p| p.ready_at_ms).min();
        let l = self.in_flight.values().map(|l| l.deadline_ms).min();
        match (p, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Messages not yet acknowledged up to `log_end`.
    pub fn backlog(&self, log_end: u64) -> u64 {
        log_end
            .saturating_sub(self.floor)
            .saturating_sub(self.acked.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(key_shared: bool, max_unacked: usize) -> SubConfig {
        SubConfig {
            key_shared,
            ack_timeout_ms: 100,
            max_deliveries: 3,
            dead_letter_topic: "t.dlq".into(),
            max_unacked,
        }
    }

    #[test]
    fn control_records_are_settled_without_delivery() {
        let mut q = QueueState::new(cfg(false, 100), 0);
        // Offset 0 is a control record (a new leader's entry), then messages 1 and 2.
        q.skip_control(0, 1);
        assert_eq!((q.floor(), q.read_window().0), (1, 1));
        q.add_read(1, None, 0);
        q.add_read(2, None, 0);
        // Another control record at 3 while 1 and 2 are unsettled: the floor waits for them.
        q.skip_control(3, 4);
        assert_eq!((q.floor(), q.read_window().0), (1, 4));
        let d = q.dispatch(7, 10, 0);
        assert_eq!(
            d.deliver,
            vec![(1, 1), (2, 1)],
            "only messages are delivered"
        );
        q.apply_ack(&[1, 2]);
        assert_eq!(
            q.floor(),
            4,
            "the control offset does not hold the floor back"
        );
        assert_eq!(q.backlog(4), 0);
    }

    #[test]
    fn lease_ack_floor() {
        let mut q = QueueState::new(cfg(false, 100), 0);
        for o in 0..5 {
            q.add_read(o, None, 0);
        }
        let d = q.dispatch(1, 3, 0);
        assert_eq!(d.deliver, vec![(0, 1), (1, 1), (2, 1)]);
        let d2 = q.dispatch(2, 10, 0);
        assert_eq!(d2.deliver, vec![(3, 1), (4, 1)], "never in flight twice");
        q.apply_ack(&[1, 0]);
        assert_eq!(q.floor(), 2);
        q.apply_ack(&[4]);
        assert_eq!(q.floor(), 2);
        assert_eq!(q.backlog(5), 2);
    }

    #[test]
    fn timeout_and_disconnect_redeliver_with_counts_then_dead_letter() {
        let mut q = QueueState::new(cfg(false, 100), 0);
        q.add_read(0, None, 0);
        assert_eq!(q.dispatch(1, 1, 0).deliver, vec![(0, 1)]);
        q.expire(100);
        assert_eq!(q.dispatch(2, 1, 100).deliver, vec![(0, 2)]);
        assert_eq!(q.release_consumer(2, 110), 1);
        assert_eq!(q.dispatch(3, 1, 110).deliver, vec![(0, 3)]);
        q.nack(&[0], 0, 120);
        let d = q.dispatch(3, 1, 120);
        assert!(d.deliver.is_empty());
        assert_eq!(d.dead, vec![(0, 3, Reason::Nack)]);
        q.apply_ack(&[0]);
        assert_eq!(q.dead_lettered, 1);
        assert_eq!(q.floor(), 1);
    }

    #[test]
    fn key_shared_keeps_one_in_flight_per_key_in_order_across_nacks() {
        let mut q = QueueState::new(cfg(true, 100), 0);
        let keys = [b"a", b"b", b"a", b"b"];
        for (o, k) in keys.iter().enumerate() {
            q.add_read(o as u64, Some(k.to_vec()), 0);
        }
        assert_eq!(q.dispatch(1, 10, 0).deliver, vec![(0, 1), (1, 1)]);
        assert!(q.dispatch(2, 10, 0).deliver.is_empty(), "a and b are busy");
        q.nack(&[0], 50, 0);
        assert!(
            q.dispatch(2, 10, 10).deliver.is_empty(),
            "offset 2 waits for the nacked 0"
        );
        assert_eq!(q.dispatch(2, 10, 50).deliver, vec![(0, 2)]);
        q.apply_ack(&[0, 1]);
        assert_eq!(q.dispatch(1, 10, 60).deliver, vec![(2, 1), (3, 1)]);
    }

    #[test]
    fn the_ack_state_limit_pauses_reads_without_forgetting() {
        let mut q = QueueState::new(cfg(false, 3), 0);
        for o in 0..3 {
            q.add_read(o, None, 0);
        }
        assert_eq!(q.read_window(), (3, 0), "at the limit: read nothing more");
        q.dispatch(1, 3, 0);
        q.apply_ack(&[2]);
        assert_eq!(
            q.read_window().1,
            0,
            "acked-out-of-order offsets still count"
        );
        q.apply_ack(&[0, 1]);
        assert_eq!(q.floor(), 3);
        assert_eq!(q.read_window(), (3, 3));
    }

    #[test]
    fn delayed_messages_wait() {
        let mut q = QueueState::new(cfg(false, 10), 0);
        q.add_read(0, None, 500);
        q.add_read(1, None, 0);
        assert_eq!(q.dispatch(1, 10, 0).deliver, vec![(1, 1)]);
        assert!(q.dispatch(1, 10, 499).deliver.is_empty());
        assert_eq!(q.dispatch(1, 10, 500).deliver, vec![(0, 1)]);
    }
}
