//! `amend`: changes qcow2 format options in place as `qemu-img amend -o` does (`compat`,
//! `lazy_refcounts`, `refcount_bits`, `size`), with its messages and exit codes; `-p` shows
//! progress. The library keeps every step crash-safe (`qcow2::Image::amend`).

use std::path::PathBuf;

use qcow2::OpenOptions;

use crate::progress::Progress;
use crate::source::{format_of, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2; raw cannot be amended); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options `k=v,...` to change (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow changes that qemu-img refuses without it (overwriting or erasing the last LUKS
    /// key slot).
    #[arg(long = "force")]
    force: bool,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    if args.options.is_empty() {
        return Err(fail(
            "Must specify options (-o)\nTry 'qemu-img amend --help' for more info".into(),
        ));
    }
    let format = format_of(&args.file, args.format.as_deref()).map_err(fail)?;
    if format == Format::Raw {
        return Err(fail(
            "Format driver 'raw' does not support option amendment".into(),
        ));
    }
    let opts = crate::opts::parse_amend(&args.options).map_err(fail)?;
    let image = open_image(&args.file, &OpenOptions::read_write()).map_err(fail)?;
    let message = |e: qcow2::Error| match e {
        qcow2::Error::InvalidArgument { reason, .. } => fail(reason),
        e => fail(e.to_string()),
    };
    if let Some(change) = &opts.keyslots {
        image.change_keyslots(change, args.force).map_err(message)?;
    }
    let mut progress = Progress::new(args.progress && !args.quiet);
    image
        .amend(&opts.options, &mut |done| {
            progress.update((done * 10_000.0) as u64, 10_000)
        })
        .map_err(message)?;
    if let Some(size) = opts.size {
        image.resize(size, false).map_err(message)?;
    }
    image.close().map_err(message)?;
    progress.finish();
    Ok(0)
}
