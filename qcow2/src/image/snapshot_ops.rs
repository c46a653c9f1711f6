//! Internal snapshot create, delete and apply.
//!
//! Every operation builds the new state in fresh clusters — a new active L1 table, copies of the
//! active L2 tables with COPIED bits already right for the new state, a new snapshot table — raises
//! refcounts durably, and then publishes everything with one write of header bytes 24..72 (size,
//! L1 fields, refcount table fields, snapshot count and table offset), which lies in the first
//! 512-byte sector and so lands whole. Refcounts drop only after that write is durable.
//!
//! So at every crash point the image holds either the old state or the new one, plus at most
//! leaked clusters: a COPIED bit is never set on a cluster that two tables share, and a refused
//! operation (refcount overflow, full table, I/O error before publishing) leaves the image as it
//! was. QEMU instead clears COPIED in place and rewrites the active L1 in place on apply, which
//! leaves windows where a crash marks a shared table unshared.

use std::collections::HashMap;

use super::refcounts::Refcounts;
use super::snapshot::find_snapshot;
use super::{Image, Meta, SnapshotInfo};
use crate::error::{Error, Result};
use crate::format::limits::*;
use crate::format::snapshot::{encode_table, TIME64_TAG};
use crate::format::table::{
    be_u64_at, classify_standard, put_be_u64_at, ClusterMapping, COPIED, OFFSET_MASK,
};
use crate::format::{CompressedDescriptor, SnapshotEntry, SnapshotTime};

/// Refcount changes an operation makes, per cluster index.
#[derive(Default)]
struct Deltas(HashMap<u64, i64>);

impl Deltas {
    fn add(&mut self, offset: u64, len: u64, delta: i64, cluster_bits: u32) {
        if len == 0 {
            return;
        }
        for k in offset >> cluster_bits..=(offset + len - 1) >> cluster_bits {
            *self.0.entry(k).or_insert(0) += delta;
        }
    }
}

/// A layer's references: its L2 tables and the host ranges its entries hold.
struct LayerRefs {
    /// (L1 index, L2 table offset)
    tables: Vec<(usize, u64)>,
    /// (host offset, length) of data, zero-allocated and compressed clusters.
    data: Vec<(u64, u64)>,
}

/// What a new state looks like before it is published.
struct NewState {
    size: u64,
    snapshots: Vec<SnapshotEntry>,
}

impl Image {
    /// The snapshot list, as `qemu-img info` shows it.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.info().snapshots
    }

    /// Creates an internal snapshot of the current state, named `name`, taken at `time`.
    pub fn create_snapshot(&self, name: &str, time: SnapshotTime) -> Result<SnapshotInfo> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        self.refuse_with_data_file(&m)?;
        if m.header.nb_snapshots >= MAX_SNAPSHOTS {
            return Err(self.refused(format!("the image already has {MAX_SNAPSHOTS} snapshots")));
        }
        if name.len() > u16::MAX as usize || time.nanos >= 1_000_000_000 {
            return Err(self.refused(
                "the snapshot name is longer than 65535 bytes or the time is invalid".into(),
            ));
        }
        self.flush_all(&mut m)?;
        let active = self.layer_refs(&m, &m.l1.clone(), m.header.l1_table_offset)?;

        let id = next_id(&m.snapshots);
        let mut extra = vec![0u8; SNAPSHOT_EXTRA_KNOWN_SIZE];
        extra[8..16].copy_from_slice(&m.header.size.to_be_bytes());
        extra.extend_from_slice(&TIME64_TAG);
        extra.extend_from_slice(&time.secs.to_be_bytes());
        let entry = SnapshotEntry {
            l1_table_offset: m.header.l1_table_offset,
            l1_size: m.header.l1_size,
            id: id.clone().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: time.secs as u32,
            date_nsec: time.nanos,
            vm_clock_nsec: 0,
            vm_state_size32: 0,
            extra,
        };
        let mut snapshots = m.snapshots.clone();
        snapshots.push(entry);
        let size = m.header.size;
        let old_l1 = m.l1.clone();
        // The snapshot keeps the current L1 and L2 tables; the active layer gets copies.
        self.transition(
            &mut m,
            Deltas::default(),
            &old_l1,
            NewState { size, snapshots },
            &active,
            false,
        )?;
        drop(m);
        Ok(self
            .snapshots()
            .into_iter()
            .find(|s| s.id == id)
            .expect("the new snapshot is listed"))
    }

    /// Deletes the snapshot with id `id_or_name`, else the first named so.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        let entry = find_snapshot(&m.snapshots, id_or_name)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: id_or_name.to_string(),
            })?;
        self.flush_all(&mut m)?;
        let cb = m.header.cluster_bits;
        let cs = m.header.cluster_size();
        let snap_l1 = self.snapshot_l1(&m, &entry)?;
        let gone = self.layer_refs(&m, &snap_l1, entry.l1_table_offset)?;
        // After publishing, the snapshot's L1, its tables and their paths to data are gone.
        let mut deltas = Deltas::default();
        deltas.add(entry.l1_table_offset, entry.l1_size as u64 * 8, -1, cb);
        for &(_, t) in &gone.tables {
            deltas.add(t, cs, -1, cb);
        }
        for &(off, len) in &gone.data {
            deltas.add(off, len, -1, cb);
        }
        let active = self.layer_refs(&m, &m.l1.clone(), m.header.l1_table_offset)?;
        let snapshots: Vec<SnapshotEntry> = m
            .snapshots
            .iter()
            .filter(|s| s.id != entry.id)
            .cloned()
            .collect();
        let size = m.header.size;
        let old_l1 = m.l1.clone();
        // The active layer is rebuilt so its COPIED bits match the lowered refcounts.
        self.transition(
            &mut m,
            deltas,
            &old_l1,
            NewState { size, snapshots },
            &active,
            true,
        )
    }

    /// Makes the snapshot with id `id_or_name` (else the first named so) the active state,
    /// resizing the disk to the snapshot's size as QEMU 10 does.
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.require_writable()?;
        let mut m = self.meta_mut();
        self.refuse_with_data_file(&m)?;
        let entry = find_snapshot(&m.snapshots, id_or_name)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: id_or_name.to_string(),
            })?;
        self.flush_all(&mut m)?;
        let snap_l1 = self.snapshot_l1(&m, &entry)?;
        let source = self.layer_refs(&m, &snap_l1, entry.l1_table_offset)?;
        let size = entry.disk_size().unwrap_or(m.header.size);
        let l1_len = (snap_l1.len() as u64).max(m.header.l1_entries_for(size)) as usize;
        let mut l1 = snap_l1.clone();
        l1.resize(l1_len, 0);
        let snapshots = m.snapshots.clone();
        // The active layer becomes copies of the snapshot's tables; the old one goes.
        self.transition(
            &mut m,
            Deltas::default(),
            &l1,
            NewState { size, snapshots },
            &source,
            true,
        )
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
        let cs = m.header.cluster_size();
        let extended = m.header.extended_l2();
        let mut refs = LayerRefs {
            tables: Vec::new(),
            data: Vec::new(),
        };
        for (i, &e) in l1.iter().enumerate() {
            let t = e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let table = self.l2_table(m, t, i as u64, l1_offset)?;
            refs.tables.push((i, t));
            for j in 0..1usize << m.header.l2_bits() {
                let raw = be_u64_at(&table, if extended { j * 2 } else { j });
                match classify_standard(if extended { raw & !1 } else { raw }, false) {
                    ClusterMapping::Normal { host_offset }
                    | ClusterMapping::ZeroAllocated { host_offset } => {
                        refs.data.push((host_offset, cs))
                    }
                    ClusterMapping::Compressed { descriptor } => {
                        let d = CompressedDescriptor::decode(descriptor, m.header.cluster_bits);
                        refs.data.push((d.host_offset, d.compressed_size()));
                    }
                    _ => {}
                }
            }
        }
        Ok(refs)
    }

    /// Refuses, before any write, a change that would overflow or underflow a refcount.
    fn check_overflow(&self, m: &mut Meta, deltas: &Deltas) -> Result<()> {
        let host = self.host();
        let rc = &mut m.ws_mut()?.refcounts;
        let max = rc.max();
        for (&k, &d) in &deltas.0 {
            let v = rc.get(host, k)? as i128 + d as i128;
            if v < 0 || v > max as i128 {
                return Err(self.refused(format!(
                    "cluster {k} would need a refcount of {v}, outside 0..={max} for {}-bit refcounts",
                    m.header.refcount_bits()
                )));
            }
        }
        Ok(())
    }

    /// Builds the new state in fresh clusters and publishes it. `l1_source` becomes the new
    /// active L1, with the L2 tables listed in `source` copied for the active layer (each copy
    /// adds a path to the data it maps). With `retire_active`, the old active L1, its tables and
    /// their paths go away; otherwise they now belong to a snapshot. `deltas` holds the other
    /// refcount changes.
    fn transition(
        &self,
        m: &mut Meta,
        mut deltas: Deltas,
        l1_source: &[u64],
        mut new: NewState,
        source: &LayerRefs,
        retire_active: bool,
    ) -> Result<()> {
        let cs = m.header.cluster_size();
        let cb = m.header.cluster_bits;
        for &(off, len) in &source.data {
            deltas.add(off, len, 1, cb);
        }
        if retire_active {
            let old = self.layer_refs(m, &m.l1.clone(), m.header.l1_table_offset)?;
            deltas.add(
                m.header.l1_table_offset,
                m.header.l1_size as u64 * 8,
                -1,
                cb,
            );
            for &(_, t) in &old.tables {
                deltas.add(t, cs, -1, cb);
            }
            for &(off, len) in &old.data {
                deltas.add(off, len, -1, cb);
            }
        }
        self.check_overflow(m, &deltas)?;
        let result = (|| -> Result<Vec<(u64, u64)>> {
            let host = self.host();
            // The refcount each cluster ends with decides its COPIED bit in the new tables.
            let mut after: HashMap<u64, u64> = HashMap::new();
            for (&k, &d) in &deltas.0 {
                let v = m.ws_mut()?.refcounts.get(host, k)? as i64 + d;
                after.insert(k, v.max(0) as u64);
            }
            let rc_after = |m: &mut Meta, after: &HashMap<u64, u64>, k: u64| -> Result<u64> {
                match after.get(&k) {
                    Some(&v) => Ok(v),
                    None => m.ws_mut()?.refcounts.get(host, k),
                }
            };
            // Copies of the source L2 tables for the new active layer.
            let extended = m.header.extended_l2();
            let mut l1 = l1_source.to_vec();
            for &(i, t) in &source.tables {
                let table = self.l2_table(m, t, i as u64, 0)?;
                let mut copy = table.to_vec();
                for j in 0..1usize << m.header.l2_bits() {
                    let idx = if extended { j * 2 } else { j };
                    let raw = be_u64_at(&copy, idx);
                    let host_offset =
                        match classify_standard(if extended { raw & !1 } else { raw }, false) {
                            ClusterMapping::Normal { host_offset }
                            | ClusterMapping::ZeroAllocated { host_offset } => host_offset,
                            _ => continue,
                        };
                    let sole = rc_after(m, &after, host_offset >> cb)? == 1;
                    put_be_u64_at(
                        &mut copy,
                        idx,
                        if sole { raw | COPIED } else { raw & !COPIED },
                    );
                }
                let at = self.alloc(m, 1)?;
                self.guard(m, at, cs, None)?;
                host.write(&copy, at, "new L2 table")?;
                l1[i] = at | COPIED;
            }
            // The new active L1 and snapshot table.
            let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
            let l1_at = self.alloc(m, l1_clusters)?;
            let mut l1_bytes = vec![0u8; (l1_clusters * cs) as usize];
            for (i, e) in l1.iter().enumerate() {
                put_be_u64_at(&mut l1_bytes, i, *e);
            }
            self.guard(m, l1_at, l1_clusters * cs, None)?;
            host.write(&l1_bytes, l1_at, "new L1 table")?;
            let table = encode_table(&new.snapshots);
            if table.len() as u64 > MAX_SNAPSHOTS_SIZE {
                return Err(self.refused("the snapshot table would exceed 64 MiB".into()));
            }
            let table_at = if new.snapshots.is_empty() {
                0
            } else {
                let clusters = (table.len() as u64).div_ceil(cs);
                let at = self.alloc(m, clusters)?;
                self.guard(m, at, clusters * cs, None)?;
                host.write(&table, at, "new snapshot table")?;
                at
            };
            host.sync()?;
            // Raised refcounts are durable before anything points at them.
            let increases: Vec<(u64, i64)> = deltas
                .0
                .iter()
                .filter(|(_, &d)| d > 0)
                .map(|(&k, &d)| (k, d))
                .collect();
            for &(k, d) in &increases {
                m.ws_mut()?.refcounts.adjust(host, k << cb, 1, d)?;
            }
            self.flush_refblocks(m)?;

            // Publish: one write inside the first sector.
            let mut header = [0u8; 48];
            header[0..8].copy_from_slice(&new.size.to_be_bytes());
            header[8..12].copy_from_slice(&m.header.crypt_method.to_be_bytes());
            header[12..16].copy_from_slice(&(l1.len() as u32).to_be_bytes());
            header[16..24].copy_from_slice(&l1_at.to_be_bytes());
            header[24..32].copy_from_slice(&m.header.refcount_table_offset.to_be_bytes());
            header[32..36].copy_from_slice(&m.header.refcount_table_clusters.to_be_bytes());
            header[36..40].copy_from_slice(&(new.snapshots.len() as u32).to_be_bytes());
            header[40..48].copy_from_slice(&table_at.to_be_bytes());
            host.write_sync(&header, 24, "header (state switch)")?;

            let old_l1 = (m.header.l1_table_offset, m.header.l1_size as u64 * 8);
            let old_table = (m.header.snapshots_offset, m.snapshot_table_len);
            m.header.size = new.size;
            m.header.l1_size = l1.len() as u32;
            m.header.l1_table_offset = l1_at;
            m.header.nb_snapshots = new.snapshots.len() as u32;
            m.header.snapshots_offset = table_at;
            m.snapshot_table_len = table.len() as u64;
            m.l1 = std::mem::take(&mut l1);
            m.snapshots = std::mem::take(&mut new.snapshots);
            for area in m.metadata_areas.iter_mut() {
                if area.what == "the active L1 table" {
                    area.start = l1_at;
                    area.end = l1_at + l1_clusters * cs;
                }
            }
            m.metadata_areas.retain(|a| a.what != "the snapshot table");
            if table_at != 0 {
                m.metadata_areas.push(super::MetadataArea {
                    start: table_at,
                    end: table_at + (table.len() as u64).next_multiple_of(cs),
                    what: "the snapshot table",
                });
            }
            Ok(vec![old_l1, old_table])
        })();

        match result {
            Ok(retired) => {
                // The switch is durable: drop what the old state held.
                let host = self.host();
                // The old snapshot table always goes.
                let old_table = retired[1];
                deltas.add(old_table.0, old_table.1, -1, cb);
                let decreases: Vec<(u64, i64)> = deltas
                    .0
                    .iter()
                    .filter(|(_, &d)| d < 0)
                    .map(|(&k, &d)| (k, d))
                    .collect();
                for (k, d) in decreases {
                    let rc = &mut m.ws_mut()?.refcounts;
                    rc.adjust(host, k << cb, 1, d)?;
                    if rc.get(host, k)? == 0 {
                        self.l2_cache.remove(k << cb);
                    }
                }
                self.flush_refblocks(m)?;
                host.sync()
            }
            Err(e) => {
                // Nothing was published: forget the cached refcount changes so the image stays as
                // it was (anything already written lies in clusters nothing references).
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
                Err(e)
            }
        }
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
