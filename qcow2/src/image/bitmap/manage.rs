//! Adding, removing, enabling, disabling, clearing and merging persistent bitmaps, as
//! `qemu-img bitmap` does.
//!
//! Flags change in place (a directory rewrite that touches only flag bits). Clearing and merging
//! change bits: they go through the write tracking of `super` (the bitmap is marked `in_use` on
//! disk first and saved on close), so a crash in between leaves it in use, never half changed
//! and trusted. Adding or removing a bitmap writes a new directory (and a new table) in fresh
//! clusters whose refcounts are durable first, then switches the header's bitmaps extension
//! with the crash-safe header rewrite (`backing_header`), and only then frees what the old
//! directory held: a cut leaves the old or the new directory, plus at worst leaked clusters.

use super::Bitmaps;
use crate::error::{Error, Result};
use crate::format::bitmap::{
    self, BitmapEntry, TableEntry, FLAG_AUTO, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE,
    MAX_TABLE_SIZE, MIN_GRANULARITY_BITS,
};
use crate::format::extension::BitmapsExtension;
use crate::format::features::Autoclear;
use crate::format::limits::MAX_BITMAPS;
use crate::image::{Image, Meta};

impl Image {
    fn bitmap_error(&self, reason: String) -> Error {
        Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        }
    }

    fn bitmap_index(&self, m: &Meta, name: &str) -> Result<usize> {
        m.bitmaps
            .as_ref()
            .and_then(|b| b.entries.iter().position(|e| e.name == name))
            .ok_or_else(|| self.bitmap_error(format!("Dirty bitmap '{name}' not found")))
    }

    /// The granularity QEMU gives a new bitmap when none is asked for: the cluster size, within
    /// 4 KiB to 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.cluster_size().clamp(4096, 65536)
    }

    /// Checks, without writing, QEMU's rules for a new bitmap's version, name, granularity and
    /// size. Whether the name is free and the count within its limit depends on the bitmaps
    /// present when it is added, which [`Image::add_bitmap`] checks.
    pub fn check_new_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        let m = self.meta();
        self.check_new_bitmap_in(&m, name, granularity)
    }

    fn check_new_bitmap_in(&self, m: &Meta, name: &str, granularity: u64) -> Result<()> {
        if m.header.version < 3 {
            return Err(self.bitmap_error("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        if name.is_empty() || name.len() > MAX_NAME_SIZE {
            return Err(self.bitmap_error(format!(
                "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
            )));
        }
        if !granularity.is_power_of_two() || granularity < 1 << MIN_GRANULARITY_BITS {
            return Err(self.bitmap_error("Granularity must be power of 2 and at least 512".into()));
        }
        let bits = granularity.trailing_zeros() as u8;
        if bits > MAX_GRANULARITY_BITS {
            return Err(self.bitmap_error(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << MAX_GRANULARITY_BITS
            )));
        }
        if m.header.size == 0 {
            // QEMU cannot store one either (its table would have no entries).
            return Err(
                self.bitmap_error("a disk of size 0 cannot hold a persistent bitmap".into())
            );
        }
        let cs = m.header.cluster_size();
        let data = bitmap::data_bytes(m.header.size, bits);
        if data > MAX_PHYS_SIZE || data > MAX_TABLE_SIZE as u64 * cs {
            return Err(self.bitmap_error(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            ));
        }
        Ok(())
    }

    /// Adds a persistent bitmap of `granularity` bytes (a power of two, 512 B to 2 GiB), empty,
    /// enabled unless `disabled`. The image must be v3 (QEMU's rule).
    pub fn add_bitmap(&self, name: &str, granularity: u64, disabled: bool) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        self.check_new_bitmap_in(&m, name, granularity)?;
        if let Some(b) = &m.bitmaps {
            if b.entries.iter().any(|e| e.name == name) {
                return Err(self.bitmap_error(format!("Bitmap already exists: {name}")));
            }
            if b.entries.len() as u32 >= MAX_BITMAPS {
                return Err(
                    self.bitmap_error(format!("Can't have more than {MAX_BITMAPS} bitmaps"))
                );
            }
        }
        let bits = granularity.trailing_zeros() as u8;
        let cs = m.header.cluster_size();
        // Tracked bits are saved first: the directory is rebuilt from the saved state.
        self.bitmaps_store(&mut m)?;
        // The bitmaps already there move to fresh clusters first, as QEMU stores them.
        let old_entries = m
            .bitmaps
            .as_ref()
            .map(|b| b.entries.clone())
            .unwrap_or_default();
        let mut entries = self.relocate_bitmaps(&mut m, &old_entries)?;
        let table_size = bitmap::table_size(m.header.size, bits, cs);
        let table_bytes = table_size * 8;
        let table_clusters = table_bytes.div_ceil(cs);
        let table_offset = self.alloc(&mut m, table_clusters)?;
        self.guard(&mut m, table_offset, table_clusters * cs, None)?;
        // Exactly the entries, as QEMU writes a table.
        self.host().write(
            &vec![0u8; table_bytes as usize],
            table_offset,
            "new bitmap table",
        )?;
        entries.push(BitmapEntry {
            table_offset,
            table_size: table_size as u32,
            flags: if disabled { 0 } else { FLAG_AUTO },
            granularity_bits: bits,
            name: name.to_string(),
        });
        self.switch_directory(&mut m, entries, &old_entries)
    }

    /// Removes a bitmap and frees its table and data clusters.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let index = self.bitmap_index(&m, name)?;
        self.bitmaps_store(&mut m)?;
        let Some(b) = m.bitmaps.clone() else {
            return Ok(());
        };
        let mut entries = b.entries.clone();
        let gone = entries.remove(index);
        self.switch_directory(&mut m, entries, &[gone])
    }

    /// Enables (`true`) or disables a bitmap: whether it tracks writes.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let index = self.bitmap_index(&m, name)?;
        let Some(b) = m.bitmaps.as_mut() else {
            return Ok(());
        };
        let e = &mut b.entries[index];
        if enabled {
            e.flags |= FLAG_AUTO;
        } else {
            e.flags &= !FLAG_AUTO;
        }
        // The entries in memory carry the on-disk `in_use` state: only the flag changes.
        let entries = b.entries.clone();
        self.write_directory_in_place(&m, &entries)
    }

    /// Clears every bit of a bitmap.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.change_bits(name, |bits, _| {
            bits.fill(0);
            Ok(())
        })
    }

    /// Sets in bitmap `target` every bit of bitmap `source` of `from` (this image when `None`):
    /// the union, at the target's granularity.
    pub fn merge_bitmap(&self, target: &str, source: &str, from: Option<&Image>) -> Result<()> {
        let extents = match from {
            Some(other) => other.dirty_extents(source, 0, other.size())?,
            None => self.dirty_extents(source, 0, self.size())?,
        };
        self.change_bits(target, |bits, granularity_bits| {
            for (start, len) in &extents {
                super::set_range(bits, granularity_bits, *start, *len);
            }
            Ok(())
        })
    }

    /// Changes the bits of one bitmap through the write tracking, so they are saved on close.
    fn change_bits(
        &self,
        name: &str,
        change: impl FnOnce(&mut [u8], u8) -> Result<()>,
    ) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let index = self.bitmap_index(&m, name)?;
        self.bitmaps_before_change(&mut m)?;
        let Some(b) = m.bitmaps.as_mut() else {
            return Ok(());
        };
        let g = b.entries[index].granularity_bits;
        let durable = b.durable;
        let tracked = b.tracked.as_mut().map(|t| &mut t[index]);
        let len = match tracked.and_then(|t| t.bits.as_mut()) {
            Some(bits) => {
                change(bits, g)?;
                bits.len()
            }
            None => return Err(self.inconsistent(name)),
        };
        if durable {
            // Under the durable-bits rule the disk holds every bit at every instant.
            self.persist_bits(&mut m, index, 0, len)?;
            self.host().sync()?;
        }
        Ok(())
    }

    /// Publishes `entries` as the new directory: written to fresh clusters, made durable, then
    /// switched in by the crash-safe header rewrite; the old directory and the clusters of
    /// `removed` bitmaps are freed after the switch.
    pub(super) fn switch_directory(
        &self,
        m: &mut Meta,
        entries: Vec<BitmapEntry>,
        removed: &[BitmapEntry],
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let old = m.bitmaps.clone();
        let new_dir = if entries.is_empty() {
            None
        } else {
            let bytes = bitmap::encode_directory(&entries);
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let at = self.alloc(m, clusters)?;
            self.guard(m, at, clusters * cs, None)?;
            self.host().write(&bytes, at, "new bitmap directory")?;
            Some((at, bytes.len() as u64))
        };
        // The new directory, its tables and their refcounts are durable before the switch,
        // also with lazy refcounts: the image need not be marked dirty now.
        self.flush_all(m)?;
        self.flush_refblocks(m)?;
        let nb = entries.len() as u32;
        self.rewrite_header(m, |h| match new_dir {
            Some((offset, size)) => {
                h.extensions.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: nb,
                    bitmap_directory_size: size,
                    bitmap_directory_offset: offset,
                });
                h.autoclear_features |= Autoclear::BITMAPS;
            }
            None => {
                h.extensions.bitmaps = None;
                h.autoclear_features &= !Autoclear::BITMAPS;
            }
        })?;
        // What only the old directory referenced goes now.
        let mut freed: Vec<(u64, u64)> = Vec::new();
        if let Some(old) = &old {
            freed.push((old.dir_offset, old.dir_size.div_ceil(cs) * cs));
        }
        for e in removed {
            let raw = self.read_table(e.table_offset, e.table_size as u64, "bitmap table")?;
            for r in raw {
                if let Ok(TableEntry::Data(off)) = TableEntry::decode(r, cs, e.table_offset) {
                    freed.push((off, cs));
                }
            }
            freed.push((e.table_offset, (e.table_size as u64 * 8).div_ceil(cs) * cs));
        }
        m.metadata_areas.retain(|a| {
            !freed
                .iter()
                .any(|&(start, len)| a.start == start && a.end <= start + len)
        });
        m.bitmaps = new_dir.map(|(dir_offset, dir_size)| Bitmaps {
            dir_offset,
            dir_size,
            entries: entries.clone(),
            tracked: None,
            durable: false,
            unsynced: false,
            pending: Vec::new(),
        });
        if let Some((at, size)) = new_dir {
            m.add_area(&self.name, at, size, "the bitmap directory")?;
        }
        for e in &entries {
            let known = m.metadata_areas.iter().any(|a| a.start == e.table_offset);
            if !known {
                m.add_area(
                    &self.name,
                    e.table_offset,
                    e.table_size as u64 * 8,
                    "a bitmap table",
                )?;
            }
        }
        for &(offset, len) in &freed {
            self.free(m, offset, len)?;
        }
        self.flush_all(m)?;
        // QEMU discards freed bitmap clusters at once; the file keeps no stale tables either.
        self.punch_freed(m, &freed, "giving old bitmap clusters back")
    }
}
