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
