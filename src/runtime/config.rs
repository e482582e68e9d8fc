//! The broker's configuration, validated whole before any socket or file is opened.
//!
//! Owns: `ServeConfig` and its validation. Must not touch: anything with side effects.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::limits;
use crate::storage::Durability;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub cores: usize,
    pub durability: Durability,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub io_memory_bytes: usize,
    /// How long an idle executor spins before parking: 0 = park at once (`--poll park`),
    /// `u64::MAX` = never park (`--poll spin`).
    pub spin_before_park_us: u64,
    pub segment_bytes_max: u64,
    pub retention_check_ms: u64,
    pub state_compact_bytes: u64,
    /// Memory for request bodies and reserved responses over all connections.
    pub memory_max_bytes: u64,
    /// A connection stalled this long (mid-frame, or not reading its responses) is closed.
    pub stalled_connection_ms: u64,
    /// `Some` with `--seeds`: this broker is a node of a cluster. `None`: a single node, and
    /// no cluster code runs.
    pub cluster: Option<ClusterConfig>,
}

/// A cluster node's settings (`--node-id`, `--peer-listen`, `--seeds`, `--advertise`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// 1..; 0 is reserved for "this node" inside the broker.
    pub node_id: u32,
    /// Where other nodes reach this one (controller traffic, heartbeats).
    pub peer_listen: SocketAddr,
    /// Peer addresses of some members. Those listed are the controller's voters (at most
    /// [`limits::CONTROLLER_VOTERS_MAX`]); a node whose `--peer-listen` is not listed follows.
    pub seeds: Vec<SocketAddr>,
    /// The client address other nodes hand out for this node (`--advertise`, else `--listen`).
    pub advertise: String,
    /// A node silent this long is down.
    pub node_failure_timeout_ms: u64,
    /// A replicated partition's followers elect a new leader after this long without one.
    pub election_timeout_ms: u64,
}

impl ClusterConfig {
    /// Whether this node is one of the controller's voters: its peer address is a seed.
    pub fn is_voter(&self) -> bool {
        self.seeds.contains(&self.peer_listen)
    }

    fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("--node-id must be at least 1 (0 is reserved)".into());
        }
        if self.seeds.is_empty() {
            return Err("--seeds needs at least one peer address".into());
        }
        if self.seeds.len() > limits::CONTROLLER_VOTERS_MAX {
            return Err(format!(
                "--seeds lists {} addresses; the controller has at most {} voters (list those)",
                self.seeds.len(),
                limits::CONTROLLER_VOTERS_MAX
            ));
        }
        if self.node_failure_timeout_ms < 2 * limits::NODE_HEARTBEAT_MS {
            return Err(format!(
                "--node-failure-timeout-ms must be at least {} (two heartbeats)",
                2 * limits::NODE_HEARTBEAT_MS
            ));
        }
        if self.election_timeout_ms < 3 * limits::REPLICA_TICK_MS {
            return Err(format!(
                "--election-timeout-ms must be at least {} (three replication ticks)",
                3 * limits::REPLICA_TICK_MS
            ));
        }
        Ok(())
    }
}

/// Parses `--seeds`: comma-separated `HOST:PORT` peer addresses (an IP address: nodes compare
/// them with their own `--peer-listen`).
pub fn parse_seeds(s: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for a in s.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let addr: SocketAddr = a
            .parse()
            .map_err(|_| format!("--seeds: {a:?} is not IP:PORT (for example 127.0.0.1:9500)"))?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err("--seeds needs at least one peer address, comma-separated".into());
    }
    Ok(out)
}

/// The default `--memory-max-bytes`: a quarter of physical memory.
pub fn default_memory_max_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        4 << 30
    };
    ram / limits::MEMORY_MAX_RAM_DIVISOR
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./ringmq-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            durability: Durability::Always,
            max_frame_bytes: limits::MAX_FRAME_BYTES_DEFAULT,
            max_connections: limits::MAX_CONNECTIONS_DEFAULT,
            max_in_flight: limits::MAX_IN_FLIGHT_DEFAULT,
            io_memory_bytes: limits::IO_MEMORY_BYTES_DEFAULT,
            spin_before_park_us: 0,
            segment_bytes_max: limits::SEGMENT_BYTES_MAX_DEFAULT,
            retention_check_ms: limits::RETENTION_CHECK_MS,
            state_compact_bytes: limits::STATE_LOG_COMPACT_BYTES,
            memory_max_bytes: default_memory_max_bytes(),
            stalled_connection_ms: limits::STALLED_CONNECTION_MS_DEFAULT,
            cluster: None,
        }
    }
}

/// Parses `always`, `never` or a number of milliseconds.
pub fn parse_fsync(s: &str) -> Result<Durability, String> {
    match s {
        "always" => Ok(Durability::Always),
        "never" => Ok(Durability::Never),
        ms => match ms.parse::<u64>() {
            Ok(0) => Err("--fsync 0 is not an interval; use 'always'".into()),
            Ok(n) => Ok(Durability::IntervalMs(n)),
            Err(_) => Err(format!(
                "--fsync must be 'always', 'never' or a number of milliseconds, not {s:?}"
            )),
        },
    }
}

impl ServeConfig {
    /// Checks every bound; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if self.cores == 0 || self.cores > cpus {
            return Err(format!(
                "--cores must be 1..={cpus} on this machine, not {}",
                self.cores
            ));
        }
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > 256 << 20 {
            return Err("--max-frame-bytes must be 1 KiB..=256 MiB".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65_536 {
            return Err("--max-in-flight must be 1..=65536".into());
        }
        if self.io_memory_bytes < 512 * 1024 {
            return Err("--io-memory-kib must be at least 512 (glommio's minimum)".into());
        }
        if self.segment_bytes_max < 64 * 1024 {
            return Err("--segment-bytes must be at least 64 KiB".into());
        }
        if self.state_compact_bytes < 64 * 1024 {
            return Err("--state-compact-bytes must be at least 64 KiB".into());
        }
        let min = limits::MEMORY_PER_SHARD_BYTES_MIN
            .max(self.max_frame_bytes as u64 + u64::from(limits::FETCH_BYTES_MAX) + (1 << 20));
        if self.memory_per_shard_bytes() < min {
            return Err(format!(
                "--memory-max-bytes must be at least {} with --cores {} and --max-frame-bytes {} (one largest frame and one largest fetch per core), not {}",
                min * self.cores as u64,
                self.cores,
                self.max_frame_bytes,
                self.memory_max_bytes
            ));
        }
        if self.stalled_connection_ms == 0 {
            return Err("--stalled-connection-ms must be at least 1".into());
        }
        if self.retention_check_ms == 0 {
            return Err("--retention-check-ms must be at least 1".into());
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if c.peer_listen == self.listen {
                return Err(format!(
                    "--peer-listen and --listen are both {}; give the peer listener its own port",
                    self.listen
                ));
            }
        }
        Ok(())
    }

    /// Each shard's share of `--memory-max-bytes`.
    pub fn memory_per_shard_bytes(&self) -> u64 {
        self.memory_max_bytes / self.cores.max(1) as u64
    }

    /// Connections each shard accepts (the broker limit split evenly, rounded up).
    pub fn connections_per_shard(&self) -> usize {
        self.max_connections.div_ceil(self.cores)
    }
}
