//! The phased API (`begin`, `add`, `prepare`, `commit`, `abort`) and live images: disks the
//! caller holds open and keeps writing to while a group snapshot is taken. Every snapshot must
//! be a crash-consistent cut of the writes: each write acknowledged before the pause is in it,
//! none that started after the pause began. QEMU reads the snapshots back (`qemu-img convert
//! -l`) and checks every image.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use qcow2::{CreateOptions, DiskTop, Image, OpenOptions};
use qcow2_testdata::cut::{StopOnDrop, WriteLog};
use qcow2_testdata::{qemu_check, qemu_convert_raw, require_qemu, scratch_dir};
use qcow2_transaction::{Action, Group, OverlayMode, TxnError};

const BLOCK: usize = 4096;
const SIZE: u64 = 2 << 20;

fn live_disks(name: &str, n: usize) -> (PathBuf, Vec<PathBuf>, Vec<Arc<Image>>) {
    require_qemu();
    let dir = scratch_dir(name);
    let mut paths = Vec::new();
    let mut handles = Vec::new();
    for i in 0..n {
        let path = dir.join(format!("disk{i}.qcow2"));
        let options = CreateOptions::new(SIZE);
        Image::create(&path, &options).unwrap().close().unwrap();
        handles.push(Arc::new(
            Image::open(&path, &OpenOptions::read_write()).unwrap(),
        ));
        paths.push(path);
    }
    (dir, paths, handles)
}

/// The log's tick at the group's next `quiesced` event (every live image held), taken by the
/// event hook.
fn tick_when_quiesced(group: &mut Group, log: &Arc<WriteLog>) -> Arc<Mutex<Option<u64>>> {
    let quiesced = Arc::new(Mutex::new(None));
    let seen = (log.clone(), quiesced.clone());
    group.set_hook(Some(Box::new(move |event| {
        if event == "quiesced" {
            *seen.1.lock().unwrap() = Some(seen.0.tick());
        }
        true
    })));
    quiesced
}

fn close(handles: Vec<Arc<Image>>) {
    for h in handles {
        Arc::into_inner(h)
            .expect("the last handle")
            .close()
            .unwrap();
    }
}

fn snapshot(path: &std::path::Path, name: &str) -> Action {
    Action::InternalCreate {
        image: path.to_path_buf(),
        name: name.into(),
    }
}

/// Writes to every disk through its top from two threads each (every block belongs to one
/// thread) and runs three group transactions mid-stream, the `k`-th made of `plan(k, disk,
/// path)` for each disk (`path` is its top image's). Returns the log and each transaction's
/// cut: a tick before it began and the tick at its `quiesced` event.
fn live_rounds(
    group: &mut Group,
    tops: &[Arc<DiskTop>],
    plan: impl Fn(usize, usize, PathBuf) -> Vec<Action>,
) -> (Arc<WriteLog>, Vec<(u64, u64)>) {
    let log = Arc::new(WriteLog::default());
    let quiesced = tick_when_quiesced(group, &log);
    let stop = AtomicBool::new(false);
    let blocks = SIZE / BLOCK as u64;
    let mut cuts = Vec::new();
    std::thread::scope(|s| {
        // A failing assertion below must stop the writers, or the scope never ends.
        let _stop = StopOnDrop(&stop);
        for (disk, top) in tops.iter().enumerate() {
            for thread in 0..2u64 {
                let (log, stop) = (&log, &stop);
                s.spawn(move || {
                    log.write_until(stop, disk, (thread, 2), blocks, BLOCK, |data, at| {
                        top.write(|img| img.write_at(data, at)).unwrap()
                    })
                });
            }
        }
        for k in 0..3 {
            // Mid-stream: some writes before each transaction, more after.
            while log.len() < 300 * (k + 1) {
                std::thread::yield_now();
            }
            let before = log.tick();
            let mut txn = group.begin().unwrap();
            for (disk, top) in tops.iter().enumerate() {
                let path = txn.attach_top(top.clone()).unwrap();
                for action in plan(k, disk, path) {
                    txn.add(action).unwrap();
                }
            }
            let outcome = txn.prepare().unwrap().commit().unwrap();
            assert!(outcome.paused.is_some());
            let after = quiesced.lock().unwrap().take().expect("a quiesced event");
            cuts.push((before, after));
        }
        while log.len() < 1200 {
            std::thread::yield_now();
        }
    });
    (log, cuts)
}

/// Four disks and three group snapshots taken while they are written, the second one also
/// adding a bitmap to every disk.
#[test]
fn group_snapshots_of_disks_in_use_are_cuts_of_the_acknowledged_writes() {
    let (dir, paths, handles) = live_disks("live-cut", 4);
    let tops: Vec<Arc<DiskTop>> = handles
        .iter()
        .map(|h| Arc::new(DiskTop::new(h.clone())))
        .collect();
    let mut group = Group::open(dir.join("group")).unwrap();
    let (log, cuts) = live_rounds(&mut group, &tops, |k, _, path| {
        let mut plan = vec![snapshot(&path, &format!("s{k}"))];
        if k == 1 {
            plan.push(Action::BitmapAdd {
                image: path,
                name: "since-s1".into(),
                granularity: None,
                disabled: false,
            });
        }
        plan
    });
    drop(tops);
    close(handles);
    for (disk, path) in paths.iter().enumerate() {
        assert_eq!(qemu_check(path).0, 0, "{}", path.display());
        for (k, (before, after)) in cuts.iter().enumerate() {
            let raw = qemu_convert_raw(path, Some(&format!("s{k}")));
            let held = log
                .check_cut(disk, &raw, BLOCK, *before, *after)
                .unwrap_or_else(|e| panic!("snapshot s{k}: {e}"));
            assert!(held > 0, "snapshot s{k} of disk {disk} holds no write");
        }
        let bitmaps = Image::open(path, &OpenOptions::default())
            .unwrap()
            .bitmaps();
        assert_eq!(bitmaps.len(), 1);
        assert!(bitmaps[0].consistent());
    }
}

/// Two disks served through `DiskTop`s and three group transactions while they are written:
/// external snapshots of both (the writes move to the overlays), internal snapshots of the new
/// tops, external snapshots again. Each layer is a cut of the acknowledged writes: the base
/// files hold cut 0, the first overlays' snapshot cut 1 and their active state cut 2, and the
/// tops every write. QEMU reads every layer back through its chain.
#[test]
fn external_snapshots_of_disks_in_use_move_their_writes_to_the_overlays() {
    let (dir, paths, handles) = live_disks("live-external", 2);
    let tops: Vec<Arc<DiskTop>> = handles
        .iter()
        .map(|h| Arc::new(DiskTop::new(h.clone())))
        .collect();
    let overlay = |disk: usize, k: usize| dir.join(format!("disk{disk}.o{k}.qcow2"));
    let mut group = Group::open(dir.join("group")).unwrap();
    let (log, cuts) = live_rounds(&mut group, &tops, |k, disk, path| {
        vec![match k {
            1 => snapshot(&path, "s1"),
            _ => Action::ExternalCreate {
                image: path,
                overlay: overlay(disk, k),
                mode: OverlayMode::New,
            },
        }]
    });
    drop(handles);
    for top in tops {
        Arc::into_inner(top).unwrap().close().unwrap();
    }
    for (disk, base) in paths.iter().enumerate() {
        let layers = [
            (base.clone(), None, Some(cuts[0])),
            (overlay(disk, 0), Some("s1"), Some(cuts[1])),
            (overlay(disk, 0), None, Some(cuts[2])),
            (overlay(disk, 2), None, None),
        ];
        for (path, snap, cut) in layers {
            assert_eq!(qemu_check(&path).0, 0, "{}", path.display());
            let raw = qemu_convert_raw(&path, snap);
            let (before, after) = cut.unwrap_or((u64::MAX, u64::MAX));
            let held = log
                .check_cut(disk, &raw, BLOCK, before, after)
                .unwrap_or_else(|e| panic!("{} {snap:?}: {e}", path.display()));
            assert!(held > 0, "{} holds no write", path.display());
        }
    }
}

#[test]
fn add_names_a_refused_action_and_the_transaction_goes_on_without_it() {
    let (dir, paths, mut handles) = live_disks("live-add", 2);
    // The second image is nobody's handle: the transaction opens (and locks) it itself.
    close(handles.split_off(1));
    let mut group = Group::open(dir.join("group")).unwrap();
    let mut txn = group.begin().unwrap();
    txn.attach(handles[0].clone()).unwrap();
    let external = txn
        .add(Action::ExternalCreate {
            image: paths[0].clone(),
            overlay: dir.join("overlay.qcow2"),
            mode: OverlayMode::New,
        })
        .unwrap_err();
    assert!(
        matches!(&external, TxnError::Refused { reason, .. }
            if matches!(**reason, TxnError::LiveUnsupported { .. })),
        "{external}"
    );
    txn.add(snapshot(&paths[0], "a")).unwrap();
    let refused = txn.add(snapshot(&paths[0], "a")).unwrap_err();
    assert!(
        matches!(&refused, TxnError::Refused { index: 1, action, .. }
            if action.contains("blockdev-snapshot-internal-sync")),
        "{refused}"
    );
    txn.add(snapshot(&paths[1], "a")).unwrap();
    assert_eq!(txn.actions().len(), 2);
    txn.prepare().unwrap().commit().unwrap();
    close(handles);
    for p in &paths {
        let img = Image::open(p, &OpenOptions::default()).unwrap();
        let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(qemu_check(p).0, 0);
    }
}

/// A prepared transaction holds the writes; dropping it (or `abort`) takes the staged snapshot
/// back, and the held write then lands.
#[test]
fn dropping_or_aborting_a_prepared_transaction_takes_it_back_and_lets_writes_go_on() {
    let (dir, paths, handles) = live_disks("live-abort", 1);
    let mut group = Group::open(dir.join("group")).unwrap();
    let img = handles[0].clone();
    img.write_at(&[1; BLOCK], 0).unwrap();
    for explicit in [false, true] {
        std::thread::scope(|s| {
            let mut txn = group.begin().unwrap();
            txn.attach(img.clone()).unwrap();
            txn.add(snapshot(&paths[0], "never")).unwrap();
            let prepared = txn.prepare().unwrap();
            let writer = s.spawn(|| img.write_at(&[2; BLOCK], 0).unwrap());
            while qcow2::transaction_support::writes_waiting(&img) == 0 {
                std::thread::yield_now();
            }
            let mut buf = [0; BLOCK];
            img.read_at(&mut buf, 0).unwrap();
            assert_eq!(
                buf, [1; BLOCK],
                "reads go on, the held write has not landed"
            );
            if explicit {
                prepared.abort().unwrap();
            } else {
                drop(prepared);
            }
            writer.join().unwrap();
        });
        assert!(img.snapshots().is_empty());
        img.write_at(&[1; BLOCK], 0).unwrap();
    }
    drop(img);
    close(handles);
    assert_eq!(qemu_check(&paths[0]).0, 0);
    assert!(qemu_convert_raw(&paths[0], None)[..BLOCK] == [1; BLOCK]);
}
