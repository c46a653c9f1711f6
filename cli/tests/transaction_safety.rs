//! The group directory is the group's alone, recovery never creates it, a disk pivoted to an
//! overlay is not changed underneath, and an overlay someone still uses is not deleted. Every
//! refused plan leaves every file as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{stderr, tool_in};
use qcow2_testdata::{qemu_img_ok, scratch_dir};

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_file() {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        } else if meta.is_dir() {
            out.extend(snapshot(&p));
        }
    }
    out
}

fn disks(dir: &Path, names: &[&str]) {
    for n in names {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            dir.join(n).to_str().unwrap(),
            "1M",
        ]);
    }
}

fn plan(dir: &Path, name: &str, actions: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(r#"{{"group": "grp", "actions": [{actions}]}}"#),
    )
    .unwrap();
    path
}

fn run_plan(dir: &Path, plan: &Path) -> std::process::Output {
    tool_in(Some(dir), &["transaction", plan.to_str().unwrap()])
}

/// Whether some process holds an OFD lock (QEMU's image locks) on `path`, read from
/// /proc/locks without opening the file, so the probe never competes for the locks itself.
fn ofd_locked(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.contains("OFDLCK")
                && l.split_whitespace()
                    .nth(5)
                    .is_some_and(|id| id.ends_with(&format!(":{ino}")))
        })
}

#[test]
fn plans_may_not_name_files_of_the_group_directory() {
    let dir = scratch_dir("txn_group_files");
    disks(&dir, &["disk0.qcow2"]);
    // A first transaction makes the group directory and its files.
    let ok = plan(
        &dir,
        "first.json",
        r#"{"type": "blockdev-snapshot-internal-sync", "data": {"image": "disk0.qcow2", "name": "s1"}}"#,
    );
    let out = run_plan(&dir, &ok);
    assert!(out.status.success(), "{}", stderr(&out));
    let group_files: Vec<String> = std::fs::read_dir(dir.join("grp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!group_files.is_empty());
    std::os::unix::fs::symlink("grp/group.lock", dir.join("lock-link")).unwrap();
    let before = snapshot(&dir);
    let mut bad = Vec::new();
    for f in &group_files {
        bad.push(format!(
            r#"{{"type": "blockdev-snapshot-sync", "data": {{"image": "disk0.qcow2", "snapshot-file": "grp/{f}", "format": "qcow2"}}}}"#
        ));
        bad.push(format!(
            r#"{{"type": "blockdev-snapshot-sync", "data": {{"image": "disk0.qcow2", "snapshot-file": "./grp/../grp/{f}", "format": "qcow2"}}}}"#
        ));
    }
    bad.push(
        r#"{"type": "blockdev-snapshot-sync", "data": {"image": "disk0.qcow2", "snapshot-file": "grp/new-overlay.qcow2", "format": "qcow2"}}"#
            .into(),
    );
    bad.push(
        r#"{"type": "blockdev-snapshot-internal-sync", "data": {"image": "lock-link", "name": "x"}}"#
            .into(),
    );
    for (i, action) in bad.iter().enumerate() {
        let p = plan(&dir, &format!("bad{i}.json"), action);
        let mut expect = before.clone();
        expect.insert(p.clone(), std::fs::read(&p).unwrap());
        let out = run_plan(&dir, &p);
        assert_eq!(out.status.code(), Some(1), "{action}");
        let err = stderr(&out);
        assert!(
            err.contains("group directory")
                || err.contains("not a qcow2")
                || err.contains("regular"),
            "{action}: {err}"
        );
        assert!(snapshot(&dir) == expect, "{action} changed a file");
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn recover_never_creates_a_group_and_a_file_is_not_a_group() {
    let dir = scratch_dir("txn_recover_paths");
    let out = tool_in(Some(&dir), &["recover", "no-such-group"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such group directory"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("no-such-group").exists());
    std::fs::write(dir.join("a-file"), b"keep me").unwrap();
    let out = tool_in(Some(&dir), &["recover", "a-file"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a group directory"),
        "{}",
        stderr(&out)
    );
    disks(&dir, &["disk0.qcow2"]);
    std::fs::write(
        dir.join("p.json"),
        r#"{"group": "a-file", "actions": [{"type": "blockdev-snapshot-internal-sync", "data": {"image": "disk0.qcow2", "name": "s"}}]}"#,
    )
    .unwrap();
    let out = tool_in(Some(&dir), &["transaction", "p.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a group directory"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(dir.join("a-file")).unwrap(), b"keep me");
}

#[test]
fn a_disk_pivoted_to_an_overlay_is_not_changed_underneath() {
    let dir = scratch_dir("txn_pivoted");
    disks(&dir, &["disk0.qcow2"]);
    let p = plan(
        &dir,
        "ext.json",
        r#"{"type": "blockdev-snapshot-sync", "data": {"image": "disk0.qcow2", "snapshot-file": "disk0.top.qcow2", "format": "qcow2"}}"#,
    );
    assert!(run_plan(&dir, &p).status.success());
    qemu_img_ok(&[
        "snapshot",
        "-c",
        "keep",
        dir.join("disk0.qcow2").to_str().unwrap(),
    ]);
    let before = snapshot(&dir);
    for (i, action) in [
        r#"{"type": "snapshot-revert-internal", "data": {"image": "disk0.qcow2", "name": "keep"}}"#,
        r#"{"type": "blockdev-snapshot-internal-sync", "data": {"image": "disk0.qcow2", "name": "x"}}"#,
        r#"{"type": "blockdev-snapshot-delete-internal-sync", "data": {"image": "./disk0.qcow2", "name": "keep"}}"#,
        r#"{"type": "blockdev-snapshot-sync", "data": {"image": "disk0.qcow2", "snapshot-file": "other.qcow2", "format": "qcow2"}}"#,
    ]
    .iter()
    .enumerate()
    {
        let p = plan(&dir, &format!("under{i}.json"), action);
        let mut expect = before.clone();
        expect.insert(p.clone(), std::fs::read(&p).unwrap());
        let out = run_plan(&dir, &p);
        assert_eq!(out.status.code(), Some(1), "{action}");
        assert!(stderr(&out).contains("disk0.top.qcow2"), "{action}: {}", stderr(&out));
        assert!(snapshot(&dir) == expect, "{action} changed a file");
        std::fs::remove_file(&p).unwrap();
    }
    // The top itself takes actions.
    let p = plan(
        &dir,
        "top.json",
        r#"{"type": "blockdev-snapshot-internal-sync", "data": {"image": "disk0.top.qcow2", "name": "t"}}"#,
    );
    assert!(run_plan(&dir, &p).status.success());
    // A second external snapshot: the first overlay is now in the middle of the chain.
    let p = plan(
        &dir,
        "ext2.json",
        r#"{"type": "blockdev-snapshot-sync", "data": {"image": "disk0.top.qcow2", "snapshot-file": "disk0.top2.qcow2", "format": "qcow2"}}"#,
    );
    assert!(run_plan(&dir, &p).status.success());
    for (i, image) in ["disk0.top.qcow2", "disk0.qcow2"].iter().enumerate() {
        let p = plan(
            &dir,
            &format!("mid{i}.json"),
            &format!(
                r#"{{"type": "blockdev-snapshot-internal-sync", "data": {{"image": "{image}", "name": "m"}}}}"#
            ),
        );
        let before = snapshot(&dir);
        let out = run_plan(&dir, &p);
        assert_eq!(out.status.code(), Some(1), "{image}");
        assert!(
            stderr(&out).contains("disk0.top2.qcow2"),
            "{image}: {}",
            stderr(&out)
        );
        assert!(
            snapshot(&dir) == before,
            "{image}: a refused plan changed a file"
        );
    }
}

/// qemu-io holding `image` (and its backing chain) open, until dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_overlay_in_use_as_a_backing_file_is_not_deleted() {
    let dir = scratch_dir("txn_overlay_in_use");
    disks(&dir, &["disk0.qcow2"]);
    let p = plan(
        &dir,
        "ext.json",
        r#"{"type": "blockdev-snapshot-sync", "data": {"image": "disk0.qcow2", "snapshot-file": "disk0.top.qcow2", "format": "qcow2"}}"#,
    );
    assert!(run_plan(&dir, &p).status.success());
    // An image outside the group uses the overlay as its backing file, and QEMU has it open.
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk0.top.qcow2",
        "-F",
        "qcow2",
        dir.join("outside.qcow2").to_str().unwrap(),
    ]);
    let child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(dir.join("outside.qcow2"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let holder = Holder(child);
    let top = dir.join("disk0.top.qcow2");
    let mut locked = false;
    for _ in 0..100_000 {
        if ofd_locked(&top) {
            locked = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(locked, "qemu-io never opened the chain");
    let before = snapshot(&dir);
    let p = plan(
        &dir,
        "del.json",
        r#"{"type": "blockdev-snapshot-delete-external", "data": {"image": "disk0.top.qcow2"}}"#,
    );
    let mut expect = before.clone();
    expect.insert(p.clone(), std::fs::read(&p).unwrap());
    let out = run_plan(&dir, &p);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    assert!(
        snapshot(&dir) == expect,
        "the refused delete changed a file"
    );
    drop(holder);
    let out = run_plan(&dir, &p);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!top.exists());
}
