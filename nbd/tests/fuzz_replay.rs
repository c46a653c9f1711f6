//! Replays the `nbd` fuzz target on stable Rust: its seeds, every file in `fuzz/regressions/nbd/`
//! and, when a local corpus exists, `fuzz/corpus/nbd/`, through the entry point libFuzzer drives.
//! `QCOW2_WRITE_FUZZ_SEEDS=1` writes the seeds to `fuzz/regressions/nbd/`.

#[path = "../../fuzz/src/replay.rs"]
mod replay_common;

#[path = "../../fuzz/src/nbd_target.rs"]
mod nbd_target;

use std::path::PathBuf;

fn fuzz_dir() -> PathBuf {
    replay_common::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn seeds_and_regressions_pass() {
    let dir = fuzz_dir().join("regressions/nbd");
    if std::env::var_os("QCOW2_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in nbd_target::nbd_seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut inputs: Vec<(String, Vec<u8>)> = nbd_target::nbd_seeds();
    for sub in ["regressions/nbd", "corpus/nbd"] {
        if let Ok(entries) = std::fs::read_dir(fuzz_dir().join(sub)) {
            for e in entries.flatten() {
                inputs.push((
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    let known = replay_common::known_failing(&fuzz_dir());
    let mut failures = Vec::new();
    for (name, bytes) in inputs {
        if known.iter().any(|k| name.ends_with(k.as_str())) {
            continue;
        }
        if let Err(why) = replay_common::run_with_deadline(nbd_target::nbd, bytes) {
            failures.push(format!("{name} {why}"));
        }
    }
    assert!(failures.is_empty(), "failing inputs: {failures:?}");
    // Tiny inputs too.
    for len in 0..8 {
        assert!(replay_common::run_with_deadline(nbd_target::nbd, vec![0xff; len]).is_ok());
    }
}

/// The seeds reach transmission: a real session gets its read data back.
#[test]
fn the_session_seed_is_served() {
    let (_, session) = &nbd_target::nbd_seeds()[0];
    let out = nbd_target::serve_script(session);
    // The image holds 0x5a at 1 MiB: the reads across it come back as data chunks.
    assert!(out.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)));
}
