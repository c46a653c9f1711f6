//! `convert -n` (into an existing target), `--target-is-zero` and the cache and worker options,
//! against qemu-img: the same exit codes and messages, and targets with the same bytes, also
//! where the target held other bytes before.

mod common;

use common::{code, path_str, tool_in};
use qcow2_testdata::{qemu_img, qemu_img_ok, qemu_io, scratch_dir};

/// Arguments, target format, and how the target is made first: not at all, or filled with a
/// byte at a size.
type Case<'a> = (&'a [&'a str], &'a str, Option<(u8, &'a str)>);

#[test]
fn converting_into_existing_targets_matches_qemu_img() {
    let dir = scratch_dir("convert_existing");
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "8M"]);
    qemu_io(&[
        "-c",
        "write -P 1 0 100k",
        "-c",
        "write -z 1M 1M",
        "-c",
        "write -P 3 7M 3",
        path_str(&src),
    ]);
    let cases: &[Case] = &[
        (&["-n"], "raw", Some((9, "16M"))),
        (&["-n"], "qcow2", Some((9, "8M"))),
        (&["-n", "--target-is-zero"], "raw", Some((0, "8M"))),
        (&["-n", "--target-is-zero"], "qcow2", Some((0, "8M"))),
        (&["-n"], "raw", Some((9, "1M"))),
        (&["-n"], "raw", None),
        (&["--target-is-zero"], "raw", None),
        (&["-n", "-o", "cluster_size=4k"], "qcow2", Some((0, "8M"))),
        (&["-t", "bogus"], "raw", None),
        (&["-T", "none", "-t", "none", "-W", "-m", "4"], "raw", None),
        (&["-m", "17"], "raw", None),
    ];
    for (extra, format, before) in cases {
        let mut outs = Vec::new();
        for who in ["ours", "theirs"] {
            let out = dir.join(format!("{who}.{format}"));
            let _ = std::fs::remove_file(&out);
            if let Some((fill, size)) = before {
                qemu_img_ok(&["create", "-q", "-f", format, path_str(&out), size]);
                if *fill != 0 {
                    let w = format!("write -P {fill} 0 {size}");
                    qemu_io(&["-f", format, "-c", &w, path_str(&out)]);
                }
            }
            let mut args = vec!["convert", "-O", format];
            args.extend_from_slice(extra);
            args.extend(["src.qcow2", out.file_name().unwrap().to_str().unwrap()]);
            let result = if who == "ours" {
                tool_in(Some(&dir), &args)
            } else {
                std::process::Command::new("qemu-img")
                    .args(&args)
                    .current_dir(&dir)
                    .output()
                    .expect("qemu-img")
            };
            outs.push((out, result));
        }
        let case = format!("{extra:?} -O {format}");
        let (ours, theirs) = (&outs[0], &outs[1]);
        assert_eq!(code(&ours.1), code(&theirs.1), "{case}");
        assert_eq!(
            String::from_utf8_lossy(&ours.1.stderr)
                .replace("qcow2-tool:", "qemu-img:")
                .replace("ours.", "theirs."),
            String::from_utf8_lossy(&theirs.1.stderr),
            "{case}"
        );
        if code(&theirs.1) == 0 {
            let cmp = qemu_img(&[
                "compare",
                "-f",
                format,
                "-F",
                format,
                path_str(&ours.0),
                path_str(&theirs.0),
            ]);
            assert_eq!(
                code(&cmp),
                0,
                "{case}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
    }
}

/// Zeros of the source become zero clusters of an existing qcow2 target, as qemu-img makes
/// them, also where the target reads as zeros already (unallocated, or through an empty backing
/// file; a v2 target over a backing file gets zeros as data): the targets map alike.
#[test]
fn zeros_into_existing_qcow2_targets_map_as_qemu_img_maps_them() {
    let dir = scratch_dir("convert_existing_zero_map");
    let src = dir.join("src.qcow2");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "4M"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "4M"]);
    for compat in ["1.1", "0.10"] {
        for backing in [false, true] {
            let mut maps = Vec::new();
            for tool in ["ours", "qemu-img"] {
                let dst = dir.join(format!("{tool}.qcow2"));
                let _ = std::fs::remove_file(&dst);
                let o = format!("compat={compat}");
                let mut create = vec!["create", "-q", "-f", "qcow2", "-o", &o];
                if backing {
                    create.extend(["-b", path_str(&base), "-F", "qcow2"]);
                }
                create.extend([path_str(&dst), "4M"]);
                qemu_img_ok(&create);
                let args = [
                    "convert",
                    "-n",
                    "-O",
                    "qcow2",
                    path_str(&src),
                    path_str(&dst),
                ];
                let out = if tool == "ours" {
                    tool_in(None, &args)
                } else {
                    qemu_img(&args)
                };
                assert_eq!(code(&out), 0, "{tool} {compat} {backing}: {out:?}");
                let map = qemu_img(&["map", "--output=json", path_str(&dst)]);
                maps.push(
                    String::from_utf8(map.stdout)
                        .unwrap()
                        .replace("ours", "qemu-img"),
                );
            }
            assert_eq!(maps[0], maps[1], "compat {compat}, backing {backing}");
        }
    }
}
