//! The `produce` scenario: P producer connections send batches of R records of S bytes with up
//! to W requests in flight, against `--server` or a broker started for the run. With `--rate`
//! the sends follow a fixed schedule and latency is measured from the intended send time
//! (corrected for coordinated omission).

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{histogram, LatencyUs, Report};
use crate::client::{produce_ack, Client};
use crate::protocol::{self as proto, PartitionChoice, RecordIn};

#[derive(clap::Args, Debug, Clone)]
pub struct ProduceBenchArgs {
    /// Producer connections (one thread each).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Bytes per message value.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// Messages per produce request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Requests in flight per producer.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Total messages per second for all producers (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// For a broker started here: --fsync of that broker.
    #[arg(long, default_value = "never")]
    pub fsync: String,
    /// For a broker started here: its --cores (default all).
    #[arg(long)]
    pub cores: Option<usize>,
    /// For a broker started here: its data directory (removed afterwards).
    #[arg(long, default_value = "./ringmq-bench-data")]
    pub data: std::path::PathBuf,
    /// Produce to this existing topic (all its partitions) instead of a new one made (and
    /// deleted) for the run: e.g. a cluster topic whose leader is known, reached through the
    /// leader (direct) or another node (forwarded).
    #[arg(long)]
    pub topic: Option<String>,
}

/// A broker child process started for a benchmark; killed on drop.
pub struct BenchBroker {
    child: Child,
    pub addr: String,
    data: std::path::PathBuf,
}

impl BenchBroker {
    pub fn start(
        data: &std::path::Path,
        fsync: &str,
        cores: Option<usize>,
    ) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let _ = std::fs::remove_dir_all(data);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(&addr)
            .arg("--fsync")
            .arg(fsync);
        if let Some(c) = cores {
            cmd.arg("--cores").arg(c.to_string());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting a broker: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => {}
            other => {
                let _ = child.kill();
                return Err(format!("the broker did not start: {other:?}"));
            }
        }
        Ok(Self {
            child,
            addr,
            data: data.to_path_buf(),
        })
    }

    /// User + system CPU seconds of the broker so far.
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.child.id())
    }
}

impl Drop for BenchBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The broker a scenario drives: `--server` if given, else one started here (kept alive by the
/// returned guard), with a connected admin client.
pub fn target(
    server: Option<&str>,
    data: &std::path::Path,
    fsync: &str,
    cores: Option<usize>,
) -> Result<(Option<BenchBroker>, String, Client), String> {
    let broker = match server {
        Some(_) => None,
        None => Some(BenchBroker::start(data, fsync, cores)?),
    };
    let addr = server
        .map(String::from)
        .or(broker.as_ref().map(|b| b.addr.clone()))
        .unwrap_or_default();
    let client = Client::connect(addr.as_str())
        .map_err(|e| format!("cannot reach the broker at {addr}: {e}"))?;
    Ok((broker, addr, client))
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// CPU seconds of this process (the load generator).
pub fn self_cpu_seconds() -> f64 {
    proc_cpu_seconds(std::process::id())
}

pub fn run_produce(server: Option<&str>, a: ProduceBenchArgs) -> Result<Report, String> {
    if a.producers == 0 || a.batch == 0 || a.window == 0 || a.partitions == 0 {
        return Err("--producers, --batch, --window and --partitions must be at least 1".into());
    }
    let (broker, addr, mut admin) =
        super::produce_bench::target(server, &a.data, &a.fsync, a.cores)?;
    let mut a = a;
    let topic = match &a.topic {
        Some(t) => {
            let meta = admin
                .metadata(&[t.as_str()])
                .map_err(|e| format!("--topic {t}: {e}"))?;
            a.partitions = meta.first().map_or(0, |m| m.partitions.len() as u32).max(1);
            t.clone()
        }
        None => {
            let t = format!("bench-produce-{}", std::process::id());
            admin
                .create_topic(&t, a.partitions, -1, -1)
                .map_err(|e| format!("creating {t}: {e}"))?;
            t
        }
    };
    let broker_cpu0 = broker.as_ref().map(|b| b.cpu_seconds()).unwrap_or(0.0);
    let gen_cpu0 = self_cpu_seconds();
    let start = Instant::now();
    let mut threads = Vec::new();
    for k in 0..a.producers {
        let (addr, topic, a) = (addr.clone(), topic.clone(), a.clone());
        threads.push(std::thread::spawn(move || {
            producer(k, &addr, &topic, &a, start)
        }));
    }
    let mut hist = histogram();
    let mut messages = 0;
    for t in threads {
        let (n, h) = t
            .join()
            .map_err(|_| "a producer thread panicked".to_string())??;
        messages += n;
        hist.add(&h).map_err(|e| e.to_string())?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let broker_cpu = broker
        .as_ref()
        .map(|b| b.cpu_seconds() - broker_cpu0)
        .unwrap_or(0.0);
    let gen_cpu = self_cpu_seconds() - gen_cpu0;
    if a.topic.is_none() {
        let _ = admin.delete_topic(&topic);
    }
    Ok(Report {
        scenario: "produce".into(),
        params: vec![
            ("producers".into(), a.producers.to_string()),
            ("message_bytes".into(), a.message_bytes.to_string()),
            ("batch".into(), a.batch.to_string()),
            ("partitions".into(), a.partitions.to_string()),
            ("window".into(), a.window.to_string()),
            ("rate".into(), a.rate.to_string()),
            (
                "fsync".into(),
                if server.is_some() {
                    "(server's)".into()
                } else {
                    a.fsync.clone()
                },
            ),
            (
                "cores".into(),
                a.cores
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "all".into()),
            ),
        ],
        messages,
        bytes: messages * a.message_bytes as u64,
        seconds,
        latency_us: LatencyUs::from_histogram(&hist),
        extra: vec![
            ("broker_cpu_s".into(), broker_cpu),
            ("loadgen_cpu_s".into(), gen_cpu),
        ],
    })
}

fn producer(
    k: usize,
    addr: &str,
    topic: &str,
    a: &ProduceBenchArgs,
    start: Instant,
) -> Result<(u64, hdrhistogram::Histogram<u64>), String> {
    let mut c = Client::connect(addr).map_err(|e| e.to_string())?;
    let records: Vec<RecordIn> = (0..a.batch)
        .map(|_| RecordIn {
            value: vec![b'x'; a.message_bytes],
            ..Default::default()
        })
        .collect();
    let batch = proto::encode_record_batch(&records);
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let interval = if a.rate > 0 {
        let per_producer = (a.rate as f64 / a.producers as f64).max(1e-9);
        Some(Duration::from_secs_f64(a.batch as f64 / per_producer))
    } else {
        None
    };
    let mut hist = histogram();
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut acked = 0u64;
    let mut i = 0u64;
    let mut recv = |c: &mut Client,
                    in_flight: &mut HashMap<u64, Instant>,
                    hist: &mut hdrhistogram::Histogram<u64>|
     -> Result<(), String> {
        let r = c.recv().map_err(|e| e.to_string())?;
        let corr = r.frame().correlation_id();
        let ack = produce_ack(&r).map_err(|e| e.to_string())?;
        if let Some(t) = in_flight.remove(&corr) {
            let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
        }
        acked += u64::from(ack.record_count);
        Ok(())
    };
    loop {
        let intended = super::intended_at(start, interval, i);
        if intended >= deadline {
            break;
        }
        while Instant::now() < intended {
            let left = intended.saturating_duration_since(Instant::now());
            if in_flight.is_empty() {
                super::pace_step(left);
            } else if c.wait_readable(left).map_err(|e| e.to_string())? {
                recv(&mut c, &mut in_flight, &mut hist)?;
            }
        }
        while in_flight.len() >= a.window {
            recv(&mut c, &mut in_flight, &mut hist)?;
        }
        let partition = ((k as u64 + i) % u64::from(a.partitions)) as u32;
        let corr = c
            .send(|corr| {
                proto::encode_produce(corr, topic, PartitionChoice::Explicit(partition), &batch)
            })
            .map_err(|e| e.to_string())?;
        c.flush().map_err(|e| e.to_string())?;
        in_flight.insert(corr, intended);
        i += 1;
    }
    while !in_flight.is_empty() {
        recv(&mut c, &mut in_flight, &mut hist)?;
    }
    Ok((acked, hist))
}
