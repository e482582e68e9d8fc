//! Storage I/O behind a trait: the glommio DMA implementation and the contract tests rely on.
//!
//! Owns: opening, writing, reading, syncing and removing files. Must not touch: the log format.
//!
//! Contract of [`StorageFile::write_at`]: `pos` and `data.len()` are multiples of
//! [`LOG_BLOCK_BYTES`](crate::limits::LOG_BLOCK_BYTES) (O_DIRECT needs aligned writes).
//! `read_at` may return fewer bytes than asked at the end of the file.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::limits::LOG_BLOCK_BYTES;

/// A directory tree of files (real disk, or an in-memory one with injected faults).
#[allow(async_fn_in_trait)]
pub trait Storage: 'static {
    type File: StorageFile;
    async fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    async fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing; creates it if `create`.
    async fn open_file(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    async fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes creations and removals in `dir` durable.
    async fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file.
#[allow(async_fn_in_trait)]
pub trait StorageFile: 'static {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()>;
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Bytes>;
    /// fdatasync.
    async fn sync_data(&self) -> io::Result<()>;
    async fn truncate(&self, len: u64) -> io::Result<()>;
    async fn size(&self) -> io::Result<u64>;
}

/// Real files through glommio DMA (O_DIRECT, io_uring). Needs a real filesystem (not tmpfs).
#[derive(Default, Clone, Copy)]
pub struct DmaStorage;

/// A glommio DMA file.
pub struct DmaStorageFile {
    file: glommio::io::DmaFile,
    path: PathBuf,
    /// Test hook (only with `RINGMQ_FAULT_FILES=1` in the environment): the directory in which
    /// files `.fault-write` / `.fault-sync` make writes / fdatasyncs fail; their content
    /// `enospc` gives ENOSPC, anything else EIO.
    fault_dir: Option<PathBuf>,
}

/// The env var that arms the fault-file hook (tests of disk errors through a real broker).
pub const FAULT_FILES_ENV: &str = "RINGMQ_FAULT_FILES";

fn injected(dir: &Option<PathBuf>, name: &str) -> io::Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    match std::fs::read_to_string(dir.join(name)) {
        Ok(kind) if kind.trim() == "enospc" => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Err(_) => Ok(()),
    }
}

impl Storage for DmaStorage {
    type File = DmaStorageFile;

    async fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    async fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    async fn open_file(&self, path: &Path, create: bool) -> io::Result<DmaStorageFile> {
        if let Some(dir) = path.parent() {
            probe_iopoll_with_data(dir).await?;
        }
        let file = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .dma_open(path)
            .await
            .map_err(io::Error::from)?;
        if !LOG_BLOCK_BYTES.is_multiple_of(file.alignment()) {
            return Err(io::Error::other(format!(
                "{}: device alignment {} does not divide the log block size {LOG_BLOCK_BYTES}",
                path.display(),
                file.alignment()
            )));
        }
        let fault_dir = std::env::var_os(FAULT_FILES_ENV)
            .filter(|v| v == "1")
            .and_then(|_| path.parent().map(Path::to_path_buf));
        Ok(DmaStorageFile {
            file,
            path: path.to_path_buf(),
            fault_dir,
        })
    }

    async fn remove_file(&self, path: &Path) -> io::Result<()> {
        glommio::io::remove(path).await.map_err(io::Error::from)
    }

    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // Blocking, but only on segment creation and deletion. glommio's Directory::open
        // fails on relative paths (EBADF), std does not.
        std::fs::File::open(dir)?.sync_all()
    }
}

thread_local! {
    /// Devices (st_dev) on which this thread has let glommio probe iopoll with real data.
    static PROBED_DEVICES: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// glommio 0.9.0 decides once per device and thread whether reads go to the iopoll ring, by
/// reading the first block of the first DMA file opened. On an empty file that read returns EOF
/// even where iopoll is unsupported (virtio disks), and every later read then fails with
/// EOPNOTSUPP. So before the first DMA open on a device we open a file that holds one block.
async fn probe_iopoll_with_data(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
        return Ok(());
    }
    let probe = dir.join(format!(".ringmq-iopoll-probe-{}", std::process::id()));
    std::fs::write(&probe, vec![0u8; LOG_BLOCK_BYTES as usize])?;
    let opened = glommio::io::DmaFile::open(&probe).await;
    let _ = std::fs::remove_file(&probe);
    opened
        .map_err(io::Error::from)?
        .close()
        .await
        .map_err(io::Error::from)?;
    PROBED_DEVICES.with(|p| p.borrow_mut().push(dev));
    Ok(())
}

impl StorageFile for DmaStorageFile {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        injected(&self.fault_dir, ".fault-write")?;
        debug_assert_eq!(pos % LOG_BLOCK_BYTES, 0);
        debug_assert_eq!(data.len() as u64 % LOG_BLOCK_BYTES, 0);
        let mut done = 0usize;
        while done < data.len() {
            let chunk = &data[done..];
            let mut buf = self.file.alloc_dma_buffer(chunk.len());
            buf.as_bytes_mut().copy_from_slice(chunk);
            let n = self
                .file
                .write_at(buf, pos + done as u64)
                .await
                .map_err(io::Error::from)?;
            if n == 0 || !(n as u64).is_multiple_of(LOG_BLOCK_BYTES) {
                return Err(io::Error::other(format!(
                    "{}: short write of {n} bytes at {}",
                    self.path.display(),
                    pos + done as u64
                )));
            }
            done += n;
        }
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        let r = self.file.read_at(pos, len).await.map_err(io::Error::from)?;
        Ok(Bytes::copy_from_slice(&r))
    }

    async fn sync_data(&self) -> io::Result<()> {
        injected(&self.fault_dir, ".fault-sync")?;
        self.file.fdatasync().await.map_err(io::Error::from)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.truncate(len).await.map_err(io::Error::from)
    }

    async fn size(&self) -> io::Result<u64> {
        self.file.file_size().await.map_err(io::Error::from)
    }
}
