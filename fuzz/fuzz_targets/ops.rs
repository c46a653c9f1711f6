#![no_main]
//! Bounded image config + up to 64 writes, discards, resizes, snapshot operations, reopens and
//! power cuts, checked against a byte-vector model (see `qcow2_fuzz::ops`).
use libfuzzer_sys::fuzz_target;
use qcow2_fuzz::OpsInput;

fuzz_target!(|input: OpsInput| qcow2_fuzz::ops_input(&input));
