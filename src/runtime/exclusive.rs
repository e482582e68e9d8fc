//! Process-level exclusivity: one broker per data directory and per listen address.
//!
//! Owns: the data directory's `LOCK` file (an `flock` held for the broker's life, holding the
//! holder's pid) and a claim on the listen address (an abstract Unix socket named after it,
//! plus a probe bind without SO_REUSEPORT). Must not touch: anything else in the directory.
//! Both claims vanish with the process, so a kill -9 never leaves a stale lock behind.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::limits;

/// Held for the broker's life; dropping it releases both claims.
pub struct Claims {
    _lock: File,
    _port: Option<std::os::unix::net::UnixListener>,
}

/// Takes the data directory lock and the listen address, or says who holds them.
pub fn claim(data_dir: &Path, listen: SocketAddr) -> Result<Claims, String> {
    let lock = lock_data_dir(data_dir)?;
    let port = claim_listen(listen)?;
    Ok(Claims {
        _lock: lock,
        _port: port,
    })
}

fn lock_data_dir(data_dir: &Path) -> Result<File, String> {
    let path = data_dir.join("LOCK");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("another ringmq (pid {holder})")
            };
            return Err(format!(
                "data directory {} is in use by {who}; one broker per data directory",
                data_dir.display()
            ));
        }
        return Err(format!("locking {}: {err}", path.display()));
    }
    let pid = std::process::id().to_string();
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| f.write_all(pid.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(f)
}

/// Refuses an address another process listens on. Port 0 (any free port) claims nothing.
fn claim_listen(listen: SocketAddr) -> Result<Option<std::os::unix::net::UnixListener>, String> {
    if listen.port() == 0 {
        return Ok(None);
    }
    // Another ringmq that is still recovering has not bound the port yet: its claim is this
    // abstract socket, unique per network namespace and released when the process dies.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ringmq-listen-{listen}");
    let claim = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("another ringmq broker already uses {listen}; one broker per address")
            }
            _ => format!("claiming {listen}: {e}"),
        })?;
    // A broker killed a moment ago leaves its listener in the kernel until io_uring's
    // deferred teardown closes it (no process holds it any more: our claim succeeded).
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(limits::PORT_RELEASE_WAIT_MS);
    loop {
        match check_port_free(listen) {
            Ok(()) => return Ok(Some(claim)),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Fails when any socket listens on `listen`'s port at that address or a wildcard (our shards
/// bind with SO_REUSEPORT, which would otherwise share the port with another process's
/// SO_REUSEPORT listener). Reads the kernel's socket tables: a probe bind would also trip over
/// the previous run's closing connections, which are no obstacle.
pub fn check_port_free(listen: SocketAddr) -> Result<(), String> {
    if listen.port() == 0 {
        return Ok(());
    }
    let mut listeners = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            listeners.extend(listening_sockets(&text));
        }
    }
    let clash = listeners.iter().any(|a| {
        a.port() == listen.port()
            && (a.ip() == listen.ip() || a.ip().is_unspecified() || listen.ip().is_unspecified())
    });
    if clash {
        return Err(format!(
            "another process already listens on {listen}; one broker per address"
        ));
    }
    Ok(())
}

/// Addresses in LISTEN state in a /proc/net/tcp or tcp6 table.
fn listening_sockets(table: &str) -> Vec<SocketAddr> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            (state == TCP_LISTEN)
                .then(|| parse_proc_addr(local))
                .flatten()
        })
        .collect()
}

/// `0100007F:24B8` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word of the address
/// is printed in host byte order, the port in ordinary hex.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip: std::net::IpAddr = match addr.len() {
        8 => std::net::Ipv4Addr::from(word(0)?).into(),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = std::net::Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_from_the_kernel_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:24B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:24B9 0100007F:C350 06 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        let got = listening_sockets(table);
        assert_eq!(got, vec!["127.0.0.1:9400".parse::<SocketAddr>().unwrap()]);
        let v6 = parse_proc_addr("00000000000000000000000001000000:1F90").unwrap();
        assert_eq!(v6, "[::1]:8080".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn a_real_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(check_port_free(addr).is_err());
        drop(l);
        assert!(check_port_free(addr).is_ok());
    }
}
