//! `io` write commands against qemu-io: the same command sequence applied by both tools to two
//! identical images must print the same lines (timings aside), leave guest contents that
//! `qemu-img compare` finds identical, and leave our image clean for `qemu-img check`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_testdata::{copy_fixture, qemu_check, qemu_io, scratch_dir};

/// Writes, zero writes (with and without unmap, unaligned too), compressed writes, discards,
/// flush, map, pattern reads, and requests qemu-io refuses.
const SEQUENCE: &[&str] = &[
    "write -P 0x11 0 64k",
    "write 64k 4k",
    "write -z 128k 64k",
    "write -z -u 0 64k",
    "write -c 256k 128k",
    "discard 64k 64k",
    "flush",
    "map",
    "read -P 0xcd 256k 128k",
    "write -P 0x22 1000 5000",
    "write -z 3000 70000",
    "write -P 0x33 1M 512k",
    "write -z -u 1088k 128k",
    "discard 1280k 100k",
    "write -c -P 0x44 2M 64k",
    "write -P 0x55 2M 1k",
    "discard 1 3",
    "write -c 100 4k",
    "write -c 4k 4k",
    "write 4M 1",
    "discard 0 5M",
    "write -P 0x11 -z 0 4k",
    "write -u 0 4k",
    "write -X 0 4k",
    "write 0",
    "write -P 300 0 4k",
    "write x 4k",
    "write -q 3M 4k",
    "write 0 0",
    "flush x",
    "read -P 0x33 1M 64k",
    "read -P 0 1088k 64k",
    "map",
];

/// Drops qemu-io's timing lines, which differ run to run.
fn without_timings(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs `commands` through qemu-io on `theirs` and through us on `ours`, then compares
/// output, contents and our image's consistency.
fn run_both(ours: &Path, theirs: &Path, commands: &[&str], what: &str) {
    let mut our_args = vec!["io", "-f", "qcow2"];
    let mut qemu_args = vec!["-f", "qcow2"];
    for c in commands {
        our_args.extend(["-c", c]);
        qemu_args.extend(["-c", c]);
    }
    our_args.push(path_str(ours));
    qemu_args.push(path_str(theirs));
    let out = tool(&our_args);
    let qemu = qemu_io(&qemu_args);
    no_panic(&out);
    assert_eq!(code(&out), code(&qemu), "{what}: {}", stderr(&out));
    assert_eq!(
        without_timings(&stdout(&out)),
        without_timings(&stdout(&qemu)),
        "{what}: stdout"
    );
    assert_eq!(
        stderr(&out).replace("qcow2-tool:", "qemu-io:"),
        stderr(&qemu),
        "{what}: stderr"
    );
    let dir = ours.parent().unwrap();
    let cmp = qemu_in(dir, &["compare", path_str(ours), path_str(theirs)]);
    assert_eq!(code(&cmp), 0, "{what}: {}", stdout(&cmp));
    let (check, report) = qemu_check(ours);
    assert_eq!(check, 0, "{what}: qemu-img check: {report}");
}

/// Two identical images made by qemu-img with `options`.
fn image_pair(dir: &Path, options: &str, size: &str) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path_str(&ours), size]);
    assert_eq!(code(&qemu_in(dir, &args)), 0);
    std::fs::copy(&ours, &theirs).unwrap();
    (ours, theirs)
}

#[test]
fn write_sequences_match_qemu_io_on_new_images() {
    let dir = scratch_dir("io_write_new");
    for options in [
        "",
        "compat=0.10",
        "cluster_size=4k",
        "cluster_size=512",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "compression_type=zstd",
        "lazy_refcounts=on",
        "refcount_bits=1,cluster_size=4k",
        "refcount_bits=64",
        "cluster_size=2M",
        "preallocation=metadata",
    ] {
        let (ours, theirs) = image_pair(&dir, options, "4M");
        run_both(&ours, &theirs, SEQUENCE, &format!("-o {options:?}"));
    }
}

#[test]
fn write_sequences_match_qemu_io_over_a_backing_file() {
    let dir = scratch_dir("io_write_backing");
    for options in ["", "compat=0.10", "extended_l2=on", "cluster_size=4k"] {
        let base = dir.join("base.qcow2");
        let make = qemu_in(
            &dir,
            &["create", "-q", "-f", "qcow2", path_str(&base), "4M"],
        );
        assert_eq!(code(&make), 0);
        let fill = qemu_io(&["-f", "qcow2", "-c", "write -P 0x77 0 4M", path_str(&base)]);
        assert_eq!(code(&fill), 0);
        let mut opts = format!("backing_file={},backing_fmt=qcow2", path_str(&base));
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        let (ours, theirs) = image_pair(&dir, &opts, "4M");
        run_both(
            &ours,
            &theirs,
            SEQUENCE,
            &format!("backing, -o {options:?}"),
        );
    }
}

#[test]
fn write_sequences_match_qemu_io_on_fixture_copies() {
    for name in [
        "snap",
        "snap-v2",
        "zlib",
        "zstd-c512",
        "ext-l2-overlay",
        "v2",
        "lazy-clean",
        "odd-64k",
        "rc2",
        "chain-top",
        "unknown-ext",
        "c512",
        "zlib-c4k",
        "ext-l2-32k",
        "ext-l2-2m",
    ] {
        let ours_dir = scratch_dir(&format!("io_write_fixture_ours_{name}"));
        let theirs_dir = scratch_dir(&format!("io_write_fixture_theirs_{name}"));
        let ours = copy_fixture(name, &ours_dir);
        let theirs = copy_fixture(name, &theirs_dir);
        run_both(&ours, &theirs, SEQUENCE, name);
    }
}

#[test]
fn images_we_create_take_the_same_writes_as_images_qemu_img_creates() {
    let dir = scratch_dir("io_write_our_create");
    for options in [
        "cluster_size=4k",
        "compat=0.10",
        "extended_l2=on,compression_type=zstd",
    ] {
        let ours = dir.join("ours.qcow2");
        let theirs = dir.join("theirs.qcow2");
        let made = tool(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            path_str(&ours),
            "4M",
        ]);
        assert_eq!(code(&made), 0, "{}", stderr(&made));
        let made = qemu_in(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                options,
                path_str(&theirs),
                "4M",
            ],
        );
        assert_eq!(code(&made), 0);
        run_both(&ours, &theirs, SEQUENCE, options);
    }
}

#[test]
fn pattern_reads_see_earlier_writes_in_the_same_run_and_after_reopening() {
    let dir = scratch_dir("io_write_read_back");
    let (ours, _) = image_pair(&dir, "cluster_size=4k", "8M");
    let out = tool(&[
        "io",
        "-c",
        "write -P 0x5a 1000 100k",
        "-c",
        "write -c -P 0x6b 1M 64k",
        "-c",
        "write -z 1020k 4k",
        "-c",
        "read -P 0x5a 1000 20k",
        "-c",
        "read -P 0x6b 1M 64k",
        "-c",
        "read -P 0 1020k 4k",
        path_str(&ours),
    ]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    for cmd in [
        "read -P 0x5a 1000 20k",
        "read -P 0x6b 1M 64k",
        "read -P 0 1020k 4k",
        "read -P 0 0 1000",
    ] {
        let ours_read = tool(&["io", "-r", "-c", cmd, path_str(&ours)]);
        assert_eq!(code(&ours_read), 0, "{cmd}: {}", stdout(&ours_read));
        let qemu_read = qemu_io(&["-r", "-f", "qcow2", "-c", cmd, path_str(&ours)]);
        assert_eq!(code(&qemu_read), 0, "{cmd}: {}", stdout(&qemu_read));
    }
    let wrong = tool(&["io", "-r", "-c", "read -P 0x5a 0 4k", path_str(&ours)]);
    assert_eq!(code(&wrong), 1);
}

#[test]
fn writes_to_a_read_only_image_are_refused_like_qemu_io() {
    let dir = scratch_dir("io_write_read_only");
    let (ours, theirs) = image_pair(&dir, "", "1M");
    for cmd in ["write 0 4k", "discard 0 64k", "write -z 0 4k"] {
        let out = tool(&["io", "-r", "-c", cmd, path_str(&ours)]);
        let qemu = qemu_io(&["-r", "-f", "qcow2", "-c", cmd, path_str(&theirs)]);
        assert_eq!(code(&out), 1, "{cmd}");
        assert_eq!(code(&qemu), 1, "{cmd}");
        assert_eq!(
            stderr(&out).replace("qcow2-tool:", "qemu-io:"),
            stderr(&qemu),
            "{cmd}"
        );
    }
    let cmp = qemu_in(&dir, &["compare", path_str(&ours), path_str(&theirs)]);
    assert_eq!(code(&cmp), 0);
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}

/// An image left by `sigraise 9` after a write, copied into two directories; `reopen` (on an
/// image without lazy refcounts) runs first, else the image has lazy refcounts.
fn crashed_lazy_pair(name: &str, reopen: Option<&str>) -> (PathBuf, PathBuf) {
    let ours = scratch_dir(&format!("{name}_ours")).join("x.qcow2");
    let theirs = scratch_dir(&format!("{name}_theirs")).join("x.qcow2");
    crashed_writer_image(
        &ours,
        reopen.is_none(),
        &reopen.into_iter().collect::<Vec<_>>(),
    );
    std::fs::copy(&ours, &theirs).unwrap();
    (ours, theirs)
}

#[test]
fn writes_are_written_through_by_default_so_a_killed_writer_loses_none() {
    let (ours, _) = crashed_lazy_pair("writethrough", None);
    let read = qemu_io(&["-r", "-c", "read -P 0x5a 0 512", path_str(&ours)]);
    assert!(
        stdout(&read).starts_with("read 512/512"),
        "{}",
        stdout(&read)
    );
}

#[test]
fn opening_a_dirty_image_for_writing_repairs_it_and_says_so_like_qemu_io() {
    let (ours, theirs) = crashed_lazy_pair("dirty_open", None);
    let ours_out = tool(&["io", "-c", "write 0 512", path_str(&ours)]);
    let qemu_out = qemu_io(&["-c", "write 0 512", path_str(&theirs)]);
    assert_eq!(code(&ours_out), 0, "{}", stderr(&ours_out));
    assert_eq!(stderr(&ours_out), stderr(&qemu_out));
    assert!(stderr(&ours_out).contains("Rebuilding refcount structure"));
    assert_eq!(qemu_check(&ours).0, 0);
    assert_eq!(
        std::fs::read(&ours).unwrap()[79] & 1,
        0,
        "dirty bit cleared"
    );
}

#[test]
fn reopen_with_lazy_refcounts_on_defers_refcounts_under_the_dirty_bit() {
    let (ours, _) = crashed_lazy_pair("reopen_lazy", Some("reopen -o lazy-refcounts=on"));
    assert_eq!(std::fs::read(&ours).unwrap()[79] & 1, 1, "dirty bit set");
    let (check, _) = qemu_check(&ours);
    assert_eq!(check, 2, "the data cluster's refcount was deferred");
    let refused = tool(&["io", "-c", "reopen -o lazy-refcounts=42", path_str(&ours)]);
    assert!(stderr(&refused).ends_with(": Parameter 'lazy-refcounts' expects 'on' or 'off'\n"));
}

#[test]
fn partial_zero_writes_over_a_sparse_backing_file_map_like_qemu_io_leaves_them() {
    // A zero write over part of a cluster becomes a zero cluster when the rest of the cluster
    // reads zero through the whole chain (iotest 154): the maps must agree, not only the bytes.
    let dir = scratch_dir("io_write_zero_partial");
    for options in ["cluster_size=4k", "cluster_size=64k,extended_l2=on"] {
        let base = dir.join("base.qcow2");
        let make = qemu_in(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                path_str(&base),
                "1M",
            ],
        );
        assert_eq!(code(&make), 0);
        for cmd in ["write -P 0x11 32k 1k", "write -P 0x11 66k 1k"] {
            assert_eq!(
                code(&qemu_io(&["-f", "qcow2", "-c", cmd, path_str(&base)])),
                0
            );
        }
        let opts = format!(
            "backing_file={},backing_fmt=qcow2,{options}",
            path_str(&base)
        );
        let (ours, theirs) = image_pair(&dir, &opts, "1040k");
        let zeros = [
            "write -z 0 2k",
            "write -z 10k 2k",
            "write -z 17k 2k",
            "write -z 27k 2k",
            "write -z 35k 2k",
            "write -z 67k 2k",
            "write -z 1038k 1k",
        ];
        run_both(&ours, &theirs, &zeros, &format!("-o {options:?}"));
        let map = |p: &Path| stdout(&qemu_in(&dir, &["map", "--output=json", path_str(p)]));
        assert_eq!(map(&ours), map(&theirs), "-o {options:?}");
    }
}

#[test]
fn a_compress_filter_writes_whole_clusters_compressed_like_qemu_io() {
    // `driver=compress` over qcow2 (iotest 214): unaligned writes widen to whole clusters and go
    // out compressed; the images must end up alike, cluster for cluster.
    let dir = scratch_dir("io_write_compress_filter");
    let (ours, theirs) = image_pair(&dir, "cluster_size=64k", "2M");
    let writes = [("0xbb", 0u64), ("0xcc", 4 * 65536 + 65536 / 4)];
    for (file, ours_side) in [(&ours, true), (&theirs, false)] {
        for (pattern, offset) in writes {
            let cmd = format!("write -P {pattern} {offset} {}", 3 * 65536 + 65536 / 2);
            let opts = format!(
                "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}",
                path_str(file)
            );
            let args = ["-c", cmd.as_str(), "--image-opts", opts.as_str()];
            let out = if ours_side {
                let mut a = vec!["io"];
                a.extend(args);
                tool(&a)
            } else {
                qemu_io(&args)
            };
            no_panic(&out);
            assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
            assert!(stdout(&out).starts_with("wrote "), "{}", stdout(&out));
        }
    }
    let cmp = qemu_in(&dir, &["compare", path_str(&ours), path_str(&theirs)]);
    assert_eq!(code(&cmp), 0, "{}", stdout(&cmp));
    let map = |p: &Path| stdout(&qemu_in(&dir, &["map", "--output=json", path_str(p)]));
    assert_eq!(map(&ours), map(&theirs));
    assert!(map(&ours).contains("\"compressed\": true"));
    let compressed = |p: &Path| {
        let out = stdout(&qemu_in(&dir, &["check", "--output=json", path_str(p)]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["compressed-clusters"].as_u64()
    };
    assert_eq!(compressed(&ours), Some(8));
    assert_eq!(compressed(&ours), compressed(&theirs));
}

#[test]
fn a_compressed_write_places_its_l2_table_before_the_data_like_qemu_io() {
    // QEMU allocates the L2 table first and packs the compressed data after it; iotest 214 pokes
    // the L2 entries at the offset that layout gives them.
    let dir = scratch_dir("io_write_compressed_layout");
    let (ours, theirs) = image_pair(&dir, "cluster_size=2M", "8M");
    let cmds = ["write -c -P 0x11 0 2M", "write -c -P 0x11 2M 2M"];
    run_both(&ours, &theirs, &cmds, "compressed writes");
    let l1 = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let at = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    };
    assert_eq!(l1(&ours), l1(&theirs));
}

#[test]
fn a_raw_discard_punches_a_hole_like_qemu_io() {
    // iotest 271 keeps a raw reference image in step with the qcow2 one: a discard there must
    // read back as QEMU's file driver leaves it (a hole, zeros).
    let dir = scratch_dir("io_write_raw_discard");
    let (ours, theirs) = (dir.join("ours.raw"), dir.join("theirs.raw"));
    for p in [&ours, &theirs] {
        std::fs::write(p, vec![0xffu8; 256 << 10]).unwrap();
    }
    let cmds = ["-c", "discard 64k 64k", "-c", "discard 0 512k"];
    let o = tool(&[&["io", "-f", "raw"][..], &cmds, &[path_str(&ours)]].concat());
    let q = qemu_io(&[&["-f", "raw"][..], &cmds, &[path_str(&theirs)]].concat());
    no_panic(&o);
    assert_eq!(without_timings(&stdout(&o)), without_timings(&stdout(&q)));
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}

#[test]
fn a_write_over_an_invalid_subcluster_bitmap_is_refused_and_marks_the_image_corrupt() {
    // iotest 271: an allocated cluster whose subcluster 0 is both allocated and zero. QEMU
    // refuses the write and marks the image corrupt; acknowledging it would build on metadata
    // known to be wrong.
    let dir = scratch_dir("io_write_invalid_bitmap");
    for bitmap in [0x0000_0001_ffff_ffffu64, 0x0000_0001_0000_0001] {
        let (ours, theirs) = image_pair(&dir, "extended_l2=on", "1M");
        for p in [&ours, &theirs] {
            let out = qemu_io(&["-c", "write -q -P 1 64k 64k", path_str(p)]);
            assert_eq!(code(&out), 0);
            // L2 entry 1 (the second cluster) of the table at 0x40000.
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&bitmap.to_be_bytes(), 0x40000 + 16 + 8)
                .unwrap();
        }
        let o = tool(&["io", "-c", "write 0 192k", path_str(&ours)]);
        let q = qemu_io(&["-c", "write 0 192k", path_str(&theirs)]);
        no_panic(&o);
        assert_eq!(stdout(&o), stdout(&q), "{bitmap:#x}");
        assert!(stdout(&o).contains("write failed: Input/output error"));
        for p in [&ours, &theirs] {
            let info = qcow2_testdata::qemu_info(p);
            assert_eq!(
                info["format-specific"]["data"]["corrupt"],
                serde_json::Value::Bool(true),
                "{bitmap:#x}"
            );
        }
    }
}

#[test]
fn a_compressed_cluster_reads_whatever_its_unused_bitmap_holds_like_qemu_io() {
    let dir = scratch_dir("io_write_compressed_bitmap");
    let (ours, _) = image_pair(&dir, "extended_l2=on", "1M");
    let out = qemu_io(&["-c", "write -q -c -P 7 0 64k", path_str(&ours)]);
    assert_eq!(code(&out), 0);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&ours).unwrap();
    f.write_all_at(&0x0000_0001_8000_0000u64.to_be_bytes(), 0x40000 + 8)
        .unwrap();
    let o = tool(&["io", "-c", "read -P 7 0 64k", path_str(&ours)]);
    let q = qemu_io(&["-c", "read -P 7 0 64k", path_str(&ours)]);
    assert_eq!(without_timings(&stdout(&o)), without_timings(&stdout(&q)));
    assert!(stdout(&o).starts_with("read 65536/65536"), "{}", stdout(&o));
}

#[test]
fn a_read_over_an_invalid_l2_entry_marks_a_writable_image_corrupt_with_qemus_words() {
    let dir = scratch_dir("io_read_invalid_entry");
    // (L2 entry word 0, word 1): a contradictory bitmap, then an unaligned data cluster.
    for (word0, word1) in [
        (0x8000_0000_0006_0000u64, 0x0000_0001_ffff_ffffu64),
        (0x8000_0000_0005_0200, 0x0000_0000_0000_0001),
    ] {
        let (ours, theirs) = image_pair(&dir, "extended_l2=on", "1M");
        for p in [&ours, &theirs] {
            assert_eq!(code(&qemu_io(&["-c", "write -q 0 128k", path_str(p)])), 0);
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            let mut entry = word0.to_be_bytes().to_vec();
            entry.extend(word1.to_be_bytes());
            f.write_all_at(&entry, 0x40000 + 16).unwrap();
        }
        let o = tool(&["io", "-c", "read 64k 64k", path_str(&ours)]);
        let q = qemu_io(&["-c", "read 64k 64k", path_str(&theirs)]);
        no_panic(&o);
        assert_eq!(stdout(&o), stdout(&q), "{word0:#x}");
        assert_eq!(
            stderr(&o).replace("qcow2-tool:", "qemu-io:"),
            stderr(&q),
            "{word0:#x}"
        );
        let info = qcow2_testdata::qemu_info(&ours);
        assert_eq!(
            info["format-specific"]["data"]["corrupt"],
            serde_json::Value::Bool(true)
        );
    }
}
