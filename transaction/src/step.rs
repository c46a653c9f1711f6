//! The steps of a transaction, one per image: every kind of action implements [`Step`], and the
//! group drives them all through the same protocol (as QEMU's transaction actions do):
//!
//! - `prepare` builds the new state where no reader sees it (fresh clusters with raised
//!   refcounts, a temporary overlay file) and says what recovery needs to know about it;
//! - `commit` publishes it, after the group's decision is durable;
//! - `abort` takes back what `prepare` built, before any decision;
//! - `clean` closes what the step holds, whatever the outcome.
//!
//! Several actions on one image merge into one step, so they cost one table write and one
//! header switch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::transaction_support::{self as ts, SnapshotChange, StagedChange};
use qcow2::{CreateOptions, DiskTop, Image};

use crate::bitmaps::BitmapChange;
use crate::codec::Writer;
use crate::error::TxnError;
use crate::fs::{parent, GroupFs};

/// A disk's top changing from the first image to the second.
pub(crate) type Pivot = (PathBuf, PathBuf);

/// One image's part of a group transaction.
pub(crate) trait Step: Send {
    /// Builds the new state, invisible to readers. Returns the payload of a `Staged` journal
    /// record when recovery needs one to finish the commit.
    fn prepare(&mut self, fs: &dyn GroupFs) -> Result<Option<Vec<u8>>, TxnError>;
    /// Publishes the prepared state (the group decision is durable). Returns the manifest pivot
    /// (old top, new top) the step makes, if any.
    fn commit(&mut self, fs: &dyn GroupFs) -> Result<Option<Pivot>, TxnError>;
    /// Takes back what `prepare` built (no decision was made).
    fn abort(&mut self, fs: &dyn GroupFs) -> Result<(), TxnError>;
    /// Closes the image cleanly, and after a commit removes what the step made obsolete.
    fn clean(&mut self, fs: &dyn GroupFs) -> Result<(), TxnError>;
    /// The image's bitmap changes, which the group applies one by one after every commit.
    fn bitmaps(&self) -> Option<(&Image, &Path, &[BitmapChange])> {
        None
    }
    /// Whether the step acts on a live handle (prepared while its writes are paused).
    fn live(&self) -> bool {
        false
    }
}

/// An image a transaction acts on: opened (and locked) by the transaction itself, or a live
/// handle its caller holds open and keeps serving I/O through.
pub(crate) enum Held {
    Own(Box<Image>),
    /// The caller's handle, with the disk top it serves through when it gave one (only then
    /// can an external snapshot move the disk's I/O to the new overlay).
    Live(Arc<Image>, Option<Arc<DiskTop>>),
}

impl std::ops::Deref for Held {
    type Target = Image;

    fn deref(&self) -> &Image {
        match self {
            Held::Own(img) => img,
            Held::Live(img, _) => img,
        }
    }
}

impl Held {
    /// The caller's handle, when the image is live.
    pub fn live(&self) -> Option<&Arc<Image>> {
        match self {
            Held::Live(img, _) => Some(img),
            Held::Own(_) => None,
        }
    }

    /// The disk top the caller serves the image through, when it gave one.
    pub fn top(&self) -> Option<&Arc<DiskTop>> {
        match self {
            Held::Live(_, top) => top.as_ref(),
            Held::Own(_) => None,
        }
    }

    /// Closes an image the transaction opened; a live one stays open for its caller, with what
    /// it cached written back.
    fn close(self) -> qcow2::Result<()> {
        match self {
            Held::Own(img) => img.close(),
            Held::Live(img, _) => img.flush(),
        }
    }
}

/// Closes the image a step holds (writing back what it cached), if it still holds one.
fn close_held(image: &mut Option<Held>, path: &Path) -> Result<(), TxnError> {
    match image.take() {
        Some(img) => img.close().map_err(|e| TxnError::image(path, e)),
        None => Ok(()),
    }
}

/// Internal snapshot changes of one image (create, delete and revert, merged), then its bitmap
/// changes.
pub(crate) struct SnapshotStep {
    pub index: usize,
    pub path: PathBuf,
    pub image: Option<Held>,
    pub changes: Vec<SnapshotChange>,
    pub bitmaps: Vec<BitmapChange>,
    pub staged: Option<StagedChange>,
}

impl SnapshotStep {
    fn image(&self) -> &Image {
        self.image
            .as_deref()
            .expect("the image stays open until clean")
    }
}

impl Step for SnapshotStep {
    fn prepare(&mut self, _fs: &dyn GroupFs) -> Result<Option<Vec<u8>>, TxnError> {
        if self.changes.is_empty() {
            return Ok(None);
        }
        let staged =
            ts::stage(self.image(), &self.changes).map_err(|e| TxnError::image(&self.path, e))?;
        let record = Writer::default()
            .u64(self.index as u64)
            .bytes(&staged.switch().to_bytes())
            .u64(staged.switch().staged_tables()[0])
            .u64(staged.switch().staged_tables()[1]);
        self.staged = Some(staged);
        Ok(Some(record.0))
    }

    fn commit(&mut self, fs: &dyn GroupFs) -> Result<Option<Pivot>, TxnError> {
        if let Some(staged) = self.staged.take() {
            fs.event("snapshot_header_switch");
            ts::publish_decided(self.image(), staged)
                .map_err(|e| TxnError::image(&self.path, e))?;
        }
        Ok(None)
    }

    fn abort(&mut self, _fs: &dyn GroupFs) -> Result<(), TxnError> {
        match self.staged.take() {
            Some(staged) => {
                ts::abandon(self.image(), staged).map_err(|e| TxnError::image(&self.path, e))
            }
            None => Ok(()),
        }
    }

    fn clean(&mut self, _fs: &dyn GroupFs) -> Result<(), TxnError> {
        close_held(&mut self.image, &self.path)
    }

    fn bitmaps(&self) -> Option<(&Image, &Path, &[BitmapChange])> {
        Some((self.image.as_deref()?, &self.path, &self.bitmaps))
    }

    fn live(&self) -> bool {
        self.image.as_ref().is_some_and(|h| h.live().is_some())
    }
}

/// An external snapshot: an overlay backed by the image becomes the disk's top in the manifest.
/// A new overlay is made under a temporary name and renamed on commit; an existing one (`tmp ==
/// fin`) is only pivoted to, and never removed. On a live disk served through a [`DiskTop`],
/// the overlay is opened while preparing and becomes the disk's top inside the pause, after
/// the rename: guest writes then go to it.
pub(crate) struct OverlayStep {
    pub path: PathBuf,
    /// Held open (locked) so nobody writes the image while it gets its overlay.
    pub image: Option<Held>,
    pub tmp: PathBuf,
    pub fin: PathBuf,
    /// The new overlay names the image by its absolute path, not relative to its directory.
    pub absolute_backing: bool,
    /// Bitmap changes of the image, after the decision.
    pub bitmaps: Vec<BitmapChange>,
    /// Bitmaps the new overlay starts with.
    pub overlay_bitmaps: Vec<BitmapChange>,
    /// The overlay, opened for the live disk's users (live disks only).
    pub opened: Option<Image>,
}

impl OverlayStep {
    fn creates(&self) -> bool {
        self.tmp != self.fin
    }
}

impl Step for OverlayStep {
    fn prepare(&mut self, fs: &dyn GroupFs) -> Result<Option<Vec<u8>>, TxnError> {
        if self.creates() {
            let size = self.image.as_deref().map_or(0, Image::size);
            create_overlay(
                fs,
                &self.path,
                size,
                (&self.tmp, &self.fin),
                self.absolute_backing,
                &self.overlay_bitmaps,
            )?;
        }
        if let Some(top) = self.image.as_ref().and_then(Held::top) {
            let overlay = fs
                .open_overlay(&self.tmp, top.image().is_direct_io())
                .map_err(|e| TxnError::image(&self.tmp, e))?;
            self.opened = Some(overlay);
        }
        Ok(None)
    }

    fn commit(&mut self, fs: &dyn GroupFs) -> Result<Option<Pivot>, TxnError> {
        if self.creates() {
            fs.event("overlay_rename");
            fs.rename(&self.tmp, &self.fin)
                .map_err(|e| TxnError::io(&self.fin, e))?;
            fs.sync_dir(parent(&self.fin))
                .map_err(|e| TxnError::io(&self.fin, e))?;
        }
        if let (Some(mut overlay), Some(held)) = (self.opened.take(), &self.image) {
            if let (Some(below), Some(top)) = (held.live(), held.top()) {
                ts::relocate(&mut overlay, &self.fin);
                // A guest FLUSH after the switch reaches only the overlay: what the disk
                // acknowledged below it is made durable now.
                below.flush().map_err(|e| TxnError::image(&self.path, e))?;
                overlay.attach_shared_backing(below.clone());
                fs.event("overlay_push");
                ts::push_overlay(top, Arc::new(overlay))
                    .map_err(|e| TxnError::image(&self.fin, e))?;
            }
        }
        Ok(Some((self.path.clone(), self.fin.clone())))
    }

    fn abort(&mut self, fs: &dyn GroupFs) -> Result<(), TxnError> {
        // Closed before its file goes.
        drop(self.opened.take());
        if self.creates() && fs.exists(&self.tmp) {
            fs.remove_file(&self.tmp)
                .map_err(|e| TxnError::io(&self.tmp, e))?;
            fs.sync_dir(parent(&self.tmp))
                .map_err(|e| TxnError::io(&self.tmp, e))?;
        }
        Ok(())
    }

    fn clean(&mut self, _fs: &dyn GroupFs) -> Result<(), TxnError> {
        close_held(&mut self.image, &self.path)
    }

    fn bitmaps(&self) -> Option<(&Image, &Path, &[BitmapChange])> {
        Some((self.image.as_deref()?, &self.path, &self.bitmaps))
    }
}

/// An external snapshot deleted: the overlay's data is merged into its backing file while
/// preparing (the disk, read through the overlay, shows the same bytes before and after), the
/// manifest points the disk at the backing file on commit, and the overlay file goes once the
/// manifest is durable.
pub(crate) struct RetireStep {
    pub path: PathBuf,
    pub base: PathBuf,
    /// The overlay, read-only, over its backing file opened writable.
    pub image: Option<Held>,
    pub committed: bool,
}

impl Step for RetireStep {
    fn prepare(&mut self, fs: &dyn GroupFs) -> Result<Option<Vec<u8>>, TxnError> {
        fs.event("overlay_merge");
        let image = self
            .image
            .as_deref()
            .expect("the image stays open until clean");
        let options = qcow2::image::CommitOptions::default()
            .base_depth(1)
            .empty_top(false);
        image
            .commit(&options, &mut |_, _| {})
            .map_err(|e| TxnError::image(&self.path, e))?;
        Ok(None)
    }

    fn commit(&mut self, _fs: &dyn GroupFs) -> Result<Option<Pivot>, TxnError> {
        self.committed = true;
        Ok(Some((self.path.clone(), self.base.clone())))
    }

    fn abort(&mut self, _fs: &dyn GroupFs) -> Result<(), TxnError> {
        // The backing file may hold some of the overlay's data now, which the disk (read
        // through the overlay) never shows; only clusters a failed write left behind need
        // taking back.
        let image = self
            .image
            .as_deref()
            .expect("the image stays open until clean");
        match image.backing_image() {
            Some(base) => reclaim_leaks(base, &self.base),
            None => Ok(()),
        }
    }

    fn clean(&mut self, fs: &dyn GroupFs) -> Result<(), TxnError> {
        close_held(&mut self.image, &self.path)?;
        // The manifest no longer names the overlay: it can go.
        if self.committed && fs.exists(&self.path) {
            fs.event("overlay_remove");
            fs.remove_file(&self.path)
                .map_err(|e| TxnError::io(&self.path, e))?;
            fs.sync_dir(parent(&self.path))
                .map_err(|e| TxnError::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Takes back leaked clusters (a staged surplus, an old state's clusters, a cut write's
/// allocations): refcounts then follow from what is published. Anything still wrong afterwards
/// is not ours to guess about.
pub(crate) fn reclaim_leaks(img: &Image, path: &Path) -> Result<(), TxnError> {
    let report = img
        .check_and_repair(qcow2::Repair::Leaks)
        .map_err(|e| TxnError::image(path, e))?;
    if report.is_clean() {
        return Ok(());
    }
    Err(TxnError::image(
        path,
        qcow2::Error::InvalidArgument {
            image: path.display().to_string(),
            reason: format!(
                "still inconsistent after reclaiming leaks: {:?}",
                report.messages
            ),
        },
    ))
}

/// Creates an overlay at `tmp` backed by `image` (its canonical path, named by it when
/// `absolute`, else relative to the overlay's final place `fin`), with the bitmaps `adds` make.
fn create_overlay(
    fs: &dyn GroupFs,
    image: &Path,
    size: u64,
    (tmp, fin): (&Path, &Path),
    absolute: bool,
    adds: &[BitmapChange],
) -> Result<(), TxnError> {
    let dir = fs
        .canonicalize(parent(fin))
        .map_err(|e| TxnError::io(fin, e))?;
    let backing = if absolute {
        image.to_path_buf()
    } else {
        relative_to(image, &dir)
    };
    fs.event("overlay_create");
    let storage = fs.create_new(tmp).map_err(|e| TxnError::io(tmp, e))?;
    let options = CreateOptions::new(size)
        .backing_file(Some(backing.to_string_lossy().into_owned()))
        .backing_format(Some("qcow2".into()));
    let overlay = Image::create_in(storage, &tmp.display().to_string(), &options)
        .map_err(|e| TxnError::image(tmp, e))?;
    crate::bitmaps::apply(&overlay, tmp, adds, &|p| fs.open_read_only(p))?;
    overlay.close().map_err(|e| TxnError::image(tmp, e))?;
    fs.sync_dir(&dir).map_err(|e| TxnError::io(tmp, e))
}

/// `target` as seen from directory `from` (both absolute): `../x/y.qcow2` and the like.
pub(crate) fn relative_to(target: &Path, from: &Path) -> PathBuf {
    use std::path::Component;
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_walk_up_and_down() {
        assert_eq!(
            relative_to(Path::new("/a/b/x.qcow2"), Path::new("/a/b")),
            PathBuf::from("x.qcow2")
        );
        assert_eq!(
            relative_to(Path::new("/a/b/x.qcow2"), Path::new("/a/c")),
            PathBuf::from("../b/x.qcow2")
        );
    }
}
