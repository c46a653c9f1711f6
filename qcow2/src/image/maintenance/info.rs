//! What `qemu-img info` shows about an image, as plain data (the CLI turns it into qemu-img's
//! JSON keys).

use crate::format::SnapshotTime;
use crate::image::Image;

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// Wall-clock time with 64-bit seconds.
    pub time: SnapshotTime,
    /// `date_sec` as stored (the low 32 bits QEMU shows).
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub icount: Option<u64>,
    pub disk_size: Option<u64>,
}

/// Image facts, as `qemu-img info` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub corrupt: bool,
    pub dirty: bool,
    pub extended_l2: bool,
    pub compression_type: &'static str,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub file_length: u64,
    pub snapshots: Vec<SnapshotInfo>,
}

impl Image {
    /// Everything `qemu-img info` shows about this image.
    pub fn info(&self) -> ImageInfo {
        use crate::format::features::Autoclear;
        let m = self.meta();
        let h = &m.header;
        ImageInfo {
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            refcount_bits: h.refcount_bits(),
            lazy_refcounts: h.lazy_refcounts(),
            corrupt: h.is_corrupt(),
            dirty: h.is_dirty(),
            extended_l2: h.extended_l2(),
            compression_type: h.compression_type.name(),
            // From the guard held here: taking the lock again would wait behind a queued
            // writer that waits for this guard.
            backing_file: h
                .backing_file
                .as_ref()
                .map(|n| String::from_utf8_lossy(n).into_owned()),
            // A format without a backing file means nothing (QEMU does not show it).
            backing_format: h
                .extensions
                .backing_format
                .as_ref()
                .filter(|_| h.backing_file.is_some())
                .map(|f| String::from_utf8_lossy(f).into_owned()),
            data_file: self.data_file_name.clone(),
            data_file_raw: h.autoclear_features & Autoclear::RAW_EXTERNAL_DATA != 0,
            file_length: m.file_len,
            snapshots: m
                .snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id_str(),
                    name: s.name_str(),
                    time: s.time(),
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s.vm_state_size(),
                    icount: s.icount(),
                    disk_size: s.disk_size(),
                })
                .collect(),
        }
    }
}
