//! `qcow2-tool serve` against real NBD clients: qemu-img and qemu-io (`nbd+unix://`), nbdinfo
//! (compared with qemu-nbd serving the same image), nbdcopy both ways, fio's nbd engine with
//! verification and four clients, a stop by SIGTERM and a kill -9 under write load.
//!
//! Servers are started with `--pid-file` and polled for (the pid file is written once the
//! socket listens); sockets live in the temp directory, whose paths stay short.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qcow2::{Image, OpenOptions};
use qcow2_nbd::wire::*;
use qcow2_testdata::{qemu_img_ok, qemu_io, require_qemu, scratch_dir, socket_path};

use common::path_str;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A running NBD server process (ours or qemu-nbd), stopped on drop.
struct Served {
    child: Child,
    sock: PathBuf,
    pid_file: PathBuf,
}

impl Served {
    fn start(program: &str, lead: &[&str], args: &[&str]) -> Served {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("q2nbd-{}-{n}", std::process::id()));
        let sock = base.with_extension("sock");
        let pid_file = base.with_extension("pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = Command::new(program);
        cmd.args(lead)
            .args(["-k", path_str(&sock), "--pid-file", path_str(&pid_file)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        // Bounded poll: the pid file appears once the socket listens.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(pid_file.exists() && sock.exists()) {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("{program} {args:?} exited ({status}) before listening:\n{err}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Served {
            child,
            sock,
            pid_file,
        }
    }

    fn ours(args: &[&str]) -> Served {
        Served::start(env!("CARGO_BIN_EXE_qcow2-tool"), &["serve"], args)
    }

    fn qemu(args: &[&str]) -> Served {
        require_qemu();
        Served::start("qemu-nbd", &["-f", "qcow2"], args)
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).unwrap();
    }

    /// SIGTERM, then the exit status and stderr.
    fn stop(mut self) -> (ExitStatus, String) {
        self.signal(Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (status, err)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): install libnbd-bin and fio"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 16 MiB top image over a base: data in both layers, a zero cluster, an unmapped zero range.
fn make_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "16M"]);
    for c in ["write -P 1 0 1M", "write -P 2 4M 192k"] {
        assert!(qemu_io(&["-f", "qcow2", "-c", c, path_str(&base)])
            .status
            .success());
    }
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    for c in [
        "write -P 3 512k 1M",
        "write -z 4M 64k",
        "write -P 4 8M 4k",
        "write -z -u 9M 128k",
    ] {
        assert!(qemu_io(&["-f", "qcow2", "-c", c, path_str(&top)])
            .status
            .success());
    }
    top
}

/// The whole guest content, read by the engine directly.
fn engine_bytes(path: &Path) -> Vec<u8> {
    let image = Image::open(path, &OpenOptions::default().force_share(true)).unwrap();
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// nbdinfo's JSON without the URI (which names the socket).
fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--json", uri])).unwrap();
    for e in v["exports"].as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("uri");
    }
    v
}

#[test]
fn nbdinfo_and_qemu_img_see_what_qemu_nbd_serves() {
    let dir = scratch_dir("nbdinfo_matches");
    let top = make_chain(&dir);
    let img = path_str(&top);
    // Both read-only, side by side (shared locks), with allocation depth and a name.
    let ours = Served::ours(&["-t", "-r", "-e", "0", "-A", "-x", "exp", img]);
    let qemu = Served::qemu(&["-t", "-r", "-e", "0", "-A", "-x", "exp", img]);
    let (o, q) = (ours.uri("exp"), qemu.uri("exp"));
    assert_eq!(nbdinfo_json(&o), nbdinfo_json(&q));
    for args in [
        vec!["--map"],
        vec!["--map=qemu:allocation-depth"],
        vec!["--map", "--totals"],
    ] {
        let with = |u: &str| {
            let mut a = args.clone();
            a.push(u);
            run_ok("nbdinfo", &a)
        };
        assert_eq!(with(&o), with(&q), "nbdinfo {args:?}");
    }
    let map = |u: &str| run_ok("qemu-img", &["map", "--output=json", "-f", "raw", u]);
    assert_eq!(map(&o), map(&q));
    let info = |u: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", u])).unwrap();
        v["virtual-size"].clone()
    };
    assert_eq!(info(&o), info(&q));
    assert_eq!(info(&o), 16 << 20);
    // The guest bytes: compare, convert and qemu-io reads agree with the engine's own read.
    run_ok(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", img, &o],
    );
    let raw = dir.join("out.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &o, path_str(&raw)],
    );
    let want = engine_bytes(&top);
    assert_eq!(std::fs::read(&raw).unwrap(), want);
    // A qcow2 copy made from the export holds the same bytes and checks clean.
    let copy = dir.join("out.qcow2");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &o, path_str(&copy)],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(&copy),
            path_str(&raw),
        ],
    );
    run_ok("qemu-img", &["check", "-f", "qcow2", path_str(&copy)]);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 3 512k 1M",
            "-c",
            "read -P 0 4M 64k",
            &o,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The read-only export refuses writes.
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &o]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wrote"),
        "{out:?}"
    );
    assert!(ours.stop().0.success());
    drop(qemu);

    // Writable, default sharing (-e 1: no multi-conn) and a description: the same flags.
    let ours = Served::ours(&["-t", "-D", "a disk", img]);
    let a = nbdinfo_json(&ours.uri(""));
    assert!(ours.stop().0.success());
    let qemu = Served::qemu(&["-t", "-D", "a disk", img]);
    let b = nbdinfo_json(&qemu.uri(""));
    drop(qemu);
    assert_eq!(a, b);
    assert_eq!(a["exports"][0]["can_multi_conn"], false);
    assert_eq!(a["exports"][0]["description"], "a disk");
}

#[test]
fn qemu_io_writes_land_in_the_image_and_several_exports_share_a_server() {
    let dir = scratch_dir("qemu_io_writes");
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    for p in [&a, &b] {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(p), "8M"]);
    }
    let arg_a = format!("a={}", a.display());
    let arg_b = format!("b={}", b.display());
    let s = Served::ours(&["-t", "-e", "0", &arg_a, &arg_b]);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 100k 300k",
            "-c",
            "write -P 0x11 2M 1M",
            "-c",
            "write -z 2304k 64k",
            "-c",
            "write -z -u 2560k 128k",
            "-c",
            "discard 2816k 64k",
            "-c",
            "read -P 0x5a 100k 300k",
            &s.uri("a"),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 7M 1M", &s.uri("b")],
    );
    // Unknown export: qemu-img fails cleanly.
    assert!(!run("qemu-img", &["info", &s.uri("c")]).status.success());
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    // The images are closed cleanly and hold what was written.
    for p in [&a, &b] {
        let (code, _) = qcow2_testdata::qemu_check(p);
        assert_eq!(code, 0);
    }
    let mut want = vec![0u8; 8 << 20];
    want[100 << 10..400 << 10].fill(0x5a);
    want[2 << 20..3 << 20].fill(0x11);
    want[2304 << 10..2368 << 10].fill(0);
    want[2560 << 10..2688 << 10].fill(0);
    let got = engine_bytes(&a);
    // The discarded range may read as zeros or as before; everything else is exact.
    let (d0, d1) = (2816 << 10, 2880 << 10);
    assert_eq!(got[..d0], want[..d0]);
    assert_eq!(got[d1..], want[d1..]);
    assert!(got[d0..d1].iter().all(|&x| x == 0 || x == 0x11));
    let got_b = engine_bytes(&b);
    assert!(got_b[7 << 20..].iter().all(|&x| x == 0x77));
    assert!(got_b[..7 << 20].iter().all(|&x| x == 0));
    // qemu-img map over the image agrees that the zero ranges are zero.
    let map = qcow2_testdata::qemu_map(&a);
    assert!(map.as_array().unwrap().iter().any(|e| e["zero"] == true));
}

#[test]
fn nbdcopy_copies_both_ways() {
    let dir = scratch_dir("nbdcopy");
    let top = make_chain(&dir);
    let want = engine_bytes(&top);
    let src = Served::ours(&["-t", "-r", "-e", "0", path_str(&top)]);
    let raw = dir.join("copy.raw");
    run_ok("nbdcopy", &[&src.uri(""), path_str(&raw)]);
    assert_eq!(std::fs::read(&raw).unwrap(), want);
    // Into a fresh image, through the server; then NBD to NBD.
    let dst = dir.join("dst.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&dst), "16M"]);
    let d = Served::ours(&["-t", "-e", "0", path_str(&dst)]);
    run_ok("nbdcopy", &[path_str(&raw), &d.uri("")]);
    run_ok("nbdcopy", &["--flush", &src.uri(""), &d.uri("")]);
    assert!(d.stop().0.success());
    drop(src);
    assert_eq!(engine_bytes(&dst), want);
    assert_eq!(qcow2_testdata::qemu_check(&dst).0, 0);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            path_str(&top),
            path_str(&dst),
        ],
    );
}

/// fio's nbd engine: 4 MiB of 4K random writes at depth 8 to `uri`, each verified by reading
/// it back (`extra` adds jobs and offsets); its report.
fn fio_verified_writes(uri: &str, extra: &[&str]) -> String {
    let uri = format!("--uri={uri}");
    let mut args = vec![
        "--name=v",
        "--ioengine=nbd",
        &uri,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=4M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // fio would leave its verify state files in the working directory.
        "--verify_state_save=0",
    ];
    args.extend(extra);
    run_ok("fio", &args)
}

#[test]
fn fio_random_writes_verify_with_four_clients() {
    let dir = scratch_dir("fio_verify");
    let img = dir.join("fio.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "16M"]);
    let s = Served::ours(&["-t", "-e", "0", path_str(&img)]);
    let uri = s.uri("");
    let out = fio_verified_writes(
        &uri,
        &["--numjobs=4", "--offset_increment=4M", "--group_reporting"],
    );
    assert!(out.contains("v: (groupid=0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert_eq!(qcow2_testdata::qemu_check(&img).0, 0);
}

/// A raw NBD client that writes until told to stop, counting acknowledged writes.
fn writer_loop(sock: PathBuf, region: u64, acked: mpsc::Sender<()>) {
    let Ok(mut s) = UnixStream::connect(&sock) else {
        return;
    };
    let mut handshake = || -> std::io::Result<()> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        s.write_all(&3u32.to_be_bytes())?;
        s.write_all(&encode_option(OPT_GO, &encode_info_request("", &[])))?;
        // Replies to GO: INFO block size, INFO export, ACK (20-byte headers + payloads).
        for _ in 0..3 {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut d)?;
        }
        Ok(())
    };
    if handshake().is_err() {
        return;
    }
    let data = vec![0xc3u8; 65536];
    for i in 0u64.. {
        let off = region + (i * 69632) % (4 << 20);
        let req = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: i,
            offset: off,
            length: 65536,
        };
        let mut h = [0u8; 16];
        if s.write_all(&encode_request(&req, Replies::Simple)).is_err()
            || s.write_all(&data).is_err()
            || s.read_exact(&mut h).is_err()
            || acked.send(()).is_err()
        {
            return;
        }
    }
}

#[test]
fn kill_9_under_write_load_leaves_a_sound_image() {
    let dir = scratch_dir("kill9");
    let img = dir.join("k.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "16M"]);
    let s = Served::ours(&["-t", "-e", "0", path_str(&img)]);
    // Acknowledged with FUA (qemu-io sets it on every write): must survive.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 1M",
            "-c",
            "flush",
            &s.uri(""),
        ],
    );
    let (tx, rx) = mpsc::channel();
    let writers: Vec<_> = [4u64 << 20, 8 << 20]
        .into_iter()
        .map(|region| {
            let (sock, tx) = (s.sock.clone(), tx.clone());
            std::thread::spawn(move || writer_loop(sock, region, tx))
        })
        .collect();
    drop(tx);
    // Kill once both writers are well under way (a bounded number of acknowledgements).
    for _ in 0..200 {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("writers make progress");
    }
    s.signal(Signal::SIGKILL);
    for w in writers {
        w.join().unwrap();
    }
    drop(s);
    let (code, report) = qcow2_testdata::qemu_check(&img);
    assert!(code == 0 || code == 3, "check {code}: {report}");
    assert!(report.get("corruptions").is_none_or(|c| c == 0), "{report}");
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-r",
        "-c",
        "read -P 0x42 0 1M",
        path_str(&img),
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{out:?}"
    );
    // The engine opens it for writing (repairing what a dirty image needs) and reads it.
    let image = Image::open(&img, &OpenOptions::read_write()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    image.close().unwrap();
}

#[test]
fn sigterm_flushes_closes_and_removes_the_socket() {
    let dir = scratch_dir("sigterm");
    let img = dir.join("t.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "4M"]);
    let s = Served::ours(&["-t", path_str(&img)]);
    let (sock, pid_file) = (s.sock.clone(), s.pid_file.clone());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, s.child.id());
    // A write without flush or FUA, left to the shutdown to persist; the client stays connected.
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(&encode_option(OPT_EXPORT_NAME, b"")).unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    let req = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 65536,
        length: 4096,
    };
    c.write_all(&encode_request(&req, Replies::Simple)).unwrap();
    c.write_all(&[0x99; 4096]).unwrap();
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(&h[4..8], &[0, 0, 0, 0]);
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert!(!sock.exists());
    assert!(!pid_file.exists());
    let info = qcow2_testdata::qemu_info(&img);
    assert_ne!(info["dirty-flag"], true, "{info}");
    assert_eq!(qcow2_testdata::qemu_check(&img).0, 0);
    assert!(engine_bytes(&img)[65536..69632].iter().all(|&b| b == 0x99));
    // Without -t the server exits by itself once its only client leaves.
    let s = Served::ours(&[path_str(&img)]);
    run_ok("qemu-img", &["info", &s.uri("")]);
    let mut s = s;
    let status = s.child.wait().unwrap();
    assert!(status.success());
}

/// A chain (see [`make_chain`]) whose top carries a 128 KiB-granule bitmap `b0` with some
/// writes recorded, disabled afterwards or left recording.
fn make_chain_with_bitmap(dir: &Path, recording: bool) -> PathBuf {
    let top = make_chain(dir);
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", path_str(&top), "b0"]);
    // Whole clusters only, and the 4 KiB write of the chain's 8 MiB cluster filled up: QEMU
    // asks the file system about a cluster's unwritten tail (a sparse hole reads as zero); this
    // server answers from the qcow2 metadata alone.
    for c in [
        "write -P 5 5M 192k",
        "write -P 6 12M 64k",
        "write -P 8 8M 64k",
    ] {
        assert!(qemu_io(&["-f", "qcow2", "-c", c, path_str(&top)])
            .status
            .success());
    }
    if !recording {
        qemu_img_ok(&["bitmap", "--disable", path_str(&top), "b0"]);
    }
    top
}

/// Every context's map as nbdinfo prints it.
fn maps(uri: &str) -> Vec<String> {
    [
        "--map",
        "--map=qemu:allocation-depth",
        "--map=qemu:dirty-bitmap:b0",
    ]
    .iter()
    .map(|m| run_ok("nbdinfo", &[m, uri]))
    .collect()
}

#[test]
fn dirty_bitmap_contexts_match_qemu_nbd() {
    let dir = scratch_dir("serve_bitmap");
    let top = make_chain_with_bitmap(&dir, false);
    let img = path_str(&top);
    let ours = Served::ours(&["-t", "-r", "-e", "0", "-A", "-B", "b0", img]);
    let qemu = Served::qemu(&["-t", "-r", "-e", "0", "-A", "-B", "b0", img]);
    let (o, q) = (ours.uri(""), qemu.uri(""));
    // The same contexts listed, the same extents in each.
    assert_eq!(nbdinfo_json(&o), nbdinfo_json(&q));
    let (mo, mq) = (maps(&o), maps(&q));
    assert_eq!(mo, mq);
    let before = mo[2].clone();
    assert!(before.contains("dirty"), "{before}");
    assert!(ours.stop().0.success());
    drop(qemu);

    // Writable, the bitmap recording: a write through each server shows up dirty in both.
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&top, &copy).unwrap();
    qemu_img_ok(&["bitmap", "--enable", img, "b0"]);
    qemu_img_ok(&["bitmap", "--enable", path_str(&copy), "b0"]);
    let ours = Served::ours(&["-t", "-e", "0", "-A", "-B", "b0", img]);
    let qemu = Served::qemu(&["-t", "-e", "0", "-A", "-B", "b0", path_str(&copy)]);
    for s in [&ours, &qemu] {
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 7 9M 320k", &s.uri("")],
        );
    }
    let (mo, mq) = (maps(&ours.uri("")), maps(&qemu.uri("")));
    assert_eq!(mo, mq);
    assert_ne!(mo[2], before);
    let (status, err) = ours.stop();
    assert!(status.success(), "{err}");
    drop(qemu);
    // Closed cleanly, the bitmap saved with the write in it.
    assert_eq!(qcow2_testdata::qemu_check(&top).0, 0);
    let image = Image::open(&top, &OpenOptions::default().force_share(true)).unwrap();
    assert_eq!(
        image.dirty_extents("b0", 9 << 20, 320 << 10).unwrap(),
        vec![(9 << 20, 320 << 10)]
    );
}

#[test]
fn a_missing_bitmap_is_refused_before_listening() {
    let dir = scratch_dir("serve_bitmap_missing");
    let img = dir.join("m.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "4M"]);
    let sock = socket_path("bitmap-missing");
    let out = run(
        env!("CARGO_BIN_EXE_qcow2-tool"),
        &["serve", "-k", path_str(&sock), "-B", "nope", path_str(&img)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Bitmap 'nope' is not found"), "{err}");
    assert!(!sock.exists());
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
    let dir = scratch_dir("serve_hostile");
    let img = dir.join("d.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "16M"]);
    assert!(
        qemu_io(&["-f", "qcow2", "-c", "write -P 4 0 1M", path_str(&img)])
            .status
            .success()
    );
    // One client at a time (-e 1): each hostile connection must end for the next to start.
    let s = Served::ours(&["-t", path_str(&img)]);
    let go = encode_option(OPT_GO, &encode_info_request("", &[]));
    let request = |kind: u16, offset: u64, length: u64| {
        let r = Request {
            flags: 0,
            kind,
            cookie: 7,
            offset,
            length,
        };
        encode_request(&r, Replies::Simple)
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
            &IHAVEOPT.to_be_bytes(),
            &OPT_GO.to_be_bytes(),
            &u32::MAX.to_be_bytes(),
        ]),
        // INFO whose name length runs past the data.
        with(&[&flags, &encode_option(OPT_INFO, &u32::MAX.to_be_bytes())]),
        with(&[&flags, &encode_option(OPT_SET_META_CONTEXT, &[0; 3])]),
        with(&[&flags, &encode_option(OPT_EXPORT_NAME, b"no-such-export")]),
        // Transmission: a 4 GiB write, reads past the end, a bad magic, an unknown command.
        with(&[&flags, &go, &request(CMD_WRITE, 0, u32::MAX as u64)]),
        with(&[
            &flags,
            &go,
            &request(CMD_READ, 16 << 20, 4096),
            &request(CMD_READ, u64::MAX, 4096),
        ]),
        with(&[
            &flags,
            &go,
            &request(CMD_READ, 0, u32::MAX as u64),
            &[0xAB; 28],
        ]),
        with(&[
            &flags,
            &go,
            &request(42, 0, 0),
            &request(CMD_BLOCK_STATUS, 0, 4096),
        ]),
    ];
    for bytes in &cases {
        poke(&s.sock, bytes);
    }
    // The server still serves, and the image is intact.
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 4 0 1M", &s.uri("")],
    );
    assert!(out.contains("read 1048576/1048576"), "{out}");
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert_eq!(qcow2_testdata::qemu_check(&img).0, 0);
}

/// The open-file flags of the file a process `pid` holds at `path` (`/proc/PID/fdinfo`).
fn open_flags(pid: u32, path: &Path) -> Option<i32> {
    let want = path.canonicalize().unwrap();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
        return i32::from_str_radix(flags.trim(), 8).ok();
    }
    None
}

/// `--cache=none` (qemu-nbd's `-n`) serves around the page cache: the server holds the image
/// with O_DIRECT, and unaligned writes from qemu-io, fio's verified random writes and reads all
/// come back as written; the image stays clean for qemu-img. `--cache=writeback` does not.
#[test]
fn cache_none_serves_through_direct_io() {
    let dir = scratch_dir("serve_cache_none");
    let direct = nix::fcntl::OFlag::O_DIRECT.bits();
    for (mode, want_direct) in [
        ("--cache=none", true),
        ("-n", true),
        ("--cache=writeback", false),
    ] {
        let img = dir.join("d.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "16M"]);
        let s = Served::ours(&["-t", "-e", "0", mode, path_str(&img)]);
        let flags = open_flags(s.child.id(), &img).expect("the server holds the image");
        assert_eq!(flags & direct != 0, want_direct, "{mode}: flags {flags:o}");
        let uri = s.uri("");
        for c in [
            "write -P 5 1000 3000",
            "write -P 6 65000 70000",
            "write -z 8000 100",
        ] {
            run_ok("qemu-io", &["-f", "raw", "-c", c, &uri]);
        }
        fio_verified_writes(&uri, &["--offset=8M"]);
        let (status, err) = s.stop();
        assert!(status.success(), "{mode}: {err}");
        assert_eq!(qcow2_testdata::qemu_check(&img).0, 0, "{mode}");
        let bytes = engine_bytes(&img);
        let mut want = vec![0u8; 8 << 20];
        want[1000..4000].fill(5);
        want[65000..135_000].fill(6);
        want[8000..8100].fill(0);
        assert!(bytes[..8 << 20] == want[..], "{mode}: contents differ");
    }
}

/// `--aio` as qemu-nbd checks it: a bad or repeated mode, and `native` without `--cache=none`,
/// are refused with its messages; `native` with `--cache=none` serves (as oVirt's imageio runs
/// qemu-nbd).
#[test]
fn aio_modes_are_checked_as_qemu_nbd_checks_them() {
    require_qemu();
    let dir = scratch_dir("serve_aio");
    let img = dir.join("a.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "4M"]);
    let sock = socket_path("serve-aio");
    let refused: [&[&str]; 3] = [
        &["--aio=native"],
        &["--aio=bogus"],
        &["--aio=threads", "--aio=threads"],
    ];
    for bad in refused {
        let mut args = bad.to_vec();
        args.extend(["-k", path_str(&sock), path_str(&img)]);
        // A server that wrongly starts is stopped by the timeout (exit 124), not waited for.
        let ours = [
            &["10", env!("CARGO_BIN_EXE_qcow2-tool"), "serve"][..],
            &args,
        ]
        .concat();
        let theirs = [&["10", "qemu-nbd", "-f", "qcow2"][..], &args].concat();
        let (ours, theirs) = (run("timeout", &ours), run("timeout", &theirs));
        assert_eq!(ours.status.code(), Some(1), "{bad:?}");
        assert_eq!(theirs.status.code(), Some(1), "{bad:?}");
        let text = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            text(&ours).replace("qcow2-tool:", "qemu-nbd:"),
            text(&theirs),
            "{bad:?}"
        );
    }
    let s = Served::ours(&["-t", "--aio=native", "--cache=none", path_str(&img)]);
    let size = run_ok("nbdinfo", &["--size", &s.uri("")]);
    assert_eq!(size.trim(), (4u64 << 20).to_string());
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
}

/// `--detect-zeroes` as qemu-nbd applies it: a client's WRITE of zeros over data stays data
/// (`off`), becomes zero clusters that keep their space (`on`) or that free it (`unmap`); the
/// image then maps as qemu-nbd leaves the same image.
#[test]
fn detect_zeroes_turns_zero_writes_into_zero_clusters_as_qemu_nbd_does() {
    require_qemu();
    let dir = scratch_dir("serve_detect_zeroes");
    for mode in ["off", "on", "unmap"] {
        let mut maps = Vec::new();
        for server in ["ours", "qemu"] {
            let img = dir.join(format!("{server}-{mode}.qcow2"));
            let _ = std::fs::remove_file(&img);
            qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&img), "4M"]);
            assert!(qemu_io(&["-c", "write -P 1 0 2M", path_str(&img)])
                .status
                .success());
            let detect = format!("--detect-zeroes={mode}");
            let args = ["-t", "--discard=unmap", &detect, path_str(&img)];
            let s = if server == "ours" {
                Served::ours(&args)
            } else {
                Served::qemu(&args)
            };
            run_ok(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 0 64k 1M", &s.uri("")],
            );
            let (status, err) = s.stop();
            assert!(status.success(), "{server} {mode}: {err}");
            assert_eq!(qcow2_testdata::qemu_check(&img).0, 0, "{server} {mode}");
            let mut map = qcow2_testdata::qemu_map(&img);
            // Host offsets differ with allocation order; what is allocated and zero must not.
            for extent in map.as_array_mut().unwrap() {
                if let Some(e) = extent.as_object_mut() {
                    e.insert("offset".into(), e.contains_key("offset").into());
                }
            }
            maps.push(map);
        }
        assert_eq!(maps[0], maps[1], "--detect-zeroes={mode}");
    }
}
