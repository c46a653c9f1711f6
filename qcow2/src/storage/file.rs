//! The file backend: pread/pwrite on a `std::fs::File`, opened read-only or read-write, through
//! the page cache or around it (`direct`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::direct::DirectIo;
use super::Storage;

/// A host file accessed with positioned reads and writes.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
    locked: bool,
    /// Whether anything was written since the last sync: a sync with nothing new to make
    /// durable is skipped (on a busy host it still costs milliseconds).
    unsynced: AtomicBool,
    /// How [`Storage::write_zeroes`] makes zeros: the first of [`ZEROING_MODES`] the file system
    /// has not refused yet (past them all, by writing). A refusal is remembered, so it costs
    /// one failed call per file, not one per write.
    zeroing: AtomicU8,
    /// Syncs are skipped (QEMU's `cache=unsafe`).
    skip_syncs: bool,
    /// Set when the file is open with `O_DIRECT`: requests then go through it aligned.
    direct: Option<DirectIo>,
}

/// The `fallocate` modes that make a range read as zeros, cheapest first: `ZERO_RANGE` keeps
/// the blocks (as unwritten extents), a punched hole frees them. Past these, zeros are written.
const ZEROING_MODES: [FallocateFlags; 2] = [
    FallocateFlags::FALLOC_FL_ZERO_RANGE,
    FallocateFlags::FALLOC_FL_PUNCH_HOLE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE),
];

/// Errors by which a file system says it does not offer an `fallocate` mode.
fn refuses(e: Errno) -> bool {
    matches!(e, Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL)
}

impl FileStorage {
    fn new(file: File, writable: bool) -> Self {
        FileStorage {
            file,
            writable,
            locked: false,
            // Writes made through other handles before this one existed are not known here.
            unsynced: AtomicBool::new(writable),
            zeroing: AtomicU8::new(0),
            skip_syncs: false,
            direct: None,
        }
    }

    /// Opens an existing file read-only.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Ok(Self::new(File::open(path)?, false))
    }

    /// Opens an existing file for reading and writing.
    pub fn open_read_write(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self::new(file, true))
    }

    /// Creates a new file; fails if it exists, so an existing image is never clobbered.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self::new(file, true))
    }

    /// Wraps an already opened file.
    pub fn from_file(file: File, writable: bool) -> Self {
        Self::new(file, writable)
    }

    /// Makes [`Storage::flush`] a no-op (QEMU's `cache=unsafe`): writes stay in the page cache
    /// until the kernel writes them back, so a crash or power cut may lose or tear any of them.
    pub fn set_skip_syncs(&mut self, skip: bool) {
        self.skip_syncs = skip;
    }

    /// Reads and writes around the host page cache (`O_DIRECT`; QEMU's `cache.direct=on`): data
    /// goes to the device without filling the cache, and a writer that outruns the device waits
    /// for it rather than being paused by the kernel's dirty-page throttling. Requests that are
    /// not aligned to the device's logical block (probed as QEMU probes it; see
    /// [`FileStorage::direct_align`]) go through a bounce buffer, and a write that ends in part
    /// of a block past the end of the file grows it to that block's end, as QEMU's does. Syncs
    /// are still needed for durability. Fails with `InvalidInput` where the file system does
    /// not offer direct I/O (tmpfs before Linux 6.6).
    pub fn set_direct_io(&mut self, on: bool) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_retain(fcntl(&self.file, FcntlArg::F_GETFL)?);
        let wanted = if on {
            flags | OFlag::O_DIRECT
        } else {
            flags - OFlag::O_DIRECT
        };
        if wanted != flags {
            fcntl(&self.file, FcntlArg::F_SETFL(wanted)).map_err(|e| {
                if e == Errno::EINVAL {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the file system does not support direct I/O (O_DIRECT)",
                    )
                } else {
                    e.into()
                }
            })?;
        }
        self.direct = on.then(|| DirectIo::probe(&self.file));
        Ok(())
    }

    /// The block direct requests are aligned to (the device's logical block, as probed), or
    /// `None` without direct I/O.
    pub fn direct_align(&self) -> Option<u64> {
        self.direct.as_ref().map(DirectIo::align)
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Takes the image locks QEMU uses (shared OFD byte-range locks), for reading or writing.
    /// `Ok(Err(why))` means another process holds the image in a conflicting way.
    pub fn lock_image(&mut self, writable: bool) -> io::Result<Result<(), String>> {
        let result = super::lock::lock_image(&self.file, writable)?;
        self.locked = result.is_ok();
        Ok(result)
    }

    /// Makes `[offset, offset + len)` read as zeros the cheapest way the file system has not
    /// refused.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        if n == 0 {
            return Ok(());
        }
        let mode = loop {
            let way = self.zeroing.load(Ordering::Relaxed);
            let Some(&mode) = ZEROING_MODES.get(way as usize) else {
                return super::write_zero_bytes(self, offset, len);
            };
            match fallocate(&self.file, mode, at, n) {
                Ok(()) => break mode,
                Err(e) if refuses(e) => {
                    // Concurrent callers may both be refused; the next way is tried once.
                    let _ = self.zeroing.compare_exchange(
                        way,
                        way + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => return Err(e.into()),
            }
        };
        // A write grows the file to cover the range; KEEP_SIZE does not.
        if mode.contains(FallocateFlags::FALLOC_FL_KEEP_SIZE) && self.len()? < offset + len {
            self.file.set_len(offset + len)?;
        }
        Ok(())
    }

    fn require_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the file is open read-only",
            ))
        }
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        if self.locked {
            super::lock::unlock_image(&self.file);
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if let Some(direct) = &self.direct {
            return direct.read(&self.file, buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.require_writable()?;
        // Marked once complete: a flush that started earlier need not cover it, a later one must.
        let result = match &self.direct {
            Some(direct) => direct.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        };
        self.unsynced.store(true, Ordering::Release);
        result
    }

    fn flush(&self) -> io::Result<()> {
        // A write that completes after the swap sets the flag again for the next flush.
        if self.writable && !self.skip_syncs && self.unsynced.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.unsynced.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn hole_at(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        use nix::unistd::{lseek, Whence};
        let Ok(at) = i64::try_from(offset) else {
            return Ok(None);
        };
        let data = match lseek(&self.file, at, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data at or after `offset`: the rest of the file, and past it, is a hole.
            Err(nix::errno::Errno::ENXIO) => return Ok(Some((true, len))),
            // A file system that cannot tell: everything is data.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data > offset {
            return Ok(Some((true, (data - offset).min(len))));
        }
        let hole = match lseek(&self.file, at, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(nix::errno::Errno::ENXIO) => return Ok(Some((true, len))),
            Err(e) => return Err(e.into()),
        };
        // Data at `offset` means the hole starts later: at least one byte of data.
        Ok(Some((false, hole.saturating_sub(offset).max(1).min(len))))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.require_writable()?;
        let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, mode, at, n) {
            // A file system without holes keeps the blocks; nothing depends on their going.
            Err(e) if refuses(e) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn identity(&self) -> Option<super::FileIdentity> {
        super::FileIdentity::of(&self.file).ok()
    }

    fn is_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.require_writable()?;
        let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // fallocate mode 0: blocks reserved (unwritten, reading as zeros), size grown to cover.
        let result = nix::fcntl::fallocate(&self.file, nix::fcntl::FallocateFlags::empty(), at, n)
            .map_err(io::Error::from);
        self.unsynced.store(true, Ordering::Release);
        result
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.require_writable()?;
        let result = self.zero_range(offset, len);
        self.unsynced.store(true, Ordering::Release);
        result
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.require_writable()?;
        let result = self.file.set_len(len);
        self.unsynced.store(true, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    /// A file of `len` bytes of 0xee in `dir`, unique to `name`.
    fn filled(dir: &Path, name: &str, len: usize) -> (std::path::PathBuf, FileStorage) {
        let path = dir.join(format!("qcow2-zeroing-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = FileStorage::create_new(&path).unwrap();
        store.write_at(&vec![0xee; len], 0).unwrap();
        (path, store)
    }

    /// Zeroes 10000 bytes at 5000 of a 12000-byte file: the range reads as zeros, the bytes
    /// around it stay, and the file grows to the range's end as a write would.
    fn zeroes_a_range_and_grows(store: &FileStorage) {
        store.write_zeroes(5000, 10_000).unwrap();
        assert_eq!(store.len().unwrap(), 15_000);
        let mut got = vec![0u8; 15_000];
        store.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..5000].iter().all(|&b| b == 0xee));
        assert!(got[5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn zeroing_asks_the_file_system_and_grows_the_file_like_a_write() {
        let (path, store) = filled(&std::env::temp_dir(), "fs", 12_000);
        zeroes_a_range_and_grows(&store);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_refused_zeroing_mode_is_remembered_and_the_next_one_used() {
        // tmpfs punches holes but has no ZERO_RANGE.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let (path, store) = filled(shm, "tmpfs", 12_000);
        zeroes_a_range_and_grows(&store);
        assert_eq!(
            store.zeroing.load(Ordering::Relaxed),
            1,
            "ZERO_RANGE refused"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn past_every_fallocate_mode_zeros_are_written() {
        let (path, store) = filled(&std::env::temp_dir(), "write", 12_000);
        store
            .zeroing
            .store(ZEROING_MODES.len() as u8, Ordering::Relaxed);
        zeroes_a_range_and_grows(&store);
        std::fs::remove_file(path).unwrap();
    }
}
