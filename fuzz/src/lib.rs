//! Fuzz targets for the qcow2 engine: the read side (hostile bytes) and the write side (`ops`,
//! operation sequences checked against a model).
//!
//! The logic lives in [`targets`] (a file that depends only on `qcow2` and `std`, so the stable
//! replay test `qcow2/tests/fuzz_replay.rs` compiles the very same code). This crate adds what
//! needs the fuzzing toolchain: `arbitrary` implementations for the structured inputs, so
//! `fuzz_target!` can take them typed and `cargo fuzz fmt` prints them readably.
//!
//! Structured inputs decode from the raw input bytes by hand (`from_bytes`), and
//! `arbitrary_take_rest` (what `fuzz_target!` calls for the whole input) uses exactly that
//! decoding: a corpus file means the same thing to the fuzzer and to the replay test.

mod nbd_targets;
mod targets;
mod txn_targets;
pub use nbd_targets::{nbd_seeds, nbd_server, nbd_wire, NBD_TARGETS};
pub use targets::*;
pub use txn_targets::{
    journal, journal_input, journal_seeds, stats_line, transaction, transaction_seeds, txn_target,
    ImageConfig, JournalInput, TXN_TARGETS,
};

use arbitrary::{Arbitrary, Result, Unstructured};

impl<'a> Arbitrary<'a> for SnapshotTableInput<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(<&'a [u8]>::arbitrary(u)?))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(u.take_rest()))
    }
}

impl<'a> Arbitrary<'a> for TablesInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(<&'a [u8]>::arbitrary(u)?))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(u.take_rest()))
    }
}

impl<'a> Arbitrary<'a> for OpsInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(<&'a [u8]>::arbitrary(u)?))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(u.take_rest()))
    }
}

impl<'a> Arbitrary<'a> for JournalInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(<&'a [u8]>::arbitrary(u)?))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> Result<Self> {
        Ok(Self::from_bytes(u.take_rest()))
    }
}
