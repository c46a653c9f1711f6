//! Resizing an image with persistent bitmaps, as QEMU does: every bitmap (enabled or not) keeps
//! its bits, a grown disk's new area is clean, a shrunk disk's bits past the end go; an
//! inconsistent bitmap refuses the resize with QEMU's message.
//!
//! QEMU requires a consistent bitmap's table to match the disk size exactly, and the size (header
//! bytes 24..32) and the bitmaps extension lie in different sectors, so no single write can
//! switch both. The window is covered by the durable-bits rule (`durable`): before the size
//! changes, every bitmap is marked `in_use` under the engine's autoclear bit with all its bits on
//! disk (QEMU accepts any table size for an `in_use` bitmap); after it, the bitmaps are written
//! again with tables sized for the disk and published by one directory switch that also clears
//! `in_use`. A cut in between is finished by recovery, which saves the tables again when their
//! size no longer matches the disk.

use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry, TableEntry, FLAG_IN_USE};
use crate::format::features::Autoclear;
use crate::image::{Image, Meta};

impl Image {
    /// Refuses a resize while a bitmap is inconsistent (QEMU cannot resize one either), and a
    /// resize to size 0, whose bitmaps would have no table (QEMU refuses size 0 altogether).
    pub(crate) fn bitmaps_resizable(&self, m: &Meta, new_size: u64) -> Result<()> {
        let Some(b) = &m.bitmaps else {
            return Ok(());
        };
        if new_size == 0 && !b.entries.is_empty() {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "a disk of size 0 cannot hold persistent bitmaps".into(),
            });
        }
        for (i, e) in b.entries.iter().enumerate() {
            let tracked = b.tracked.as_ref().is_some_and(|t| t[i].bits.is_some());
            if e.in_use() && !tracked {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: format!(
                        "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                        e.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Before the size changes: every bitmap is `in_use` under the durable bit, with every bit
    /// it holds on disk, so a cut from here on is recovered.
    pub(crate) fn bitmaps_before_resize(&self, m: &mut Meta) -> Result<()> {
        if m.bitmaps.is_none() {
            return Ok(());
        }
        self.bitmaps_before_change(m)?;
        self.bitmaps_durable_before_inplace(m)
    }

    /// After the size changed: the bitmaps are saved for the new size, then the durable bit goes.
    pub(crate) fn bitmaps_after_resize(&self, m: &mut Meta) -> Result<()> {
        if m.bitmaps.is_none() {
            return Ok(());
        }
        self.resave_bitmaps_for_size(m)?;
        if m.header.autoclear_features & Autoclear::ENGINE_DURABLE_BITMAPS != 0 {
            self.set_durable_bit(m, false)?;
        }
        Ok(())
    }

    /// Whether some bitmap's table does not match the disk size (a resize cut short).
    pub(super) fn bitmap_tables_mismatch(m: &Meta) -> bool {
        let cs = m.header.cluster_size();
        m.bitmaps.as_ref().is_some_and(|b| {
            b.entries.iter().any(|e| {
                e.table_size as u64 != bitmap::table_size(m.header.size, e.granularity_bits, cs)
            })
        })
    }

    /// Writes every bitmap again, `in_use` cleared, with a table sized for the current disk:
    /// bits and tables go to fresh clusters, and one directory switch publishes them all
    /// (`manage`), so a cut leaves the old directory or the new one.
    pub(super) fn resave_bitmaps_for_size(&self, m: &mut Meta) -> Result<()> {
        let Some(b) = m.bitmaps.clone() else {
            return Ok(());
        };
        let cs = m.header.cluster_size();
        let size = m.header.size;
        let mut entries = Vec::with_capacity(b.entries.len());
        for (i, e) in b.entries.iter().enumerate() {
            let tracked = b.tracked.as_ref().and_then(|t| t[i].bits.clone());
            let bits = match tracked {
                Some(mut bits) => {
                    bits.resize(bitmap::data_bytes(size, e.granularity_bits) as usize, 0);
                    bits
                }
                // Read as far as the table goes, whatever size it was made for.
                None => self.read_bits(m, e)?.0,
            };
            let bits = clip_to_disk(bits, size, e.granularity());
            let mut table = Vec::with_capacity(bits.len().div_ceil(cs as usize));
            for chunk in bits.chunks(cs as usize) {
                let entry = if chunk.iter().all(|&x| x == 0) {
                    TableEntry::Zeros
                } else if chunk.len() == cs as usize && chunk.iter().all(|&x| x == 0xFF) {
                    TableEntry::Ones
                } else {
                    TableEntry::Data(self.write_new_data_cluster(m, chunk)?)
                };
                table.push(entry.encode());
            }
            let raw: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
            let clusters = (raw.len() as u64).div_ceil(cs).max(1);
            let table_offset = self.alloc(m, clusters)?;
            self.guard(m, table_offset, clusters * cs, None)?;
            let mut buf = raw;
            buf.resize((clusters * cs) as usize, 0);
            self.host().write(&buf, table_offset, "bitmap table")?;
            entries.push(BitmapEntry {
                table_offset,
                table_size: table.len() as u32,
                flags: e.flags & !FLAG_IN_USE,
                granularity_bits: e.granularity_bits,
                name: e.name.clone(),
            });
        }
        self.switch_directory(m, entries, &b.entries)
    }
}

/// `bits` with every bit at or past the end of a disk of `size` bytes cleared (the format wants
/// the tail of the last cluster zero).
fn clip_to_disk(mut bits: Vec<u8>, size: u64, granularity: u64) -> Vec<u8> {
    let total = size.div_ceil(granularity);
    let bytes = total.div_ceil(8) as usize;
    bits.truncate(bytes);
    if total % 8 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u8 << (total % 8)) - 1;
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::clip_to_disk;

    #[test]
    fn bits_past_the_disk_end_are_cleared() {
        assert_eq!(clip_to_disk(vec![0xFF, 0xFF], 65536 * 3, 65536), [0b111]);
        assert_eq!(clip_to_disk(vec![0xFF, 0xFF], 65536 * 9, 65536), [0xFF, 1]);
        assert_eq!(clip_to_disk(vec![0xFF], 1, 512), [1]);
    }
}
