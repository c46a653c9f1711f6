//! `journal`: mutated journals before recovery, which must act only on what the group wrote.

use super::*;

/// `[group][cut: u16][flags][journal bytes]`: a group of 1–2 images after a plan of 1–2 actions
/// cut at `cut` (all unsynced writes kept), whose journal is then replaced by the input's bytes.
/// Flag bit 0 re-checksums every record-looking sector, so mutated payloads get past the CRC; bit
/// 1 also binds their transaction ids to the group, so they get past recovery's identity check
/// (without it, recovery must refuse any journal the group did not write, and change nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalInput {
    pub images: Vec<ImageConfig>,
    pub actions: Vec<u8>,
    pub cut: u16,
    pub flags: u8,
    pub journal: Vec<u8>,
}

impl JournalInput {
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut r = Bytes(data);
        let (images, actions) = read_group(&mut r, 2, 2);
        let cut = r.u16();
        let flags = r.u8();
        let journal = r.0[..r.0.len().min(MAX_JOURNAL)].to_vec();
        JournalInput {
            images,
            actions,
            cut,
            flags,
            journal,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        group_bytes(&self.images, &self.actions, &mut out);
        out.extend_from_slice(&self.cut.to_be_bytes());
        out.push(self.flags);
        out.extend_from_slice(&self.journal);
        out
    }
}

/// The group state a journal input starts from: the images after the plan's run cut at `cut`.
pub(crate) fn journal_base(input: &JournalInput) -> SimFs {
    let base = build(&input.images);
    let run = base.settled();
    // Internal actions only: an overlay's temporary name holds the random transaction id, and
    // the fuzzer needs the same state on every run of an input.
    let actions: Vec<u8> = input
        .actions
        .iter()
        .map(|&a| if a & 3 == 3 { a & !3 } else { a })
        .collect();
    if let Ok(mut group) = open_group(&run) {
        let _ = group.run(&plan(&input.images, &actions));
    }
    let cut = input.cut as usize % (run.log_len() + 1);
    run.crash(cut, Survivors::All)
}

/// The identity of every group on a `SimFs`: journals bound to it are this group's own.
pub(crate) fn sim_group() -> GroupId {
    GroupId(qcow2_transaction::sim::SIM_GROUP_SECRET)
}

/// Re-encodes every sector that starts like a record (magic, known kind, a length that fits), so
/// its checksum matches whatever the payload now says; with `bind`, its transaction id is first
/// bound to the group (keeping the nonce).
pub(crate) fn fix_checksums(bytes: &mut [u8], bind: bool) {
    let mut pos = 0;
    while pos + 36 <= bytes.len() {
        let b = &bytes[pos..];
        let kind = match u16::from_le_bytes([b[6], b[7]]) {
            1 => Some(Kind::Begin),
            2 => Some(Kind::Image),
            3 => Some(Kind::Staged),
            4 => Some(Kind::Overlay),
            5 => Some(Kind::Prepared),
            6 => Some(Kind::Decision),
            7 => Some(Kind::End),
            10 => Some(Kind::Bitmaps),
            11 => Some(Kind::BitmapDone),
            _ => None,
        };
        let len = u32::from_le_bytes([b[28], b[29], b[30], b[31]]) as usize;
        if let (true, Some(kind)) = (&b[..4] == b"QTXJ", kind) {
            if 36 + len <= b.len() {
                let mut txn = [0u8; 16];
                txn.copy_from_slice(&b[8..24]);
                if bind {
                    txn = sim_group().bind(txn[..8].try_into().unwrap_or_default());
                }
                let record = Record {
                    kind,
                    txn,
                    seq: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
                    payload: b[32..32 + len].to_vec(),
                };
                let encoded = journal::encode(&record);
                let n = encoded.len().min(b.len());
                bytes[pos..pos + n].copy_from_slice(&encoded[..n]);
                pos += encoded.len();
                continue;
            }
        }
        pos += journal::SECTOR;
    }
}

/// The (dev, ino) every valid `Image` record names for a path, read the way recovery reads them.
pub(crate) fn journal_images(bytes: &[u8]) -> Vec<(PathBuf, u64, u64)> {
    let Ok(records) = journal::read_all(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.kind == Kind::Image) {
        let p = &r.payload;
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?))
        };
        let Some(len) = p
            .get(8..12)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        else {
            continue;
        };
        let Some(path) = p.get(12..12 + len) else {
            continue;
        };
        let (Some(dev), Some(ino)) = (u64_at(12 + len), u64_at(20 + len)) else {
            continue;
        };
        use std::os::unix::ffi::OsStrExt;
        out.push((PathBuf::from(std::ffi::OsStr::from_bytes(path)), dev, ino));
    }
    out
}

pub fn journal(data: &[u8]) {
    journal_input(&JournalInput::from_bytes(data));
}

/// Recovery from arbitrary journal bytes either refuses with an error or acts; it never panics,
/// and it writes, truncates, renames or removes no image except one the journal names with its
/// current (dev, ino). A recovery that succeeds leaves a journal with nothing in flight, and a
/// second one writes nothing.
pub fn journal_input(input: &JournalInput) {
    count(0);
    let mut bytes = input.journal.clone();
    if input.flags & 3 != 0 {
        fix_checksums(&mut bytes, input.flags & 2 != 0);
    }
    let fs = journal_base(input);
    let journal_path = Path::new(GROUP).join("txn.journal");
    fs.add_file(&journal_path, bytes.clone());
    let fs = fs.settled();

    // Which existing files recovery may write: the images the journal names with their identity.
    let before: BTreeMap<PathBuf, u64> = fs
        .names()
        .into_iter()
        .filter_map(|p| Some((p.clone(), fs.ino(&p)?)))
        .collect();
    let mut allowed = BTreeSet::new();
    for (p, dev, ino) in journal_images(&bytes) {
        if let Ok(id) = fs.stat(&p) {
            if (id.dev, id.ino) == (dev, ino) {
                allowed.insert(ino);
            }
        }
    }
    let journal_ino = fs.ino(&journal_path);
    let manifest = Path::new(GROUP).join("group.manifest");
    allowed.extend(journal_ino);
    allowed.extend(fs.ino(&manifest));
    let protected: BTreeMap<u64, &PathBuf> = before
        .iter()
        .filter(|(_, ino)| !allowed.contains(ino))
        .map(|(p, &ino)| (ino, p))
        .collect();
    // The setup makes no overlays, so every file but the journal and the manifest is an image.
    let images: BTreeSet<&PathBuf> = before
        .keys()
        .filter(|p| **p != journal_path && **p != manifest)
        .collect();

    let result = open_group(&fs);
    let log = fs.log();

    // A journal the group did not write (its id is not bound to the group) changes nothing.
    let foreign = journal::read_all(&bytes).ok().is_some_and(|records| {
        records.last().is_some_and(|r| r.kind != Kind::End)
            && records.first().is_some_and(|r| !sim_group().made(&r.txn))
    });
    if foreign {
        assert!(
            result.is_err(),
            "recovery accepted a journal the group did not write"
        );
        let acted = log.iter().find(|op| {
            matches!(
                op,
                FsOp::Write { .. }
                    | FsOp::SetLen { .. }
                    | FsOp::Unlink { .. }
                    | FsOp::Rename { .. }
            )
        });
        assert!(
            acted.is_none(),
            "recovery acted on a foreign journal: {acted:?}"
        );
    }

    for op in &log {
        match op {
            FsOp::Write { ino, .. } | FsOp::SetLen { ino, .. } => {
                if let Some(p) = protected.get(ino) {
                    panic!(
                        "recovery wrote {} (ino {ino}), which the journal does not name with its identity: {op:?}",
                        p.display()
                    );
                }
            }
            FsOp::Unlink { path } => {
                assert!(
                    !images.contains(path),
                    "recovery removed image {}",
                    path.display()
                );
            }
            FsOp::Rename { from, to } => {
                assert!(
                    !images.contains(from) && !images.contains(to),
                    "recovery renamed {} to {}, clobbering an image",
                    from.display(),
                    to.display()
                );
            }
            _ => {}
        }
    }
    match result {
        Err(TxnError::GroupLocked(_)) | Err(TxnError::Interrupted(_)) => {
            panic!(
                "recovery fails without a lock holder or a hook: {result:?}",
                result = result.err()
            )
        }
        Err(_) => count(6),
        Ok(group) => {
            count(7);
            drop(group);
            // Nothing is in flight any more, and recovering again writes nothing.
            if let Some(j) = fs.file(&journal_path) {
                let records = journal::read_all(&j).expect("recovery left a readable journal");
                assert!(
                    records.last().is_none_or(|r| r.kind == Kind::End),
                    "recovery left a transaction in the journal"
                );
            }
            // Every disk's top in the manifest exists.
            if let Some(text) = fs.file(&manifest) {
                let text = String::from_utf8_lossy(&text).into_owned();
                for top in text.lines().skip(2).filter_map(|l| l.split_once('\t')) {
                    assert!(
                        fs.exists(Path::new(top.1)),
                        "recovery points disk {} at {}, which does not exist",
                        top.0,
                        top.1
                    );
                }
            }
            let again = fs.settled();
            let group = open_group(&again).expect("a second recovery");
            assert_eq!(group.opened_with(), Recovery::Clean);
            drop(group);
            assert!(
                again.log().iter().all(|op| matches!(op, FsOp::Event(_))),
                "a second recovery did I/O: {:?}",
                again.log()
            );
        }
    }
}
