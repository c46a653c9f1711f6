//! `std::io` over a virtual disk: [`DiskCursor`] implements [`Read`] and [`Seek`] for an image or
//! a snapshot view, and [`Write`] for a writable image, so `std::io::copy`, hashers and archive
//! writers take a disk as they take a file.
//!
//! ```
//! use std::io::{Read, Seek, SeekFrom, Write};
//! use qcow2::{CreateOptions, DiskCursor, Image, MemoryStorage};
//!
//! let options = CreateOptions::new(1 << 20);
//! let image = Image::create_in(Box::new(MemoryStorage::new()), "mem", &options)?;
//! let mut disk = DiskCursor::new(&image);
//! disk.seek(SeekFrom::Start(4096))?;
//! disk.write_all(b"hello")?;
//! disk.seek(SeekFrom::Start(4096))?;
//! let mut back = [0u8; 5];
//! disk.read_exact(&mut back)?;
//! assert_eq!(&back, b"hello");
//! // Reads stop at the end of the disk, like a file's.
//! disk.seek(SeekFrom::End(-2))?;
//! assert_eq!(disk.read(&mut [0u8; 16])?, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Deref;
use std::sync::Arc;

use crate::image::{Image, SnapshotView};

/// A virtual disk that can be read at any offset: an [`Image`] or a [`SnapshotView`].
pub trait Disk {
    /// The virtual size in bytes.
    fn disk_size(&self) -> u64;
    /// Fills `buf` with the guest bytes at `offset` (within the disk).
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> crate::Result<()>;
}

impl Disk for Image {
    fn disk_size(&self) -> u64 {
        self.size()
    }
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.read_at(buf, offset)
    }
}

impl Disk for SnapshotView<'_> {
    fn disk_size(&self) -> u64 {
        self.size()
    }
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.read_at(buf, offset)
    }
}

impl<T: Disk + ?Sized> Disk for &T {
    fn disk_size(&self) -> u64 {
        (**self).disk_size()
    }
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        (**self).read_disk(buf, offset)
    }
}

impl<T: Disk + ?Sized> Disk for Arc<T> {
    fn disk_size(&self) -> u64 {
        (**self).disk_size()
    }
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        (**self).read_disk(buf, offset)
    }
}

/// A position on a [`Disk`], with `std::io`'s traits. Writing needs a disk that derefs to an
/// [`Image`] (`&Image`, `Arc<Image>`); a write past the end of the disk is an error, as on a
/// block device.
#[derive(Debug, Clone)]
pub struct DiskCursor<D> {
    disk: D,
    pos: u64,
}

impl<D: Disk> DiskCursor<D> {
    /// A cursor at offset 0.
    pub fn new(disk: D) -> Self {
        DiskCursor { disk, pos: 0 }
    }

    /// The current offset.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The disk, back.
    pub fn into_inner(self) -> D {
        self.disk
    }
}

impl<D: Disk> Read for DiskCursor<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.disk.disk_size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk.read_disk(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: Disk> Seek for DiskCursor<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.disk.disk_size().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

impl<D: Disk + Deref<Target = Image>> Write for DiskCursor<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.disk.disk_size().saturating_sub(self.pos);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "a write at the end of the disk",
            ));
        }
        let n = (buf.len() as u64).min(left) as usize;
        self.disk.write_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.disk.flush()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, MemoryStorage};

    fn image() -> Image {
        let options = CreateOptions {
            size: 3 * 65536 + 100,
            ..CreateOptions::default()
        };
        Image::create_in(Box::new(MemoryStorage::new()), "mem", &options).unwrap()
    }

    #[test]
    fn io_copy_reads_the_whole_disk_and_writes_stop_at_its_end() {
        let img = image();
        let mut w = DiskCursor::new(&img);
        w.seek(SeekFrom::End(-10)).unwrap();
        assert_eq!(w.write(&[7u8; 64]).unwrap(), 10);
        assert_eq!(w.write(&[1]).unwrap_err().kind(), io::ErrorKind::WriteZero);
        let mut out = Vec::new();
        let n = io::copy(&mut DiskCursor::new(&img), &mut out).unwrap();
        assert_eq!(n, img.size());
        assert_eq!(&out[out.len() - 10..], &[7u8; 10]);
        assert!(out[..out.len() - 10].iter().all(|&b| b == 0));
        assert!(DiskCursor::new(&img).seek(SeekFrom::Current(-1)).is_err());
    }

    #[test]
    fn a_snapshot_view_reads_as_it_was() {
        let img = image();
        img.write_at(&[1u8; 512], 0).unwrap();
        img.create_snapshot("s", crate::format::SnapshotTime::default())
            .unwrap();
        img.write_at(&[2u8; 512], 0).unwrap();
        let view = img.open_snapshot("s").unwrap();
        let mut first = [0u8; 512];
        DiskCursor::new(&view).read_exact(&mut first).unwrap();
        assert_eq!(first, [1u8; 512]);
    }

    #[test]
    fn engine_errors_keep_their_io_kind() {
        let e = crate::Error::io("x", "reading", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
        let e = crate::Error::ReadOnly { image: "x".into() };
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
    }
}
