//! The file backend: pread/pwrite on a `std::fs::File`, opened read-only or read-write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Syncs are skipped (QEMU's `cache=unsafe`).
    skip_syncs: bool,
}

impl FileStorage {
    /// Opens an existing file read-only.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: File::open(path)?,
            writable: false,
            locked: false,
            unsynced: AtomicBool::new(false),
            skip_syncs: false,
        })
    }

    /// Opens an existing file for reading and writing.
    pub fn open_read_write(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: OpenOptions::new().read(true).write(true).open(path)?,
            writable: true,
            locked: false,
            unsynced: AtomicBool::new(true),
            skip_syncs: false,
        })
    }

    /// Creates a new file; fails if it exists, so an existing image is never clobbered.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?,
            writable: true,
            locked: false,
            unsynced: AtomicBool::new(true),
            skip_syncs: false,
        })
    }

    /// Wraps an already opened file.
    pub fn from_file(file: File, writable: bool) -> Self {
        FileStorage {
            file,
            writable,
            locked: false,
            // Writes made through other handles before this one existed are not known here.
            unsynced: AtomicBool::new(true),
            skip_syncs: false,
        }
    }

    /// Makes [`Storage::flush`] a no-op (QEMU's `cache=unsafe`): writes stay in the page cache
    /// until the kernel writes them back, so a crash or power cut may lose or tear any of them.
    pub fn set_skip_syncs(&mut self, skip: bool) {
        self.skip_syncs = skip;
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
        let result = self.file.write_all_at(buf, offset);
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

    fn identity(&self) -> Option<super::FileIdentity> {
        super::FileIdentity::of(&self.file).ok()
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

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.require_writable()?;
        let result = self.file.set_len(len);
        self.unsynced.store(true, Ordering::Release);
        result
    }
}
