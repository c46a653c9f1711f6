//! Group snapshots through QMP of disks written through NBD: an NBD server and the QMP monitor
//! run in this process over four live disks, writer threads write through the server and log
//! every acknowledged write, and the real `qemu.qmp` client takes group snapshots mid-stream
//! with QEMU's `transaction`: internal snapshots, then external ones (the exports go on writing
//! into the new overlays), then internal snapshots of the overlays. Every snapshot, read back by
//! `qemu-img`, holds exactly the writes acknowledged before its pause and none that started
//! after the pause began.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::{CreateOptions, DiskTop, Image, OpenOptions};
use qcow2_nbd::{Export, Listener, Server, ServerOptions};
use qcow2_qmp::{Disk, Monitor, WriteCache};
use qcow2_testdata::cut::{NbdWriter, WriteLog};
use qcow2_testdata::qmp::{qmp_python, QmpClient};
use qcow2_testdata::{qemu_check, qemu_convert_raw, require_qemu, scratch_dir, socket_path};
use qcow2_transaction::Group;
use serde_json::json;

const BLOCK: usize = 4096;
const SIZE: u64 = 2 << 20;
const DISKS: usize = 4;

#[test]
fn qmp_group_snapshots_of_disks_written_through_nbd_are_cuts() {
    require_qemu();
    let Some(python) = qmp_python() else { return };
    let dir = scratch_dir("qmp-live-nbd");
    let mut disks = Vec::new();
    let mut exports = Vec::new();
    for i in 0..DISKS {
        let path = dir.join(format!("d{i}.qcow2"));
        let options = CreateOptions::new(SIZE);
        Image::create(&path, &options).unwrap().close().unwrap();
        // The first disk bypasses the page cache (cache=none); an external snapshot keeps that.
        let options = OpenOptions::read_write().direct_io(i == 0);
        let image = Arc::new(Image::open(&path, &options).unwrap());
        let top = Arc::new(DiskTop::new(image));
        let name = format!("d{i}");
        exports.push(Export::with_top(&name, top.clone()));
        disks.push(Disk {
            name,
            top,
            path: path.canonicalize().unwrap(),
            cache: WriteCache::default(),
        });
    }
    let paths: Vec<_> = disks.iter().map(|d| d.path.clone()).collect();
    let overlay = |d: usize| dir.join(format!("d{d}.overlay.qcow2"));
    let log = Arc::new(WriteLog::default());
    let quiesced = Arc::new(Mutex::new(None));
    let mut group = Group::open(dir.join("group")).unwrap();
    let seen = (log.clone(), quiesced.clone());
    group.set_hook(Some(Box::new(move |event| {
        if event == "quiesced" {
            *seen.1.lock().unwrap() = Some(seen.0.tick());
        }
        true
    })));
    let server = Server::new(
        exports,
        ServerOptions::default().max_connections(0).persistent(true),
    );
    let stop_server = server.shutdown_handle();
    let monitor = Monitor::new(group, disks, Box::new(|| {}));
    let nbd_socket = socket_path("live-nbd");
    let qmp_socket = socket_path("live-qmp");
    let nbd_listener = Listener::unix(&nbd_socket).unwrap();
    let qmp_listener = std::os::unix::net::UnixListener::bind(&qmp_socket).unwrap();
    let stop = AtomicBool::new(false);
    let blocks = SIZE / BLOCK as u64;
    let mut cuts = Vec::new();
    let (mut refused, mut exports, mut nodes) = (json!(null), json!(null), json!(null));
    std::thread::scope(|s| {
        // A failing assertion below must stop the writers and the server, or the scope never
        // ends.
        struct StopAll<'a>(&'a AtomicBool, qcow2_nbd::ShutdownHandle);
        impl Drop for StopAll<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
                self.1.shutdown();
            }
        }
        let _stop = StopAll(&stop, stop_server.clone());
        s.spawn(|| server.run(nbd_listener).unwrap());
        s.spawn(|| monitor.listen(qmp_listener));
        let mut writers = Vec::new();
        for disk in 0..DISKS {
            for thread in 0..2u64 {
                let (log, stop, socket) = (&log, &stop, &nbd_socket);
                writers.push(s.spawn(move || {
                    let mut nbd = NbdWriter::connect(socket, &format!("d{disk}")).unwrap();
                    log.write_until(stop, disk, (thread, 2), blocks, BLOCK, |data, at| {
                        nbd.write(data, at).unwrap()
                    });
                    nbd.disconnect().unwrap();
                }));
            }
        }
        let mut qmp = QmpClient::connect(&python, &qmp_socket);
        for k in 0..3 {
            while log.len() < 200 * (k + 1) {
                std::thread::yield_now();
            }
            let actions: Vec<_> = (0..DISKS)
                .map(|d| match k {
                    1 => json!({"type": "blockdev-snapshot-sync",
                                "data": {"device": format!("d{d}"),
                                         "snapshot-file": overlay(d),
                                         "snapshot-node-name": format!("o{d}"),
                                         "format": "qcow2"}}),
                    _ => json!({"type": "blockdev-snapshot-internal-sync",
                                "data": {"device": format!("d{d}"), "name": format!("s{k}")}}),
                })
                .collect();
            let before = log.tick();
            assert_eq!(
                qmp.ok("transaction", json!({ "actions": actions })),
                json!({})
            );
            let after = quiesced.lock().unwrap().take().expect("a quiesced event");
            cuts.push((before, after));
        }
        // A failing action takes the whole transaction back, with QEMU's message (checked once
        // the scope is over: a failing assertion here would leave the monitor thread running).
        refused = qmp.execute(
            "transaction",
            json!({"actions": [
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "x"}},
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d1", "name": "s2"}},
            ]}),
        );
        exports = qmp.ok("query-block-exports", json!({}));
        nodes = qmp.ok("query-named-block-nodes", json!({}));
        while log.len() < 1000 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        qmp.ok("quit", json!({}));
        qmp.close();
        stop_server.shutdown();
    });
    drop(server);
    drop(monitor.close());
    drop(monitor);
    assert_eq!(
        refused["error"]["desc"],
        "Snapshot with name 's2' already exists on device 'd1'"
    );
    assert_eq!(exports.as_array().unwrap().len(), DISKS);
    // Each disk's node is its top: the overlay, over the disk's first image.
    for (d, node) in nodes.as_array().unwrap().iter().enumerate() {
        let file = overlay(d).canonicalize().unwrap();
        assert_eq!(node["file"], file.display().to_string(), "{node}");
        assert_eq!(node["backing_file_depth"], 1, "{node}");
        let cache = json!({"writeback": true, "direct": d == 0, "no-flush": false});
        assert_eq!(node["cache"], cache, "{node}");
    }
    for (disk, base) in paths.iter().enumerate() {
        let top = overlay(disk);
        for (path, names) in [(base, ["s0"]), (&top, ["s2"])] {
            assert_eq!(qemu_check(path).0, 0, "{}", path.display());
            let img = Image::open(path, &OpenOptions::default()).unwrap();
            let found: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
            assert_eq!(found, names, "the refused transaction left nothing");
        }
        // The base file's snapshot, the base file itself (cut by the external snapshot), the
        // overlay's snapshot (through the base), and the overlay now: every write.
        let layers = [
            (base.clone(), Some("s0"), Some(cuts[0])),
            (base.clone(), None, Some(cuts[1])),
            (top.clone(), Some("s2"), Some(cuts[2])),
            (top.clone(), None, None),
        ];
        for (path, snap, cut) in layers {
            let raw = qemu_convert_raw(&path, snap);
            let (before, after) = cut.unwrap_or((u64::MAX, u64::MAX));
            let held = log
                .check_cut(disk, &raw, BLOCK, before, after)
                .unwrap_or_else(|e| panic!("{} {snap:?}: {e}", path.display()));
            assert!(held > 0, "{} {snap:?} holds no write", path.display());
        }
    }
}
