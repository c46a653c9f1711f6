#![no_main]
//! A real small group whose journal is replaced by arbitrary bytes, then recovery: a typed error
//! or an action, never a panic or a write to an image the journal does not identify (see
//! `qcow2_fuzz::journal_input`).
use libfuzzer_sys::fuzz_target;
use qcow2_fuzz::JournalInput;

fuzz_target!(|input: JournalInput| qcow2_fuzz::journal_input(&input));
