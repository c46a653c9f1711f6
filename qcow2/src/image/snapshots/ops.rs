//! Internal snapshot create, delete and apply.
//!
//! Every operation builds the new state in fresh clusters — a new active L1 table, copies of the
//! active L2 tables with COPIED bits already right for the new state, a new snapshot table — raises
//! refcounts durably, and then publishes everything with one write of header bytes 24..72 (size,
//! L1 fields, refcount table fields, snapshot count and table offset), which lies in the first
//! 512-byte sector and so lands whole. Refcounts drop only after that write is durable, and an
//! entry whose cluster becomes unshared by that drop (a deleted snapshot's last sharer) takes its
//! COPIED bit in place after it, as QEMU's delete does.
//!
//! So at every crash point the image holds either the old state or the new one, plus at most
//! leaked clusters: a COPIED bit is never set on a cluster that two tables count, and a refused
//! operation (refcount overflow, full table, I/O error before publishing) leaves the image as it
//! was. QEMU instead clears COPIED in place and rewrites the active L1 in place on apply, which
//! leaves windows where a crash marks a shared table unshared.

use crate::error::{Error, Result};
use crate::format::limits::*;
use crate::format::snapshot::{encode_table, TIME64_TAG};
use crate::format::table::{l2_entry, put_be_u64_at, ClusterMapping, COPIED, OFFSET_MASK};
use crate::format::{CompressedDescriptor, SnapshotEntry, SnapshotTime};
use crate::image::refcount_deltas::{RefcountDeltas, Segment, SegmentCursor};
use crate::image::refcounts::Refcounts;
use crate::image::snapshot::find_snapshot;
use crate::image::{Image, Meta, SnapshotInfo};
use crate::transaction_support::StateSwitch;

/// A layer's references: its L2 tables and the host ranges its entries hold.
struct LayerRefs {
    /// (L1 index, L2 table offset)
    tables: Vec<(usize, u64)>,
    /// Cluster index runs `[start, end)` of data, zero-allocated and compressed clusters, in
    /// table order; runs of compressed clusters may overlap (they share host clusters).
    data: Vec<(u64, u64)>,
}

/// One change to an image's snapshots, as a caller (or a group transaction) asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotChange {
    /// Snapshot the current state.
    Create {
        /// The new snapshot's name.
        name: String,
        /// The creation time recorded in the entry.
        time: SnapshotTime,
    },
    /// Delete a snapshot, found by id first, then by name.
    Delete {
        /// The snapshot's id or name.
        id_or_name: String,
    },
    /// Make a snapshot the active state (and the disk its size), found by id, then name.
    Revert {
        /// The snapshot's id or name.
        id_or_name: String,
    },
}

/// A new state built in fresh clusters, with its refcounts raised durably, but not yet
/// published: [`publish`](crate::transaction_support::publish) switches to it with one header
/// write, [`abandon`](crate::transaction_support::abandon) takes the staged refcounts back. Until one of them runs, the image reads as before and holds
/// only leaked clusters.
#[derive(Debug)]
pub struct StagedChange {
    /// Header bytes 24..72 of the new state (size, L1 fields, refcount table fields, snapshot
    /// count and table offset): the one write that publishes it.
    header_switch: [u8; 48],
    size: u64,
    l1: Vec<u64>,
    l1_at: u64,
    l1_clusters: u64,
    snapshots: Vec<SnapshotEntry>,
    table_at: u64,
    table_len: u64,
    /// Refcount increases made while staging (allocations included).
    raised: Vec<Segment>,
    /// Refcount decreases due once the new state is published.
    lowered: Vec<Segment>,
    /// L1 indices of new L2 tables with entries that take COPIED once `lowered` is durable.
    copied_later: Vec<usize>,
}

/// Every refcount change of a plan, settled, with the refcount each changed cluster ends with.
struct SettledChanges {
    segments: Vec<Segment>,
    /// The final refcounts of the segments' clusters, segment after segment.
    after: Vec<u64>,
    /// Where each segment's clusters start in `after`.
    first_value: Vec<usize>,
}

/// The new active layer and snapshot list a batch of changes leads to.
struct Plan {
    changes: SettledChanges,
    snapshots: Vec<SnapshotEntry>,
    size: u64,
    /// L1 entries of the new active layer before its tables are copied.
    l1_source: Vec<u64>,
    source: LayerRefs,
}

impl StagedChange {
    /// The header switch that publishes this state (what a transaction journals).
    pub fn switch(&self) -> StateSwitch {
        StateSwitch(self.header_switch)
    }
}

impl Image {
    /// The snapshot list, as `qemu-img info` shows it.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.info().snapshots
    }

    /// Creates an internal snapshot of the current state, named `name`, taken at `time`.
    pub fn create_snapshot(&self, name: &str, time: SnapshotTime) -> Result<SnapshotInfo> {
        self.apply_change(SnapshotChange::Create {
            name: name.to_string(),
            time,
        })?;
        Ok(self
            .snapshots()
            .into_iter()
            .next_back()
            .expect("the new snapshot is listed last"))
    }

    /// Deletes the snapshot with id `id_or_name`, else the first named so.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.apply_change(SnapshotChange::Delete {
            id_or_name: id_or_name.to_string(),
        })
    }

    /// Makes the snapshot with id `id_or_name` (else the first named so) the active state,
    /// resizing the disk to the snapshot's size as QEMU 10 does.
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.apply_change(SnapshotChange::Revert {
            id_or_name: id_or_name.to_string(),
        })
    }

    fn refuse_with_data_file(&self, m: &Meta) -> Result<()> {
        if m.header.has_external_data_file() {
            return Err(self
                .refused("internal snapshots are not possible with an external data file".into()));
        }
        Ok(())
    }

    fn refused(&self, reason: String) -> Error {
        Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        }
    }

    /// Reads and validates a snapshot's L1 table.
    fn snapshot_l1(&self, m: &Meta, entry: &SnapshotEntry) -> Result<Vec<u64>> {
        let cs = m.header.cluster_size();
        let structure = format!("L1 table of snapshot {}", entry.id_str());
        if entry.l1_size as u64 > MAX_L1_ENTRIES
            || entry.l1_table_offset % cs != 0
            || entry
                .l1_table_offset
                .checked_add(entry.l1_size as u64 * 8)
                .is_none_or(|e| e > m.file_len)
        {
            return Err(Error::corrupt(
                &self.name,
                structure,
                entry.l1_table_offset,
                "is unaligned, too large or past the end of the file",
            ));
        }
        self.read_table(
            entry.l1_table_offset,
            entry.l1_size as u64,
            "snapshot L1 table",
        )
    }

    /// The L2 tables and host ranges reachable from an L1 table.
    fn layer_refs(&self, m: &Meta, l1: &[u64], l1_offset: u64) -> Result<LayerRefs> {
        let extended = m.header.extended_l2();
        let mut refs = LayerRefs {
            tables: Vec::new(),
            data: Vec::new(),
        };
        let cb = m.header.cluster_bits;
        // Extends the last run when the clusters follow on from it, as they mostly do.
        let mut push = |start: u64, end: u64| match refs.data.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => refs.data.push((start, end)),
        };
        for (i, &e) in l1.iter().enumerate() {
            let t = e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let table = self.l2_table(m, t, i as u64, l1_offset)?;
            refs.tables.push((i, t));
            for j in 0..1usize << m.header.l2_bits() {
                match l2_entry(&table, j, extended, false).2 {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => {
                        push(host_offset >> cb, (host_offset >> cb) + 1)
                    }
                    ClusterMapping::Compressed { descriptor } => {
                        let d = CompressedDescriptor::decode(descriptor, cb);
                        let len = d.compressed_size();
                        if len > 0 {
                            push(d.host_offset >> cb, ((d.host_offset + len - 1) >> cb) + 1);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(refs)
    }

    /// Settles the collected changes and works out the refcount each changed cluster ends with.
    /// Refuses, before any write, a change that would overflow or underflow a refcount.
    fn settle(&self, m: &mut Meta, deltas: &RefcountDeltas) -> Result<SettledChanges> {
        let host = self.host();
        let refcount_bits = m.header.refcount_bits();
        let rc = &mut m.ws_mut()?.refcounts;
        let max = rc.max();
        let segments = deltas.settle();
        let total: u64 = segments.iter().map(Segment::len).sum();
        let mut after = Vec::with_capacity(total as usize);
        let mut first_value = Vec::with_capacity(segments.len());
        for seg in &segments {
            first_value.push(after.len());
            let from = after.len();
            rc.get_clusters(host, seg.start, seg.end, &mut after)?;
            for (i, v) in after[from..].iter_mut().enumerate() {
                let n = *v as i128 + seg.delta as i128;
                if n < 0 || n > max as i128 {
                    return Err(self.refused(format!(
                        "cluster {} would need a refcount of {n}, outside 0..={max} for \
                         {refcount_bits}-bit refcounts",
                        seg.start + i as u64
                    )));
                }
                *v = n as u64;
            }
        }
        Ok(SettledChanges {
            segments,
            after,
            first_value,
        })
    }

    /// Stages and publishes one change.
    fn apply_change(&self, change: SnapshotChange) -> Result<()> {
        // Staging and publishing take the metadata lock one after the other: a guest write in
        // between would land in the old state and be dropped by the switch, so writes wait.
        let _quiet = self.quiesce();
        let staged = self.stage(&[change])?;
        self.publish(staged)
    }

    /// Builds the state that `changes` lead to (creates and deletes in any order, and at most one
    /// revert, which comes last) in fresh clusters and raises its refcounts durably, without
    /// publishing it. Several changes cost one snapshot table write and one header switch.
    pub(crate) fn stage(&self, changes: &[SnapshotChange]) -> Result<StagedChange> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        self.flush_all(&mut m)?;
        let plan = self.plan(&mut m, changes)?;
        // A revert marked every enabled bitmap: those bits are durable before the switch can
        // publish the reverted data, also when recovery (which never saw them) publishes it.
        self.bitmaps_durable_before_inplace(&mut m)?;
        self.build(&mut m, plan)
    }

    /// Publishes a staged state with one header write, then drops what the old state held. When
    /// the header write fails and did not land, the staged state is abandoned (the image is as
    /// before).
    pub(crate) fn publish(&self, staged: StagedChange) -> Result<()> {
        self.publish_inner(staged, true)
    }

    /// Like [`Image::publish`] for a state a transaction has already decided to commit: when the
    /// header write fails, the staged state stays intact (its refcounts raised) so recovery can
    /// still write the recorded switch.
    pub(crate) fn publish_decided(&self, staged: StagedChange) -> Result<()> {
        self.publish_inner(staged, false)
    }

    fn publish_inner(&self, staged: StagedChange, undo_on_failure: bool) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let cs = m.header.cluster_size();
        let cb = m.header.cluster_bits;
        let host = self.host();
        if let Err(e) = host.write_sync(&staged.header_switch, 24, "header (state switch)") {
            // Whether the switch landed decides what the raised refcounts are: read it back.
            let mut now = [0u8; 48];
            let landed = host.read_zero_filled(&mut now, 24, "header").is_ok()
                && now == staged.header_switch;
            if !landed && !undo_on_failure {
                return Err(e);
            }
            if !landed {
                for seg in &staged.raised {
                    let _ = m.ws_mut().map(|ws| {
                        ws.refcounts
                            .adjust_clusters(host, seg.start, seg.end, -seg.delta, |_| {})
                    });
                }
                let _ = self.flush_refblocks(&mut m);
                return Err(e);
            }
        }
        let old_table = (m.header.snapshots_offset, m.snapshot_table_len);
        m.header.size = staged.size;
        m.header.l1_size = staged.l1.len() as u32;
        m.header.l1_table_offset = staged.l1_at;
        m.header.nb_snapshots = staged.snapshots.len() as u32;
        m.header.snapshots_offset = staged.table_at;
        m.snapshot_table_len = staged.table_len;
        m.l1 = staged.l1;
        m.snapshots = staged.snapshots;
        for area in m.metadata_areas.iter_mut() {
            if area.what == "the active L1 table" {
                area.start = staged.l1_at;
                area.end = staged.l1_at + staged.l1_clusters * cs;
            }
        }
        m.metadata_areas.retain(|a| a.what != "the snapshot table");
        if staged.table_at != 0 {
            m.metadata_areas.push(crate::image::MetadataArea {
                start: staged.table_at,
                end: staged.table_at + staged.table_len.next_multiple_of(cs),
                what: "the snapshot table",
            });
        }
        // The switch is durable: the old state's references are gone.
        let mut lowered = RefcountDeltas::default();
        lowered.add_segments(&staged.lowered);
        lowered.add_bytes(old_table.0, old_table.1, -1, cb);
        self.storage.event(crate::storage::Event::ClusterFree);
        let result = (|| -> Result<()> {
            for seg in lowered.settle() {
                m.ws_mut()?.refcounts.adjust_clusters(
                    host,
                    seg.start,
                    seg.end,
                    seg.delta,
                    |k| self.l2_cache.remove(k << cb),
                )?;
            }
            self.flush_refblocks(&mut m)?;
            host.sync()
        })();
        // The new state is published, so the change took effect; what the old state held is at
        // most leaked. Reclaim it now if the disk lets us (check -r leaks does it otherwise); a
        // disk that keeps failing fails the next flush.
        let settled = result.is_ok()
            || (self.fix_leaks(&mut m).is_ok() && self.flush_refblocks(&mut m).is_ok());
        if settled && !staged.copied_later.is_empty() {
            // Until this lands, the clusters are unshared without COPIED: writes copy them
            // needlessly, and `check` calls the flag wrong (`-r leaks` sets it).
            let _ = self
                .fix_copied_in(&mut m, &staged.copied_later)
                .and_then(|()| self.flush_all(&mut m));
        }
        Ok(())
    }

    /// Takes back the refcounts a staged state raised; the image is then exactly as before.
    pub(crate) fn abandon(&self, staged: StagedChange) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let host = self.host();
        for seg in &staged.raised {
            m.ws_mut()?
                .refcounts
                .adjust_clusters(host, seg.start, seg.end, -seg.delta, |_| {})?;
        }
        self.flush_refblocks(&mut m)
    }

    /// Writes a recorded state switch during recovery, after checking that it fits this image,
    /// then closes the image: its in-memory state is stale after the switch, so the caller opens
    /// it again (and reconciles refcounts with `check_and_repair`).
    pub(crate) fn write_recorded_switch(self, switch: &StateSwitch) -> Result<()> {
        self.require_writable()?;
        self.validate_switch(switch)?;
        {
            let mut m = self.meta_mut();
            self.flush_all(&mut m)?;
            self.host()
                .write_sync(&switch.0, 24, "header (recorded state switch)")?;
            // Skip the clean close: it would write the stale in-memory header state.
            m.ws = None;
        }
        Ok(())
    }

    /// Refuses a recorded switch that does not fit this image: another encryption method or
    /// refcount table, tables past QEMU's limits, unaligned, or in free clusters.
    fn validate_switch(&self, switch: &StateSwitch) -> Result<()> {
        let current = self.header_switch_bytes();
        let current = StateSwitch(current);
        let cluster_size = self.meta().header.cluster_size();
        let refuse =
            |reason: &str| Err(self.refused(format!("recorded state switch refused: {reason}")));
        if switch.crypt_method() != current.crypt_method() {
            return refuse("it changes the encryption method");
        }
        if switch.refcount_table() != current.refcount_table() {
            return refuse("it moves the refcount table");
        }
        if u64::from(switch.l1_size()) > MAX_L1_ENTRIES {
            return refuse("its L1 table is larger than QEMU allows");
        }
        if switch.nb_snapshots() > MAX_SNAPSHOTS {
            return refuse("it has more snapshots than QEMU allows");
        }
        if switch.nb_snapshots() != 0 && switch.snapshots_offset() == 0 {
            return refuse("it has snapshots but no snapshot table");
        }
        for table in switch.staged_tables().into_iter().filter(|&t| t != 0) {
            if table % cluster_size != 0 {
                return refuse("a table it points at is not cluster-aligned");
            }
            if self.refcount_at(table)? == 0 {
                return refuse("a table it points at lies in a free cluster");
            }
        }
        Ok(())
    }

    /// The refcount of the host cluster holding `host_offset` (for recovery's checks that staged
    /// structures are still intact).
    pub(crate) fn refcount_at(&self, host_offset: u64) -> Result<u64> {
        let mut m = self.meta_mut();
        let cb = m.header.cluster_bits;
        let host = self.host();
        m.ws_mut()?.refcounts.get(host, host_offset >> cb)
    }

    /// Header bytes 24..72 as they are now (what a staged change's switch replaces).
    pub(crate) fn header_switch_bytes(&self) -> [u8; 48] {
        let m = self.meta();
        let h = &m.header;
        switch_bytes(
            h.size,
            h.crypt_method,
            h.l1_size,
            h.l1_table_offset,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.nb_snapshots,
            h.snapshots_offset,
        )
    }

    /// Works out the new state of a batch of changes, with every refcount change it implies.
    fn plan(&self, m: &mut Meta, changes: &[SnapshotChange]) -> Result<Plan> {
        let cb = m.header.cluster_bits;
        let cs = m.header.cluster_size();
        let cur_l1 = m.l1.clone();
        let cur_l1_off = m.header.l1_table_offset;
        let current = self.layer_refs(m, &cur_l1, cur_l1_off)?;
        let mut deltas = RefcountDeltas::default();
        let mut snapshots = m.snapshots.clone();
        let mut created: Vec<Vec<u8>> = Vec::new();
        let mut size = m.header.size;
        // The first create takes over the current L1 and L2 tables; later ones share them.
        let mut current_taken = false;
        let mut revert: Option<(Vec<u64>, LayerRefs)> = None;
        for change in changes {
            if revert.is_some() {
                return Err(self.refused("a revert must be the last change to an image".into()));
            }
            match change {
                SnapshotChange::Create { name, time } => {
                    self.refuse_with_data_file(m)?;
                    if snapshots.len() >= MAX_SNAPSHOTS as usize {
                        return Err(self
                            .refused(format!("the image already has {MAX_SNAPSHOTS} snapshots")));
                    }
                    if name.len() > u16::MAX as usize || time.nanos >= 1_000_000_000 {
                        return Err(self.refused(
                            "the snapshot name is longer than 65535 bytes or the time is invalid"
                                .into(),
                        ));
                    }
                    if current_taken {
                        deltas.add_bytes(cur_l1_off, cur_l1.len() as u64 * 8, 1, cb);
                        for &(_, t) in &current.tables {
                            deltas.add_bytes(t, cs, 1, cb);
                        }
                        deltas.add_runs(&current.data, 1);
                    }
                    current_taken = true;
                    let id = next_id(&snapshots);
                    let mut extra = vec![0u8; SNAPSHOT_EXTRA_KNOWN_SIZE];
                    extra[8..16].copy_from_slice(&m.header.size.to_be_bytes());
                    extra.extend_from_slice(&TIME64_TAG);
                    extra.extend_from_slice(&time.secs.to_be_bytes());
                    created.push(id.clone().into_bytes());
                    snapshots.push(SnapshotEntry {
                        l1_table_offset: cur_l1_off,
                        l1_size: cur_l1.len() as u32,
                        id: id.into_bytes(),
                        name: name.as_bytes().to_vec(),
                        date_sec: time.secs as u32,
                        date_nsec: time.nanos,
                        vm_clock_nsec: 0,
                        vm_state_size32: 0,
                        extra,
                    });
                }
                SnapshotChange::Delete { id_or_name } => {
                    let entry = self.existing(&snapshots, &created, id_or_name)?;
                    let l1 = self.snapshot_l1(m, &entry)?;
                    let refs = self.layer_refs(m, &l1, entry.l1_table_offset)?;
                    deltas.add_bytes(entry.l1_table_offset, entry.l1_size as u64 * 8, -1, cb);
                    for &(_, t) in &refs.tables {
                        deltas.add_bytes(t, cs, -1, cb);
                    }
                    deltas.add_runs(&refs.data, -1);
                    snapshots.retain(|s| s.id != entry.id);
                }
                SnapshotChange::Revert { id_or_name } => {
                    self.refuse_with_data_file(m)?;
                    let entry = self.existing(&snapshots, &created, id_or_name)?;
                    let mut l1 = self.snapshot_l1(m, &entry)?;
                    let refs = self.layer_refs(m, &l1, entry.l1_table_offset)?;
                    size = entry.disk_size().unwrap_or(m.header.size);
                    if size != m.header.size && m.bitmaps.is_some() {
                        // QEMU's refusal: the bitmaps would describe another disk.
                        return Err(self.refused("Device has active dirty bitmaps".into()));
                    }
                    // Every guest byte may change: enabled bitmaps mark the whole disk.
                    self.bitmaps_mark(m, 0, m.header.size)?;
                    if size > MAX_VIRTUAL_SIZE || m.header.l1_entries_for(size) > MAX_L1_ENTRIES {
                        return Err(self.refused(format!("snapshot disk size {size} is too large")));
                    }
                    let len = (l1.len() as u64).max(m.header.l1_entries_for(size)) as usize;
                    l1.resize(len, 0);
                    revert = Some((l1, refs));
                }
            }
        }
        if !current_taken {
            // Nothing keeps the current active tables: the new active layer replaces them.
            deltas.add_bytes(cur_l1_off, cur_l1.len() as u64 * 8, -1, cb);
            for &(_, t) in &current.tables {
                deltas.add_bytes(t, cs, -1, cb);
            }
            deltas.add_runs(&current.data, -1);
        }
        if encode_table(&snapshots).len() as u64 > MAX_SNAPSHOTS_SIZE {
            return Err(self.refused(format!(
                "the snapshot table would exceed its limit of {MAX_SNAPSHOTS_SIZE} bytes"
            )));
        }
        let (l1_source, source) = revert.unwrap_or((cur_l1, current));
        // The new active layer's copies add one path to every cluster they map.
        deltas.add_runs(&source.data, 1);
        let changes = self.settle(m, &deltas)?;
        Ok(Plan {
            changes,
            snapshots,
            size,
            l1_source,
            source,
        })
    }

    /// A published snapshot by id or name; not one created in the same batch.
    fn existing(
        &self,
        snapshots: &[SnapshotEntry],
        created: &[Vec<u8>],
        id_or_name: &str,
    ) -> Result<SnapshotEntry> {
        let entry = find_snapshot(snapshots, id_or_name)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: id_or_name.to_string(),
            })?;
        if created.contains(&entry.id) {
            return Err(self.refused(format!(
                "snapshot {id_or_name:?} is created by the same batch of changes"
            )));
        }
        Ok(entry)
    }

    /// Writes the planned state to fresh clusters and raises its refcounts durably.
    fn build(&self, m: &mut Meta, plan: Plan) -> Result<StagedChange> {
        let result = self.build_inner(m, plan);
        if result.is_err() {
            // Nothing is published: forget cached refcount changes so the image stays as it was
            // (anything written lies in clusters nothing references).
            let h = &m.header;
            if let Ok(fresh) = Refcounts::load(
                self.host(),
                h.cluster_bits,
                h.refcount_order,
                h.refcount_table_offset,
                h.refcount_table_clusters,
            ) {
                if let Ok(ws) = m.ws_mut() {
                    ws.refcounts = fresh;
                    ws.l2_after_refblocks = false;
                    ws.refblocks_after_l2 = false;
                }
            }
            // Increases that reached the disk before the failure are leaks now: take them back
            // (best effort; if the disk still fails, check -r leaks does it later).
            if self.fix_leaks(m).is_ok() {
                let _ = self.flush_refblocks(m);
            }
        }
        result
    }

    fn build_inner(&self, m: &mut Meta, plan: Plan) -> Result<StagedChange> {
        let cs = m.header.cluster_size();
        let cb = m.header.cluster_bits;
        let host = self.host();
        let Plan {
            changes,
            snapshots,
            size,
            l1_source,
            source,
        } = plan;
        // The refcount each cluster ends with decides its COPIED bit in the new tables.
        let mut cursor = SegmentCursor::new(&changes.segments);
        let mut raised: Vec<Segment> = Vec::new();
        let extended = m.header.extended_l2();
        let mut l1 = l1_source;
        let mut copied_later = Vec::new();
        // Space is taken in QEMU's order — the L1 table, the snapshot table, then the L2 tables
        // — so an image's layout after a snapshot matches what QEMU's tools expect to find.
        // An empty L1 table takes no cluster (nothing would count it) and sits at offset 0.
        let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs);
        let l1_at = if l1_clusters == 0 {
            0
        } else {
            self.alloc(m, l1_clusters)?
        };
        if l1_clusters > 0 {
            raised.push(one_each(l1_at >> cb, l1_clusters));
            self.guard(m, l1_at, l1_clusters * cs, None)?;
        }
        let table = encode_table(&snapshots);
        if table.len() as u64 > MAX_SNAPSHOTS_SIZE {
            return Err(self.refused("the snapshot table would exceed 64 MiB".into()));
        }
        let table_at = if snapshots.is_empty() {
            0
        } else {
            let clusters = (table.len() as u64).div_ceil(cs);
            let at = self.alloc(m, clusters)?;
            raised.push(one_each(at >> cb, clusters));
            self.guard(m, at, clusters * cs, None)?;
            host.write(&table, at, "new snapshot table")?;
            at
        };
        for &(i, t) in &source.tables {
            let table = self.l2_table(m, t, i as u64, 0)?;
            let mut copy = table.to_vec();
            for j in 0..1usize << m.header.l2_bits() {
                let idx = if extended { j * 2 } else { j };
                let (raw, _, mapping) = l2_entry(&copy, j, extended, false);
                let host_offset = match mapping {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => host_offset,
                    _ => continue,
                };
                let k = host_offset >> cb;
                let (count, lowered) = match cursor.find(k) {
                    Some(i) => {
                        let seg = &changes.segments[i];
                        let after =
                            changes.after[changes.first_value[i] + (k - seg.start) as usize];
                        (after, seg.delta < 0)
                    }
                    None => (m.ws_mut()?.refcounts.get(host, k)?, false),
                };
                // A cluster whose refcount reaches 1 only when the old state's references drop
                // gets COPIED after that drop is durable: until then the file counts it twice.
                let fixed = if count == 1 && !lowered {
                    raw | COPIED
                } else {
                    raw & !COPIED
                };
                if count == 1 && lowered && copied_later.last() != Some(&i) {
                    copied_later.push(i);
                }
                put_be_u64_at(&mut copy, idx, fixed);
            }
            let at = self.alloc(m, 1)?;
            raised.push(one_each(at >> cb, 1));
            self.guard(m, at, cs, None)?;
            host.write(&copy, at, "new L2 table")?;
            l1[i] = at | COPIED;
        }
        if l1_clusters > 0 {
            self.write_new_l1(&l1, l1.len(), l1_at)?;
        }
        // The new tables and the raised refcounts become durable under one sync, before the
        // header can point at them: until then nothing references the new clusters, so any part
        // of these writes landing without the rest leaves at most leaked clusters.
        for seg in changes.segments.iter().filter(|s| s.delta > 0) {
            m.ws_mut()?
                .refcounts
                .adjust_clusters(host, seg.start, seg.end, seg.delta, |_| {})?;
            raised.push(*seg);
        }
        self.flush_refblocks(m)?;
        host.sync()?;
        let h = &m.header;
        let header_switch = switch_bytes(
            size,
            h.crypt_method,
            l1.len() as u32,
            l1_at,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            snapshots.len() as u32,
            table_at,
        );
        Ok(StagedChange {
            header_switch,
            size,
            l1,
            l1_at,
            l1_clusters,
            snapshots,
            table_at,
            table_len: table.len() as u64,
            raised,
            copied_later,
            lowered: changes
                .segments
                .into_iter()
                .filter(|s| s.delta < 0)
                .collect(),
        })
    }
}

/// A refcount increase of one for `n` clusters from index `start` (fresh allocations).
fn one_each(start: u64, n: u64) -> Segment {
    Segment {
        start,
        end: start + n,
        delta: 1,
    }
}

/// The id QEMU would give a new snapshot: the largest numeric id plus one.
fn next_id(snapshots: &[SnapshotEntry]) -> String {
    let max = snapshots
        .iter()
        .map(|s| {
            let digits: String = s
                .id_str()
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse::<u64>().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// Header bytes 24..72 for the given fields.
#[allow(clippy::too_many_arguments)]
fn switch_bytes(
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_offset: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0..8].copy_from_slice(&size.to_be_bytes());
    b[8..12].copy_from_slice(&crypt_method.to_be_bytes());
    b[12..16].copy_from_slice(&l1_size.to_be_bytes());
    b[16..24].copy_from_slice(&l1_offset.to_be_bytes());
    b[24..32].copy_from_slice(&reftable_offset.to_be_bytes());
    b[32..36].copy_from_slice(&reftable_clusters.to_be_bytes());
    b[36..40].copy_from_slice(&nb_snapshots.to_be_bytes());
    b[40..48].copy_from_slice(&snapshots_offset.to_be_bytes());
    b
}
