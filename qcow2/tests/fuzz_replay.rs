//! Replays fuzz inputs on stable Rust: every file in `fuzz/regressions/TARGET/` and, when a local
//! corpus exists, `fuzz/corpus/TARGET/`, through the same entry point libFuzzer drives.
//!
//! The fuzz crate lives outside the workspace (it needs nightly), so the target logic is shared as
//! files: `fuzz/src/targets/` depends only on `qcow2` and `std`.
//!
//! Inputs named in `fuzz/regressions/KNOWN_FAILING` (one file name per line, `#` comments) are
//! crashes or hangs found but not fixed yet: they are skipped with a note, so the suite stays green and the
//! list says what is outstanding. Once the engine is fixed, delete the line.

#[path = "../../fuzz/src/replay.rs"]
mod replay_common;

#[path = "../../fuzz/src/targets/mod.rs"]
#[allow(dead_code)]
mod targets;

use std::collections::BTreeSet;
use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    replay_common::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

fn known_failing() -> BTreeSet<String> {
    replay_common::known_failing(&fuzz_dir())
}

/// Input files of every target under `root` (`root/TARGET/*`), sorted.
fn inputs(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for &(target, _) in targets::TARGETS {
        let Ok(dir) = fs::read_dir(root.join(target)) else {
            continue;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.is_file() {
                out.push((target.to_string(), path));
            }
        }
    }
    out.sort();
    out
}

/// Runs every input under `root`; returns how many ran. Panics listing every input that panics or
/// hangs.
fn replay(root: &Path, skip: &BTreeSet<String>) -> usize {
    let mut failures = Vec::new();
    let mut ran = 0;
    for (target, path) in inputs(root) {
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        if skip.contains(&file_name) {
            println!(
                "note: skipping known-failing fuzz input {} (listed in fuzz/regressions/KNOWN_FAILING)",
                path.display()
            );
            continue;
        }
        let data = fs::read(&path).unwrap();
        let entry = targets::target(&target).expect("directory names a target");
        ran += 1;
        if let Err(problem) = replay_common::run_with_deadline(entry, data) {
            failures.push(format!("{target}: {} ({problem})", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fuzz input(s) fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    ran
}

#[test]
fn regression_inputs_do_not_panic() {
    let root = fuzz_dir().join("regressions");
    let known = known_failing();
    let ran = replay(&root, &known);
    assert!(
        ran > 0,
        "no regression inputs found under {}",
        root.display()
    );
    // A stale KNOWN_FAILING line (file gone) would hide nothing but mislead: refuse it. Every
    // target directory counts, also those of the transaction crate's replay test.
    let present: BTreeSet<String> = fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter_map(|d| fs::read_dir(d.path()).ok())
        .flat_map(|files| files.flatten())
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    for name in &known {
        assert!(
            present.contains(name),
            "KNOWN_FAILING lists {name}, which is not in fuzz/regressions/*/"
        );
    }
}

#[test]
fn local_corpus_does_not_panic() {
    let root = fuzz_dir().join("corpus");
    if !root.is_dir() {
        println!(
            "note: no fuzz/corpus (run fuzz/make-corpus.sh or fuzz/run.sh); nothing to replay"
        );
        return;
    }
    let ran = replay(&root, &known_failing());
    println!("replayed {ran} corpus inputs");
}

#[test]
fn every_target_survives_empty_and_tiny_inputs() {
    for &(name, entry) in targets::TARGETS {
        for data in [&[][..], &[0], &[0xFF; 7], &[0x51, 0x46, 0x49, 0xFB]] {
            if panic::catch_unwind(|| entry(data)).is_err() {
                panic!("target {name} panics on {data:02x?}");
            }
        }
    }
}
