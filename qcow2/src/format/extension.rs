//! Header extensions: framing (type, length, data padded to 8) and the known types. Unknown
//! extensions are kept byte-exact so a rewrite can put them back.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::{FormatError, FormatResult};
use super::features::{FeatureKind, FeatureName};
use super::limits::*;

/// Extension type magics.
pub mod kind {
    /// End of the header extension area.
    pub const END: u32 = 0x0000_0000;
    /// Backing file format name (`qcow2`, `raw`).
    pub const BACKING_FORMAT: u32 = 0xE279_2ACA;
    /// Feature name table: names for feature bits.
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_F857;
    /// Persistent dirty bitmaps: the bitmap directory's location.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer: where the LUKS header lies in the image.
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_BE77;
    /// External data file name.
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// The bitmaps extension body, exactly as on disk (24 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawBitmapsExtension {
    pub nb_bitmaps: U32,
    pub reserved: U32,
    pub bitmap_directory_size: U64,
    pub bitmap_directory_offset: U64,
}

/// The bitmaps extension, decoded. The bitmaps themselves are kept, not interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// `nb_bitmaps`: entries in the bitmap directory (1..=65535).
    pub nb_bitmaps: u32,
    /// `bitmap_directory_size`: bytes of the directory, padding included.
    pub bitmap_directory_size: u64,
    /// `bitmap_directory_offset`: host offset of the directory, cluster-aligned.
    pub bitmap_directory_offset: u64,
}

/// The full disk encryption extension: the host range holding the LUKS header and key
/// material (whole clusters, refcounted like metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeaderExtension {
    /// Host offset of the LUKS header, cluster-aligned.
    pub offset: u64,
    /// Bytes of the LUKS header area.
    pub length: u64,
}

/// An extension this engine does not interpret, kept byte-exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// The extension's type magic.
    pub kind: u32,
    /// Its data, without the padding to 8 bytes.
    pub data: Vec<u8>,
}

/// Every extension of a header, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name, e.g. `qcow2` or `raw`.
    pub backing_format: Option<Vec<u8>>,
    /// The feature name table, used only to name features in messages.
    pub feature_names: Vec<FeatureName>,
    /// Whether a feature name table extension was present at all.
    pub has_feature_table: bool,
    /// The bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
    /// External data file name.
    pub data_file: Option<Vec<u8>>,
    /// The full disk encryption extension (LUKS images).
    pub crypto: Option<CryptoHeaderExtension>,
    /// Extensions of unknown type, in on-disk order.
    pub unknown: Vec<UnknownExtension>,
}

/// Decodes the extension area `[start, end)` of `bytes` (the first cluster).
pub fn decode(bytes: &[u8], start: u64, end: u64) -> FormatResult<Extensions> {
    let mut ext = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut pos = start;
    while pos < end {
        // QEMU refuses an area that ends inside an extension's 8-byte header.
        if pos + 8 > end {
            return Err(FormatError::invalid(
                "header extension header",
                pos,
                format!("its 8-byte header runs past the end of the extension area at {end:#x}"),
            ));
        }
        let p = pos as usize;
        let kind = u32::from_be_bytes(bytes[p..p + 4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(bytes[p + 4..p + 8].try_into().expect("4 bytes")) as u64;
        if kind == kind::END {
            return Ok(ext);
        }
        let data_start = pos + 8;
        let padded = (len + 7) & !7;
        if data_start + len > end {
            return Err(FormatError::invalid(
                format!("header extension {kind:#010x}"),
                pos,
                format!("length {len} runs past the end of the extension area at {end:#x}"),
            ));
        }
        let data = &bytes[data_start as usize..(data_start + len) as usize];
        // A repeated backing format is read as QEMU reads it: the later one wins.
        if kind != kind::END
            && kind != kind::BACKING_FORMAT
            && seen.contains(&kind)
            && is_known(kind)
        {
            return Err(FormatError::invalid(
                format!("header extension {kind:#010x}"),
                pos,
                "appears twice",
            ));
        }
        seen.push(kind);
        decode_one(&mut ext, kind, data, pos)?;
        pos = data_start + padded;
    }
    // No end marker before the area ends: QEMU accepts this (the area simply ends).
    Ok(ext)
}

fn is_known(kind: u32) -> bool {
    matches!(
        kind,
        kind::BACKING_FORMAT
            | kind::FEATURE_NAME_TABLE
            | kind::BITMAPS
            | kind::FULL_DISK_ENCRYPTION
            | kind::EXTERNAL_DATA_FILE
    )
}

fn decode_one(ext: &mut Extensions, kind: u32, data: &[u8], at: u64) -> FormatResult<()> {
    match kind {
        kind::BACKING_FORMAT => {
            if data.len() as u32 > MAX_BACKING_FORMAT_NAME {
                return Err(FormatError::invalid(
                    "backing format extension",
                    at,
                    format!(
                        "name of {} bytes is longer than {MAX_BACKING_FORMAT_NAME}",
                        data.len()
                    ),
                ));
            }
            ext.backing_format = Some(data.to_vec());
        }
        kind::FEATURE_NAME_TABLE => {
            ext.has_feature_table = true;
            // A short last entry reads as if zero-padded, as QEMU reads the table; one too
            // short to hold a name character names nothing.
            for chunk in data
                .chunks(FEATURE_NAME_ENTRY_SIZE)
                .filter(|chunk| chunk.len() > 2)
            {
                let name = &chunk[2..];
                let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                ext.feature_names.push(FeatureName {
                    kind: FeatureKind::from_byte(chunk[0]),
                    bit: chunk[1],
                    name: name[..name_len].to_vec(),
                });
            }
        }
        kind::BITMAPS => {
            let raw = RawBitmapsExtension::read_from_bytes(data).map_err(|_| {
                FormatError::invalid(
                    "bitmaps extension",
                    at,
                    format!("length {} is not 24", data.len()),
                )
            })?;
            if raw.reserved.get() != 0 {
                return Err(FormatError::invalid(
                    "bitmaps extension",
                    at,
                    "reserved field is not zero",
                ));
            }
            let nb = raw.nb_bitmaps.get();
            if nb == 0 || nb > MAX_BITMAPS {
                return Err(FormatError::invalid(
                    "bitmaps extension",
                    at,
                    format!("{nb} bitmaps is outside 1..={MAX_BITMAPS}"),
                ));
            }
            if raw.bitmap_directory_size.get() > MAX_BITMAP_DIRECTORY_SIZE {
                return Err(FormatError::invalid(
                    "bitmaps extension",
                    at,
                    format!(
                        "bitmap directory of {} bytes exceeds {MAX_BITMAP_DIRECTORY_SIZE}",
                        raw.bitmap_directory_size.get()
                    ),
                ));
            }
            ext.bitmaps = Some(BitmapsExtension {
                nb_bitmaps: nb,
                bitmap_directory_size: raw.bitmap_directory_size.get(),
                bitmap_directory_offset: raw.bitmap_directory_offset.get(),
            });
        }
        kind::FULL_DISK_ENCRYPTION => {
            if data.len() != 16 {
                return Err(FormatError::invalid(
                    "full disk encryption extension",
                    at,
                    format!(
                        "CRYPTO header extension size {}, but expected size 16",
                        data.len()
                    ),
                ));
            }
            ext.crypto = Some(CryptoHeaderExtension {
                offset: u64::from_be_bytes(data[0..8].try_into().expect("8 bytes")),
                length: u64::from_be_bytes(data[8..16].try_into().expect("8 bytes")),
            });
        }
        kind::EXTERNAL_DATA_FILE => {
            if data.is_empty() {
                return Err(FormatError::invalid(
                    "external data file extension",
                    at,
                    "the data file name is empty",
                ));
            }
            ext.data_file = Some(data.to_vec());
        }
        _ => ext.unknown.push(UnknownExtension {
            kind,
            data: data.to_vec(),
        }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = kind.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        while v.len() % 8 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn decodes_known_and_keeps_unknown_extensions() {
        let mut area = frame(kind::BACKING_FORMAT, b"qcow2");
        area.extend(frame(0x1234_5678, &[1, 2, 3]));
        area.extend([0u8; 8]);
        let e = decode(&area, 0, area.len() as u64).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some(&b"qcow2"[..]));
        assert_eq!(
            e.unknown,
            vec![UnknownExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3]
            }]
        );
    }

    #[test]
    fn a_short_last_feature_entry_names_its_bit_and_unknown_bits_are_named_by_the_table() {
        let mut area = frame(kind::FEATURE_NAME_TABLE, b"\x00\x3fTest feature");
        area.extend([0u8; 8]);
        let e = decode(&area, 0, area.len() as u64).unwrap();
        assert_eq!(e.feature_names.len(), 1);
        assert_eq!(
            (e.feature_names[0].bit, &e.feature_names[0].name[..]),
            (63, &b"Test feature"[..])
        );
        let err =
            super::super::features::check_incompatible(0xe000_0000_0000_0000, &e.feature_names)
                .unwrap_err();
        assert_eq!(
            err.reason(),
            "Test feature, Unknown incompatible feature: 6000000000000000"
        );
    }

    #[test]
    fn oversized_extension_is_refused_with_its_offset() {
        let mut area = vec![0u8; 64];
        area[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        area[4..8].copy_from_slice(&1000u32.to_be_bytes());
        let err = decode(&area, 0, 64).unwrap_err();
        assert_eq!(err.offset, 0);
        assert!(err.reason().contains("runs past"));
    }

    #[test]
    fn an_area_ending_inside_an_extension_header_is_refused_as_qemu_refuses_it() {
        // qemu-iotests 080: a backing file name 4 bytes after the fixed header.
        let area = frame(0x1234_5678, &[]);
        let err = decode(&area, 0, 4).unwrap_err();
        assert_eq!(err.offset, 0);
        assert!(err.reason().contains("runs past"), "{}", err.reason());
        // Even an end marker must fit.
        assert!(decode(&[0u8; 8], 0, 7).is_err());
        assert!(decode(&[0u8; 8], 0, 8).is_ok());
    }
}
