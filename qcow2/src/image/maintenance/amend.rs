//! `qemu-img amend -o` for qcow2: the compat level both ways, lazy refcounts and the refcount
//! width, checked up front with QEMU's messages and applied in QEMU's order (upgrade, refcount
//! width, lazy refcounts, downgrade).
//!
//! Crash safety, step by step:
//! - header changes (version, feature bits, refcount order) go through `rewrite_header`, whose
//!   every intermediate state means the old header or the new one;
//! - a new refcount width writes complete new structures past the end of the file and syncs
//!   them before the header sector that switches the table and the order together; until then
//!   nothing points at them, after it the old structures are simply free space;
//! - a downgrade first turns zero clusters into what v2 can say (unallocated, or clusters of
//!   written zeros) through the ordinary write path, then rewrites the header as v2 last.

use crate::error::{Error, Result};
use crate::format::features::{qemu_feature_table, Autoclear, Compatible, Incompatible};
use crate::format::header::CompressionType;
use crate::format::limits::{V2_HEADER_LENGTH, V3_HEADER_LENGTH};
use crate::format::refcount;
use crate::image::check::CheckReport;
use crate::image::map::ExtentKind;
use crate::image::{Image, Meta};

/// What `amend -o` asks for (`None`: leave as it is).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AmendOptions {
    /// 2 for compat=0.10, 3 for compat=1.1.
    pub version: Option<u32>,
    /// Set or clear the lazy refcounts compatible bit (`lazy_refcounts=`, version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// New refcount width in bits (`refcount_bits=`): the refcount structures are rebuilt.
    pub refcount_bits: Option<u32>,
    /// New name of the external data file (`data_file=`), for an image that has one. Only the
    /// name recorded in the header changes; the file is neither opened nor moved.
    pub data_file: Option<String>,
    /// `data_file_raw=`: can only be turned off (the data file stops promising to be a valid
    /// raw image), as QEMU allows.
    pub data_file_raw: Option<bool>,
}

setters!(AmendOptions {
    version: Option<u32>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u32>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
});

const V3_HINT: &str = "compatibility level 1.1 and above (use compat=1.1 or greater)";

impl Image {
    /// Applies `options`; `progress` hears the fraction done (0.0 to 1.0).
    pub fn amend(&self, options: &AmendOptions, progress: &mut dyn FnMut(f64)) -> Result<()> {
        self.require_writable()?;
        let invalid = |reason: String| Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        };
        let (old_version, old_bits, incompatible, snapshots, lazy_now, raw_now) = {
            let m = self.meta();
            let h = &m.header;
            (
                h.version,
                1u32 << h.refcount_order,
                h.incompatible_features,
                h.nb_snapshots,
                h.compatible_features & Compatible::LAZY_REFCOUNTS != 0,
                h.autoclear_features & Autoclear::RAW_EXTERNAL_DATA != 0,
            )
        };
        if let Some(name) = &options.data_file {
            if incompatible & Incompatible::EXTERNAL_DATA_FILE == 0 {
                return Err(invalid(
                    "data-file can only be set for images that use an external data file".into(),
                ));
            }
            if name.is_empty() {
                // QEMU would drop the name and leave an image that names no data file but needs
                // one: refused instead.
                return Err(invalid(
                    "an image with an external data file needs its name (data_file= is empty)"
                        .into(),
                ));
            }
            if name.len() > u16::MAX as usize {
                return Err(invalid("the data file name is too long".into()));
            }
        }
        if options.data_file_raw == Some(true) && !raw_now {
            return Err(invalid(
                "data-file-raw cannot be set on existing images".into(),
            ));
        }
        let version = options.version.unwrap_or(old_version);
        if options.lazy_refcounts == Some(true) && version < 3 {
            return Err(invalid(format!(
                "Lazy refcounts only supported with {V3_HINT}"
            )));
        }
        if let Some(bits) = options.refcount_bits {
            if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                return Err(invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits".into(),
                ));
            }
            if version < 3 && bits != 16 {
                return Err(invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
                ));
            }
        }
        let bits = options.refcount_bits.unwrap_or(old_bits);
        if version < old_version {
            if bits != 16 {
                return Err(invalid("compat=0.10 requires refcount_bits=16".into()));
            }
            let blocking = incompatible & !(Incompatible::DIRTY | Incompatible::COMPRESSION_TYPE);
            if blocking != 0 {
                return Err(invalid(format!(
                    "Cannot downgrade an image with incompatible features {blocking:#x} set"
                )));
            }
            // Beyond what qemu-img checks: it would leak the bitmaps and lose zero clusters in
            // snapshots' tables this engine does not rewrite.
            if snapshots > 0 {
                return Err(invalid(
                    "downgrading an image with internal snapshots is not supported by this engine"
                        .into(),
                ));
            }
            if !self.bitmaps().is_empty() {
                return Err(invalid(
                    "downgrading an image with persistent bitmaps would drop them; remove them first".into(),
                ));
            }
            if incompatible & Incompatible::COMPRESSION_TYPE != 0
                && self.map(0, self.size())?.iter().any(|e| e.compressed())
            {
                return Err(invalid(
                    "zstd-compressed clusters cannot be kept in a compat=0.10 image".into(),
                ));
            }
        }
        progress(0.0);
        if version > old_version {
            let mut m = self.meta_mut();
            // v3 entries need their known extra data: the table is completed first, so a cut
            // leaves a v2 image with a longer (still valid) table.
            self.complete_snapshot_entries(&mut m)?;
            self.rewrite_header(&mut m, |h| {
                h.version = 3;
                h.header_length = V3_HEADER_LENGTH;
                h.extensions.has_feature_table = true;
                h.extensions.feature_names = qemu_feature_table();
            })?;
        }
        if bits != old_bits {
            let mut m = self.meta_mut();
            self.change_refcount_order(&mut m, bits.trailing_zeros())?;
        }
        progress(0.5);
        let lazy = options.lazy_refcounts.unwrap_or(lazy_now) && version >= 3;
        if lazy != lazy_now {
            let mut m = self.meta_mut();
            // Turning lazy refcounts off: the refcounts are written before the header says
            // they are accurate.
            self.flush_all(&mut m)?;
            self.rewrite_header(&mut m, |h| {
                h.compatible_features ^= Compatible::LAZY_REFCOUNTS;
                if !lazy {
                    h.incompatible_features &= !Incompatible::DIRTY;
                }
            })?;
            m.ws_mut()?.lazy = lazy;
        }
        let drop_raw = options.data_file_raw == Some(false) && raw_now;
        if options.data_file.is_some() || drop_raw {
            let mut m = self.meta_mut();
            self.rewrite_header(&mut m, |h| {
                if let Some(name) = &options.data_file {
                    h.extensions.data_file = Some(name.as_bytes().to_vec());
                }
                if drop_raw {
                    h.autoclear_features &= !Autoclear::RAW_EXTERNAL_DATA;
                }
            })?;
        }
        if version < old_version {
            self.expand_zero_clusters()?;
            progress(0.9);
            let mut m = self.meta_mut();
            self.flush_all(&mut m)?;
            self.rewrite_header(&mut m, |h| {
                h.version = 2;
                h.header_length = V2_HEADER_LENGTH;
                h.incompatible_features = 0;
                h.compatible_features = 0;
                h.autoclear_features = 0;
                h.refcount_order = 4;
                h.compression_type = CompressionType::Zlib;
                h.unknown_header_bytes.clear();
                h.extensions.has_feature_table = false;
                h.extensions.feature_names.clear();
            })?;
            m.ws_mut()?.lazy = false;
        }
        progress(1.0);
        Ok(())
    }

    /// Zero clusters as v2 can hold them: without a backing file an unallocated cluster reads
    /// as zeros; otherwise (or where a host cluster stays preallocated) zeros are written.
    fn expand_zero_clusters(&self) -> Result<()> {
        let size = self.size();
        let cs = self.cluster_size();
        let has_backing = self.backing.is_some();
        let zeros: Vec<(u64, u64, bool)> = self
            .map(0, size)?
            .into_iter()
            .filter(|e| e.depth == 0)
            .filter_map(|e| match e.kind {
                ExtentKind::Zero { host_offset } => {
                    Some((e.start, e.length, host_offset.is_some() || has_backing))
                }
                _ => None,
            })
            .collect();
        let buf = vec![0u8; cs as usize];
        for (start, len, write) in zeros {
            let mut pos = start;
            while pos < start + len {
                let n = cs.min(start + len - pos);
                if write {
                    self.write_at(&buf[..n as usize], pos)?;
                } else {
                    let mut m = self.meta_mut();
                    self.mark_dirty(&mut m)?;
                    self.link_cluster(&mut m, pos, 0, 0)?;
                    self.keep_cache_bounded(&mut m)?;
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// New refcount structures of width `1 << order` past the end of the file, switched in by
    /// one header sector that names the new table and order together.
    fn change_refcount_order(&self, m: &mut Meta, order: u32) -> Result<()> {
        self.flush_all(m)?;
        let mut scratch = CheckReport::default();
        let counts = self.count_references(m, &mut scratch)?.counts;
        let max = refcount::max_refcount(order);
        if let Some((&cluster, &count)) = counts.iter().find(|(_, &c)| c > max) {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!(
                    "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {count}",
                    1u32 << order,
                    cluster * m.header.cluster_size()
                ),
            });
        }
        let not_before = m.ws()?.alloc_end;
        let new = self.write_refcounts(m, counts, order, not_before, "new")?;
        self.rewrite_header(m, |h| {
            h.refcount_table_offset = new.table_offset;
            h.refcount_table_clusters = new.table_clusters as u32;
            h.refcount_order = order;
        })?;
        self.adopt_refcounts(m, &new, order)
    }
}
