//! `ringmq topic create|list|delete`.
//!
//! Owns: topic administration output. Must not touch: other commands.

use std::io::Write;

use super::args::TopicCommand;
use super::common::connect;

pub fn topic(server: &str, cmd: TopicCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_bytes,
            retention_ms,
        } => {
            c.create_topic(
                &name,
                partitions,
                retention_bytes.unwrap_or(-1),
                retention_ms.unwrap_or(-1),
            )
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
        TopicCommand::Delete { name } => {
            c.delete_topic(&name)
                .map_err(|e| format!("deleting topic {name:?}: {e}"))?;
            eprintln!("deleted topic {name}");
        }
    }
    Ok(())
}
