//! Guest-to-host mapping of one layer (the active state or a snapshot): L1 → L2 (cached) → a run
//! of guest bytes with one meaning. Every entry is checked where it is used: reserved bits,
//! alignment, end of file and overlap with the header, L1, refcount or snapshot tables.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::limits::SUBCLUSTERS_PER_CLUSTER;
use crate::format::table::{
    be_u64_at, classify_standard, ClusterMapping, L1Entry, SubclusterBitmap, SubclusterState,
    L2_STD_RESERVED_MASK, OFFSET_MASK,
};
use crate::format::CompressedDescriptor;
use crate::image::{Image, Meta};
use crate::storage::{Event, StorageExt};

/// What a run of guest bytes maps to in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Not allocated in this layer: the backing chain decides.
    Unallocated,
    /// Unallocated subclusters of an allocated cluster (extended L2): the backing chain decides,
    /// and the host space at `host_offset` stays reserved.
    UnallocatedAlloc { host_offset: u64 },
    /// Reads as zeros; `host_offset` is set when a host cluster stays preallocated.
    Zero { host_offset: Option<u64> },
    /// Guest data at `host_offset` (in the data file when there is one).
    Data { host_offset: u64 },
    /// A compressed cluster; the run lies inside it.
    Compressed {
        descriptor: CompressedDescriptor,
        raw: u64,
    },
}

impl Run {
    /// Whether `next` continues this run of `len` bytes seamlessly.
    fn continues_with(self, len: u64, next: Run) -> bool {
        match (self, next) {
            (Run::Unallocated, Run::Unallocated) => true,
            (
                Run::UnallocatedAlloc { host_offset: a },
                Run::UnallocatedAlloc { host_offset: b },
            ) => a + len == b,
            (Run::Zero { host_offset: None }, Run::Zero { host_offset: None }) => true,
            (
                Run::Zero {
                    host_offset: Some(a),
                },
                Run::Zero {
                    host_offset: Some(b),
                },
            ) => a + len == b,
            (Run::Data { host_offset: a }, Run::Data { host_offset: b }) => a + len == b,
            _ => false,
        }
    }
}

/// One layer's L1 table and where it lives on disk (for messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer<'a> {
    pub l1: &'a [u64],
    pub l1_offset: u64,
}

impl Meta {
    /// The active layer.
    pub(crate) fn active(&self) -> Layer<'_> {
        Layer {
            l1: &self.l1,
            l1_offset: self.header.l1_table_offset,
        }
    }
}

impl Image {
    /// Where the L1 entry `index` of a table at `l1_offset` lives, for messages.
    fn l1_entry_at(l1_offset: u64, index: u64) -> u64 {
        l1_offset + index * 8
    }

    /// The first run of guest bytes in `[offset, offset + max_len)` of `layer`, and its length.
    /// The run stays within one L1 entry's range.
    pub(crate) fn lookup(
        &self,
        m: &Meta,
        layer: Layer<'_>,
        offset: u64,
        max_len: u64,
    ) -> Result<(Run, u64)> {
        let Layer { l1, l1_offset } = layer;
        let h = &m.header;
        let cluster_bits = h.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let l1_shift = h.l1_shift();
        let l1_index = offset >> l1_shift;
        let l1_range_end = (l1_index + 1) << l1_shift;
        let end = offset + max_len.min(l1_range_end - offset);

        let Some(&raw_l1) = l1.get(l1_index as usize) else {
            // Past the L1 table nothing is allocated: the whole rest of the request is one run.
            return Ok((Run::Unallocated, max_len));
        };
        let l1e = L1Entry(raw_l1);
        if l1e.reserved_bits() != 0 {
            return Err(Error::corrupt(
                &self.name,
                format!("L1 entry {l1_index}"),
                Self::l1_entry_at(l1_offset, l1_index),
                format!("reserved bits {:#x} are set", l1e.reserved_bits()),
            ));
        }
        let l2_offset = l1e.l2_offset();
        if l2_offset == 0 {
            return Ok((Run::Unallocated, end - offset));
        }
        let l2_mask = (1u64 << h.l2_bits()) - 1;
        let mut index = (offset >> cluster_bits) & l2_mask;
        let (table, base) = self.l2_for_read(m, l2_offset, l1_index, l1_offset, index)?;
        let table_end = base + table.len() as u64 / h.l2_entry_size();
        let mut pos = offset;
        let (run, len) = self.entry_run(
            m,
            (&table, base),
            l2_offset,
            index,
            pos & (cluster_size - 1),
            end - pos,
        )?;
        if h.has_external_data_file() {
            self.check_identity_mapping(run, offset, l2_offset + index * h.l2_entry_size(), index)?;
        }
        let first = run;
        let mut total = len;
        pos += len;
        if matches!(first, Run::Compressed { .. }) {
            return Ok((first, total));
        }
        // Extend across following entries while the mapping continues seamlessly.
        while pos < end && pos & (cluster_size - 1) == 0 && index + 1 < table_end {
            index += 1;
            let (next, len) = self.entry_run(m, (&table, base), l2_offset, index, 0, end - pos)?;
            if !first.continues_with(total, next) {
                break;
            }
            total += len;
            pos += len;
        }
        Ok((first, total))
    }

    /// The part of the L2 table at `l2_offset` that holds entry `index`, and the index of its
    /// first entry. A read-only image caches 4 KiB slices, so a miss reads 4 KiB instead of a
    /// whole table (QEMU's `l2-cache-entry-size`); a writer's tables are cached whole, because
    /// its changes are made and written back per table.
    fn l2_for_read(
        &self,
        m: &Meta,
        l2_offset: u64,
        l1_index: u64,
        l1_offset: u64,
        index: u64,
    ) -> Result<(Arc<[u8]>, u64)> {
        if self.writable {
            return Ok((self.l2_table(m, l2_offset, l1_index, l1_offset)?, 0));
        }
        self.check_l2_offset(m, l2_offset, l1_index, l1_offset)?;
        let slice_len = l2_slice_len(m.header.cluster_size());
        let per_slice = slice_len / m.header.l2_entry_size();
        let first = index - index % per_slice;
        let at = l2_offset + first * m.header.l2_entry_size();
        let slice = self
            .l2_slices
            .get_or_load(at, slice_len as usize, |bytes| {
                self.storage.event(Event::L2Load);
                self.storage.read_zero_filled_at(bytes, at).map_err(|e| {
                    Error::io(
                        &self.name,
                        format!("reading the L2 table slice at {at:#x}"),
                        e,
                    )
                })
            })?;
        Ok((slice, first))
    }

    /// Loads (or finds cached) the L2 table at `l2_offset`, named by L1 entry `l1_index`.
    pub(crate) fn l2_table(
        &self,
        m: &Meta,
        l2_offset: u64,
        l1_index: u64,
        l1_offset: u64,
    ) -> Result<Arc<[u8]>> {
        self.check_l2_offset(m, l2_offset, l1_index, l1_offset)?;
        let cluster_size = m.header.cluster_size();
        self.l2_cache
            .get_or_load(l2_offset, cluster_size as usize, |bytes| {
                self.storage.event(Event::L2Load);
                self.storage
                    .read_zero_filled_at(bytes, l2_offset)
                    .map_err(|e| {
                        Error::io(
                            &self.name,
                            format!("reading the L2 table at {l2_offset:#x}"),
                            e,
                        )
                    })
            })
    }

    /// An L2 table offset must be cluster aligned, inside the file and clear of the metadata.
    fn check_l2_offset(
        &self,
        m: &Meta,
        l2_offset: u64,
        l1_index: u64,
        l1_offset: u64,
    ) -> Result<()> {
        let cluster_size = m.header.cluster_size();
        let structure = || format!("L1 entry {l1_index}");
        let at = Self::l1_entry_at(l1_offset, l1_index);
        if l2_offset & (cluster_size - 1) != 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                at,
                format!("L2 table offset {l2_offset:#x} is not cluster aligned"),
            ));
        }
        if l2_offset >= m.file_len {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                at,
                format!(
                    "L2 table offset {l2_offset:#x} is beyond the end of the file ({:#x})",
                    m.file_len
                ),
            ));
        }
        if let Some(area) = m.overlapping_area(l2_offset, cluster_size) {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                at,
                format!("L2 table at {l2_offset:#x} overlaps {}", area.what),
            ));
        }
        Ok(())
    }

    /// The run starting `in_cluster` bytes into the cluster of L2 entry `index`, at most `max_len`
    /// bytes and never past the cluster's end.
    /// `table` holds the entries from index `base` on (a slice or the whole table).
    fn entry_run(
        &self,
        m: &Meta,
        (table, base): (&[u8], u64),
        l2_offset: u64,
        index: u64,
        in_cluster: u64,
        max_len: u64,
    ) -> Result<(Run, u64)> {
        let h = &m.header;
        let cluster_size = h.cluster_size();
        let extended = h.extended_l2();
        let external = h.has_external_data_file();
        let entry_offset = l2_offset + index * h.l2_entry_size();
        let structure = || format!("L2 entry {index}");
        let at = (index - base) as usize;
        let raw = be_u64_at(table, if extended { at * 2 } else { at });
        let to_cluster_end = (cluster_size - in_cluster).min(max_len);

        let mapping = classify_standard(raw, external);
        if let ClusterMapping::Compressed { descriptor } = mapping {
            // A compressed cluster has no subclusters: its bitmap word is unused (QEMU reads
            // such a cluster all the same).
            return Ok((
                self.compressed_run(m, descriptor, raw, entry_offset, structure)?,
                to_cluster_end,
            ));
        }
        if raw & L2_STD_RESERVED_MASK != 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!("reserved bits {:#x} are set", raw & L2_STD_RESERVED_MASK),
            ));
        }
        let host = raw & OFFSET_MASK;
        if host & (cluster_size - 1) != 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!("data cluster offset {host:#x} is not cluster aligned"),
            ));
        }

        if extended {
            // Word 0's zero flag means nothing here; the bitmap decides per subcluster.
            let allocated = host != 0 || (external && raw & crate::format::table::COPIED != 0);
            let bitmap = SubclusterBitmap(be_u64_at(table, at * 2 + 1));
            if !bitmap.is_valid(allocated) {
                return Err(Error::corrupt(
                    &self.name,
                    structure(),
                    entry_offset,
                    format!("invalid subcluster bitmap {:#018x}", bitmap.0),
                ));
            }
            let sc_bits = h.cluster_bits - SUBCLUSTERS_PER_CLUSTER.trailing_zeros();
            let sc = (in_cluster >> sc_bits) as u32;
            let run_end = ((sc + bitmap.run_length(sc, allocated)) as u64) << sc_bits;
            let len = (run_end - in_cluster).min(max_len);
            let run = match bitmap.state(sc, allocated) {
                SubclusterState::Unallocated if allocated => Run::UnallocatedAlloc {
                    host_offset: host + in_cluster,
                },
                SubclusterState::Unallocated => Run::Unallocated,
                SubclusterState::Zero => Run::Zero {
                    host_offset: allocated.then_some(host + in_cluster),
                },
                SubclusterState::Allocated => {
                    self.check_data_cluster(m, host, entry_offset, structure)?;
                    Run::Data {
                        host_offset: host + in_cluster,
                    }
                }
                SubclusterState::Invalid => unreachable!("bitmap validated above"),
            };
            return Ok((run, len));
        }

        let run = match mapping {
            ClusterMapping::Unallocated => Run::Unallocated,
            ClusterMapping::Zero | ClusterMapping::ZeroAllocated { .. } if h.version < 3 => {
                return Err(Error::corrupt(
                    &self.name,
                    structure(),
                    entry_offset,
                    "zero cluster flag in a version 2 image",
                ))
            }
            ClusterMapping::Zero => Run::Zero { host_offset: None },
            ClusterMapping::ZeroAllocated { host_offset } => Run::Zero {
                host_offset: Some(host_offset + in_cluster),
            },
            ClusterMapping::Normal { host_offset } => {
                self.check_data_cluster(m, host_offset, entry_offset, structure)?;
                Run::Data {
                    host_offset: host_offset + in_cluster,
                }
            }
            ClusterMapping::Compressed { .. } => unreachable!("handled above"),
        };
        Ok((run, to_cluster_end))
    }

    /// A data cluster must lie inside the file and outside the metadata areas (data in an
    /// external data file is checked by that file's length only when read).
    /// With an external data file every guest cluster lives at its own offset in that file;
    /// writes go there, so an entry that maps elsewhere would make reads and writes disagree.
    /// QEMU refuses such an entry as corruption; so does this engine, for reads and writes.
    fn check_identity_mapping(
        &self,
        run: Run,
        guest: u64,
        entry_offset: u64,
        index: u64,
    ) -> Result<()> {
        let host = match run {
            Run::Data { host_offset }
            | Run::UnallocatedAlloc { host_offset }
            | Run::Zero {
                host_offset: Some(host_offset),
            } => host_offset,
            _ => return Ok(()),
        };
        if host != guest {
            return Err(Error::corrupt(
                &self.name,
                format!("L2 entry {index}"),
                entry_offset,
                format!(
                    "external data file offset {host:#x} does not match guest offset {guest:#x}, which is not allowed"
                ),
            ));
        }
        Ok(())
    }

    fn check_data_cluster(
        &self,
        m: &Meta,
        host: u64,
        entry_offset: u64,
        structure: impl Fn() -> String,
    ) -> Result<()> {
        if m.header.has_external_data_file() {
            return Ok(());
        }
        if host >= m.file_len {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!(
                    "data cluster offset {host:#x} is beyond the end of the file ({:#x})",
                    m.file_len
                ),
            ));
        }
        if let Some(area) = m.overlapping_area(host, m.header.cluster_size()) {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!("data cluster at {host:#x} overlaps {}", area.what),
            ));
        }
        Ok(())
    }

    fn compressed_run(
        &self,
        m: &Meta,
        descriptor_bits: u64,
        raw: u64,
        entry_offset: u64,
        structure: impl Fn() -> String,
    ) -> Result<Run> {
        if m.header.has_external_data_file() {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                "compressed cluster in an image with an external data file",
            ));
        }
        if raw & crate::format::table::COPIED != 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                "compressed cluster with the COPIED flag set",
            ));
        }
        let descriptor = CompressedDescriptor::decode(descriptor_bits, m.header.cluster_bits);
        if descriptor.offset_out_of_range() || descriptor.host_offset >= m.file_len {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!(
                    "compressed data at {:#x} is beyond the end of the file ({:#x})",
                    descriptor.host_offset, m.file_len
                ),
            ));
        }
        if let Some(area) = m.overlapping_area(descriptor.host_offset, descriptor.compressed_size())
        {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                entry_offset,
                format!(
                    "compressed data at {:#x} overlaps {}",
                    descriptor.host_offset, area.what
                ),
            ));
        }
        Ok(Run::Compressed { descriptor, raw })
    }

    /// Reads guest bytes of `layer`.
    pub(crate) fn read_layer(
        &self,
        m: &Meta,
        layer: Layer<'_>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let cluster_mask = m.header.cluster_size() - 1;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (run, len) = self.lookup(m, layer, guest, (buf.len() - pos) as u64)?;
            let chunk = &mut buf[pos..pos + len as usize];
            match run {
                Run::Unallocated | Run::UnallocatedAlloc { .. } => {
                    self.read_backing(chunk, guest)?
                }
                Run::Zero { .. } => chunk.fill(0),
                Run::Data { host_offset } => self.read_data(m, chunk, host_offset, guest)?,
                Run::Compressed { descriptor, raw } => {
                    self.read_compressed(m, descriptor, raw, chunk, guest & cluster_mask)?
                }
            }
            pos += len as usize;
        }
        Ok(())
    }

    fn read_data(&self, m: &Meta, buf: &mut [u8], host_offset: u64, guest: u64) -> Result<()> {
        if let Some(enc) = &self.encryption {
            // Whole sectors are read and decrypted; a cluster holds whole sectors, so the span
            // stays inside it.
            let (start, end) = crate::image::encryption::sector_span(host_offset, buf.len() as u64);
            let head = (host_offset - start) as usize;
            let mut sectors = vec![0u8; (end - start) as usize];
            self.read_plain_data(m, &mut sectors, start)?;
            enc.decrypt(&self.name, start, guest - head as u64, &mut sectors)?;
            buf.copy_from_slice(&sectors[head..head + buf.len()]);
            return Ok(());
        }
        self.read_plain_data(m, buf, host_offset)
    }

    fn read_plain_data(&self, m: &Meta, buf: &mut [u8], host_offset: u64) -> Result<()> {
        let storage = if m.header.has_external_data_file() {
            self.data_file.as_deref().ok_or_else(|| Error::Chain {
                image: self.name.clone(),
                role: "data",
                file: self.data_file_name.clone().unwrap_or_default(),
                problem: crate::error::ChainProblem::RefusedByPolicy,
            })?
        } else {
            &*self.storage
        };
        storage.event(Event::ReadAio);
        storage
            .read_zero_filled_at(buf, host_offset)
            .map_err(|e| Error::io(&self.name, format!("reading data at {host_offset:#x}"), e))
    }

    fn read_compressed(
        &self,
        m: &Meta,
        descriptor: CompressedDescriptor,
        raw: u64,
        buf: &mut [u8],
        in_cluster: u64,
    ) -> Result<()> {
        let start = in_cluster as usize;
        let mut last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((key, bytes)) = last.as_ref() {
            if *key == raw {
                buf.copy_from_slice(&bytes[start..start + buf.len()]);
                return Ok(());
            }
        }
        let cluster_size = m.header.cluster_size() as usize;
        let mut input = vec![0u8; descriptor.compressed_size() as usize];
        self.storage
            .read_zero_filled_at(&mut input, descriptor.host_offset)
            .map_err(|e| {
                Error::io(
                    &self.name,
                    format!("reading compressed data at {:#x}", descriptor.host_offset),
                    e,
                )
            })?;
        let mut out = vec![0u8; cluster_size].into_boxed_slice();
        crate::image::codec::decompress(m.header.compression_type, &input, &mut out).map_err(
            |reason| {
                Error::corrupt(
                    &self.name,
                    "compressed cluster",
                    descriptor.host_offset,
                    reason,
                )
            },
        )?;
        buf.copy_from_slice(&out[start..start + buf.len()]);
        *last = Some((raw, out));
        Ok(())
    }
}

/// Bytes per cached slice of a read-only image's L2 tables: a 4 KiB page, or the whole table
/// when clusters are smaller.
pub(crate) fn l2_slice_len(cluster_size: u64) -> u64 {
    cluster_size.min(4096)
}
