//! Feature bits of the v3 header and the policy for unknown ones: an unknown incompatible bit
//! refuses the open, unknown compatible bits are kept, unknown autoclear bits are cleared before the
//! first write.

use super::error::{FormatError, FormatResult};
use super::header::field_offset;

/// Incompatible feature bits (header offset 72).
#[derive(Debug)]
pub struct Incompatible;
impl Incompatible {
    /// Bit 0, dirty: refcounts may be stale (lazy refcounts); they are rebuilt before writing.
    pub const DIRTY: u64 = 1 << 0;
    /// Bit 1, corrupt: metadata is known to be inconsistent; writable opens are refused.
    pub const CORRUPT: u64 = 1 << 1;
    /// Bit 2, external data file: guest data lives in the file the extension names.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// Bit 3, compression type: header byte 104 names the compression method.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// Bit 4, extended L2 entries: 128-bit entries with 32 subclusters each.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this engine understands.
    pub const KNOWN: u64 = 0x1F;
}

/// Compatible feature bits (header offset 80).
#[derive(Debug)]
pub struct Compatible;
impl Compatible {
    /// Bit 0, lazy refcounts: refcount updates may be delayed while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
    /// Every bit this engine understands.
    pub const KNOWN: u64 = 0x1;
}

/// Autoclear feature bits (header offset 88).
#[derive(Debug)]
pub struct Autoclear;
impl Autoclear {
    /// Bit 0, bitmaps: the bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// Bit 1, raw external data: the external data file is valid as a raw image.
    pub const RAW_EXTERNAL_DATA: u64 = 1 << 1;
    /// This engine's own bit (QEMU clears it, as every unknown autoclear bit, when it opens the
    /// image for writing): set while a session of ours keeps every bitmap bit durable before
    /// the data write it covers, so the bitmaps it marked `in_use` can be trusted after a crash.
    pub const ENGINE_DURABLE_BITMAPS: u64 = 1 << 63;
    /// Every bit this engine understands (QEMU's bits; [`Self::ENGINE_DURABLE_BITMAPS`] is
    /// handled on its own).
    pub const KNOWN: u64 = 0x3;
}

/// Refuses unknown incompatible bits, naming them as QEMU does: the names the image's feature
/// table gives them, in table order, then the rest as a hex mask.
pub fn check_incompatible(bits: u64, names: &[FeatureName]) -> FormatResult<()> {
    let mut unknown = bits & !Incompatible::KNOWN;
    if unknown == 0 {
        return Ok(());
    }
    let mut parts = Vec::new();
    for entry in names {
        let bit = 1u64.checked_shl(entry.bit.into()).unwrap_or(0);
        if entry.kind == FeatureKind::Incompatible && unknown & bit != 0 {
            parts.push(String::from_utf8_lossy(&entry.name).into_owned());
            unknown &= !bit;
        }
    }
    if unknown != 0 {
        parts.push(format!("Unknown incompatible feature: {unknown:x}"));
    }
    Err(FormatError::unsupported(
        "header field incompatible_features",
        field_offset::INCOMPATIBLE_FEATURES,
        parts.join(", "),
    ))
}

/// The kind of a feature name table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Type 0: an incompatible feature bit.
    Incompatible,
    /// Type 1: a compatible feature bit.
    Compatible,
    /// Type 2: an autoclear feature bit.
    Autoclear,
    /// A kind byte this engine does not know; the entry is kept as is.
    Other(u8),
}

impl FeatureKind {
    /// Decodes the entry's type byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            other => FeatureKind::Other(other),
        }
    }

    /// The entry's type byte.
    pub fn to_byte(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(b) => b,
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which feature field the bit belongs to.
    pub kind: FeatureKind,
    /// The bit number (0..=63).
    pub bit: u8,
    /// The name without its zero padding.
    pub name: Vec<u8>,
}

/// The eight entries QEMU 10 writes, in its order.
pub fn qemu_feature_table() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.as_bytes().to_vec(),
    };
    vec![
        entry(FeatureKind::Incompatible, 0, "dirty bit"),
        entry(FeatureKind::Incompatible, 1, "corrupt bit"),
        entry(FeatureKind::Incompatible, 2, "external data file"),
        entry(FeatureKind::Incompatible, 3, "compression type"),
        entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
        entry(FeatureKind::Compatible, 0, "lazy refcounts"),
        entry(FeatureKind::Autoclear, 0, "bitmaps"),
        entry(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}
