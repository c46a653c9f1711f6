//! `measure` against `qemu-img measure`: the same output, byte for byte, and the same exit code,
//! for new images of a size and for source images (data, zeros, a snapshot, bitmaps), across
//! target options (cluster sizes, refcount widths, extended L2, compat, preallocation).

mod common;

use common::{code, no_panic, path_str, qemu_in, stderr, tool_in};
use qcow2_testdata::{qemu_img_ok, qemu_io, scratch_dir};

#[test]
fn measure_matches_qemu_img() {
    let dir = scratch_dir("measure");
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "64M"]);
    qemu_io(&[
        "-c",
        "write -P 1 0 100k",
        "-c",
        "write -z 10M 1M",
        "-c",
        "write -P 2 20M 3",
        path_str(&src),
    ]);
    qemu_img_ok(&["snapshot", "-c", "s", path_str(&src)]);
    qemu_io(&["-c", "write -P 3 30M 5M", path_str(&src)]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", path_str(&src), "daily"]);
    let raw = dir.join("src.raw");
    qemu_img_ok(&["convert", "-O", "raw", path_str(&src), path_str(&raw)]);
    let cases: &[&[&str]] = &[
        &["--size", "1G", "-O", "qcow2"],
        &["--output=json", "--size", "1G", "-O", "qcow2"],
        &["--size", "1000", "-O", "qcow2"],
        &["--size", "1000"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "--size",
            "100M",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k",
            "--size",
            "3G",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=64,cluster_size=2M",
            "--size",
            "1T",
        ],
        &["-O", "qcow2", "src.qcow2"],
        &["--output=json", "-O", "qcow2", "src.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "src.qcow2"],
        &["-O", "qcow2", "-o", "compat=0.10", "src.qcow2"],
        &["-O", "qcow2", "-o", "preallocation=full", "src.qcow2"],
        &["-O", "qcow2", "-o", "preallocation=metadata", "src.qcow2"],
        &["-O", "qcow2", "-l", "s", "src.qcow2"],
        &["-O", "raw", "src.qcow2"],
        &["-O", "qcow2", "src.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1M",
        ],
        &["--size", "1G", "src.qcow2"],
        &["-O", "qcow2"],
    ];
    for case in cases {
        let mut args = vec!["measure"];
        args.extend_from_slice(case);
        let ours = tool_in(Some(&dir), &args);
        let theirs = std::process::Command::new("qemu-img")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("qemu-img");
        assert_eq!(code(&ours), code(&theirs), "{case:?}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{case:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.stderr).replace("qcow2-tool:", "qemu-img:"),
            String::from_utf8_lossy(&theirs.stderr),
            "{case:?}"
        );
    }
}

#[test]
fn measure_refuses_a_disk_too_large_for_its_l1_table_in_qemu_imgs_words() {
    // create names the format in this message, measure does not (iotest 271).
    let dir = qcow2_testdata::scratch_dir("measure_too_large");
    let args = [
        "measure",
        "--size",
        "1025T",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
    ];
    let o = tool_in(Some(&dir), &args);
    let q = qemu_in(&dir, &args);
    no_panic(&o);
    assert_eq!(code(&o), code(&q));
    assert_eq!(stderr(&o).replace("qcow2-tool:", "qemu-img:"), stderr(&q));
}
