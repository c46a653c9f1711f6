//! Virtual size changes. Growing moves the L1 table to fresh clusters when it is too small (the
//! new table is published by the 12-byte header write at offset 36) and then publishes the new
//! size; shrinking refuses to drop allocated data unless asked, and frees what it drops.

use crate::error::{Error, Result};
use crate::format::limits::MAX_L1_ENTRIES;
use crate::format::table::{put_be_u64_at, OFFSET_MASK};
use crate::image::{Image, Meta, Preallocation};

impl Image {
    /// Changes the virtual size. Shrinking fails when data would be lost, unless `allow_data_loss`.
    pub fn resize(&self, new_size: u64, allow_data_loss: bool) -> Result<()> {
        self.resize_preallocated(new_size, allow_data_loss, Preallocation::Off)
    }

    /// Changes the virtual size; growing preallocates the new area as `preallocation` asks
    /// (`qemu-img resize --preallocation`), before the new size is published.
    pub fn resize_preallocated(
        &self,
        new_size: u64,
        allow_data_loss: bool,
        preallocation: Preallocation,
    ) -> Result<()> {
        self.require_writable()?;
        {
            // A v2 snapshot need not record its disk size, so after a resize nothing would say
            // which size its tables describe (QEMU's rule).
            let m = self.meta();
            if m.header.version < 3 && !m.snapshots.is_empty() {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: "Can't resize a v2 image which has snapshots".into(),
                });
            }
        }
        if new_size > crate::format::limits::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!("virtual size {new_size} is too large"),
            });
        }
        let old_size = self.size();
        if new_size != old_size {
            self.bitmaps_resizable(&self.meta(), new_size)?;
        }
        if new_size >= old_size {
            let mut m = self.meta_mut();
            let needed = m.header.l1_entries_for(new_size);
            if needed > MAX_L1_ENTRIES {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: format!("virtual size {new_size} needs an L1 table larger than 32 MiB"),
                });
            }
            // The new area reads as zeros, as in QEMU: the tail of a partly used last cluster may
            // hold old bytes, and a longer backing file must not show through.
            let cs = m.header.cluster_size();
            let backing_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
            let zero_end = old_size.next_multiple_of(cs).min(new_size).max(backing_end);
            if backing_end > old_size && m.header.version < 3 {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: "growing a compat=0.10 image over a longer backing file would expose the backing data (no zero clusters in v2)".into(),
                });
            }
            if needed > m.l1.len() as u64 {
                self.grow_l1(&mut m, needed)?;
            }
            // An unallocated, all-zero last cluster that preallocation is about to allocate
            // needs no zeroing first (nor the L2 table that would take, as in QEMU's layout).
            let preallocated_tail = preallocation != Preallocation::Off
                && old_size % cs != 0
                && zero_end <= old_size.next_multiple_of(cs)
                && backing_end <= old_size - old_size % cs
                && !m.header.has_external_data_file()
                && matches!(
                    self.lookup(&m, m.active(), old_size - old_size % cs, cs)?.0,
                    crate::image::layer::Run::Unallocated
                );
            if zero_end > old_size && !preallocated_tail {
                // Zeroed before the size is published, so a crash never shows old bytes.
                m.header.size = new_size;
                let zeroed = self.zero_range(&mut m, old_size, zero_end - old_size, false);
                m.header.size = old_size;
                zeroed?;
            }
            self.preallocate_locked(
                &mut m,
                old_size,
                new_size,
                preallocation,
                backing_end > old_size,
            )?;
            return self.publish_size(&mut m, new_size);
        }
        // Shrink: everything past the new end must be unallocated, or the caller accepts the loss.
        let lost = self.allocated_in_range(new_size, old_size - new_size)?;
        if lost && !allow_data_loss {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!(
                    "shrinking to {new_size} bytes would drop allocated data; ask for it explicitly"
                ),
            });
        }
        let cs = self.cluster_size();
        let first_whole = new_size.next_multiple_of(cs);
        let freed = if first_whole < old_size {
            self.discard_for_shrink(first_whole, old_size)?
        } else {
            Vec::new()
        };
        let mut m = self.meta_mut();
        self.publish_size(&mut m, new_size)?;
        self.truncate_after_last_cluster(&mut m)?;
        let cs = m.header.cluster_size();
        let freed: Vec<(u64, u64)> = freed.iter().map(|&offset| (offset, cs)).collect();
        self.punch_freed(&mut m, &freed, "giving freed clusters back after a shrink")
    }

    /// After a shrink, the file ends after its last cluster in use, as QEMU leaves it. The
    /// clusters cut off have refcount 0 and nothing durable maps them (the shrink flushed its
    /// unmapping), so a cut before or after the truncation is sound.
    fn truncate_after_last_cluster(&self, m: &mut Meta) -> Result<()> {
        self.flush_all(m)?;
        let cs = m.header.cluster_size();
        let host = self.host();
        let mut end = m.ws()?.alloc_end.min(m.file_len.div_ceil(cs));
        while end > 0 && m.ws_mut()?.refcounts.get(host, end - 1)? == 0 {
            end -= 1;
        }
        let len = end * cs;
        if len < m.file_len {
            self.storage
                .set_len(len)
                .map_err(|e| Error::io(&self.name, "truncating the file after a shrink", e))?;
            m.file_len = len;
            m.ws_mut()?.alloc_end = end;
        }
        Ok(())
    }

    /// Whether any part of a range is allocated in this image itself (data or zero flags).
    fn allocated_in_range(&self, offset: u64, len: u64) -> Result<bool> {
        let m = self.meta();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (run, n) = self.lookup(&m, m.active(), pos, end - pos)?;
            if !matches!(
                run,
                crate::image::layer::Run::Unallocated
                    | crate::image::layer::Run::UnallocatedAlloc { .. }
            ) {
                return Ok(true);
            }
            pos += n;
        }
        Ok(false)
    }

    /// Frees every cluster of `[start, end)` (cluster aligned) before the size drops. Returns
    /// the host clusters of data freed, in guest order.
    fn discard_for_shrink(&self, start: u64, end: u64) -> Result<Vec<u64>> {
        let mut m = self.meta_mut();
        let cs = m.header.cluster_size();
        let mut freed = Vec::new();
        let mut pos = start;
        while pos < end {
            let l1_index = (pos >> m.header.l1_shift()) as usize;
            let l1_span = 1u64 << m.header.l1_shift();
            if m.l1[l1_index] & OFFSET_MASK == 0 {
                pos = (pos / l1_span + 1) * l1_span;
                continue;
            }
            freed.extend(self.unmap_cluster(&mut m, pos)?);
            pos += cs;
        }
        // L2 tables that map nothing but the dropped area go too (QEMU frees them as well): the
        // zeroed L1 entries are written before the tables' refcounts drop (`free`'s ordering).
        let l1_span = 1u64 << m.header.l1_shift();
        let first_unused = start.div_ceil(l1_span) as usize;
        for l1_index in first_unused..m.l1.len() {
            let table = m.l1[l1_index] & OFFSET_MASK;
            if table == 0 {
                continue;
            }
            m.l1[l1_index] = 0;
            m.ws_mut()?.dirty_l1.insert(l1_index);
            self.free(&mut m, table, cs)?;
            let host = self.host();
            if m.ws_mut()?.refcounts.get(host, table / cs)? == 0 {
                self.l2_cache.remove(table);
            }
        }
        self.flush_all(&mut m)?;
        Ok(freed)
    }

    /// Writes the new virtual size into the header (a synced 8-byte write); bitmaps follow the
    /// size (`bitmap::resize`).
    fn publish_size(&self, m: &mut Meta, new_size: u64) -> Result<()> {
        self.flush_all(m)?;
        let changed = new_size != m.header.size;
        if changed {
            self.bitmaps_before_resize(m)?;
        }
        self.host()
            .write_sync(&new_size.to_be_bytes(), 24, "header size")?;
        m.header.size = new_size;
        if changed {
            self.bitmaps_after_resize(m)?;
        }
        Ok(())
    }

    /// Writes an L1 table of `len` entries (`entries`, then zeros) at `at`, in fresh clusters the
    /// caller has allocated. Only whole sectors holding entries are written: nothing reads an L1
    /// table past its size (QEMU writes new L1 tables the same way).
    pub(crate) fn write_new_l1(&self, entries: &[u64], len: usize, at: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut bytes = vec![0u8; (len * 8).next_multiple_of(512)];
        for (i, &e) in entries.iter().enumerate() {
            put_be_u64_at(&mut bytes, i, e);
        }
        self.host().write(&bytes, at, "new L1 table")
    }

    /// Moves the active L1 table to fresh clusters with `entries` entries.
    pub(crate) fn grow_l1(&self, m: &mut Meta, entries: u64) -> Result<()> {
        let cs = m.header.cluster_size();
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        self.mark_dirty(m)?;
        let new = self.alloc(m, clusters)?;
        self.flush_all(m)?;
        self.guard(m, new, clusters * cs, None)?;
        // Exactly the entries, as QEMU's resize writes them: a file that ends in the new table
        // ends where qemu-img's does.
        let mut table = vec![0u8; bytes as usize];
        for (i, &e) in m.l1.iter().enumerate() {
            put_be_u64_at(&mut table, i, e);
        }
        self.host().write(&table, new, "new L1 table")?;
        self.host().sync()?;
        let mut switch = [0u8; 12];
        switch[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        switch[4..].copy_from_slice(&new.to_be_bytes());
        self.host().write_sync(&switch, 36, "header L1 fields")?;
        let (old, old_len) = (m.header.l1_table_offset, m.header.l1_size as u64 * 8);
        m.header.l1_table_offset = new;
        m.header.l1_size = entries as u32;
        m.l1.resize(entries as usize, 0);
        if let Some(area) = m
            .metadata_areas
            .iter_mut()
            .find(|a| a.what == "the active L1 table")
        {
            area.start = new;
            area.end = new + clusters * cs;
        }
        // The header switch is durable, so the old table's clusters may be freed now.
        if old_len > 0 {
            let host = self.host();
            m.ws_mut()?.refcounts.adjust(host, old, old_len, -1)?;
        }
        Ok(())
    }
}
