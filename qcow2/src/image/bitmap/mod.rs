//! Persistent dirty bitmaps: loaded and validated at open, kept up to date by every guest write,
//! zero write and discard while the image is writable, and saved back on a clean close, so that
//! QEMU and this engine can take turns on one image without breaking an incremental-backup chain.
//!
//! The protocol is QEMU's:
//! - at open the directory is read and checked (`format::bitmap`); an image whose bitmaps
//!   QEMU would refuse is refused;
//! - before the first change to the image after open, every consistent bitmap is read into
//!   memory and `in_use` is set on disk (one in-place write of the directory, synced): from
//!   here until the clean close, a crash leaves the bitmaps marked inconsistent, never stale
//!   and trusted;
//! - every change marks the guest range it touches in each enabled (`auto`) bitmap, in memory;
//! - a clean close writes the bits back (into the bitmap's own data clusters, or new ones whose
//!   refcounts are durable first), then the tables, then clears `in_use` in the directory.
//!
//! Every step writes in place only bytes that belong to the bitmaps alone (refcount 1, never
//! shared with snapshots), and a directory rewrite changes only flag bits, so a torn write
//! leaves either the old or the new flags; a power cut at any point leaves at worst `in_use`
//! set and leaked clusters. The autoclear bit stays set: the bitmaps are understood here.
//!
//! As in QEMU: every consistent bitmap's table is read and validated at open; a resize keeps
//! every bitmap (the grown area clean, bits past a shrunk end dropped) and an inconsistent
//! bitmap refuses it (`resize`); reverting to a snapshot of another size is refused while the
//! image has bitmaps; `check` counts the clusters of every bitmap, in use or not.
//!
//! Where this engine differs from QEMU, on purpose:
//! - `in_use` is set at the first change after open, not at open: a read-write open that changes
//!   nothing leaves the bitmaps as they were;
//! - while this engine's autoclear bit is set, bits reach the disk before the data they cover
//!   (`durable`), so after a power cut our next read-write open gives the bitmaps back
//!   consistent (QEMU leaves them `in_use` for good); that includes a resize cut short;
//! - reverting to a snapshot of the same size is allowed and marks the whole disk in every
//!   enabled bitmap (QEMU refuses any revert while the image has bitmaps);
//! - a stale bitmaps extension (the autoclear bit cleared by a program without bitmap support)
//!   is ignored without QEMU's warning at open; `check` counts its clusters as leaks in both.

mod durable;
mod manage;
mod relocate;
mod resize;

use super::{Image, Meta};
use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry, TableEntry, FLAG_IN_USE};
use crate::storage::{Storage, StorageExt};

/// The image's bitmaps: the directory as on disk, and the tracked bits once writing started.
#[derive(Debug, Clone)]
pub(crate) struct Bitmaps {
    pub dir_offset: u64,
    pub dir_size: u64,
    pub entries: Vec<BitmapEntry>,
    /// Present once the first change after open set `in_use` on disk.
    pub tracked: Option<Vec<Tracked>>,
    /// This session keeps the durable-bits rule (`durable`): every consistent bitmap was
    /// tracked from the start and the engine's autoclear bit is set on disk.
    pub durable: bool,
    /// Bits written under the rule but not yet synced (`durable`).
    pub unsynced: bool,
    /// Byte ranges `(bitmap, lo, hi)` set in memory and not yet written (`durable`): written
    /// in one go before the next L2 write-back or write in place.
    pub pending: Vec<(usize, usize, usize)>,
}

/// One bitmap's bits in memory, with the table they came from. `None` bits: the bitmap was
/// already inconsistent at open (QEMU keeps such a bitmap, untracked, until it is removed).
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    pub bits: Option<Vec<u8>>,
    pub table: Vec<TableEntry>,
}

/// One bitmap, as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name, unique in the image.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Tracks writes (QEMU's `auto` flag).
    pub enabled: bool,
    /// Not saved cleanly: its contents are not to be trusted (QEMU: `in-use`).
    pub in_use: bool,
}

impl BitmapInfo {
    /// Whether the bits can be trusted.
    pub fn consistent(&self) -> bool {
        !self.in_use
    }
}

/// Reads and validates the directory named by the header, when the autoclear bit says the
/// bitmaps are consistent with the data (QEMU ignores them otherwise).
pub(crate) fn load(storage: &dyn Storage, name: &str, m: &Meta) -> Result<Option<Bitmaps>> {
    use crate::format::features::Autoclear;
    let h = &m.header;
    let Some(ext) = h.extensions.bitmaps else {
        return Ok(None);
    };
    if h.autoclear_features & Autoclear::BITMAPS == 0 {
        return Ok(None);
    }
    let cs = h.cluster_size();
    let (offset, size) = (ext.bitmap_directory_offset, ext.bitmap_directory_size);
    if offset % cs != 0 || offset == 0 {
        return Err(Error::corrupt(
            name,
            "bitmaps extension",
            0,
            format!("bitmap directory offset {offset:#x} is zero or not cluster aligned"),
        ));
    }
    if size == 0 || size > crate::format::limits::MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::corrupt(
            name,
            "bitmaps extension",
            0,
            format!("bitmap directory size {size} is zero or too big"),
        ));
    }
    if offset.checked_add(size).is_none_or(|end| end > m.file_len) {
        return Err(Error::corrupt(
            name,
            "bitmap directory",
            offset,
            format!(
                "{size} bytes run past the end of the file ({:#x})",
                m.file_len
            ),
        ));
    }
    let mut dir = vec![0u8; size as usize];
    storage
        .read_exact_at(&mut dir, offset)
        .map_err(|e| Error::io(name, "reading the bitmap directory", e))?;
    let entries = bitmap::decode_directory(&dir, offset, ext.nb_bitmaps, cs, h.size)
        .map_err(|e| Error::from_format(name, e))?;
    for e in &entries {
        let bytes = e.table_size as u64 * 8;
        if e.table_offset
            .checked_add(bytes)
            .is_none_or(|end| end > m.file_len)
        {
            return Err(Error::corrupt(
                name,
                format!("table of bitmap '{}'", e.name),
                e.table_offset,
                format!("{bytes} bytes run past the end of the file"),
            ));
        }
        if !e.in_use() {
            check_table(storage, name, e, cs)?;
        }
    }
    Ok(Some(Bitmaps {
        dir_offset: offset,
        dir_size: size,
        entries,
        tracked: None,
        durable: false,
        unsynced: false,
        pending: Vec::new(),
    }))
}

/// Refuses a consistent bitmap whose table holds an invalid entry, as QEMU's open does (it loads
/// every consistent bitmap). The table lies inside the file (checked by the caller).
fn check_table(storage: &dyn Storage, name: &str, e: &BitmapEntry, cs: u64) -> Result<()> {
    let mut raw = vec![0u8; e.table_size as usize * 8];
    storage
        .read_exact_at(&mut raw, e.table_offset)
        .map_err(|err| Error::io(name, "reading a bitmap table", err))?;
    for (i, chunk) in raw.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let at = e.table_offset + i as u64 * 8;
        TableEntry::decode(u64::from_be_bytes(word), cs, at).map_err(|err| {
            Error::corrupt(
                name,
                format!("table of bitmap '{}'", e.name),
                at,
                err.reason().to_string(),
            )
        })?;
    }
    Ok(())
}

/// The bytes of a bitmap of `bytes` bytes that hold the bits of `[offset, offset + len)`.
fn byte_span(bytes: usize, granularity_bits: u8, offset: u64, len: u64) -> Option<(usize, usize)> {
    if len == 0 || bytes == 0 {
        return None;
    }
    let first = (offset >> granularity_bits) / 8;
    let last = ((offset + len - 1) >> granularity_bits) / 8;
    let lo = (first as usize).min(bytes);
    let hi = (last as usize + 1).min(bytes);
    (lo < hi).then_some((lo, hi))
}

/// Whether every bit covering `[offset, offset + len)` is set already.
fn all_set(bits: &[u8], granularity_bits: u8, offset: u64, len: u64) -> bool {
    if len == 0 || bits.is_empty() {
        return true;
    }
    let first = offset >> granularity_bits;
    let last = ((offset + len - 1) >> granularity_bits).min(bits.len() as u64 * 8 - 1);
    (first..=last).all(|bit| bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
}

/// Sets the bits covering `[offset, offset + len)` at `granularity_bits`.
fn set_range(bits: &mut [u8], granularity_bits: u8, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = offset >> granularity_bits;
    let last = ((offset + len - 1) >> granularity_bits).min(bits.len() as u64 * 8 - 1);
    let mut bit = first;
    while bit <= last {
        if bit % 8 == 0 && last - bit >= 7 {
            let whole = ((last + 1 - bit) / 8) as usize;
            let at = (bit / 8) as usize;
            bits[at..at + whole].fill(0xFF);
            bit += whole as u64 * 8;
        } else {
            bits[(bit / 8) as usize] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

impl Image {
    /// The image's persistent bitmaps, as the directory (and this writer's changes) say.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        let m = self.meta();
        let Some(b) = &m.bitmaps else {
            return Vec::new();
        };
        b.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                // A bitmap this writer tracks is consistent to its users; `in_use` on disk is
                // only the crash marker.
                let tracked = b.tracked.as_ref().is_some_and(|t| t[i].bits.is_some());
                BitmapInfo {
                    name: e.name.clone(),
                    granularity: e.granularity(),
                    enabled: e.auto(),
                    in_use: e.in_use() && !tracked,
                }
            })
            .collect()
    }

    /// The guest ranges in `[offset, offset + len)` that bitmap `name` marks dirty, as sorted,
    /// merged `(start, length)` pairs at the bitmap's granularity.
    pub fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut m = self.meta_mut();
        let size = m.header.size;
        let Some(index) = m
            .bitmaps
            .as_ref()
            .and_then(|b| b.entries.iter().position(|e| e.name == name))
        else {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!("Dirty bitmap '{name}' not found"),
            });
        };
        let entry = m.bitmaps.as_ref().map(|b| b.entries[index].clone());
        let Some(entry) = entry else {
            return Ok(Vec::new());
        };
        let bits = match m
            .bitmaps
            .as_ref()
            .and_then(|b| b.tracked.as_ref())
            .map(|t| t[index].bits.clone())
        {
            Some(Some(bits)) => bits,
            Some(None) => return Err(self.inconsistent(name)),
            None => {
                if entry.in_use() {
                    return Err(self.inconsistent(name));
                }
                self.read_bits(&mut m, &entry)?.0
            }
        };
        let g = entry.granularity_bits;
        let end = offset.saturating_add(len).min(size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut bit = offset >> g;
        while bit << g < end {
            if bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0 {
                let start = (bit << g).max(offset);
                let stop = ((bit + 1) << g).min(end);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += stop - start,
                    _ => out.push((start, stop - start)),
                }
            }
            bit += 1;
        }
        Ok(out)
    }

    fn inconsistent(&self, name: &str) -> Error {
        Error::InvalidArgument {
            image: self.name.clone(),
            reason: format!("Bitmap '{name}' is inconsistent and cannot be used"),
        }
    }

    /// Reads one bitmap's table and bits.
    fn read_bits(&self, m: &mut Meta, e: &BitmapEntry) -> Result<(Vec<u8>, Vec<TableEntry>)> {
        let cs = m.header.cluster_size();
        let raw = self.read_table(e.table_offset, e.table_size as u64, "bitmap table")?;
        let bytes = bitmap::data_bytes(m.header.size, e.granularity_bits) as usize;
        let mut bits = vec![0u8; bytes];
        let mut table = Vec::with_capacity(raw.len());
        for (i, &r) in raw.iter().enumerate() {
            let at = e.table_offset + i as u64 * 8;
            let t = TableEntry::decode(r, cs, at).map_err(|err| {
                Error::corrupt(
                    &self.name,
                    format!("table of bitmap '{}'", e.name),
                    at,
                    err.reason().to_string(),
                )
            })?;
            let start = i * cs as usize;
            let chunk = &mut bits[start.min(bytes)..(start + cs as usize).min(bytes)];
            match t {
                TableEntry::Zeros => {}
                TableEntry::Ones => chunk.fill(0xFF),
                TableEntry::Data(off) => {
                    if off + cs > m.file_len.next_multiple_of(cs) {
                        return Err(Error::corrupt(
                            &self.name,
                            format!("table of bitmap '{}'", e.name),
                            at,
                            format!("data cluster {off:#x} lies past the end of the file"),
                        ));
                    }
                    self.host()
                        .read_zero_filled(chunk, off, "bitmap data cluster")?;
                }
            }
            table.push(t);
        }
        // Bits past the end of the disk carry no meaning.
        let total_bits = m.header.size.div_ceil(e.granularity());
        if total_bits % 8 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u8 << (total_bits % 8)) - 1;
            }
        }
        Ok((bits, table))
    }

    /// Before the first change after open: loads every consistent bitmap and marks them all
    /// `in_use` on disk, so a crash from here on cannot leave stale bits marked trustworthy.
    pub(crate) fn bitmaps_before_change(&self, m: &mut Meta) -> Result<()> {
        let Some(b) = &m.bitmaps else {
            return Ok(());
        };
        if b.tracked.is_some() {
            return Ok(());
        }
        let entries = b.entries.clone();
        let mut tracked = Vec::with_capacity(entries.len());
        for e in &entries {
            if e.in_use() {
                tracked.push(Tracked {
                    bits: None,
                    table: Vec::new(),
                });
            } else {
                let (bits, table) = self.read_bits(m, e)?;
                tracked.push(Tracked {
                    bits: Some(bits),
                    table,
                });
            }
        }
        // Every bitmap tracked from here on: the session can promise durable bits.
        let durable = entries.iter().all(|e| !e.in_use()) && m.header.version >= 3;
        if durable {
            self.set_durable_bit(m, true)?;
        }
        let mut marked = entries;
        for e in &mut marked {
            e.flags |= FLAG_IN_USE;
        }
        self.write_directory_in_place(m, &marked)?;
        if let Some(b) = m.bitmaps.as_mut() {
            b.entries = marked;
            b.tracked = Some(tracked);
            b.durable = durable;
        }
        Ok(())
    }

    /// Whether a guest write of `[offset, offset + len)` leaves the bitmaps as they are: none
    /// exist, or the session tracks them already, every enabled one marks the range, and no
    /// bit waits to be written or synced (a write in place may then skip `bitmaps_mark` and
    /// `bitmaps_durable_before_inplace`, and run under the shared lock).
    pub(crate) fn bitmaps_unchanged_by(&self, m: &Meta, offset: u64, len: u64) -> bool {
        let Some(b) = &m.bitmaps else {
            return true;
        };
        let Some(tracked) = &b.tracked else {
            return false;
        };
        if b.unsynced || !b.pending.is_empty() {
            return false;
        }
        b.entries
            .iter()
            .zip(tracked)
            .all(|(e, t)| match (e.auto(), &t.bits) {
                (true, Some(bits)) => all_set(bits, e.granularity_bits, offset, len),
                _ => true,
            })
    }

    /// Marks `[offset, offset + len)` dirty in every enabled, tracked bitmap.
    pub(crate) fn bitmaps_mark(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        if m.bitmaps.is_none() {
            return Ok(());
        }
        self.bitmaps_before_change(m)?;
        let Some(b) = m.bitmaps.as_mut() else {
            return Ok(());
        };
        let Some(tracked) = b.tracked.as_mut() else {
            return Ok(());
        };
        let mut newly_set = Vec::new();
        for (i, (e, t)) in b.entries.iter().zip(tracked.iter_mut()).enumerate() {
            if let (true, Some(bits)) = (e.auto(), t.bits.as_mut()) {
                // The common case, a write into a dirty granule, changes nothing.
                if all_set(bits, e.granularity_bits, offset, len) {
                    continue;
                }
                let Some((lo, hi)) = byte_span(bits.len(), e.granularity_bits, offset, len) else {
                    continue;
                };
                set_range(bits, e.granularity_bits, offset, len);
                newly_set.push((i, lo, hi));
            }
        }
        if b.durable && !newly_set.is_empty() {
            // The bits reach the disk before the data they cover (`durable`): they are written
            // before the next L2 write-back (whose sync covers them) and before a write in place
            // (`bitmaps_durable_before_inplace`), batched until then.
            for (i, lo, hi) in newly_set {
                match b
                    .pending
                    .iter_mut()
                    .find(|p| p.0 == i && p.1 <= hi && lo <= p.2)
                {
                    Some(p) => {
                        p.1 = p.1.min(lo);
                        p.2 = p.2.max(hi);
                    }
                    None => b.pending.push((i, lo, hi)),
                }
            }
            m.ws_mut()?.l2_after_data_sync = true;
        }
        Ok(())
    }

    /// Writes the bits set since the last call (no sync: the caller's next sync covers them).
    pub(crate) fn bitmaps_write_pending(&self, m: &mut Meta) -> Result<()> {
        let pending = match m.bitmaps.as_mut() {
            Some(b) if !b.pending.is_empty() => std::mem::take(&mut b.pending),
            _ => return Ok(()),
        };
        for (i, lo, hi) in pending {
            self.persist_bits(m, i, lo, hi)?;
        }
        if let Some(b) = m.bitmaps.as_mut() {
            b.unsynced = true;
        }
        Ok(())
    }

    /// Before guest data is written where it is readable at once (a cluster the image owns, or
    /// an external data file): the bits set so far are written and synced first.
    pub(crate) fn bitmaps_durable_before_inplace(&self, m: &mut Meta) -> Result<()> {
        self.bitmaps_write_pending(m)?;
        if let Some(b) = m.bitmaps.as_mut() {
            if b.unsynced {
                self.host().sync()?;
                b.unsynced = false;
            }
        }
        Ok(())
    }

    /// Writes one cluster of bits (zero padded) to a fresh cluster and returns its offset. The
    /// caller makes the refcount durable before a table names the cluster.
    fn write_new_data_cluster(&self, m: &mut Meta, chunk: &[u8]) -> Result<u64> {
        let cs = m.header.cluster_size();
        let off = self.alloc(m, 1)?;
        self.guard(m, off, cs, None)?;
        let mut buf = chunk.to_vec();
        buf.resize(cs as usize, 0);
        self.host().write(&buf, off, "bitmap data cluster")?;
        Ok(off)
    }

    /// Writes a directory whose entries differ from the one on disk in flags only.
    fn write_directory_in_place(&self, m: &Meta, entries: &[BitmapEntry]) -> Result<()> {
        let Some(b) = &m.bitmaps else {
            return Ok(());
        };
        let bytes = bitmap::encode_directory(entries);
        if bytes.len() as u64 != b.dir_size {
            return Err(Error::corrupt(
                &self.name,
                "bitmap directory",
                b.dir_offset,
                format!(
                    "re-encoded directory takes {} bytes, not the {} on disk",
                    bytes.len(),
                    b.dir_size
                ),
            ));
        }
        self.host()
            .write_sync(&bytes, b.dir_offset, "bitmap directory")
    }

    /// On a clean close: writes every tracked bitmap back and clears `in_use`. Bits go to the
    /// bitmap's own data clusters or to new ones whose refcounts are made durable before the
    /// table points at them; the directory's flags change last.
    pub(crate) fn bitmaps_store(&self, m: &mut Meta) -> Result<()> {
        let Some(b) = m.bitmaps.clone() else {
            return Ok(());
        };
        let Some(mut tracked) = b.tracked else {
            return Ok(());
        };
        let cs = m.header.cluster_size();
        let mut tables_changed = vec![false; b.entries.len()];
        for (i, t) in tracked.iter_mut().enumerate() {
            let Some(bits) = &t.bits else {
                continue;
            };
            for (k, chunk) in bits.chunks(cs as usize).enumerate() {
                let all = |v: u8| chunk.iter().all(|&x| x == v);
                let new = match t.table[k] {
                    TableEntry::Data(off) => {
                        let mut buf = chunk.to_vec();
                        buf.resize(cs as usize, 0);
                        self.host().write(&buf, off, "bitmap data cluster")?;
                        continue;
                    }
                    _ if all(0) => TableEntry::Zeros,
                    _ if all(0xFF) && chunk.len() == cs as usize => TableEntry::Ones,
                    _ => TableEntry::Data(self.write_new_data_cluster(m, chunk)?),
                };
                if new != t.table[k] {
                    t.table[k] = new;
                    tables_changed[i] = true;
                }
            }
        }
        // New data clusters and their refcounts are durable before a table names them.
        self.flush_refblocks(m)?;
        self.host().sync()?;
        for (i, t) in tracked.iter().enumerate() {
            if !tables_changed[i] {
                continue;
            }
            let e = &b.entries[i];
            let raw: Vec<u8> = t
                .table
                .iter()
                .flat_map(|t| t.encode().to_be_bytes())
                .collect();
            self.host().write(&raw, e.table_offset, "bitmap table")?;
        }
        self.host().sync()?;
        let mut saved = b.entries.clone();
        for (e, t) in saved.iter_mut().zip(&tracked) {
            if t.bits.is_some() {
                e.flags &= !FLAG_IN_USE;
            }
        }
        self.write_directory_in_place(m, &saved)?;
        let durable = b.durable;
        if let Some(b) = m.bitmaps.as_mut() {
            b.entries = saved;
            b.tracked = None;
            b.durable = false;
            b.pending.clear();
        }
        if durable {
            self.set_durable_bit(m, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{all_set, set_range};

    /// Once a granule is dirty, overwriting data inside it costs the data write alone: no bitmap
    /// byte and no sync reach the storage.
    #[test]
    fn a_write_into_a_dirty_granule_writes_only_the_data() {
        use crate::storage::recording::Op;
        let store = std::sync::Arc::new(crate::storage::RecordingStorage::new(Vec::new()));
        let options = crate::CreateOptions {
            size: 1 << 30,
            ..crate::CreateOptions::default()
        };
        let img = crate::Image::create_in(Box::new(store.clone()), "t", &options).unwrap();
        img.add_bitmap("b", 65536, false).unwrap();
        img.write_at(&[1u8; 4096], 1 << 20).unwrap();
        img.flush().unwrap();
        img.write_at(&[2u8; 4096], 1 << 20).unwrap();
        let before = store.op_count();
        for k in 0..4u64 {
            img.write_at(&[3u8; 4096], (1 << 20) + k * 4096).unwrap();
        }
        let ops = store.ops()[before..].to_vec();
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert!(
            ops.iter()
                .all(|op| matches!(op, Op::Write { data, .. } if data.len() == 4096)),
            "{ops:?}"
        );
    }

    #[test]
    fn ranges_set_every_granule_they_touch() {
        let mut bits = vec![0u8; 4];
        assert!(!all_set(&bits, 16, 65535, 2));
        set_range(&mut bits, 16, 65535, 2);
        assert_eq!(bits, [0b11, 0, 0, 0]);
        assert!(all_set(&bits, 16, 0, 65536 * 2));
        assert!(!all_set(&bits, 16, 0, 65536 * 3));
        let mut bits = vec![0u8; 4];
        set_range(&mut bits, 16, 3 << 16, 20 << 16);
        assert_eq!(bits, [0xF8, 0xFF, 0x7F, 0]);
        let mut bits = vec![0u8; 1];
        set_range(&mut bits, 9, 0, 1 << 40);
        assert_eq!(bits, [0xFF]);
    }
}
