//! The image file as other readers see it: after partial writes into new clusters at the end of
//! the file, the file still covers every cluster the tables map (sparsely), so a reader that
//! does not treat a short file as zeros (libqcow, for one) reads zeros there; the length is
//! qemu-io's.

mod common;

use common::{code, path_str, stderr, tool};
use qcow2_testdata::{qemu_check, qemu_img_ok, qemu_io, scratch_dir};

#[test]
fn partial_writes_into_new_clusters_leave_the_file_covering_them() {
    let dir = scratch_dir("file_layout");
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(p), "64M"]);
    }
    let writes = [
        "write -P 1 0 4k",
        "write -P 2 10M 512",
        "write -P 3 20M 60k",
    ];
    let mut args = vec!["io"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(path_str(&ours));
    let out = tool(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut qargs: Vec<&str> = Vec::new();
    for w in &writes {
        qargs.extend(["-c", w]);
    }
    qargs.push(path_str(&theirs));
    qemu_io(&qargs);
    let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&ours) % 65536, 0, "the file ends inside a cluster");
    assert_eq!(len(&ours), len(&theirs));
    assert_eq!(qemu_check(&ours).0, 0);
}

/// Where the active layer's first L2 table is, and its words that are not zero (entries and,
/// with extended L2, bitmaps) by index, in hex.
fn first_l2_table(path: &std::path::Path) -> (u64, Vec<String>) {
    let file = std::fs::read(path).unwrap();
    let be = |at: usize| u64::from_be_bytes(file[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = be(l1) & 0x00ff_ffff_ffff_fe00;
    let words = (0..65536 / 8)
        .map(|i| (i, be(l2 as usize + i * 8)))
        .filter(|&(_, w)| w != 0)
        .map(|(i, w)| format!("{i}: {w:#018x}"))
        .collect();
    (l2, words)
}

/// Runs the same qemu-io commands with ours on `ours` and with qemu-io on `theirs`.
fn io_both(ours: &std::path::Path, theirs: &std::path::Path, commands: &[String]) {
    let mut args = vec!["io"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(path_str(ours));
    let out = tool(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut qargs: Vec<&str> = Vec::new();
    for c in commands {
        qargs.extend(["-c", c.as_str()]);
    }
    qargs.push(path_str(theirs));
    qemu_io(&qargs);
}

#[test]
fn a_write_takes_its_new_clusters_in_one_run_as_qemu_does() {
    let dir = scratch_dir("file_layout_run");
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(p), "1M"]);
    }
    // A one-cluster hole, then a two-cluster hole: a write needing two new clusters (a partial
    // one and a whole one) takes the second hole, not the first.
    let commands: Vec<String> = [
        "write -P 1 0 640k",
        "discard 64k 64k",
        "discard 192k 128k",
        "write -P 2 672k 96k",
        "write -P 3 832k 64k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    io_both(&ours, &theirs, &commands);
    assert_eq!(first_l2_table(&ours), first_l2_table(&theirs));
    assert_eq!(qemu_check(&ours).0, 0);
    qemu_img_ok(&["compare", "-q", path_str(&ours), path_str(&theirs)]);
}

#[test]
fn copies_after_a_snapshot_match_qemu_subcluster_for_subcluster() {
    let dir = scratch_dir("file_layout_snapshot");
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for p in [&ours, &theirs] {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            path_str(p),
            "1M",
        ]);
    }
    // Each cluster: a zeroed subcluster and two allocated ones with a gap between them.
    let mut setup = Vec::new();
    for c in 0..6u64 {
        setup.push(format!("write -z {}k 2k", 64 * c + 14));
        setup.push(format!("write -P {} {}k 2k", 0xd0 + c, 64 * c + 26));
        setup.push(format!("write -P {} {}k 2k", 0xe0 + c, 64 * c + 36));
    }
    io_both(&ours, &theirs, &setup);
    let out = tool(&["snapshot", "-c", "s1", path_str(&ours)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    qemu_img_ok(&["snapshot", "-c", "s1", path_str(&theirs)]);
    // Writes inside, before and after the allocated span, and zero writes that leave the
    // shared cluster in place (whole subclusters, or parts whose rest reads as zeros) or copy it.
    let after: Vec<String> = [
        "write -P 0xf0 30k 1k",
        "write -P 0xf1 84k 1k",
        "write -P 0xf2 168k 1k",
        "write -z 222k 3k",
        "write -z 282k 2k",
        "write -z 346k 1k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    io_both(&ours, &theirs, &after);
    assert_eq!(first_l2_table(&ours), first_l2_table(&theirs));
    for p in [&ours, &theirs] {
        assert_eq!(qemu_check(p).0, 0, "{}", p.display());
    }
    qemu_img_ok(&["compare", "-q", path_str(&ours), path_str(&theirs)]);
    // The snapshot still reads as it was taken.
    for p in [&ours, &theirs] {
        let out = dir.join(format!(
            "{}.s1.raw",
            p.file_name().unwrap().to_string_lossy()
        ));
        qemu_img_ok(&[
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            path_str(p),
            path_str(&out),
        ]);
    }
    let a = std::fs::read(dir.join("ours.qcow2.s1.raw")).unwrap();
    let b = std::fs::read(dir.join("theirs.qcow2.s1.raw")).unwrap();
    assert!(a == b, "the snapshots read differently");
}
