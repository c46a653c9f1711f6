//! `check` against `qemu-img check`: JSON, human output, messages and exit codes.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{fixture, fixtures, qemu_check};

#[test]
fn check_json_and_exit_code_match_qemu_img_on_every_qcow2_fixture() {
    for f in fixtures().iter().filter(|f| f.is_qcow2()) {
        let (qemu_code, qemu_json) = qemu_check(&f.path);
        let ours = tool(&["check", "--output=json", "-f", "qcow2", path_str(&f.path)]);
        no_panic(&ours);
        assert_eq!(code(&ours), qemu_code, "{}: {}", f.name, stderr(&ours));
        assert_eq!(code(&ours), f.expected_check_exit(), "{}", f.name);
        let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).expect("JSON");
        assert_eq!(ours, qemu_json, "{}", f.name);
    }
}

#[test]
fn check_output_and_messages_are_byte_identical_to_qemu_img() {
    for f in fixtures().iter().filter(|f| f.is_qcow2()) {
        for output in ["--output=json", "--output=human"] {
            let args = ["check", output, "-f", "qcow2", path_str(&f.path)];
            let qemu = qemu_in(dir_of(&f.path), &args);
            let ours = tool(&args);
            assert_eq!(code(&ours), code(&qemu), "{} {output}", f.name);
            assert_eq!(stdout(&ours), stdout(&qemu), "{} {output}", f.name);
            assert_eq!(stderr(&ours), stderr(&qemu), "{} {output}", f.name);
        }
    }
}

#[test]
fn check_of_a_raw_file_exits_63_like_qemu_img() {
    let f = fixture("chain-base");
    let args = ["check", path_str(&f.path)];
    assert_eq!(code(&tool(&args)), 63);
    assert_eq!(code(&qemu_in(dir_of(&f.path), &args)), 63);
}

#[test]
fn check_of_a_missing_file_fails_with_exit_1() {
    let out = tool(&["check", "-f", "qcow2", "/nonexistent/x.qcow2"]);
    no_panic(&out);
    assert_eq!(code(&out), 1);
    let args = ["check", "-f", "qcow2", "/nonexistent/x.qcow2"];
    let qemu = qemu_in(Path::new("/"), &args);
    // The same message after the program's name.
    let message = |o: &std::process::Output| stderr(o).split_once(": ").map(|(_, m)| m.to_owned());
    assert_eq!(message(&out), message(&qemu));
}

/// A new 1 MiB image (made by us) with refcounts raised on cluster 3 (the L1 table) and on
/// cluster 9 (past the end, the file grown to cover it): two leaked clusters.
fn leaky_image(path: &std::path::Path) {
    let out = tool(&["create", "-q", "-f", "qcow2", path_str(path), "1M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0x20000 + 6..0x20000 + 8].copy_from_slice(&2u16.to_be_bytes());
    bytes[0x20000 + 18..0x20000 + 20].copy_from_slice(&1u16.to_be_bytes());
    bytes.resize(10 * 65536, 0);
    std::fs::write(path, &bytes).unwrap();
}

/// An image with 128 KiB of data whose L2 table's refcount is 0 (a corruption that needs the
/// refcount structures rebuilt) and whose first data cluster's refcount is 2 (a leak).
fn corrupt_image(path: &std::path::Path) {
    let out = tool(&["create", "-q", "-f", "qcow2", path_str(path), "1M"]);
    assert_eq!(code(&out), 0);
    let out = tool(&["io", "-c", "write -P 1 0 128k", path_str(path)]);
    assert_eq!(code(&out), 0);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0x20000 + 8..0x20000 + 10].copy_from_slice(&0u16.to_be_bytes());
    bytes[0x20000 + 12..0x20000 + 14].copy_from_slice(&2u16.to_be_bytes());
    std::fs::write(path, &bytes).unwrap();
}

/// Runs `check ARGS x.qcow2` with both tools on identical copies of `make`'s image (each in its
/// own directory, so the file names match). Returns (ours, qemu's, our image path).
fn repair_both(
    name: &str,
    make: fn(&std::path::Path),
    args: &[&str],
) -> (
    std::process::Output,
    std::process::Output,
    std::path::PathBuf,
) {
    let ours_dir = qcow2_testdata::scratch_dir(&format!("{name}_ours"));
    let theirs_dir = qcow2_testdata::scratch_dir(&format!("{name}_theirs"));
    make(&ours_dir.join("x.qcow2"));
    std::fs::copy(ours_dir.join("x.qcow2"), theirs_dir.join("x.qcow2")).unwrap();
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    full.push("x.qcow2");
    let ours = tool_in(Some(&ours_dir), &full);
    let qemu = qemu_in(&theirs_dir, &full);
    no_panic(&ours);
    let cmp = qemu_in(
        &ours_dir,
        &["compare", "x.qcow2", path_str(&theirs_dir.join("x.qcow2"))],
    );
    assert_eq!(code(&cmp), 0, "{args:?}: repaired images read differently");
    (ours, qemu, ours_dir.join("x.qcow2"))
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn repairing_leaks_matches_qemu_img_exactly() {
    for output in ["--output=json", "--output=human"] {
        let (ours, qemu, path) = repair_both("repair_leaks", leaky_image, &["-r", "leaks", output]);
        assert_eq!(code(&ours), code(&qemu), "{output}: {}", stderr(&ours));
        assert_eq!(code(&ours), 0);
        assert_eq!(stdout(&ours), stdout(&qemu), "{output}");
        assert_eq!(stderr(&ours), stderr(&qemu), "{output}");
        if output == "--output=json" {
            assert_eq!(json_of(&ours)["leaks-fixed"], 2);
        } else {
            assert!(stdout(&ours).starts_with(
                "The following inconsistencies were found and repaired:\n\n    2 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"
            ));
        }
        let (check, report) = qemu_check(&path);
        assert_eq!(check, 0, "{report}");
    }
}

#[test]
fn repairing_leaks_with_all_matches_qemu_img_but_for_the_image_end() {
    let (ours, qemu, path) = repair_both(
        "repair_all_leaks",
        leaky_image,
        &["-r", "all", "--output=json"],
    );
    assert_eq!(code(&ours), code(&qemu), "{}", stderr(&ours));
    let (mut a, mut b) = (json_of(&ours), json_of(&qemu));
    // The engine rebuilds the refcount structures at the end of the file; qemu-img, seeing
    // only leaks, fixes them in place.
    a.as_object_mut().unwrap().remove("image-end-offset");
    b.as_object_mut().unwrap().remove("image-end-offset");
    assert_eq!(a, b);
    assert_eq!(qemu_check(&path).0, 0);
}

#[test]
fn repairing_leaks_when_a_rebuild_is_needed_fails_like_qemu_img() {
    for output in ["--output=json", "--output=human"] {
        let (ours, qemu, _) = repair_both(
            "repair_needs_rebuild",
            corrupt_image,
            &["-r", "leaks", output],
        );
        assert_eq!(code(&ours), 1, "{}", stderr(&ours));
        assert_eq!(code(&qemu), 1);
        assert_eq!(stdout(&ours), stdout(&qemu));
        assert_eq!(
            stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            stderr(&qemu)
        );
    }
}

#[test]
fn repairing_corruptions_leaves_a_clean_image_like_qemu_img() {
    let (ours, qemu, path) = repair_both(
        "repair_all_corrupt",
        corrupt_image,
        &["-r", "all", "--output=json"],
    );
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    assert_eq!(code(&qemu), 0);
    let (a, b) = (json_of(&ours), json_of(&qemu));
    for key in [
        "leaks-fixed",
        "corruptions",
        "leaks",
        "check-errors",
        "total-clusters",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert!(a["corruptions-fixed"].as_u64().unwrap() > 0);
    assert_eq!(qemu_check(&path).0, 0);
}

#[test]
fn repairing_clean_images_prints_the_plain_check() {
    for name in ["c64k", "snap", "zlib", "ext-l2-64k", "v2", "chain-top"] {
        let dir = qcow2_testdata::scratch_dir(&format!("repair_clean_{name}"));
        let path = qcow2_testdata::copy_fixture(name, &dir);
        for output in ["--output=json", "--output=human"] {
            let file = path.file_name().unwrap().to_str().unwrap();
            let ours = tool_in(Some(&dir), &["check", "-r", "leaks", output, file]);
            let qemu = qemu_in(&dir, &["check", "-r", "leaks", output, file]);
            assert_eq!(code(&ours), code(&qemu), "{name}: {}", stderr(&ours));
            assert_eq!(stdout(&ours), stdout(&qemu), "{name} {output}");
            assert_eq!(stderr(&ours), stderr(&qemu), "{name} {output}");
        }
    }
}

#[test]
fn repair_of_a_consistent_image_marked_corrupt_clears_the_mark() {
    let dir = qcow2_testdata::scratch_dir("for_repair_bit");
    let path = dir.join("c.qcow2");
    assert_eq!(
        code(&tool(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&path),
            "1M"
        ])),
        0
    );
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[79] |= 0x02;
    std::fs::write(&path, &bytes).unwrap();
    let out = tool(&["io", "-c", "write 0 512", path_str(&path)]);
    no_panic(&out);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("marked corrupt"), "{}", stderr(&out));
    // A repair may open it, finds it consistent and clears the mark, as qemu-img does.
    let out = tool(&["check", "-r", "all", path_str(&path)]);
    no_panic(&out);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(std::fs::read(&path).unwrap()[79] & 0x02, 0);
}

/// A lazy-refcounts image whose writer was killed after one write, with the dirty bit set.
fn crashed_lazy_image(path: &std::path::Path) {
    crashed_writer_image(path, true, &[]);
    assert_eq!(std::fs::read(path).unwrap()[79] & 1, 1, "dirty bit set");
}

#[test]
fn a_crashed_lazy_refcounts_image_checks_and_repairs_like_qemu_img() {
    let dir = qcow2_testdata::scratch_dir("crashed_lazy_check");
    let path = dir.join("x.qcow2");
    crashed_lazy_image(&path);
    let args = ["check", "x.qcow2"];
    let (ours, qemu) = (tool_in(Some(&dir), &args), qemu_in(&dir, &args));
    assert_eq!(code(&ours), 2, "{}", stderr(&ours));
    assert_eq!(code(&ours), code(&qemu));
    assert_eq!(stdout(&ours), stdout(&qemu));
    assert_eq!(stderr(&ours), stderr(&qemu));
    assert!(stderr(&ours).starts_with("ERROR cluster 5 refcount=0 reference=1\n"));

    let (ours, qemu, path) = repair_both("crashed_lazy_repair", crashed_lazy_image, &["-r", "all"]);
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    assert_eq!(code(&ours), code(&qemu));
    assert_eq!(stdout(&ours), stdout(&qemu));
    assert_eq!(stderr(&ours), stderr(&qemu));
    assert!(stderr(&ours).contains("Rebuilding refcount structure\n"));
    assert_eq!(
        std::fs::read(&path).unwrap()[79] & 1,
        0,
        "dirty bit cleared"
    );
    assert_eq!(qemu_check(&path).0, 0);
}

#[test]
fn repairing_a_leak_and_a_copied_flag_reports_like_qemu_img() {
    // The L2 table (cluster 4) with refcount 2 (a leak) and without its COPIED flag: fixing
    // the leak leaves a COPIED flag to fix, which qemu-img reports after the refcounts.
    fn leaky_shared_l2(path: &std::path::Path) {
        let p = path_str(path);
        assert_eq!(code(&tool(&["create", "-q", "-f", "qcow2", p, "1M"])), 0);
        assert_eq!(code(&tool(&["io", "-c", "write 0 64k", p])), 0);
        let mut bytes = std::fs::read(path).unwrap();
        bytes[0x20000 + 8..0x20000 + 10].copy_from_slice(&2u16.to_be_bytes());
        bytes[0x30000] &= 0x7f;
        std::fs::write(path, &bytes).unwrap();
    }
    for mode in ["leaks", "all"] {
        let (ours, qemu, _) = repair_both(
            &format!("leak_copied_{mode}"),
            leaky_shared_l2,
            &["-r", mode],
        );
        assert_eq!(code(&ours), code(&qemu), "{mode}: {}", stderr(&ours));
        assert_eq!(stderr(&ours), stderr(&qemu), "{mode}");
        assert!(stderr(&ours).contains("OFLAG_COPIED L2 cluster"), "{mode}");
    }
}

#[test]
fn a_refcount_overflow_prints_qemu_img_s_hint() {
    // iotest 112: two L2 entries name one data cluster of a 1-bit refcount image.
    let dir = qcow2_testdata::scratch_dir("a_refcount_overflow_prints_qemu_img_s_hint");
    let path = dir.join("t.qcow2");
    let _ = std::fs::remove_file(&path);
    let args = ["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1"];
    assert_eq!(
        code(&qemu_in(&dir, &[&args[..], &["t.qcow2", "64M"]].concat())),
        0
    );
    let io = qcow2_testdata::qemu_io(&["-c", "write 0 64k", path_str(&path)]);
    assert_eq!(code(&io), 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0x40008..0x40010].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let qemu = qemu_in(&dir, &["check", "t.qcow2"]);
    let ours = tool_in(Some(&dir), &["check", "t.qcow2"]);
    no_panic(&ours);
    assert!(stderr(&qemu).contains("Use qemu-img amend to increase the refcount entry width"));
    assert_eq!(code(&ours), code(&qemu));
    assert_eq!(stdout(&ours), stdout(&qemu));
    assert_eq!(stderr(&ours), stderr(&qemu));
}

#[test]
fn check_r_all_zeroes_an_unaligned_entry_without_data_as_qemu_img_does() {
    // iotest 271: an extended L2 entry whose offset is unaligned but whose subclusters hold no
    // data (only a zero one) can become plain zeros; the cluster it named is then a leak.
    let dir = qcow2_testdata::scratch_dir("check_unaligned_prealloc");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0xffu8; 128 << 10]).unwrap();
    let orig = dir.join("orig.qcow2");
    qcow2_testdata::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-F",
        "raw",
        "-b",
        path_str(&base),
        path_str(&orig),
        "128k",
    ]);
    for cmd in ["write -q -P 1 4k 2k", "write -q -z 4k 2k"] {
        assert_eq!(
            code(&qcow2_testdata::qemu_io(&["-c", cmd, path_str(&orig)])),
            0
        );
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&orig).unwrap();
        f.write_all_at(&[0x02], 0x40000 + 6).unwrap();
    }
    let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
    for args in [&["check"][..], &["check", "-r", "all"][..]] {
        std::fs::copy(&orig, &ours).unwrap();
        std::fs::copy(&orig, &theirs).unwrap();
        let o = tool_in(Some(&dir), &[args, &["ours.qcow2"]].concat());
        let q = qemu_in(&dir, &[args, &["theirs.qcow2"]].concat());
        no_panic(&o);
        assert_eq!(code(&o), code(&q), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), stdout(&q), "{args:?}");
        assert_eq!(
            stderr(&o).replace("ours.qcow2", "theirs.qcow2"),
            stderr(&q),
            "{args:?}"
        );
    }
    let (check, report) = qcow2_testdata::qemu_check(&ours);
    assert_eq!(check, 0, "{report}");
    let cmp = qemu_in(&dir, &["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_eq!(code(&cmp), 0, "{}", stdout(&cmp));
}
