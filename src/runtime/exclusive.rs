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
    check_port_free(listen)?;
    Ok(Some(claim))
}

/// Fails when any socket listens on `listen` (our shards bind with SO_REUSEPORT, which would
/// otherwise share the port with another process's SO_REUSEPORT listener).
pub fn check_port_free(listen: SocketAddr) -> Result<(), String> {
    if listen.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(listen) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "another process already listens on {listen}; one broker per address"
        )),
        Err(e) => Err(format!("cannot listen on {listen}: {e}")),
    }
}
