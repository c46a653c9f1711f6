//! Copies the disk an image shows (its whole backing chain) to a sparse raw file, reading only
//! the ranges the extent map says hold data.
//!
//! `cargo run -p qcow2-engine --example chain_to_raw -- disk.qcow2 disk.raw`

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2::{BackingPolicy, Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: chain_to_raw IMAGE OUTPUT.raw".into());
    };
    // Backing files are followed only where the image says they are: the same choice
    // qemu-img makes, stated here rather than left implicit.
    let options = OpenOptions::default().backing(BackingPolicy::Follow);
    let image = Image::open(&input, &options)?;
    let out = File::create(&output)?;
    // The raw file has the disk's size; ranges never written stay holes.
    out.set_len(image.size())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    // `extents` maps a window at a time, so a huge sparse disk never needs one huge list.
    for extent in image.extents(0, image.size()) {
        let extent = extent?;
        if !extent.data() {
            continue;
        }
        let mut pos = extent.start;
        let end = extent.start + extent.length;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            image.read_at(&mut buf[..n], pos)?;
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
            copied += n as u64;
        }
    }
    out.sync_all()?;
    println!(
        "{input} -> {output}: {} bytes, {copied} of them data",
        image.size()
    );
    Ok(())
}
