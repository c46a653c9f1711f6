//! `amend` against `qemu-img amend`: compat both ways (a downgrade expands zero clusters),
//! lazy refcounts, refcount widths, and the refusals, with the same messages and exit codes;
//! the results read the same, map the same and check clean.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{qemu_check, qemu_info, qemu_io, scratch_dir};

/// An image with data, a plain zero cluster and a preallocated zero cluster, made by qemu-img
/// (each side gets its own, so the files are alike block for block).
fn make(dir: &Path, name: &str, create_opts: &str, backing: bool) {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    if backing {
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend([name, "4M"]);
    let made = qemu_in(dir, &args);
    assert_eq!(code(&made), 0, "{}", stderr(&made));
    let fill = qemu_io(&[
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -z 1M 64k",
        "-c",
        "write -P 2 2M 64k",
        "-c",
        "write -z 2M 64k",
        path_str(&path),
    ]);
    assert_eq!(code(&fill), 0);
}

fn map(dir: &Path, name: &str) -> String {
    stdout(&qemu_in(dir, &["map", "--output=json", name]))
}

#[test]
fn amend_matches_qemu_img() {
    let dir = scratch_dir("amend_matches_qemu_img");
    let base = qemu_in(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    assert_eq!(code(&base), 0);
    assert_eq!(
        code(&qemu_io(&[
            "-c",
            "write -P 9 0 4M",
            path_str(&dir.join("base.qcow2"))
        ])),
        0
    );
    let cases: &[(&str, &[&str])] = &[
        ("", &["-o", "compat=0.10"]),
        ("", &["-o", "compat=0.10,lazy_refcounts=off"]),
        ("", &["-o", "lazy_refcounts=on"]),
        ("lazy_refcounts=on", &["-o", "lazy_refcounts=off"]),
        ("lazy_refcounts=on", &["-o", "compat=0.10"]),
        ("", &["-o", "refcount_bits=8"]),
        ("", &["-o", "refcount_bits=1"]),
        ("", &["-o", "refcount_bits=64", "-p"]),
        ("refcount_bits=8", &["-o", "compat=0.10"]),
        ("refcount_bits=8", &["-o", "compat=0.10,refcount_bits=16"]),
        ("", &["-o", "refcount_bits=8,compat=0.10"]),
        ("compat=0.10", &["-o", "compat=1.1"]),
        (
            "compat=0.10",
            &["-o", "compat=v3,lazy_refcounts=on,refcount_bits=4"],
        ),
        ("compat=0.10", &["-o", "refcount_bits=8"]),
        ("compat=0.10", &["-o", "lazy_refcounts=on"]),
        ("extended_l2=on", &["-o", "compat=0.10"]),
        ("", &["-o", "compat=0.9"]),
        ("", &["-o", "refcount_bits=3"]),
        ("", &["-o", "cluster_size=4k"]),
        ("", &["-o", "backing_file=x"]),
        ("", &["-o", "foo=1"]),
        ("", &[]),
    ];
    for backing in [false, true] {
        for (create_opts, args) in cases {
            let case = format!("create -o {create_opts:?}, amend {args:?}, backing {backing}");
            make(&dir, "ours.qcow2", create_opts, backing);
            make(&dir, "theirs.qcow2", create_opts, backing);
            let run = |name: &str, qemu: bool| {
                let mut a = vec!["amend"];
                a.extend(*args);
                a.push(name);
                if qemu {
                    qemu_in(&dir, &a)
                } else {
                    tool_in(Some(&dir), &a)
                }
            };
            let (o, t) = (run("ours.qcow2", false), run("theirs.qcow2", true));
            no_panic(&o);
            assert_eq!(code(&o), code(&t), "{case}: {}", stderr(&o));
            if !args.contains(&"-p") {
                assert_eq!(stdout(&o), stdout(&t), "{case}");
                assert_eq!(
                    stderr(&o).replace("qcow2-tool:", "qemu-img:"),
                    stderr(&t),
                    "{case}"
                );
            }
            assert_eq!(
                map(&dir, "ours.qcow2"),
                map(&dir, "theirs.qcow2"),
                "{case}: map"
            );
            let cmp = qemu_in(&dir, &["compare", "ours.qcow2", "theirs.qcow2"]);
            assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
            let (check, report) = qemu_check(&dir.join("ours.qcow2"));
            assert_eq!(check, 0, "{case}: {report}");
            let spec = |name: &str| qemu_info(&dir.join(name))["format-specific"]["data"].clone();
            assert_eq!(
                spec("ours.qcow2"),
                spec("theirs.qcow2"),
                "{case}: format-specific"
            );
        }
    }
}

#[test]
fn data_file_options_amend_as_qemu_img_does() {
    let dir = scratch_dir("data_file_options_amend_as_qemu_img_does");
    // (create options, amend options)
    let cases = [
        ("", "data_file=x.raw"),
        ("data_file=d.raw", "data_file_raw=on"),
        ("data_file=d.raw", "data_file=renamed.raw"),
        ("data_file=d.raw,data_file_raw=on", "data_file_raw=off"),
        ("data_file=d.raw,data_file_raw=on", "data_file_raw=on"),
    ];
    for (i, (create, amend)) in cases.iter().enumerate() {
        let mut infos = Vec::new();
        let mut outputs = Vec::new();
        for who in ["ours", "qemu"] {
            let name = format!("{who}{i}.qcow2");
            let data = format!("{who}{i}.raw");
            let create = create.replace("d.raw", &data);
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !create.is_empty() {
                args.extend(["-o", create.as_str()]);
            }
            args.extend([name.as_str(), "1M"]);
            assert_eq!(code(&qemu_in(&dir, &args)), 0, "{create}");
            let argv = ["amend", "-o", amend, name.as_str()];
            let out = if who == "ours" {
                tool_in(Some(&dir), &argv)
            } else {
                qemu_in(&dir, &argv)
            };
            outputs.push((code(&out), stderr(&out).replace("qcow2-tool:", "qemu-img:")));
            let info = qemu_info(&dir.join(&name));
            let mut spec = info["format-specific"]["data"].clone();
            if let Some(f) = spec.get_mut("data-file") {
                *f = f.as_str().unwrap().replace(who, "WHO").into();
            }
            infos.push(spec);
            if code(&out) == 0 && amend.starts_with("data_file=") {
                // The new name is recorded; the file itself does not move.
                std::fs::rename(dir.join(&data), dir.join("renamed.raw")).unwrap();
                let (check, json) = qemu_check(&dir.join(&name));
                assert_eq!(check, 0, "{amend}: {json}");
                std::fs::rename(dir.join("renamed.raw"), dir.join(&data)).unwrap();
            }
        }
        assert_eq!(outputs[0], outputs[1], "{create} / {amend}");
        assert_eq!(infos[0], infos[1], "{create} / {amend}");
    }
}
