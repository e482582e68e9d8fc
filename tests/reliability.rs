//! Faults through a real broker: corruption of segments, indexes and state logs; disk errors
//! (ENOSPC, EIO) on write and fdatasync; bounded memory under idle connections, a consumer
//! that never reads and a flooding producer.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringmq::protocol::{self as proto, fb, PartitionChoice};

fn produce_big(c: &mut ringmq::client::Client, topic: &str, p: u32, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..n {
        let s = format!("{topic}-{p}-{i}-{}", "x".repeat(3000));
        c.produce(topic, PartitionChoice::Explicit(p), &[rec(&s)])
            .unwrap();
        v.push(s);
    }
    v
}

fn pdir(data: &Path, topic: &str, p: u32) -> PathBuf {
    data.join("topics").join(format!("{topic}-{p}"))
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn status(b: &Broker) -> Vec<ringmq::protocol::multicast::PartitionStatusOut> {
    b.client().status().unwrap()
}

#[test]
fn corruption_is_cut_or_reported_and_healthy_partitions_keep_serving() {
    let dir = temp_dir("corrupt");
    let b = Broker::start(&dir, 2, &["--segment-bytes", "65536"]);
    let mut c = b.client();
    for t in ["good", "tail", "sealed", "index"] {
        c.create_topic(t, 1, -1, -1).unwrap();
    }
    let mut written = std::collections::BTreeMap::new();
    for t in ["good", "tail", "sealed", "index"] {
        written.insert(t, produce_big(&mut c, t, 0, 60));
    }
    let m = c.join_group("g", &["good".to_string()], "", 5000).unwrap();
    c.commit_offsets("g", &m.member_id, m.generation, &[("good".into(), 0, 42)])
        .unwrap();
    drop(c);
    let mut b = b;
    b.kill9();
    // 1. a flipped byte in the active segment's last batch: recovery cuts that batch only.
    let tail_segs = segments(&pdir(&dir, "tail", 0));
    let active = tail_segs.last().unwrap();
    let len = std::fs::metadata(active).unwrap().len();
    flip(active, len - 4096 + 200);
    // 2. a flipped byte in a sealed segment whose index is gone: the partition is unavailable.
    let sealed_dir = pdir(&dir, "sealed", 0);
    let first = &segments(&sealed_dir)[0];
    flip(first, 300);
    std::fs::remove_file(first.with_extension("index")).unwrap();
    // 3. a flipped byte in an index file: the index is rebuilt from the segment.
    let index_dir = pdir(&dir, "index", 0);
    flip(&segments(&index_dir)[0].with_extension("index"), 20);
    let b = b.restart();
    let st = status(&b);
    let get = |t: &str| st.iter().find(|s| s.topic == t).unwrap().clone();
    assert!(
        get("good").healthy && get("good").message.is_empty(),
        "{:?}",
        get("good")
    );
    assert!(get("tail").healthy);
    assert!(
        get("tail").message.contains("recovered: cut"),
        "{:?}",
        get("tail")
    );
    assert!(!get("sealed").healthy);
    assert!(
        get("sealed").message.contains("sealed segment"),
        "{:?}",
        get("sealed")
    );
    assert!(get("index").healthy);
    let (code, out, _) = b.cli(&["status"], "");
    assert_ne!(
        code, 0,
        "status exits non-zero while a partition is unavailable"
    );
    assert!(
        out.contains("sealed 0") && out.contains("UNAVAILABLE"),
        "{out}"
    );
    let mut c = b.client();
    let got = |c: &mut ringmq::client::Client, t: &str| -> Vec<String> {
        read_partition(c, t, 0).into_iter().map(|x| x.1).collect()
    };
    assert_eq!(got(&mut c, "good"), written["good"]);
    assert_eq!(got(&mut c, "index"), written["index"]);
    let tail = got(&mut c, "tail");
    assert_eq!(tail.len(), 59, "only the torn last batch was cut");
    assert_eq!(tail[..], written["tail"][..59]);
    let e = c.fetch("sealed", 0, 0, 1000, 0).unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::PartitionUnavailable));
    assert!(c
        .produce("sealed", PartitionChoice::Explicit(0), &[rec("x")])
        .is_err());
    c.produce("good", PartitionChoice::Explicit(0), &[rec("after")])
        .unwrap();
    assert_eq!(
        c.fetch_offsets("g", &[]).unwrap(),
        vec![("good".to_string(), 0, 42)]
    );
}

#[test]
fn a_corrupt_state_log_tail_is_cut_and_the_broker_serves() {
    let dir = temp_dir("corrupt-state");
    let b = Broker::start(&dir, 1, &[]);
    let mut c = b.client();
    c.create_topic("t", 1, -1, -1).unwrap();
    let m = c.join_group("g", &["t".to_string()], "", 5000).unwrap();
    for o in 1..=5 {
        c.commit_offsets("g", &m.member_id, m.generation, &[("t".into(), 0, o)])
            .unwrap();
    }
    drop(c);
    let mut b = b;
    b.kill9();
    let seg = segments(&dir.join("state").join("shard-0")).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    flip(&seg, len - 4096 + 20); // inside the last commit's CRC-covered header
    let b = b.restart();
    let mut c = b.client();
    // The last commit (5) was cut; the one before it stands.
    assert_eq!(
        c.fetch_offsets("g", &[]).unwrap(),
        vec![("t".to_string(), 0, 4)]
    );
}

#[test]
fn disk_errors_stop_one_partition_and_lose_nothing_acknowledged() {
    let dir = temp_dir("diskerr");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = start_with_fault_files(&dir, &addr, 2);
    let mut c = ringmq::client::Client::connect(addr.as_str()).unwrap();
    c.create_topic("fsync", 1, -1, -1).unwrap();
    c.create_topic("full", 1, -1, -1).unwrap();
    c.create_topic("fine", 1, -1, -1).unwrap();
    for t in ["fsync", "full", "fine"] {
        for i in 0..5 {
            c.produce(t, PartitionChoice::Explicit(0), &[rec(&format!("{t}{i}"))])
                .unwrap();
        }
    }
    std::fs::write(pdir(&dir, "fsync", 0).join(".fault-sync"), "eio").unwrap();
    std::fs::write(pdir(&dir, "full", 0).join(".fault-write"), "enospc").unwrap();
    for (t, what) in [("fsync", "Input/output error"), ("full", "No space left")] {
        let e = c
            .produce(t, PartitionChoice::Explicit(0), &[rec("lost")])
            .unwrap_err();
        assert_eq!(e.code(), Some(fb::ErrorCode::StorageFailed), "{t}: {e}");
        assert!(e.to_string().contains(what), "{t}: {e}");
    }
    // Removing the fault does not revive the partition: after an I/O error nothing is acked.
    std::fs::remove_file(pdir(&dir, "fsync", 0).join(".fault-sync")).unwrap();
    assert!(c
        .produce(
            "fsync",
            PartitionChoice::Explicit(0),
            &[rec("still refused")]
        )
        .is_err());
    // The rest of the broker keeps serving, and acknowledged data is readable.
    c.produce("fine", PartitionChoice::Explicit(0), &[rec("fine5")])
        .unwrap();
    assert_eq!(read_partition(&mut c, "fine", 0).len(), 6);
    assert_eq!(read_partition(&mut c, "fsync", 0).len(), 5);
    let st = c.status().unwrap();
    assert!(!st.iter().find(|s| s.topic == "fsync").unwrap().healthy);
    assert!(st.iter().find(|s| s.topic == "fine").unwrap().healthy);
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_file(pdir(&dir, "full", 0).join(".fault-write")).unwrap();
    let b = Broker::start_on(&dir, 2, &[], port);
    let mut c = b.client();
    for t in ["fsync", "full", "fine"] {
        let got: Vec<String> = read_partition(&mut c, t, 0)
            .into_iter()
            .map(|x| x.1)
            .collect();
        let want: Vec<String> = (0..if t == "fine" { 6 } else { 5 })
            .map(|i| format!("{t}{i}"))
            .collect();
        assert_eq!(
            got[..want.len()],
            want[..],
            "{t}: every acknowledged message, in order"
        );
        // After a failed fdatasync the written batch may survive: it was never acknowledged
        // (the producer got an error), as with Kafka. Nothing else may appear.
        let extra = &got[want.len()..];
        assert!(
            extra.is_empty() || (t == "fsync" && extra == ["lost"]),
            "{t}: unexpected {extra:?}"
        );
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn memory_stays_bounded_under_idle_connections_a_stalled_consumer_and_a_flood() {
    let dir = temp_dir("memory");
    let b = Broker::start(&dir, 2, &["--fsync", "never"]);
    let pid = b.child.id();
    let mut c = b.client();
    c.create_topic("m", 2, -1, -1).unwrap();
    let big = "y".repeat(60_000);
    for _ in 0..200 {
        c.produce("m", PartitionChoice::Explicit(0), &[rec(&big)])
            .unwrap();
    }
    // 1,000 idle connections (handshaken).
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(b.addr.as_str()).unwrap();
        s.write_all(&proto::encode_handshake(1, "idle")).unwrap();
        idle.push(s);
    }
    eprintln!(
        "broker memory with 1000 idle connections: {} KiB",
        rss_kib(pid, "VmRSS:")
    );
    // A consumer that asks for 16 MiB fetches, pipelined, and never reads the responses.
    let mut stalled = TcpStream::connect(b.addr.as_str()).unwrap();
    stalled
        .write_all(&proto::encode_handshake(1, "stalled"))
        .unwrap();
    let _ = stalled.set_write_timeout(Some(Duration::from_secs(2)));
    for i in 0..500u64 {
        let f = proto::FetchArgsOut {
            topic: "m",
            partition: 0,
            offset: 0,
            max_bytes: 16 << 20,
            max_wait_ms: 0,
            filter: None,
        };
        if stalled.write_all(&proto::encode_fetch(i + 2, &f)).is_err() {
            break; // the broker stopped reading us: backpressure
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    eprintln!(
        "broker memory with a stalled consumer too: {} KiB",
        rss_kib(pid, "VmRSS:")
    );
    // A producer flooding partition 1 with 1 MiB batches, as fast as it can, for 3 s.
    let addr = b.addr.clone();
    let flood = std::thread::spawn(move || {
        let mut c = ringmq::client::Client::connect(addr.as_str()).unwrap();
        let recs: Vec<_> = (0..16).map(|_| rec(&"z".repeat(64 * 1024))).collect();
        let batch = proto::encode_record_batch(&recs);
        let end = Instant::now() + Duration::from_secs(3);
        let mut in_flight = 0;
        while Instant::now() < end {
            c.send(|corr| proto::encode_produce(corr, "m", PartitionChoice::Explicit(1), &batch))
                .unwrap();
            c.flush().unwrap();
            in_flight += 1;
            if in_flight >= 32 {
                ringmq::client::produce_ack(&c.recv().unwrap()).unwrap();
                in_flight -= 1;
            }
        }
        for _ in 0..in_flight {
            ringmq::client::produce_ack(&c.recv().unwrap()).unwrap();
        }
    });
    // Meanwhile another client is served normally.
    let mut other = b.client();
    for i in 0..20 {
        other
            .produce("m", PartitionChoice::Explicit(0), &[rec(&format!("o{i}"))])
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    flood.join().unwrap();
    let peak = rss_kib(pid, "VmHWM:");
    let now = rss_kib(pid, "VmRSS:");
    eprintln!("broker memory: peak {peak} KiB, now {now} KiB (1000 idle connections, a stalled consumer, a flood)");
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB over 512 MiB");
    drop(stalled);
    drop(idle);
}

/// A commit whose state-log append fails is refused and not applied: the coordinator keeps
/// answering the last durable offset, before and after a restart (durable, then applied).
#[test]
fn a_commit_that_cannot_be_made_durable_is_not_applied() {
    let dir = temp_dir("state-fault");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let start = |dir: &Path| KillOnDrop(start_with_fault_files(dir, &addr, 1));
    let child = start(&dir);
    let mut c = ringmq::client::Client::connect(addr.as_str()).unwrap();
    c.create_topic("t", 1, -1, -1).unwrap();
    let a = c.join_group("g", &["t".to_string()], "", 10_000).unwrap();
    let commit = |c: &mut ringmq::client::Client, o: i64| {
        c.commit_offsets("g", &a.member_id, a.generation, &[("t".to_string(), 0, o)])
    };
    commit(&mut c, 3).unwrap();
    let state_dir = dir.join("state").join("shard-0");
    // A failed write never reaches the disk (a failed fdatasync may: like a produce whose
    // fdatasync failed, such a commit can reappear after a restart, never acknowledged).
    std::fs::write(state_dir.join(".fault-write"), "eio").unwrap();
    let e = commit(&mut c, 7).unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::StorageFailed), "{e}");
    assert_eq!(
        c.fetch_offsets("g", &[]).unwrap(),
        vec![("t".to_string(), 0, 3)],
        "memory agrees with disk after the failed append"
    );
    drop(child);
    std::fs::remove_file(state_dir.join(".fault-write")).unwrap();
    let _child = start(&dir);
    let mut c = ringmq::client::Client::connect(addr.as_str()).unwrap();
    assert_eq!(
        c.fetch_offsets("g", &[]).unwrap(),
        vec![("t".to_string(), 0, 3)]
    );
}

/// A broker with the fault-file hook armed (files in a log directory make its writes or
/// fdatasyncs fail), once it listens.
fn start_with_fault_files(dir: &Path, addr: &str, cores: usize) -> std::process::Child {
    let mut child = Command::new(bin())
        .args(["serve", "--data"])
        .arg(dir)
        .args(["--listen", addr, "--cores", &cores.to_string()])
        .env(ringmq::storage::io::FAULT_FILES_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening on"), "{line}");
    child
}

/// A child process killed (SIGKILL) when dropped, also when a test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
