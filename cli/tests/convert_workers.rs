//! `convert -m` (parallel workers) and `-W` (out-of-order writes) against qemu-img: the same
//! messages for bad worker counts, outputs with qemu-img's bytes (raw) and layout (qcow2 in
//! guest order) whatever the worker count, and existing targets that held old bytes where the
//! source has holes or zeros reading as the source afterwards.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{code, path_str, qemu_in, stderr, stdout, tool_in};
use qcow2_testdata::{qemu_img_ok, qemu_io, scratch_dir};

const MIB: u64 = 1 << 20;

/// A 20 MiB sparse raw file spanning many 2 MiB chunks: per 4 MiB, 1 MiB of random-looking
/// bytes, 512 KiB of written zeros, 64 KiB pieces of compressible data with holes between them
/// (one piece with a zero 4 KiB block inside), then a hole. Returns it and a qcow2 copy whose
/// written zeros are zero clusters.
fn make_sources(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("src.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(20 * MIB).unwrap();
    let mut state = 0x9e37_79b9u32;
    let mut noise = |n: u64| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    };
    let mut zero_runs = Vec::new();
    for seg in (0..20 * MIB).step_by(4 * MIB as usize) {
        file.write_all_at(&noise(MIB), seg).unwrap();
        file.write_all_at(&vec![0u8; MIB as usize / 2], seg + MIB)
            .unwrap();
        zero_runs.push(seg + MIB);
        for (i, piece) in (0..MIB).step_by(128 << 10).enumerate() {
            let mut data: Vec<u8> = noise(64 << 10).iter().map(|b| b'a' + b % 4).collect();
            if i == 2 {
                data[8192..12288].fill(0);
            }
            file.write_all_at(&data, seg + 2 * MIB + piece).unwrap();
        }
    }
    drop(file);
    let qcow2 = dir.join("src.qcow2");
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&qcow2),
    ]);
    let mut args = Vec::new();
    for at in zero_runs {
        args.push("-c".to_string());
        args.push(format!("write -z {at} 512k"));
    }
    args.push(path_str(&qcow2).to_string());
    qemu_io(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (raw, qcow2)
}

/// Runs `convert ARGS` with qcow2-tool (output `ours.EXT`) and with qemu-img (`theirs.EXT`) in
/// `dir`; each output is made first by `prepare` when given. Returns both paths.
fn convert_both(
    dir: &Path,
    args: &[&str],
    ext: &str,
    prepare: &dyn Fn(&Path),
) -> (PathBuf, PathBuf) {
    let mut paths = Vec::new();
    for who in ["ours", "theirs"] {
        let out = dir.join(format!("{who}.{ext}"));
        let _ = std::fs::remove_file(&out);
        prepare(&out);
        let mut full = vec!["convert"];
        full.extend_from_slice(args);
        full.push(path_str(&out));
        let result = if who == "ours" {
            tool_in(Some(dir), &full)
        } else {
            qemu_in(dir, &full)
        };
        assert_eq!(code(&result), 0, "{who} {args:?}: {}", stderr(&result));
        paths.push(out);
    }
    (paths.remove(0), paths.remove(0))
}

fn assert_compare_equal(dir: &Path, a: &Path, a_fmt: &str, b: &Path, b_fmt: &str, what: &str) {
    let cmp = qemu_in(
        dir,
        &[
            "compare",
            "-f",
            a_fmt,
            "-F",
            b_fmt,
            path_str(a),
            path_str(b),
        ],
    );
    assert_eq!(code(&cmp), 0, "{what}: {}{}", stdout(&cmp), stderr(&cmp));
}

/// The guest bytes of `path`, through a raw copy made by qemu-img.
fn read_as_raw(dir: &Path, path: &Path, format: &str) -> Vec<u8> {
    let copy = dir.join("copy.raw");
    let _ = std::fs::remove_file(&copy);
    qemu_img_ok(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        path_str(path),
        path_str(&copy),
    ]);
    std::fs::read(&copy).unwrap()
}

fn map_json(dir: &Path, path: &Path) -> String {
    stdout(&qemu_in(dir, &["map", "--output=json", path_str(path)]))
}

#[test]
fn worker_counts_are_checked_like_qemu_img() {
    let dir = scratch_dir("convert_workers_m");
    std::fs::write(dir.join("src.raw"), vec![1u8; 4096]).unwrap();
    for m in [
        "0",
        "17",
        "-1",
        " -1",
        "-0",
        "abc",
        "",
        "1x",
        "1k",
        "1.0",
        "08",
        "0x",
        "0x11",
        "99999999999999999999",
        "1",
        "16",
        "0x10",
        "010",
        "+3",
        " 3",
    ] {
        let mut outs = Vec::new();
        for who in ["ours", "theirs"] {
            let args = ["convert", "-m", m, "-f", "raw", "-O", "raw", "src.raw", who];
            let out = if who == "ours" {
                tool_in(Some(&dir), &args)
            } else {
                qemu_in(&dir, &args)
            };
            outs.push(out);
        }
        assert_eq!(code(&outs[0]), code(&outs[1]), "-m {m:?}");
        assert_eq!(
            stderr(&outs[0]).replace("qcow2-tool:", "qemu-img:"),
            stderr(&outs[1]),
            "-m {m:?}"
        );
    }
}

#[test]
fn outputs_match_qemu_img_with_any_worker_count_and_out_of_order_writes() {
    let dir = scratch_dir("convert_workers_out");
    let (raw, qcow2) = make_sources(&dir);
    let none = |_: &Path| {};
    for workers in ["1", "2", "3", "16"] {
        for out_of_order in [false, true] {
            let mut flags = vec!["-m", workers];
            if out_of_order {
                flags.push("-W");
            }
            for (src, src_fmt) in [(&raw, "raw"), (&qcow2, "qcow2")] {
                let what = format!("{flags:?} {src_fmt}");
                // Raw output: the same bytes and the same holes.
                let mut args = flags.clone();
                args.extend(["-f", src_fmt, "-O", "raw", path_str(src)]);
                let (ours, theirs) = convert_both(&dir, &args, "raw", &none);
                assert!(
                    std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                    "{what} -O raw: bytes differ"
                );
                assert_eq!(map_json(&dir, &ours), map_json(&dir, &theirs), "{what}");
                // qcow2 output: the same guest bytes; in guest order, qemu-img's layout too.
                let mut args = flags.clone();
                args.extend(["-f", src_fmt, "-O", "qcow2", path_str(src)]);
                let (ours, theirs) = convert_both(&dir, &args, "qcow2", &none);
                assert_compare_equal(&dir, src, src_fmt, &ours, "qcow2", &what);
                if !out_of_order {
                    assert_eq!(map_json(&dir, &ours), map_json(&dir, &theirs), "{what}");
                }
                let check = qemu_in(&dir, &["check", path_str(&ours)]);
                assert_eq!(code(&check), 0, "{what}: {}", stdout(&check));
            }
            // Compressed: clusters compressed on every worker, allocated in guest order.
            let mut args = vec!["convert"];
            args.extend_from_slice(&flags);
            args.extend(["-c", "-O", "qcow2", path_str(&qcow2), "packed.qcow2"]);
            let out = tool_in(Some(&dir), &args);
            assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
            let packed = dir.join("packed.qcow2");
            assert_compare_equal(&dir, &qcow2, "qcow2", &packed, "qcow2", "-c");
        }
    }
}

#[test]
fn existing_targets_with_old_bytes_read_as_the_source() {
    let dir = scratch_dir("convert_workers_existing");
    let (raw, qcow2) = make_sources(&dir);
    // Old bytes everywhere, also past the end of the source, where they must stay.
    let old = |format: &'static str| {
        move |out: &Path| {
            qemu_img_ok(&["create", "-q", "-f", format, path_str(out), "24M"]);
            qemu_io(&["-f", format, "-c", "write -P 0xaa 0 24M", path_str(out)]);
        }
    };
    for flags in [&["-m", "1"][..], &["-m", "3"], &["-m", "8", "-W"]] {
        for (src, src_fmt) in [(&raw, "raw"), (&qcow2, "qcow2")] {
            for out_fmt in ["raw", "qcow2"] {
                let what = format!("{flags:?} {src_fmt} -> existing {out_fmt}");
                let mut args = flags.to_vec();
                args.extend(["-n", "-f", src_fmt, "-O", out_fmt, path_str(src)]);
                let (ours, theirs) = convert_both(&dir, &args, out_fmt, &old(out_fmt));
                assert_compare_equal(&dir, &ours, out_fmt, &theirs, out_fmt, &what);
                // The target is larger than the source: its first 20 MiB read as the source.
                let bytes = read_as_raw(&dir, &ours, out_fmt);
                let source = read_as_raw(&dir, src, src_fmt);
                assert!(bytes[..source.len()] == source[..], "{what}: bytes differ");
                assert!(
                    bytes[source.len()..].iter().all(|&b| b == 0xaa),
                    "{what}: the tail past the source changed"
                );
                if out_fmt == "raw" {
                    // Old data where the source has holes or zeros became holes: 7.5 MiB of
                    // source data and the 4 MiB tail stay allocated.
                    let blocks = std::fs::metadata(&ours).unwrap().blocks() * 512;
                    assert!(blocks <= 12 * MIB, "{what}: {blocks} bytes allocated");
                }
            }
        }
    }
}
