//! Block nodes given by options (`json:` names, `-o`): null nodes, raw windows, a qcow2 image's
//! data file given as a node. Each case runs qcow2-tool and qemu-img/qemu-io the same way and
//! compares what they print and leave behind.

mod common;

use std::path::Path;
use std::process::Output;

use common::{code, ours_as, path_str, stderr, stdout};
use qcow2_testdata::{qemu_img_ok, require_qemu, scratch_dir};

/// Runs ours (as `tool`) and QEMU's `tool` with the same arguments in `dir`.
fn both(dir: &Path, tool: &str, args: &[&str]) -> (Output, Output) {
    require_qemu();
    let ours = ours_as(tool, dir, args);
    let theirs = std::process::Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("run the QEMU tool");
    (ours, theirs)
}

/// Output without throughput lines, whose figures differ run to run.
fn steady(text: &str) -> String {
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_null_source_converts_to_nothing_sparse_and_to_data_when_not() {
    let dir = scratch_dir("nodes_null_convert");
    let source = "json:{'driver': 'null-co', 'size': 1048576, 'read-zeroes': true}";
    for sparse in ["512", "0"] {
        let mut maps = Vec::new();
        for (i, tool) in ["ours", "qemu"].into_iter().enumerate() {
            let target = dir.join(format!("t{i}.qcow2"));
            let target = path_str(&target);
            let args = ["convert", "-O", "qcow2", "-S", sparse, source, target];
            let out = if tool == "ours" {
                ours_as("qemu-img", &dir, &args)
            } else {
                qcow2_testdata::qemu_img(&args)
            };
            assert_eq!(code(&out), 0, "{tool}: {}", stderr(&out));
            maps.push(qemu_img_ok(&["map", "--output=json", target]));
        }
        assert_eq!(maps[0], maps[1], "-S {sparse}");
        assert_eq!(maps[0].contains("\"data\": true"), sparse == "0");
    }
}

#[test]
fn io_on_a_null_node_reports_it_and_discards_writes() {
    let dir = scratch_dir("nodes_null_io");
    let name = "json:{'driver': 'null-co', 'size': 65536, 'read-zeroes': true}";
    let args = [
        "-f",
        "null-co",
        "-c",
        "reopen",
        "-c",
        "info",
        "-c",
        "write -P 1 0 4k",
        "-c",
        "read -P 0 0 4k",
        "-c",
        "length",
        name,
    ];
    let (ours, theirs) = both(&dir, "qemu-io", &args);
    assert_eq!(code(&ours), code(&theirs), "{}", stderr(&ours));
    assert_eq!(steady(&stdout(&ours)), steady(&stdout(&theirs)));
    assert!(stdout(&ours).starts_with("format name: null-co\nformat name: null-co\n"));
    let bad = ["-c", "info", "json:{'driver': 'null-co', 'bogus': 1}"];
    let (ours, theirs) = both(&dir, "qemu-io", &bad);
    assert_eq!(code(&ours), code(&theirs));
    assert_eq!(stderr(&ours), stderr(&theirs));
}

#[test]
fn reopen_keeps_node_names_and_drivers_and_checks_its_options() {
    let dir = scratch_dir("nodes_reopen");
    let base = dir.join("t.qcow2.base");
    let top = dir.join("t.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let (b, t) = (path_str(&base), path_str(&top));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    let opened_named = format!("open -o node-name=foo {t}");
    let cases: &[&[&str]] = &[
        &["-c", "reopen -o node-name=foo", t],
        &["-c", "reopen -o backing.node-name=foo", t],
        &["-c", &opened_named, "-c", "reopen -o node-name=foo"],
        &["-c", &opened_named, "-c", "reopen"],
        &["-c", "reopen -o driver=raw", t],
        &["-c", "reopen -o file.driver=qcow2", t],
        &["-c", "reopen -o backing.driver=file", t],
        &["-c", "reopen -o driver=qcow2", t],
        &["-c", "reopen -o file.driver=file", t],
        &["-c", "reopen -o backing.driver=qcow2", t],
        &["-c", "reopen -c none -o cache.direct=on", t],
        &["-c", "reopen -c directsync -o cache.no-flush=on", t],
        &["-c", "reopen -o read-only=foo", t],
        &["-c", "reopen -o cache.direct=baz", t],
        &["-c", "reopen -o auto-read-only=qux", t],
    ];
    for args in cases {
        let mut full = vec!["-f", "qcow2"];
        full.extend_from_slice(args);
        let (ours, theirs) = both(&dir, "qemu-io", &full);
        assert_eq!(code(&ours), code(&theirs), "{args:?}: {}", stderr(&ours));
        assert_eq!(stderr(&ours), stderr(&theirs), "{args:?}");
        assert_eq!(steady(&stdout(&ours)), steady(&stdout(&theirs)), "{args:?}");
    }
}

#[test]
fn io_info_on_a_raw_image_matches_qemu_io() {
    let dir = scratch_dir("nodes_raw_info");
    let raw = dir.join("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let (ours, theirs) = both(
        &dir,
        "qemu-io",
        &["-f", "raw", "-c", "info", path_str(&raw)],
    );
    assert_eq!(code(&ours), code(&theirs));
    assert_eq!(stdout(&ours), stdout(&theirs));
}

/// Runs `qemu-io ARGS` (ours and QEMU's) on two copies of the image `base` with data file
/// `base.data`; `name` makes the file name from the copy's image and data file paths. Returns
/// both outputs and both images' `check` output after.
fn data_file_case(
    dir: &Path,
    args: &[&str],
    name: impl Fn(&str, &str) -> String,
) -> Vec<(Output, String)> {
    require_qemu();
    let mut out = Vec::new();
    for tool in ["ours", "qemu"] {
        let image = dir.join(format!("{tool}.qcow2"));
        let data = dir.join(format!("{tool}.qcow2.data"));
        let _ = std::fs::remove_file(&data);
        let data_opt = format!("data_file={}", path_str(&data));
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &data_opt,
            path_str(&image),
            "1M",
        ]);
        let json = name(path_str(&image), path_str(&data));
        let mut full: Vec<&str> = args.to_vec();
        full.push(&json);
        let run = if tool == "ours" {
            ours_as("qemu-io", dir, &full)
        } else {
            std::process::Command::new("qemu-io")
                .args(&full)
                .env("LC_ALL", "C")
                .current_dir(dir)
                .output()
                .expect("run qemu-io")
        };
        let check = qcow2_testdata::qemu_img(&["check", path_str(&image)]);
        out.push((run, stdout(&check)));
    }
    out
}

#[test]
fn a_null_data_file_node_takes_the_writes_and_leaves_the_image_consistent() {
    let dir = scratch_dir("nodes_null_data_file");
    let name = |image: &str, _: &str| {
        format!("json:{{'driver': 'qcow2', 'file': {{'filename': '{image}'}}, 'data-file': {{'driver': 'null-co', 'size': '1048576', 'read-zeroes': true}}}}")
    };
    let args = [
        "-c",
        "write -P 7 4k 64k",
        "-c",
        "read -P 0 4k 64k",
        "-c",
        "map",
    ];
    let runs = data_file_case(&dir, &args, name);
    let ((ours, ours_check), (theirs, theirs_check)) = (&runs[0], &runs[1]);
    assert_eq!(code(ours), code(theirs), "{}", stderr(ours));
    assert_eq!(steady(&stdout(ours)), steady(&stdout(theirs)));
    assert_eq!(ours_check, theirs_check);
    assert!(ours_check.contains("No errors were found"));
    // The header's data file was not written: the node replaced it.
    let data = std::fs::read(dir.join("ours.qcow2.data")).unwrap();
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn a_failed_write_under_a_blkdebug_data_file_frees_nothing_it_should_keep() {
    let dir = scratch_dir("nodes_blkdebug_data_file");
    let conf = dir.join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nonce = \"on\"\n",
    )
    .unwrap();
    let conf = path_str(&conf).to_owned();
    let name = |image: &str, data: &str| {
        format!("json:{{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{image}'}}, 'data-file': {{'driver': 'raw', 'file': {{'driver': 'blkdebug', 'config': '{conf}', 'image': {{'driver': 'file', 'filename': '{data}'}}}}}}}}")
    };
    let args = [
        "-c",
        "write 0 64k",
        "-c",
        "write -P 3 0 64k",
        "-c",
        "read -P 3 0 64k",
    ];
    let runs = data_file_case(&dir, &args, name);
    let ((ours, ours_check), (theirs, theirs_check)) = (&runs[0], &runs[1]);
    assert_eq!(code(ours), code(theirs), "{}", stderr(ours));
    assert_eq!(steady(&stdout(ours)), steady(&stdout(theirs)));
    assert!(stdout(ours).starts_with("write failed: Input/output error\n"));
    assert_eq!(ours_check, theirs_check);
}

#[test]
fn data_file_nodes_are_refused_where_qemu_refuses_them() {
    let dir = scratch_dir("nodes_data_file_refused");
    let image = dir.join("plain.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&image), "1M"]);
    let i = path_str(&image);
    for data in ["{'driver': 'null-co'}", "'node0'"] {
        let name =
            format!("json:{{'driver':'qcow2','file':{{'filename':'{i}'}},'data-file':{data}}}");
        let (ours, theirs) = both(&dir, "qemu-io", &["-c", "read 0 512", &name]);
        assert_eq!(code(&ours), code(&theirs));
        assert_eq!(stderr(&ours), stderr(&theirs));
    }
}

#[test]
fn info_over_a_quorum_file_node_matches_qemu_img() {
    let dir = scratch_dir("nodes_quorum_info");
    let base = dir.join("q.qcow2.base");
    let top = dir.join("q.qcow2");
    let copy = dir.join("q.qcow2.copy");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "64M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "q.qcow2.base",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    std::fs::copy(&top, &copy).unwrap();
    let name = format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'quorum', 'vote-threshold': 1, 'children': [{{'driver': 'file', 'filename': '{}'}}, {{'driver': 'file', 'filename': '{}'}}]}}}}",
        path_str(&top),
        path_str(&copy)
    );
    for output in ["--output=human", "--output=json"] {
        let (ours, theirs) = both(&dir, "qemu-img", &["info", output, &name]);
        assert_eq!(code(&ours), code(&theirs), "{}", stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&theirs), "{output}");
    }
    let (ours, _) = both(&dir, "qemu-img", &["info", &name]);
    assert!(stdout(&ours).contains("backing file: q.qcow2.base (cannot determine actual path)"));
    let bad = name.replace("'vote-threshold': 1", "'vote-threshold': 3");
    let (ours, theirs) = both(&dir, "qemu-img", &["info", &bad]);
    assert_eq!(code(&ours), code(&theirs));
    assert!(stderr(&ours).contains("threshold may not exceed children count"));
}

#[test]
fn io_over_a_quorum_writes_every_child_and_reads_the_vote() {
    let dir = scratch_dir("nodes_quorum_io");
    let mut children = Vec::new();
    for tool in ["ours", "qemu"] {
        let a = dir.join(format!("{tool}.a.qcow2"));
        let b = dir.join(format!("{tool}.b.qcow2"));
        qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&a), "1M"]);
        std::fs::copy(&a, &b).unwrap();
        let name = format!(
            "json:{{'driver': 'qcow2', 'file': {{'driver': 'quorum', 'vote-threshold': 2, 'children': [{{'driver': 'file', 'filename': '{}'}}, {{'driver': 'file', 'filename': '{}'}}]}}}}",
            path_str(&a),
            path_str(&b)
        );
        let args = [
            "-c",
            "write -P 9 64k 64k",
            "-c",
            "read -P 9 64k 64k",
            name.as_str(),
        ];
        let out = if tool == "ours" {
            ours_as("qemu-io", &dir, &args)
        } else {
            std::process::Command::new("qemu-io")
                .args(args)
                .env("LC_ALL", "C")
                .output()
                .unwrap()
        };
        children.push((steady(&stdout(&out)), code(&out)));
        // Both children hold the write: each reads it back alone.
        for child in [&a, &b] {
            let check = qcow2_testdata::qemu_io(&["-c", "read -P 9 64k 64k", path_str(child)]);
            assert!(!stdout(&check).contains("verification failed"), "{tool}");
        }
    }
    assert_eq!(children[0], children[1]);
    assert_eq!(children[0].1, 0);
}
