//! A cluster of real `ringmq serve` processes on 127.0.0.1 (`--cores 1` each, the machine has
//! two cores): formation from a seed list, topics created through one node and used through
//! others (forwarding), controller failover by kill -9, a node joining later, multicast across
//! nodes, and a client that keeps working when the node it used dies.
//!
//! The tests in this file run one at a time (a lock): several clusters at once on two cores
//! would make heartbeats late and nodes look dead. Every wait is bounded.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{free_port, temp_dir, Broker, TempDir};
use ringmq::client::Client;
use ringmq::protocol::{ClusterStatusOut, PartitionChoice};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

struct Node {
    id: u32,
    peer: String,
    broker: Option<Broker>,
}

/// Nodes of one cluster; directories are removed when it drops (after the brokers).
struct Cluster {
    nodes: Vec<Node>,
    seeds: String,
    _dirs: Vec<TempDir>,
}

/// Two seconds of silence before a node counts as down (the default is one): CI runs several
/// brokers and cargo on two cores, where a one-second stall is not a dead node.
const FAILURE_TIMEOUT_MS: &str = "2000";

fn node_args(id: u32, peer: &str, seeds: &str) -> Vec<String> {
    vec![
        "--node-id".into(),
        id.to_string(),
        "--peer-listen".into(),
        peer.into(),
        "--seeds".into(),
        seeds.into(),
        "--node-failure-timeout-ms".into(),
        FAILURE_TIMEOUT_MS.into(),
    ]
}

/// Produces, retrying while the partition's node is briefly unreachable (10 s at most).
fn produce_retrying(
    c: &mut Client,
    topic: &str,
    p: u32,
    records: &[ringmq::protocol::RecordIn],
) -> ringmq::client::ProduceAck {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.produce(topic, PartitionChoice::Explicit(p), records) {
            Ok(ack) => return ack,
            Err(e) if ringmq::cli::common::unavailable_for_now(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("produce to {topic}-{p}: {e}"),
        }
    }
}

impl Cluster {
    /// `voters` seed nodes, all started, each seeing the others alive and a controller leader.
    fn start(name: &str, voters: u32) -> Cluster {
        let peers: Vec<String> = (0..voters)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let seeds = peers.join(",");
        let mut c = Cluster {
            nodes: Vec::new(),
            seeds,
            _dirs: Vec::new(),
        };
        for (i, peer) in peers.into_iter().enumerate() {
            c.add_node(name, i as u32 + 1, peer);
        }
        c.wait_formed(voters as usize);
        c
    }

    /// Starts node `id` with the cluster's seeds (a voter if `peer` is a seed).
    fn add_node(&mut self, name: &str, id: u32, peer: String) {
        let dir = temp_dir(&format!("{name}-n{id}"));
        let args = node_args(id, &peer, &self.seeds);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let broker = Broker::start(&dir, 1, &args);
        self._dirs.push(dir);
        self.nodes.push(Node {
            id,
            peer,
            broker: Some(broker),
        });
    }

    fn node(&self, id: u32) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node")
    }

    fn addr(&self, id: u32) -> String {
        self.node(id).broker.as_ref().expect("running").addr.clone()
    }

    /// The client addresses of nodes 1, 2 and 3, comma-separated.
    fn all(&self) -> String {
        format!("{},{},{}", self.addr(1), self.addr(2), self.addr(3))
    }

    fn client(&self, id: u32) -> Client {
        self.node(id).broker.as_ref().expect("running").client()
    }

    fn kill9(&mut self, id: u32) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).expect("node");
        if let Some(mut b) = n.broker.take() {
            b.kill9();
            n.broker = Some(b);
        }
    }

    fn restart(&mut self, id: u32) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).expect("node");
        let b = n.broker.take().expect("broker");
        n.broker = Some(b.restart());
    }

    /// Waits (30 s at most) until every running node sees `n` nodes alive and one controller.
    fn wait_formed(&self, n: usize) {
        let running: Vec<u32> = self.nodes.iter().map(|x| x.id).collect();
        for id in running {
            wait_for(
                &format!("node {id} sees {n} live nodes and a leader"),
                || {
                    let st = status(&self.addr(id))?;
                    let alive = st.nodes.iter().filter(|x| x.alive).count();
                    (alive == n && st.controller > 0).then_some(())
                },
            );
        }
    }
}

fn status(addr: &str) -> Option<ClusterStatusOut> {
    Client::connect(addr).ok()?.cluster_status().ok()
}

/// Polls `f` every 50 ms for at most 30 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn leaders_of(c: &mut Client, topic: &str) -> Vec<i32> {
    let t = c.metadata(&[topic]).expect("metadata");
    t[0].partitions.iter().map(|p| p.leader).collect()
}

/// Reads a partition from offset 0 until `want` records, through `c`.
fn read_values(c: &mut Client, topic: &str, partition: u32, want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < want && Instant::now() < deadline {
        let f = c
            .fetch(topic, partition, offset, 1 << 20, 200)
            .expect("fetch");
        for r in &f.records {
            out.push(String::from_utf8_lossy(&r.value).into_owned());
        }
        offset = f.next_offset;
    }
    out
}

fn rec(v: &str) -> ringmq::protocol::RecordIn {
    common::rec(v)
}

#[test]
fn a_topic_created_on_one_node_is_produced_on_another_and_consumed_on_a_third() {
    let _one = serialize();
    let cluster = Cluster::start("cl-basic", 3);
    let (code, _, err) = common::cli(
        &cluster.addr(1),
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "6",
            "--replicas",
            "1",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    // Placement: every node leads some partitions; every node's metadata agrees at once.
    let mut c2 = cluster.client(2);
    let leaders = leaders_of(&mut c2, "orders");
    for id in 1..=3 {
        assert!(
            leaders.contains(&id),
            "node {id} leads nothing: {leaders:?}"
        );
    }
    assert_eq!(leaders_of(&mut cluster.client(3), "orders"), leaders);
    // Produce through node 2 to every partition (most are led elsewhere: forwarded).
    for p in 0..6u32 {
        for i in 0..20 {
            let ack = c2
                .produce(
                    "orders",
                    PartitionChoice::Explicit(p),
                    &[rec(&format!("{p}-{i}"))],
                )
                .expect("produce through node 2");
            assert_eq!(ack.partition, p);
            assert_eq!(ack.base_offset, i);
        }
    }
    // Consume through node 3: every message once, in order, per partition.
    let mut c3 = cluster.client(3);
    for p in 0..6u32 {
        let got = read_values(&mut c3, "orders", p, 20);
        let want: Vec<String> = (0..20).map(|i| format!("{p}-{i}")).collect();
        assert_eq!(got, want, "partition {p}");
    }
    // The CLI through node 3 sees all 120, and node 2 counted its forwards.
    let (code, out, err) = common::cli(
        &cluster.addr(3),
        &[
            "consume",
            "orders",
            "--from",
            "earliest",
            "--idle-ms",
            "1500",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 120, "{out}");
    let stats = c2.stats().expect("stats");
    let forwarded: u64 = stats.iter().map(|s| s.node_forwards).sum();
    assert!(forwarded >= 80, "node 2 forwarded {forwarded} requests");
    // A keyless produce through the CLI (round robin over partitions) lands everywhere too.
    let lines: String = (0..30).map(|i| format!("rr-{i}\n")).collect();
    let (code, _, err) = common::cli(
        &cluster.addr(1),
        &["produce", "orders", "--batch", "1"],
        &lines,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("produced 30 messages"), "{err}");
}

#[test]
fn killing_the_controller_leader_loses_no_topic_and_a_new_one_is_elected() {
    let _one = serialize();
    let mut cluster = Cluster::start("cl-ctl", 3);
    for t in ["a", "b"] {
        let (code, _, err) = common::cli(
            &cluster.addr(1),
            &["topic", "create", t, "--partitions", "3"],
            "",
        );
        assert_eq!(code, 0, "{err}");
    }
    let before = wait_for("a controller leader", || {
        status(&cluster.addr(1)).filter(|s| s.controller > 0)
    });
    let leader = before.controller as u32;
    cluster.kill9(leader);
    let survivors: Vec<u32> = (1..=3).filter(|&n| n != leader).collect();
    for &n in &survivors {
        wait_for("a new controller leader, the old one seen down", || {
            status(&cluster.addr(n)).filter(|s| {
                s.controller > 0
                    && s.controller as u32 != leader
                    && s.nodes.iter().any(|x| x.id == leader && !x.alive)
            })
        });
        let (code, out, err) = common::cli(&cluster.addr(n), &["topic", "list"], "");
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "a 3\nb 3\n", "topics on node {n}");
    }
    // Topic creation works again (through a survivor), on the live nodes only.
    let (code, _, err) = common::cli(
        &cluster.addr(survivors[0]),
        &["topic", "create", "after", "--partitions", "4"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let mut c = cluster.client(survivors[1]);
    let leaders = leaders_of(&mut c, "after");
    assert!(!leaders.contains(&(leader as i32)), "{leaders:?}");
    // The killed node restarts and catches up with what it missed.
    cluster.restart(leader);
    let addr = cluster.addr(leader);
    wait_for("the restarted node lists the new topic", || {
        let (code, out, _) = common::cli(&addr, &["topic", "list"], "");
        (code == 0 && out == "a 3\nafter 4\nb 3\n").then_some(())
    });
    cluster.wait_formed(3);
}

#[test]
fn a_node_started_later_with_the_same_seeds_joins_and_gets_partitions() {
    let _one = serialize();
    let mut cluster = Cluster::start("cl-join", 3);
    let peer = format!("127.0.0.1:{}", free_port());
    cluster.add_node("cl-join", 4, peer);
    cluster.wait_formed(4);
    let st = status(&cluster.addr(4)).expect("status");
    let four = st
        .nodes
        .iter()
        .find(|n| n.id == 4)
        .expect("node 4 registered");
    assert!(!four.voter, "node 4 is not a seed: {st:?}");
    assert_eq!(four.peer_address, cluster.node(4).peer);
    let (code, _, err) = common::cli(
        &cluster.addr(1),
        &[
            "topic",
            "create",
            "wide",
            "--partitions",
            "8",
            "--replicas",
            "1",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let mut c1 = cluster.client(1);
    let leaders = leaders_of(&mut c1, "wide");
    let on_four: Vec<u32> = (0..8u32).filter(|&p| leaders[p as usize] == 4).collect();
    assert_eq!(on_four.len(), 2, "8 partitions over 4 nodes: {leaders:?}");
    // Produced through node 1, read through node 4 where it lives.
    let p = on_four[0];
    produce_retrying(&mut c1, "wide", p, &[rec("x"), rec("y")]);
    let mut c4 = cluster.client(4);
    assert_eq!(read_values(&mut c4, "wide", p, 2), vec!["x", "y"]);
    let (code, out, err) = common::cli(
        &cluster.addr(4),
        &["topic", "describe", "wide", "--format", "json"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "{{\"partition\":{p},\"leader\":4,\"replicas\":[4]"
        )),
        "{out}"
    );
    // A group used through the joined node is coordinated by a voter, seen from any node.
    let (code, out, err) = common::cli(
        &cluster.addr(4),
        &[
            "consume",
            "wide",
            "--group",
            "late",
            "--from",
            "earliest",
            "--idle-ms",
            "1000",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, _) = common::cli(&cluster.addr(1), &["group", "list"], "");
    assert_eq!((code, out.as_str()), (0, "late\n"));
}

#[test]
fn a_multicast_sends_one_copy_to_each_remote_node() {
    let _one = serialize();
    let cluster = Cluster::start("cl-mc", 3);
    let mut c1 = cluster.client(1);
    // One single-partition topic led by each node.
    let mut by_node: std::collections::BTreeMap<i32, String> = Default::default();
    for i in 0..40 {
        let name = format!("m{i}");
        c1.create_topic_replicated(&name, 1, -1, -1, 1)
            .expect("create");
        let l = leaders_of(&mut c1, &name)[0];
        by_node.entry(l).or_insert(name);
        if by_node.len() == 3 {
            break;
        }
    }
    assert_eq!(by_node.len(), 3, "{by_node:?}");
    let dests: Vec<(&str, Option<u32>)> = by_node.values().map(|t| (t.as_str(), None)).collect();
    let before: Vec<u64> = (1..=3).map(|n| forwarded_in(&cluster, n)).collect();
    let results = c1
        .multicast(&dests, None, &[rec("hello")])
        .expect("multicast");
    assert_eq!(results.len(), 3);
    for r in &results {
        assert!(r.outcome.is_ok(), "{r:?}");
    }
    let stats = c1.stats().expect("stats");
    let copies: u64 = stats.iter().map(|s| s.node_multicast_copies).sum();
    assert_eq!(copies, 2, "one copy to each of the two other nodes");
    for n in 2..=3u32 {
        let got = forwarded_in(&cluster, n) - before[n as usize - 1];
        assert_eq!(got, 1, "node {n} received {got} copies");
    }
    for t in by_node.values() {
        assert_eq!(read_values(&mut c1, t, 0, 1), vec!["hello"], "{t}");
    }
}

fn forwarded_in(cluster: &Cluster, node: u32) -> u64 {
    let s = cluster.client(node).stats().expect("stats");
    s.iter().map(|x| x.node_forwarded_in).sum()
}

#[test]
fn a_client_given_every_address_keeps_working_when_its_node_dies() {
    let _one = serialize();
    let mut cluster = Cluster::start("cl-fail", 3);
    let all = cluster.all();
    let (code, _, err) = common::cli(
        &all,
        &[
            "topic",
            "create",
            "t",
            "--partitions",
            "6",
            "--replicas",
            "1",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let leaders = leaders_of(&mut cluster.client(2), "t");
    cluster.kill9(1);
    // The survivors notice (heartbeats) within the failure timeout.
    wait_for("node 1 seen down", || {
        status(&cluster.addr(2)).filter(|s| s.nodes.iter().any(|n| n.id == 1 && !n.alive))
    });
    // Keyless lines go to partitions whose leader is alive; the CLI uses node 2.
    let lines: String = (0..40).map(|i| format!("v{i}\n")).collect();
    let (code, _, err) = common::cli(&all, &["produce", "t", "--batch", "1"], &lines);
    assert_eq!(code, 0, "{err}");
    // Partitions of the dead node fail clearly, and the CLI says what was acknowledged.
    let dead = leaders
        .iter()
        .position(|&l| l == 1)
        .expect("node 1 led one") as u32;
    let (code, _, err) = common::cli(
        &all,
        &["produce", "t", "--partition", &dead.to_string()],
        "x\n",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("NodeUnavailable") || err.contains("down"),
        "{err}"
    );
    assert!(
        err.contains("0 of the 1 messages read were acknowledged"),
        "{err}"
    );
    // Everything acknowledged is readable through the list.
    let (code, out, err) = common::cli(
        &all,
        &["consume", "t", "--from", "earliest", "--idle-ms", "1500"],
        "",
    );
    // Reading skips nothing silently: the dead node's partitions are an error, the others
    // print their 40 messages.
    let printed = out.lines().filter(|l| l.starts_with('v')).count();
    assert_eq!(printed, 40, "code {code}: {err}\n{out}");
}

/// Runs `ringmq consume ARGS` against `addr` in the background.
fn spawn_consumer(addr: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new(common::bin())
        .arg("consume")
        .args(args)
        .env("RINGMQ_SERVER", addr)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn consume")
}

fn lines_of(children: Vec<std::process::Child>) -> Vec<String> {
    let mut all = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("consumer output");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        all.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from),
        );
    }
    all
}

#[test]
fn groups_and_shared_subscriptions_work_with_members_on_different_nodes() {
    let _one = serialize();
    groups_and_shared_with_replicas("cl-groups", "1");
}

/// Known bug, not yet diagnosed: about one run in four, the two-member group reads 7 to 21
/// of the 600 messages too few on a topic with 3 replicas created just before (a single
/// member, or the same steps by hand, read all 600 every time). Run it with
/// `cargo test --release --test cluster -- --ignored`.
#[test]
#[ignore = "a two-member group on a fresh replicated topic sometimes misses messages (issue 14)"]
fn groups_and_shared_subscriptions_work_on_replicated_partitions() {
    let _one = serialize();
    groups_and_shared_with_replicas("cl-groups3", "3");
}

/// A group with members on two nodes and a shared subscription consumed through two nodes
/// read every message once, on a topic with `replicas` replicas per partition.
fn groups_and_shared_with_replicas(name: &str, replicas: &str) {
    let cluster = Cluster::start(name, 3);
    let (code, _, err) = common::cli(
        &cluster.addr(1),
        &[
            "topic",
            "create",
            "g",
            "--partitions",
            "6",
            "--replicas",
            replicas,
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let lines: String = (0..600).map(|i| format!("k{},m{i}\n", i % 17)).collect();
    let (code, _, err) = common::cli(
        &cluster.addr(2),
        &["produce", "g", "--key-separator", ",", "--batch", "50"],
        &lines,
    );
    assert_eq!(code, 0, "{err}");
    // A consumer group with one member on node 1 and one on node 3: the coordinator is one
    // node for the whole cluster, so together they read every message once.
    let group = [
        "g",
        "--group",
        "billing",
        "--from",
        "earliest",
        "--idle-ms",
        "2500",
    ];
    let a = spawn_consumer(&cluster.addr(1), &group);
    std::thread::sleep(Duration::from_millis(100));
    let b = spawn_consumer(&cluster.addr(3), &group);
    let all = lines_of(vec![a, b]);
    let unique: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "no message twice");
    assert_eq!(all.len(), 600, "every message");
    let (code, out, err) = common::cli(&cluster.addr(2), &["group", "describe", "billing"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("g"), "{out}");
    // A shared subscription consumed through two different nodes: each message to one
    // consumer, acked (the leases live on the partitions' nodes).
    let shared = ["g", "--shared", "work", "--idle-ms", "2500"];
    let a = spawn_consumer(&cluster.addr(2), &shared);
    let b = spawn_consumer(&cluster.addr(3), &shared);
    let all = lines_of(vec![a, b]);
    let unique: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), 600, "every message once: {} lines", all.len());
    assert_eq!(all.len(), 600, "no message twice");
    let (code, out, err) = common::cli(
        &cluster.addr(1),
        &["subscription", "describe", "g", "work"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("acked 600"),
        "the answer covers every node: {out}"
    );
    // Metadata through any node has every partition's real end offset (from its leader;
    // a replicated partition also counts its control records, one per leader election).
    let t = cluster.client(3).metadata(&["g"]).expect("metadata");
    let total: u64 = t[0].partitions.iter().map(|p| p.end_offset).sum();
    if replicas == "1" {
        assert_eq!(total, 600, "{t:?}");
    } else {
        assert!((606..=620).contains(&total), "{t:?}");
    }
    let (code, out, _) = common::cli(&cluster.addr(3), &["group", "list"], "");
    assert_eq!((code, out.as_str()), (0, "billing\n"));
}

#[test]
fn a_topic_deleted_and_created_again_while_a_node_was_away_comes_back_empty_there() {
    let _one = serialize();
    let mut cluster = Cluster::start("cl-incarn", 3);
    let mut c1 = cluster.client(1);
    c1.create_topic("t", 3, -1, -1).expect("create");
    let leaders = leaders_of(&mut c1, "t");
    // The node holding partition 0 gets data there, then goes away.
    let away = leaders[0] as u32;
    produce_retrying(&mut c1, "t", 0, &[rec("old-1"), rec("old-2")]);
    let data = cluster
        .node(away)
        .broker
        .as_ref()
        .expect("broker")
        .data
        .clone();
    let old_dir = data.join("topics").join("t-0");
    assert!(old_dir.exists(), "{}", old_dir.display());
    cluster.kill9(away);
    let here = (1..=3).find(|&n| n != away).expect("a survivor");
    let addr = cluster.addr(here);
    wait_for("the node seen down", || {
        status(&addr).filter(|s| s.nodes.iter().any(|n| n.id == away && !n.alive))
    });
    for args in [
        ["topic", "delete", "t", ""],
        ["topic", "create", "t", "--partitions"],
    ] {
        let mut a: Vec<&str> = args.iter().copied().filter(|x| !x.is_empty()).collect();
        if a[1] == "create" {
            a.push("1");
        }
        let (code, _, err) = common::cli(&addr, &a, "");
        assert_eq!(code, 0, "{a:?}: {err}");
    }
    // Back: its table file still has the old `t` on it; the controller's `t` is a new
    // incarnation placed elsewhere, so the old data is deleted, not served.
    cluster.restart(away);
    wait_for("the returning node drops the old incarnation", || {
        (!old_dir.exists()).then_some(())
    });
    let mut c = cluster.client(away);
    let p = 0;
    let fresh = read_values(&mut c, "t", p, 0);
    assert!(fresh.is_empty(), "{fresh:?}");
    produce_retrying(&mut c, "t", p, &[rec("new")]);
    assert_eq!(read_values(&mut c, "t", p, 1), vec!["new"]);
}

#[test]
fn a_single_node_data_directory_joining_a_cluster_keeps_its_topics_aside() {
    let _one = serialize();
    let dir = temp_dir("cl-aside");
    {
        let solo = Broker::start(&dir, 1, &[]);
        let mut c = solo.client();
        c.create_topic("solo", 1, -1, -1).expect("create");
        c.produce("solo", PartitionChoice::Explicit(0), &[rec("keep me")])
            .expect("produce");
    }
    // The same directory now starts as a one-node cluster: its controller has no "solo".
    let peer = format!("127.0.0.1:{}", free_port());
    let args = node_args(1, &peer, &peer);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = Broker::start(&dir, 1, &args);
    let orphaned = dir.join("orphaned");
    let kept = wait_for("the old partition set aside", || {
        std::fs::read_dir(&orphaned)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("solo-0."))
    });
    let log_bytes: u64 = std::fs::read_dir(kept.path())
        .expect("kept dir")
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(log_bytes > 0, "the data is kept");
    let (code, out, _) = b.cli(&["topic", "list"], "");
    assert_eq!((code, out.as_str()), (0, ""));
}

#[test]
fn a_forwarded_request_to_a_node_that_stops_answering_fails_when_the_node_is_seen_down() {
    let _one = serialize();
    let mut cluster = Cluster::start("cl-stop", 3);
    let mut c1 = cluster.client(1);
    c1.create_topic_replicated("s", 3, -1, -1, 1)
        .expect("create");
    let leaders = leaders_of(&mut c1, "s");
    let p = leaders
        .iter()
        .position(|&l| l != 1)
        .expect("a partition elsewhere") as u32;
    let stopped = leaders[p as usize] as u32;
    let pid = cluster
        .node(stopped)
        .broker
        .as_ref()
        .expect("broker")
        .child
        .id() as i32;
    // A 20 s long poll through node 1 waits on the other node, which is then frozen.
    c1.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let freezer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    });
    let r = c1.fetch("s", p, 0, 1 << 20, 20_000);
    freezer.join().expect("freezer");
    // SAFETY: as above; the node resumes for the cleanup.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    match r {
        // Sent, then no answer: the outcome is unknown (it is not "not carried out").
        Err(e) => assert_eq!(
            e.code(),
            Some(ringmq::protocol::fb::ErrorCode::OutcomeUnknown),
            "{e}"
        ),
        Ok(f) => panic!("a frozen node answered: {} records", f.records.len()),
    }
    cluster.kill9(stopped);
}

/// The node leading `topic`-`p` as `addr` reports it (once one is known and alive).
fn leader_of(addr: &str, topic: &str, p: u32) -> Option<u32> {
    let t = Client::connect(addr).ok()?.metadata(&[topic]).ok()?;
    let l = t
        .first()?
        .partitions
        .iter()
        .find(|x| x.partition == p)?
        .leader;
    u32::try_from(l).ok().filter(|&l| l > 0)
}

/// Produces `values` one request each through `leaders`; returns those acknowledged, in
/// acknowledgement order, with their offsets. A produce whose outcome is unknown is not
/// retried (it may or may not be stored).
fn produce_each(
    leaders: &mut ringmq::client::leaders::Leaders,
    topic: &str,
    values: impl Iterator<Item = String>,
) -> Vec<(u64, String)> {
    let mut acked = Vec::new();
    for v in values {
        match leaders.produce(topic, 0, &[rec(&v)]) {
            Ok(a) => acked.push((a.base_offset, v)),
            Err(e) => eprintln!("produce {v}: {e}"),
        }
    }
    acked
}

/// Every acknowledged (offset, value) is stored at that offset, and no value is stored twice.
fn assert_stored_once(stored: &[(u64, String)], acked: &[(u64, String)]) {
    let by_offset: std::collections::BTreeMap<u64, &String> =
        stored.iter().map(|(o, v)| (*o, v)).collect();
    for (o, v) in acked {
        assert_eq!(by_offset.get(o), Some(&v), "acknowledged {v} at offset {o}");
    }
    let mut seen = std::collections::BTreeSet::new();
    for (_, v) in stored {
        assert!(seen.insert(v), "{v} stored twice");
    }
}

/// Every record of `topic`-0 with its offset, read through `leaders` (the current leader).
fn read_all(leaders: &mut ringmq::client::leaders::Leaders, topic: &str) -> Vec<(u64, String)> {
    let end = leaders.list_offset(topic, 0, -2).expect("end offset");
    let mut out = Vec::new();
    let mut offset = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while offset < end && Instant::now() < deadline {
        let f = leaders
            .fetch(topic, 0, offset, 1 << 20, 200, None)
            .expect("fetch");
        for r in &f.records {
            out.push((r.offset, String::from_utf8_lossy(&r.value).into_owned()));
        }
        offset = f.next_offset;
    }
    out
}

/// A 3-node cluster with `topic` (one partition, three replicas) whose leader is known:
/// (cluster, every client address, the leader's id).
fn with_replicated_topic(name: &str, topic: &str) -> (Cluster, String, u32) {
    let cluster = Cluster::start(name, 3);
    let all = cluster.all();
    let (code, _, err) = common::cli(
        &all,
        &[
            "topic",
            "create",
            topic,
            "--partitions",
            "1",
            "--replicas",
            "3",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let leader = wait_for("a leader", || leader_of(&cluster.addr(1), topic, 0));
    (cluster, all, leader)
}

#[test]
fn a_replicated_partition_loses_no_acknowledged_message_when_leaders_are_killed() {
    let _one = serialize();
    let (mut cluster, all, first) = with_replicated_topic("cl-repl", "r");
    // The CLI shows the three replicas.
    let (code, out, err) = common::cli(&all, &["topic", "describe", "r", "--format", "json"], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"replicas\":[") && out.matches(',').count() >= 2,
        "{out}"
    );

    let survivor = (1..=3).find(|&n| n != first).expect("another node");
    let mut leaders =
        ringmq::client::leaders::Leaders::new(&cluster.addr(survivor), cluster.client(survivor));
    let mut acked = produce_each(&mut leaders, "r", (0..150).map(|i| format!("a{i}")));
    assert_eq!(
        acked.len(),
        150,
        "no fault yet: every produce is acknowledged"
    );
    // A multicast copy to a replicated partition goes through its Raft group too.
    let results = cluster
        .client(survivor)
        .multicast(&[("r", Some(0))], None, &[rec("mc")])
        .expect("multicast");
    let (offset, _) = results[0].outcome.clone().expect("multicast to r-0");
    acked.push((offset, "mc".to_string()));
    // The leader counts its replication traffic to each follower (`ringmq stats`).
    let stats = cluster.client(first).stats().expect("stats");
    assert_eq!(stats.iter().map(|s| s.replicas).sum::<u32>(), 1);
    assert_eq!(stats.iter().map(|s| s.replicas_leading).sum::<u32>(), 1);
    for follower in (1..=3).filter(|&n| n != first) {
        let sent: u64 = stats
            .iter()
            .flat_map(|s| &s.replica_peers)
            .filter(|p| p.node == follower)
            .map(|p| p.messages)
            .sum();
        assert!(
            sent >= 150,
            "{sent} replication messages to node {follower}"
        );
    }

    // Kill the leader: a follower takes over and producing goes on through it.
    cluster.kill9(first);
    acked.extend(produce_each(
        &mut leaders,
        "r",
        (0..150).map(|i| format!("b{i}")),
    ));
    let second = wait_for("a new leader of r-0", || {
        leader_of(&cluster.addr(survivor), "r", 0).filter(|&l| l != first)
    });

    // The old leader comes back as a follower and catches up; then the second leader dies,
    // so a majority needs the node that was away.
    cluster.restart(first);
    cluster.wait_formed(3);
    acked.extend(produce_each(
        &mut leaders,
        "r",
        (0..100).map(|i| format!("c{i}")),
    ));
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill9(second);
    let third = (1..=3).find(|&n| n != first && n != second).expect("third");
    let mut leaders =
        ringmq::client::leaders::Leaders::new(&cluster.addr(third), cluster.client(third));
    acked.extend(produce_each(
        &mut leaders,
        "r",
        (0..100).map(|i| format!("d{i}")),
    ));

    // Every acknowledged message is there once, at the offset it was acknowledged with, in
    // acknowledgement order.
    let stored = read_all(&mut leaders, "r");
    assert_stored_once(&stored, &acked);
    let offsets: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "acknowledged out of order"
    );
    // Nearly everything was acknowledged: a failover costs a retry, not the messages.
    assert!(
        acked.len() >= 495,
        "only {} of 500 acknowledged",
        acked.len()
    );
}

#[test]
fn killing_the_leader_while_the_cli_produces_stores_every_message_once_in_order() {
    let _one = serialize();
    let (mut cluster, _, leader) = with_replicated_topic("cl-idem", "r");
    let other = (1..=3).find(|&n| n != leader).expect("a follower");

    // A retried batch is answered with its first copy's offsets; a gap is refused.
    let mut c = cluster.client(other);
    let send = |c: &mut Client, seq: i64, v: &str| {
        let batch = ringmq::protocol::encode_record_batch_as(&[rec(v)], Some((77, seq)));
        c.call(|corr| {
            ringmq::protocol::encode_produce(corr, "r", PartitionChoice::Explicit(0), &batch)
        })
        .and_then(|r| ringmq::client::produce_ack(&r))
    };
    let first = send(&mut c, 0, "dup").expect("first copy");
    let again = send(&mut c, 0, "dup").expect("the same batch again");
    assert_eq!(again.base_offset, first.base_offset, "stored once");
    let gap = send(&mut c, 2, "gap").expect_err("sequence 1 was skipped");
    assert_eq!(
        gap.code(),
        Some(ringmq::protocol::fb::ErrorCode::OutOfOrderSequence),
        "{gap}"
    );

    // The CLI produces 60,000 lines through a follower; the leader dies meanwhile.
    let lines: String = (0..60_000).map(|i| format!("{i}\n")).collect();
    let via = cluster.addr(other);
    let producer = std::thread::spawn(move || {
        common::cli(
            &via,
            &["produce", "r", "--partition", "0", "--batch", "10"],
            &lines,
        )
    });
    std::thread::sleep(Duration::from_millis(400));
    cluster.kill9(leader);
    let (code, _, err) = producer.join().expect("producer thread");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("produced 60000 messages"), "{err}");
    let survivors: Vec<String> = (1..=3)
        .filter(|&n| n != leader)
        .map(|n| cluster.addr(n))
        .collect();
    let (code, out, err) = common::cli(
        &survivors.join(","),
        &["consume", "r", "--from", "earliest", "--idle-ms", "2000"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let got: Vec<u64> = out.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(
        got,
        (0..60_000).collect::<Vec<u64>>(),
        "every line once, in order"
    );
}

/// Stops (SIGSTOP) or resumes (SIGCONT) node `id`'s process: a node that is cut off (its
/// sockets stay open, nothing answers).
fn freeze(cluster: &Cluster, id: u32, stop: bool) {
    let pid = cluster
        .node(id)
        .broker
        .as_ref()
        .expect("running")
        .child
        .id();
    let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: a plain kill(2) on a child process this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

#[test]
fn a_leader_cut_off_from_the_majority_acknowledges_nothing() {
    let _one = serialize();
    let cluster = Cluster::start("cl-minority", 3);
    let mut c = cluster.client(1);
    c.create_topic_replicated("m", 1, -1, -1, 3)
        .expect("create");
    let leader = wait_for("a leader of m-0", || leader_of(&cluster.addr(1), "m", 0));
    let mut to_leader = cluster.client(leader);
    to_leader
        .produce("m", PartitionChoice::Explicit(0), &[rec("before")])
        .expect("a majority is there");
    let followers: Vec<u32> = (1..=3).filter(|&n| n != leader).collect();
    for &f in &followers {
        freeze(&cluster, f, true);
    }
    // Sent while the leader still believes it leads: never acknowledged (no majority persists
    // it); the answer is that the outcome is unknown.
    let r = to_leader.produce("m", PartitionChoice::Explicit(0), &[rec("alone")]);
    let e = r.expect_err("acknowledged without a majority");
    assert_eq!(
        e.code(),
        Some(ringmq::protocol::fb::ErrorCode::OutcomeUnknown),
        "{e}"
    );
    // By now check-quorum has made it step down: new produces are refused at once.
    let e = to_leader
        .produce("m", PartitionChoice::Explicit(0), &[rec("refused")])
        .expect_err("a leader without a majority");
    assert_eq!(
        e.code(),
        Some(ringmq::protocol::fb::ErrorCode::NotLeader),
        "{e}"
    );
    for &f in &followers {
        freeze(&cluster, f, false);
    }
    // The group recovers; "before" is there, "refused" is not.
    let mut leaders = ringmq::client::leaders::Leaders::new(
        &cluster.addr(followers[0]),
        cluster.client(followers[0]),
    );
    let after = produce_each(&mut leaders, "m", std::iter::once("after".to_string()));
    assert_eq!(after.len(), 1, "producing works again");
    let values: Vec<String> = read_all(&mut leaders, "m")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert!(values.contains(&"before".to_string()), "{values:?}");
    assert!(!values.contains(&"refused".to_string()), "{values:?}");
    assert_eq!(
        values.last().map(String::as_str),
        Some("after"),
        "{values:?}"
    );
}

/// `RINGMQ_CLUSTER_CYCLES` (default 3 in CI): kill -9 and restart cycles of the loop below.
fn cluster_cycles() -> u32 {
    std::env::var("RINGMQ_CLUSTER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[test]
fn a_replicated_topic_keeps_every_acknowledged_message_through_a_kill_restart_loop() {
    let _one = serialize();
    let (mut cluster, _, _) = with_replicated_topic("cl-loop", "r");
    let cycles = cluster_cycles();
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut sent = 0usize;
    // A fixed sequence of victims (a seeded choice would add nothing: any node may lead).
    for cycle in 0..cycles {
        let victim = 1 + (cycle * 7 + 3) % 3;
        let live = 1 + victim % 3;
        let mut leaders =
            ringmq::client::leaders::Leaders::new(&cluster.addr(live), cluster.client(live));
        let before = (0..40).map(|i| format!("c{cycle}-{i}"));
        acked.extend(produce_each(&mut leaders, "r", before));
        cluster.kill9(victim);
        let during = (0..40).map(|i| format!("k{cycle}-{i}"));
        acked.extend(produce_each(&mut leaders, "r", during));
        sent += 80;
        cluster.restart(victim);
        cluster.wait_formed(3);
    }
    let mut leaders = ringmq::client::leaders::Leaders::new(&cluster.addr(1), cluster.client(1));
    let stored = read_all(&mut leaders, "r");
    assert_stored_once(&stored, &acked);
    eprintln!(
        "{cycles} kill/restart cycles: {} of {sent} produces acknowledged, {} stored",
        acked.len(),
        stored.len()
    );
    assert!(
        acked.len() * 100 >= sent * 95,
        "{} of {sent} acknowledged",
        acked.len()
    );
}
