//! Completing snapshot table entries for v3: each entry must carry at least the 64-bit VM state
//! size and the disk size as extra data. A v2 table (upgraded by `amend`, or a v2 file whose
//! version was patched, repaired by `check -r all`) gets QEMU's 24 known bytes for every entry
//! shorter than that: the VM state size it had, the current disk size where none was recorded,
//! and no instruction count (-1) — what QEMU writes for them.
//!
//! The new table goes to fresh clusters, durable with its refcounts before the 12-byte header
//! write (snapshot count and table offset) switches to it; the old table is freed afterwards. A
//! cut leaves the old table or the new one, and at worst leaked clusters.

use crate::error::Result;
use crate::format::limits::SNAPSHOT_EXTRA_KNOWN_SIZE;
use crate::format::snapshot::{encode_table, SnapshotEntry};
use crate::image::{Image, Meta, MetadataArea};

/// Header offset of the snapshot count; the table offset follows it.
const NB_SNAPSHOTS_OFFSET: u64 = 60;

/// `entry` with QEMU's 24 known bytes of extra data, if it has fewer.
fn completed(entry: &SnapshotEntry, disk_size: u64) -> Option<SnapshotEntry> {
    if entry.extra.len() >= SNAPSHOT_EXTRA_KNOWN_SIZE {
        return None;
    }
    let mut extra = Vec::with_capacity(SNAPSHOT_EXTRA_KNOWN_SIZE);
    extra.extend_from_slice(&entry.vm_state_size().to_be_bytes());
    extra.extend_from_slice(&entry.disk_size().unwrap_or(disk_size).to_be_bytes());
    extra.extend_from_slice(&u64::MAX.to_be_bytes());
    Some(SnapshotEntry {
        extra,
        ..entry.clone()
    })
}

impl Image {
    /// Gives every short snapshot entry QEMU's known extra data (see the module); returns
    /// whether the table changed.
    pub(crate) fn complete_snapshot_entries(&self, m: &mut Meta) -> Result<bool> {
        let size = m.header.size;
        if m.snapshots.iter().all(|s| completed(s, size).is_none()) {
            return Ok(false);
        }
        let entries: Vec<SnapshotEntry> = m
            .snapshots
            .iter()
            .map(|s| completed(s, size).unwrap_or_else(|| s.clone()))
            .collect();
        let cs = m.header.cluster_size();
        let table = encode_table(&entries);
        let clusters = (table.len() as u64).div_ceil(cs);
        self.mark_dirty(m)?;
        let at = self.alloc(m, clusters)?;
        self.guard(m, at, clusters * cs, None)?;
        self.host().write(&table, at, "completed snapshot table")?;
        // The table and its refcounts are durable before the header names it.
        self.flush_all(m)?;
        self.flush_refblocks(m)?;
        let mut switch = [0u8; 12];
        switch[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        switch[4..].copy_from_slice(&at.to_be_bytes());
        self.host()
            .write_sync(&switch, NB_SNAPSHOTS_OFFSET, "header snapshot table fields")?;
        let (old_at, old_len) = (m.header.snapshots_offset, m.snapshot_table_len);
        m.header.snapshots_offset = at;
        m.snapshot_table_len = table.len() as u64;
        m.snapshots = entries;
        m.metadata_areas.retain(|a| a.what != "the snapshot table");
        m.metadata_areas.push(MetadataArea {
            start: at,
            end: at + clusters * cs,
            what: "the snapshot table",
        });
        if old_len > 0 {
            self.free(m, old_at, old_len)?;
        }
        self.flush_all(m)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(extra: Vec<u8>) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 1,
            id: b"1".to_vec(),
            name: b"sn0".to_vec(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size32: 7,
            extra,
        }
    }

    #[test]
    fn short_entries_get_qemus_known_extra_data() {
        let e = completed(&entry(Vec::new()), 1 << 20).unwrap();
        assert_eq!(e.vm_state_size(), 7);
        assert_eq!(e.disk_size(), Some(1 << 20));
        assert_eq!(e.extra[16..], [0xff; 8]);
        let e = completed(&entry(9u64.to_be_bytes().to_vec()), 1 << 20).unwrap();
        assert_eq!((e.vm_state_size(), e.extra.len()), (9, 24));
        assert!(completed(&entry(vec![0; 24]), 1 << 20).is_none());
        assert!(completed(&entry(vec![0; 50]), 1 << 20).is_none());
    }
}
