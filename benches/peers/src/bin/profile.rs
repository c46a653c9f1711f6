//! One engine workload in a loop, small enough to run under `valgrind --tool=callgrind` (whose
//! instruction counts repeat on a loaded machine where timings do not).
//!
//! Usage: `profile WORKLOAD [COUNT]` with WORKLOAD one of `alloc-64k`, `alloc-4k` (4K at each
//! cluster start), `read-rand-4k-cold` (one L2 table cached), `read-rand-4k`,
//! `overwrite-rand-4k`, `raw-write-64k`, `raw-read-4k`.

#![forbid(unsafe_code)]

use std::os::unix::fs::FileExt;

use qcow2_benches::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().expect("WORKLOAD");
    let count: usize = args.next().map_or(16384, |c| c.parse().expect("COUNT"));
    let mut buf = AlignedBuf::new(64 * KIB as usize, 0);
    fill_random(buf.as_mut_slice(), 1 << 40);
    let seq = |step: u64| -> Vec<u64> {
        sequential_offsets(GIB, step)
            .into_iter()
            .cycle()
            .take(count)
            .collect()
    };
    match workload.as_str() {
        "alloc-64k" | "alloc-4k" => {
            let len = if workload == "alloc-64k" { 64 } else { 4 } * KIB as usize;
            let target = AllocTarget::new("alloc-1G.qcow2", GIB, None);
            target.reset();
            let image = target.open();
            for at in seq(CLUSTER)
                .into_iter()
                .take(count.min((GIB / CLUSTER) as usize))
            {
                image.write_at(&buf.as_slice()[..len], at).expect("write");
            }
            image.close().expect("close");
        }
        "read-rand-4k-cold" | "read-rand-4k" => {
            let cache = if workload.ends_with("cold") {
                CLUSTER
            } else {
                4 * MIB
            };
            let image = open_ro(&allocated(GIB), cache);
            let mut b = AlignedBuf::new(4096, 0);
            for at in random_offsets(count, GIB, 4 * KIB, 1) {
                image.read_at(b.as_mut_slice(), at).expect("read");
            }
        }
        "overwrite-rand-4k" => {
            let image = open_rw(&writable_copy(&allocated(GIB), "overwrite-1G.qcow2"));
            for at in random_offsets(count, GIB, 4 * KIB, 1) {
                image.write_at(&buf.as_slice()[..4096], at).expect("write");
            }
            image.close().expect("close");
        }
        "raw-write-64k" => {
            let file = open_raw(&writable_copy(&raw(GIB), "overwrite-1G.raw"), true);
            for at in seq(CLUSTER) {
                file.write_all_at(buf.as_slice(), at).expect("write");
            }
        }
        "raw-read-4k" => {
            let file = open_raw(&raw(GIB), false);
            let mut b = AlignedBuf::new(4096, 0);
            for at in random_offsets(count, GIB, 4 * KIB, 1) {
                file.read_exact_at(b.as_mut_slice(), at).expect("read");
            }
        }
        other => panic!("unknown workload {other}"),
    }
}
