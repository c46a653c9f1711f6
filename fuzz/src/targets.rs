//! The logic of every read-side fuzz target, as plain functions of `&[u8]`.
//!
//! This file is compiled twice: by the `qcow2-fuzz` crate (`mod targets;` in `lib.rs`, driven by
//! libFuzzer on nightly) and by `qcow2/tests/fuzz_replay.rs` (`#[path]` include, on stable), which
//! replays `fuzz/regressions/` and `fuzz/corpus/`. So it depends on `qcow2` and `std` only, and it
//! decodes structured inputs by hand from the leading bytes: the fuzzer and the replay test then
//! read every input file the same way.
//!
//! Each target either returns (errors from the engine are fine) or panics; a panic is a finding.
//! The properties checked beyond "no panic" are written next to the code that checks them.

use qcow2::format::compressed::CompressedDescriptor;
use qcow2::format::header::{field_offset, CompressionType, Header};
use qcow2::format::limits::{
    MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, SUBCLUSTERS_PER_CLUSTER,
    V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use qcow2::format::refcount;
use qcow2::format::snapshot::{self, align_entry};
use qcow2::format::table::{
    classify_standard, ClusterMapping, SubclusterBitmap, SubclusterState, COMPRESSED, COPIED,
    OFFSET_MASK, ZERO,
};
use qcow2::{Extent, Image, MemoryStorage, OpenOptions};

/// The signature of every entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for runners that pick the entry point from a directory name.
pub const TARGETS: &[(&str, Target)] = &[
    ("header", header),
    ("open_read", open_read),
    ("snapshot_table", snapshot_table),
    ("tables", tables),
];

/// The entry point of the target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

// ------------------------------------------------------------------------------------------------
// Input decoding: a tiny hand-written `Unstructured` and bounded helper types.

/// Reads structured values from the front of a fuzz input. Past the end every read yields zeros,
/// so every input decodes to something (as with `arbitrary`).
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        ByteReader { bytes }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = tail;
        head
    }

    /// A big-endian integer of `N` bytes, zero-padded at the end of the input.
    fn be<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.be::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.be())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.be())
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// An integer in `LO..=HI`, decoded from one byte (so small configs cost the fuzzer one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundedU32<const LO: u32, const HI: u32>(u32);

impl<const LO: u32, const HI: u32> BoundedU32<LO, HI> {
    pub fn read(r: &mut ByteReader<'_>) -> Self {
        BoundedU32(LO + r.u8() as u32 % (HI - LO + 1))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

// ------------------------------------------------------------------------------------------------
// header

fn be32(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Arbitrary bytes as the start of an image → `Header::decode`.
///
/// Properties: never panics; a decoded header's fields are the big-endian values at their
/// offsets (v2 fields get their implied values); decoding is deterministic; and decoding only the
/// first cluster gives the same header (the engine reads no more than that at open).
pub fn header(data: &[u8]) {
    let Ok(h) = Header::decode(data) else {
        return;
    };
    use field_offset as f;
    assert_eq!(be32(data, f::MAGIC), 0x5146_49FB, "magic");
    assert_eq!(h.version, be32(data, f::VERSION), "version");
    assert!(h.version == 2 || h.version == 3, "version {}", h.version);
    assert_eq!(h.backing_file_offset, be64(data, f::BACKING_FILE_OFFSET));
    assert_eq!(h.backing_file_size, be32(data, f::BACKING_FILE_SIZE));
    assert_eq!(h.cluster_bits, be32(data, f::CLUSTER_BITS), "cluster_bits");
    assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
    assert_eq!(h.size, be64(data, f::SIZE), "size");
    assert_eq!(h.crypt_method, be32(data, f::CRYPT_METHOD));
    assert_eq!(h.l1_size, be32(data, f::L1_SIZE), "l1_size");
    assert_eq!(h.l1_table_offset, be64(data, f::L1_TABLE_OFFSET));
    assert_eq!(
        h.refcount_table_offset,
        be64(data, f::REFCOUNT_TABLE_OFFSET)
    );
    assert_eq!(
        h.refcount_table_clusters,
        be32(data, f::REFCOUNT_TABLE_CLUSTERS)
    );
    assert_eq!(h.nb_snapshots, be32(data, f::NB_SNAPSHOTS));
    assert_eq!(h.snapshots_offset, be64(data, f::SNAPSHOTS_OFFSET));
    if h.version == 3 {
        assert_eq!(
            h.incompatible_features,
            be64(data, f::INCOMPATIBLE_FEATURES)
        );
        assert_eq!(h.compatible_features, be64(data, f::COMPATIBLE_FEATURES));
        assert_eq!(h.autoclear_features, be64(data, f::AUTOCLEAR_FEATURES));
        assert_eq!(h.refcount_order, be32(data, f::REFCOUNT_ORDER));
        assert_eq!(h.header_length, be32(data, f::HEADER_LENGTH));
        assert!(h.header_length >= 104 && h.header_length as u64 <= h.cluster_size());
        let type_byte = if h.header_length > 104 {
            data[f::COMPRESSION_TYPE as usize]
        } else {
            0
        };
        let expected = match type_byte {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            other => panic!("compression type byte {other} was accepted"),
        };
        assert_eq!(h.compression_type, expected, "compression_type");
        let unknown = if h.header_length > V3_HEADER_LENGTH {
            &data[V3_HEADER_LENGTH as usize..h.header_length as usize]
        } else {
            &[]
        };
        assert_eq!(h.unknown_header_bytes, unknown, "unknown header bytes");
    } else {
        assert_eq!(
            (
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features
            ),
            (0, 0, 0),
            "v2 has no feature bits"
        );
        assert_eq!(h.refcount_order, 4, "v2 refcounts are 16 bits");
        assert_eq!(h.header_length, V2_HEADER_LENGTH);
        assert_eq!(h.compression_type, CompressionType::Zlib);
        assert!(h.unknown_header_bytes.is_empty());
    }
    assert!(h.refcount_order <= MAX_REFCOUNT_ORDER);
    assert_eq!(h.crypt_method, 0, "encrypted images are refused");
    match &h.backing_file {
        None => assert_eq!(h.backing_file_offset, 0),
        Some(name) => {
            let start = h.backing_file_offset as usize;
            assert_eq!(name.len(), h.backing_file_size as usize);
            assert_eq!(
                name[..],
                data[start..start + name.len()],
                "backing file name"
            );
        }
    }
    // The geometry helpers must not overflow for any accepted header.
    let _ = (h.l2_bits(), h.l1_shift(), h.l1_entries_for(h.size));
    assert!(h.l1_entries_for(h.size) <= h.l1_size as u64, "L1 too small");

    let again = Header::decode(data).expect("the same bytes decoded a moment ago");
    assert_eq!(again, h, "decoding is deterministic");
    let first_cluster = &data[..data.len().min(h.cluster_size() as usize)];
    match Header::decode(first_cluster) {
        Ok(first) => assert_eq!(
            first, h,
            "decoding only the first cluster changes the header"
        ),
        Err(e) => panic!("the first cluster alone does not decode: {e}"),
    }
}

// ------------------------------------------------------------------------------------------------
// open_read

/// L2 cache for fuzzed opens: small, so eviction paths run too (one table is always cached).
const OPEN_READ_L2_CACHE_BYTES: u64 = 64 << 10;
/// Disks up to this many bytes are read in full, cluster by cluster ...
const FULL_READ_MAX_BYTES: u64 = 64 << 20;
/// ... provided they have no more clusters than this (keeps one execution in milliseconds).
const FULL_READ_MAX_CLUSTERS: u64 = 4096;
/// Larger disks: only this many clusters at each end are read (plus `map` over all of it).
const EDGE_CLUSTERS: u64 = 64;
/// Snapshots whose contents are read; the rest are only opened (each open reads its L1 table).
const MAX_SNAPSHOTS_READ: usize = 8;
/// Snapshots opened at all, so a table of thousands of entries sharing one huge L1 stays cheap.
const MAX_SNAPSHOTS_OPENED: usize = 64;

/// Arbitrary bytes as a whole image file in memory → open (no host files), `info`, `map`, `check`,
/// reads of the active disk and of every snapshot.
///
/// Properties: never panics; `map` covers `[0, size)` exactly with ordered, non-empty, depth-0
/// extents; every range `map` calls zero or unallocated reads as zeros (no backing file is
/// attached, so unallocated means zeros).
pub fn open_read(data: &[u8]) {
    let storage = MemoryStorage::from_bytes(data.to_vec());
    let options = OpenOptions {
        l2_cache_bytes: OPEN_READ_L2_CACHE_BYTES,
        ..OpenOptions::metadata_only()
    };
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
fn check_extents(extents: &[Extent], size: u64, layer: &str) {
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
fn read_disk(
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
fn check_zero_ranges(extents: &[Extent], offset: u64, buf: &[u8]) {
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

// ------------------------------------------------------------------------------------------------
// snapshot_table

/// Input of `snapshot_table`: `[count: u16][table_offset: u64][table bytes ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTableInput<'a> {
    pub count: u16,
    pub table_offset: u64,
    pub table: &'a [u8],
}

impl<'a> SnapshotTableInput<'a> {
    pub fn from_bytes(data: &'a [u8]) -> Self {
        let mut r = ByteReader::new(data);
        SnapshotTableInput {
            count: r.u16(),
            table_offset: r.u64(),
            table: r.rest(),
        }
    }
}

/// Arbitrary bytes → `snapshot::decode_table`.
///
/// Properties: never panics; on success there are `count` entries, each entry re-encodes to
/// exactly the bytes it was decoded from, and `encode_table` of the result decodes to the result.
pub fn snapshot_table(data: &[u8]) {
    snapshot_table_input(&SnapshotTableInput::from_bytes(data));
}

/// `snapshot_table` on an already decoded input.
pub fn snapshot_table_input(input: &SnapshotTableInput<'_>) {
    let count = input.count as u32;
    let Ok(entries) = snapshot::decode_table(input.table, count, input.table_offset) else {
        return;
    };
    assert_eq!(entries.len(), count as usize);
    let mut pos = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        pos = align_entry(pos as u64) as usize;
        let mut bytes = Vec::new();
        entry.encode(&mut bytes);
        assert_eq!(
            bytes[..],
            input.table[pos..pos + bytes.len()],
            "entry {i} re-encodes to the bytes it came from"
        );
        pos += bytes.len();
        // Accessors must cope with any extra data.
        let _ = (
            entry.vm_state_size(),
            entry.disk_size(),
            entry.icount(),
            entry.time(),
            entry.id_str(),
            entry.name_str(),
        );
    }
    let encoded = snapshot::encode_table(&entries);
    assert_eq!(encoded.len(), pos, "encoded table length");
    let again = snapshot::decode_table(&encoded, count, input.table_offset)
        .expect("an encoded table decodes");
    assert_eq!(again, entries, "encode_table then decode_table round-trips");
}

// ------------------------------------------------------------------------------------------------
// tables

/// Largest refblock the `tables` target exercises (bigger ones only cost time).
const TABLES_MAX_BLOCK: usize = 4096;

/// Input of `tables`: `[cluster_bits][refcount_order][flags][n][n × u64 entries][block ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablesInput {
    pub cluster_bits: BoundedU32<MIN_CLUSTER_BITS, MAX_CLUSTER_BITS>,
    pub refcount_order: BoundedU32<0, MAX_REFCOUNT_ORDER>,
    /// Classify as for an image with an external data file.
    pub external_data: bool,
    pub entries: Vec<u64>,
    /// A refblock (at most `TABLES_MAX_BLOCK` bytes).
    pub block: Vec<u8>,
}

impl TablesInput {
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut r = ByteReader::new(data);
        let cluster_bits = BoundedU32::read(&mut r);
        let refcount_order = BoundedU32::read(&mut r);
        let external_data = r.u8() & 1 != 0;
        let n = (r.u8() as usize).min(r.remaining() / 8);
        let entries = (0..n).map(|_| r.u64()).collect();
        let rest = r.rest();
        TablesInput {
            cluster_bits,
            refcount_order,
            external_data,
            entries,
            block: rest[..rest.len().min(TABLES_MAX_BLOCK)].to_vec(),
        }
    }
}

/// Arbitrary entries → L2 classification, subcluster bitmaps, compressed descriptors and refcount
/// packing, each checked against the bit layout of the spec.
pub fn tables(data: &[u8]) {
    tables_input(&TablesInput::from_bytes(data));
}

/// `tables` on an already decoded input.
pub fn tables_input(input: &TablesInput) {
    let cluster_bits = input.cluster_bits.get();
    for (i, &entry) in input.entries.iter().enumerate() {
        check_classification(entry, input.external_data);
        check_subcluster_bitmap(SubclusterBitmap(entry));
        check_compressed_descriptor(entry, cluster_bits);
        // Pairs of entries as (host offset, length) to encode.
        if let Some(&next) = input.entries.get(i + 1) {
            check_compressed_encode(entry, next, cluster_bits);
        }
    }
    check_refcounts(input);
}

/// `classify_standard` follows the bits: compressed flag first, then zero flag and host offset.
fn check_classification(entry: u64, external_data: bool) {
    let mapping = classify_standard(entry, external_data);
    let host = entry & OFFSET_MASK;
    let allocated = host != 0 || (external_data && entry & COPIED != 0);
    let expected = if entry & COMPRESSED != 0 {
        ClusterMapping::Compressed {
            descriptor: entry & !(COPIED | COMPRESSED),
        }
    } else if entry & ZERO != 0 {
        if allocated {
            ClusterMapping::ZeroAllocated { host_offset: host }
        } else {
            ClusterMapping::Zero
        }
    } else if allocated {
        ClusterMapping::Normal { host_offset: host }
    } else {
        ClusterMapping::Unallocated
    };
    assert_eq!(mapping, expected, "classify_standard({entry:#018x})");
    if let ClusterMapping::Normal { host_offset } | ClusterMapping::ZeroAllocated { host_offset } =
        mapping
    {
        assert_eq!(host_offset % 512, 0, "host offsets are 512-aligned");
    }
}

/// A bitmap is valid exactly when no subcluster is invalid; runs are maximal and stay in range.
fn check_subcluster_bitmap(bitmap: SubclusterBitmap) {
    for allocated in [false, true] {
        let states: Vec<SubclusterState> = (0..SUBCLUSTERS_PER_CLUSTER)
            .map(|i| bitmap.state(i, allocated))
            .collect();
        for (i, &state) in states.iter().enumerate() {
            let alloc = bitmap.alloc_bits() >> i & 1 != 0;
            let zero = bitmap.zero_bits() >> i & 1 != 0;
            let expected = match (alloc, zero) {
                (true, true) => SubclusterState::Invalid,
                (true, false) if !allocated => SubclusterState::Invalid,
                (true, false) => SubclusterState::Allocated,
                (false, true) => SubclusterState::Zero,
                (false, false) => SubclusterState::Unallocated,
            };
            assert_eq!(state, expected, "{bitmap:?} subcluster {i}");
        }
        assert_eq!(
            bitmap.is_valid(allocated),
            !states.contains(&SubclusterState::Invalid),
            "{bitmap:?} allocated={allocated}: is_valid agrees with the states"
        );
        let mut index = 0;
        while index < SUBCLUSTERS_PER_CLUSTER {
            let run = bitmap.run_length(index, allocated);
            assert!(run >= 1 && index + run <= SUBCLUSTERS_PER_CLUSTER);
            let (i, r) = (index as usize, run as usize);
            assert!(states[i..i + r].iter().all(|&s| s == states[i]));
            if i + r < states.len() {
                assert_ne!(states[i + r], states[i], "run at {index} is maximal");
            }
            // Runs from inside a run end at the same place.
            assert_eq!(bitmap.run_length(index + run - 1, allocated), 1);
            index += run;
        }
    }
}

/// Decoded fields stay in their bit ranges, and re-encoding the decoded (offset, size) gives the
/// descriptor bits back.
fn check_compressed_descriptor(entry: u64, cluster_bits: u32) {
    let offset_bits = 70 - cluster_bits;
    let d = CompressedDescriptor::decode(entry, cluster_bits);
    assert!(d.host_offset < 1u64 << offset_bits, "{d:?}");
    assert!(
        d.sectors >= 1 && d.sectors <= 1u64 << (cluster_bits - 8),
        "{d:?}"
    );
    let size = d.compressed_size();
    assert!(size >= 1 && size <= d.sectors * 512, "{d:?} size {size}");
    let _ = d.offset_out_of_range();
    let bits = CompressedDescriptor::encode(d.host_offset, size, cluster_bits);
    assert_eq!(
        bits,
        entry & ((1u64 << 62) - 1),
        "encode(decode({entry:#018x})) with {cluster_bits} cluster bits"
    );
    assert_eq!(CompressedDescriptor::decode(bits, cluster_bits), d);
}

/// Encoding an arbitrary (offset, length) whose sector span fits round-trips: same offset, and
/// the sectors cover the data.
fn check_compressed_encode(a: u64, b: u64, cluster_bits: u32) {
    let offset_bits = 70 - cluster_bits;
    let host_offset = a & ((1u64 << offset_bits) - 1);
    let cluster_size = 1u64 << cluster_bits;
    // QEMU stores only data that compressed to less than a cluster; never zero bytes.
    let len = 1 + b % (cluster_size - 1);
    let span = (host_offset + len - 1) / 512 - host_offset / 512 + 1;
    if span > 1u64 << (cluster_bits - 8) {
        return;
    }
    let bits = CompressedDescriptor::encode(host_offset, len, cluster_bits);
    assert_eq!(bits & (COPIED | COMPRESSED), 0, "no flag bits");
    let d = CompressedDescriptor::decode(bits, cluster_bits);
    assert_eq!(d.host_offset, host_offset);
    assert_eq!(d.sectors, span);
    assert!(d.compressed_size() >= len && d.compressed_size() < len + 512);
}

/// For every refcount order: set then get returns the value (masked to the width, as `set`
/// requires it to fit), and no other entry of the block changes.
fn check_refcounts(input: &TablesInput) {
    let cluster_bits = input.cluster_bits.get();
    let own_order = input.refcount_order.get();
    let per_block = refcount::entries_per_block(cluster_bits, own_order);
    assert_eq!(
        per_block << own_order,
        8 << cluster_bits,
        "refblock fills a cluster"
    );
    for order in 0..=MAX_REFCOUNT_ORDER {
        let max = refcount::max_refcount(order);
        assert_eq!(max.count_ones(), 1 << order, "max_refcount({order})");
        let capacity = (input.block.len() * 8) >> order;
        if capacity == 0 {
            continue;
        }
        let mut block = input.block.clone();
        for &entry in input.entries.iter().take(16) {
            let index = (entry >> 8) as usize % capacity;
            let value = entry & max;
            let before = block.clone();
            refcount::set(&mut block, index, order, value);
            assert_eq!(
                refcount::get(&block, index, order),
                value,
                "order {order} index {index}"
            );
            // Only the entry's own bits may change: LSB-first inside one byte for widths below
            // 8 bits, whole big-endian bytes from 8 bits on.
            let width = 1usize << order;
            let first_bit = index * width;
            for (at, (&old, &new)) in before.iter().zip(&block).enumerate() {
                let own = if order <= 2 {
                    if at == first_bit / 8 {
                        (((1u16 << width) - 1) as u8) << (first_bit % 8)
                    } else {
                        0
                    }
                } else if (first_bit / 8..(first_bit + width) / 8).contains(&at) {
                    0xFF
                } else {
                    0
                };
                assert_eq!(
                    (old ^ new) & !own,
                    0,
                    "order {order}: setting entry {index} changed byte {at}"
                );
            }
        }
    }
}
