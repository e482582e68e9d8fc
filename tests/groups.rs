//! Stream semantics end to end: consumer groups, rebalancing, fencing, durable offsets, replay
//! by timestamp, retention.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringmq::protocol::{fb, PartitionChoice};

fn parts(a: &ringmq::protocol::groups::AssignmentOut) -> BTreeSet<u32> {
    a.assignments
        .iter()
        .flat_map(|t| t.partitions.clone())
        .collect()
}

fn produce_lines(b: &Broker, topic: &str, lines: &[String]) {
    let input = lines.join("\n") + "\n";
    let (code, _, err) = b.cli(&["produce", topic, "--key-separator", ","], &input);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn two_members_get_disjoint_assignments_that_cover_every_partition() {
    let dir = temp_dir("assign");
    let b = Broker::start(&dir, 2, &[]);
    let mut admin = b.client();
    admin.create_topic("t", 4, -1, -1).unwrap();
    let topics = vec!["t".to_string()];
    let mut c1 = b.client();
    let mut c2 = b.client();
    let a1 = c1.join_group("g", &topics, "", 5000).unwrap();
    assert_eq!(parts(&a1).len(), 4);
    let a2 = c2.join_group("g", &topics, "", 5000).unwrap();
    let (mut g1, mut g2) = (a1.generation, a2.generation);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (p1, p2) = loop {
        let x1 = c1.heartbeat("g", &a1.member_id, g1).unwrap();
        g1 = x1.generation;
        let x2 = c2.heartbeat("g", &a2.member_id, g2).unwrap();
        g2 = x2.generation;
        if !x1.rebalancing && !x2.rebalancing && parts(&x2).len() == 2 {
            let x1 = c1.heartbeat("g", &a1.member_id, g1).unwrap();
            break (parts(&x1), parts(&x2));
        }
        assert!(Instant::now() < deadline, "rebalance did not settle");
    };
    assert!(p1.is_disjoint(&p2), "{p1:?} {p2:?}");
    assert_eq!(p1.union(&p2).copied().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(p1.len(), 2);
    // describe agrees
    let d = admin.describe_group("g").unwrap();
    assert_eq!(d.members.len(), 2);
    let (code, out, _) = b.cli(&["group", "list"], "");
    assert_eq!(code, 0);
    assert_eq!(out, "g\n");
}

#[test]
fn two_cli_members_together_receive_every_message_once() {
    let dir = temp_dir("together");
    let b = Broker::start(&dir, 2, &[]);
    b.client().create_topic("t", 4, -1, -1).unwrap();
    let lines: Vec<String> = (0..2000).map(|i| format!("k{},{i}", i % 13)).collect();
    produce_lines(&b, "t", &lines);
    let spawn = || {
        Command::new(bin())
            .args([
                "consume",
                "t",
                "--group",
                "g",
                "--from",
                "earliest",
                "--idle-ms",
                "2000",
                "--session-timeout-ms",
                "3000",
            ])
            .env("RINGMQ_SERVER", &b.addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(30));
    let second = spawn();
    let mut all = Vec::new();
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from),
        );
    }
    let mut sorted = all.clone();
    sorted.sort();
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "no message twice");
    assert_eq!(all.len(), 2000, "every message");
}

#[test]
fn killed_member_partitions_move_and_resume_from_committed_offsets() {
    let dir = temp_dir("kill-member");
    let b = Broker::start(&dir, 2, &[]);
    b.client().create_topic("t", 4, -1, -1).unwrap();
    let first: Vec<String> = (0..400).map(|i| format!("k{},a{i}", i % 11)).collect();
    produce_lines(&b, "t", &first);
    // Member A reads everything, commits, then is killed -9 without leaving.
    let mut a = Command::new(bin())
        .args([
            "consume",
            "t",
            "--group",
            "g",
            "--from",
            "earliest",
            "--session-timeout-ms",
            "1000",
        ])
        .env("RINGMQ_SERVER", &b.addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = b.client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let committed: i64 = c.fetch_offsets("g", &[]).unwrap().iter().map(|x| x.2).sum();
        if committed == 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member A did not commit everything"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill().unwrap();
    let _ = a.wait();
    let killed_at = Instant::now();
    let second: Vec<String> = (0..300).map(|i| format!("k{},b{i}", i % 11)).collect();
    produce_lines(&b, "t", &second);
    // Member B joins; it gets A's partitions once A's session (1 s) expires.
    let (code, out, err) = b.cli(
        &[
            "consume",
            "t",
            "--group",
            "g",
            "--from",
            "earliest",
            "--max",
            "300",
            "--session-timeout-ms",
            "1000",
        ],
        "",
    );
    let took = killed_at.elapsed();
    assert_eq!(code, 0, "{err}");
    let got: Vec<&str> = out.lines().collect();
    let expected: BTreeSet<&str> = second
        .iter()
        .map(|l| l.split_once(',').unwrap().1)
        .collect();
    let got_set: BTreeSet<&str> = got.iter().copied().collect();
    assert_eq!(
        got_set, expected,
        "B resumes at the committed offsets: no gap, nothing old"
    );
    assert!(
        took < Duration::from_secs(20),
        "partitions moved within bounded time ({took:?})"
    );
}

#[test]
fn a_fenced_members_late_commit_is_rejected() {
    let dir = temp_dir("fence");
    let b = Broker::start(&dir, 1, &[]);
    b.client().create_topic("t", 2, -1, -1).unwrap();
    let topics = vec!["t".to_string()];
    let mut zombie = b.client();
    let z = zombie.join_group("g", &topics, "", 200).unwrap();
    zombie
        .commit_offsets("g", &z.member_id, z.generation, &[("t".into(), 0, 1)])
        .unwrap();
    std::thread::sleep(Duration::from_millis(600)); // session expires
    let mut live = b.client();
    let l = live.join_group("g", &topics, "", 5000).unwrap();
    assert_eq!(parts(&l).len(), 2, "the live member owns everything");
    let e = zombie
        .commit_offsets("g", &z.member_id, z.generation, &[("t".into(), 0, 99)])
        .unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::FencedMember), "{e}");
    live.commit_offsets("g", &l.member_id, l.generation, &[("t".into(), 0, 5)])
        .unwrap();
    // A live member cannot commit a partition it does not own either.
    let mut other = b.client();
    let o = other.join_group("g2", &topics, "", 5000).unwrap();
    assert!(other
        .commit_offsets("g", &o.member_id, o.generation, &[("t".into(), 0, 7)])
        .is_err());
    let committed = live.fetch_offsets("g", &[]).unwrap();
    assert!(committed.contains(&("t".to_string(), 0, 5)));
}

#[test]
fn two_groups_each_see_everything_with_per_key_order() {
    let dir = temp_dir("two-groups");
    let b = Broker::start(&dir, 2, &[]);
    b.client().create_topic("t", 4, -1, -1).unwrap();
    let lines: Vec<String> = (0..1000).map(|i| format!("k{},{i}", i % 17)).collect();
    produce_lines(&b, "t", &lines);
    for group in ["g1", "g2"] {
        let (code, out, err) = b.cli(
            &[
                "consume", "t", "--group", group, "--from", "earliest", "--max", "1000",
                "--format", "json",
            ],
            "",
        );
        assert_eq!(code, 0, "{err}");
        let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for l in out.lines() {
            let key = l
                .split("\"key\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string();
            let value: u64 = l
                .split("\"value\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            per_key.entry(key).or_default().push(value);
        }
        assert_eq!(per_key.values().map(|v| v.len()).sum::<usize>(), 1000);
        for (k, v) in &per_key {
            assert!(
                v.windows(2).all(|w| w[0] < w[1]),
                "group {group} key {k} out of order"
            );
        }
    }
}

#[test]
fn offsets_survive_restart_and_replay_by_timestamp() {
    let dir = temp_dir("replay");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("t", 1, -1, -1).unwrap();
    for i in 0..10 {
        c.produce(
            "t",
            PartitionChoice::Explicit(0),
            &[rec(&format!("old{i}"))],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(30));
    let t = ringmq::runtime::clock::system_now_ms();
    std::thread::sleep(Duration::from_millis(30));
    for i in 0..5 {
        c.produce(
            "t",
            PartitionChoice::Explicit(0),
            &[rec(&format!("new{i}"))],
        )
        .unwrap();
    }
    let m = c.join_group("g", &["t".to_string()], "", 5000).unwrap();
    c.commit_offsets("g", &m.member_id, m.generation, &[("t".into(), 0, 7)])
        .unwrap();
    drop(c);
    let b = b.restart();
    let mut c = b.client();
    assert_eq!(
        c.fetch_offsets("g", &[]).unwrap(),
        vec![("t".to_string(), 0, 7)]
    );
    assert_eq!(c.list_offset("t", 0, t).unwrap(), 10);
    let from = format!("@{t}");
    let (code, out, err) = b.cli(&["consume", "t", "--from", &from, "--max", "1"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "new0\n");
    // A group without committed offsets starts at --from; one with them resumes there.
    let (_, out, _) = b.cli(
        &[
            "consume", "t", "--group", "g", "--from", "earliest", "--max", "1",
        ],
        "",
    );
    assert_eq!(out, "old7\n");
    let (_, out, _) = b.cli(
        &[
            "consume", "t", "--group", "fresh", "--from", &from, "--max", "1",
        ],
        "",
    );
    assert_eq!(out, "new0\n");
}

#[test]
fn retention_deletes_old_segments_and_consumers_get_out_of_range_or_reset() {
    let dir = temp_dir("retention");
    let b = Broker::start(
        &dir,
        1,
        &[
            "--segment-bytes",
            "65536",
            "--retention-check-ms",
            "50",
            "--fsync",
            "never",
        ],
    );
    let mut c = b.client();
    c.create_topic("size", 1, 3 * 65536, -1).unwrap();
    c.create_topic("age", 1, -1, 1).unwrap();
    let big = "x".repeat(4000);
    for topic in ["size", "age"] {
        for _ in 0..100 {
            c.produce(topic, PartitionChoice::Explicit(0), &[rec(&big)])
                .unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let starts = loop {
        let m = c.metadata(&["age", "size"]).unwrap();
        let starts: Vec<(String, u64, u64)> = m
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.partitions[0].start_offset,
                    t.partitions[0].end_offset,
                )
            })
            .collect();
        if starts.iter().all(|(_, s, _)| *s > 0) {
            break starts;
        }
        assert!(
            Instant::now() < deadline,
            "retention did not run: {starts:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for (name, start, end) in &starts {
        assert_eq!(*end, 100, "{name}: the active segment stays");
        let e = c.fetch(name, 0, 0, 1000, 0).unwrap_err();
        assert_eq!(e.code(), Some(fb::ErrorCode::OffsetOutOfRange), "{name}");
        let (code, out, err) = b.cli(
            &["consume", name, "--from", "earliest", "--idle-ms", "300"],
            "",
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.lines().count() as u64,
            end - start,
            "{name}: earliest = log start"
        );
    }
    let size_start = starts.iter().find(|s| s.0 == "size").unwrap().1;
    assert!(
        100 - size_start >= 3 * 65536 / 4096 - 16,
        "size retention keeps about 3 segments"
    );
}

fn spawn_group_consumer(
    b: &Broker,
    topic: &str,
    group: &str,
    extra: &[&str],
) -> std::process::Child {
    Command::new(bin())
        .args(["consume", topic, "--group", group, "--from", "earliest"])
        .args(extra)
        .env("RINGMQ_SERVER", &b.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lines of JSON output that name the same message more than once, and the total.
fn duplicates(lines: &[String]) -> (usize, usize) {
    let unique: BTreeSet<&String> = lines.iter().collect();
    (lines.len() - unique.len(), lines.len())
}

/// Issue 11, item 4, exactly: two `consume T --group g --from earliest --format json
/// --idle-ms 6000` started together on a 4-partition topic of 4,000 keyed messages, their
/// outputs collected one after the other (so one member's stdout blocks while the other runs).
/// Before the fix about 1 run in 5 printed everything twice. 20 runs: 10 at a time, 2 rounds.
#[test]
fn two_group_consumers_started_together_never_deliver_twice_20_runs() {
    const AT_ONCE: usize = 10;
    let dir = temp_dir("together-20");
    let b = Broker::start(&dir, 2, &[]);
    let lines: Vec<String> = (0..4000)
        .map(|i| format!("key{},value-{i}", i % 97))
        .collect();
    for t in 0..AT_ONCE {
        let topic = format!("t{t}");
        b.client().create_topic(&topic, 4, -1, -1).unwrap();
        produce_lines(&b, &topic, &lines);
    }
    let args = ["--format", "json", "--idle-ms", "6000"];
    for round in 0..2 {
        // Each run drains its first consumer, then its second; runs go side by side.
        let runs: Vec<_> = (0..AT_ONCE)
            .map(|t| {
                let (topic, group) = (format!("t{t}"), format!("g{round}-{t}"));
                let first = spawn_group_consumer(&b, &topic, &group, &args);
                let second = spawn_group_consumer(&b, &topic, &group, &args);
                std::thread::spawn(move || {
                    let mut all = Vec::new();
                    for child in [first, second] {
                        let out = child.wait_with_output().unwrap();
                        let err = String::from_utf8_lossy(&out.stderr).to_string();
                        if !out.status.success() {
                            return Err(err);
                        }
                        all.extend(
                            String::from_utf8_lossy(&out.stdout)
                                .lines()
                                .map(String::from),
                        );
                    }
                    Ok(all)
                })
            })
            .collect();
        for (t, run) in runs.into_iter().enumerate() {
            let all = run
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round} topic t{t}: {e}"));
            let (dups, total) = duplicates(&all);
            assert_eq!(dups, 0, "round {round} topic t{t}: {dups} of {total} twice");
            assert_eq!(total, 4000, "round {round} topic t{t}: every message");
        }
    }
}

/// A member whose output is read slowly (400 lines/s) with a 2 s session stays in the group:
/// heartbeats do not wait for printing. Before the fix 2,160 of 3,000 were delivered twice.
#[test]
fn a_slowly_read_member_is_not_expired_and_nothing_is_delivered_twice() {
    use std::io::BufRead;
    let dir = temp_dir("slow-reader");
    let b = Broker::start(&dir, 2, &[]);
    b.client().create_topic("t", 4, -1, -1).unwrap();
    // Lines long enough (JSON, ~250 bytes) that the pipe fills: printing blocks.
    let pad = "p".repeat(150);
    let lines: Vec<String> = (0..3000)
        .map(|i| format!("k{},v{i}-{pad}", i % 31))
        .collect();
    produce_lines(&b, "t", &lines);
    let args = [
        "--session-timeout-ms",
        "2000",
        "--idle-ms",
        "3000",
        "--format",
        "json",
    ];
    let mut slow = spawn_group_consumer(&b, "t", "g", &args);
    let stdout = slow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            got.push(line);
            std::thread::sleep(Duration::from_micros(2500));
        }
        got
    });
    std::thread::sleep(Duration::from_millis(300));
    let fast = spawn_group_consumer(&b, "t", "g", &args);
    let fast_out = fast.wait_with_output().unwrap();
    let slow_lines = reader.join().unwrap();
    let slow_status = slow.wait().unwrap();
    let mut slow_err = String::new();
    std::io::Read::read_to_string(&mut slow.stderr.take().unwrap(), &mut slow_err).unwrap();
    assert!(slow_status.success(), "slow member: {slow_err}");
    assert!(
        fast_out.status.success(),
        "fast member: {}",
        String::from_utf8_lossy(&fast_out.stderr)
    );
    assert!(
        !slow_err.contains("fenced"),
        "the slow member was fenced: {slow_err}"
    );
    let mut all = slow_lines;
    all.extend(
        String::from_utf8_lossy(&fast_out.stdout)
            .lines()
            .map(String::from),
    );
    let (dups, total) = duplicates(&all);
    assert_eq!(dups, 0, "{dups} of {total} twice");
    assert_eq!(total, 3000);
}

/// A member stuck (stdout never read) on the very partition the group takes from it is
/// expired after its session; when it wakes up its printed-but-refused messages make it exit
/// non-zero with a message saying so, and it stops delivering that partition.
#[test]
fn a_member_whose_commit_is_refused_exits_non_zero() {
    let dir = temp_dir("refused");
    let b = Broker::start(&dir, 1, &[]);
    let mut c = b.client();
    c.create_topic("t", 2, -1, -1).unwrap();
    // Everything in partition 1: the partition a second member takes (highest first).
    let big = "x".repeat(200);
    for chunk in 0..20 {
        let recs: Vec<_> = (0..100)
            .map(|i| ringmq::protocol::RecordIn {
                key: None,
                value: format!("{chunk}-{i}-{big}").into_bytes(),
                headers: vec![],
                timestamp_ms: 0,
            })
            .collect();
        c.produce("t", PartitionChoice::Explicit(1), &recs).unwrap();
    }
    let args = ["--session-timeout-ms", "1000", "--idle-ms", "1500"];
    let mut stuck = spawn_group_consumer(&b, "t", "g", &args);
    // Wait until it delivers partition 1 (its first output), then stop reading: its pipe fills
    // and it blocks mid-partition. Then a second member joins and takes partition 1.
    let mut stuck_stdout = std::io::BufReader::new(stuck.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stuck_stdout, &mut first).unwrap();
    assert!(!first.is_empty(), "the first member printed nothing");
    std::thread::sleep(Duration::from_millis(300));
    let other = spawn_group_consumer(&b, "t", "g", &args);
    let other_out = other.wait_with_output().unwrap();
    assert!(
        other_out.status.success(),
        "{}",
        String::from_utf8_lossy(&other_out.stderr)
    );
    let other_lines = String::from_utf8_lossy(&other_out.stdout).lines().count();
    assert_eq!(
        other_lines, 2000,
        "the new owner delivers from the last commit"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stuck_stdout, &mut rest).unwrap();
    let status = stuck.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stuck.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "must exit non-zero: {err}");
    assert!(err.contains("could not be committed"), "{err}");
}
