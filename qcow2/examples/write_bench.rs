//! Times `count` writes of `size` bytes, `step` bytes apart, into an image, the way
//! `qemu-img bench -w -c COUNT -s SIZE -S STEP` does, so the two can run side by side on copies
//! of the same image:
//!
//! ```sh
//! cargo run --release --example write_bench -- IMAGE COUNT SIZE STEP
//! qemu-img bench -w -c COUNT -s SIZE -S STEP -t writeback IMAGE.copy
//! ```
#![forbid(unsafe_code)]

use std::time::Instant;

use qcow2::{Image, OpenOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: write_bench IMAGE COUNT SIZE STEP");
        std::process::exit(2);
    }
    let count: u64 = args[2].parse().expect("COUNT");
    let size: usize = args[3].parse().expect("SIZE");
    let step: u64 = args[4].parse().expect("STEP");
    let image = Image::open(&args[1], &OpenOptions::read_write()).expect("open");
    let disk = image.size();
    let buf = vec![0xA5u8; size];
    let start = Instant::now();
    let mut offset = 0u64;
    for _ in 0..count {
        if offset + size as u64 > disk {
            offset = 0;
        }
        image.write_at(&buf, offset).expect("write");
        offset += step;
    }
    image.flush().expect("flush");
    let secs = start.elapsed().as_secs_f64();
    image.close().expect("close");
    let bytes = count as f64 * size as f64;
    println!(
        "Run completed in {secs:.3} seconds: {:.1} MB/s, {:.0} IOPS",
        bytes / secs / 1e6,
        count as f64 / secs
    );
}
