//! The logic of the group-transaction fuzz targets (`transaction`, `journal`), as plain functions
//! of `&[u8]`.
//!
//! Compiled twice, like `targets.rs`: by the `qcow2-fuzz` crate and by
//! `transaction/tests/fuzz_replay.rs` (`#[path]` include, on stable). It depends on `qcow2`,
//! `qcow2_transaction` and `std` only and decodes its inputs by hand, so a corpus file means the
//! same thing to libFuzzer and to the replay test.
//!
//! Everything runs on the recording file system `SimFs`: images are built in memory, a plan runs
//! (optionally with an injected I/O error), power is cut at any log index, and the group is
//! recovered by opening it again. A panic is a finding.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2::format::SnapshotTime;
use qcow2::{CreateOptions, Image};
use qcow2_transaction::fs::GroupFs;
use qcow2_transaction::identity::GroupId;
use qcow2_transaction::journal::{self, Kind, Record};
use qcow2_transaction::sim::{Fault, FsOp, SimFs, Survivors};
use qcow2_transaction::{Action, Group, OverlayMode, Recovery, TxnError};

/// The signature of every entry point.
pub type TxnTarget = fn(&[u8]);

/// Every target of this file by name.
pub const TXN_TARGETS: &[(&str, TxnTarget)] = &[("transaction", transaction), ("journal", journal)];

/// The entry point of the target called `name`.
pub fn txn_target(name: &str) -> Option<TxnTarget> {
    TXN_TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, f)| f)
}

const GROUP: &str = "/vm/group";
/// Snapshot names plans draw from: the pre-existing `s0`/`s1`, new names, an id (`1`) and the
/// empty name, so duplicates, missing snapshots and id lookups all happen.
const NAMES: [&str; 8] = ["s0", "s1", "new", "new2", "1", "", "s0", "x"];
/// Overlay paths plans draw from: two free ones, an existing image, a missing directory.
/// Overlay paths a plan may name: free ones, an image, a missing directory, and files of the
/// group directory (the journal, a new name there), which every plan must be refused for.
const OVERLAYS: [&str; 6] = [
    "/vm/o0.qcow2",
    "/vm/o1.qcow2",
    "/vm/d0.qcow2",
    "/nodir/o.qcow2",
    "/vm/group/txn.journal",
    "/vm/group/o.qcow2",
];
const MISSING_IMAGE: &str = "/vm/missing.qcow2";
/// Journals longer than this are cut: recovery reads the whole file, and real journals of these
/// plans are a few KiB.
const MAX_JOURNAL: usize = 64 << 10;

/// How often each stage was reached (printed by the fuzz binaries at exit, to show coverage).
pub static STATS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
pub const STAT_NAMES: [&str; 8] = [
    "runs",
    "invalid plans",
    "faults injected",
    "faulted runs not committed",
    "crashes",
    "crashes at/after decided",
    "journal opens refused",
    "journal recoveries acting",
];

/// Counts a stage; with `QCOW2_FUZZ_STATS` set, every power-of-two number of runs prints the
/// counters to stderr, so a fuzz log shows which stages the inputs reach.
fn count(stat: usize) {
    let n = STATS[stat].fetch_add(1, Ordering::Relaxed) + 1;
    if stat == 0 && n >= 64 && n.is_power_of_two() && std::env::var_os("QCOW2_FUZZ_STATS").is_some()
    {
        eprintln!("txn stats: {}", stats_line());
    }
}

/// The counters as one line.
pub fn stats_line() -> String {
    STAT_NAMES
        .iter()
        .zip(&STATS)
        .map(|(n, s)| format!("{n}: {}", s.load(Ordering::Relaxed)))
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------------------------------------
// Input decoding.

/// Reads little values from the front of an input; past the end every read yields zeros.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        (self.u8() as u16) << 8 | self.u8() as u16
    }
    fn u32(&mut self) -> u32 {
        (self.u16() as u32) << 16 | self.u16() as u32
    }
}

/// One image: `[shape][writes × (phase, offset, length, fill)]`. The shape byte picks the
/// virtual size (1–4 MiB), the cluster size (512, 4 KiB, 64 KiB), 0–2 snapshots, 0–3 writes and
/// whether the image has a bitmap (see [`ImageConfig::bitmap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub shape: u8,
    pub writes: Vec<[u8; 5]>,
}

impl ImageConfig {
    fn read(r: &mut Bytes<'_>) -> Self {
        let shape = r.u8();
        let writes = (0..shape >> 6)
            .map(|_| {
                let mut w = [0u8; 5];
                w.copy_from_slice(&{
                    let mut b = r.take(5).to_vec();
                    b.resize(5, 0);
                    b
                });
                w
            })
            .collect();
        ImageConfig { shape, writes }
    }

    fn to_bytes(&self, out: &mut Vec<u8>) {
        out.push(self.shape);
        for w in &self.writes {
            out.extend_from_slice(w);
        }
    }

    fn size(&self) -> u64 {
        (1 + (self.shape & 3) as u64) << 20
    }

    fn cluster_size(&self) -> u64 {
        [512, 4096, 65536][(self.shape >> 2) as usize % 3]
    }

    fn snapshots(&self) -> usize {
        (self.shape >> 4) as usize % 3
    }

    /// The spare value 3 of the cluster size or the snapshot count field (which read as 512
    /// bytes and no snapshots): the image starts with an enabled bitmap `b0` that marks a write.
    fn bitmap(&self) -> bool {
        (self.shape >> 2) & 3 == 3 || (self.shape >> 4) & 3 == 3
    }
}

/// One action: `[kind:2 | image:3 | name:3]`; image 7 is a missing file. Kind 3 is an external
/// snapshot onto `OVERLAYS[name]` for names 0–5, and a bitmap action for names 6 (add `b1`) and
/// 7 (clear `b0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionSel(pub u8);

impl ActionSel {
    fn image(self, n_images: usize) -> Option<usize> {
        let i = (self.0 >> 2) & 7;
        (i != 7).then(|| i as usize % n_images)
    }

    fn name(self) -> &'static str {
        NAMES[(self.0 >> 5) as usize]
    }

    fn overlay(self) -> &'static str {
        OVERLAYS[(self.0 >> 5) as usize % OVERLAYS.len()]
    }

    /// The bitmap action of a kind-3 selector, if it is one.
    fn bitmap(self) -> Option<BitmapSel> {
        match (self.0 & 3, self.0 >> 5) {
            (3, 6) => Some(BitmapSel::AddB1),
            (3, 7) => Some(BitmapSel::ClearB0),
            _ => None,
        }
    }

    fn action(self, n_images: usize) -> Action {
        let image = self
            .image(n_images)
            .map_or_else(|| PathBuf::from(MISSING_IMAGE), image_path);
        let name = self.name().to_string();
        match self.bitmap() {
            Some(BitmapSel::AddB1) => {
                return Action::BitmapAdd {
                    image,
                    name: "b1".into(),
                    granularity: None,
                    disabled: false,
                }
            }
            Some(BitmapSel::ClearB0) => {
                return Action::BitmapClear {
                    image,
                    name: "b0".into(),
                }
            }
            None => {}
        }
        match self.0 & 3 {
            0 => Action::InternalCreate { image, name },
            1 => Action::InternalDelete { image, name },
            2 => Action::InternalRevert { image, name },
            _ => Action::ExternalCreate {
                image,
                overlay: PathBuf::from(self.overlay()),
                mode: OverlayMode::New,
            },
        }
    }
}

/// The bitmap actions plans draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BitmapSel {
    AddB1,
    ClearB0,
}

fn image_path(i: usize) -> PathBuf {
    PathBuf::from(format!("/vm/d{i}.qcow2"))
}

/// `[n images][images][n actions][actions]`: 1–3 images, 1–4 actions (1–`max_actions`).
fn read_group(r: &mut Bytes<'_>, max_images: u8, max_actions: u8) -> (Vec<ImageConfig>, Vec<u8>) {
    let n = 1 + r.u8() % max_images;
    let images = (0..n).map(|_| ImageConfig::read(r)).collect();
    let a = 1 + r.u8() % max_actions;
    let actions = (0..a).map(|_| r.u8()).collect();
    (images, actions)
}

fn group_bytes(images: &[ImageConfig], actions: &[u8], out: &mut Vec<u8>) {
    out.push(images.len() as u8 - 1);
    for i in images {
        i.to_bytes(out);
    }
    out.push(actions.len() as u8 - 1);
    out.extend_from_slice(actions);
}

fn plan(images: &[ImageConfig], actions: &[u8]) -> Vec<Action> {
    actions
        .iter()
        .map(|&a| ActionSel(a).action(images.len()))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Building a group and looking at it.

/// A fresh file system with the images of `configs`, all durable.
fn build(configs: &[ImageConfig]) -> SimFs {
    let fs = SimFs::new();
    fs.add_dir(Path::new("/vm"));
    fs.add_dir(Path::new(GROUP));
    for (i, c) in configs.iter().enumerate() {
        let p = image_path(i);
        let storage = fs.create_new(&p).expect("creating an image file");
        let options = CreateOptions {
            size: c.size(),
            cluster_size: c.cluster_size(),
            ..CreateOptions::default()
        };
        let img = Image::create_in(storage, &p.display().to_string(), &options)
            .expect("creating an image");
        if c.bitmap() {
            img.add_bitmap("b0", 65536, false).expect("adding a bitmap");
            img.write_at(&[0xB0; 512], 0).expect("writing image data");
        }
        let phases = c.snapshots() + 1;
        for phase in 0..phases {
            for w in c.writes.iter().filter(|w| w[0] as usize % phases == phase) {
                let offset = u16::from_be_bytes([w[1], w[2]]) as u64 * c.size() / 65536;
                let len = ((w[3] as u64 + 1) * 512).min(c.size() - offset);
                img.write_at(&vec![w[4]; len as usize], offset)
                    .expect("writing image data");
            }
            if phase < c.snapshots() {
                let time = SnapshotTime {
                    secs: 1 + phase as i64,
                    nanos: 0,
                };
                img.create_snapshot(&format!("s{phase}"), time)
                    .expect("creating a snapshot");
            }
        }
        img.close().expect("closing a new image");
    }
    // The group exists already, with its identity: a plan's run writes only what it does.
    drop(open_group(&fs).expect("opening a fresh group"));
    fs.settled()
}

fn open_group(fs: &SimFs) -> Result<Group, TxnError> {
    Group::open_in(Arc::new(fs.clone()), GROUP, None)
}

/// A hash of a layer's guest-visible content that reads only what `map` says holds data: every
/// non-zero 512-byte block with its offset, so equal content hashes equal whatever the allocation.
fn hash_content(
    map: impl Fn(u64, u64) -> qcow2::Result<Vec<qcow2::Extent>>,
    mut read: impl FnMut(&mut [u8], u64) -> qcow2::Result<()>,
    size: u64,
    ctx: &str,
) -> u64 {
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 64 << 10];
    let extents = map(0, size).unwrap_or_else(|e| panic!("{ctx}: map: {e}"));
    for e in extents.iter().filter(|e| e.data()) {
        let mut pos = e.start;
        let end = e.start + e.length;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            read(&mut buf[..n], pos).unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
            for (k, block) in buf[..n].chunks(512).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    h.write_u64(pos + k as u64 * 512);
                    h.write(block);
                }
            }
            pos += n as u64;
        }
    }
    h.finish()
}

/// Per image: (snapshot name, content hash) in table order, and the active content hash.
type ImageView = (Vec<(String, u64)>, u64, Vec<BitmapView>);

/// A bitmap as a reader sees it: name, enabled, and whether it marks nothing (`None` when it is
/// in use). Its exact bits are not compared: a revert marks the whole disk while it stages, so a
/// rolled-back plan may leave more bits than before (a superset is the durable-bits promise).
type BitmapView = (String, bool, Option<bool>);

/// What a reader sees: every image, every overlay that exists (with its backing name), the
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    images: BTreeMap<PathBuf, ImageView>,
    overlays: BTreeMap<PathBuf, Option<String>>,
    manifest: Option<Vec<u8>>,
}

fn view(fs: &SimFs, n_images: usize, ctx: &str) -> View {
    let mut images = BTreeMap::new();
    for p in (0..n_images).map(image_path) {
        let img = fs
            .open_read_only(&p)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let mut snaps = Vec::new();
        for s in img.snapshots() {
            let snap = img
                .open_snapshot(&s.id)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let hash = hash_content(
                |o, l| snap.map(o, l),
                |b, o| snap.read_at(b, o),
                snap.size(),
                ctx,
            );
            snaps.push((s.name.clone(), hash));
        }
        let active = hash_content(
            |o, l| img.map(o, l),
            |b, o| img.read_at(b, o),
            img.size(),
            ctx,
        );
        let bitmaps = img
            .bitmaps()
            .into_iter()
            .map(|b| {
                let empty = (!b.in_use).then(|| {
                    img.dirty_extents(&b.name, 0, img.size())
                        .unwrap_or_else(|e| panic!("{ctx}: bitmap {}: {e}", b.name))
                        .is_empty()
                });
                (b.name, b.enabled, empty)
            })
            .collect();
        images.insert(p, (snaps, active, bitmaps));
    }
    let mut overlays = BTreeMap::new();
    for o in OVERLAYS[..2].iter().map(PathBuf::from) {
        if fs.exists(&o) {
            let img = fs
                .open_read_only(&o)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            overlays.insert(o, img.backing_file_name());
        }
    }
    let manifest = fs.file(&Path::new(GROUP).join("group.manifest"));
    View {
        images,
        overlays,
        manifest,
    }
}

/// Every image and overlay checks clean, no stray file exists, and the journal holds no
/// unfinished transaction.
fn assert_sound(fs: &SimFs, n_images: usize, ctx: &str) {
    let mut files: Vec<PathBuf> = (0..n_images).map(image_path).collect();
    files.extend(
        OVERLAYS[..2]
            .iter()
            .map(PathBuf::from)
            .filter(|o| fs.exists(o)),
    );
    fs.audit(&files, Path::new(GROUP))
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
}

/// Recovers `fs` (by opening the group), checks the outcome is one of `expect` and sound, and
/// that a second recovery writes nothing.
fn recover_and_check(fs: &SimFs, n_images: usize, expect: &[&View], ctx: &str) {
    let group = open_group(fs).unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}"));
    drop(group);
    let v = view(fs, n_images, ctx);
    assert!(
        expect.contains(&&v),
        "{ctx}: the group is in none of the expected states: {v:#?}\nexpected: {expect:#?}"
    );
    assert_sound(fs, n_images, ctx);
    let again = fs.settled();
    let group = open_group(&again).unwrap_or_else(|e| panic!("{ctx}: second recovery: {e}"));
    assert_eq!(
        group.opened_with(),
        Recovery::Clean,
        "{ctx}: second recovery"
    );
    drop(group);
    assert!(
        again.log().iter().all(|op| matches!(op, FsOp::Event(_))),
        "{ctx}: a second recovery wrote something"
    );
}

// ------------------------------------------------------------------------------------------------
// `transaction`

/// Known findings the fuzz binaries step over while their fix is outstanding, so one finding
/// does not hide the next: `run.sh` sets `QCOW2_FUZZ_TOLERATE_KNOWN`; the stable replay test
/// does not, so the regression inputs (listed in `regressions/KNOWN_FAILING`) still fail there.
#[allow(dead_code)] // used while a finding is outstanding; none is now
fn tolerate_known() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    TOLERATE_KNOWN.load(Ordering::Relaxed)
        || *SET.get_or_init(|| std::env::var_os("QCOW2_FUZZ_TOLERATE_KNOWN").is_some())
}

/// Set by the replay of a local corpus, which the fuzzer grew while stepping over known findings.
pub static TOLERATE_KNOWN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether `validate` must accept the plan, from the configs alone: names must exist (id first,
/// then name) for delete and revert, be new and non-empty for create, no snapshot is deleted
/// twice or reverted to after its delete, an image gets at most one overlay and then no internal
/// change, and an overlay path must be free, in an existing directory, and not chosen twice.
fn expect_valid(images: &[ImageConfig], actions: &[u8]) -> bool {
    #[derive(Default)]
    struct Changes {
        created: Vec<&'static str>,
        deleted: Vec<usize>,
        internal: bool,
        reverted: bool,
        overlay: Option<&'static str>,
        b1: bool,
    }
    let mut per: Vec<Changes> = images.iter().map(|_| Changes::default()).collect();
    for &a in actions {
        let a = ActionSel(a);
        let Some(i) = a.image(images.len()) else {
            return false;
        };
        let existing: Vec<(String, String)> = (0..images[i].snapshots())
            .map(|k| ((k + 1).to_string(), format!("s{k}")))
            .collect();
        let find = |key: &str| {
            existing
                .iter()
                .position(|(id, _)| id == key)
                .or_else(|| existing.iter().position(|(_, n)| n == key))
        };
        let c = &mut per[i];
        let name = a.name();
        match a.bitmap() {
            Some(BitmapSel::AddB1) => {
                if c.b1 {
                    return false;
                }
                c.b1 = true;
                continue;
            }
            Some(BitmapSel::ClearB0) => {
                if !images[i].bitmap() {
                    return false;
                }
                continue;
            }
            None => {}
        }
        // The engine stages a revert only as an image's last change.
        if c.reverted && a.0 & 3 != 3 {
            return false;
        }
        match a.0 & 3 {
            0 => {
                if name.is_empty()
                    || c.created.contains(&name)
                    || existing.iter().any(|(_, n)| n == name)
                {
                    return false;
                }
                c.created.push(name);
                c.internal = true;
            }
            kind @ (1 | 2) => {
                let Some(k) = find(name) else { return false };
                if c.deleted.contains(&k) {
                    return false;
                }
                if kind == 1 {
                    c.deleted.push(k);
                } else {
                    c.reverted = true;
                }
                c.internal = true;
            }
            _ => {
                let o = a.overlay();
                if c.overlay.is_some() || o.starts_with("/nodir/") || o.starts_with(GROUP) {
                    return false;
                }
                c.overlay = Some(o);
            }
        }
    }
    let mut overlays = BTreeSet::new();
    for c in &per {
        if let Some(o) = c.overlay {
            let taken = (0..images.len()).any(|i| image_path(i) == Path::new(o));
            if c.internal || taken || !overlays.insert(o) {
                return false;
            }
        }
    }
    true
}

/// Fault and crash choices: `[flags][fault at: u16][cut: u32][survivors][seed: u32]`. Flags: bit
/// 0 injects a fault, bit 1 picks ENOSPC over EIO, bit 2 makes it persistent, bit 3 skips the
/// crash (recover what the run left).
#[derive(Debug, Clone, Copy)]
struct Trouble {
    flags: u8,
    fault_at: u16,
    cut: u32,
    survivors: u8,
    seed: u32,
}

impl Trouble {
    fn read(r: &mut Bytes<'_>) -> Self {
        Trouble {
            flags: r.u8(),
            fault_at: r.u16(),
            cut: r.u32(),
            survivors: r.u8(),
            seed: r.u32(),
        }
    }

    fn fault(self, attempts: usize) -> Option<Fault> {
        (self.flags & 1 == 1).then(|| Fault {
            at: self.fault_at as usize % attempts.max(1),
            errno: if self.flags & 2 != 0 { ENOSPC } else { EIO },
            persistent: self.flags & 4 != 0,
        })
    }

    fn survivors(self) -> Survivors {
        match self.survivors % 4 {
            0 => Survivors::None,
            1 => Survivors::All,
            _ => Survivors::torn(self.seed as u64),
        }
    }
}

// Linux errno values (the transaction crate is Linux-only), so this file needs no `libc`.
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

fn event_index(log: &[FsOp], name: &str) -> Option<usize> {
    log.iter().position(|op| *op == FsOp::Event(name.into()))
}

/// Whether the log changes any file or name (flushes and directory syncs change nothing: closing
/// an image opened for writing flushes it).
fn wrote_anything(log: &[FsOp]) -> bool {
    log.iter().any(|op| {
        !matches!(
            op,
            FsOp::Event(_) | FsOp::Flush { .. } | FsOp::SyncDir { .. }
        )
    })
}

/// `[group][trouble]`: builds 1–3 images, runs 1–4 actions, optionally with an injected error,
/// cuts power anywhere, recovers, and checks the invariants of TRANSACTIONS.md 5.2.
pub fn transaction(data: &[u8]) {
    let mut r = Bytes(data);
    let (configs, actions) = read_group(&mut r, 3, 4);
    let trouble = Trouble::read(&mut r);
    let n = configs.len();
    let plan = plan(&configs, &actions);
    let base = build(&configs);
    let pre = view(&base, n, "pre");
    count(0);

    // A clean run first: the reference post-state, the log length and the I/O count.
    let clean = base.settled();
    let mut group = open_group(&clean).expect("opening a fresh group");
    let result = group.run(&plan);
    drop(group);
    let valid = expect_valid(&configs, &actions);
    match result {
        Err(TxnError::Invalid { image, reason }) => {
            count(1);
            assert!(
                !valid,
                "a valid plan {plan:?} is refused: {}: {reason}",
                image.display()
            );
            assert!(
                !wrote_anything(&clean.log()),
                "a refused plan wrote: {:?}",
                clean.log()
            );
            assert_eq!(
                view(&clean, n, "refused"),
                pre,
                "a refused plan changed the group"
            );
            return;
        }
        Err(e) if valid => panic!("plan {plan:?} fails without any fault: {e}"),
        Err(e) => panic!("invalid plan {plan:?} is not refused with Invalid: {e}"),
        Ok(_) => assert!(valid, "an invalid plan {plan:?} is accepted"),
    }
    let post = view(&clean, n, "post");
    check_post(&configs, &actions, &pre, &post);
    assert_sound(&clean, n, "after a clean run");

    // The run under test: the same plan, optionally with an error injected.
    let fs = base.settled();
    let fault = trouble.fault(clean.attempts());
    let mut group = open_group(&fs).expect("opening a fresh group");
    if fault.is_some() {
        count(2);
    }
    fs.inject(fault);
    let result = group.run(&plan);
    fs.inject(None);
    let ctx = format!("plan {plan:?}, fault {fault:?}");
    let settled: Vec<&View> = match &result {
        Ok(_) => vec![&post],
        Err(TxnError::Aborted(_)) => {
            assert_eq!(view(&fs, n, &ctx), pre, "{ctx}: aborted but changed");
            assert_sound(&fs, n, &ctx);
            vec![&pre]
        }
        Err(TxnError::AbortIncomplete(_)) => vec![&pre],
        Err(TxnError::InDoubt(_)) => vec![&pre, &post],
        Err(TxnError::CommittedIncomplete(_)) => vec![&post],
        Err(e) => panic!("{ctx}: unexpected error {e}"),
    };
    if result.is_err() {
        count(3);
    }
    drop(group);
    if result.is_ok() {
        assert_eq!(
            view(&fs, n, &ctx),
            post,
            "{ctx}: committed, but not the clean run's state"
        );
    }

    if trouble.flags & 8 != 0 {
        recover_and_check(&fs, n, &settled, &format!("{ctx}, no cut"));
        return;
    }
    let log = fs.log();
    let cut = trouble.cut as usize % (log.len() + 1);
    let survivors = trouble.survivors();
    let decision_write = event_index(&log, "decision_write");
    let decided = event_index(&log, "decided");
    count(4);
    // Before the decision write: the old state; once the decision is durable: the new one.
    let expect: Vec<&View> = if decided.is_some_and(|d| cut >= d) {
        count(5);
        vec![&post]
    } else if decision_write.is_none_or(|w| cut <= w) {
        vec![&pre]
    } else {
        vec![&pre, &post]
    };
    let crashed = fs.crash(cut, survivors);
    let ctx = format!("{ctx}, cut {cut}/{} {survivors:?}", log.len());
    recover_and_check(&crashed, n, &expect, &ctx);
}

/// The committed state against the plan: images the plan does not name are unchanged, every
/// pre-existing snapshot that is not deleted keeps its content, the snapshot names are the old
/// ones minus the deleted plus the created, and overlays exist exactly where the plan puts them.
fn check_post(configs: &[ImageConfig], actions: &[u8], pre: &View, post: &View) {
    let mut overlays = BTreeMap::new();
    for (i, p) in (0..configs.len()).map(|i| (i, image_path(i))) {
        let sels: Vec<ActionSel> = actions
            .iter()
            .map(|&a| ActionSel(a))
            .filter(|a| a.image(configs.len()) == Some(i))
            .collect();
        let (old, new) = (&pre.images[&p], &post.images[&p]);
        if sels.is_empty() {
            assert_eq!(
                old,
                new,
                "{}: untouched by the plan, yet changed",
                p.display()
            );
            continue;
        }
        let mut names: Vec<String> = old.0.iter().map(|(n, _)| n.clone()).collect();
        let mut bitmaps = old.2.clone();
        for a in &sels {
            match a.bitmap() {
                Some(BitmapSel::AddB1) => {
                    bitmaps.push(("b1".into(), true, Some(true)));
                    continue;
                }
                Some(BitmapSel::ClearB0) => {
                    bitmaps[0].2 = Some(true);
                    continue;
                }
                None => {}
            }
            match a.0 & 3 {
                0 => names.push(a.name().to_string()),
                1 => {
                    let k = (0..old.0.len())
                        .position(|k| (k + 1).to_string() == a.name())
                        .or_else(|| old.0.iter().position(|(n, _)| n == a.name()))
                        .expect("validated");
                    let gone = &old.0[k].0;
                    let at = names.iter().position(|n| n == gone).expect("deleted once");
                    names.remove(at);
                }
                2 => {}
                _ => {
                    overlays.insert(PathBuf::from(a.overlay()), Some(format!("d{i}.qcow2")));
                }
            }
        }
        let mut got: Vec<String> = new.0.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        got.sort();
        assert_eq!(got, names, "{}: snapshot names after commit", p.display());
        // Bitmap changes follow the snapshot switch, so a clear wins over a revert's marks
        // whatever the plan's order.
        assert_eq!(new.2, bitmaps, "{}: bitmaps after commit", p.display());
        for (name, hash) in &old.0 {
            if new.0.iter().any(|(n, _)| n == name) {
                assert!(
                    new.0.contains(&(name.clone(), *hash)),
                    "{}: snapshot {name} changed content",
                    p.display()
                );
            }
        }
    }
    assert_eq!(post.overlays, overlays, "overlays after commit");
    assert_eq!(
        post.manifest.is_some(),
        !overlays.is_empty(),
        "manifest after commit"
    );
}

// ------------------------------------------------------------------------------------------------
// `journal`

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
fn journal_base(input: &JournalInput) -> SimFs {
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
fn sim_group() -> GroupId {
    GroupId(qcow2_transaction::sim::SIM_GROUP_SECRET)
}

/// Re-encodes every sector that starts like a record (magic, known kind, a length that fits), so
/// its checksum matches whatever the payload now says; with `bind`, its transaction id is first
/// bound to the group (keeping the nonce).
fn fix_checksums(bytes: &mut [u8], bind: bool) {
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
fn journal_images(bytes: &[u8]) -> Vec<(PathBuf, u64, u64)> {
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

/// Seeds for `journal`: real journals of a few groups and plans, taken at several cut points of
/// the recorded run (with checksums kept as written). `transaction/tests/fuzz_replay.rs` writes
/// them to `fuzz/regressions/journal/` (see the README).
pub fn journal_seeds() -> Vec<(String, Vec<u8>)> {
    let groups: [(&str, Vec<ImageConfig>, Vec<u8>); 3] = [
        (
            "create",
            vec![ImageConfig {
                shape: 0b0101_0100,
                writes: vec![[0, 0, 16, 7, 0x11]],
            }],
            // InternalCreate d0 "new"
            vec![(2 << 5)],
        ),
        (
            "revert-delete",
            vec![
                ImageConfig {
                    shape: 0b1010_0000,
                    writes: vec![[0, 0, 0, 3, 0x22], [1, 1, 0, 3, 0x33]],
                },
                ImageConfig {
                    shape: 0b0101_1000,
                    writes: vec![[0, 2, 0, 1, 0x44]],
                },
            ],
            // InternalRevert d0 "s0", InternalDelete d1 "s1"
            vec![2, 1 | (1 << 2) | (1 << 5)],
        ),
        (
            "create-two",
            vec![
                ImageConfig {
                    shape: 0b0001_0001,
                    writes: vec![],
                },
                ImageConfig {
                    shape: 0b0001_0100,
                    writes: vec![],
                },
            ],
            // InternalCreate d0 "x", InternalCreate d1 "new2"
            vec![7 << 5, (1 << 2) | (3 << 5)],
        ),
    ];
    let mut seeds = Vec::new();
    for (label, images, actions) in groups {
        let base = build(&images);
        let run = base.settled();
        let mut group = open_group(&run).expect("opening a fresh group");
        group
            .run(&plan(&images, &actions))
            .expect("a seed plan commits");
        drop(group);
        let log = run.log();
        let points = ["begin", "prepared", "decided", "published 0", "closed"];
        for point in points {
            let Some(at) = event_index(&log, point) else {
                continue;
            };
            let cut = at + 1;
            let crashed = run.crash(cut, Survivors::All);
            let journal = crashed
                .file(&Path::new(GROUP).join("txn.journal"))
                .unwrap_or_default();
            // A fixed transaction id, so the seed files are the same on every run.
            let journal: Vec<u8> = journal::read_all(&journal)
                .expect("a real journal reads")
                .into_iter()
                .flat_map(|r| {
                    journal::encode(&Record {
                        txn: sim_group().bind([0x5E; 8]),
                        ..r
                    })
                })
                .collect();
            let input = JournalInput {
                images: images.clone(),
                actions: actions.clone(),
                cut: cut as u16,
                flags: 1,
                journal,
            };
            seeds.push((
                format!("{label}-at-{}", point.replace(' ', "-")),
                input.to_bytes(),
            ));
        }
    }
    seeds
}

/// Seeds for `transaction`: groups with snapshots, valid plans of every action kind, and each kind
/// of trouble (a cut before and after the decision, torn, an injected error once or for good).
/// `transaction/tests/fuzz_replay.rs` writes them to `fuzz/regressions/transaction/`.
pub fn transaction_seeds() -> Vec<(String, Vec<u8>)> {
    // Two snapshots and two writes, 64 KiB clusters, 2 MiB; one snapshot, 512-byte clusters, 1 MiB.
    let a = ImageConfig {
        shape: 0b1000_0001,
        writes: vec![[0, 0, 0, 15, 0x5A], [1, 0x40, 0, 31, 0xA5]],
    };
    let b = ImageConfig {
        shape: 0b0100_1000,
        writes: vec![[0, 0x10, 0, 7, 0x77]],
    };
    let c = ImageConfig {
        shape: 0b0000_0101,
        writes: vec![],
    };
    // kind | image << 2 | name << 5 (names: s0 s1 new new2 1 "" s0 x; overlays o0 o1 d0 nodir)
    let create = |i: u8, name: u8| (i << 2) | (name << 5);
    let delete = |i: u8, name: u8| 1 | (i << 2) | (name << 5);
    let revert = |i: u8, name: u8| 2 | (i << 2) | (name << 5);
    let external = |i: u8, overlay: u8| 3 | (i << 2) | (overlay << 5);
    let add_b1 = |i: u8| 3 | (i << 2) | (6 << 5);
    let clear_b0 = |i: u8| 3 | (i << 2) | (7 << 5);
    // 512-byte clusters (the spare cluster value 3 gives a bitmap `b0`), one snapshot.
    let d = ImageConfig {
        shape: 0b0101_1100,
        writes: vec![[0, 0x20, 0, 3, 0x33]],
    };
    let trouble = |flags: u8, fault_at: u16, cut: u32, survivors: u8, seed: u32| {
        let mut t = vec![flags];
        t.extend_from_slice(&fault_at.to_be_bytes());
        t.extend_from_slice(&cut.to_be_bytes());
        t.push(survivors);
        t.extend_from_slice(&seed.to_be_bytes());
        t
    };
    // (name, images, actions, trouble)
    type Case = (&'static str, Vec<ImageConfig>, Vec<u8>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "mixed-cut-early",
            vec![a.clone(), b.clone()],
            vec![create(0, 2), delete(1, 0)],
            trouble(0, 0, 40, 0, 0),
        ),
        (
            "mixed-cut-late-torn",
            vec![a.clone(), b.clone()],
            vec![create(0, 2), delete(1, 0)],
            trouble(0, 0, 100_000, 2, 7),
        ),
        (
            "revert-and-overlay-cut-all",
            vec![a.clone(), b.clone(), c.clone()],
            vec![revert(0, 1), external(2, 0), create(1, 7)],
            trouble(0, 0, 150, 1, 0),
        ),
        (
            "create-three-eio-persistent",
            vec![a.clone(), b.clone(), c.clone()],
            vec![create(0, 2), create(1, 3), create(2, 7)],
            trouble(0b101, 25, 90, 3, 11),
        ),
        (
            "delete-revert-enospc-once-no-cut",
            vec![a.clone()],
            vec![delete(0, 0), revert(0, 1)],
            trouble(0b1011, 12, 0, 0, 0),
        ),
        (
            "overlay-eio-once",
            vec![c.clone(), b.clone()],
            vec![external(0, 1), create(1, 2)],
            trouble(0b001, 30, 60, 2, 3),
        ),
        (
            "refused-duplicate-name",
            vec![a.clone()],
            vec![create(0, 0)],
            trouble(0, 0, 0, 0, 0),
        ),
        (
            "bitmaps-snapshot-new-bitmap-cut",
            vec![d.clone(), a.clone()],
            vec![create(0, 2), add_b1(0), clear_b0(0), external(1, 0)],
            trouble(0, 0, 120, 2, 5),
        ),
        (
            "bitmaps-revert-clear-eio-once",
            vec![d.clone()],
            vec![revert(0, 0), clear_b0(0), add_b1(0)],
            trouble(0b001, 20, 60, 1, 9),
        ),
        (
            "bitmaps-refused-clear-without-bitmap",
            vec![a.clone(), d],
            vec![add_b1(1), clear_b0(0)],
            trouble(0, 0, 0, 0, 0),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, images, actions, trouble)| {
            let mut bytes = Vec::new();
            group_bytes(&images, &actions, &mut bytes);
            bytes.extend(trouble);
            (name.to_string(), bytes)
        })
        .collect()
}
