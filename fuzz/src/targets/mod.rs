//! The logic of every fuzz target, as plain functions of `&[u8]`.
//!
//! This file is compiled twice: by the `qcow2-fuzz` crate (`mod targets;` in `lib.rs`, driven by
//! libFuzzer on nightly) and by `qcow2/tests/fuzz_replay.rs` (`#[path]` include, on stable), which
//! replays `fuzz/regressions/` and `fuzz/corpus/`. So it depends on `qcow2` and `std` only, and it
//! decodes structured inputs by hand from the leading bytes: the fuzzer and the replay test then
//! read every input file the same way.
//!
//! Each target either returns or panics; a panic is a finding. The read-side targets accept any
//! error from the engine (their inputs are hostile); `ops` drives the write side from a valid image
//! and accepts only the errors its model expects. The properties checked beyond "no panic" are
//! written next to the code that checks them.

use qcow2::format::compressed::CompressedDescriptor;
use qcow2::format::header::{field_offset, CompressionType, Header};
use qcow2::format::limits::{
    MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, SUBCLUSTERS_PER_CLUSTER,
    V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use qcow2::format::refcount;
use qcow2::format::snapshot::{self, align_entry};
use qcow2::format::table::{
    classify_standard, ClusterMapping, SubclusterBitmap, SubclusterState, COMPRESSED, COPIED,
    OFFSET_MASK, ZERO,
};
use qcow2::format::SnapshotTime;
use qcow2::storage::recording::{RecordingStorage, Survivors};
use qcow2::{
    BackingPolicy, CreateOptions, Error, Extent, Image, MemoryStorage, OpenOptions, Repair,
};
use std::rc::Rc;
use std::sync::Arc;

/// The signature of every entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for runners that pick the entry point from a directory name.
pub const TARGETS: &[(&str, Target)] = &[
    ("header", header),
    ("open_read", open_read),
    ("snapshot_table", snapshot_table),
    ("tables", tables),
    ("ops", ops),
];

/// The entry point of the target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

mod header;
mod open_read;
mod ops;
mod snapshot_table;
mod tables;

pub use header::*;
pub use open_read::*;
pub use ops::*;
pub use snapshot_table::*;
pub use tables::*;

// ------------------------------------------------------------------------------------------------
// Input decoding: a tiny hand-written `Unstructured` and bounded helper types.

/// Reads structured values from the front of a fuzz input. Past the end every read yields zeros,
/// so every input decodes to something (as with `arbitrary`).
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        ByteReader { bytes }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = tail;
        head
    }

    /// A big-endian integer of `N` bytes, zero-padded at the end of the input.
    fn be<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.be::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.be())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.be())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.be())
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// An integer in `LO..=HI`, decoded from one byte (so small configs cost the fuzzer one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundedU32<const LO: u32, const HI: u32>(u32);

impl<const LO: u32, const HI: u32> BoundedU32<LO, HI> {
    pub fn read(r: &mut ByteReader<'_>) -> Self {
        BoundedU32(LO + r.u8() as u32 % (HI - LO + 1))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}
