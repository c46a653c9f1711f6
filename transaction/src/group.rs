//! A group of images and its transactions: validate every action, stage every image's new state
//! (invisible to readers, at most leaked clusters), write one durable `Decision` record, then
//! publish each image with its one header switch. `recover` rolls back a group that never
//! reached its decision and finishes one that did, by publishing the recorded switches and then
//! reconciling refcounts from the published metadata; it never replays decrements.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use qcow2::image::{SnapshotChange, StagedChange};
use qcow2::storage::{FileStorage, Storage};
use qcow2::{CreateOptions, Image, OpenOptions, Repair};

use crate::codec::{Reader, Writer};
use crate::error::TxnError;
use crate::journal::{Journal, Kind};
use crate::manifest::{sync_dir, Manifest};

/// One action of a group transaction (the names follow QMP's `transaction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `blockdev-snapshot-internal-sync`: an internal snapshot named `name`.
    InternalCreate { image: PathBuf, name: String },
    /// `blockdev-snapshot-delete-internal-sync`: delete an internal snapshot (id or name).
    InternalDelete { image: PathBuf, name: String },
    /// `snapshot-revert-internal`: make an internal snapshot the active state.
    InternalRevert { image: PathBuf, name: String },
    /// `blockdev-snapshot-sync`: a new overlay on top of `image`, recorded in the manifest.
    ExternalCreate { image: PathBuf, overlay: PathBuf },
}

impl Action {
    fn image(&self) -> &Path {
        match self {
            Action::InternalCreate { image, .. }
            | Action::InternalDelete { image, .. }
            | Action::InternalRevert { image, .. }
            | Action::ExternalCreate { image, .. } => image,
        }
    }
}

/// What a committed transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every image the transaction touched, canonical paths, in lock order.
    pub images: Vec<PathBuf>,
    /// Overlays created (final paths).
    pub overlays: Vec<PathBuf>,
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
struct Member {
    path: PathBuf,
    /// The path as the plan spells it (the same file under two spellings is refused).
    given: PathBuf,
    dev: u64,
    ino: u64,
    image: Option<Image>,
    changes: Vec<SnapshotChange>,
    overlay: Option<PathBuf>,
}

/// Named points in a transaction, where tests can simulate a power cut.
pub type Hook = Box<dyn FnMut(&str) -> bool + Send>;

/// A group directory (journal, lock, manifest) held by this process.
pub struct Group {
    dir: PathBuf,
    _lock: crate::lock::GroupLock,
    hook: Option<Hook>,
    opened_with: Recovery,
}

impl Group {
    /// Opens (creating) the group directory, takes its lock and finishes any interrupted
    /// transaction.
    pub fn open(dir: impl AsRef<Path>) -> Result<Group, TxnError> {
        Self::open_with_hook(dir, None)
    }

    /// Like [`Group::open`], with a hook already installed (so tests can cut power inside the
    /// recovery that opening runs).
    pub fn open_with_hook(dir: impl AsRef<Path>, hook: Option<Hook>) -> Result<Group, TxnError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| TxnError::io(&dir, e))?;
        let lock_path = dir.join("group.lock");
        let lock = crate::lock::lock_group(&lock_path)
            .map_err(|e| TxnError::io(&lock_path, e))?
            .ok_or_else(|| TxnError::GroupLocked(dir.clone()))?;
        let mut group = Group {
            dir,
            _lock: lock,
            hook,
            opened_with: Recovery::Clean,
        };
        group.opened_with = group.recover()?;
        Ok(group)
    }

    /// What the recovery run by [`Group::open`] did.
    pub fn opened_with(&self) -> Recovery {
        self.opened_with
    }

    /// Installs a hook called at every named event; returning `false` stops the transaction
    /// there as a power cut would (nothing more is written, nothing is cleaned up).
    pub fn set_hook(&mut self, hook: Option<Hook>) {
        self.hook = hook;
    }

    fn event(&mut self, name: &str) -> Result<(), TxnError> {
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

    fn journal_path(&self) -> PathBuf {
        self.dir.join("txn.journal")
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join("group.manifest")
    }

    /// The manifest: each disk's current top.
    pub fn manifest(&self) -> Result<Manifest, TxnError> {
        Manifest::load(&self.manifest_path()).map_err(|e| TxnError::io(self.manifest_path(), e))
    }

    /// Runs `actions` atomically: every one takes effect, or none does, also across a crash
    /// (after `recover`).
    pub fn run(&mut self, actions: &[Action]) -> Result<Outcome, TxnError> {
        self.recover()?;
        let mut members = validate(actions)?;
        let txn = new_txn_id();
        let journal_path = self.journal_path();
        let storage = open_journal(&journal_path)?;
        let mut journal =
            Journal::start(storage, txn).map_err(|e| TxnError::io(&journal_path, e))?;
        let jio = |e| TxnError::io(&journal_path, e);
        journal.append(Kind::Begin, Vec::new()).map_err(jio)?;
        for (i, m) in members.iter().enumerate() {
            let before = m
                .image
                .as_ref()
                .map_or([0; 48], |img| img.header_switch_bytes());
            let w = Writer::default()
                .u64(i as u64)
                .bytes(m.path.as_os_str().as_encoded_bytes())
                .u64(m.dev)
                .u64(m.ino)
                .bytes(&before);
            journal.append(Kind::Image, w.0).map_err(jio)?;
        }
        self.event("begin")?;

        // Prepare: every new state staged, every overlay created under a temporary name.
        // Overlay intents come first, so recovery knows which temporary files may exist.
        let temps: Vec<Option<(PathBuf, PathBuf)>> = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.overlay
                    .as_ref()
                    .map(|fin| (temp_name(fin, &txn, i), fin.clone()))
            })
            .collect();
        for (i, (tmp, fin)) in temps
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, t.as_ref()?)))
        {
            let w = Writer::default()
                .u64(i as u64)
                .bytes(tmp.as_os_str().as_encoded_bytes())
                .bytes(fin.as_os_str().as_encoded_bytes());
            journal.append(Kind::Overlay, w.0).map_err(jio)?;
        }
        // Each image is its own file: stage them all at once.
        let results: Vec<Result<Option<StagedChange>, TxnError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .iter()
                .zip(&temps)
                .map(|(m, t)| scope.spawn(move || prepare_one(m, t.as_ref())))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TxnError::Interrupted("a preparing thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut staged: Vec<Option<StagedChange>> = Vec::new();
        let mut failure = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(Some(s)) => {
                    let w = Writer::default()
                        .u64(i as u64)
                        .bytes(&s.header_switch)
                        .u64(s.staged_tables[0])
                        .u64(s.staged_tables[1]);
                    journal.append(Kind::Staged, w.0).map_err(jio)?;
                    staged.push(Some(s));
                }
                Ok(None) => staged.push(None),
                Err(e) => {
                    failure.get_or_insert(e);
                    staged.push(None);
                }
            }
        }
        if let Some(e) = failure {
            // Roll back what is staged; the journal then says so. If any undo fails, the journal
            // stays open and the next recover reconciles instead.
            let mut undone = true;
            for (m, s) in members.iter().zip(staged.drain(..)) {
                if let (Some(img), Some(s)) = (&m.image, s) {
                    undone &= img.abandon(s).is_ok();
                }
            }
            for (tmp, _) in temps.iter().flatten() {
                if tmp.exists() {
                    undone &= std::fs::remove_file(tmp).is_ok();
                }
            }
            if undone {
                let _ = journal.append(Kind::Decision, vec![0]);
                let _ = journal.append(Kind::End, Vec::new());
            }
            return Err(TxnError::Aborted(Box::new(e)));
        }
        for i in 0..members.len() {
            self.event(&format!("prepared {i}"))?;
        }
        journal.append(Kind::Prepared, Vec::new()).map_err(jio)?;
        self.event("prepared")?;

        // The commit point.
        journal
            .append(Kind::Decision, vec![1])
            .map_err(|e| TxnError::Aborted(Box::new(TxnError::io(&journal_path, e))))?;
        self.event("decided")?;

        // Roll forward; failures from here on are finished by recover.
        let incomplete = |e| TxnError::CommittedIncomplete(Box::new(e));
        let mut manifest = self.manifest().map_err(incomplete)?;
        let mut overlays = Vec::new();
        for i in 0..members.len() {
            if let (Some(img), Some(s)) = (&members[i].image, staged[i].take()) {
                img.publish(s)
                    .map_err(|e| incomplete(TxnError::image(&members[i].path, e)))?;
            }
            if let Some((tmp, fin)) = &temps[i] {
                std::fs::rename(tmp, fin).map_err(|e| incomplete(TxnError::io(fin, e)))?;
                sync_dir(parent(fin)).map_err(|e| incomplete(TxnError::io(fin, e)))?;
                manifest.pivot(&members[i].path, fin);
                overlays.push(fin.clone());
            }
            self.event(&format!("published {i}"))?;
        }
        if !overlays.is_empty() {
            manifest.generation += 1;
            manifest
                .store(&self.manifest_path())
                .map_err(|e| incomplete(TxnError::io(self.manifest_path(), e)))?;
        }
        let mut images = Vec::new();
        for m in members.iter_mut() {
            if let Some(img) = m.image.take() {
                img.close()
                    .map_err(|e| incomplete(TxnError::image(&m.path, e)))?;
            }
            images.push(m.path.clone());
        }
        self.event("closed")?;
        journal
            .append(Kind::End, Vec::new())
            .map_err(|e| incomplete(TxnError::io(&journal_path, e)))?;
        Ok(Outcome { images, overlays })
    }

    /// Finishes or rolls back an interrupted transaction; a second call changes nothing.
    pub fn recover(&mut self) -> Result<Recovery, TxnError> {
        let path = self.journal_path();
        let storage = match FileStorage::open_read_write(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovery::Clean),
            Err(e) => return Err(TxnError::io(&path, e)),
        };
        let records = Journal::load(&storage).map_err(|source| TxnError::Journal {
            group: self.dir.clone(),
            source,
        })?;
        if records.is_empty() || records.last().map(|r| r.kind) == Some(Kind::End) {
            return Ok(Recovery::Clean);
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
        for r in &records {
            let mut rd = Reader(&r.payload);
            match r.kind {
                Kind::Image => {
                    let i = rd.u64().ok_or_else(|| bad("image"))?;
                    let p = PathBuf::from(os_str(rd.bytes().ok_or_else(|| bad("image"))?));
                    let dev = rd.u64().ok_or_else(|| bad("image"))?;
                    let ino = rd.u64().ok_or_else(|| bad("image"))?;
                    let before = rd.array48().ok_or_else(|| bad("image"))?;
                    images.push((i, p, dev, ino, before));
                }
                Kind::Staged => {
                    let i = rd.u64().ok_or_else(|| bad("staged"))?;
                    let after = rd.array48().ok_or_else(|| bad("staged"))?;
                    let l1 = rd.u64().ok_or_else(|| bad("staged"))?;
                    let table = rd.u64().ok_or_else(|| bad("staged"))?;
                    staged.insert(i, (after, [l1, table]));
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
        let mut manifest = self.manifest()?;
        let mut pivoted = false;
        for (i, path, dev, ino, before) in &images {
            let meta = std::fs::metadata(path).map_err(|e| TxnError::io(path, e))?;
            if (meta.dev(), meta.ino()) != (*dev, *ino) {
                return Err(TxnError::ForeignChange {
                    image: path.clone(),
                    reason: "the file was replaced".into(),
                });
            }
            let mut img = Image::open(path, &OpenOptions::read_write())
                .map_err(|e| TxnError::image(path, e))?;
            let current = img.header_switch_bytes();
            match staged.get(i) {
                Some((after, tables)) if commit && current != *after => {
                    if current != *before {
                        return Err(TxnError::ForeignChange {
                            image: path.clone(),
                            reason: "its header is neither the old nor the new state".into(),
                        });
                    }
                    for &t in tables.iter().filter(|&&t| t != 0) {
                        if img.refcount_at(t).map_err(|e| TxnError::image(path, e))? == 0 {
                            return Err(TxnError::ForeignChange {
                                image: path.clone(),
                                reason: format!("the staged table at {t:#x} was reclaimed"),
                            });
                        }
                    }
                    img.write_recorded_switch(*after)
                        .map_err(|e| TxnError::image(path, e))?;
                    self.event(&format!("recovery switched {i}"))?;
                    img = Image::open(path, &OpenOptions::read_write())
                        .map_err(|e| TxnError::image(path, e))?;
                }
                Some((after, _)) if commit => debug_assert_eq!(current, *after),
                _ if current != *before => {
                    return Err(TxnError::ForeignChange {
                        image: path.clone(),
                        reason: "its header changed although nothing was published".into(),
                    });
                }
                _ => {}
            }
            // Refcounts follow from what is published now: staged surplus or the old state's
            // clusters are leaks, and fixing leaks reclaims them.
            let report = img
                .check_and_repair(Repair::Leaks)
                .map_err(|e| TxnError::image(path, e))?;
            if !report.is_clean() {
                return Err(TxnError::image(
                    path,
                    qcow2::Error::InvalidArgument {
                        image: path.display().to_string(),
                        reason: format!(
                            "still inconsistent after reconciliation: {:?}",
                            report.messages
                        ),
                    },
                ));
            }
            img.close().map_err(|e| TxnError::image(path, e))?;
            self.event(&format!("recovered {i}"))?;
            if let Some((tmp, fin)) = overlays.get(i) {
                if commit {
                    if tmp.exists() {
                        std::fs::rename(tmp, fin).map_err(|e| TxnError::io(fin, e))?;
                        sync_dir(parent(fin)).map_err(|e| TxnError::io(fin, e))?;
                    }
                    if !manifest.disks.iter().any(|(_, t)| t == fin) {
                        manifest.pivot(path, fin);
                        pivoted = true;
                    }
                } else if tmp.exists() {
                    std::fs::remove_file(tmp).map_err(|e| TxnError::io(tmp, e))?;
                    sync_dir(parent(tmp)).map_err(|e| TxnError::io(tmp, e))?;
                }
            }
        }
        if pivoted {
            manifest.generation += 1;
            manifest
                .store(&self.manifest_path())
                .map_err(|e| TxnError::io(self.manifest_path(), e))?;
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

fn os_str(bytes: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes).to_os_string()
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn open_journal(path: &Path) -> Result<Box<dyn Storage>, TxnError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| TxnError::io(path, e))?;
    sync_dir(parent(path)).map_err(|e| TxnError::io(path, e))?;
    Ok(Box::new(FileStorage::from_file(file, true)))
}

/// Stages one member: its snapshot changes, or its overlay under its temporary name.
fn prepare_one(
    m: &Member,
    temp: Option<&(PathBuf, PathBuf)>,
) -> Result<Option<StagedChange>, TxnError> {
    let img = m.image.as_ref().expect("members are opened");
    let mut staged = None;
    if !m.changes.is_empty() {
        staged = Some(
            img.stage(&m.changes)
                .map_err(|e| TxnError::image(&m.path, e))?,
        );
    }
    if let Some((tmp, fin)) = temp {
        create_overlay(&m.path, img.size(), tmp, fin)?;
    }
    Ok(staged)
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

/// A transaction id no earlier journal record can share.
fn new_txn_id() -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

/// `target` as seen from directory `from` (both absolute): `../x/y.qcow2` and the like.
fn relative_to(target: &Path, from: &Path) -> PathBuf {
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

/// Creates an overlay at `tmp` backed by `image` (named relative to the overlay's final place).
fn create_overlay(image: &Path, size: u64, tmp: &Path, fin: &Path) -> Result<(), TxnError> {
    let dir = std::fs::canonicalize(parent(fin)).map_err(|e| TxnError::io(fin, e))?;
    let backing = relative_to(image, &dir);
    let storage = FileStorage::create_new(tmp).map_err(|e| TxnError::io(tmp, e))?;
    let options = CreateOptions {
        size,
        backing_file: Some(backing.to_string_lossy().into_owned()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::default()
    };
    let overlay = Image::create_in(Box::new(storage), &tmp.display().to_string(), &options)
        .map_err(|e| TxnError::image(tmp, e))?;
    overlay.close().map_err(|e| TxnError::image(tmp, e))?;
    sync_dir(&dir).map_err(|e| TxnError::io(tmp, e))
}

/// Checks every action before anything is written, and opens every image in a canonical order.
fn validate(actions: &[Action]) -> Result<Vec<Member>, TxnError> {
    let invalid = |image: &Path, reason: String| TxnError::Invalid {
        image: image.to_path_buf(),
        reason,
    };
    if actions.is_empty() {
        return Err(invalid(Path::new(""), "the plan has no actions".into()));
    }
    let mut members: Vec<Member> = Vec::new();
    for action in actions {
        let given = action.image();
        let path = std::fs::canonicalize(given)
            .map_err(|e| invalid(given, format!("cannot be found: {e}")))?;
        let meta = std::fs::metadata(&path).map_err(|e| TxnError::io(&path, e))?;
        if !meta.is_file() {
            return Err(invalid(given, "is not a regular file".into()));
        }
        let index = match members
            .iter()
            .position(|m| (m.dev, m.ino) == (meta.dev(), meta.ino()))
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
                    dev: meta.dev(),
                    ino: meta.ino(),
                    image: None,
                    changes: Vec::new(),
                    overlay: None,
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
            Action::ExternalCreate { overlay, .. } => {
                if m.overlay.is_some() {
                    return Err(invalid(given, "two overlays for one image".into()));
                }
                // The overlay's directory must exist; its canonical path names it everywhere.
                let dir = std::fs::canonicalize(parent(overlay)).map_err(|e| {
                    invalid(
                        overlay,
                        format!("the overlay's directory cannot be found: {e}"),
                    )
                })?;
                let name = overlay
                    .file_name()
                    .ok_or_else(|| invalid(overlay, "the overlay path has no file name".into()))?;
                m.overlay = Some(dir.join(name));
            }
        }
    }
    // Overlays: a free path, not an image of the group.
    for m in &members {
        let Some(overlay) = &m.overlay else { continue };
        if !m.changes.is_empty() {
            return Err(invalid(
                &m.path,
                "an external snapshot cannot be combined with internal changes to the same image"
                    .into(),
            ));
        }
        if let Ok(meta) = std::fs::metadata(overlay) {
            if meta.len() > 0 || !meta.is_file() {
                return Err(invalid(
                    overlay,
                    "the overlay path is taken by a non-empty file".into(),
                ));
            }
            if members
                .iter()
                .any(|o| (o.dev, o.ino) == (meta.dev(), meta.ino()))
            {
                return Err(invalid(
                    overlay,
                    "the overlay path is an image of the group".into(),
                ));
            }
        }
        if !parent(overlay).is_dir() {
            return Err(invalid(
                overlay,
                "the overlay's directory does not exist".into(),
            ));
        }
    }
    // Open in a canonical order (device, inode) so two groups never deadlock on image locks.
    members.sort_by_key(|m| (m.dev, m.ino));
    for m in members.iter_mut() {
        let img = Image::open(&m.path, &OpenOptions::read_write())
            .map_err(|e| TxnError::image(&m.path, e))?;
        check_member(&img, m)?;
        m.image = Some(img);
    }
    Ok(members)
}

/// Per-image checks that need the open image.
fn check_member(img: &Image, m: &Member) -> Result<(), TxnError> {
    let invalid = |reason: String| TxnError::Invalid {
        image: m.path.clone(),
        reason,
    };
    let existing = img.snapshot_entries();
    let mut deleted = Vec::new();
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
    Ok(())
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
