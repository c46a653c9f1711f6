//! What the stable replay tests (`qcow2/tests/fuzz_replay.rs`, `transaction/tests/fuzz_replay.rs`)
//! share: where the fuzz directory is, which inputs are known to fail, and running one input with
//! a deadline. Included by path, so it depends on `std` only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `fuzz/`, from the crate whose test includes this file.
pub fn fuzz_dir(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("../fuzz")
}

/// File names listed in `fuzz/regressions/KNOWN_FAILING` (one per line, `#` comments).
pub fn known_failing(fuzz_dir: &Path) -> BTreeSet<String> {
    let list =
        std::fs::read_to_string(fuzz_dir.join("regressions/KNOWN_FAILING")).unwrap_or_default();
    list.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// An input taking longer than this is reported as a hang (libFuzzer's `timeout-*` artifacts): the
/// fuzzer gives each input 10 s optimized; unoptimized test builds get more.
pub const HANG_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `entry(data)` on a worker thread: `Err` on a panic or when it misses the deadline (the
/// worker is then left running; the test fails and the process ends with it).
pub fn run_with_deadline(entry: fn(&[u8]), data: Vec<u8>) -> Result<(), &'static str> {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| entry(&data));
        let _ = done.send(outcome.is_ok());
    });
    match finished.recv_timeout(HANG_DEADLINE) {
        Ok(true) => Ok(()),
        Ok(false) => Err("panics"),
        Err(_) => Err("hangs"),
    }
}
