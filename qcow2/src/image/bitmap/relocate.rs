//! Writing existing bitmaps anew: QEMU stores every bitmap into fresh clusters (data, then
//! table) each time it saves them, so adding a bitmap with qemu-img moves the others too. Adding
//! one here does the same, so the file lays out as qemu-img's does (iotest 190 measures it).
//!
//! The copies go to fresh clusters and the old directory keeps naming the old tables until the
//! directory switch (`switch_directory`), which frees the old clusters afterwards: a cut before
//! the switch leaves the old bitmaps intact and the copies leaked.

use crate::error::Result;
use crate::format::bitmap::{BitmapEntry, TableEntry};
use crate::format::table::put_be_u64_at;
use crate::image::{Image, Meta};
use crate::storage::StorageExt;

impl Image {
    /// Copies each bitmap's data clusters and table to fresh clusters; returns the entries
    /// naming the copies, in the same order.
    pub(super) fn relocate_bitmaps(
        &self,
        m: &mut Meta,
        entries: &[BitmapEntry],
    ) -> Result<Vec<BitmapEntry>> {
        let cs = m.header.cluster_size();
        let mut moved = Vec::with_capacity(entries.len());
        let mut cluster = vec![0u8; cs as usize];
        for e in entries {
            let raw = self.read_table(e.table_offset, e.table_size as u64, "bitmap table")?;
            let mut table = vec![0u8; raw.len() * 8];
            for (i, &r) in raw.iter().enumerate() {
                let entry = match TableEntry::decode(r, cs, e.table_offset) {
                    Ok(TableEntry::Data(old)) => {
                        self.storage
                            .read_zero_filled_at(&mut cluster, old)
                            .map_err(|err| {
                                crate::error::Error::io(
                                    &self.name,
                                    format!("reading bitmap data at {old:#x}"),
                                    err,
                                )
                            })?;
                        let new = self.alloc(m, 1)?;
                        self.guard(m, new, cs, None)?;
                        self.host().write(&cluster, new, "copied bitmap data")?;
                        new
                    }
                    _ => r,
                };
                put_be_u64_at(&mut table, i, entry);
            }
            let clusters = (table.len() as u64).div_ceil(cs);
            let at = self.alloc(m, clusters)?;
            self.guard(m, at, clusters * cs, None)?;
            self.host().write(&table, at, "copied bitmap table")?;
            moved.push(BitmapEntry {
                table_offset: at,
                ..e.clone()
            });
        }
        Ok(moved)
    }
}
