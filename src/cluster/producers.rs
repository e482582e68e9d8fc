//! Idempotent producers of one replicated partition (issue 14): for each producer id, the
//! last few batches it stored here (sequence number, Raft index and term, offsets), so a
//! batch sent again (after a failover, a lost answer, a timeout) is answered with where the
//! first copy went instead of being stored twice. Kafka's rule: the next sequence is accepted,
//! one already remembered is a duplicate, a gap is refused.
//!
//! Every replica keeps the table from the entries it stages (the leader also from what it
//! proposes, before staging), drops what a conflicting suffix replaced, and rebuilds it at
//! start from its log; a new leader therefore knows the sequences of every batch in its log,
//! committed or not.
//!
//! Owns: that table. Must not touch: Raft, the log (it is told what happened).

use std::collections::{HashMap, VecDeque};

use crate::limits;

/// One stored (or proposed) batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub sequence: i64,
    pub index: u64,
    pub term: u64,
    /// Offsets once staged; `None` while only proposed.
    pub base_offset: Option<u64>,
}

/// What to do with a batch of a known producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The next sequence (or an unknown producer): store it.
    New,
    /// Sent before: answer with where it went (once committed).
    Duplicate(Placed),
    /// Sent before, too long ago to say where.
    TooOld { oldest: i64 },
    /// A gap: `expected` was due.
    OutOfOrder { expected: i64 },
}

#[derive(Debug, Default)]
pub struct Producers {
    by_id: HashMap<u64, VecDeque<Placed>>,
    /// Producer ids in order of last use, for eviction beyond the limit.
    last_used: HashMap<u64, u64>,
    clock: u64,
}

impl Producers {
    pub fn check(&self, producer: u64, sequence: i64) -> Check {
        let Some(recent) = self.by_id.get(&producer) else {
            return Check::New;
        };
        let Some(last) = recent.back() else {
            return Check::New;
        };
        if sequence == last.sequence + 1 {
            return Check::New;
        }
        if sequence > last.sequence {
            return Check::OutOfOrder {
                expected: last.sequence + 1,
            };
        }
        match recent.iter().find(|p| p.sequence == sequence) {
            Some(p) => Check::Duplicate(*p),
            None => Check::TooOld {
                oldest: recent.front().map_or(sequence, |p| p.sequence),
            },
        }
    }

    /// Records a batch at Raft `index` (proposed, or staged with its offset). A batch at an
    /// index already recorded replaces it (staging fills in the offset).
    pub fn note(&mut self, producer: u64, placed: Placed) {
        self.clock += 1;
        self.last_used.insert(producer, self.clock);
        let recent = self.by_id.entry(producer).or_default();
        if let Some(p) = recent.iter_mut().find(|p| p.index == placed.index) {
            *p = placed;
            return;
        }
        recent.push_back(placed);
        while recent.len() > limits::PRODUCER_BATCHES_REMEMBERED {
            recent.pop_front();
        }
        if self.by_id.len() > limits::PRODUCERS_PER_PARTITION_MAX {
            self.evict_oldest();
        }
    }

    /// Entries from `index` on were replaced (a conflicting suffix, or proposals a new leader
    /// overwrote): forget them.
    pub fn cut_from(&mut self, index: u64) {
        for recent in self.by_id.values_mut() {
            recent.retain(|p| p.index < index);
        }
        self.by_id.retain(|_, r| !r.is_empty());
        let by_id = &self.by_id;
        self.last_used.retain(|id, _| by_id.contains_key(id));
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn evict_oldest(&mut self) {
        if let Some((&id, _)) = self.last_used.iter().min_by_key(|(_, &t)| t) {
            self.by_id.remove(&id);
            self.last_used.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(sequence: i64, index: u64) -> Placed {
        Placed {
            sequence,
            index,
            term: 1,
            base_offset: Some(index * 10),
        }
    }

    #[test]
    fn next_duplicate_gap_and_too_old() {
        let mut t = Producers::default();
        assert_eq!(t.check(7, 0), Check::New);
        assert_eq!(
            t.check(7, 5),
            Check::New,
            "an unknown producer may start anywhere"
        );
        let n = limits::PRODUCER_BATCHES_REMEMBERED as i64 + 3;
        for s in 0..n {
            t.note(7, at(s, 100 + s as u64));
        }
        assert_eq!(t.check(7, n), Check::New);
        assert_eq!(
            t.check(7, n - 1),
            Check::Duplicate(at(n - 1, 100 + n as u64 - 1))
        );
        assert_eq!(t.check(7, n + 2), Check::OutOfOrder { expected: n });
        assert_eq!(t.check(7, 0), Check::TooOld { oldest: 3 });
        assert_eq!(t.check(8, 3), Check::New, "producers are independent");
    }

    #[test]
    fn a_cut_suffix_is_forgotten_and_staging_fills_in_offsets() {
        let mut t = Producers::default();
        let proposed = Placed {
            base_offset: None,
            ..at(0, 5)
        };
        t.note(1, proposed);
        assert_eq!(t.check(1, 0), Check::Duplicate(proposed));
        t.note(1, at(0, 5));
        assert_eq!(t.check(1, 0), Check::Duplicate(at(0, 5)));
        t.note(1, at(1, 6));
        t.cut_from(6);
        assert_eq!(
            t.check(1, 1),
            Check::New,
            "the replaced batch may be sent again"
        );
        t.cut_from(1);
        assert!(t.is_empty());
    }
}
