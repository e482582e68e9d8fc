//! The thin runtime layer over glommio: executor building, timers and a local notify.
//!
//! Owns: every direct use of glommio's executor and timer APIs outside storage's DMA file, so
//! another io_uring runtime could replace glommio here. Must not touch: broker or storage logic.

pub mod boot;
pub mod budget;
pub mod clock;
pub mod config;
pub mod exclusive;
pub mod notify;
pub mod oneshot;

pub use notify::Notify;

use std::future::Future;
use std::time::Duration;

use crate::limits;

/// Runs `fut` to completion on a fresh single-threaded glommio executor (not pinned), sized to
/// fit `ulimit -l`. Used by tests, benches and the CLI's one-shot commands.
pub fn block_on<T: Send + 'static>(
    fut_gen: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = T>>> + Send + 'static,
) -> std::io::Result<T> {
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(limits::IO_MEMORY_BYTES_DEFAULT)
        .ring_depth(limits::RING_DEPTH_DEFAULT)
        .spawn(fut_gen)
        .map_err(std::io::Error::from)?;
    handle
        .join()
        .map_err(|e| std::io::Error::other(format!("executor failed: {e}")))
}

/// Sleeps on the current executor.
pub async fn sleep(dur: Duration) {
    glommio::timer::sleep(dur).await;
}

/// Spawns a task on the current executor and detaches it.
pub fn spawn_detached(fut: impl Future<Output = ()> + 'static) {
    glommio::spawn_local(fut).detach();
}
