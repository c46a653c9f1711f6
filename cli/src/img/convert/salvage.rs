//! `convert --salvage`: a source whose reads or block-status queries fail is copied anyway, as
//! qemu-img does it. A failed block-status query is retried on shorter ranges down to one
//! sector, which then counts as data; a failed read is retried sector by sector, and sectors
//! that still fail read as zeros. Each sector given up on is warned about once.

use crate::source::{Guest, Region};

const SECTOR: u64 = 512;

/// A source read the salvaging way.
pub struct Salvage<'a> {
    inner: &'a dyn Guest,
    quiet: bool,
}

impl<'a> Salvage<'a> {
    pub fn new(inner: &'a dyn Guest, quiet: bool) -> Salvage<'a> {
        Salvage { inner, quiet }
    }

    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if !self.quiet {
            crate::report!("warning: {what}");
        }
    }

    /// Queries the whole disk once, as qemu-img's first pass (counting what it will copy)
    /// does: its block-status warnings come before the copy's.
    pub fn survey(&self, window: u64) {
        let size = self.size();
        let mut pos = 0;
        while pos < size {
            let len = window.min(size - pos);
            let _ = self.regions(pos, len);
            pos += len;
        }
    }
}

impl Guest for Salvage<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        if self.inner.read_errno(buf, offset).is_ok() {
            return Ok(());
        }
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = offset + i as u64 * SECTOR;
            if let Err(e) = self.inner.read_errno(sector, at) {
                self.warn(format_args!("error while reading offset {at}: {e}"));
                sector.fill(0);
            }
        }
        Ok(())
    }

    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let mut n = end - pos;
            loop {
                match self.inner.regions(pos, n) {
                    Ok(r) => {
                        out.extend(r);
                        break;
                    }
                    Err(e) if n <= SECTOR => {
                        self.warn(format_args!(
                            "error while reading block status at offset {pos}: {e}"
                        ));
                        out.push(Region {
                            start: pos,
                            length: n,
                            data: true,
                            below: false,
                        });
                        break;
                    }
                    // A quarter of the range (in whole sectors) at a time, as qemu-img retries.
                    Err(_) => n = (n.div_ceil(SECTOR).div_ceil(4) * SECTOR).min(n),
                }
            }
            pos += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of `size` bytes of 1s whose reads fail at `bad_read` and whose block status
    /// fails at `bad_status`.
    struct Flaky {
        size: u64,
        bad_read: u64,
        bad_status: u64,
    }

    impl Guest for Flaky {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
            if (offset..offset + buf.len() as u64).contains(&self.bad_read) {
                return Err("Input/output error".into());
            }
            buf.fill(1);
            Ok(())
        }
        fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
            if (offset..offset + len).contains(&self.bad_status) {
                return Err("Input/output error".into());
            }
            Ok(vec![Region {
                start: offset,
                length: len,
                data: false,
                below: false,
            }])
        }
    }

    #[test]
    fn failing_sectors_read_as_zeros_and_failing_status_as_data() {
        let flaky = Flaky {
            size: 1 << 20,
            bad_read: 4096 + 512,
            bad_status: 8192,
        };
        let s = Salvage::new(&flaky, true);
        let mut buf = vec![0u8; 8192];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4608].iter().all(|&b| b == 1));
        assert!(buf[4608..5120].iter().all(|&b| b == 0));
        assert!(buf[5120..].iter().all(|&b| b == 1));
        let regions = s.regions(0, 1 << 20).unwrap();
        let covered: u64 = regions.iter().map(|r| r.length).sum();
        assert_eq!(covered, 1 << 20);
        let data: Vec<_> = regions.iter().filter(|r| r.data).collect();
        assert_eq!(data.len(), 1);
        assert_eq!((data[0].start, data[0].length), (8192, 512));
    }
}
