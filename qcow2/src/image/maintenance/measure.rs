//! How large a qcow2 file must be (`qemu-img measure`): the metadata a fully allocated image of a
//! virtual size needs, the clusters a source's data takes, and the room its persistent bitmaps
//! take. The arithmetic is QEMU's, so the answers are qemu-img's to the byte.

use crate::format::bitmap::data_bytes;
use crate::image::{Extent, Image};

/// What a new qcow2 file is measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeasureTarget {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits (1 to 64).
    pub refcount_bits: u32,
    /// Extended L2 entries (16 bytes instead of 8).
    pub extended_l2: bool,
    /// Every data cluster counts as written (`preallocation=falloc` or `full`), or the new image
    /// has a backing file whose content may differ from the source's (QEMU's worst case).
    pub all_data: bool,
}

impl MeasureTarget {
    /// A target with `cluster_size`-byte clusters, 16-bit refcounts, standard L2 entries, and
    /// only the source's written data counted.
    pub fn new(cluster_size: u64) -> Self {
        MeasureTarget {
            cluster_size,
            refcount_bits: 16,
            extended_l2: false,
            all_data: false,
        }
    }
}

setters!(MeasureTarget {
    cluster_size: u64,
    refcount_bits: u32,
    extended_l2: bool,
    all_data: bool,
});

/// The sizes `qemu-img measure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the new file needs for the source's data and every metadata structure.
    pub required: u64,
    /// Bytes a fully allocated file of the same virtual size takes.
    pub fully_allocated: u64,
}

/// Refcount table and block bytes that count `clusters` clusters and themselves: the fixed point
/// where no further block or table cluster is needed (QEMU's `qcow2_refcount_metadata_size`).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_bits: u32) -> u64 {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = cluster_size * 8 / u64::from(refcount_bits.max(1));
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// The size of a fully allocated image of `virtual_size` bytes: one header cluster, every L2
/// table, the L1 table, refcount metadata and the data (QEMU's `qcow2_calc_prealloc_size`).
pub fn fully_allocated_size(virtual_size: u64, target: &MeasureTarget) -> u64 {
    let cs = target.cluster_size;
    let aligned = virtual_size.next_multiple_of(cs);
    let l2_entry = if target.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = (aligned / cs).next_multiple_of(cs / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries = (l2_entries * l2_entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, target.refcount_bits);
    meta + aligned
}

/// Data bytes of a source with these extents (its whole disk, `size` bytes) in whole clusters
/// of the target, as QEMU counts them: a data extent runs on to the end of its last cluster,
/// and zero or unallocated ranges count nothing.
pub fn data_clusters_size(extents: &[Extent], size: u64, cluster_size: u64) -> u64 {
    let mut required = 0;
    let mut offset = 0;
    let mut i = 0;
    while offset < size {
        while i < extents.len() && extents[i].start + extents[i].length <= offset {
            i += 1;
        }
        let Some(e) = extents.get(i) else { break };
        let mut pnum = e.start + e.length - offset;
        if !e.zero() && e.data() {
            pnum = (offset + pnum).next_multiple_of(cluster_size) - offset;
            required += offset % cluster_size + pnum;
        }
        offset += pnum;
    }
    required
}

/// `qemu-img measure` for a qcow2 target: `source` is the source disk's extents and size, or
/// `None` for a new, empty image of `size` bytes.
pub fn measure(size: u64, source: Option<&[Extent]>, target: &MeasureTarget) -> Measure {
    let cs = target.cluster_size;
    let virtual_size = size.next_multiple_of(cs);
    let data = match source {
        _ if target.all_data => virtual_size,
        Some(extents) => data_clusters_size(extents, size, cs),
        None => 0,
    };
    let fully_allocated = fully_allocated_size(virtual_size, target);
    Measure {
        required: fully_allocated - virtual_size + data,
        fully_allocated,
    }
}

impl Image {
    /// Room the image's persistent bitmaps would take in a qcow2 file of `cluster_size`: every
    /// bitmap whole, its table, and the directory (QEMU's estimate for `qemu-img measure`).
    pub fn bitmaps_size(&self, cluster_size: u64) -> u64 {
        let mut total = 0;
        let mut directory = 0;
        for b in self.bitmaps() {
            let bits = b.granularity.trailing_zeros() as u8;
            let clusters = data_bytes(self.size(), bits).div_ceil(cluster_size);
            total += clusters * cluster_size;
            total += (clusters * 8).next_multiple_of(cluster_size);
            directory += (24 + b.name.len() as u64).next_multiple_of(8);
        }
        total + directory.next_multiple_of(cluster_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(cluster_size: u64) -> MeasureTarget {
        MeasureTarget {
            cluster_size,
            refcount_bits: 16,
            extended_l2: false,
            all_data: false,
        }
    }

    /// Figures `qemu-img measure` 10 prints for these sizes.
    #[test]
    fn new_images_measure_as_qemu_img_measures_them() {
        let m = measure(1 << 30, None, &target(65536));
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        let m = measure(1000, None, &target(65536));
        assert_eq!((m.required, m.fully_allocated), (327680, 393216));
        let m = measure(64 << 20, None, &target(65536));
        assert_eq!(m.fully_allocated, 67436544);
    }
}
