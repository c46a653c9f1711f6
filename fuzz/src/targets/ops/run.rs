//! Running `ops` steps against the engine and its model, power cuts included.

use super::*;

/// Arbitrary bytes → a bounded image configuration and up to 64 steps (writes, zero writes,
/// discards, compressed writes, resizes, flushes, snapshot create / apply / delete, reopens and
/// simulated power cuts), each checked against a plain model: the disk as a byte vector, plus one
/// per snapshot.
///
/// Properties: creating the configured image works; every step either succeeds and the image then
/// reads exactly as the model, or is refused with the error the model expects (out of bounds,
/// misaligned compressed write, unknown snapshot, refcount overflow with narrow refcounts, shrink
/// over data without permission) and the image still reads as before; `check()` is clean every
/// [`OPS_CHECK_EVERY`] steps, after snapshot operations, after reopens and at the end; every
/// snapshot view reads as its model; a reopened image is not dirty. A crash image (any cut since
/// the oldest kept checkpoint; unflushed writes lost, kept or torn) opens, shows nothing that
/// fixing leaks does not cure (a dirty one is repaired by a read-write open), fixing leaks leaves
/// it clean, its snapshots are
/// those before or after the interrupted step, each reading as its model, and every byte no
/// request touched since the last durable point reads as it did then.
pub fn ops(data: &[u8]) {
    ops_input(&OpsInput::from_bytes(data));
}

/// `ops` on an already decoded input.
pub fn ops_input(input: &OpsInput) {
    let mut run = OpsRun::new(&input.config);
    for (i, step) in input.steps.iter().enumerate() {
        run.step = i;
        run.run(*step);
        run.compare_disk(&format!("after step {i} {step:?}"));
        if i % OPS_CHECK_EVERY == OPS_CHECK_EVERY - 1 {
            run.check_clean(&format!("after step {i}"));
            run.compare_snapshots(&format!("after step {i}"));
        }
    }
    run.finish();
}

/// The running workload: the image, its store and the model.
pub(crate) struct OpsRun {
    pub(crate) config: OpsConfig,
    pub(crate) cluster_size: u64,
    pub(crate) store: Arc<RecordingStorage>,
    /// `None` only in the middle of a reopen.
    pub(crate) image: Option<Image>,
    pub(crate) disk: Vec<u8>,
    pub(crate) snapshots: Vec<ModelSnapshot>,
    pub(crate) bitmap: Option<ModelBitmap>,
    /// Generations of bitmap [`OPS_BITMAP`] so far.
    pub(crate) bitmap_generations: u32,
    /// Durable states of the current store, oldest first (at most [`OPS_MAX_CHECKPOINTS`]).
    pub(crate) checkpoints: Vec<Checkpoint>,
    /// Guest requests since the oldest checkpoint: (recorded operations when it started, start,
    /// end). A crash cut after it may show any content in that range.
    pub(crate) requests: Vec<(usize, u64, u64)>,
    pub(crate) step: usize,
}

impl OpsRun {
    pub(crate) fn new(config: &OpsConfig) -> Self {
        let cluster_size = 1u64 << config.cluster_bits.get();
        let options = CreateOptions::new(config.size)
            .cluster_size(cluster_size)
            .refcount_bits(config.refcount_bits)
            .version(config.version)
            .lazy_refcounts(config.lazy_refcounts)
            .extended_l2(config.extended_l2)
            .compression_type(if config.zstd {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            })
            .backing_file(config.backing.as_ref().map(|_| OPS_BACKING_NAME.into()))
            .backing_format(config.backing.as_ref().map(|_| "raw".into()));
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let mut image = Image::create_in(Box::new(store.clone()), "fuzz", &options)
            .unwrap_or_else(|e| panic!("create {options:?}: {e}"));
        let mut disk = vec![0u8; config.size as usize];
        if let Some(base) = &config.backing {
            attach_backing(&mut image, base);
            let n = base.len().min(disk.len());
            disk[..n].copy_from_slice(&base[..n]);
        }
        let mut run = OpsRun {
            config: config.clone(),
            cluster_size,
            store,
            image: Some(image),
            disk,
            snapshots: Vec::new(),
            bitmap: None,
            bitmap_generations: 0,
            checkpoints: Vec::new(),
            requests: Vec::new(),
            step: 0,
        };
        if let Some(granularity) = config.bitmap {
            run.add_bitmap(granularity, "at create");
        }
        run.checkpoint();
        run.compare_disk("after create");
        run.check_clean("after create");
        run
    }

    pub(crate) fn image(&self) -> &Image {
        self.image.as_ref().expect("an image is open between steps")
    }

    pub(crate) fn size(&self) -> u64 {
        self.disk.len() as u64
    }

    /// The backing file's bytes for a guest range (zeros past its end, or without one).
    pub(crate) fn backing_bytes(&self, start: u64, end: u64) -> Vec<u8> {
        let mut out = vec![0u8; (end - start) as usize];
        if let Some(base) = &self.config.backing {
            let from = (start as usize).min(base.len());
            let to = (end as usize).min(base.len());
            out[..to - from].copy_from_slice(&base[from..to]);
        }
        out
    }

    /// Records that a guest request may change `[start, end)` from now on.
    pub(crate) fn request(&mut self, start: u64, end: u64) {
        self.requests.push((self.store.op_count(), start, end));
    }

    /// Records the current state as durable.
    pub(crate) fn checkpoint(&mut self) {
        if self.checkpoints.len() == OPS_MAX_CHECKPOINTS {
            self.checkpoints.remove(0);
            let oldest = self.checkpoints[0].at;
            self.requests.retain(|&(at, _, _)| at >= oldest);
        }
        self.checkpoints.push(Checkpoint {
            at: self.store.op_count(),
            disk: Rc::new(self.disk.clone()),
            snapshots: self.snapshots.clone(),
            bitmap: self.bitmap.clone(),
        });
    }

    /// Adds bitmap [`OPS_BITMAP`] (enabled, empty), which must succeed on a v3 image unless the
    /// disk is empty or the bitmap would be too large (as QEMU refuses them).
    pub(crate) fn add_bitmap(&mut self, granularity: u64, what: &str) {
        let result = self.image().add_bitmap(OPS_BITMAP, granularity, false);
        let size = self.size();
        let refusable = size == 0 || size / granularity > 1 << 30;
        if !self.outcome(result, what, |e| {
            refusable && matches!(e, Error::InvalidArgument { .. })
        }) {
            return;
        }
        self.bitmap_generations += 1;
        let mut bitmap = ModelBitmap {
            granularity,
            enabled: true,
            dirty: Vec::new(),
            generation: self.bitmap_generations,
        };
        bitmap.resize(self.size());
        self.bitmap = Some(bitmap);
    }

    /// A successful guest request marks `[start, end)` in an enabled bitmap.
    pub(crate) fn mark(&mut self, start: u64, end: u64) {
        if let Some(b) = &mut self.bitmap {
            b.mark(start, end);
        }
    }

    /// The bitmap list and the bits match the model exactly.
    pub(crate) fn compare_bitmap(&self, what: &str) {
        let image = self.image();
        let listed: Vec<_> = image.bitmaps();
        match &self.bitmap {
            None => assert!(
                listed.is_empty(),
                "{what}: bitmaps {listed:?}, none expected"
            ),
            Some(b) => {
                assert!(
                    listed.len() == 1
                        && listed[0].name == OPS_BITMAP
                        && listed[0].granularity == b.granularity
                        && listed[0].enabled == b.enabled
                        && !listed[0].in_use,
                    "{what}: bitmaps {listed:?}, expected {b:?}"
                );
                let extents = image
                    .dirty_extents(OPS_BITMAP, 0, self.size())
                    .unwrap_or_else(|e| panic!("{what}: dirty extents: {e}"));
                assert_eq!(extents, b.extents(self.size()), "{what}: dirty extents");
            }
        }
    }

    /// Panics unless `result` is `Ok` or a refusal that `expected` accepts. Returns whether it
    /// succeeded.
    pub(crate) fn outcome(
        &self,
        result: qcow2::Result<()>,
        what: &str,
        expected: impl FnOnce(&Error) -> bool,
    ) -> bool {
        match result {
            Ok(()) => true,
            Err(e) if expected(&e) => false,
            Err(e) => panic!("step {} {what}: unexpected error: {e}", self.step),
        }
    }

    /// A refusal for a refcount that would overflow: possible only with narrow refcounts (a
    /// compressed host cluster takes references up to the maximum, then snapshots add one each).
    pub(crate) fn refcount_overflow(&self, e: &Error) -> bool {
        self.config.refcount_bits <= 8
            && matches!(e, Error::InvalidArgument { reason, .. } if reason.contains("refcount"))
    }

    pub(crate) fn run(&mut self, step: OpsStep) {
        let size = self.size();
        let cs = self.cluster_size;
        match step {
            OpsStep::Write { range, byte } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("write {len} bytes of {byte:#04x} at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().write_at(&vec![byte; len as usize], offset);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.disk[offset as usize..(offset + len) as usize].fill(byte);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::WriteZeroes { range, unmap } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("write_zeroes {len} bytes at {offset:#x} unmap={unmap}");
                self.request(offset, offset + len);
                let result = self.image().write_zeroes(offset, len, unmap);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.disk[offset as usize..(offset + len) as usize].fill(0);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::Discard { range } => {
                let (offset, len) = range.resolve(size, cs);
                let what = format!("discard {len} bytes at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().discard(offset, len);
                if self.outcome(result, &what, |e| out_of_bounds(e, offset, len, size)) {
                    assert!(
                        offset + len <= size,
                        "{what}: accepted past the end {size:#x}"
                    );
                    self.model_discard(offset, len);
                    self.mark(offset, offset + len);
                }
            }
            OpsStep::WriteCompressed {
                cluster,
                two,
                misaligned,
                past_end,
                kind,
                byte,
            } => {
                let count = if two { 2 } else { 1 };
                let (offset, end) = if past_end {
                    let offset = size.next_multiple_of(cs) + cluster as u64 % 4096 * cs;
                    (offset, offset + count * cs)
                } else {
                    let start = cluster as u64 % size.div_ceil(cs).max(1) * cs;
                    let end = (start + count * cs).min(size);
                    (if misaligned { start + cs / 2 } else { start }, end)
                };
                let len = end.saturating_sub(offset);
                let data = compressed_data(len as usize, kind, byte);
                let what = format!("write_compressed {len} bytes (kind {kind}) at {offset:#x}");
                self.request(offset, offset + len);
                let result = self.image().write_compressed(&data, offset);
                let refusable = past_end || misaligned;
                if self.outcome(result, &what, |e| {
                    refusable
                        && matches!(e, Error::InvalidArgument { .. } | Error::OutOfBounds { .. })
                }) {
                    assert!(!refusable, "{what}: accepted (disk size {size:#x})");
                    self.disk[offset as usize..end as usize].copy_from_slice(&data);
                    self.mark(offset, end);
                }
            }
            OpsStep::Resize {
                clusters,
                odd,
                sector_aligned,
                allow_data_loss,
            } => {
                let new_size = ops_size(
                    clusters,
                    odd,
                    sector_aligned,
                    self.config.cluster_bits.get(),
                );
                let what =
                    format!("resize {size:#x} -> {new_size:#x} allow_data_loss={allow_data_loss}");
                self.request(size.min(new_size), size.max(new_size));
                let result = self.image().resize(new_size, allow_data_loss);
                // Whether a shrink drops data depends on allocation, which the model does not
                // track: without permission either outcome is fine.
                // A v2 image cannot grow over a longer backing file (no zero clusters to hide
                // it), so the engine refuses that, as QEMU does.
                let refusable = (new_size < size && !allow_data_loss)
                    || (new_size > size
                        && self.config.version < 3
                        && self
                            .config
                            .backing
                            .as_ref()
                            .is_some_and(|b| b.len() as u64 > size));
                // Bitmaps keep their bits and the new area is clean, as in QEMU.
                // A disk of size 0 holds no bitmap.
                let refusable = refusable || (self.bitmap.is_some() && new_size == 0);
                if self.outcome(result, &what, |e| {
                    refusable && matches!(e, Error::InvalidArgument { .. })
                }) {
                    self.model_resize(new_size);
                    if let Some(b) = &mut self.bitmap {
                        b.resize(new_size);
                    }
                }
            }
            OpsStep::Flush => {
                self.image()
                    .flush()
                    .unwrap_or_else(|e| panic!("step {} flush: {e}", self.step));
                self.checkpoint();
            }
            OpsStep::CreateSnapshot { name } => {
                if self.snapshots.len() >= OPS_MAX_SNAPSHOTS {
                    return;
                }
                let name = OPS_SNAPSHOT_NAMES[name as usize % OPS_SNAPSHOT_NAMES.len()];
                let time = SnapshotTime {
                    secs: self.step as i64,
                    nanos: 0,
                };
                let what = format!("create_snapshot {name:?}");
                match self.image().create_snapshot(name, time) {
                    Ok(info) => {
                        let id = next_snapshot_id(&self.snapshots);
                        assert_eq!(info.id, id, "{what}: id");
                        assert_eq!(info.name, name, "{what}: name");
                        assert_eq!(info.disk_size, Some(size), "{what}: disk size");
                        self.snapshots.push(ModelSnapshot {
                            id,
                            name: name.to_string(),
                            bytes: Rc::new(self.disk.clone()),
                        });
                        self.after_snapshot_change(&what);
                    }
                    Err(e) if self.refcount_overflow(&e) => self.after_refusal(&what),
                    Err(e) => panic!("step {} {what}: unexpected error: {e}", self.step),
                }
            }
            OpsStep::ApplySnapshot(sel) => {
                let key = sel.key(&self.snapshots);
                let target = find_model_snapshot(&self.snapshots, &key).cloned();
                let what = format!(
                    "apply_snapshot {key:?} (model: {:?})",
                    target.as_ref().map(|s| &s.id)
                );
                self.request(0, u64::MAX);
                let result = self.image().apply_snapshot(&key);
                let found = target.is_some();
                let other_size = target
                    .as_ref()
                    .is_some_and(|t| t.bytes.len() as u64 != size);
                let bitmap = self.bitmap.is_some();
                if self.outcome(result, &what, |e| {
                    !found && matches!(e, Error::SnapshotNotFound { .. })
                        || self.refcount_overflow(e)
                        || (bitmap
                            && other_size
                            && matches!(
                                e,
                                Error::InvalidArgument { .. } | Error::Unsupported { .. }
                            ))
                }) {
                    let target = target.unwrap_or_else(|| {
                        panic!("{what}: applied a snapshot the model does not have")
                    });
                    // Every guest byte may change: the whole disk is marked.
                    self.mark(0, size);
                    self.disk = target.bytes.to_vec();
                    self.after_snapshot_change(&what);
                } else {
                    self.after_refusal(&what);
                }
            }
            OpsStep::DeleteSnapshot(sel) => {
                let key = sel.key(&self.snapshots);
                let target = find_model_snapshot(&self.snapshots, &key).map(|s| s.id.clone());
                let what = format!("delete_snapshot {key:?} (model: {target:?})");
                let result = self.image().delete_snapshot(&key);
                let found = target.is_some();
                if self.outcome(result, &what, |e| {
                    !found && matches!(e, Error::SnapshotNotFound { .. })
                }) {
                    let id = target.unwrap_or_else(|| {
                        panic!("{what}: deleted a snapshot the model does not have")
                    });
                    self.snapshots.retain(|s| s.id != id);
                    self.after_snapshot_change(&what);
                } else {
                    self.after_refusal(&what);
                }
            }
            OpsStep::Reopen => self.reopen(),
            OpsStep::Crash { mode, cut, seed } => self.crash(mode, cut, seed),
            OpsStep::BitmapClear | OpsStep::BitmapEnable(_) | OpsStep::BitmapRemoveOrAdd { .. } => {
                self.bitmap_step(step)
            }
        }
        self.compare_bitmap(&format!("step {} {step:?}", self.step));
    }

    /// A bitmap command; without a bitmap, clear and enable are refused.
    pub(crate) fn bitmap_step(&mut self, step: OpsStep) {
        let what = format!("step {} {step:?}", self.step);
        let missing = |e: &Error| matches!(e, Error::InvalidArgument { reason, .. } if reason.contains("not found"));
        match step {
            OpsStep::BitmapClear => {
                let result = self.image().clear_bitmap(OPS_BITMAP);
                if self.outcome(result, &what, |e| missing(e)) {
                    self.bitmap_generations += 1;
                    let generation = self.bitmap_generations;
                    let b = self
                        .bitmap
                        .as_mut()
                        .expect("cleared a bitmap the model lacks");
                    b.dirty.fill(false);
                    b.generation = generation;
                }
            }
            OpsStep::BitmapEnable(on) => {
                let result = self.image().set_bitmap_enabled(OPS_BITMAP, on);
                if self.outcome(result, &what, |e| missing(e)) {
                    let b = self
                        .bitmap
                        .as_mut()
                        .expect("enabled a bitmap the model lacks");
                    b.enabled = on;
                }
            }
            OpsStep::BitmapRemoveOrAdd { granularity_shift } => {
                if self.bitmap.is_some() {
                    self.image()
                        .remove_bitmap(OPS_BITMAP)
                        .unwrap_or_else(|e| panic!("{what}: remove: {e}"));
                    self.bitmap = None;
                    self.bitmap_generations += 1;
                } else if self.config.version >= 3 {
                    self.add_bitmap(512 << (granularity_shift % 8), &what);
                }
            }
            _ => unreachable!("bitmap_step runs bitmap steps"),
        }
    }

    /// Discard: whole clusters inside the range (the last partial cluster counts as whole when
    /// the range reaches the end of the disk) read as zeros; except on v2 over a backing file,
    /// which has no zero flag to hide the backing file with, so (as in QEMU) the clusters keep
    /// their data.
    pub(crate) fn model_discard(&mut self, offset: u64, len: u64) {
        if self.config.version < 3 && self.config.backing.is_some() {
            return;
        }
        let cs = self.cluster_size;
        let size = self.size();
        let first = offset.next_multiple_of(cs);
        let end = if offset + len >= size {
            (offset + len).next_multiple_of(cs)
        } else {
            (offset + len) & !(cs - 1)
        };
        let mut pos = first;
        while pos < end.min(size) {
            let to = (pos + cs).min(size);
            self.disk[pos as usize..to as usize].fill(0);
            pos += cs;
        }
    }

    /// Resize: a shrink drops the end; a grow makes the rest of the old last cluster read as
    /// zeros and, beyond it, whatever [`OPS_GROW_EXPOSES_BACKING`] says.
    pub(crate) fn model_resize(&mut self, new_size: u64) {
        let old = self.size();
        if new_size <= old {
            self.disk.truncate(new_size as usize);
            return;
        }
        let tail_end = old.next_multiple_of(self.cluster_size).min(new_size);
        self.disk.resize(tail_end as usize, 0);
        let rest = if OPS_GROW_EXPOSES_BACKING {
            self.backing_bytes(tail_end, new_size)
        } else {
            vec![0u8; (new_size - tail_end) as usize]
        };
        self.disk.extend_from_slice(&rest);
    }

    /// After a successful snapshot operation: the new state is durable (published by a synced
    /// header write after everything else was flushed), the image is consistent, and every
    /// snapshot reads as its model.
    pub(crate) fn after_snapshot_change(&mut self, what: &str) {
        self.checkpoint();
        self.check_clean(what);
        self.compare_snapshots(what);
    }

    /// After a refused operation: nothing changed (the disk is compared after every step).
    pub(crate) fn after_refusal(&mut self, what: &str) {
        assert_eq!(
            listed_snapshots(self.image()),
            snapshot_names(&self.snapshots),
            "{what}: refused, but the snapshot list changed"
        );
        self.check_clean(&format!("{what} (refused)"));
    }

    pub(crate) fn reopen(&mut self) {
        let what = format!("step {} reopen", self.step);
        let image = self.image.take().expect("an image is open between steps");
        image
            .close()
            .unwrap_or_else(|e| panic!("{what}: close: {e}"));
        // A fresh recording store, so later crash cuts count from the reopened image.
        let store = Arc::new(RecordingStorage::new(self.store.live_bytes()));
        let mut image =
            Image::from_storage(Box::new(store.clone()), "fuzz", &ops_open_options(true))
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        assert!(
            !image.header().is_dirty(),
            "{what}: a closed image is dirty"
        );
        if let Some(base) = &self.config.backing {
            attach_backing(&mut image, base);
        }
        self.store = store;
        self.image = Some(image);
        self.checkpoints.clear();
        self.requests.clear();
        self.checkpoint();
        self.check_clean(&what);
        self.compare_snapshots(&what);
    }

    /// Materialises a power cut on the current store and checks the crashed image.
    pub(crate) fn crash(&mut self, mode: u8, cut: u16, seed: u16) {
        let ops = self.store.op_count();
        let oldest = self.checkpoints[0].at;
        let cut = if mode & 4 != 0 {
            self.checkpoints[cut as usize % self.checkpoints.len()].at
        } else {
            oldest + cut as usize % (ops - oldest + 1)
        };
        let survivors = match mode & 3 {
            0 => Survivors::None,
            1 => Survivors::All,
            _ => Survivors::TornSectors(seed as u64 + 1),
        };
        let what = format!(
            "step {} crash after {cut} of {ops} recorded operations, {survivors:?}",
            self.step
        );
        let bytes = self.store.crash_image(cut, survivors);
        let durable_index = self
            .checkpoints
            .iter()
            .rposition(|c| c.at <= cut)
            .expect("cuts start at the oldest checkpoint");
        let durable = &self.checkpoints[durable_index];
        // The snapshots are those at the last durable point or those after the step that was
        // running (each successful snapshot operation ends with a checkpoint).
        let later = match self.checkpoints.get(durable_index + 1) {
            Some(next) => &next.snapshots,
            None => &self.snapshots,
        };

        let readonly = open_crashed(&bytes, false, &self.config.backing)
            .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        let dirty = readonly.header().is_dirty();
        let image = if dirty {
            assert!(
                self.config.lazy_refcounts,
                "{what}: dirty without lazy refcounts"
            );
            drop(readonly);
            // A read-write open repairs a dirty image.
            let image = open_crashed(&bytes, true, &self.config.backing)
                .unwrap_or_else(|e| panic!("{what}: repairing open: {e}"));
            self.check_recovered_bitmap(&image, durable, &what);
            let report = image
                .check()
                .unwrap_or_else(|e| panic!("{what}: check: {e}"));
            assert!(
                report.is_clean(),
                "{what}: after the repairing open: {:?}",
                report.messages
            );
            image
        } else {
            let report = readonly
                .check()
                .unwrap_or_else(|e| panic!("{what}: check: {e}"));
            assert_eq!(report.check_errors, 0, "{what}: {:?}", report.messages);
            // A cut inside a snapshot operation can leave refcounts raised for a state that was
            // never published: leaks, and COPIED flags that disagree with the leaked refcount
            // (counted as corruptions, as QEMU does). Fixing the leaks cures both (checked below);
            // nothing else may be wrong.
            let corruptions = report
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR") && !m.starts_with("ERROR OFLAG_COPIED"))
                .count();
            let copied = report
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR OFLAG_COPIED"))
                .count() as u64;
            assert!(
                corruptions == 0
                    && report.corruptions == copied
                    && (copied == 0 || report.leaks > 0),
                "{what}: {:?}",
                report.messages
            );
            readonly
        };

        // Every byte no request touched since the durable point reads as it did then.
        let size = image.size();
        assert!(size <= OPS_MAX_BYTES, "{what}: size {size:#x}");
        let mut content = vec![0u8; size as usize];
        image
            .read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        let n = content.len().min(durable.disk.len());
        let mut touched = vec![false; n];
        for &(at, start, end) in &self.requests {
            if at >= durable.at && at <= cut && start < n as u64 {
                touched[start as usize..(end.min(n as u64)) as usize].fill(true);
            }
        }
        if let Some(i) = (0..n).find(|&i| !touched[i] && content[i] != durable.disk[i]) {
            panic!(
                "{what}: byte {i:#x} reads {:#04x}, durable since operation {} as {:#04x}",
                content[i], durable.at, durable.disk[i]
            );
        }

        let listed = listed_snapshots(&image);
        let expected = if listed == snapshot_names(&durable.snapshots) {
            &durable.snapshots
        } else if listed == snapshot_names(later) {
            later
        } else {
            panic!(
                "{what}: snapshots {listed:?}, expected {:?} or {:?}",
                snapshot_names(&durable.snapshots),
                snapshot_names(later)
            )
        };
        compare_snapshot_views(&image, expected, &what);
        drop(image);

        // Whatever is left, fixing leaks cures.
        if !dirty {
            let image = open_crashed(&bytes, true, &self.config.backing)
                .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
            self.check_recovered_bitmap(&image, durable, &what);
            let report = image
                .check_and_repair(Repair::Leaks)
                .unwrap_or_else(|e| panic!("{what}: check -r leaks: {e}"));
            assert!(
                report.is_clean(),
                "{what}: after fixing leaks: {:?}",
                report.messages
            );
        }
    }

    /// After a power cut, this engine's read-write open gives the bitmap back consistent, marking
    /// at least what it marked at the last durable point, when no add, remove or clear came
    /// between that point and now (those may lose bits legitimately).
    pub(crate) fn check_recovered_bitmap(&self, image: &Image, durable: &Checkpoint, what: &str) {
        let (Some(then), Some(now)) = (&durable.bitmap, &self.bitmap) else {
            return;
        };
        if then.generation != now.generation {
            return;
        }
        let listed = image.bitmaps();
        assert!(
            listed.len() == 1 && listed[0].name == OPS_BITMAP && !listed[0].in_use,
            "{what}: recovered bitmaps {listed:?}"
        );
        let size = image.size();
        let extents = image
            .dirty_extents(OPS_BITMAP, 0, size)
            .unwrap_or_else(|e| panic!("{what}: recovered dirty extents: {e}"));
        let g = then.granularity;
        for (i, _) in then.dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = i as u64 * g;
            if start >= size {
                break;
            }
            assert!(
                extents.iter().any(|&(s, l)| s <= start && start < s + l),
                "{what}: granule at {start:#x} was durable and dirty, the recovered bitmap \
                 misses it: {extents:?}"
            );
        }
    }

    /// The whole disk reads as the model.
    pub(crate) fn compare_disk(&self, what: &str) {
        let image = self.image();
        assert_eq!(image.size(), self.size(), "{what}: virtual size");
        let mut content = vec![0u8; self.disk.len()];
        image
            .read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        if content == self.disk {
            return;
        }
        if let Some(i) = (0..content.len()).find(|&i| content[i] != self.disk[i]) {
            panic!(
                "{what}: guest byte {i:#x} reads {:#04x}, the model says {:#04x}",
                content[i], self.disk[i]
            );
        }
    }

    /// `check()` finds nothing at all.
    pub(crate) fn check_clean(&self, what: &str) {
        let report = self
            .image()
            .check()
            .unwrap_or_else(|e| panic!("{what}: check: {e}"));
        assert!(report.is_clean(), "{what}: check: {:?}", report.messages);
    }

    /// The snapshot list and every snapshot's content match the model.
    pub(crate) fn compare_snapshots(&self, what: &str) {
        let image = self.image();
        assert_eq!(
            listed_snapshots(image),
            snapshot_names(&self.snapshots),
            "{what}: snapshot list"
        );
        compare_snapshot_views(image, &self.snapshots, what);
    }

    /// Closes the image and checks what it leaves behind: clean, not dirty, same content.
    pub(crate) fn finish(mut self) {
        self.check_clean("at the end");
        self.compare_snapshots("at the end");
        let image = self.image.take().expect("an image is open between steps");
        image
            .close()
            .unwrap_or_else(|e| panic!("at the end: close: {e}"));
        let closed = open_crashed(&self.store.live_bytes(), false, &self.config.backing)
            .unwrap_or_else(|e| panic!("at the end: open the closed image: {e}"));
        assert!(
            !closed.header().is_dirty(),
            "at the end: a closed image is dirty"
        );
        let report = closed
            .check()
            .unwrap_or_else(|e| panic!("at the end: check the closed image: {e}"));
        assert!(
            report.is_clean(),
            "at the end: closed image: {:?}",
            report.messages
        );
        self.image = Some(closed);
        self.compare_disk("the closed image");
    }
}

/// (id, name) of each snapshot the image lists, in table order.
pub(crate) fn listed_snapshots(image: &Image) -> Vec<(String, String)> {
    image
        .snapshots()
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect()
}

/// (id, name) of each model snapshot, in table order.
pub(crate) fn snapshot_names(snapshots: &[ModelSnapshot]) -> Vec<(String, String)> {
    snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect()
}

/// Every snapshot, opened by id, reads as its model.
pub(crate) fn compare_snapshot_views(image: &Image, snapshots: &[ModelSnapshot], what: &str) {
    for s in snapshots {
        let view = image
            .open_snapshot(&s.id)
            .unwrap_or_else(|e| panic!("{what}: open snapshot {}: {e}", s.id));
        assert_eq!(
            view.size(),
            s.bytes.len() as u64,
            "{what}: snapshot {} size",
            s.id
        );
        let mut content = vec![0u8; s.bytes.len()];
        view.read_at(&mut content, 0)
            .unwrap_or_else(|e| panic!("{what}: read snapshot {}: {e}", s.id));
        if content[..] == s.bytes[..] {
            continue;
        }
        if let Some(i) = (0..content.len()).find(|&i| content[i] != s.bytes[i]) {
            panic!(
                "{what}: snapshot {} ({}) byte {i:#x} reads {:#04x}, the model says {:#04x}",
                s.id, s.name, content[i], s.bytes[i]
            );
        }
    }
}

/// An out-of-bounds refusal of exactly the request that overran the disk.
pub(crate) fn out_of_bounds(e: &Error, offset: u64, len: u64, size: u64) -> bool {
    offset + len > size && matches!(e, Error::OutOfBounds { .. })
}

pub(crate) fn ops_open_options(writable: bool) -> OpenOptions {
    OpenOptions::default()
        .writable(writable)
        .backing(BackingPolicy::Ignore)
}

pub(crate) fn attach_backing(image: &mut Image, base: &[u8]) {
    image
        .attach_raw_backing(Box::new(MemoryStorage::from_bytes(base.to_vec())))
        .unwrap_or_else(|e| panic!("attach the backing file: {e}"));
}

/// Opens image bytes from memory (with the backing file attached).
pub(crate) fn open_crashed(
    bytes: &[u8],
    writable: bool,
    backing: &Option<Vec<u8>>,
) -> qcow2::Result<Image> {
    let mut image = Image::from_storage(
        Box::new(MemoryStorage::from_bytes(bytes.to_vec())),
        "crashed",
        &ops_open_options(writable),
    )?;
    if let Some(base) = backing {
        attach_backing(&mut image, base);
    }
    Ok(image)
}
