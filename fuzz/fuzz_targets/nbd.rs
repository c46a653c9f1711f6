#![no_main]
//! Arbitrary bytes as an NBD client's stream: the server answers or ends the connection, never
//! panics, hangs or over-allocates (see `qcow2_fuzz::nbd`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::nbd(data));
