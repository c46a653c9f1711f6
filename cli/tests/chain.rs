//! `commit` and `rebase` against `qemu-img commit` and `qemu-img rebase`: the same chains are
//! built with qemu-img/qemu-io, each tool runs on its own copy, and afterwards every file of the
//! two copies compares equal (`qemu-img compare`), every qcow2 file passes `qemu-img check`, the
//! backing names and formats agree, and the top still reads as before where the operation
//! promises it.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_testdata::{qemu_img, qemu_info, qemu_io, scratch_dir};

/// A chain built by qemu: files (name, format) bottom to top; the top is the last one.
struct Chain {
    files: Vec<(&'static str, &'static str)>,
}

/// Runs `qemu-img` with the words of `command` (no argument here has a space in it).
fn img(dir: &Path, command: &str) {
    let args: Vec<&str> = command.split_whitespace().collect();
    let out = qemu_in(dir, &args);
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
}

fn io(dir: &Path, format: &str, file: &str, cmds: &[&str]) {
    let path = dir.join(file);
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path_str(&path));
    let out = qemu_io(&args);
    assert!(
        out.status.success() && !stdout(&out).contains("error") && !stdout(&out).contains("failed"),
        "qemu-io {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// Three qcow2 layers with different cluster sizes; the top holds plain, compressed and zero
/// clusters (some hiding backing data), and partial clusters.
fn qcow2_chain(dir: &Path) -> Chain {
    img(dir, "create -q -f qcow2 -o cluster_size=4k base.qcow2 4M");
    io(dir, "qcow2", "base.qcow2", &["write -P 1 0 4M"]);
    img(
        dir,
        "create -q -f qcow2 -o cluster_size=64k -b base.qcow2 -F qcow2 mid.qcow2 4M",
    );
    io(
        dir,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 2 0 1M",
            "write -z 3M 128k",
            "write -c -P 5 3584k 64k",
        ],
    );
    img(
        dir,
        "create -q -f qcow2 -o cluster_size=16k -b mid.qcow2 -F qcow2 top.qcow2 4M",
    );
    io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 512k 1M",
            "write -c -P 4 2M 64k",
            "write -z 2176k 48k",
            "write -z 3M 16k",
            "write -P 6 1000 3000",
            "write -P 7 4190000 4000",
        ],
    );
    Chain {
        files: vec![
            ("base.qcow2", "qcow2"),
            ("mid.qcow2", "qcow2"),
            ("top.qcow2", "qcow2"),
        ],
    }
}

/// A qcow2 image over a raw file, with compressed and zero clusters.
fn raw_base(dir: &Path) -> Chain {
    img(dir, "create -q -f raw base.raw 3M");
    io(dir, "raw", "base.raw", &["write -P 1 0 3M"]);
    img(
        dir,
        "create -q -f qcow2 -o cluster_size=32k -b base.raw -F raw top.qcow2 3M",
    );
    io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 100k 300k",
            "write -c -P 4 1M 64k",
            "write -z 2M 96k",
            "write -z -u 2560k 32k",
        ],
    );
    Chain {
        files: vec![("base.raw", "raw"), ("top.qcow2", "qcow2")],
    }
}

/// A v2 (compat=0.10) top, which has no zero flags, over a smaller qcow2 base.
fn v2_top(dir: &Path) -> Chain {
    img(dir, "create -q -f qcow2 -o cluster_size=512 base.qcow2 2M");
    io(dir, "qcow2", "base.qcow2", &["write -P 1 0 2M"]);
    img(
        dir,
        "create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 top.qcow2 3M",
    );
    io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 64k 128k",
            "write -z 1M 64k",
            "write -P 8 2M 64k",
        ],
    );
    Chain {
        files: vec![("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    }
}

/// Builds a chain in a directory.
type Build = fn(&Path) -> Chain;

const SCENARIOS: &[(&str, Build)] = &[
    ("qcow2 chain", qcow2_chain),
    ("raw base", raw_base),
    ("v2 top", v2_top),
];

/// Copies every file of `from` into a fresh `to`.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn compare(a: &Path, b: &Path, format: &str) -> bool {
    let out = qemu_img(&[
        "compare",
        "-q",
        "-f",
        format,
        "-F",
        format,
        path_str(a),
        path_str(b),
    ]);
    code(&out) == 0
}

/// Runs `args` (the command and its options, the top's name appended) with both tools on
/// copies of `orig`; checks that all files agree afterwards. Returns (ours, theirs).
fn run_both(orig: &Path, work: &Path, chain: &Chain, args: &[&str]) -> (PathBuf, PathBuf) {
    let ours = work.join("ours");
    let theirs = work.join("theirs");
    copy_dir(orig, &ours);
    copy_dir(orig, &theirs);
    let top = chain.files.last().unwrap().0;
    let mut full: Vec<&str> = args.to_vec();
    full.push(top);
    let o = tool_in(Some(&ours), &full);
    let q = qemu_in(&theirs, &full);
    let case = format!("{full:?}");
    no_panic(&o);
    assert_eq!(
        code(&o),
        code(&q),
        "{case}: ours {} / qemu {}",
        stderr(&o),
        stderr(&q)
    );
    // Both print -p progress on stdout; the figures of a block job's steps differ, the rest
    // (what follows the last progress line) does not.
    let without_progress = |text: String| {
        let last = text.rsplit('\r').next().unwrap_or_default();
        last.trim_start_matches('\n').to_string()
    };
    assert_eq!(
        without_progress(stdout(&o)),
        without_progress(stdout(&q)),
        "{case}"
    );
    if args.contains(&"-p") && code(&o) == 0 {
        assert!(
            stdout(&o).contains("(100.00/100%)"),
            "{case}: {}",
            stdout(&o)
        );
    }
    for (file, format) in &chain.files {
        assert!(
            compare(&ours.join(file), &theirs.join(file), format),
            "{case}: {file} differs from qemu-img's"
        );
        if *format == "qcow2" {
            let out = qemu_img(&["check", "-q", path_str(&ours.join(file))]);
            assert_eq!(
                code(&out),
                0,
                "{case}: qemu-img check {file}: {}",
                stdout(&out)
            );
            let (mine, qemu) = (qemu_info(&ours.join(file)), qemu_info(&theirs.join(file)));
            for key in [
                "backing-filename",
                "backing-filename-format",
                "virtual-size",
            ] {
                assert_eq!(mine.get(key), qemu.get(key), "{case}: {file} {key}");
            }
        }
    }
    (ours, theirs)
}

#[test]
fn commit_gives_the_chain_qemu_img_commit_gives() {
    let dir = scratch_dir("commit");
    for (what, build) in SCENARIOS {
        let orig = dir.join(what.replace(' ', "_"));
        std::fs::create_dir_all(&orig).unwrap();
        let chain = build(&orig);
        let top = chain.files.last().unwrap().0;
        let base = chain.files[0].0;
        let mut cases: Vec<Vec<&str>> = vec![
            vec!["commit"],
            vec!["commit", "-d"],
            vec!["commit", "-p", "-b", base],
        ];
        if chain.files.len() > 2 {
            cases.push(vec!["commit", "-b", chain.files[1].0]);
            cases.push(vec!["commit", "-b", "nothere.qcow2"]);
        }
        for args in cases {
            let work = dir.join("work");
            let (ours, _) = run_both(&orig, &work, &chain, &args);
            // The top reads as before, whatever was emptied or filled below it.
            assert!(
                compare(&ours.join(top), &orig.join(top), "qcow2")
                    || args.contains(&"nothere.qcow2"),
                "{what} {args:?}: the top's content changed"
            );
        }
    }
}

#[test]
fn commit_refuses_an_image_without_backing_file_as_qemu_img_does() {
    let dir = scratch_dir("commit_alone");
    img(&dir, "create -q -f qcow2 alone.qcow2 1M");
    let o = tool_in(Some(&dir), &["commit", "alone.qcow2"]);
    let q = qemu_in(&dir, &["commit", "alone.qcow2"]);
    no_panic(&o);
    assert_eq!(code(&o), code(&q));
    assert!(
        stderr(&o).contains("Image does not have a backing file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn rebase_gives_the_image_qemu_img_rebase_gives() {
    let dir = scratch_dir("rebase");
    for (what, build) in SCENARIOS {
        let orig = dir.join(what.replace(' ', "_"));
        std::fs::create_dir_all(&orig).unwrap();
        let mut chain = build(&orig);
        // Unrelated backing files to move onto.
        img(&orig, "create -q -f raw other.raw 4M");
        io(&orig, "raw", "other.raw", &["write -P 9 1M 2M"]);
        img(
            &orig,
            "create -q -f qcow2 -o cluster_size=8k other.qcow2 2M",
        );
        io(
            &orig,
            "qcow2",
            "other.qcow2",
            &["write -P 10 0 1M", "write -c -P 11 1M 64k"],
        );
        let top = chain.files.pop().unwrap();
        chain.files.insert(0, ("other.raw", "raw"));
        chain.files.insert(0, ("other.qcow2", "qcow2"));
        chain.files.push(top);
        let base = chain.files[2].0;
        let base_format = chain.files[2].1;
        let cases: Vec<(Vec<&str>, bool)> = vec![
            (vec!["rebase", "-b", base, "-F", base_format], true),
            (vec!["rebase", "-b", ""], true),
            (vec!["rebase", "-p", "-b", "other.raw", "-F", "raw"], true),
            (vec!["rebase", "-b", "other.qcow2", "-F", "qcow2"], true),
            (vec!["rebase", "-u", "-b", "other.raw", "-F", "raw"], false),
            (vec!["rebase", "-u", "-b", ""], false),
            (vec!["rebase", "-b", "other.raw"], true),
        ];
        for (args, keeps_content) in cases {
            let work = dir.join("work");
            let (ours, _) = run_both(&orig, &work, &chain, &args);
            if keeps_content {
                assert!(
                    compare(&ours.join(top.0), &orig.join(top.0), "qcow2"),
                    "{what} {args:?}: the top's content changed"
                );
            }
        }
    }
}

/// `qemu-img map --output=json` of `file` in `dir`, as qemu-img prints it.
fn qemu_map(dir: &Path, file: &str) -> String {
    stdout(&qemu_in(dir, &["map", "--output=json", file]))
}

#[test]
fn commit_of_zeros_frees_the_base_clusters_as_qemu_img_does() {
    // A zeroed top committed into a fully written base: qemu-img's commit unmaps, so the base
    // ends with zero clusters and no data (iotest 313 checks `check`'s allocation line).
    let dir = scratch_dir("commit_zeros");
    let orig = dir.join("orig");
    std::fs::create_dir_all(&orig).unwrap();
    img(&orig, "create -q -f qcow2 -o cluster_size=4k base.qcow2 1M");
    io(&orig, "qcow2", "base.qcow2", &["write -P 1 0 1M"]);
    img(
        &orig,
        "create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 top.qcow2 1M",
    );
    io(&orig, "qcow2", "top.qcow2", &["write -z 0 1M"]);
    let chain = Chain {
        files: vec![("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    };
    let (ours, theirs) = run_both(&orig, &dir.join("work"), &chain, &["commit"]);
    let map = qemu_map(&ours, "base.qcow2");
    assert_eq!(map, qemu_map(&theirs, "base.qcow2"));
    assert!(!map.contains("\"data\": true"), "{map}");
    let check = |d: &Path| stdout(&qemu_in(d, &["check", "base.qcow2"]));
    assert_eq!(check(&ours), check(&theirs));
}

#[test]
fn rebase_from_no_backing_file_keeps_its_zeros_as_zero_clusters_like_qemu_img() {
    // Where the old chain ended (here: no backing file at all), the image read zeros; under the
    // new backing file they must stay zeros, as zero clusters (iotest 252 compares the maps).
    let dir = scratch_dir("rebase_zeros");
    let orig = dir.join("orig");
    std::fs::create_dir_all(&orig).unwrap();
    img(&orig, "create -q -f qcow2 top.qcow2 384k");
    img(&orig, "create -q -f qcow2 new.qcow2 384k");
    io(&orig, "qcow2", "top.qcow2", &["write -P 0x22 0 128k"]);
    io(
        &orig,
        "qcow2",
        "new.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x11 128k 64k",
            "write -P 0x11 256k 64k",
        ],
    );
    let chain = Chain {
        files: vec![("new.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    };
    let (ours, theirs) = run_both(
        &orig,
        &dir.join("work"),
        &chain,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2"],
    );
    let map = qemu_map(&ours, "top.qcow2");
    assert_eq!(map, qemu_map(&theirs, "top.qcow2"));
    assert!(map.contains("\"zero\": true, \"data\": false"), "{map}");
}

#[test]
fn rebase_copies_only_the_subclusters_that_change_like_qemu_img() {
    // With extended L2 entries qemu-img copies per subcluster, leaving the rest of a cluster
    // unallocated (iotest 271 compares the maps).
    let dir = scratch_dir("rebase_subclusters");
    let orig = dir.join("orig");
    std::fs::create_dir_all(&orig).unwrap();
    let opts = "cluster_size=1M,extended_l2=on";
    img(
        &orig,
        &format!("create -q -f qcow2 -o {opts} base.qcow2 1M"),
    );
    img(
        &orig,
        &format!("create -q -f qcow2 -o {opts} -b base.qcow2 -F qcow2 mid.qcow2 1M"),
    );
    img(
        &orig,
        &format!("create -q -f qcow2 -o {opts} -b mid.qcow2 -F qcow2 top.qcow2 1M"),
    );
    io(
        &orig,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x11 32k 32k", "write -P 0x22 960k 32k"],
    );
    let chain = Chain {
        files: vec![
            ("base.qcow2", "qcow2"),
            ("mid.qcow2", "qcow2"),
            ("top.qcow2", "qcow2"),
        ],
    };
    let (ours, theirs) = run_both(
        &orig,
        &dir.join("work"),
        &chain,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
    );
    assert_eq!(qemu_map(&ours, "top.qcow2"), qemu_map(&theirs, "top.qcow2"));
}
