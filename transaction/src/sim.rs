//! A simulated, recording file system for crash tests: every write, flush, length change,
//! create, rename, unlink and directory sync of every file goes into one log, in order, with the
//! transaction's named events between them. [`SimFs::crash`] rebuilds what a power cut after any
//! prefix of that log leaves behind, and [`SimFs::inject`] fails chosen operations with an errno.
//!
//! The durability model (close to ext4 and to ALICE's assumptions):
//! - a file's writes and length changes are durable once a later flush of *that* file is in the
//!   log; a flush of one file orders nothing in another;
//! - a name created, renamed or removed is durable once a later sync of its directory is in the
//!   log (both directories for a rename);
//! - anything not yet durable may be lost: all of it, none of it, or (torn) any subset, with each
//!   write kept or lost per 512-byte sector. Aligned 512-byte sectors are atomic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use qcow2::storage::{read_from_bytes, Storage};
use qcow2::{BackingPolicy, Image, OpenOptions};

use crate::fs::{parent, FileId, GroupFs, LockGuard};

/// Bytes the simulated disk persists atomically.
pub const SECTOR: u64 = 512;

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    /// Bytes written into a file.
    Write {
        /// The file's inode.
        ino: u64,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A file's length set.
    SetLen {
        /// The file's inode.
        ino: u64,
        /// The new length in bytes.
        len: u64,
    },
    /// A file's writes made durable (`fdatasync`).
    Flush {
        /// The file's inode.
        ino: u64,
    },
    /// A file created under a name.
    Create {
        /// The new name.
        path: PathBuf,
        /// The new file's inode.
        ino: u64,
    },
    /// A name moved.
    Rename {
        /// The old name.
        from: PathBuf,
        /// The new name (replaced if it existed).
        to: PathBuf,
    },
    /// A name removed.
    Unlink {
        /// The name removed.
        path: PathBuf,
    },
    /// A directory's name changes made durable.
    SyncDir {
        /// The directory.
        dir: PathBuf,
    },
    /// A named point of the transaction (not an I/O operation).
    Event(String),
}

/// Which not-yet-durable operations survive a simulated power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivors {
    /// None of them.
    None,
    /// All of them.
    All,
    /// A seeded choice: each `unit`-byte aligned piece of each write, and each name change, by
    /// its own coin. `unit` 512 is the default profile, 4096 a 4 KiB-atomic disk, and 1 the
    /// hostile profile under which even the one-sector header commit can tear.
    Torn {
        /// Seeds the coins.
        seed: u64,
        /// Bytes that land whole: 1, 512 or 4096.
        unit: u64,
    },
}

impl Survivors {
    /// The default profile: 512-byte sectors are atomic.
    pub fn torn(seed: u64) -> Survivors {
        Survivors::Torn { seed, unit: SECTOR }
    }
}

/// An injected failure: the `at`-th I/O operation (counting from 0, events excluded) fails with
/// the OS error `errno` (`EIO`, `ENOSPC`, ...); with `persistent`, every later one fails too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Index of the first failing I/O operation.
    pub at: usize,
    /// The OS error number it fails with.
    pub errno: i32,
    /// Every later operation fails too.
    pub persistent: bool,
}

/// Names, directories and file contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tree {
    names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    files: HashMap<u64, Vec<u8>>,
}

impl Tree {
    /// Forgets the contents of files no name refers to.
    fn collect_garbage(&mut self) {
        let live: BTreeSet<u64> = self.names.values().copied().collect();
        self.files.retain(|ino, _| live.contains(ino));
    }
}

#[derive(Debug, Default)]
struct State {
    /// What was durable when recording started.
    base: Tree,
    /// What a reader sees now.
    live: Tree,
    log: Vec<FsOp>,
    next_ino: u64,
    /// I/O operations attempted (the index faults count).
    attempts: usize,
    fault: Option<Fault>,
    locks: BTreeSet<PathBuf>,
    /// Directory syncs seen so far, and the one to skip (a mutation test of the sync calls).
    syncs: usize,
    skip_sync: Option<usize>,
    /// What `free_space` reports (unknown when `None`).
    free: Option<u64>,
}

impl State {
    /// Counts an I/O operation and fails it if a fault says so.
    fn gate(&mut self) -> io::Result<()> {
        let index = self.attempts;
        self.attempts += 1;
        match self.fault {
            Some(f) if index == f.at || (f.persistent && index > f.at) => {
                Err(io::Error::from_raw_os_error(f.errno))
            }
            _ => Ok(()),
        }
    }

    fn record(&mut self, op: FsOp) {
        apply(&mut self.live, &op, None);
        self.log.push(op);
    }
}

/// A simulated file system; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimFs(Arc<Mutex<State>>);

impl SimFs {
    /// An empty file system with only `/`.
    pub fn new() -> SimFs {
        let fs = SimFs::default();
        {
            let mut s = fs.state();
            s.base.dirs.insert(PathBuf::from("/"));
            s.live = s.base.clone();
            s.next_ino = 1;
        }
        fs
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a directory (and its parents), durable and unrecorded: test setup.
    pub fn add_dir(&self, path: &Path) {
        let path = normalize(path);
        let mut s = self.state();
        for dir in path.ancestors() {
            s.base.dirs.insert(dir.to_path_buf());
            s.live.dirs.insert(dir.to_path_buf());
        }
    }

    /// Adds a file with `bytes`, durable and unrecorded: test setup.
    pub fn add_file(&self, path: &Path, bytes: Vec<u8>) {
        let path = normalize(path);
        self.add_dir(parent(&path));
        let mut guard = self.state();
        let s = &mut *guard;
        let ino = s.next_ino;
        s.next_ino += 1;
        for tree in [&mut s.base, &mut s.live] {
            tree.names.insert(path.clone(), ino);
            tree.files.insert(ino, bytes.clone());
        }
    }

    /// The current content of a file, as a reader sees it.
    pub fn file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.state();
        let ino = s.live.names.get(&normalize(path))?;
        s.live.files.get(ino).cloned()
    }

    /// Every file name, sorted.
    pub fn names(&self) -> Vec<PathBuf> {
        self.state().live.names.keys().cloned().collect()
    }

    /// The operations recorded so far.
    pub fn log(&self) -> Vec<FsOp> {
        self.state().log.clone()
    }

    /// The inode a name refers to now.
    pub fn ino(&self, path: &Path) -> Option<u64> {
        self.state().live.names.get(&normalize(path)).copied()
    }

    /// How many entries the log has.
    pub fn log_len(&self) -> usize {
        self.state().log.len()
    }

    /// How many I/O operations were attempted (what [`Fault::at`] counts).
    pub fn attempts(&self) -> usize {
        self.state().attempts
    }

    /// Arms a fault (replacing any other), or disarms with `None`.
    pub fn inject(&self, fault: Option<Fault>) {
        self.state().fault = fault;
    }

    /// Sets the free space the file system reports to validation.
    pub fn set_free_space(&self, bytes: Option<u64>) {
        self.state().free = bytes;
    }

    /// Makes the `n`-th directory sync (counting from 0) do nothing, as if the call were
    /// missing from the code: crash tests must then find a broken invariant.
    pub fn skip_dir_sync(&self, n: Option<usize>) {
        self.state().skip_sync = n;
    }

    /// A new file system holding what a power cut right after the first `cut` log entries leaves
    /// on disk, with an empty log.
    pub fn crash(&self, cut: usize, survivors: Survivors) -> SimFs {
        let s = self.state();
        let ops = &s.log[..cut.min(s.log.len())];
        let tree = materialize(&s.base, ops, survivors);
        SimFs(Arc::new(Mutex::new(State {
            live: tree.clone(),
            base: tree,
            next_ino: s.next_ino,
            ..State::default()
        })))
    }

    /// Opens an image on its own (its backing file ignored), read-only, as a checker looks at it.
    pub fn open_read_only(&self, path: &Path) -> qcow2::Result<Image> {
        self.open_alone(path, false)
    }

    fn open_alone(&self, path: &Path, writable: bool) -> qcow2::Result<Image> {
        let name = path.display().to_string();
        let storage = self
            .open_existing(path)
            .map_err(|e| qcow2::Error::io(&name, "opening the image", e))?;
        Image::from_storage(storage, &name, &alone_options(writable))
    }

    /// What a finished, refused or recovered transaction must leave: every file in `images`
    /// checks clean (no corruption, no leak), no other file exists besides the journal and the
    /// manifest in `group`, and the journal holds no unfinished transaction. Says what is wrong
    /// otherwise.
    pub fn audit(&self, images: &[PathBuf], group: &Path) -> Result<(), String> {
        for p in images {
            let report = self
                .open_read_only(p)
                .and_then(|img| img.check())
                .map_err(|e| format!("{}: {e}", p.display()))?;
            if !report.is_clean() {
                return Err(format!("{} does not check clean: {report:?}", p.display()));
            }
        }
        let journal = group.join("txn.journal");
        let expected = [
            journal.clone(),
            group.join("group.manifest"),
            group.join(crate::identity::FILE),
        ];
        if let Some(stray) = self
            .names()
            .into_iter()
            .find(|n| !images.contains(n) && !expected.contains(n))
        {
            return Err(format!("stray file {}", stray.display()));
        }
        if let Some(bytes) = self.file(&journal) {
            let records = crate::journal::read_all(&bytes).map_err(|e| e.to_string())?;
            if records
                .last()
                .is_some_and(|r| r.kind != crate::journal::Kind::End)
            {
                return Err("the journal still holds a transaction".into());
            }
        }
        Ok(())
    }

    /// A new file system holding everything as it is now, all durable, with an empty log.
    pub fn settled(&self) -> SimFs {
        let n = self.log_len();
        self.crash(n, Survivors::All)
    }

    fn ino_of(&self, path: &Path) -> io::Result<u64> {
        self.state()
            .live
            .names
            .get(&normalize(path))
            .copied()
            .ok_or_else(|| not_found(path))
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

/// `path` made absolute (against `/`) with `.` and `..` resolved lexically (there are no links).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// A xorshift coin, seeded.
struct Coin(u64);

impl Coin {
    fn flip(&mut self) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 & 1 == 1
    }
}

/// Applies `op` to `tree`; with a coin, a write keeps each `unit`-byte piece only when the coin
/// says so.
fn apply(tree: &mut Tree, op: &FsOp, mut coin: Option<(&mut Coin, u64)>) {
    match op {
        FsOp::Write { ino, offset, data } => {
            let file = tree.files.entry(*ino).or_default();
            let end = *offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            let mut pos = *offset;
            while pos < end as u64 {
                let unit = coin.as_ref().map_or(SECTOR, |(_, u)| (*u).max(1));
                let piece_end = (((pos / unit) + 1) * unit).min(end as u64);
                if coin.as_mut().is_none_or(|(c, _)| c.flip()) {
                    let (s, e) = ((pos - offset) as usize, (piece_end - offset) as usize);
                    file[pos as usize..piece_end as usize].copy_from_slice(&data[s..e]);
                }
                pos = piece_end;
            }
        }
        FsOp::SetLen { ino, len } => tree.files.entry(*ino).or_default().resize(*len as usize, 0),
        FsOp::Create { path, ino } => {
            tree.names.insert(path.clone(), *ino);
            tree.files.entry(*ino).or_default();
        }
        FsOp::Rename { from, to } => {
            if let Some(ino) = tree.names.remove(from) {
                tree.names.insert(to.clone(), ino);
            }
        }
        FsOp::Unlink { path } => {
            tree.names.remove(path);
        }
        FsOp::Flush { .. } | FsOp::SyncDir { .. } | FsOp::Event(_) => {}
    }
}

/// What `ops` applied to `base` leave after a power cut.
fn materialize(base: &Tree, ops: &[FsOp], survivors: Survivors) -> Tree {
    let mut last_flush: HashMap<u64, usize> = HashMap::new();
    let mut last_sync: HashMap<&Path, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            FsOp::Flush { ino } => {
                last_flush.insert(*ino, i);
            }
            FsOp::SyncDir { dir } => {
                last_sync.insert(dir, i);
            }
            _ => {}
        }
    }
    let synced_after = |dir: &Path, i: usize| last_sync.get(dir).is_some_and(|&s| s > i);
    let (mut coin, unit) = match survivors {
        Survivors::Torn { seed, unit } => (Some(Coin(seed | 1)), unit),
        _ => (None, SECTOR),
    };
    let mut tree = base.clone();
    for (i, op) in ops.iter().enumerate() {
        let durable = match op {
            FsOp::Write { ino, .. } | FsOp::SetLen { ino, .. } => {
                last_flush.get(ino).is_some_and(|&f| f > i)
            }
            FsOp::Create { path, .. } | FsOp::Unlink { path } => synced_after(parent(path), i),
            FsOp::Rename { from, to } => {
                synced_after(parent(from), i) && synced_after(parent(to), i)
            }
            FsOp::Flush { .. } | FsOp::SyncDir { .. } | FsOp::Event(_) => continue,
        };
        if durable || survivors == Survivors::All {
            apply(&mut tree, op, None);
            continue;
        }
        let Some(c) = coin.as_mut() else { continue };
        match op {
            FsOp::Write { .. } => apply(&mut tree, op, Some((c, unit))),
            _ => {
                if c.flip() {
                    apply(&mut tree, op, None)
                }
            }
        }
    }
    tree.collect_garbage();
    tree
}

/// Options that open an image without its backing file.
fn alone_options(writable: bool) -> OpenOptions {
    OpenOptions::default()
        .writable(writable)
        .backing(BackingPolicy::Ignore)
}

/// One open file of a [`SimFs`].
struct SimFile {
    fs: SimFs,
    ino: u64,
}

impl Storage for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.fs.state();
        let file = s.live.files.get(&self.ino).map_or(&[][..], |f| &f[..]);
        Ok(read_from_bytes(file, buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.fs.state();
        s.gate()?;
        s.record(FsOp::Write {
            ino: self.ino,
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.fs.state();
        s.gate()?;
        s.record(FsOp::Flush { ino: self.ino });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.fs.state();
        Ok(s.live.files.get(&self.ino).map_or(0, |f| f.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.state();
        s.gate()?;
        s.record(FsOp::SetLen { ino: self.ino, len });
        Ok(())
    }
}

/// The group lock of a [`SimFs`]: released on drop.
struct SimLock {
    fs: SimFs,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs.state().locks.remove(&self.path);
    }
}

/// The secret of every group on a [`SimFs`].
pub const SIM_GROUP_SECRET: [u8; 16] = [0x5a; 16];

impl GroupFs for SimFs {
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        let p = normalize(path);
        let s = self.state();
        if s.live.names.contains_key(&p) || s.live.dirs.contains(&p) {
            Ok(p)
        } else {
            Err(not_found(path))
        }
    }

    fn stat(&self, path: &Path) -> io::Result<FileId> {
        let p = normalize(path);
        let s = self.state();
        if let Some(&ino) = s.live.names.get(&p) {
            let len = s.live.files.get(&ino).map_or(0, |f| f.len() as u64);
            return Ok(FileId {
                dev: 1,
                ino,
                len,
                is_file: true,
            });
        }
        if s.live.dirs.contains(&p) {
            return Ok(FileId {
                dev: 1,
                ino: 0,
                len: 0,
                is_file: false,
            });
        }
        Err(not_found(path))
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.state().live.dirs.contains(&normalize(path))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        // Directories are durable at once: groups create them before any transaction.
        self.add_dir(path);
        Ok(())
    }

    fn lock_group(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let path = normalize(path);
        if !self.state().locks.insert(path.clone()) {
            return Ok(None);
        }
        Ok(Some(Box::new(SimLock {
            fs: self.clone(),
            path,
        })))
    }

    fn open_image(&self, path: &Path) -> qcow2::Result<Image> {
        self.open_alone(path, true)
    }

    fn open_read_only(&self, path: &Path) -> qcow2::Result<Image> {
        self.open_alone(path, false)
    }

    fn open_for_commit(&self, path: &Path) -> qcow2::Result<Image> {
        let name = path.display().to_string();
        let io = |e| qcow2::Error::io(&name, "opening the image", e);
        let mut top = self.open_alone(path, false)?;
        let Some(backing) = top.backing_file_name() else {
            return Ok(top);
        };
        let base_path = normalize(&parent(&normalize(path)).join(&backing));
        let storage = self.open_existing(&base_path).map_err(io)?;
        if top.backing_format().as_deref() == Some("raw") {
            top.attach_raw_backing(storage)?;
        } else {
            let base_name = base_path.display().to_string();
            top.attach_backing(Image::from_storage(
                storage,
                &base_name,
                &alone_options(true),
            )?);
        }
        Ok(top)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        let p = normalize(path);
        let mut s = self.state();
        if s.live.names.contains_key(&p) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", path.display()),
            ));
        }
        if !s.live.dirs.contains(parent(&p)) {
            return Err(not_found(parent(&p)));
        }
        s.gate()?;
        let ino = s.next_ino;
        s.next_ino += 1;
        s.record(FsOp::Create { path: p, ino });
        drop(s);
        Ok(Box::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn open_existing(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        let ino = self.ino_of(path)?;
        Ok(Box::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        match self.open_existing(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.create_new(path),
            other => other,
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.file(path).ok_or_else(|| not_found(path))
    }

    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let file = self.open_or_create(path)?;
        file.set_len(0)?;
        file.write_at(bytes, 0)?;
        file.flush()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normalize(from), normalize(to));
        let mut s = self.state();
        if !s.live.names.contains_key(&from) {
            return Err(not_found(&from));
        }
        s.gate()?;
        s.record(FsOp::Rename { from, to });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let p = normalize(path);
        let mut s = self.state();
        if !s.live.names.contains_key(&p) {
            return Err(not_found(path));
        }
        s.gate()?;
        s.record(FsOp::Unlink { path: p });
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.gate()?;
        let n = s.syncs;
        s.syncs += 1;
        if s.skip_sync == Some(n) {
            return Ok(());
        }
        s.record(FsOp::SyncDir {
            dir: normalize(dir),
        });
        Ok(())
    }

    fn new_group_secret(&self) -> [u8; 16] {
        // Fixed: a run replays the same way, and fuzz inputs can bind journals to the group.
        SIM_GROUP_SECRET
    }

    fn event(&self, name: &str) {
        self.state().log.push(FsOp::Event(name.to_string()));
    }

    fn parallel(&self) -> bool {
        false
    }

    fn free_space(&self, _path: &Path) -> Option<u64> {
        self.state().free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_and_unsynced_names_are_lost() {
        let fs = SimFs::new();
        fs.add_dir(Path::new("/g"));
        let f = fs.create_new(Path::new("/g/a")).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.flush().unwrap();
        // The name is not durable yet: a cut loses the file whatever its data did.
        let cut = fs.log_len();
        assert!(fs
            .crash(cut, Survivors::None)
            .file(Path::new("/g/a"))
            .is_none());
        assert!(fs
            .crash(cut, Survivors::All)
            .file(Path::new("/g/a"))
            .is_some());
        fs.sync_dir(Path::new("/g")).unwrap();
        f.write_at(b"J", 0).unwrap();
        let cut = fs.log_len();
        let lost = fs.crash(cut, Survivors::None);
        assert_eq!(lost.file(Path::new("/g/a")).unwrap(), b"hello");
        let kept = fs.crash(cut, Survivors::All);
        assert_eq!(kept.file(Path::new("/g/a")).unwrap(), b"Jello");
    }

    #[test]
    fn a_flush_of_one_file_orders_nothing_in_another() {
        let fs = SimFs::new();
        fs.add_file(Path::new("/a"), vec![0; 512]);
        fs.add_file(Path::new("/b"), vec![0; 512]);
        let a = fs.open_existing(Path::new("/a")).unwrap();
        let b = fs.open_existing(Path::new("/b")).unwrap();
        a.write_at(&[1; 512], 0).unwrap();
        b.write_at(&[2; 512], 0).unwrap();
        b.flush().unwrap();
        let after = fs.crash(fs.log_len(), Survivors::None);
        assert_eq!(after.file(Path::new("/a")).unwrap(), vec![0; 512]);
        assert_eq!(after.file(Path::new("/b")).unwrap(), vec![2; 512]);
    }

    #[test]
    fn torn_writes_keep_whole_sectors() {
        let fs = SimFs::new();
        fs.add_file(Path::new("/a"), vec![0; 4096]);
        let a = fs.open_existing(Path::new("/a")).unwrap();
        a.write_at(&[9; 4096], 0).unwrap();
        let mut mixed = false;
        for seed in 0..16 {
            let bytes = fs
                .crash(fs.log_len(), Survivors::torn(seed))
                .file(Path::new("/a"))
                .unwrap();
            for sector in bytes.chunks(SECTOR as usize) {
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector tore");
            }
            mixed |= bytes.contains(&0) && bytes.contains(&9);
        }
        assert!(mixed, "no seed kept part of the write");
    }

    #[test]
    fn faults_fail_the_chosen_operation() {
        let fs = SimFs::new();
        fs.add_file(Path::new("/a"), Vec::new());
        let a = fs.open_existing(Path::new("/a")).unwrap();
        fs.inject(Some(Fault {
            at: 1,
            errno: libc::ENOSPC,
            persistent: false,
        }));
        a.write_at(b"x", 0).unwrap();
        assert_eq!(
            a.flush().unwrap_err().kind(),
            io::ErrorKind::StorageFull,
            "the second operation fails"
        );
        a.flush().unwrap();
    }
}
