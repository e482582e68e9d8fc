//! Cross-core mesh hop: round trips of a `Bytes` envelope between two executors over the glommio
//! channel mesh (the path a forwarded request and its reply take), with and without
//! `spin_before_park`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

fn round_trips(iters: u64, spin: Option<Duration>) -> Duration {
    let mesh: MeshBuilder<Bytes, _> = MeshBuilder::full(2, 64);
    let payload = Bytes::from(vec![0u8; 256]);
    let mut handles = Vec::new();
    for _ in 0..2 {
        let mesh = mesh.clone();
        let payload = payload.clone();
        let mut b = LocalExecutorBuilder::new(Placement::Unbound).io_memory(1 << 20);
        if let Some(s) = spin {
            b = b.spin_before_park(s);
        }
        handles.push(
            b.spawn(move || async move {
                let (tx, mut rx) = mesh.join().await.expect("mesh");
                let me = tx.peer_id();
                let other = 1 - me;
                let (_, from) = rx.streams().into_iter().next().expect("a peer");
                let start = Instant::now();
                for _ in 0..iters {
                    if me == 0 {
                        tx.send_to(other, payload.clone()).await.expect("send");
                        from.recv().await.expect("reply");
                    } else {
                        let m = from.recv().await.expect("request");
                        tx.send_to(other, m).await.expect("send");
                    }
                }
                start.elapsed()
            })
            .expect("executor"),
        );
    }
    let mut times: Vec<Duration> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    times.remove(0)
}

fn mesh(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh_round_trip");
    g.sample_size(10);
    g.bench_function("park", |b| b.iter_custom(|n| round_trips(n, None)));
    g.bench_function("spin_100us", |b| {
        b.iter_custom(|n| round_trips(n, Some(Duration::from_micros(100))))
    });
    g.finish();
}

criterion_group!(benches, mesh);
criterion_main!(benches);
