//! Images with persistent bitmaps through `convert --bitmaps`, `resize`, `snapshot -a` and
//! `check`, against qemu-img doing the same to a copy: the same exit codes and messages, the same
//! `qemu-img info` bitmap lists, the same dirty ranges over NBD, and `qemu-img check` clean.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bitmaps, qemu_in, stderr, tool_in};
use qcow2_testdata::{
    qemu_check, qemu_dirty_map as dirty, qemu_img_ok, qemu_info, qemu_io, scratch_dir,
};

/// A 10 MiB image with an enabled, a disabled and a 512-byte-granularity bitmap, each with
/// dirty granules (the disabled one from before it was disabled).
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    let s = src.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s, "10M"]);
    qemu_img_ok(&["bitmap", "--add", s, "en"]);
    qemu_img_ok(&["bitmap", "--add", s, "dis"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "512", s, "small"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 100k 3k", s]);
    qemu_img_ok(&["bitmap", "--disable", s, "dis"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 8 9M 1M",
        "-c",
        "write 0 512",
        s,
    ]);
    src
}

/// Leaves every bitmap of `path` in use, as a crashed QEMU does.
fn crash_qemu_io(path: &Path) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", "-c", "abort"])
        .arg(path)
        .current_dir(path.parent().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Runs `args` with qemu-img and with ours in `dir` (file names relative to it), and asserts
/// the same exit code and the same messages.
fn same_outcome(dir: &Path, args: &[&str]) -> i32 {
    let qemu = qemu_in(dir, args);
    let ours = tool_in(Some(dir), args);
    assert_eq!(ours.status.code(), qemu.status.code(), "{args:?}");
    assert_eq!(
        stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
        String::from_utf8_lossy(&qemu.stderr),
        "{args:?}"
    );
    qemu.status.code().unwrap_or(-1)
}

#[test]
fn convert_bitmaps_copies_state_granularity_and_bits_as_qemu_img() {
    let dir = scratch_dir("convert_bitmaps");
    let src = source(&dir);
    for extra in [&[][..], &["-c"][..]] {
        let mut args = vec!["convert", "--bitmaps", "-O", "qcow2"];
        args.extend_from_slice(extra);
        let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
        let mut o = args.clone();
        o.extend([src.to_str().unwrap(), ours.to_str().unwrap()]);
        let mut t = args.clone();
        t.extend([src.to_str().unwrap(), theirs.to_str().unwrap()]);
        let out = tool_in(None, &o);
        assert!(out.status.success(), "{}", stderr(&out));
        qemu_img_ok(&t);
        assert_eq!(bitmaps(&ours), bitmaps(&theirs), "{extra:?}");
        assert_eq!(bitmaps(&ours), bitmaps(&src));
        for name in ["en", "dis", "small"] {
            let d = dirty(&ours, name);
            assert_eq!(d, dirty(&theirs, name), "bitmap {name} {extra:?}");
            assert_eq!(d, dirty(&src, name), "bitmap {name} {extra:?}");
        }
        assert_eq!(qemu_check(&ours).0, 0);
        qemu_img_ok(&[
            "compare",
            "-q",
            src.to_str().unwrap(),
            ours.to_str().unwrap(),
        ]);
    }
}

#[test]
fn convert_bitmaps_refuses_and_skips_as_qemu_img() {
    let dir = scratch_dir("convert_bitmaps_refusals");
    source(&dir);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "raw",
        dir.join("raw.img").to_str().unwrap(),
        "1M",
    ]);
    let cases: &[&[&str]] = &[
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "a.qcow2",
        ],
        &["convert", "--bitmaps", "-O", "raw", "src.qcow2", "a.img"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "src.qcow2",
            "a.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "raw.img",
            "a.qcow2",
        ],
    ];
    for args in cases {
        assert_eq!(same_outcome(&dir, args), 1, "{args:?}");
    }
    // In-use bitmaps: refused before the output exists, or skipped with a warning each.
    crash_qemu_io(&dir.join("src.qcow2"));
    let refused = [
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        "src.qcow2",
        "none.qcow2",
    ];
    assert_eq!(same_outcome(&dir, &refused), 1);
    assert!(!dir.join("none.qcow2").exists());
    qemu_img_ok(&[
        "bitmap",
        "--add",
        dir.join("src.qcow2").to_str().unwrap(),
        "fresh",
    ]);
    let skip = [
        "convert",
        "--bitmaps",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        "src.qcow2",
    ];
    let qemu = qemu_in(&dir, &[&skip[..], &["theirs.qcow2"]].concat());
    let ours = tool_in(Some(&dir), &[&skip[..], &["ours.qcow2"]].concat());
    assert!(
        qemu.status.success() && ours.status.success(),
        "{}",
        stderr(&ours)
    );
    assert_eq!(
        stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
        String::from_utf8_lossy(&qemu.stderr)
    );
    let ours = dir.join("ours.qcow2");
    assert_eq!(bitmaps(&ours), bitmaps(&dir.join("theirs.qcow2")));
    assert_eq!(bitmaps(&ours).as_array().map(Vec::len), Some(1));
    assert_eq!(qemu_check(&ours).0, 0);
}

#[test]
fn resize_keeps_bitmaps_as_qemu_img() {
    let dir = scratch_dir("resize_bitmaps");
    let src = source(&dir);
    // Growing and shrinking, within one table cluster and across (512-byte granules: 1 GiB
    // needs four table entries), not on a granule boundary.
    for size in ["20M", "+1G", "5M", "3000k", "9437696"] {
        let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
        std::fs::copy(&src, &ours).unwrap();
        std::fs::copy(&src, &theirs).unwrap();
        let args = |p: &Path| {
            vec![
                "resize".to_string(),
                "--shrink".into(),
                p.to_str().unwrap().into(),
                size.into(),
            ]
        };
        let a = args(&ours);
        let out = tool_in(None, &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{size}: {}", stderr(&out));
        let a = args(&theirs);
        qemu_img_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            qemu_info(&ours)["virtual-size"],
            qemu_info(&theirs)["virtual-size"]
        );
        assert_eq!(bitmaps(&ours), bitmaps(&theirs), "{size}");
        for name in ["en", "dis", "small"] {
            assert_eq!(
                dirty(&ours, name),
                dirty(&theirs, name),
                "{size}: bitmap {name}"
            );
        }
        assert_eq!(qemu_check(&ours).0, 0, "{size}");
        // Tracking goes on at the new size, in QEMU too.
        qemu_io(&["-f", "qcow2", "-c", "write 4M 4k", ours.to_str().unwrap()]);
        qemu_io(&["-f", "qcow2", "-c", "write 4M 4k", theirs.to_str().unwrap()]);
        assert_eq!(dirty(&ours, "small"), dirty(&theirs, "small"), "{size}");
    }
}

#[test]
fn resize_and_revert_refuse_as_qemu_img() {
    let dir = scratch_dir("resize_bitmaps_refusals");
    let src = source(&dir);
    let s = src.to_str().unwrap();
    // A snapshot of another size: QEMU refuses to revert while the image has bitmaps.
    qemu_img_ok(&["snapshot", "-c", "small", s]);
    qemu_img_ok(&["resize", "-q", s, "12M"]);
    let pristine = std::fs::read(&src).unwrap();
    assert_eq!(
        same_outcome(&dir, &["snapshot", "-a", "small", "src.qcow2"]),
        1
    );
    std::fs::write(&src, &pristine).unwrap();
    let before = bitmaps(&src);
    let out = tool_in(Some(&dir), &["snapshot", "-a", "small", "src.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(bitmaps(&src), before);
    assert_eq!(qemu_info(&src)["virtual-size"], 12 << 20);
    // An inconsistent bitmap refuses a resize, growing or shrinking.
    crash_qemu_io(&src);
    let crashed = std::fs::read(&src).unwrap();
    for args in [
        &["resize", "src.qcow2", "20M"][..],
        &["resize", "--shrink", "src.qcow2", "5M"][..],
    ] {
        assert_eq!(same_outcome(&dir, args), 1, "{args:?}");
        std::fs::write(&src, &crashed).unwrap();
        let out = tool_in(Some(&dir), args);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(qemu_info(&src)["virtual-size"], 12 << 20);
    }
}

/// The offset of the bitmaps extension's payload in the header of `path`.
fn bitmaps_extension(path: &Path) -> usize {
    let header = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap()) as usize;
    let mut at = be32(100);
    loop {
        let (kind, len) = (be32(at), be32(at + 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Overwrites bytes of `path` at `at`.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The table offset of the first bitmap of `path`.
fn first_table(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let ext = bitmaps_extension(path);
    let dir = u64::from_be_bytes(bytes[ext + 16..ext + 24].try_into().unwrap()) as usize;
    u64::from_be_bytes(bytes[dir..dir + 8].try_into().unwrap())
}

/// `check` with each repair mode, ours and qemu-img's on copies of `image`: the same exit code,
/// report and messages, and the same bitmaps afterwards.
fn same_checks(dir: &Path, image: &Path, modes: &[&[&str]]) {
    for mode in modes {
        let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
        std::fs::copy(image, &ours).unwrap();
        std::fs::copy(image, &theirs).unwrap();
        let args = |file: &'static str| [&["check"], *mode, &[file]].concat();
        let qemu = qemu_in(dir, &args("theirs.qcow2"));
        let out = tool_in(Some(dir), &args("ours.qcow2"));
        assert_eq!(out.status.code(), qemu.status.code(), "{mode:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).replace("ours.qcow2", "theirs.qcow2"),
            String::from_utf8_lossy(&qemu.stdout),
            "{mode:?}"
        );
        if qemu.status.code() != Some(1) {
            assert_eq!(bitmaps(&ours), bitmaps(&theirs), "{mode:?}");
            assert_eq!(qemu_check(&ours).0, qemu_check(&theirs).0, "{mode:?}");
        }
    }
}

const CHECK_MODES: &[&[&str]] = &[&[], &["--output=json"], &["-r", "leaks"], &["-r", "all"]];

#[test]
fn check_counts_bitmaps_in_use_or_not_as_qemu_img() {
    let dir = scratch_dir("check_bitmaps");
    let src = source(&dir);
    same_checks(&dir, &src, CHECK_MODES);
    crash_qemu_io(&src);
    same_checks(&dir, &src, CHECK_MODES);
    // A table entry with reserved bits: QEMU's check fails, in use or not (not: already at open).
    let table = first_table(&src);
    patch(&src, table + 6, &[1]);
    same_checks(&dir, &src, CHECK_MODES);
    let src = source(&dir);
    patch(&src, first_table(&src) + 6, &[1]);
    same_checks(&dir, &src, CHECK_MODES);
    let info = tool_in(Some(&dir), &["info", "src.qcow2"]);
    assert_eq!(info.status.code(), Some(1));
    assert_eq!(qemu_in(&dir, &["info", "src.qcow2"]).status.code(), Some(1));
}

#[test]
fn check_counts_stale_bitmaps_as_leaks_as_qemu_img() {
    let dir = scratch_dir("check_stale_bitmaps");
    let src = source(&dir);
    // A program without bitmap support cleared the autoclear bit: the bitmaps are stale.
    let header = std::fs::read(&src).unwrap();
    patch(&src, 95, &[header[95] & !1]);
    same_checks(&dir, &src, &[&[], &["--output=json"], &["-r", "leaks"]]);
}

#[test]
fn adding_a_bitmap_moves_the_others_to_fresh_clusters_as_qemu_img_does() {
    // QEMU writes every bitmap anew when it stores them, so after a second `bitmap --add` the
    // first one's table (and data) sit in new clusters: the same layout means the same file
    // (iotest 190 measures the file as raw).
    let dir = scratch_dir("bitmap_add_layout");
    let mut files = Vec::new();
    for side in ["ours", "theirs"] {
        let img = dir.join(format!("{side}.qcow2"));
        let name = img.file_name().unwrap().to_str().unwrap().to_string();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
        let run = |args: &[&str]| {
            let out = if side == "ours" {
                tool_in(Some(&dir), args)
            } else {
                qemu_in(&dir, args)
            };
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        };
        qemu_io(&["-c", "write 0 1M", img.to_str().unwrap()]);
        run(&["bitmap", "--add", "-g", "512", &name, "b1"]);
        qemu_io(&["-c", "write 8M 1M", img.to_str().unwrap()]);
        run(&["bitmap", "--add", &name, "b2"]);
        files.push(img);
    }
    let (ours, theirs) = (&files[0], &files[1]);
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(ours), len(theirs));
    assert_eq!(first_table(ours), first_table(theirs));
    assert_eq!(bitmaps(ours), bitmaps(theirs));
    assert_eq!(dirty(ours, "b1"), dirty(theirs, "b1"));
    let (check, report) = qemu_check(ours);
    assert_eq!(check, 0, "{report}");
}
