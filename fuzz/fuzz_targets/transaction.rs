#![no_main]
//! A small group (1–3 images) and plan (1–4 actions), an optional injected I/O error, a power
//! cut anywhere, then recovery, checked against TRANSACTIONS.md 5.2 (see
//! `qcow2_fuzz::transaction`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_fuzz::transaction(data));
