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
fn create_apply_and_delete_work_like_qemu_img() {
    let dir = qcow2_testdata::scratch_dir("cli-snapshot-cad");
    let ours = qcow2_testdata::copy_fixture("c64k", &dir.join("ours"));
    let theirs = qcow2_testdata::copy_fixture("c64k", &dir.join("theirs"));
    let (o, t) = (path_str(&ours), path_str(&theirs));
    for args in [
        ["-c", "one"],
        ["-c", "two"],
        ["-a", "one"],
        ["-d", "two"],
        ["-d", "1"],
    ] {
        let a = tool(&["snapshot", args[0], args[1], o]);
        let b = qemu_in(dir.as_path(), &["snapshot", args[0], args[1], t]);
        no_panic(&a);
        assert_eq!(code(&a), code(&b), "{args:?}: {}", stderr(&a));
    }
    // Same snapshot ids and names, same guest content, both clean.
    let list = |p: &str| {
        let out = qemu_in(dir.as_path(), &["info", "--output=json", p]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        v["snapshots"].to_string()
    };
    let strip_dates = |s: String| {
        let v: serde_json::Value = serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| (e["id"].clone(), e["name"].clone()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(strip_dates(list(o)), strip_dates(list(t)));
    let cmp = qemu_in(dir.as_path(), &["compare", o, t]);
    assert_eq!(code(&cmp), 0, "{}", stdout(&cmp));
    for p in [o, t] {
        assert_eq!(code(&qemu_in(dir.as_path(), &["check", p])), 0);
    }
    let missing = tool(&["snapshot", "-d", "nope", o]);
    assert_eq!(code(&missing), 1);
}
