#![no_main]
//! Arbitrary bytes → `Header::decode` (see `qcow2_fuzz::header`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::header(data));
