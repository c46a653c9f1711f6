//! The phased API (`begin`, `add`, `prepare`, `commit`, `abort`) and live images: disks the
//! caller holds open and keeps writing to while a group snapshot is taken. Every snapshot must
//! be a crash-consistent cut of the writes: each write acknowledged before the pause is in it,
//! none that started after the pause began. QEMU reads the snapshots back (`qemu-img convert
//! -l`) and checks every image.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::{CreateOptions, Image, OpenOptions};
use qcow2_testdata::cut::WriteLog;
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

/// Four disks, two writer threads each (every block belongs to one thread), three group
/// snapshots taken while they write, the second one also adding a bitmap to every disk.
#[test]
fn group_snapshots_of_disks_in_use_are_cuts_of_the_acknowledged_writes() {
    let (dir, paths, handles) = live_disks("live-cut", 4);
    let mut group = Group::open(dir.join("group")).unwrap();
    let log = Arc::new(WriteLog::default());
    let quiesced = Arc::new(Mutex::new(None));
    let seen = (log.clone(), quiesced.clone());
    group.set_hook(Some(Box::new(move |event| {
        if event == "quiesced" {
            *seen.1.lock().unwrap() = Some(seen.0.tick());
        }
        true
    })));
    let stop = AtomicBool::new(false);
    let blocks = SIZE / BLOCK as u64;
    let mut cuts = Vec::new();
    std::thread::scope(|s| {
        for (disk, img) in handles.iter().enumerate() {
            for thread in 0..2u64 {
                let (log, stop) = (&log, &stop);
                s.spawn(move || {
                    let mut x = disk as u64 * 7919 + thread * 104_729 + 1;
                    while !stop.load(Ordering::SeqCst) {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let block = ((x >> 33) % (blocks / 2)) * 2 + thread;
                        log.write(disk, block, BLOCK, |data| {
                            img.write_at(data, block * BLOCK as u64).unwrap()
                        });
                    }
                });
            }
        }
        for k in 0..3 {
            // Mid-stream: some writes before each snapshot, more after.
            while log.len() < 300 * (k + 1) {
                std::thread::yield_now();
            }
            let before = log.tick();
            let mut txn = group.begin().unwrap();
            for h in &handles {
                txn.attach(h.clone()).unwrap();
            }
            for p in &paths {
                txn.add(snapshot(p, &format!("s{k}"))).unwrap();
                if k == 1 {
                    txn.add(Action::BitmapAdd {
                        image: p.clone(),
                        name: "since-s1".into(),
                        granularity: None,
                        disabled: false,
                    })
                    .unwrap();
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
        stop.store(true, Ordering::SeqCst);
    });
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
