//! `convert -O raw` against `qemu-img convert -O raw`, byte for byte, for the active layer and
//! every snapshot.

mod common;

use common::*;
use qcow2_testdata::{fixture, fixtures, qemu_convert_raw, scratch_dir};

#[test]
fn convert_to_raw_matches_qemu_img_on_every_fixture() {
    let dir = scratch_dir("convert_every_fixture");
    for f in fixtures().iter().filter(|f| f.convertible()) {
        let dst = dir.join(format!("{}.out", f.name));
        let out = tool(&[
            "convert",
            "-f",
            fmt(f),
            "-O",
            "raw",
            path_str(&f.path),
            path_str(&dst),
        ]);
        no_panic(&out);
        assert_eq!(code(&out), 0, "{}: {}", f.name, stderr(&out));
        let ours = std::fs::read(&dst).unwrap();
        assert!(
            ours == qemu_convert_raw(&f.path, None),
            "{}: guest bytes differ",
            f.name
        );
        std::fs::remove_file(&dst).unwrap();
    }
}

#[test]
fn convert_of_each_snapshot_matches_qemu_img() {
    let dir = scratch_dir("convert_snapshots");
    for f in fixtures().iter().filter(|f| !f.snapshots.is_empty()) {
        for snap in &f.snapshots {
            let expected = qemu_convert_raw(&f.path, Some(snap));
            let param = format!("snapshot.name={snap}");
            for how in [["-s", snap.as_str()], ["-l", param.as_str()]] {
                let dst = dir.join(format!("{}-{snap}.out", f.name));
                let out = tool(&[
                    "convert",
                    how[0],
                    how[1],
                    "-O",
                    "raw",
                    path_str(&f.path),
                    path_str(&dst),
                ]);
                assert_eq!(code(&out), 0, "{} {snap}: {}", f.name, stderr(&out));
                let ours = std::fs::read(&dst).unwrap();
                assert!(
                    ours == expected,
                    "{} snapshot {snap}: guest bytes differ",
                    f.name
                );
            }
        }
    }
}

#[test]
fn convert_with_progress_prints_qemu_style_percentages() {
    let dir = scratch_dir("convert_progress");
    let f = fixture("c64k");
    let dst = dir.join("out.raw");
    let out = tool(&[
        "convert",
        "-p",
        "-O",
        "raw",
        path_str(&f.path),
        path_str(&dst),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("    (100.00/100%)\r"),
        "{:?}",
        stdout(&out)
    );
}

#[test]
fn convert_keeps_zero_ranges_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch_dir("convert_sparse");
    // c2m: 64 MiB with a few sparse writes.
    let c2m = fixture("c2m");
    let dst = dir.join("out.raw");
    let out = tool(&["convert", "-O", "raw", path_str(&c2m.path), path_str(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let meta = std::fs::metadata(&dst).unwrap();
    assert_eq!(meta.len(), c2m.virtual_size());
    assert!(meta.blocks() * 512 < meta.len() / 2, "output is not sparse");
}

#[test]
fn other_output_formats_and_missing_snapshots_are_refused() {
    let dir = scratch_dir("convert_refusals");
    let f = fixture("snap");
    let dst = dir.join("out");
    for args in [
        vec!["convert", "-O", "vmdk", path_str(&f.path), path_str(&dst)],
        vec![
            "convert",
            "-c",
            "-O",
            "raw",
            path_str(&f.path),
            path_str(&dst),
        ],
        vec![
            "convert",
            "-O",
            "raw",
            "-s",
            "nope",
            path_str(&f.path),
            path_str(&dst),
        ],
        vec!["convert", "-O", "raw", "/nonexistent/x", path_str(&dst)],
    ] {
        let out = tool(&args);
        no_panic(&out);
        assert_eq!(code(&out), 1, "{args:?}: {}", stderr(&out));
    }
}
