//! Messages, options and names of create, rebase, info, check and qemu-io's `open` that
//! qemu-iotests match on (issue 20), each run with real qemu-img/qemu-io and with our tool under
//! the same name in the same directory: both must print the same and exit alike.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use qcow2_testdata::{qemu_img_ok, scratch_dir};

/// Runs the real `qemu-img` or `qemu-io` in `dir`.
fn qemu_tool(name: &str, dir: &Path, args: &[&str]) -> Output {
    qcow2_testdata::require_qemu();
    Command::new(name)
        .args(args)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("run the qemu tool")
}

/// Runs `name` (qemu-img or qemu-io) and our tool as it with `args` in `dir`, asserting the
/// same output and exit code; returns our output.
fn assert_same(name: &str, dir: &Path, args: &[&str]) -> Output {
    let qemu = qemu_tool(name, dir, args);
    let out = ours_as(name, dir, args);
    no_panic(&out);
    let what = args.join(" ");
    // qemu-io's timing lines differ run to run.
    let untimed = |o: &Output| -> Vec<String> {
        stdout(o)
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(stderr(&out), stderr(&qemu), "{what}: stderr");
    assert_eq!(untimed(&out), untimed(&qemu), "{what}: stdout");
    assert_eq!(code(&out), code(&qemu), "{what}: exit code");
    out
}

fn create(dir: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    assert!(qemu_tool("qemu-img", dir, &all).status.success());
}

/// Patches big-endian bytes into an image file.
fn poke(path: &Path, offset: usize, bytes: &[u8]) {
    let mut image = std::fs::read(path).unwrap();
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, image).unwrap();
}

/// qemu-iotests 043, 110, 126, 279: info names the image by its file however the file was
/// given (`--image-opts`, `json:`, `file:`), resolves the backing file against it, and stops at
/// a chain that loops.
#[test]
fn info_names_images_given_by_options_and_stops_at_loops() {
    let dir = scratch_dir("info_names");
    create(&dir, &["base.qcow2", "1M"]);
    create(&dir, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    create(
        &dir,
        &["-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2"],
    );
    let opts = "driver=qcow2,file.driver=file,file.filename=top.qcow2";
    assert_same(
        "qemu-img",
        &dir,
        &["info", "--backing-chain", "--image-opts", opts],
    );
    let json = "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'}}";
    assert_same("qemu-img", &dir, &["info", json]);
    assert_same("qemu-img", &dir, &["info", "file:image:top.qcow2"]);
    assert_same(
        "qemu-img",
        &dir,
        &["info", "--output=json", "file:image:top.qcow2"],
    );
    qemu_img_ok(&[
        "rebase",
        "-u",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        path_str(&dir.join("base.qcow2")),
    ]);
    assert_same("qemu-img", &dir, &["info", "--backing-chain", "top.qcow2"]);
}

/// qemu-iotests 036 and 054: unknown incompatible features are named from the image's feature
/// table, and a virtual size no L1 table can cover is "too big", in qemu's words.
#[test]
fn header_refusals_use_qemu_words() {
    let dir = scratch_dir("header_refusals");
    create(&dir, &["features.qcow2", "1M"]);
    let path = dir.join("features.qcow2");
    let image = std::fs::read(&path).unwrap();
    // The feature table follows the 112-byte header; its first entry names incompatible bit 0.
    let table = 112;
    assert_eq!(image[table..table + 4], 0x6803_f857u32.to_be_bytes());
    poke(&path, table + 8 + 1, &[63]);
    poke(&path, 72, &0xc000_0000_0000_0000u64.to_be_bytes());
    assert_same("qemu-img", &dir, &["info", "features.qcow2"]);

    create(&dir, &["big.qcow2", "1M"]);
    poke(&dir.join("big.qcow2"), 24, &(1u64 << 60).to_be_bytes());
    assert_same("qemu-img", &dir, &["check", "big.qcow2"]);
    assert_same("qemu-img", &dir, &["check", "missing.qcow2"]);
}

/// qemu-iotests 031 and 314: `rebase -u` records any format qemu knows, and `rebase -c` writes
/// the clusters it copies compressed.
#[test]
fn rebase_records_qemu_formats_and_compresses() {
    let dir = scratch_dir("rebase_messages");
    create(&dir, &["top.qcow2", "1M"]);
    for format in ["host_device", "foo"] {
        assert_same(
            "qemu-img",
            &dir,
            &["rebase", "-u", "-b", "/x", "-F", format, "top.qcow2"],
        );
    }
    std::fs::write(dir.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    assert_same(
        "qemu-img",
        &dir,
        &["rebase", "-c", "-f", "raw", "-b", "", "disk.raw"],
    );
    assert_same(
        "qemu-img",
        &dir,
        &["rebase", "-f", "raw", "-b", "", "disk.raw"],
    );

    for side in ["ours", "theirs"] {
        let base = format!("{side}-base.qcow2");
        create(&dir, &[&base, "1M"]);
        let data = qemu_tool("qemu-io", &dir, &["-c", "write -P 0x5a 0 320k", &base]);
        assert!(data.status.success());
        create(
            &dir,
            &["-b", &base, "-F", "qcow2", &format!("{side}.qcow2")],
        );
    }
    let args = ["rebase", "-c", "-b", "", "theirs.qcow2"];
    assert!(qemu_tool("qemu-img", &dir, &args).status.success());
    let args = ["rebase", "-c", "-b", "", "ours.qcow2"];
    assert!(ours_as("qemu-img", &dir, &args).status.success());
    let check = |name: &str| stdout(&qemu_tool("qemu-img", &dir, &["check", name]));
    assert_eq!(check("ours.qcow2"), check("theirs.qcow2"));
    assert!(check("ours.qcow2").contains("100.00% compressed clusters"));
}

/// qemu-iotests 114 and 226: `open` checks the host file against the protocol driver named,
/// and `backing.driver` overrides the backing format the image records.
#[test]
fn io_open_checks_protocols_and_backing_driver() {
    let dir = scratch_dir("io_open_protocols");
    std::fs::create_dir_all(dir.join("adir")).unwrap();
    for protocol in ["file", "host_device", "host_cdrom"] {
        for (flag, file) in [("-r", "adir"), ("", "adir"), ("-r", "/dev/null")] {
            let open = format!("open {flag} -o driver={protocol},filename={file},locking=off");
            assert_same("qemu-io", &dir, &["-c", &open]);
        }
    }
    std::fs::write(dir.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    create(&dir, &["-b", "base.raw", "-F", "raw", "top.qcow2"]);
    let image = std::fs::read(dir.join("top.qcow2")).unwrap();
    let ext = image
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .expect("backing format extension");
    poke(&dir.join("top.qcow2"), ext + 8, b"foo");
    assert_same("qemu-io", &dir, &["-c", "read 0 4k", "top.qcow2"]);
    let open = "open -o backing.driver=raw top.qcow2";
    let out = assert_same("qemu-io", &dir, &["-c", open, "-c", "read -P 0 0 4k"]);
    assert!(stdout(&out).contains("read 4096/4096"));
}

/// qemu-iotests 243 and 112: the file protocol's `extent_size_hint` is taken (and its limit
/// checked), and a negative `refcount_bits` is a number to qemu (it wraps), so the image is
/// announced before the width is refused.
#[test]
fn create_reads_options_as_qemu_does() {
    let dir = scratch_dir("create_options");
    for opts in [
        "preallocation=off,extent_size_hint=0",
        "extent_size_hint=1M",
        "extent_size_hint=8G",
        "refcount_bits=-1",
        "refcount_bits=-0",
        "refcount_bits= 16",
        "refcount_bits=--1",
    ] {
        assert_same(
            "qemu-img",
            &dir,
            &["create", "-f", "qcow2", "-o", opts, "new.qcow2", "1M"],
        );
    }
}

/// qemu-iotests 072 and 089: a qcow2 image stored as the guest disk of another opens through
/// both layers, and qemu-io's `info` shows the VM state offset.
#[test]
fn io_opens_a_qcow2_image_inside_another() {
    let dir = scratch_dir("nested_qcow2");
    create(&dir, &["inner.qcow2", "1M"]);
    let write = ["-c", "write -P 42 0 64k", "inner.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &write).status.success());
    create(&dir, &["outer.qcow2", "2M"]);
    let args = [
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "inner.qcow2",
        "outer.qcow2",
    ];
    assert!(qemu_tool("qemu-img", &dir, &args).status.success());
    // Not a qcow2 image inside: the inner layer refuses it in qemu's words.
    let open = "open -o driver=qcow2,file.driver=qcow2,file.file.filename=inner.qcow2";
    assert_same("qemu-io", &dir, &["-c", open]);
    let open = "open -o driver=qcow2,file.driver=qcow2,file.file.filename=outer.qcow2";
    let out = assert_same("qemu-io", &dir, &["-c", open, "-c", "read -P 42 0 64k"]);
    assert!(stdout(&out).contains("read 65536/65536"));
    assert_same("qemu-io", &dir, &["-c", "info", "outer.qcow2"]);
}

/// qemu-iotests 074 and 089: blkdebug error rules (from a config file or `inject-error`
/// options) fail the requests that follow the event they name, as QEMU's blkdebug does.
#[test]
fn blkdebug_rules_fail_requests_after_their_event() {
    let dir = scratch_dir("blkdebug_rules");
    create(&dir, &["a.qcow2", "1M"]);
    create(&dir, &["b.qcow2", "1M"]);
    let write = ["-c", "write -P 7 512 512", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &write).status.success());
    let rules = "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n";
    std::fs::write(dir.join("rules.conf"), rules).unwrap();
    for (a, b) in [
        ("blkdebug:rules.conf:a.qcow2", "b.qcow2"),
        ("b.qcow2", "blkdebug:rules.conf:a.qcow2"),
    ] {
        assert_same("qemu-img", &dir, &["compare", a, b]);
    }
    let json = r#"json:{"driver": "qcow2", "file": {"driver": "blkdebug",
        "inject-error": [{"event": "l2_load"}], "image.filename": "a.qcow2"}}"#;
    let out = assert_same("qemu-io", &dir, &["-c", "read -P 7 512 512", json]);
    assert!(stdout(&out).contains("read failed: Input/output error"));
}

/// qemu-iotest 066: `set-state` rules move blkdebug's state and `inject-error` rules act only in
/// theirs, so a second `write_aio` fails; a run of clusters with a preallocated zero cluster in
/// it goes out as one write, so the write succeeds and the clusters stay where they were.
#[test]
fn blkdebug_states_and_one_write_over_preallocated_zeros() {
    let dir = scratch_dir("blkdebug_states");
    create(&dir, &["a.qcow2", "192k"]);
    let write = ["-c", "write -P 42 0 192k", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &write).status.success());
    let map = qemu_tool("qemu-img", &dir, &["map", "--output=json", "a.qcow2"]);
    let zero = ["-c", "write -z 64k 64k", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &zero).status.success());
    let json = r#"json:{"driver": "qcow2", "file": {"driver": "blkdebug",
        "image.filename": "a.qcow2",
        "set-state": [{"event": "write_aio", "new_state": 2}],
        "inject-error": [{"event": "write_aio", "state": 2}]}}"#;
    let out = assert_same("qemu-io", &dir, &["-c", "write -P 42 0 192k", json]);
    assert!(stdout(&out).contains("wrote 196608/196608"));
    assert_eq!(
        stdout(&ours_as(
            "qemu-img",
            &dir,
            &["map", "--output=json", "a.qcow2"]
        )),
        stdout(&map)
    );
}

/// qemu-iotest 179: zero writes over clusters that already read as zeros leave their L2 table
/// alone, so an `l2_update` rule never fires.
#[test]
fn zero_writes_over_zeros_write_no_l2_table() {
    let dir = scratch_dir("blkdebug_l2_update");
    create(&dir, &["a.qcow2", "4M"]);
    let setup = [
        "-c",
        "write 0 2M",
        "-c",
        "write -z 0 1M",
        "-c",
        "write -z -u 1M 1M",
    ];
    let mut args = setup.to_vec();
    args.push("a.qcow2");
    assert!(qemu_tool("qemu-io", &dir, &args).status.success());
    let rules = "[inject-error]\nevent = \"l2_update\"\nerrno = \"5\"\nimmediately = \"on\"\n";
    std::fs::write(dir.join("rules.conf"), rules).unwrap();
    for write in ["write -z 0 1M", "write -z -u 1M 1M"] {
        let out = assert_same(
            "qemu-io",
            &dir,
            &["-c", write, "blkdebug:rules.conf:a.qcow2"],
        );
        assert!(stdout(&out).contains("wrote"), "{write}");
    }
}

/// qemu-iotest 074: with stdout a pipe, compare's size warning (stdout, buffered as C stdio
/// buffers it) comes after its read error (stderr), as both streams merged show it.
#[test]
fn compare_prints_its_error_before_its_buffered_report() {
    let dir = scratch_dir("compare_buffered");
    create(&dir, &["a.qcow2", "1M"]);
    create(&dir, &["b.qcow2", "0"]);
    let write = ["-c", "write -P 7 512 512", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &write).status.success());
    let rules = "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n";
    std::fs::write(dir.join("rules.conf"), rules).unwrap();
    // Links the tool in as ./qemu-img.
    ours_as("qemu-img", &dir, &["--version"]);
    let merged = |tool: &str| {
        let script = format!("{tool} compare blkdebug:rules.conf:a.qcow2 b.qcow2 2>&1; echo $?");
        let out = Command::new("sh")
            .args(["-c", &script])
            .env("LC_ALL", "C")
            .current_dir(&dir)
            .output()
            .unwrap();
        stdout(&out)
    };
    qcow2_testdata::require_qemu();
    let ours = merged("./qemu-img");
    assert_eq!(ours, merged("qemu-img"));
    assert!(
        ours.contains("Input/output error\nWarning: Image size mismatch!\n"),
        "{ours}"
    );
}

/// qemu-iotest 204: qemu-io's `alloc` counts no further than the end of the disk, and
/// qemu-img map takes `--image-opts` with a blkdebug node over the image.
#[test]
fn alloc_stops_at_the_end_and_map_takes_image_opts() {
    let dir = scratch_dir("alloc_end");
    create(&dir, &["a.qcow2", "1M"]);
    let out = assert_same("qemu-io", &dir, &["-c", "alloc 512k 5P", "a.qcow2"]);
    assert!(stdout(&out).contains("0/524288 bytes"));
    assert!(
        qemu_tool("qemu-io", &dir, &["-c", "write 0 64k", "a.qcow2"])
            .status
            .success()
    );
    let opts = "driver=blkdebug,image.driver=qcow2,image.file.driver=file,\
                image.file.filename=a.qcow2,align=4k";
    assert_same("qemu-img", &dir, &["map", "--image-opts", opts]);
}

/// qemu-iotest 204: a zero write through a blkdebug node with `opt-write-zero` leaves data
/// where its pieces are smaller than that alignment, as QEMU's fallback writes zeros there.
#[test]
fn zero_writes_through_blkdebug_split_at_its_alignment() {
    let dir = scratch_dir("blkdebug_zero_align");
    create(&dir, &["-o", "cluster_size=1M", "a.qcow2", "64M"]);
    let fill = ["-c", "write -P 1 0 64M", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &fill).status.success());
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    let open = |image: &str| {
        format!(
            "open -o driver=blkdebug,image.driver=qcow2,align=512,opt-write-zero=15M,\
             max-write-zero=15M blkdebug::{image}"
        )
    };
    let qemu = qemu_tool(
        "qemu-io",
        &dir,
        &["-c", &open("a.qcow2"), "-c", "write -z 32M 32M"],
    );
    let ours = ours_as(
        "qemu-io",
        &dir,
        &["-c", &open("b.qcow2"), "-c", "write -z 32M 32M"],
    );
    assert!(
        qemu.status.success() && ours.status.success(),
        "{}",
        stderr(&ours)
    );
    let map = |image: &str| stdout(&qemu_tool("qemu-img", &dir, &["map", image]));
    let ours_map = map("b.qcow2");
    assert_eq!(ours_map, map("a.qcow2").replace("a.qcow2", "b.qcow2"));
    assert!(ours_map.contains("0x2d00000"), "{ours_map}");
}

/// qemu-iotest 251: `convert --salvage` through a blkdebug node above the format warns once
/// per sector whose block status or read fails, in qemu-img's order, and copies such sectors
/// as data (status) or zeros (read); `-O` defaults to raw.
#[test]
fn convert_salvage_warns_and_copies_what_it_can() {
    let dir = scratch_dir("convert_salvage");
    create(&dir, &["a.qcow2", "8M"]);
    let fill = ["-c", "write -P 42 0 8M", "a.qcow2"];
    assert!(qemu_tool("qemu-io", &dir, &fill).status.success());
    let rule = |iotype: &str, offset: u64| {
        format!(
            "{{ 'event': 'none', 'iotype': '{iotype}', 'errno': 5, 'sector': {} }}",
            offset / 512
        )
    };
    let rules = [
        rule("block-status", 2 * 1024 * 1024 + 4096),
        rule("read", 3 * 1024 * 1024 - 65536),
        rule("block-status", 5 * 1024 * 1024 + 512),
        rule("read", 5 * 1024 * 1024 + 512),
        rule("read", 6 * 1024 * 1024),
        rule("read", 6 * 1024 * 1024 + 512),
    ];
    let source = format!(
        "json:{{'driver': 'blkdebug', 'image': {{'driver': 'qcow2', 'file': {{'driver': \
         'file', 'filename': 'a.qcow2'}}}}, 'inject-error': [{}]}}",
        rules.join(", ")
    );
    let qemu = qemu_tool(
        "qemu-img",
        &dir,
        &["convert", "--salvage", &source, "q.raw"],
    );
    let ours = ours_as(
        "qemu-img",
        &dir,
        &["convert", "--salvage", &source, "o.raw"],
    );
    no_panic(&ours);
    assert_eq!(stderr(&ours), stderr(&qemu));
    assert_eq!(code(&ours), code(&qemu));
    assert_eq!(
        stderr(&ours).matches("warning").count(),
        8,
        "{}",
        stderr(&ours)
    );
    let compare = qemu_tool("qemu-img", &dir, &["compare", "q.raw", "o.raw"]);
    assert!(compare.status.success(), "{}", stdout(&compare));
}

/// qemu-iotest 020: commit's `-b` name is taken relative to each overlay, not to the working
/// directory: from outside the images' directory, a path through it does not match.
#[test]
fn commit_base_names_are_relative_to_the_overlay() {
    let dir = scratch_dir("commit_base_names");
    let sub = dir.join("subdir");
    std::fs::create_dir_all(&sub).unwrap();
    create(&sub, &["t.base", "1M"]);
    create(&sub, &["-b", "t.base", "-F", "qcow2", "t.mid"]);
    create(&sub, &["-b", "t.mid", "-F", "qcow2", "t.top"]);
    let absolute = sub.join("t.mid");
    for base in ["t.mid", "subdir/t.mid", absolute.to_str().unwrap()] {
        assert_same("qemu-img", &dir, &["commit", "-b", base, "subdir/t.top"]);
    }
    let out = assert_same(
        "qemu-img",
        &dir,
        &["commit", "-b", "subdir/t.mid", "subdir/t.top"],
    );
    assert!(stderr(&out).contains("Did not find"), "{}", stderr(&out));
}

/// qemu-iotest 046: `break write_aio` suspends the next aio write; a later one touching its
/// cluster waits behind it; `resume` lets both complete, after the resume message.
#[test]
fn breakpoints_hold_aio_writes_until_resumed() {
    let dir = scratch_dir("io_breaks");
    create(&dir, &["a.qcow2", "1M"]);
    let script = [
        "-c",
        "break write_aio A",
        "-c",
        "aio_write -P 10 0x18000 0x2000",
        "-c",
        "wait_break A",
        "-c",
        "aio_write -P 11 0x12000 0x2000",
        "-c",
        "resume A",
        "-c",
        "aio_flush",
        "-c",
        "resume B",
        "blkdebug::a.qcow2",
    ];
    let qemu = qemu_tool("qemu-io", &dir, &script);
    let ours = ours_as("qemu-io", &dir, &script);
    no_panic(&ours);
    let lines = |o: &Output| -> Vec<String> {
        stdout(o)
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    let (mut q, mut o) = (lines(&qemu), lines(&ours));
    assert_eq!(o[..2], q[..2], "{o:?}");
    assert_eq!(o[0], "blkdebug: Suspended request 'A'");
    assert_eq!(o[1], "blkdebug: Resuming request 'A'");
    q.sort();
    o.sort();
    assert_eq!(o, q);
    assert_eq!(stderr(&ours), stderr(&qemu));
    let read = [
        "-c",
        "read -P 10 0x18000 0x2000",
        "-c",
        "read -P 11 0x12000 0x2000",
        "a.qcow2",
    ];
    let out = assert_same("qemu-io", &dir, &read);
    assert!(!stdout(&out).contains("failed"));
}
