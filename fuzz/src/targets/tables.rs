//! `tables`: L2 entries, subcluster bitmaps, compressed descriptors and refcount blocks.

use super::*;

/// Largest refblock the `tables` target exercises (bigger ones only cost time).
pub(crate) const TABLES_MAX_BLOCK: usize = 4096;

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
pub(crate) fn check_classification(entry: u64, external_data: bool) {
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
pub(crate) fn check_subcluster_bitmap(bitmap: SubclusterBitmap) {
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
pub(crate) fn check_compressed_descriptor(entry: u64, cluster_bits: u32) {
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
pub(crate) fn check_compressed_encode(a: u64, b: u64, cluster_bits: u32) {
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
pub(crate) fn check_refcounts(input: &TablesInput) {
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
