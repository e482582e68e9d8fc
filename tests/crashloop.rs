//! Crash loop: a broker under load (producers, a consumer group committing, a shared
//! subscription acking) is killed with SIGKILL at random moments and restarted, N times. Then:
//! every acknowledged message is present exactly once, in order, at its acknowledged offset; no
//! committed group offset moved backwards; no acked queue message was delivered again.
//!
//! CI runs 10 cycles. Long run: `RINGMQ_CRASH_CYCLES=200 cargo test --release --test crashloop
//! -- --nocapture` (`RINGMQ_CRASH_SEED=N` replays the kill timings).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ringmq::client::Client;
use ringmq::protocol::queue::{QueueFetchOut, Settle};
use ringmq::protocol::PartitionChoice;

#[derive(Default)]
struct Ledger {
    /// (partition, offset) → value of every acknowledged produce.
    acked: BTreeMap<(u32, u64), String>,
    /// Highest successfully committed group offset per partition.
    committed: BTreeMap<u32, i64>,
    /// Queue offsets whose ack was acknowledged.
    queue_acked: BTreeSet<(u32, u64)>,
    /// Violations seen while running.
    violations: Vec<String>,
}

fn producer(addr: String, p: u32, cycle: usize, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut c) = Client::connect(addr.as_str()) else {
        return;
    };
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let v = format!("p{p}-c{cycle}-{i}");
        match c.produce("c", PartitionChoice::Explicit(p), &[rec(&v)]) {
            Ok(ack) => {
                ledger.lock().unwrap().acked.insert((p, ack.base_offset), v);
            }
            Err(_) => return,
        }
        i += 1;
    }
}

fn group_member(addr: String, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut c) = Client::connect(addr.as_str()) else {
        return;
    };
    let Ok(a) = c.join_group("cg", &["c".to_string()], "", 2000) else {
        return;
    };
    let Ok(committed) = c.fetch_offsets("cg", &[]) else {
        return;
    };
    let mut pos: BTreeMap<u32, u64> = BTreeMap::new();
    for t in &a.assignments {
        for p in &t.partitions {
            let o = committed
                .iter()
                .find(|x| x.1 == *p)
                .map(|x| x.2.max(0) as u64)
                .unwrap_or(0);
            pos.insert(*p, o);
        }
    }
    while !stop.load(Ordering::SeqCst) {
        for (p, at) in pos.iter_mut() {
            let Ok(f) = c.fetch("c", *p, *at, 64 * 1024, 10) else {
                return;
            };
            if f.records.is_empty() {
                continue;
            }
            *at = f.next_offset;
            if c.commit_offsets(
                "cg",
                &a.member_id,
                a.generation,
                &[("c".into(), *p, *at as i64)],
            )
            .is_err()
            {
                return;
            }
            let mut l = ledger.lock().unwrap();
            let e = l.committed.entry(*p).or_insert(0);
            *e = (*e).max(*at as i64);
        }
    }
}

fn queue_consumer(addr: String, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut c) = Client::connect(addr.as_str()) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        for p in 0..2 {
            let mut q = QueueFetchOut::new("c", "qs", p);
            q.max_messages = 20;
            q.max_wait_ms = 10;
            let Ok(msgs) = c.queue_fetch(&q) else { return };
            if msgs.is_empty() {
                continue;
            }
            {
                let mut l = ledger.lock().unwrap();
                for m in &msgs {
                    if l.queue_acked.contains(&(p, m.offset)) {
                        l.violations.push(format!(
                            "queue message {p}/{} delivered after its ack",
                            m.offset
                        ));
                    }
                }
            }
            let offs: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
            if c.queue_settle("c", "qs", p, &offs, Settle::Ack).is_err() {
                return;
            }
            ledger
                .lock()
                .unwrap()
                .queue_acked
                .extend(offs.iter().map(|o| (p, *o)));
        }
    }
}

#[test]
fn crash_loop_loses_nothing_acknowledged() {
    let cycles: usize = std::env::var("RINGMQ_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("RINGMQ_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = ringmq::storage::mem::Rng::new(seed);
    let dir = temp_dir("crashloop");
    // A small state-log compaction size: snapshots happen while acks and commits are in flight.
    let mut b = Broker::start(&dir, 2, &["--state-compact-bytes", "262144"]);
    b.client().create_topic("c", 2, -1, -1).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for cycle in 0..cycles {
        // After a restart: committed offsets never moved backwards.
        {
            let mut c = b.client();
            let now = c.fetch_offsets("cg", &[]).unwrap();
            let l = ledger.lock().unwrap();
            for (p, want) in &l.committed {
                let got = now.iter().find(|x| x.1 == *p).map(|x| x.2).unwrap_or(-1);
                assert!(got >= *want, "seed {seed} cycle {cycle}: committed offset of {p} went back from {want} to {got}");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in 0..2 {
            let (a, s, l) = (b.addr.clone(), stop.clone(), ledger.clone());
            threads.push(std::thread::spawn(move || producer(a, p, cycle, s, l)));
        }
        let (a, s, l) = (b.addr.clone(), stop.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || group_member(a, s, l)));
        let (a, s, l) = (b.addr.clone(), stop.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || queue_consumer(a, s, l)));
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        b.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        b = b.restart();
    }
    let l = ledger.lock().unwrap();
    assert!(l.violations.is_empty(), "seed {seed}: {:?}", l.violations);
    let mut c = b.client();
    for p in 0..2u32 {
        let got = read_partition(&mut c, "c", p);
        let values: Vec<&String> = got.iter().map(|x| &x.1).collect();
        let unique: BTreeSet<&String> = values.iter().copied().collect();
        assert_eq!(
            unique.len(),
            values.len(),
            "seed {seed}: partition {p} holds a message twice"
        );
        for (i, (o, _)) in got.iter().enumerate() {
            assert_eq!(*o as usize, i, "offsets are dense");
        }
        for ((q, o), v) in l.acked.range((p, 0)..(p + 1, 0)) {
            assert_eq!(
                got.get(*o as usize).map(|x| &x.1),
                Some(v),
                "seed {seed}: acked {q}/{o} missing or different"
            );
        }
        // In order: within each cycle, a producer's sequence numbers increase with the offset.
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (_, v) in &got {
            let (prefix, n) = v.rsplit_once('-').unwrap();
            let n: u64 = n.parse().unwrap();
            if let Some(prev) = last.insert(prefix.to_string(), n) {
                assert!(n > prev, "seed {seed}: {v} after {prefix}-{prev}");
            }
        }
    }
    eprintln!(
        "crash loop: {cycles} cycles, {} acked messages, {} committed partitions, {} queue acks, seed {seed}",
        l.acked.len(),
        l.committed.len(),
        l.queue_acked.len()
    );
}
