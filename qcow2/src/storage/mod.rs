//! Positioned I/O under the engine. Everything above this module reaches image bytes only through
//! [`Storage`], so tests and the fuzzer swap in memory and recording backends. The
//! recording store (`recording`, simulated power cuts) needs the `testing` feature.

mod direct;
mod file;
mod lock;
mod memory;
#[cfg(any(test, feature = "testing"))]
pub mod recording;

pub use direct::DIRECT_ALIGN;
pub use file::FileStorage;
pub use memory::MemoryStorage;
#[cfg(any(test, feature = "testing"))]
pub use recording::RecordingStorage;

/// The write unit disks promise to land whole (a header switch fits in one).
pub(crate) const SECTOR: u64 = 512;

use std::io;

/// Reads from bytes held in memory as [`Storage::read_at`] reads from a store: up to `buf.len()`
/// bytes at `offset`, fewer at the end, none past it. For in-memory stores and test doubles.
pub fn read_from_bytes(bytes: &[u8], buf: &mut [u8], offset: u64) -> usize {
    let Ok(start) = usize::try_from(offset) else {
        return 0;
    };
    if start >= bytes.len() {
        return 0;
    }
    let n = buf.len().min(bytes.len() - start);
    buf[..n].copy_from_slice(&bytes[start..start + n]);
    n
}

/// A point in the engine's work that the store under it is told of, named as QEMU's blkdebug
/// names it: a fault-injecting store arms its rules on these, as blkdebug does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An L2 table is about to be read from the store (a cache miss).
    L2Load,
    /// Guest data is about to be read from the image file.
    ReadAio,
    /// Guest data is about to be written to the image file.
    WriteAio,
    /// A cached L2 table is about to be written back.
    L2Update,
    /// Entries of the active L1 table are about to be written.
    L1Update,
    /// Cached refcount blocks are about to be written back.
    RefblockUpdate,
    /// Host clusters are about to be allocated.
    ClusterAlloc,
    /// References to host clusters are about to be dropped.
    ClusterFree,
    /// An image is about to be emptied (its clusters dropped, as commit does to the top).
    EmptyImagePrepare,
}

impl Event {
    /// QEMU's name for the event (`l2_load`, `read_aio`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Event::L2Load => "l2_load",
            Event::ReadAio => "read_aio",
            Event::WriteAio => "write_aio",
            Event::L2Update => "l2_update",
            Event::L1Update => "l1_update",
            Event::RefblockUpdate => "refblock_update",
            Event::ClusterAlloc => "cluster_alloc",
            Event::ClusterFree => "cluster_free",
            Event::EmptyImagePrepare => "empty_image_prepare",
        }
    }
}

/// A byte-addressed store: a file, a memory buffer, or a test double.
///
/// `read_at` returns fewer bytes than asked only at the end of the store; writes past the end extend
/// it. Implementations are shared between threads.
pub trait Storage: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (short only at EOF).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves host space for `[offset, offset + len)`, growing the store to its end if shorter,
    /// as `preallocation=falloc` asks. A store that cannot reserve space only grows.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }
    /// Makes `[offset, offset + len)` read as zeros, growing the store to its end if shorter, as
    /// a write of zeros does (and ordered, and made durable by [`flush`](Self::flush), like one).
    /// A file asks the file system instead of writing (`fallocate`); other stores write zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_bytes(self, offset, len)
    }
    /// Whether the store is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Whether the bytes at `offset` lie in a hole of the host file: `Some((true, n))` when the
    /// first `n` bytes (at most `len`) are a hole and read as zeros, `Some((false, n))` when they
    /// hold data, `None` when the store cannot tell (then everything counts as data). A file
    /// answers with `SEEK_DATA`/`SEEK_HOLE`, as QEMU asks it.
    fn hole_at(&self, _offset: u64, _len: u64) -> io::Result<Option<(bool, u64)>> {
        Ok(None)
    }
    /// Gives the host blocks of `[offset, offset + len)` back to the file system, for space the
    /// image no longer uses (its bytes become undefined; the length stays). A store that cannot
    /// keeps them.
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Bytes the host file system holds for the store (`st_blocks`), `None` when it cannot
    /// tell: with the length, what says how sparse the file is.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// The engine is about to do what `event` names; stores that do not watch ignore it.
    fn event(&self, _event: Event) {}
    /// The host file behind the store, if it is one: what tells two names of one file apart
    /// from two files (symlinks, hard links, `..`).
    fn identity(&self) -> Option<FileIdentity> {
        None
    }
    /// Whether requests bypass the host page cache (a file open for direct I/O).
    fn is_direct_io(&self) -> bool {
        false
    }
}

/// Writes zeros over `[offset, offset + len)` through [`Storage::write_at`], a bounded buffer
/// at a time: what [`Storage::write_zeroes`] does where nothing cheaper is offered.
pub(crate) fn write_zero_bytes<S: Storage + ?Sized>(
    store: &S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    /// Large zeroings go out in pieces of this size, so the buffer stays small.
    const ZERO_CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        store.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// A host file's identity: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// `st_dev` of the file.
    pub device: u64,
    /// `st_ino` of the file.
    pub inode: u64,
}

impl FileIdentity {
    /// The identity of an open file.
    pub fn of(file: &std::fs::File) -> io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileIdentity {
            device: m.dev(),
            inode: m.ino(),
        })
    }
}

/// Helpers every backend gets.
pub trait StorageExt: Storage {
    /// Reads exactly `buf.len()` bytes or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset:#x} run past the end of the file",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes; whatever lies past the end reads as zeros (as a host file behaves
    /// under QEMU).
    fn read_zero_filled_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

/// Forwards every `Storage` method through a smart pointer. One list for `Box` and `Arc`: a
/// method missing from a hand-written copy silently falls back to its default (as `hole_at`
/// once did, so a wrapped file counted every hole as data).
macro_rules! forward_storage {
    ($($ptr:ident)::+) => {
        impl<S: Storage + ?Sized> Storage for $($ptr)::+<S> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).allocate(offset, len)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn hole_at(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
                (**self).hole_at(offset, len)
            }
            fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).punch_hole(offset, len)
            }
            fn allocated_size(&self) -> io::Result<Option<u64>> {
                (**self).allocated_size()
            }
            fn event(&self, event: Event) {
                (**self).event(event)
            }
            fn identity(&self) -> Option<FileIdentity> {
                (**self).identity()
            }
            fn is_direct_io(&self) -> bool {
                (**self).is_direct_io()
            }
        }
    };
}

forward_storage!(Box);
forward_storage!(std::sync::Arc);
