//! The logic of every fuzz target, as plain functions of `&[u8]`.
//!
//! This file is compiled twice: by the `qcow2-fuzz` crate (`mod targets;` in `lib.rs`, driven by
//! libFuzzer on nightly) and by `qcow2/tests/fuzz_replay.rs` (`#[path]` include, on stable), which
//! replays `fuzz/regressions/` and `fuzz/corpus/`. So it depends on `qcow2` and `std` only, and it
//! decodes structured inputs by hand from the leading bytes: the fuzzer and the replay test then
//! read every input file the same way.
//!
//! Each target either returns or panics; a panic is a finding. The read-side targets accept any
//! error from the engine (their inputs are hostile); `ops` drives the write side from a valid image
//! and accepts only the errors its model expects. The properties checked beyond "no panic" are
//! written next to the code that checks them.

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
use qcow2::format::SnapshotTime;
use qcow2::storage::recording::{RecordingStorage, Survivors};
use qcow2::{
    BackingPolicy, CreateOptions, Error, Extent, Image, MemoryStorage, OpenOptions, Repair,
};
use std::rc::Rc;
use std::sync::Arc;

/// The signature of every entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for runners that pick the entry point from a directory name.
pub const TARGETS: &[(&str, Target)] = &[
    ("header", header),
    ("open_read", open_read),
    ("snapshot_table", snapshot_table),
    ("tables", tables),
    ("ops", ops),
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

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.be())
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
/// Bitmaps whose bits `open_read` reads.
const MAX_BITMAPS_READ: usize = 8;
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

// ------------------------------------------------------------------------------------------------
// ops

/// Most steps one `ops` input runs (every step re-reads the whole disk).
const OPS_MAX_STEPS: usize = 64;
/// Virtual sizes stay within this many clusters (512-byte clusters need more than 64 for a second
/// L2 table, so L1 growth is reachable) ...
const OPS_MAX_CLUSTERS: u64 = 160;
/// ... and within this many bytes, so the full read after every step stays cheap with 64 KiB
/// clusters.
const OPS_MAX_BYTES: u64 = 1 << 20;
/// Largest cluster the `ops` target creates (keeps images small).
const OPS_MAX_CLUSTER_BITS: u32 = 16;
/// Extended L2 entries need clusters of at least 16 KiB.
const OPS_MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Snapshots alive at once; further creates are skipped (every snapshot is read at each check).
const OPS_MAX_SNAPSHOTS: usize = 6;
/// `check()` and the snapshot views run every this many steps (and after reopens and snapshot
/// operations).
const OPS_CHECK_EVERY: usize = 8;
/// Durable checkpoints kept for crash cuts (each holds a copy of the disk).
const OPS_MAX_CHECKPOINTS: usize = 8;
/// Snapshot names: few, so apply and delete find them and duplicate names occur. None is numeric,
/// so a name never matches an id.
const OPS_SNAPSHOT_NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// The name of the one persistent bitmap an `ops` image may have.
const OPS_BITMAP: &str = "dirty";
/// The backing file name recorded in the header; the content is attached from memory.
const OPS_BACKING_NAME: &str = "base";

/// Whether bytes that a grow exposes beyond the old last cluster read the backing file. That is
/// what the engine does today: `resize` zero-writes only the tail of the old last cluster, so the
/// rest of the new area is unallocated and reads through to the backing file. QEMU (since 5.1)
/// makes the whole new area read as zeros instead (v3: zero clusters; v2 refuses the resize when
/// the backing file is longer than the old size). Set to `false` once the engine follows QEMU.
const OPS_GROW_EXPOSES_BACKING: bool = false;

/// Input of `ops`: a bounded image configuration, then up to [`OPS_MAX_STEPS`] steps.
///
/// Layout: `[cluster_bits][refcount_order][flags][size: u8 clusters, u16 odd bytes]` and, when
/// flags bit 4 asks for a backing file, `[backing: u16 length, u8 seed]`; then steps, each an
/// opcode byte and its fields (see [`OpsStep::read`]). Flags: bit 0 version 2 (else 3); bit 1
/// lazy refcounts, bit 2 extended L2 (with clusters of 16 KiB or more), bit 3 zstd, bit 6 a
/// persistent bitmap from the start (all v3 only); bit 4 a raw backing file; bit 5 a
/// sector-aligned size; bit 7 bitmap granules of 512 bytes (else the cluster size). Version 2
/// forces 16-bit refcounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsInput {
    pub config: OpsConfig,
    pub steps: Vec<OpsStep>,
}

/// The image an `ops` input creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    pub cluster_bits: BoundedU32<MIN_CLUSTER_BITS, OPS_MAX_CLUSTER_BITS>,
    pub refcount_bits: u32,
    pub version: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub zstd: bool,
    pub size: u64,
    /// The raw backing file's content, if any.
    pub backing: Option<Vec<u8>>,
    /// The granularity of bitmap [`OPS_BITMAP`], when the image starts with one.
    pub bitmap: Option<u64>,
}

/// A guest byte range, chosen relative to the disk's size when the step runs (sizes change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSel {
    /// Bits 0-1: grain (cluster, byte, sector, subcluster); bit 2: run to the end of the disk;
    /// bit 3: add an odd tail; bits 5-7 all set: overrun the disk (a request that must be refused).
    pub mode: u8,
    pub start: u32,
    pub len: u16,
}

/// Which snapshot an apply or delete names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSel {
    /// By id (the `index`-th snapshot's, or a free id), else by name.
    pub by_id: bool,
    pub index: u8,
}

/// One step of an `ops` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsStep {
    Write {
        range: RangeSel,
        byte: u8,
    },
    WriteZeroes {
        range: RangeSel,
        unmap: bool,
    },
    Discard {
        range: RangeSel,
    },
    /// Whole clusters from the `cluster`-th (modulo the disk's clusters), one or two of them.
    /// Requests that must be refused: `misaligned` shifts the start by half a cluster; `past_end`
    /// starts `cluster` (modulo 4096) clusters after the end of the disk.
    WriteCompressed {
        cluster: u16,
        two: bool,
        misaligned: bool,
        past_end: bool,
        /// 0: one byte repeated; 1: pseudo-random (incompressible); 2: half random, half zeros;
        /// 3: a byte stepping every 512 bytes.
        kind: u8,
        byte: u8,
    },
    Resize {
        clusters: u8,
        odd: u16,
        sector_aligned: bool,
        allow_data_loss: bool,
    },
    Flush,
    CreateSnapshot {
        name: u8,
    },
    ApplySnapshot(SnapshotSel),
    DeleteSnapshot(SnapshotSel),
    /// Close the image and open its bytes again (in a fresh recording store).
    Reopen,
    /// Clear every bit of bitmap [`OPS_BITMAP`].
    BitmapClear,
    /// Enable or disable bitmap [`OPS_BITMAP`].
    BitmapEnable(bool),
    /// Remove bitmap [`OPS_BITMAP`], or add it (granularity 512 << `granularity_shift` % 8)
    /// when there is none.
    BitmapRemoveOrAdd {
        granularity_shift: u8,
    },
    /// Materialise a power cut and check the crashed image (the live image carries on).
    Crash {
        /// Bit 2 set: cut at a durable checkpoint (`cut` picks which); else anywhere since the
        /// oldest kept checkpoint. Bits 0-1: unflushed writes lost, kept, or torn (twice as often).
        mode: u8,
        cut: u16,
        seed: u16,
    },
}

impl RangeSel {
    fn read(r: &mut ByteReader<'_>) -> Self {
        RangeSel {
            mode: r.u8(),
            start: r.u32(),
            len: r.u16(),
        }
    }

    /// `(offset, len)` for a disk of `size` bytes: the offset is a multiple of the grain in
    /// `[0, size]`, the length a multiple of it up to four clusters (unless it runs to the end).
    fn resolve(self, size: u64, cs: u64) -> (u64, u64) {
        let grain = match self.mode & 3 {
            0 => cs,
            1 => 1,
            2 => 512,
            _ => cs / 32,
        };
        let offset = self.start as u64 % (size / grain + 1) * grain;
        let room = size - offset;
        let mut len = if self.mode & 4 != 0 {
            room
        } else {
            let max = room.min(4 * cs);
            self.len as u64 % (max / grain + 1) * grain
        };
        if self.mode & 8 != 0 {
            len = (len + 1 + (self.mode >> 4) as u64).min(room);
        }
        if self.mode & 0xE0 == 0xE0 {
            len = room + 1 + self.len as u64 % cs;
        }
        (offset, len)
    }
}

impl SnapshotSel {
    fn read(r: &mut ByteReader<'_>) -> Self {
        let b = r.u8();
        SnapshotSel {
            by_id: b & 0x80 != 0,
            index: b & 0x7F,
        }
    }

    /// The id or name to pass to the engine.
    fn key(self, snapshots: &[ModelSnapshot]) -> String {
        if self.by_id {
            let i = self.index as usize % (snapshots.len() + 1);
            match snapshots.get(i) {
                Some(s) => s.id.clone(),
                None => next_snapshot_id(snapshots),
            }
        } else {
            OPS_SNAPSHOT_NAMES[self.index as usize % OPS_SNAPSHOT_NAMES.len()].to_string()
        }
    }
}

/// A virtual size of `clusters` (modulo the bound) whole clusters plus `odd` bytes, at most the
/// bound itself.
fn ops_size(clusters: u8, odd: u16, sector_aligned: bool, cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    let max_clusters = OPS_MAX_CLUSTERS.min(OPS_MAX_BYTES >> cluster_bits);
    let mut odd = odd as u64 % cs;
    if sector_aligned {
        odd &= !511;
    }
    (clusters as u64 % (max_clusters + 1) * cs + odd).min(max_clusters * cs)
}

/// `len` bytes of the backing file's pattern; never zero, so backing data and zeros differ.
fn backing_pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize).wrapping_add(i / 97) as u8 | 0x80)
        .collect()
}

/// Data for a compressed write (see [`OpsStep::WriteCompressed`]).
fn compressed_data(len: usize, kind: u8, byte: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ byte as u64;
    let mut random = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    (0..len)
        .map(|i| match kind & 3 {
            0 => byte,
            1 => random(),
            2 if i < len / 2 => random(),
            2 => 0,
            _ => byte.wrapping_add((i / 512) as u8),
        })
        .collect()
}

impl OpsStep {
    /// Decodes one step: an opcode byte, then the step's fields.
    fn read(r: &mut ByteReader<'_>) -> Self {
        let op = r.u8();
        // Bitmap commands take three of the 256 opcode values, leaving the older meaning of
        // every other value (and of the committed regression inputs) as it was.
        match op {
            0xF0 => return OpsStep::BitmapClear,
            0xF1 => return OpsStep::BitmapEnable(r.u8() & 1 != 0),
            0xF2 => {
                return OpsStep::BitmapRemoveOrAdd {
                    granularity_shift: r.u8(),
                }
            }
            _ => {}
        }
        match op % 16 {
            0..=2 | 13 => OpsStep::Write {
                range: RangeSel::read(r),
                byte: r.u8(),
            },
            3 | 14 => OpsStep::WriteZeroes {
                range: RangeSel::read(r),
                unmap: r.u8() & 1 != 0,
            },
            4 | 15 => OpsStep::Discard {
                range: RangeSel::read(r),
            },
            5 => {
                let cluster = r.u16();
                let flags = r.u8();
                OpsStep::WriteCompressed {
                    cluster,
                    two: flags & 1 != 0,
                    misaligned: flags & 0xF0 == 0xF0,
                    past_end: flags & 0xF0 == 0xE0,
                    kind: flags >> 1 & 3,
                    byte: r.u8(),
                }
            }
            6 => {
                let clusters = r.u8();
                let odd = r.u16();
                let flags = r.u8();
                OpsStep::Resize {
                    clusters,
                    odd,
                    sector_aligned: flags & 2 != 0,
                    allow_data_loss: flags & 1 != 0,
                }
            }
            7 => OpsStep::Flush,
            8 => OpsStep::CreateSnapshot { name: r.u8() },
            9 => OpsStep::ApplySnapshot(SnapshotSel::read(r)),
            10 => OpsStep::DeleteSnapshot(SnapshotSel::read(r)),
            11 => OpsStep::Reopen,
            _ => OpsStep::Crash {
                mode: r.u8(),
                cut: r.u16(),
                seed: r.u16(),
            },
        }
    }
}

impl OpsInput {
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut r = ByteReader::new(data);
        let cluster_bits = BoundedU32::<MIN_CLUSTER_BITS, OPS_MAX_CLUSTER_BITS>::read(&mut r);
        let refcount_order = BoundedU32::<0, MAX_REFCOUNT_ORDER>::read(&mut r).get();
        let flags = r.u8();
        let v3 = flags & 1 == 0;
        let bits = cluster_bits.get();
        let size = ops_size(r.u8(), r.u16(), flags & 0x20 != 0, bits);
        let backing = (flags & 0x10 != 0).then(|| {
            let max = ops_size(u8::MAX, u16::MAX, false, bits) + (1 << bits);
            let len = r.u16() as u64 * 512 % (max + 1) + r.u8() as u64 % 512;
            backing_pattern(len as usize, r.u8())
        });
        let config = OpsConfig {
            cluster_bits,
            refcount_bits: if v3 { 1 << refcount_order } else { 16 },
            version: if v3 { 3 } else { 2 },
            lazy_refcounts: v3 && flags & 2 != 0,
            extended_l2: v3 && flags & 4 != 0 && bits >= OPS_MIN_EXTENDED_L2_CLUSTER_BITS,
            zstd: v3 && flags & 8 != 0,
            size,
            backing,
            bitmap: (v3 && flags & 0x40 != 0).then_some(if flags & 0x80 != 0 {
                512
            } else {
                1 << bits
            }),
        };
        let mut steps = Vec::new();
        while r.remaining() > 0 && steps.len() < OPS_MAX_STEPS {
            steps.push(OpsStep::read(&mut r));
        }
        OpsInput { config, steps }
    }
}

/// A snapshot as the model knows it.
#[derive(Debug, Clone)]
struct ModelSnapshot {
    id: String,
    name: String,
    /// The disk when the snapshot was taken (its length is the snapshot's size).
    bytes: Rc<Vec<u8>>,
}

/// The id the engine gives a new snapshot: the largest numeric id plus one (as QEMU does).
fn next_snapshot_id(snapshots: &[ModelSnapshot]) -> String {
    let max = snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// The snapshot an id or name finds: by id first, then the first with that name.
fn find_model_snapshot<'a>(snapshots: &'a [ModelSnapshot], key: &str) -> Option<&'a ModelSnapshot> {
    snapshots
        .iter()
        .find(|s| s.id == key)
        .or_else(|| snapshots.iter().find(|s| s.name == key))
}

/// A state known to be durable: what a crash at or after `at` must still show (outside ranges
/// that later requests may have changed).
struct Checkpoint {
    /// Recorded operations of the current store when the state became durable.
    at: usize,
    disk: Rc<Vec<u8>>,
    snapshots: Vec<ModelSnapshot>,
    bitmap: Option<ModelBitmap>,
}

/// What bitmap [`OPS_BITMAP`] must mark: every granule a successful guest request touched since
/// it was added or cleared (exactly, while the image is open; at least, after a power cut).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelBitmap {
    granularity: u64,
    enabled: bool,
    /// One per granule of the disk.
    dirty: Vec<bool>,
    /// Bumped by every add, remove and clear: a crash check compares bits only within one
    /// generation, because those steps may lose bits legitimately.
    generation: u32,
}

impl ModelBitmap {
    fn mark(&mut self, start: u64, end: u64) {
        if !self.enabled || start >= end {
            return;
        }
        let g = self.granularity;
        let last = (end.div_ceil(g) as usize).min(self.dirty.len());
        for d in &mut self.dirty[(start / g) as usize..last] {
            *d = true;
        }
    }

    fn resize(&mut self, size: u64) {
        self.dirty
            .resize(size.div_ceil(self.granularity) as usize, false);
    }

    /// The marked ranges as `Image::dirty_extents` reports them: merged, clipped to the disk.
    fn extents(&self, size: u64) -> Vec<(u64, u64)> {
        let g = self.granularity;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, _) in self.dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = i as u64 * g;
            let stop = (start + g).min(size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += stop - start,
                _ => out.push((start, stop - start)),
            }
        }
        out
    }
}

/// Arbitrary bytes → a bounded image configuration and up to 64 steps (writes, zero writes,
/// discards, compressed writes, resizes, flushes, snapshot create / apply / delete, reopens and
/// simulated power cuts), each checked against a plain model: the disk as a byte vector, plus one
/// per snapshot.
///
/// Properties: creating the configured image works; every step either succeeds and the image then
/// reads exactly as the model, or is refused with the error the model expects (out of bounds,
/// misaligned compressed write, unknown snapshot, refcount overflow with narrow refcounts, shrink
/// over data without permission) and the image still reads as before; `check()` is clean every
/// [`OPS_CHECK_EVERY`] steps, after snapshot operations, after reopens and at the end; every
/// snapshot view reads as its model; a reopened image is not dirty. A crash image (any cut since
/// the oldest kept checkpoint; unflushed writes lost, kept or torn) opens, shows nothing that
/// fixing leaks does not cure (a dirty one is repaired by a read-write open), fixing leaks leaves
/// it clean, its snapshots are
/// those before or after the interrupted step, each reading as its model, and every byte no
/// request touched since the last durable point reads as it did then.
pub fn ops(data: &[u8]) {
    ops_input(&OpsInput::from_bytes(data));
}

/// `ops` on an already decoded input.
pub fn ops_input(input: &OpsInput) {
    let mut run = OpsRun::new(&input.config);
    for (i, step) in input.steps.iter().enumerate() {
        run.step = i;
        run.run(*step);
        run.compare_disk(&format!("after step {i} {step:?}"));
        if i % OPS_CHECK_EVERY == OPS_CHECK_EVERY - 1 {
            run.check_clean(&format!("after step {i}"));
            run.compare_snapshots(&format!("after step {i}"));
        }
    }
    run.finish();
}

/// The running workload: the image, its store and the model.
struct OpsRun {
    config: OpsConfig,
    cluster_size: u64,
    store: Arc<RecordingStorage>,
    /// `None` only in the middle of a reopen.
    image: Option<Image>,
    disk: Vec<u8>,
    snapshots: Vec<ModelSnapshot>,
    bitmap: Option<ModelBitmap>,
    /// Generations of bitmap [`OPS_BITMAP`] so far.
    bitmap_generations: u32,
    /// Durable states of the current store, oldest first (at most [`OPS_MAX_CHECKPOINTS`]).
    checkpoints: Vec<Checkpoint>,
    /// Guest requests since the oldest checkpoint: (recorded operations when it started, start,
    /// end). A crash cut after it may show any content in that range.
    requests: Vec<(usize, u64, u64)>,
    step: usize,
}

impl OpsRun {
    fn new(config: &OpsConfig) -> Self {
        let cluster_size = 1u64 << config.cluster_bits.get();
        let options = CreateOptions {
            size: config.size,
            cluster_size,
            refcount_bits: config.refcount_bits,
            version: config.version,
            lazy_refcounts: config.lazy_refcounts,
            extended_l2: config.extended_l2,
            compression_type: if config.zstd {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            backing_file: config.backing.as_ref().map(|_| OPS_BACKING_NAME.into()),
            backing_format: config.backing.as_ref().map(|_| "raw".into()),
            ..CreateOptions::default()
        };
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let mut image = Image::create_in(Box::new(store.clone()), "fuzz", &options)
            .unwrap_or_else(|e| panic!("create {options:?}: {e}"));
        let mut disk = vec![0u8; config.size as usize];
        if let Some(base) = &config.backing {
            attach_backing(&mut image, base);
            let n = base.len().min(disk.len());
            disk[..n].copy_from_slice(&base[..n]);
        }
        let mut run = OpsRun {
            config: config.clone(),
            cluster_size,
            store,
            image: Some(image),
            disk,
            snapshots: Vec::new(),
            bitmap: None,
            bitmap_generations: 0,
            checkpoints: Vec::new(),
            requests: Vec::new(),
            step: 0,
        };
        if let Some(granularity) = config.bitmap {
            run.add_bitmap(granularity, "at create");
        }
        run.checkpoint();
        run.compare_disk("after create");
        run.check_clean("after create");
        run
    }

    fn image(&self) -> &Image {
        self.image.as_ref().expect("an image is open between steps")
    }

    fn size(&self) -> u64 {
        self.disk.len() as u64
    }

    /// The backing file's bytes for a guest range (zeros past its end, or without one).
    fn backing_bytes(&self, start: u64, end: u64) -> Vec<u8> {
        let mut out = vec![0u8; (end - start) as usize];
        if let Some(base) = &self.config.backing {
            let from = (start as usize).min(base.len());
            let to = (end as usize).min(base.len());
            out[..to - from].copy_from_slice(&base[from..to]);
        }
        out
    }

    /// Records that a guest request may change `[start, end)` from now on.
    fn request(&mut self, start: u64, end: u64) {
        self.requests.push((self.store.op_count(), start, end));
    }

    /// Records the current state as durable.
    fn checkpoint(&mut self) {
        if self.checkpoints.len() == OPS_MAX_CHECKPOINTS {
            self.checkpoints.remove(0);
            let oldest = self.checkpoints[0].at;
            self.requests.retain(|&(at, _, _)| at >= oldest);
        }
        self.checkpoints.push(Checkpoint {
            at: self.store.op_count(),
            disk: Rc::new(self.disk.clone()),
            snapshots: self.snapshots.clone(),
            bitmap: self.bitmap.clone(),
        });
    }

    /// Adds bitmap [`OPS_BITMAP`] (enabled, empty), which must succeed on a v3 image unless the
    /// disk is empty or the bitmap would be too large (as QEMU refuses them).
    fn add_bitmap(&mut self, granularity: u64, what: &str) {
        let result = self.image().add_bitmap(OPS_BITMAP, granularity, false);
        let size = self.size();
        let refusable = size == 0 || size / granularity > 1 << 30;
        if !self.outcome(result, what, |e| {
            refusable && matches!(e, Error::InvalidArgument { .. })
        }) {
            return;
        }
        self.bitmap_generations += 1;
        let mut bitmap = ModelBitmap {
            granularity,
            enabled: true,
            dirty: Vec::new(),
            generation: self.bitmap_generations,
        };
        bitmap.resize(self.size());
        self.bitmap = Some(bitmap);
    }

    /// A successful guest request marks `[start, end)` in an enabled bitmap.
    fn mark(&mut self, start: u64, end: u64) {
        if let Some(b) = &mut self.bitmap {
            b.mark(start, end);
        }
    }

    /// The bitmap list and the bits match the model exactly.
    fn compare_bitmap(&self, what: &str) {
        let image = self.image();
        let listed: Vec<_> = image.bitmaps();
        match &self.bitmap {
            None => assert!(
                listed.is_empty(),
                "{what}: bitmaps {listed:?}, none expected"
            ),
            Some(b) => {
                assert!(
                    listed.len() == 1
                        && listed[0].name == OPS_BITMAP
                        && listed[0].granularity == b.granularity
                        && listed[0].enabled == b.enabled
                        && !listed[0].in_use,
                    "{what}: bitmaps {listed:?}, expected {b:?}"
                );
                let extents = image
                    .dirty_extents(OPS_BITMAP, 0, self.size())
                    .unwrap_or_else(|e| panic!("{what}: dirty extents: {e}"));
                assert_eq!(extents, b.extents(self.size()), "{what}: dirty extents");
            }
        }
    }

    /// Panics unless `result` is `Ok` or a refusal that `expected` accepts. Returns whether it
    /// succeeded.
    fn outcome(
        &self,
        result: qcow2::Result<()>,
        what: &str,
        expected: impl FnOnce(&Error) -> bool,
    ) -> bool {
        match result {
            Ok(()) => true,
            Err(e) if expected(&e) => false,
            Err(e) => panic!("step {} {what}: unexpected error: {e}", self.step),
        }
    }

    /// A refusal for a refcount that would overflow: possible only with narrow refcounts (a
    /// compressed host cluster takes references up to the maximum, then snapshots add one each).
    fn refcount_overflow(&self, e: &Error) -> bool {
        self.config.refcount_bits <= 8
            && matches!(e, Error::InvalidArgument { reason, .. } if reason.contains("refcount"))
    }

    fn run(&mut self, step: OpsStep) {
        let size = self.size();
        let cs = self.cluster_size;
        match step {
            OpsStep::Write { range, byte } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("write {len} bytes of {byte:#04x} at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().write_at(&vec![byte; len as usize], offset);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.disk[offset as usize..(offset + len) as usize].fill(byte);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::WriteZeroes { range, unmap } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("write_zeroes {len} bytes at {offset:#x} unmap={unmap}");
                self.request(offset, offset + len);
                let result = self.image().write_zeroes(offset, len, unmap);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.disk[offset as usize..(offset + len) as usize].fill(0);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::Discard { range } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("discard {len} bytes at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().discard(offset, len);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.model_discard(offset, len);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::WriteCompressed {
                cluster,
                two,
                misaligned,
                past_end,
                kind,
                byte,
            } => {
                let count = if two { 2 } else { 1 };
                let (offset, end) = if past_end {
                    let offset = size.next_multiple_of(cs) + cluster as u64 % 4096 * cs;
                    (offset, offset + count * cs)
                } else {
                    let start = cluster as u64 % size.div_ceil(cs).max(1) * cs;
                    let end = (start + count * cs).min(size);
                    (if misaligned { start + cs / 2 } else { start }, end)
                };
                let len = end.saturating_sub(offset);
                let data = compressed_data(len as usize, kind, byte);
                let what = format!("write_compressed {len} bytes (kind {kind}) at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().write_compressed(&data, offset);
                let refusable = past_end || misaligned;
                if self.outcome(result, &what, |e| {
                    refusable
                        && matches!(e, Error::InvalidArgument { .. } | Error::OutOfBounds { .. })
                }) {
                    assert!(!refusable, "{what}: accepted (disk size {size:#x})");
                    self.disk[offset as usize..end as usize].copy_from_slice(&data);
                    self.mark(offset, end);
                }
            }
            OpsStep::Resize {
                clusters,
                odd,
                sector_aligned,
                allow_data_loss,
            } => {
                let new_size = ops_size(
                    clusters,
                    odd,
                    sector_aligned,
                    self.config.cluster_bits.get(),
                );
                let what =
                    format!("resize {size:#x} -> {new_size:#x} allow_data_loss={allow_data_loss}");
                self.request(size.min(new_size), size.max(new_size));
                let result = self.image().resize(new_size, allow_data_loss);
                // Whether a shrink drops data depends on allocation, which the model does not
                // track: without permission either outcome is fine.
                // A v2 image cannot grow over a longer backing file (no zero clusters to hide
                // it), so the engine refuses that, as QEMU does.
                let refusable = (new_size < size && !allow_data_loss)
                    || (new_size > size
                        && self.config.version < 3
                        && self
                            .config
                            .backing
                            .as_ref()
                            .is_some_and(|b| b.len() as u64 > size));
                // Bitmaps keep their bits and the new area is clean, as in QEMU.
                // A disk of size 0 holds no bitmap.
                let refusable = refusable || (self.bitmap.is_some() && new_size == 0);
                if self.outcome(result, &what, |e| {
                    refusable && matches!(e, Error::InvalidArgument { .. })
                }) {
                    self.model_resize(new_size);
                    if let Some(b) = &mut self.bitmap {
                        b.resize(new_size);
                    }
                }
            }
            OpsStep::Flush => {
                self.image()
                    .flush()
                    .unwrap_or_else(|e| panic!("step {} flush: {e}", self.step));
                self.checkpoint();
            }
            OpsStep::CreateSnapshot { name } => {
                if self.snapshots.len() >= OPS_MAX_SNAPSHOTS {
                    return;
                }
                let name = OPS_SNAPSHOT_NAMES[name as usize % OPS_SNAPSHOT_NAMES.len()];
                let time = SnapshotTime {
                    secs: self.step as i64,
                    nanos: 0,
                };
                let what = format!("create_snapshot {name:?}");
                match self.image().create_snapshot(name, time) {
                    Ok(info) => {
                        let id = next_snapshot_id(&self.snapshots);
                        assert_eq!(info.id, id, "{what}: id");
                        assert_eq!(info.name, name, "{what}: name");
                        assert_eq!(info.disk_size, Some(size), "{what}: disk size");
                        self.snapshots.push(ModelSnapshot {
                            id,
                            name: name.to_string(),
                            bytes: Rc::new(self.disk.clone()),
                        });
                        self.after_snapshot_change(&what);
                    }
                    Err(e) if self.refcount_overflow(&e) => self.after_refusal(&what),
                    Err(e) => panic!("step {} {what}: unexpected error: {e}", self.step),
                }
            }
            OpsStep::ApplySnapshot(sel) => {
                let key = sel.key(&self.snapshots);
                let target = find_model_snapshot(&self.snapshots, &key).cloned();
                let what = format!(
                    "apply_snapshot {key:?} (model: {:?})",
                    target.as_ref().map(|s| &s.id)
                );
                self.request(0, u64::MAX);
                let result = self.image().apply_snapshot(&key);
                let found = target.is_some();
                let other_size = target
                    .as_ref()
                    .is_some_and(|t| t.bytes.len() as u64 != size);
                let bitmap = self.bitmap.is_some();
                if self.outcome(result, &what, |e| {
                    !found && matches!(e, Error::SnapshotNotFound { .. })
                        || self.refcount_overflow(e)
                        || (bitmap
                            && other_size
                            && matches!(
                                e,
                                Error::InvalidArgument { .. } | Error::Unsupported { .. }
                            ))
                }) {
                    let target = target.unwrap_or_else(|| {
                        panic!("{what}: applied a snapshot the model does not have")
                    });
                    // Every guest byte may change: the whole disk is marked.
                    self.mark(0, size);
                    self.disk = target.bytes.to_vec();
                    self.after_snapshot_change(&what);
                } else {
                    self.after_refusal(&what);
                }
            }
            OpsStep::DeleteSnapshot(sel) => {
                let key = sel.key(&self.snapshots);
                let target = find_model_snapshot(&self.snapshots, &key).map(|s| s.id.clone());
                let what = format!("delete_snapshot {key:?} (model: {target:?})");
                let result = self.image().delete_snapshot(&key);
                let found = target.is_some();
                if self.outcome(result, &what, |e| {
                    !found && matches!(e, Error::SnapshotNotFound { .. })
                }) {
                    let id = target.unwrap_or_else(|| {
                        panic!("{what}: deleted a snapshot the model does not have")
                    });
                    self.snapshots.retain(|s| s.id != id);
                    self.after_snapshot_change(&what);
                } else {
                    self.after_refusal(&what);
                }
            }
            OpsStep::Reopen => self.reopen(),
            OpsStep::Crash { mode, cut, seed } => self.crash(mode, cut, seed),
            OpsStep::BitmapClear | OpsStep::BitmapEnable(_) | OpsStep::BitmapRemoveOrAdd { .. } => {
                self.bitmap_step(step)
            }
        }
        self.compare_bitmap(&format!("step {} {step:?}", self.step));
    }

    /// A bitmap command; without a bitmap, clear and enable are refused.
    fn bitmap_step(&mut self, step: OpsStep) {
        let what = format!("step {} {step:?}", self.step);
        let missing = |e: &Error| matches!(e, Error::InvalidArgument { reason, .. } if reason.contains("not found"));
        match step {
            OpsStep::BitmapClear => {
                let result = self.image().clear_bitmap(OPS_BITMAP);
                if self.outcome(result, &what, |e| missing(e)) {
                    self.bitmap_generations += 1;
                    let generation = self.bitmap_generations;
                    let b = self
                        .bitmap
                        .as_mut()
                        .expect("cleared a bitmap the model lacks");
                    b.dirty.fill(false);
                    b.generation = generation;
                }
            }
            OpsStep::BitmapEnable(on) => {
                let result = self.image().set_bitmap_enabled(OPS_BITMAP, on);
                if self.outcome(result, &what, |e| missing(e)) {
                    let b = self
                        .bitmap
                        .as_mut()
                        .expect("enabled a bitmap the model lacks");
                    b.enabled = on;
                }
            }
            OpsStep::BitmapRemoveOrAdd { granularity_shift } => {
                if self.bitmap.is_some() {
                    self.image()
                        .remove_bitmap(OPS_BITMAP)
                        .unwrap_or_else(|e| panic!("{what}: remove: {e}"));
                    self.bitmap = None;
                    self.bitmap_generations += 1;
                } else if self.config.version >= 3 {
                    self.add_bitmap(512 << (granularity_shift % 8), &what);
                }
            }
            _ => unreachable!("bitmap_step runs bitmap steps"),
        }
    }

    /// Discard: whole clusters inside the range (the last partial cluster counts as whole when
    /// the range reaches the end of the disk) read as zeros; except on v2 over a backing file,
    /// which has no zero flag to hide the backing file with, so (as in QEMU) the clusters keep
    /// their data.
    fn model_discard(&mut self, offset: u64, len: u64) {
        if self.config.version < 3 && self.config.backing.is_some() {
            return;
        }
        let cs = self.cluster_size;
        let size = self.size();
        let first = offset.next_multiple_of(cs);
        let end = if offset + len >= size {
            (offset + len).next_multiple_of(cs)
        } else {
            (offset + len) & !(cs - 1)
        };
        let mut pos = first;
        while pos < end.min(size) {
            let to = (pos + cs).min(size);
            self.disk[pos as usize..to as usize].fill(0);
            pos += cs;
        }
    }

    /// Resize: a shrink drops the end; a grow makes the rest of the old last cluster read as
    /// zeros and, beyond it, whatever [`OPS_GROW_EXPOSES_BACKING`] says.
    fn model_resize(&mut self, new_size: u64) {
        let old = self.size();
        if new_size <= old {
            self.disk.truncate(new_size as usize);
            return;
        }
        let tail_end = old.next_multiple_of(self.cluster_size).min(new_size);
        self.disk.resize(tail_end as usize, 0);
        let rest = if OPS_GROW_EXPOSES_BACKING {
            self.backing_bytes(tail_end, new_size)
        } else {
            vec![0u8; (new_size - tail_end) as usize]
        };
        self.disk.extend_from_slice(&rest);
    }

    /// After a successful snapshot operation: the new state is durable (published by a synced
    /// header write after everything else was flushed), the image is consistent, and every
    /// snapshot reads as its model.
    fn after_snapshot_change(&mut self, what: &str) {
        self.checkpoint();
        self.check_clean(what);
        self.compare_snapshots(what);
    }

    /// After a refused operation: nothing changed (the disk is compared after every step).
    fn after_refusal(&mut self, what: &str) {
        let listed: Vec<(String, String)> = self
            .image()
            .snapshots()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        assert_eq!(
            listed,
            snapshot_names(&self.snapshots),
            "{what}: refused, but the snapshot list changed"
        );
        self.check_clean(&format!("{what} (refused)"));
    }

    fn reopen(&mut self) {
        let what = format!("step {} reopen", self.step);
        let image = self.image.take().expect("an image is open between steps");
        image
            .close()
            .unwrap_or_else(|e| panic!("{what}: close: {e}"));
        // A fresh recording store, so later crash cuts count from the reopened image.
        let store = Arc::new(RecordingStorage::new(self.store.live_bytes()));
        let mut image =
            Image::from_storage(Box::new(store.clone()), "fuzz", &ops_open_options(true))
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        assert!(
            !image.header().is_dirty(),
            "{what}: a closed image is dirty"
        );
        if let Some(base) = &self.config.backing {
            attach_backing(&mut image, base);
        }
        self.store = store;
        self.image = Some(image);
        self.checkpoints.clear();
        self.requests.clear();
        self.checkpoint();
        self.check_clean(&what);
        self.compare_snapshots(&what);
    }

    /// Materialises a power cut on the current store and checks the crashed image.
    fn crash(&mut self, mode: u8, cut: u16, seed: u16) {
        let ops = self.store.op_count();
        let oldest = self.checkpoints[0].at;
        let cut = if mode & 4 != 0 {
            self.checkpoints[cut as usize % self.checkpoints.len()].at
        } else {
            oldest + cut as usize % (ops - oldest + 1)
        };
        let survivors = match mode & 3 {
            0 => Survivors::None,
            1 => Survivors::All,
            _ => Survivors::TornSectors(seed as u64 + 1),
        };
        let what = format!(
            "step {} crash after {cut} of {ops} recorded operations, {survivors:?}",
            self.step
        );
        let bytes = self.store.crash_image(cut, survivors);
        let durable_index = self
            .checkpoints
            .iter()
            .rposition(|c| c.at <= cut)
            .expect("cuts start at the oldest checkpoint");
        let durable = &self.checkpoints[durable_index];
        // The snapshots are those at the last durable point or those after the step that was
        // running (each successful snapshot operation ends with a checkpoint).
        let later = match self.checkpoints.get(durable_index + 1) {
            Some(next) => &next.snapshots,
            None => &self.snapshots,
        };

        let readonly = open_crashed(&bytes, false, &self.config.backing)
            .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        let dirty = readonly.header().is_dirty();
        let image = if dirty {
            assert!(
                self.config.lazy_refcounts,
                "{what}: dirty without lazy refcounts"
            );
            drop(readonly);
            // A read-write open repairs a dirty image.
            let image = open_crashed(&bytes, true, &self.config.backing)
                .unwrap_or_else(|e| panic!("{what}: repairing open: {e}"));
            self.check_recovered_bitmap(&image, durable, &what);
            let report = image
                .check()
                .unwrap_or_else(|e| panic!("{what}: check: {e}"));
            assert!(
                report.is_clean(),
                "{what}: after the repairing open: {:?}",
                report.messages
            );
            image
        } else {
            let report = readonly
                .check()
                .unwrap_or_else(|e| panic!("{what}: check: {e}"));
            assert_eq!(report.check_errors, 0, "{what}: {:?}", report.messages);
            // A cut inside a snapshot operation can leave refcounts raised for a state that was
            // never published: leaks, and COPIED flags that disagree with the leaked refcount
            // (counted as corruptions, as QEMU does). Fixing the leaks cures both (checked below);
            // nothing else may be wrong.
            let corruptions = report
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR") && !m.starts_with("ERROR OFLAG_COPIED"))
                .count();
            let copied = report
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR OFLAG_COPIED"))
                .count() as u64;
            assert!(
                corruptions == 0
                    && report.corruptions == copied
                    && (copied == 0 || report.leaks > 0),
                "{what}: {:?}",
                report.messages
            );
            readonly
        };

        // Every byte no request touched since the durable point reads as it did then.
        let size = image.size();
        assert!(size <= OPS_MAX_BYTES, "{what}: size {size:#x}");
        let mut content = vec![0u8; size as usize];
        image
            .read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        let n = content.len().min(durable.disk.len());
        let mut touched = vec![false; n];
        for &(at, start, end) in &self.requests {
            if at >= durable.at && at <= cut && start < n as u64 {
                touched[start as usize..(end.min(n as u64)) as usize].fill(true);
            }
        }
        if let Some(i) = (0..n).find(|&i| !touched[i] && content[i] != durable.disk[i]) {
            panic!(
                "{what}: byte {i:#x} reads {:#04x}, durable since operation {} as {:#04x}",
                content[i], durable.at, durable.disk[i]
            );
        }

        let listed: Vec<(String, String)> = image
            .snapshots()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        let expected = if listed == snapshot_names(&durable.snapshots) {
            &durable.snapshots
        } else if listed == snapshot_names(later) {
            later
        } else {
            panic!(
                "{what}: snapshots {listed:?}, expected {:?} or {:?}",
                snapshot_names(&durable.snapshots),
                snapshot_names(later)
            )
        };
        compare_snapshot_views(&image, expected, &what);
        drop(image);

        // Whatever is left, fixing leaks cures.
        if !dirty {
            let image = open_crashed(&bytes, true, &self.config.backing)
                .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
            self.check_recovered_bitmap(&image, durable, &what);
            let report = image
                .check_and_repair(Repair::Leaks)
                .unwrap_or_else(|e| panic!("{what}: check -r leaks: {e}"));
            assert!(
                report.is_clean(),
                "{what}: after fixing leaks: {:?}",
                report.messages
            );
        }
    }

    /// After a power cut, this engine's read-write open gives the bitmap back consistent, marking
    /// at least what it marked at the last durable point, when no add, remove or clear came
    /// between that point and now (those may lose bits legitimately).
    fn check_recovered_bitmap(&self, image: &Image, durable: &Checkpoint, what: &str) {
        let (Some(then), Some(now)) = (&durable.bitmap, &self.bitmap) else {
            return;
        };
        if then.generation != now.generation {
            return;
        }
        let listed = image.bitmaps();
        assert!(
            listed.len() == 1 && listed[0].name == OPS_BITMAP && !listed[0].in_use,
            "{what}: recovered bitmaps {listed:?}"
        );
        let size = image.size();
        let extents = image
            .dirty_extents(OPS_BITMAP, 0, size)
            .unwrap_or_else(|e| panic!("{what}: recovered dirty extents: {e}"));
        let g = then.granularity;
        for (i, _) in then.dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = i as u64 * g;
            if start >= size {
                break;
            }
            assert!(
                extents.iter().any(|&(s, l)| s <= start && start < s + l),
                "{what}: granule at {start:#x} was durable and dirty, the recovered bitmap \
                 misses it: {extents:?}"
            );
        }
    }

    /// The whole disk reads as the model.
    fn compare_disk(&self, what: &str) {
        let image = self.image();
        assert_eq!(image.size(), self.size(), "{what}: virtual size");
        let mut content = vec![0u8; self.disk.len()];
        image
            .read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        if content == self.disk {
            return;
        }
        if let Some(i) = (0..content.len()).find(|&i| content[i] != self.disk[i]) {
            panic!(
                "{what}: guest byte {i:#x} reads {:#04x}, the model says {:#04x}",
                content[i], self.disk[i]
            );
        }
    }

    /// `check()` finds nothing at all.
    fn check_clean(&self, what: &str) {
        let report = self
            .image()
            .check()
            .unwrap_or_else(|e| panic!("{what}: check: {e}"));
        assert!(report.is_clean(), "{what}: check: {:?}", report.messages);
    }

    /// The snapshot list and every snapshot's content match the model.
    fn compare_snapshots(&self, what: &str) {
        let image = self.image();
        let listed: Vec<(String, String)> = image
            .snapshots()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        assert_eq!(
            listed,
            snapshot_names(&self.snapshots),
            "{what}: snapshot list"
        );
        compare_snapshot_views(image, &self.snapshots, what);
    }

    /// Closes the image and checks what it leaves behind: clean, not dirty, same content.
    fn finish(mut self) {
        self.check_clean("at the end");
        self.compare_snapshots("at the end");
        let image = self.image.take().expect("an image is open between steps");
        image
            .close()
            .unwrap_or_else(|e| panic!("at the end: close: {e}"));
        let closed = open_crashed(&self.store.live_bytes(), false, &self.config.backing)
            .unwrap_or_else(|e| panic!("at the end: open the closed image: {e}"));
        assert!(
            !closed.header().is_dirty(),
            "at the end: a closed image is dirty"
        );
        let report = closed
            .check()
            .unwrap_or_else(|e| panic!("at the end: check the closed image: {e}"));
        assert!(
            report.is_clean(),
            "at the end: closed image: {:?}",
            report.messages
        );
        self.image = Some(closed);
        self.compare_disk("the closed image");
    }
}

/// (id, name) of each snapshot, in table order.
fn snapshot_names(snapshots: &[ModelSnapshot]) -> Vec<(String, String)> {
    snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect()
}

/// Every snapshot, opened by id, reads as its model.
fn compare_snapshot_views(image: &Image, snapshots: &[ModelSnapshot], what: &str) {
    for s in snapshots {
        let view = image
            .open_snapshot(&s.id)
            .unwrap_or_else(|e| panic!("{what}: open snapshot {}: {e}", s.id));
        assert_eq!(
            view.size(),
            s.bytes.len() as u64,
            "{what}: snapshot {} size",
            s.id
        );
        let mut content = vec![0u8; s.bytes.len()];
        view.read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read snapshot {}: {e}", s.id));
        if content[..] == s.bytes[..] {
            continue;
        }
        if let Some(i) = (0..content.len()).find(|&i| content[i] != s.bytes[i]) {
            panic!(
                "{what}: snapshot {} ({}) byte {i:#x} reads {:#04x}, the model says {:#04x}",
                s.id, s.name, content[i], s.bytes[i]
            );
        }
    }
}

/// An out-of-bounds refusal of exactly the request that overran the disk.
fn out_of_bounds(e: &Error, offset: u64, len: u64, size: u64) -> bool {
    offset + len > size && matches!(e, Error::OutOfBounds { .. })
}

fn ops_open_options(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        backing: BackingPolicy::Ignore,
        ..OpenOptions::default()
    }
}

fn attach_backing(image: &mut Image, base: &[u8]) {
    image
        .attach_raw_backing(Box::new(MemoryStorage::from_bytes(base.to_vec())))
        .unwrap_or_else(|e| panic!("attach the backing file: {e}"));
}

/// Opens image bytes from memory (with the backing file attached).
fn open_crashed(bytes: &[u8], writable: bool, backing: &Option<Vec<u8>>) -> qcow2::Result<Image> {
    let mut image = Image::from_storage(
        Box::new(MemoryStorage::from_bytes(bytes.to_vec())),
        "crashed",
        &ops_open_options(writable),
    )?;
    if let Some(base) = backing {
        attach_backing(&mut image, base);
    }
    Ok(image)
}
