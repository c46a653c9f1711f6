//! `snapshot -l` against `qemu-img snapshot -l`, byte for byte.

mod common;

use common::*;
use qcow2_testdata::{fixture, fixtures};

#[test]
fn snapshot_list_is_byte_identical_to_qemu_img_on_every_fixture() {
    for f in fixtures() {
        let args = ["snapshot", "-l", path_str(&f.path)];
        let qemu = qemu_in(dir_of(&f.path), &args);
        let ours = tool(&args);
        no_panic(&ours);
        assert_eq!(code(&ours), code(&qemu), "{}: {}", f.name, stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&qemu), "{}", f.name);
    }
}

#[test]
fn snapshot_list_uses_the_local_time_zone_like_qemu_img() {
    let f = fixture("snap");
    for tz in ["UTC", "Asia/Tokyo", "America/New_York"] {
        let qemu = std::process::Command::new("qemu-img")
            .args(["snapshot", "-l", path_str(&f.path)])
            .env("TZ", tz)
            .output()
            .unwrap();
        let ours = std::process::Command::new(env!("CARGO_BIN_EXE_qcow2-tool"))
            .args(["snapshot", "-l", path_str(&f.path)])
            .env("TZ", tz)
            .output()
            .unwrap();
        assert_eq!(stdout(&ours), stdout(&qemu), "TZ={tz}");
    }
}

#[test]
fn create_apply_and_delete_are_refused_for_now() {
    let f = fixture("snap");
    for flag in ["-c", "-a", "-d"] {
        let out = tool(&["snapshot", flag, "x", path_str(&f.path)]);
        no_panic(&out);
        assert_eq!(code(&out), 1, "{flag}");
        assert!(stderr(&out).contains("not implemented"), "{}", stderr(&out));
    }
}
