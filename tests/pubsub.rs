//! Publish/subscribe end to end: pattern subscriptions, broker-side filters, multicast with one
//! copy per remote shard, per-destination results.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ringmq::protocol::{fb, RecordIn};

fn rec_h(v: &str, headers: &[(&str, &str)]) -> RecordIn {
    RecordIn {
        value: v.as_bytes().to_vec(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn pattern_subscriber_gets_matching_topics_including_new_ones_and_no_others() {
    let dir = temp_dir("pattern");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    for t in ["orders.a.eu", "orders.b.eu", "orders.a.us", "orders.eu"] {
        c.create_topic(t, 2, -1, -1).unwrap();
    }
    let sub = Command::new(bin())
        .args([
            "consume",
            "--pattern",
            "orders.*.eu",
            "--from",
            "earliest",
            "--idle-ms",
            "2500",
            "--format",
            "json",
        ])
        .env("RINGMQ_SERVER", &b.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for t in ["orders.a.eu", "orders.b.eu", "orders.a.us", "orders.eu"] {
        let (code, _, err) = b.cli(&["produce", t], &format!("to-{t}\n"));
        assert_eq!(code, 0, "{err}");
    }
    // A matching topic created after the subscriber started.
    c.create_topic("orders.new.eu", 1, -1, -1).unwrap();
    let (code, _, err) = b.cli(&["produce", "orders.new.eu"], "to-orders.new.eu\n");
    assert_eq!(code, 0, "{err}");
    let out = sub.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut values: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split("\"value\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    values.sort();
    assert_eq!(
        values,
        vec!["to-orders.a.eu", "to-orders.b.eu", "to-orders.new.eu"]
    );
}

#[test]
fn filters_run_on_the_broker_and_advance_past_non_matching() {
    let dir = temp_dir("filter");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("f", 1, -1, -1).unwrap();
    let mut recs = Vec::new();
    for i in 0..100 {
        let region = if i % 10 == 0 { "eu" } else { "us" };
        recs.push(rec_h(
            &format!("m{i}"),
            &[("region", region), ("qty", &i.to_string())],
        ));
    }
    c.produce("f", ringmq::protocol::PartitionChoice::Explicit(0), &recs)
        .unwrap();
    let f = c
        .fetch_filtered(
            "f",
            0,
            0,
            1 << 20,
            0,
            Some("region == \"eu\" AND qty >= 20"),
        )
        .unwrap();
    let got: Vec<String> = f
        .records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(
        got,
        (2..10).map(|i| format!("m{}", i * 10)).collect::<Vec<_>>()
    );
    assert_eq!(f.records[0].offset, 20);
    assert_eq!(
        f.next_offset, 100,
        "the subscription advanced past the non-matching tail"
    );
    // Nothing matches: the answer is empty but the position still moves to the end.
    let f = c
        .fetch_filtered("f", 0, 0, 1 << 20, 0, Some("region == \"mars\""))
        .unwrap();
    assert!(f.records.is_empty());
    assert_eq!(f.next_offset, 100);
    // A bad filter is a clear error naming the position, from the broker and from the CLI.
    let e = c
        .fetch_filtered("f", 0, 0, 100, 0, Some("qty >"))
        .unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::InvalidRequest));
    assert!(e.to_string().contains("column 6"), "{e}");
    let (code, _, err) = b.cli(&["consume", "f", "--filter", "qty IN 1", "--max", "1"], "");
    assert_ne!(code, 0);
    assert!(err.contains("column 8"), "{err}");
    let (code, out, err) = b.cli(
        &[
            "consume",
            "f",
            "--from",
            "earliest",
            "--filter",
            "qty < 3",
            "--idle-ms",
            "300",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "m0\nm1\nm2\n");
}

fn copies(c: &mut ringmq::client::Client) -> (u64, u64) {
    let s = c.stats().unwrap();
    (
        s.iter().map(|x| x.multicast_copies).sum(),
        s.iter().map(|x| x.forwards).sum(),
    )
}

#[test]
fn multicast_to_ten_topics_sends_one_copy_per_remote_shard() {
    let dir = temp_dir("multicast");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    let topics: Vec<String> = (0..10).map(|i| format!("mc.t{i}")).collect();
    for t in &topics {
        c.create_topic(t, 1, -1, -1).unwrap();
    }
    let owners: std::collections::BTreeSet<u32> = c
        .metadata(&[])
        .unwrap()
        .iter()
        .map(|t| t.partitions[0].shard)
        .collect();
    assert_eq!(owners.len(), 2, "the 10 topics are spread over both shards");
    let (copies0, forwards0) = copies(&mut c);
    let dests: Vec<(&str, Option<u32>)> = topics.iter().map(|t| (t.as_str(), None)).collect();
    let results = c
        .multicast(&dests, None, &[rec_h("hello", &[("h", "1")])])
        .unwrap();
    assert_eq!(results.len(), 10);
    for r in &results {
        assert_eq!(r.outcome, Ok((0, 1)), "{}", r.topic);
    }
    let (copies1, forwards1) = copies(&mut c);
    // stats itself forwards one request to the other shard; multicast sends at most 1 copy.
    assert!(
        copies1 - copies0 <= 1,
        "multicast copies grew by {}",
        copies1 - copies0
    );
    assert_eq!(
        copies1 - copies0,
        1,
        "one shard is remote from this connection"
    );
    assert!(
        forwards1 - forwards0 <= 2,
        "no per-destination forwards: {}",
        forwards1 - forwards0
    );
    for t in &topics {
        let got = read_partition(&mut c, t, 0);
        assert_eq!(
            got,
            vec![(0, "hello".to_string())],
            "{t} holds the message once"
        );
    }
    let (code, out, _) = b.cli(&["stats"], "");
    assert_eq!(code, 0);
    assert!(out.starts_with("SHARD FORWARDS MULTICAST_COPIES"), "{out}");
}

#[test]
fn multicast_with_a_missing_destination_reports_it_and_delivers_the_rest() {
    let dir = temp_dir("multicast-missing");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("x1", 1, -1, -1).unwrap();
    c.create_topic("x2", 1, -1, -1).unwrap();
    let results = c
        .multicast(
            &[
                ("x1", None),
                ("nope", None),
                ("x2", Some(0)),
                ("x2", Some(7)),
            ],
            None,
            &[rec_h("v", &[])],
        )
        .unwrap();
    assert_eq!(results[0].outcome, Ok((0, 1)));
    assert_eq!(
        results[1].outcome.as_ref().unwrap_err().0,
        fb::ErrorCode::UnknownTopic.0
    );
    assert!(results[1].outcome.as_ref().unwrap_err().1.contains("nope"));
    assert_eq!(results[2].outcome, Ok((0, 1)));
    assert_eq!(
        results[3].outcome.as_ref().unwrap_err().0,
        fb::ErrorCode::UnknownPartition.0
    );
    let (code, _, err) = b.cli(&["produce", "--to", "x1,nope", "--header", "k=v"], "a\n");
    assert_ne!(code, 0);
    assert!(
        err.contains("1 of 2 destinations failed") && err.contains("nope"),
        "{err}"
    );
    assert_eq!(read_partition(&mut c, "x1", 0).len(), 2);
}

#[test]
fn pattern_works_with_a_group_and_a_filter() {
    let dir = temp_dir("pattern-group");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    for t in ["tel.a", "tel.b", "other"] {
        c.create_topic(t, 2, -1, -1).unwrap();
    }
    for t in ["tel.a", "tel.b", "other"] {
        let mut recs = Vec::new();
        for i in 0..10 {
            recs.push(rec_h(&format!("{t}-{i}"), &[("n", &i.to_string())]));
        }
        c.produce(t, ringmq::protocol::PartitionChoice::Explicit(0), &recs)
            .unwrap();
    }
    let (code, out, err) = b.cli(
        &[
            "consume",
            "--pattern",
            "tel.>",
            "--group",
            "pg",
            "--from",
            "earliest",
            "--filter",
            "n >= 8",
            "--idle-ms",
            "800",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, vec!["tel.a-8", "tel.a-9", "tel.b-8", "tel.b-9"]);
    // The group committed past the non-matching messages: a rerun sees nothing new.
    let (_, out, _) = b.cli(
        &[
            "consume",
            "--pattern",
            "tel.>",
            "--group",
            "pg",
            "--from",
            "earliest",
            "--idle-ms",
            "500",
        ],
        "",
    );
    assert_eq!(out, "");
}
