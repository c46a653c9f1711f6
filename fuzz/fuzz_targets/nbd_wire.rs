#![no_main]
//! Every decoder of the NBD wire codec on the input, with re-encoding checks (see
//! `qcow2_fuzz::nbd_wire`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::nbd_wire(data));
