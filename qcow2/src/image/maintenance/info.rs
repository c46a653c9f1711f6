//! What `qemu-img info` shows about an image, as plain data (the CLI turns it into qemu-img's
//! JSON keys).

use crate::format::SnapshotTime;
use crate::image::Image;

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The unique id (QEMU numbers them 1, 2, ...).
    pub id: String,
    /// The name (not necessarily unique).
    pub name: String,
    /// Wall-clock time with 64-bit seconds.
    pub time: SnapshotTime,
    /// `date_sec` as stored (the low 32 bits QEMU shows).
    pub date_sec: u32,
    /// Nanoseconds of the creation time.
    pub date_nsec: u32,
    /// The guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// The guest instruction count when taken, if the extra data records one.
    pub icount: Option<u64>,
    /// The virtual disk size when taken, in bytes, if the extra data records it.
    pub disk_size: Option<u64>,
}

/// Image facts, as `qemu-img info` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// The corrupt incompatible bit.
    pub corrupt: bool,
    /// The dirty incompatible bit (refcounts may be stale).
    pub dirty: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// The backing file name as the header records it.
    pub backing_file: Option<String>,
    /// The backing format from the header extension.
    pub backing_format: Option<String>,
    /// Whether guest data lives in an external data file (named or not).
    pub has_data_file: bool,
    /// The external data file name from the header extension.
    pub data_file: Option<String>,
    /// The raw external data autoclear bit.
    pub data_file_raw: bool,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// Internal snapshots, in table order.
    pub snapshots: Vec<SnapshotInfo>,
    /// The encryption format: "aes" (legacy) or "luks"; `None` for a clear image.
    pub encryption_format: Option<&'static str>,
    /// The LUKS header of a LUKS image.
    pub luks: Option<crate::crypto::luks::Luks>,
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
            has_data_file: h.has_external_data_file(),
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
            encryption_format: match h.crypt_method {
                crate::crypto::CRYPT_AES => Some("aes"),
                crate::crypto::CRYPT_LUKS => Some("luks"),
                _ => None,
            },
            luks: self.encryption.as_ref().and_then(|e| e.luks()),
        }
    }

    /// Whether guest data is stored encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// Adds or erases LUKS key slots (`qemu-img amend -o encrypt.state=...`), with QEMU's
    /// checks: an active slot is not overwritten and the last key is not erased unless
    /// `force`. The image must be open with a password that unlocks it.
    pub fn change_keyslots(
        &self,
        change: &crate::crypto::luks::KeyslotChange,
        force: bool,
    ) -> crate::Result<()> {
        self.require_writable()?;
        let Some(enc) = &self.encryption else {
            return Err(crate::Error::InvalidArgument {
                image: self.name.clone(),
                reason: "the image is not encrypted".into(),
            });
        };
        enc.change_keyslots(&*self.storage, &self.name, change, force)
    }
}
