//! Guest writes: in place where COPIED says the cluster is ours alone, otherwise copy-on-write
//! into a new cluster (from the backing chain, a snapshot-shared cluster or a compressed one);
//! zero writes with zero flags (v3) or real zeros (v2); discards that free clusters. New L2
//! tables go to fresh clusters and are published by an L1 entry write when the L2 tables are
//! written back (see `writeback`).

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
use crate::image::map::{Extent, ExtentKind};
use crate::image::{Image, Meta};
use crate::storage::Event;

/// Subcluster bitmap with every subcluster reading as zeros.
const ALL_ZEROES: u64 = 0xFFFF_FFFF_0000_0000;

/// One cluster's L2 entry, as the writer sees it.
#[derive(Clone, Copy)]
struct Slot {
    l2_offset: u64,
    index: usize,
    entry: u64,
    bitmap: u64,
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
            // One write at a time: a sector read, merged and written back must not overwrite
            // a concurrent write to the same sector.
            let _serial = enc.serialize_writes();
            if offset % SECTOR_SIZE != 0 || buf.len() as u64 % SECTOR_SIZE != 0 {
                return self.write_widened(buf, offset);
            }
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
    fn write_widened(&self, buf: &[u8], offset: u64) -> Result<()> {
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
            let len = ((cs - (guest & (cs - 1))) as usize).min(buf.len() - pos);
            self.write_cluster(m, guest, &buf[pos..pos + len])?;
            pos += len;
        }
        self.keep_cache_bounded(m)
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
    fn writable_slot(&self, m: &mut Meta, guest: u64) -> Result<Slot> {
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
    fn set_slot(&self, m: &Meta, slot: Slot, entry: u64, bitmap: u64) {
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
    fn free_entry(&self, m: &mut Meta, entry: u64) -> Result<()> {
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
    fn zero_bit_mask(&self, m: &Meta) -> u64 {
        if m.header.extended_l2() {
            ZERO
        } else {
            0
        }
    }

    /// Reads the current guest content of the cluster starting at `cluster_start` (past the
    /// end of the disk it is zeros).
    fn cluster_content(&self, m: &Meta, cluster_start: u64) -> Result<Vec<u8>> {
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
    fn write_cluster(&self, m: &mut Meta, guest: u64, data: &[u8]) -> Result<()> {
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
                ClusterMapping::Normal { .. } => slot.bitmap as u32,
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
        let new = self.alloc(m, 1)?;
        let zeroed = m.ws()?.refcounts.last_alloc_zeroed();
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
    fn touched_subclusters(&self, m: &Meta, in_cluster: u64, len: u64) -> u32 {
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

    /// Makes guest range `[offset, offset + len)` read as zeros: zero flags on v3 (freeing the
    /// host clusters with `unmap`), real zeros on v2 and for partial clusters.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.require_writable()?;
        match &self.encryption {
            Some(enc) => {
                let _serial = enc.serialize_writes();
                self.write_zeroes_in_sectors(offset, len, unmap)
            }
            None => self.write_zeroes_inner(offset, len, unmap),
        }
    }

    /// Zeroes on an encrypted image, under its write serialization.
    fn write_zeroes_in_sectors(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
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
                return self.write_widened(&vec![0u8; len as usize], offset);
            }
            if offset < inner_start {
                self.write_widened(&vec![0u8; (inner_start - offset) as usize], offset)?;
            }
            if inner_end < offset + len {
                self.write_widened(&vec![0u8; (offset + len - inner_end) as usize], inner_end)?;
            }
            return self.write_zeroes_inner(inner_start, inner_end - inner_start, unmap);
        }
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

    /// Writes zeros as data over `[start, end)`, a cluster at a time.
    fn write_zero_data(&self, m: &mut Meta, start: u64, end: u64) -> Result<()> {
        let cs = m.header.cluster_size();
        let mut pos = start;
        while pos < end {
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
            ClusterMapping::Normal { host_offset } if slot.entry & COPIED != 0 => {
                let bitmap = (slot.bitmap & !(mask as u64)) | (mask as u64) << 32;
                if unmap && full {
                    (0, ALL_ZEROES, true)
                } else {
                    (host_offset | COPIED, bitmap, false)
                }
            }
            ClusterMapping::Normal { .. } => {
                if !full {
                    let content = self.cluster_content(m, cluster_start)?;
                    self.write_cluster(m, cluster_start, &content)?;
                    return self.zero_grains(m, cluster_start, start, end, unmap);
                }
                (0, ALL_ZEROES, true)
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
