//! L1 and L2 entries (standard and extended) and their classification, as pure functions of the
//! entry bits. The image layer adds the checks that need the file (EOF, overlaps).

use super::limits::SUBCLUSTERS_PER_CLUSTER;

/// Bit 63: the table or cluster the entry points at has refcount exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros (v3).
pub const ZERO: u64 = 1;
/// Host offset bits of L1 and L2 entries (9..=55).
pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// Bits of an L1 entry that must be zero.
pub const L1_RESERVED_MASK: u64 = 0x7F00_0000_0000_01FF;
/// Bits of a standard L2 entry (not compressed) that must be zero.
pub const L2_STD_RESERVED_MASK: u64 = 0x3F00_0000_0000_01FE;
/// Bits of a reftable entry that must be zero.
pub const REFTABLE_RESERVED_MASK: u64 = 0x1FF;
/// Offset bits of a reftable entry.
pub const REFTABLE_OFFSET_MASK: u64 = !REFTABLE_RESERVED_MASK;

/// An L1 entry: points at an L2 table or is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Host offset of the L2 table, or 0 when there is none.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Bit 63, COPIED: the L2 table's refcount is exactly 1, so it may be written in place.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The bits the spec reserves (must be zero); non-zero means corruption.
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// What one standard L2 entry (or word 0 of an extended one) says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros, no host cluster.
    Zero,
    /// Reads as zeros; a host cluster stays preallocated.
    ZeroAllocated {
        /// Host offset of the preallocated cluster, cluster-aligned.
        host_offset: u64,
    },
    /// Guest data at this host offset.
    Normal {
        /// Host offset of the data cluster, cluster-aligned.
        host_offset: u64,
    },
    /// Compressed data.
    Compressed {
        /// The entry without its flag bits: host offset and sector count, decoded by
        /// [`CompressedDescriptor::decode`](super::CompressedDescriptor::decode).
        descriptor: u64,
    },
}

/// Classifies a standard L2 entry. With `external_data` set, offset 0 with COPIED is a real
/// cluster at host offset 0, as QEMU writes for raw external data files.
pub fn classify_standard(entry: u64, external_data: bool) -> ClusterMapping {
    if entry & COMPRESSED != 0 {
        return ClusterMapping::Compressed {
            descriptor: entry & !(COPIED | COMPRESSED),
        };
    }
    let host_offset = entry & OFFSET_MASK;
    let allocated = host_offset != 0 || (external_data && entry & COPIED != 0);
    match (entry & ZERO != 0, allocated) {
        (true, false) => ClusterMapping::Zero,
        (true, true) => ClusterMapping::ZeroAllocated { host_offset },
        (false, false) => ClusterMapping::Unallocated,
        (false, true) => ClusterMapping::Normal { host_offset },
    }
}

/// The state of one subcluster of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at the cluster's host offset plus the subcluster's position.
    Allocated,
    /// Both the allocation and the zero bit are set, or an allocation bit without a host cluster.
    Invalid,
}

/// The subcluster bitmap word of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Bits 0..32: subcluster `n` is allocated when bit `n` is set.
    pub fn alloc_bits(self) -> u32 {
        self.0 as u32
    }

    /// Bits 32..64: subcluster `n` reads as zeros when bit `32 + n` is set.
    pub fn zero_bits(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The state of subcluster `index` (0..32) of a cluster whose host offset is `host_offset`.
    pub fn state(self, index: u32, cluster_allocated: bool) -> SubclusterState {
        debug_assert!(index < SUBCLUSTERS_PER_CLUSTER);
        let alloc = self.alloc_bits() >> index & 1 != 0;
        let zero = self.zero_bits() >> index & 1 != 0;
        match (alloc, zero) {
            (true, true) => SubclusterState::Invalid,
            (true, false) if !cluster_allocated => SubclusterState::Invalid,
            (true, false) => SubclusterState::Allocated,
            (false, true) => SubclusterState::Zero,
            (false, false) => SubclusterState::Unallocated,
        }
    }

    /// Whether the bitmap is consistent for a cluster with or without a host offset.
    pub fn is_valid(self, cluster_allocated: bool) -> bool {
        self.alloc_bits() & self.zero_bits() == 0 && (cluster_allocated || self.alloc_bits() == 0)
    }

    /// The number of subclusters from `index` on that share its state (a run, for extent maps).
    pub fn run_length(self, index: u32, cluster_allocated: bool) -> u32 {
        let first = self.state(index, cluster_allocated);
        (index + 1..SUBCLUSTERS_PER_CLUSTER)
            .take_while(|&i| self.state(i, cluster_allocated) == first)
            .count() as u32
            + 1
    }
}

/// Entry `index` of an L2 table held as raw bytes: word 0, the subcluster bitmap (0 for standard
/// entries) and what word 0 maps to. Extended entries ignore the zero flag, as QEMU does: their
/// bitmap says what reads as zeros.
pub fn l2_entry(
    table: &[u8],
    index: usize,
    extended: bool,
    external_data: bool,
) -> (u64, u64, ClusterMapping) {
    if extended {
        let raw = be_u64_at(table, index * 2);
        let bitmap = be_u64_at(table, index * 2 + 1);
        (raw, bitmap, classify_standard(raw & !ZERO, external_data))
    } else {
        let raw = be_u64_at(table, index);
        (raw, 0, classify_standard(raw, external_data))
    }
}

/// Reads big-endian u64 number `index` of a table held as raw bytes.
#[inline]
pub fn be_u64_at(bytes: &[u8], index: usize) -> u64 {
    let start = index * 8;
    u64::from_be_bytes(bytes[start..start + 8].try_into().expect("8 bytes"))
}

/// Writes big-endian u64 number `index` of a table held as raw bytes.
#[inline]
pub fn put_be_u64_at(bytes: &mut [u8], index: usize, value: u64) {
    bytes[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_entries_seen_in_qemu_images() {
        assert_eq!(
            classify_standard(0x8000_0000_0005_0000, false),
            ClusterMapping::Normal {
                host_offset: 0x50000
            }
        );
        assert_eq!(
            classify_standard(0x8000_0000_0005_0001, false),
            ClusterMapping::ZeroAllocated {
                host_offset: 0x50000
            }
        );
        assert_eq!(classify_standard(1, false), ClusterMapping::Zero);
        assert_eq!(classify_standard(0, false), ClusterMapping::Unallocated);
        assert_eq!(
            classify_standard(0x8000_0000_0000_0000, true),
            ClusterMapping::Normal { host_offset: 0 }
        );
        assert!(matches!(
            classify_standard(0x4340_0000_0005_1c0d, false),
            ClusterMapping::Compressed { .. }
        ));
    }

    #[test]
    fn subcluster_states_follow_the_bitmap() {
        let bm = SubclusterBitmap(0x0000_000f_0000_0030);
        assert_eq!(bm.state(4, true), SubclusterState::Allocated);
        assert_eq!(bm.state(0, true), SubclusterState::Zero);
        assert_eq!(bm.state(10, true), SubclusterState::Unallocated);
        assert_eq!(bm.run_length(0, true), 4);
        assert!(!SubclusterBitmap(0x1_0000_0001).is_valid(true));
        assert!(!SubclusterBitmap(0x1).is_valid(false));
    }
}
