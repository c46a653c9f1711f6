#![no_main]
//! Arbitrary bytes as an image in memory → open, info, map, check, reads (see
//! `qcow2_fuzz::open_read`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::open_read(data));
