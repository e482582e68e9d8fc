//! The `floor` scenario: the machine's own loopback round trip, the reference every latency
//! target is a ratio to. A blocking TCP echo server (one thread, TCP_NODELAY) and one client
//! that sends `--message-bytes` and reads them back, one at a time, paced exactly like `bench
//! produce` (sleep most of the gap, spin the last 200 µs; see [`super::pace_step`]) and timed
//! from the intended send time. No broker is involved.
//!
//! Owns: that client and server. Must not touch: anything of the broker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{histogram, LatencyUs, Report};

#[derive(clap::Args, Debug, Clone)]
pub struct FloorBenchArgs {
    /// Bytes per round trip.
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
    /// Round trips per second (0 = back to back).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
}

fn echo(mut s: TcpStream, bytes: usize) {
    let mut buf = vec![0u8; bytes];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

pub fn run_floor(a: FloorBenchArgs) -> Result<Report, String> {
    if a.message_bytes == 0 {
        return Err("--message-bytes must be at least 1".into());
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let bytes = a.message_bytes;
    let server = std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            let _ = s.set_nodelay(true);
            echo(s, bytes);
        }
    });
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let msg = vec![b'x'; bytes];
    let mut back = vec![0u8; bytes];
    let mut hist = histogram();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let cpu0 = super::produce_bench::self_cpu_seconds();
    let mut i = 0u64;
    loop {
        let intended = super::intended_at(start, interval, i);
        if intended >= deadline {
            break;
        }
        while Instant::now() < intended {
            super::pace_step(intended.saturating_duration_since(Instant::now()));
        }
        c.write_all(&msg).map_err(|e| format!("send: {e}"))?;
        c.read_exact(&mut back)
            .map_err(|e| format!("receive: {e}"))?;
        let _ = hist.record((intended.elapsed().as_micros() as u64).max(1));
        i += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = super::produce_bench::self_cpu_seconds() - cpu0;
    drop(c);
    let _ = server.join();
    Ok(Report {
        scenario: "floor".into(),
        params: vec![
            ("message_bytes".into(), bytes.to_string()),
            ("rate".into(), a.rate.to_string()),
        ],
        messages: i,
        bytes: i * bytes as u64,
        seconds,
        latency_us: LatencyUs::from_histogram(&hist),
        extra: vec![("cpu_s".into(), cpu)],
    })
}
