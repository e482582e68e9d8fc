//! The durable topic table: `<data>/meta/topics.tsv`, rewritten whole on every change
//! (temp file, fsync, rename, fsync dir), so a crash leaves the old or the new table.
//!
//! Owns: that one file. Must not touch: logs. Admin changes are rare, so this uses blocking
//! std I/O on the controller shard.
//!
//! Format, one topic per line, tab-separated: name, retention bytes, retention ms, and the
//! comma-separated shard of each partition; on a cluster node a fifth field, the replica
//! nodes of each partition (`1+2+3,2+3+1,...`), and a sixth, the topic's incarnation (the
//! controller metadata version that created it). A first line `# ringmq topics v1`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::metadata::{validate_topic_name, Metadata, TopicMeta};

const HEADER: &str = "# ringmq topics v1";
/// On a cluster node: the controller metadata version the table was derived from.
const CLUSTER_VERSION: &str = "# cluster-meta-version ";

fn file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("meta").join("topics.tsv")
}

/// Loads the table; a missing file is an empty table; a bad line is an error naming it.
pub fn load(data_dir: &Path) -> Result<Metadata, String> {
    let path = file_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Metadata::default()),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut meta = Metadata::default();
    for (i, line) in text.lines().enumerate() {
        if let Some(v) = line.strip_prefix(CLUSTER_VERSION) {
            let meta_version = v
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
            meta.cluster = Some(crate::metadata::ClusterView {
                meta_version,
                ..Default::default()
            });
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let t = parse_line(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        meta.topics.insert(t.name.clone(), t);
    }
    Ok(meta)
}

fn parse_line(line: &str) -> Result<TopicMeta, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if !(4..=6).contains(&f.len()) {
        return Err(format!(
            "expected 4 to 6 tab-separated fields, found {}",
            f.len()
        ));
    }
    validate_topic_name(f[0])?;
    let num = |s: &str, what: &str| s.parse::<i64>().map_err(|e| format!("{what}: {e}"));
    let shards = f[3]
        .split(',')
        .map(|s| s.parse::<u32>().map_err(|e| format!("shard: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let replicas = match f.get(4) {
        None => Vec::new(),
        Some(r) => r
            .split(',')
            .map(|p| {
                p.split('+')
                    .map(|n| n.parse::<u32>().map_err(|e| format!("replica node: {e}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if !replicas.is_empty() && replicas.len() != shards.len() {
        return Err("replica lists and shards disagree on the partition count".into());
    }
    Ok(TopicMeta {
        name: f[0].to_string(),
        retention_bytes: num(f[1], "retention bytes")?,
        retention_ms: num(f[2], "retention ms")?,
        shards,
        replicas,
        incarnation: match f.get(5) {
            Some(v) => v.parse().map_err(|e| format!("incarnation: {e}"))?,
            None => 0,
        },
    })
}

/// Replaces the table durably.
pub fn save(data_dir: &Path, meta: &Metadata) -> std::io::Result<()> {
    let dir = data_dir.join("meta");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("topics.tsv.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{HEADER}")?;
        if let Some(c) = &meta.cluster {
            writeln!(f, "{CLUSTER_VERSION}{}", c.meta_version)?;
        }
        for t in meta.topics.values() {
            let shards: Vec<String> = t.shards.iter().map(|s| s.to_string()).collect();
            write!(
                f,
                "{}\t{}\t{}\t{}",
                t.name,
                t.retention_bytes,
                t.retention_ms,
                shards.join(",")
            )?;
            if !t.replicas.is_empty() {
                let r: Vec<String> = t
                    .replicas
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join("+")
                    })
                    .collect();
                write!(f, "\t{}\t{}", r.join(","), t.incarnation)?;
            }
            writeln!(f)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file_path(data_dir))?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("ringmq-meta-{}", std::process::id()));
        let mut m = Metadata::default();
        m.topics.insert(
            "a.b".into(),
            TopicMeta {
                name: "a.b".into(),
                shards: vec![0, 1, 0],
                retention_bytes: 100,
                retention_ms: -1,
                replicas: vec![],
                incarnation: 0,
            },
        );
        m.topics.insert(
            "c".into(),
            TopicMeta {
                name: "c".into(),
                shards: vec![0, 0],
                retention_bytes: -1,
                retention_ms: -1,
                replicas: vec![vec![1, 2], vec![3]],
                incarnation: 7,
            },
        );
        save(&dir, &m).unwrap();
        let l = load(&dir).unwrap();
        assert_eq!(l.topics, m.topics);
        std::fs::write(file_path(&dir), "x\ty\n").unwrap();
        assert!(load(&dir).unwrap_err().contains(":1:"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
