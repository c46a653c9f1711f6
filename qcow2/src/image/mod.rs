//! The engine: an open qcow2 image, validated against QEMU's limits before any size or offset
//! from disk is used. Open validation lives here; the rest is grouped by concept:
//!
//! - `data/`: guest data: the read path through L1/L2 (`layer`), writes in place, copy-on-write,
//!   zero writes and discards (`write`), compressed clusters (`compress`, `codec`), the extent
//!   map (`map`, `extents`), and the write gate a live snapshot pauses (`quiesce`: in-flight
//!   guest writes finish, new ones wait, reads go on);
//! - `meta/`: metadata in memory and on its way to disk: positioned I/O (`host`), the bounded L2
//!   cache (`l2_cache`: whole tables for a writer, 4 KiB slices while read-only), refcounts and
//!   their growth (`refcounts`, `refcount_deltas`), write-back order (`writeback`);
//! - `snapshots/`: read-only views (`view`) and create, delete and revert staged in fresh
//!   clusters and published by one header write (`ops`);
//! - `chain/`: backing chains through the caller's policy (`backing`), crash-safe rewrites of
//!   cluster 0 (`backing_header`), `commit` and `rebase`;
//! - `maintenance/`: `create`, `info`, `check`, `repair` (check -r), `resize`, and `guard`
//!   (writes never land on metadata; the layout is checked before the first write);
//! - `bitmap/`: persistent dirty bitmaps (validated at open, marked by every change, saved on
//!   close, kept durable across power cuts, added/removed/merged as `qemu-img bitmap` does).
//!

mod bitmap;
mod chain;
mod data;
mod encryption;
mod maintenance;
mod meta;
pub(crate) mod snapshots;

// Every submodule by its own name, wherever its folder puts it.
use chain::{backing, commit, copy_on_read, rebase, resolver};
use data::{codec, extents, layer, map, quiesce};
use maintenance::{check, create, info, repair};
use meta::{cluster_map, host, l2_cache, refcount_deltas, refcounts, writeback};
use snapshots::view as snapshot;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use backing::BackingPolicy;
pub use bitmap::BitmapInfo;
pub use check::CheckReport;
pub use commit::CommitOptions;
pub use copy_on_read::CopyStep;
pub use create::{CreateOptions, Preallocation};
pub use data::compress::CompressedClusters;
pub use encryption::NewEncryption;
pub use extents::Extents;
pub use info::{ImageInfo, SnapshotInfo};
pub use maintenance::amend::AmendOptions;
pub use maintenance::measure::{
    data_clusters_size, fully_allocated_size, measure, refcount_metadata_size, Measure,
    MeasureTarget,
};
pub use map::{Extent, ExtentKind};
pub use quiesce::Quiesced;
pub use rebase::{NewBacking, RebaseOptions};
pub use repair::Repair;
pub use resolver::{BackingRequest, BackingResolver, ResolvedBacking};
pub use snapshot::SnapshotView;

use crate::error::{Error, Result};
use crate::format::limits::*;
use crate::format::snapshot::{align_entry, EntrySizes};
use crate::format::{Header, SnapshotEntry};
use crate::storage::{FileStorage, Storage, StorageExt};
use backing::Backing;
use l2_cache::L2Cache;

/// How to open an image: build it from [`OpenOptions::new`] (read-only, following the backing
/// chain), [`OpenOptions::read_write`] or [`OpenOptions::metadata_only`], then chain setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open for writing (the backing chain is always opened read-only).
    pub writable: bool,
    /// Which backing and data files the image may make the library open.
    pub backing: BackingPolicy,
    /// The deepest backing chain accepted.
    pub max_backing_depth: usize,
    /// Memory for cached L2 tables, in bytes (at least one table is always cached). A read-only
    /// image spends it on 4 KiB slices of tables, a writable one on whole tables.
    pub l2_cache_bytes: u64,
    /// Read without taking QEMU's image locks, even while another process writes (qemu-img's
    /// `-U`). Ignored for writable opens.
    pub force_share: bool,
    /// Open for [`Image::check_and_repair`] (qemu-img `check -r`): an image marked corrupt, or
    /// one whose refcounts must be rebuilt before anything is allocated, opens for writing so
    /// the repair can fix it (and clear the mark). Any other write to such an image is the
    /// caller's responsibility.
    pub for_repair: bool,
    /// Never sync the image's files (QEMU's `cache=unsafe`, qemu-img convert's default for
    /// its target): a crash or power cut may lose or tear anything written.
    pub skip_syncs: bool,
    /// Read and write the image's files around the host page cache (`O_DIRECT`; QEMU's
    /// `cache.direct=on`, as in the `none` and `directsync` cache modes). Opening fails on a
    /// file system without direct I/O.
    pub direct_io: bool,
    /// Overrides the image's lazy-refcounts bit for this open (QEMU's `lazy-refcounts` runtime
    /// option): on, a writer defers data clusters' refcounts under the dirty bit. Needs a
    /// version 3 image.
    pub lazy_refcounts: Option<bool>,
    /// The backing file's format ("qcow2" or "raw"), overriding the one the header records
    /// (QEMU's `backing.driver` option). Applies to the image's own backing file only.
    pub backing_format: Option<String>,
    /// The external data file to open instead of the one the header names (QEMU's
    /// `data-file` option), for an image that has one. The caller chose this file, so the
    /// backing policy does not apply to it.
    pub data_file: Option<PathBuf>,
    /// Passwords of encrypted images, by depth in the chain: the first for the image itself
    /// (QEMU's `encrypt.key-secret`), the next for its backing file
    /// (`backing.encrypt.key-secret`), and so on.
    pub keys: Vec<Option<crate::crypto::Secret>>,
    /// Open an encrypted image without its password, for its metadata only (as `qemu-img info`
    /// does); reading or writing guest data then fails.
    pub without_key: bool,
    /// Opens backing names that are not file paths (`json:{...}`); without one such a name is
    /// refused ([`ChainProblem::NoResolver`](crate::ChainProblem::NoResolver)). The files it
    /// opens are still subject to [`OpenOptions::backing`].
    pub backing_resolver: Option<Arc<dyn BackingResolver>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            backing: BackingPolicy::Follow,
            max_backing_depth: DEFAULT_MAX_BACKING_DEPTH,
            l2_cache_bytes: 4 << 20,
            force_share: false,
            for_repair: false,
            skip_syncs: false,
            direct_io: false,
            lazy_refcounts: None,
            backing_format: None,
            data_file: None,
            keys: Vec::new(),
            without_key: false,
            backing_resolver: None,
        }
    }
}

setters!(OpenOptions {
    writable: bool,
    backing: BackingPolicy,
    max_backing_depth: usize,
    l2_cache_bytes: u64,
    force_share: bool,
    for_repair: bool,
    skip_syncs: bool,
    direct_io: bool,
    lazy_refcounts: Option<bool>,
    backing_format: Option<String>,
    data_file: Option<PathBuf>,
    keys: Vec<Option<crate::crypto::Secret>>,
    without_key: bool,
    backing_resolver: Option<Arc<dyn BackingResolver>>,
});

impl OpenOptions {
    /// The defaults: read-only, following the backing chain, 4 MiB of L2 cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Options that open the image for writing, following its backing chain.
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            ..Self::default()
        }
    }

    /// Options that open the image alone: no backing chain, no data file (for `info` and `check`).
    pub fn metadata_only() -> Self {
        OpenOptions {
            backing: BackingPolicy::Ignore,
            ..Self::default()
        }
    }
}

/// A byte range of the image file holding metadata that data must never overlap.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetadataArea {
    pub start: u64,
    pub end: u64,
    pub what: &'static str,
}

/// The image's metadata that writes change: readers share it, a writer holds it exclusively.
pub(crate) struct Meta {
    pub header: Header,
    pub file_len: u64,
    /// The active L1 table.
    pub l1: Vec<u64>,
    pub snapshots: Vec<SnapshotEntry>,
    /// Bytes the snapshot table occupies (unpadded, as QEMU sizes it).
    pub snapshot_table_len: u64,
    pub metadata_areas: Vec<MetadataArea>,
    /// The writer's state; `None` while the image is read-only.
    pub ws: Option<writeback::WriteState>,
    /// Persistent dirty bitmaps, when the image has consistent ones.
    pub bitmaps: Option<bitmap::Bitmaps>,
}

impl Meta {
    /// The writer's state, or a read-only error.
    pub(crate) fn ws(&self) -> Result<&writeback::WriteState> {
        self.ws.as_ref().ok_or_else(|| Error::ReadOnly {
            image: String::new(),
        })
    }

    /// The writer's state, mutable, or a read-only error.
    pub(crate) fn ws_mut(&mut self) -> Result<&mut writeback::WriteState> {
        self.ws.as_mut().ok_or_else(|| Error::ReadOnly {
            image: String::new(),
        })
    }

    /// Records a metadata area, refusing one that overlaps an area already recorded.
    fn add_area(&mut self, image: &str, start: u64, len: u64, what: &'static str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cluster_mask = self.header.cluster_size() - 1;
        let end = (start + len + cluster_mask) & !cluster_mask;
        if let Some(other) = self
            .metadata_areas
            .iter()
            .find(|a| start < a.end && a.start < end)
        {
            return Err(Error::corrupt(
                image,
                what.trim_start_matches("the "),
                start,
                format!("overlaps {}", other.what),
            ));
        }
        self.metadata_areas.push(MetadataArea { start, end, what });
        Ok(())
    }

    /// The metadata area a host range overlaps, if any.
    pub(crate) fn overlapping_area(&self, start: u64, len: u64) -> Option<&MetadataArea> {
        self.metadata_areas
            .iter()
            .find(|a| start < a.end && a.start < start.saturating_add(len))
    }
}

/// An open qcow2 image.
///
/// `Image` is `Send + Sync`, and every I/O method takes `&self`: share one handle between
/// threads through an `Arc` (the NBD server serves all connections of an export this way).
/// Reads run concurrently; writes that change metadata take the image's metadata lock in turn.
pub struct Image {
    name: String,
    path: Option<PathBuf>,
    storage: Box<dyn Storage>,
    writable: bool,
    meta: RwLock<Meta>,
    data_file: Option<Box<dyn Storage>>,
    data_file_name: Option<String>,
    backing: Option<Backing>,
    l2_cache: L2Cache,
    /// Slices of L2 tables, for reads while the image is read-only (see `layer`).
    l2_slices: L2Cache,
    /// The most recently decompressed cluster: descriptor bits and bytes. Sequential small reads
    /// of one compressed cluster then decompress it once.
    last_compressed: Mutex<Option<(u64, Box<[u8]>)>>,
    /// Admits guest writes; a live snapshot pauses it (`quiesce`).
    gate: quiesce::WriteGate,
    /// What repairing the image at open printed, as qemu-img prints it (a dirty image).
    open_repair_messages: Vec<String>,
    /// Whether the image looks metadata-preallocated, guessed once (`preallocated`).
    preallocation_guess: std::sync::OnceLock<bool>,
    /// The payload cipher and LUKS header of an encrypted image.
    encryption: Option<encryption::Encryption>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.meta();
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("size", &m.header.size)
            .field("cluster_bits", &m.header.cluster_bits)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Opens the image at `path` as `options` say: read-only unless `options.writable`, with its
    /// backing chain as `options.backing` allows, locked as QEMU locks it.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image> {
        backing::open_chain(path.as_ref(), options, &mut Vec::new())
    }

    /// Opens the image at `path` as [`Image::open`] does, with `data_file` as its external data
    /// file instead of the file its header names (QEMU's `data-file` option: a filter node over
    /// the file, a device standing in for it). Refused for an image without an external data
    /// file.
    pub fn open_with_data_file(
        path: impl AsRef<Path>,
        options: &OpenOptions,
        data_file: Box<dyn Storage>,
    ) -> Result<Image> {
        backing::open_chain_over(
            path.as_ref(),
            options,
            &mut Vec::new(),
            None,
            Some(data_file),
        )
    }

    /// Opens an image held in any storage. A backing or data file can only be followed when the
    /// policy is `Ignore` (it is then skipped); there is no directory to resolve names against.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        name: &str,
        options: &OpenOptions,
    ) -> Result<Image> {
        let mut image = Self::open_alone(storage, name.to_string(), None, options)?;
        if options.backing != BackingPolicy::Ignore {
            if let Some(file) = image.backing_file_name() {
                return Err(Error::Chain {
                    image: image.name.clone(),
                    role: "backing",
                    file,
                    problem: crate::error::ChainProblem::NoDirectory,
                });
            }
            if let Some(file) = image.data_file_name.clone() {
                return Err(Error::Chain {
                    image: image.name.clone(),
                    role: "data",
                    file,
                    problem: crate::error::ChainProblem::NoDirectory,
                });
            }
        }
        image.backing = None;
        if options.writable {
            image.enable_writes(options)?;
        }
        Ok(image)
    }

    /// Prepares a freshly opened image for writing: refuses a corrupt one, loads the refcounts,
    /// repairs a dirty one, and clears the autoclear bits this engine does not maintain.
    fn enable_writes(&mut self, options: &OpenOptions) -> Result<()> {
        let for_repair = options.for_repair;
        use crate::format::features::Autoclear;
        let mut m = self.meta.write().unwrap_or_else(|e| e.into_inner());
        if m.header.is_corrupt() && !for_repair {
            return Err(Error::MarkedCorrupt {
                image: self.name.clone(),
            });
        }
        let host = host::Host {
            storage: &*self.storage,
            name: &self.name,
        };
        let h = &m.header;
        if options.lazy_refcounts == Some(true) && h.version < 3 {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level".into(),
            });
        }
        let mut refcounts = refcounts::Refcounts::load(
            host,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?;
        let counts = !m.header.is_dirty() && !for_repair;
        self.check_layout(&m, &mut refcounts, counts)?;
        m.ws = Some(writeback::WriteState {
            refcounts,
            alloc_end: m.file_len.div_ceil(h.cluster_size()),
            l2_after_refblocks: false,
            refblocks_after_l2: false,
            l2_after_data_sync: false,
            dirty_l1: std::collections::BTreeSet::new(),
            lazy: options.lazy_refcounts.unwrap_or(h.lazy_refcounts()),
        });
        // A session of ours that kept its bitmaps durable and did not close: they are consistent.
        self.recover_durable_bitmaps(&mut m)?;
        // Bitmaps this engine understands are kept up to date (`bitmap`); the raw-data-file bit
        // stays true because data lands at its guest offset. Other autoclear bits are cleared.
        let mut keep = Autoclear::RAW_EXTERNAL_DATA;
        if m.bitmaps.is_some() {
            keep |= Autoclear::BITMAPS;
        }
        if m.header.version >= 3 && m.header.autoclear_features & !keep != 0 {
            m.header.autoclear_features &= keep;
            host.write_sync(
                &m.header.autoclear_features.to_be_bytes(),
                88,
                "header autoclear features",
            )?;
        }
        drop(m);
        self.writable = true;
        // A writer caches whole tables; slices read so far could go stale.
        self.l2_slices = L2Cache::new(1);
        // A repair open leaves the dirty image to `check_and_repair`, which reports what it fixes.
        if self.meta().header.is_dirty() && !for_repair {
            self.open_repair_messages = self.repair_dirty()?;
        }
        Ok(())
    }

    /// Opens one image: header, tables and snapshot list, all validated. Backing and data files are
    /// attached by the caller.
    fn open_alone(
        storage: Box<dyn Storage>,
        name: String,
        path: Option<PathBuf>,
        options: &OpenOptions,
    ) -> Result<Image> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io(&name, "reading the file length", e))?;
        let mut first = [0u8; V2_HEADER_LENGTH as usize];
        let n = storage
            .read_at(&mut first, 0)
            .map_err(|e| Error::io(&name, "reading the header", e))?;
        // The cluster size decides how much of the file is header; decode it once with what there is.
        let cluster_bits = if n >= 24 {
            u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"))
        } else {
            0
        };
        let head_len = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            (1u64 << cluster_bits).min(file_len)
        } else {
            n as u64
        };
        let mut head = vec![0u8; head_len as usize];
        storage
            .read_exact_at(&mut head, 0)
            .map_err(|e| Error::io(&name, "reading the header cluster", e))?;
        let header = Header::decode(&head).map_err(|e| Error::from_format(&name, e))?;
        let cluster_size = header.cluster_size();

        // Tables must lie inside the file and must not overlap each other.
        let l1_bytes = header.l1_size as u64 * 8;
        let reftable_bytes = header.refcount_table_clusters as u64 * cluster_size;
        let within_file = |what: &str, field_offset: u64, start: u64, len: u64| -> Result<()> {
            if len > 0 && start.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(Error::corrupt(
                    &name,
                    format!("header field {what}"),
                    field_offset,
                    format!(
                        "{what} at {start:#x} ({len} bytes) runs past the end of the file ({file_len:#x})"
                    ),
                ));
            }
            Ok(())
        };
        within_file("l1_table_offset", 40, header.l1_table_offset, l1_bytes)?;
        // A fresh QEMU image ends right after the L1 entries, so only the used bytes must exist;
        // the reftable is always written in whole clusters.
        within_file(
            "refcount_table_offset",
            48,
            header.refcount_table_offset,
            reftable_bytes,
        )?;
        if header.nb_snapshots > 0 && header.snapshots_offset >= file_len {
            return Err(Error::corrupt(
                &name,
                "header field snapshots_offset",
                64,
                format!(
                    "snapshot table at {:#x} is beyond the end of the file ({file_len:#x})",
                    header.snapshots_offset
                ),
            ));
        }

        let mut meta = Meta {
            file_len,
            l1: Vec::new(),
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            metadata_areas: Vec::new(),
            ws: None,
            bitmaps: None,
            header,
        };
        meta.add_area(&name, 0, cluster_size, "the header")?;
        meta.add_area(
            &name,
            meta.header.l1_table_offset,
            l1_bytes,
            "the active L1 table",
        )?;
        meta.add_area(
            &name,
            meta.header.refcount_table_offset,
            reftable_bytes,
            "the refcount table",
        )?;
        meta.l1 = read_table(
            &*storage,
            &name,
            meta.header.l1_table_offset,
            meta.header.l1_size as u64,
            "L1 table",
        )?;
        let (snapshots, table_len) = read_snapshot_table(&*storage, &name, &meta.header)?;
        meta.snapshots = snapshots;
        meta.snapshot_table_len = table_len;
        meta.add_area(
            &name,
            meta.header.snapshots_offset,
            table_len,
            "the snapshot table",
        )?;
        meta.bitmaps = bitmap::load(&*storage, &name, &meta)?;
        if let Some(b) = meta.bitmaps.clone() {
            meta.add_area(&name, b.dir_offset, b.dir_size, "the bitmap directory")?;
            for e in &b.entries {
                meta.add_area(
                    &name,
                    e.table_offset,
                    e.table_size as u64 * 8,
                    "a bitmap table",
                )?;
            }
        }
        let data_file_name = meta
            .header
            .extensions
            .data_file
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned());
        if let Some(c) = meta.header.extensions.crypto {
            within_file(
                "crypto header extension",
                meta.header.header_length as u64,
                c.offset,
                c.length,
            )?;
            meta.add_area(&name, c.offset, c.length, "the encryption header")?;
        }
        if meta.header.crypt_method != 0 && meta.header.has_external_data_file() {
            return Err(Error::Unsupported {
                image: name,
                structure: "header field crypt_method".into(),
                offset: 32,
                what: "encryption with an external data file".into(),
            });
        }
        let encryption = encryption::Encryption::open(
            &*storage,
            &name,
            &meta.header,
            options.keys.first().and_then(Option::as_ref),
            options.without_key,
        )?;
        Ok(Image {
            name,
            path,
            storage,
            writable: false,
            meta: RwLock::new(meta),
            data_file: None,
            data_file_name,
            backing: None,
            l2_cache: L2Cache::new((options.l2_cache_bytes / cluster_size) as usize),
            l2_slices: L2Cache::new(
                (options.l2_cache_bytes / layer::l2_slice_len(cluster_size)) as usize,
            ),
            last_compressed: Mutex::new(None),
            gate: quiesce::WriteGate::default(),
            open_repair_messages: Vec::new(),
            preallocation_guess: std::sync::OnceLock::new(),
            encryption,
        })
    }

    /// Shared access to the metadata.
    pub(crate) fn meta(&self) -> RwLockReadGuard<'_, Meta> {
        // A panic while holding the lock leaves the metadata as the last completed step left it.
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access to the metadata.
    #[allow(dead_code)]
    pub(crate) fn meta_mut(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a table of `count` big-endian u64 entries (bounded by the header limits).
    pub(crate) fn read_table(&self, offset: u64, count: u64, what: &str) -> Result<Vec<u64>> {
        read_table(&*self.storage, &self.name, offset, count, what)
    }

    /// The name used in messages (the path as given, or the caller's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every host file this image reads from: itself, its data file and its whole backing
    /// chain. A command that creates or truncates a file refuses one of these as its target.
    pub fn files_in_use(&self) -> Vec<crate::storage::FileIdentity> {
        let mut out: Vec<_> = [Some(&self.storage), self.data_file.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.identity())
            .collect();
        match &self.backing {
            Some(Backing::Qcow2(image)) => out.extend(image.files_in_use()),
            Some(Backing::Raw { storage, .. }) => out.extend(storage.identity()),
            None => {}
        }
        out
    }

    /// The lines QEMU prints when it opens this image for writing and repairs it (a dirty image
    /// with lazy refcounts); empty when nothing was repaired.
    pub fn open_repair_messages(&self) -> &[String] {
        &self.open_repair_messages
    }

    /// Whether the image is open for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Whether the image file is read and written around the host page cache
    /// ([`OpenOptions::direct_io`]).
    pub fn is_direct_io(&self) -> bool {
        self.storage.is_direct_io()
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A copy of the decoded header.
    pub fn header(&self) -> Header {
        self.meta().header.clone()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.meta().header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.meta().header.cluster_size()
    }

    /// The image file's length.
    pub fn file_len(&self) -> u64 {
        self.meta().file_len
    }

    /// The backing file name as recorded in the image.
    pub fn backing_file_name(&self) -> Option<String> {
        self.meta()
            .header
            .backing_file
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
    }

    /// The backing file format as recorded in the image (its backing-format extension).
    pub fn backing_format(&self) -> Option<String> {
        self.meta()
            .header
            .extensions
            .backing_format
            .as_ref()
            .map(|f| String::from_utf8_lossy(f).into_owned())
    }

    /// The opened backing image, if the chain was followed and it is qcow2.
    pub fn backing_image(&self) -> Option<&Image> {
        match &self.backing {
            Some(Backing::Qcow2(image)) => Some(image),
            _ => None,
        }
    }

    /// Puts `backing` under this image (for images opened from storage, whose backing file the
    /// caller opens itself). Unallocated clusters then read from it.
    pub fn attach_backing(&mut self, backing: Image) {
        self.backing = Some(Backing::Qcow2(Arc::new(backing)));
    }

    /// Puts `backing`, an image others hold too, under this image: the overlay of an external
    /// snapshot over a disk its users keep open (see [`crate::DiskTop`]).
    pub fn attach_shared_backing(&mut self, backing: Arc<Image>) {
        self.backing = Some(Backing::Qcow2(backing));
    }

    /// Takes the name and path of the file this image's file was renamed to.
    pub(crate) fn relocate(&mut self, path: &Path) {
        self.name = path.display().to_string();
        self.path = Some(path.to_path_buf());
    }

    /// The backing image as shared, for [`crate::DiskTop`]'s check that an overlay sits on the
    /// disk's top.
    pub(crate) fn backing_arc(&self) -> Option<&Arc<Image>> {
        match &self.backing {
            Some(Backing::Qcow2(image)) => Some(image),
            _ => None,
        }
    }

    /// Gives an image opened from storage its external data file (the caller opens it).
    pub fn attach_data_file(&mut self, storage: Box<dyn Storage>) {
        self.data_file = Some(storage);
    }

    /// Puts a raw store under this image as its backing file.
    pub fn attach_raw_backing(&mut self, storage: Box<dyn Storage>) -> Result<()> {
        let size = storage
            .len()
            .map_err(|e| Error::io(&self.name, "reading the backing file length", e))?;
        self.backing = Some(Backing::Raw { storage, size });
        Ok(())
    }

    /// Number of images below this one in the opened chain.
    pub fn chain_depth(&self) -> u32 {
        match &self.backing {
            None => 0,
            Some(Backing::Raw { .. }) => 1,
            Some(Backing::Qcow2(image)) => 1 + image.chain_depth(),
        }
    }

    /// A copy of the internal snapshot table entries.
    pub fn snapshot_entries(&self) -> Vec<SnapshotEntry> {
        self.meta().snapshots.clone()
    }

    /// Reads guest bytes at `offset` into `buf`, following the backing chain for unallocated ranges.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let m = self.meta();
        self.check_bounds(offset, buf.len() as u64, m.header.size)?;
        let result = self.read_layer(&m, m.active(), buf, offset);
        drop(m);
        if let Err(e) = &result {
            // Invalid metadata met by a read of a writable image marks it corrupt, as QEMU
            // does, so no later write builds on it.
            if self.writable && e.marks_image_corrupt() {
                self.mark_corrupt(&mut self.meta_mut());
            }
        }
        result
    }

    pub(crate) fn check_bounds(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds {
                image: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }
}

/// Resolves `name` (a backing or data file name from an image's header) against the directory of
/// the image at `image_path`, as the engine does when it follows the chain.
pub fn resolve_relative(image_path: &Path, name: &str) -> PathBuf {
    let candidate = Path::new(name);
    if candidate.is_absolute() {
        return candidate.to_path_buf();
    }
    match image_path.parent() {
        Some(dir) => dir.join(candidate),
        None => candidate.to_path_buf(),
    }
}

/// Opens a file for the engine, read-only or read-write, without locking it.
pub(crate) fn open_file(path: &Path, writable: bool) -> std::io::Result<Box<dyn Storage>> {
    Ok(Box::new(if writable {
        FileStorage::open_read_write(path)?
    } else {
        FileStorage::open_read_only(path)?
    }))
}

/// Opens a file and takes QEMU's image locks on it (unless the caller forces sharing).
pub(crate) fn open_locked(
    path: &Path,
    writable: bool,
    options: &OpenOptions,
    image: &str,
    what: &str,
) -> Result<Box<dyn Storage>> {
    let mut file = if writable {
        FileStorage::open_read_write(path)
    } else {
        FileStorage::open_read_only(path)
    }
    .map_err(|e| Error::io(image, format!("opening {what}"), e))?;
    file.set_skip_syncs(writable && options.skip_syncs);
    if options.direct_io {
        file.set_direct_io(true)
            .map_err(|e| Error::io(image, format!("opening {what} for direct I/O"), e))?;
    }
    if !options.force_share || writable {
        match file.lock_image(writable) {
            Ok(Ok(())) => {}
            Ok(Err(detail)) => {
                return Err(Error::Locked {
                    image: path.display().to_string(),
                    detail,
                })
            }
            Err(e) => return Err(Error::io(image, format!("locking {what}"), e)),
        }
    }
    Ok(Box::new(file))
}

/// Reads a table of `count` big-endian u64 entries (bounded by the header limits).
pub(crate) fn read_table(
    storage: &dyn Storage,
    image: &str,
    offset: u64,
    count: u64,
    what: &str,
) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; (count * 8) as usize];
    storage
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| Error::io(image, format!("reading the {what} at {offset:#x}"), e))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Reads the snapshot table entry by entry through a window of up to 64 KiB, so a table of many
/// small entries costs a few reads, while a hostile count costs no more than the bytes that are
/// really there (and never more than the 64 MiB limit). Returns the entries and the table's
/// unpadded length.
pub(crate) fn read_snapshot_table(
    storage: &dyn Storage,
    image: &str,
    header: &Header,
) -> Result<(Vec<SnapshotEntry>, u64)> {
    let base = header.snapshots_offset;
    let mut window = TableWindow {
        storage,
        base,
        start: 0,
        bytes: Vec::new(),
    };
    let mut pos = 0u64;
    let mut entries = Vec::new();
    for index in 0..header.nb_snapshots {
        pos = align_entry(pos);
        let at = base + pos;
        let fixed = window.entry(image, index, pos, SNAPSHOT_ENTRY_FIXED_SIZE)?;
        let sizes: EntrySizes =
            SnapshotEntry::sizes(fixed, at, index).map_err(|e| Error::from_format(image, e))?;
        let len = sizes.entry_len();
        if pos + len > MAX_SNAPSHOTS_SIZE {
            return Err(Error::corrupt(
                image,
                "snapshot table",
                base,
                format!("larger than the limit of {MAX_SNAPSHOTS_SIZE} bytes"),
            ));
        }
        let bytes = window.entry(image, index, pos, len as usize)?;
        entries.push(
            SnapshotEntry::decode(bytes, at, index).map_err(|e| Error::from_format(image, e))?,
        );
        pos += len;
    }
    Ok((entries, pos))
}

/// A window of table bytes read ahead from the file.
struct TableWindow<'a> {
    storage: &'a dyn Storage,
    /// Host offset of the table.
    base: u64,
    /// Table position of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
}

impl TableWindow<'_> {
    const READ_AHEAD: usize = 64 * 1024;

    /// Bytes `pos..pos + len` of entry `index`, which must lie inside the file.
    fn entry(&mut self, image: &str, index: u32, pos: u64, len: usize) -> Result<&[u8]> {
        let at = self.base + pos;
        match self.get(pos, len) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(Error::corrupt(
                image,
                format!("snapshot table entry {index}"),
                at,
                format!("{len} bytes run past the end of the file"),
            )),
            Err(e) => Err(Error::io(
                image,
                format!("reading the snapshot table at {at:#x}"),
                e,
            )),
        }
    }

    /// Table bytes `pos..pos + len`, or `None` when the file ends first.
    fn get(&mut self, pos: u64, len: usize) -> std::io::Result<Option<&[u8]>> {
        let held = pos >= self.start && pos + len as u64 <= self.start + self.bytes.len() as u64;
        if !held {
            self.bytes.resize(len.max(Self::READ_AHEAD), 0);
            let mut filled = 0;
            while filled < self.bytes.len() {
                let n = self
                    .storage
                    .read_at(&mut self.bytes[filled..], self.base + pos + filled as u64)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            self.bytes.truncate(filled);
            self.start = pos;
            if filled < len {
                return Ok(None);
            }
        }
        let from = (pos - self.start) as usize;
        Ok(Some(&self.bytes[from..from + len]))
    }
}
