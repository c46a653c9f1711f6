//! A group of images and its transactions: validate every action, stage every image's new state
//! (invisible to readers, at most leaked clusters), write one durable `Decision` record, then
//! publish each image with its one header switch. `recover` rolls back a group that never
//! reached its decision and finishes one that did, by publishing the recorded switches and then
//! reconciling refcounts from the published metadata; it never replays decrements.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::transaction_support::{self as ts, SnapshotChange, StateSwitch};
use qcow2::{CreateOptions, DiskTop, Image};

use crate::bitmaps::{BitmapChange, BitmapSource};
use crate::codec::{os_str, Reader, Writer};
use crate::error::TxnError;
use crate::fs::{parent, GroupFs, LockGuard, RealFs};
use crate::identity::GroupId;
use crate::journal::{Journal, Kind};
use crate::manifest::Manifest;
use crate::step::{reclaim_leaks, Held, OverlayStep, RetireStep, SnapshotStep, Step};

/// One action of a group transaction (the names follow QMP's `transaction`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `blockdev-snapshot-internal-sync`: an internal snapshot named `name`.
    InternalCreate {
        /// The image file, by path.
        image: PathBuf,
        /// The new snapshot's name.
        name: String,
    },
    /// `blockdev-snapshot-delete-internal-sync`: delete an internal snapshot (id or name).
    InternalDelete {
        /// The image file, by path.
        image: PathBuf,
        /// The snapshot's id or name.
        name: String,
    },
    /// `snapshot-revert-internal`: make an internal snapshot the active state.
    InternalRevert {
        /// The image file, by path.
        image: PathBuf,
        /// The snapshot's id or name.
        name: String,
    },
    /// `blockdev-snapshot-sync`: an overlay on top of `image`, recorded in the manifest.
    ExternalCreate {
        /// The disk's current top image.
        image: PathBuf,
        /// Where the new overlay goes (`snapshot-file`).
        overlay: PathBuf,
        /// Whether the transaction creates the overlay or the caller did.
        mode: OverlayMode,
    },
    /// `blockdev-snapshot-delete-external`: merge the overlay `image` into its backing file,
    /// make the backing file the disk's top in the manifest, and remove the overlay.
    ExternalDelete {
        /// The overlay to merge and remove.
        image: PathBuf,
    },
    /// `block-dirty-bitmap-add`: a persistent bitmap, empty, enabled unless `disabled`, of
    /// `granularity` bytes (QEMU's default when `None`). `image` may be an overlay the same plan
    /// creates: the bitmap then starts with the overlay.
    BitmapAdd {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
        /// Guest bytes per bit: a power of two from 512 B to 2 GiB.
        granularity: Option<u64>,
        /// Create it disabled (not recording writes).
        disabled: bool,
    },
    /// `block-dirty-bitmap-remove`.
    BitmapRemove {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
    },
    /// `block-dirty-bitmap-clear`: every bit cleared.
    BitmapClear {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
    },
    /// `block-dirty-bitmap-enable`: the bitmap tracks writes again.
    BitmapEnable {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
    },
    /// `block-dirty-bitmap-disable`: the bitmap stops tracking writes.
    BitmapDisable {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
    },
    /// `block-dirty-bitmap-merge`: every bit of each source set in `target`.
    BitmapMerge {
        /// The image file, by path.
        image: PathBuf,
        /// The bitmap that receives the bits.
        target: String,
        /// The bitmaps whose set bits are merged, in order.
        sources: Vec<BitmapSource>,
    },
}

/// Where an external snapshot's overlay comes from (QMP's `NewImageMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlayMode {
    /// The transaction creates the overlay (the path must be free, or an empty file), naming
    /// its backing file relative to the overlay's directory, so the two can move together.
    #[default]
    New,
    /// As `New`, naming the backing file by its absolute path: QMP's `absolute-paths`, the
    /// mode QEMU defaults to.
    NewAbsolute,
    /// The overlay exists already, backed by the image with the same size; an abort leaves it
    /// in place, because the transaction did not make it.
    Existing,
}

impl OverlayMode {
    /// Whether the transaction makes the overlay (and so removes it again on abort).
    pub fn creates(self) -> bool {
        self != OverlayMode::Existing
    }
}

impl Action {
    fn image(&self) -> &Path {
        match self {
            Action::InternalCreate { image, .. }
            | Action::InternalDelete { image, .. }
            | Action::InternalRevert { image, .. }
            | Action::ExternalCreate { image, .. }
            | Action::ExternalDelete { image }
            | Action::BitmapAdd { image, .. }
            | Action::BitmapRemove { image, .. }
            | Action::BitmapClear { image, .. }
            | Action::BitmapEnable { image, .. }
            | Action::BitmapDisable { image, .. }
            | Action::BitmapMerge { image, .. } => image,
        }
    }

    /// QMP's name for the action and the image it names, for messages.
    pub fn describe(&self) -> String {
        let kind = match self {
            Action::InternalCreate { .. } => "blockdev-snapshot-internal-sync",
            Action::InternalDelete { .. } => "blockdev-snapshot-delete-internal-sync",
            Action::InternalRevert { .. } => "snapshot-revert-internal",
            Action::ExternalCreate { .. } => "blockdev-snapshot-sync",
            Action::ExternalDelete { .. } => "blockdev-snapshot-delete-external",
            Action::BitmapAdd { .. } => "block-dirty-bitmap-add",
            Action::BitmapRemove { .. } => "block-dirty-bitmap-remove",
            Action::BitmapClear { .. } => "block-dirty-bitmap-clear",
            Action::BitmapEnable { .. } => "block-dirty-bitmap-enable",
            Action::BitmapDisable { .. } => "block-dirty-bitmap-disable",
            Action::BitmapMerge { .. } => "block-dirty-bitmap-merge",
        };
        format!("{kind} on {}", self.image().display())
    }

    fn is_bitmap(&self) -> bool {
        matches!(
            self,
            Action::BitmapAdd { .. }
                | Action::BitmapRemove { .. }
                | Action::BitmapClear { .. }
                | Action::BitmapEnable { .. }
                | Action::BitmapDisable { .. }
                | Action::BitmapMerge { .. }
        )
    }
}

/// What a committed transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every image the transaction touched, canonical paths, in lock order.
    pub images: Vec<PathBuf>,
    /// Overlays created (final paths).
    pub overlays: Vec<PathBuf>,
    /// How long guest writes on the live images waited (`None` without live images).
    pub paused: Option<std::time::Duration>,
}

/// What recovery found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No transaction was in flight.
    Clean,
    /// A transaction without a commit decision was rolled back.
    RolledBack,
    /// A committed transaction was finished.
    RolledForward,
}

/// The images one transaction touches on one file.
pub(crate) struct Member {
    pub path: PathBuf,
    /// The path as the plan spells it (the same file under two spellings is refused).
    given: PathBuf,
    dev: u64,
    ino: u64,
    pub image: Option<Held>,
    changes: Vec<SnapshotChange>,
    pub overlay: Option<PathBuf>,
    overlay_mode: OverlayMode,
    /// For `ExternalDelete`: this image is an overlay to merge into its backing file, and go.
    retire: bool,
    /// Bitmap changes of this image, applied after the decision.
    bitmaps: Vec<BitmapChange>,
    /// Bitmaps added to the new overlay, while preparing.
    overlay_bitmaps: Vec<BitmapChange>,
}

impl Member {
    pub fn is_live(&self) -> bool {
        self.image.as_ref().is_some_and(|h| h.live().is_some())
    }
}

/// Named points in a transaction, where tests can simulate a power cut: called with each
/// event's name, returning `false` stops the transaction there as a power cut would.
pub type Hook = Box<dyn FnMut(&str) -> bool + Send>;

/// A group directory (journal, lock, manifest) held by this process.
pub struct Group {
    pub(crate) dir: PathBuf,
    pub(crate) fs: Arc<dyn GroupFs>,
    _lock: LockGuard,
    pub(crate) id: GroupId,
    hook: Option<Hook>,
    opened_with: Recovery,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("dir", &self.dir)
            .field("opened_with", &self.opened_with)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Opens (creating) the group directory on the host file system, takes its lock and
    /// finishes any interrupted transaction.
    pub fn open(dir: impl AsRef<Path>) -> Result<Group, TxnError> {
        Self::open_on(Arc::new(RealFs), dir.as_ref(), None)
    }

    /// Like [`Group::open`], with a hook already installed (so tests can cut power inside the
    /// recovery that opening runs). Needs the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn open_with_hook(dir: impl AsRef<Path>, hook: Option<Hook>) -> Result<Group, TxnError> {
        Self::open_on(Arc::new(RealFs), dir.as_ref(), hook)
    }

    /// Opens a group on any file system (tests pass a recording [`crate::sim::SimFs`]). Needs
    /// the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn open_in(
        fs: Arc<dyn GroupFs>,
        dir: impl AsRef<Path>,
        hook: Option<Hook>,
    ) -> Result<Group, TxnError> {
        Self::open_on(fs, dir.as_ref(), hook)
    }

    fn open_on(fs: Arc<dyn GroupFs>, dir: &Path, hook: Option<Hook>) -> Result<Group, TxnError> {
        let dir = dir.to_path_buf();
        if fs.exists(&dir) && !fs.is_dir(&dir) {
            return Err(TxnError::Invalid {
                image: dir,
                reason: "is a file, not a group directory (a group is a directory of its own)"
                    .into(),
            });
        }
        fs.create_dir_all(&dir).map_err(|e| TxnError::io(&dir, e))?;
        let lock_path = dir.join("group.lock");
        let lock = fs
            .lock_group(&lock_path)
            .map_err(|e| TxnError::io(&lock_path, e))?
            .ok_or_else(|| TxnError::GroupLocked(dir.clone()))?;
        let id = GroupId::load_or_create(&*fs, &dir)?;
        let mut group = Group {
            dir,
            fs,
            _lock: lock,
            id,
            hook,
            opened_with: Recovery::Clean,
        };
        group.opened_with = group.recover()?;
        Ok(group)
    }

    /// Opens an existing group directory (never creating one) and finishes any interrupted
    /// transaction: what `recover` needs, where a mistyped path must not become a new group.
    pub fn open_existing(dir: impl AsRef<Path>) -> Result<Group, TxnError> {
        let dir = dir.as_ref();
        if !RealFs.is_dir(dir) {
            return Err(TxnError::Invalid {
                image: dir.to_path_buf(),
                reason: if RealFs.exists(dir) {
                    "is a file, not a group directory".into()
                } else {
                    "no such group directory (recover never creates one: check the path)".into()
                },
            });
        }
        Self::open(dir)
    }

    /// The file system the group works on (tests open live handles through it). Needs the
    /// `testing` feature.
    #[cfg(feature = "testing")]
    pub fn fs(&self) -> Arc<dyn GroupFs> {
        self.fs.clone()
    }

    /// What the recovery run by [`Group::open`] did.
    pub fn opened_with(&self) -> Recovery {
        self.opened_with
    }

    /// Installs a hook called at every named event; returning `false` stops the transaction
    /// there as a power cut would (nothing more is written, nothing is cleaned up). Needs the
    /// `testing` feature.
    #[cfg(feature = "testing")]
    pub fn set_hook(&mut self, hook: Option<Hook>) {
        self.hook = hook;
    }

    pub(crate) fn event(&mut self, name: &str) -> Result<(), TxnError> {
        self.fs.event(name);
        let go_on = match &mut self.hook {
            Some(hook) => hook(name),
            None => true,
        };
        if go_on {
            Ok(())
        } else {
            Err(TxnError::Interrupted(name.to_string()))
        }
    }

    pub(crate) fn journal_path(&self) -> PathBuf {
        self.dir.join("txn.journal")
    }

    pub(crate) fn manifest_path(&self) -> PathBuf {
        self.dir.join("group.manifest")
    }

    /// The manifest: each disk's current top.
    pub fn manifest(&self) -> Result<Manifest, TxnError> {
        Manifest::load(&*self.fs, &self.manifest_path())
            .map_err(|e| TxnError::io(self.manifest_path(), e))
    }

    /// Opens the journal (creating it durably) and starts a transaction in it.
    pub(crate) fn start_journal(&mut self, txn: [u8; 16]) -> Result<Journal, TxnError> {
        let path = self.journal_path();
        let created = !self.fs.exists(&path);
        let storage = self
            .fs
            .open_or_create(&path)
            .map_err(|e| TxnError::io(&path, e))?;
        if created {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| TxnError::io(&self.dir, e))?;
        }
        Journal::start(storage, txn).map_err(|e| TxnError::io(&path, e))
    }

    /// Finishes or rolls back an interrupted transaction; a second call changes nothing.
    pub fn recover(&mut self) -> Result<Recovery, TxnError> {
        let path = self.journal_path();
        let storage = match self.fs.open_existing(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovery::Clean),
            Err(e) => return Err(TxnError::io(&path, e)),
        };
        let records = Journal::load(&*storage).map_err(|source| TxnError::Journal {
            group: self.dir.clone(),
            source,
        })?;
        if records.is_empty() || records.last().map(|r| r.kind) == Some(Kind::End) {
            return Ok(Recovery::Clean);
        }
        // Only a journal this group wrote may make recovery rename or delete anything.
        if !self.id.made(&records[0].txn) {
            return Err(TxnError::Invalid {
                image: path.clone(),
                reason: format!(
                    "holds an unfinished transaction this group did not write (its id is not bound \
                     to {}); recovery changes nothing. A journal left by a qcow2-tool older than \
                     group identities, or copied from another group, must be resolved by hand: \
                     check each image it names, then remove it",
                    self.dir.join(crate::identity::FILE).display()
                ),
            });
        }
        let commit = records
            .iter()
            .any(|r| r.kind == Kind::Decision && r.payload == [1]);
        let bad = |what: &str| TxnError::Journal {
            group: self.dir.clone(),
            source: crate::journal::JournalError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("malformed {what} record"),
            )),
        };
        // index -> (path, dev, ino, before), staged switch and tables, overlay paths
        let mut images = Vec::new();
        let mut staged = std::collections::HashMap::new();
        let mut overlays = std::collections::HashMap::new();
        let mut retires = std::collections::HashMap::new();
        let mut bitmaps = std::collections::HashMap::new();
        let mut bitmaps_done = std::collections::HashMap::new();
        for r in &records {
            let mut rd = Reader(&r.payload);
            match r.kind {
                Kind::Image => {
                    let i = rd.u64().ok_or_else(|| bad("image"))?;
                    let p = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("image"))?));
                    let dev = rd.u64().ok_or_else(|| bad("image"))?;
                    let ino = rd.u64().ok_or_else(|| bad("image"))?;
                    let before = StateSwitch::from_bytes(rd.array48().ok_or_else(|| bad("image"))?);
                    images.push((i, p, dev, ino, before));
                }
                Kind::Staged => {
                    let i = rd.u64().ok_or_else(|| bad("staged"))?;
                    let after = StateSwitch::from_bytes(rd.array48().ok_or_else(|| bad("staged"))?);
                    let l1 = rd.u64().ok_or_else(|| bad("staged"))?;
                    let table = rd.u64().ok_or_else(|| bad("staged"))?;
                    staged.insert(i, (after, [l1, table]));
                }
                Kind::Retire => {
                    let i = rd.u64().ok_or_else(|| bad("retire"))?;
                    let top = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("retire"))?));
                    let base = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("retire"))?));
                    let dev = rd.u64().ok_or_else(|| bad("retire"))?;
                    let ino = rd.u64().ok_or_else(|| bad("retire"))?;
                    retires.insert(i, (top, base, dev, ino));
                }
                Kind::Bitmaps => {
                    let (i, changes) =
                        crate::bitmaps::decode(&r.payload).ok_or_else(|| bad("bitmaps"))?;
                    bitmaps.insert(i, changes);
                }
                Kind::BitmapDone => {
                    let i = rd.u64().ok_or_else(|| bad("bitmap done"))?;
                    let k = rd.u64().ok_or_else(|| bad("bitmap done"))?;
                    let next = bitmaps_done.entry(i).or_insert(0);
                    *next = (*next).max(k + 1);
                }
                Kind::Overlay => {
                    let i = rd.u64().ok_or_else(|| bad("overlay"))?;
                    let tmp = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("overlay"))?));
                    let fin = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("overlay"))?));
                    overlays.insert(i, (tmp, fin));
                }
                _ => {}
            }
        }
        // Recovery renames and removes only what this transaction made: an overlay's temporary
        // name is the one `run` derives from its final name, and a merged overlay is a member.
        let txn = records[0].txn;
        for (i, (tmp, fin)) in &overlays {
            if tmp != fin && *tmp != temp_name(fin, &txn, *i as usize) {
                return Err(bad("overlay"));
            }
        }
        for (i, (top, ..)) in &retires {
            if !images.iter().any(|(j, p, ..)| j == i && p == top) {
                return Err(bad("retire"));
            }
        }
        for i in bitmaps.keys() {
            if !images.iter().any(|(j, ..)| j == i) || retires.contains_key(i) {
                return Err(bad("bitmaps"));
            }
        }
        // An overlay removed after a committed delete is gone for good.
        let gone =
            |i: &u64, path: &Path| commit && retires.contains_key(i) && !self.fs.exists(path);
        let images: Vec<_> = images
            .into_iter()
            .filter(|(i, path, ..)| !gone(i, path))
            .collect();
        // Every image must still be the file the transaction began with before any is touched.
        let bases = retires
            .values()
            .map(|(_, base, dev, ino)| (base.clone(), *dev, *ino));
        for (path, dev, ino) in images
            .iter()
            .map(|(_, p, dev, ino, _)| (p.clone(), *dev, *ino))
            .chain(bases)
        {
            let path = &path;
            let id = self.fs.stat(path).map_err(|e| TxnError::io(path, e))?;
            if (id.dev, id.ino) != (dev, ino) {
                return Err(TxnError::ForeignChange {
                    image: path.clone(),
                    reason: "the file was replaced".into(),
                });
            }
        }
        let mut manifest = self.manifest()?;
        let mut pivoted = false;
        // Look at every image first: recovery acts only when each one is in a state it made, so
        // a foreign change found on the last image never follows switches on the first ones.
        let mut to_switch = Vec::new();
        for (i, path, _, _, before) in &images {
            let img = self
                .fs
                .open_image(path)
                .map_err(|e| TxnError::image(path, e))?;
            let current = ts::current_state(&img);
            match staged.get(i) {
                Some((after, tables)) if commit && !current.same_state(after) => {
                    if !current.same_state(before) {
                        return Err(TxnError::ForeignChange {
                            image: path.clone(),
                            reason: "its header is neither the old nor the new state".into(),
                        });
                    }
                    // The switch keeps the refcount table where staging left it; a journal that
                    // says otherwise is not ours to apply.
                    if current.refcount_table() != after.refcount_table() {
                        return Err(TxnError::ForeignChange {
                            image: path.clone(),
                            reason: "its refcount table is not where the staged state has it"
                                .into(),
                        });
                    }
                    if *tables != after.staged_tables() {
                        return Err(bad("staged"));
                    }
                    for &t in tables.iter().filter(|&&t| t != 0) {
                        if ts::refcount_at(&img, t).map_err(|e| TxnError::image(path, e))? == 0 {
                            return Err(TxnError::ForeignChange {
                                image: path.clone(),
                                reason: format!("the staged table at {t:#x} was reclaimed"),
                            });
                        }
                    }
                    to_switch.push(*i);
                }
                Some(_) if commit => {}
                _ if !current.same_state(before) => {
                    return Err(TxnError::ForeignChange {
                        image: path.clone(),
                        reason: "its header changed although nothing was published".into(),
                    });
                }
                _ => {}
            }
        }
        for (i, path, _, _, _) in &images {
            let mut img = self
                .fs
                .open_image(path)
                .map_err(|e| TxnError::image(path, e))?;
            if let (true, Some((after, _))) = (to_switch.contains(i), staged.get(i)) {
                ts::write_recorded_switch(img, after).map_err(|e| TxnError::image(path, e))?;
                self.event(&format!("recovery switched {i}"))?;
                img = self
                    .fs
                    .open_image(path)
                    .map_err(|e| TxnError::image(path, e))?;
            }
            // Refcounts follow from what is published now: staged surplus or the old state's
            // clusters are leaks, and fixing leaks reclaims them.
            reclaim_leaks(&img, path)?;
            if let (true, Some(changes)) = (commit, bitmaps.get(i)) {
                let done = bitmaps_done.get(i).copied().unwrap_or(0) as usize;
                let fs = &*self.fs;
                let rest = changes.get(done..).unwrap_or_default();
                crate::bitmaps::apply(&img, path, rest, &|p| fs.open_read_only(p))?;
                self.event(&format!("recovery applied bitmaps {i}"))?;
            }
            img.close().map_err(|e| TxnError::image(path, e))?;
            self.event(&format!("recovered {i}"))?;
            if let Some((tmp, fin)) = overlays.get(i) {
                if commit {
                    if tmp != fin && self.fs.exists(tmp) {
                        self.fs.rename(tmp, fin).map_err(|e| TxnError::io(fin, e))?;
                        self.fs
                            .sync_dir(parent(fin))
                            .map_err(|e| TxnError::io(fin, e))?;
                    }
                    if !self.fs.exists(fin) {
                        return Err(TxnError::ForeignChange {
                            image: fin.clone(),
                            reason: "the committed overlay is missing".into(),
                        });
                    }
                    if !manifest.disks.iter().any(|(_, t)| t == fin) {
                        manifest.pivot(path, fin);
                        pivoted = true;
                    }
                } else if tmp != fin && self.fs.exists(tmp) {
                    self.fs.remove_file(tmp).map_err(|e| TxnError::io(tmp, e))?;
                    self.fs
                        .sync_dir(parent(tmp))
                        .map_err(|e| TxnError::io(tmp, e))?;
                }
            }
        }
        // Merged overlays: the backing file holds their data in full once preparing finished, but
        // a cut while merging can leave it clusters to take back; after a commit the disk's top
        // is the backing file and the overlay goes.
        let mut remove = Vec::new();
        for (top, base, _, _) in retires.values() {
            if is_qcow2(&*self.fs, base) {
                let img = self
                    .fs
                    .open_image(base)
                    .map_err(|e| TxnError::image(base, e))?;
                reclaim_leaks(&img, base)?;
                img.close().map_err(|e| TxnError::image(base, e))?;
            }
            if commit {
                if !manifest.disks.iter().any(|(_, t)| t == base) {
                    manifest.pivot(top, base);
                    pivoted = true;
                }
                remove.push(top.clone());
            }
        }
        if pivoted {
            manifest.generation += 1;
            manifest
                .store(&*self.fs, &self.manifest_path())
                .map_err(|e| TxnError::io(self.manifest_path(), e))?;
        }
        for top in remove.iter().filter(|t| self.fs.exists(t)) {
            self.fs.remove_file(top).map_err(|e| TxnError::io(top, e))?;
            self.fs
                .sync_dir(parent(top))
                .map_err(|e| TxnError::io(top, e))?;
        }
        // A power cut inside `Manifest::store` can leave its temporary file behind.
        let stray = Manifest::temp_path(&self.manifest_path());
        if self.fs.exists(&stray) {
            self.fs
                .remove_file(&stray)
                .map_err(|e| TxnError::io(&stray, e))?;
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| TxnError::io(&self.dir, e))?;
        }
        self.event("recovery reconciled")?;
        // Done: an empty journal means nothing is in flight.
        storage.set_len(0).map_err(|e| TxnError::io(&path, e))?;
        storage.flush().map_err(|e| TxnError::io(&path, e))?;
        Ok(if commit {
            Recovery::RolledForward
        } else {
            Recovery::RolledBack
        })
    }
}

/// The temporary name of an overlay until the transaction commits: hidden, next to the final
/// name, unique to the transaction.
fn temp_name(fin: &Path, txn: &[u8; 16], i: usize) -> PathBuf {
    let name = fin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag: String = txn[..4].iter().map(|b| format!("{b:02x}")).collect();
    parent(fin).join(format!(".{name}.txn-{tag}-{i}"))
}

/// Checks every action before anything is written, and opens every image in a canonical order.
pub(crate) fn validate(
    fs: &dyn GroupFs,
    actions: &[Action],
    manifest: &Manifest,
    group_dir: &Path,
    live: &[LiveHandle],
) -> Result<Vec<Member>, TxnError> {
    let invalid = |image: &Path, reason: String| TxnError::Invalid {
        image: image.to_path_buf(),
        reason,
    };
    if actions.is_empty() {
        return Err(invalid(Path::new(""), "the plan has no actions".into()));
    }
    let mut members: Vec<Member> = Vec::new();
    // Overlays the plan creates: bitmap actions may name them before they exist.
    let new_overlays: Vec<PathBuf> = actions
        .iter()
        .filter_map(|a| match a {
            Action::ExternalCreate { overlay, mode, .. } if mode.creates() => Some(
                fs.canonicalize(parent(overlay))
                    .ok()?
                    .join(overlay.file_name()?),
            ),
            _ => None,
        })
        .collect();
    let mut overlay_bitmaps: Vec<(PathBuf, BitmapChange)> = Vec::new();
    for action in actions {
        let given = action.image();
        if action.is_bitmap() {
            let named = fs
                .canonicalize(parent(given))
                .ok()
                .zip(given.file_name())
                .map(|(dir, name)| dir.join(name));
            if let Some(overlay) = named.filter(|n| new_overlays.contains(n)) {
                match bitmap_change(fs, action)? {
                    add @ BitmapChange::Add { .. } => overlay_bitmaps.push((overlay, add)),
                    _ => {
                        return Err(invalid(
                            given,
                            "is an overlay this plan creates, which has no bitmaps yet: only \
                             block-dirty-bitmap-add applies to it"
                                .into(),
                        ))
                    }
                }
                continue;
            }
        }
        let path = fs
            .canonicalize(given)
            .map_err(|e| invalid(given, format!("cannot be found: {e}")))?;
        let meta = fs.stat(&path).map_err(|e| TxnError::io(&path, e))?;
        if !meta.is_file {
            return Err(invalid(given, "is not a regular file".into()));
        }
        if parent(&path) == group_dir {
            return Err(invalid(
                given,
                "lies in the group directory, which holds only the group's own files".into(),
            ));
        }
        let index = match members
            .iter()
            .position(|m| (m.dev, m.ino) == (meta.dev, meta.ino))
        {
            Some(i) if members[i].given != given => {
                return Err(invalid(
                    given,
                    format!(
                        "is the same file as {} (a link or another spelling): name each image once",
                        members[i].given.display()
                    ),
                ))
            }
            Some(i) => i,
            None => {
                members.push(Member {
                    path: path.clone(),
                    given: given.to_path_buf(),
                    dev: meta.dev,
                    ino: meta.ino,
                    image: None,
                    changes: Vec::new(),
                    overlay: None,
                    overlay_mode: OverlayMode::New,
                    retire: false,
                    bitmaps: Vec::new(),
                    overlay_bitmaps: Vec::new(),
                });
                members.len() - 1
            }
        };
        let m = &mut members[index];
        match action {
            Action::InternalCreate { name, .. } => {
                if name.is_empty() {
                    return Err(invalid(given, "the snapshot name is empty".into()));
                }
                if m.changes
                    .iter()
                    .any(|c| matches!(c, SnapshotChange::Create { name: n, .. } if n == name))
                {
                    return Err(invalid(
                        given,
                        format!("snapshot name {name:?} appears twice in the plan"),
                    ));
                }
                m.changes.push(SnapshotChange::Create {
                    name: name.clone(),
                    time: now(),
                });
            }
            Action::InternalDelete { name, .. } => m.changes.push(SnapshotChange::Delete {
                id_or_name: name.clone(),
            }),
            Action::InternalRevert { name, .. } => m.changes.push(SnapshotChange::Revert {
                id_or_name: name.clone(),
            }),
            Action::ExternalCreate { overlay, mode, .. } => {
                if m.overlay.is_some() {
                    return Err(invalid(given, "two overlays for one image".into()));
                }
                // The overlay's directory must exist; its canonical path names it everywhere.
                let dir = fs.canonicalize(parent(overlay)).map_err(|e| {
                    invalid(
                        overlay,
                        format!("the overlay's directory cannot be found: {e}"),
                    )
                })?;
                let name = overlay
                    .file_name()
                    .ok_or_else(|| invalid(overlay, "the overlay path has no file name".into()))?;
                if dir == group_dir {
                    return Err(invalid(
                        overlay,
                        "lies in the group directory, which holds only the group's own files"
                            .into(),
                    ));
                }
                m.overlay = Some(dir.join(name));
                m.overlay_mode = *mode;
            }
            Action::ExternalDelete { .. } => {
                if m.retire {
                    return Err(invalid(given, "the overlay is deleted twice".into()));
                }
                m.retire = true;
            }
            _ => m.bitmaps.push(bitmap_change(fs, action)?),
        }
    }
    for (overlay, add) in overlay_bitmaps {
        if let Some(m) = members
            .iter_mut()
            .find(|m| m.overlay.as_ref() == Some(&overlay))
        {
            m.overlay_bitmaps.push(add);
        }
    }
    for m in &members {
        for change in &m.bitmaps {
            let BitmapChange::Merge { sources, .. } = change else {
                continue;
            };
            for source in sources.iter().filter_map(|(image, _)| image.as_ref()) {
                if members.iter().any(|o| &o.path == source) {
                    return Err(invalid(
                        &m.given,
                        format!(
                            "merges a bitmap of {}, which this plan changes too: merge in a \
                             plan of its own",
                            source.display()
                        ),
                    ));
                }
            }
        }
    }
    for m in &members {
        if m.retire && (m.overlay.is_some() || !m.changes.is_empty() || !m.bitmaps.is_empty()) {
            return Err(invalid(
                &m.path,
                "an overlay that is deleted cannot take other actions in the same plan".into(),
            ));
        }
    }
    // Overlays: a free path, not an image of the group, not chosen twice.
    for (i, m) in members.iter().enumerate() {
        let Some(overlay) = &m.overlay else { continue };
        if members[..i]
            .iter()
            .any(|o| o.overlay.as_ref() == Some(overlay))
        {
            return Err(invalid(
                overlay,
                "two images of the plan get the same overlay".into(),
            ));
        }
        if !m.changes.is_empty() {
            return Err(invalid(
                &m.path,
                "an external snapshot cannot be combined with internal changes to the same image"
                    .into(),
            ));
        }
        if let Ok(meta) = fs.stat(overlay) {
            if m.overlay_mode.creates() && (meta.len > 0 || !meta.is_file) {
                return Err(invalid(
                    overlay,
                    "the overlay path is taken by a non-empty file".into(),
                ));
            }
            if members
                .iter()
                .any(|o| (o.dev, o.ino) == (meta.dev, meta.ino))
            {
                return Err(invalid(
                    overlay,
                    "the overlay path is an image of the group".into(),
                ));
            }
        }
        if !fs.is_dir(parent(overlay)) {
            return Err(invalid(
                overlay,
                "the overlay's directory does not exist".into(),
            ));
        }
    }
    // A disk that was pivoted to an overlay is read through that overlay: changing any image
    // underneath (the old top, or an overlay between) would silently change what the guest reads.
    let below = images_below_tops(fs, manifest);
    for m in &members {
        if let Some((_, top)) = below.iter().find(|(image, _)| image == &m.path) {
            return Err(invalid(
                &m.given,
                format!(
                    "is the base of a disk whose top is now {} (an external snapshot): act on the top",
                    top.display()
                ),
            ));
        }
    }
    // An overlay to delete may be the backing file of an image outside the group; whoever has
    // that image open holds a lock on the overlay.
    for m in members.iter().filter(|m| m.retire) {
        match fs.probe_unused(&m.path) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                return Err(invalid(
                    &m.given,
                    format!("is in use by another process ({why}): it cannot be deleted"),
                ))
            }
            Err(e) => return Err(TxnError::io(&m.path, e)),
        }
    }
    // Open in a canonical order (device, inode) so two groups never deadlock on image locks.
    members.sort_by_key(|m| (m.dev, m.ino));
    for m in members.iter_mut() {
        let img = match live.iter().find(|h| h.path == m.path) {
            Some(handle) => {
                refuse_on_live(m, handle.top.is_some())?;
                Held::Live(handle.image.clone(), handle.top.clone())
            }
            None => Held::Own(Box::new(
                if m.retire {
                    fs.open_for_commit(&m.path)
                } else {
                    fs.open_image(&m.path)
                }
                .map_err(|e| TxnError::image(&m.path, e))?,
            )),
        };
        check_member(&img, m)?;
        check_bitmaps(fs, &img, m)?;
        m.image = Some(img);
        let img = m.image.as_deref().expect("just opened");
        if let (Some(overlay), OverlayMode::Existing) = (&m.overlay, m.overlay_mode) {
            check_existing_overlay(fs, overlay, &m.path, img.size())?;
        }
    }
    check_space(fs, &members)?;
    for m in members.iter().filter(|m| m.retire) {
        check_retire(fs, m, &members, manifest)?;
    }
    Ok(members)
}

/// An image the caller holds open and serves I/O through (`Transaction::attach`).
#[derive(Clone)]
pub(crate) struct LiveHandle {
    /// The image's canonical path.
    pub path: PathBuf,
    pub image: Arc<Image>,
    /// The disk top the caller serves through (`Transaction::attach_top`): an external
    /// snapshot moves the disk's I/O to its overlay there.
    pub top: Option<Arc<DiskTop>>,
}

/// What a live handle cannot take: a new top unless the caller serves it through a
/// [`DiskTop`] (its handle would go on writing into the old image), a new active state under
/// its I/O (a revert), or being merged away.
fn refuse_on_live(m: &Member, has_top: bool) -> Result<(), TxnError> {
    let refused = |action| {
        Err(TxnError::LiveUnsupported {
            image: m.path.clone(),
            action,
        })
    };
    if m.overlay.is_some() && !has_top {
        return refused("an external snapshot (blockdev-snapshot-sync) without a disk top");
    }
    if m.retire {
        return refused("deleting an external snapshot");
    }
    if m.changes
        .iter()
        .any(|c| matches!(c, SnapshotChange::Revert { .. }))
    {
        return refused("reverting to an internal snapshot");
    }
    Ok(())
}

/// Every image below a disk's current top in the manifest, with that top: the backing chain read
/// from the qcow2 headers (a few KiB each), as deep as QEMU's limit. A header that cannot be
/// read or decoded ends that walk; the images themselves are checked when opened.
fn images_below_tops(fs: &dyn GroupFs, manifest: &Manifest) -> Vec<(PathBuf, PathBuf)> {
    const HEAD: usize = 64 << 10;
    let mut below = Vec::new();
    for (disk, top) in &manifest.disks {
        if disk == top {
            continue;
        }
        let mut at = top.clone();
        for _ in 0..qcow2::format::limits::DEFAULT_MAX_BACKING_DEPTH {
            let Ok(bytes) = fs.read_prefix(&at, HEAD) else {
                break;
            };
            let Ok(header) = qcow2::format::Header::decode(&bytes) else {
                break;
            };
            let Some(name) = header.backing_file else {
                break;
            };
            let name = String::from_utf8_lossy(&name).into_owned();
            let next = qcow2::image::resolve_relative(&at, &name);
            let Ok(next) = fs.canonicalize(&next) else {
                break;
            };
            below.push((next.clone(), top.clone()));
            at = next;
        }
        // The manifest's own record of the disk's first image, whatever the headers say.
        below.push((disk.clone(), top.clone()));
    }
    below
}

/// The snapshot count and table size after the member's changes stay within QEMU's limits
/// (65536 snapshots, a 64 MiB table), so a plan that would break them is refused before any
/// write rather than while staging.
fn check_limits(img: &Image, m: &Member, deleted: &[Vec<u8>]) -> Result<(), TxnError> {
    use qcow2::format::limits::{
        MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, SNAPSHOT_ENTRY_FIXED_SIZE, SNAPSHOT_EXTRA_KNOWN_SIZE,
    };
    use qcow2::format::snapshot::{align_entry, TIME64_FIELD_SIZE};
    let kept: Vec<_> = img
        .snapshot_entries()
        .into_iter()
        .filter(|e| !deleted.contains(&e.id))
        .collect();
    let mut count = kept.len() as u64;
    let mut table = qcow2::format::snapshot::encode_table(&kept).len() as u64;
    for c in &m.changes {
        if let SnapshotChange::Create { name, .. } = c {
            count += 1;
            // A new entry: fixed part, known extra data with the 64-bit time, id and name.
            let id_len = (count + 1).to_string().len();
            let len = SNAPSHOT_ENTRY_FIXED_SIZE
                + SNAPSHOT_EXTRA_KNOWN_SIZE
                + TIME64_FIELD_SIZE
                + id_len
                + name.len();
            table = align_entry(table) + len as u64;
        }
    }
    let invalid = |reason: String| TxnError::Invalid {
        image: m.path.clone(),
        reason,
    };
    if count > u64::from(MAX_SNAPSHOTS) {
        return Err(invalid(format!(
            "too many snapshots: {count} would exceed the limit of {MAX_SNAPSHOTS}"
        )));
    }
    if table > MAX_SNAPSHOTS_SIZE {
        return Err(invalid(format!(
            "the snapshot table would take {table} bytes, more than the limit of {MAX_SNAPSHOTS_SIZE}"
        )));
    }
    Ok(())
}

/// Refuses a plan the file systems plainly have no room for (statvfs), before any write. The
/// estimate is generous: per image, fresh copies of its L1 and snapshot tables with room for
/// the new entries and a few refcount blocks; per new overlay, its first clusters.
fn check_space(fs: &dyn GroupFs, members: &[Member]) -> Result<(), TxnError> {
    let mut need: Vec<(u64, &Path, u64)> = Vec::new();
    for m in members {
        let Some(img) = &m.image else { continue };
        let cs = img.cluster_size();
        let round = |bytes: u64| bytes.div_ceil(cs) * cs;
        let (dev, place, bytes) = match (&m.overlay, m.overlay_mode) {
            (Some(overlay), mode) if mode.creates() => {
                let dev = fs.stat(parent(overlay)).map_or(m.dev, |id| id.dev);
                (dev, overlay.as_path(), 4 << 16)
            }
            (Some(_), _) => continue,
            (None, _) => {
                let table = qcow2::format::snapshot::encode_table(&img.snapshot_entries()).len();
                let new_entries = 1024 * m.changes.len() as u64;
                let l1 = u64::from(img.header().l1_size) * 8;
                let bytes = round(l1) + round(table as u64 + new_entries) + 4 * cs;
                (m.dev, m.path.as_path(), bytes)
            }
        };
        match need.iter_mut().find(|(d, _, _)| *d == dev) {
            Some(entry) => entry.2 += bytes,
            None => need.push((dev, place, bytes)),
        }
    }
    for (_, place, bytes) in need {
        if let Some(free) = fs.free_space(parent(place)) {
            if free < bytes {
                return Err(TxnError::Invalid {
                    image: place.to_path_buf(),
                    reason: format!(
                        "not enough space: the transaction needs about {bytes} bytes here, \
                         {free} are free"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Where an overlay's backing file is, by the name its header gives.
fn backing_path(fs: &dyn GroupFs, overlay: &Path, img: &Image) -> Option<PathBuf> {
    let name = img.backing_file_name()?;
    fs.canonicalize(&parent(overlay).join(name)).ok()
}

/// An overlay to delete must have a backing file to merge into that no other action of the plan
/// changes, no internal snapshots (they would go with it), and no image of the group (in the plan
/// or the manifest) may still be backed by it.
fn check_retire(
    fs: &dyn GroupFs,
    m: &Member,
    members: &[Member],
    manifest: &Manifest,
) -> Result<(), TxnError> {
    let invalid = |reason: String| TxnError::Invalid {
        image: m.path.clone(),
        reason,
    };
    let img = m.image.as_deref().expect("members are opened");
    let base = backing_path(fs, &m.path, img)
        .ok_or_else(|| invalid("has no backing file to merge into".into()))?;
    if members.iter().any(|o| o.path == base) {
        return Err(invalid(format!(
            "its backing file {} is changed by another action of the plan",
            base.display()
        )));
    }
    if !img.snapshot_entries().is_empty() {
        return Err(invalid(
            "has internal snapshots, which deleting the overlay would lose".into(),
        ));
    }
    let others = members
        .iter()
        .filter(|o| o.path != m.path)
        .map(|o| o.path.clone())
        .chain(manifest.disks.iter().map(|(_, top)| top.clone()));
    for other in others {
        let Ok(storage) = fs.open_existing(&other) else {
            continue;
        };
        let options = qcow2::OpenOptions::default().backing(qcow2::BackingPolicy::Ignore);
        let Ok(o) = Image::from_storage(storage, &other.display().to_string(), &options) else {
            continue;
        };
        if backing_path(fs, &other, &o).as_deref() == Some(m.path.as_path()) {
            return Err(invalid(format!(
                "{} is still backed by it",
                other.display()
            )));
        }
    }
    Ok(())
}

/// Whether the file at `path` starts with the qcow2 magic.
fn is_qcow2(fs: &dyn GroupFs, path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs.open_existing(path)
        .and_then(|s| s.read_at(&mut magic, 0))
        .is_ok_and(|n| n == 4 && u32::from_be_bytes(magic) == qcow2::format::limits::QCOW_MAGIC)
}

/// Runs `work` on the selected steps: on threads of their own where the file system allows
/// (each image is its own file), else one after another so a recording file system logs the
/// same order on every run. Results come back in step order.
pub(crate) fn each_selected<T: Send>(
    fs: &dyn GroupFs,
    mut steps: Vec<&mut Box<dyn Step>>,
    work: impl Fn(&mut dyn Step, &dyn GroupFs) -> Result<T, TxnError> + Sync,
) -> Vec<Result<T, TxnError>> {
    if !fs.parallel() || steps.len() < 2 {
        return steps
            .into_iter()
            .map(|step| work(&mut **step, fs))
            .collect();
    }
    let work = &work;
    let panicked = || Err(TxnError::Interrupted("a step's thread panicked".into()));
    std::thread::scope(|scope| {
        // The calling thread takes the last step itself: one thread fewer to start per phase.
        let last = steps.pop().expect("two or more steps");
        let handles: Vec<_> = steps
            .into_iter()
            .map(|step| scope.spawn(move || work(&mut **step, fs)))
            .collect();
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut **last, fs)))
            .unwrap_or_else(|_| panicked());
        let mut results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panicked()))
            .collect();
        results.push(own);
        results
    })
}

/// A journal record to write: its kind and payload.
pub(crate) type NewRecord = (Kind, Vec<u8>);

/// Turns validated members into their journal records (`Image` for each, `Overlay` intents) and
/// their steps, in lock order.
pub(crate) fn plan_steps(
    fs: &dyn GroupFs,
    members: Vec<Member>,
    txn: &[u8; 16],
) -> (Vec<NewRecord>, Vec<Box<dyn Step>>) {
    let mut records = Vec::new();
    let mut steps: Vec<Box<dyn Step>> = Vec::new();
    for (i, m) in members.into_iter().enumerate() {
        let before = m
            .image
            .as_ref()
            .map_or([0; 48], |img| ts::current_state(img).to_bytes());
        let w = Writer::default()
            .u64(i as u64)
            .bytes(m.path.as_os_str().as_encoded_bytes())
            .u64(m.dev)
            .u64(m.ino)
            .bytes(&before);
        records.push((Kind::Image, w.0));
        if !m.bitmaps.is_empty() {
            records.push((Kind::Bitmaps, crate::bitmaps::encode(i, &m.bitmaps)));
        }
        if m.retire {
            let img = m.image.expect("members are opened");
            // Validation found the backing file, so it resolves.
            let base = backing_path(fs, &m.path, &img).unwrap_or_default();
            let id = fs.stat(&base).map_or((0, 0), |id| (id.dev, id.ino));
            let w = Writer::default()
                .u64(i as u64)
                .bytes(m.path.as_os_str().as_encoded_bytes())
                .bytes(base.as_os_str().as_encoded_bytes())
                .u64(id.0)
                .u64(id.1);
            records.push((Kind::Retire, w.0));
            steps.push(Box::new(RetireStep {
                path: m.path,
                base,
                image: Some(img),
                committed: false,
            }));
            continue;
        }
        match m.overlay {
            Some(fin) => {
                // An overlay in place already has nothing to create or rename.
                let tmp = if m.overlay_mode.creates() {
                    temp_name(&fin, txn, i)
                } else {
                    fin.clone()
                };
                let w = Writer::default()
                    .u64(i as u64)
                    .bytes(tmp.as_os_str().as_encoded_bytes())
                    .bytes(fin.as_os_str().as_encoded_bytes());
                records.push((Kind::Overlay, w.0));
                steps.push(Box::new(OverlayStep {
                    path: m.path,
                    image: m.image,
                    tmp,
                    fin,
                    absolute_backing: m.overlay_mode == OverlayMode::NewAbsolute,
                    bitmaps: m.bitmaps,
                    overlay_bitmaps: m.overlay_bitmaps,
                    opened: None,
                }));
            }
            None => steps.push(Box::new(SnapshotStep {
                index: i,
                path: m.path,
                image: m.image,
                changes: m.changes,
                bitmaps: m.bitmaps,
                staged: None,
            })),
        }
    }
    (records, steps)
}

/// An existing overlay must be a qcow2 image of the same size whose backing file is `image`
/// (named relative to the overlay, as a qcow2 backing name is), in qcow2 format.
fn check_existing_overlay(
    fs: &dyn GroupFs,
    overlay: &Path,
    image: &Path,
    size: u64,
) -> Result<(), TxnError> {
    let invalid = |reason: String| TxnError::Invalid {
        image: overlay.to_path_buf(),
        reason,
    };
    let ov = fs
        .open_image(overlay)
        .map_err(|e| invalid(format!("the existing overlay cannot be used: {e}")))?;
    let backing = ov
        .backing_file_name()
        .ok_or_else(|| invalid("the existing overlay has no backing file".into()))?;
    let resolved = fs.canonicalize(&parent(overlay).join(&backing));
    if resolved.ok().as_deref() != Some(image) {
        return Err(invalid(format!(
            "the existing overlay is backed by {backing:?}, not by {}",
            image.display()
        )));
    }
    match ov.backing_format().as_deref() {
        None | Some("qcow2") => {}
        Some(other) => {
            return Err(invalid(format!(
                "the existing overlay names its backing file as {other}, not qcow2"
            )))
        }
    }
    if ov.size() != size {
        return Err(invalid(format!(
            "the existing overlay is {} bytes, the image {size}",
            ov.size()
        )));
    }
    ov.close().map_err(|e| TxnError::image(overlay, e))
}

/// Turns a bitmap action into the change it makes; merge sources name canonical images, and a
/// granularity of 0 stands for QEMU's default until the image is open.
fn bitmap_change(fs: &dyn GroupFs, action: &Action) -> Result<BitmapChange, TxnError> {
    let name = |n: &String| n.clone();
    Ok(match action {
        Action::BitmapAdd {
            name: n,
            granularity,
            disabled,
            ..
        } => BitmapChange::Add {
            name: name(n),
            granularity: granularity.unwrap_or(0),
            disabled: *disabled,
        },
        Action::BitmapRemove { name: n, .. } => BitmapChange::Remove { name: name(n) },
        Action::BitmapClear { name: n, .. } => BitmapChange::Clear { name: name(n) },
        Action::BitmapEnable { name: n, .. } => BitmapChange::Enable { name: name(n) },
        Action::BitmapDisable { name: n, .. } => BitmapChange::Disable { name: name(n) },
        Action::BitmapMerge {
            image,
            target,
            sources,
        } => {
            let own = fs.canonicalize(image).ok();
            let mut resolved = Vec::new();
            for s in sources {
                let at = match &s.image {
                    None => None,
                    Some(p) => {
                        let c = fs.canonicalize(p).map_err(|e| TxnError::Invalid {
                            image: p.clone(),
                            reason: format!("the merge source cannot be found: {e}"),
                        })?;
                        (Some(&c) != own.as_ref()).then_some(c)
                    }
                };
                resolved.push((at, s.name.clone()));
            }
            BitmapChange::Merge {
                target: target.clone(),
                sources: resolved,
            }
        }
        other => {
            return Err(TxnError::Invalid {
                image: other.image().to_path_buf(),
                reason: "is not a bitmap action".into(),
            })
        }
    })
}

/// Gives bitmaps added without a granularity QEMU's default, then replays the member's bitmap
/// changes on a model of its bitmaps (and of the new overlay's).
fn check_bitmaps(fs: &dyn GroupFs, img: &Image, m: &mut Member) -> Result<(), TxnError> {
    let default = img.default_bitmap_granularity();
    for change in m.bitmaps.iter_mut() {
        if let BitmapChange::Add { granularity, .. } = change {
            if *granularity == 0 {
                *granularity = default;
            }
        }
    }
    let mut other = |p: &Path| {
        let o = fs.open_read_only(p).map_err(|e| TxnError::image(p, e))?;
        Ok((o.size(), o.bitmaps()))
    };
    crate::bitmaps::check(img, &m.path, &m.bitmaps, &mut other)?;
    if m.overlay_bitmaps.is_empty() {
        return Ok(());
    }
    // The overlay starts empty, with the image's size and the default cluster size.
    let overlay = m.overlay.clone().unwrap_or_default();
    let probe = Image::create_in(
        Box::new(qcow2::MemoryStorage::new()),
        &overlay.display().to_string(),
        &CreateOptions::new(img.size()),
    )
    .map_err(|e| TxnError::image(&overlay, e))?;
    for change in m.overlay_bitmaps.iter_mut() {
        if let BitmapChange::Add { granularity, .. } = change {
            if *granularity == 0 {
                *granularity = probe.default_bitmap_granularity();
            }
        }
    }
    crate::bitmaps::check(&probe, &overlay, &m.overlay_bitmaps, &mut other)
}

/// Per-image checks that need the open image.
fn check_member(img: &Image, m: &Member) -> Result<(), TxnError> {
    let invalid = |reason: String| TxnError::Invalid {
        image: m.path.clone(),
        reason,
    };
    let existing = img.snapshot_entries();
    let mut deleted = Vec::new();
    if let Some(i) = m
        .changes
        .iter()
        .position(|c| matches!(c, SnapshotChange::Revert { .. }))
    {
        if i + 1 < m.changes.len() {
            return Err(invalid(
                "a revert must be the last action on an image in a plan".into(),
            ));
        }
    }
    for c in &m.changes {
        match c {
            SnapshotChange::Create { name, .. } => {
                if existing.iter().any(|s| s.name == name.as_bytes()) {
                    return Err(invalid(format!("a snapshot named {name:?} exists already")));
                }
            }
            SnapshotChange::Delete { id_or_name } | SnapshotChange::Revert { id_or_name } => {
                let entry = img
                    .find_snapshot(id_or_name)
                    .ok_or_else(|| invalid(format!("no snapshot {id_or_name:?}")))?;
                if let SnapshotChange::Revert { .. } = c {
                    if deleted.contains(&entry.id) {
                        return Err(invalid(format!(
                            "snapshot {id_or_name:?} is deleted and reverted to"
                        )));
                    }
                    if entry.disk_size().is_some_and(|s| s != img.size()) {
                        return Err(invalid(format!(
                            "snapshot {id_or_name:?} has another disk size than the image"
                        )));
                    }
                } else {
                    if deleted.contains(&entry.id) {
                        return Err(invalid(format!("snapshot {id_or_name:?} is deleted twice")));
                    }
                    deleted.push(entry.id.clone());
                }
            }
        }
    }
    check_limits(img, m, &deleted)
}

fn now() -> qcow2::format::SnapshotTime {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    qcow2::format::SnapshotTime {
        secs: d.as_secs() as i64,
        nanos: d.subsec_micros() * 1000,
    }
}
