//! The internal snapshot table: variable-length entries, each starting 8-byte aligned, with extra
//! data kept byte-exact (QEMU preserves bytes it does not know, and so do we).
//!
//! 64-bit time: `date_sec` on disk is the low 32 bits of the time, which QEMU reads as unsigned
//! (1970..2106). The full signed value sits in a tagged field right after the 24 bytes of extra data
//! QEMU knows, so dates before 1970 and after 2106 survive QEMU rewriting the table.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::{FormatError, FormatResult};
use super::limits::*;

/// The fixed 40 bytes of a snapshot table entry, exactly as on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawSnapshotHeader {
    pub l1_table_offset: U64,
    pub l1_size: U32,
    pub id_str_size: U16,
    pub name_size: U16,
    pub date_sec: U32,
    pub date_nsec: U32,
    pub vm_clock_nsec: U64,
    pub vm_state_size: U32,
    pub extra_data_size: U32,
}

/// Marks the 64-bit time field in a snapshot's extra data (bytes 24..32 of the extra data).
pub const TIME64_TAG: [u8; 8] = *b"qc2tim64";
/// Offset of the tagged time field within the extra data.
pub const TIME64_EXTRA_OFFSET: usize = SNAPSHOT_EXTRA_KNOWN_SIZE;
/// Size of the tagged time field: the tag and the signed seconds.
pub const TIME64_FIELD_SIZE: usize = 16;

/// A wall-clock time with 64-bit seconds, like `struct timespec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SnapshotTime {
    /// Seconds since 1970-01-01 00:00:00 UTC; negative before.
    pub secs: i64,
    /// Nanoseconds within the second (0..1_000_000_000).
    pub nanos: u32,
}

impl SnapshotTime {
    /// The current wall-clock time (what `qemu-img snapshot -c` records).
    pub fn now() -> SnapshotTime {
        SnapshotTime::from(std::time::SystemTime::now())
    }
}

impl From<std::time::SystemTime> for SnapshotTime {
    fn from(t: std::time::SystemTime) -> SnapshotTime {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => SnapshotTime {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            // Before 1970: whole seconds round down, nanoseconds count up from there.
            Err(before) => {
                let d = before.duration();
                let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
                if nanos == 0 {
                    SnapshotTime { secs: -secs, nanos }
                } else {
                    SnapshotTime {
                        secs: -secs - 1,
                        nanos: 1_000_000_000 - nanos,
                    }
                }
            }
        }
    }
}

impl From<SnapshotTime> for std::time::SystemTime {
    fn from(t: SnapshotTime) -> std::time::SystemTime {
        let nanos = std::time::Duration::from_nanos(u64::from(t.nanos));
        if t.secs >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.secs as u64) + nanos
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(t.secs.unsigned_abs()) + nanos
        }
    }
}

/// One decoded snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// `l1_table_offset`: host offset of the snapshot's L1 table, cluster-aligned.
    pub l1_table_offset: u64,
    /// `l1_size`: entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The unique id string (decimal in practice; raw bytes on disk).
    pub id: Vec<u8>,
    /// The name (raw bytes; duplicates are possible).
    pub name: Vec<u8>,
    /// `date_sec`: the low 32 bits of the creation time in seconds (see the module docs for
    /// the 64-bit time).
    pub date_sec: u32,
    /// `date_nsec`: nanoseconds of the creation time.
    pub date_nsec: u32,
    /// `vm_clock_nsec`: the guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The legacy 32-bit VM state size field.
    pub vm_state_size32: u32,
    /// The whole extra data, byte-exact.
    pub extra: Vec<u8>,
}

/// Sizes read from an entry's fixed part: everything needed to know how long the entry is.
#[derive(Debug, Clone, Copy)]
pub struct EntrySizes {
    /// `extra_data_size`, in bytes.
    pub extra: u32,
    /// `id_str_size`, in bytes.
    pub id: u16,
    /// `name_size`, in bytes.
    pub name: u16,
}

impl EntrySizes {
    /// Total bytes of the entry, without the padding that follows it.
    pub fn entry_len(self) -> u64 {
        SNAPSHOT_ENTRY_FIXED_SIZE as u64 + self.extra as u64 + self.id as u64 + self.name as u64
    }
}

/// Rounds a table position up to the 8-byte alignment each entry starts at.
pub fn align_entry(pos: u64) -> u64 {
    (pos + 7) & !7
}

impl SnapshotEntry {
    /// Reads the sizes from an entry's 40-byte fixed part at `offset` (for messages), checking the
    /// extra data limit.
    pub fn sizes(fixed: &[u8], offset: u64, index: u32) -> FormatResult<EntrySizes> {
        let (raw, _) = RawSnapshotHeader::read_from_prefix(fixed).map_err(|_| {
            FormatError::invalid(
                format!("snapshot table entry {index}"),
                offset,
                "truncated fixed part",
            )
        })?;
        let extra = raw.extra_data_size.get();
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::invalid(
                format!("snapshot table entry {index}"),
                offset,
                format!("too much extra metadata: {extra} bytes, the limit is {MAX_SNAPSHOT_EXTRA_DATA}"),
            ));
        }
        Ok(EntrySizes {
            extra,
            id: raw.id_str_size.get(),
            name: raw.name_size.get(),
        })
    }

    /// Decodes one whole entry (`bytes` holds exactly the entry, as `sizes` measured it).
    pub fn decode(bytes: &[u8], offset: u64, index: u32) -> FormatResult<SnapshotEntry> {
        let sizes = Self::sizes(bytes, offset, index)?;
        if (bytes.len() as u64) < sizes.entry_len() {
            return Err(FormatError::invalid(
                format!("snapshot table entry {index}"),
                offset,
                "truncated",
            ));
        }
        let (raw, rest) = RawSnapshotHeader::read_from_prefix(bytes).expect("length checked");
        let (extra, rest) = rest.split_at(sizes.extra as usize);
        let (id, rest) = rest.split_at(sizes.id as usize);
        let name = &rest[..sizes.name as usize];
        Ok(SnapshotEntry {
            l1_table_offset: raw.l1_table_offset.get(),
            l1_size: raw.l1_size.get(),
            id: id.to_vec(),
            name: name.to_vec(),
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            vm_state_size32: raw.vm_state_size.get(),
            extra: extra.to_vec(),
        })
    }

    /// Appends the entry's on-disk bytes (without trailing padding) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let raw = RawSnapshotHeader {
            l1_table_offset: self.l1_table_offset.into(),
            l1_size: self.l1_size.into(),
            id_str_size: (self.id.len() as u16).into(),
            name_size: (self.name.len() as u16).into(),
            date_sec: self.date_sec.into(),
            date_nsec: self.date_nsec.into(),
            vm_clock_nsec: self.vm_clock_nsec.into(),
            vm_state_size: self.vm_state_size32.into(),
            extra_data_size: (self.extra.len() as u32).into(),
        };
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
    }

    fn extra_u64(&self, at: usize) -> Option<u64> {
        self.extra
            .get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    /// VM state size: the 64-bit extra field when present, else the legacy 32-bit one.
    pub fn vm_state_size(&self) -> u64 {
        self.extra_u64(0).unwrap_or(self.vm_state_size32 as u64)
    }

    /// Virtual disk size when the snapshot was taken, if recorded.
    pub fn disk_size(&self) -> Option<u64> {
        self.extra_u64(8)
    }

    /// Record/replay instruction count; `None` when absent or -1.
    pub fn icount(&self) -> Option<u64> {
        self.extra_u64(16).filter(|&v| v != u64::MAX)
    }

    /// The snapshot's wall-clock time. The tagged 64-bit field wins when it agrees with `date_sec`
    /// (a tool that rewrote `date_sec` without knowing the tag makes the tag stale).
    pub fn time(&self) -> SnapshotTime {
        let tagged = self
            .extra
            .get(TIME64_EXTRA_OFFSET..TIME64_EXTRA_OFFSET + TIME64_FIELD_SIZE)
            .filter(|f| f[..8] == TIME64_TAG)
            .map(|f| i64::from_be_bytes(f[8..16].try_into().expect("8 bytes")));
        let secs = match tagged {
            Some(secs) if secs as u32 == self.date_sec => secs,
            _ => self.date_sec as i64,
        };
        SnapshotTime {
            secs,
            nanos: self.date_nsec,
        }
    }

    /// The id as text (lossy for non-UTF-8 bytes).
    pub fn id_str(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }

    /// The name as text (lossy for non-UTF-8 bytes).
    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Encodes a whole table: entries back to back, each starting 8-byte aligned, no padding after the
/// last (as QEMU sizes it).
pub fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        out.resize(align_entry(out.len() as u64) as usize, 0);
        entry.encode(&mut out);
    }
    out
}

/// Decodes a whole table held in memory (for the fuzzer and pure callers; the image layer reads
/// entry by entry so it never reads more than the table needs).
pub fn decode_table(
    bytes: &[u8],
    count: u32,
    table_offset: u64,
) -> FormatResult<Vec<SnapshotEntry>> {
    let mut entries = Vec::new();
    let mut pos = 0u64;
    for index in 0..count {
        pos = align_entry(pos);
        let at = table_offset.saturating_add(pos);
        let rest = bytes.get(pos as usize..).unwrap_or(&[]);
        let sizes = SnapshotEntry::sizes(rest, at, index)?;
        let len = sizes.entry_len();
        if pos + len > MAX_SNAPSHOTS_SIZE {
            return Err(FormatError::invalid(
                "snapshot table",
                table_offset,
                format!("larger than the limit of {MAX_SNAPSHOTS_SIZE} bytes"),
            ));
        }
        entries.push(SnapshotEntry::decode(rest, at, index)?);
        pos += len;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_to_and_from_system_time_both_sides_of_1970() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH - Duration::from_secs(7),
            UNIX_EPOCH,
        ] {
            let s = SnapshotTime::from(t);
            assert!(s.nanos < 1_000_000_000, "{s:?}");
            assert_eq!(SystemTime::from(s), t);
        }
        assert_eq!(
            SnapshotTime::from(UNIX_EPOCH - Duration::new(5, 250_000_000)),
            SnapshotTime {
                secs: -6,
                nanos: 750_000_000
            }
        );
        assert!(SnapshotTime::now().secs > 1_700_000_000);
    }

    fn entry(name: &str, extra: Vec<u8>) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x70000,
            l1_size: 2,
            id: b"1".to_vec(),
            name: name.as_bytes().to_vec(),
            date_sec: 0x6b08_bb04,
            date_nsec: 0x1e6a_77f0,
            vm_clock_nsec: 0,
            vm_state_size32: 0,
            extra,
        }
    }

    #[test]
    fn table_round_trips_with_alignment_and_unknown_extra() {
        let mut extra = vec![0u8; 24];
        extra[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        extra.extend_from_slice(&[0, 0, 0, 1, 0xDE, 0xAD, 0xBE, 0xEF]);
        let entries = vec![entry("s1", extra), entry("second", vec![0; 24])];
        let bytes = encode_table(&entries);
        assert_eq!(bytes.len(), 72 + 3 + 5 + 40 + 24 + 1 + 6);
        let back = decode_table(&bytes, 2, 0x80000).unwrap();
        assert_eq!(back, entries);
        assert_eq!(back[0].disk_size(), Some(1 << 30));
    }

    #[test]
    fn tagged_time_gives_dates_outside_the_32_bit_range() {
        for secs in [-86_400i64 * 365 * 100, 5_000_000_000, 0x6b08_bb04] {
            let mut e = entry("t", vec![0; 24]);
            e.date_sec = secs as u32;
            e.extra.extend_from_slice(&TIME64_TAG);
            e.extra.extend_from_slice(&secs.to_be_bytes());
            assert_eq!(e.time().secs, secs);
        }
    }

    #[test]
    fn stale_tag_falls_back_to_date_sec() {
        let mut e = entry("t", vec![0; 24]);
        e.extra.extend_from_slice(&TIME64_TAG);
        e.extra.extend_from_slice(&5_000_000_000i64.to_be_bytes());
        assert_eq!(e.time().secs, 0x6b08_bb04);
    }

    #[test]
    fn oversized_extra_data_is_refused() {
        let mut e = entry("x", vec![0; 24]);
        e.extra = vec![0; 1025];
        let bytes = encode_table(&[e]);
        let err = decode_table(&bytes, 1, 0x1000).unwrap_err();
        assert!(err.reason().contains("too much extra metadata"), "{err}");
    }
}
