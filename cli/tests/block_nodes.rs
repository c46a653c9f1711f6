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
