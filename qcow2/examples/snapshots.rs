//! Creates an image, writes to it, takes internal snapshots with 64-bit times, and lists them
//! as `qemu-img snapshot -l` would.
//!
//! `cargo run -p qcow2-engine --example snapshots -- /tmp/demo.qcow2`

use qcow2::{CreateOptions, Image, OpenOptions, SnapshotTime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo.qcow2".to_string());
    let options = CreateOptions::new(64 << 20);
    let image = Image::create(&path, &options)?;
    image.write_at(&[0xab; 4096], 0)?;
    image.create_snapshot("before", SnapshotTime::now())?;
    image.write_at(&[0xcd; 4096], 0)?;
    // A time past 2038 (which 32-bit seconds cannot hold); QEMU reads its low 32 bits.
    let later = SnapshotTime {
        secs: 4_102_444_800,
        nanos: 0,
    };
    image.create_snapshot("after", later)?;
    image.close()?;

    let image = Image::open(&path, &OpenOptions::default())?;
    for s in image.snapshots() {
        let mut first = [0u8; 1];
        image.open_snapshot(&s.id)?.read_at(&mut first, 0)?;
        println!(
            "{:>3} {:<8} secs={} first byte {:#04x}",
            s.id, s.name, s.time.secs, first[0]
        );
    }
    Ok(())
}
