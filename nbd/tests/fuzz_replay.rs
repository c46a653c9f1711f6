//! Replays the NBD fuzz inputs on stable Rust: every file in `fuzz/regressions/{nbd_server,
//! nbd_wire}/` and, when a local corpus exists, `fuzz/corpus/{nbd_server,nbd_wire}/`, through
//! the entry points libFuzzer drives. The target logic is shared as a file
//! (`fuzz/src/nbd_targets.rs` depends only on `qcow2`, this crate and `std`).

#[path = "../../fuzz/src/replay.rs"]
mod replay_common;

#[path = "../../fuzz/src/nbd_targets.rs"]
#[allow(dead_code)]
mod nbd_targets;

use qcow2_nbd::wire::*;
use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    replay_common::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

/// Runs every input of the NBD targets under `root`; returns how many ran.
fn replay(root: &Path) -> usize {
    let skip = replay_common::known_failing(&fuzz_dir());
    let mut failures = Vec::new();
    let mut ran = 0;
    for &(target, entry) in nbd_targets::NBD_TARGETS {
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
            ran += 1;
            if let Err(problem) = replay_common::run_with_deadline(entry, fs::read(&path).unwrap())
            {
                failures.push(format!("{target}: {} ({problem})", path.display()));
            }
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
fn nbd_regressions_pass() {
    assert!(replay(&fuzz_dir().join("regressions")) > 0);
}

#[test]
fn local_nbd_corpus_passes() {
    let root = fuzz_dir().join("corpus");
    if !root.is_dir() {
        println!("note: no fuzz/corpus; nothing to replay");
        return;
    }
    println!("replayed {} corpus inputs", replay(&root));
}

#[test]
fn targets_survive_empty_and_tiny_inputs() {
    for &(name, entry) in nbd_targets::NBD_TARGETS {
        for data in [&[][..], &[0], &[1], &[2], &[3], &[0xFF; 7]] {
            if std::panic::catch_unwind(|| entry(data)).is_err() {
                panic!("target {name} panics on {data:02x?}");
            }
        }
    }
}

/// The generated seeds pass, and the committed copies under `fuzz/regressions/nbd_server/` are
/// what the generator makes today (`QCOW2_WRITE_FUZZ_SEEDS=1` rewrites them).
#[test]
fn generated_seeds_pass_and_are_committed() {
    let write = std::env::var_os("QCOW2_WRITE_FUZZ_SEEDS").is_some();
    let dir = fuzz_dir().join("regressions").join("nbd_server");
    for (name, bytes) in nbd_targets::nbd_seeds() {
        nbd_targets::nbd_server(&bytes);
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

/// The seeds reach the transmission phase: the read-only session gets the image's data back,
/// its writes are refused, and the dirty-bitmap context answers (a 0x5a run of the image, an
/// EPERM error chunk, and the context id of `qemu:dirty-bitmap:b0` in a BLOCK_STATUS chunk).
#[test]
fn the_read_only_seed_is_served_and_refuses_writes() {
    let seeds = nbd_targets::nbd_seeds();
    let (_, session) = seeds.iter().find(|(n, _)| n == "read-only").unwrap();
    let out = nbd_targets::nbd_session(session);
    assert!(out.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)));
    let chunk_with = |kind: u16, body: &[u8]| {
        out.windows(20 + body.len()).any(|w| {
            w[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes()
                && w[6..8] == kind.to_be_bytes()
                && &w[20..] == body
        })
    };
    assert!(chunk_with(CHUNK_ERROR, &EPERM.to_be_bytes()));
    // The second context of the export: base:allocation is 0, allocation depth is not
    // offered on `ro`, the bitmap is 2.
    assert!(chunk_with(CHUNK_BLOCK_STATUS, &2u32.to_be_bytes()));
}
