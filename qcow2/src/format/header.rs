//! The qcow2 header (v2 and v3): the fixed fields, their validation against QEMU's limits, and the
//! bytes a writer must keep (unknown trailing header fields).
//!
//! Decoding is pure: it takes the bytes of cluster 0 and returns a [`Header`] or a [`FormatError`]
//! naming the field and its offset. Nothing here knows the file length; checks that need it live in
//! the image layer.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::{FormatError, FormatResult};
use super::extension::{self, Extensions};
use super::features::{self, Incompatible};
use super::limits::*;

/// The 72 bytes every qcow2 version has, exactly as on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeaderV2 {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
}

/// The v3 fields between byte 72 and 104, exactly as on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeaderV3 {
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
}

/// Byte offset of each header field, for error messages that say where the problem is.
pub mod field_offset {
    /// `magic` starts at byte 0.
    pub const MAGIC: u64 = 0;
    /// `version` starts at byte 4.
    pub const VERSION: u64 = 4;
    /// `backing_file_offset` starts at byte 8.
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size` starts at byte 16.
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// `cluster_bits` starts at byte 20.
    pub const CLUSTER_BITS: u64 = 20;
    /// `size` starts at byte 24.
    pub const SIZE: u64 = 24;
    /// `crypt_method` starts at byte 32.
    pub const CRYPT_METHOD: u64 = 32;
    /// `l1_size` starts at byte 36.
    pub const L1_SIZE: u64 = 36;
    /// `l1_table_offset` starts at byte 40.
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// `refcount_table_offset` starts at byte 48.
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `refcount_table_clusters` starts at byte 56.
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// `nb_snapshots` starts at byte 60.
    pub const NB_SNAPSHOTS: u64 = 60;
    /// `snapshots_offset` starts at byte 64.
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    /// `incompatible_features` starts at byte 72.
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `compatible_features` starts at byte 80.
    pub const COMPATIBLE_FEATURES: u64 = 80;
    /// `autoclear_features` starts at byte 88.
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    /// `refcount_order` starts at byte 96.
    pub const REFCOUNT_ORDER: u64 = 96;
    /// `header_length` starts at byte 100.
    pub const HEADER_LENGTH: u64 = 100;
    /// `compression_type` starts at byte 104.
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// How compressed clusters are encoded (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), type 0.
    Zlib,
    /// One or more zstd frames, type 1.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints (`compression-type`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A decoded, validated header with everything needed to rewrite it faithfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `version`: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// `backing_file_offset`: where in cluster 0 the backing file name lies; 0 for none.
    pub backing_file_offset: u64,
    /// `backing_file_size`: length of the backing file name in bytes (at most 1023).
    pub backing_file_size: u32,
    /// `cluster_bits`: the cluster size as a power of two (9..=21).
    pub cluster_bits: u32,
    /// `size`: the virtual disk size in bytes.
    pub size: u64,
    /// `crypt_method`: 0 for none, 1 for legacy AES-CBC, 2 for LUKS; others are refused.
    pub crypt_method: u32,
    /// `l1_size`: entries in the active L1 table.
    pub l1_size: u32,
    /// `l1_table_offset`: host offset of the active L1 table, cluster-aligned.
    pub l1_table_offset: u64,
    /// `refcount_table_offset`: host offset of the refcount table, cluster-aligned.
    pub refcount_table_offset: u64,
    /// `refcount_table_clusters`: length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// `nb_snapshots`: number of internal snapshots.
    pub nb_snapshots: u32,
    /// `snapshots_offset`: host offset of the snapshot table; 0 with no snapshots.
    pub snapshots_offset: u64,
    /// `incompatible_features`: [`Incompatible`] bits (always 0 for v2).
    pub incompatible_features: u64,
    /// `compatible_features`: [`Compatible`](super::features::Compatible) bits.
    pub compatible_features: u64,
    /// `autoclear_features`: [`Autoclear`](super::features::Autoclear) bits.
    pub autoclear_features: u64,
    /// `refcount_order`: the refcount width as a power of two bits (0..=6; 4 for v2).
    pub refcount_order: u32,
    /// 72 for v2; the on-disk value for v3.
    pub header_length: u32,
    /// `compression_type` (byte 104): zlib unless the incompatible bit says otherwise.
    pub compression_type: CompressionType,
    /// Header bytes past the fields this engine knows (offset 112 up to header_length), kept verbatim.
    pub unknown_header_bytes: Vec<u8>,
    /// The header extensions, in on-disk order.
    pub extensions: Extensions,
    /// The backing file name, if any (raw bytes; not NUL-terminated on disk).
    pub backing_file: Option<Vec<u8>>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits (1..=64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & Incompatible::EXTENDED_L2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & Incompatible::EXTERNAL_DATA_FILE != 0
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & Incompatible::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & Incompatible::CORRUPT != 0
    }

    /// Whether the lazy refcounts compatible bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & features::Compatible::LAZY_REFCOUNTS != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    /// Guest bytes one L1 entry covers, as a shift.
    pub fn l1_shift(&self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }

    /// The number of L1 entries needed to cover `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(1u64 << self.l1_shift())
    }

    /// Decodes and validates the header from the start of the image (at least the first cluster, or
    /// the whole file if it is shorter).
    pub fn decode(bytes: &[u8]) -> FormatResult<Header> {
        use field_offset as f;
        let (v2, _) = RawHeaderV2::read_from_prefix(bytes).map_err(|_| {
            FormatError::invalid(
                "header",
                0,
                format!(
                    "file is {} bytes, shorter than the 72-byte header",
                    bytes.len()
                ),
            )
        })?;
        if v2.magic.get() != QCOW_MAGIC {
            return Err(FormatError::invalid(
                "header field magic",
                f::MAGIC,
                format!("{:#010x} is not the qcow2 magic QFI\\xfb", v2.magic.get()),
            ));
        }
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(FormatError::unsupported(
                "header field version",
                f::VERSION,
                format!("qcow2 version {version} (only 2 and 3 exist)"),
            ));
        }
        let cluster_bits = v2.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::invalid(
                "header field cluster_bits",
                f::CLUSTER_BITS,
                format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        if (bytes.len() as u64) < cluster_size.min(V3_MIN_HEADER_LENGTH as u64) && version == 3 {
            return Err(FormatError::invalid(
                "header",
                0,
                format!("file is {} bytes, shorter than the v3 header", bytes.len()),
            ));
        }

        let (mut incompatible, mut compatible, mut autoclear) = (0, 0, 0);
        let (mut refcount_order, mut header_length) = (V2_REFCOUNT_ORDER, V2_HEADER_LENGTH);
        if version == 3 {
            let (v3, _) = RawHeaderV3::read_from_prefix(&bytes[72..]).map_err(|_| {
                FormatError::invalid("header", 72, "file ends inside the v3 header fields")
            })?;
            incompatible = v3.incompatible_features.get();
            compatible = v3.compatible_features.get();
            autoclear = v3.autoclear_features.get();
            refcount_order = v3.refcount_order.get();
            header_length = v3.header_length.get();
            if (header_length as u64) < V3_MIN_HEADER_LENGTH as u64
                || header_length as u64 > cluster_size
            {
                return Err(FormatError::invalid(
                    "header field header_length",
                    f::HEADER_LENGTH,
                    format!(
                        "{header_length} is outside {V3_MIN_HEADER_LENGTH}..={cluster_size} (the cluster size)"
                    ),
                ));
            }
            if header_length as usize > bytes.len() {
                return Err(FormatError::invalid(
                    "header field header_length",
                    f::HEADER_LENGTH,
                    format!(
                        "{header_length} runs past the end of the file ({} bytes)",
                        bytes.len()
                    ),
                ));
            }
            if refcount_order > MAX_REFCOUNT_ORDER {
                return Err(FormatError::invalid(
                    "header field refcount_order",
                    f::REFCOUNT_ORDER,
                    format!("{refcount_order} is above the maximum {MAX_REFCOUNT_ORDER} (64-bit refcounts)"),
                ));
            }
        }

        let crypt_method = v2.crypt_method.get();
        if crypt_method > 2 {
            return Err(FormatError::unsupported(
                "header field crypt_method",
                f::CRYPT_METHOD,
                format!("Unsupported encryption method {crypt_method}"),
            ));
        }
        if incompatible & !Incompatible::KNOWN != 0 {
            // The feature table, when the extensions can be read, names the unknown bits.
            let end = match v2.backing_file_offset.get() {
                0 => cluster_size,
                offset => offset.min(cluster_size),
            }
            .min(bytes.len() as u64);
            let names = extension::decode(bytes, header_length as u64, end)
                .map(|e| e.feature_names)
                .unwrap_or_default();
            features::check_incompatible(incompatible, &names)?;
        }

        // Compression type: the byte at 104 exists only when header_length covers it.
        let compression_byte = if header_length > 104 { bytes[104] } else { 0 };
        let compression_type = match compression_byte {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            other => {
                return Err(FormatError::unsupported(
                    "header field compression_type",
                    f::COMPRESSION_TYPE,
                    format!("compression type {other}"),
                ))
            }
        };
        let has_type_bit = incompatible & Incompatible::COMPRESSION_TYPE != 0;
        if has_type_bit != (compression_byte != 0) {
            return Err(FormatError::invalid(
                "header field compression_type",
                f::COMPRESSION_TYPE,
                format!(
                    "compression type {compression_byte} disagrees with incompatible bit 3 ({})",
                    if has_type_bit { "set" } else { "clear" }
                ),
            ));
        }
        if incompatible & Incompatible::EXTENDED_L2 != 0
            && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS
        {
            return Err(FormatError::invalid(
                "header field incompatible_features",
                f::INCOMPATIBLE_FEATURES,
                format!(
                    "extended L2 entries need clusters of 16 KiB or more, not {cluster_size} bytes"
                ),
            ));
        }

        // Trailing header bytes this engine does not know are kept; 105..112 is padding.
        let unknown_header_bytes = if header_length > V3_HEADER_LENGTH {
            bytes[V3_HEADER_LENGTH as usize..header_length as usize].to_vec()
        } else {
            Vec::new()
        };

        let backing_file_offset = v2.backing_file_offset.get();
        let backing_file_size = v2.backing_file_size.get();
        let backing_file = if backing_file_offset != 0 {
            if backing_file_offset > cluster_size {
                return Err(FormatError::invalid(
                    "header field backing_file_offset",
                    f::BACKING_FILE_OFFSET,
                    format!("{backing_file_offset:#x} is outside the header cluster"),
                ));
            }
            if backing_file_size > MAX_BACKING_FILE_NAME
                || backing_file_size as u64 > cluster_size - backing_file_offset
            {
                return Err(FormatError::invalid(
                    "header field backing_file_size",
                    f::BACKING_FILE_SIZE,
                    format!("{backing_file_size} is above the limit of {MAX_BACKING_FILE_NAME} bytes or runs past the header cluster"),
                ));
            }
            let end = (backing_file_offset + backing_file_size as u64) as usize;
            if end > bytes.len() {
                return Err(FormatError::invalid(
                    "backing file name",
                    backing_file_offset,
                    "runs past the end of the file",
                ));
            }
            // An empty name means no backing file, as QEMU reads it.
            (backing_file_size > 0).then(|| bytes[backing_file_offset as usize..end].to_vec())
        } else {
            None
        };

        let extensions_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        }
        .min(bytes.len() as u64);
        let extensions = extension::decode(bytes, header_length as u64, extensions_end)?;
        if let Some(c) = extensions.crypto {
            if crypt_method != 2 {
                return Err(FormatError::invalid(
                    "full disk encryption extension",
                    header_length as u64,
                    "CRYPTO header extension only expected with LUKS encryption method",
                ));
            }
            if c.offset % cluster_size != 0 {
                return Err(FormatError::invalid(
                    "full disk encryption extension",
                    header_length as u64,
                    format!(
                        "Encryption header offset '{}' is not a multiple of cluster size '{cluster_size}'",
                        c.offset
                    ),
                ));
            }
        } else if crypt_method == 2 {
            return Err(FormatError::invalid(
                "header field crypt_method",
                f::CRYPT_METHOD,
                "Missing CRYPTO header for crypt method 2",
            ));
        }
        // An external data file need not be named (the spec's extension is optional): whoever
        // opens the image then names it (QEMU's `data-file` option).
        if autoclear & features::Autoclear::RAW_EXTERNAL_DATA != 0
            && incompatible & Incompatible::EXTERNAL_DATA_FILE == 0
        {
            return Err(FormatError::invalid(
                "header field autoclear_features",
                f::AUTOCLEAR_FEATURES,
                "raw external data without an external data file",
            ));
        }

        let header = Header {
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size: v2.size.get(),
            crypt_method,
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression_type,
            unknown_header_bytes,
            extensions,
            backing_file,
        };
        header.validate_tables()?;
        Ok(header)
    }

    /// Checks table sizes and offsets against QEMU's limits (not yet against the file length).
    fn validate_tables(&self) -> FormatResult<()> {
        use field_offset as f;
        let cluster_size = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(FormatError::invalid(
                "header field size",
                f::SIZE,
                format!(
                    "virtual size {} is above the maximum {MAX_VIRTUAL_SIZE}",
                    self.size
                ),
            ));
        }
        let aligned = |value: u64, field: &str, at: u64| -> FormatResult<()> {
            if value % cluster_size != 0 {
                return Err(FormatError::invalid(
                    format!("header field {field}"),
                    at,
                    format!("offset {value:#x} is not cluster aligned"),
                ));
            }
            if value > MAX_CLUSTER_OFFSET {
                return Err(FormatError::invalid(
                    format!("header field {field}"),
                    at,
                    format!("offset {value:#x} is beyond the 56-bit host offset range"),
                ));
            }
            Ok(())
        };

        // L1 table.
        if self.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(FormatError::invalid(
                "header field l1_size",
                f::L1_SIZE,
                format!("{} entries exceed the 32 MiB L1 limit", self.l1_size),
            ));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > MAX_L1_ENTRIES {
            return Err(FormatError::invalid(
                "header field size",
                f::SIZE,
                format!(
                    "virtual size {} needs an L1 table larger than 32 MiB",
                    self.size
                ),
            ));
        }
        if (self.l1_size as u64) < needed {
            return Err(FormatError::invalid(
                "header field l1_size",
                f::L1_SIZE,
                format!(
                    "L1 table is too small: {} entries cannot cover the virtual size {} (needs {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        aligned(self.l1_table_offset, "l1_table_offset", f::L1_TABLE_OFFSET)?;
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(FormatError::invalid(
                "header field l1_table_offset",
                f::L1_TABLE_OFFSET,
                "the L1 table overlaps the header",
            ));
        }

        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::invalid(
                "header field refcount_table_clusters",
                f::REFCOUNT_TABLE_CLUSTERS,
                "the refcount table is empty",
            ));
        }
        if self.refcount_table_clusters as u64 * cluster_size > MAX_REFTABLE_SIZE_BYTES {
            return Err(FormatError::invalid(
                "header field refcount_table_clusters",
                f::REFCOUNT_TABLE_CLUSTERS,
                format!(
                    "{} clusters exceed the 8 MiB refcount table limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        aligned(
            self.refcount_table_offset,
            "refcount_table_offset",
            f::REFCOUNT_TABLE_OFFSET,
        )?;
        if self.refcount_table_offset == 0 {
            return Err(FormatError::invalid(
                "header field refcount_table_offset",
                f::REFCOUNT_TABLE_OFFSET,
                "the refcount table overlaps the header",
            ));
        }

        // Snapshot table.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::invalid(
                "header field nb_snapshots",
                f::NB_SNAPSHOTS,
                format!(
                    "{} snapshots exceed the limit of {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        aligned(
            self.snapshots_offset,
            "snapshots_offset",
            f::SNAPSHOTS_OFFSET,
        )?;
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(FormatError::invalid(
                "header field snapshots_offset",
                f::SNAPSHOTS_OFFSET,
                "the snapshot table overlaps the header",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_v3() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&9u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 15).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x600u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x200u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn decodes_a_minimal_v3_header() {
        let h = Header::decode(&minimal_v3()).unwrap();
        assert_eq!(h.cluster_size(), 512);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type, CompressionType::Zlib);
        assert!(h.extensions.unknown.is_empty());
    }

    #[test]
    fn cluster_bits_out_of_range_names_the_field() {
        let mut b = minimal_v3();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e.structure, "header field cluster_bits");
        assert_eq!(e.offset, 20);
    }

    #[test]
    fn refcount_order_seven_is_refused() {
        let mut b = minimal_v3();
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(Header::decode(&b).unwrap_err().offset, 96);
    }

    #[test]
    fn too_small_l1_is_refused() {
        let mut b = minimal_v3();
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert!(e.reason().contains("too small"), "{e}");
    }

    #[test]
    fn luks_without_its_header_extension_and_unknown_methods_are_refused() {
        let mut b = minimal_v3();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert!(e
            .to_string()
            .contains("Missing CRYPTO header for crypt method 2"));
        b[32..36].copy_from_slice(&3u32.to_be_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert!(matches!(
            e.problem,
            super::super::error::Problem::Unsupported(_)
        ));
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(Header::decode(&b).unwrap().crypt_method, 1);
    }

    #[test]
    fn unknown_trailing_header_bytes_are_kept() {
        let mut b = minimal_v3();
        b[100..104].copy_from_slice(&120u32.to_be_bytes());
        b[112..120].copy_from_slice(&[0xAA; 8]);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.unknown_header_bytes, vec![0xAA; 8]);
    }
}

impl Header {
    /// Encodes cluster 0 the way QEMU writes it: the fixed header (72 bytes for v2, 112 or more for
    /// v3, with unknown trailing bytes put back), the extensions (backing format, data file,
    /// feature table, bitmaps, unknown ones), the end marker, and the backing file name right after
    /// it. `backing_file_offset`, `backing_file_size` and `header_length` are recomputed. Fails when
    /// everything does not fit in one cluster.
    pub fn encode(&self) -> FormatResult<Vec<u8>> {
        use super::extension::kind;
        let mut out = Vec::with_capacity(1024);
        let header_length = if self.version >= 3 {
            V3_HEADER_LENGTH + self.unknown_header_bytes.len() as u32
        } else {
            V2_HEADER_LENGTH
        };
        let v2 = RawHeaderV2 {
            magic: QCOW_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        out.extend_from_slice(v2.as_bytes());
        if self.version >= 3 {
            let v3 = RawHeaderV3 {
                incompatible_features: self.incompatible_features.into(),
                compatible_features: self.compatible_features.into(),
                autoclear_features: self.autoclear_features.into(),
                refcount_order: self.refcount_order.into(),
                header_length: header_length.into(),
            };
            out.extend_from_slice(v3.as_bytes());
            out.push(match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            });
            out.extend_from_slice(&[0u8; 7]);
            out.extend_from_slice(&self.unknown_header_bytes);
        }
        let ext = &self.extensions;
        let put = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &ext.backing_format {
            put(&mut out, kind::BACKING_FORMAT, f);
        }
        if let Some(f) = &ext.data_file {
            put(&mut out, kind::EXTERNAL_DATA_FILE, f);
        }
        if let Some(c) = ext.crypto {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&c.offset.to_be_bytes());
            raw[8..].copy_from_slice(&c.length.to_be_bytes());
            put(&mut out, kind::FULL_DISK_ENCRYPTION, &raw);
        }
        if self.version >= 3 && (ext.has_feature_table || self.cluster_size() > 4096) {
            let names = if ext.feature_names.is_empty() {
                super::features::qemu_feature_table()
            } else {
                ext.feature_names.clone()
            };
            let mut table = Vec::with_capacity(names.len() * FEATURE_NAME_ENTRY_SIZE);
            for n in &names {
                let mut entry = [0u8; FEATURE_NAME_ENTRY_SIZE];
                entry[0] = n.kind.to_byte();
                entry[1] = n.bit;
                let len = n.name.len().min(FEATURE_NAME_ENTRY_SIZE - 2);
                entry[2..2 + len].copy_from_slice(&n.name[..len]);
                table.extend_from_slice(&entry);
            }
            put(&mut out, kind::FEATURE_NAME_TABLE, &table);
        }
        if let Some(b) = ext.bitmaps {
            let raw = super::extension::RawBitmapsExtension {
                nb_bitmaps: b.nb_bitmaps.into(),
                reserved: 0.into(),
                bitmap_directory_size: b.bitmap_directory_size.into(),
                bitmap_directory_offset: b.bitmap_directory_offset.into(),
            };
            put(&mut out, kind::BITMAPS, raw.as_bytes());
        }
        for u in &ext.unknown {
            put(&mut out, u.kind, &u.data);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let offset = out.len() as u64;
            out.extend_from_slice(name);
            out[8..16].copy_from_slice(&offset.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(FormatError::invalid(
                "header",
                0,
                format!(
                    "header, extensions and backing file name take {} bytes, more than one cluster ({})",
                    out.len(),
                    self.cluster_size()
                ),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod encode_tests {
    use super::*;

    #[test]
    fn encode_then_decode_gives_the_same_header() {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut h = Header::decode(&b).unwrap();
        h.backing_file = Some(b"base.qcow2".to_vec());
        h.extensions.backing_format = Some(b"qcow2".to_vec());
        h.extensions
            .unknown
            .push(super::super::extension::UnknownExtension {
                kind: 0x1234_5678,
                data: vec![9; 13],
            });
        h.unknown_header_bytes = vec![0xAA; 8];
        let mut bytes = h.encode().unwrap();
        bytes.resize(65536, 0);
        let back = Header::decode(&bytes).unwrap();
        assert_eq!(back.backing_file, h.backing_file);
        assert_eq!(back.extensions.unknown, h.extensions.unknown);
        assert_eq!(back.unknown_header_bytes, h.unknown_header_bytes);
        assert_eq!(back.header_length, 120);
        assert!(back.extensions.has_feature_table);
        assert_eq!(back.extensions.feature_names.len(), 8);
    }
}
