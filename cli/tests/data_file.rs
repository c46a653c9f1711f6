//! `create -o data_file=...` (with `data_file_raw`, and preallocation) and `convert -o
//! data_file=...` against qemu-img: the same `Formatting` line and refusals, qcow2 and data
//! files of the same length and blocks, the same map and format-specific info, and a clean
//! check.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use qcow2_testdata::{qemu_check, qemu_info, qemu_io, scratch_dir};

fn size_and_blocks(path: &Path) -> (u64, u64) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.blocks())
}

/// Runs `args` (with `IMG` and `DATA` for the side's file names) through both tools; asserts
/// the same outcome, and for a success the same files.
fn compare(dir: &Path, args: &[&str]) {
    let side = |who: &str| -> Vec<String> {
        args.iter()
            .map(|a| {
                a.replace("IMG", &format!("{who}.qcow2"))
                    .replace("DATA", &format!("{who}-data.raw"))
            })
            .collect()
    };
    let (oa, ta) = (side("ours"), side("theirs"));
    let o = tool_in(
        Some(dir),
        &oa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let t = qemu_in(dir, &ta.iter().map(String::as_str).collect::<Vec<_>>());
    let case = format!("{args:?}");
    no_panic(&o);
    assert_eq!(code(&o), code(&t), "{case}: {}", stderr(&o));
    let same = |s: String| {
        s.replace("ours", "theirs")
            .replace("qcow2-tool:", "qemu-img:")
    };
    assert_eq!(same(stdout(&o)), stdout(&t), "{case}");
    assert_eq!(same(stderr(&o)), stderr(&t), "{case}");
    if code(&t) != 0 {
        return;
    }
    for (a, b) in [
        ("ours.qcow2", "theirs.qcow2"),
        ("ours-data.raw", "theirs-data.raw"),
    ] {
        let ((al, ab), (bl, bb)) = (size_and_blocks(&dir.join(a)), size_and_blocks(&dir.join(b)));
        assert_eq!(al, bl, "{case}: {a} length");
        // One file system block of slack: ext4's extent-tree block (see preallocation.rs).
        assert!(
            ab.abs_diff(bb) <= 8,
            "{case}: {a} blocks {ab}, qemu-img's {bb}"
        );
    }
    let map = |n: &str| stdout(&qemu_in(dir, &["map", "--output=json", n]));
    assert_eq!(map("ours.qcow2"), map("theirs.qcow2"), "{case}: map");
    let spec = |n: &str| {
        let mut v = qemu_info(&dir.join(n))["format-specific"]["data"].clone();
        v["data-file"] = serde_json::Value::Null;
        v
    };
    assert_eq!(
        spec("ours.qcow2"),
        spec("theirs.qcow2"),
        "{case}: format-specific"
    );
    let (check, report) = qemu_check(&dir.join("ours.qcow2"));
    assert_eq!(check, 0, "{case}: {report}");
    let cmp = qemu_in(dir, &["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
}

#[test]
fn data_files_are_made_as_qemu_img_makes_them() {
    let dir = scratch_dir("data_files_are_made_as_qemu_img_makes_them");
    for opts in [
        "data_file=DATA",
        "data_file=DATA,data_file_raw=on",
        "data_file=DATA,preallocation=metadata",
        "data_file=DATA,preallocation=falloc",
        "data_file=DATA,data_file_raw=on,preallocation=full",
        "data_file_raw=on",
        "data_file=DATA,compat=0.10",
    ] {
        compare(&dir, &["create", "-f", "qcow2", "-o", opts, "IMG", "3M"]);
    }
    let src = dir.join("src.qcow2");
    let made = qemu_in(&dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    assert_eq!(code(&made), 0);
    let fill = qemu_io(&[
        "-c",
        "write -P 1 0 100k",
        "-c",
        "write -P 2 3M 64k",
        path_str(&src),
    ]);
    assert_eq!(code(&fill), 0);
    for opts in ["data_file=DATA", "data_file=DATA,data_file_raw=on"] {
        compare(
            &dir,
            &["convert", "-O", "qcow2", "-o", opts, "src.qcow2", "IMG"],
        );
        let raw = std::fs::read(dir.join("ours-data.raw")).unwrap();
        let theirs = std::fs::read(dir.join("theirs-data.raw")).unwrap();
        assert!(raw == theirs, "{opts}: data files differ");
    }
}
