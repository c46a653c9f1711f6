//! `convert -S`, `-C` and `-r` against qemu-img: the same sparse detection (`-S 0` writes
//! everything), the same refusals and messages, and a rate limit that holds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use qcow2_testdata::{page_cache_bytes, qemu_io, scratch_dir};

/// A source with data, a zero block inside data, a zero cluster between data and data far on.
fn make_source(dir: &Path) -> String {
    let path = dir.join("src.qcow2");
    let made = qemu_in(dir, &["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    assert_eq!(code(&made), 0);
    let fill = qemu_io(&[
        "-c",
        "write -P 1 0 192k",
        "-c",
        "write -P 0 8k 4k",
        "-c",
        "write -P 0 64k 64k",
        "-c",
        "write -P 3 2M 4k",
        path_str(&path),
    ]);
    assert_eq!(code(&fill), 0);
    path_str(&path).to_string()
}

fn layout(dir: &Path, path: &Path, format: &str) -> (u64, u64, String) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    let m = std::fs::metadata(path).unwrap();
    let map = qemu_in(dir, &["map", "--output=json", "-f", format, path_str(path)]);
    (m.len(), m.blocks(), stdout(&map))
}

#[test]
fn sparse_detection_matches_qemu_img() {
    let dir = scratch_dir("sparse_detection_matches_qemu_img");
    let src = make_source(&dir);
    for sparse in [
        None,
        Some("0"),
        Some("512"),
        Some("4k"),
        Some("64k"),
        Some("1M"),
    ] {
        for format in ["raw", "qcow2"] {
            let ours = dir.join(format!("ours.{format}"));
            let theirs = dir.join(format!("theirs.{format}"));
            let args = |out: &Path| {
                let mut a = vec!["convert".to_string(), "-O".into(), format.into()];
                if let Some(s) = sparse {
                    a.extend(["-S".to_string(), s.to_string()]);
                }
                a.extend([src.clone(), path_str(out).to_string()]);
                a
            };
            let (oa, ta) = (args(&ours), args(&theirs));
            let o = tool_in(
                Some(&dir),
                &oa.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let t = qemu_in(&dir, &ta.iter().map(String::as_str).collect::<Vec<_>>());
            let case = format!("convert -O {format} -S {sparse:?}");
            assert_eq!((code(&o), code(&t)), (0, 0), "{case}: {}", stderr(&o));
            let (ol, ob, om) = layout(&dir, &ours, format);
            let (tl, tb, tm) = layout(&dir, &theirs, format);
            assert_eq!(ol, tl, "{case}: length");
            assert_eq!(om, tm, "{case}: map");
            // One file system block of slack: ext4's extent-tree block (see preallocation.rs).
            assert!(ob.abs_diff(tb) <= 8, "{case}: blocks {ob}, qemu-img's {tb}");
            let cmp = qemu_in(&dir, &["compare", &src, path_str(&ours)]);
            assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
        }
    }
}

#[test]
fn refusals_match_qemu_img() {
    let dir = scratch_dir("convert_refusals_match_qemu_img");
    let src = make_source(&dir);
    for flags in [
        &["-C", "-c"][..],
        &["-C", "-S", "4k"],
        &["-C", "-S", "0"],
        &["-S", "1000"],
        &["-S", "x"],
        &["-S", "32M"],
        &["-r", "x"],
        &["-c", "-o", "preallocation=full"],
    ] {
        let out = |name: &str, qemu: bool| {
            let mut a: Vec<&str> = vec!["convert"];
            a.extend(flags);
            a.extend(["-O", "qcow2", &src, name]);
            if qemu {
                qemu_in(&dir, &a)
            } else {
                tool_in(Some(&dir), &a)
            }
        };
        let (o, t) = (out("ours.qcow2", false), out("theirs.qcow2", true));
        no_panic(&o);
        assert_eq!(code(&o), code(&t), "{flags:?}");
        assert_eq!(
            stderr(&o).replace("qcow2-tool:", "qemu-img:"),
            stderr(&t),
            "{flags:?}"
        );
    }
    // Where qemu-img allows copy offloading, the copy is the same.
    let o = tool_in(
        Some(&dir),
        &["convert", "-C", "-O", "raw", &src, "ours.raw"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cmp = qemu_in(&dir, &["compare", &src, "ours.raw"]);
    assert_eq!(code(&cmp), 0);
}

#[test]
fn rate_limit_holds_the_copy_to_its_rate() {
    let dir = scratch_dir("rate_limit_holds_the_copy_to_its_rate");
    let src = make_source(&dir);
    // 196 KiB of data at 256 KiB/s: at least half a second (the bytes are due then).
    let start = std::time::Instant::now();
    let o = tool_in(
        Some(&dir),
        &["convert", "-r", "256k", "-O", "raw", &src, "ours.raw"],
    );
    let elapsed = start.elapsed();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(elapsed.as_secs_f64() >= 0.5, "took {elapsed:?}");
    let cmp = qemu_in(&dir, &["compare", &src, "ours.raw"]);
    assert_eq!(code(&cmp), 0);
    for rate in ["0", "1G"] {
        let o = tool_in(
            Some(&dir),
            &["convert", "-r", rate, "-O", "qcow2", &src, "ours.qcow2"],
        );
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let cmp = qemu_in(&dir, &["compare", &src, "ours.qcow2"]);
        assert_eq!(code(&cmp), 0);
    }
}

/// Runs `convert ARGS... OUT` with both tools (`OUT` ours.EXT / theirs.EXT) and asserts the
/// same exit code and messages; returns both output paths.
fn convert_both(dir: &Path, args: &[&str], ext: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ours = dir.join(format!("ours.{ext}"));
    let theirs = dir.join(format!("theirs.{ext}"));
    let run = |out: &Path, qemu: bool| {
        let mut a = vec!["convert"];
        a.extend(args);
        a.push(path_str(out));
        if qemu {
            qemu_in(dir, &a)
        } else {
            tool_in(Some(dir), &a)
        }
    };
    let (o, t) = (run(&ours, false), run(&theirs, true));
    no_panic(&o);
    assert_eq!(code(&o), code(&t), "{args:?}: {}", stderr(&o));
    assert_eq!(
        stderr(&o)
            .replace("qcow2-tool:", "qemu-img:")
            .replace("ours.", "theirs."),
        stderr(&t),
        "{args:?}"
    );
    (ours, theirs)
}

#[test]
fn backing_output_leaves_what_the_top_does_not_allocate() {
    let dir = scratch_dir("backing_output_leaves_what_the_top_does_not_allocate");
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let made = qemu_in(
        &dir,
        &["create", "-q", "-f", "qcow2", path_str(&base), "4M"],
    );
    assert_eq!(code(&made), 0);
    assert_eq!(
        code(&qemu_io(&["-c", "write -P 1 0 1M", path_str(&base)])),
        0
    );
    let made = qemu_in(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            path_str(&top),
        ],
    );
    assert_eq!(code(&made), 0);
    let fill = qemu_io(&[
        "-c",
        "write -P 2 2M 64k",
        "-c",
        "write -z 512k 64k",
        path_str(&top),
    ]);
    assert_eq!(code(&fill), 0);
    let flat = make_source(&dir);
    for src in [path_str(&top), flat.as_str()] {
        for extra in [&[][..], &["-c"]] {
            let mut args = vec!["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
            args.extend(extra);
            args.push(src);
            let (ours, theirs) = convert_both(&dir, &args, "qcow2");
            let case = format!("{args:?}");
            let map = |p: &Path| stdout(&qemu_in(&dir, &["map", "--output=json", path_str(p)]));
            assert_eq!(map(&ours), map(&theirs), "{case}: map");
            let info = |p: &Path| qcow2_testdata::qemu_info(p);
            for key in [
                "backing-filename",
                "backing-filename-format",
                "virtual-size",
            ] {
                assert_eq!(info(&ours)[key], info(&theirs)[key], "{case}: {key}");
            }
            let cmp = qemu_in(&dir, &["compare", path_str(&ours), path_str(&theirs)]);
            assert_eq!(code(&cmp), 0, "{case}: {}", stdout(&cmp));
            let (check, report) = qcow2_testdata::qemu_check(&ours);
            assert_eq!(check, 0, "{case}: {report}");
        }
    }
    for args in [
        &["-O", "raw", "-B", "base.qcow2", flat.as_str()][..],
        &["-O", "qcow2", "-B", "base.qcow2", flat.as_str()],
        &[
            "-O",
            "qcow2",
            "-B",
            "missing.qcow2",
            "-F",
            "qcow2",
            flat.as_str(),
        ],
    ] {
        convert_both(&dir, args, "qcow2");
    }
}

#[test]
fn several_sources_are_concatenated() {
    let dir = scratch_dir("several_sources_are_concatenated");
    let a = make_source(&dir);
    let b = dir.join("odd.raw");
    std::fs::write(&b, vec![7u8; 1000]).unwrap();
    let b = path_str(&b).to_string();
    for format in ["raw", "qcow2"] {
        let (ours, theirs) = convert_both(&dir, &["-O", format, &a, &b, &a], format);
        let map = |p: &Path| {
            stdout(&qemu_in(
                &dir,
                &["map", "--output=json", "-f", format, path_str(p)],
            ))
        };
        assert_eq!(map(&ours), map(&theirs), "{format}: map");
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
        assert_eq!(code(&cmp), 0, "{format}: {}", stdout(&cmp));
    }
    convert_both(&dir, &["--bitmaps", "-O", "qcow2", &a, &a], "qcow2");
    convert_both(&dir, &["-O", "raw", &a, "missing.raw"], "raw");
}

#[test]
fn copy_offloading_of_raw_sources_gives_qemu_img_bytes() {
    // -C copies raw data inside the kernel (copy_file_range); the result is byte for byte what
    // qemu-img -C writes, also for a source whose size is not whole sectors and for two
    // sources one after the other (the second starts at an offset the kernel copy must honour).
    let dir = scratch_dir("copy_offloading_of_raw_sources_gives_qemu_img_bytes");
    let a: Vec<u8> = (0..3 * 1024 * 1024 + 1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let b: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(dir.join("a.raw"), &a).unwrap();
    std::fs::write(dir.join("b.raw"), &b).unwrap();
    for sources in [&["a.raw"][..], &["a.raw", "b.raw"]] {
        let run = |name: &str, qemu: bool| {
            let mut args = vec!["convert", "-C", "-f", "raw", "-O", "raw"];
            args.extend(sources);
            args.push(name);
            let out = if qemu {
                qemu_in(&dir, &args)
            } else {
                tool_in(Some(&dir), &args)
            };
            assert_eq!(code(&out), 0, "{sources:?}: {}", stderr(&out));
            std::fs::read(dir.join(name)).unwrap()
        };
        let (ours, theirs) = (run("ours.raw", false), run("theirs.raw", true));
        assert_eq!(ours.len(), theirs.len(), "{sources:?}");
        assert!(ours == theirs, "{sources:?}: bytes differ from qemu-img -C");
        assert_eq!(&ours[..a.len()], &a[..], "{sources:?}");
    }
}

#[test]
fn compressed_convert_skips_zero_clusters_whatever_the_sparse_size_like_qemu_img() {
    let dir = scratch_dir("compressed_convert_sparse_size");
    let words = |line: &str| line.split(' ').map(String::from).collect::<Vec<_>>();
    let run = |ours: bool, line: &str| {
        let args = words(line);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = if ours {
            tool_in(Some(&dir), &args)
        } else {
            qemu_in(&dir, &args)
        };
        assert_eq!(code(&out), 0, "{line}: {}", stderr(&out));
        stdout(&out)
    };
    run(false, "create -q -f qcow2 -o cluster_size=1k src.qcow2 1M");
    let src = dir.join("src.qcow2");
    let io = qemu_io(&[
        "-c",
        "write 0 1k",
        "-c",
        "write 8k 1k",
        "-c",
        "write 17k 1k",
        path_str(&src),
    ]);
    assert_eq!(code(&io), 0);
    let convert = "convert -O qcow2 -o cluster_size=1k -c -S 8k src.qcow2";
    run(true, &format!("{convert} ours.qcow2"));
    run(false, &format!("{convert} theirs.qcow2"));
    assert_eq!(
        run(false, "map --output=json ours.qcow2"),
        run(false, "map --output=json theirs.qcow2")
    );
}

#[test]
fn a_backing_file_with_several_sources_is_refused_like_qemu_img() {
    let dir = scratch_dir("convert_concat_backing");
    for f in ["a.qcow2", "b.qcow2"] {
        assert_eq!(
            code(&qemu_in(&dir, &["create", "-q", "-f", "qcow2", f, "1M"])),
            0
        );
    }
    let args = "convert -O qcow2 -B a.qcow2 a.qcow2 b.qcow2 out.qcow2";
    let args: Vec<&str> = args.split(' ').collect();
    let (o, t) = (tool_in(Some(&dir), &args), qemu_in(&dir, &args));
    assert_eq!(code(&o), code(&t));
    assert_eq!(stderr(&o).replace("qcow2-tool:", "qemu-img:"), stderr(&t));
}

/// A 16 MiB qcow2 source in `dir`: 8 MiB of data, an unaligned pattern inside it and 7 bytes
/// far on.
fn patterned_source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src.qcow2");
    qemu_in(dir, &["create", "-q", "-f", "qcow2", path_str(&src), "16M"]);
    let fill = qemu_io(&[
        "-c",
        "write -P 1 0 8M",
        "-c",
        "write -P 2 1000 3000",
        "-c",
        "write -P 3 12345k 7",
        path_str(&src),
    ]);
    assert_eq!(code(&fill), 0);
    src
}

/// `convert -t none` writes its output around the page cache (O_DIRECT), as qemu-img's does:
/// the output's pages are not left in the cache, where `-t writeback` leaves them. Raw and qcow2
/// outputs, new and existing (`-n`), match the source.
#[test]
fn convert_t_none_writes_around_the_page_cache() {
    let dir = scratch_dir("convert_t_none");
    let src = patterned_source(&dir);
    for format in ["raw", "qcow2"] {
        for (mode, direct) in [("none", true), ("directsync", true), ("writeback", false)] {
            let out = dir.join(format!("{mode}.{format}"));
            let _ = std::fs::remove_file(&out);
            // A new output, then the same file again as an existing one (-n).
            for existing in [&[][..], &["-n"]] {
                let mut args = vec!["convert", "-t", mode, "-O", format];
                args.extend(existing);
                args.extend([path_str(&src), path_str(&out)]);
                let run = tool(&args);
                assert_eq!(code(&run), 0, "{args:?}: {}", stderr(&run));
                let cached = page_cache_bytes(&out);
                assert_eq!(cached < 1 << 20, direct, "{args:?}: {cached} bytes cached");
            }
            let args = [mode, format];
            let cmp = qemu_in(
                &dir,
                &["compare", "-F", format, path_str(&src), path_str(&out)],
            );
            assert_eq!(code(&cmp), 0, "{args:?}: {}", stdout(&cmp));
            if format == "qcow2" {
                assert_eq!(qcow2_testdata::qemu_check(&out).0, 0, "{args:?}");
            }
        }
    }
}

/// Drops `path` from the page cache (written back first).
fn evict(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// `convert -T none` reads the sources around the page cache (O_DIRECT), qcow2 and raw, as
/// qemu-img's does; `-T writeback` leaves what it read in the cache.
#[test]
fn convert_source_t_none_reads_around_the_page_cache() {
    let dir = scratch_dir("convert_source_t_none");
    let qcow2 = patterned_source(&dir);
    let raw = dir.join("src.raw");
    let made = qemu_in(
        &dir,
        &["convert", "-O", "raw", path_str(&qcow2), path_str(&raw)],
    );
    assert_eq!(code(&made), 0);
    for (src, format) in [(&qcow2, "qcow2"), (&raw, "raw")] {
        for (mode, direct) in [("none", true), ("writeback", false)] {
            evict(src);
            assert!(page_cache_bytes(src) < 1 << 20, "{format}: not evicted");
            let out = dir.join(format!("out-{format}-{mode}.qcow2"));
            let _ = std::fs::remove_file(&out);
            let args = [
                "convert",
                "-T",
                mode,
                "-f",
                format,
                "-O",
                "qcow2",
                path_str(src),
                path_str(&out),
            ];
            let run = tool(&args);
            assert_eq!(code(&run), 0, "{args:?}: {}", stderr(&run));
            let cached = page_cache_bytes(src);
            assert_eq!(cached < 1 << 20, direct, "{args:?}: {cached} bytes cached");
            let cmp = qemu_in(
                &dir,
                &["compare", "-F", format, path_str(&out), path_str(src)],
            );
            assert_eq!(code(&cmp), 0, "{args:?}: {}", stdout(&cmp));
        }
    }
}
