//! `commit`: merges an image into a base below it, as `qemu-img commit`. Without `-b` the data
//! goes into the backing file and the image is emptied afterwards (unless `-d`); with `-b BASE`
//! every layer above BASE is committed into it and no image is emptied (qemu-img's behaviour).

use std::path::{Path, PathBuf};

use qcow2::{CommitOptions, Image, OpenOptions};

use crate::progress::{Progress, SKIP_ONE};
use crate::source::{format_of, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to commit into (default: the backing file); implies -d.
    #[arg(short = 'b')]
    base: Option<PathBuf>,
    /// Keep the image's content instead of emptying it.
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no `Image committed.` line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format (qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

/// The depth of `base` in the chain below `file`: a relative name is taken relative to each
/// overlay in turn and matches when it names that overlay's backing file (as qemu-img matches
/// it, so a name relative to the working directory only matches by chance).
fn base_depth(file: &Path, base: &Path) -> Result<u32, String> {
    let not_found = || {
        format!(
            "Did not find '{}' in the backing chain of '{}'",
            base.display(),
            file.display()
        )
    };
    let chain = Image::chain_paths(
        file,
        &crate::source::with_policy(file, &OpenOptions::default()),
    )
    .map_err(|e| e.to_string())?;
    let base = base.to_string_lossy();
    let overlays = std::iter::once(file).chain(chain.iter().map(PathBuf::as_path));
    overlays
        .zip(&chain)
        .position(|(overlay, backing)| {
            let wanted = qcow2::image::resolve_relative(overlay, &base);
            match (
                std::fs::canonicalize(wanted),
                std::fs::canonicalize(backing),
            ) {
                (Ok(w), Ok(b)) => w == b,
                _ => false,
            }
        })
        .map(|i| i as u32 + 1)
        .ok_or_else(not_found)
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let format = format_of(&args.file, args.format.as_deref()).map_err(fail)?;
    if format == Format::Raw {
        return Err(fail("Image does not have a backing file".into()));
    }
    let name = args.file.display().to_string();
    let probe = Image::open(&args.file, &OpenOptions::metadata_only().without_key(true))
        .map_err(|e| fail(format!("Could not open '{name}': {e}")))?;
    if probe.backing_file_name().is_none() {
        return Err(fail("Image does not have a backing file".into()));
    }
    drop(probe);
    let base_depth = match &args.base {
        Some(base) => base_depth(&args.file, base).map_err(fail)?,
        None => 1,
    };
    let options = CommitOptions::default()
        .base_depth(base_depth)
        .empty_top(!args.keep && args.base.is_none());
    let image = Image::open_for_commit(
        &args.file,
        &crate::source::with_policy(&args.file, &OpenOptions::default()),
        &options,
    )
    .map_err(|e| fail(format!("Could not open '{name}': {e}")))?;
    let mut progress = Progress::new(args.progress, SKIP_ONE);
    image
        .commit(&options, &mut |done, total| progress.report(done, total))
        .map_err(|e| fail(format!("Block job failed: {}", job_error_text(&e))))?;
    progress.finish();
    image.close().map_err(|e| fail(e.to_string()))?;
    if !args.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}

/// Why the commit job failed, as QEMU reports a block job's error: an I/O failure as its
/// `strerror` text alone; anything else as the engine words it.
fn job_error_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::Io { source, .. } => crate::source::io_text(source),
        other => other.to_string(),
    }
}
