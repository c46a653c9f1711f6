//! Write-back of cached metadata in crash-safe order, enforced by dependencies between the L2
//! cache and the refblock cache rather than by each call site:
//!
//! - a refcount increase is durable before an L2 entry that needs it (`l2_after_refblocks`);
//! - an L2 entry's removal is durable before the refcount drops (`refblocks_after_l2`);
//! - new guest data is durable before the L2 entry that points at it (`l2_after_data_sync`);
//! - a new L2 table is durable before the L1 entry that publishes it: L1 entries changed in
//!   memory (`dirty_l1`) are written after the L2 tables, so a new table costs no sync of its own
//!   (a sync there would also write back every dirty guest page the host holds).
//!
//! The two cache dependencies never hold at once: setting one first satisfies the other by
//! writing back, so a crash at any point leaves at worst leaked clusters.

use std::collections::BTreeSet;

use crate::error::Result;
use crate::format::features::Incompatible;
use crate::image::host::Host;
use crate::image::refcounts::Refcounts;
use crate::image::{Image, Meta};
use crate::storage::Event;

/// The writer's state: refcounts and the order in which cached metadata must reach the disk.
pub(crate) struct WriteState {
    pub refcounts: Refcounts,
    /// First cluster index past the file and every allocated cluster.
    pub alloc_end: u64,
    pub l2_after_refblocks: bool,
    pub refblocks_after_l2: bool,
    pub l2_after_data_sync: bool,
    /// Active L1 entries changed in memory and not yet on disk (new L2 tables to publish).
    pub dirty_l1: BTreeSet<usize>,
    /// Lazy refcounts: refblocks reach the disk only on close; the dirty bit covers the gap.
    pub lazy: bool,
}

impl Image {
    pub(crate) fn host(&self) -> Host<'_> {
        Host {
            storage: &*self.storage,
            name: &self.name,
        }
    }

    /// Writes back every dirty refblock (after the L2 tables they depend on) and syncs.
    pub(crate) fn flush_refblocks(&self, m: &mut Meta) -> Result<()> {
        if m.ws()?.refblocks_after_l2 {
            self.flush_l2(m)?;
        }
        let host = self.host();
        let ws = m.ws_mut()?;
        if ws.refcounts.has_dirty() {
            ws.refcounts.write_dirty(host)?;
            host.sync()?;
        }
        ws.l2_after_refblocks = false;
        ws.refcounts.trim(1024);
        Ok(())
    }

    /// Writes back every dirty L2 table (after the refblocks and data they depend on) and syncs,
    /// then the L1 entries that publish new tables, and syncs again.
    pub(crate) fn flush_l2(&self, m: &mut Meta) -> Result<()> {
        // Bitmap bits covering the data these tables publish go first (`bitmap::durable`).
        self.bitmaps_write_pending(m)?;
        let ws = m.ws()?;
        if ws.l2_after_refblocks && !ws.lazy {
            self.flush_refblocks(m)?;
        }
        let dirty = self.l2_cache.dirty_tables();
        let host = self.host();
        if !dirty.is_empty() {
            if m.ws()?.l2_after_data_sync {
                self.cover_allocated_clusters(m)?;
                host.sync()?;
            }
            for (offset, table) in &dirty {
                self.guard(m, *offset, table.len() as u64, Some(*offset))?;
                self.storage.event(Event::L2Update);
                host.write(table, *offset, "L2 table")?;
            }
            host.sync()?;
            for (offset, _) in &dirty {
                self.l2_cache.mark_clean(*offset);
            }
        }
        self.write_dirty_l1(m)?;
        let ws = m.ws_mut()?;
        ws.refblocks_after_l2 = false;
        ws.l2_after_data_sync = false;
        Ok(())
    }

    /// Extends the file (sparsely) over every allocated cluster before tables publish them: a
    /// partial write into a new cluster past the end of the file writes only its bytes, and a
    /// reader other than QEMU must still find the whole cluster in the file, reading zeros.
    fn cover_allocated_clusters(&self, m: &mut Meta) -> Result<()> {
        let end = m.ws()?.alloc_end * m.header.cluster_size();
        let len = self.storage.len().map_err(|e| {
            crate::error::Error::io(&self.name, "reading the image file's length", e)
        })?;
        if len < end {
            self.storage.set_len(end).map_err(|e| {
                crate::error::Error::io(&self.name, "extending the file over new clusters", e)
            })?;
            m.file_len = m.file_len.max(end);
        }
        Ok(())
    }

    /// Writes the changed span of the active L1 table in one write and syncs. Entries between
    /// changed ones hold what the disk holds already.
    fn write_dirty_l1(&self, m: &mut Meta) -> Result<()> {
        let ws = m.ws_mut()?;
        let (Some(&first), Some(&last)) = (ws.dirty_l1.first(), ws.dirty_l1.last()) else {
            return Ok(());
        };
        ws.dirty_l1.clear();
        let mut bytes = Vec::with_capacity((last - first + 1) * 8);
        for e in &m.l1[first..=last] {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        let at = m.header.l1_table_offset + first as u64 * 8;
        self.storage.event(Event::L1Update);
        self.host().write_sync(&bytes, at, "L1 entries")
    }

    /// Declares that L2 entries about to be written need refcounts raised in the cache.
    pub(crate) fn l2_needs_refblocks(&self, m: &mut Meta) -> Result<()> {
        if m.ws()?.refblocks_after_l2 {
            self.flush_refblocks(m)?;
        }
        let ws = m.ws_mut()?;
        if !ws.lazy {
            ws.l2_after_refblocks = true;
        }
        Ok(())
    }

    /// Declares that refcounts about to drop lose references removed from cached L2 tables.
    pub(crate) fn refblocks_need_l2(&self, m: &mut Meta) -> Result<()> {
        if m.ws()?.l2_after_refblocks {
            self.flush_l2(m)?;
        }
        m.ws_mut()?.refblocks_after_l2 = true;
        Ok(())
    }

    /// Writes everything back in order and syncs.
    pub(crate) fn flush_all(&self, m: &mut Meta) -> Result<()> {
        if m.ws.is_none() {
            return Ok(());
        }
        self.flush_l2(m)?;
        if !m.ws()?.lazy {
            self.flush_refblocks(m)?;
        }
        self.host().sync()
    }

    /// Sets the dirty bit (lazy refcounts) before the first change that relies on it.
    pub(crate) fn mark_dirty(&self, m: &mut Meta) -> Result<()> {
        if m.ws()?.lazy && !m.header.is_dirty() {
            m.header.incompatible_features |= Incompatible::DIRTY;
            self.host().write_sync(
                &m.header.incompatible_features.to_be_bytes(),
                72,
                "header incompatible features",
            )?;
        }
        Ok(())
    }

    /// A clean close: everything written back, refcounts included, then the dirty bit cleared.
    pub(crate) fn close_clean(&self, m: &mut Meta) -> Result<()> {
        if m.ws.is_none() {
            return Ok(());
        }
        self.flush_l2(m)?;
        let lazy = m.ws()?.lazy;
        m.ws_mut()?.lazy = false;
        self.flush_refblocks(m)?;
        let stored = self.bitmaps_store(m);
        m.ws_mut()?.lazy = lazy;
        stored?;
        if m.header.is_dirty() {
            m.header.incompatible_features &= !Incompatible::DIRTY;
            self.host().write_sync(
                &m.header.incompatible_features.to_be_bytes(),
                72,
                "header incompatible features",
            )?;
        }
        self.host().sync()
    }
}
