//! Queue semantics end to end: competing consumers, redelivery, dead letters, durable acks,
//! key-shared ordering, delayed delivery, the bounded ack state.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ringmq::client::Client;
use ringmq::protocol::queue::{QueueFetchOut, Settle};
use ringmq::protocol::{PartitionChoice, RecordIn};

fn produce_n(c: &mut Client, topic: &str, partitions: u32, n: usize) {
    for i in 0..n {
        c.produce(
            topic,
            PartitionChoice::Explicit(i as u32 % partitions),
            &[rec(&format!("m{i}"))],
        )
        .unwrap();
    }
}

fn fetch(
    c: &mut Client,
    topic: &str,
    sub: &str,
    p: u32,
    credit: u32,
) -> Vec<ringmq::protocol::queue::QueueMessageOut> {
    let mut q = QueueFetchOut::new(topic, sub, p);
    q.max_messages = credit;
    q.max_wait_ms = 20;
    c.queue_fetch(&q).unwrap()
}

#[test]
fn four_competing_consumers_ack_every_message_exactly_once() {
    let dir = temp_dir("q-four");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("q", 4, -1, -1).unwrap();
    produce_n(&mut c, "q", 4, 400);
    let deliveries = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let addr = b.addr.clone();
        let deliveries = deliveries.clone();
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(addr.as_str()).unwrap();
            let mut idle = 0;
            while idle < 20 {
                let mut any = false;
                for p in 0..4 {
                    let msgs = fetch(&mut c, "q", "work", p, 7);
                    if msgs.is_empty() {
                        continue;
                    }
                    any = true;
                    let offsets: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
                    deliveries
                        .lock()
                        .unwrap()
                        .extend(msgs.iter().map(|m| (p, m.offset, m.delivery_count)));
                    assert_eq!(
                        c.queue_settle("q", "work", p, &offsets, Settle::Ack)
                            .unwrap() as usize,
                        offsets.len()
                    );
                }
                idle = if any { 0 } else { idle + 1 };
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let d = deliveries.lock().unwrap();
    let unique: BTreeSet<(u32, u64)> = d.iter().map(|x| (x.0, x.1)).collect();
    assert_eq!(
        d.len(),
        400,
        "each message delivered once: never in flight at two consumers"
    );
    assert_eq!(unique.len(), 400, "every message");
    assert!(d.iter().all(|x| x.2 == 1));
    let info = c.subscription_info("q", Some("work")).unwrap();
    assert_eq!(info[0].acked, 400);
    assert_eq!(info[0].backlog, 0);
}

#[test]
fn a_consumer_that_exits_without_acking_hands_its_messages_to_others() {
    let dir = temp_dir("q-exit");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("q", 1, -1, -1).unwrap();
    produce_n(&mut c, "q", 1, 10);
    let (code, out, err) = b.cli(
        &[
            "consume", "q", "--shared", "s", "--ack", "none", "--max", "4",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "m0\nm1\nm2\nm3\n");
    let (code, out, err) = b.cli(
        &[
            "consume",
            "q",
            "--shared",
            "s",
            "--idle-ms",
            "500",
            "--format",
            "json",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10, "{out}");
    for l in &lines {
        let offset: u64 = l
            .split("\"offset\":")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let count: u32 = l
            .split("\"delivery_count\":")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(count, if offset < 4 { 2 } else { 1 }, "{l}");
    }
}

#[test]
fn nacked_until_max_deliveries_lands_in_the_dead_letter_topic_with_its_origin() {
    let dir = temp_dir("q-dlq");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("orders", 1, -1, -1).unwrap();
    c.produce(
        "orders",
        PartitionChoice::Explicit(0),
        &[rec("ok"), rec("poison")],
    )
    .unwrap();
    let mut q = QueueFetchOut::new("orders", "s", 0);
    q.max_deliveries = 3;
    q.max_wait_ms = 50;
    let mut seen = 0;
    for _ in 0..20 {
        for m in c.queue_fetch(&q).unwrap() {
            let how = if m.value == b"poison" {
                Settle::Nack { delay_ms: 0 }
            } else {
                Settle::Ack
            };
            c.queue_settle("orders", "s", 0, &[m.offset], how).unwrap();
            if m.value == b"poison" {
                seen += 1;
                assert_eq!(m.delivery_count, seen);
            }
        }
    }
    assert_eq!(
        seen, 3,
        "delivered max_deliveries times, then dead-lettered"
    );
    let f = c.fetch("orders.dlq", 0, 0, 1 << 20, 0).unwrap();
    assert_eq!(f.records.len(), 1);
    let h: BTreeMap<String, String> = f.records[0]
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    assert_eq!(f.records[0].value, b"poison");
    assert_eq!(h["rq-origin-topic"], "orders");
    assert_eq!(h["rq-origin-partition"], "0");
    assert_eq!(h["rq-origin-offset"], "1");
    assert_eq!(h["rq-delivery-count"], "3");
    assert_eq!(h["rq-reason"], "nack");
    let info = c.subscription_info("orders", Some("s")).unwrap();
    assert_eq!(info[0].dead_lettered, 1);
    assert_eq!(info[0].backlog, 0, "the dead letter is acked on the source");
}

#[test]
fn restart_with_a_partly_acked_backlog_redelivers_exactly_the_unacked() {
    let dir = temp_dir("q-restart");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("q", 2, -1, -1).unwrap();
    produce_n(&mut c, "q", 2, 100);
    let mut acked = BTreeSet::new();
    for p in 0..2 {
        let msgs = fetch(&mut c, "q", "s", p, 50);
        assert_eq!(msgs.len(), 50);
        // Ack every third message: acks out of order leave holes above the floor.
        let offs: Vec<u64> = msgs
            .iter()
            .map(|m| m.offset)
            .filter(|o| o % 3 == 0)
            .collect();
        c.queue_settle("q", "s", p, &offs, Settle::Ack).unwrap();
        acked.extend(offs.iter().map(|o| (p, *o)));
    }
    drop(c);
    let b = b.restart();
    let mut c = b.client();
    let mut redelivered = BTreeSet::new();
    for p in 0..2 {
        loop {
            let msgs = fetch(&mut c, "q", "s", p, 100);
            if msgs.is_empty() {
                break;
            }
            let offs: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
            c.queue_settle("q", "s", p, &offs, Settle::Ack).unwrap();
            redelivered.extend(offs.iter().map(|o| (p, *o)));
        }
    }
    let all: BTreeSet<(u32, u64)> = (0..2).flat_map(|p| (0..50).map(move |o| (p, o))).collect();
    assert!(
        redelivered.is_disjoint(&acked),
        "no acked message is redelivered"
    );
    let union: BTreeSet<_> = redelivered.union(&acked).copied().collect();
    assert_eq!(union, all, "no unacked message is lost");
}

#[test]
fn key_shared_keeps_per_key_order_with_joins_leaves_and_nacks() {
    let dir = temp_dir("q-keys");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("k", 2, -1, -1).unwrap();
    // 8 keys × 25 messages; the value carries the per-key sequence number.
    for i in 0..200u32 {
        let key = format!("key{}", i % 8);
        let r = RecordIn {
            key: Some(key.clone().into_bytes()),
            value: format!("{}", i / 8).into_bytes(),
            ..Default::default()
        };
        c.produce("k", PartitionChoice::Key(key.as_bytes()), &[r])
            .unwrap();
    }
    // (key, seq) in the order messages were *processed* (recorded before acking).
    let processed: Arc<Mutex<Vec<(String, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let worker = |addr: String,
                  processed: Arc<Mutex<Vec<(String, u32)>>>,
                  seed: u64,
                  rounds: usize,
                  leave_unacked: bool| {
        std::thread::spawn(move || {
            let mut c = Client::connect(addr.as_str()).unwrap();
            let mut rng = ringmq::storage::mem::Rng::new(seed);
            for _ in 0..rounds {
                for p in 0..2 {
                    let mut q = QueueFetchOut::new("k", "ks", p);
                    q.key_shared = true;
                    // Never dead-letter here: a dead-lettered message leaves its key's sequence,
                    // and this test is about order (random nacks could reach max_deliveries).
                    q.max_deliveries = 0;
                    q.max_messages = 4;
                    q.max_wait_ms = 10;
                    for m in c.queue_fetch(&q).unwrap() {
                        if leave_unacked && rng.below(3) == 0 {
                            continue; // held until this consumer leaves
                        }
                        if rng.below(5) == 0 {
                            c.queue_settle("k", "ks", p, &[m.offset], Settle::Nack { delay_ms: 5 })
                                .unwrap();
                            continue;
                        }
                        let key = String::from_utf8(m.key.clone().unwrap()).unwrap();
                        let seq: u32 = String::from_utf8_lossy(&m.value).parse().unwrap();
                        processed.lock().unwrap().push((key, seq));
                        c.queue_settle("k", "ks", p, &[m.offset], Settle::Ack)
                            .unwrap();
                    }
                }
            }
        })
    };
    let a = worker(b.addr.clone(), processed.clone(), 1, 400, false);
    std::thread::sleep(Duration::from_millis(30));
    let leaver = worker(b.addr.clone(), processed.clone(), 2, 15, true); // joins, leaves holding some
    std::thread::sleep(Duration::from_millis(30));
    let late = worker(b.addr.clone(), processed.clone(), 3, 400, false); // joins mid-stream
    for t in [a, leaver, late] {
        t.join().unwrap();
    }
    let p = processed.lock().unwrap();
    let mut per_key: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (k, s) in p.iter() {
        per_key.entry(k).or_default().push(*s);
    }
    assert_eq!(per_key.len(), 8);
    for (k, seqs) in &per_key {
        assert_eq!(
            seqs,
            &(0..25).collect::<Vec<u32>>(),
            "key {k}: processed in order, each once"
        );
    }
}

#[test]
fn a_delayed_message_is_not_delivered_before_its_time() {
    let dir = temp_dir("q-delay");
    let b = Broker::start(&dir, 1, &[]);
    let mut c = b.client();
    c.create_topic("d", 1, -1, -1).unwrap();
    let (code, _, err) = b.cli(&["produce", "d", "--delay-ms", "700"], "later\n");
    assert_eq!(code, 0, "{err}");
    c.produce("d", PartitionChoice::Explicit(0), &[rec("now")])
        .unwrap();
    let mut q = QueueFetchOut::new("d", "s", 0);
    q.max_wait_ms = 3000;
    let first = c.queue_fetch(&q).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].value, b"now",
        "the later message was produced first but waits"
    );
    c.queue_settle("d", "s", 0, &[first[0].offset], Settle::Ack)
        .unwrap();
    let deliver_at: i64 = {
        let f = c.fetch("d", 0, 0, 1 << 20, 0).unwrap();
        let h = f.records[0]
            .headers
            .iter()
            .find(|(k, _)| k == "rq-deliver-at")
            .unwrap();
        String::from_utf8_lossy(&h.1).parse().unwrap()
    };
    let second = c.queue_fetch(&q).unwrap();
    let received_at = ringmq::runtime::clock::system_now_ms();
    assert_eq!(second[0].value, b"later");
    assert!(
        received_at >= deliver_at,
        "delivered at {received_at}, due at {deliver_at}"
    );
}

#[test]
fn at_the_ack_state_limit_dispatch_pauses_and_resumes_without_forgetting() {
    let dir = temp_dir("q-limit");
    let b = Broker::start(&dir, 1, &[]);
    let mut c = b.client();
    c.create_topic("l", 1, -1, -1).unwrap();
    produce_n(&mut c, "l", 1, 30);
    let mut q = QueueFetchOut::new("l", "s", 0);
    q.max_unacked = 10;
    q.max_messages = 100;
    q.max_wait_ms = 20;
    let first = c.queue_fetch(&q).unwrap();
    assert_eq!(first.len(), 10, "only max_unacked messages are tracked");
    // Ack the upper half: acked-out-of-order offsets still count against the limit.
    let upper: Vec<u64> = first[5..].iter().map(|m| m.offset).collect();
    c.queue_settle("l", "s", 0, &upper, Settle::Ack).unwrap();
    assert!(c.queue_fetch(&q).unwrap().is_empty(), "paused at the limit");
    let lower: Vec<u64> = first[..5].iter().map(|m| m.offset).collect();
    c.queue_settle("l", "s", 0, &lower, Settle::Ack).unwrap();
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rest.len() < 20 {
        let msgs = c.queue_fetch(&q).unwrap();
        let offs: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
        c.queue_settle("l", "s", 0, &offs, Settle::Ack).unwrap();
        rest.extend(offs);
        assert!(Instant::now() < deadline);
    }
    assert_eq!(
        rest,
        (10..30).collect::<Vec<u64>>(),
        "resumed where it paused; nothing forgotten"
    );
}

/// What a client can create is bounded: subscriptions per partition, and dead-letter topic
/// names are checked before a subscription exists.
#[test]
fn subscriptions_per_partition_are_bounded_with_a_clear_error() {
    let dir = temp_dir("sub-limit");
    let b = Broker::start(&dir, 1, &[]);
    let mut c = b.client();
    c.create_topic("t", 1, -1, -1).unwrap();
    let names: Vec<String> = (0..=ringmq::limits::SUBSCRIPTIONS_PER_PARTITION_MAX)
        .map(|i| format!("s{i}"))
        .collect();
    for name in &names[..names.len() - 1] {
        c.queue_fetch(&QueueFetchOut::new("t", name, 0)).unwrap();
    }
    let e = c
        .queue_fetch(&QueueFetchOut::new("t", &names[names.len() - 1], 0))
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(ringmq::protocol::fb::ErrorCode::InvalidRequest)
    );
    assert!(e.to_string().contains("its limit"), "{e}");
    // An existing subscription still works.
    c.queue_fetch(&QueueFetchOut::new("t", "s0", 0)).unwrap();
    // A bad dead-letter topic name is refused up front.
    let mut q = QueueFetchOut::new("t", "s1", 0);
    q.dead_letter_topic = Some("bad name\twith tab");
    let e = c.queue_fetch(&q).unwrap_err();
    assert!(e.to_string().contains("dead-letter topic name"), "{e}");
}

/// A subscription nobody fetches from after a restart keeps its acks when another
/// subscription's acks compact the state log (its restored state is part of the snapshot),
/// across a second restart.
#[test]
fn an_idle_subscriptions_acks_survive_compaction_after_a_restart() {
    const N: usize = 4_000;
    let dir = temp_dir("q-idle-compact");
    let b = Broker::start(&dir, 1, &["--state-compact-bytes", "65536"]);
    let mut c = b.client();
    c.create_topic("q", 1, -1, -1).unwrap();
    for chunk in 0..N / 500 {
        let recs: Vec<RecordIn> = (0..500).map(|i| rec(&format!("m{chunk}-{i}"))).collect();
        c.produce("q", PartitionChoice::Explicit(0), &recs).unwrap();
    }
    let mut acked = 0;
    while acked < N {
        let msgs = fetch(&mut c, "q", "idle", 0, 1000);
        assert!(!msgs.is_empty(), "idle got {acked} of {N}");
        let offs: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
        c.queue_settle("q", "idle", 0, &offs, Settle::Ack).unwrap();
        acked += offs.len();
    }
    drop(c);
    let b = b.restart();
    let mut c = b.client();
    // Another subscription acks one message per request: thousands of state-log records,
    // past the 64 KiB compaction threshold.
    let mut busy = 0;
    while busy < N {
        let msgs = fetch(&mut c, "q", "busy", 0, 1000);
        assert!(!msgs.is_empty(), "busy got {busy} of {N}");
        for m in &msgs {
            c.queue_settle("q", "busy", 0, &[m.offset], Settle::Ack)
                .unwrap();
        }
        busy += msgs.len();
    }
    drop(c);
    let b = b.restart();
    let mut c = b.client();
    let again = fetch(&mut c, "q", "idle", 0, 100);
    assert!(
        again.is_empty(),
        "acked messages redelivered to the idle subscription: {:?}",
        again.iter().map(|m| m.offset).take(10).collect::<Vec<_>>()
    );
}
