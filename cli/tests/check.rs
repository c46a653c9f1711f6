//! `check` against `qemu-img check`: JSON, human output, messages and exit codes.

mod common;

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
fn repair_is_refused_until_the_write_engine_exists() {
    let f = fixture("c64k");
    for mode in ["leaks", "all"] {
        let out = tool(&["check", "-r", mode, path_str(&f.path)]);
        no_panic(&out);
        assert_eq!(code(&out), 1);
        assert!(stderr(&out).contains("not implemented"), "{}", stderr(&out));
    }
}

#[test]
fn check_of_a_missing_file_fails_with_exit_1() {
    let out = tool(&["check", "-f", "qcow2", "/nonexistent/x.qcow2"]);
    no_panic(&out);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("Check failed"));
}
