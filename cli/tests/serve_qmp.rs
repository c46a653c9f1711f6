//! `qcow2-tool serve --qmp --group`: the real `qemu.qmp` client takes group snapshots of four
//! disks that fio writes to through the server (`--ioengine=nbd`), then the server is killed
//! with SIGKILL right after a transaction is sent. `qcow2-tool recover` must leave every disk
//! with the same snapshots (the interrupted transaction on all or on none), and QEMU must find
//! no corruption (leaks from writes the kill cut short are allowed, as after any power cut).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{path_str, tool};
use qcow2_testdata::qmp::{qmp_python, QmpClient};
use qcow2_testdata::{qemu_check, qemu_img_ok, require_qemu, scratch_dir, socket_path};
use serde_json::json;

const DISKS: usize = 4;

/// Waits until `path` exists (the server writes its pid file once both sockets listen).
fn wait_for(path: &Path, server: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited before listening"
        );
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn snapshot_names(path: &Path) -> Vec<String> {
    let info = qcow2_testdata::qemu_info(path);
    info["snapshots"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn group_snapshot(k: usize) -> serde_json::Value {
    let mut actions: Vec<_> = (0..DISKS)
        .map(|d| {
            json!({"type": "blockdev-snapshot-internal-sync",
                   "data": {"device": format!("d{d}"), "name": format!("t{k}")}})
        })
        .collect();
    actions.push(json!({"type": "block-dirty-bitmap-add",
        "data": {"node": "d0", "name": format!("since-t{k}"), "persistent": true}}));
    json!({ "actions": actions })
}

#[test]
fn kill_9_during_qmp_transactions_under_fio_recovers_all_or_nothing() {
    require_qemu();
    let Some(python) = qmp_python() else { return };
    let dir = scratch_dir("serve-qmp-kill9");
    let paths: Vec<PathBuf> = (0..DISKS)
        .map(|i| dir.join(format!("d{i}.qcow2")))
        .collect();
    for p in &paths {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(p), "64M"]);
    }
    let (nbd, qmp, group, pid) = (
        socket_path("kill9-nbd"),
        socket_path("kill9-qmp"),
        dir.join("group"),
        dir.join("server.pid"),
    );
    let mut args: Vec<String> = ["serve", "-t", "-e", "0", "-k", path_str(&nbd)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--qmp", path_str(&qmp), "--group", path_str(&group)].map(String::from));
    args.extend(["--pid-file", path_str(&pid)].map(String::from));
    args.extend(
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| format!("d{i}={}", p.display())),
    );
    let mut server = Command::new(env!("CARGO_BIN_EXE_qcow2-tool"))
        .args(&args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&pid, &mut server);
    let mut fio_args = vec![
        "--ioengine=nbd".to_string(),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        "--size=16M".into(),
        "--time_based".into(),
        "--runtime=600".into(),
    ];
    for d in 0..DISKS {
        fio_args.push(format!("--name=d{d}"));
        fio_args.push(format!("--uri=nbd+unix:///d{d}?socket={}", nbd.display()));
    }
    let mut fio = Command::new("fio")
        .args(&fio_args)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio (install fio)");
    // Snapshots are taken while fio writes: every disk has taken writes before the first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while paths
        .iter()
        .any(|p| std::fs::metadata(p).map_or(0, |m| m.len()) < 4 << 20)
    {
        assert!(fio.try_wait().unwrap().is_none(), "fio stopped");
        assert!(Instant::now() < deadline, "fio writes nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = QmpClient::connect(&python, &qmp);
    for k in 0..5 {
        assert_eq!(client.ok("transaction", group_snapshot(k)), json!({}));
    }
    // The sixth, external snapshots of every disk, is cut off wherever the kill finds it.
    let overlays: Vec<PathBuf> = paths.iter().map(|p| p.with_extension("o5.qcow2")).collect();
    let external: Vec<_> = overlays
        .iter()
        .enumerate()
        .map(|(d, o)| {
            json!({"type": "blockdev-snapshot-sync",
                   "data": {"device": format!("d{d}"), "snapshot-file": o, "format": "qcow2"}})
        })
        .collect();
    client.send("transaction", json!({ "actions": external }));
    server.kill().unwrap();
    server.wait().unwrap();
    client.abandon();
    let _ = fio.kill();
    fio.wait().unwrap();
    let out = tool(&["recover", path_str(&group)]);
    assert!(out.status.success(), "{out:?}");
    let first = snapshot_names(&paths[0]);
    assert!(first.starts_with(&["t0", "t1", "t2", "t3", "t4"].map(String::from)));
    let bitmaps = qcow2_testdata::qemu_bitmaps(&paths[0]);
    let bitmap_count = bitmaps.as_array().map_or(0, Vec::len);
    assert_eq!(bitmap_count, first.len(), "snapshots and bitmaps together");
    // Every disk got its overlay, or none did; no temporary overlay is left behind.
    let made = overlays.iter().filter(|o| o.exists()).count();
    assert!(made == 0 || made == DISKS, "{made} of {DISKS} overlays");
    for o in overlays.iter().filter(|o| o.exists()) {
        let (code, report) = qemu_check(o);
        assert!(code == 0 || code == 3, "{}: {report}", o.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".txn-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for p in &paths {
        assert_eq!(snapshot_names(p), first, "{}: all or nothing", p.display());
        // Leaks from writes the kill cut short are allowed (exit 3), corruption never.
        let (code, report) = qemu_check(p);
        assert!(code == 0 || code == 3, "{}: {report}", p.display());
        assert!(
            report.get("corruptions").is_none_or(|c| c == 0),
            "{}: {report}",
            p.display()
        );
    }
}
