//! What the `ops` model knows: snapshots, the bitmap, durable checkpoints.

use super::*;

/// A snapshot as the model knows it.
#[derive(Debug, Clone)]
pub(crate) struct ModelSnapshot {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The disk when the snapshot was taken (its length is the snapshot's size).
    pub(crate) bytes: Rc<Vec<u8>>,
}

/// The id the engine gives a new snapshot: the largest numeric id plus one (as QEMU does).
pub(crate) fn next_snapshot_id(snapshots: &[ModelSnapshot]) -> String {
    let max = snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// The snapshot an id or name finds: by id first, then the first with that name.
pub(crate) fn find_model_snapshot<'a>(
    snapshots: &'a [ModelSnapshot],
    key: &str,
) -> Option<&'a ModelSnapshot> {
    snapshots
        .iter()
        .find(|s| s.id == key)
        .or_else(|| snapshots.iter().find(|s| s.name == key))
}

/// A state known to be durable: what a crash at or after `at` must still show (outside ranges
/// that later requests may have changed).
pub(crate) struct Checkpoint {
    /// Recorded operations of the current store when the state became durable.
    pub(crate) at: usize,
    pub(crate) disk: Rc<Vec<u8>>,
    pub(crate) snapshots: Vec<ModelSnapshot>,
    pub(crate) bitmap: Option<ModelBitmap>,
}

/// What bitmap [`OPS_BITMAP`] must mark: every granule a successful guest request touched since
/// it was added or cleared (exactly, while the image is open; at least, after a power cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelBitmap {
    pub(crate) granularity: u64,
    pub(crate) enabled: bool,
    /// One per granule of the disk.
    pub(crate) dirty: Vec<bool>,
    /// Bumped by every add, remove and clear: a crash check compares bits only within one
    /// generation, because those steps may lose bits legitimately.
    pub(crate) generation: u32,
}

impl ModelBitmap {
    pub(crate) fn mark(&mut self, start: u64, end: u64) {
        if !self.enabled || start >= end {
            return;
        }
        let g = self.granularity;
        let last = (end.div_ceil(g) as usize).min(self.dirty.len());
        for d in &mut self.dirty[(start / g) as usize..last] {
            *d = true;
        }
    }

    pub(crate) fn resize(&mut self, size: u64) {
        self.dirty
            .resize(size.div_ceil(self.granularity) as usize, false);
    }

    /// The marked ranges as `Image::dirty_extents` reports them: merged, clipped to the disk.
    pub(crate) fn extents(&self, size: u64) -> Vec<(u64, u64)> {
        let g = self.granularity;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, _) in self.dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = i as u64 * g;
            let stop = (start + g).min(size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += stop - start,
                _ => out.push((start, stop - start)),
            }
        }
        out
    }
}
