//! Refcounts for the write engine: the refcount table in memory, a write-back cache of refblocks,
//! first-fit cluster allocation, new refblocks that describe themselves, and refcount table growth
//! (new blocks and table at the end of the image, published by one 12-byte header write at offset
//! 48). New structures are written and synced before the entry or header field that publishes
//! them, so a crash leaves at worst leaked clusters.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::image::cluster_map::{ClusterMap, ClusterSet};

use crate::error::{Error, Result, PREVENTED_ALLOCATION};
use crate::format::limits::MAX_REFTABLE_SIZE_BYTES;
use crate::format::refcount;
use crate::format::table::REFTABLE_OFFSET_MASK;
use crate::image::host::Host;

const SECTOR: usize = 512;

struct Block {
    bytes: Vec<u8>,
    /// The byte range changed since the block was last written, if any: a snapshot's second
    /// pass often changes a few entries of a block, and writing only their sectors keeps the
    /// sync that follows short.
    dirty: Option<(usize, usize)>,
}

impl Block {
    fn clean(bytes: Vec<u8>) -> Block {
        Block { bytes, dirty: None }
    }

    /// Records that entries `first..first + count` changed.
    fn touch(&mut self, first: usize, count: usize, order: u32) {
        let lo = (first << order) / 8;
        let hi = ((first + count) << order).div_ceil(8);
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }
}

/// The refcount structures of one image, as the write engine keeps them.
pub(crate) struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// log2 of refcount entries per refblock.
    block_bits: u32,
    reftable: Vec<u64>,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    blocks: ClusterMap<Block>,
    /// Every refblock's host offset (for the overlap guard).
    block_offsets: ClusterSet,
    /// No cluster below this index is free (first-fit starts here).
    free_index: u64,
    /// Where the next compressed cluster may start, inside the last cluster used for compressed
    /// data (several compressed clusters share host clusters, as in QEMU). Any cluster freed
    /// forgets it, so compressed data never lands in a cluster that changed hands.
    pub compressed_cursor: Option<u64>,
    /// Free clusters known to read as zeros in the file (zeroed ahead of their allocation), so
    /// a small write into one of them needs no zeroing of its own. Allocation consumes it from
    /// the front, first-fit; anything else that takes a cluster in it (or any new refcount
    /// structure) forgets it, so it never names a cluster that was written since.
    zeroed: Range<u64>,
    /// Whether the clusters the last [`alloc`](Self::alloc) returned came from `zeroed`.
    last_alloc_zeroed: bool,
    /// Metadata clusters counted free (refcount 0) when the image was opened, by cluster index,
    /// with what they hold: the allocator refuses to hand them out, so nothing new is ever
    /// written over them (QEMU's overlap checks refuse such an allocation only when it is
    /// written, and only for the metadata they check).
    guarded: BTreeMap<u64, String>,
}

/// What a reftable growth changed, for the header and the overlap guard.
pub(crate) struct ReftableMove {
    pub old_offset: u64,
    pub old_clusters: u32,
}

impl Refcounts {
    pub(crate) fn load(
        host: Host<'_>,
        cluster_bits: u32,
        order: u32,
        reftable_offset: u64,
        reftable_clusters: u32,
    ) -> Result<Refcounts> {
        let entries = ((reftable_clusters as u64) << cluster_bits) / 8;
        let mut bytes = vec![0u8; (entries * 8) as usize];
        host.read_zero_filled(&mut bytes, reftable_offset, "refcount table")?;
        let reftable: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let cluster_size = 1u64 << cluster_bits;
        let mut block_offsets = ClusterSet::default();
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            // An unaligned refblock offset does not stop the open (QEMU opens such images
            // read-write too): only a refcount lookup through it fails, and marks the image
            // corrupt (see `block`).
            if off % cluster_size != 0 && e & !REFTABLE_OFFSET_MASK == 0 {
                continue;
            }
            if e & !REFTABLE_OFFSET_MASK != 0 {
                return Err(Error::corrupt(
                    host.name,
                    format!("refcount table entry {i}"),
                    reftable_offset + i as u64 * 8,
                    format!("{e:#x} has reserved bits set or is not cluster aligned"),
                ));
            }
            if off != 0 {
                block_offsets.insert(off);
            }
        }
        Ok(Refcounts {
            order,
            cluster_bits,
            block_bits: cluster_bits + 3 - order,
            reftable,
            reftable_offset,
            reftable_clusters,
            blocks: ClusterMap::default(),
            block_offsets,
            free_index: 0,
            compressed_cursor: None,
            zeroed: 0..0,
            last_alloc_zeroed: false,
            guarded: BTreeMap::new(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Every refblock the refcount table names: `(table index, host offset)`.
    pub(crate) fn refblocks(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.reftable
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e & REFTABLE_OFFSET_MASK))
            .filter(|&(_, o)| o != 0)
    }

    /// Whether `offset` is a refblock.
    pub(crate) fn is_refblock(&self, offset: u64) -> bool {
        self.block_offsets
            .contains(&(offset & !(self.cluster_size() - 1)))
    }

    /// The largest refcount the width can hold.
    pub(crate) fn max(&self) -> u64 {
        refcount::max_refcount(self.order)
    }

    fn block(&mut self, host: Host<'_>, offset: u64) -> Result<&mut Block> {
        // One map search per call: this runs once per cluster of a snapshot operation.
        let cluster_size = self.cluster_size() as usize;
        match self.blocks.entry(offset) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                if offset % cluster_size as u64 != 0 {
                    let index = self
                        .reftable
                        .iter()
                        .position(|e| e & REFTABLE_OFFSET_MASK == offset)
                        .unwrap_or(0);
                    return Err(Error::corrupt(
                        host.name,
                        crate::error::UNALIGNED_REFBLOCK,
                        self.reftable_offset + index as u64 * 8,
                        format!(
                            "Refblock offset {offset:#x} unaligned (reftable index: {})",
                            qemu_hex(index as u64)
                        ),
                    ));
                }
                let mut bytes = vec![0u8; cluster_size];
                host.read_zero_filled(&mut bytes, offset, "refcount block")?;
                Ok(v.insert(Block::clean(bytes)))
            }
        }
    }

    fn block_offset_for(&self, cluster: u64) -> Option<u64> {
        let index = (cluster >> self.block_bits) as usize;
        self.reftable
            .get(index)
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// The refcount of cluster index `cluster`.
    pub(crate) fn get(&mut self, host: Host<'_>, cluster: u64) -> Result<u64> {
        let Some(offset) = self.block_offset_for(cluster) else {
            return Ok(0);
        };
        let within = (cluster & ((1 << self.block_bits) - 1)) as usize;
        let order = self.order;
        Ok(refcount::get(
            &self.block(host, offset)?.bytes,
            within,
            order,
        ))
    }

    /// Sets the refcount of a covered cluster (in the cache; written back later).
    fn set(&mut self, host: Host<'_>, cluster: u64, value: u64) -> Result<()> {
        let offset = self.block_offset_for(cluster).ok_or_else(|| {
            Error::corrupt(
                host.name,
                "refcount table",
                self.reftable_offset,
                format!("no refcount block covers cluster {cluster}"),
            )
        })?;
        let within = (cluster & ((1 << self.block_bits) - 1)) as usize;
        let order = self.order;
        let block = self.block(host, offset)?;
        refcount::set(&mut block.bytes, within, order, value);
        block.touch(within, 1, order);
        Ok(())
    }

    /// Sets a refcount directly (repair only).
    pub(crate) fn set_value(&mut self, host: Host<'_>, cluster: u64, value: u64) -> Result<()> {
        self.forget_zeroed(cluster, cluster + 1);
        self.set(host, cluster, value.min(self.max()))?;
        if value == 0 {
            self.free_index = self.free_index.min(cluster);
            self.compressed_cursor = None;
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every cluster `[offset, offset + len)` touches. Refuses an
    /// overflow or a drop below zero before changing anything.
    pub(crate) fn adjust(
        &mut self,
        host: Host<'_>,
        offset: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + (len - 1)) >> self.cluster_bits;
        self.adjust_clusters(host, first, last + 1, delta, |_| {})
    }

    /// The part of `[k, end)` that one refblock covers: the index of `k` within its block, and
    /// how many clusters from `k` on the block covers.
    fn chunk(&self, k: u64, end: u64) -> (usize, usize) {
        let per_block = 1u64 << self.block_bits;
        let within = k & (per_block - 1);
        (within as usize, (per_block - within).min(end - k) as usize)
    }

    /// Appends the refcounts of clusters `[start, end)` to `out`, one refblock at a time.
    pub(crate) fn get_clusters(
        &mut self,
        host: Host<'_>,
        start: u64,
        end: u64,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        let mut k = start;
        while k < end {
            let (within, n) = self.chunk(k, end);
            match self.block_offset_for(k) {
                None => out.extend(std::iter::repeat_n(0, n)),
                Some(offset) => {
                    let order = self.order;
                    let block = self.block(host, offset)?;
                    refcount::get_range(&block.bytes, within, n, order, out);
                }
            }
            k += n as u64;
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every cluster index in `[start, end)`, one refblock at a
    /// time, and calls `zeroed` with each cluster that ends at zero. Refuses an overflow or a
    /// drop below zero before changing anything.
    pub(crate) fn adjust_clusters(
        &mut self,
        host: Host<'_>,
        start: u64,
        end: u64,
        delta: i64,
        mut zeroed: impl FnMut(u64),
    ) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        if delta > 0 {
            self.forget_zeroed(start, end);
        }
        let order = self.order;
        let mut k = start;
        while k < end {
            let (within, n) = self.chunk(k, end);
            let Some(offset) = self.block_offset_for(k) else {
                return Err(if delta > 0 {
                    Error::corrupt(
                        host.name,
                        "refcount table",
                        self.reftable_offset,
                        format!("no refcount block covers cluster {k}"),
                    )
                } else {
                    self.out_of_range(host, k, 0, delta)
                });
            };
            let block = self.block(host, offset)?;
            if let Some((i, v)) = refcount::find_out_of_range(&block.bytes, within, n, order, delta)
            {
                return Err(self.out_of_range(host, k - within as u64 + i as u64, v, delta));
            }
            k += n as u64;
        }
        let mut k = start;
        while k < end {
            let (within, n) = self.chunk(k, end);
            let offset = self.block_offset_for(k).expect("checked above");
            let block_start = k - within as u64;
            let block = self.block(host, offset)?;
            let mut first_zero = None;
            refcount::add_range(&mut block.bytes, within, n, order, delta, |i| {
                let c = block_start + i as u64;
                first_zero.get_or_insert(c);
                zeroed(c);
            });
            block.touch(within, n, order);
            if let Some(z) = first_zero {
                self.free_index = self.free_index.min(z);
                self.compressed_cursor = None;
            }
            k += n as u64;
        }
        Ok(())
    }

    fn out_of_range(&self, host: Host<'_>, cluster: u64, value: u64, delta: i64) -> Error {
        Error::corrupt(
            host.name,
            "refcount",
            cluster << self.cluster_bits,
            format!("refcount {value} of cluster {cluster} cannot change by {delta}"),
        )
    }

    /// Marks the metadata cluster `index`, counted free, as never to be allocated.
    pub(crate) fn guard_counted_free(&mut self, index: u64, what: &str) {
        self.guarded.insert(index, what.to_owned());
    }

    /// Refuses an allocation of `purpose` (QEMU's name for it: "L2 table") that would take one
    /// of the guarded clusters in `[start, start + n)`.
    fn refuse_guarded(&self, host: Host<'_>, start: u64, n: u64, purpose: &str) -> Result<()> {
        match self.guarded.range(start..start.saturating_add(n)).next() {
            Some((&index, what)) => {
                let offset = index << self.cluster_bits;
                Err(Error::corrupt(
                    host.name,
                    format!("{PREVENTED_ALLOCATION} over {what}"),
                    offset,
                    format!("Preventing invalid allocation of {purpose} at offset {offset}"),
                ))
            }
            None => Ok(()),
        }
    }

    /// Allocates `n` contiguous free clusters at or after `end_hint`'s first fit, sets their
    /// refcounts to 1 and returns the host offset of the first. `image_end` is the first cluster
    /// index past the file; clusters there and beyond are free. New refblocks are created (and
    /// made durable) as needed; a full refcount table grows first. `purpose` names what the
    /// clusters are for, in a refusal.
    pub(crate) fn alloc(
        &mut self,
        host: Host<'_>,
        n: u64,
        image_end: &mut u64,
        purpose: &str,
    ) -> Result<(u64, Option<ReftableMove>)> {
        let mut moved = None;
        loop {
            let start = self.find_free_run(host, n, *image_end)?;
            self.refuse_guarded(host, start, n, purpose)?;
            let first = start >> self.block_bits;
            let last = (start + n - 1) >> self.block_bits;
            if last as usize >= self.reftable.len() {
                let m = self.grow_reftable(host, last, image_end)?;
                moved.get_or_insert(m);
                continue;
            }
            let missing: Vec<u64> = (first..=last)
                .filter(|&i| self.reftable[i as usize] & REFTABLE_OFFSET_MASK == 0)
                .collect();
            if missing.len() == 1 && first == last {
                // One uncovered range: its block takes the range's first free cluster and counts
                // itself; the run is searched again around it.
                self.create_refblock(host, missing[0], image_end)?;
                continue;
            }
            if !missing.is_empty() {
                // A run across uncovered ranges stays contiguous: its blocks go after it.
                if !self.create_refblocks_after(host, &missing, start + n, image_end)? {
                    continue;
                }
            }
            self.last_alloc_zeroed = self.zeroed.start == start && start + n <= self.zeroed.end;
            if self.last_alloc_zeroed {
                self.zeroed.start = start + n;
            } else {
                self.forget_zeroed(start, start + n);
            }
            for k in start..start + n {
                self.set(host, k, 1)?;
            }
            *image_end = (*image_end).max(start + n);
            self.free_index = start + n;
            return Ok((start << self.cluster_bits, moved));
        }
    }

    /// Forgets the zeroed clusters if any of `[start, end)` is among them.
    fn forget_zeroed(&mut self, start: u64, end: u64) {
        if start < self.zeroed.end && self.zeroed.start < end {
            self.zeroed = 0..0;
        }
    }

    /// Whether the clusters the last [`alloc`](Self::alloc) returned read as zeros already.
    pub(crate) fn last_alloc_zeroed(&self) -> bool {
        self.last_alloc_zeroed
    }

    /// Records that free clusters `clusters` now read as zeros (replacing any earlier record).
    pub(crate) fn note_zeroed(&mut self, clusters: Range<u64>) {
        self.zeroed = clusters;
    }

    /// How many clusters from `start` on are free, counting at most `max`.
    pub(crate) fn free_run(&mut self, host: Host<'_>, start: u64, max: u64) -> Result<u64> {
        let mut counts = Vec::with_capacity(max as usize);
        self.get_clusters(host, start, start + max, &mut counts)?;
        Ok(counts.iter().take_while(|&&c| c == 0).count() as u64)
    }

    /// Creates the refblocks for reftable entries `needed` in clusters from `after` on (past the
    /// file), together with any block those clusters need themselves, all counting each other.
    /// They are written and synced before the reftable entries that publish them. Returns false
    /// when the refcount table must grow first.
    fn create_refblocks_after(
        &mut self,
        host: Host<'_>,
        needed: &[u64],
        after: u64,
        image_end: &mut u64,
    ) -> Result<bool> {
        // New refcount structures land in free clusters.
        self.zeroed = 0..0;
        let per_block = 1u64 << self.block_bits;
        let base = after.max(*image_end);
        let missing = |rc: &Refcounts, i: u64| {
            i as usize >= rc.reftable.len() || rc.reftable[i as usize] & REFTABLE_OFFSET_MASK == 0
        };
        // The blocks' own clusters may need blocks too; the count only grows, so it settles.
        let mut indices: Vec<u64> = needed.to_vec();
        loop {
            let end = base + indices.len() as u64;
            let mut more: Vec<u64> = (base / per_block..=(end - 1) / per_block)
                .filter(|&i| missing(self, i) && !indices.contains(&i))
                .collect();
            if more.is_empty() {
                break;
            }
            indices.append(&mut more);
        }
        indices.sort_unstable();
        if indices
            .last()
            .is_some_and(|&i| i as usize >= self.reftable.len())
        {
            let top = *indices.last().expect("not empty");
            self.grow_reftable(host, top, image_end)?;
            return Ok(false);
        }
        let mut blocks: BTreeMap<u64, Vec<u8>> = indices
            .iter()
            .map(|&i| (i, vec![0u8; self.cluster_size() as usize]))
            .collect();
        let locations: Vec<(u64, u64)> = indices
            .iter()
            .enumerate()
            .map(|(j, &i)| (i, base + j as u64))
            .collect();
        for &(_, cluster) in &locations {
            let i = cluster / per_block;
            let within = (cluster % per_block) as usize;
            match blocks.get_mut(&i) {
                Some(bytes) => refcount::set(bytes, within, self.order, 1),
                None => self.set(host, cluster, 1)?,
            }
        }
        // Existing blocks that count the new ones are durable first, then the new blocks, then
        // the reftable entries that publish them.
        self.write_dirty(host)?;
        for &(i, cluster) in &locations {
            host.write(
                &blocks[&i],
                cluster << self.cluster_bits,
                "new refcount block",
            )?;
        }
        host.sync()?;
        for &(i, cluster) in &locations {
            let offset = cluster << self.cluster_bits;
            host.write(
                &offset.to_be_bytes(),
                self.reftable_offset + i * 8,
                "refcount table entry",
            )?;
        }
        host.sync()?;
        for (i, cluster) in locations {
            let offset = cluster << self.cluster_bits;
            self.reftable[i as usize] = offset;
            self.block_offsets.insert(offset);
            let bytes = blocks.remove(&i).expect("built above");
            self.blocks.insert(offset, Block::clean(bytes));
        }
        *image_end = (*image_end).max(base + indices.len() as u64);
        Ok(true)
    }

    /// The first run of `n` free clusters at or after the free index.
    fn find_free_run(&mut self, host: Host<'_>, n: u64, image_end: u64) -> Result<u64> {
        // `start` is where the candidate run begins, `k` the next cluster to look at; the scan
        // reads each refblock once, not one map lookup per cluster.
        let mut start = self.free_index;
        let mut k = start;
        let order = self.order;
        while k < start + n && k < image_end {
            let (within, count) = self.chunk(k, image_end);
            let block_start = k - within as u64;
            let block_end = k + count as u64;
            let Some(offset) = self.block_offset_for(k) else {
                // No block covers the range: every cluster in it is free.
                k = block_end;
                continue;
            };
            let block = self.block(host, offset)?;
            while k < block_end && k < start + n {
                let i = (k - block_start) as usize;
                if k == start {
                    // The run's first cluster: skip used entries in one sweep.
                    let left = (block_end - k) as usize;
                    match refcount::first_zero(&block.bytes, i, left, order) {
                        Some(z) => {
                            start = block_start + z as u64;
                            k = start + 1;
                        }
                        None => {
                            start = block_end;
                            k = block_end;
                        }
                    }
                    continue;
                }
                if refcount::get(&block.bytes, i, order) != 0 {
                    start = k + 1;
                }
                k += 1;
            }
        }
        Ok(start)
    }

    /// Creates the refblock for reftable entry `index`: it goes into the first free cluster of the
    /// range it covers and counts itself, so it needs no other block. It is written and synced
    /// before the reftable entry that publishes it.
    fn create_refblock(&mut self, host: Host<'_>, index: u64, image_end: &mut u64) -> Result<()> {
        // New refcount structures land in free clusters.
        self.zeroed = 0..0;
        if index == 0 {
            return Err(Error::corrupt(
                host.name,
                "refcount table entry 0",
                self.reftable_offset,
                "is empty, so the header cluster has no refcount",
            ));
        }
        // No block covers this range, so every cluster in it is free: the block takes the first.
        let first = index << self.block_bits;
        self.refuse_guarded(host, first, 1, "refcount block")?;
        let location = first;
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        refcount::set(&mut bytes, (location - first) as usize, self.order, 1);
        let offset = location << self.cluster_bits;
        host.write_sync(&bytes, offset, "new refcount block")?;
        let entry_at = self.reftable_offset + index * 8;
        host.write_sync(&offset.to_be_bytes(), entry_at, "refcount table entry")?;
        self.reftable[index as usize] = offset;
        self.block_offsets.insert(offset);
        self.blocks.insert(offset, Block::clean(bytes));
        *image_end = (*image_end).max(location + 1);
        Ok(())
    }

    /// Grows the refcount table so entry `needed` exists. The new table and the refblocks that
    /// cover it go to the end of the image, describe themselves, and are published by the
    /// 12-byte header write at offset 48; the old table is freed afterwards.
    fn grow_reftable(
        &mut self,
        host: Host<'_>,
        needed: u64,
        image_end: &mut u64,
    ) -> Result<ReftableMove> {
        // New refcount structures land in free clusters.
        self.zeroed = 0..0;
        let cs = self.cluster_size();
        let per_block = 1u64 << self.block_bits;
        // Everything new goes past both the file and the clusters the old table can describe.
        let base = (*image_end).max(self.reftable.len() as u64 * per_block);
        let mut table_clusters =
            ((self.reftable.len() as u64 * 3 / 2).max(needed + 1) * 8).div_ceil(cs);
        loop {
            let entries = table_clusters * cs / 8;
            if table_clusters * cs > MAX_REFTABLE_SIZE_BYTES {
                return Err(Error::InvalidArgument {
                    image: host.name.to_string(),
                    reason: "the refcount table would exceed its 8 MiB limit".into(),
                });
            }
            // Blocks for the new area: enough to cover the table and themselves. The count only
            // grows with the area, so this settles on the exact number.
            let mut blocks = 0u64;
            loop {
                let area_end = base + table_clusters + blocks;
                let missing = (base / per_block..=(area_end - 1) / per_block)
                    .filter(|&i| {
                        (i as usize) >= self.reftable.len()
                            || self.reftable[i as usize] & REFTABLE_OFFSET_MASK == 0
                    })
                    .count() as u64;
                if missing == blocks {
                    break;
                }
                blocks = missing;
            }
            let area_end = base + table_clusters + blocks;
            let last_index = (area_end - 1) / per_block;
            if last_index >= entries || needed >= entries {
                table_clusters += 1;
                continue;
            }

            // Build the new table and the new blocks in memory.
            let mut table = self.reftable.clone();
            table.resize(entries as usize, 0);
            let mut new_blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut next_block = base + table_clusters;
            for i in base / per_block..=last_index {
                if table[i as usize] & REFTABLE_OFFSET_MASK == 0 {
                    table[i as usize] = next_block << self.cluster_bits;
                    new_blocks.insert(i, vec![0u8; cs as usize]);
                    next_block += 1;
                }
            }
            // Count the table and the new blocks in whichever block covers them.
            for k in base..area_end {
                let i = k / per_block;
                let within = (k % per_block) as usize;
                match new_blocks.get_mut(&i) {
                    Some(bytes) => refcount::set(bytes, within, self.order, 1),
                    None => {
                        // An existing block covers it: the new area starts inside its range.
                        self.set(host, k, 1)?;
                    }
                }
            }
            // Existing blocks that changed must be durable before the table that uses them.
            self.write_dirty(host)?;
            for (i, bytes) in &new_blocks {
                host.write(bytes, table[*i as usize], "new refcount block")?;
            }
            let mut table_bytes = Vec::with_capacity((entries * 8) as usize);
            for e in &table {
                table_bytes.extend_from_slice(&e.to_be_bytes());
            }
            let new_offset = base << self.cluster_bits;
            host.write(&table_bytes, new_offset, "new refcount table")?;
            host.sync()?;
            let mut switch = [0u8; 12];
            switch[..8].copy_from_slice(&new_offset.to_be_bytes());
            switch[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
            host.write_sync(&switch, 48, "header refcount table fields")?;

            let old = ReftableMove {
                old_offset: self.reftable_offset,
                old_clusters: self.reftable_clusters,
            };
            for (i, bytes) in new_blocks {
                let off = table[i as usize];
                self.block_offsets.insert(off);
                self.blocks.insert(off, Block::clean(bytes));
            }
            self.reftable = table;
            self.reftable_offset = new_offset;
            self.reftable_clusters = table_clusters as u32;
            *image_end = (*image_end).max(area_end);
            // The old table is unreferenced now that the header switch is durable.
            self.adjust(host, old.old_offset, old.old_clusters as u64 * cs, -1)?;
            return Ok(old);
        }
    }

    /// Builds new refcount structures at cluster `start` (the end of the image: only free space
    /// lies beyond) as QEMU's preallocating resize does: the refcount blocks missing for
    /// everything up to `start + additional` clusters plus the structures themselves go first,
    /// the new refcount table (exactly as large as needed) after them. Existing blocks are kept.
    /// The new blocks and table are synced before the 12-byte header switch at offset 48; the
    /// old table is freed after it. Returns the first cluster past the new structures (where
    /// the `additional` clusters may go) and the old table's place.
    pub(crate) fn refcount_area(
        &mut self,
        host: Host<'_>,
        start: u64,
        additional: u64,
        image_end: &mut u64,
    ) -> Result<(u64, ReftableMove)> {
        // New refcount structures land in free clusters.
        self.zeroed = 0..0;
        let cs = self.cluster_size();
        let per_block = 1u64 << self.block_bits;
        let per_table_cluster = cs / 8;
        // Blocks and table clusters covering `start + additional` clusters and themselves.
        let covered = start + additional;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let b = (covered + blocks + table).div_ceil(per_block);
            let t = b.div_ceil(per_table_cluster);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        let entries = table * per_table_cluster;
        if table * cs > MAX_REFTABLE_SIZE_BYTES {
            return Err(Error::InvalidArgument {
                image: host.name.to_string(),
                reason: "the refcount table would exceed its 8 MiB limit".into(),
            });
        }
        let mut new_table = self.reftable.clone();
        new_table.resize(entries as usize, 0);
        let area_index = start / per_block;
        let missing: Vec<u64> = (area_index..blocks)
            .filter(|&i| new_table[i as usize] & REFTABLE_OFFSET_MASK == 0)
            .collect();
        let table_start = start + missing.len() as u64;
        let end = table_start + table;
        let mut new_blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (j, &i) in missing.iter().enumerate() {
            new_table[i as usize] = (start + j as u64) << self.cluster_bits;
            new_blocks.insert(i, vec![0u8; cs as usize]);
        }
        for k in start..end {
            let i = k / per_block;
            let within = (k % per_block) as usize;
            match new_blocks.get_mut(&i) {
                Some(bytes) => refcount::set(bytes, within, self.order, 1),
                None => self.set(host, k, 1)?,
            }
        }
        // Existing blocks that changed, the new blocks and the table are durable before the
        // header points at the table.
        self.write_dirty(host)?;
        for (i, bytes) in &new_blocks {
            host.write(bytes, new_table[*i as usize], "new refcount block")?;
        }
        let mut table_bytes = Vec::with_capacity((entries * 8) as usize);
        for e in &new_table {
            table_bytes.extend_from_slice(&e.to_be_bytes());
        }
        let table_offset = table_start << self.cluster_bits;
        host.write(&table_bytes, table_offset, "new refcount table")?;
        host.sync()?;
        let mut switch = [0u8; 12];
        switch[..8].copy_from_slice(&table_offset.to_be_bytes());
        switch[8..].copy_from_slice(&(table as u32).to_be_bytes());
        host.write_sync(&switch, 48, "header refcount table fields")?;
        let old = ReftableMove {
            old_offset: self.reftable_offset,
            old_clusters: self.reftable_clusters,
        };
        for (i, bytes) in new_blocks {
            let off = new_table[i as usize];
            self.block_offsets.insert(off);
            self.blocks.insert(off, Block::clean(bytes));
        }
        self.reftable = new_table;
        self.reftable_offset = table_offset;
        self.reftable_clusters = table as u32;
        *image_end = (*image_end).max(end);
        self.adjust(host, old.old_offset, old.old_clusters as u64 * cs, -1)?;
        Ok((end, old))
    }

    /// Whether any refblock holds changes not yet on disk.
    pub(crate) fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.dirty.is_some())
    }

    /// Writes every changed refblock (no sync; the caller orders and syncs).
    pub(crate) fn write_dirty(&mut self, host: Host<'_>) -> Result<()> {
        // In offset order, so the writes sweep the file once.
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty.is_some())
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for offset in dirty {
            let block = self.blocks.get_mut(&offset).expect("listed above");
            let (lo, hi) = block.dirty.expect("listed as dirty");
            // Whole sectors around the change (the rest of the block is unchanged on disk).
            let lo = lo & !(SECTOR - 1);
            let hi = hi.next_multiple_of(SECTOR).min(block.bytes.len());
            host.storage.event(crate::storage::Event::RefblockUpdate);
            host.write(&block.bytes[lo..hi], offset + lo as u64, "refcount block")?;
            // Still dirty if the write failed: a retry or a repair writes it again.
            block.dirty = None;
        }
        Ok(())
    }

    /// Drops clean cached blocks when the cache grows large.
    pub(crate) fn trim(&mut self, max_blocks: usize) {
        if self.blocks.len() > max_blocks {
            self.blocks.retain(|_, b| b.dirty.is_some());
        }
    }

    /// Forgets every cached block (after an external rewrite, e.g. a repair).
    #[allow(dead_code)]
    pub(crate) fn clear_cache(&mut self) {
        self.blocks.clear();
    }
}

/// A number as QEMU's `%#x` prints it: `0` without a prefix, others with `0x`.
pub(crate) fn qemu_hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}
