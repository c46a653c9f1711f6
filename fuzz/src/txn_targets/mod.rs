//! The logic of the group-transaction fuzz targets (`transaction`, `journal`), as plain functions
//! of `&[u8]`.
//!
//! Compiled twice, like `targets/`: by the `qcow2-fuzz` crate and by
//! `transaction/tests/fuzz_replay.rs` (`#[path]` include, on stable). It depends on `qcow2`,
//! `qcow2_transaction` and `std` only and decodes its inputs by hand, so a corpus file means the
//! same thing to libFuzzer and to the replay test.
//!
//! Everything runs on the recording file system `SimFs`: images are built in memory, a plan runs
//! (optionally with an injected I/O error), power is cut at any log index, and the group is
//! recovered by opening it again. A panic is a finding.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2::format::SnapshotTime;
use qcow2::{CreateOptions, Image};
use qcow2_transaction::fs::GroupFs;
use qcow2_transaction::identity::GroupId;
use qcow2_transaction::journal::{self, Kind, Record};
use qcow2_transaction::sim::{Fault, FsOp, SimFs, Survivors};
use qcow2_transaction::{Action, Group, OverlayMode, Recovery, TxnError};

/// The signature of every entry point.
pub type TxnTarget = fn(&[u8]);

/// Every target of this file by name.
pub const TXN_TARGETS: &[(&str, TxnTarget)] = &[("transaction", transaction), ("journal", journal)];

/// The entry point of the target called `name`.
pub fn txn_target(name: &str) -> Option<TxnTarget> {
    TXN_TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, f)| f)
}

const GROUP: &str = "/vm/group";
/// Snapshot names plans draw from: the pre-existing `s0`/`s1`, new names, an id (`1`) and the
/// empty name, so duplicates, missing snapshots and id lookups all happen.
const NAMES: [&str; 8] = ["s0", "s1", "new", "new2", "1", "", "s0", "x"];
/// Overlay paths plans draw from: two free ones, an existing image, a missing directory.
/// Overlay paths a plan may name: free ones, an image, a missing directory, and files of the
/// group directory (the journal, a new name there), which every plan must be refused for.
const OVERLAYS: [&str; 6] = [
    "/vm/o0.qcow2",
    "/vm/o1.qcow2",
    "/vm/d0.qcow2",
    "/nodir/o.qcow2",
    "/vm/group/txn.journal",
    "/vm/group/o.qcow2",
];
const MISSING_IMAGE: &str = "/vm/missing.qcow2";
/// Journals longer than this are cut: recovery reads the whole file, and real journals of these
/// plans are a few KiB.
const MAX_JOURNAL: usize = 64 << 10;

/// How often each stage was reached (printed by the fuzz binaries at exit, to show coverage).
pub static STATS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
pub const STAT_NAMES: [&str; 8] = [
    "runs",
    "invalid plans",
    "faults injected",
    "faulted runs not committed",
    "crashes",
    "crashes at/after decided",
    "journal opens refused",
    "journal recoveries acting",
];

/// Counts a stage; with `QCOW2_FUZZ_STATS` set, every power-of-two number of runs prints the
/// counters to stderr, so a fuzz log shows which stages the inputs reach.
fn count(stat: usize) {
    let n = STATS[stat].fetch_add(1, Ordering::Relaxed) + 1;
    if stat == 0 && n >= 64 && n.is_power_of_two() && std::env::var_os("QCOW2_FUZZ_STATS").is_some()
    {
        eprintln!("txn stats: {}", stats_line());
    }
}

/// The counters as one line.
pub fn stats_line() -> String {
    STAT_NAMES
        .iter()
        .zip(&STATS)
        .map(|(n, s)| format!("{n}: {}", s.load(Ordering::Relaxed)))
        .collect::<Vec<_>>()
        .join(", ")
}

mod group;
mod input;
mod journal_target;
mod seeds;
mod transaction_target;

use group::*;
pub use input::*;
pub use journal_target::*;
pub use seeds::*;
pub use transaction_target::*;
