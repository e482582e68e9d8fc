//! Leaves shared by the client commands: the connection helper, where a consumer starts, and
//! what it subscribes to.
//!
//! Owns: nothing with state. Must not touch: other command modules (they import this).

use std::time::Instant;

use crate::client::Client;
use crate::filter::Filter;
use crate::metadata::{pattern_matches, validate_pattern};

use super::args::ConsumeArgs;

/// How often a pattern subscription looks for new topics.
pub const PATTERN_REFRESH_MS: u64 = 500;

/// Connects to the first broker of `server` (a comma-separated list, tried in order) that
/// answers.
pub fn connect(server: &str) -> Result<Client, String> {
    connect_any(server).map(|(_, c)| c)
}

/// A [`Leaders`] client (requests for a partition go to its leader) bootstrapped from the
/// first broker of `server` that answers.
pub fn connect_leaders(server: &str) -> Result<crate::client::leaders::Leaders, String> {
    let (addr, c) = connect_any(server)?;
    Ok(crate::client::leaders::Leaders::new(&addr, c))
}

/// [`connect`], with the address that answered.
pub fn connect_any(server: &str) -> Result<(String, Client), String> {
    let mut errors = Vec::new();
    for addr in server.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        check_host_port(addr, "--server")?;
        match Client::connect(addr) {
            Ok(c) => return Ok((addr.to_string(), c)),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    match errors.len() {
        0 => Err("--server names no address (expected HOST:PORT[,HOST:PORT...])".into()),
        1 => Err(format!("cannot reach the broker at {}", errors[0])),
        _ => Err(format!(
            "cannot reach any broker of {server}: {}",
            errors.join("; ")
        )),
    }
}

/// Checks that `addr` looks like HOST:PORT, naming `flag` when it does not.
pub fn check_host_port(addr: &str, flag: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{flag} {addr:?} is not HOST:PORT (for example 127.0.0.1:9400)"
        )),
    }
}

/// What a consumer reads: one topic or every topic matching a pattern.
pub enum Subscription {
    Topic(String),
    Pattern(String),
}

impl Subscription {
    pub fn from_args(a: &ConsumeArgs) -> Result<Self, String> {
        if let Some(f) = &a.filter {
            Filter::compile(f).map_err(|e| format!("--filter: {e}"))?;
        }
        match (&a.topic, &a.pattern) {
            (_, Some(p)) => {
                validate_pattern(p)?;
                Ok(Self::Pattern(p.clone()))
            }
            (Some(t), None) => Ok(Self::Topic(t.clone())),
            (None, None) => Err("give a TOPIC or --pattern".into()),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Topic(t) => format!("{t:?}"),
            Self::Pattern(p) => format!("pattern {p:?}"),
        }
    }

    /// Matching topics with their partition counts. A named topic must exist.
    pub fn topics(&self, c: &mut Client) -> Result<Vec<(String, u32)>, String> {
        let meta = match self {
            Self::Topic(t) => c.metadata(&[t.as_str()]),
            Self::Pattern(_) => c.metadata(&[]),
        }
        .map_err(|e| format!("consuming {}: {e}", self.label()))?;
        Ok(meta
            .into_iter()
            .filter(|t| match self {
                Self::Topic(name) => &t.name == name,
                Self::Pattern(p) => pattern_matches(p, &t.name),
            })
            .map(|t| (t.name, t.partitions.len() as u32))
            .collect())
    }
}

/// Where a consumer starts.
#[derive(Clone, Copy, Debug)]
pub enum From {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

pub fn parse_from(s: &str) -> Result<From, String> {
    match s {
        "earliest" => Ok(From::Earliest),
        "latest" => Ok(From::Latest),
        t if t.starts_with('@') => t[1..]
            .parse()
            .map(From::Time)
            .map_err(|_| format!("--from @UNIX_MS needs a number of ms, not {t:?}")),
        n => n.parse().map(From::Offset).map_err(|_| {
            format!("--from must be earliest, latest, an offset or @UNIX_MS, not {n:?}")
        }),
    }
}

/// The start offset of `partition` under `from`.
pub fn start_offset(
    c: &mut Client,
    topic: &str,
    partition: u32,
    from: From,
) -> Result<u64, String> {
    let r = match from {
        From::Earliest => c.list_offset(topic, partition, -1),
        From::Latest => c.list_offset(topic, partition, -2),
        From::Offset(o) => return Ok(o),
        From::Time(ms) => c.list_offset(topic, partition, ms.max(0)),
    };
    r.map_err(|e| format!("finding the start of {topic:?} partition {partition}: {e}"))
}

/// Cluster: the error says the partition's node is down or the partition is moving; a
/// consumer skips it for now and tries again, as Kafka consumers do.
pub fn unavailable_for_now(e: &crate::client::ClientError) -> bool {
    use crate::protocol::fb::ErrorCode;
    matches!(
        e.code(),
        Some(ErrorCode::NodeUnavailable | ErrorCode::NotLeader | ErrorCode::PartitionUnavailable)
    )
}

/// `--idle-ms`: restarts the idle clock when a round got messages; true once no round has for
/// `idle_ms` (never without the flag).
pub fn idle_for_long(idle_ms: Option<u64>, got_any: bool, idle_since: &mut Instant) -> bool {
    if got_any {
        *idle_since = Instant::now();
        return false;
    }
    idle_ms.is_some_and(|ms| idle_since.elapsed().as_millis() as u64 >= ms)
}
