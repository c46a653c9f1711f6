//! Behaviours qemu-iotests exercise (issue 20), each checked against real qemu-io/qemu-img: the
//! same commands on two identical images must print the same lines (timings aside) and leave
//! images QEMU judges the same way.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use qcow2_testdata::{qemu_img_ok, qemu_io, scratch_dir};

/// Drops qemu-io's timing lines, which differ run to run.
fn without_timings(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Both tools' output for the same arguments, with `{img}` standing for each side's image.
fn both(dir: &Path, ours: &Path, theirs: &Path, args: &[&str]) -> (Output, Output) {
    let with = |p: &Path| -> Vec<String> {
        args.iter()
            .map(|a| a.replace("{img}", path_str(p)))
            .collect()
    };
    let our_args = with(ours);
    let their_args = with(theirs);
    let out = ours_as(
        "qemu-io",
        dir,
        &our_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let qemu = qemu_io(&their_args.iter().map(String::as_str).collect::<Vec<_>>());
    no_panic(&out);
    (out, qemu)
}

/// Asserts the two runs printed the same (image names made equal) and exited alike.
fn assert_same(out: &Output, qemu: &Output, ours: &Path, theirs: &Path, what: &str) {
    let norm = |s: String, p: &Path| without_timings(&s.replace(path_str(p), "IMG"));
    assert_eq!(
        code(out),
        code(qemu),
        "{what}: exit code; ours: {}",
        stderr(out)
    );
    assert_eq!(
        norm(stdout(out), ours),
        norm(stdout(qemu), theirs),
        "{what}: stdout"
    );
    assert_eq!(
        norm(stderr(out), ours),
        norm(stderr(qemu), theirs),
        "{what}: stderr"
    );
}

fn pair(dir: &Path, create: &[&str], size: &str) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.extend([path_str(p), size]);
        qemu_img_ok(&args);
    }
    (ours, theirs)
}

fn corrupt_flag(p: &Path) -> bool {
    let info = qemu_img_ok(&["info", "--output=json", "-U", path_str(p)]);
    info.contains("\"corrupt\": true")
}

/// qemu-iotests 305: a refcount table entry pointing at an unaligned refcount block does not
/// stop the image from opening read-write; the write that needs a refcount from that block
/// fails with EIO and marks the image corrupt, with QEMU's message.
#[test]
fn unaligned_refblock_fails_only_the_allocation_that_needs_it() {
    let dir = scratch_dir("unaligned_refblock");
    let (ours, theirs) = pair(&dir, &["-o", "refcount_bits=64,cluster_size=1k"], "1M");
    for p in [&ours, &theirs] {
        let out = qemu_io(&[
            "-c",
            "write 0 124k",
            "-c",
            "discard 121k 1k",
            "-c",
            "discard 123k 1k",
            path_str(p),
        ]);
        assert!(out.status.success());
        let mut bytes = std::fs::read(p).unwrap();
        let reftable = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
        bytes[reftable + 14] = 0x06;
        std::fs::write(p, bytes).unwrap();
    }
    let (out, qemu) = both(&dir, &ours, &theirs, &["-c", "write 121k 3k", "{img}"]);
    assert_same(
        &out,
        &qemu,
        &ours,
        &theirs,
        "write through an unaligned refblock",
    );
    assert!(corrupt_flag(&theirs) && corrupt_flag(&ours));
}

/// qemu-io without a file: commands before `open` are refused, `open -o` and `json:` names
/// open the image, `close` closes it.
#[test]
fn io_opens_and_closes_files_as_commands() {
    let dir = scratch_dir("io_open_close");
    let (ours, theirs) = pair(&dir, &[], "1M");
    let json_raw = r#"json:{"driver": "raw", "file": {"driver": "file", "filename": "{img}"}}"#;
    let (out, qemu) = both(
        &dir,
        &ours,
        &theirs,
        &[
            "-c",
            "read 0 512",
            "-c",
            "open -o driver=qcow2 {img}",
            "-c",
            "write -P 0x11 0 4k",
            "-c",
            "open {img}",
            "-c",
            "close",
            "-c",
            "read 0 512",
            "-c",
            &format!("open -r {json_raw}"),
            "-c",
            "read -P 0x51 -s 0 -l 1 0 4",
            "-c",
            "read -P 0x11 -l 512 0 4k",
            "-c",
            "write 0 512",
        ],
    );
    assert_same(&out, &qemu, &ours, &theirs, "open/close sequence");
}

/// `--image-opts` names the file through options; a raw image opened so takes writes.
#[test]
fn io_image_opts_open_raw_images_read_write() {
    let dir = scratch_dir("io_image_opts_raw");
    let ours = dir.join("ours.raw");
    let theirs = dir.join("theirs.raw");
    for p in [&ours, &theirs] {
        std::fs::write(p, vec![0u8; 64 << 10]).unwrap();
    }
    let (out, qemu) = both(
        &dir,
        &ours,
        &theirs,
        &[
            "--image-opts",
            "-c",
            "write -P 0x22 4k 4k",
            "-c",
            "read -P 0x22 4k 4k",
            "-c",
            "write 60k 8k",
            "driver=raw,file.filename={img}",
        ],
    );
    assert_same(&out, &qemu, &ours, &theirs, "raw writes");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}

/// qemu-iotests 179: a zero write covering only part of a cluster whose other bytes already
/// read as zeros makes the whole cluster a zero cluster, as QEMU does, instead of allocating it
/// and writing zeros as data.
#[test]
fn partial_zero_writes_store_zero_clusters() {
    let dir = scratch_dir("partial_zero_writes");
    let (ours, theirs) = pair(&dir, &[], "32M");
    for c in [
        "write -z -u 10485761 2097150",
        "write -z 14680065 2097150",
        "write -z 100 1000",
    ] {
        let (out, qemu) = both(&dir, &ours, &theirs, &["-c", c, "{img}"]);
        assert_same(&out, &qemu, &ours, &theirs, c);
    }
    let map = |p: &Path| qemu_img_ok(&["map", "--output=json", path_str(p)]);
    assert_eq!(map(&ours), map(&theirs));
}
