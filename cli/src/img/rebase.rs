//! `rebase`: changes an image's backing file, as `qemu-img rebase`. The safe mode copies what
//! would change so the guest content stays the same (`-b ""` flattens the image); `-u` only
//! rewrites the name and format in the header.

use std::path::PathBuf;

use qcow2::{BackingPolicy, Image, NewBacking, OpenOptions, RebaseOptions};

use crate::progress::{Progress, SKIP_TWO};
use crate::source::{format_of, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unsafe mode: rewrite the header only.
    #[arg(short = 'u')]
    header_only: bool,
    /// The new backing file ("" for none).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// The new backing file's format (qcow2 or raw).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Image format (qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Write the clusters copied from the old backing chain compressed.
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let Some(backing) = args.backing.clone() else {
        return Err(fail(
            "Must specify backing file (-b) or use unsafe mode (-u)".into(),
        ));
    };
    let format = format_of(&args.file, args.format.as_deref()).map_err(fail)?;
    if format == Format::Raw {
        if args.compress {
            return Err(fail(
                "Compression not supported for this file format".into(),
            ));
        }
        return Err(fail(format!(
            "Could not change the backing file to '{backing}': Operation not supported"
        )));
    }
    let name = (!backing.is_empty()).then_some(backing);
    if let Some(fmt) = &args.backing_format {
        // Only the header changes with -u, so any format qemu knows may be recorded; a safe
        // rebase reads the new backing file, which this tool does in the formats it implements.
        let known = if args.header_only {
            crate::source::QEMU_DRIVERS.contains(&fmt.as_str())
        } else {
            fmt == "qcow2" || fmt == "raw"
        };
        if !known {
            return Err(fail(format!("Invalid format name: '{fmt}'")));
        }
    }
    if let Some(n) = &name {
        if args.backing_format.is_none() {
            return Err(fail(format!(
                "Could not change the backing file to '{n}': backing format must be specified"
            )));
        }
    }
    let file_name = args.file.display().to_string();
    let open = OpenOptions::default()
        .writable(true)
        .backing(if args.header_only {
            BackingPolicy::Ignore
        } else {
            BackingPolicy::Follow
        });
    let open = crate::source::with_policy(&args.file, &open);
    let mut image = Image::open(&args.file, &open)
        .map_err(|e| fail(format!("Could not open '{file_name}': {e}")))?;
    let new = match (&name, args.header_only) {
        (Some(n), false) => Some(
            NewBacking::open(
                &args.file,
                n,
                args.backing_format.as_deref().unwrap_or("raw"),
                // The new backing file's own chain opens as any chain does.
                &crate::source::with_policy(&args.file, &OpenOptions::default()),
            )
            .map_err(|e| fail(format!("Could not open new backing file '{n}': {e}")))?,
        ),
        _ => None,
    };
    let options = RebaseOptions::default()
        .format(name.as_ref().and(args.backing_format.clone()))
        .name(name)
        .header_only(args.header_only)
        .compress(args.compress);
    let mut progress = Progress::new(args.progress && !args.header_only, SKIP_TWO);
    image
        .rebase(&options, new, &mut |done, total| {
            progress.report(done, total)
        })
        .map_err(|e| fail(format!("Could not rebase '{file_name}': {e}")))?;
    progress.finish();
    image.close().map_err(|e| fail(e.to_string()))?;
    Ok(0)
}
