//! Whether an image looks metadata-preallocated: far more clusters in use than the host file
//! system holds blocks for. QEMU guesses so (the same way) before it asks the file system which
//! data clusters are holes, so `map` reports such clusters as data that reads zeros, as
//! `qemu-img map` does. The guess is made once per open, on a read-only image (what the
//! refcount blocks on disk say is then what the image holds).

use crate::format::refcount;
use crate::format::table::REFTABLE_OFFSET_MASK;
use crate::image::{Image, Meta};
use crate::storage::StorageExt;

impl Image {
    /// Whether the image's data clusters may be holes of the host file (see the module).
    pub(crate) fn metadata_preallocated(&self, m: &Meta) -> bool {
        if self.writable {
            return false;
        }
        *self
            .preallocation_guess
            .get_or_init(|| self.guess_preallocated(m).unwrap_or(false))
    }

    /// QEMU's rule: with `real` clusters' worth of blocks in the file, at least
    /// `max(real * 10 / 9, real + 2)` clusters with a refcount means preallocated metadata.
    fn guess_preallocated(&self, m: &Meta) -> Option<bool> {
        let allocated = self.storage.allocated_size().ok()??;
        let file_len = self.storage.len().ok()?;
        let h = &m.header;
        let cs = h.cluster_size();
        let real = allocated / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end_cluster = file_len.div_ceil(cs);
        let per_block_bits = h.cluster_bits + 3 - h.refcount_order;
        let mut table = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        self.storage
            .read_zero_filled_at(&mut table, h.refcount_table_offset)
            .ok()?;
        let mut in_use = 0u64;
        let mut block = vec![0u8; cs as usize];
        for (index, entry) in table.chunks_exact(8).enumerate() {
            let first = (index as u64) << per_block_bits;
            if first >= end_cluster || in_use >= threshold {
                break;
            }
            let offset = u64::from_be_bytes(entry.try_into().ok()?) & REFTABLE_OFFSET_MASK;
            if offset == 0 || offset % cs != 0 {
                continue;
            }
            self.storage.read_zero_filled_at(&mut block, offset).ok()?;
            let n = (end_cluster - first).min(1 << per_block_bits) as usize;
            in_use += (0..n)
                .filter(|&i| refcount::get(&block, i, h.refcount_order) != 0)
                .count() as u64;
        }
        Some(in_use >= threshold)
    }
}
