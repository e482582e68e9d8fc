//! `ringmq topic create|list|describe|delete` and `ringmq cluster status`.
//!
//! Owns: topic administration output. Must not touch: other commands.

use std::io::Write;

use super::args::{ClusterCommand, TopicCommand};
use super::common::connect;
use crate::protocol::fb::ErrorCode;

pub fn topic(server: &str, cmd: TopicCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_bytes,
            retention_ms,
            replicas,
        } => {
            retry_while_no_controller(ErrorCode::TopicExists, || {
                c.create_topic_replicated(
                    &name,
                    partitions,
                    retention_bytes.unwrap_or(-1),
                    retention_ms.unwrap_or(-1),
                    replicas.unwrap_or(0),
                )
            })
            .map_err(|e| format!("creating topic {name:?}: {e}"))?;
            eprintln!("created topic {name} with {partitions} partition(s)");
        }
        TopicCommand::List => {
            let topics = c
                .metadata(&[])
                .map_err(|e| format!("listing topics: {e}"))?;
            let mut out = std::io::stdout().lock();
            for t in topics {
                writeln!(out, "{} {}", t.name, t.partitions.len()).map_err(|e| e.to_string())?;
            }
        }
        TopicCommand::Describe { name, format } => describe(&mut c, &name, &format)?,
        TopicCommand::Delete { name } => {
            retry_while_no_controller(ErrorCode::UnknownTopic, || c.delete_topic(&name))
                .map_err(|e| format!("deleting topic {name:?}: {e}"))?;
            eprintln!("deleted topic {name}");
        }
    }
    Ok(())
}

/// How long a topic change is retried while the cluster's controller has no leader.
const CONTROLLER_RETRY_MS: u64 = 15_000;

/// Runs a topic change, retrying (with a short pause) while the cluster answers
/// `ControllerUnavailable`: an election after the controller leader died takes a second or
/// two, as with Kafka's admin client. Other errors return at once, except `done_code` on a
/// retry: an attempt answered "retry" may still have taken effect (the leader died after
/// committing it), so "exists" after a create (or "unknown" after a delete) is success.
fn retry_while_no_controller(
    done_code: ErrorCode,
    mut op: impl FnMut() -> Result<(), crate::client::ClientError>,
) -> Result<(), crate::client::ClientError> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(CONTROLLER_RETRY_MS);
    let mut retried = false;
    loop {
        match op() {
            Err(e)
                if e.code() == Some(ErrorCode::ControllerUnavailable)
                    && std::time::Instant::now() < deadline =>
            {
                retried = true;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) if retried && e.code() == Some(done_code) => return Ok(()),
            r => return r,
        }
    }
}

fn check_format(format: &str) -> Result<bool, String> {
    match format {
        "text" => Ok(false),
        "json" => Ok(true),
        f => Err(format!("--format must be text or json, not {f:?}")),
    }
}

/// One line per partition (`PARTITION LEADER REPLICAS START END`), or one JSON object.
fn describe(c: &mut crate::client::Client, name: &str, format: &str) -> Result<(), String> {
    let json = check_format(format)?;
    let topics = c
        .metadata(&[name])
        .map_err(|e| format!("describing topic {name:?}: {e}"))?;
    let t = topics
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("unknown topic {name:?}"))?;
    let mut out = std::io::stdout().lock();
    let text = if json {
        let parts: Vec<String> = t
            .partitions
            .iter()
            .map(|p| {
                let leader = if p.leader < 0 {
                    "null".to_string()
                } else {
                    p.leader.to_string()
                };
                let replicas: Vec<String> = p.replicas.iter().map(|r| r.to_string()).collect();
                format!(
                    "{{\"partition\":{},\"leader\":{leader},\"replicas\":[{}],\"start_offset\":{},\"end_offset\":{}}}",
                    p.partition,
                    replicas.join(","),
                    p.start_offset,
                    p.end_offset
                )
            })
            .collect();
        format!(
            "{{\"topic\":{},\"retention_bytes\":{},\"retention_ms\":{},\"partitions\":[{}]}}\n",
            crate::cli::output::json_string(&t.name),
            t.retention_bytes,
            t.retention_ms,
            parts.join(",")
        )
    } else {
        let mut s = String::from("PARTITION LEADER REPLICAS START END\n");
        for p in &t.partitions {
            let leader = if p.leader < 0 {
                "none".to_string()
            } else {
                p.leader.to_string()
            };
            let replicas: Vec<String> = p.replicas.iter().map(|r| r.to_string()).collect();
            let replicas = if replicas.is_empty() {
                "-".to_string()
            } else {
                replicas.join(",")
            };
            s.push_str(&format!(
                "{} {leader} {replicas} {} {}\n",
                p.partition, p.start_offset, p.end_offset
            ));
        }
        s
    };
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

/// `ringmq cluster status`.
pub fn cluster(server: &str, cmd: ClusterCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    match cmd {
        ClusterCommand::Status { format } => {
            let json = check_format(&format)?;
            let st = c
                .cluster_status()
                .map_err(|e| format!("cluster status: {e}"))?;
            let text = if json {
                let nodes: Vec<String> = st
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{{\"id\":{},\"address\":{},\"peer_address\":{},\"alive\":{},\"leaders\":{},\"replicas\":{},\"voter\":{}}}",
                            n.id,
                            crate::cli::output::json_string(&n.address),
                            crate::cli::output::json_string(&n.peer_address),
                            n.alive,
                            n.leaders,
                            n.replicas,
                            n.voter
                        )
                    })
                    .collect();
                let controller = if st.controller < 0 {
                    "null".to_string()
                } else {
                    st.controller.to_string()
                };
                format!(
                    "{{\"node\":{},\"controller\":{controller},\"version\":{},\"nodes\":[{}]}}\n",
                    st.node_id,
                    st.version,
                    nodes.join(",")
                )
            } else {
                let controller = if st.controller < 0 {
                    "none (election in progress, or a single node)".to_string()
                } else {
                    st.controller.to_string()
                };
                let mut s = format!(
                    "answered by node {}; controller leader {controller}; metadata version {}\nID ADDRESS PEER_ADDRESS ALIVE LEADERS REPLICAS VOTER\n",
                    st.node_id, st.version
                );
                for n in &st.nodes {
                    s.push_str(&format!(
                        "{} {} {} {} {} {} {}\n",
                        n.id,
                        n.address,
                        n.peer_address,
                        if n.alive { "yes" } else { "no" },
                        n.leaders,
                        n.replicas,
                        if n.voter { "yes" } else { "no" }
                    ));
                }
                s
            };
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| e.to_string())
        }
    }
}
