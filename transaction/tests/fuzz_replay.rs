//! Replays the group-transaction fuzz inputs on stable Rust: every file in
//! `fuzz/regressions/{transaction,journal}/` and, when a local corpus exists, in
//! `fuzz/corpus/{transaction,journal}/`, through the entry points libFuzzer drives.
//!
//! The fuzz crate lives outside the workspace (it needs nightly), so the target logic is shared as
//! files: `fuzz/src/txn_targets/` depends only on `qcow2`, this crate and `std`. Inputs named
//! in `fuzz/regressions/KNOWN_FAILING` are skipped with a note until their fix lands.

#[path = "../../fuzz/src/replay.rs"]
mod replay_common;

#[path = "../../fuzz/src/txn_targets/mod.rs"]
#[allow(dead_code)]
mod txn_targets;

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

/// Runs every input of this file's targets under `root`; returns how many ran. Panics listing
/// every input that panics.
fn replay(root: &Path) -> usize {
    let skip = known_failing();
    let mut failures = Vec::new();
    let mut ran = 0;
    for &(target, entry) in txn_targets::TXN_TARGETS {
        let Ok(dir) = fs::read_dir(root.join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths.into_iter().filter(|p| p.is_file()) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if skip.contains(&name) {
                println!("note: skipping known-failing fuzz input {}", path.display());
                continue;
            }
            let data = fs::read(&path).unwrap();
            ran += 1;
            if let Err(problem) = replay_common::run_with_deadline(entry, data) {
                failures.push(format!("{target}: {} ({problem})", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} fuzz input(s) panic:\n{}",
        failures.len(),
        failures.join("\n")
    );
    ran
}

#[test]
fn transaction_and_journal_regressions_pass() {
    let ran = replay(&fuzz_dir().join("regressions"));
    assert!(ran > 0, "no transaction or journal regression inputs found");
}

#[test]
fn local_transaction_and_journal_corpus_passes() {
    let root = fuzz_dir().join("corpus");
    if !root.is_dir() {
        println!("note: no fuzz/corpus; nothing to replay");
        return;
    }
    // run.sh fuzzes with the known findings stepped over, so its corpus holds inputs that reach
    // them; the regression files (named in KNOWN_FAILING) are what tracks those.
    txn_targets::TOLERATE_KNOWN.store(true, std::sync::atomic::Ordering::Relaxed);
    println!("replayed {} corpus inputs", replay(&root));
}

#[test]
fn both_targets_survive_empty_and_tiny_inputs() {
    for &(name, entry) in txn_targets::TXN_TARGETS {
        for data in [&[][..], &[0], &[0xFF; 7], &[3, 0x51, 0x46, 0x49, 0xFB]] {
            if panic::catch_unwind(|| entry(data)).is_err() {
                panic!("target {name} panics on {data:02x?}");
            }
        }
    }
}

/// The generated seeds pass, and the committed copies under `fuzz/regressions/` are what the
/// generators make today (`QCOW2_WRITE_FUZZ_SEEDS=1` rewrites them): `journal` seeds are real
/// journals cut at several points of a recorded run, `transaction` seeds cover every action kind
/// and every kind of trouble.
#[test]
fn generated_seeds_pass_and_are_committed() {
    let write = std::env::var_os("QCOW2_WRITE_FUZZ_SEEDS").is_some();
    let sets = [
        ("journal", txn_targets::journal_seeds()),
        ("transaction", txn_targets::transaction_seeds()),
    ];
    for (target, seeds) in sets {
        let dir = fuzz_dir().join("regressions").join(target);
        let entry = txn_targets::txn_target(target).unwrap();
        for (name, bytes) in seeds {
            entry(&bytes);
            let path = dir.join(format!("seed-{name}"));
            if write {
                fs::create_dir_all(&dir).unwrap();
                fs::write(&path, &bytes).unwrap();
            } else {
                assert_eq!(
                    fs::read(&path).ok().as_ref(),
                    Some(&bytes),
                    "{} is missing or stale: rerun with QCOW2_WRITE_FUZZ_SEEDS=1",
                    path.display()
                );
            }
        }
    }
}
