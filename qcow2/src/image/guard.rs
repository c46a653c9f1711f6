//! The overlap guard: every write to the image file is checked against the metadata it must not
//! touch (header, L1 tables, refcount structures, snapshot table, cached L2 tables). A hit means
//! the metadata is already corrupt; the image is marked corrupt and the request fails instead of
//! destroying more data.

use super::{Image, Meta};
use crate::error::{Error, Result};
use crate::format::features::Incompatible;

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

    fn overlap(&self, m: &Meta, offset: u64, len: u64, own_l2: Option<u64>) -> Option<String> {
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
