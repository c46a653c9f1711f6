//! The overlap guard: every write to the image file is checked against the metadata it must not
//! touch (header, L1 tables, refcount structures, snapshot table, cached L2 tables). A hit means
//! the metadata is already corrupt; the image is marked corrupt and the request fails instead of
//! destroying more data.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::features::Incompatible;
use crate::format::table::OFFSET_MASK;
use crate::image::refcounts::Refcounts;
use crate::image::{Image, Meta};

impl Image {
    /// Fails (and marks the image corrupt) when `[offset, offset + len)` overlaps metadata.
    /// `own_l2` is the L2 table being written back, which may of course overlap itself.
    pub(crate) fn guard(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
        own_l2: Option<u64>,
    ) -> Result<()> {
        if let Some(what) = self.overlap(m, offset, len, own_l2) {
            self.mark_corrupt(m);
            return Err(Error::corrupt(
                &self.name,
                "write",
                offset,
                format!("{len} bytes would overwrite {what}; the image is now marked corrupt"),
            ));
        }
        Ok(())
    }

    pub(crate) fn overlap(
        &self,
        m: &Meta,
        offset: u64,
        len: u64,
        own_l2: Option<u64>,
    ) -> Option<String> {
        let cs = m.header.cluster_size();
        let first = offset & !(cs - 1);
        let end = offset.saturating_add(len);
        if let Some(area) = m.overlapping_area(first, end - first) {
            return Some(area.what.to_string());
        }
        let mut cluster = first;
        while cluster < end {
            if let Some(ws) = &m.ws {
                if ws.refcounts.is_refblock(cluster) {
                    return Some(format!("the refcount block at {cluster:#x}"));
                }
            }
            if Some(cluster) != own_l2 && self.l2_cache.contains(cluster) {
                return Some(format!("the L2 table at {cluster:#x}"));
            }
            if let Some(s) = m.snapshots.iter().find(|s| {
                let l1_end = s.l1_table_offset + s.l1_size as u64 * 8;
                s.l1_size > 0 && cluster < l1_end && s.l1_table_offset < cluster + cs
            }) {
                return Some(format!("the L1 table of snapshot {}", s.id_str()));
            }
            cluster += cs;
        }
        None
    }

    /// Before the first write: no refcount block may lie on other metadata (the header, an L1
    /// or L2 table of any snapshot, the refcount or snapshot table, a bitmap structure), and no
    /// active L2 table on a refcount block or fixed metadata. Updating such a block or table
    /// would overwrite what the other structure holds (an L1 table: every guest cluster), so the
    /// image is refused for writing, as `qemu-img check` calls it corrupt; nothing is written.
    ///
    /// With `counts`, every cluster of that metadata counted free (refcount 0) is guarded: the
    /// allocator would hand it out to the next new table or data cluster and so overwrite it, so
    /// it refuses to, and marks the image corrupt. QEMU opens such an image too and fails at
    /// that allocation. (A dirty image, or one opened for `check -r all`, gets its refcounts
    /// rebuilt before any allocation instead.)
    pub(crate) fn check_layout(
        &self,
        m: &Meta,
        refcounts: &mut Refcounts,
        counts: bool,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let mut owner: HashMap<u64, String> = HashMap::new();
        let claim = |owner: &mut HashMap<u64, String>, start: u64, len: u64, what: &str| {
            let mut c = start & !(cs - 1);
            while c < start.saturating_add(len) {
                owner.entry(c).or_insert_with(|| what.to_string());
                c += cs;
            }
        };
        for a in &m.metadata_areas {
            claim(&mut owner, a.start, a.end - a.start, a.what);
        }
        let mut snapshot_l2: HashMap<u64, String> = HashMap::new();
        for s in &m.snapshots {
            let what = format!("the L1 table of snapshot {}", s.id_str());
            claim(&mut owner, s.l1_table_offset, s.l1_size as u64 * 8, &what);
            // Snapshot tables are checked when a snapshot is used; here they only name what
            // a refblock must not hit.
            if let Ok(l1) =
                self.read_table(s.l1_table_offset, s.l1_size as u64, "snapshot L1 table")
            {
                for e in l1 {
                    let l2 = e & OFFSET_MASK;
                    if l2 != 0 {
                        snapshot_l2
                            .entry(l2)
                            .or_insert_with(|| format!("an L2 table of snapshot {}", s.id_str()));
                    }
                }
            }
        }
        let fixed = owner.clone();
        for (i, &e) in m.l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Some(what) = fixed.get(&(l2 & !(cs - 1))) {
                return Err(Error::corrupt(
                    &self.name,
                    format!("active L1 entry {i}"),
                    m.header.l1_table_offset + i as u64 * 8,
                    format!("its L2 table at {l2:#x} lies on {what}"),
                ));
            }
            owner
                .entry(l2)
                .or_insert_with(|| "an active L2 table".into());
        }
        for (l2, what) in snapshot_l2 {
            owner.entry(l2).or_insert(what);
        }
        // Unaligned refblocks fail (and mark the image corrupt) only when a refcount there is
        // needed, as in QEMU; they are not metadata areas of their own.
        let blocks: Vec<(usize, u64)> = refcounts
            .refblocks()
            .filter(|&(_, b)| b % cs == 0)
            .collect();
        for &(i, block) in &blocks {
            if let Some(what) = owner.get(&block) {
                return Err(Error::corrupt(
                    &self.name,
                    format!("refcount table entry {i}"),
                    m.header.refcount_table_offset + i as u64 * 8,
                    format!("its refcount block at {block:#x} lies on {what}"),
                ));
            }
            owner.insert(block, "a refcount block".into());
        }
        if !counts {
            return Ok(());
        }
        let mut clusters: Vec<(&u64, &String)> = owner.iter().collect();
        clusters.sort();
        for (&cluster, what) in clusters {
            let refcount = match refcounts.get(self.host(), cluster >> m.header.cluster_bits) {
                Err(e) if e.marks_image_corrupt() => continue,
                other => other?,
            };
            if refcount == 0 {
                refcounts.guard_counted_free(cluster >> m.header.cluster_bits, what);
            }
        }
        Ok(())
    }

    /// Sets the corrupt bit on disk (best effort: the caller is already failing).
    pub(crate) fn mark_corrupt(&self, m: &mut Meta) {
        m.header.incompatible_features |= Incompatible::CORRUPT;
        let _ = self.host().write_sync(
            &m.header.incompatible_features.to_be_bytes(),
            72,
            "header incompatible features",
        );
    }
}
