//! `check`: `qemu-img check`'s counters, JSON keys and exit codes (0 clean, 1 check failed,
//! 2 corruptions, 3 leaks only, 63 format without checks). `-r leaks|all` repairs, then reports
//! the second check as qemu-img does (with the fixed counts).

use std::path::PathBuf;

use qcow2::{CheckReport, OpenOptions, Repair};

use crate::output::{Json, OutputFormat};
use crate::source::{format_of, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Repair mode: `leaks` lowers leaked refcounts, `all` also fixes corruptions.
    #[arg(short = 'r', value_parser = ["leaks", "all"])]
    repair: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Image format (qcow2; raw has no checks).
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let format = format_of(&args.file, args.format.as_deref()).map_err(|m| Failure::new(1, m))?;
    if format == Format::Raw {
        return Err(Failure::new(
            63,
            "This image format does not support checks",
        ));
    }
    let repair = match args.repair.as_deref() {
        Some("leaks") => Some(Repair::Leaks),
        Some(_) => Some(Repair::All),
        None => None,
    };
    let options = OpenOptions::metadata_only()
        .writable(repair.is_some())
        .for_repair(repair.is_some());
    let failed = |m: String| Failure::new(1, format!("Check failed: {m}"));
    // A failed open is reported as every command reports it; "Check failed" is for the check.
    let image = open_image(&args.file, &options).map_err(|m| Failure::new(1, m))?;
    let report = image.check().map_err(|e| failed(e.to_string()))?;
    if repair == Some(Repair::Leaks) && report.needs_rebuild() {
        // qemu-img stops after comparing refcounts: a referenced cluster with refcount 0 needs
        // the refcount structures rebuilt, which only `-r all` may do.
        for message in report
            .messages
            .iter()
            .filter(|m| m.starts_with("ERROR cluster ") || m.starts_with("Leaked cluster "))
        {
            errln!("{message}");
        }
        errln!("ERROR need to rebuild refcount structures");
        return Err(failed("Input/output error".into()));
    }
    let report = match repair {
        None => {
            for message in &report.messages {
                errln!("{message}");
            }
            report
        }
        Some(mode) => {
            let second = image
                .check_and_repair(mode)
                .map_err(|e| failed(e.to_string()))?;
            for message in &second.repair_messages {
                errln!("{message}");
            }
            if second.leaks_fixed > 0 || second.corruptions_fixed > 0 {
                for message in &second.messages {
                    errln!("{message}");
                }
            }
            image.close().map_err(|e| failed(e.to_string()))?;
            second
        }
    };
    let filename = args.file.display().to_string();
    match args.output {
        OutputFormat::Json => outln!("{}", to_json(&report, &filename).pretty()),
        OutputFormat::Human => {
            if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
                out!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                    report.leaks_fixed, report.corruptions_fixed
                );
            }
            out!("{}", to_human(&report))
        }
    }
    Ok(report.exit_code())
}

/// qemu-img's `ImageCheck` JSON: counters only when non-zero, in qemu-img's key order.
fn to_json(r: &CheckReport, filename: &str) -> Json {
    let mut o = Json::obj();
    let nonzero = |o: &mut Json, key: &str, n: u64| {
        if n != 0 {
            o.push(key, n);
        }
    };
    nonzero(&mut o, "image-end-offset", r.image_end_offset);
    nonzero(&mut o, "compressed-clusters", r.compressed_clusters);
    nonzero(&mut o, "total-clusters", r.total_clusters);
    nonzero(&mut o, "corruptions", r.corruptions);
    o.push("check-errors", r.check_errors);
    nonzero(&mut o, "leaks", r.leaks);
    nonzero(&mut o, "corruptions-fixed", r.corruptions_fixed);
    nonzero(&mut o, "leaks-fixed", r.leaks_fixed);
    nonzero(&mut o, "allocated-clusters", r.allocated_clusters);
    o.push("filename", filename);
    o.push("format", "qcow2");
    nonzero(&mut o, "fragmented-clusters", r.fragmented_clusters);
    o
}

/// qemu-img check's human summary.
fn to_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset != 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}
