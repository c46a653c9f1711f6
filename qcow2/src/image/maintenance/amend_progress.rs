//! `amend`'s progress in QEMU's figures, so `qemu-img amend -p` output compares line for line.
//!
//! Each operation (upgrade, refcount width change, downgrade) reports its own offset and work
//! size; the work of the operations not started yet is projected from those seen so far (QEMU's
//! `qcow2_amend_helper_cb`). A refcount width change reports the walks over the refcount table
//! that QEMU's allocator would need, so a projection that grows shows as progress going back.

use std::collections::BTreeSet;

/// One step of an amend, in the order QEMU runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Upgrade,
    RefcountWidth,
    Downgrade,
}

/// Turns each operation's (offset, work size) into (done, total) for the whole amend.
pub(crate) struct AmendProgress<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    total_operations: u64,
    completed: u64,
    offset_completed: u64,
    last: Option<Operation>,
    last_work: u64,
}

impl<'a> AmendProgress<'a> {
    pub(crate) fn new(total_operations: u64, report: &'a mut dyn FnMut(u64, u64)) -> Self {
        AmendProgress {
            report,
            total_operations,
            completed: 0,
            offset_completed: 0,
            last: None,
            last_work: 0,
        }
    }

    /// `operation` has done `offset` of `work`.
    pub(crate) fn status(&mut self, operation: Operation, offset: u64, work: u64) {
        if self.last != Some(operation) {
            if self.last.is_some() {
                self.offset_completed += self.last_work;
                self.completed += 1;
            }
            self.last = Some(operation);
        }
        if self.completed >= self.total_operations {
            return;
        }
        self.last_work = work;
        let current = self.offset_completed + work;
        let projected =
            current * (self.total_operations - self.completed - 1) / (self.completed + 1);
        (self.report)(self.offset_completed + offset, current + projected);
    }
}

/// The shape of a refcount width change, as QEMU's walks see it.
pub(crate) struct WidthChange {
    /// Entries of the old refcount table (each walk visits them all).
    pub reftable_entries: u64,
    /// Clusters one old refcount block covers.
    pub old_per_block: u64,
    /// Clusters one new refcount block covers.
    pub new_per_block: u64,
    /// Reftable entries per cluster.
    pub entries_per_cluster: u64,
}

impl WidthChange {
    /// How many allocating walks QEMU makes before the new structures' own clusters are all
    /// covered: each walk allocates a block for every new block range holding a cluster in use,
    /// then the table; a walk that allocated anything is followed by another. QEMU's allocator
    /// takes the first free clusters; `in_use` are the clusters with a refcount.
    pub(crate) fn allocating_walks(&self, in_use: impl IntoIterator<Item = u64>) -> u64 {
        let covered = self.reftable_entries * self.old_per_block;
        let mut used: BTreeSet<u64> = in_use.into_iter().collect();
        let mut allocated: BTreeSet<u64> = BTreeSet::new();
        let mut table: Option<(u64, u64)> = None;
        // No cluster below `free_from` is free (QEMU's free cluster index), so each search
        // starts there instead of at cluster 0.
        let mut free_from = 0;
        let mut walks = 0;
        loop {
            walks += 1;
            let mut new_allocation = false;
            let mut max_index = None;
            let mut from = 0;
            while let Some(k) = used.range(from..covered).next().copied() {
                let block = k / self.new_per_block;
                max_index = Some(block);
                if allocated.insert(block) {
                    let k = first_free(&used, 1, free_from);
                    used.insert(k);
                    free_from = k + 1;
                    new_allocation = true;
                }
                from = (block + 1) * self.new_per_block;
            }
            if !new_allocation {
                return walks;
            }
            if let Some((start, n)) = table.take() {
                for k in start..start + n {
                    used.remove(&k);
                }
                free_from = free_from.min(start);
            }
            let entries = max_index.map_or(0, |i| i + 1);
            let clusters = entries.div_ceil(self.entries_per_cluster).max(1);
            let start = first_free(&used, clusters, free_from);
            used.extend(start..start + clusters);
            table = Some((start, clusters));
            // A runaway (corrupt) layout must not loop for ever; QEMU would fail its allocation.
            if walks > 64 {
                return walks;
            }
        }
    }

    /// Reports walk `index` of `total` (QEMU reports each refcount table entry it visits).
    pub(crate) fn walk(&self, index: u64, total: u64, progress: &mut AmendProgress<'_>) {
        let r = self.reftable_entries;
        for i in 0..r {
            progress.status(Operation::RefcountWidth, index * r + i, total * r);
        }
        progress.status(Operation::RefcountWidth, (index + 1) * r, total * r);
    }
}

/// The first run of `n` clusters at or after `from` none of which is in `used`.
fn first_free(used: &BTreeSet<u64>, n: u64, from: u64) -> u64 {
    let mut start = from;
    loop {
        match used.range(start..start + n).next_back() {
            Some(&k) => start = k + 1,
            None => return start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_operations_are_projected_from_earlier_ones() {
        let mut seen = Vec::new();
        let mut report = |d, t| seen.push((d, t));
        let mut p = AmendProgress::new(2, &mut report);
        p.status(Operation::Upgrade, 0, 2);
        p.status(Operation::Upgrade, 2, 2);
        p.status(Operation::Downgrade, 1, 4);
        assert_eq!(seen, [(0, 4), (2, 4), (3, 6)]);
    }

    #[test]
    fn a_full_first_block_needs_a_fourth_walk() {
        // iotest 112: 512-byte clusters, 1-bit to 64-bit refcounts, 63 clusters in use. The
        // new first block covers 64 clusters and takes the last free one itself; the table
        // then lands past it, in a range no block covers yet.
        let change = WidthChange {
            reftable_entries: 64,
            old_per_block: 4096,
            new_per_block: 64,
            entries_per_cluster: 64,
        };
        assert_eq!(change.allocating_walks(0..63), 3);
        // With room to spare, QEMU's usual two allocating walks.
        assert_eq!(change.allocating_walks(0..10), 2);
    }

    #[test]
    fn a_large_image_is_walked_without_rescanning_it() {
        // 64 KiB clusters, 16-bit to 64-bit refcounts, 100,000 clusters in use: thirteen new
        // blocks and the table fit where the last block's range has room.
        let change = WidthChange {
            reftable_entries: 8192,
            old_per_block: 32768,
            new_per_block: 8192,
            entries_per_cluster: 8192,
        };
        assert_eq!(change.allocating_walks(0..100_000), 2);
    }

    #[test]
    fn first_free_skips_used_runs() {
        let used: BTreeSet<u64> = [0, 1, 2, 4, 7].into_iter().collect();
        assert_eq!(first_free(&used, 1, 0), 3);
        assert_eq!(first_free(&used, 2, 0), 5);
        assert_eq!(first_free(&used, 3, 0), 8);
        assert_eq!(first_free(&used, 1, 5), 5);
    }
}
