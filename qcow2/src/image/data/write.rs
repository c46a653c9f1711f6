//! Guest writes: in place where COPIED says the cluster is ours alone, otherwise copy-on-write
//! into a new cluster (from the backing chain, a snapshot-shared cluster or a compressed one),
//! with the new clusters of one request taken as one run. New L2 tables go to fresh clusters and
//! are published by an L1 entry write when the L2 tables are written back (see `writeback`).
//! Zero writes and discards build on this in `zero`.

use crate::crypto::SECTOR_SIZE;
use crate::error::{Error, Result};
use crate::format::features::Incompatible;
use crate::format::limits::SUBCLUSTERS_PER_CLUSTER;
use crate::format::table::{
    be_u64_at, classify_standard, put_be_u64_at, ClusterMapping, COPIED, OFFSET_MASK, ZERO,
};
use crate::format::CompressedDescriptor;
use crate::image::encryption::sector_span;
use crate::image::layer::Layer;
use crate::image::{Image, Meta};
use crate::storage::Event;

/// Subcluster bitmap with every subcluster reading as zeros.
pub(super) const ALL_ZEROES: u64 = 0xFFFF_FFFF_0000_0000;

/// One cluster's L2 entry, as the writer sees it.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    pub(super) l2_offset: u64,
    pub(super) index: usize,
    pub(super) entry: u64,
    pub(super) bitmap: u64,
}

/// Where the content of the cluster at `cluster_start` ends: the disk's last cluster reads as
/// zeros past the virtual size; a cluster wholly past it holds VM state (see `vmstate`), which
/// is kept whole.
fn content_end(m: &Meta, cluster_start: u64) -> u64 {
    if cluster_start < m.header.size {
        m.header.size
    } else {
        u64::MAX
    }
}

impl Image {
    pub(crate) fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                image: self.name.clone(),
            })
        }
    }

    /// Writes guest bytes at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.require_writable()?;
        if let Some(enc) = &self.encryption {
            // A sector read, merged and written back must not overwrite a concurrent write to
            // the same sector; writes of whole sectors need no such care from each other.
            if offset % SECTOR_SIZE != 0 || buf.len() as u64 % SECTOR_SIZE != 0 {
                let _alone = enc.widened_pass();
                return self.write_widened(buf, offset);
            }
            let _shared = enc.whole_sectors_pass();
            return self.write_sectors(buf, offset);
        }
        self.write_sectors(buf, offset)
    }

    /// A guest write of whole sectors when the image is encrypted (any write otherwise).
    fn write_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _pass = self.write_pass()?;
        if self.write_in_place_shared(buf, offset)? {
            return Ok(());
        }
        let mut m = self.meta_mut();
        self.check_bounds(offset, buf.len() as u64, m.header.size)?;
        self.bitmaps_mark(&mut m, offset, buf.len() as u64)?;
        let result = self.write_clusters_at(&mut m, buf, offset);
        if let Err(e) = &result {
            if e.marks_image_corrupt() {
                self.mark_corrupt(&mut m);
            }
        }
        result
    }

    /// An encrypted image is written in whole sectors: the sectors a request touches in part are
    /// read (decrypted) first and the request is merged into them, as QEMU's block layer does
    /// for drivers with a 512-byte request alignment.
    pub(super) fn write_widened(&self, buf: &[u8], offset: u64) -> Result<()> {
        let size = self.size();
        self.check_bounds(offset, buf.len() as u64, size)?;
        let (start, end) = sector_span(offset, buf.len() as u64);
        if end > size {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!(
                    "the size of an encrypted image ({size}) must be a multiple of 512"
                ),
            });
        }
        let mut sectors = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        let first_end = (start + SECTOR_SIZE).min(end);
        self.read_at(&mut sectors[..(first_end - start) as usize], start)?;
        let last_start = (end - 1) / SECTOR_SIZE * SECTOR_SIZE;
        if last_start >= first_end {
            let at = (last_start - start) as usize;
            self.read_at(&mut sectors[at..], last_start)?;
        }
        sectors[head..head + buf.len()].copy_from_slice(buf);
        self.write_sectors(&sectors, start)
    }

    /// The clusters of one `write_at`, under the writer's lock.
    pub(crate) fn write_clusters_at(&self, m: &mut Meta, buf: &[u8], offset: u64) -> Result<()> {
        let cs = m.header.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let whole = ((buf.len() - pos) as u64 / cs) as usize;
            if guest % cs == 0 && whole > 1 {
                let done =
                    self.write_whole_clusters(m, guest, &buf[pos..pos + whole * cs as usize])?;
                if done > 0 {
                    pos += done;
                    continue;
                }
            }
            let left = buf.len() - pos;
            let clusters = (guest % cs + left as u64).div_ceil(cs);
            let run = self.fresh_run(m, guest, clusters)?;
            if run > 1 {
                let piece = |g: u64| {
                    let at = (g - offset) as usize;
                    let len = ((cs - (g & (cs - 1))) as usize).min(buf.len() - at);
                    std::borrow::Cow::Borrowed(&buf[at..at + len])
                };
                pos += self.write_fresh_run(m, guest, run, piece)? as usize;
                continue;
            }
            let len = ((cs - (guest & (cs - 1))) as usize).min(left);
            self.write_cluster(m, guest, &buf[pos..pos + len])?;
            pos += len;
        }
        self.keep_cache_bounded(m)
    }

    /// How many clusters from the one holding `guest` (at most `max`, within its L2 table) need
    /// fresh host space for a write, one after the other. Makes the L2 table this image's own
    /// first, as the write itself would.
    pub(super) fn fresh_run(&self, m: &mut Meta, guest: u64, max: u64) -> Result<u64> {
        if max < 2 || m.header.has_external_data_file() {
            return Ok(u64::from(max > 0));
        }
        let slot = self.writable_slot(m, guest)?;
        let extended = m.header.extended_l2();
        let l2_entries = 1usize << m.header.l2_bits();
        let table = self.l2_table(m, slot.l2_offset, 0, m.header.l1_table_offset)?;
        let mask = self.zero_bit_mask(m);
        let needs_space = |i: usize| {
            let e = be_u64_at(&table, if extended { i * 2 } else { i });
            !matches!(
                (classify_standard(e & !mask, false), e & COPIED != 0),
                (ClusterMapping::Normal { .. }, true)
                    | (ClusterMapping::ZeroAllocated { .. }, true)
            )
        };
        let last = (slot.index + max as usize).min(l2_entries);
        Ok((slot.index..last).take_while(|&i| needs_space(i)).count() as u64)
    }

    /// Writes `run` clusters that all need fresh space (see [`Image::fresh_run`]) into one
    /// allocation of `run` contiguous clusters, as QEMU places a request's new clusters.
    /// `piece(guest)` gives the bytes for the part of the request starting at `guest`. Returns
    /// the bytes written. On failure the clusters not yet linked are freed again.
    pub(super) fn write_fresh_run<'a>(
        &self,
        m: &mut Meta,
        guest: u64,
        run: u64,
        piece: impl Fn(u64) -> std::borrow::Cow<'a, [u8]>,
    ) -> Result<u64> {
        let cs = m.header.cluster_size();
        self.mark_dirty(m)?;
        self.l2_needs_refblocks(m)?;
        let at = self.alloc(m, run)?;
        let mut g = guest;
        for i in 0..run {
            let data = piece(g);
            if let Err(e) = self.write_cluster_to(m, g, &data, Some(at + i * cs)) {
                // Clusters nobody links yet go back; the failing one is linked only on success.
                let _ = self.free(m, at + i * cs, (run - i) * cs);
                return Err(e);
            }
            g += data.len() as u64;
        }
        Ok(g - guest)
    }

    /// Writes `buf` under the shared metadata lock when it changes nothing but data: every
    /// cluster it touches is one this image owns alone (a standard L2 entry with COPIED, in an
    /// owned L2 table), clear of metadata, and the bitmaps already mark it. Such writes run in
    /// parallel with each other and with reads; every metadata change takes the exclusive lock,
    /// which waits for them. Returns false, having written nothing, when the write needs the
    /// exclusive path (which also reports any error a lookup here met). A failed data write is
    /// reported, not retried: a retry could hide an error the storage gave once, which QEMU
    /// reports; nothing but data was touched.
    fn write_in_place_shared(&self, buf: &[u8], offset: u64) -> Result<bool> {
        const MAX_CLUSTERS: usize = 16;
        let m = self.meta();
        let h = &m.header;
        let len = buf.len() as u64;
        if len == 0
            || h.extended_l2()
            || h.has_external_data_file()
            || m.ws.is_none()
            || h.incompatible_features & Incompatible::CORRUPT != 0
            || offset.checked_add(len).is_none_or(|end| end > h.size)
            || !self.bitmaps_unchanged_by(&m, offset, len)
        {
            return Ok(false);
        }
        let cs = h.cluster_size();
        let first = offset / cs;
        let count = ((offset + len - 1) / cs - first + 1) as usize;
        if count > MAX_CLUSTERS {
            return Ok(false);
        }
        let mut hosts = [0u64; MAX_CLUSTERS];
        for (i, host) in hosts[..count].iter_mut().enumerate() {
            match self.owned_host(&m, (first + i as u64) * cs) {
                Some(h) => *host = h,
                None => return Ok(false),
            }
        }
        // Host runs, back to back where the clusters are; each checked against the metadata.
        let mut runs = [(0u64, 0usize, 0usize); MAX_CLUSTERS];
        let mut n = 0;
        let mut pos = 0usize;
        for (i, &host) in hosts[..count].iter().enumerate() {
            let in_cluster = if i == 0 { offset % cs } else { 0 };
            let take = ((cs - in_cluster) as usize).min(buf.len() - pos);
            let at = host + in_cluster;
            if n > 0 && runs[n - 1].0 + runs[n - 1].2 as u64 == at {
                runs[n - 1].2 += take;
            } else {
                runs[n] = (at, pos, take);
                n += 1;
            }
            pos += take;
        }
        if runs[..n]
            .iter()
            .any(|&(at, _, l)| self.overlap(&m, at, l as u64, None).is_some())
        {
            return Ok(false);
        }
        for &(at, start, l) in &runs[..n] {
            self.write_data(&buf[start..start + l], at, offset + start as u64)?;
        }
        Ok(true)
    }

    /// The host offset of the cluster at `guest` when this image owns it alone and its L2
    /// table too (nothing but its data changes on a write); `None` otherwise, or when the
    /// lookup fails.
    fn owned_host(&self, m: &Meta, guest: u64) -> Option<u64> {
        let h = &m.header;
        let l1_index = guest >> h.l1_shift();
        let l1_entry = *m.l1.get(l1_index as usize)?;
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 || l1_entry & COPIED == 0 {
            return None;
        }
        let table = self
            .l2_table(m, l2_offset, l1_index, h.l1_table_offset)
            .ok()?;
        let index = ((guest >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize;
        let entry = be_u64_at(&table, index);
        match classify_standard(entry, false) {
            ClusterMapping::Normal { host_offset } if entry & COPIED != 0 => Some(host_offset),
            _ => None,
        }
    }

    /// Writes a run of whole clusters with one host write when they map to one contiguous host
    /// range: clusters this image owns alone and that lie back to back, or clusters that need
    /// fresh space (allocated together). Returns the bytes written; 0 means the cluster at
    /// `guest` needs the general path.
    fn write_whole_clusters(&self, m: &mut Meta, guest: u64, data: &[u8]) -> Result<usize> {
        let h = &m.header;
        if h.extended_l2() || h.has_external_data_file() {
            return Ok(0);
        }
        let cs = h.cluster_size();
        let l2_entries = 1u64 << h.l2_bits();
        let first_index = (guest >> h.cluster_bits) & (l2_entries - 1);
        let max = ((l2_entries - first_index) as usize).min(data.len() / cs as usize);
        let slot = self.writable_slot(m, guest)?;
        let table = self.l2_table(m, slot.l2_offset, 0, m.header.l1_table_offset)?;
        let entry = |i: usize| be_u64_at(&table, slot.index + i);
        let owned_at = |e: u64| match classify_standard(e, false) {
            ClusterMapping::Normal { host_offset } if e & COPIED != 0 => Some(host_offset),
            _ => None,
        };
        // Preallocated zero clusters of ours take the data in place too (their zero flag goes).
        let owned_zero_at = |e: u64| match classify_standard(e, false) {
            ClusterMapping::ZeroAllocated { host_offset } if e & COPIED != 0 => Some(host_offset),
            _ => None,
        };
        let in_place_at = |e: u64| owned_at(e).or_else(|| owned_zero_at(e));
        let needs_space = |e: u64| {
            !matches!(
                classify_standard(e, false),
                ClusterMapping::ZeroAllocated { .. }
            ) && owned_at(e).is_none()
        };
        if let Some(host) = in_place_at(entry(0)) {
            // In place, in one write: as far as the host clusters stay back to back.
            let k = (1..max)
                .take_while(|&i| in_place_at(entry(i)) == Some(host + i as u64 * cs))
                .count()
                + 1;
            let bytes = k * cs as usize;
            let zeros: Vec<usize> = (0..k)
                .filter(|&i| owned_zero_at(entry(i)).is_some())
                .collect();
            self.guard(m, host, bytes as u64, None)?;
            self.bitmaps_durable_before_inplace(m)?;
            self.write_data(&data[..bytes], host, guest)?;
            if !zeros.is_empty() {
                // The data is durable before the entries that stop reading it as zeros.
                self.mark_dirty(m)?;
                m.ws_mut()?.l2_after_data_sync = true;
                self.l2_cache.modify(slot.l2_offset, |t| {
                    for &i in &zeros {
                        put_be_u64_at(t, slot.index + i, (host + i as u64 * cs) | COPIED);
                    }
                });
            }
            return Ok(bytes);
        }
        if !needs_space(entry(0)) {
            return Ok(0);
        }
        let k = (1..max).take_while(|&i| needs_space(entry(i))).count() + 1;
        let bytes = k * cs as usize;
        self.mark_dirty(m)?;
        self.l2_needs_refblocks(m)?;
        let new = self.alloc(m, k as u64)?;
        self.guard(m, new, bytes as u64, None)?;
        self.write_data(&data[..bytes], new, guest)?;
        m.ws_mut()?.l2_after_data_sync = true;
        let old: Vec<u64> = (0..k).map(entry).collect();
        self.l2_cache.modify(slot.l2_offset, |t| {
            for i in 0..k {
                put_be_u64_at(t, slot.index + i, (new + i as u64 * cs) | COPIED);
            }
        });
        for e in old {
            self.free_entry(m, e)?;
        }
        Ok(bytes)
    }

    /// Writes back L2 tables when too many are dirty, so memory stays bounded.
    pub(crate) fn keep_cache_bounded(&self, m: &mut Meta) -> Result<()> {
        if self.l2_cache.dirty_count() > 64 {
            self.flush_l2(m)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Guest data in the host's page cache is most of what a flush waits for. Synced first,
        // without the metadata lock, guest writes and reads go on meanwhile (under load the
        // sync takes seconds); the locked write-back below then syncs only what came after.
        self.host().sync()?;
        let mut m = self.meta_mut();
        self.flush_all(&mut m)
    }

    /// Writes everything back, clears the dirty bit and closes the image, reporting errors
    /// (dropping an image does the same but can only ignore them).
    pub fn close(self) -> Result<()> {
        if self.writable {
            let mut m = self.meta_mut();
            self.close_clean(&mut m)?;
            m.ws = None;
        }
        Ok(())
    }

    /// The L2 slot of the cluster at `guest`, with an L2 table this image alone owns
    /// (allocated, or copied from a shared one, as needed).
    pub(super) fn writable_slot(&self, m: &mut Meta, guest: u64) -> Result<Slot> {
        let h = &m.header;
        let l1_index = (guest >> h.l1_shift()) as usize;
        let index = ((guest >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize;
        let extended = h.extended_l2();
        let l2_offset = self.owned_l2(m, l1_index)?;
        let table = self.l2_table(m, l2_offset, l1_index as u64, m.header.l1_table_offset)?;
        let (entry, bitmap) = if extended {
            (
                be_u64_at(&table, index * 2),
                be_u64_at(&table, index * 2 + 1),
            )
        } else {
            (be_u64_at(&table, index), 0)
        };
        // A write must not build on an entry whose subclusters say contradictory things: the
        // image is corrupt (QEMU refuses and marks it so; a compressed entry's bitmap is unused).
        if extended
            && !matches!(
                classify_standard(entry, false),
                ClusterMapping::Compressed { .. }
            )
        {
            let external = m.header.has_external_data_file();
            let allocated = entry & OFFSET_MASK != 0 || (external && entry & COPIED != 0);
            if !crate::format::table::SubclusterBitmap(bitmap).is_valid(allocated) {
                return Err(Error::corrupt(
                    &self.name,
                    format!("L2 entry {index}"),
                    l2_offset + index as u64 * m.header.l2_entry_size(),
                    format!("invalid subcluster bitmap {bitmap:#018x}"),
                ));
            }
        }
        Ok(Slot {
            l2_offset,
            index,
            entry,
            bitmap,
        })
    }

    /// Points the cluster at `guest` to an entry whose clusters were just allocated.
    pub(crate) fn link_cluster(
        &self,
        m: &mut Meta,
        guest: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        self.l2_needs_refblocks(m)?;
        let slot = self.writable_slot(m, guest)?;
        self.set_slot(m, slot, entry, bitmap);
        self.free_entry(m, slot.entry)
    }

    /// Stores a new entry (and bitmap) in the cached L2 table.
    pub(super) fn set_slot(&self, m: &Meta, slot: Slot, entry: u64, bitmap: u64) {
        let extended = m.header.extended_l2();
        self.l2_cache.modify(slot.l2_offset, |t| {
            if extended {
                put_be_u64_at(t, slot.index * 2, entry);
                put_be_u64_at(t, slot.index * 2 + 1, bitmap);
            } else {
                put_be_u64_at(t, slot.index, entry);
            }
        });
    }

    /// The offset of an L2 table for L1 entry `l1_index` that this image alone owns.
    fn owned_l2(&self, m: &mut Meta, l1_index: usize) -> Result<u64> {
        let entry = m.l1[l1_index];
        let old = entry & OFFSET_MASK;
        if old != 0 && entry & COPIED != 0 {
            return Ok(old);
        }
        let cs = m.header.cluster_size();
        let content: Vec<u8> = if old != 0 {
            // A shared table: the copy references the same clusters, whose refcounts already
            // count every table that reaches them.
            self.l2_table(m, old, l1_index as u64, m.header.l1_table_offset)?
                .to_vec()
        } else {
            vec![0u8; cs as usize]
        };
        self.mark_dirty(m)?;
        // The new table's refcount reaches the disk before the table, the table before the L1
        // entry: the table stays dirty in the cache and the entry is published by `flush_l2`.
        self.l2_needs_refblocks(m)?;
        let new = self.alloc_for(m, 1, "L2 table")?;
        if m.ws()?.lazy {
            // Lazy refcounts defer only data clusters' refcounts, as QEMU's do: a table's own
            // is written at once, so a crash leaves metadata refcounts exact.
            self.flush_refblocks(m)?;
        }
        self.guard(m, new, cs, None)?;
        m.l1[l1_index] = new | COPIED;
        m.ws_mut()?.dirty_l1.insert(l1_index);
        self.l2_cache.insert(new, content.into(), true);
        if old != 0 {
            // The shared table loses this reference once the new L1 entry is durable.
            self.free(m, old, cs)?;
            let host = self.host();
            if m.ws_mut()?.refcounts.get(host, old / cs)? == 0 {
                self.l2_cache.remove(old);
            }
        }
        Ok(new)
    }

    /// Allocates `n` contiguous clusters and keeps the header and overlap areas in step when
    /// the refcount table moves.
    pub(crate) fn alloc(&self, m: &mut Meta, n: u64) -> Result<u64> {
        self.alloc_for(m, n, "clusters")
    }

    /// As [`alloc`](Self::alloc), naming what the clusters are for (QEMU's words, "L2 table")
    /// should the allocation be refused. A refusal because the clusters hold metadata counted
    /// free marks the image corrupt: its refcounts are wrong.
    pub(crate) fn alloc_for(&self, m: &mut Meta, n: u64, purpose: &str) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "an allocation of no clusters".into(),
            });
        }
        // Freed host space may be reused now, so a cached decompressed cluster keyed by its
        // descriptor could describe old bytes.
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.storage.event(Event::ClusterAlloc);
        let host = self.host();
        let ws = m.ws_mut()?;
        let mut end = ws.alloc_end;
        let (offset, moved) = match ws.refcounts.alloc(host, n, &mut end, purpose) {
            Ok(done) => done,
            Err(e) => {
                if e.marks_image_corrupt() {
                    self.mark_corrupt(m);
                }
                return Err(e);
            }
        };
        ws.alloc_end = end;
        let cs = m.header.cluster_size();
        // Allocated clusters count as part of the file from now on, written or not.
        m.file_len = m.file_len.max(end * cs);
        if moved.is_some() {
            self.reftable_moved(m)?;
        }
        Ok(offset)
    }

    /// Keeps the header and the overlap areas in step after the refcount table moved.
    pub(crate) fn reftable_moved(&self, m: &mut Meta) -> Result<()> {
        let cs = m.header.cluster_size();
        {
            let ws = m.ws()?;
            let (offset, clusters) = (ws.refcounts.reftable_offset, ws.refcounts.reftable_clusters);
            m.header.refcount_table_offset = offset;
            m.header.refcount_table_clusters = clusters;
            if let Some(area) = m
                .metadata_areas
                .iter_mut()
                .find(|a| a.what == "the refcount table")
            {
                area.start = offset;
                area.end = offset + clusters as u64 * cs;
            }
        }
        Ok(())
    }

    /// Makes sure the cluster at `guest` has an L2 table this image alone owns (allocating one
    /// now, so it lands before clusters allocated next).
    pub(crate) fn ensure_l2(&self, m: &mut Meta, guest: u64) -> Result<()> {
        self.l2_needs_refblocks(m)?;
        self.writable_slot(m, guest).map(|_| ())
    }

    /// Drops references whose removal is already in the cached L2 tables.
    pub(crate) fn free(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        self.refblocks_need_l2(m)?;
        self.storage.event(Event::ClusterFree);
        let host = self.host();
        m.ws_mut()?.refcounts.adjust(host, offset, len, -1)
    }

    /// Frees whatever host clusters an old L2 entry held.
    pub(super) fn free_entry(&self, m: &mut Meta, entry: u64) -> Result<()> {
        if m.header.has_external_data_file() {
            return Ok(());
        }
        let cs = m.header.cluster_size();
        match classify_standard(entry & !self.zero_bit_mask(m), false) {
            ClusterMapping::Normal { host_offset }
            | ClusterMapping::ZeroAllocated { host_offset } => self.free(m, host_offset, cs),
            ClusterMapping::Compressed { descriptor } => {
                let d = CompressedDescriptor::decode(descriptor, m.header.cluster_bits);
                self.free(m, d.host_offset, d.compressed_size())
            }
            _ => Ok(()),
        }
    }

    /// Extended L2 entries ignore bit 0 of word 0.
    pub(super) fn zero_bit_mask(&self, m: &Meta) -> u64 {
        if m.header.extended_l2() {
            ZERO
        } else {
            0
        }
    }

    /// Reads the current guest content of the cluster starting at `cluster_start` (past the
    /// end of the disk it is zeros).
    pub(super) fn cluster_content(&self, m: &Meta, cluster_start: u64) -> Result<Vec<u8>> {
        let cs = m.header.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let inside = content_end(m, cluster_start)
            .saturating_sub(cluster_start)
            .min(cs) as usize;
        let layer: Layer<'_> = m.active();
        self.read_layer(m, layer, &mut buf[..inside], cluster_start)?;
        Ok(buf)
    }

    /// Writes `data` into the cluster holding guest offset `guest` (data stays within it).
    pub(super) fn write_cluster(&self, m: &mut Meta, guest: u64, data: &[u8]) -> Result<()> {
        self.write_cluster_to(m, guest, data, None)
    }

    /// As [`Image::write_cluster`]; a copy-on-write goes to `fresh`, a cluster the caller
    /// allocated for it, when given.
    fn write_cluster_to(
        &self,
        m: &mut Meta,
        guest: u64,
        data: &[u8],
        fresh: Option<u64>,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let in_cluster = guest & (cs - 1);
        let cluster_start = guest - in_cluster;
        let extended = m.header.extended_l2();
        let slot = self.writable_slot(m, guest)?;
        let touched = self.touched_subclusters(m, in_cluster, data.len() as u64);

        if m.header.has_external_data_file() {
            return self.write_external(m, slot, cluster_start, in_cluster, data, touched);
        }

        let mapping = classify_standard(slot.entry & !self.zero_bit_mask(m), false);
        let owned = slot.entry & COPIED != 0;
        match mapping {
            ClusterMapping::Normal { host_offset } if owned => {
                if extended && touched & !(slot.bitmap as u32) != 0 {
                    // Newly allocated subclusters: fill what the write leaves out from their
                    // old content (backing data or zeros), then set their bits.
                    let mut content = self.cluster_content(m, cluster_start)?;
                    content[in_cluster as usize..in_cluster as usize + data.len()]
                        .copy_from_slice(data);
                    let (start, end) = self.subcluster_span(m, touched);
                    self.guard(m, host_offset + start, end - start, None)?;
                    self.write_data(
                        &content[start as usize..end as usize],
                        host_offset + start,
                        cluster_start + start,
                    )?;
                    let bitmap = (slot.bitmap | touched as u64) & !((touched as u64) << 32);
                    self.mark_dirty(m)?;
                    m.ws_mut()?.l2_after_data_sync = true;
                    self.set_slot(m, slot, slot.entry, bitmap);
                    return Ok(());
                }
                self.guard(m, host_offset + in_cluster, data.len() as u64, None)?;
                self.bitmaps_durable_before_inplace(m)?;
                return self.write_data(data, host_offset + in_cluster, guest);
            }
            ClusterMapping::ZeroAllocated { host_offset } if owned => {
                self.guard(m, host_offset, cs, None)?;
                self.write_into_zeros(m, data, host_offset, cluster_start, in_cluster, false)?;
                self.mark_dirty(m)?;
                m.ws_mut()?.l2_after_data_sync = true;
                self.set_slot(m, slot, host_offset | COPIED, 0);
                return Ok(());
            }
            _ => {}
        }

        // Copy-on-write into a new cluster.
        let whole = in_cluster == 0
            && (data.len() as u64 == cs
                || cluster_start + data.len() as u64 >= content_end(m, cluster_start));
        // Nothing to copy when the old cluster reads as zeros: skip the read (and the second
        // pass over 64 KiB that it costs).
        let reads_zeros = match mapping {
            ClusterMapping::Unallocated => self.backing.is_none(),
            ClusterMapping::Zero | ClusterMapping::ZeroAllocated { .. } => m.header.version >= 3,
            _ => false,
        };
        // The new cluster holds the request and zeros around it.
        let data_and_zeros = (whole || reads_zeros) && !extended;
        let bitmap = if extended {
            let old_alloc = match mapping {
                // A shared cluster's copy takes every subcluster from the first to the last
                // one allocated or written, as QEMU copies it: one span, so the new cluster's
                // allocated part stays contiguous.
                ClusterMapping::Normal { .. } => {
                    let covered = slot.bitmap as u32 | touched;
                    let first = covered.trailing_zeros();
                    let last = 31 - covered.leading_zeros();
                    (((1u64 << (last + 1)) - 1) as u32) & !((1u32 << first) - 1)
                }
                ClusterMapping::Compressed { .. } => u32::MAX,
                _ => 0,
            };
            let alloc = old_alloc | touched;
            let zero = ((slot.bitmap >> 32) as u32) & !alloc;
            alloc as u64 | (zero as u64) << 32
        } else {
            0
        };
        self.mark_dirty(m)?;
        self.l2_needs_refblocks(m)?;
        let (new, zeroed) = match fresh {
            Some(at) => (at, false),
            None => {
                let at = self.alloc(m, 1)?;
                (at, m.ws()?.refcounts.last_alloc_zeroed())
            }
        };
        self.guard(m, new, cs, None)?;
        if whole && !extended && data.len() as u64 == cs {
            // A whole cluster goes straight from the caller's buffer.
            self.write_data(data, new, cluster_start)?;
        } else if data_and_zeros {
            self.write_into_zeros(m, data, new, cluster_start, in_cluster, zeroed)?;
        } else if extended && bitmap as u32 == touched {
            // Only the touched subclusters are allocated; the bitmap says how the others read
            // (zeros or the backing file), whatever the host cluster holds there. Their span
            // gets the request and, around it, what those subclusters read as until now.
            let (start, end) = self.subcluster_span(m, touched);
            let mut span = vec![0u8; (end - start) as usize];
            if data.len() < span.len() {
                let inside = content_end(m, cluster_start).saturating_sub(cluster_start + start);
                let readable = (span.len() as u64).min(inside) as usize;
                self.read_layer(m, m.active(), &mut span[..readable], cluster_start + start)?;
            }
            let at = (in_cluster - start) as usize;
            span[at..at + data.len()].copy_from_slice(data);
            self.write_data(&span, new + start, cluster_start + start)?;
        } else {
            // Anything else is assembled from the cluster's current content (a short last
            // cluster is zero-padded).
            let mut content = self.cluster_content(m, cluster_start)?;
            content[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            self.write_data(&content, new, cluster_start)?;
        }
        m.ws_mut()?.l2_after_data_sync = true;
        self.set_slot(m, slot, new | COPIED, bitmap);
        self.free_entry(m, slot.entry)
    }

    /// Writes to an image whose data lives in an external data file at the guest offset.
    fn write_external(
        &self,
        m: &mut Meta,
        slot: Slot,
        cluster_start: u64,
        in_cluster: u64,
        data: &[u8],
        touched: u32,
    ) -> Result<()> {
        let storage = self
            .data_file
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument {
                image: self.name.clone(),
                reason: "the external data file is not open".into(),
            })?;
        let extended = m.header.extended_l2();
        // Data-file writes land in place, readable at once.
        self.bitmaps_durable_before_inplace(m)?;
        // A zero flag (standard L2) means the data file's bytes are stale for this cluster.
        let allocated = slot.entry & COPIED != 0 && (extended || slot.entry & ZERO == 0);
        let mapped = slot.entry & OFFSET_MASK;
        if mapped != 0 && mapped != cluster_start {
            // Data lands at the guest offset; an entry mapping elsewhere would read other bytes.
            self.mark_corrupt(m);
            return Err(Error::corrupt(
                &self.name,
                "L2 entry",
                slot.l2_offset + slot.index as u64 * m.header.l2_entry_size(),
                format!(
                    "external data file offset {mapped:#x} does not match guest offset \
                     {cluster_start:#x}; the image is now marked corrupt"
                ),
            ));
        }
        let fresh_subclusters = extended && touched & !(slot.bitmap as u32) != 0;
        if fresh_subclusters && allocated {
            // Subclusters that read as zeros or from the backing file until now: write their
            // whole span so the parts the request leaves out keep reading the same.
            let mut content = self.cluster_content(m, cluster_start)?;
            content[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            let (start, end) = self.subcluster_span(m, touched);
            storage
                .write_at(
                    &content[start as usize..end as usize],
                    cluster_start + start,
                )
                .map_err(|e| Error::io(&self.name, "writing the data file", e))?;
        } else if !allocated {
            // Fill the rest of the cluster from its current content so it reads the same.
            let mut content = self.cluster_content(m, cluster_start)?;
            content[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            storage
                .write_at(&content, cluster_start)
                .map_err(|e| Error::io(&self.name, "writing the data file", e))?;
        } else {
            storage
                .write_at(data, cluster_start + in_cluster)
                .map_err(|e| Error::io(&self.name, "writing the data file", e))?;
        }
        let bitmap = if extended {
            if allocated {
                (slot.bitmap | touched as u64) & !((touched as u64) << 32)
            } else {
                0xFFFF_FFFF
            }
        } else {
            0
        };
        if !allocated || bitmap != slot.bitmap {
            self.mark_dirty(m)?;
            m.ws_mut()?.l2_after_data_sync = true;
            self.set_slot(m, slot, cluster_start | COPIED, bitmap);
        }
        Ok(())
    }

    /// Writes `data` at `in_cluster` into the host cluster at `host`, whose other bytes must read
    /// as zeros although the file may hold old bytes there (freed clusters are reused), unless
    /// `zeroed` says they were zeroed ahead already. Past the end of the file nothing needs
    /// zeroing (a hole, or nothing at all, which readers take as zeros, as QEMU does); inside
    /// it the file system is asked for zeros where that saves writing many of them, so a 4K
    /// write does not cost a cluster's worth of bytes. The zeroing is ordered before the write
    /// and made durable by the same sync that precedes the L2 entry (`l2_after_data_sync`), as
    /// a write of zeros would be.
    fn write_into_zeros(
        &self,
        m: &mut Meta,
        data: &[u8],
        host: u64,
        cluster_start: u64,
        in_cluster: u64,
        zeroed: bool,
    ) -> Result<()> {
        /// Below this many zeros around the request, writing them costs less than a call that
        /// asks the file system for them (which also splits the file's extents).
        const ZEROING_MIN: u64 = 16 << 10;
        let cs = m.header.cluster_size();
        if self.encryption.is_some() {
            // Zeros on disk do not decrypt to zeros: the whole cluster is written encrypted.
            let mut content = vec![0u8; cs as usize];
            let at = in_cluster as usize;
            content[at..at + data.len()].copy_from_slice(data);
            return self.write_data(&content, host, cluster_start);
        }
        if !zeroed {
            let file_len = self
                .storage
                .len()
                .map_err(|e| Error::io(&self.name, "reading the image file's length", e))?;
            if host < file_len && cs - data.len() as u64 >= ZEROING_MIN {
                self.zero_new_cluster(m, host, file_len)?;
            } else if host < file_len {
                let mut content = vec![0u8; cs as usize];
                let at = in_cluster as usize;
                content[at..at + data.len()].copy_from_slice(data);
                return self.write_data(&content, host, cluster_start);
            }
        }
        self.write_data(data, host + in_cluster, cluster_start + in_cluster)
    }

    /// Zeroes the cluster at `host` (the part inside the file of `file_len` bytes) and, in the
    /// same call, the free clusters right after it inside the file, up to `ZERO_AHEAD` bytes:
    /// small writes landing in those next need no call of their own (one call per 4K write
    /// costs more than the write). Only when no freed cluster may still be referenced on disk
    /// (`refblocks_after_l2` clear: every removal that freed one is durable), since zeroing a
    /// free cluster that an L2 entry on disk still holds would change what a crash leaves.
    fn zero_new_cluster(&self, m: &mut Meta, host: u64, file_len: u64) -> Result<()> {
        /// How far a zeroing reaches over free clusters ahead of the one needed.
        const ZERO_AHEAD: u64 = 4 << 20;
        let cs = m.header.cluster_size();
        let next = host / cs + 1;
        let inside = file_len.saturating_sub(next * cs) / cs;
        let mut ahead = 0;
        if !m.ws()?.refblocks_after_l2 && inside > 0 {
            let max = (ZERO_AHEAD / cs).min(inside);
            ahead = m.ws_mut()?.refcounts.free_run(self.host(), next, max)?;
            // Free by refcount yet overlapping metadata means broken refcounts: leave it alone.
            if ahead > 0 && self.overlap(m, next * cs, ahead * cs, None).is_some() {
                ahead = 0;
            }
        }
        let end = (next + ahead) * cs;
        self.host()
            .write_zeroes(host, end.min(file_len) - host, "new clusters")?;
        m.ws_mut()?.refcounts.note_zeroed(next..next + ahead);
        Ok(())
    }

    /// Writes guest bytes to the host, encrypted first for an encrypted image (whole sectors:
    /// `write_at` widens requests to them).
    fn write_data(&self, data: &[u8], host_offset: u64, guest: u64) -> Result<()> {
        self.storage.event(Event::WriteAio);
        if let Some(enc) = &self.encryption {
            let mut sealed = data.to_vec();
            enc.encrypt(&self.name, host_offset, guest, &mut sealed)?;
            return self.host().write(&sealed, host_offset, "guest data");
        }
        self.host().write(data, host_offset, "guest data")
    }

    /// Bitmask of the subclusters a request `[in_cluster, in_cluster + len)` touches (all bits
    /// for standard L2).
    pub(super) fn touched_subclusters(&self, m: &Meta, in_cluster: u64, len: u64) -> u32 {
        if !m.header.extended_l2() || len == 0 {
            return u32::MAX;
        }
        let sc_bits = m.header.cluster_bits - SUBCLUSTERS_PER_CLUSTER.trailing_zeros();
        let first = (in_cluster >> sc_bits) as u32;
        let last = ((in_cluster + len - 1) >> sc_bits) as u32;
        let count = last - first + 1;
        let mask = if count == 32 {
            u32::MAX
        } else {
            (1u32 << count) - 1
        };
        mask << first
    }

    /// Byte span `[start, end)` within the cluster covering the subclusters in `mask`.
    fn subcluster_span(&self, m: &Meta, mask: u32) -> (u64, u64) {
        let sc_bits = m.header.cluster_bits - SUBCLUSTERS_PER_CLUSTER.trailing_zeros();
        let first = mask.trailing_zeros() as u64;
        let last = 31 - mask.leading_zeros() as u64;
        (first << sc_bits, (last + 1) << sc_bits)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.writable {
            let mut m = self.meta.write().unwrap_or_else(|e| e.into_inner());
            let _ = self.close_clean(&mut m);
            m.ws = None;
        }
    }
}
