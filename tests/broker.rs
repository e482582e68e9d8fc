//! End-to-end tests against a real `ringmq serve` child process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use ringmq::protocol::{self as proto, fb, PartitionChoice};

#[test]
fn cli_round_trip_and_errors() {
    let dir = temp_dir("cli");
    let b = Broker::start(&dir, 1, &[]);
    let (code, _, err) = b.cli(&["topic", "create", "t"], "");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = b.cli(&["topic", "create", "t"], "");
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = b.cli(&["produce", "t"], "a\nb\n");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("produced 2 messages"), "{err}");
    let (code, out, err) = b.cli(&["consume", "t", "--from", "earliest", "--max", "2"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "a\nb\n");
    let (code, out, _) = b.cli(
        &[
            "consume", "t", "--from", "earliest", "--max", "1", "--format", "json",
        ],
        "",
    );
    assert_eq!(code, 0);
    assert!(
        out.starts_with(
            "{\"topic\":\"t\",\"partition\":0,\"offset\":0,\"key\":null,\"value\":\"a\""
        ),
        "{out}"
    );
    let (code, out, _) = b.cli(&["topic", "list"], "");
    assert_eq!(code, 0);
    assert_eq!(out, "t 1\n");
    let (code, _, err) = b.cli(&["consume", "missing", "--max", "1"], "");
    assert_ne!(code, 0);
    assert!(err.contains("unknown topic"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    let (code, _, err) = b.cli(&["produce", "missing"], "x\n");
    assert_ne!(code, 0);
    assert!(err.contains("missing"), "{err}");
    let (code, _, err) = cli("127.0.0.1:1", &["topic", "list"], "");
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the broker"), "{err}");
    let (code, _, _) = b.cli(&["topic", "delete", "t"], "");
    assert_eq!(code, 0);
    let (_, out, _) = b.cli(&["topic", "list"], "");
    assert_eq!(out, "");
}

#[test]
fn client_round_trip_keeps_order_per_partition() {
    let dir = temp_dir("order");
    let b = Broker::start(&dir, 2, &["--fsync", "never"]);
    let mut c = b.client();
    c.create_topic("o", 3, -1, -1).unwrap();
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 3];
    for i in 0..300 {
        let p = i % 3;
        let recs = vec![rec(&format!("m{i}-a")), rec(&format!("m{i}-b"))];
        let ack = c.produce("o", PartitionChoice::Explicit(p), &recs).unwrap();
        assert_eq!(ack.partition, p);
        assert_eq!(ack.base_offset as usize, expected[p as usize].len());
        expected[p as usize].push(format!("m{i}-a"));
        expected[p as usize].push(format!("m{i}-b"));
    }
    for p in 0..3u32 {
        let got: Vec<String> = read_partition(&mut c, "o", p)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, expected[p as usize]);
    }
    // A fetch in the middle of a batch starts at the asked offset.
    let f = c.fetch("o", 0, 1, 1 << 20, 0).unwrap();
    assert_eq!(f.records[0].offset, 1);
    assert_eq!(f.records[0].value, b"m0-b");
    // Long poll: a fetch at the end waits and returns nothing after its wait.
    let end = expected[0].len() as u64;
    let f = c.fetch("o", 0, end, 1 << 20, 50).unwrap();
    assert!(f.records.is_empty());
    assert_eq!(f.log_end, end);
    // Errors: unknown partition, offset out of range.
    let e = c.fetch("o", 9, 0, 100, 0).unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::UnknownPartition));
    let e = c.fetch("o", 0, end + 5, 100, 0).unwrap_err();
    assert_eq!(e.code(), Some(fb::ErrorCode::OffsetOutOfRange));
}

#[test]
fn keys_route_by_murmur2_and_round_robin_spreads() {
    let dir = temp_dir("keys");
    let b = Broker::start(&dir, 2, &["--fsync", "never"]);
    let mut c = b.client();
    c.create_topic("k", 4, -1, -1).unwrap();
    for key in ["user-1", "user-2", "user-3", "abc"] {
        let ack = c
            .produce("k", PartitionChoice::Key(key.as_bytes()), &[rec(key)])
            .unwrap();
        assert_eq!(
            ack.partition,
            proto::partitioner::partition_for_key(key.as_bytes(), 4)
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(
            c.produce("k", PartitionChoice::RoundRobin, &[rec("x")])
                .unwrap()
                .partition,
        );
    }
    assert_eq!(seen.len(), 4, "round robin reaches every partition");
}

#[test]
fn forwarding_between_shards_both_ways() {
    let dir = temp_dir("fwd");
    let b = Broker::start(&dir, 2, &[]);
    let mut admin = b.client();
    admin.create_topic("f", 2, -1, -1).unwrap();
    let meta = admin.metadata(&["f"]).unwrap();
    let owners: Vec<u32> = meta[0].partitions.iter().map(|p| p.shard).collect();
    assert_eq!(owners.len(), 2);
    assert_ne!(
        owners[0], owners[1],
        "the two partitions live on different shards"
    );
    for shard in 0..2u32 {
        let mut c = b.client_on_shard(shard);
        for p in 0..2u32 {
            let v = format!("via{shard}-to{p}");
            c.produce("f", PartitionChoice::Explicit(p), &[rec(&v)])
                .unwrap();
            let got = read_partition(&mut c, "f", p);
            assert_eq!(got.last().map(|x| x.1.clone()), Some(v));
        }
    }
    // Each partition got one message through a local and one through a remote connection.
    let mut c = b.client();
    for p in 0..2u32 {
        assert_eq!(read_partition(&mut c, "f", p).len(), 2);
    }
}

#[test]
fn metadata_and_placement_survive_restart() {
    let dir = temp_dir("restart");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("a", 3, 1000, -1).unwrap();
    c.create_topic("b", 1, -1, 5000).unwrap();
    c.produce("a", PartitionChoice::Explicit(2), &[rec("x"), rec("y")])
        .unwrap();
    let before = c.metadata(&[]).unwrap();
    drop(c);
    let b = b.restart();
    let mut c = b.client();
    let after = c.metadata(&[]).unwrap();
    assert_eq!(before, after);
    assert_eq!(after[0].retention_bytes, 1000);
    assert_eq!(after[1].retention_ms, 5000);
    assert_eq!(read_partition(&mut c, "a", 2).len(), 2);
}

#[test]
fn kill9_under_load_keeps_every_acknowledged_message_once_in_order() {
    let dir = temp_dir("kill9");
    let b = Broker::start(&dir, 2, &[]);
    let mut c = b.client();
    c.create_topic("d", 2, -1, -1).unwrap();
    let addr = b.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..2u32 {
        let addr = addr.clone();
        let stop = stop.clone();
        producers.push(std::thread::spawn(move || {
            let mut c = ringmq::client::Client::connect(addr.as_str()).unwrap();
            let mut acked: Vec<(u64, String)> = Vec::new();
            for i in 0..100_000u64 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) && i > 10 {
                    break;
                }
                let v = format!("p{p}-{i}");
                match c.produce("d", PartitionChoice::Explicit(p), &[rec(&v)]) {
                    Ok(ack) => acked.push((ack.base_offset, v)),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    std::thread::sleep(Duration::from_millis(700));
    let mut b = b;
    b.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked: Vec<Vec<(u64, String)>> = producers.into_iter().map(|t| t.join().unwrap()).collect();
    let b = b.restart();
    let mut c = b.client();
    for p in 0..2u32 {
        let got = read_partition(&mut c, "d", p);
        let acked = &acked[p as usize];
        assert!(
            acked.len() > 10,
            "the producer made progress before the kill"
        );
        // Every acknowledged message is there, at its acknowledged offset, exactly once.
        assert!(
            got.len() >= acked.len(),
            "partition {p}: {} stored < {} acked",
            got.len(),
            acked.len()
        );
        for (i, (off, v)) in acked.iter().enumerate() {
            assert_eq!(got[*off as usize].1, *v, "partition {p} offset {off}");
            assert_eq!(*off as usize, i, "offsets are dense");
        }
        // In order, no duplicates: values are p{p}-0, p{p}-1, ... in offset order.
        for (i, (off, v)) in got.iter().enumerate() {
            assert_eq!(*off as usize, i);
            assert_eq!(*v, format!("p{p}-{i}"));
        }
    }
}

/// Sends raw bytes; returns the first response frame's error code (if any) and whether the
/// server then closed the connection.
fn raw_exchange(addr: &str, bytes: &[u8], close_write: bool) -> (Option<u16>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&proto::encode_handshake(1, "raw")).unwrap();
    s.write_all(bytes).unwrap();
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut buf = Vec::new();
    // Ok means the server closed the connection (EOF); a timeout is an Err.
    let closed = s.read_to_end(&mut buf).is_ok();
    // Skip the handshake response, then read the error frame.
    let mut at = 0;
    let mut code = None;
    while at + 4 <= buf.len() {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let Some(body) = buf.get(at + 4..at + 4 + len) else {
            break;
        };
        if let Some(e) = proto::verify_frame(body)
            .ok()
            .and_then(|f| f.body_as_error())
        {
            code = Some(e.code().0);
        }
        at += 4 + len;
    }
    (code, closed)
}

fn unknown_union_frame() -> Vec<u8> {
    let mut b = flatbuffers::FlatBufferBuilder::new();
    let n = b.create_string("x");
    let t = fb::DeleteTopic::create(&mut b, &fb::DeleteTopicArgs { name: Some(n) });
    let f = fb::Frame::create(
        &mut b,
        &fb::FrameArgs {
            correlation_id: 5,
            body_type: fb::Body(200),
            body: Some(t.as_union_value()),
        },
    );
    b.finish(f, None);
    let data = b.finished_data();
    let mut out = (data.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

#[test]
fn malformed_frames_get_an_error_and_a_close_and_others_are_unaffected() {
    let dir = temp_dir("malformed");
    let b = Broker::start(&dir, 2, &[]);
    let mut good = b.client();
    good.create_topic("g", 1, -1, -1).unwrap();
    good.produce("g", PartitionChoice::Explicit(0), &[rec("before")])
        .unwrap();

    let mut garbage = 20u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xAB; 20]);
    let cases: Vec<(&str, Vec<u8>, bool, u16)> = vec![
        ("garbage", garbage, false, fb::ErrorCode::Malformed.0),
        (
            "truncated",
            {
                let f = proto::encode_metadata(2, &[]);
                f[..f.len() - 3].to_vec()
            },
            true,
            fb::ErrorCode::Malformed.0,
        ),
        (
            "oversized",
            (u32::MAX).to_le_bytes().to_vec(),
            false,
            fb::ErrorCode::FrameTooLarge.0,
        ),
        ("unknown union", unknown_union_frame(), false, 0),
        (
            "zero length",
            0u32.to_le_bytes().to_vec(),
            false,
            fb::ErrorCode::Malformed.0,
        ),
    ];
    for (name, bytes, close_write, want) in cases {
        let (code, closed) = raw_exchange(&b.addr, &bytes, close_write);
        let code = code.unwrap_or_else(|| panic!("{name}: no error frame"));
        if want != 0 {
            assert_eq!(code, want, "{name}");
        } else {
            assert!(
                code == fb::ErrorCode::UnknownRequest.0 || code == fb::ErrorCode::Malformed.0,
                "{name}: {code}"
            );
        }
        assert!(closed, "{name}: connection closed");
        // The well-behaved client keeps working, and acknowledged data is untouched.
        good.produce("g", PartitionChoice::Explicit(0), &[rec(name)])
            .unwrap();
    }
    let got: Vec<String> = read_partition(&mut good, "g", 0)
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(
        got,
        vec![
            "before",
            "garbage",
            "truncated",
            "oversized",
            "unknown union",
            "zero length"
        ]
    );
    // A request before the handshake is refused.
    let mut s = TcpStream::connect(b.addr.as_str()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&proto::encode_metadata(1, &[])).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let f = proto::verify_frame(&buf[4..]).unwrap();
    assert_eq!(
        f.body_as_error().unwrap().code(),
        fb::ErrorCode::HandshakeRequired
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_keeps_data() {
    let dir = temp_dir("sigterm");
    let mut b = Broker::start(&dir, 2, &["--fsync", "never"]);
    let mut c = b.client();
    c.create_topic("s", 2, -1, -1).unwrap();
    for i in 0..50 {
        c.produce(
            "s",
            PartitionChoice::Explicit(i % 2),
            &[rec(&format!("v{i}"))],
        )
        .unwrap();
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "clean exit");
    // With --fsync never, everything acknowledged was written and synced on shutdown.
    let b = b.restart();
    let mut c = b.client();
    let total: usize = (0..2).map(|p| read_partition(&mut c, "s", p).len()).sum();
    assert_eq!(total, 50);
}

#[test]
fn connection_and_in_flight_limits_refuse_or_backpressure() {
    let dir = temp_dir("limits");
    let b = Broker::start(&dir, 1, &["--max-connections", "2", "--max-in-flight", "2"]);
    let mut a = b.client();
    let _second = b.client();
    // The third connection gets a clear error and is closed; the others are unaffected.
    let mut s = TcpStream::connect(b.addr.as_str()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let f = proto::verify_frame(&buf[4..]).unwrap();
    let e = f.body_as_error().unwrap();
    assert_eq!(e.code(), fb::ErrorCode::TooManyConnections);
    assert!(e.message().unwrap().contains("--max-connections"));
    // Ten pipelined requests with an in-flight limit of 2: all answered (backpressure, not errors).
    a.create_topic("p", 1, -1, -1).unwrap();
    let batch = proto::encode_record_batch(&[rec("x")]);
    let mut sent = Vec::new();
    for _ in 0..10 {
        sent.push(
            a.send(|c| proto::encode_produce(c, "p", PartitionChoice::Explicit(0), &batch))
                .unwrap(),
        );
    }
    a.flush().unwrap();
    let mut by_corr = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let r = a.recv().unwrap();
        let corr = r.frame().correlation_id();
        by_corr.insert(corr, ringmq::client::produce_ack(&r).unwrap().base_offset);
    }
    // Every request answered (none refused), and appended in the order it was sent.
    let offsets: Vec<u64> = sent.iter().map(|c| by_corr[c]).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<u64>>());
}
