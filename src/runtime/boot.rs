//! Boot in dependency order, shutdown in reverse: validate config and the topic table, start
//! one pinned executor per core, join the mesh, open logs, listen; on SIGINT/SIGTERM stop
//! accepting, let in-flight requests finish, sync every log, exit 0.
//!
//! Owns: process-wide startup and signals. Must not touch: request handling.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use super::config::ServeConfig;
use crate::limits;
use crate::router::{Envelope, Reply, Router};
use crate::server;
use crate::shard::Shard;
use crate::storage::meta_file;

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Asks a running `serve` in this process to shut down (tests, embedded use).
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Runs the broker until a signal; returns after a clean shutdown.
pub fn serve(mut cfg: ServeConfig) -> Result<(), String> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("creating data dir {}: {e}", cfg.data_dir.display()))?;
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)
        .map_err(|e| format!("resolving data dir {}: {e}", cfg.data_dir.display()))?;
    // One broker per data directory and per address, before anything in it is read.
    let _claims = super::exclusive::claim(&cfg.data_dir, cfg.listen)?;
    keep_large_buffers_in_their_own_mappings();
    let meta = meta_file::load(&cfg.data_dir)?;
    let restored = Arc::new(crate::shard::state_log::load_all(&cfg.data_dir)?);
    eprintln!(
        "ringmq {}: data {} listen {} cores {} fsync {:?} max-frame-bytes {} max-connections {} max-in-flight {} io-memory {} KiB poll {} segment-bytes {} retention-check-ms {} ({} topics)",
        env!("CARGO_PKG_VERSION"),
        cfg.data_dir.display(),
        cfg.listen,
        cfg.cores,
        cfg.durability,
        cfg.max_frame_bytes,
        cfg.max_connections,
        cfg.max_in_flight,
        cfg.io_memory_bytes / 1024,
        match cfg.spin_before_park_us {
            0 => "park".to_string(),
            u64::MAX => "spin".to_string(),
            us => format!("adaptive (spin {us} us)"),
        },
        cfg.segment_bytes_max,
        cfg.retention_check_ms,
        meta.topics.len()
    );
    eprintln!(
        "ringmq: memory-max-bytes {} ({} per shard), stalled-connection-ms {}",
        cfg.memory_max_bytes,
        cfg.memory_per_shard_bytes(),
        cfg.stalled_connection_ms
    );
    install_signal_handlers();
    let mesh = Meshes {
        requests: MeshBuilder::full(cfg.cores, limits::MESH_CHANNEL_CAPACITY),
        replies: MeshBuilder::full(cfg.cores, limits::MESH_REPLY_CHANNEL_CAPACITY),
    };
    let bound = Arc::new(Startup::default());
    let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for cpu in 0..cfg.cores {
        let (mesh, cfg, bound, error) = (mesh.clone(), cfg.clone(), bound.clone(), error.clone());
        let restored = restored.clone();
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("ringmq-shard-{cpu}"))
            .io_memory(cfg.io_memory_bytes)
            .ring_depth(limits::RING_DEPTH_DEFAULT);
        if cfg.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(cfg.spin_before_park_us));
        }
        let h = builder
            .spawn(move || async move {
                if let Err(e) = shard_main(mesh, cfg, bound, restored).await {
                    eprintln!("ringmq: {e}");
                    if let Ok(mut slot) = error.lock() {
                        slot.get_or_insert(e);
                    }
                    SHUTDOWN.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| format!("starting executor on cpu {cpu}: {e}"))?;
        handles.push(h);
    }
    for h in handles {
        h.join().map_err(|e| format!("executor failed: {e}"))?;
    }
    let failed = error.lock().ok().and_then(|mut e| e.take());
    match failed {
        Some(e) => Err(e),
        None => {
            eprintln!("ringmq: shut down cleanly");
            Ok(())
        }
    }
}

/// The two lanes between shards: requests, and the replies to them.
#[derive(Clone)]
struct Meshes {
    requests: MeshBuilder<Envelope, Full>,
    replies: MeshBuilder<Reply, Full>,
}

async fn shard_main(
    mesh: Meshes,
    cfg: ServeConfig,
    bound: Arc<Startup>,
    restored: Arc<crate::shard::state_log::Restored>,
) -> Result<(), String> {
    let (senders, receivers) = mesh
        .requests
        .join()
        .await
        .map_err(|_| "joining the request mesh failed".to_string())?;
    let (reply_senders, reply_receivers) = mesh
        .replies
        .join()
        .await
        .map_err(|_| "joining the reply mesh failed".to_string())?;
    let cores = cfg.cores;
    let listen = cfg.listen;
    let router = Router::new(senders, reply_senders)?;
    let shard = std::rc::Rc::new(Shard::new(std::rc::Rc::new(cfg), router));
    server::spawn_mesh_loops(&shard, receivers, reply_receivers);
    let watcher = shard.clone();
    glommio::spawn_local(async move {
        while !SHUTDOWN.load(Ordering::SeqCst) {
            crate::runtime::sleep(Duration::from_millis(20)).await;
        }
        watcher.begin_shutdown();
    })
    .detach();
    let result = match shard.load_groups(&restored).await {
        Ok(()) => run_shard(&shard, listen, cores, bound).await,
        Err(e) => Err(e),
    };
    shutdown_shard(&shard).await;
    result
}

/// Start-up rendezvous of the shards: no shard listens before every shard has recovered, so a
/// client never sees a half-loaded broker.
#[derive(Default)]
struct Startup {
    /// Shards whose partitions and consumer state are loaded.
    loaded: AtomicUsize,
    /// Shard 0 checked the port after everyone loaded: shards may bind.
    go: AtomicBool,
    /// Shards listening.
    bound: AtomicUsize,
}

impl Startup {
    /// Waits until every shard has loaded (false on shutdown meanwhile).
    async fn all_loaded(
        &self,
        shard_id: usize,
        cores: usize,
        listen: std::net::SocketAddr,
    ) -> Result<bool, String> {
        self.loaded.fetch_add(1, Ordering::SeqCst);
        while self.loaded.load(Ordering::SeqCst) < cores {
            if SHUTDOWN.load(Ordering::SeqCst) {
                return Ok(false);
            }
            crate::runtime::sleep(Duration::from_millis(1)).await;
        }
        if shard_id == 0 {
            // Another process may have taken the port while we recovered.
            super::exclusive::check_port_free(listen)?;
            eprintln!("ringmq: every partition recovered; opening {listen}");
            self.go.store(true, Ordering::SeqCst);
        }
        while !self.go.load(Ordering::SeqCst) {
            if SHUTDOWN.load(Ordering::SeqCst) {
                return Ok(false);
            }
            crate::runtime::sleep(Duration::from_millis(1)).await;
        }
        Ok(true)
    }
}

/// glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), after which
/// 16 MiB fetch responses and frames come from arenas and stay in RSS when freed. A fixed
/// threshold of [`limits::MALLOC_MMAP_THRESHOLD_BYTES`] keeps such buffers in their own
/// mappings, returned on free, while ordinary produce batches (far smaller) stay in the arenas
/// (no mmap per request). The rest is handed back by `malloc_trim` after connections close.
fn keep_large_buffers_in_their_own_mappings() {
    // SAFETY: mallopt only changes allocator parameters; called before any executor starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, limits::MALLOC_MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, limits::MALLOC_TRIM_THRESHOLD_BYTES);
    }
}

async fn run_shard(
    shard: &std::rc::Rc<Shard>,
    listen: std::net::SocketAddr,
    cores: usize,
    startup: Arc<Startup>,
) -> Result<(), String> {
    let loaded = shard.load().await;
    if let Err(e) = loaded {
        SHUTDOWN.store(true, Ordering::SeqCst);
        return Err(e);
    }
    if !startup.all_loaded(shard.id(), cores, listen).await? {
        return Ok(());
    }
    if let (0, Some(c)) = (shard.id(), shard.cfg.cluster.clone()) {
        let floor = shard.table().cluster.as_ref().map_or(0, |v| v.meta_version);
        let data_dir = shard.cfg.data_dir.clone();
        match crate::cluster::node::ClusterNode::start(shard.clone(), c, data_dir, floor).await {
            Ok(node) => shard.set_cluster(node),
            Err(e) => {
                SHUTDOWN.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
    }
    let listener = TcpListener::bind(listen).map_err(|e| format!("listening on {listen}: {e}"))?;
    if startup.bound.fetch_add(1, Ordering::SeqCst) + 1 == cores {
        println!("ringmq: listening on {listen}");
    }
    glommio::spawn_local(shard.clone().run_ticker()).detach();
    shard.start_replication();
    server::accept_loop(shard.clone(), listener).await;
    Ok(())
}

async fn shutdown_shard(shard: &std::rc::Rc<Shard>) {
    shard.begin_shutdown();
    let deadline = Instant::now() + Duration::from_millis(limits::SHUTDOWN_GRACE_MS);
    // Connections answer every request they read (ShuttingDown for new ones), then close.
    while (shard.requests_in_flight.get() > 0 || shard.connections.get() > 0)
        && Instant::now() < deadline
    {
        crate::runtime::sleep(Duration::from_millis(5)).await;
    }
    shard.sync_all().await;
    // Let peers finish their own grace period before the mesh goes away.
    crate::runtime::sleep(Duration::from_millis(50)).await;
    shard.router.close();
}
