//! Persistent dirty bitmaps (autoclear bit 0): the bitmap directory and bitmap table entries, as
//! pure codecs. Every limit QEMU enforces when it loads a directory is checked here, so an image
//! QEMU refuses is refused by name and offset before any of its numbers sizes a buffer.
//!
//! A directory entry is 24 bytes, then extra data, then the name, padded to 8 bytes; the
//! directory size in the header extension includes the last entry's padding. Bit `n` of a
//! bitmap covers guest bytes `[n << granularity_bits, (n + 1) << granularity_bits)`, LSB first
//! within each byte; one table entry covers one cluster of those bytes.

use super::error::{FormatError, FormatResult};
use super::limits::MAX_BITMAP_DIRECTORY_SIZE;

/// The bitmap was not saved cleanly: its contents must not be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// The bitmap tracks writes (QEMU's "auto": enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU accepts; every other bit refuses the directory.
pub const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest granularity QEMU accepts, as a power of two (512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity QEMU accepts, as a power of two (2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name QEMU accepts.
pub const MAX_NAME_SIZE: usize = 1023;
/// Most table entries QEMU accepts.
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Most bitmap data bytes QEMU keeps in memory for one bitmap (512 MiB).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Fixed part of a directory entry.
pub const ENTRY_HEADER_SIZE: usize = 24;
/// Table entry bits that must be zero.
pub const TABLE_RESERVED_MASK: u64 = 0xFF00_0000_0000_01FE;
/// Table entry bits that hold a data cluster's offset.
pub const TABLE_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// With no data cluster: the cluster's bits are all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// One bitmap as the directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Host offset of the bitmap table (`bitmap_table_offset`), cluster-aligned.
    pub table_offset: u64,
    /// Table entries (u64 each).
    pub table_size: u32,
    /// [`FLAG_IN_USE`] and [`FLAG_AUTO`]; no other bit is accepted.
    pub flags: u32,
    /// Guest bytes per bit, as a power of two
    /// ([`MIN_GRANULARITY_BITS`]..=[`MAX_GRANULARITY_BITS`]).
    pub granularity_bits: u8,
    /// The bitmap's name, unique in the image, at most [`MAX_NAME_SIZE`] bytes.
    pub name: String,
}

impl BitmapEntry {
    /// Whether [`FLAG_IN_USE`] is set: the bitmap was not saved cleanly.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether [`FLAG_AUTO`] is set: the bitmap records writes.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Guest bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Bytes this entry takes in the directory, padding included.
    pub fn encoded_len(&self) -> usize {
        (ENTRY_HEADER_SIZE + self.name.len()).next_multiple_of(8)
    }
}

/// What one bitmap table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// No data cluster: every bit reads 0.
    Zeros,
    /// No data cluster: every bit reads 1.
    Ones,
    /// The bits are in the data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes a table entry, with QEMU's checks.
    pub fn decode(raw: u64, cluster_size: u64, at: u64) -> FormatResult<TableEntry> {
        if raw & TABLE_RESERVED_MASK != 0 {
            return Err(FormatError::invalid(
                "bitmap table entry",
                at,
                format!("{raw:#x} has reserved bits set"),
            ));
        }
        let offset = raw & TABLE_OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & TABLE_ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            });
        }
        if raw & TABLE_ALL_ONES != 0 {
            return Err(FormatError::invalid(
                "bitmap table entry",
                at,
                format!("{raw:#x} has both a data cluster and the all-ones bit"),
            ));
        }
        if offset % cluster_size != 0 {
            return Err(FormatError::invalid(
                "bitmap table entry",
                at,
                format!("data cluster {offset:#x} is not cluster aligned"),
            ));
        }
        Ok(TableEntry::Data(offset))
    }

    /// The on-disk entry: 0, [`TABLE_ALL_ONES`], or the data cluster's offset.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => TABLE_ALL_ONES,
            TableEntry::Data(offset) => offset,
        }
    }
}

/// Bytes of bitmap data for a disk of `disk_size` bytes at this granularity.
pub fn data_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    disk_size.div_ceil(1 << granularity_bits).div_ceil(8)
}

/// Table entries a bitmap of a disk of `disk_size` bytes needs (what QEMU requires exactly).
pub fn table_size(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    data_bytes(disk_size, granularity_bits).div_ceil(cluster_size)
}

/// Decodes and validates a bitmap directory of `nb_bitmaps` entries read from `offset`, for a
/// disk of `disk_size` bytes. Errors name the entry (and the bitmap, once its name is known).
pub fn decode_directory(
    dir: &[u8],
    offset: u64,
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> FormatResult<Vec<BitmapEntry>> {
    let invalid = |at: usize, reason: String| {
        FormatError::invalid("bitmap directory", offset + at as u64, reason)
    };
    if dir.is_empty() {
        return Err(invalid(0, "the bitmap directory size is zero".into()));
    }
    if dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(invalid(0, "the bitmap directory is too big".into()));
    }
    let mut entries: Vec<BitmapEntry> = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + ENTRY_HEADER_SIZE > dir.len() {
            return Err(invalid(
                pos,
                "an entry runs past the end of the directory".into(),
            ));
        }
        if entries.len() as u64 >= nb_bitmaps as u64 {
            return Err(invalid(
                pos,
                format!("more bitmaps found than the {nb_bitmaps} the header extension names"),
            ));
        }
        let e = &dir[pos..];
        let be32 = |i: usize| u32::from_be_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        let table_offset = u64::from_be_bytes(e[0..8].try_into().unwrap_or([0; 8]));
        let table_size = be32(8);
        let flags = be32(12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra_size = be32(20) as usize;
        let len = (ENTRY_HEADER_SIZE + extra_size + name_size).next_multiple_of(8);
        if pos + len > dir.len() {
            return Err(invalid(
                pos,
                "an entry runs past the end of the directory".into(),
            ));
        }
        let name_start = pos + ENTRY_HEADER_SIZE + extra_size;
        let name_bytes = &dir[name_start..name_start + name_size];
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let bad = |reason: String| {
            FormatError::invalid(
                format!("bitmap '{name}' in the bitmap directory"),
                offset + pos as u64,
                reason,
            )
        };
        if extra_size != 0 {
            return Err(bad("bitmap extra data is not supported".into()));
        }
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(bad(format!(
                "name length {name_size} is outside 1..={MAX_NAME_SIZE}"
            )));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return Err(bad(format!("type {kind} is not 1 (dirty tracking)")));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("flags {flags:#x} has reserved bits set")));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(bad(format!(
                "granularity bits {granularity_bits} is outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}"
            )));
        }
        if table_offset == 0 || table_offset % cluster_size != 0 {
            return Err(bad(format!(
                "table offset {table_offset:#x} is zero or not cluster aligned"
            )));
        }
        if table_size == 0 || table_size > MAX_TABLE_SIZE {
            return Err(bad(format!(
                "table size {table_size} is outside 1..={MAX_TABLE_SIZE}"
            )));
        }
        if table_size as u64 * cluster_size > MAX_PHYS_SIZE {
            return Err(bad(format!(
                "{table_size} table entries describe more than {MAX_PHYS_SIZE} bytes of bitmap data"
            )));
        }
        if flags & FLAG_IN_USE == 0
            && table_size as u64 != self::table_size(disk_size, granularity_bits, cluster_size)
        {
            return Err(bad(format!(
                "table size {table_size} does not match the disk size {disk_size} (needs {})",
                self::table_size(disk_size, granularity_bits, cluster_size)
            )));
        }
        if entries.iter().any(|b| b.name == name) {
            return Err(bad("a second bitmap has this name".into()));
        }
        entries.push(BitmapEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        });
        pos += len;
    }
    if entries.len() as u64 != nb_bitmaps as u64 {
        return Err(invalid(
            pos,
            format!(
                "{} bitmaps found, the header extension names {nb_bitmaps}",
                entries.len()
            ),
        ));
    }
    Ok(entries)
}

/// Encodes a directory; its length is the directory size the header extension records.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + e.encoded_len(), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn directories_round_trip_with_padding_counted() {
        let entries = vec![entry("bmA", FLAG_AUTO), entry("bmB", 0)];
        let bytes = encode_directory(&entries);
        assert_eq!(bytes.len(), 64, "two 3-byte names take 32 bytes each");
        let back = decode_directory(&bytes, 0x20000, 2, 65536, 1 << 30).unwrap();
        assert_eq!(back, entries);
    }

    #[test]
    fn bad_entries_name_the_bitmap() {
        let mut bytes = encode_directory(&[entry("b0", 0)]);
        bytes[17] = 8; // granularity below QEMU's minimum
        let err = decode_directory(&bytes, 0x20000, 1, 65536, 1 << 30).unwrap_err();
        assert!(err.structure.contains("'b0'"), "{err}");
        let bytes = encode_directory(&[entry("b0", 4)]);
        assert!(decode_directory(&bytes, 0, 1, 65536, 1 << 30).is_err());
        let bytes = encode_directory(&[entry("b0", 0)]);
        assert!(decode_directory(&bytes, 0, 2, 65536, 1 << 30).is_err());
        assert!(decode_directory(&bytes, 0, 1, 65536, 1 << 40).is_err());
        assert!(decode_directory(&bytes[..20], 0, 1, 65536, 1 << 30).is_err());
    }

    #[test]
    fn table_entries_follow_qemus_mask() {
        let cs = 65536;
        assert_eq!(TableEntry::decode(0, cs, 0).unwrap(), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(1, cs, 0).unwrap(), TableEntry::Ones);
        assert_eq!(
            TableEntry::decode(0x50000, cs, 0).unwrap(),
            TableEntry::Data(0x50000)
        );
        assert!(TableEntry::decode(0x50001, cs, 0).is_err());
        assert!(TableEntry::decode(0x50200, cs, 0).is_err());
        assert!(TableEntry::decode(2, cs, 0).is_err());
    }
}
