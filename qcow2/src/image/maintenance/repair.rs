//! Repair, as `qemu-img check -r`: `leaks` lowers refcounts that exceed the references; `all`
//! rebuilds the refcount structures from the published metadata (new table and blocks at the end
//! of the image, published by the 12-byte header switch at offset 48) and then fixes COPIED flags.
//! A dirty image (lazy refcounts) opened for writing is repaired the same way.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::features::Incompatible;
use crate::format::refcount;
use crate::format::table::{l2_entry, put_be_u64_at, ClusterMapping, COPIED, OFFSET_MASK};

/// The zero bits of an extended L2 entry's subcluster bitmap.
const ALL_ZEROES: u64 = 0xFFFF_FFFF_0000_0000;
use crate::image::check::CheckReport;
use crate::image::refcounts::Refcounts;
use crate::image::{Image, Meta};

/// What `check -r` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only lower refcounts of leaked clusters.
    Leaks,
    /// Rebuild refcounts and fix COPIED flags.
    All,
}

/// Refcount structures [`Image::write_refcounts`] wrote: the table, then the blocks up to
/// cluster `end`.
pub(crate) struct NewRefcounts {
    pub table_offset: u64,
    pub table_clusters: u64,
    pub end: u64,
}

impl Image {
    /// Checks, repairs what `mode` allows, and checks again. The returned report is the second
    /// check's, with `leaks_fixed` and `corruptions_fixed` from the repair.
    pub fn check_and_repair(&self, mode: Repair) -> Result<CheckReport> {
        if !self.writable {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        let mut first = self.check()?;
        // Unaligned entries without data become zeros first, as QEMU's check fixes them while
        // it counts; what they held then shows as a leak.
        let mut zeroed = 0;
        if mode == Repair::All {
            let found: Vec<String> = first
                .messages
                .iter()
                .filter(|m| is_unaligned_preallocated(m))
                .map(|m| m.replacen("ERROR", "Repairing", 1))
                .collect();
            if !found.is_empty() {
                zeroed = self.zero_unaligned_preallocated()?;
                first = self.check()?;
                first.messages.splice(0..0, found);
            }
        }
        if first.is_clean() && zeroed == 0 {
            // A consistent image only loses its corrupt and dirty marks (as with qemu-img).
            let mut m = self.meta_mut();
            self.clear_bits(&mut m, Incompatible::CORRUPT | Incompatible::DIRTY)?;
            return Ok(first);
        }
        let copied_found = first.messages.iter().filter(|m| is_copied_error(m)).count() as u64;
        // Only `-r all` fixes refcounts too low; with leaks alone, qemu-img fixes COPIED flags
        // only when nothing else is wrong (a flag fixed against a wrong refcount would be wrong).
        let fix_flags =
            mode == Repair::All || (first.corruptions == copied_found && first.check_errors == 0);
        let incomplete = first
            .messages
            .iter()
            .filter(|m| is_incomplete_snapshot(m))
            .count() as u64;
        // Refcounts that are at most too high (leaks; only snapshot entries to complete) need
        // no rebuild: QEMU lowers them in place.
        let only_leaks = first.check_errors == 0 && first.corruptions == incomplete;
        let mut replaced = Vec::new();
        {
            let mut m = self.meta_mut();
            match mode {
                Repair::Leaks => self.fix_leaks(&mut m)?,
                Repair::All if only_leaks => self.fix_leaks(&mut m)?,
                Repair::All => replaced = self.rebuild_refcounts(&mut m)?,
            }
            if fix_flags {
                self.fix_copied(&mut m)?;
            }
            self.flush_all(&mut m)?;
            // With the refcounts right, incomplete snapshot entries can take fresh clusters
            // (QEMU repairs them last too).
            if mode == Repair::All && incomplete > 0 {
                self.complete_snapshot_entries(&mut m)?;
            }
        }
        let mut second = self.check()?;
        second.leaks_fixed = first.leaks.saturating_sub(second.leaks);
        let rebuilt = (mode == Repair::All && first.needs_rebuild()).then_some(&replaced[..]);
        second.repair_messages = repair_transcript(&first, &second, fix_flags, mode, rebuilt);
        // What qemu-img counts: the refcounts too low (`all`), then the COPIED flags wrong by
        // the repaired refcounts, unless a rebuild set them uncounted.
        let mut found = 0;
        if mode == Repair::All {
            found += first.corruptions - copied_found;
        }
        if fix_flags && rebuilt.is_none() {
            found += first.copied_after_fix.len() as u64;
        }
        second.corruptions_fixed = found.saturating_sub(second.corruptions) + zeroed;
        if second.corruptions == 0 && second.check_errors == 0 {
            let mut m = self.meta_mut();
            self.clear_bits(&mut m, Incompatible::DIRTY | Incompatible::CORRUPT)?;
        }
        Ok(second)
    }

    /// Turns every active L2 entry that points at an unaligned host offset but holds no data
    /// into zeros (allocated subclusters become zero ones); each entry is written and synced on
    /// its own. Returns how many changed.
    fn zero_unaligned_preallocated(&self) -> Result<u64> {
        let mut m = self.meta_mut();
        self.flush_all(&mut m)?;
        let cs = m.header.cluster_size();
        let extended = m.header.extended_l2();
        let external = m.header.has_external_data_file();
        let entry_size = m.header.l2_entry_size();
        let mut changed = 0;
        for l1_index in 0..m.l1.len() {
            let l2_offset = m.l1[l1_index] & OFFSET_MASK;
            if l2_offset == 0 || l2_offset % cs != 0 {
                continue;
            }
            let mut table = vec![0u8; cs as usize];
            self.host()
                .read_zero_filled(&mut table, l2_offset, "L2 table")?;
            for i in 0..(cs / entry_size) as usize {
                let (entry, bitmap, mapping) = l2_entry(&table, i, extended, external);
                let host = match mapping {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => host_offset,
                    _ => continue,
                };
                if host % cs == 0 || crate::image::check::holds_data(entry, bitmap, extended) {
                    continue;
                }
                let mut bytes = Vec::with_capacity(entry_size as usize);
                if extended {
                    let zeros = (bitmap | bitmap << 32) & ALL_ZEROES;
                    bytes.extend(0u64.to_be_bytes());
                    bytes.extend(zeros.to_be_bytes());
                } else {
                    bytes.extend(crate::format::table::ZERO.to_be_bytes());
                }
                let at = l2_offset + i as u64 * entry_size;
                self.host().write_sync(&bytes, at, "repaired L2 entry")?;
                changed += 1;
            }
            // The cached copies of the table are stale now.
            self.l2_cache.remove(l2_offset);
            let slice = crate::image::layer::l2_slice_len(cs);
            for k in 0..cs / slice {
                self.l2_slices.remove(l2_offset + k * slice);
            }
        }
        Ok(changed)
    }

    /// Repairs an image opened for writing with the dirty bit set, then clears the bit, and
    /// returns what qemu-img prints meanwhile.
    pub(crate) fn repair_dirty(&self) -> Result<Vec<String>> {
        let report = self.check_and_repair(Repair::All)?;
        if self.meta().header.is_dirty() {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "the dirty image could not be repaired; qemu-img check -r all shows why"
                    .into(),
            });
        }
        Ok(report.repair_messages)
    }

    fn clear_bits(&self, m: &mut Meta, bits: u64) -> Result<()> {
        if m.header.incompatible_features & bits != 0 {
            m.header.incompatible_features &= !bits;
            self.host().write_sync(
                &m.header.incompatible_features.to_be_bytes(),
                72,
                "header incompatible features",
            )?;
        }
        Ok(())
    }

    /// Every cluster's expected refcount, refcount structures included.
    fn expected_refcounts(&self, m: &Meta) -> Result<(std::collections::HashMap<u64, u64>, u64)> {
        let mut scratch = CheckReport::default();
        let mut refs = self.count_references(m, &mut scratch)?;
        let cs = m.header.cluster_size();
        refs.counts_add(
            m.header.refcount_table_offset,
            m.header.refcount_table_clusters as u64 * cs,
        );
        let reftable = self.read_table(
            m.header.refcount_table_offset,
            m.header.refcount_table_clusters as u64 * cs / 8,
            "refcount table",
        )?;
        for e in reftable {
            let off = e & !0x1FF;
            if off != 0 && off % cs == 0 {
                refs.counts_add(off, cs);
            }
        }
        let nb = refs.nb_clusters;
        Ok((refs.counts, nb))
    }

    pub(crate) fn fix_leaks(&self, m: &mut Meta) -> Result<()> {
        self.flush_all(m)?;
        let (expected, nb) = self.expected_refcounts(m)?;
        // Only clusters inside the file can hold leaked space; a reference far past the end
        // (a corrupt table) must not make this loop run for ever.
        let file_clusters = self
            .storage
            .len()
            .map_err(|e| Error::io(&self.name, "reading the file length", e))?
            .div_ceil(m.header.cluster_size());
        let nb = nb.min(file_clusters);
        let host = self.host();
        let ws = m.ws_mut()?;
        for k in 0..nb {
            let on_disk = ws.refcounts.get(host, k)?;
            let want = expected.get(&k).copied().unwrap_or(0);
            if on_disk > want {
                ws.refcounts.set_value(host, k, want)?;
            }
        }
        Ok(())
    }

    /// Writes new refcount structures computed from the references, past everything in use.
    pub(crate) fn rebuild_refcounts(&self, m: &mut Meta) -> Result<Vec<u64>> {
        self.flush_l2(m)?;
        let mut scratch = CheckReport::default();
        let counts = self.count_references(m, &mut scratch)?.counts;
        let old = {
            let refcounts = &m.ws()?.refcounts;
            let cs = m.header.cluster_size();
            let table = refcounts.reftable_offset / cs;
            let mut old: Vec<u64> = (table..table + refcounts.reftable_clusters as u64)
                .chain(refcounts.refblocks().map(|(_, o)| o / cs))
                .collect();
            old.sort_unstable();
            old.dedup();
            old
        };
        let order = m.header.refcount_order;
        let new = self.write_refcounts(m, counts, order, 0, "rebuilt")?;
        let mut switch = [0u8; 12];
        switch[..8].copy_from_slice(&new.table_offset.to_be_bytes());
        switch[8..].copy_from_slice(&(new.table_clusters as u32).to_be_bytes());
        self.host()
            .write_sync(&switch, 48, "header refcount table fields")?;
        m.header.refcount_table_offset = new.table_offset;
        m.header.refcount_table_clusters = new.table_clusters as u32;
        self.adopt_refcounts(m, &new, order)?;
        Ok(old)
    }

    /// Writes a refcount table and blocks of width `1 << order` holding `counts` (and their own
    /// clusters) past every cluster in use, the end of the file and cluster `not_before`, and
    /// syncs them. Nothing names them until the caller switches the header to them. Counts above
    /// the width's maximum are clamped (callers that must not lose them refuse them first).
    /// `what` names them in errors ("rebuilt", "new").
    pub(crate) fn write_refcounts(
        &self,
        m: &Meta,
        counts: HashMap<u64, u64>,
        order: u32,
        not_before: u64,
        what: &str,
    ) -> Result<NewRefcounts> {
        let h = &m.header;
        let cs = h.cluster_size();
        let per_block = refcount::entries_per_block(h.cluster_bits, order);
        let file_clusters = self
            .storage
            .len()
            .map_err(|e| Error::io(&self.name, "reading the file length", e))?
            .div_ceil(cs);
        let start = counts
            .keys()
            .map(|k| k + 1)
            .max()
            .unwrap_or(1)
            .max(file_clusters)
            .max(not_before);
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let end = start + table_clusters + blocks;
            let need_blocks = end.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if (need_blocks, need_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        if table_clusters * cs > crate::format::limits::MAX_REFTABLE_SIZE_BYTES {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!("the {what} refcount table would exceed its 8 MiB limit"),
            });
        }
        // Layout: the blocks from `start` on, one per reftable entry in use, then the table (the
        // order QEMU allocates them in).
        let blocks_start = start;
        let table_offset = (start + blocks) * cs;
        let mut all = counts;
        for k in start..start + blocks + table_clusters {
            *all.entry(k).or_insert(0) += 1;
        }
        let max = refcount::max_refcount(order);
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        let host = self.host();
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per_block {
                if let Some(&c) = all.get(&(b * per_block + i)) {
                    refcount::set(&mut block, i as usize, order, c.min(max));
                }
            }
            let block_offset = (blocks_start + b) * cs;
            host.write(&block, block_offset, &format!("{what} refcount block"))?;
            put_be_u64_at(&mut table, b as usize, block_offset);
        }
        host.write(&table, table_offset, &format!("{what} refcount table"))?;
        host.sync()?;
        Ok(NewRefcounts {
            table_offset,
            table_clusters,
            end: start + blocks + table_clusters,
        })
    }

    /// Allocates from `new` from now on, once the header names it.
    pub(crate) fn adopt_refcounts(
        &self,
        m: &mut Meta,
        new: &NewRefcounts,
        order: u32,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        if let Some(area) = m
            .metadata_areas
            .iter_mut()
            .find(|a| a.what == "the refcount table")
        {
            area.start = new.table_offset;
            area.end = new.table_offset + new.table_clusters * cs;
        }
        let refcounts = Refcounts::load(
            self.host(),
            m.header.cluster_bits,
            order,
            new.table_offset,
            new.table_clusters as u32,
        )?;
        let ws = m.ws_mut()?;
        ws.refcounts = refcounts;
        ws.alloc_end = new.end;
        ws.l2_after_refblocks = false;
        ws.refblocks_after_l2 = false;
        m.file_len = m.file_len.max(new.end * cs);
        Ok(())
    }

    /// Sets COPIED in the active L1 and L2 tables exactly where the refcount is 1.
    pub(crate) fn fix_copied(&self, m: &mut Meta) -> Result<()> {
        let every: Vec<usize> = (0..m.l1.len()).collect();
        self.fix_copied_in(m, &every)
    }

    /// [`Image::fix_copied`] for the L1 entries at `indices` and the L2 tables they hold.
    pub(crate) fn fix_copied_in(&self, m: &mut Meta, indices: &[usize]) -> Result<()> {
        let cs = m.header.cluster_size();
        let extended = m.header.extended_l2();
        let external = m.header.has_external_data_file();
        let host = self.host();
        for &i in indices {
            let entry = m.l1[i];
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let count = m.ws_mut()?.refcounts.get(host, l2 / cs)?;
            let fixed = if count == 1 {
                entry | COPIED
            } else {
                entry & !COPIED
            };
            if fixed != entry {
                let at = m.header.l1_table_offset + i as u64 * 8;
                host.write_sync(&fixed.to_be_bytes(), at, "L1 entry")?;
                m.l1[i] = fixed;
            }
            let table = self.l2_table(m, l2, i as u64, m.header.l1_table_offset)?;
            let mut changes = Vec::new();
            for j in 0..1usize << m.header.l2_bits() {
                let (e, _, mapping) = l2_entry(&table, j, extended, external);
                let data = match mapping {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => host_offset,
                    _ => continue,
                };
                let count = if external {
                    1
                } else {
                    m.ws_mut()?.refcounts.get(host, data / cs)?
                };
                let fixed = if count == 1 { e | COPIED } else { e & !COPIED };
                if fixed != e {
                    changes.push((j, fixed));
                }
            }
            if !changes.is_empty() {
                self.l2_cache.modify(l2, |t| {
                    for (j, fixed) in &changes {
                        put_be_u64_at(t, if extended { j * 2 } else { *j }, *fixed);
                    }
                });
            }
        }
        Ok(())
    }
}

fn is_copied_error(message: &str) -> bool {
    message.starts_with("ERROR OFLAG_COPIED")
}

fn is_unaligned_preallocated(message: &str) -> bool {
    message.starts_with("ERROR offset=")
        && message.ends_with(": Preallocated cluster is not properly aligned; L2 entry corrupted.")
}

fn is_incomplete_snapshot(message: &str) -> bool {
    message.starts_with("ERROR snapshot table entry ") && message.ends_with(" is incomplete")
}

/// What qemu-img prints while repairing: the refcount comparison's findings; then either the
/// rebuild, whose replaced structures it reports as repaired leaks, or the comparison again with
/// what it fixes, then the COPIED flags (`fix_flags`: fixed, else as still found).
fn repair_transcript(
    first: &CheckReport,
    second: &CheckReport,
    fix_flags: bool,
    mode: Repair,
    rebuilt: Option<&[u64]>,
) -> Vec<String> {
    let mut out: Vec<String> = first
        .messages
        .iter()
        .filter(|m| !is_copied_error(m))
        .map(|m| match mode {
            Repair::All if is_incomplete_snapshot(m) => m.replacen("ERROR", "Repairing", 1),
            _ => m.clone(),
        })
        .collect();
    if let Some(replaced) = rebuilt {
        out.push("Rebuilding refcount structure".into());
        // QEMU counts the references again over the new structures, and says again what the
        // counting found wrong in the tables.
        out.extend(
            first
                .messages
                .iter()
                .filter(|m| {
                    !m.starts_with("ERROR cluster ")
                        && !m.starts_with("Leaked cluster ")
                        && !m.starts_with("Repairing ")
                        && !is_copied_error(m)
                        && !is_incomplete_snapshot(m)
                })
                .cloned(),
        );
        out.extend(
            replaced
                .iter()
                .map(|c| format!("Repairing cluster {c} refcount=1 reference=0")),
        );
        return out;
    }
    for message in &first.messages {
        if let Some(rest) = message.strip_prefix("Leaked cluster ") {
            out.push(format!("Repairing cluster {rest}"));
        } else if let Some(rest) = message.strip_prefix("ERROR cluster ") {
            out.push(match mode {
                Repair::All => format!("Repairing cluster {rest}"),
                Repair::Leaks => message.clone(),
            });
        }
    }
    // The COPIED flags are checked against the refcounts as just repaired.
    if fix_flags {
        out.extend(
            first
                .copied_after_fix
                .iter()
                .map(|m| m.replacen("ERROR", "Repairing", 1)),
        );
    } else {
        out.extend(
            second
                .messages
                .iter()
                .filter(|m| is_copied_error(m))
                .cloned(),
        );
    }
    out
}
