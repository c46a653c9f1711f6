//! Read-only consistency check with `qemu-img check`'s counters: it recomputes every cluster's
//! references from the published metadata (header, active and snapshot tables, snapshot table,
//! refcount structures, bitmaps) and compares them with the on-disk refcounts, then checks COPIED
//! flags in the active tables. Memory grows with the clusters really referenced, not with sizes
//! read from disk.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::limits::{MAX_L1_ENTRIES, SNAPSHOT_EXTRA_V3_MIN_SIZE};
use crate::format::table::{
    be_u64_at, l2_entry, ClusterMapping, COPIED, L1_RESERVED_MASK, L2_STD_RESERVED_MASK,
    OFFSET_MASK, REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK,
};
use crate::format::{refcount, CompressedDescriptor};
use crate::image::{Image, Meta};
use crate::storage::StorageExt;

/// What a check found, with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Metadata that is wrong: refcounts too low, COPIED mismatches, reserved bits, bad offsets.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Internal failures (unreadable refcount blocks or tables).
    pub check_errors: u64,
    /// Corruptions a repair fixed (`check -r all`).
    pub corruptions_fixed: u64,
    /// Leaked clusters a repair reclaimed (`check -r leaks` or `all`).
    pub leaks_fixed: u64,
    /// (Highest used host cluster + 1) × cluster size.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in this image (not its backing chain).
    pub allocated_clusters: u64,
    /// Allocated guest clusters whose host cluster does not follow the previous guest
    /// cluster's; every compressed cluster counts (qemu-img's fragmentation count).
    pub fragmented_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// One line per problem, as qemu-img prints them to stderr.
    pub messages: Vec<String>,
    /// After a repair: what qemu-img prints while repairing (the first check's problems, then
    /// what it fixes), in its order.
    pub repair_messages: Vec<String>,
    /// The COPIED-flag problems left once every refcount equals its references: what `-r all`
    /// reports fixing after it fixed the refcounts in place.
    pub(crate) copied_after_fix: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 only leaks.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether a referenced cluster has refcount 0 on disk: only rebuilding the refcount
    /// structures repairs that (qemu-img's condition for a rebuild).
    pub fn needs_rebuild(&self) -> bool {
        self.messages.iter().any(|m| {
            m.strip_prefix("ERROR cluster ")
                .is_some_and(|rest| rest.contains(" refcount=0 "))
        })
    }

    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// Computed references per host cluster.
pub(crate) struct References<'a> {
    m: &'a Meta,
    /// The file's real length (QEMU's check uses it, not the engine's view).
    file_len: u64,
    pub counts: HashMap<u64, u64>,
    /// Clusters considered: the file's clusters, grown by references just past its end.
    pub nb_clusters: u64,
    refcount_max: u64,
}

impl References<'_> {
    /// Counts one reference to each cluster of a range, without the checks (repair only).
    pub(crate) fn counts_add(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = self.m.header.cluster_size();
        for k in offset / cs..=(offset + size - 1) / cs {
            *self.counts.entry(k).or_insert(0) += 1;
            self.nb_clusters = self.nb_clusters.max(k + 1);
        }
    }

    /// Counts one reference to every cluster `[offset, offset + size)` touches.
    fn add(&mut self, report: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = self.m.header.cluster_size();
        let file_len = self.file_len;
        let end = offset.saturating_add(size);
        // The last cluster may be partly written, so a reference may reach less than one cluster
        // past the end of the file.
        if end > file_len && end - file_len >= cs {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return;
        }
        let first = offset / cs;
        let last = (end - 1) / cs;
        for k in first..=last {
            self.nb_clusters = self.nb_clusters.max(k + 1);
            let count = self.counts.entry(k).or_insert(0);
            if *count == self.refcount_max {
                report.corruptions += 1;
                report
                    .messages
                    .push(format!("ERROR: overflow cluster offset={:#x}", k * cs));
                report.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into(),
                );
                continue;
            }
            *count += 1;
        }
    }
}

/// The on-disk refcounts, read refblock by refblock.
struct DiskRefcounts<'a> {
    image: &'a Image,
    m: &'a Meta,
    reftable: Vec<u64>,
    blocks: HashMap<u64, Option<Vec<u8>>>,
}

impl DiskRefcounts<'_> {
    /// The refcount of cluster `k`, or `None` when its refblock cannot be read.
    fn get(&mut self, k: u64) -> Option<u64> {
        let h = &self.m.header;
        let per_block_bits = h.cluster_bits + 3 - h.refcount_order;
        let index = k >> per_block_bits;
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Some(0);
        };
        let offset = entry & REFTABLE_OFFSET_MASK;
        if offset == 0 {
            return Some(0);
        }
        let cs = self.m.header.cluster_size();
        let image = self.image;
        let block = self.blocks.entry(offset).or_insert_with(|| {
            if offset % cs != 0 {
                return None;
            }
            let mut bytes = vec![0u8; cs as usize];
            image.storage.read_zero_filled_at(&mut bytes, offset).ok()?;
            Some(bytes)
        });
        let block = block.as_ref()?;
        let within = (k & ((1 << per_block_bits) - 1)) as usize;
        Some(refcount::get(block, within, h.refcount_order))
    }
}

impl Image {
    /// Checks the image without changing it. A table that cannot be read ends the check with an
    /// error, as qemu-img's "Check failed".
    pub fn check(&self) -> Result<CheckReport> {
        if self.writable {
            // The check reads the disk, so everything cached goes there first.
            // Refcounts too, even with lazy refcounts: the check compares them with the disk.
            let mut m = self.meta_mut();
            self.flush_l2(&mut m)?;
            self.flush_refblocks(&mut m)?;
        }
        let guard = self.meta();
        self.check_meta(&guard)
    }

    pub(crate) fn check_meta(&self, m: &Meta) -> Result<CheckReport> {
        let h = &m.header;
        let cs = m.header.cluster_size();
        let mut report = CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        };
        let mut refs = self.count_references(m, &mut report)?;
        refs.add(
            &mut report,
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        );
        let reftable = self.read_table(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs / 8,
            "refcount table",
        )?;
        self.check_refblocks(m, &mut report, &mut refs, &reftable);

        let mut disk = DiskRefcounts {
            image: self,
            m,
            reftable,
            blocks: HashMap::new(),
        };
        self.compare_refcounts(m, &mut report, &refs, &mut disk);
        self.check_copied(m, &mut report, &refs, &mut disk)?;
        Ok(report)
    }

    /// Counts the references of everything but the refcount structures themselves: the header,
    /// the active and snapshot tables with their clusters, the snapshot table and bitmaps.
    pub(crate) fn count_references<'m>(
        &self,
        m: &'m Meta,
        report: &mut CheckReport,
    ) -> Result<References<'m>> {
        let h = &m.header;
        let cs = h.cluster_size();
        let file_len = self.storage.len().unwrap_or(m.file_len);
        let mut refs = References {
            m,
            file_len,
            counts: HashMap::new(),
            nb_clusters: file_len.div_ceil(cs),
            refcount_max: refcount::max_refcount(h.refcount_order),
        };

        // Snapshot table entries that break v3's rules.
        if h.version >= 3 {
            for (i, s) in m.snapshots.iter().enumerate() {
                if (s.extra.len() as u32) < SNAPSHOT_EXTRA_V3_MIN_SIZE {
                    report.corruptions += 1;
                    report
                        .messages
                        .push(format!("ERROR snapshot table entry {i} is incomplete"));
                }
            }
        }
        refs.add(report, 0, cs);
        self.check_l1(
            m,
            report,
            &mut refs,
            h.l1_table_offset,
            h.l1_size as u64,
            true,
        )?;
        if h.has_external_data_file() && !m.snapshots.is_empty() {
            report.corruptions += 1;
            report
                .messages
                .push("ERROR: snapshots are not allowed with an external data file".into());
        }
        for s in &m.snapshots {
            if s.l1_table_offset % cs != 0 {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR snapshot {} ({}) has an unaligned L1 table offset {:#x}. Skipping",
                    s.id_str(),
                    s.name_str(),
                    s.l1_table_offset
                ));
                continue;
            }
            if s.l1_size as u64 > MAX_L1_ENTRIES {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR snapshot {} ({}) has an L1 table that is too large. Skipping",
                    s.id_str(),
                    s.name_str()
                ));
                continue;
            }
            self.check_l1(
                m,
                report,
                &mut refs,
                s.l1_table_offset,
                s.l1_size as u64,
                false,
            )?;
        }
        refs.add(report, h.snapshots_offset, m.snapshot_table_len);
        if let Some(c) = h.extensions.crypto {
            // The LUKS header and key material, in whole clusters.
            refs.add(report, c.offset, c.length);
        }
        self.count_bitmaps(m, report, &mut refs)?;
        Ok(refs)
    }

    fn check_l1(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &mut References<'_>,
        l1_offset: u64,
        l1_size: u64,
        active: bool,
    ) -> Result<()> {
        refs.add(report, l1_offset, l1_size * 8);
        if l1_size == 0 {
            return Ok(());
        }
        // Bytes past the end of the file read as zeros, as they do for QEMU.
        let mut l1 = vec![0u8; (l1_size * 8) as usize];
        if self
            .storage
            .read_zero_filled_at(&mut l1, l1_offset)
            .is_err()
        {
            report.check_errors += 1;
            report
                .messages
                .push("ERROR: I/O error in check_refcounts_l1".into());
            return Ok(());
        }
        for i in 0..l1_size as usize {
            let entry = be_u64_at(&l1, i);
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED_MASK != 0 {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
            }
            let l2_offset = entry & OFFSET_MASK;
            refs.add(report, l2_offset, m.header.cluster_size());
            if l2_offset % m.header.cluster_size() != 0 {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(m, report, refs, l2_offset, active)?;
        }
        Ok(())
    }

    fn check_l2(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &mut References<'_>,
        l2_offset: u64,
        active: bool,
    ) -> Result<()> {
        let h = &m.header;
        let cs = m.header.cluster_size();
        let mut table = vec![0u8; cs as usize];
        if self
            .storage
            .read_zero_filled_at(&mut table, l2_offset)
            .is_err()
        {
            report.check_errors += 1;
            report
                .messages
                .push("ERROR: I/O error in check_refcounts_l2".into());
            return Ok(());
        }
        let extended = h.extended_l2();
        let external = h.has_external_data_file();
        let entries = 1usize << h.l2_bits();
        let mut next_contiguous = 0u64;
        for i in 0..entries {
            let (entry, bitmap, mapping) = l2_entry(&table, i, extended, external);
            if !matches!(mapping, ClusterMapping::Compressed { .. })
                && entry & L2_STD_RESERVED_MASK != 0
            {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match mapping {
                ClusterMapping::Compressed { descriptor } => {
                    if entry & COPIED != 0 {
                        report.corruptions += 1;
                        report.messages.push(format!(
                            "ERROR: coffset={descriptor:#x}: copied flag must never be set for compressed clusters"
                        ));
                    }
                    if external {
                        report.corruptions += 1;
                        report.messages.push(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        report.corruptions += 1;
                        report.messages.push(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={entry:#x}"
                        ));
                        continue;
                    }
                    let d = CompressedDescriptor::decode(descriptor, h.cluster_bits);
                    refs.add(report, d.host_offset, d.compressed_size());
                    if active {
                        report.allocated_clusters += 1;
                        report.compressed_clusters += 1;
                        report.fragmented_clusters += 1;
                    }
                }
                ClusterMapping::Normal { host_offset }
                | ClusterMapping::ZeroAllocated { host_offset } => {
                    if (bitmap >> 32) & bitmap != 0 {
                        report.corruptions += 1;
                        report.messages.push(format!(
                            "ERROR offset={host_offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if host_offset % cs != 0 {
                        report.corruptions += 1;
                        // Without data behind it the entry can simply become zeros (`-r all`).
                        let what = if holds_data(entry, bitmap, extended) {
                            "Data"
                        } else {
                            "Preallocated"
                        };
                        report.messages.push(format!(
                            "ERROR offset={host_offset:x}: {what} cluster is not properly aligned; L2 entry corrupted."
                        ));
                    }
                    if active {
                        report.allocated_clusters += 1;
                        if next_contiguous != 0 && host_offset != next_contiguous {
                            report.fragmented_clusters += 1;
                        }
                        next_contiguous = host_offset + cs;
                    }
                    if !external {
                        refs.add(report, host_offset, cs);
                    }
                }
                ClusterMapping::Zero => {}
                ClusterMapping::Unallocated => {
                    if bitmap & 0xFFFF_FFFF != 0 {
                        report.corruptions += 1;
                        report.messages.push(format!(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap, entry={entry:#x}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts the bitmap directory, tables and data clusters when the bitmaps are consistent.
    fn count_bitmaps(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &mut References<'_>,
    ) -> Result<()> {
        use crate::format::bitmap::TableEntry;
        use crate::format::features::Autoclear;
        let h = &m.header;
        let Some(ext) = h.extensions.bitmaps else {
            return Ok(());
        };
        if h.autoclear_features & Autoclear::BITMAPS == 0 {
            return Ok(());
        }
        let cs = m.header.cluster_size();
        refs.add(
            report,
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
        );
        let mut dir = vec![0u8; ext.bitmap_directory_size as usize];
        self.storage
            .read_exact_at(&mut dir, ext.bitmap_directory_offset)
            .map_err(|e| Error::io(&self.name, "reading the bitmap directory", e))?;
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            if pos + 24 > dir.len() {
                break;
            }
            let table_offset = u64::from_be_bytes(dir[pos..pos + 8].try_into().expect("8 bytes"));
            let table_size =
                u32::from_be_bytes(dir[pos + 8..pos + 12].try_into().expect("4 bytes")) as u64;
            let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra_size =
                u32::from_be_bytes(dir[pos + 20..pos + 24].try_into().expect("4 bytes")) as usize;
            refs.add(report, table_offset, table_size * 8);
            if table_size <= 0x800_0000 && table_offset % cs == 0 {
                if let Ok(table) = self.read_table(table_offset, table_size, "bitmap table") {
                    for (i, e) in table.into_iter().enumerate() {
                        // An invalid entry, even of a bitmap in use, fails the whole check
                        // (QEMU: "Check failed: Invalid argument").
                        let at = table_offset + i as u64 * 8;
                        let entry = TableEntry::decode(e, cs, at).map_err(|err| {
                            Error::corrupt(&self.name, "bitmap table", at, err.reason().to_string())
                        })?;
                        if let TableEntry::Data(data) = entry {
                            refs.add(report, data, cs);
                        }
                    }
                }
            }
            pos += (24 + extra_size + name_size + 7) & !7;
        }
        Ok(())
    }

    fn check_refblocks(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &mut References<'_>,
        reftable: &[u64],
    ) {
        let cs = m.header.cluster_size();
        for (i, &entry) in reftable.iter().enumerate() {
            let offset = entry & REFTABLE_OFFSET_MASK;
            if entry & REFTABLE_RESERVED_MASK != 0 {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if offset % cs != 0 {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if offset / cs >= refs.nb_clusters {
                report.corruptions += 1;
                report
                    .messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if offset != 0 {
                refs.add(report, offset, cs);
                let count = refs.counts.get(&(offset / cs)).copied().unwrap_or(0);
                if count != 1 {
                    report.corruptions += 1;
                    report
                        .messages
                        .push(format!("ERROR refcount block {i} refcount={count}"));
                }
            }
        }
    }

    fn compare_refcounts(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &References<'_>,
        disk: &mut DiskRefcounts<'_>,
    ) {
        let h = &m.header;
        let per_block = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
        // Clusters with a non-zero refcount on disk or a computed reference: no need to walk the
        // empty stretches one by one.
        let mut candidates: Vec<u64> = refs.counts.keys().copied().collect();
        for i in 0..disk.reftable.len() {
            let entry = disk.reftable[i];
            let first = i as u64 * per_block;
            if entry & REFTABLE_OFFSET_MASK == 0 || first >= refs.nb_clusters {
                continue;
            }
            let last = (first + per_block).min(refs.nb_clusters);
            for k in first..last {
                if disk.get(k) != Some(0) {
                    candidates.push(k);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut highest = None;
        for k in candidates.into_iter().filter(|&k| k < refs.nb_clusters) {
            let Some(on_disk) = disk.get(k) else {
                report.check_errors += 1;
                report.messages.push(format!(
                    "Can't get refcount for cluster {k}: Input/output error"
                ));
                continue;
            };
            let computed = refs.counts.get(&k).copied().unwrap_or(0);
            if on_disk > 0 || computed > 0 {
                highest = Some(k);
            }
            if on_disk != computed {
                let kind = if on_disk < computed {
                    "ERROR"
                } else {
                    "Leaked"
                };
                report.messages.push(format!(
                    "{kind} cluster {k} refcount={on_disk} reference={computed}"
                ));
                if on_disk < computed {
                    report.corruptions += 1;
                } else {
                    report.leaks += 1;
                }
            }
        }
        report.image_end_offset = highest.map_or(0, |k| (k + 1) * m.header.cluster_size());
    }

    fn check_copied(
        &self,
        m: &Meta,
        report: &mut CheckReport,
        refs: &References<'_>,
        disk: &mut DiskRefcounts<'_>,
    ) -> Result<()> {
        let h = &m.header;
        let cs = m.header.cluster_size();
        let extended = h.extended_l2();
        let external = h.has_external_data_file();
        for (i, &entry) in m.l1.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Some(count) = disk.get(l2_offset / cs) else {
                continue;
            };
            let copied = entry & COPIED != 0;
            let message = |count| {
                format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={count}")
            };
            if (count == 1) != copied {
                report.corruptions += 1;
                report.messages.push(message(count));
            }
            let fixed = refs.counts.get(&(l2_offset / cs)).copied().unwrap_or(0);
            if (fixed == 1) != copied {
                report.copied_after_fix.push(message(fixed));
            }
            let mut table = vec![0u8; cs as usize];
            if self
                .storage
                .read_zero_filled_at(&mut table, l2_offset)
                .is_err()
            {
                report.check_errors += 1;
                report
                    .messages
                    .push("ERROR: Could not read L2 table".into());
                return Ok(());
            }
            for j in 0..1usize << h.l2_bits() {
                let (e, _, mapping) = l2_entry(&table, j, extended, external);
                let data_offset = match mapping {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => host_offset,
                    _ => continue,
                };
                let (count, fixed) = if external {
                    (1, 1)
                } else {
                    match disk.get(data_offset / cs) {
                        Some(c) => (
                            c,
                            refs.counts.get(&(data_offset / cs)).copied().unwrap_or(0),
                        ),
                        None => continue,
                    }
                };
                let copied = e & COPIED != 0;
                let message = |count| {
                    format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={count}")
                };
                if (count == 1) != copied {
                    report.corruptions += 1;
                    report.messages.push(message(count));
                }
                if (fixed == 1) != copied {
                    report.copied_after_fix.push(message(fixed));
                }
            }
        }
        Ok(())
    }
}

/// Whether an allocated L2 entry has guest data behind it: allocated subclusters, or (without
/// subclusters) no zero flag.
pub(crate) fn holds_data(entry: u64, bitmap: u64, extended: bool) -> bool {
    if extended {
        bitmap & 0xFFFF_FFFF != 0
    } else {
        entry & crate::format::table::ZERO == 0
    }
}
