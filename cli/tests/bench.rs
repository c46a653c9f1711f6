//! `bench` against `qemu-img bench`: the same arguments on copies of the same fixture print the
//! same summary lines (the seconds aside; our extra throughput line dropped), fail with the same
//! exit code, and a write bench leaves an image that `qemu-img check` finds clean and whose guest
//! contents `qemu-img compare` finds identical to the copy qemu-img wrote. No timing is asserted.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_testdata::{copy_fixture, qemu_check, scratch_dir};

/// The summary as both tools print it, with the seconds blanked and our extra line dropped.
fn summary(out: &std::process::Output) -> String {
    stdout(out)
        .lines()
        .filter(|l| !l.starts_with("Throughput: "))
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in X seconds.\n".to_string(),
            None => format!("{l}\n"),
        })
        .collect()
}

/// Copies `fixture` (and its backing files) into `dir/ours` and `dir/theirs`.
fn copies(fixture: &str, dir: &Path) -> (PathBuf, PathBuf) {
    (
        copy_fixture(fixture, &dir.join("ours")),
        copy_fixture(fixture, &dir.join("theirs")),
    )
}

/// Runs `bench args FILE` with both tools on their own copies; returns both outputs.
fn run_both(
    ours: &Path,
    theirs: &Path,
    args: &[&str],
) -> (std::process::Output, std::process::Output) {
    let mut our_args = vec!["bench"];
    our_args.extend(args);
    our_args.push(path_str(ours));
    let mut qemu_args = vec!["bench"];
    qemu_args.extend(args);
    qemu_args.push(path_str(theirs));
    let out = tool_in(Some(dir_of(ours)), &our_args);
    let qemu = qemu_in(dir_of(theirs), &qemu_args);
    no_panic(&out);
    (out, qemu)
}

const READ_RUNS: &[&[&str]] = &[
    &["-c", "100"],
    &["-c", "50", "-d", "1", "-s", "64k"],
    &["-c", "64", "-d", "3", "-s", "4k", "-S", "24k", "-o", "512"],
    &["-c", "40", "-d", "2", "-s", "1000", "-S", "1M", "-o", "1M"],
    &["-c", "20", "-S", "0", "-t", "writeback", "-i", "threads"],
    &["--count", "0x10", "--depth", "010", "--buffer-size", "8k"],
];

#[test]
fn read_summaries_and_exit_codes_match_qemu_img() {
    let dir = scratch_dir("bench_reads");
    for fixture in [
        "c64k",
        "c4k",
        "zlib",
        "zstd",
        "chain-top",
        "snap",
        "odd-64k",
        "v2",
    ] {
        let (ours, theirs) = copies(fixture, &dir.join(fixture));
        for args in READ_RUNS {
            let mut args = args.to_vec();
            args.extend(["-f", "qcow2"]);
            let (out, qemu) = run_both(&ours, &theirs, &args);
            let what = format!("{fixture} {args:?}: {}", stderr(&out));
            assert_eq!(code(&out), code(&qemu), "{what}");
            assert_eq!(summary(&out), summary(&qemu), "{what}");
        }
    }
}

#[test]
fn our_summary_adds_throughput_unless_quiet() {
    let dir = scratch_dir("bench_quiet");
    let (ours, _) = copies("c64k", &dir);
    let out = tool(&["bench", "-c", "10", path_str(&ours)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Throughput: ") && last.ends_with(" IOPS"),
        "{text}"
    );
    let quiet = tool(&["bench", "-q", "-c", "10", path_str(&ours)]);
    assert_eq!(stdout(&quiet).lines().count(), 2, "{}", stdout(&quiet));
}

const WRITE_RUNS: &[&[&str]] = &[
    &[
        "-w",
        "-c",
        "200",
        "-d",
        "4",
        "-S",
        "24k",
        "--pattern",
        "0x5a",
    ],
    &[
        "-w",
        "-c",
        "40",
        "-d",
        "1",
        "-s",
        "64k",
        "--pattern",
        "0xa5",
    ],
    &[
        "-w", "-c", "100", "-d", "2", "-s", "1000", "-S", "3000", "-o", "100",
    ],
    &["-w", "-c", "64", "-s", "4k", "-S", "1M", "-o", "60k"],
    &["-w", "-c", "128", "-d", "8", "--flush-interval", "32"],
    &[
        "-w",
        "-c",
        "16",
        "-d",
        "1",
        "-t",
        "writethrough",
        "-s",
        "64k",
        "-S",
        "192k",
    ],
    // Around the page cache (O_DIRECT): unaligned requests go through the bounce path.
    &[
        "-w", "-c", "100", "-d", "4", "-t", "none", "-s", "1000", "-S", "3000", "-o", "100",
    ],
    &["-w", "-c", "16", "-d", "2", "-t", "directsync", "-s", "64k"],
];

#[test]
fn write_benches_leave_clean_images_identical_to_qemu_img_s() {
    let dir = scratch_dir("bench_writes");
    for fixture in [
        "c64k",
        "c4k",
        "chain-top",
        "snap",
        "v2",
        "zstd",
        "ext-l2-64k",
        "lazy-clean",
    ] {
        for (i, args) in WRITE_RUNS.iter().enumerate() {
            let (ours, theirs) = copies(fixture, &dir.join(format!("{fixture}-{i}")));
            let (out, qemu) = run_both(&ours, &theirs, args);
            let what = format!("{fixture} {args:?}: {}", stderr(&out));
            assert_eq!(code(&out), code(&qemu), "{what}");
            assert_eq!(code(&out), 0, "{what}");
            assert_eq!(summary(&out), summary(&qemu), "{what}");
            let (check, report) = qemu_check(&ours);
            assert_eq!(check, 0, "{what}: qemu-img check: {report}");
            let cmp = qemu_in(
                &dir,
                &[
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    path_str(&ours),
                    path_str(&theirs),
                ],
            );
            assert_eq!(code(&cmp), 0, "{what}: {}", stdout(&cmp));
        }
    }
}

#[test]
fn raw_files_bench_like_qemu_img_raw() {
    let dir = scratch_dir("bench_raw");
    let (ours, theirs) = copies("chain-base", &dir);
    for args in [
        &["-f", "raw", "-c", "100", "-d", "2"][..],
        &["-f", "raw", "-w", "-c", "50", "-S", "12k", "--pattern", "7"],
        &[
            "-f",
            "raw",
            "-w",
            "-c",
            "50",
            "-s",
            "1000",
            "-S",
            "5k",
            "-t",
            "none",
            "--pattern",
            "9",
        ],
        &[
            "-f", "raw", "-c", "30", "-s", "700", "-o", "3", "-t", "none",
        ],
    ] {
        let (out, qemu) = run_both(&ours, &theirs, args);
        let what = format!("{args:?}: {}", stderr(&out));
        assert_eq!(code(&out), code(&qemu), "{what}");
        assert_eq!(summary(&out), summary(&qemu), "{what}");
    }
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}

#[test]
fn requests_past_the_end_fail_as_in_qemu_img() {
    let dir = scratch_dir("bench_past_end");
    let (ours, theirs) = copies("odd-64k", &dir);
    for args in [
        &["-c", "3", "-o", "100M"][..],
        &["-c", "2000", "-s", "64k"],
        &["-c", "5", "-s", "1536", "-S", "1536", "-o", "7381000"],
        &["-w", "-c", "2", "-o", "7M", "-s", "1M"],
    ] {
        let (out, qemu) = run_both(&ours, &theirs, args);
        let what = format!("{args:?}: {}", stderr(&out));
        assert_eq!(code(&out), 1, "{what}");
        assert_eq!(code(&out), code(&qemu), "{what}");
        assert_eq!(summary(&out), summary(&qemu), "{what}");
        assert!(
            stderr(&out).contains("Failed request: Input/output error"),
            "{what}"
        );
    }
}

#[test]
fn bad_arguments_exit_as_qemu_img_does() {
    let dir = scratch_dir("bench_bad_args");
    let (ours, theirs) = copies("c64k", &dir);
    let runs: &[&[&str]] = &[
        &["-c", "x"],
        &["-c", "-1"],
        &["-c", "0"],
        &["-c", "3000000000"],
        &["-c", "4k"],
        &["-d", "0"],
        &["-d", "x"],
        &["-s", "x"],
        &["-s", "0"],
        &["-s", "3G"],
        &["-s", "4kB"],
        &["-S", "x"],
        &["-S", "-1"],
        &["-o", "x"],
        &["-o", "-5"],
        &["--pattern", "300"],
        &["--pattern", "x"],
        &["-t", "bogus"],
        &["-f", "bogus"],
        &["-i", "bogus"],
        &["-n"],
        &["--flush-interval", "4"],
        &["-w", "--flush-interval", "4"],
        &["-w", "--flush-interval", "x"],
        &["-z"],
        &["extra-file"],
    ];
    for args in runs {
        let (out, qemu) = run_both(&ours, &theirs, args);
        let what = format!("{args:?}: ours {} / qemu {}", stderr(&out), stderr(&qemu));
        assert_eq!(code(&qemu), 1, "{what}");
        assert_eq!(code(&out), code(&qemu), "{what}");
        assert_eq!(stdout(&out), stdout(&qemu), "{what}");
    }
    let missing = dir.join("missing.qcow2");
    let out = tool(&["bench", "-c", "1", path_str(&missing)]);
    let qemu = qemu_in(&dir, &["bench", "-c", "1", path_str(&missing)]);
    assert_eq!(code(&out), code(&qemu));
    let none = tool(&["bench"]);
    assert_eq!(code(&none), 1);
}
