//! Copy-on-read: a read that also copies what it finds below this image (the backing chain, or
//! nothing) into it, so later reads no longer need the layers below, as QEMU's `copy-on-read`
//! does. The request is widened to whole clusters (subclusters with extended L2); ranges this
//! image already allocates are only read, the others are read and written back: as zero
//! clusters when they read as zeros, else as data. Each copy is an ordinary allocating write
//! of the bytes just read (same ordering, same overlap guard), made under the writer's lock
//! together with its read, so no other write lands in between. It changes no guest-visible
//! byte, so dirty bitmaps are left as they are.

use crate::error::{Error, Result};
use crate::format::limits::SUBCLUSTERS_PER_CLUSTER;
use crate::image::layer::Run;
use crate::image::Image;

/// The most a single copy reads and writes (QEMU's bounce buffer limit), so memory stays
/// bounded however large the request.
const MAX_COPY: u64 = 16 << 20;

/// One request a copy-on-read read makes, reported to its observer before it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStep {
    /// Guest bytes read from the image (through the chain).
    Read {
        /// Guest offset of the first byte.
        offset: u64,
        /// Bytes read.
        len: u64,
    },
    /// Guest bytes written back into the image: the copy itself.
    Copy {
        /// Guest offset of the first byte.
        offset: u64,
        /// Bytes written.
        len: u64,
    },
}

impl Image {
    /// Reads guest bytes at `offset` into `buf`, copying what lies below this image into it.
    pub fn read_at_copying(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at_copying_observed(buf, offset, &|_| Ok(()))
    }

    /// As [`Image::read_at_copying`], reporting each request before it is made; an error from
    /// `observe` fails the read there (what QEMU's blkdebug does to a copy-on-read request).
    pub fn read_at_copying_observed(
        &self,
        buf: &mut [u8],
        offset: u64,
        observe: &dyn Fn(CopyStep) -> std::io::Result<()>,
    ) -> Result<()> {
        self.require_writable()?;
        let len = buf.len() as u64;
        self.check_bounds(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let _pass = self.write_pass()?;
        let mut m = self.meta_mut();
        let size = m.header.size;
        let cs = m.header.cluster_size();
        let grain = if m.header.extended_l2() {
            cs / SUBCLUSTERS_PER_CLUSTER as u64
        } else {
            cs
        };
        let end = offset + len;
        let observed = |step: CopyStep| {
            observe(step).map_err(|e| Error::io(&self.name, "copy-on-read request", e))
        };
        // The widened range stops at the end of the disk.
        let mut pos = offset - offset % grain;
        let stop = end.next_multiple_of(grain).min(size);
        while pos < stop {
            let (run, n) = self.lookup(&m, m.active(), pos, (stop - pos).min(MAX_COPY))?;
            // The part of the caller's request inside this run.
            let (from, to) = (pos.max(offset), (pos + n).min(end));
            let wanted = if from < to {
                (from - offset) as usize..(to - offset) as usize
            } else {
                0..0
            };
            if !matches!(run, Run::Unallocated | Run::UnallocatedAlloc { .. }) {
                if !wanted.is_empty() {
                    observed(CopyStep::Read {
                        offset: from,
                        len: to - from,
                    })?;
                    self.read_layer(&m, m.active(), &mut buf[wanted], from)?;
                }
                pos += n;
                continue;
            }
            observed(CopyStep::Read {
                offset: pos,
                len: n,
            })?;
            let mut copy = vec![0u8; n as usize];
            self.read_layer(&m, m.active(), &mut copy, pos)?;
            observed(CopyStep::Copy {
                offset: pos,
                len: n,
            })?;
            let written = if copy.iter().all(|&b| b == 0) {
                self.zero_range(&mut m, pos, n, false)
            } else {
                self.write_clusters_at(&mut m, &copy, pos)
            };
            if let Err(e) = written {
                if e.marks_image_corrupt() {
                    self.mark_corrupt(&mut m);
                }
                return Err(e);
            }
            if !wanted.is_empty() {
                let at = (from - pos) as usize;
                buf[wanted.clone()].copy_from_slice(&copy[at..at + wanted.len()]);
            }
            self.keep_cache_bounded(&mut m)?;
            pos += n;
        }
        Ok(())
    }
}
