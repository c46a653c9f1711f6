//! Behaviours of qemu-iotests 086, 022, 029, 197 and 215 (issue 20), each checked against real
//! qemu-img/qemu-io: convert's progress lines, VM state reads and writes, and copy-on-read.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_testdata::{qemu_img, qemu_img_ok, qemu_io, scratch_dir};

/// The progress figures in `text`, as qemu-img's `    (25.00/100%)\r` lines give them.
fn progress_lines(text: &str) -> Vec<String> {
    text.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| l.starts_with('(') && l.ends_with("/100%)"))
        .map(String::from)
        .collect()
}

/// qemu-iotests 086: convert counts progress in data copied of all the data there is, not in
/// guest offsets, and closes with a second 100%.
#[test]
fn convert_progress_counts_data_chunks_as_qemu_img_does() {
    let dir = scratch_dir("iotests_misc_progress");
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "128M"]);
    for at in ["0", "2M", "4M", "32M"] {
        let out = qemu_io(&["-c", &format!("write {at} 1M"), path_str(&src)]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let ours_dst = dir.join("ours.qcow2");
    let qemu_dst = dir.join("qemu.qcow2");
    let convert = |dst: &Path| {
        vec![
            "convert".to_string(),
            "-p".into(),
            "-O".into(),
            "qcow2".into(),
            "-f".into(),
            "qcow2".into(),
            path_str(&src).into(),
            path_str(dst).into(),
        ]
    };
    let args = convert(&ours_dst);
    let out = ours_as(
        "qemu-img",
        &dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    no_panic(&out);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let args = convert(&qemu_dst);
    let qemu = qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code(&qemu), 0, "{}", stderr(&qemu));
    // Both print progress on stdout; the lines must be the same.
    let theirs = progress_lines(&stdout(&qemu));
    assert_eq!(
        theirs,
        [
            "(0.00/100%)",
            "(25.00/100%)",
            "(50.00/100%)",
            "(75.00/100%)",
            "(100.00/100%)",
            "(100.00/100%)"
        ]
    );
    assert_eq!(progress_lines(&stdout(&out)), theirs);
}

/// Drops qemu-io's timing lines, which differ run to run, and makes image names equal.
fn normalized(out: &std::process::Output, img: &Path) -> String {
    let text = stdout(out) + &stderr(out);
    text.replace(path_str(img), "IMG")
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs qemu-io on `theirs` and qcow2-tool as qemu-io on `ours` with the same arguments
/// (`{img}` standing for the image) and asserts they print the same and exit alike.
fn io_both(dir: &Path, ours: &Path, theirs: &Path, args: &[&str]) {
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
    no_panic(&out);
    let qemu = qemu_io(&their_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        normalized(&out, ours),
        normalized(&qemu, theirs),
        "{args:?}: output"
    );
    assert_eq!(code(&out), code(&qemu), "{args:?}: exit code");
}

/// Two identical images made by qemu-img (`-o` options, size, optional backing file).
fn twins(dir: &Path, opts: &str, size: &str, backing: Option<&Path>) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
        if let Some(b) = backing {
            args.extend(["-F", "qcow2", "-b", path_str(b)]);
        }
        args.extend([path_str(p), size]);
        qemu_img_ok(&args);
    }
    (ours, theirs)
}

/// `qemu-img map --output=json` of an image, without host offsets (layouts may differ).
fn guest_map(p: &Path) -> Vec<serde_json::Value> {
    let map = qcow2_testdata::qemu_map(p);
    map.as_array()
        .expect("a map is a list")
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
            e
        })
        .collect()
}

fn assert_check_clean(p: &Path) {
    let (code, report) = qcow2_testdata::qemu_check(p);
    assert_eq!(code, 0, "qemu-img check {}: {report}", p.display());
}

/// qemu-iotests 022 and 029: `write -b`/`read -b` reach the VM state area past the disk, as
/// qemu-io's do; a snapshot keeps what was written there, and a partial write into a cluster
/// a snapshot shares keeps the rest of that cluster.
#[test]
fn vm_state_reads_and_writes_match_qemu_io() {
    let dir = scratch_dir("iotests_misc_vmstate");
    let (ours, theirs) = twins(&dir, "cluster_size=65536", "64M", None);
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", "write -b -P 0x11 0 64k", "{img}"],
    );
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", "write -b -P 0x33 1T 4k", "{img}"],
    );
    for p in [&ours, &theirs] {
        qemu_img_ok(&["snapshot", "-c", "s", path_str(p)]);
    }
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", "write -b -P 0x22 4k 4k", "{img}"],
    );
    for args in [
        "read -b -P 0x11 0 4k",
        "read -b -P 0x22 4k 4k",
        "read -b -P 0x11 8k 56k",
        "read -b -P 0x33 1T 4k",
        "read -b -P 0 64k 4k",
        "write -b 1 512",
        "read -b 0 511",
        "write -b -z 0 512",
    ] {
        io_both(&dir, &ours, &theirs, &["-c", args, "{img}"]);
    }
    // What we wrote, QEMU reads back; after applying the snapshot, its VM state returns.
    let qemu = qemu_io(&["-c", "read -b -P 0x22 4k 4k", path_str(&ours)]);
    assert!(
        stdout(&qemu).starts_with("read 4096/4096"),
        "{}",
        stdout(&qemu)
    );
    assert_check_clean(&ours);
    for p in [&ours, &theirs] {
        qemu_img_ok(&["snapshot", "-a", "s", path_str(p)]);
    }
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", "read -b -P 0x11 0 64k", "{img}"],
    );
    assert_check_clean(&ours);
}

/// The regular disk stays bounded by its size: only `-b` reaches past it.
#[test]
fn vm_state_leaves_the_disk_alone() {
    let dir = scratch_dir("iotests_misc_vmstate_disk");
    let (ours, theirs) = twins(&dir, "cluster_size=1024", "16M", None);
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", "write -b -P 0x44 0 4M", "{img}"],
    );
    io_both(&dir, &ours, &theirs, &["-c", "read -P 0 0 16M", "{img}"]);
    io_both(&dir, &ours, &theirs, &["-c", "write 16M 512", "{img}"]);
    assert_eq!(guest_map(&ours), guest_map(&theirs));
    assert_check_clean(&ours);
}

/// qemu-iotests 197 and 215: reads with copy-on-read (`-C`, a `copy-on-read` filter node, a
/// blkdebug node with `cor_write` rules in between) copy what the backing chain holds into
/// the image as qemu-io's do: the same lines, the same map, the same contents.
#[test]
fn copy_on_read_copies_the_backing_chain_as_qemu_io_does() {
    let dir = scratch_dir("iotests_misc_cor");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "64M"]);
    let out = qemu_io(&["-c", "write -P 55 32M 1k", path_str(&base)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ours, theirs) = twins(&dir, "cluster_size=65536", "64M", Some(&base));
    io_both(&dir, &ours, &theirs, &["-c", "write -z -u 1M 64k", "{img}"]);
    let config = dir.join("blkdebug.conf");
    // The first copy is at 1M + 64k: a rule on sector 2048 (1M) never fires, one on sector
    // 2176 (1M + 64k) fails the copy.
    for (sector, read) in [(2048, "read -P 0 1M 128k"), (2176, "read -P 0 2M 128k")] {
        std::fs::write(
            &config,
            format!("[inject-error]\nevent = \"cor_write\"\nsector = \"{sector}\"\n"),
        )
        .unwrap();
        let open = format!(
            "open -C -o driver=blkdebug,config={},image.driver=qcow2 {{img}}",
            path_str(&config)
        );
        io_both(
            &dir,
            &ours,
            &theirs,
            &["-c", &open, "-c", read, "-c", "map"],
        );
    }
    let read_with = |read: &str| {
        io_both(
            &dir,
            &ours,
            &theirs,
            &["-f", "qcow2", "-C", "-c", read, "{img}"],
        )
    };
    read_with("read 0 0");
    read_with("read -P 0 1k 8M");
    read_with("read -P 0 33793k 1k");
    let filter = "open -o driver=copy-on-read,file.driver=qcow2 {img}";
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-c", filter, "-c", "read -P 55 32M 1k"],
    );
    io_both(&dir, &ours, &theirs, &["-f", "qcow2", "-C", "-r", "{img}"]);
    let read_only_filter = "open -r -o driver=copy-on-read,file.driver=qcow2 {img}";
    io_both(&dir, &ours, &theirs, &["-c", read_only_filter]);
    assert_eq!(guest_map(&ours), guest_map(&theirs));
    assert_check_clean(&ours);
    let same = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        path_str(&base),
        path_str(&ours),
    ]);
    assert_eq!(code(&same), 0, "{}", stdout(&same));
}

/// Copy-on-read without a backing file still allocates what it read (zeros), up to the end
/// of a disk that ends inside a cluster; with subclusters it copies only the subclusters read.
#[test]
fn copy_on_read_of_a_partial_cluster_and_of_subclusters_matches_qemu_io() {
    let dir = scratch_dir("iotests_misc_cor_partial");
    let (ours, theirs) = twins(&dir, "compat=1.1", "1024", None);
    io_both(
        &dir,
        &ours,
        &theirs,
        &["-f", "qcow2", "-C", "-c", "read 0 1024", "{img}"],
    );
    assert_eq!(guest_map(&ours), guest_map(&theirs));
    assert_check_clean(&ours);

    let dir = scratch_dir("iotests_misc_cor_subclusters");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "64K"]);
    let out = qemu_io(&["-c", "write -P 0xaa 0 64k", path_str(&base)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ours, theirs) = twins(&dir, "extended_l2=on", "64K", Some(&base));
    io_both(
        &dir,
        &ours,
        &theirs,
        &[
            "-c",
            "write -P 0xbb 28K 2K",
            "-c",
            "write -P 0xcc 34K 2K",
            "{img}",
        ],
    );
    io_both(
        &dir,
        &ours,
        &theirs,
        &[
            "-f",
            "qcow2",
            "-C",
            "-c",
            "read -P 0xaa 30K 4K",
            "-c",
            "map",
            "{img}",
        ],
    );
    assert_eq!(guest_map(&ours), guest_map(&theirs));
    assert_check_clean(&ours);
}
