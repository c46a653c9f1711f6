//! Group transactions against QEMU: all-or-nothing across images, also when the work stops at any
//! named point (a simulated power cut) and `recover` runs; `qemu-img check` exits 0 on every image
//! afterwards and snapshot content never changes.

use std::path::PathBuf;

use qcow2::format::SnapshotTime;
use qcow2::{CreateOptions, Image, OpenOptions};
use qcow2_testdata::{qemu_check, qemu_convert_raw, require_qemu, scratch_dir};
use qcow2_transaction::{Action, Group, OverlayMode, Recovery, TxnError};

struct Disks {
    dir: PathBuf,
    paths: Vec<PathBuf>,
}

/// Four images: each with data and a snapshot "base" (disk2 also "old").
fn disks(name: &str) -> Disks {
    require_qemu();
    let dir = scratch_dir(name);
    let mut paths = Vec::new();
    for i in 0..4u8 {
        let path = dir.join(format!("disk{i}.qcow2"));
        let image = Image::create(&path, &CreateOptions::new(4 << 20).cluster_size(65536)).unwrap();
        image.write_at(&vec![i + 1; 300_000], 0).unwrap();
        image
            .create_snapshot("base", SnapshotTime { secs: 1, nanos: 0 })
            .unwrap();
        if i == 2 {
            image
                .create_snapshot("old", SnapshotTime { secs: 2, nanos: 0 })
                .unwrap();
        }
        image.write_at(&vec![i + 100; 100_000], 1 << 20).unwrap();
        image.close().unwrap();
        paths.push(path);
    }
    Disks { dir, paths }
}

fn plan(d: &Disks) -> Vec<Action> {
    vec![
        Action::InternalCreate {
            image: d.paths[0].clone(),
            name: "nightly".into(),
        },
        Action::ExternalCreate {
            image: d.paths[1].clone(),
            overlay: d.dir.join("disk1.nightly.qcow2"),
            mode: OverlayMode::New,
        },
        Action::InternalDelete {
            image: d.paths[2].clone(),
            name: "old".into(),
        },
        Action::InternalRevert {
            image: d.paths[3].clone(),
            name: "base".into(),
        },
    ]
}

/// What a reader sees of the group: each image's snapshot names and active content, and the
/// overlay's existence.
#[derive(Debug, PartialEq, Eq)]
struct View {
    snapshots: Vec<Vec<String>>,
    active: Vec<Vec<u8>>,
    overlay: bool,
}

fn view(d: &Disks) -> View {
    let mut snapshots = Vec::new();
    let mut active = Vec::new();
    for p in &d.paths {
        let image = Image::open(p, &OpenOptions::metadata_only()).unwrap();
        snapshots.push(image.snapshots().into_iter().map(|s| s.name).collect());
        drop(image);
        active.push(qemu_convert_raw(p, None));
    }
    let overlay = d.dir.join("disk1.nightly.qcow2").exists();
    View {
        snapshots,
        active,
        overlay,
    }
}

fn assert_all_clean(d: &Disks) {
    for p in d
        .paths
        .iter()
        .chain([d.dir.join("disk1.nightly.qcow2")].iter())
    {
        if p.exists() {
            let (code, json) = qemu_check(p);
            assert_eq!(code, 0, "{}: {json}", p.display());
        }
    }
    let stray: Vec<_> = std::fs::read_dir(&d.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".txn-"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

fn group_dir(d: &Disks) -> PathBuf {
    d.dir.join("group")
}

/// QMP's default `absolute-paths` names the backing file by its absolute path; `New` names it
/// relative to the overlay. Both overlays read as their image does, by qemu-img too.
#[test]
fn an_absolute_paths_overlay_names_its_image_by_absolute_path() {
    let d = disks("txn-absolute");
    let sub = d.dir.join("overlays");
    std::fs::create_dir_all(&sub).unwrap();
    let mut group = Group::open(group_dir(&d)).unwrap();
    group
        .run(&[
            Action::ExternalCreate {
                image: d.paths[0].clone(),
                overlay: sub.join("abs.qcow2"),
                mode: OverlayMode::NewAbsolute,
            },
            Action::ExternalCreate {
                image: d.paths[1].clone(),
                overlay: sub.join("rel.qcow2"),
                mode: OverlayMode::New,
            },
        ])
        .unwrap();
    drop(group);
    let name = |p: &std::path::Path| {
        Image::open(p, &OpenOptions::metadata_only())
            .unwrap()
            .backing_file_name()
    };
    let canonical = std::fs::canonicalize(&d.paths[0]).unwrap();
    assert_eq!(name(&sub.join("abs.qcow2")).as_deref(), canonical.to_str());
    assert_eq!(
        name(&sub.join("rel.qcow2")).as_deref(),
        Some("../disk1.qcow2")
    );
    for (overlay, image) in [("abs.qcow2", &d.paths[0]), ("rel.qcow2", &d.paths[1])] {
        let overlay = sub.join(overlay);
        assert_eq!(qemu_check(&overlay).0, 0);
        assert!(qemu_convert_raw(&overlay, None) == qemu_convert_raw(image, None));
    }
}

#[test]
fn a_four_image_plan_commits_everywhere() {
    let d = disks("txn-commit");
    let before = view(&d);
    let base3 = qemu_convert_raw(&d.paths[3], Some("base"));
    let mut group = Group::open(group_dir(&d)).unwrap();
    let outcome = group.run(&plan(&d)).unwrap();
    assert_eq!(outcome.overlays, vec![d.dir.join("disk1.nightly.qcow2")]);
    drop(group);
    let after = view(&d);
    assert_eq!(after.snapshots[0], ["base", "nightly"]);
    assert_eq!(after.snapshots[2], ["base"]);
    assert!(after.overlay);
    assert_eq!(after.active[0], before.active[0]);
    assert_eq!(after.active[3], base3);
    assert_eq!(
        qemu_convert_raw(&d.paths[0], Some("nightly")),
        before.active[0]
    );
    // The overlay is backed by disk1 under a relative name and reads like it.
    let overlay = Image::open(d.dir.join("disk1.nightly.qcow2"), &OpenOptions::default()).unwrap();
    assert_eq!(overlay.backing_file_name().as_deref(), Some("disk1.qcow2"));
    drop(overlay);
    assert_eq!(
        qemu_convert_raw(&d.dir.join("disk1.nightly.qcow2"), None),
        before.active[1]
    );
    let manifest = Group::open(group_dir(&d)).unwrap().manifest().unwrap();
    assert_eq!(manifest.disks.len(), 1);
    assert_all_clean(&d);
}

#[test]
fn invalid_plans_change_nothing() {
    let d = disks("txn-invalid");
    let bytes: Vec<Vec<u8>> = d.paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut group = Group::open(group_dir(&d)).unwrap();
    std::fs::write(d.dir.join("taken.qcow2"), b"data").unwrap();
    let bad_plans = vec![
        vec![Action::InternalCreate {
            image: d.paths[0].clone(),
            name: "base".into(),
        }],
        vec![
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "x".into(),
            },
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "x".into(),
            },
        ],
        vec![Action::InternalDelete {
            image: d.paths[1].clone(),
            name: "missing".into(),
        }],
        vec![Action::ExternalCreate {
            image: d.paths[1].clone(),
            overlay: d.dir.join("taken.qcow2"),
            mode: OverlayMode::New,
        }],
        vec![
            Action::InternalCreate {
                image: d.paths[2].clone(),
                name: "fine".into(),
            },
            Action::InternalCreate {
                image: d.dir.join("nope.qcow2"),
                name: "y".into(),
            },
        ],
        vec![Action::InternalCreate {
            image: d.paths[0].clone(),
            name: String::new(),
        }],
    ];
    for p in bad_plans {
        let err = group.run(&p).unwrap_err();
        assert!(
            matches!(err, TxnError::Invalid { .. } | TxnError::Image { .. }),
            "{err}"
        );
        assert!(!err.to_string().is_empty());
    }
    for (p, b) in d.paths.iter().zip(&bytes) {
        assert!(std::fs::read(p).unwrap() == *b, "{} changed", p.display());
    }
}

#[test]
fn a_failure_while_preparing_rolls_every_image_back() {
    let d = disks("txn-abort");
    // A 1-bit refcount image with data cannot take a snapshot: preparing it fails after the
    // others are staged.
    let rc1 = d.dir.join("zz-rc1.qcow2");
    let image = Image::create(
        &rc1,
        &CreateOptions::new(1 << 20)
            .cluster_size(65536)
            .refcount_bits(1),
    )
    .unwrap();
    image.write_at(&[5; 70_000], 0).unwrap();
    image.close().unwrap();
    let before = view(&d);
    let mut actions = plan(&d);
    actions.push(Action::InternalCreate {
        image: rc1.clone(),
        name: "impossible".into(),
    });
    let mut group = Group::open(group_dir(&d)).unwrap();
    let err = group.run(&actions).unwrap_err();
    assert!(matches!(err, TxnError::Aborted(_)), "{err}");
    assert_eq!(view(&d), before);
    assert_all_clean(&d);
    assert_eq!(group.recover().unwrap(), Recovery::Clean);
}

/// Stops the plan at every named event, recovers, and checks all-or-nothing.
#[test]
fn a_power_cut_at_any_point_recovers_to_all_or_nothing() {
    let events = [
        "begin",
        "prepared 0",
        "prepared 1",
        "prepared 2",
        "prepared 3",
        "prepared",
        "decided",
        "published 0",
        "published 1",
        "published 2",
        "published 3",
        "closed",
    ];
    for (n, event) in events.iter().enumerate() {
        let d = disks(&format!("txn-cut-{n}"));
        let before = view(&d);
        let mut group = Group::open(group_dir(&d)).unwrap();
        let stop = event.to_string();
        group.set_hook(Some(Box::new(move |e: &str| e != stop)));
        let err = group.run(&plan(&d)).unwrap_err();
        assert!(matches!(err, TxnError::Interrupted(_)), "{event}: {err}");
        drop(group);
        // A new process opens the group: recovery runs first.
        let mut group = Group::open(group_dir(&d)).unwrap();
        let after = view(&d);
        // The decision is durable before "prepared" (it goes with the staged records).
        let committed = n >= events.iter().position(|e| *e == "prepared").unwrap();
        if committed {
            assert_eq!(after.snapshots[0], ["base", "nightly"], "{event}");
            assert_eq!(after.snapshots[2], ["base"], "{event}");
            assert!(after.overlay, "{event}");
        } else {
            assert_eq!(after, before, "{event}: not rolled back");
        }
        assert_all_clean(&d);
        assert_eq!(
            group.recover().unwrap(),
            Recovery::Clean,
            "{event}: second recover"
        );
        for (i, p) in d.paths.iter().enumerate() {
            let image = Image::open(p, &OpenOptions::metadata_only()).unwrap();
            let report = image.check().unwrap();
            assert!(report.is_clean(), "{event}: disk{i}: {:?}", report.messages);
        }
    }
}

#[test]
fn a_journal_corrupt_in_the_middle_stops_recovery() {
    let d = disks("txn-corrupt-journal");
    let mut group = Group::open(group_dir(&d)).unwrap();
    group.set_hook(Some(Box::new(|e: &str| e != "prepared")));
    assert!(group.run(&plan(&d)).is_err());
    drop(group);
    let journal = group_dir(&d).join("txn.journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[40] ^= 0xFF; // inside the first record, with a valid one after it
    std::fs::write(&journal, &bytes).unwrap();
    let err = Group::open(group_dir(&d)).expect_err("refuses to guess");
    assert!(matches!(err, TxnError::Journal { .. }), "{err}");
}

#[test]
fn one_image_under_two_names_is_refused_before_any_write() {
    let d = disks("txn-twice");
    let bytes = std::fs::read(&d.paths[0]).unwrap();
    let link = d.dir.join("link.qcow2");
    std::os::unix::fs::symlink(&d.paths[0], &link).unwrap();
    let hard = d.dir.join("hard.qcow2");
    std::fs::hard_link(&d.paths[0], &hard).unwrap();
    let mut group = Group::open(group_dir(&d)).unwrap();
    std::fs::create_dir(d.dir.join("sub")).unwrap();
    for other in [link, hard, d.dir.join("sub/../disk0.qcow2")] {
        let err = group
            .run(&[
                Action::InternalCreate {
                    image: d.paths[0].clone(),
                    name: "a".into(),
                },
                Action::InternalCreate {
                    image: other.clone(),
                    name: "b".into(),
                },
            ])
            .unwrap_err();
        assert!(
            matches!(err, TxnError::Invalid { .. }),
            "{}: {err}",
            other.display()
        );
    }
    // The same spelling twice merges into one table write and one switch.
    group
        .run(&[
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "a".into(),
            },
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "b".into(),
            },
        ])
        .unwrap();
    assert_ne!(std::fs::read(&d.paths[0]).unwrap(), bytes);
    let image = Image::open(&d.paths[0], &OpenOptions::metadata_only()).unwrap();
    let names: Vec<String> = image.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["base", "a", "b"]);
    drop(image);
    assert_all_clean(&d);
}

#[test]
fn read_only_locked_or_replaced_images_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = disks("txn-refused");
    let mut group = Group::open(group_dir(&d)).unwrap();
    // A file without write permission (tests run as root, so also check the engine's refusal of
    // a corrupt image): the open for writing fails and names the image.
    let corrupt = d.dir.join("corrupt.qcow2");
    std::fs::copy(&d.paths[1], &corrupt).unwrap();
    let mut b = std::fs::read(&corrupt).unwrap();
    b[79] |= 2;
    std::fs::write(&corrupt, &b).unwrap();
    let err = group
        .run(&[
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "x".into(),
            },
            Action::InternalCreate {
                image: corrupt.clone(),
                name: "x".into(),
            },
        ])
        .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    let mut perms = std::fs::metadata(&d.paths[2]).unwrap().permissions();
    perms.set_mode(0o444);
    std::fs::set_permissions(&d.paths[2], perms).unwrap();

    // An image another process holds for writing.
    let p = d.paths[3].to_str().unwrap().to_string();
    let mut qemu = std::process::Command::new("qemu-io")
        .arg(&p)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let stdin = qemu.stdin.as_mut().unwrap();
        stdin.write_all(b"read 0 512\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(qemu.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    let err = group
        .run(&[Action::InternalCreate {
            image: d.paths[3].clone(),
            name: "x".into(),
        }])
        .unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
    drop(qemu.stdin.take());
    qemu.wait().unwrap();
    assert_eq!(view(&d).snapshots[0], ["base"]);
}

#[test]
fn recovery_stops_when_an_image_was_replaced() {
    let d = disks("txn-replaced");
    let mut group = Group::open(group_dir(&d)).unwrap();
    group.set_hook(Some(Box::new(|e: &str| e != "prepared")));
    assert!(group.run(&plan(&d)).is_err());
    drop(group);
    // Someone replaces disk0 with another file (a new inode) while the group is in doubt.
    let copy = d.dir.join("copy");
    std::fs::copy(&d.paths[0], &copy).unwrap();
    std::fs::rename(&copy, &d.paths[0]).unwrap();
    let err = Group::open(group_dir(&d)).expect_err("recovery refuses");
    assert!(matches!(err, TxnError::ForeignChange { .. }), "{err}");
}

/// Power cuts inside recovery itself, for a committed and for an undecided transaction: a later
/// recovery gives the same result as one uninterrupted run, and a third changes nothing.
#[test]
fn a_power_cut_during_recovery_is_recovered_too() {
    let recovery_events = [
        "recovery switched 0",
        "recovered 0",
        "recovery switched 1",
        "recovered 1",
        "recovered 2",
        "recovered 3",
        "recovery reconciled",
    ];
    for (committed, cut) in [(true, "published 0"), (false, "prepared 3")] {
        for (n, event) in recovery_events.iter().enumerate() {
            let d = disks(&format!("txn-recut-{committed}-{n}"));
            let before = view(&d);
            let mut group = Group::open(group_dir(&d)).unwrap();
            let stop = cut.to_string();
            group.set_hook(Some(Box::new(move |e: &str| e != stop)));
            assert!(group.run(&plan(&d)).is_err());
            drop(group);
            let stop = event.to_string();
            let interrupted =
                Group::open_with_hook(group_dir(&d), Some(Box::new(move |e: &str| e != stop)));
            if let Err(e) = &interrupted {
                assert!(matches!(e, TxnError::Interrupted(_)), "{e}");
            }
            drop(interrupted);
            let mut group = Group::open(group_dir(&d)).unwrap();
            let after = view(&d);
            if committed {
                assert_eq!(after.snapshots[0], ["base", "nightly"], "{event}");
                assert_eq!(after.snapshots[2], ["base"], "{event}");
                assert!(after.overlay, "{event}");
            } else {
                assert_eq!(after, before, "{event}");
            }
            assert_all_clean(&d);
            assert_eq!(group.recover().unwrap(), Recovery::Clean, "{event}");
        }
    }
}

/// T23: while one transaction holds its images (paused after preparing), a second group that
/// shares an image is refused at once, a disjoint group commits in parallel, and the same group
/// cannot be opened twice; the first transaction then commits.
#[test]
fn overlapping_groups_exclude_each_other_and_disjoint_ones_run_in_parallel() {
    use std::sync::mpsc;
    let d = disks("txn-concurrent");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let first_dir = d.dir.join("group-a");
    let first_plan = vec![Action::InternalCreate {
        image: d.paths[0].clone(),
        name: "a".into(),
    }];
    let first = std::thread::spawn(move || {
        let hook: qcow2_transaction::Hook = Box::new(move |event| {
            if event == "prepared" {
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            true
        });
        let mut group = Group::open_with_hook(&first_dir, Some(hook)).unwrap();
        group.run(&first_plan)
    });
    ready_rx.recv().unwrap();
    // Another group touching disk0: the image lock refuses it without waiting.
    let mut other = Group::open(d.dir.join("group-b")).unwrap();
    let err = other
        .run(&[
            Action::InternalCreate {
                image: d.paths[1].clone(),
                name: "b".into(),
            },
            Action::InternalCreate {
                image: d.paths[0].clone(),
                name: "b".into(),
            },
        ])
        .unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
    // The same group directory: the group lock refuses it.
    let err = Group::open(d.dir.join("group-a")).expect_err("opened twice");
    assert!(matches!(err, TxnError::GroupLocked(_)), "{err}");
    // A disjoint group proceeds while the first is still in flight.
    other
        .run(&[Action::InternalCreate {
            image: d.paths[2].clone(),
            name: "c".into(),
        }])
        .unwrap();
    go_tx.send(()).unwrap();
    first.join().unwrap().unwrap();
    let after = view(&d);
    assert_eq!(after.snapshots[0], ["base", "a"]);
    assert_eq!(
        after.snapshots[1],
        ["base"],
        "the refused plan changed disk1"
    );
    assert_eq!(after.snapshots[2], ["base", "old", "c"]);
    assert_all_clean(&d);
}
