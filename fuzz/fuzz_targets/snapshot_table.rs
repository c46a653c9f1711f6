#![no_main]
//! `[count][table_offset][bytes]` → `snapshot::decode_table` round trip (see
//! `qcow2_fuzz::snapshot_table`).
use libfuzzer_sys::fuzz_target;
use qcow2_fuzz::SnapshotTableInput;

fuzz_target!(|input: SnapshotTableInput<'_>| qcow2_fuzz::snapshot_table_input(&input));
