//! `convert -O qcow2` (plain and `-c`, zlib and zstd) against QEMU: the output reads the same as
//! the source (`qemu-img compare`), passes `qemu-img check`, is as sparse as qemu-img's, and
//! holds compressed clusters with `-c`.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{fixtures, qemu_check, qemu_convert_raw, qemu_img, qemu_info, scratch_dir};

/// A 24 MiB raw file: compressible runs, random-looking data, zeros, and a 4 KiB island of
/// data in a zero megabyte.
fn make_raw(path: &Path) {
    let mut bytes = Vec::with_capacity(24 << 20);
    let mut state = 0x1234_5678u32;
    for mb in 0..24u32 {
        match mb % 4 {
            0 => bytes.extend(std::iter::repeat_n(mb as u8 + 1, 1 << 20)),
            1 => bytes.extend((0..1 << 20).map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })),
            2 => bytes.extend(std::iter::repeat_n(0u8, 1 << 20)),
            _ => {
                let mut m = vec![0u8; 1 << 20];
                m[300_000..304_096].fill(0x5a);
                bytes.extend(m);
            }
        }
    }
    std::fs::write(path, bytes).unwrap();
}

fn compare_ok(dir: &Path, args: &[&str], what: &str) {
    let out = qemu_in(dir, args);
    assert_eq!(code(&out), 0, "{what}: {}{}", stdout(&out), stderr(&out));
}

#[test]
fn raw_to_qcow2_plain_and_compressed_matches_the_source() {
    let dir = scratch_dir("convert_qcow2_raw");
    let src = dir.join("src.raw");
    make_raw(&src);
    let cases: &[(&[&str], bool, &str)] = &[
        (&[], false, "zlib"),
        (&["-c"], true, "zlib"),
        (&["-c", "-o", "compression_type=zstd"], true, "zstd"),
        (&["-o", "compression_type=zstd"], false, "zstd"),
        (&["-o", "cluster_size=4k,refcount_bits=8"], false, "zlib"),
        (&["-c", "-o", "cluster_size=512"], true, "zlib"),
        (
            &["-c", "-o", "cluster_size=2M,compression_type=zstd"],
            true,
            "zstd",
        ),
        (&["-c", "-o", "compat=0.10"], true, "zlib"),
        (&["-c", "-o", "extended_l2=on"], true, "zlib"),
        (&["-o", "extended_l2=on,cluster_size=32k"], false, "zlib"),
        (&["-o", "preallocation=metadata"], false, "zlib"),
        (&["-p", "-c", "-o", "lazy_refcounts=on"], true, "zlib"),
    ];
    for (extra, compressed, ctype) in cases {
        let dst = dir.join("out.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([path_str(&src), path_str(&dst)]);
        let out = tool(&args);
        no_panic(&out);
        let what = format!("{extra:?}");
        assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
        if !extra.contains(&"-p") {
            assert_eq!(stdout(&out), "", "{what}");
        }
        compare_ok(
            &dir,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                path_str(&src),
                path_str(&dst),
            ],
            &what,
        );
        let (check, report) = qemu_check(&dst);
        assert_eq!(check, 0, "{what}: {report}");
        let compressed_clusters = report["compressed-clusters"].as_u64().unwrap_or(0);
        assert_eq!(compressed_clusters > 0, *compressed, "{what}: {report}");
        let info = qemu_info(&dst);
        assert_eq!(
            info["format-specific"]["data"]["compression-type"], *ctype,
            "{what}"
        );
        if extra.contains(&"-p") {
            assert!(stdout(&out).contains("    (100.00/100%)\r"), "{what}");
        }
        if extra.is_empty() {
            // As sparse as qemu-img's own output.
            let theirs = dir.join("theirs.qcow2");
            let q = qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                path_str(&src),
                path_str(&theirs),
            ]);
            assert!(q.status.success());
            let (_, theirs_report) = qemu_check(&theirs);
            assert_eq!(
                report["allocated-clusters"], theirs_report["allocated-clusters"],
                "{what}"
            );
        }
    }
}

#[test]
fn fixtures_convert_to_qcow2_reading_the_same() {
    let dir = scratch_dir("convert_qcow2_fixtures");
    for f in fixtures().iter().filter(|f| f.convertible()) {
        for compress in [false, true] {
            let dst = dir.join(format!("{}.out.qcow2", f.name));
            let mut args = vec!["convert", "-f", fmt(f), "-O", "qcow2"];
            if compress {
                args.push("-c");
            }
            args.extend([path_str(&f.path), path_str(&dst)]);
            // In the fixture's directory: a relative data file name is resolved from there.
            let out = tool_in(Some(dir_of(&f.path)), &args);
            no_panic(&out);
            let what = format!("{} -c={compress}", f.name);
            assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
            compare_ok(
                dir_of(&f.path),
                &[
                    "compare",
                    "-f",
                    fmt(f),
                    "-F",
                    "qcow2",
                    path_str(&f.path),
                    path_str(&dst),
                ],
                &what,
            );
            let (check, report) = qemu_check(&dst);
            assert_eq!(check, 0, "{what}: {report}");
            std::fs::remove_file(&dst).unwrap();
        }
    }
}

#[test]
fn snapshots_convert_to_qcow2() {
    let dir = scratch_dir("convert_qcow2_snapshots");
    for f in fixtures().iter().filter(|f| !f.snapshots.is_empty()) {
        for snap in &f.snapshots {
            let dst = dir.join("snap.qcow2");
            let out = tool(&[
                "convert",
                "-s",
                snap,
                "-O",
                "qcow2",
                "-c",
                path_str(&f.path),
                path_str(&dst),
            ]);
            assert_eq!(code(&out), 0, "{} {snap}: {}", f.name, stderr(&out));
            assert!(
                qemu_convert_raw(&dst, None) == qemu_convert_raw(&f.path, Some(snap)),
                "{} {snap}",
                f.name
            );
            assert_eq!(qemu_check(&dst).0, 0);
        }
    }
}

#[test]
fn odd_sized_raw_sources_round_up_like_qemu_img() {
    let dir = scratch_dir("convert_qcow2_odd");
    let src = dir.join("odd.raw");
    std::fs::write(&src, vec![0x42u8; 1000]).unwrap();
    for compress in [false, true] {
        let ours = dir.join("ours.qcow2");
        let theirs = dir.join("theirs.qcow2");
        let c = if compress { "-c" } else { "-p" };
        let out = tool(&["convert", c, "-O", "qcow2", path_str(&src), path_str(&ours)]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let q = qemu_img(&[
            "convert",
            c,
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&src),
            path_str(&theirs),
        ]);
        assert!(q.status.success());
        assert_eq!(
            qemu_info(&ours)["virtual-size"],
            qemu_info(&theirs)["virtual-size"]
        );
        compare_ok(
            &dir,
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                path_str(&ours),
                path_str(&theirs),
            ],
            "odd",
        );
        assert_eq!(qemu_check(&ours).0, 0);
    }
}

#[test]
fn bad_options_fail_like_qemu_img() {
    let dir = scratch_dir("convert_qcow2_errors");
    let src = dir.join("src.raw");
    std::fs::write(&src, vec![1u8; 65536]).unwrap();
    for extra in [
        vec!["-O", "qcow2", "-o", "foo=bar"],
        vec!["-O", "qcow2", "-o", "cluster_size=3000"],
        vec!["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"],
        vec!["-O", "qcow2", "-o", "cluster_size=64k,"],
        vec!["-c", "-O", "raw"],
    ] {
        let mut args = vec!["convert", "-f", "raw"];
        args.extend(&extra);
        args.extend(["src.raw", "dst.img"]);
        let ours = tool_in(Some(&dir), &args);
        let qemu = qemu_in(&dir, &args);
        no_panic(&ours);
        assert_eq!(code(&ours), 1, "{extra:?}");
        assert_eq!(code(&qemu), 1, "{extra:?}");
        assert_eq!(
            stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            stderr(&qemu),
            "{extra:?}"
        );
    }
}
