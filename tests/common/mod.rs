//! Test helpers: a real `ringmq serve` child process on a free 127.0.0.1 port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringmq")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A fresh directory under the test target's tmp dir, removed (with everything a broker
/// wrote in it) when the test that made it ends, passing or failing.
pub fn temp_dir(name: &str) -> TempDir {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    TempDir(d)
}

/// A directory removed on drop. Declare it before the broker that uses it, so the broker is
/// stopped first (locals drop in reverse order).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running broker; killed (SIGKILL) on drop.
pub struct Broker {
    pub child: Child,
    pub addr: String,
    pub data: PathBuf,
    pub cores: usize,
    pub extra: Vec<String>,
}

impl Broker {
    pub fn start(data: &Path, cores: usize, extra: &[&str]) -> Broker {
        Self::start_on(data, cores, extra, free_port())
    }

    pub fn start_on(data: &Path, cores: usize, extra: &[&str], port: u16) -> Broker {
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(&addr)
            .arg("--cores")
            .arg(cores.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            // RINGMQ_TEST_STDERR=1 shows the brokers' logs when debugging a test.
            .stderr(if std::env::var_os("RINGMQ_TEST_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn ringmq serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ringmq serve exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "broker did not start within 30 s"
            );
        }
        Broker {
            child,
            addr,
            data: data.to_path_buf(),
            cores,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Restarts on the same port and data directory.
    pub fn restart(mut self) -> Broker {
        self.kill9();
        let extra: Vec<String> = self.extra.clone();
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        Broker::start_on(&self.data.clone(), self.cores, &extra, self.port())
    }

    pub fn client(&self) -> ringmq::client::Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ringmq::client::Client::connect(self.addr.as_str()) {
                Ok(c) => return c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect failed: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A client whose connection landed on `shard`.
    pub fn client_on_shard(&self, shard: u32) -> ringmq::client::Client {
        for _ in 0..200 {
            let c = self.client();
            if c.shard == shard {
                return c;
            }
        }
        panic!("no connection landed on shard {shard} in 200 tries");
    }

    /// Runs the CLI against this broker with `stdin`; returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        cli(&self.addr, args, stdin)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn cli(addr: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .env("RINGMQ_SERVER", addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let out = child.wait_with_output().expect("cli output");
    let _ = writer.join();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn rec(v: &str) -> ringmq::protocol::RecordIn {
    ringmq::protocol::RecordIn {
        value: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Reads every record of a partition from `from` to the end.
pub fn read_partition(
    c: &mut ringmq::client::Client,
    topic: &str,
    partition: u32,
) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let f = c.fetch(topic, partition, at, 1 << 20, 0).expect("fetch");
        if f.records.is_empty() {
            return out;
        }
        for r in f.records {
            out.push((r.offset, String::from_utf8_lossy(&r.value).into_owned()));
        }
        at = f.next_offset;
    }
}
