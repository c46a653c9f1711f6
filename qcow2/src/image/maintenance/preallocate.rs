//! Preallocation (`preallocation=metadata|falloc|full`) of the clusters of a guest range that has
//! none yet: a new image, or the area a resize adds. The layout is QEMU's, so `qemu-img map`
//! shows the same host offsets for our images as for its own:
//! - metadata: per L2 table, the table first, then its data clusters in one run;
//! - falloc and full: new refcount structures at the end of the file that cover everything to
//!   come (`Refcounts::refcount_area`), then every data cluster in one run (blocks reserved with
//!   `fallocate`, or zeros written), then the L2 tables first-fit (the first one usually where
//!   the old refcount table was).
//!
//! Crash safety follows the write path: the data clusters' refcounts reach the disk before the
//! L2 entries that use them, a new L2 table before its L1 entry. A cut leaves leaks at worst.

use crate::error::{Error, Result};
use crate::format::table::COPIED;
use crate::image::layer::Run;
use crate::image::{Image, Meta, Preallocation};

/// Zeros written per request for `preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;

impl Image {
    /// Preallocates guest range `[old_size, new_size)` (the clusters there must be unallocated,
    /// except a partly used cluster at `old_size`, which is left as it is unless it reads as
    /// zeros of its own).
    pub(crate) fn preallocate(
        &self,
        old_size: u64,
        new_size: u64,
        mode: Preallocation,
    ) -> Result<()> {
        let mut m = self.meta_mut();
        // A new image: QEMU names the backing file only after preallocating, so nothing below
        // needs covering.
        self.preallocate_locked(&mut m, old_size, new_size, mode, false)?;
        self.flush_all(&mut m)
    }

    /// `cover_backing`: the new area must hide a backing file that reaches into it, so
    /// preallocated data clusters mark their subclusters allocated (QEMU zeroes them then);
    /// otherwise subclusters stay unallocated, as QEMU leaves them.
    pub(crate) fn preallocate_locked(
        &self,
        m: &mut Meta,
        old_size: u64,
        new_size: u64,
        mode: Preallocation,
        cover_backing: bool,
    ) -> Result<()> {
        if mode == Preallocation::Off || new_size <= old_size {
            return Ok(());
        }
        let cs = m.header.cluster_size();
        let mut first = old_size / cs;
        if old_size % cs != 0 {
            // A partly used cluster that reads as zeros of its own (the resize just zeroed its
            // tail) is preallocated like the rest, as QEMU does; one holding data stays.
            let (run, len) = self.lookup(m, m.active(), first * cs, cs)?;
            let backing_end = self.backing.as_ref().map_or(0, |b| b.size());
            let zeros = match run {
                Run::Unallocated => backing_end <= first * cs,
                Run::Zero { host_offset: None } => len >= cs,
                _ => false,
            };
            if !zeros {
                first += 1;
            }
        }
        let end = new_size.div_ceil(cs);
        if first >= end {
            return Ok(());
        }
        self.mark_dirty(m)?;
        if m.header.has_external_data_file() {
            // Data lives in the data file at its guest offset: only the L2 tables are
            // allocated here (the caller reserves or writes the data file's space).
            return self.preallocate_external(m, first, end);
        }
        match mode {
            Preallocation::Metadata => self.preallocate_metadata(m, first, end, cover_backing),
            Preallocation::Falloc => self.preallocate_data(m, first, end, false, cover_backing),
            Preallocation::Full => self.preallocate_data(m, first, end, true, cover_backing),
            Preallocation::Off => Ok(()),
        }
    }

    /// Guest clusters `[first, end)`: per L2 table, the table, then its data clusters. Over a
    /// backing file to hide, their subclusters read as zeros (QEMU sets the zero bits).
    fn preallocate_metadata(
        &self,
        m: &mut Meta,
        first: u64,
        end: u64,
        cover_backing: bool,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let bitmap = if m.header.extended_l2() && cover_backing {
            0xFFFF_FFFF_0000_0000
        } else {
            0
        };
        let per_l2 = 1u64 << m.header.l2_bits();
        let mut k = first;
        while k < end {
            let span_end = ((k / per_l2) + 1) * per_l2;
            let n = span_end.min(end) - k;
            self.ensure_l2(m, k * cs)?;
            let host = self.alloc(m, n)?;
            for i in 0..n {
                self.link_cluster(m, (k + i) * cs, (host + i * cs) | COPIED, bitmap)?;
            }
            self.keep_cache_bounded(m)?;
            k = span_end;
        }
        self.extend_file_to_allocation(m)
    }

    /// Guest clusters `[first, end)` of an image with a data file: L2 tables, with every entry
    /// the cluster's own guest offset.
    fn preallocate_external(&self, m: &mut Meta, first: u64, end: u64) -> Result<()> {
        let cs = m.header.cluster_size();
        let per_l2 = 1u64 << m.header.l2_bits();
        let mut k = first;
        while k < end {
            let span_end = ((k / per_l2) + 1) * per_l2;
            self.ensure_l2(m, k * cs)?;
            for c in k..span_end.min(end) {
                self.link_cluster(m, c * cs, (c * cs) | COPIED, 0)?;
            }
            self.keep_cache_bounded(m)?;
            k = span_end;
        }
        Ok(())
    }

    /// Guest clusters `[first, end)`: new refcount structures, the data run, then the L2 tables.
    fn preallocate_data(
        &self,
        m: &mut Meta,
        first: u64,
        end: u64,
        zeros: bool,
        cover_backing: bool,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let n_data = end - first;
        // One more L2 table than whole spans: the range need not start at a span's start.
        let n_l2 = n_data.div_ceil(1u64 << m.header.l2_bits()) + 1;
        let host = self.host();
        let file_end = m.file_len.div_ceil(cs);
        let ws = m.ws_mut()?;
        // The new structures start after the last cluster in use (QEMU's view of the file end).
        let mut last = ws.alloc_end.max(file_end);
        while last > 0 && ws.refcounts.get(host, last - 1)? == 0 {
            last -= 1;
        }
        let mut alloc_end = ws.alloc_end;
        let (start, _) = ws
            .refcounts
            .refcount_area(host, last, n_data + n_l2, &mut alloc_end)?;
        ws.refcounts.adjust(host, start * cs, n_data * cs, 1)?;
        ws.alloc_end = alloc_end.max(start + n_data);
        m.file_len = m.file_len.max((start + n_data) * cs);
        self.reftable_moved(m)?;
        let (at, len) = (start * cs, n_data * cs);
        self.guard(m, at, len, None)?;
        if zeros {
            let chunk = vec![0u8; ZERO_CHUNK.min(len) as usize];
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(ZERO_CHUNK) as usize;
                self.host()
                    .write(&chunk[..n], at + pos, "preallocated zeros")?;
                pos += n as u64;
            }
        } else {
            self.storage
                .allocate(at, len)
                .map_err(|e| Error::io(&self.name, "reserving space for preallocated data", e))?;
        }
        // Subclusters stay unallocated (reading zeros, or the backing file), unless a backing
        // file must be hidden.
        let bitmap = if m.header.extended_l2() && cover_backing {
            0xFFFF_FFFF
        } else {
            0
        };
        for i in 0..n_data {
            self.link_cluster(m, (first + i) * cs, (at + i * cs) | COPIED, bitmap)?;
            if i % 4096 == 4095 {
                self.keep_cache_bounded(m)?;
            }
        }
        Ok(())
    }

    /// Grows the file to cover every allocated cluster.
    fn extend_file_to_allocation(&self, m: &mut Meta) -> Result<()> {
        let end = m.ws()?.alloc_end * m.header.cluster_size();
        if self
            .storage
            .len()
            .map_err(|e| Error::io(&self.name, "reading the file length", e))?
            < end
        {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io(&self.name, "extending the file", e))?;
        }
        m.file_len = m.file_len.max(end);
        Ok(())
    }
}
