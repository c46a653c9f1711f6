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
            assert_eq!(stdout(&o), stdout(&t), "{case}");
            assert_eq!(
                stderr(&o).replace("qcow2-tool:", "qemu-img:"),
                stderr(&t),
                "{case}"
            );
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

/// Runs `setup` (qemu-img/qemu-io command lines, `IMG` standing for the image) to build
/// `ours.qcow2` and `theirs.qcow2` alike, then `amend` on each with both tools.
fn twin_images(dir: &Path, setup: &[&[&str]]) {
    for name in ["ours.qcow2", "theirs.qcow2"] {
        let _ = std::fs::remove_file(dir.join(name));
        let _ = std::fs::remove_file(dir.join(format!("{name}.base")));
        for step in setup {
            let args: Vec<String> = step.iter().map(|a| a.replace("IMG", name)).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = if args[0] == "io" {
                let mut io = vec!["-f".to_string(), "qcow2".to_string()];
                io.extend(args[1..].iter().map(|a| {
                    if a.ends_with(".qcow2") || a.ends_with(".base") {
                        path_str(&dir.join(a)).to_string()
                    } else {
                        a.to_string()
                    }
                }));
                let io: Vec<&str> = io.iter().map(String::as_str).collect();
                qemu_io(&io)
            } else {
                qemu_in(dir, &args)
            };
            assert_eq!(code(&out), 0, "{step:?}: {}", stderr(&out));
        }
    }
}

/// `amend ARGS` with both tools: (exit code, stdout, stderr) each, `qcow2-tool` named as
/// qemu-img in messages.
fn amend_both(dir: &Path, args: &[&str]) -> [(i32, String, String); 2] {
    let run = |name: &str, qemu: bool| {
        let mut a = vec!["amend"];
        a.extend(args);
        a.push(name);
        let out = if qemu {
            qemu_in(dir, &a)
        } else {
            tool_in(Some(dir), &a)
        };
        no_panic(&out);
        (
            code(&out),
            stdout(&out),
            stderr(&out).replace("qcow2-tool:", "qemu-img:"),
        )
    };
    [run("ours.qcow2", false), run("theirs.qcow2", true)]
}

/// Header fields `qemu-img info` shows, and every snapshot's contents, alike on both images;
/// our image checks clean before and after reverting to each snapshot.
fn assert_twins_alike(dir: &Path, case: &str) {
    let (check, report) = qemu_check(&dir.join("ours.qcow2"));
    assert_eq!(check, 0, "{case}: {report}");
    let spec = |name: &str| {
        let info = qemu_info(&dir.join(name));
        (
            info["format-specific"]["data"]["compat"].clone(),
            info["virtual-size"].clone(),
            info["snapshots"]
                .as_array()
                .map(|s| s.iter().map(|s| s["name"].clone()).collect::<Vec<_>>()),
        )
    };
    assert_eq!(spec("ours.qcow2"), spec("theirs.qcow2"), "{case}");
    let cmp = qemu_in(dir, &["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
    let snapshots = qemu_info(&dir.join("ours.qcow2"))["snapshots"].clone();
    for s in snapshots.as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap();
        for image in ["ours.qcow2", "theirs.qcow2"] {
            let out = qemu_in(dir, &["snapshot", "-a", name, image]);
            assert_eq!(code(&out), 0, "{case}: {}", stderr(&out));
        }
        let (check, report) = qemu_check(&dir.join("ours.qcow2"));
        assert_eq!(check, 0, "{case}, at {name}: {report}");
        let cmp = qemu_in(dir, &["compare", "ours.qcow2", "theirs.qcow2"]);
        assert_eq!(code(&cmp), 0, "{case}, at {name}: {}", stdout(&cmp));
    }
}

#[test]
fn downgrade_with_snapshots_matches_qemu_img() {
    let dir = scratch_dir("downgrade_with_snapshots_matches_qemu_img");
    let base: &[&str] = &["create", "-q", "-f", "qcow2", "IMG.base", "64M"];
    let fill_base: &[&str] = &["io", "-c", "write -P 0x2a 0 128k", "IMG.base"];
    let backed: &[&str] = &[
        "create", "-q", "-f", "qcow2", "-b", "IMG.base", "-F", "qcow2", "IMG", "64M",
    ];
    let plain: &[&str] = &["create", "-q", "-f", "qcow2", "IMG", "64M"];
    let snap: &[&str] = &["snapshot", "-c", "foo", "IMG"];
    // (case, setup, amend options): iotest 061's snapshot cases, a preallocated zero cluster
    // and QEMU's refusals.
    let cases: &[(&str, Vec<&[&str]>, &str)] = &[
        (
            "zeros in a snapshot only",
            vec![
                plain,
                &["io", "-c", "write -z 0 128k", "IMG"],
                snap,
                &["io", "-c", "write -P 0x2a 0 128k", "IMG"],
            ],
            "compat=0.10",
        ),
        (
            "zeros in a shared table",
            vec![plain, &["io", "-c", "write -z 0 128k", "IMG"], snap],
            "compat=0.10",
        ),
        (
            "preallocated zeros in a snapshot",
            vec![
                plain,
                &[
                    "io",
                    "-c",
                    "write -P 7 0 128k",
                    "-c",
                    "write -z 64k 64k",
                    "IMG",
                ],
                snap,
                &["io", "-c", "write -P 0x2a 0 128k", "IMG"],
            ],
            "compat=0.10",
        ),
        (
            "zeros over a backing file in a snapshot",
            vec![
                base,
                fill_base,
                backed,
                &["io", "-c", "write -z 0 64k", "IMG"],
                snap,
                &["io", "-c", "write -P 0x42 0 128k", "IMG"],
            ],
            "compat=0.10",
        ),
        (
            "zeros over a backing file in a shared table",
            vec![
                base,
                fill_base,
                backed,
                &["io", "-c", "write -z 0 128k", "IMG"],
                snap,
            ],
            "compat=0.10",
        ),
        (
            "a snapshot of another size",
            vec![plain, snap, &["resize", "IMG", "128M"]],
            "compat=0.10",
        ),
        (
            "a resize to the snapshot's size first",
            vec![
                plain,
                &["io", "-c", "write -z 0 128k", "IMG"],
                snap,
                &["resize", "IMG", "128M"],
            ],
            "compat=0.10,size=64M",
        ),
        (
            "a resize away from the snapshot's size first",
            vec![plain, snap],
            "compat=0.10,size=32M",
        ),
    ];
    for (case, setup, options) in cases {
        twin_images(&dir, setup);
        let [ours, theirs] = amend_both(&dir, &["-o", options]);
        assert_eq!(ours, theirs, "{case}");
        assert_twins_alike(&dir, case);
    }
}

#[test]
fn amend_progress_matches_qemu_img() {
    let dir = scratch_dir("amend_progress_matches_qemu_img");
    let zeros: &[&str] = &[
        "io",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -z 1G 64k",
        "-c",
        "write -z 2G 64k",
        "-c",
        "write -z 3G 64k",
        "IMG",
    ];
    let cases: &[(&str, Vec<&[&str]>, &str)] = &[
        (
            "downgrade",
            vec![&["create", "-q", "-f", "qcow2", "IMG", "4G"], zeros],
            "compat=0.10",
        ),
        (
            "downgrade with a snapshot",
            vec![
                &["create", "-q", "-f", "qcow2", "IMG", "4G"],
                zeros,
                &["snapshot", "-c", "foo", "IMG"],
            ],
            "compat=0.10",
        ),
        (
            // iotest 112: the first new refcount block fills up, so QEMU walks once more.
            "a refcount width change that needs another walk",
            vec![
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "refcount_bits=1,cluster_size=512",
                    "IMG",
                    "64k",
                ],
                &["io", "-c", "write 0 29696", "IMG"],
            ],
            "refcount_bits=64",
        ),
        (
            "an upgrade and a refcount width change",
            vec![&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "IMG",
                "64M",
            ]],
            "compat=1.1,refcount_bits=4",
        ),
    ];
    for (case, setup, options) in cases {
        twin_images(&dir, setup);
        let [ours, theirs] = amend_both(&dir, &["-p", "-o", options]);
        assert!(ours.1.contains("(100.00/100%)"), "{case}: {ours:?}");
        assert_eq!(ours, theirs, "{case}");
        assert_twins_alike(&dir, case);
    }
}

#[test]
fn resize_of_a_v2_image_with_snapshots_is_refused_as_by_qemu_img() {
    let dir = scratch_dir("resize_of_a_v2_image_with_snapshots");
    twin_images(
        &dir,
        &[
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "IMG",
                "32M",
            ],
            &["snapshot", "-c", "foo", "IMG"],
        ],
    );
    let ours = tool_in(Some(&dir), &["resize", "ours.qcow2", "64M"]);
    let theirs = qemu_in(&dir, &["resize", "theirs.qcow2", "64M"]);
    no_panic(&ours);
    assert_eq!(code(&ours), code(&theirs));
    assert_eq!(
        stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
        stderr(&theirs)
    );
    assert!(stderr(&theirs).contains("Can't resize a v2 image which has snapshots"));
    assert_twins_alike(&dir, "refused resize");
}

#[test]
fn image_opts_and_an_unchanged_backing_file_amend_as_with_qemu_img() {
    let dir = scratch_dir("image_opts_and_an_unchanged_backing_file");
    let setup: &[&[&str]] = &[
        &["create", "-q", "-f", "qcow2", "IMG.base", "64M"],
        &[
            "create", "-q", "-f", "qcow2", "-b", "IMG.base", "-F", "qcow2", "IMG", "64M",
        ],
        &["io", "-c", "write -z 0 128k", "IMG"],
    ];
    let cases: Vec<(&str, Vec<String>, bool)> = vec![
        (
            "image-opts",
            vec![
                "-o".into(),
                "compat=0.10".into(),
                "--image-opts".into(),
                "driver=qcow2,file.filename=IMG,l2-cache-entry-size=4096".into(),
            ],
            false,
        ),
        (
            "the backing file it has",
            vec![
                "-o".into(),
                "backing_file=IMG.base,backing_fmt=qcow2".into(),
            ],
            true,
        ),
        (
            "another backing format",
            vec!["-o".into(), "backing_file=IMG.base,backing_fmt=raw".into()],
            true,
        ),
        (
            "encryption",
            vec!["-o".into(), "encryption=on".into()],
            true,
        ),
    ];
    for (case, args, name_last) in &cases {
        twin_images(&dir, setup);
        let mut results = Vec::new();
        for (name, qemu) in [("ours.qcow2", false), ("theirs.qcow2", true)] {
            let mut a: Vec<String> = vec!["amend".into()];
            a.extend(args.iter().map(|x| x.replace("IMG", name)));
            if *name_last {
                a.push(name.into());
            }
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = if qemu {
                qemu_in(&dir, &a)
            } else {
                tool_in(Some(&dir), &a)
            };
            no_panic(&out);
            results.push((code(&out), stderr(&out).replace("qcow2-tool:", "qemu-img:")));
        }
        assert_eq!(results[0], results[1], "{case}");
        assert_twins_alike(&dir, case);
    }
}

#[test]
fn dirty_downgrade_places_the_rebuilt_refcounts_as_qemu_img_does() {
    let dir = scratch_dir("dirty_downgrade_places_the_rebuilt_refcounts");
    let ours = dir.join("ours.qcow2");
    let _ = std::fs::remove_file(&ours);
    crashed_writer_image(&ours, true, &["write -P 0x2a 0 128k"]);
    std::fs::copy(&ours, dir.join("theirs.qcow2")).unwrap();
    let [o, t] = amend_both(&dir, &["-o", "compat=0.10"]);
    assert_eq!(o, t);
    let reftable = |name: &str| {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        (
            u32::from_be_bytes(bytes[4..8].try_into().unwrap()),
            u64::from_be_bytes(bytes[48..56].try_into().unwrap()),
        )
    };
    assert_eq!(reftable("ours.qcow2"), reftable("theirs.qcow2"));
    assert_twins_alike(&dir, "dirty downgrade");
}

/// iotest 061: `data_file=foo` renames the data file, `data_file=` (with the data file given
/// through `--image-opts`) drops its name; qemu-io then opens the image only with the data file
/// named, and both tools say so alike.
#[test]
fn a_data_file_name_is_changed_and_dropped_as_by_qemu_img() {
    let dir = scratch_dir("a_data_file_name_is_changed_and_dropped");
    let io_both = |args: &[String]| {
        let mut outs = Vec::new();
        for (who, qemu) in [("ours", false), ("theirs", true)] {
            let a: Vec<String> = args.iter().map(|x| x.replace("WHO", who)).collect();
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = if qemu {
                qemu_io(&a)
            } else {
                tool_in(Some(&dir), &[&["io"][..], &a].concat())
            };
            no_panic(&out);
            let text = (stdout(&out) + &stderr(&out))
                .replace("qcow2-tool:", "qemu-io:")
                .replace(who, "WHO");
            let text: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.contains(" ops; ") {
                        "<timing>".into()
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            outs.push((code(&out), text));
        }
        assert_eq!(outs[0], outs[1], "{args:?}");
        outs.remove(0)
    };
    let img = |who: &str| path_str(&dir.join(format!("{who}.qcow2"))).to_string();
    let data = |who: &str| path_str(&dir.join(format!("{who}.data"))).to_string();
    for who in ["ours", "theirs"] {
        let o = format!("data_file={}", data(who));
        let out = qemu_in(
            &dir,
            &["create", "-q", "-f", "qcow2", "-o", &o, &img(who), "64M"],
        );
        assert_eq!(code(&out), 0);
    }
    let image = img("WHO");
    let opts = format!("data-file.filename={},file.filename={}", data("WHO"), image);
    let open_opts = vec![
        "-c".to_string(),
        format!("open -o {opts}"),
        "-c".into(),
        "read 0 4k".into(),
    ];
    let plain_read = vec!["-c".to_string(), "read 0 4k".into(), image.clone()];

    let [o, t] = amend_both(&dir, &["-o", "data_file=foo"]);
    assert_eq!(o, t);
    let (status, text) = io_both(&plain_read);
    assert_eq!(status, 1);
    assert!(text.concat().contains("Could not open 'foo'"), "{text:?}");
    assert_eq!(io_both(&open_opts).0, 0);

    let mut results = Vec::new();
    for (who, qemu) in [("ours", false), ("theirs", true)] {
        let spec = opts.replace("WHO", who);
        let args = ["amend", "-o", "data_file=", "--image-opts", spec.as_str()];
        let out = if qemu {
            qemu_in(&dir, &args)
        } else {
            tool_in(Some(&dir), &args)
        };
        no_panic(&out);
        results.push((code(&out), stderr(&out).replace("qcow2-tool:", "qemu-img:")));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].0, 0);
    let (status, text) = io_both(&plain_read);
    assert_eq!(status, 1);
    assert!(
        text.concat()
            .contains("'data-file' is required for this image"),
        "{text:?}"
    );
    assert_eq!(io_both(&open_opts).0, 0);
    let spec = |who: &str| qemu_info(&dir.join(format!("{who}.qcow2")))["format-specific"].clone();
    assert_eq!(spec("ours"), spec("theirs"));
    let info = |who: &str, qemu: bool| {
        let spec = opts.replace("WHO", who);
        let args = ["info", "--image-opts", spec.as_str()];
        let out = if qemu {
            qemu_in(&dir, &args)
        } else {
            tool_in(Some(&dir), &args)
        };
        stdout(&out)
            .lines()
            .filter(|l| !l.starts_with("disk size"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(who, "WHO")
    };
    assert_eq!(info("ours", false), info("theirs", true));
}
