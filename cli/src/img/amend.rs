//! `amend`: changes qcow2 format options in place as `qemu-img amend -o` does (`compat`,
//! `lazy_refcounts`, `refcount_bits`, `size`, `data_file`, `data_file_raw`), with its messages
//! and exit codes; `-p` shows progress in QEMU's figures. The image is a path or, with
//! `--image-opts`, an option string. The library keeps every step crash-safe
//! (`qcow2::Image::amend`).

use std::path::PathBuf;

use qcow2::OpenOptions;

use crate::io::open::{data_file_override, parse_option_string, OpenSpec, Options};
use crate::progress::{Progress, SKIP_ONE};
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
    /// FILE is an option string (`driver=qcow2,file.filename=PATH,...`), not a path.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Allow changes that qemu-img refuses without it (overwriting or erasing the last LUKS
    /// key slot).
    #[arg(long = "force")]
    force: bool,
    file: String,
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    if args.options.is_empty() {
        return Err(fail(
            "Must specify options (-o)\nTry 'qemu-img amend --help' for more info".into(),
        ));
    }
    let (file, driver, data_file) = if args.image_opts {
        if args.format.is_some() {
            return Err(fail(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        image_opts_file(&args.file).map_err(fail)?
    } else {
        (
            PathBuf::from(crate::source::file_protocol_path(&args.file)),
            args.format.clone(),
            None,
        )
    };
    let format = format_of(&file, driver.as_deref()).map_err(fail)?;
    if format == Format::Raw {
        return Err(fail(
            "Format driver 'raw' does not support option amendment".into(),
        ));
    }
    let opts = crate::opts::parse_amend(&args.options).map_err(fail)?;
    let image = open_image(&file, &OpenOptions::read_write().data_file(data_file)).map_err(fail)?;
    if (opts.backing_file.is_some() || opts.backing_fmt.is_some())
        && (opts.backing_file != image.backing_file_name()
            || opts.backing_fmt != image.backing_format())
    {
        // Naming the backing file it already has is no change, as in QEMU.
        return Err(fail(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
        ));
    }
    let message = |e: qcow2::Error| match e {
        qcow2::Error::InvalidArgument { reason, .. } => fail(reason),
        e => fail(e.to_string()),
    };
    if let Some(change) = &opts.keyslots {
        image.change_keyslots(change, args.force).map_err(message)?;
    }
    let mut progress = Progress::new(args.progress && !args.quiet, SKIP_ONE);
    let amended = image.amend(&opts.options, &mut |done, total| {
        progress.percent(100.0 * done as f32 / total as f32)
    });
    // qemu-img ends at 100% whether the amend worked or not.
    progress.percent(100.0);
    progress.finish();
    amended.map_err(message)?;
    image.close().map_err(message)?;
    Ok(0)
}

/// The image file, format driver and data file an `--image-opts` string names. Cache and
/// driver tuning options (`l2-cache-entry-size`, ...) change nothing this engine does and are
/// accepted; a backing node is refused (amend never reads through the backing file).
fn image_opts_file(text: &str) -> Result<(PathBuf, Option<String>, Option<PathBuf>), String> {
    let mut options = Options::new();
    parse_option_string(text, &mut options)?;
    if let Some(key) = options.keys().find(|k| k.starts_with("backing")) {
        return Err(format!(
            "the '{key}' option is not supported by qcow2-tool amend"
        ));
    }
    let data_file = data_file_override(&options)?;
    let spec = OpenSpec {
        options,
        ..OpenSpec::default()
    };
    let (file, driver) = spec
        .resolve()
        .map_err(|e| format!("Could not open '{text}': {e}"))?;
    Ok((PathBuf::from(file), driver, data_file))
}
