//! `compare` against `qemu-img compare`: exit codes and messages.

mod common;

use common::*;
use qcow2_testdata::{fixture, fixtures, qemu_convert_raw, qemu_img, scratch_dir};

/// Runs both tools on the same pair and checks they agree on exit code and stdout.
fn assert_same_verdict(a: &std::path::Path, b: &std::path::Path) -> i32 {
    let args = ["compare", path_str(a), path_str(b)];
    let qemu = qemu_in(dir_of(a), &args);
    let ours = tool(&args);
    no_panic(&ours);
    assert_eq!(code(&ours), code(&qemu), "{args:?}: {}", stderr(&ours));
    assert_eq!(stdout(&ours), stdout(&qemu), "{args:?}");
    code(&ours)
}

#[test]
fn every_fixture_is_identical_to_its_qemu_raw_conversion() {
    let dir = scratch_dir("compare_with_raw");
    for f in fixtures().iter().filter(|f| f.convertible()) {
        let raw = dir.join(format!("{}.raw", f.name));
        std::fs::write(&raw, qemu_convert_raw(&f.path, None)).unwrap();
        let out = tool(&["compare", path_str(&f.path), path_str(&raw)]);
        assert_eq!(
            code(&out),
            0,
            "{}: {}{}",
            f.name,
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(stdout(&out), "Images are identical.\n");
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn different_images_exit_1_at_qemu_img_offset() {
    let pairs = [
        ("c64k", "c4k"),
        ("chain-base", "chain-mid"),
        ("chain-mid", "chain-top"),
        ("zlib", "zstd"),
        ("rc1", "rc2"),
        ("snap", "c64k"),
    ];
    for (a, b) in pairs {
        let (a, b) = (&fixture(a).path, &fixture(b).path);
        let verdict = assert_same_verdict(a, b);
        assert!(verdict == 0 || verdict == 1);
    }
    assert_eq!(
        assert_same_verdict(&fixture("c64k").path, &fixture("c4k").path),
        1
    );
}

#[test]
fn identical_images_of_different_formats_exit_0() {
    assert_eq!(
        assert_same_verdict(&fixture("c64k").path, &fixture("c64k").path),
        0
    );
    assert_eq!(
        assert_same_verdict(&fixture("rc16").path, &fixture("rc16").path),
        0
    );
}

#[test]
fn a_longer_image_must_be_zero_past_the_shorter_one() {
    let dir = scratch_dir("compare_sizes");
    let f = fixture("c64k");
    let bytes = qemu_convert_raw(&f.path, None);
    let longer = dir.join("longer.raw");
    let mut padded = bytes.clone();
    padded.resize(bytes.len() + (1 << 20), 0);
    std::fs::write(&longer, &padded).unwrap();
    assert_eq!(assert_same_verdict(&f.path, &longer), 0);
    padded[bytes.len() + 4096] = 1;
    std::fs::write(&longer, &padded).unwrap();
    assert_eq!(assert_same_verdict(&f.path, &longer), 1);
    let strict = tool(&["compare", "-s", path_str(&f.path), path_str(&longer)]);
    assert_eq!(code(&strict), 1);
}

#[test]
fn a_flipped_byte_is_found() {
    let dir = scratch_dir("compare_flip");
    let f = fixture("chain-top");
    let mut bytes = qemu_convert_raw(&f.path, None);
    bytes[3 * 1024 * 1024 + 777] ^= 0x40;
    let raw = dir.join("flipped.raw");
    std::fs::write(&raw, &bytes).unwrap();
    assert_eq!(assert_same_verdict(&f.path, &raw), 1);
}

#[test]
fn errors_exit_2() {
    let f = fixture("c64k");
    for args in [
        vec!["compare", path_str(&f.path), "/nonexistent/x"],
        vec!["compare", path_str(&f.path)],
        vec!["compare", "--bogus", path_str(&f.path), path_str(&f.path)],
    ] {
        let out = tool(&args);
        no_panic(&out);
        assert_eq!(code(&out), 2, "{args:?}");
    }
}

/// Progress lines go to stdout, as qemu-img prints them, interleaved with the verdict as
/// qemu-img interleaves them; over a fully allocated image, byte for byte the same output.
#[test]
fn progress_lines_are_qemu_img_s() {
    let f = fixture("c64k");
    let out = tool(&["compare", "-p", path_str(&f.path), path_str(&f.path)]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).ends_with("    (100.00/100%)\rImages are identical.\n\n"));
    assert_eq!(stderr(&out), "");

    let dir = scratch_dir("compare_progress");
    let img = dir.join("full.qcow2");
    qcow2_testdata::qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "16M"]);
    qcow2_testdata::qemu_io(&["-c", "write -P 7 0 16M", path_str(&img)]);
    let args = ["compare", "-p", path_str(&img), path_str(&img)];
    assert_eq!(stdout(&tool(&args)), stdout(&qemu_img(&args)));
}

#[test]
fn quiet_compare_prints_nothing_and_answers_with_its_exit_code_as_qemu_img() {
    let dir = scratch_dir("quiet_compare");
    for (name, pattern) in [("a.qcow2", "1"), ("b.qcow2", "1"), ("c.qcow2", "2")] {
        let path = dir.join(name);
        assert_eq!(
            code(&qemu_in(&dir, &["create", "-q", "-f", "qcow2", name, "1M"])),
            0
        );
        qcow2_testdata::qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} 64k 4k"),
            path.to_str().unwrap(),
        ]);
    }
    for (a, b) in [("a.qcow2", "b.qcow2"), ("a.qcow2", "c.qcow2")] {
        let ours = tool_in(Some(&dir), &["compare", "-q", a, b]);
        let theirs = qemu_in(&dir, &["compare", "-q", a, b]);
        assert_eq!(code(&ours), code(&theirs), "{a} {b}");
        assert_eq!(stdout(&ours), stdout(&theirs), "{a} {b}");
        assert_eq!(stdout(&ours), "", "{a} {b}");
    }
    assert_eq!(
        code(&tool_in(
            Some(&dir),
            &["compare", "-q", "a.qcow2", "c.qcow2"]
        )),
        1
    );
}
