//! Guest disks without a format: a raw-format node over a host file (optionally limited to
//! its first `size` bytes, as QEMU's raw driver limits it), or a protocol node read directly
//! (a null node). Reads past the end read as zeros; writes go through to the store.

use std::io;

use qcow2::storage::{Event, StorageExt};
use qcow2::{FileStorage, Storage};

use crate::io::open::Options;
use crate::source::{io_text, Guest, Region};

/// A raw guest disk over a store.
pub struct RawImage {
    store: Box<dyn Storage>,
    /// The driver QEMU would report for the node (`raw`, `null-co`).
    pub driver: String,
    pub writable: bool,
}

impl RawImage {
    /// A raw image over the host file at `path`, read and written around the page cache when
    /// `direct` (`cache.direct`).
    pub fn open(path: &std::path::Path, writable: bool, direct: bool) -> Result<RawImage, String> {
        let failed = |e: io::Error| format!("Could not open '{}': {}", path.display(), io_text(&e));
        let mut file = if writable {
            FileStorage::open_read_write(path)
        } else {
            FileStorage::open_read_only(path)
        }
        .map_err(failed)?;
        file.set_direct_io(direct).map_err(failed)?;
        Ok(RawImage::over(Box::new(file), "raw", writable))
    }

    /// A disk read and written straight through `store`, reported as `driver`.
    pub fn over(store: Box<dyn Storage>, driver: &str, writable: bool) -> RawImage {
        RawImage {
            store,
            driver: driver.to_owned(),
            writable,
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.store.write_at(buf, offset)
    }

    pub fn flush(&self) -> io::Result<()> {
        self.store.flush()
    }

    pub fn truncate(&self, size: u64) -> io::Result<()> {
        self.store.set_len(size)
    }

    /// Gives `[offset, offset + len)` back to the file system, as QEMU's file driver discards:
    /// a punched hole that reads zeros (a store without holes keeps the data; a discard
    /// promises nothing about what is read afterwards).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.punch_hole(offset, len)
    }

    pub fn size_now(&self) -> u64 {
        self.store.len().unwrap_or(0)
    }

    /// The host files behind the disk (none for a null node).
    pub fn files(&self) -> Vec<qcow2::storage::FileIdentity> {
        self.store.identity().into_iter().collect()
    }
}

impl Guest for RawImage {
    fn size(&self) -> u64 {
        self.size_now()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.store
            .read_zero_filled_at(buf, offset)
            .map_err(|e| io_text(&e))
    }
    /// What the store knows to read as zeros (a file's holes, a null node with
    /// `read-zeroes`) is zeros; the rest is data.
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        crate::source::store_regions(self.store.as_ref(), offset, len)
    }
}

/// A raw node's `offset` and `size` options: the window of its file the guest sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub offset: u64,
    pub size: Option<u64>,
}

impl Window {
    /// The window the raw-node options under `prefix` give, checked against the file's length
    /// as QEMU's raw driver checks it.
    pub fn from_options(o: &Options, prefix: &str, file_len: u64) -> Result<Window, String> {
        let size_of = |key: &str| -> Result<Option<u64>, String> {
            o.get(&format!("{prefix}{key}"))
                .map(|v| {
                    crate::size::parse_size(v)
                        .map_err(|_| format!("Parameter '{key}' expects a size"))
                })
                .transpose()
        };
        let offset = size_of("offset")?.unwrap_or(0);
        let size = size_of("size")?;
        if offset > file_len {
            return Err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({file_len})"
            ));
        }
        if let Some(size) = size {
            if file_len - offset < size {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
                ));
            }
            if size % 512 != 0 {
                return Err("Specified size is not multiple of 512".into());
            }
        }
        Ok(Window { offset, size })
    }
}

/// A raw format node as a store over its file: requests are passed on, each announced to the
/// file as QEMU's raw driver announces it (`read_aio`, `write_aio`, which a blkdebug file below
/// acts on). A window from the `offset` and `size` options limits what is reachable: reads
/// past its size fail with EINVAL and writes with ENOSPC, as QEMU's raw driver refuses them
/// (nothing outside the window is touched).
pub struct RawNode<S> {
    inner: S,
    window: Window,
}

impl<S: Storage> RawNode<S> {
    pub fn new(inner: S, window: Window) -> RawNode<S> {
        RawNode { inner, window }
    }

    /// The host offset of `[offset, offset + len)`, or the errno QEMU's raw driver fails with.
    fn place(&self, offset: u64, len: u64, write: bool) -> io::Result<u64> {
        if let Some(size) = self.window.size {
            if offset > size || len > size - offset {
                let errno = if write {
                    nix::libc::ENOSPC
                } else {
                    nix::libc::EINVAL
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        offset
            .checked_add(self.window.offset)
            .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EINVAL))
    }
}

impl<S: Storage> Storage for RawNode<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.len()?;
        let n = usize::try_from(len.saturating_sub(offset)).map_or(buf.len(), |n| n.min(buf.len()));
        let at = self.place(offset, n as u64, false)?;
        self.inner.event(Event::ReadAio);
        self.inner.read_at(&mut buf[..n], at)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.place(offset, buf.len() as u64, true)?;
        self.inner.event(Event::WriteAio);
        self.inner.write_at(buf, at)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        match self.window.size {
            Some(size) => Ok(size),
            None => Ok(self.inner.len()?.saturating_sub(self.window.offset)),
        }
    }
    /// A fixed window cannot grow past its size (a device of that size cannot either).
    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.window.size {
            Some(size) if len > size => Err(io::Error::from_raw_os_error(nix::libc::ENOSPC)),
            Some(_) => Ok(()),
            None => self.inner.set_len(len.saturating_add(self.window.offset)),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.place(offset, len, true)?;
        self.inner.event(Event::WriteAio);
        self.inner.write_zeroes(at, len)
    }
    fn hole_at(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        let len = len.min(self.len()?.saturating_sub(offset));
        let at = self.place(offset, len, false)?;
        self.inner.hole_at(at, len)
    }
    fn event(&self, event: Event) {
        self.inner.event(event)
    }
    fn identity(&self) -> Option<qcow2::storage::FileIdentity> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2::MemoryStorage;

    #[test]
    fn a_window_refuses_requests_past_its_size() {
        let file = MemoryStorage::new();
        file.write_at(&[7u8; 4096], 0).unwrap();
        let window = Window {
            offset: 512,
            size: Some(1024),
        };
        let w = RawNode::new(file, window);
        assert_eq!(w.len().unwrap(), 1024);
        let mut buf = [0u8; 2048];
        assert_eq!(w.read_at(&mut buf, 0).unwrap(), 1024);
        w.write_at(&[1u8; 512], 512).unwrap();
        let err = w.write_at(&[1u8; 512], 1000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC));
        assert_eq!(
            w.set_len(4096).unwrap_err().raw_os_error(),
            Some(nix::libc::ENOSPC)
        );
    }

    #[test]
    fn window_options_are_checked_against_the_file() {
        let o: Options = [("size".to_string(), "1000".to_string())].into();
        assert_eq!(
            Window::from_options(&o, "", 4096).unwrap_err(),
            "Specified size is not multiple of 512"
        );
        let o: Options = [("file.size".to_string(), "8192".to_string())].into();
        assert!(Window::from_options(&o, "file.", 4096)
            .unwrap_err()
            .starts_with("The sum of offset (0) and size (8192)"));
    }
}
