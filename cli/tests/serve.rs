//! `qcow2-tool serve` against real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy and fio read
//! and write through it, and what they see matches the image opened directly and what qemu-nbd
//! serves for the same image. Hostile byte streams end only their own connection; SIGTERM closes
//! the images cleanly; kill -9 under load leaves an image QEMU checks clean but for leaks.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use qcow2_testdata::{qemu_check, qemu_img, qemu_img_ok, qemu_io, scratch_dir};

/// A running `qcow2-tool serve` (or `qemu-nbd`), killed when dropped.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Served {
    fn start(dir: &Path, tag: &str, args: &[&str]) -> Served {
        let socket = dir.join(format!("{tag}.sock"));
        let pid = dir.join(format!("{tag}.pid"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2-tool"));
        cmd.arg("serve")
            .arg("-t")
            .arg("-k")
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid)
            .args(args)
            .current_dir(dir);
        Self::spawn(cmd, socket, &pid)
    }

    fn qemu_nbd(dir: &Path, tag: &str, args: &[&str]) -> Served {
        let socket = dir.join(format!("{tag}.sock"));
        let pid = dir.join(format!("{tag}.pid"));
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("-t")
            .arg("-k")
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid)
            .args(args)
            .current_dir(dir);
        Self::spawn(cmd, socket, &pid)
    }

    fn spawn(mut cmd: Command, socket: PathBuf, pid: &Path) -> Served {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        // The pid file is written once the socket listens (both servers): a bounded wait.
        for _ in 0..1_000_000 {
            if pid.exists() && socket.exists() {
                return Served { child, socket };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the server exited: {status}");
            }
            std::thread::yield_now();
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server never listened on {}", socket.display());
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 64 MiB image over a backing file, with data in both layers, a zero cluster and holes.
fn image(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 1 0 2M",
        base.to_str().unwrap(),
    ]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 2 1M 1536k",
        "-c",
        "write -z 8M 128k",
        "-c",
        "write -P 3 20M 64k",
        top.to_str().unwrap(),
    ]);
    top
}

#[test]
fn qemu_and_libnbd_clients_read_and_write_what_the_image_holds() {
    let dir = scratch_dir("serve_clients");
    let top = image(&dir);
    let t = top.to_str().unwrap();
    let ours = Served::start(&dir, "ours", &["-x", "disk", "top.qcow2"]);
    let uri = ours.uri("disk");
    // qemu-img sees the same size and bytes as the image opened directly.
    let info = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    run(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", t, &uri],
    );
    // Writes through qemu-io land in the image.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 30M 1M",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 20M 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 9 30M 1M",
            "-c",
            "read -P 0 1M 64k",
            &uri,
        ],
    );
    run(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", t, &uri],
    );
    // nbdcopy out and back in.
    let copy = dir.join("copy.raw");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            t,
            copy.to_str().unwrap(),
        ],
    );
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 5 40M 3M",
        copy.to_str().unwrap(),
    ]);
    run("nbdcopy", &[copy.to_str().unwrap(), &uri]);
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "raw",
            copy.to_str().unwrap(),
            &uri,
        ],
    );
    // convert from the export.
    let converted = dir.join("converted.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri,
            converted.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-F",
            "raw",
            converted.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(ours.terminate().success());
    assert_eq!(qemu_check(&top).0, 0);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            t,
            copy.to_str().unwrap(),
        ],
    );
}

#[test]
fn block_status_and_export_facts_match_qemu_nbd() {
    let dir = scratch_dir("serve_status");
    let top = image(&dir);
    // A disabled bitmap with some writes recorded (qemu-nbd refuses an enabled one read-only).
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", top.to_str().unwrap(), "b0"]);
    // Whole clusters: QEMU also asks the file system about the tail of a cluster past the end
    // of the file (it reports it as zero); this server answers from the qcow2 metadata alone.
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write 5M 192k",
        "-c",
        "write 33M 64k",
        top.to_str().unwrap(),
    ]);
    qemu_img_ok(&["bitmap", "--disable", top.to_str().unwrap(), "b0"]);
    let ours = Served::start(&dir, "ours", &["-r", "-B", "b0", "top.qcow2"]);
    let qemu = Served::qemu_nbd(
        &dir,
        "qemu",
        &["-r", "-A", "-B", "b0", "-f", "qcow2", "top.qcow2"],
    );
    for map in [
        "--map",
        "--map=qemu:allocation-depth",
        "--map=qemu:dirty-bitmap:b0",
    ] {
        let a = run("nbdinfo", &[map, &ours.uri("")]);
        let b = run("nbdinfo", &[map, &qemu.uri("")]);
        assert_eq!(a, b, "nbdinfo {map}");
    }
    let facts = |uri: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", uri])).unwrap();
        let e = &v["exports"][0];
        serde_json::json!([
            e["export-size"],
            e["is_read_only"],
            e["can_flush"],
            e["can_fua"],
            e["can_trim"],
            e["can_zero"],
            e["can_df"],
            e["block_size_preferred"],
            e["block_size_maximum"],
            v["structured"]
        ])
    };
    assert_eq!(facts(&ours.uri("")), facts(&qemu.uri("")));
    // A read-only export refuses writes.
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", &ours.uri("")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The export says it is read-only, so qemu-io refuses to open it for writing.
    assert!(text.contains("Permission denied"), "{text}");
}

#[test]
fn fio_with_four_clients_verifies_random_writes() {
    let dir = scratch_dir("serve_fio");
    let img = dir.join("d.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let ours = Served::start(&dir, "ours", &["d.qcow2"]);
    let out = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", ours.uri("")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--offset_increment=8M",
            "--numjobs=4",
            "--iodepth=8",
            "--verify=crc32c",
            "--output-format=terse",
        ])
        .output()
        .expect("fio must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: Vec<&str> = text.lines().filter(|l| l.starts_with("3;")).collect();
    assert_eq!(jobs.len(), 4, "{text}");
    for job in jobs {
        assert_eq!(
            job.split(';').nth(4),
            Some("0"),
            "fio reported an error: {job}"
        );
    }
    assert!(ours.terminate().success());
    assert_eq!(qemu_check(&img).0, 0);
}

/// Sends `bytes` on a new connection and reads until the server closes or answers.
fn poke(socket: &Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(socket).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut sink);
}

#[test]
fn hostile_byte_streams_end_only_their_own_connection() {
    use qcow2_nbd::wire::*;
    let dir = scratch_dir("serve_hostile");
    let img = dir.join("d.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 4 0 1M",
        img.to_str().unwrap(),
    ]);
    let ours = Served::start(&dir, "ours", &["d.qcow2"]);
    let opt = |option: u32, data: &[u8]| {
        let mut v = OPT_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    };
    let go = {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        opt(OPT_GO, &d)
    };
    let request = |kind: u16, offset: u64, len: u32| {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let flags = 3u32.to_be_bytes().to_vec();
    let with = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        b"garbage".to_vec(),
        0xFFFF_FFFFu32.to_be_bytes().to_vec(),
        with(&[&flags, b"NOTMAGIC"]),
        // An option claiming 4 GiB of data.
        with(&[
            &flags,
            &OPT_MAGIC.to_be_bytes(),
            &7u32.to_be_bytes(),
            &u32::MAX.to_be_bytes(),
        ]),
        // INFO whose name length runs past the data.
        with(&[&flags, &opt(OPT_INFO, &u32::MAX.to_be_bytes())]),
        with(&[&flags, &opt(OPT_SET_META_CONTEXT, &[0; 3])]),
        with(&[&flags, &opt(OPT_EXPORT_NAME, b"no-such-export")]),
        // Transmission: a 4 GiB write, reads past the end, a bad magic, an unknown command.
        with(&[&flags, &go, &request(CMD_WRITE, 0, u32::MAX)]),
        with(&[
            &flags,
            &go,
            &request(CMD_READ, 16 << 20, 4096),
            &request(CMD_READ, u64::MAX, 4096),
        ]),
        with(&[&flags, &go, &request(CMD_READ, 0, u32::MAX), &[0xAB; 28]]),
        with(&[
            &flags,
            &go,
            &request(42, 0, 0),
            &request(CMD_BLOCK_STATUS, 0, 4096),
        ]),
    ];
    for bytes in &cases {
        poke(&ours.socket, bytes);
    }
    // The server still serves, and the image is intact.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 4 0 1M", &ours.uri("")],
    );
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert!(ours.terminate().success());
    assert_eq!(qemu_check(&img).0, 0);
}

#[test]
fn kill_9_under_write_load_leaves_a_checkable_image_with_every_flushed_write() {
    let dir = scratch_dir("serve_kill");
    let img = dir.join("d.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let ours = Served::start(&dir, "ours", &["d.qcow2"]);
    let uri = ours.uri("");
    // Acknowledged and flushed before the kill: must survive.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 6 0 4M", "-c", "flush", &uri],
    );
    // Unflushed load while the server dies.
    let mut load = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 8 8M 32M", &uri])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ours = ours;
    let _ = ours.child.kill();
    let _ = ours.child.wait();
    let _ = load.wait();
    drop(ours);
    let (code, report) = qemu_check(&img);
    assert!(code == 0 || code == 3, "qemu-img check {code}: {report}");
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-r",
        "-c",
        "read -P 6 0 4M",
        img.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 4194304/4194304"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = qemu_img(&["info", img.to_str().unwrap()]);
}
