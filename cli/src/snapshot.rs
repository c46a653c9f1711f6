//! `snapshot -l`: the internal snapshot table as qemu-img prints it. Creating, applying and
//! deleting snapshots need the write engine and are refused for now.

use std::path::PathBuf;

use chrono::{Local, TimeZone};
use qcow2::{OpenOptions, SnapshotInfo};

use crate::output::size_to_str;
use crate::source::{format_of, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot (not implemented yet).
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply a snapshot (not implemented yet).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete a snapshot (not implemented yet).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (only qcow2 has snapshots).
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    if args.create.is_some() || args.apply.is_some() || args.delete.is_some() {
        return Err(Failure::new(
            1,
            "snapshot -c/-a/-d need the write engine, which is not implemented yet; only -l works",
        ));
    }
    if !args.list {
        return Err(Failure::new(
            1,
            "snapshot: one of -l, -c, -a or -d is required",
        ));
    }
    // Raw images have no snapshots: an empty list, as qemu-img prints it.
    if format_of(&args.file, args.format.as_deref()).map_err(|m| Failure::new(1, m))? == Format::Raw
    {
        return Ok(0);
    }
    let image =
        open_image(&args.file, &OpenOptions::metadata_only()).map_err(|m| Failure::new(1, m))?;
    let snapshots = image.info().snapshots;
    if !snapshots.is_empty() {
        print!("Snapshot list:\n{}", snapshot_table(&snapshots));
    }
    Ok(0)
}

/// The header line and one line per snapshot, as `bdrv_snapshot_dump` formats them.
pub fn snapshot_table(snapshots: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for snap in snapshots {
        let date = Local
            .timestamp_opt(i64::from(snap.date_sec), 0)
            .single()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let secs = snap.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (snap.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = snap.icount.map(|i| i.to_string()).unwrap_or_default();
        // C pads by bytes, not characters.
        let left = |t: &str, w: usize| format!("{t}{}", " ".repeat(w.saturating_sub(t.len())));
        let right = |t: &str, w: usize| format!("{}{t}", " ".repeat(w.saturating_sub(t.len())));
        s += &format!(
            "{} {} {} {} {} {}\n",
            left(&snap.id, 7),
            left(&snap.name, 16),
            right(&size_to_str(snap.vm_state_size), 8),
            right(&date, 19),
            right(&clock, 15),
            right(&icount, 10)
        );
    }
    s
}
