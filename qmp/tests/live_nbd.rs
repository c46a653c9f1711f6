//! Group snapshots through QMP of disks written through NBD: an NBD server and the QMP monitor
//! run in this process over four live disks, writer threads write through the server and log
//! every acknowledged write, and the real `qemu.qmp` client takes group snapshots mid-stream
//! with QEMU's `transaction`. Every snapshot, read back by `qemu-img`, holds exactly the writes
//! acknowledged before its pause and none that started after the pause began.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::{CreateOptions, Image, OpenOptions};
use qcow2_nbd::{Export, Listener, Server, ServerOptions};
use qcow2_qmp::{Disk, Monitor};
use qcow2_testdata::cut::{NbdWriter, WriteLog};
use qcow2_testdata::qmp::{qmp_python, QmpClient};
use qcow2_testdata::{qemu_check, qemu_convert_raw, require_qemu, scratch_dir};
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
        let image = Arc::new(Image::open(&path, &OpenOptions::read_write()).unwrap());
        let name = format!("d{i}");
        exports.push(Export::new(&name, image.clone()));
        disks.push(Disk {
            name,
            image,
            path: path.canonicalize().unwrap(),
        });
    }
    let paths: Vec<_> = disks.iter().map(|d| d.path.clone()).collect();
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
    let nbd_socket = dir.join("nbd.sock");
    let qmp_socket = dir.join("qmp.sock");
    let nbd_listener = Listener::unix(&nbd_socket).unwrap();
    let qmp_listener = std::os::unix::net::UnixListener::bind(&qmp_socket).unwrap();
    let stop = AtomicBool::new(false);
    let blocks = SIZE / BLOCK as u64;
    let mut cuts = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| server.run(nbd_listener).unwrap());
        s.spawn(|| monitor.listen(qmp_listener));
        let mut writers = Vec::new();
        for disk in 0..DISKS {
            for thread in 0..2u64 {
                let (log, stop, socket) = (&log, &stop, &nbd_socket);
                writers.push(s.spawn(move || {
                    let mut nbd = NbdWriter::connect(socket, &format!("d{disk}")).unwrap();
                    let mut x = disk as u64 * 31 + thread * 7 + 1;
                    while !stop.load(Ordering::SeqCst) {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let block = ((x >> 33) % (blocks / 2)) * 2 + thread;
                        log.write(disk, block, BLOCK, |data| {
                            nbd.write(data, block * BLOCK as u64).unwrap()
                        });
                    }
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
                .map(|d| {
                    json!({"type": "blockdev-snapshot-internal-sync",
                           "data": {"device": format!("d{d}"), "name": format!("s{k}")}})
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
        // A failing action takes the whole transaction back, with QEMU's message.
        let refused = qmp.execute(
            "transaction",
            json!({"actions": [
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "x"}},
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d1", "name": "s0"}},
            ]}),
        );
        assert_eq!(
            refused["error"]["desc"],
            "Snapshot with name 's0' already exists on device 'd1'"
        );
        let exports = qmp.ok("query-block-exports", json!({}));
        assert_eq!(exports.as_array().unwrap().len(), DISKS);
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
    for (disk, path) in paths.iter().enumerate() {
        assert_eq!(qemu_check(path).0, 0, "{}", path.display());
        let img = Image::open(path, &OpenOptions::default()).unwrap();
        let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["s0", "s1", "s2"],
            "the refused transaction left nothing"
        );
        for (k, (before, after)) in cuts.iter().enumerate() {
            let raw = qemu_convert_raw(path, Some(&format!("s{k}")));
            let held = log
                .check_cut(disk, &raw, BLOCK, *before, *after)
                .unwrap_or_else(|e| panic!("snapshot s{k}: {e}"));
            assert!(held > 0, "snapshot s{k} of disk {disk} holds no write");
        }
    }
}
