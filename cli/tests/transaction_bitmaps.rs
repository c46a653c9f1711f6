//! Bitmap actions in group transactions (`block-dirty-bitmap-*`), against QEMU: a plan gives the
//! images the bitmaps, flags and dirty ranges that the same steps give through `qemu-img` one by
//! one; a plan with one bad action changes nothing; `qemu-img check` stays clean.

mod common;

use std::path::{Path, PathBuf};

use common::{bitmaps, code, stderr, tool_in};
use qcow2_testdata::{qemu_check, qemu_dirty_map as dirty, qemu_img_ok, qemu_io, scratch_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 64 MiB image made by qemu-img with an enabled bitmap `b0` that marks two writes.
fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu_img_ok(&["bitmap", "--add", s(&p), "b0"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 1M", s(&p)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 8 10M 64k", s(&p)]);
    p
}

fn run_plan(dir: &Path, plan: serde_json::Value) -> std::process::Output {
    let file = dir.join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    tool_in(Some(dir), &["transaction", s(&file)])
}

/// The pattern backup tools use: snapshot every disk and start a new bitmap on each, stopping
/// the old one, as one plan (internal snapshot on one disk, external on the other).
#[test]
fn snapshot_and_new_bitmap_on_every_disk_match_qemu_img_steps() {
    let dir = scratch_dir("txn_bitmaps_backup");
    let (d0, d1) = (disk(&dir, "d0.qcow2"), disk(&dir, "d1.qcow2"));
    let (t0, t1) = (dir.join("t0.qcow2"), dir.join("t1.qcow2"));
    std::fs::copy(&d0, &t0).unwrap();
    std::fs::copy(&d1, &t1).unwrap();

    let out = run_plan(
        &dir,
        serde_json::json!({
            "group": "group",
            "actions": [
                {"type": "blockdev-snapshot-internal-sync", "data": {"image": "d0.qcow2", "name": "s1"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": "d0.qcow2", "name": "b1", "persistent": true}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "d0.qcow2", "name": "b0"}},
                {"type": "blockdev-snapshot-sync", "data": {"image": "d1.qcow2", "snapshot-file": "d1.s1.qcow2"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": "d1.s1.qcow2", "name": "b1", "granularity": 131072}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "d1.qcow2", "name": "b0"}},
            ]
        }),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // The same steps, one qemu-img command each.
    qemu_img_ok(&["snapshot", "-c", "s1", s(&t0)]);
    qemu_img_ok(&["bitmap", "--add", s(&t0), "b1"]);
    qemu_img_ok(&["bitmap", "--disable", s(&t0), "b0"]);
    let t1s = dir.join("t1.s1.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "t1.qcow2",
        "-F",
        "qcow2",
        s(&t1s),
    ]);
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", s(&t1s), "b1"]);
    qemu_img_ok(&["bitmap", "--disable", s(&t1), "b0"]);

    let d1s = dir.join("d1.s1.qcow2");
    for (ours, theirs) in [(&d0, &t0), (&d1, &t1), (&d1s, &t1s)] {
        assert_eq!(bitmaps(ours), bitmaps(theirs), "{}", ours.display());
        assert_eq!(qemu_check(ours).0, 0, "{}", ours.display());
    }
    assert_eq!(dirty(&d0, "b0"), dirty(&t0, "b0"));
    assert_eq!(dirty(&d1, "b0"), dirty(&t1, "b0"));

    // Guest writes after the plan: the new bitmaps see them, the stopped ones do not.
    for (p, top) in [(&d0, &d0), (&t0, &t0), (&d1, &d1s), (&t1, &t1s)] {
        qemu_io(&["-f", "qcow2", "-c", "write -P 9 20M 200k", s(top)]);
        assert_eq!(qemu_check(p).0, 0);
    }
    assert_eq!(dirty(&d0, "b1"), dirty(&t0, "b1"));
    assert_eq!(dirty(&d0, "b0"), dirty(&t0, "b0"));
    assert_eq!(dirty(&d1s, "b1"), dirty(&t1s, "b1"));
    assert!(dirty(&d0, "b1").contains("dirty"), "b1 tracks the write");
}

/// Merge (from this image and from another one), clear and remove in one plan, against the same
/// `qemu-img bitmap` steps.
#[test]
fn merge_clear_and_remove_match_qemu_img_steps() {
    let dir = scratch_dir("txn_bitmaps_merge");
    let (d0, src) = (disk(&dir, "d0.qcow2"), disk(&dir, "src.qcow2"));
    qemu_img_ok(&["bitmap", "--add", "-g", "512", s(&d0), "b1"]);
    qemu_io(&["-f", "qcow2", "-c", "write 30M 4k", s(&d0)]);
    qemu_io(&["-f", "qcow2", "-c", "write 40M 300k", s(&src)]);
    let t0 = dir.join("t0.qcow2");
    std::fs::copy(&d0, &t0).unwrap();

    let out = run_plan(
        &dir,
        serde_json::json!({
            "group": "group",
            "actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "d0.qcow2", "name": "all", "disabled": true}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": "d0.qcow2", "target": "all",
                    "bitmaps": ["b0", "b1", {"node": "src.qcow2", "name": "b0"}]}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "d0.qcow2", "name": "b1"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "d0.qcow2", "name": "b0"}},
            ]
        }),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    qemu_img_ok(&["bitmap", "--add", "--disable", s(&t0), "all"]);
    qemu_img_ok(&["bitmap", "--merge", "b0", s(&t0), "all"]);
    qemu_img_ok(&["bitmap", "--merge", "b1", s(&t0), "all"]);
    qemu_img_ok(&["bitmap", "--merge", "b0", "-b", s(&src), s(&t0), "all"]);
    qemu_img_ok(&["bitmap", "--clear", s(&t0), "b1"]);
    qemu_img_ok(&["bitmap", "--remove", s(&t0), "b0"]);

    assert_eq!(bitmaps(&d0), bitmaps(&t0));
    assert_eq!(dirty(&d0, "all"), dirty(&t0, "all"));
    assert_eq!(dirty(&d0, "b1"), dirty(&t0, "b1"));
    assert_eq!(qemu_check(&d0).0, 0);
}

/// One bad action refuses the whole plan before any write: snapshots, bitmaps and files stay
/// as they were, and the message says what is wrong as QEMU says it.
#[test]
fn a_plan_with_one_bad_bitmap_action_changes_nothing() {
    let dir = scratch_dir("txn_bitmaps_refused");
    let d0 = disk(&dir, "d0.qcow2");
    let e = disk(&dir, "e.qcow2");
    let before = std::fs::read(&d0).unwrap();
    let e_before = std::fs::read(&e).unwrap();
    let snapshot = serde_json::json!(
        {"type": "blockdev-snapshot-internal-sync", "data": {"image": "d0.qcow2", "name": "s1"}});
    let overlay = serde_json::json!(
        {"type": "blockdev-snapshot-sync", "data": {"image": "d0.qcow2", "snapshot-file": "o.qcow2"}});
    let cases = [
        (
            vec![
                snapshot.clone(),
                serde_json::json!({"type": "block-dirty-bitmap-add", "data": {"node": "d0.qcow2", "name": "b0"}}),
            ],
            "Bitmap already exists: b0",
        ),
        (
            vec![
                snapshot.clone(),
                serde_json::json!({"type": "block-dirty-bitmap-clear", "data": {"node": "d0.qcow2", "name": "zz"}}),
            ],
            "Dirty bitmap 'zz' not found",
        ),
        (
            vec![
                snapshot.clone(),
                serde_json::json!({"type": "block-dirty-bitmap-add", "data": {"node": "d0.qcow2", "name": "g", "granularity": 1000}}),
            ],
            "Granularity must be power of 2 and at least 512",
        ),
        (
            vec![
                serde_json::json!({"type": "blockdev-snapshot-internal-sync", "data": {"image": "e.qcow2", "name": "s1"}}),
                serde_json::json!({"type": "block-dirty-bitmap-merge", "data": {"node": "d0.qcow2", "target": "b0", "bitmaps": [{"node": "e.qcow2", "name": "b0"}]}}),
            ],
            "which this plan changes too",
        ),
        (
            vec![
                overlay.clone(),
                serde_json::json!({"type": "block-dirty-bitmap-disable", "data": {"node": "o.qcow2", "name": "b0"}}),
            ],
            "only block-dirty-bitmap-add applies",
        ),
        (
            vec![
                overlay,
                serde_json::json!({"type": "block-dirty-bitmap-add", "data": {"node": "d0.qcow2", "name": "x", "persistent": false}}),
            ],
            "persistent",
        ),
    ];
    for (actions, message) in cases {
        let out = run_plan(
            &dir,
            serde_json::json!({"group": "group", "actions": actions}),
        );
        assert_eq!(code(&out), 1, "{message}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(message),
            "expected {message:?} in {}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(&d0).unwrap(), before, "{message}");
        assert_eq!(std::fs::read(&e).unwrap(), e_before, "{message}");
        assert!(!dir.join("o.qcow2").exists(), "{message}");
    }
}
