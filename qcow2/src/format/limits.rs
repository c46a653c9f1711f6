//! QEMU's limits on qcow2 structures, as named constants.
//!
//! An image that exceeds one of these is refused at open, before any size read from disk is used to
//! allocate or loop: they are what keeps a hostile image from costing unbounded memory or time.

/// "QFI\xfb": the first four bytes of every qcow2 image.
pub const QCOW_MAGIC: u32 = 0x5146_49FB;

/// Smallest cluster: the spec requires at least 512 bytes (one sector).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU accepts (2 MiB); bigger ones make L2 tables and COW copies unwieldy.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu-img's default cluster size (64 KiB).
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;

/// Size of the v2 header; v2 has no header_length field, so this is implied.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest v3 header_length the spec allows (everything up to header_length itself).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Size of the v3 header QEMU writes: 104 bytes plus compression_type and padding.
pub const V3_HEADER_LENGTH: u32 = 112;

/// The L1 table may hold at most 32 MiB of entries; this bounds the memory an open costs.
pub const MAX_L1_SIZE_BYTES: u64 = 32 << 20;
/// Entries in the largest L1 table.
pub const MAX_L1_ENTRIES: u64 = MAX_L1_SIZE_BYTES / 8;
/// The refcount table may hold at most 8 MiB of entries.
pub const MAX_REFTABLE_SIZE_BYTES: u64 = 8 << 20;
/// At most 65536 internal snapshots (QEMU refuses more with EFBIG).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The snapshot table may take at most 64 MiB.
pub const MAX_SNAPSHOTS_SIZE: u64 = 1024 * 65536;
/// Extra data per snapshot entry is at most 1 KiB.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_ENTRY_FIXED_SIZE: usize = 40;
/// Extra data QEMU knows: vm_state_size_large, disk_size, icount.
pub const SNAPSHOT_EXTRA_KNOWN_SIZE: usize = 24;
/// v3 requires each snapshot's extra data to hold at least vm_state_size_large and disk_size.
pub const SNAPSHOT_EXTRA_V3_MIN_SIZE: u32 = 16;

/// Largest refcount order: 64-bit refcounts.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// The refcount order v2 images always use (16-bit refcounts).
pub const V2_REFCOUNT_ORDER: u32 = 4;

/// The spec limits a backing file name to 1023 bytes.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// QEMU keeps the backing format in a 16-byte buffer, so names of 16 bytes or more are refused.
pub const MAX_BACKING_FORMAT_NAME: u32 = 15;
/// Host offsets in L1/L2 entries are 56 bits wide.
pub const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// Largest virtual size QEMU accepts (it keeps sizes in int64 sector-aligned byte counts).
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !511;

/// Extended L2 entries divide a cluster into 32 subclusters.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Subclusters must be at least 512 bytes, so extended L2 needs clusters of 16 KiB or more.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

/// Compressed cluster sizes are counted in 512-byte sectors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// At most 65535 persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// The bitmap directory may take at most 1 KiB per bitmap.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;

/// Entry size of the feature name table extension.
pub const FEATURE_NAME_ENTRY_SIZE: usize = 48;

/// Backing chains deeper than this are refused; it also stops a chain that loops through
/// names the loop detector cannot see (QEMU itself hangs on a backing loop).
pub const DEFAULT_MAX_BACKING_DEPTH: usize = 64;
