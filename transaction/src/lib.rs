//! Atomic group operations across several qcow2 images.
//!
//! A [`Group`] is a directory holding a journal, a lock and a manifest. [`Group::run`] takes a
//! list of [`Action`]s (internal snapshot create, delete and revert, and external snapshots with
//! a new overlay) and applies them all or none, also across a crash:
//!
//! 1. every action is validated and every image opened (locked) before anything is written;
//! 2. each image's new state is *staged* in fresh clusters with its refcounts raised; readers
//!    still see the old state, and a crash leaves only leaked clusters (`qcow2::Image::stage`);
//!    overlays are created under temporary names;
//! 3. one CRC-checked `Decision` record in the journal is the commit point;
//! 4. each image then switches with one sector-atomic header write, overlays are renamed and the
//!    manifest records the new tops.
//!
//! [`Group::recover`] (run by [`Group::open`]) rolls back a group without a decision and finishes
//! one with it, then reconciles refcounts from the published metadata, so it is idempotent and
//! never replays a decrement.
#![forbid(unsafe_code)]

mod codec;
pub mod error;
pub mod fs;
mod group;
pub mod journal;
mod lock;
pub mod manifest;
pub mod sim;

pub use error::TxnError;
pub use group::{Action, Group, Hook, Outcome, OverlayMode, Recovery};
pub use manifest::Manifest;
