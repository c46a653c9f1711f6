//! Power cuts, torn writes and injected errors at every operation of a group transaction, on the
//! recording file system (`qcow2_transaction::sim`): images, overlays, the journal and the
//! manifest share one operation log, so a cut can fall between any two operations of any files.
//!
//! After every cut, `recover` must give the whole old state or the whole new state (the new one
//! once the decision was durable), every image must check clean with no leaks, no stray file may
//! remain, and a second `recover` must change nothing (`shared/TRANSACTIONS.md` sections 3, 5.2
//! and 6). The default run samples the cuts; `QCOW2_CRASH_FULL=1` tries every one.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::format::SnapshotTime;
use qcow2::{BackingPolicy, CreateOptions, DiskTop, Image, OpenOptions};
use qcow2_transaction::fs::GroupFs;
use qcow2_transaction::journal::read_all;
use qcow2_transaction::sim::{Fault, FsOp, SimFs, Survivors};
use qcow2_transaction::{Action, BitmapSource, Group, OverlayMode, Recovery, TxnError};

const GROUP: &str = "/vm/group";
const OVERLAY: &str = "/vm/d2.new.qcow2";

fn path(name: &str) -> PathBuf {
    Path::new("/vm").join(name)
}

fn full() -> bool {
    std::env::var_os("QCOW2_CRASH_FULL").is_some()
}

/// Up to `n` indices spread over `0..=len`, plus every index in `always`.
fn sample(len: usize, n: usize, always: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut cuts: Vec<usize> = if full() || len < n {
        (0..=len).collect()
    } else {
        (0..n).map(|i| i * len / (n - 1)).collect()
    };
    cuts.extend(always.into_iter().filter(|&c| c <= len));
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// An image with data, a snapshot per name (the data changes between them) and more data after.
fn make(fs: &SimFs, name: &str, size: u64, cluster_size: u64, seed: u8, snapshots: &[&str]) {
    let storage = fs.create_new(&path(name)).unwrap();
    let options = CreateOptions::new(size).cluster_size(cluster_size);
    let img = Image::create_in(storage, name, &options).unwrap();
    let chunk = size / 8;
    for (k, snap) in snapshots.iter().enumerate() {
        let fill = vec![seed * 16 + k as u8 + 1; chunk as usize];
        img.write_at(&fill, k as u64 * chunk / 2).unwrap();
        let time = SnapshotTime {
            secs: 1 + k as i64,
            nanos: 0,
        };
        img.create_snapshot(snap, time).unwrap();
    }
    img.write_at(&vec![0xA0 + seed; chunk as usize / 2], size / 2)
        .unwrap();
    img.close().unwrap();
}

/// Three disks: 64 KiB clusters; 512-byte clusters (staging then grows refcount structures and
/// copies many L2 tables); 64 KiB clusters again (the one that gets an overlay).
fn setup() -> SimFs {
    let fs = SimFs::new();
    fs.add_dir(Path::new("/vm"));
    make(&fs, "d0.qcow2", 8 << 20, 65536, 0, &["base"]);
    make(&fs, "d1.qcow2", 1 << 20, 512, 1, &["base", "old"]);
    fill_to_refblock_edge(&fs, &path("d1.qcow2"));
    make(&fs, "d2.qcow2", 4 << 20, 65536, 2, &["base"]);
    // The group exists already (with its identity), so a test sees only its plan's writes.
    drop(open_group(&fs).unwrap());
    fs.settled()
}

/// Allocates guest clusters of a 512-byte-cluster image until its file ends a few clusters short
/// of what its last refblock covers, so staging must create a refblock (and write the refcount
/// table) while it is being crash-tested.
fn fill_to_refblock_edge(fs: &SimFs, p: &Path) {
    const COVERED: u64 = 256 * 512; // one 512-byte refblock of 16-bit counts
    let storage = fs.open_existing(p).unwrap();
    let img = Image::from_storage(storage, "edge", &OpenOptions::read_write()).unwrap();
    let mut guest = 640 << 10;
    while fs.file(p).unwrap().len() as u64 % COVERED < COVERED - 3 * 512 {
        img.write_at(&[0xEE; 512], guest).unwrap();
        guest += 512;
    }
    img.close().unwrap();
}

fn disks() -> Vec<PathBuf> {
    ["d0.qcow2", "d1.qcow2", "d2.qcow2"].map(path).to_vec()
}

/// Internal create, delete plus create on one image, and an external snapshot.
fn mixed_plan() -> Vec<Action> {
    let d = disks();
    vec![
        Action::InternalCreate {
            image: d[0].clone(),
            name: "new".into(),
        },
        Action::InternalDelete {
            image: d[1].clone(),
            name: "old".into(),
        },
        Action::InternalCreate {
            image: d[1].clone(),
            name: "new".into(),
        },
        Action::ExternalCreate {
            image: d[2].clone(),
            overlay: PathBuf::from(OVERLAY),
            mode: OverlayMode::New,
        },
    ]
}

/// Every disk reverts to its "base" snapshot (T16).
fn revert_plan() -> Vec<Action> {
    disks()
        .into_iter()
        .map(|image| Action::InternalRevert {
            image,
            name: "base".into(),
        })
        .collect()
}

/// What a reader sees: per image its snapshots with content hashes and its active content hash;
/// the overlay's backing name if it exists; the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    images: BTreeMap<PathBuf, (Vec<(String, u64)>, u64)>,
    overlay: Option<Option<String>>,
    manifest: Option<Vec<u8>>,
    /// Per image (and the overlay): each bitmap's name, granularity, enabled flag and dirty
    /// ranges (none when it is in use).
    bitmaps: BTreeMap<PathBuf, Vec<BitmapView>>,
}

type BitmapView = (String, u64, bool, Option<Vec<(u64, u64)>>);

fn bitmap_view(img: &Image) -> Vec<BitmapView> {
    img.bitmaps()
        .into_iter()
        .map(|b| {
            let dirty = (!b.in_use).then(|| img.dirty_extents(&b.name, 0, img.size()).unwrap());
            (b.name, b.granularity, b.enabled, dirty)
        })
        .collect()
}

fn open_read_only(fs: &SimFs, p: &Path) -> Image {
    fs.open_read_only(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn hash_content(size: u64, mut read: impl FnMut(&mut [u8], u64)) -> u64 {
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        read(&mut buf[..n], pos);
        h.write(&buf[..n]);
        pos += n as u64;
    }
    h.finish()
}

fn view(fs: &SimFs) -> View {
    let mut images = BTreeMap::new();
    let mut bitmaps = BTreeMap::new();
    for p in disks() {
        let img = open_read_only(fs, &p);
        bitmaps.insert(p.clone(), bitmap_view(&img));
        let mut snaps = Vec::new();
        for s in img.snapshots() {
            let snap = img.open_snapshot(&s.id).unwrap();
            let hash = hash_content(snap.size(), |b, o| snap.read_at(b, o).unwrap());
            snaps.push((s.name.clone(), hash));
        }
        let active = hash_content(img.size(), |b, o| img.read_at(b, o).unwrap());
        images.insert(p, (snaps, active));
    }
    let overlay = fs.exists(Path::new(OVERLAY)).then(|| {
        let img = open_read_only(fs, Path::new(OVERLAY));
        bitmaps.insert(PathBuf::from(OVERLAY), bitmap_view(&img));
        img.backing_file_name()
    });
    let manifest = fs.file(&Path::new(GROUP).join("group.manifest"));
    View {
        images,
        overlay,
        manifest,
        bitmaps,
    }
}

/// Every image checks clean (no corruption, no leak), no stray file exists, and the journal holds
/// no unfinished transaction.
fn assert_sound(fs: &SimFs, ctx: &str) {
    let mut files = disks();
    if fs.exists(Path::new(OVERLAY)) {
        files.push(PathBuf::from(OVERLAY));
    }
    fs.audit(&files, Path::new(GROUP))
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
}

/// What changed files: every logged operation but events and flushes (a flush of unchanged
/// data changes nothing).
fn changes(fs: &SimFs) -> Vec<FsOp> {
    fs.log()
        .into_iter()
        .filter(|op| !matches!(op, FsOp::Event(_) | FsOp::Flush { .. }))
        .collect()
}

fn open_group(fs: &SimFs) -> Result<Group, TxnError> {
    Group::open_in(Arc::new(fs.clone()), GROUP, None)
}

/// Recovers `fs`, checks the outcome, then checks that a second recovery changes nothing.
fn recover_and_check(fs: &SimFs, expect: &[&View], ctx: &str) -> View {
    let group = open_group(fs).unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}"));
    drop(group);
    let v = view(fs);
    assert!(
        expect.contains(&&v),
        "{ctx}: the group is neither in an expected state nor mixed-free: {v:#?}"
    );
    assert_sound(fs, ctx);
    let again = fs.settled();
    let group = open_group(&again).unwrap();
    assert_eq!(group.opened_with(), Recovery::Clean, "{ctx}");
    drop(group);
    assert!(
        again.log().iter().all(|op| matches!(op, FsOp::Event(_))),
        "{ctx}: a second recovery wrote something"
    );
    v
}

/// A recorded clean run of `plan` on a fresh copy of `base`, and the states before and after.
struct Recorded {
    run: SimFs,
    pre: View,
    post: View,
    /// Log index of the decision write and of the event after it is durable.
    decision_write: usize,
    decided: usize,
}

fn record(base: &SimFs, plan: &[Action]) -> Recorded {
    record_with(base, |group| {
        group.run(plan).unwrap();
    })
}

/// Like [`record`], with the transaction driven by `drive` (the phased API, live handles).
fn record_with(base: &SimFs, drive: impl FnOnce(&mut Group)) -> Recorded {
    let pre = view(base);
    let run = base.settled();
    let mut group = open_group(&run).unwrap();
    drive(&mut group);
    drop(group);
    let post = view(&run);
    assert_ne!(pre, post);
    let log = run.log();
    let at = |name: &str| {
        log.iter()
            .position(|op| *op == FsOp::Event(name.into()))
            .unwrap_or_else(|| panic!("no {name} event"))
    };
    let (decision_write, decided) = (at("decision_write"), at("decided"));
    // T6: between the decision write and its durability only the journal is touched, so no
    // roll-forward step can run before the decision is on disk.
    let journal = run.ino(&Path::new(GROUP).join("txn.journal")).unwrap();
    let io: Vec<&FsOp> = log[decision_write + 1..decided]
        .iter()
        .filter(|op| !matches!(op, FsOp::Event(_)))
        .collect();
    for op in &io {
        match op {
            FsOp::Write { ino, .. } | FsOp::Flush { ino } => assert_eq!(*ino, journal, "{op:?}"),
            other => panic!("{other:?} between the decision write and its flush"),
        }
    }
    assert!(matches!(io.last(), Some(FsOp::Flush { ino }) if *ino == journal));
    Recorded {
        run,
        pre,
        post,
        decision_write,
        decided,
    }
}

/// The expected views after a cut at `cut`: before the decision write the old state, once the
/// decision is durable the new one, in between either.
fn expected(r: &Recorded, cut: usize) -> Vec<&View> {
    if cut <= r.decision_write {
        vec![&r.pre]
    } else if cut >= r.decided {
        vec![&r.post]
    } else {
        vec![&r.pre, &r.post]
    }
}

fn crash_everywhere(plan: &[Action], label: &str) {
    crash_everywhere_from(&setup(), plan, label)
}

fn crash_everywhere_from(base: &SimFs, plan: &[Action], label: &str) {
    crash_recorded(record(base, plan), label, false)
}

/// Cuts the recorded run at sampled operations and checks each recovery. With `restart`, a
/// server restart follows recovery: each disk is opened for writing and closed again, which is
/// what makes the bitmaps of a handle that was still open at the cut consistent again (an image
/// open for writing keeps its bitmaps marked in use, whatever any transaction did).
fn crash_recorded(r: Recorded, label: &str, restart: bool) {
    let len = r.run.log_len();
    let cuts = sample(len, 120, r.decision_write..=r.decided);
    for &cut in &cuts {
        let survivors = [
            Survivors::None,
            Survivors::All,
            Survivors::torn(cut as u64),
            Survivors::Torn {
                seed: cut as u64 + 7,
                unit: 4096,
            },
        ];
        for survivors in survivors {
            let ctx = format!("{label}: cut {cut}/{len} {survivors:?}");
            let crashed = r.run.crash(cut, survivors);
            assert_no_dangling_references(&crashed, &ctx);
            if restart {
                drop(open_group(&crashed).unwrap_or_else(|e| panic!("{ctx}: {e}")));
                for p in disks() {
                    crashed.open_image(&p).unwrap().close().unwrap();
                }
            }
            recover_and_check(&crashed, &expected(&r, cut), &ctx);
        }
    }
}

/// I1 on the disk a power cut leaves, before any recovery: no cluster is referenced more often
/// than its refcount says. Leaks are allowed until recovery, and so is COPIED on a cluster whose
/// count a staged, unpublished state raised (QEMU's own snapshot create has the same window);
/// what is never allowed is a count below the references.
fn assert_no_dangling_references(fs: &SimFs, ctx: &str) {
    let mut files = disks();
    files.extend(
        [PathBuf::from(OVERLAY)]
            .into_iter()
            .filter(|p| fs.exists(p)),
    );
    for p in &files {
        let report = open_read_only(fs, p).check().unwrap();
        let errors: Vec<&String> = report
            .messages
            .iter()
            .filter(|m| m.starts_with("ERROR") && !m.starts_with("ERROR OFLAG_COPIED"))
            .collect();
        assert!(
            errors.is_empty(),
            "{ctx}: {} before recovery: {errors:?}",
            p.display()
        );
    }
}

/// T4, T5, T6, T10: a power cut at every operation of a mixed plan (internal create, delete,
/// external snapshot, with refcount growth on the 512-byte-cluster image).
#[test]
fn a_power_cut_anywhere_in_a_mixed_plan_recovers_all_or_nothing() {
    crash_everywhere(&mixed_plan(), "mixed");
}

/// T16: a group revert across three images: never a mixed group, never a mixed image.
#[test]
fn a_power_cut_anywhere_in_a_group_revert_recovers_all_or_nothing() {
    crash_everywhere(&revert_plan(), "revert");
}

/// The disks of `setup`, each with an enabled bitmap "b0" that marks a write made after it.
fn setup_with_bitmaps() -> SimFs {
    let fs = setup();
    for p in disks() {
        let storage = fs.open_existing(&p).unwrap();
        let img = Image::from_storage(storage, "bitmaps", &OpenOptions::read_write()).unwrap();
        img.add_bitmap("b0", 65536, false).unwrap();
        img.write_at(&[0x5a; 4096], 3 * 65536).unwrap();
        img.close().unwrap();
    }
    fs.settled()
}

/// The backup tools' pattern as one plan: a snapshot of every disk (internal on d0, external on
/// d2) with a new bitmap started and the old one stopped, plus a merge, a clear and a remove.
fn bitmap_plan() -> Vec<Action> {
    let d = disks();
    let name = |n: &str| n.to_string();
    vec![
        Action::InternalCreate {
            image: d[0].clone(),
            name: name("new"),
        },
        Action::BitmapAdd {
            image: d[0].clone(),
            name: name("b1"),
            granularity: None,
            disabled: false,
        },
        Action::BitmapDisable {
            image: d[0].clone(),
            name: name("b0"),
        },
        Action::BitmapAdd {
            image: d[1].clone(),
            name: name("b1"),
            granularity: Some(512),
            disabled: true,
        },
        Action::BitmapMerge {
            image: d[1].clone(),
            target: name("b1"),
            sources: vec![BitmapSource {
                image: None,
                name: name("b0"),
            }],
        },
        Action::BitmapClear {
            image: d[1].clone(),
            name: name("b0"),
        },
        Action::ExternalCreate {
            image: d[2].clone(),
            overlay: PathBuf::from(OVERLAY),
            mode: OverlayMode::New,
        },
        Action::BitmapAdd {
            image: PathBuf::from(OVERLAY),
            name: name("b1"),
            granularity: None,
            disabled: false,
        },
        Action::BitmapRemove {
            image: d[2].clone(),
            name: name("b0"),
        },
    ]
}

/// Bitmap actions are all-or-nothing with the snapshots of their plan: at every cut, recovery
/// gives the old bitmaps (and snapshots) or the new ones, consistent, with exactly the bits a
/// clean run leaves.
#[test]
fn a_power_cut_anywhere_in_a_plan_with_bitmap_actions_recovers_all_or_nothing() {
    let base = setup_with_bitmaps();
    let r = record(&base, &bitmap_plan());
    let post = &r.post.bitmaps;
    let d = disks();
    let names =
        |p: &Path| -> Vec<(String, bool)> { post[p].iter().map(|b| (b.0.clone(), b.2)).collect() };
    assert_eq!(names(&d[0]), [("b0".into(), false), ("b1".into(), true)]);
    assert_eq!(names(&d[1]), [("b0".into(), true), ("b1".into(), false)]);
    assert_eq!(post[&d[1]][0].3, Some(Vec::new()), "b0 is cleared");
    assert_eq!(
        post[&d[1]][1].3, r.pre.bitmaps[&d[1]][0].3,
        "b1 holds b0's bits"
    );
    assert!(names(&d[2]).is_empty());
    assert_eq!(names(Path::new(OVERLAY)), [("b1".into(), true)]);
    crash_everywhere_from(&base, &bitmap_plan(), "bitmaps");
}

/// The phased API on live handles (images the caller holds open, as a server does, each
/// served through a `DiskTop`): each action added on its own, then prepare and commit; the
/// external snapshot moves d2's top to its overlay. The handles are closed after the commit, so
/// their own writes are in the log too. Every cut recovers all or nothing, as with `Group::run`.
#[test]
fn a_power_cut_anywhere_in_a_live_phased_transaction_recovers_all_or_nothing() {
    let base = setup_with_bitmaps();
    let r = record_with(&base, |group| {
        let fs = group.fs();
        let handles: Vec<Arc<Image>> = disks()
            .iter()
            .map(|p| Arc::new(fs.open_image(p).unwrap()))
            .collect();
        let tops: Vec<Arc<DiskTop>> = handles
            .iter()
            .map(|h| Arc::new(DiskTop::new(h.clone())))
            .collect();
        let mut txn = group.begin().unwrap();
        for t in &tops {
            txn.attach_top(t.clone()).unwrap();
        }
        for action in bitmap_plan() {
            txn.add(action).unwrap();
        }
        let outcome = txn.prepare().unwrap().commit().unwrap();
        assert!(outcome.paused.is_some());
        let now: Vec<Arc<Image>> = tops.iter().map(|t| t.image()).collect();
        assert_eq!(
            now[2].path(),
            Some(Path::new(OVERLAY)),
            "d2's top is its overlay"
        );
        drop(tops);
        // The overlay first: it holds d2 as its backing image.
        let overlay = Arc::into_inner(now.into_iter().nth(2).unwrap()).unwrap();
        overlay.close().unwrap();
        for h in handles {
            Arc::into_inner(h).unwrap().close().unwrap();
        }
    });
    assert_eq!(
        r.post.bitmaps[&disks()[2]].len(),
        0,
        "b0 is removed from d2"
    );
    crash_recorded(r, "live phased", true);
}

/// T10: every write the engine makes to bytes 0..512 of an existing image stays inside that
/// sector, so the header commit is one atomic sector write.
#[test]
fn header_commits_stay_within_one_sector() {
    let base = setup();
    for plan in [mixed_plan(), revert_plan()] {
        let r = record(&base, &plan);
        let existing: Vec<u64> = disks().iter().filter_map(|p| r.run.ino(p)).collect();
        let mut header_writes = 0;
        for op in r.run.log() {
            if let FsOp::Write { ino, offset, data } = op {
                if existing.contains(&ino) && offset < 512 {
                    header_writes += 1;
                    assert!(
                        offset + data.len() as u64 <= 512,
                        "a header write at {offset} of {} bytes spans sectors",
                        data.len()
                    );
                }
            }
        }
        assert!(header_writes >= 2, "every image gets a header switch");
    }
}

/// T10 negative control: when only single bytes are atomic, some cut tears a header switch and
/// the checks above notice. This proves the matrix can see the sector-atomicity assumption.
#[test]
fn the_hostile_one_byte_profile_is_detected() {
    let base = setup();
    let r = record(&base, &revert_plan());
    let log = r.run.log();
    // Cuts right after each header switch write (and before its flush).
    let switches: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| {
            matches!(op, FsOp::Write { offset, data, .. } if *offset == 24 && data.len() == 48)
        })
        .map(|(i, _)| i + 1)
        .collect();
    assert!(!switches.is_empty());
    let mut detected = 0;
    for &cut in &switches {
        for seed in 1..40u64 {
            let crashed = r.run.crash(cut, Survivors::Torn { seed, unit: 1 });
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                recover_and_check(&crashed, &expected(&r, cut), "hostile")
            }));
            detected += outcome.is_err() as usize;
            if detected > 0 {
                return;
            }
        }
    }
    assert!(detected > 0, "a torn header switch went unnoticed");
}

/// T9: power cuts inside recovery itself, for undecided and committed transactions: the final
/// state equals one uninterrupted recovery.
#[test]
fn a_power_cut_during_recovery_is_recovered_too() {
    let base = setup();
    let r = record(&base, &mixed_plan());
    let log = r.run.log();
    let at = |name: &str| log.iter().position(|op| *op == FsOp::Event(name.into()));
    // Undecided with everything staged, and committed with half the images published.
    let points = [at("prepared").unwrap() + 1, at("published 1").unwrap() + 1];
    for cut in points {
        let crashed = r.run.crash(cut, Survivors::None);
        let clean = crashed.settled();
        let want = recover_and_check(&clean, &expected(&r, cut), "clean recovery");
        let mut group = open_group(&crashed).unwrap();
        assert_ne!(group.opened_with(), Recovery::Clean);
        group.set_hook(None);
        drop(group);
        let len = crashed.log_len();
        for inner in sample(len, 60, []) {
            for survivors in [Survivors::None, Survivors::torn(inner as u64)] {
                let ctx = format!("cut {cut}, recovery cut {inner}/{len} {survivors:?}");
                let twice = crashed.crash(inner, survivors);
                let got = recover_and_check(&twice, &[&want], &ctx);
                assert_eq!(got, want, "{ctx}");
            }
        }
    }
}

/// T2, T3, T24: EIO or ENOSPC at every I/O operation of a transaction, once or from then on.
/// The run ends in a clean abort with the old state, or a committed state, or an error that
/// `recover` settles; a retry on the same group then succeeds.
#[test]
fn errors_at_any_operation_abort_cleanly_or_are_recovered() {
    let base = setup();
    let plan = mixed_plan();
    let r = record(&base, &plan);
    let attempts = r.run.attempts();
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for at in sample(attempts, 80, []) {
        for (errno, persistent) in [
            (libc::EIO, false),
            (libc::ENOSPC, false),
            (libc::EIO, true),
            (libc::ENOSPC, true),
        ] {
            let ctx = format!("fault at {at}/{attempts} errno {errno} persistent {persistent}");
            let fs = base.settled();
            let mut group = open_group(&fs).unwrap();
            fs.inject(Some(Fault {
                at,
                errno,
                persistent,
            }));
            let result = group.run(&plan);
            fs.inject(None);
            let kind = match &result {
                Ok(_) => "committed",
                Err(TxnError::Aborted(_)) => "aborted",
                Err(TxnError::AbortIncomplete(_)) => "abort incomplete",
                Err(TxnError::InDoubt(_)) => "in doubt",
                Err(TxnError::CommittedIncomplete(_)) => "committed incomplete",
                Err(e) => panic!("{ctx}: unexpected error {e}"),
            };
            *outcomes.entry(kind).or_default() += 1;
            match kind {
                "committed" => {
                    assert_eq!(view(&fs), r.post, "{ctx}");
                    drop(group);
                    assert_sound(&fs, &ctx);
                }
                "aborted" => {
                    // Nothing changed and nothing leaked, without any recovery.
                    assert_eq!(view(&fs), r.pre, "{ctx}");
                    assert_sound(&fs, &ctx);
                    group
                        .run(&plan)
                        .unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
                    drop(group);
                    assert_eq!(view(&fs), r.post, "{ctx}: retry");
                }
                _ => {
                    drop(group);
                    let want: Vec<&View> = match kind {
                        "abort incomplete" => vec![&r.pre],
                        "committed incomplete" => vec![&r.post],
                        _ => vec![&r.pre, &r.post],
                    };
                    recover_and_check(&fs, &want, &ctx);
                }
            }
        }
    }
    // The matrix must reach both sides of the decision.
    assert!(
        outcomes.get("aborted").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("committed incomplete").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
}

/// T18: every directory sync matters. With any one of them skipped (as if the call were missing
/// from the code), some power cut loses an overlay, a manifest or the journal and the checks
/// above fail.
#[test]
fn removing_any_directory_sync_breaks_a_crash_check() {
    let base = setup();
    let plan = mixed_plan();
    let r = record(&base, &plan);
    let syncs = r
        .run
        .log()
        .iter()
        .filter(|op| matches!(op, FsOp::SyncDir { .. }))
        .count();
    assert!(syncs >= 3, "journal, overlay and manifest are each synced");
    for skip in 0..syncs {
        let run = base.settled();
        run.skip_dir_sync(Some(skip));
        let mut group = open_group(&run).unwrap();
        group.run(&plan).unwrap();
        drop(group);
        let len = run.log_len();
        let decided = run
            .log()
            .iter()
            .position(|op| *op == FsOp::Event("decided".into()))
            .unwrap();
        let mut broken = false;
        for cut in 0..=len {
            let crashed = run.crash(cut, Survivors::None);
            let want = if cut >= decided {
                vec![&r.post]
            } else {
                vec![&r.pre, &r.post]
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                recover_and_check(&crashed, &want, "mutant")
            }));
            if outcome.is_err() {
                broken = true;
                break;
            }
        }
        assert!(broken, "directory sync {skip} is never needed");
    }
}

/// How many I/O operations precede the named event in a log (the index a fault counts).
fn attempts_before(log: &[FsOp], event: &str) -> usize {
    let at = log
        .iter()
        .position(|op| *op == FsOp::Event(event.into()))
        .unwrap();
    log[..at]
        .iter()
        .filter(|op| !matches!(op, FsOp::Event(_)))
        .count()
}

/// Makes the overlay for d2 ahead of the transaction, as `mode: existing` expects.
fn add_overlay(fs: &SimFs, backing: &str, format: &str, size: u64) -> SimFs {
    let storage = fs.create_new(Path::new(OVERLAY)).unwrap();
    let options = CreateOptions::new(size)
        .backing_file(Some(backing.into()))
        .backing_format(Some(format.into()));
    Image::create_in(storage, OVERLAY, &options)
        .unwrap()
        .close()
        .unwrap();
    fs.settled()
}

fn reuse_plan() -> Vec<Action> {
    let mut plan = mixed_plan();
    if let Some(Action::ExternalCreate { mode, .. }) = plan.last_mut() {
        *mode = OverlayMode::Existing;
    }
    plan
}

/// T19 (b): an existing overlay with the right backing is pivoted to; a power cut anywhere
/// leaves it in place (the transaction did not make it) and the group all old or all new.
#[test]
fn an_existing_overlay_is_reused_and_never_deleted() {
    let base = add_overlay(&setup(), "d2.qcow2", "qcow2", 4 << 20);
    let overlay_bytes = base.file(Path::new(OVERLAY)).unwrap();
    crash_everywhere_from(&base, &reuse_plan(), "reuse");
    // An abort (a failing member) keeps the overlay byte for byte.
    let fs = base.settled();
    let mut plan = reuse_plan();
    plan.push(Action::InternalDelete {
        image: path("d0.qcow2"),
        name: "base".into(),
    });
    plan.push(Action::InternalRevert {
        image: path("d0.qcow2"),
        name: "base".into(),
    });
    let err = open_group(&fs).unwrap().run(&plan).unwrap_err();
    assert!(matches!(err, TxnError::Invalid { .. }), "{err}");
    let fs_failing = base.settled();
    let mut group = open_group(&fs_failing).unwrap();
    // Fail the last operation of preparing: everything staged rolls back.
    let probe = base.settled();
    open_group(&probe).unwrap().run(&reuse_plan()).unwrap();
    fs_failing.inject(Some(Fault {
        at: attempts_before(&probe.log(), "prepared 0") - 1,
        errno: libc::EIO,
        persistent: false,
    }));
    let err = group.run(&reuse_plan()).unwrap_err();
    assert!(matches!(err, TxnError::Aborted(_)), "{err}");
    fs_failing.inject(None);
    drop(group);
    drop(open_group(&fs_failing).unwrap());
    assert_eq!(
        fs_failing.file(Path::new(OVERLAY)).unwrap(),
        overlay_bytes,
        "the reused overlay changed"
    );
    assert_sound(&fs_failing, "reuse abort");
}

/// T19 (c): an existing overlay with another backing file, backing format or size, or none at
/// all, is refused before anything is written.
#[test]
fn an_unsuitable_existing_overlay_is_refused() {
    let cases = [
        ("d0.qcow2", "qcow2", 4u64 << 20, "backed by"),
        ("d2.qcow2", "raw", 4 << 20, "not qcow2"),
        ("d2.qcow2", "qcow2", 2 << 20, "bytes"),
    ];
    for (backing, format, size, why) in cases {
        let fs = add_overlay(&setup(), backing, format, size);
        let before = fs.settled();
        let err = open_group(&fs).unwrap().run(&reuse_plan()).unwrap_err();
        assert!(
            matches!(&err, TxnError::Invalid { reason, .. } if reason.contains(why)),
            "{backing} {format} {size}: {err}"
        );
        let writes = changes(&fs);
        assert!(
            writes.is_empty(),
            "{err}: something was written: {writes:?}"
        );
        assert_eq!(view(&fs), view(&before));
    }
    let err = open_group(&setup())
        .unwrap()
        .run(&reuse_plan())
        .unwrap_err();
    assert!(matches!(err, TxnError::Invalid { .. }), "{err}");
}

/// An empty 1 MiB image holding `n` snapshots that all share one L1 table (32-bit refcounts, so
/// the shared table's count fits), made consistent by a full repair: writing the table directly
/// is what makes 65536 snapshots cheap to set up.
fn many_snapshots(fs: &SimFs, name: &str, n: usize) {
    let storage = fs.create_new(&path(name)).unwrap();
    let options = CreateOptions::new(1 << 20)
        .cluster_size(65536)
        .refcount_bits(32);
    let img = Image::create_in(storage, name, &options).unwrap();
    img.create_snapshot("s0", SnapshotTime { secs: 1, nanos: 0 })
        .unwrap();
    let first = img.snapshot_entries()[0].clone();
    img.close().unwrap();
    let entries: Vec<_> = (0..n)
        .map(|i| {
            let mut e = first.clone();
            e.id = (i + 1).to_string().into_bytes();
            e.name = format!("s{i}").into_bytes();
            e
        })
        .collect();
    let table = qcow2::format::snapshot::encode_table(&entries);
    let file = fs.open_existing(&path(name)).unwrap();
    let at = file.len().unwrap().next_multiple_of(65536);
    file.write_at(&table, at).unwrap();
    let mut switch = [0u8; 12];
    switch[..4].copy_from_slice(&(n as u32).to_be_bytes());
    switch[4..].copy_from_slice(&at.to_be_bytes());
    file.write_at(&switch, 60).unwrap();
    file.flush().unwrap();
    let storage = fs.open_existing(&path(name)).unwrap();
    let repair = OpenOptions::read_write().for_repair(true);
    let img = Image::from_storage(storage, name, &repair).unwrap();
    let report = img.check_and_repair(qcow2::Repair::All).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(img.snapshot_entries().len(), n);
    img.close().unwrap();
}

/// T21: an image at QEMU's 65536-snapshot limit takes no more, refused before any write with the
/// other images untouched; one at 65535 takes exactly one more.
#[test]
fn the_snapshot_count_limit_is_checked_before_any_write() {
    let fs = setup();
    many_snapshots(&fs, "full.qcow2", 65536);
    many_snapshots(&fs, "edge.qcow2", 65535);
    let fs = fs.settled();
    let over = [
        Action::InternalCreate {
            image: path("d0.qcow2"),
            name: "new".into(),
        },
        Action::InternalCreate {
            image: path("full.qcow2"),
            name: "one more".into(),
        },
    ];
    let err = open_group(&fs).unwrap().run(&over).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("too many snapshots")),
        "{err}"
    );
    let writes = changes(&fs).len();
    assert_eq!(writes, 0, "refused after writing");
    let edge = [Action::InternalCreate {
        image: path("edge.qcow2"),
        name: "the last one".into(),
    }];
    open_group(&fs).unwrap().run(&edge).unwrap();
    let img = open_read_only(&fs, &path("edge.qcow2"));
    assert_eq!(img.snapshot_entries().len(), 65536);
    assert!(img.check().unwrap().is_clean());
}

/// T17: a snapshot whose L1 table is longer than the active one (iotest 029) reverts like any
/// other, across power cuts; the active L1 takes the snapshot's length.
#[test]
fn reverting_to_a_snapshot_with_a_longer_l1_table() {
    let fs = setup();
    let d0 = path("d0.qcow2");
    let file = fs.open_existing(&d0).unwrap();
    let mut header = [0u8; 72];
    file.read_at(&mut header, 0).unwrap();
    let table = u64::from_be_bytes(header[64..72].try_into().unwrap());
    let mut l1_size = [0u8; 4];
    file.read_at(&mut l1_size, table + 8).unwrap();
    assert_eq!(
        u32::from_be_bytes(l1_size),
        1,
        "an 8 MiB image has one L1 entry"
    );
    // The second entry is still inside the snapshot's L1 cluster, and zero.
    file.write_at(&2u32.to_be_bytes(), table + 8).unwrap();
    file.flush().unwrap();
    let base = fs.settled();
    let plan = [Action::InternalRevert {
        image: d0.clone(),
        name: "base".into(),
    }];
    crash_everywhere_from(&base, &plan, "long L1");
    let after = base.settled();
    open_group(&after).unwrap().run(&plan).unwrap();
    let mut header = [0u8; 72];
    after
        .open_existing(&d0)
        .unwrap()
        .read_at(&mut header, 0)
        .unwrap();
    assert_eq!(u32::from_be_bytes(header[36..40].try_into().unwrap()), 2);
}

/// Rewrites an image's snapshot table through `edit` (at the end of the file, then one header
/// switch), and makes the refcounts consistent again with a full repair.
fn rewrite_table(fs: &SimFs, p: &Path, edit: impl FnOnce(&mut Vec<qcow2::format::SnapshotEntry>)) {
    let img = open_read_only(fs, p);
    let mut entries = img.snapshot_entries();
    let cluster = img.cluster_size();
    drop(img);
    edit(&mut entries);
    let table = qcow2::format::snapshot::encode_table(&entries);
    let file = fs.open_existing(p).unwrap();
    let at = file.len().unwrap().next_multiple_of(cluster);
    file.write_at(&table, at).unwrap();
    let mut switch = [0u8; 12];
    switch[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
    switch[4..].copy_from_slice(&at.to_be_bytes());
    file.write_at(&switch, 60).unwrap();
    file.flush().unwrap();
    let storage = fs.open_existing(p).unwrap();
    let repair = OpenOptions::read_write().for_repair(true);
    let img = Image::from_storage(storage, "edit", &repair).unwrap();
    assert!(img.check_and_repair(qcow2::Repair::All).unwrap().is_clean());
    img.close().unwrap();
}

/// T20: extra data this engine does not know, in a snapshot entry that survives the
/// transaction, is kept byte for byte (as QEMU keeps it, iotest 261), across power cuts too.
#[test]
fn unknown_snapshot_extra_data_survives_a_transaction() {
    let fs = setup();
    let d1 = path("d1.qcow2");
    let unknown: Vec<u8> = (0..40).map(|i| 0xA0 ^ i).collect();
    rewrite_table(&fs, &d1, |entries| {
        let base = entries.iter_mut().find(|e| e.name == b"base").unwrap();
        base.extra.resize(64, 0);
        base.extra.extend_from_slice(&unknown);
    });
    let base = fs.settled();
    let plan = mixed_plan();
    crash_everywhere_from(&base, &plan, "extra data");
    let after = base.settled();
    open_group(&after).unwrap().run(&plan).unwrap();
    let img = open_read_only(&after, &d1);
    let kept = img
        .snapshot_entries()
        .into_iter()
        .find(|e| e.name == b"base")
        .unwrap();
    assert_eq!(&kept.extra[64..], &unknown[..]);
}

/// T14: a foreign `check -r leaks` between the decision and the header switch reclaims the staged
/// tables (they look leaked). Recovery then refuses to publish a switch to freed clusters: it
/// stops with `ForeignChange`, touches nothing, and keeps the journal for a later look.
#[test]
fn recovery_refuses_to_publish_staged_tables_someone_reclaimed() {
    let base = setup();
    let r = record(&base, &revert_plan());
    let log = r.run.log();
    let cut = log
        .iter()
        .position(|op| *op == FsOp::Event("decided".into()))
        .unwrap();
    let crashed = r.run.crash(cut, Survivors::None);
    // The foreign repair, on the image recovery looks at last.
    let d2 = path("d2.qcow2");
    let storage = crashed.open_existing(&d2).unwrap();
    let img = Image::from_storage(storage, "foreign", &OpenOptions::read_write()).unwrap();
    let report = img.check_and_repair(qcow2::Repair::Leaks).unwrap();
    assert!(report.leaks_fixed > 0, "the staged state looked leaked");
    img.close().unwrap();
    let before = crashed.settled();
    let err = open_group(&before).expect_err("recovery went ahead");
    assert!(
        matches!(&err, TxnError::ForeignChange { reason, .. } if reason.contains("reclaimed")),
        "{err}"
    );
    let writes = changes(&before).len();
    assert_eq!(writes, 0, "recovery wrote after finding a foreign change");
    let journal = before.file(&Path::new(GROUP).join("txn.journal")).unwrap();
    assert!(
        !read_all(&journal).unwrap().is_empty(),
        "the journal was dropped"
    );
}

/// T3: when the file system plainly lacks room (statvfs), validation refuses before any write;
/// with room, the same plan commits.
#[test]
fn a_plan_the_disk_has_no_room_for_is_refused_before_any_write() {
    let fs = setup();
    fs.set_free_space(Some(100_000));
    let err = open_group(&fs).unwrap().run(&mixed_plan()).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("not enough space")),
        "{err}"
    );
    let writes = changes(&fs).len();
    assert_eq!(writes, 0, "refused after writing");
    fs.set_free_space(Some(64 << 20));
    open_group(&fs).unwrap().run(&mixed_plan()).unwrap();
}

fn writable_alone() -> OpenOptions {
    OpenOptions::default()
        .writable(true)
        .backing(BackingPolicy::Ignore)
}

/// The guest content of the disk whose top is `top`, read through its backing file.
fn disk_hash(fs: &SimFs, top: &Path) -> u64 {
    let mut img = open_read_only(fs, top);
    if let Some(name) = img.backing_file_name() {
        img.attach_backing(open_read_only(fs, &top.parent().unwrap().join(name)));
    }
    hash_content(img.size(), |b, o| img.read_at(b, o).unwrap())
}

/// d2 gets an overlay through a transaction, then guest writes land in the overlay: whole
/// clusters, a partial one (copied on write from d2) and zeroes that hide d2's data.
fn setup_with_overlay() -> SimFs {
    let fs = setup();
    let plan = [Action::ExternalCreate {
        image: path("d2.qcow2"),
        overlay: PathBuf::from(OVERLAY),
        mode: OverlayMode::New,
    }];
    open_group(&fs).unwrap().run(&plan).unwrap();
    let storage = fs.open_existing(Path::new(OVERLAY)).unwrap();
    let mut top = Image::from_storage(storage, OVERLAY, &writable_alone()).unwrap();
    top.attach_backing(open_read_only(&fs, &path("d2.qcow2")));
    top.write_at(&vec![0x5E; 3 << 16], 1 << 20).unwrap();
    top.write_at(&[0x77; 1000], (2 << 20) + 300).unwrap();
    top.write_zeroes(0, 1 << 16, false).unwrap();
    top.close().unwrap();
    fs.settled()
}

fn retire_plan() -> Vec<Action> {
    vec![
        Action::ExternalDelete {
            image: PathBuf::from(OVERLAY),
        },
        Action::InternalCreate {
            image: path("d0.qcow2"),
            name: "new".into(),
        },
    ]
}

/// Issue 8: deleting an external snapshot in a group: at every power cut, the disk reads the
/// same through whichever top the manifest names; the group is all old (overlay on top, no new
/// snapshot on d0) or all new (d2 on top, overlay gone, the snapshot made); everything checks
/// clean; a second recovery changes nothing.
#[test]
fn deleting_an_external_snapshot_is_atomic_across_power_cuts() {
    let base = setup_with_overlay();
    let d2 = path("d2.qcow2");
    let disk = disk_hash(&base, Path::new(OVERLAY));
    let manifest_path = Path::new(GROUP).join("group.manifest");
    let top_of = |fs: &SimFs| {
        let m = qcow2_transaction::Manifest::load(fs, &manifest_path).unwrap();
        m.disks
            .iter()
            .find(|(d, _)| *d == d2)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    assert_eq!(top_of(&base), PathBuf::from(OVERLAY));
    let run = base.settled();
    open_group(&run).unwrap().run(&retire_plan()).unwrap();
    assert_eq!(top_of(&run), d2);
    assert!(!run.exists(Path::new(OVERLAY)));
    assert_eq!(disk_hash(&run, &d2), disk);
    let log = run.log();
    let at = |name: &str| {
        log.iter()
            .position(|op| *op == FsOp::Event(name.into()))
            .unwrap()
    };
    let (decision_write, decided) = (at("decision_write"), at("decided"));
    let removal = at("overlay_remove");
    assert!(removal > decided, "the overlay went before the decision");
    for cut in sample(log.len(), 150, decision_write..=decided) {
        for survivors in [Survivors::None, Survivors::All, Survivors::torn(cut as u64)] {
            let ctx = format!("retire: cut {cut}/{} {survivors:?}", log.len());
            let fs = run.crash(cut, survivors);
            drop(open_group(&fs).unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}")));
            let top = top_of(&fs);
            let new = top == d2;
            let d0_new = open_read_only(&fs, &path("d0.qcow2"))
                .snapshots()
                .iter()
                .any(|s| s.name == "new");
            assert_eq!(new, d0_new, "{ctx}: a mixed group");
            if cut >= decided {
                assert!(new, "{ctx}: a durable decision was lost");
            }
            if cut <= decision_write {
                assert!(!new, "{ctx}: committed without a decision");
            }
            assert_eq!(fs.exists(Path::new(OVERLAY)), !new, "{ctx}: overlay file");
            assert_eq!(
                disk_hash(&fs, &top),
                disk,
                "{ctx}: the disk's content changed"
            );
            assert_sound(&fs, &ctx);
            let again = fs.settled();
            drop(open_group(&again).unwrap());
            assert!(
                again.log().iter().all(|op| matches!(op, FsOp::Event(_))),
                "{ctx}: a second recovery wrote something"
            );
        }
    }
}

/// Issue 8: an overlay that another image still uses as its backing file, one with internal
/// snapshots, and an image without a backing file cannot be deleted; nothing is written.
#[test]
fn an_overlay_still_in_use_cannot_be_deleted() {
    let base = setup_with_overlay();
    // Another image of the group backed by the overlay.
    let fs = base.settled();
    let storage = fs.create_new(&path("child.qcow2")).unwrap();
    let options = CreateOptions::new(4 << 20)
        .backing_file(Some("d2.new.qcow2".into()))
        .backing_format(Some("qcow2".into()));
    Image::create_in(storage, "child", &options)
        .unwrap()
        .close()
        .unwrap();
    let fs = fs.settled();
    let plan = [
        Action::ExternalDelete {
            image: PathBuf::from(OVERLAY),
        },
        Action::InternalCreate {
            image: path("child.qcow2"),
            name: "x".into(),
        },
    ];
    let err = open_group(&fs).unwrap().run(&plan).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("still backed by it")),
        "{err}"
    );
    // Internal snapshots in the overlay.
    let fs2 = base.settled();
    let storage = fs2.open_existing(Path::new(OVERLAY)).unwrap();
    let top = Image::from_storage(storage, OVERLAY, &writable_alone()).unwrap();
    top.create_snapshot("inside", SnapshotTime { secs: 5, nanos: 0 })
        .unwrap();
    top.close().unwrap();
    let fs2 = fs2.settled();
    let err = open_group(&fs2).unwrap().run(&retire_plan()).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("internal snapshots")),
        "{err}"
    );
    // No backing file at all.
    let fs3 = base.settled();
    let plan = [Action::ExternalDelete {
        image: path("d0.qcow2"),
    }];
    let err = open_group(&fs3).unwrap().run(&plan).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("no backing file")),
        "{err}"
    );
    for f in [&fs, &fs2, &fs3] {
        let writes = changes(f).len();
        assert_eq!(writes, 0, "refused after writing");
    }
}

/// T8: a power cut at every operation of an abort (a failure on the last operation of preparing
/// rolls back every staged image and the temporary overlay) recovers to the old state.
#[test]
fn a_power_cut_during_an_abort_recovers_the_old_state() {
    let base = setup();
    let plan = mixed_plan();
    let r = record(&base, &plan);
    let run = base.settled();
    let mut group = open_group(&run).unwrap();
    run.inject(Some(Fault {
        at: attempts_before(&r.run.log(), "prepared 0") - 1,
        errno: libc::EIO,
        persistent: false,
    }));
    let err = group.run(&plan).unwrap_err();
    assert!(matches!(err, TxnError::Aborted(_)), "{err}");
    drop(group);
    run.inject(None);
    let log = run.log();
    let abort = log
        .iter()
        .position(|op| *op == FsOp::Event("abort".into()))
        .unwrap();
    assert!(
        log[abort..]
            .iter()
            .filter(|op| matches!(op, FsOp::Write { .. } | FsOp::Unlink { .. }))
            .count()
            >= 3,
        "the abort undoes staged refcounts and removes the overlay"
    );
    for cut in sample(log.len(), 120, abort..log.len()) {
        for survivors in [Survivors::None, Survivors::All, Survivors::torn(cut as u64)] {
            let ctx = format!("abort: cut {cut}/{} {survivors:?}", log.len());
            recover_and_check(&run.crash(cut, survivors), &[&r.pre], &ctx);
        }
    }
}

/// T11 (c): snapshot names compare byte for byte, as QEMU compares them: a name that differs
/// from an existing one only in case is a new name.
#[test]
fn names_that_differ_only_in_case_are_different() {
    let fs = setup();
    let plan = [Action::InternalCreate {
        image: path("d0.qcow2"),
        name: "BASE".into(),
    }];
    open_group(&fs).unwrap().run(&plan).unwrap();
    let names: Vec<String> = open_read_only(&fs, &path("d0.qcow2"))
        .snapshots()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["base", "BASE"]);
}

/// T20: an image left dirty by a crash under lazy refcounts is repaired when the transaction
/// opens it, then takes part like any other; the result checks clean.
#[test]
fn a_dirty_lazy_refcount_image_is_repaired_then_joins() {
    let fs = setup();
    let storage = fs.create_new(&path("lazy.qcow2")).unwrap();
    let options = CreateOptions::new(4 << 20)
        .cluster_size(65536)
        .lazy_refcounts(true);
    let img = Image::create_in(storage, "lazy", &options).unwrap();
    img.write_at(&vec![0x42; 300_000], 0).unwrap();
    img.flush().unwrap();
    // The power fails with the image still open: its dirty bit is set on disk.
    let crashed = fs.crash(fs.log_len(), Survivors::All);
    drop(img);
    let header = crashed.file(&path("lazy.qcow2")).unwrap();
    let incompatible = u64::from_be_bytes(header[72..80].try_into().unwrap());
    assert_eq!(incompatible & 1, 1, "the dirty bit is set");
    let plan = [
        Action::InternalCreate {
            image: path("lazy.qcow2"),
            name: "after the crash".into(),
        },
        Action::InternalCreate {
            image: path("d0.qcow2"),
            name: "new".into(),
        },
    ];
    open_group(&crashed).unwrap().run(&plan).unwrap();
    let img = open_read_only(&crashed, &path("lazy.qcow2"));
    assert!(img.check().unwrap().is_clean());
    assert_eq!(img.snapshots()[0].name, "after the crash");
    let snap = img.open_snapshot("after the crash").unwrap();
    let mut buf = vec![0u8; 300_000];
    snap.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

/// A power cut while a new group makes its identity leaves a group that opens and is sound.
#[test]
fn a_cut_while_the_group_identity_is_made_leaves_a_group_that_opens() {
    let fs = SimFs::new();
    fs.add_dir(Path::new("/vm"));
    make(&fs, "d0.qcow2", 1 << 20, 65536, 0, &[]);
    let run = fs.settled();
    drop(open_group(&run).unwrap());
    for cut in 0..=run.log_len() {
        for survivors in [Survivors::None, Survivors::All] {
            let crashed = run.crash(cut, survivors);
            drop(open_group(&crashed).unwrap_or_else(|e| panic!("cut {cut}: {e}")));
            crashed
                .audit(&[path("d0.qcow2")], Path::new(GROUP))
                .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        }
    }
}

/// A CRC-valid journal this group did not write (another group's, or forged) makes recovery
/// refuse, whatever it names: no file is written, renamed or removed.
#[test]
fn a_journal_not_bound_to_the_group_changes_nothing() {
    let base = setup();
    let plan = mixed_plan();
    let r = record(&base, &plan);
    let prepared = r
        .run
        .log()
        .iter()
        .position(|op| *op == FsOp::Event("decided".into()))
        .unwrap();
    let crashed = r.run.crash(prepared + 1, Survivors::All);
    // The same journal, but the group's identity is another one.
    let id = Path::new(GROUP).join(qcow2_transaction::identity::FILE);
    crashed.add_file(
        &id,
        format!("qcow2-group-id 1 {}\n", "0f".repeat(16)).into_bytes(),
    );
    let before = crashed.settled();
    let names = before.names();
    let err = open_group(&before).unwrap_err();
    assert!(
        matches!(&err, TxnError::Invalid { reason, .. } if reason.contains("did not write")),
        "{err}"
    );
    assert!(
        changes(&before).is_empty(),
        "recovery acted on a foreign journal"
    );
    assert_eq!(before.names(), names);
}
