//! `create` against `qemu-img create`: the `Formatting` line, the image (qemu-img check clean,
//! the same format-specific info, the same header bytes) and the errors, for a matrix of options.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{qemu_check, qemu_info, qemu_io, scratch_dir};

/// Runs `create` with `args` (the image path last but for the size) under both tools in `dir`,
/// ours writing `ours.qcow2` and qemu-img `theirs.qcow2`. Returns both outputs.
fn create_both(
    dir: &Path,
    args: &[&str],
    size: Option<&str>,
) -> (std::process::Output, std::process::Output) {
    let run = |name: &str, qemu: bool| {
        let mut full = vec!["create"];
        full.extend_from_slice(args);
        full.push(name);
        full.extend(size);
        if qemu {
            qemu_in(dir, &full)
        } else {
            tool_in(Some(dir), &full)
        }
    };
    (run("ours.qcow2", false), run("theirs.qcow2", true))
}

/// The first `n` bytes of a file.
fn head(path: &Path, n: usize) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[..n.min(bytes.len())].to_vec()
}

/// Names of header fields (v3 layout) that differ between two headers.
fn header_differences(a: &[u8], b: &[u8]) -> Vec<&'static str> {
    const FIELDS: [(&str, usize, usize); 19] = [
        ("magic", 0, 4),
        ("version", 4, 8),
        ("backing_file_offset", 8, 16),
        ("backing_file_size", 16, 20),
        ("cluster_bits", 20, 24),
        ("size", 24, 32),
        ("crypt_method", 32, 36),
        ("l1_size", 36, 40),
        ("l1_table_offset", 40, 48),
        ("refcount_table_offset", 48, 56),
        ("refcount_table_clusters", 56, 60),
        ("nb_snapshots", 60, 64),
        ("snapshots_offset", 64, 72),
        ("incompatible_features", 72, 80),
        ("compatible_features", 80, 88),
        ("autoclear_features", 88, 96),
        ("refcount_order", 96, 100),
        ("header_length", 100, 104),
        ("compression_type+padding", 104, 112),
    ];
    let mut out: Vec<&'static str> = FIELDS
        .iter()
        .filter(|(_, s, e)| a.get(*s..*e) != b.get(*s..*e))
        .map(|(n, _, _)| *n)
        .collect();
    if a.get(112..) != b.get(112..) {
        out.push("extensions/backing name (bytes 112..)");
    }
    out
}

const OPTION_MATRIX: &[&str] = &[
    "",
    "cluster_size=512",
    "cluster_size=4k,refcount_bits=8",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=2,cluster_size=4k",
    "refcount_bits=4",
    "refcount_bits=32",
    "refcount_bits=64",
    "cluster_size=512,refcount_bits=64",
    "compat=0.10",
    "compat=v2,cluster_size=4k",
    "compat=1.1",
    "compat=v3",
    "lazy_refcounts=on",
    "lazy_refcounts=yes,compat=1.1",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "extended_l2=on,cluster_size=2M",
    "compression_type=zstd",
    "compression_type=zlib",
    "preallocation=off",
    "preallocation=metadata",
    "preallocation=metadata,cluster_size=4k,refcount_bits=2",
    "preallocation=metadata,compat=0.10",
    "preallocation=metadata,extended_l2=on,compression_type=zstd,lazy_refcounts=on",
    "cluster_size=64k,lazy_refcounts=off,extended_l2=off,compression_type=zlib,refcount_bits=16",
];

#[test]
fn create_matches_qemu_img_for_every_option_set() {
    let dir = scratch_dir("create_matrix");
    for (i, options) in OPTION_MATRIX.iter().enumerate() {
        for size in ["100M", "1000"] {
            let mut args = vec!["-f", "qcow2"];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            let (ours, theirs) = create_both(&dir, &args, Some(size));
            let what = format!("#{i} -o {options:?} size {size}");
            no_panic(&ours);
            assert_eq!(code(&ours), 0, "{what}: {}", stderr(&ours));
            assert_eq!(code(&theirs), 0, "{what}: {}", stderr(&theirs));
            assert_eq!(
                stdout(&ours).replace("ours.qcow2", "X"),
                stdout(&theirs).replace("theirs.qcow2", "X"),
                "{what}: Formatting line"
            );
            let (ours_path, theirs_path) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
            let (check, report) = qemu_check(&ours_path);
            assert_eq!(check, 0, "{what}: qemu-img check: {report}");
            let (a, b) = (qemu_info(&ours_path), qemu_info(&theirs_path));
            for key in [
                "format-specific",
                "virtual-size",
                "cluster-size",
                "dirty-flag",
            ] {
                assert_eq!(a[key], b[key], "{what}: info {key}");
            }
            let (ha, hb) = (head(&ours_path, 512), head(&theirs_path, 512));
            assert!(
                ha == hb,
                "{what}: header differs in {:?}",
                header_differences(&ha, &hb)
            );
        }
    }
}

#[test]
fn preallocated_images_read_as_zeros_and_are_fully_allocated() {
    let dir = scratch_dir("create_prealloc");
    for options in [
        "preallocation=metadata",
        "preallocation=metadata,cluster_size=4k",
    ] {
        let path = dir.join("p.qcow2");
        let out = tool(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            options,
            path_str(&path),
            "3M",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let (_, report) = qemu_check(&path);
        assert_eq!(
            report["allocated-clusters"], report["total-clusters"],
            "{options}: {report}"
        );
        let read = qemu_io(&["-f", "qcow2", "-c", "read -P 0 0 3M", path_str(&path)]);
        assert_eq!(code(&read), 0, "{options}: {}", stdout(&read));
    }
}

#[test]
fn backing_files_are_opened_relative_to_the_new_image_for_their_size() {
    let dir = scratch_dir("create_backing");
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    assert_eq!(
        code(&qemu_in(
            &sub,
            &["create", "-f", "qcow2", "base.qcow2", "3M"]
        )),
        0
    );
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], None),
        (&["-f", "qcow2", "-b", "base.qcow2", "-F", "raw"], None),
        (
            &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"],
            Some("5M"),
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "cluster_size=4k,compat=0.10",
            ],
            None,
        ),
        (
            &["-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2"],
            Some("1M"),
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "backing_file=base.qcow2,backing_fmt=qcow2",
            ],
            None,
        ),
    ];
    for (args, size) in cases {
        let run = |name: &str, qemu: bool| {
            let target = format!("sub/{name}");
            let mut full = vec!["create"];
            full.extend_from_slice(args);
            full.push(&target);
            full.extend(*size);
            if qemu {
                qemu_in(&dir, &full)
            } else {
                tool_in(Some(&dir), &full)
            }
        };
        let (ours, theirs) = (run("ours.qcow2", false), run("theirs.qcow2", true));
        let what = format!("{args:?} {size:?}");
        assert_eq!(code(&ours), 0, "{what}: {}", stderr(&ours));
        assert_eq!(code(&theirs), 0, "{what}: {}", stderr(&theirs));
        assert_eq!(
            stdout(&ours).replace("ours.qcow2", "X"),
            stdout(&theirs).replace("theirs.qcow2", "X"),
            "{what}"
        );
        let (ours_path, theirs_path) = (sub.join("ours.qcow2"), sub.join("theirs.qcow2"));
        // The header cluster (header, extensions, backing name) is byte-identical.
        let (ha, hb) = (head(&ours_path, 65536), head(&theirs_path, 65536));
        let n = 4096.min(ha.len()).min(hb.len());
        assert!(
            ha[..n] == hb[..n],
            "{what}: header differs in {:?}",
            header_differences(&ha[..512], &hb[..512])
        );
        if !args.contains(&"-u") {
            let (check, report) = qemu_check(&ours_path);
            assert_eq!(check, 0, "{what}: {report}");
            let (a, b) = (qemu_info(&ours_path), qemu_info(&theirs_path));
            for key in [
                "virtual-size",
                "backing-filename",
                "backing-filename-format",
                "full-backing-filename",
                "format-specific",
            ] {
                assert_eq!(a[key], b[key], "{what}: info {key}");
            }
        }
    }
}

/// Argument lists whose stdout, stderr (program name aside) and exit code must equal qemu-img's.
const ERROR_CASES: &[&[&str]] = &[
    &["-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=3000", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=256", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=4M", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=abc", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=-1", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "refcount_bits=abc", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "refcount_bits=128", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "compat=2", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "compression_type=lz4", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "preallocation=bogus", "x.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=4k",
        "x.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,lazy_refcounts=on",
        "x.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,extended_l2=on",
        "x.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,compression_type=zstd",
        "x.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,refcount_bits=8",
        "x.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,extended_l2=on,cluster_size=3000",
        "x.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "1T"],
    &["-f", "qcow2", "-o", "cluster_size=64k,", "x.qcow2", "1M"],
    &["-f", "qcow2", "-o", "size=2M", "x.qcow2", "1M"],
    &["-f", "qcow2", "x.qcow2"],
    &["-f", "qcow2", "x.qcow2", "1x"],
    &["-f", "qcow2", "x.qcow2", "8E"],
    &["-f", "qcow2", "-b", "base.qcow2", "x.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-b",
        "nowhere.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nowhere.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ],
    &["-f", "qcow2", "-u", "-b", "nowhere.qcow2", "x.qcow2", "1M"],
    &["-f", "qcow2", "-b", "base.qcow2", "-F", "bogus", "x.qcow2"],
    &["-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "x.qcow2"],
    &["-f", "qcow2", "-b", "base.raw", "x.qcow2"],
    &["-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    &["-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2"],
    &["-f", "qcow2", "-b", "", "-F", "qcow2", "x.qcow2", "1M"],
    &["-f", "qcow2", "nodir/x.qcow2", "1M"],
    &["-f", "bogus", "x.qcow2", "1M"],
    &["-f", "raw", "-o", "cluster_size=4k", "x.raw", "1M"],
    // Successes with unusual spellings.
    &["-f", "qcow2", "-o", "size=2M", "x.qcow2"],
    &["-f", "qcow2", "-o", "lazy_refcounts", "x.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "refcount_bits=32",
        "x.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "x.qcow2", "1.5k"],
    &["-f", "raw", "x.raw", "1M"],
    &["x.img", "1M"],
    &["-q", "-f", "qcow2", "x.qcow2", "1M"],
];

#[test]
fn errors_and_messages_match_qemu_img() {
    let dir = scratch_dir("create_errors");
    assert_eq!(
        code(&qemu_in(
            &dir,
            &["create", "-f", "qcow2", "base.qcow2", "1M"]
        )),
        0
    );
    std::fs::write(dir.join("base.raw"), b"hello").unwrap();
    let clean = || {
        for name in ["x.qcow2", "x.raw", "x.img"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
    };
    for args in ERROR_CASES {
        let mut full = vec!["create"];
        full.extend_from_slice(args);
        clean();
        let ours = tool_in(Some(&dir), &full);
        let ours_created = dir.join("x.qcow2").exists();
        clean();
        let qemu = qemu_in(&dir, &full);
        let qemu_created = dir.join("x.qcow2").exists();
        no_panic(&ours);
        assert_eq!(code(&ours), code(&qemu), "{args:?}: {}", stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&qemu), "{args:?}");
        assert_eq!(
            stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            stderr(&qemu),
            "{args:?}"
        );
        assert_eq!(ours_created, qemu_created, "{args:?}: file created");
    }
}

#[test]
fn create_replaces_an_existing_file_like_qemu_img() {
    let dir = scratch_dir("create_replace");
    let path = dir.join("a.qcow2");
    std::fs::write(&path, vec![0xffu8; 1 << 20]).unwrap();
    let out = tool(&["create", "-q", "-f", "qcow2", path_str(&path), "1M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(qemu_check(&path).0, 0);
    let read = qemu_io(&["-f", "qcow2", "-c", "read -P 0 0 1M", path_str(&path)]);
    assert_eq!(code(&read), 0, "{}", stdout(&read));
}
