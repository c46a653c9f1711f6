//! Atomic group operations across several qcow2 images.
//!
//! A [`Group`] is a directory holding a journal, a lock and a manifest. [`Group::run`] takes a
//! list of [`Action`]s (internal snapshot create, delete and revert, external snapshot create and
//! delete, and persistent bitmap changes) and applies them all or none, also across a crash:
//!
//! 1. every action is validated and every image opened (locked) before anything is written;
//! 2. each image's new state is *staged* in fresh clusters with its refcounts raised; readers
//!    still see the old state, and a crash leaves only leaked clusters (`qcow2::Image::stage`);
//!    overlays are created under temporary names;
//! 3. one CRC-checked `Decision` record in the journal is the commit point;
//! 4. each image then switches with one sector-atomic header write, overlays are renamed and the
//!    manifest records the new tops; bitmap changes follow, each journaled once applied, so
//!    recovery goes on from the first one not applied (`bitmaps.rs`).
//!
//! ```
//! use qcow2::{CreateOptions, Image};
//! use qcow2_transaction::{Action, Group};
//!
//! let dir = std::env::temp_dir().join(format!("txn-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let disks = [dir.join("a.qcow2"), dir.join("b.qcow2")];
//! for d in &disks {
//!     Image::create(d, &CreateOptions::new(1 << 20))?.close()?;
//! }
//! // Opening the group first finishes or rolls back whatever a crash interrupted.
//! let mut group = Group::open(dir.join("group"))?;
//! let snapshot = |image: &std::path::PathBuf| Action::InternalCreate {
//!     image: image.clone(),
//!     name: "nightly".into(),
//! };
//! group.run(&[snapshot(&disks[0]), snapshot(&disks[1])])?;
//! // A plan with one bad action changes nothing at all.
//! let again = group.run(&[snapshot(&disks[0])]);
//! assert!(again.is_err());
//! assert_eq!(Image::open(&disks[1], &Default::default())?.snapshots().len(), 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Group::recover`] (run by [`Group::open`]) rolls back a group without a decision and finishes
//! one with it, then reconciles refcounts from the published metadata, so it is idempotent and
//! never replays a decrement.
//!
//! Each image's part is a step with prepare, commit, abort and clean (`step.rs`); several actions
//! on one image merge into one step. Every file goes through a `fs::GroupFs`, so the recording
//! `sim::SimFs` orders all files' operations in one log for crash tests.
//!
//! The `testing` feature makes that machinery public for crash tests and the fuzzer: the
//! modules `fs`, `identity`, `journal` and `sim`, and `Group`'s hooks (`Hook`,
//! `Group::open_with_hook`, `Group::open_in`, `Group::set_hook`, `Group::fs`). It is not
//! covered by semver.
//!
//! Where this departs from the project's design notes (`TRANSACTIONS.md` in its repository):
//! - the phases are [`Group::begin`], [`Transaction::add`] (validates at once, names the refused
//!   action), [`Transaction::prepare`], [`Prepared::commit`] and [`Prepared::abort`] (also on
//!   drop); [`Group::run`] is the one-call form. Actions name images by path; an image the
//!   caller holds open is [`Transaction::attach`]ed, and its guest writes are paused from its
//!   staging to its publish (`phases.rs`), so the group is a crash-consistent cut while the
//!   caller keeps serving I/O. An external snapshot of a disk the caller serves through a
//!   [`qcow2::DiskTop`] ([`Transaction::attach_top`]) opens its overlay before the pause and
//!   makes it the disk's top inside it, after the decision: writes that waited, and every later
//!   one, go to the overlay. External snapshots of a bare attached handle, external snapshot
//!   deletion and reverts are refused on attached images ([`TxnError::LiveUnsupported`]);
//! - an abort writes a `Decision(0)` record and `End`; an abort that cannot finish returns
//!   `AbortIncomplete` and leaves the rollback to `recover`;
//! - a failed decision write is overwritten with `Decision(0)`; if that fails too, the result is
//!   `InDoubt` and recovery decides from what reached the disk;
//! - the foreign-writer marker (a private autoclear bit) is not used: the image locks, the
//!   journaled (device, inode) and the header's state bytes detect foreign changes, and staged
//!   tables are checked to be still allocated before a roll-forward;
//! - with the journal lost, staged clusters are only leaks that `check -r leaks` reclaims;
//! - an image with the dirty bit is repaired when opened for writing, then takes part;
//! - snapshot names compare byte for byte, case-sensitively, as QEMU compares them;
//! - while a state is staged and unpublished, the active L2 entries of clusters it shares keep
//!   COPIED with a raised count (as in QEMU's own snapshot create): a surplus, never a count
//!   below the references; the switch publishes tables with COPIED cleared, and recovery or an
//!   abort takes the surplus back. The image locks keep other writers out meanwhile.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

mod bitmaps;
mod codec;
pub mod error;
mod group;
mod lock;
pub mod manifest;
mod phases;
mod step;

// Test machinery, public only with the `testing` feature (not covered by semver): the file
// system seam, the group identity, the journal codec and the recording file system.
#[cfg(feature = "testing")]
pub mod fs;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
mod fs;
#[cfg(feature = "testing")]
pub mod identity;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
mod identity;
#[cfg(feature = "testing")]
pub mod journal;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
mod journal;
#[cfg(any(test, feature = "testing"))]
pub mod sim;

pub use bitmaps::BitmapSource;
pub use error::TxnError;
#[cfg(feature = "testing")]
pub use group::Hook;
pub use group::{Action, Group, Outcome, OverlayMode, Recovery};
pub use journal::JournalError;
pub use manifest::Manifest;
pub use phases::{Prepared, Transaction};

// Compile-time checks of what the docs promise about threads: a type that stops being
// `Send + Sync` fails the build here, not in a caller's.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    // A group moves to the thread that runs transactions (qcow2-qmp's monitor).
    send::<Group>();
    send_sync::<TxnError>();
    send_sync::<Action>();
};
