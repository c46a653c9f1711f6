//! Commands never destroy data they were not asked to change: a target that is also a source
//! (under any name) is refused, and so is a target another process holds open, before the first
//! write. Each case hashes every file before and after.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{stderr, tool_in};
use qcow2_testdata::{qemu_img_ok, qemu_io, scratch_dir};

/// Every file under `dir` and its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_file() {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        } else if p.is_dir() {
            out.extend(snapshot(&p));
        }
    }
    out
}

/// A base with data, an overlay over it, and other names for the base.
fn chain(dir: &Path) {
    let d = |n: &str| dir.join(n).to_str().unwrap().to_string();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("base.qcow2"), "4M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 0 1M", &d("base.qcow2")]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &d("top.qcow2"),
    ]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0xa5 2M 1M", &d("top.qcow2")]);
    std::os::unix::fs::symlink("base.qcow2", dir.join("link.qcow2")).unwrap();
    std::fs::hard_link(dir.join("base.qcow2"), dir.join("hard.qcow2")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
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
fn a_destination_that_is_also_a_source_is_refused_under_every_name() {
    let dir = scratch_dir("safety_same_file");
    chain(&dir);
    let before = snapshot(&dir);
    // (source, destination): the source itself, or a file of its chain, by other names.
    let cases = [
        ("base.qcow2", "base.qcow2"),
        ("base.qcow2", "./base.qcow2"),
        ("base.qcow2", "sub/../base.qcow2"),
        ("base.qcow2", "link.qcow2"),
        ("base.qcow2", "hard.qcow2"),
        ("top.qcow2", "top.qcow2"),
        ("top.qcow2", "base.qcow2"),
        ("top.qcow2", "link.qcow2"),
        ("top.qcow2", "hard.qcow2"),
    ];
    for (src, dst) in cases {
        for format in ["raw", "qcow2"] {
            let out = tool_in(Some(&dir), &["convert", "-O", format, src, dst]);
            assert_eq!(
                out.status.code(),
                Some(1),
                "convert {src} -> {dst} ({format})"
            );
            let err = stderr(&out);
            assert!(
                err.contains(dst) && err.contains("also an input"),
                "convert {src} -> {dst}: {err}"
            );
            assert!(
                snapshot(&dir) == before,
                "convert {src} -> {dst} changed a file"
            );
        }
    }
    // create: a new image may not replace its own backing file under another name.
    for dst in ["hard.qcow2", "sub/../hard.qcow2"] {
        let out = tool_in(
            Some(&dir),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                dst,
            ],
        );
        assert_eq!(out.status.code(), Some(1), "create {dst}");
        assert!(stderr(&out).contains("also an input"), "{}", stderr(&out));
        assert!(snapshot(&dir) == before, "create {dst} changed a file");
    }
    // A different file is written as usual.
    let out = tool_in(
        Some(&dir),
        &["convert", "-O", "raw", "top.qcow2", "top.raw"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A QEMU process holding `image` open for writing, until dropped.
struct Holder(Child);

impl Holder {
    fn start(image: &Path) -> Holder {
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        // Bounded wait until qemu-io holds its locks (it takes them before reading commands).
        for _ in 0..100_000 {
            if ofd_locked(image) {
                return Holder(child);
            }
            std::thread::yield_now();
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("qemu-io never locked {}", image.display());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_target_in_use_by_qemu_is_not_touched() {
    let dir = scratch_dir("safety_locked");
    chain(&dir);
    let _holder = Holder::start(&dir.join("top.qcow2"));
    let before = snapshot(&dir);
    let attempts: [&[&str]; 4] = [
        &["create", "-q", "-f", "qcow2", "top.qcow2", "1M"],
        &["create", "-q", "-f", "raw", "top.qcow2", "1M"],
        &["convert", "-O", "qcow2", "base.qcow2", "top.qcow2"],
        &["convert", "-O", "raw", "base.qcow2", "top.qcow2"],
    ];
    for args in attempts {
        let out = tool_in(Some(&dir), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("Failed to get \"write\" lock"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(snapshot(&dir) == before, "{args:?} changed a file");
    }
}

#[test]
fn a_full_or_closed_stdout_is_reported_once_and_never_skips_work() {
    let dir = scratch_dir("safety_stdout");
    chain(&dir);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qcow2-tool"))
            .args(args)
            .current_dir(&dir)
            .stdout(full())
            .output()
            .unwrap()
    };
    // Every write of the script lands although nothing it prints can be.
    let out = run(&[
        "io",
        "-c",
        "write -P 1 0 4k",
        "-c",
        "write -P 2 64k 4k",
        "-c",
        "write -P 3 128k 4k",
        "top.qcow2",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("standard output").count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (pattern, offset) in [(1, "0"), (2, "64k"), (3, "128k")] {
        let check = qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pattern} {offset} 4k"),
            dir.join("top.qcow2").to_str().unwrap(),
        ]);
        assert!(
            String::from_utf8_lossy(&check.stdout).contains("read 4096/4096"),
            "write {pattern} at {offset} was skipped"
        );
    }
    for args in [
        &["info", "top.qcow2"][..],
        &["info", "--output=json", "top.qcow2"],
        &["map", "top.qcow2"],
        &["check", "top.qcow2"],
        &["compare", "base.qcow2", "hard.qcow2"],
    ] {
        let out = run(args);
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
        assert!(err.contains("standard output"), "{args:?}: {err}");
    }
}

#[test]
fn check_repair_clears_the_corrupt_mark_of_a_consistent_image_and_nothing_else() {
    use std::os::unix::fs::FileExt;
    let dir = scratch_dir("safety_corrupt_bit");
    chain(&dir);
    let path = dir.join("base.qcow2");
    let clean = std::fs::read(&path).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&2u64.to_be_bytes(), 72).unwrap();
    drop(f);
    let corrupt =
        |p: &Path| qcow2_testdata::qemu_info(p)["format-specific"]["data"]["corrupt"].clone();
    assert_eq!(corrupt(&path), true);
    let marked = std::fs::read(&path).unwrap();
    // Writing refuses a corrupt image; either repair clears the mark, as with qemu-img.
    let out = tool_in(Some(&dir), &["io", "-c", "write 0 512", "base.qcow2"]);
    assert_ne!(out.status.code(), Some(0));
    for mode in ["leaks", "all"] {
        std::fs::write(&path, &marked).unwrap();
        let qemu_copy = dir.join("qemu.qcow2");
        std::fs::write(&qemu_copy, &marked).unwrap();
        let q = qcow2_testdata::qemu_img(&["check", "-r", mode, qemu_copy.to_str().unwrap()]);
        assert_eq!(q.status.code(), Some(0));
        assert_eq!(corrupt(&qemu_copy), false);
        let out = tool_in(Some(&dir), &["check", "-r", mode, "base.qcow2"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(corrupt(&path), false);
        assert!(
            std::fs::read(&path).unwrap() == clean,
            "more than the mark changed"
        );
    }
}

#[test]
fn backing_and_data_files_that_are_not_files_or_not_allowed_are_refused() {
    let dir = scratch_dir("safety_named_files");
    let d = |n: &str| dir.join(n).to_str().unwrap().to_string();
    std::fs::create_dir(dir.join("vm")).unwrap();
    std::fs::create_dir(dir.join("elsewhere")).unwrap();
    // A FIFO as the backing file: opening it for reading would block forever.
    let fifo = dir.join("vm/fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "fifo",
        "-F",
        "raw",
        &d("vm/over-fifo.qcow2"),
        "1M",
    ]);
    // A character device as the data file: writes would be acknowledged and read back as zeros.
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", d("vm/data.raw")),
        &d("vm/with-data.qcow2"),
        "1M",
    ]);
    std::fs::remove_file(dir.join("vm/data.raw")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("vm/data.raw")).unwrap();
    // A backing file outside the image's directory.
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &d("elsewhere/secret.qcow2"),
        "1M",
    ]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../elsewhere/secret.qcow2",
        "-F",
        "qcow2",
        &d("vm/over-outside.qcow2"),
    ]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "with-data.qcow2",
        "-F",
        "qcow2",
        "-u",
        &d("vm/over-local.qcow2"),
        "1M",
    ]);
    let before = snapshot(&dir);
    let vm = dir.join("vm");
    let cases: [(&[&str], &str); 9] = [
        (&["map", "over-fifo.qcow2"], "FIFO"),
        (
            &["info", "--backing-chain", "over-fifo.qcow2"],
            "not a regular file",
        ),
        (
            &[
                "info",
                "--backing-files=beside",
                "--backing-chain",
                "over-outside.qcow2",
            ],
            "not allowed",
        ),
        (
            &["commit", "--backing-files=beside", "over-outside.qcow2"],
            "backing policy",
        ),
        (
            &["convert", "-O", "raw", "over-fifo.qcow2", "../out.raw"],
            "FIFO",
        ),
        (
            &["io", "-c", "write -P 1 0 4k", "with-data.qcow2"],
            "character device",
        ),
        (
            &["--backing-files=beside", "map", "over-outside.qcow2"],
            "backing policy",
        ),
        (
            &["map", "--backing-files=refuse", "over-outside.qcow2"],
            "backing policy",
        ),
        (
            &[
                "--backing-files",
                "refuse",
                "compare",
                "over-outside.qcow2",
                "over-outside.qcow2",
            ],
            "backing policy",
        ),
    ];
    for (args, why) in cases {
        let out = tool_in(Some(&vm), args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
        assert!(snapshot(&dir) == before, "{args:?} changed a file");
    }
    // compare keeps qemu-img's error code 2 with a global option before the subcommand.
    let out = tool_in(
        Some(&vm),
        &[
            "--backing-files=refuse",
            "compare",
            "over-outside.qcow2",
            "over-outside.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    // What the policy allows still works: the default follows, `beside` allows the directory.
    let out = tool_in(Some(&vm), &["map", "over-outside.qcow2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(dir.join("vm/data.raw")).unwrap();
    std::fs::write(dir.join("vm/data.raw"), vec![0u8; 1 << 20]).unwrap();
    let out = tool_in(
        Some(&vm),
        &["--backing-files=beside", "map", "over-local.qcow2"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn io_stops_at_the_command_that_marked_the_image_corrupt() {
    use std::os::unix::fs::FileExt;
    let dir = scratch_dir("safety_io_corrupt");
    let path = dir.join("d.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "1M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 64k", p]);
    // Point guest cluster 0 at the L1 table itself: an in-place write there is refused by the
    // overlap guard, which marks the image corrupt.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let u64_at = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = u64_at(40);
    let l2 = u64_at(l1) & 0x00FF_FFFF_FFFF_FE00;
    f.write_all_at(&(l1 | 1 << 63).to_be_bytes(), l2).unwrap();
    drop(f);
    let out = tool_in(
        Some(&dir),
        &[
            "io",
            "-c",
            "write -P 2 0 4k",
            "-c",
            "write -P 3 128k 4k",
            "d.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("Marking image as corrupt"), "{err}");
    // As qemu-io: the image is ejected, so the next command fails without touching it.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("write failed: Input/output error")
            && text.contains("write failed: No medium found"),
        "{text}"
    );
    let info = qcow2_testdata::qemu_info(&path);
    assert_eq!(info["format-specific"]["data"]["corrupt"], true);
    let map = qcow2_testdata::qemu_map(&path);
    let second = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["start"].as_u64() == Some(128 << 10) || {
                let s = e["start"].as_u64().unwrap();
                s < 128 << 10 && s + e["length"].as_u64().unwrap() > 128 << 10
            }
        })
        .unwrap();
    assert_eq!(
        second["data"], false,
        "the command after the corruption ran: {map}"
    );
}

#[test]
fn an_external_data_mapping_away_from_the_guest_offset_is_refused_like_qemu_does() {
    use std::os::unix::fs::FileExt;
    let dir = scratch_dir("safety_data_identity");
    let path = dir.join("d.qcow2");
    let data = dir.join("d.raw");
    let p = path.to_str().unwrap();
    for raw in ["off", "on"] {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&data);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw={raw}", data.display()),
            p,
            "1M",
        ]);
        qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 128k", p]);
        // Guest cluster 0 now claims the data file's second cluster.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let u64_at = |at: u64| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, at).unwrap();
            u64::from_be_bytes(b)
        };
        let l2 = u64_at(u64_at(40)) & 0x00FF_FFFF_FFFF_FE00;
        f.write_all_at(&u64_at(l2 + 8).to_be_bytes(), l2).unwrap();
        drop(f);
        let data_before = std::fs::read(&data).unwrap();
        let qemu = qemu_io(&["-f", "qcow2", "-r", "-c", "read 0 4k", p]);
        assert!(String::from_utf8_lossy(&qemu.stdout).contains("read failed"));
        let out = tool_in(Some(&dir), &["io", "-r", "-c", "read 0 4k", "d.qcow2"]);
        assert_eq!(out.status.code(), Some(1), "data_file_raw={raw}");
        let out = tool_in(Some(&dir), &["io", "-c", "write -P 2 0 4k", "d.qcow2"]);
        assert_eq!(out.status.code(), Some(1), "data_file_raw={raw}");
        let text = format!("{}{}", common::stdout(&out), stderr(&out));
        assert!(text.contains("does not match guest offset"), "{text}");
        assert!(
            std::fs::read(&data).unwrap() == data_before,
            "the data file changed"
        );
        let info = qcow2_testdata::qemu_info(&path);
        assert_eq!(info["format-specific"]["data"]["corrupt"], true);
    }
}

/// `-U` on the commands that only read: with a qemu-io writer holding the image, every command
/// is refused without `-U` and runs with it, exactly as qemu-img's (exit codes and output).
#[test]
fn force_share_reads_an_image_a_writer_holds_as_qemu_img_does() {
    let dir = scratch_dir("safety_force_share");
    chain(&dir);
    let _holder = Holder::start(&dir.join("top.qcow2"));
    let commands: [&[&str]; 6] = [
        &["info", "top.qcow2"],
        &["map", "--output=json", "top.qcow2"],
        &["check", "top.qcow2"],
        &["compare", "top.qcow2", "top.qcow2"],
        &["convert", "-O", "raw", "top.qcow2", "out.raw"],
        &["snapshot", "-l", "top.qcow2"],
    ];
    for command in commands {
        for shared in [false, true] {
            let mut args = vec![command[0]];
            if shared {
                args.push("-U");
            }
            args.extend_from_slice(&command[1..]);
            let ours = tool_in(Some(&dir), &args);
            let theirs = Command::new("qemu-img")
                .args(&args)
                .current_dir(&dir)
                .output()
                .expect("qemu-img");
            assert_eq!(
                ours.status.code(),
                theirs.status.code(),
                "{args:?}: ours {}, qemu-img {}",
                stderr(&ours),
                String::from_utf8_lossy(&theirs.stderr)
            );
            assert_eq!(ours.status.success(), shared, "{args:?}: {}", stderr(&ours));
            if shared && command[0] != "check" {
                assert_eq!(
                    String::from_utf8_lossy(&ours.stdout),
                    String::from_utf8_lossy(&theirs.stdout),
                    "{args:?}"
                );
            }
            let _ = std::fs::remove_file(dir.join("out.raw"));
        }
    }
}
