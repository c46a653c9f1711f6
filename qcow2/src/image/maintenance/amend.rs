//! `qemu-img amend -o` for qcow2: the compat level both ways, lazy refcounts, the refcount
//! width and the size, checked up front with QEMU's messages and applied in QEMU's order
//! (upgrade, refcount width, lazy refcounts, size, downgrade).
//!
//! Crash safety, step by step:
//! - header changes (version, feature bits, refcount order) go through `rewrite_header`, whose
//!   every intermediate state means the old header or the new one;
//! - a new refcount width writes complete new structures past the end of the file and syncs
//!   them before the header sector that switches the table and the order together; until then
//!   nothing points at them, after it the old structures are simply free space;
//! - a downgrade first turns zero clusters into what v2 can say (unallocated, or clusters of
//!   written zeros; see `downgrade`), then rewrites the header as v2 last.

use crate::error::{Error, Result};
use crate::format::features::{qemu_feature_table, Autoclear, Compatible, Incompatible};
use crate::format::header::CompressionType;
use crate::format::limits::{V2_HEADER_LENGTH, V3_HEADER_LENGTH};
use crate::format::refcount;
use crate::image::check::CheckReport;
use crate::image::maintenance::amend_progress::{AmendProgress, Operation, WidthChange};
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
    /// name recorded in the header changes; the file is neither opened nor moved. An empty name
    /// removes it (the image then needs its data file named at open).
    pub data_file: Option<String>,
    /// `data_file_raw=`: can only be turned off (the data file stops promising to be a valid
    /// raw image), as QEMU allows.
    pub data_file_raw: Option<bool>,
    /// New virtual size (`size=`), applied before a downgrade as QEMU applies it; shrinking
    /// never drops allocated data.
    pub size: Option<u64>,
}

setters!(AmendOptions {
    version: Option<u32>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u32>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    size: Option<u64>,
});

const V3_HINT: &str = "compatibility level 1.1 and above (use compat=1.1 or greater)";

impl Image {
    /// Applies `options`; `progress` hears (work done, work in all) as QEMU counts them.
    pub fn amend(&self, options: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
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
            if incompatible & Incompatible::EXTERNAL_DATA_FILE != 0 {
                return Err(invalid("Cannot downgrade an image with a data file".into()));
            }
            let blocking = incompatible & !(Incompatible::DIRTY | Incompatible::COMPRESSION_TYPE);
            if blocking != 0 {
                return Err(invalid(format!(
                    "Cannot downgrade an image with incompatible features {blocking:#x} set"
                )));
            }
            // Beyond what qemu-img checks: it would leak the bitmaps.
            if !self.bitmaps().is_empty() {
                return Err(invalid(
                    "downgrading an image with persistent bitmaps would drop them; remove them first".into(),
                ));
            }
            // QEMU looks at the active layer only; a snapshot's zstd clusters would read as
            // zlib in a v2 image.
            if incompatible & Incompatible::COMPRESSION_TYPE != 0
                && (self.map(0, self.size())?.iter().any(|e| e.compressed())
                    || (snapshots > 0 && self.snapshots_have_compressed()?))
            {
                return Err(invalid(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters".into(),
                ));
            }
            if options.size.is_none() {
                // With a new size QEMU's rule compares with that one: checked after the resize.
                self.snapshots_allow_downgrade()?;
            }
        }
        let operations = u64::from(version != old_version) + u64::from(bits != old_bits);
        let mut progress = AmendProgress::new(operations, progress);
        if version > old_version {
            progress.status(Operation::Upgrade, 0, 2);
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
            progress.status(Operation::Upgrade, 1, 2);
            progress.status(Operation::Upgrade, 2, 2);
        }
        if bits != old_bits {
            let mut m = self.meta_mut();
            self.change_refcount_order(&mut m, bits.trailing_zeros(), &mut progress)?;
        }
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
                // An empty name drops it, as in QEMU: the image then opens only with a data
                // file given by the caller (QEMU's `data-file` option).
                if let Some(name) = &options.data_file {
                    h.extensions.data_file = (!name.is_empty()).then(|| name.as_bytes().to_vec());
                }
                if drop_raw {
                    h.autoclear_features &= !Autoclear::RAW_EXTERNAL_DATA;
                }
            })?;
        }
        if let Some(size) = options.size {
            self.resize(size, false)?;
        }
        if version < old_version {
            if options.size.is_some() {
                self.snapshots_allow_downgrade()?;
            }
            self.expand_zero_clusters(&mut |done, total| {
                progress.status(Operation::Downgrade, done, total)
            })?;
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
        Ok(())
    }

    /// New refcount structures of width `1 << order` past the end of the file, switched in by
    /// one header sector that names the new table and order together.
    fn change_refcount_order(
        &self,
        m: &mut Meta,
        order: u32,
        progress: &mut AmendProgress<'_>,
    ) -> Result<()> {
        self.flush_all(m)?;
        let mut scratch = CheckReport::default();
        let counts = self.count_references(m, &mut scratch)?.counts;
        let max = refcount::max_refcount(order);
        // The first offending cluster in file order, as QEMU's walk finds it.
        if let Some((&cluster, &count)) = counts
            .iter()
            .filter(|(_, &c)| c > max)
            .min_by_key(|(&k, _)| k)
        {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!(
                    "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {count}",
                    1u32 << order,
                    cluster * m.header.cluster_size()
                ),
            });
        }
        let cs = m.header.cluster_size();
        let change = {
            let refcounts = &m.ws()?.refcounts;
            WidthChange {
                reftable_entries: refcounts.reftable_clusters as u64 * cs / 8,
                old_per_block: refcount::entries_per_block(
                    m.header.cluster_bits,
                    m.header.refcount_order,
                ),
                new_per_block: refcount::entries_per_block(m.header.cluster_bits, order),
                entries_per_cluster: cs / 8,
            }
        };
        let walks = {
            let refcounts = &m.ws()?.refcounts;
            let table = refcounts.reftable_offset / cs;
            let structures = (table..table + refcounts.reftable_clusters as u64)
                .chain(refcounts.refblocks().map(|(_, o)| o / cs));
            change.allocating_walks(
                counts
                    .iter()
                    .filter(|(_, &c)| c > 0)
                    .map(|(&k, _)| k)
                    .chain(structures),
            )
        };
        // QEMU's allocating walks come first; the one writing the blocks ends the change.
        for index in 0..walks {
            change.walk(index, (index + 2).max(3), progress);
        }
        let not_before = m.ws()?.alloc_end;
        let new = self.write_refcounts(m, counts, order, not_before, "new")?;
        self.rewrite_header(m, |h| {
            h.refcount_table_offset = new.table_offset;
            h.refcount_table_clusters = new.table_clusters as u32;
            h.refcount_order = order;
        })?;
        self.adopt_refcounts(m, &new, order)?;
        change.walk(walks, walks + 1, progress);
        Ok(())
    }
}
