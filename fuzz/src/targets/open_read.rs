//! `open_read`: arbitrary bytes as a whole image, opened and read every way a reader can.

use super::*;

/// L2 cache for fuzzed opens: small, so eviction paths run too (one table is always cached).
pub(crate) const OPEN_READ_L2_CACHE_BYTES: u64 = 64 << 10;
/// Disks up to this many bytes are read in full, cluster by cluster ...
pub(crate) const FULL_READ_MAX_BYTES: u64 = 64 << 20;
/// ... provided they have no more clusters than this (keeps one execution in milliseconds).
pub(crate) const FULL_READ_MAX_CLUSTERS: u64 = 4096;
/// Larger disks: only this many clusters at each end are read (plus `map` over all of it).
pub(crate) const EDGE_CLUSTERS: u64 = 64;
/// Snapshots whose contents are read; the rest are only opened (each open reads its L1 table).
pub(crate) const MAX_SNAPSHOTS_READ: usize = 8;
/// Bitmaps whose bits `open_read` reads.
pub(crate) const MAX_BITMAPS_READ: usize = 8;
/// Snapshots opened at all, so a table of thousands of entries sharing one huge L1 stays cheap.
pub(crate) const MAX_SNAPSHOTS_OPENED: usize = 64;

/// Arbitrary bytes as a whole image file in memory → open (no host files), `info`, `map`, `check`,
/// reads of the active disk and of every snapshot.
///
/// Properties: never panics; `map` covers `[0, size)` exactly with ordered, non-empty, depth-0
/// extents; every range `map` calls zero or unallocated reads as zeros (no backing file is
/// attached, so unallocated means zeros).
pub fn open_read(data: &[u8]) {
    let storage = MemoryStorage::from_bytes(data.to_vec());
    let options = OpenOptions::metadata_only().l2_cache_bytes(OPEN_READ_L2_CACHE_BYTES);
    let Ok(image) = Image::from_storage(Box::new(storage), "fuzz", &options) else {
        return;
    };
    let _ = image.info();
    let size = image.size();
    let cluster_size = image.cluster_size();
    let extents = image.map(0, size).ok();
    if let Some(extents) = &extents {
        check_extents(extents, size, "active layer");
    }
    let _ = image.check();
    read_disk(size, cluster_size, extents.as_deref(), |buf, offset| {
        image.read_at(buf, offset).is_ok()
    });
    // Bitmap tables and data clusters are read only when bits are asked for.
    for bitmap in image.bitmaps().iter().take(MAX_BITMAPS_READ) {
        if let Ok(dirty) = image.dirty_extents(&bitmap.name, 0, size) {
            let mut end = 0;
            for &(start, len) in &dirty {
                assert!(
                    start >= end && len > 0 && start + len <= size,
                    "bitmap {}: extent ({start:#x}, {len:#x}) after {end:#x}, disk {size:#x}",
                    bitmap.name
                );
                end = start + len;
            }
        }
    }

    let ids: Vec<String> = image
        .snapshot_entries()
        .iter()
        .take(MAX_SNAPSHOTS_OPENED)
        .map(|s| s.id_str())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let Ok(view) = image.open_snapshot(id) else {
            continue;
        };
        if i >= MAX_SNAPSHOTS_READ {
            continue;
        }
        let size = view.size();
        let extents = view.map(0, size).ok();
        if let Some(extents) = &extents {
            check_extents(extents, size, "snapshot");
        }
        read_disk(size, cluster_size, extents.as_deref(), |buf, offset| {
            view.read_at(buf, offset).is_ok()
        });
    }
}

/// `map` must tile `[0, size)` with ordered, non-empty extents of the image itself.
pub(crate) fn check_extents(extents: &[Extent], size: u64, layer: &str) {
    let mut pos = 0u64;
    for e in extents {
        assert_eq!(e.start, pos, "{layer}: extents must be contiguous: {e:?}");
        assert!(e.length > 0, "{layer}: empty extent {e:?}");
        assert_eq!(e.depth, 0, "{layer}: no backing file is attached: {e:?}");
        pos = e
            .start
            .checked_add(e.length)
            .expect("extent end overflows u64");
    }
    assert_eq!(pos, size, "{layer}: extents must end at the virtual size");
}

/// Reads a disk of `size` bytes cluster by cluster (or only its edges when large), checking that
/// ranges `map` calls zero read as zeros.
pub(crate) fn read_disk(
    size: u64,
    cluster_size: u64,
    extents: Option<&[Extent]>,
    mut read: impl FnMut(&mut [u8], u64) -> bool,
) {
    let clusters = size.div_ceil(cluster_size);
    let full = size <= FULL_READ_MAX_BYTES && clusters <= FULL_READ_MAX_CLUSTERS;
    let mut buf = vec![0u8; cluster_size as usize];
    let mut read_cluster = |index: u64| {
        let offset = index * cluster_size;
        let len = cluster_size.min(size - offset) as usize;
        buf[..len].fill(0xA5);
        if read(&mut buf[..len], offset) {
            if let Some(extents) = extents {
                check_zero_ranges(extents, offset, &buf[..len]);
            }
        }
    };
    if full {
        (0..clusters).for_each(&mut read_cluster);
    } else {
        let head = clusters.min(EDGE_CLUSTERS);
        let tail_start = clusters.saturating_sub(EDGE_CLUSTERS).max(head);
        (0..head).for_each(&mut read_cluster);
        (tail_start..clusters).for_each(&mut read_cluster);
    }
}

/// Every byte of `buf` (guest bytes at `offset`) inside a zero or unallocated extent must be 0.
pub(crate) fn check_zero_ranges(extents: &[Extent], offset: u64, buf: &[u8]) {
    let end = offset + buf.len() as u64;
    let first = extents.partition_point(|e| e.start + e.length <= offset);
    for e in extents[first..].iter().take_while(|e| e.start < end) {
        // `zero()`: explicitly zero, or unallocated (no backing file is attached here).
        if !e.zero() {
            continue;
        }
        let from = (e.start.max(offset) - offset) as usize;
        let to = ((e.start + e.length).min(end) - offset) as usize;
        if let Some(i) = buf[from..to].iter().position(|&b| b != 0) {
            panic!(
                "guest byte {:#x} reads {:#04x} but map says {:?}",
                offset + (from + i) as u64,
                buf[from + i],
                e
            );
        }
    }
}
