//! What a compat=0.10 image cannot hold, removed or refused before `amend` rewrites the header
//! as version 2: zero clusters (a v3 feature) become what v2 can say, in the active layer and in
//! every snapshot's tables, as QEMU's `qcow2_expand_zero_clusters` does.
//!
//! The active layer goes through the ordinary write path: zeros are written (or the entry is
//! cleared where nothing shows through), copying shared tables and clusters on write. A
//! snapshot's L2 tables have no write path; each one is rewritten in place, which is safe
//! because every entry reads as zeros before and after its change:
//! - a plain zero cluster without a backing file becomes unallocated;
//! - otherwise the entry gets a host cluster of written zeros: its own preallocated cluster
//!   when this table holds every reference to it, else a fresh one whose refcount (one per L1
//!   table that reaches the table) is durable before the table names it;
//! - references the rewrite drops are released only once the table is durable.
//!
//! So a power cut leaves at worst leaked clusters. (QEMU writes zeros into a preallocated
//! cluster even when another table still reads data from it.)

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::format::table::{
    be_u64_at, classify_standard, put_be_u64_at, ClusterMapping, OFFSET_MASK, ZERO,
};
use crate::image::map::ExtentKind;
use crate::image::{Image, Meta};

impl Image {
    /// QEMU's rule for snapshots in a v2 image: v2 readers need not know the extra data, so
    /// every snapshot must have the current disk size and a VM state that fits 32 bits.
    pub(crate) fn snapshots_allow_downgrade(&self) -> Result<()> {
        let m = self.meta();
        let size = m.header.size;
        if m.snapshots.iter().any(|s| {
            s.vm_state_size() > u64::from(u32::MAX) || s.disk_size().unwrap_or(size) != size
        }) {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "Internal snapshots prevent downgrade of image".into(),
            });
        }
        Ok(())
    }

    /// Whether a snapshot's tables hold a compressed cluster (which a v2 header, having no
    /// compression type, would read as zlib).
    pub(crate) fn snapshots_have_compressed(&self) -> Result<bool> {
        let m = self.meta();
        let cs = m.header.cluster_size();
        let mut seen = HashSet::new();
        for s in &m.snapshots {
            let l1 = self.read_table(s.l1_table_offset, s.l1_size as u64, "snapshot L1 table")?;
            for (j, e) in l1.iter().enumerate() {
                let t = e & OFFSET_MASK;
                if t == 0 || !seen.insert(t) {
                    continue;
                }
                let table = self.l2_table(&m, t, j as u64, s.l1_table_offset)?;
                if (0..(cs / 8) as usize).any(|i| {
                    matches!(
                        classify_standard(be_u64_at(&table, i), false),
                        ClusterMapping::Compressed { .. }
                    )
                }) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Expands the zero clusters of the active layer, then of every snapshot; `progress` hears
    /// (L1 entries visited, L1 entries in all), as QEMU counts them.
    pub(crate) fn expand_zero_clusters(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let (l1_len, span, size, total) = {
            let m = self.meta();
            let total =
                m.l1.len() as u64 + m.snapshots.iter().map(|s| s.l1_size as u64).sum::<u64>();
            (
                m.l1.len() as u64,
                1u64 << m.header.l1_shift(),
                m.header.size,
                total,
            )
        };
        let mut visited = 0;
        for i in 0..l1_len {
            let start = i * span;
            if start < size {
                self.expand_active_range(start, span.min(size - start))?;
            }
            visited += 1;
            progress(visited, total);
        }
        let mut m = self.meta_mut();
        // Snapshot tables are read from disk: every cached change must be there first.
        self.flush_all(&mut m)?;
        let snapshots = m.snapshots.clone();
        let mut done = HashSet::new();
        for s in &snapshots {
            let l1 = self.read_table(s.l1_table_offset, s.l1_size as u64, "snapshot L1 table")?;
            for (j, e) in l1.iter().enumerate() {
                let t = e & OFFSET_MASK;
                if t != 0 && done.insert(t) {
                    self.expand_snapshot_l2(&mut m, t, j as u64, s.l1_table_offset)?;
                }
                visited += 1;
                progress(visited, total);
            }
        }
        Ok(())
    }

    /// Zero clusters of the active layer in `[start, start + len)` as v2 can hold them: without
    /// a backing file an unallocated cluster reads as zeros; otherwise (or where a host cluster
    /// stays preallocated) zeros are written.
    fn expand_active_range(&self, start: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let has_backing = self.backing.is_some();
        let zeros: Vec<(u64, u64, bool)> = self
            .map(start, len)?
            .into_iter()
            .filter(|e| e.depth == 0)
            .filter_map(|e| match e.kind {
                ExtentKind::Zero { host_offset } => {
                    Some((e.start, e.length, host_offset.is_some() || has_backing))
                }
                _ => None,
            })
            .collect();
        let buf = vec![0u8; cs as usize];
        for (start, len, write) in zeros {
            let mut pos = start;
            while pos < start + len {
                let n = cs.min(start + len - pos);
                if write {
                    self.write_at(&buf[..n as usize], pos)?;
                } else {
                    let mut m = self.meta_mut();
                    self.mark_dirty(&mut m)?;
                    self.link_cluster(&mut m, pos, 0, 0)?;
                    self.keep_cache_bounded(&mut m)?;
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// Rewrites the snapshot L2 table at `t` (named by entry `l1_index` of the L1 table at
    /// `l1_offset`) without zero clusters; see the module docs for the order of writes.
    fn expand_snapshot_l2(
        &self,
        m: &mut Meta,
        t: u64,
        l1_index: u64,
        l1_offset: u64,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let old = self.l2_table(m, t, l1_index, l1_offset)?.to_vec();
        let host = self.host();
        // Every L1 table that reaches this table reaches its clusters through it.
        let l2_refs = m.ws_mut()?.refcounts.get(host, t / cs)?;
        if l2_refs == 0 {
            return Err(Error::corrupt(
                &self.name,
                format!("L1 entry {l1_index}"),
                l1_offset + l1_index * 8,
                format!("the snapshot L2 table at {t:#x} has a refcount of 0"),
            ));
        }
        let has_backing = self.backing.is_some();
        let mut table = old.clone();
        let mut released = Vec::new();
        let mut changed = false;
        for i in 0..(cs / 8) as usize {
            let entry = be_u64_at(&old, i);
            let preallocated = match classify_standard(entry, false) {
                ClusterMapping::Zero => None,
                ClusterMapping::ZeroAllocated { host_offset } => Some(host_offset),
                _ => continue,
            };
            if let Some(h) = preallocated {
                if h % cs != 0 {
                    return Err(Error::corrupt(
                        &self.name,
                        format!("snapshot L2 table at {t:#x}"),
                        t + i as u64 * 8,
                        format!("zero cluster offset {h:#x} is not cluster aligned"),
                    ));
                }
            }
            let own = match preallocated {
                Some(h) => m.ws_mut()?.refcounts.get(host, h / cs)? == l2_refs,
                None => false,
            };
            let new = match preallocated {
                Some(h) if own => {
                    self.guard(m, h, cs, None)?;
                    host.write_zeroes(h, cs, "a zero cluster being expanded")?;
                    entry & !ZERO
                }
                _ if !has_backing => 0,
                _ => {
                    let n = self.alloc(m, 1)?;
                    if l2_refs > 1 {
                        m.ws_mut()?
                            .refcounts
                            .adjust(host, n, cs, l2_refs as i64 - 1)?;
                    }
                    self.guard(m, n, cs, None)?;
                    host.write_zeroes(n, cs, "a zero cluster being expanded")?;
                    n
                }
            };
            if let (Some(h), false) = (preallocated, own) {
                released.push(h);
            }
            put_be_u64_at(&mut table, i, new);
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        // New clusters hold their zeros and their refcounts before the table names them.
        self.flush_refblocks(m)?;
        host.sync()?;
        self.guard(m, t, cs, Some(t))?;
        host.write(&table, t, "snapshot L2 table")?;
        host.sync()?;
        // A cached copy (the table may be shared with the active layer) is stale now.
        self.l2_cache.remove(t);
        for h in released {
            m.ws_mut()?
                .refcounts
                .adjust(host, h, cs, -(l2_refs as i64))?;
        }
        self.flush_refblocks(m)?;
        host.sync()
    }
}
