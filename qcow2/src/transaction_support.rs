//! The staging interface that `qcow2-transaction` builds atomic group transactions on.
//!
//! **Not covered by semver**: this module exists for `qcow2-transaction` (same version, same
//! repository) and changes whenever the transaction protocol needs it. Ordinary callers want
//! [`Image::create_snapshot`], [`Image::delete_snapshot`] and [`Image::apply_snapshot`], which
//! stage and publish in one call.
//!
//! The protocol, for one image:
//! 1. [`stage`] builds the new state (active L1, copied L2 tables, snapshot table) in fresh
//!    clusters and raises its refcounts durably. The image still reads as before; a crash
//!    leaves only leaked clusters.
//! 2. The transaction records [`StagedChange::switch`] ([`StateSwitch::to_bytes`]) in its
//!    journal; that record plus the decision is the commit point.
//! 3. [`publish_decided`] writes the switch (header bytes 24..72, one sector-atomic write) and
//!    drops the old state's references; or [`abandon`] takes the raised refcounts back.
//! 4. After a crash, recovery compares [`current_state`] with the journaled states, checks the
//!    staged tables with [`refcount_at`], and finishes with [`write_recorded_switch`], which
//!    validates the recorded switch against the image before writing it.
//!
//! A live image (one the caller keeps serving) is paused around its staging: [`hold_writes`]
//! on every member first, then [`wait_writes_drained`] on each, so the group is one
//! crash-consistent cut; [`Image::resume_writes`] ends the pause, and [`fence_writes`] makes
//! writes fail on an image whose decided switch could not be published.

use crate::error::Result;
use crate::image::Image;

pub use crate::image::snapshots::ops::{SnapshotChange, StagedChange};

/// Header bytes 24..72 of one image state: `size`, `crypt_method`, `l1_size`,
/// `l1_table_offset`, `refcount_table_offset`, `refcount_table_clusters`, `nb_snapshots` and
/// `snapshots_offset`, big-endian as on disk. They lie in the first 512-byte sector, so one
/// write switches between two states whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateSwitch(pub(crate) [u8; 48]);

impl StateSwitch {
    /// Length of the encoded switch in bytes.
    pub const LEN: usize = 48;

    /// The switch as the header stores it, for a journal record.
    pub fn to_bytes(&self) -> [u8; 48] {
        self.0
    }

    /// Decodes a switch a journal recorded with [`StateSwitch::to_bytes`]. No check happens
    /// here; [`write_recorded_switch`] validates it against the image before writing.
    pub fn from_bytes(bytes: [u8; 48]) -> StateSwitch {
        StateSwitch(bytes)
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_be_bytes(b)
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_be_bytes(b)
    }

    /// The virtual disk size in bytes (`size`).
    pub fn size(&self) -> u64 {
        self.u64_at(0)
    }

    /// `crypt_method`: 0 for no encryption.
    pub fn crypt_method(&self) -> u32 {
        self.u32_at(8)
    }

    /// Entries in the active L1 table (`l1_size`).
    pub fn l1_size(&self) -> u32 {
        self.u32_at(12)
    }

    /// Host offset of the active L1 table (`l1_table_offset`).
    pub fn l1_table_offset(&self) -> u64 {
        self.u64_at(16)
    }

    /// Host offset and length in clusters of the refcount table (`refcount_table_offset`,
    /// `refcount_table_clusters`).
    pub fn refcount_table(&self) -> (u64, u32) {
        (self.u64_at(24), self.u32_at(32))
    }

    /// Number of internal snapshots (`nb_snapshots`).
    pub fn nb_snapshots(&self) -> u32 {
        self.u32_at(36)
    }

    /// Host offset of the snapshot table (`snapshots_offset`); 0 when there is none.
    pub fn snapshots_offset(&self) -> u64 {
        self.u64_at(40)
    }

    /// Host offsets of the tables a staged state placed in fresh clusters: the active L1 table
    /// and the snapshot table (0 when there is none).
    pub fn staged_tables(&self) -> [u64; 2] {
        [self.l1_table_offset(), self.snapshots_offset()]
    }

    /// Whether both describe the same state: size, L1 table and snapshot table. The refcount
    /// table fields may differ: staging can grow the table, which publishes itself at once.
    pub fn same_state(&self, other: &StateSwitch) -> bool {
        self.0[..24] == other.0[..24] && self.0[36..] == other.0[36..]
    }
}

/// New guest writes to `image` wait from now on; those in flight go on (the first half of
/// [`Image::pause_writes`]). Ended by [`Image::resume_writes`].
pub fn hold_writes(image: &Image) {
    image.hold_writes()
}

/// Waits until no admitted guest write to `image` is in flight (the second half of
/// [`Image::pause_writes`]).
pub fn wait_writes_drained(image: &Image) {
    image.wait_writes_drained()
}

/// Makes every waiting and every later guest write to `image` fail: for an image whose live
/// transaction is decided but not published, where a write could change data a staged
/// snapshot shares. Only closing the image (and recovering its group) ends it.
pub fn fence_writes(image: &Image) {
    image.fence_writes()
}

/// Makes `overlay`, an image backed by `top`'s current image, the disk's top: called inside the
/// pause of an external snapshot of a live disk, after its decision. Writes waiting on the old
/// top move to `overlay` when the pause ends; returns the old top.
pub fn push_overlay(
    top: &crate::DiskTop,
    overlay: std::sync::Arc<Image>,
) -> Result<std::sync::Arc<Image>> {
    top.push(overlay)
}

/// Gives `image`, opened under a temporary name, the name and path of the file it was renamed
/// to: messages and relative backing names then follow the final name.
pub fn relocate(image: &mut Image, path: &std::path::Path) {
    image.relocate(path)
}

/// Guest writes waiting at `image`'s paused gate (tests see a writer blocked without
/// sleeping).
pub fn writes_waiting(image: &Image) -> u32 {
    image.writes_waiting()
}

/// Builds the state that `changes` lead to (creates and deletes in any order, at most one
/// revert, last) in fresh clusters and raises its refcounts durably, without publishing it.
///
/// Errors: [`Error::ReadOnly`](crate::Error::ReadOnly) for a read-only image, [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a change
/// that cannot apply (unknown or duplicate name, revert not last, refcount overflow, external
/// data file), and I/O errors. Nothing is published on error.
pub fn stage(image: &Image, changes: &[SnapshotChange]) -> Result<StagedChange> {
    image.stage(changes)
}

/// Publishes a staged state with one header write, then drops what the old state held. When
/// the header write fails and did not land, the staged state is abandoned and the image is as
/// before.
pub fn publish(image: &Image, staged: StagedChange) -> Result<()> {
    image.publish(staged)
}

/// Like [`publish`] for a state a transaction has decided to commit: when the header write
/// fails, the staged state stays intact (its refcounts raised) so recovery can still write the
/// recorded switch.
pub fn publish_decided(image: &Image, staged: StagedChange) -> Result<()> {
    image.publish_decided(staged)
}

/// Takes back the refcounts a staged state raised; the image is then exactly as before.
pub fn abandon(image: &Image, staged: StagedChange) -> Result<()> {
    image.abandon(staged)
}

/// The state the image's header describes now.
pub fn current_state(image: &Image) -> StateSwitch {
    StateSwitch(image.header_switch_bytes())
}

/// The refcount of the host cluster holding `host_offset` (recovery checks that staged tables
/// are still allocated). Needs a writable image.
pub fn refcount_at(image: &Image, host_offset: u64) -> Result<u64> {
    image.refcount_at(host_offset)
}

/// Writes a journaled switch during recovery, then closes the image without writing its stale
/// in-memory header; the caller opens it again and reconciles refcounts.
///
/// Refuses ([`Error::InvalidArgument`](crate::Error::InvalidArgument)) a switch that does not fit the image: a different
/// encryption method or refcount table, an L1 table or snapshot table that is unaligned, past
/// QEMU's limits, or in clusters whose refcount is 0.
pub fn write_recorded_switch(image: Image, switch: &StateSwitch) -> Result<()> {
    image.write_recorded_switch(switch)
}
