#![no_main]
//! One NBD session (handshake and transmission) from the input bytes against an in-memory image
//! (see `qcow2_fuzz::nbd_server`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::nbd_server(data));
