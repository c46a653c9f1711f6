//! A group transaction from Rust: an internal snapshot of one disk, an external snapshot of
//! another and a new dirty bitmap, all or nothing, also across a crash.
//!
//! `cargo run -p qcow2-transaction --example group_snapshot -- /tmp/vm`

use std::path::PathBuf;

use qcow2::{CreateOptions, Image};
use qcow2_transaction::{Action, Group, OverlayMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "vm".into()));
    std::fs::create_dir_all(&dir)?;
    let disks: Vec<PathBuf> = ["disk0.qcow2", "disk1.qcow2"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    for d in &disks {
        let options = CreateOptions::new(64 << 20);
        Image::create(d, &options)?.close()?;
    }
    // Opening the group finishes or rolls back a transaction a crash interrupted.
    let mut group = Group::open(dir.join("group"))?;
    let outcome = group.run(&[
        Action::InternalCreate {
            image: disks[0].clone(),
            name: "nightly".into(),
        },
        Action::BitmapAdd {
            image: disks[0].clone(),
            name: "since-nightly".into(),
            granularity: None,
            disabled: false,
        },
        Action::ExternalCreate {
            image: disks[1].clone(),
            overlay: dir.join("disk1.nightly.qcow2"),
            mode: OverlayMode::New,
        },
    ])?;
    println!(
        "committed: {} images, overlays {:?}",
        outcome.images.len(),
        outcome.overlays
    );
    // The manifest says which image is each disk's top now.
    for (disk, top) in group.manifest()?.disks {
        println!("{} -> {}", disk.display(), top.display());
    }
    Ok(())
}
