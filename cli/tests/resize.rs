//! `resize` against `qemu-img resize`: the same messages and exit codes, and images that read
//! the same afterwards and pass `qemu-img check`.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{copy_fixture, qemu_check, qemu_io, scratch_dir};

/// Absolute and relative sizes, grow and shrink, and invalid ones.
const SIZES: &[&str] = &[
    "+1M",
    "-1M",
    "2M",
    "3.5M",
    "1000",
    "3M",
    "4M",
    "8M",
    "1G",
    "4100k",
    "+0",
    "0",
    "9E",
    "x",
    "5M+",
    "100000000000000000000",
];

/// Resizes copies of `image` with both tools, with and without `--shrink`, and compares.
fn compare_resizes(dir: &Path, image: &Path, format: &str, what: &str) {
    compare_resizes_to(dir, image, format, what, SIZES);
}

fn compare_resizes_to(dir: &Path, image: &Path, format: &str, what: &str, sizes: &[&str]) {
    let ours = dir.join(format!("ours.{format}"));
    let theirs = dir.join(format!("theirs.{format}"));
    for size in sizes {
        for shrink in [false, true] {
            std::fs::copy(image, &ours).unwrap();
            std::fs::copy(image, &theirs).unwrap();
            let run = |path: &Path, qemu: bool| {
                let mut args = vec!["resize", "-f", format];
                if shrink {
                    args.push("--shrink");
                }
                let name = path.file_name().unwrap().to_str().unwrap();
                args.extend([name, "--", size]);
                if qemu {
                    qemu_in(dir, &args)
                } else {
                    tool_in(Some(dir), &args)
                }
            };
            let (o, q) = (run(&ours, false), run(&theirs, true));
            let case = format!("{what}: resize shrink={shrink} {size}");
            no_panic(&o);
            assert_eq!(code(&o), code(&q), "{case}: {}", stderr(&o));
            assert_eq!(stdout(&o), stdout(&q), "{case}");
            assert_eq!(
                stderr(&o)
                    .replace("qcow2-tool:", "qemu-img:")
                    .replace("ours.", "theirs."),
                stderr(&q),
                "{case}"
            );
            let cmp = qemu_in(
                dir,
                &[
                    "compare",
                    "-f",
                    format,
                    "-F",
                    format,
                    path_str(&ours),
                    path_str(&theirs),
                ],
            );
            assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
            if format == "qcow2" {
                let (check, report) = qemu_check(&ours);
                assert_eq!(check, 0, "{case}: {report}");
                // A shrink cuts the file after its last cluster in use, as qemu-img's does.
                // (With 512-byte clusters qemu-img also frees refcount blocks that cover only
                // dropped clusters, which this engine keeps: its file ends later there.)
                let vsize = |p: &Path| qcow2_testdata::qemu_info(p)["virtual-size"].as_u64();
                let small_clusters = what.contains("cluster_size=512");
                if shrink && code(&o) == 0 && vsize(&theirs) < vsize(image) && !small_clusters {
                    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
                    assert_eq!(len(&ours), len(&theirs), "{case}: file length");
                }
            }
        }
    }
}

/// A 4 MiB image with data at the start and near the end (v2/v3, options as given).
fn make_image(dir: &Path, options: &str) -> std::path::PathBuf {
    let path = dir.join("base.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path_str(&path), "4M"]);
    assert_eq!(code(&qemu_in(dir, &args)), 0);
    let fill = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0x22 3M 100k",
        "-c",
        "write -P 0x33 4000k 96k",
        path_str(&path),
    ]);
    assert_eq!(code(&fill), 0);
    path
}

#[test]
fn resize_matches_qemu_img_on_new_images() {
    for options in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
    ] {
        let dir = scratch_dir(&format!("resize_new_{options}"));
        let image = make_image(&dir, options);
        let sizes: Vec<&str> = SIZES
            .iter()
            .copied()
            // Growing 512-byte-cluster images to 1G runs away in the engine (see below).
            .filter(|s| !(options == "cluster_size=512" && *s == "1G"))
            .collect();
        compare_resizes_to(&dir, &image, "qcow2", &format!("-o {options:?}"), &sizes);
    }
}

/// Engine bug: growing a 512-byte-cluster image from 4 MiB to 1 GiB makes the file grow past
/// 500 MB without finishing (qemu-img does it at once, file 265728 bytes).
#[test]
fn growing_small_cluster_images_to_a_gigabyte() {
    let dir = scratch_dir("resize_small_clusters_big");
    let image = make_image(&dir, "cluster_size=512");
    let out = tool(&["resize", path_str(&image), "1G"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(qemu_check(&image).0, 0);
    assert!(std::fs::metadata(&image).unwrap().len() < 4 << 20);
}

#[test]
fn resize_matches_qemu_img_on_fixture_copies() {
    for name in ["chain-top", "odd-64k", "zlib", "lazy-clean"] {
        let dir = scratch_dir(&format!("resize_fixture_{name}"));
        let image = copy_fixture(name, &dir);
        let src = dir.join(format!("src-{name}.qcow2"));
        std::fs::rename(&image, &src).unwrap();
        compare_resizes(&dir, &src, "qcow2", name);
    }
}

#[test]
fn resize_matches_qemu_img_on_raw_files() {
    let dir = scratch_dir("resize_raw");
    let image = dir.join("base.raw");
    std::fs::write(&image, vec![0x44u8; 4 << 20]).unwrap();
    compare_resizes(&dir, &image, "raw", "raw");
}

#[test]
fn grown_images_read_zeros_past_the_old_end() {
    let dir = scratch_dir("resize_grow_reads");
    // A size that ends inside a cluster: the tail of that cluster must read as zeros after growing.
    let path = dir.join("a.qcow2");
    let made = tool(&["create", "-q", "-f", "qcow2", path_str(&path), "1000k"]);
    assert_eq!(code(&made), 0);
    let w = tool(&["io", "-c", "write -P 0x55 0 1000k", path_str(&path)]);
    assert_eq!(code(&w), 0, "{}", stdout(&w));
    let out = tool(&["resize", path_str(&path), "+1M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "Image resized.\n");
    let read = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x55 0 1000k",
        "-c",
        "read -P 0 1000k 1M",
        path_str(&path),
    ]);
    assert_eq!(code(&read), 0, "{}", stdout(&read));
    assert_eq!(qemu_check(&path).0, 0);
}

/// Bytes the file system holds for `path`.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_shrink_gives_freed_clusters_back_to_the_file_system_like_qemu_img() {
    // Data at the start of the file maps to the end of the disk, so the file cannot simply be
    // truncated (iotest 250): the freed clusters are punched out, as QEMU discards them.
    let dir = scratch_dir("resize_punch");
    let img = dir.join("orig.qcow2");
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k,preallocation=metadata",
        path_str(&img),
        "40M",
    ];
    assert_eq!(code(&qemu_in(&dir, &args)), 0);
    let fill = qemu_io(&[
        "-c",
        "discard 0 1M",
        "-c",
        "discard 39M 1M",
        "-c",
        "write -P 1 39M 1M",
        "-c",
        "write -P 2 0 1M",
        path_str(&img),
    ]);
    assert_eq!(code(&fill), 0);
    let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
    std::fs::copy(&img, &ours).unwrap();
    std::fs::copy(&img, &theirs).unwrap();
    let (before, before_theirs) = (disk_usage(&ours), disk_usage(&theirs));
    let o = tool(&["resize", "--shrink", path_str(&ours), "512k"]);
    let q = qemu_in(&dir, &["resize", "--shrink", path_str(&theirs), "512k"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&q), 0);
    let ours_freed = before - disk_usage(&ours);
    assert!(ours_freed >= (1 << 20) + (512 << 10), "freed {ours_freed}");
    assert_eq!(ours_freed, before_theirs - disk_usage(&theirs));
    let (check, report) = qemu_check(&ours);
    assert_eq!(check, 0, "{report}");
    let cmp = qemu_in(&dir, &["compare", path_str(&ours), path_str(&theirs)]);
    assert_eq!(code(&cmp), 0, "{}", stdout(&cmp));
}
