//! `snapshot -l | -c NAME | -a NAME | -d NAME`, as qemu-img: the listing is qemu-img's table;
//! `-a` and `-d` look a snapshot up by id first, then by name.

use std::path::PathBuf;

use chrono::{Local, TimeZone};
use qcow2::format::SnapshotTime;
use qcow2::{OpenOptions, SnapshotInfo};

use crate::output::size_to_str;
use crate::source::{format_of, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current state.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the image to a snapshot.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (only qcow2 has snapshots).
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let actions = [
        args.list,
        args.create.is_some(),
        args.apply.is_some(),
        args.delete.is_some(),
    ];
    if actions.iter().filter(|&&a| a).count() > 1 {
        return Err(Failure::new(1, "Cannot mix '-l', '-a', '-c', '-d'"));
    }
    if let Some(name) = &args.create {
        let image =
            open_image(&args.file, &OpenOptions::read_write()).map_err(|m| Failure::new(1, m))?;
        // qemu-img keeps names to 255 bytes and the time to microseconds.
        let mut cut = name.len().min(255);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let name = &name[..cut];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let time = SnapshotTime {
            secs: now.as_secs() as i64,
            nanos: now.subsec_micros() * 1000,
        };
        image
            .create_snapshot(name, time)
            .map_err(|e| Failure::new(1, format!("Could not create snapshot '{name}': {e}")))?;
        image.close().map_err(|e| Failure::new(1, e.to_string()))?;
        return Ok(0);
    }
    if let Some(name) = &args.apply {
        let image =
            open_image(&args.file, &OpenOptions::read_write()).map_err(|m| Failure::new(1, m))?;
        image.apply_snapshot(name).map_err(|e| {
            // The library's invalid-argument text is QEMU's wording.
            let text = match e {
                qcow2::Error::InvalidArgument { reason, .. } => reason,
                e => e.to_string(),
            };
            Failure::new(1, format!("Could not apply snapshot '{name}': {text}"))
        })?;
        image.close().map_err(|e| Failure::new(1, e.to_string()))?;
        return Ok(0);
    }
    if let Some(name) = &args.delete {
        let image =
            open_image(&args.file, &OpenOptions::read_write()).map_err(|m| Failure::new(1, m))?;
        // qemu-img deletes by name only (applying also accepts an id); resolve the name to the
        // snapshot's unique id so a name that looks like another snapshot's id stays unambiguous.
        let id = image
            .snapshot_entries()
            .into_iter()
            .find(|s| s.name == name.as_bytes())
            .map(|s| s.id_str())
            .ok_or_else(|| {
                Failure::new(
                    1,
                    format!("Could not delete snapshot '{name}': snapshot not found"),
                )
            })?;
        image
            .delete_snapshot(&id)
            .map_err(|e| Failure::new(1, format!("Could not delete snapshot '{name}': {e}")))?;
        image.close().map_err(|e| Failure::new(1, e.to_string()))?;
        return Ok(0);
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
        out!("Snapshot list:\n{}", snapshot_table(&snapshots));
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
