//! One step beyond QEMU: bitmaps that survive a power cut.
//!
//! QEMU marks its bitmaps `in_use` while an image is open and writes them back on close; a crash
//! leaves them `in_use`, they are dropped, and the next backup must read the whole disk. This
//! engine keeps a stronger rule while its autoclear bit `ENGINE_DURABLE_BITMAPS` is set:
//!
//! **every bit that a write sets is durable in the bitmap's data cluster before the write's data
//! can be read back.** Newly set bytes are collected (`pending`) and written in one go (in
//! place, or into a new data cluster whose refcount is durable before the table entry names it)
//! at the first of two moments: before data is written in place (a cluster the image owns, an
//! external data file), followed by a sync; or at the start of the next L2 write-back, whose own
//! sync (`l2_after_data_sync`, set when bits are set) precedes the L2 entries that make data in
//! new clusters readable. Zero writes and discards change only L2 entries and follow the same
//! path. Bits already set cost nothing; the price is one small write per batch of first writes
//! into clean granules, plus one sync before a write in place into one.
//!
//! The argument: at any instant, for every bitmap the session tracks, the bits on disk are a
//! superset of every guest range whose new data a read could return after a crash, because no
//! data becomes readable before its bits are durable. Clearing or merging bits
//! writes the whole bitmap durably before returning, so the disk never lags a change of bits.
//! The session sets the autoclear bit (one 8-byte header write, synced) before it marks any
//! bitmap `in_use`, and only when every bitmap was consistent at that moment, so every `in_use`
//! bitmap under the bit is one this rule kept. It clears the bit after a clean save.
//!
//! Recovery: a read-write open (also by `check -r`) that finds the bit set clears `in_use` on
//! every bitmap (one in-place directory write of flag bits, synced) and then the bit: each
//! bitmap is consistent again and marks at least every range written since its last save.
//! QEMU, lacking the bit's meaning, clears it when it opens the image for writing, so bitmaps
//! QEMU leaves `in_use` after its own crash are never mistaken for ours; and until our next
//! open, QEMU treats ours as it treats its own crashed bitmaps.

use crate::error::Result;
use crate::format::bitmap::{TableEntry, FLAG_IN_USE};
use crate::format::features::Autoclear;
use crate::image::{Image, Meta};

impl Image {
    /// Sets or clears this engine's autoclear bit on disk, durably.
    pub(super) fn set_durable_bit(&self, m: &mut Meta, on: bool) -> Result<()> {
        if on {
            m.header.autoclear_features |= Autoclear::ENGINE_DURABLE_BITMAPS;
        } else {
            m.header.autoclear_features &= !Autoclear::ENGINE_DURABLE_BITMAPS;
        }
        self.host().write_sync(
            &m.header.autoclear_features.to_be_bytes(),
            88,
            "header autoclear features",
        )
    }

    /// Writes bytes `[lo, hi)` of tracked bitmap `index` to its data clusters (new clusters get
    /// durable refcounts before their table entry names them). The caller syncs.
    pub(super) fn persist_bits(
        &self,
        m: &mut Meta,
        index: usize,
        lo: usize,
        hi: usize,
    ) -> Result<()> {
        let cs = m.header.cluster_size() as usize;
        let Some(b) = m.bitmaps.as_ref() else {
            return Ok(());
        };
        let table_offset = b.entries[index].table_offset;
        let Some(t) = b.tracked.as_ref().map(|t| t[index].clone()) else {
            return Ok(());
        };
        let Some(bits) = t.bits else {
            return Ok(());
        };
        let mut table = t.table;
        let chunks = lo / cs..hi.div_ceil(cs);
        for (k, entry) in table
            .iter_mut()
            .enumerate()
            .take(chunks.end)
            .skip(chunks.start)
        {
            let start = k * cs;
            let chunk = &bits[start..(start + cs).min(bits.len())];
            match *entry {
                TableEntry::Data(off) => {
                    let (a, z) = (lo.max(start), hi.min(start + chunk.len()));
                    self.host().write(
                        &bits[a..z],
                        off + (a - start) as u64,
                        "bitmap data cluster",
                    )?;
                }
                TableEntry::Zeros | TableEntry::Ones => {
                    let off = self.alloc(m, 1)?;
                    self.guard(m, off, cs as u64, None)?;
                    let mut buf = chunk.to_vec();
                    buf.resize(cs, 0);
                    self.host().write(&buf, off, "bitmap data cluster")?;
                    // The refcount is durable before the table names the cluster, also with
                    // lazy refcounts (an overwrite in place does not mark the image dirty).
                    self.flush_refblocks(m)?;
                    self.host().sync()?;
                    self.host().write(
                        &off.to_be_bytes(),
                        table_offset + k as u64 * 8,
                        "bitmap table entry",
                    )?;
                    *entry = TableEntry::Data(off);
                }
            }
        }
        if let Some(t) = m
            .bitmaps
            .as_mut()
            .and_then(|b| b.tracked.as_mut())
            .map(|t| &mut t[index])
        {
            t.table = table;
        }
        Ok(())
    }

    /// On a read-write open with the engine's bit set: the `in_use` bitmaps were kept durable by
    /// a session of ours that did not close cleanly; they are consistent, so say so, then clear
    /// the bit.
    pub(crate) fn recover_durable_bitmaps(&self, m: &mut Meta) -> Result<()> {
        if m.header.autoclear_features & Autoclear::ENGINE_DURABLE_BITMAPS == 0 {
            return Ok(());
        }
        if let Some(b) = m.bitmaps.as_ref() {
            if b.entries.iter().any(|e| e.in_use()) && Self::bitmap_tables_mismatch(m) {
                // A resize cut short: the tables are saved again for the disk's size.
                self.resave_bitmaps_for_size(m)?;
            } else if b.entries.iter().any(|e| e.in_use()) {
                let mut entries = b.entries.clone();
                for e in &mut entries {
                    e.flags &= !FLAG_IN_USE;
                }
                self.write_directory_in_place(m, &entries)?;
                if let Some(b) = m.bitmaps.as_mut() {
                    b.entries = entries;
                }
            }
        }
        self.set_durable_bit(m, false)
    }
}
