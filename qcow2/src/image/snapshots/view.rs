//! Read-only views of internal snapshots, found by id first and then by name (as qemu-img looks
//! them up). A view reads through the snapshot's own L1 table and the image's backing chain.

use crate::error::{Error, Result};
use crate::format::limits::MAX_L1_ENTRIES;
use crate::format::SnapshotEntry;
use crate::image::layer::Layer;
use crate::image::map::Extent;
use crate::image::Image;

/// A read-only view of one internal snapshot.
pub struct SnapshotView<'a> {
    image: &'a Image,
    entry: SnapshotEntry,
    l1: Vec<u64>,
    size: u64,
}

impl std::fmt::Debug for SnapshotView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("image", &self.image.name)
            .field("id", &self.entry.id_str())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// The snapshot whose id is `id_or_name`, else the first whose name is.
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<SnapshotEntry> {
        find_snapshot(&self.meta().snapshots, id_or_name).cloned()
    }

    /// Opens a read-only view of a snapshot, validating its L1 table first.
    pub fn open_snapshot(&self, id_or_name: &str) -> Result<SnapshotView<'_>> {
        let m = self.meta();
        let entry = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: id_or_name.to_string(),
            })?;
        let structure = || format!("L1 table of snapshot {}", entry.id_str());
        let offset = entry.l1_table_offset;
        if entry.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                offset,
                format!("{} entries exceed the 32 MiB L1 limit", entry.l1_size),
            ));
        }
        if offset % m.header.cluster_size() != 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                offset,
                "offset is not cluster aligned",
            ));
        }
        if entry.l1_size > 0 && offset == 0 {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                offset,
                "overlaps the header",
            ));
        }
        let size = entry.disk_size().unwrap_or(m.header.size);
        if size > crate::format::limits::MAX_VIRTUAL_SIZE
            || m.header.l1_entries_for(size) > entry.l1_size as u64
        {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                offset,
                format!(
                    "{} entries cannot cover the snapshot's disk size {size}",
                    entry.l1_size
                ),
            ));
        }
        let bytes = entry.l1_size as u64 * 8;
        if offset.checked_add(bytes).is_none_or(|end| end > m.file_len) {
            return Err(Error::corrupt(
                &self.name,
                structure(),
                offset,
                "runs past the end of the file",
            ));
        }
        let l1 = self.read_table(offset, entry.l1_size as u64, "snapshot L1 table")?;
        Ok(SnapshotView {
            image: self,
            entry,
            l1,
            size,
        })
    }
}

impl SnapshotView<'_> {
    fn layer(&self) -> Layer<'_> {
        Layer {
            l1: &self.l1,
            l1_offset: self.entry.l1_table_offset,
        }
    }

    /// The snapshot table entry.
    pub fn entry(&self) -> &SnapshotEntry {
        &self.entry
    }

    /// Virtual size when the snapshot was taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads guest bytes as they were when the snapshot was taken.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image
            .check_bounds(offset, buf.len() as u64, self.size)?;
        let m = self.image.meta();
        self.image.read_layer(&m, self.layer(), buf, offset)
    }

    /// The snapshot's extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.image.check_bounds(offset, len, self.size)?;
        let mut out = Vec::new();
        let m = self.image.meta();
        self.image
            .map_layer(&m, self.layer(), offset, len, 0, &mut out)?;
        Ok(out)
    }
}

/// The snapshot whose id is `id_or_name`, else the first whose name is (qemu-img's lookup order).
pub(crate) fn find_snapshot<'a>(
    snapshots: &'a [SnapshotEntry],
    id_or_name: &str,
) -> Option<&'a SnapshotEntry> {
    let key = id_or_name.as_bytes();
    snapshots
        .iter()
        .find(|s| s.id == key)
        .or_else(|| snapshots.iter().find(|s| s.name == key))
}
