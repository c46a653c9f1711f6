#![no_main]
//! Bounded config + entries + refblock → L2 classification, subcluster bitmaps, compressed
//! descriptors, refcount packing (see `qcow2_fuzz::tables`).
use libfuzzer_sys::fuzz_target;
use qcow2_fuzz::TablesInput;

fuzz_target!(|input: TablesInput| qcow2_fuzz::tables_input(&input));
