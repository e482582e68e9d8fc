//! An in-memory [`Storage`] that injects faults: torn writes at a crash, flipped bits, delays,
//! and failing writes or fsyncs (EIO, ENOSPC).
//!
//! Owns: a fake file tree shared by `Rc` between clones. Must not touch: real files.
//!
//! Model: each file has `current` bytes (what reads see) and `durable` bytes (what survives a
//! crash). `sync_data` makes current durable. [`MemStorage::crash`] rebuilds every file from
//! its durable bytes plus a seeded random subset of the writes made since: each unsynced write
//! survives whole, survives torn (a prefix in 512-byte sectors), or is lost with all later ones.
//! Directory operations and truncation are durable at once (as after the fsyncs the log does
//! for them); [`FaultOp::Meta`] / [`FaultOp::Any`] faults stop the world before one of them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::io::{Storage, StorageFile};

/// Which operation a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Write,
    Sync,
    /// Creating or removing a file, syncing a directory, truncating a file.
    Meta,
    /// Any of the above: "the machine dies before its next mutating operation" at a chosen
    /// step (crash-point tests).
    Any,
}

/// One armed fault: after `after` more successful calls of `op`, every later call fails with
/// `kind` (EIO → `Other`, ENOSPC → `StorageFull`).
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub op: FaultOp,
    pub after: u64,
    pub kind: io::ErrorKind,
}

#[derive(Default)]
struct MemFileData {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct MemFs {
    files: BTreeMap<PathBuf, Rc<RefCell<MemFileData>>>,
    faults: Vec<Fault>,
    sync_delay: Option<Duration>,
    syncs: u64,
    writes: u64,
}

/// The fault-injecting in-memory storage. Cloning shares the same tree.
#[derive(Clone, Default)]
pub struct MemStorage {
    fs: Rc<RefCell<MemFs>>,
}

/// A file of [`MemStorage`].
pub struct MemStorageFile {
    fs: Rc<RefCell<MemFs>>,
    file: Rc<RefCell<MemFileData>>,
}

/// A tiny deterministic PRNG (xorshift64*) so crash points replay from a printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.fs.borrow_mut().faults.push(fault);
    }

    /// Removes all armed faults.
    pub fn clear_faults(&self) {
        self.fs.borrow_mut().faults.clear();
    }

    /// Every `sync_data` sleeps this long first.
    pub fn set_sync_delay(&self, d: Option<Duration>) {
        self.fs.borrow_mut().sync_delay = d;
    }

    /// Number of successful `sync_data` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.fs.borrow().syncs
    }

    /// Simulates power loss: see the module doc. Returns how many unsynced writes were torn or
    /// lost.
    pub fn crash(&self, seed: u64) -> usize {
        let mut rng = Rng::new(seed);
        let fs = self.fs.borrow();
        let mut damaged = 0;
        for f in fs.files.values() {
            let mut f = f.borrow_mut();
            let mut content = f.durable.clone();
            let writes = std::mem::take(&mut f.unsynced);
            for (pos, data) in writes {
                match rng.below(4) {
                    0 => {
                        damaged += 1;
                        break;
                    }
                    1 => {
                        let sectors = (data.len() / 512).max(1) as u64;
                        let keep = (rng.below(sectors) * 512) as usize;
                        apply(&mut content, pos, &data[..keep.min(data.len())]);
                        damaged += 1;
                        break;
                    }
                    _ => apply(&mut content, pos, &data),
                }
            }
            f.current = content.clone();
            f.durable = content;
        }
        damaged
    }

    /// Flips one bit of a file's bytes (current and durable).
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) -> bool {
        let fs = self.fs.borrow();
        let Some(f) = fs.files.get(path) else {
            return false;
        };
        let mut f = f.borrow_mut();
        if byte >= f.current.len() {
            return false;
        }
        f.current[byte] ^= 1 << (bit % 8);
        if byte < f.durable.len() {
            f.durable[byte] ^= 1 << (bit % 8);
        }
        true
    }

    /// Cuts a file to `len` bytes (current and durable).
    pub fn cut(&self, path: &Path, len: usize) {
        if let Some(f) = self.fs.borrow().files.get(path) {
            let mut f = f.borrow_mut();
            f.current.truncate(len);
            f.durable.truncate(len);
        }
    }

    /// A file's current bytes.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.fs
            .borrow()
            .files
            .get(path)
            .map(|f| f.borrow().current.clone())
    }

    /// Paths of all files.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.fs.borrow().files.keys().cloned().collect()
    }
}

fn apply(content: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let pos = pos as usize;
    if content.len() < pos + data.len() {
        content.resize(pos + data.len(), 0);
    }
    content[pos..pos + data.len()].copy_from_slice(data);
}

fn check_fault(fs: &RefCell<MemFs>, op: FaultOp) -> io::Result<()> {
    let mut fs = fs.borrow_mut();
    for f in fs
        .faults
        .iter_mut()
        .filter(|f| f.op == op || f.op == FaultOp::Any)
    {
        if f.after == 0 {
            return Err(io::Error::new(f.kind, format!("injected {op:?} fault")));
        }
        f.after -= 1;
    }
    match op {
        FaultOp::Write => fs.writes += 1,
        FaultOp::Sync => fs.syncs += 1,
        FaultOp::Meta | FaultOp::Any => {}
    }
    Ok(())
}

impl Storage for MemStorage {
    type File = MemStorageFile;

    async fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    async fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .fs
            .borrow()
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
            .collect())
    }

    async fn open_file(&self, path: &Path, create: bool) -> io::Result<MemStorageFile> {
        if create && !self.fs.borrow().files.contains_key(path) {
            check_fault(&self.fs, FaultOp::Meta)?;
        }
        let mut fs = self.fs.borrow_mut();
        let file = match fs.files.get(path) {
            Some(f) => f.clone(),
            None if create => {
                let f = Rc::new(RefCell::new(MemFileData::default()));
                fs.files.insert(path.to_path_buf(), f.clone());
                f
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such file", path.display()),
                ))
            }
        };
        Ok(MemStorageFile {
            fs: self.fs.clone(),
            file,
        })
    }

    async fn remove_file(&self, path: &Path) -> io::Result<()> {
        check_fault(&self.fs, FaultOp::Meta)?;
        self.fs.borrow_mut().files.remove(path);
        Ok(())
    }

    async fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        check_fault(&self.fs, FaultOp::Meta)
    }
}

impl StorageFile for MemStorageFile {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        check_fault(&self.fs, FaultOp::Write)?;
        let mut f = self.file.borrow_mut();
        apply(&mut f.current, pos, data);
        f.unsynced.push((pos, data.to_vec()));
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        let f = self.file.borrow();
        let start = (pos as usize).min(f.current.len());
        let end = (start + len).min(f.current.len());
        Ok(Bytes::copy_from_slice(&f.current[start..end]))
    }

    async fn sync_data(&self) -> io::Result<()> {
        let delay = self.fs.borrow().sync_delay;
        if let Some(d) = delay {
            crate::runtime::sleep(d).await;
        }
        check_fault(&self.fs, FaultOp::Sync)?;
        let mut f = self.file.borrow_mut();
        let writes = std::mem::take(&mut f.unsynced);
        for (pos, data) in writes {
            apply(&mut f.durable, pos, &data);
        }
        Ok(())
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        check_fault(&self.fs, FaultOp::Meta)?;
        let mut f = self.file.borrow_mut();
        f.current.resize(len as usize, 0);
        f.unsynced.clear();
        f.durable = f.current.clone();
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        Ok(self.file.borrow().current.len() as u64)
    }
}
