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

/// The snapshot table of `path`: (entry count, bytes of the first entry).
fn first_snapshot_entry(path: &std::path::Path) -> (u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let count = be32(60);
    let at = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    let extra = be32(at + 36) as usize;
    let id = u16::from_be_bytes(bytes[at + 12..at + 14].try_into().unwrap()) as usize;
    let name = u16::from_be_bytes(bytes[at + 14..at + 16].try_into().unwrap()) as usize;
    (count, bytes[at..at + 40 + extra + id + name].to_vec())
}

/// A compat=0.10 image whose one snapshot entry has no extra data (QEMU writes 24 bytes, so
/// they are cut out by hand, as iotest 261 does).
fn v2_image_with_a_bare_snapshot(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("orig.qcow2");
    let p = path_str(&img);
    qcow2_testdata::qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1M"]);
    qcow2_testdata::qemu_img_ok(&["snapshot", "-c", "sn0", p]);
    let mut bytes = std::fs::read(&img).unwrap();
    let at = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    assert_eq!(bytes[at + 36..at + 40], 24u32.to_be_bytes());
    bytes[at + 36..at + 40].copy_from_slice(&0u32.to_be_bytes());
    // The id and name move up over the extra data; zeros fill in after them.
    let names = (1 + 3) as usize;
    bytes.drain(at + 40..at + 64);
    bytes.splice(at + 40 + names..at + 40 + names, [0u8; 24]);
    std::fs::write(&img, &bytes).unwrap();
    img
}

#[test]
fn incomplete_snapshot_entries_are_completed_as_qemu_img_does() {
    // v3 wants 16 bytes of extra data per entry: `amend -o compat=1.1` completes a v2 table,
    // and `check -r all` repairs a v3 one (iotest 261), both to QEMU's 24 bytes.
    let dir = qcow2_testdata::scratch_dir("snapshot_complete");
    let orig = v2_image_with_a_bare_snapshot(&dir);
    let patched = dir.join("v3.qcow2");
    std::fs::copy(&orig, &patched).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&patched)
            .unwrap();
        f.write_all_at(&3u32.to_be_bytes(), 4).unwrap();
        f.write_all_at(&4u32.to_be_bytes(), 96).unwrap();
        f.write_all_at(&104u32.to_be_bytes(), 100).unwrap();
    }
    for (source, args) in [
        (&orig, &["amend", "-o", "compat=1.1"][..]),
        (&patched, &["check", "-r", "all"][..]),
    ] {
        let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
        std::fs::copy(source, &ours).unwrap();
        std::fs::copy(source, &theirs).unwrap();
        let run = |file: &'static str| [args, &[file]].concat();
        let o = tool_in(Some(&dir), &run("ours.qcow2"));
        let q = qemu_in(&dir, &run("theirs.qcow2"));
        no_panic(&o);
        assert_eq!(code(&o), code(&q), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), stdout(&q), "{args:?}");
        assert_eq!(stderr(&o), stderr(&q), "{args:?}");
        let (count, entry) = first_snapshot_entry(&ours);
        assert_eq!((count, entry.len()), (1, 40 + 24 + 1 + 3), "{args:?}");
        assert_eq!(first_snapshot_entry(&ours), first_snapshot_entry(&theirs));
        let (check, report) = qcow2_testdata::qemu_check(&ours);
        assert_eq!(check, 0, "{args:?}: {report}");
    }
}

/// A 64 MiB image in `dir` with 64 KiB of data and a snapshot `foo` of it (what 217 makes).
fn with_one_snapshot(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("t.qcow2");
    let img_s = path_str(&img);
    qcow2_testdata::qemu_img_ok(&["create", "-q", "-f", "qcow2", img_s, "64M"]);
    let write = qcow2_testdata::qemu_io(&["-c", "write 0 64k", img_s]);
    assert_eq!(code(&write), 0);
    qcow2_testdata::qemu_img_ok(&["snapshot", "-c", "foo", img_s]);
    img
}

/// qemu-iotest 217: a delete whose refcount decreases fail (blkdebug `cluster_free`) still
/// removes the snapshot and leaves only leaks: the entries that become unshared take COPIED only
/// once the decreases are durable, so `qemu-img check` finds no COPIED error (exit 3, not 2).
#[test]
fn a_delete_that_fails_to_free_clusters_leaves_only_leaks() {
    let dir = qcow2_testdata::scratch_dir("snapshot_delete_cluster_free");
    let img = with_one_snapshot(&dir);
    let img_s = path_str(&img);
    let conf = dir.join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let name = format!("blkdebug:{}:{img_s}", path_str(&conf));
    let out = tool(&["snapshot", "-d", "foo", &name]);
    no_panic(&out);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Input/output error"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&tool(&["snapshot", "-l", img_s])), "");
    let (status, report) = qcow2_testdata::qemu_check(&img);
    assert_eq!(status, 3, "{report}");
    assert_eq!(report["corruptions"], serde_json::json!(null), "{report}");
    assert!(report["leaks"].as_u64().unwrap() > 0, "{report}");
    // Fixing the leaks sets the flags; after that both tools find the image clean.
    let out = tool(&["check", "-r", "leaks", img_s]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(qcow2_testdata::qemu_check(&img).0, 0);
    let out = qemu_in(&dir, &["check", img_s]);
    assert!(
        stdout(&out).contains("No errors were found"),
        "{}",
        stdout(&out)
    );
}

/// The same delete on a healthy disk sets COPIED on the entries it unshares before it returns.
#[test]
fn a_delete_sets_copied_on_what_it_unshares() {
    let dir = qcow2_testdata::scratch_dir("snapshot_delete_copied");
    let img = with_one_snapshot(&dir);
    let img_s = path_str(&img);
    let out = tool(&["snapshot", "-d", "foo", img_s]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (status, report) = qcow2_testdata::qemu_check(&img);
    assert_eq!(status, 0, "{report}");
    let map = qcow2_testdata::qemu_map(&img);
    assert_eq!(map[0]["data"], serde_json::json!(true), "{map}");
    // A write in place needs no copy: the cluster keeps its offset, as it does under QEMU.
    let before = map[0]["offset"].clone();
    assert_eq!(code(&tool(&["io", "-c", "write -P 7 0 4k", img_s])), 0);
    assert_eq!(qcow2_testdata::qemu_map(&img)[0]["offset"], before);
}
