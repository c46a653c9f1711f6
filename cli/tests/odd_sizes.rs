//! Virtual sizes that are not whole sectors: qemu-img rounds them up to a multiple of 512 on
//! create, convert and info (a raw file's last partial sector reads as zeros to the end, and
//! `map` reports that tail as zeros). The same commands here give the same sizes, output and
//! bytes.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::scratch_dir;

const SIZES: &[u64] = &[1, 511, 1000, 513, 65537, 1048575];

fn raw_of(dir: &Path, size: u64) -> std::path::PathBuf {
    let path = dir.join(format!("src-{size}.raw"));
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs a read-only command through both tools and asserts the same output and exit code.
fn same_output(dir: &Path, args: &[&str]) {
    let (o, q) = (tool_in(Some(dir), args), qemu_in(dir, args));
    no_panic(&o);
    assert_eq!(code(&o), code(&q), "{args:?}: {}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&q), "{args:?}");
}

#[test]
fn raw_files_are_seen_in_whole_sectors() {
    let dir = scratch_dir("raw_files_are_seen_in_whole_sectors");
    for &size in SIZES {
        let src = raw_of(&dir, size);
        let src = path_str(&src);
        same_output(&dir, &["info", "-f", "raw", src]);
        same_output(&dir, &["info", "--output=json", "-f", "raw", src]);
        same_output(&dir, &["map", "--output=json", "-f", "raw", src]);
        same_output(&dir, &["map", "-f", "raw", src]);
        // An overlay over it sees the tail as the backing file's zeros.
        let overlay = dir.join(format!("overlay-{size}.qcow2"));
        let made = qemu_in(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                src,
                "-F",
                "raw",
                path_str(&overlay),
            ],
        );
        assert_eq!(code(&made), 0, "{}", stderr(&made));
        same_output(&dir, &["map", "--output=json", path_str(&overlay)]);
        same_output(&dir, &["info", "--output=json", path_str(&overlay)]);
    }
}

#[test]
fn convert_and_create_round_up_to_whole_sectors() {
    let dir = scratch_dir("convert_and_create_round_up_to_whole_sectors");
    for &size in SIZES {
        let src = raw_of(&dir, size);
        for format in ["raw", "qcow2"] {
            let ours = dir.join(format!("ours.{format}"));
            let theirs = dir.join(format!("theirs.{format}"));
            let run = |out: &Path, qemu: bool| {
                let args = [
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    format,
                    path_str(&src),
                    path_str(out),
                ];
                if qemu {
                    qemu_in(&dir, &args)
                } else {
                    tool_in(Some(&dir), &args)
                }
            };
            let (o, q) = (run(&ours, false), run(&theirs, true));
            assert_eq!((code(&o), code(&q)), (0, 0), "{}", stderr(&o));
            let info = |p: &Path| {
                qcow2_testdata::qemu_info(p)["virtual-size"]
                    .as_u64()
                    .unwrap()
            };
            let case = format!("convert {size} bytes to {format}");
            assert_eq!(info(&ours), info(&theirs), "{case}: virtual size");
            assert_eq!(info(&ours), size.next_multiple_of(512), "{case}");
            if format == "raw" {
                let len = |p: &Path| std::fs::metadata(p).unwrap().len();
                assert_eq!(len(&ours), len(&theirs), "{case}: file length");
                assert_eq!(
                    std::fs::read(&ours).unwrap(),
                    std::fs::read(&theirs).unwrap()
                );
            }
            let cmp = qemu_in(
                &dir,
                &[
                    "compare",
                    "-f",
                    format,
                    "-F",
                    format,
                    path_str(&ours),
                    path_str(&theirs),
                ],
            );
            assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
        }
        // create: qcow2's header and a raw file's length are whole sectors.
        for format in ["raw", "qcow2"] {
            let text = size.to_string();
            let ours = dir.join(format!("new-ours.{format}"));
            let theirs = dir.join(format!("new-theirs.{format}"));
            let o = tool_in(
                Some(&dir),
                &["create", "-q", "-f", format, path_str(&ours), &text],
            );
            let q = qemu_in(
                &dir,
                &["create", "-q", "-f", format, path_str(&theirs), &text],
            );
            assert_eq!((code(&o), code(&q)), (0, 0), "{}", stderr(&o));
            let len = |p: &Path| std::fs::metadata(p).unwrap().len();
            assert_eq!(
                len(&ours),
                len(&theirs),
                "create {format} {size}: file length"
            );
            same_output(&dir, &["info", "-f", format, path_str(&ours)]);
            let (a, b) = (
                qcow2_testdata::qemu_info(&ours)["virtual-size"].clone(),
                qcow2_testdata::qemu_info(&theirs)["virtual-size"].clone(),
            );
            assert_eq!(a, b, "create {format} {size}");
        }
    }
}
