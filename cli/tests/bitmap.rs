//! `bitmap` against `qemu-img bitmap`: the same operations on copies of one image give the same
//! `qemu-img info` bitmap lists, the same dirty ranges over NBD, the same messages and exit
//! codes; `qemu-img check` stays clean.

mod common;

use std::process::Command;

use common::{bitmaps, stderr, tool_in};
use qcow2_testdata::{
    qemu_check, qemu_dirty_map as dirty, qemu_img, qemu_img_ok, qemu_io, scratch_dir,
};

#[test]
fn bitmap_operations_match_qemu_img() {
    let dir = scratch_dir("bitmap_ops");
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", ours.to_str().unwrap(), "64M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 1 0 1M",
        ours.to_str().unwrap(),
    ]);
    std::fs::copy(&ours, &theirs).unwrap();
    let steps: &[&[&str]] = &[
        &["--add", "b0"],
        &["--add", "-g", "512", "--disable", "b1"],
        &["--add", "-g", "1M", "b2"],
        &["--disable", "b2"],
        &["--enable", "b1"],
        &["--remove", "b1"],
        &["--add", "b3"],
    ];
    let run_both = |args: &[&str], write: Option<&str>| {
        for (tool, path) in [("ours", &ours), ("qemu", &theirs)] {
            let mut full: Vec<&str> = vec!["bitmap"];
            full.extend(args.iter().take(args.len() - 1));
            full.push(path.to_str().unwrap());
            full.push(args[args.len() - 1]);
            let out = if tool == "ours" {
                tool_in(None, &full)
            } else {
                qemu_img(&full)
            };
            assert!(
                out.status.success(),
                "{tool} {full:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if let Some(w) = write {
                qemu_io(&["-f", "qcow2", "-c", w, path.to_str().unwrap()]);
            }
        }
    };
    for (i, step) in steps.iter().enumerate() {
        run_both(step, Some(&format!("write {} 64k", i * (4 << 20))));
        assert_eq!(bitmaps(&ours), bitmaps(&theirs), "after {step:?}");
    }
    run_both(&["--merge", "b0", "b3"], None);
    run_both(&["--clear", "b0"], None);
    for name in ["b0", "b2", "b3"] {
        assert_eq!(dirty(&ours, name), dirty(&theirs, name), "bitmap {name}");
    }
    // Merging from another image (-b).
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", src.to_str().unwrap(), "s"]);
    qemu_io(&["-f", "qcow2", "-c", "write 40M 300k", src.to_str().unwrap()]);
    run_both(&["--merge", "s", "-b", src.to_str().unwrap(), "b0"], None);
    assert_eq!(dirty(&ours, "b0"), dirty(&theirs, "b0"));
    assert_eq!(qemu_check(&ours).0, 0);
    // Removing every bitmap drops the extension; the image checks clean without leaks.
    for name in ["b0", "b2", "b3"] {
        run_both(&["--remove", name], None);
    }
    assert_eq!(bitmaps(&ours), bitmaps(&theirs));
    assert_eq!(qemu_check(&ours).0, 0);
}

#[test]
fn bitmap_errors_match_qemu_img() {
    let dir = scratch_dir("bitmap_errors");
    let path = dir.join("d.qcow2");
    let v2 = dir.join("v2.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "1M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        v2.to_str().unwrap(),
        "1M",
    ]);
    qemu_img_ok(&["bitmap", "--add", p, "a"]);
    let cases: &[&[&str]] = &[
        &["--remove", "d.qcow2", "nope"],
        &["--add", "d.qcow2", "a"],
        &["--add", "-g", "100", "d.qcow2", "b"],
        &["--add", "-g", "256", "d.qcow2", "b"],
        &["d.qcow2", "a"],
        &["--merge", "nope", "d.qcow2", "a"],
        &["--disable", "d.qcow2", "nope"],
    ];
    let pristine = std::fs::read(&path).unwrap();
    for args in cases {
        // qemu-img rewrites the bitmaps whenever it opens the image for writing; ours does not.
        let mut full = vec!["bitmap"];
        full.extend_from_slice(args);
        let qemu = Command::new("qemu-img")
            .args(&full)
            .current_dir(&dir)
            .output()
            .unwrap();
        std::fs::write(&path, &pristine).unwrap();
        let before = std::fs::read(&path).unwrap();
        let ours = tool_in(Some(&dir), &full);
        assert_eq!(ours.status.code(), qemu.status.code(), "{args:?}");
        assert_eq!(
            stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            String::from_utf8_lossy(&qemu.stderr),
            "{args:?}"
        );
        assert!(
            std::fs::read(&path).unwrap() == before,
            "{args:?} changed the image"
        );
    }
    let out = tool_in(Some(&dir), &["bitmap", "--add", "v2.qcow2", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Cannot store dirty bitmaps in qcow2 v2 files"));
}

/// An overlay's header (backing name, format, feature table) runs past its first sector, and a
/// 4 KiB-cluster image gets QEMU's default granularity of 4 KiB: both as qemu-img does them.
#[test]
fn bitmaps_on_an_overlay_and_on_small_clusters_match_qemu_img() {
    let dir = scratch_dir("bitmap_overlay");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    let mut pairs = Vec::new();
    for (name, extra) in [
        ("ov", vec!["-b", "base.qcow2", "-F", "qcow2"]),
        ("small", vec!["-o", "cluster_size=4096"]),
    ] {
        let ours = dir.join(format!("{name}-ours.qcow2"));
        let theirs = dir.join(format!("{name}-theirs.qcow2"));
        for p in [&ours, &theirs] {
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            args.extend(extra.iter().copied());
            args.extend([p.to_str().unwrap(), "64M"]);
            qemu_img_ok(&args);
        }
        let out = tool_in(None, &["bitmap", "--add", ours.to_str().unwrap(), "b"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        qemu_img_ok(&["bitmap", "--add", theirs.to_str().unwrap(), "b"]);
        pairs.push((ours, theirs));
    }
    for (ours, theirs) in &pairs {
        qemu_io(&["-f", "qcow2", "-c", "write 1M 8k", ours.to_str().unwrap()]);
        qemu_io(&["-f", "qcow2", "-c", "write 1M 8k", theirs.to_str().unwrap()]);
        assert_eq!(bitmaps(ours), bitmaps(theirs), "{}", ours.display());
        assert_eq!(dirty(ours, "b"), dirty(theirs, "b"), "{}", ours.display());
        assert_eq!(qemu_check(ours).0, 0, "{}", ours.display());
    }
}

/// Adding bitmaps rewrites the bitmap tables elsewhere; the old ones go back to the file system
/// as qemu-img gives them back, so the file holds no more blocks than qemu-img's does.
#[test]
fn old_bitmap_tables_are_given_back_as_qemu_img_does() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch_dir("bitmap_punch");
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        let s = p.to_str().unwrap();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s, "1G"]);
        qemu_img_ok(&["bitmap", "--add", s, "b0"]);
        qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 64M", s]);
    }
    for name in ["b1", "b2", "b3"] {
        let out = tool_in(
            Some(&dir),
            &["bitmap", "--add", ours.to_str().unwrap(), name],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        qemu_img_ok(&["bitmap", "--add", theirs.to_str().unwrap(), name]);
    }
    let blocks = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks();
    assert!(
        blocks(&ours) <= blocks(&theirs),
        "ours holds {} blocks, qemu-img's {}",
        blocks(&ours),
        blocks(&theirs)
    );
    assert_eq!(bitmaps(&ours), bitmaps(&theirs));
    assert_eq!(qemu_check(&ours).0, 0);
}
