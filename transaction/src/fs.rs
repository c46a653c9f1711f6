//! The file system a group works on. Every file a transaction touches (images, overlays, the
//! journal, the manifest) goes through one [`GroupFs`], so a recording implementation
//! ([`crate::sim::SimFs`]) can order every write, flush, rename and directory sync of all files in
//! one log and rebuild what a power cut leaves behind. [`RealFs`] is the host file system.

use std::any::Any;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcow2::storage::{FileStorage, Storage};
use qcow2::{BackingPolicy, Image, OpenOptions};

/// What identifies a file: device and inode (two names of one file share them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// A regular file (not a directory or device).
    pub is_file: bool,
}

/// A held lock; dropping it releases the lock.
pub type LockGuard = Box<dyn Any + Send>;

/// File-system operations a group transaction needs.
pub trait GroupFs: Send + Sync {
    /// The absolute path with `.`, `..` and symbolic links resolved; the file must exist.
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
    /// Identity and size of the file at `path` (following links).
    fn stat(&self, path: &Path) -> io::Result<FileId>;
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Takes the exclusive group lock at `path`; `Ok(None)` when another holder has it.
    fn lock_group(&self, path: &Path) -> io::Result<Option<LockGuard>>;
    /// Opens an existing qcow2 image for writing, alone (its backing chain is not needed to
    /// stage snapshots), with the image locks QEMU uses.
    fn open_image(&self, path: &Path) -> qcow2::Result<Image>;
    /// Opens a new overlay for a live disk as [`GroupFs::open_image`] does, around the host page
    /// cache when the disk's top image is (`direct_io`), so the disk keeps its cache mode.
    fn open_overlay(&self, path: &Path, direct_io: bool) -> qcow2::Result<Image> {
        let _ = direct_io;
        self.open_image(path)
    }
    /// Opens an existing qcow2 image read-only, alone (to read its bitmaps).
    fn open_read_only(&self, path: &Path) -> qcow2::Result<Image>;
    /// Opens an overlay read-only over its backing file opened writable, to merge the overlay
    /// into it (`Image::commit`).
    fn open_for_commit(&self, path: &Path) -> qcow2::Result<Image>;
    /// Creates a new, empty file; fails if the name exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn Storage>>;
    /// Opens an existing file for reading and writing.
    fn open_existing(&self, path: &Path) -> io::Result<Box<dyn Storage>>;
    /// Opens a file for reading and writing, creating it empty when missing.
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn Storage>>;
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The first `len` bytes of a file (less when it is shorter): a header, without reading the
    /// whole image.
    fn read_prefix(&self, path: &Path, len: usize) -> io::Result<Vec<u8>> {
        let mut bytes = self.read(path)?;
        bytes.truncate(len);
        Ok(bytes)
    }
    /// Replaces a file's content (creating it) and makes the content durable.
    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Renames a file, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file name.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Whether an image could be taken for writing by this process: `Ok(Err(why))` when another
    /// process holds it (QEMU keeps a shared lock on every image and backing file it has open).
    /// Checked before an image is deleted. The recording file system has no other processes.
    fn probe_unused(&self, _path: &Path) -> io::Result<Result<(), String>> {
        Ok(Ok(()))
    }
    /// A new group's secret: 16 unpredictable bytes. The recording file system makes it fixed,
    /// so a crash test or fuzz input replays the same way and can bind journals to its group.
    fn new_group_secret(&self) -> [u8; 16] {
        random_bytes()
    }
    /// Makes a directory's entries (created, renamed, removed names) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes free for an unprivileged writer on the file system holding `path`, when known.
    fn free_space(&self, _path: &Path) -> Option<u64> {
        None
    }
    /// Whether a name exists.
    fn exists(&self, path: &Path) -> bool {
        self.stat(path).is_ok()
    }
    /// Marks a named point of a transaction in the operation log (recording file systems only).
    fn event(&self, _name: &str) {}
    /// Whether images may be staged from several threads at once. A recording file system
    /// says no, so its operation log is the same on every run.
    fn parallel(&self) -> bool {
        true
    }
}

/// The host file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl GroupFs for RealFs {
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    fn stat(&self, path: &Path) -> io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            is_file: m.is_file(),
        })
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn lock_group(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        Ok(crate::lock::lock_group(path)?.map(|l| Box::new(l) as LockGuard))
    }

    fn open_image(&self, path: &Path) -> qcow2::Result<Image> {
        Image::open(
            path,
            &OpenOptions::default()
                .writable(true)
                .backing(BackingPolicy::Ignore),
        )
    }

    fn open_overlay(&self, path: &Path, direct_io: bool) -> qcow2::Result<Image> {
        Image::open(
            path,
            &OpenOptions::default()
                .writable(true)
                .backing(BackingPolicy::Ignore)
                .direct_io(direct_io),
        )
    }

    fn open_read_only(&self, path: &Path) -> qcow2::Result<Image> {
        let options = OpenOptions::default().backing(BackingPolicy::Ignore);
        Image::open(path, &options)
    }

    fn open_for_commit(&self, path: &Path) -> qcow2::Result<Image> {
        let options = OpenOptions::default().backing(BackingPolicy::Follow);
        let commit = qcow2::image::CommitOptions::default()
            .base_depth(1)
            .empty_top(false);
        Image::open_for_commit(path, &options, &commit)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::create_new(path)?))
    }

    fn open_existing(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_read_write(path)?))
    }

    // The group's own files (journal, manifest, lock) are never reached through a symlink:
    // a link planted in the group directory must not make a transaction write elsewhere.
    fn open_or_create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        Ok(Box::new(FileStorage::from_file(file, true)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut bytes = Vec::new();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn read_prefix(&self, path: &Path, len: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut bytes = Vec::with_capacity(len);
        std::fs::File::open(path)?
            .take(len as u64)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        // A fresh file (O_EXCL): whatever had the name, a file or a link, is replaced, never
        // written through.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn probe_unused(&self, path: &Path) -> io::Result<Result<(), String>> {
        // The probe's locks go away with its file when it returns.
        let mut probe = FileStorage::open_read_only(path)?;
        probe.lock_image(true)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn free_space(&self, path: &Path) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(path).ok()?;
        Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }
}

/// 16 unpredictable bytes: a group's secret, or a transaction's nonce.
pub fn random_bytes() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
