//! Zero writes and discards: zero flags where the format has them (whole clusters, or
//! subclusters with extended L2 entries), zeros written as data where it does not, and clusters
//! given back to the file on discard or unmap.

use crate::crypto::SECTOR_SIZE;
use crate::error::{Error, Result};
use crate::format::limits::SUBCLUSTERS_PER_CLUSTER;
use crate::format::table::{classify_standard, ClusterMapping, COPIED, OFFSET_MASK, ZERO};
use crate::image::encryption::{sector_span, Encryption};
use crate::image::map::{Extent, ExtentKind};
use crate::image::{Image, Meta};

use super::write::ALL_ZEROES;

impl Image {
    /// Makes guest range `[offset, offset + len)` read as zeros: zero flags on v3 (freeing the
    /// host clusters with `unmap`), real zeros on v2 and for partial clusters.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.require_writable()?;
        match &self.encryption {
            Some(enc) => self.write_zeroes_in_sectors(enc, offset, len, unmap),
            None => self.write_zeroes_inner(offset, len, unmap),
        }
    }

    /// Zeroes on an encrypted image: parts of sectors as widened writes, whole sectors beside
    /// other whole-sector writes.
    fn write_zeroes_in_sectors(
        &self,
        enc: &Encryption,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
            // Parts of sectors become zeros through the widened write path; whole sectors
            // below get zero flags or encrypted zeros.
            self.check_bounds(offset, len, self.size())?;
            let (start, end) = sector_span(offset, len);
            let inner_start = if offset == start {
                start
            } else {
                start + SECTOR_SIZE
            };
            let inner_end = if offset + len == end {
                end
            } else {
                end - SECTOR_SIZE
            };
            if inner_start >= inner_end {
                let _alone = enc.widened_pass();
                return self.write_widened(&vec![0u8; len as usize], offset);
            }
            if offset < inner_start {
                let _alone = enc.widened_pass();
                self.write_widened(&vec![0u8; (inner_start - offset) as usize], offset)?;
            }
            if inner_end < offset + len {
                let _alone = enc.widened_pass();
                self.write_widened(&vec![0u8; (offset + len - inner_end) as usize], inner_end)?;
            }
            let _shared = enc.whole_sectors_pass();
            return self.write_zeroes_inner(inner_start, inner_end - inner_start, unmap);
        }
        let _shared = enc.whole_sectors_pass();
        self.write_zeroes_inner(offset, len, unmap)
    }

    /// Zeroes whole sectors of an encrypted image, or any range of a clear one.
    fn write_zeroes_inner(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _pass = self.write_pass()?;
        let mut m = self.meta_mut();
        self.check_bounds(offset, len, m.header.size)?;
        self.bitmaps_mark(&mut m, offset, len)?;
        self.zero_range(&mut m, offset, len, unmap)?;
        self.keep_cache_bounded(&mut m)
    }

    /// Makes `[offset, offset + len)` read as zeros (the range is checked by the caller; a resize
    /// also zeroes the area it is about to publish).
    pub(crate) fn zero_range(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let v3 = m.header.version >= 3;
        let extended = m.header.extended_l2();
        let external = m.header.has_external_data_file();
        let cs = m.header.cluster_size();
        let grain = if extended {
            cs / SUBCLUSTERS_PER_CLUSTER as u64
        } else {
            cs
        };
        let end = offset + len;
        if v3 && !external && extended {
            // QEMU zeroes the grain-aligned middle of a request in one go and writes it as
            // data when that touches part of a compressed cluster (which has no subclusters);
            // the unaligned head and tail are pieces of their own.
            let mid_start = offset.next_multiple_of(grain);
            let mid_end = if end >= m.header.size {
                end
            } else {
                end - end % grain
            };
            if mid_start < mid_end && (mid_start > offset || mid_end < end) {
                // Piece by piece, in order: the head may turn a compressed cluster into a
                // plain one before the middle is looked at.
                self.zero_range(m, offset, mid_start - offset, unmap)?;
                self.zero_range(m, mid_start, mid_end - mid_start, unmap)?;
                return self.zero_range(m, mid_end, end - mid_end, unmap);
            }
            if mid_start < mid_end && self.partly_compressed(m, mid_start, mid_end)? {
                return self.write_zero_data(m, mid_start, mid_end);
            }
        }
        let mut pos = offset;
        while pos < end {
            let cluster_start = pos & !(cs - 1);
            let chunk_end = (cluster_start + cs).min(end);
            let in_cluster = pos - cluster_start;
            // The part of this cluster made of whole grains (clusters, or subclusters).
            let g_start = in_cluster.next_multiple_of(grain);
            let g_end = {
                let e = chunk_end - cluster_start;
                // The end of the disk counts as a grain boundary.
                if cluster_start + e >= m.header.size {
                    e.next_multiple_of(grain)
                } else {
                    e - e % grain
                }
            };
            if !v3
                && !external
                && self.backing.is_none()
                && in_cluster == 0
                && g_end >= cs.min(m.header.size - cluster_start)
                && g_start == 0
            {
                // v2 has no zero flag, but with nothing below an unallocated cluster reads as
                // zeros: drop the cluster, as QEMU does.
                self.unmap_cluster(m, cluster_start)?;
                pos = chunk_end;
                continue;
            }
            if !v3 && !external && self.backing.is_none() {
                // v2 with nothing below: a part of a cluster that is not allocated reads as zeros
                // already; writing zeros there would only allocate it (QEMU leaves it too).
                let (run, n) = self.lookup(m, m.active(), pos, chunk_end - pos)?;
                if matches!(run, crate::image::layer::Run::Unallocated) && n >= chunk_end - pos {
                    pos = chunk_end;
                    continue;
                }
            }
            // A part of a grain whose other bytes already read as zeros through the chain
            // becomes a zeroed grain, not zeros written as data (QEMU widens such requests the
            // same way, asking the whole chain).
            let (mut g_start, mut g_end) = (g_start, g_end);
            if v3 && !external {
                let head = in_cluster - in_cluster % grain;
                if head < g_start
                    && self.reads_zero_by_status(m, cluster_start + head, in_cluster - head)?
                {
                    g_start = head;
                }
                let request_end = chunk_end - cluster_start;
                let tail_end = request_end.next_multiple_of(grain).min(cs);
                if g_end < request_end
                    && self.reads_zero_by_status(m, chunk_end, tail_end - request_end)?
                {
                    g_end = tail_end;
                }
            }
            if !v3 || external || g_start >= g_end {
                let zeros = vec![0u8; (chunk_end - pos) as usize];
                self.write_cluster(m, pos, &zeros)?;
                pos = chunk_end;
                continue;
            }
            if g_start > in_cluster {
                let zeros = vec![0u8; (g_start - in_cluster) as usize];
                self.write_cluster(m, pos, &zeros)?;
            }
            self.zero_grains(m, cluster_start, g_start, g_end.min(cs), unmap)?;
            let tail_start = cluster_start + g_end;
            if tail_start < chunk_end {
                let zeros = vec![0u8; (chunk_end - tail_start) as usize];
                self.write_cluster(m, tail_start, &zeros)?;
            }
            pos = chunk_end;
        }
        Ok(())
    }

    /// Whether the first or last cluster of `[start, end)` is compressed and only partly inside
    /// the range.
    fn partly_compressed(&self, m: &Meta, start: u64, end: u64) -> Result<bool> {
        let cs = m.header.cluster_size();
        let disk_end = m.header.size;
        for (at, partial) in [
            (
                start,
                start % cs != 0 || (end < start - start % cs + cs && end < disk_end),
            ),
            (end - 1, end % cs != 0 && end < disk_end),
        ] {
            if partial {
                let (run, _) = self.lookup(m, m.active(), at, 1)?;
                if matches!(run, crate::image::layer::Run::Compressed { .. }) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Writes zeros as data over `[start, end)`, a cluster at a time (new clusters from one
    /// allocation per run, as for any write).
    fn write_zero_data(&self, m: &mut Meta, start: u64, end: u64) -> Result<()> {
        let cs = m.header.cluster_size();
        let mut pos = start;
        while pos < end {
            let run = self.fresh_run(m, pos, (pos % cs + end - pos).div_ceil(cs))?;
            if run > 1 {
                let piece = |g: u64| {
                    let len = (g - g % cs + cs).min(end) - g;
                    std::borrow::Cow::Owned(vec![0u8; len as usize])
                };
                pos += self.write_fresh_run(m, pos, run, piece)?;
                continue;
            }
            let chunk_end = (pos - pos % cs + cs).min(end);
            let zeros = vec![0u8; (chunk_end - pos) as usize];
            self.write_cluster(m, pos, &zeros)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` reads as zeros by its mapping alone, through the whole
    /// chain: zero flags, nothing allocated down to the bottom, or past a shorter backing file
    /// (data that happens to be zero does not count). The part past the disk's end counts.
    fn reads_zero_by_status(&self, m: &Meta, offset: u64, len: u64) -> Result<bool> {
        let end = (offset + len).min(m.header.size);
        if offset >= end {
            return Ok(true);
        }
        let mut extents = Vec::new();
        self.map_layer(m, m.active(), offset, end - offset, 0, &mut extents)?;
        // This image's own data counts as data even over a hole of the file, as QEMU's zero
        // write only widens over grains it has not allocated.
        let own_data = |e: &Extent| e.depth == 0 && matches!(e.kind, ExtentKind::DataHole { .. });
        Ok(extents.iter().all(|e| e.zero() && !own_data(e)))
    }

    /// Sets zero flags for whole grains `[start, end)` of one cluster.
    fn zero_grains(
        &self,
        m: &mut Meta,
        cluster_start: u64,
        start: u64,
        end: u64,
        unmap: bool,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let slot = self.writable_slot(m, cluster_start)?;
        let mapping = classify_standard(slot.entry & !self.zero_bit_mask(m), false);
        if !m.header.extended_l2() {
            let (entry, free_old) = match mapping {
                ClusterMapping::Normal { host_offset }
                | ClusterMapping::ZeroAllocated { host_offset }
                    if !unmap && slot.entry & COPIED != 0 =>
                {
                    (host_offset | COPIED | ZERO, false)
                }
                _ => (ZERO, true),
            };
            // An entry that stays as it is leaves its table clean, as QEMU's does.
            if entry == slot.entry {
                return Ok(());
            }
            self.mark_dirty(m)?;
            self.set_slot(m, slot, entry, 0);
            if free_old {
                self.free_entry(m, slot.entry)?;
            }
            return Ok(());
        }
        let mask = self.touched_subclusters(m, start, end - start);
        let full = start == 0 && end == cs;
        let (entry, bitmap, free_old) = match mapping {
            ClusterMapping::Compressed { .. } => {
                // A compressed cluster has no subclusters: the untouched part must be kept, so
                // copy it out first through the normal write path.
                if !full {
                    let content = self.cluster_content(m, cluster_start)?;
                    self.write_cluster(m, cluster_start, &content)?;
                    return self.zero_grains(m, cluster_start, start, end, unmap);
                }
                (0, ALL_ZEROES, true)
            }
            // Zero flags change only this table's entry, never the host cluster, so a cluster
            // shared with a snapshot keeps its entry too (as in QEMU); only an unmap of the
            // whole cluster lets it go.
            ClusterMapping::Normal { .. } => {
                let bitmap = (slot.bitmap & !(mask as u64)) | (mask as u64) << 32;
                if unmap && full {
                    (0, ALL_ZEROES, true)
                } else {
                    (slot.entry, bitmap, false)
                }
            }
            _ => (
                0,
                (slot.bitmap & !(mask as u64)) | (mask as u64) << 32,
                false,
            ),
        };
        if entry == slot.entry && bitmap == slot.bitmap {
            return Ok(());
        }
        self.mark_dirty(m)?;
        self.set_slot(m, slot, entry, bitmap);
        if free_old {
            self.free_entry(m, slot.entry)?;
        }
        Ok(())
    }

    /// Discards whole clusters of `[offset, offset + len)`, freeing their host clusters. Afterwards
    /// they read as zeros on v3 (or from the backing file on v2, as in QEMU).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        // A discard must not land between a widened write's read and its write back either.
        let _shared = self.encryption.as_ref().map(|e| e.whole_sectors_pass());
        let _pass = self.write_pass()?;
        let mut m = self.meta_mut();
        self.check_bounds(offset, len, m.header.size)?;
        self.bitmaps_mark(&mut m, offset, len)?;
        let cs = m.header.cluster_size();
        let first = offset.next_multiple_of(cs);
        let end = offset + len;
        let end = if end >= m.header.size {
            end.next_multiple_of(cs)
        } else {
            end & !(cs - 1)
        };
        let mut pos = first;
        while pos < end {
            self.discard_cluster(&mut m, pos)?;
            pos += cs;
        }
        self.keep_cache_bounded(&mut m)
    }

    /// Drops a cluster's mapping entirely and frees its host cluster (for shrinking). Returns
    /// the host cluster of a plain or preallocated mapping, which the caller may give back to
    /// the file system once nothing durable maps it.
    pub(crate) fn unmap_cluster(&self, m: &mut Meta, cluster_start: u64) -> Result<Option<u64>> {
        let slot = self.writable_slot(m, cluster_start)?;
        if slot.entry == 0 && slot.bitmap == 0 {
            return Ok(None);
        }
        self.mark_dirty(m)?;
        self.set_slot(m, slot, 0, 0);
        self.free_entry(m, slot.entry)?;
        let freed = match classify_standard(slot.entry & !self.zero_bit_mask(m), false) {
            ClusterMapping::Normal { host_offset }
            | ClusterMapping::ZeroAllocated { host_offset }
                if !m.header.has_external_data_file() =>
            {
                Some(host_offset)
            }
            _ => None,
        };
        Ok(freed)
    }

    fn discard_cluster(&self, m: &mut Meta, cluster_start: u64) -> Result<()> {
        // Without zero flags a v2 image cannot hide its backing file: QEMU refuses such discards,
        // and so the cluster keeps its data.
        if m.header.version < 3 && self.backing.is_some() {
            return Ok(());
        }
        let h = &m.header;
        let l1_index = (cluster_start >> h.l1_shift()) as usize;
        if m.l1[l1_index] & OFFSET_MASK == 0 && self.backing.is_none() {
            return Ok(());
        }
        let slot = self.writable_slot(m, cluster_start)?;
        let mapping = classify_standard(slot.entry & !self.zero_bit_mask(m), false);
        let allocated = matches!(
            mapping,
            ClusterMapping::Normal { .. }
                | ClusterMapping::ZeroAllocated { .. }
                | ClusterMapping::Compressed { .. }
        );
        let (entry, bitmap) = if self.backing.is_some() || allocated {
            if m.header.extended_l2() {
                (0, ALL_ZEROES)
            } else if m.header.version >= 3 {
                (ZERO, 0)
            } else {
                (0, 0)
            }
        } else {
            // Nothing allocated and nothing below: it already reads as zeros.
            (slot.entry, slot.bitmap)
        };
        if m.header.has_external_data_file() {
            // Data-file clusters are not refcounted; the mapping just goes away.
            self.mark_dirty(m)?;
            self.set_slot(m, slot, entry, bitmap);
            return Ok(());
        }
        if (entry, bitmap) == (slot.entry, slot.bitmap) {
            return Ok(());
        }
        self.mark_dirty(m)?;
        self.set_slot(m, slot, entry, bitmap);
        self.free_entry(m, slot.entry)
    }

    /// Gives host clusters freed earlier back to the file system, as QEMU discards them (a shrink's
    /// data, old bitmap tables). The caller has made the freeing durable; a cluster reused since
    /// (refcount above 0) or past the end of the file is left alone. A file system that cannot
    /// punch holes keeps the blocks.
    pub(crate) fn punch_freed(
        &self,
        m: &mut Meta,
        freed: &[(u64, u64)],
        purpose: &str,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let host = self.host();
        let mut clusters: Vec<u64> = freed
            .iter()
            .flat_map(|&(offset, len)| (offset / cs..(offset + len).div_ceil(cs)).map(|c| c * cs))
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for offset in clusters {
            if offset + cs > m.file_len || m.ws_mut()?.refcounts.get(host, offset / cs)? != 0 {
                continue;
            }
            match runs.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += cs,
                _ => runs.push((offset, cs)),
            }
        }
        for (offset, len) in runs {
            self.storage
                .punch_hole(offset, len)
                .map_err(|e| Error::io(&self.name, purpose, e))?;
        }
        Ok(())
    }
}
