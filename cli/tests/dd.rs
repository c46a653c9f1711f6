//! `dd` against `qemu-img dd`: the same exit codes and messages, outputs of the same size and
//! the same guest bytes (`qemu-img compare`), for block sizes, counts, skips and both output
//! formats.

mod common;

use common::{code, path_str, tool_in};
use qcow2_testdata::{qemu_img, qemu_img_ok, qemu_io, scratch_dir};

#[test]
fn dd_matches_qemu_img() {
    let dir = scratch_dir("dd");
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "8M"]);
    qemu_io(&[
        "-c",
        "write -P 1 0 100k",
        "-c",
        "write -P 2 1M 1M",
        "-c",
        "write -P 3 7M 3",
        path_str(&src),
    ]);
    let cases: &[(&[&str], &str)] = &[
        (&["bs=1M", "count=2", "skip=1"], "raw"),
        (&["bs=64k"], "raw"),
        (&[], "raw"),
        (&["bs=3", "count=1"], "raw"),
        (&["count=0"], "raw"),
        (&["skip=100", "bs=1M"], "raw"),
        (&["bs=512k", "skip=3"], "qcow2"),
        (&["bogus=1"], "raw"),
        (&["bs=0"], "raw"),
        (&["bs=3G"], "raw"),
        (&["bs=x"], "raw"),
        (&["count=x"], "raw"),
        (&["skip=-1"], "raw"),
    ];
    for (operands, format) in cases {
        let mut outs = Vec::new();
        for who in ["ours", "theirs"] {
            let out = format!("{who}.{format}");
            let _ = std::fs::remove_file(dir.join(&out));
            let (if_arg, of_arg) = ("if=src.qcow2".to_string(), format!("of={out}"));
            let mut args = vec!["dd", "-O", format, if_arg.as_str(), of_arg.as_str()];
            args.extend_from_slice(operands);
            let result = if who == "ours" {
                tool_in(Some(&dir), &args)
            } else {
                std::process::Command::new("qemu-img")
                    .args(&args)
                    .current_dir(&dir)
                    .output()
                    .expect("qemu-img")
            };
            outs.push((dir.join(out), result));
        }
        let (ours, theirs) = (&outs[0], &outs[1]);
        let case = format!("{operands:?} -O {format}");
        assert_eq!(code(&ours.1), code(&theirs.1), "{case}");
        assert_eq!(
            String::from_utf8_lossy(&ours.1.stderr).replace("qcow2-tool:", "qemu-img:"),
            String::from_utf8_lossy(&theirs.1.stderr),
            "{case}"
        );
        if code(&theirs.1) != 0 {
            continue;
        }
        let info = |p: &std::path::Path| qcow2_testdata::qemu_info(p)["virtual-size"].clone();
        assert_eq!(info(&ours.0), info(&theirs.0), "{case}");
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
