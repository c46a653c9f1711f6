//! `header`: arbitrary bytes as cluster 0, through the header decoder and encoder.

use super::*;

pub(crate) fn be32(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(bytes: &[u8], at: u64) -> u64 {
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
