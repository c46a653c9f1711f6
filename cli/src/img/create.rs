//! `create`: a new qcow2 (or raw) image as `qemu-img create` makes it, with the same options,
//! the same `Formatting '...'` line and the same errors in the same order. With `-b` and no size,
//! the size is the backing file's (opened relative to the new image's directory, as qemu-img
//! does); `-u` skips opening the backing file.

use std::fs::File;
use std::path::Path;

use qcow2::storage::FileIdentity;
use qcow2::{CreateOptions, Image, OpenOptions};

use crate::cache::CacheMode;
use crate::target::replace_file;

use crate::opts::{self, Qcow2Opts, RawOpts, RawPreallocation, MAX_IMAGE_SIZE};
use crate::source::{format_of, io_text, resolve_relative, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format: qcow2 or raw (raw by default, as qemu-img).
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options `k=v,...` (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file (relative names are relative to the new image's directory).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file.
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: no `Formatting` line.
    #[arg(short = 'q')]
    quiet: bool,
    file: String,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's size.
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// qemu-img's `cvtnum("image size", ..)`.
pub fn parse_image_size(text: &str) -> Result<u64, String> {
    let range = || format!("Invalid image size specified. Must be between 0 and {MAX_IMAGE_SIZE}.");
    if text.starts_with('-') {
        return Err(range());
    }
    match crate::size::parse_size(text) {
        Ok(n) if n > MAX_IMAGE_SIZE => Err(range()),
        Ok(n) => Ok(n),
        Err(_) if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) => Err(range()),
        Err(_) => Err(format!("Invalid image size specified: '{text}'.")),
    }
}

pub fn run(args: Args) -> CmdResult {
    let file = args.file.clone();
    let host = crate::source::file_protocol_path(&file);
    let named = |m: String| Failure::new(1, format!("{file}: {m}"));
    let fail = |(m, with_name): (String, bool)| {
        if with_name {
            named(m)
        } else {
            Failure::new(1, m)
        }
    };
    let format = match args.format.as_str() {
        "luks" => {
            let size = match &args.size {
                Some(text) => parse_image_size(text).map_err(|m| Failure::new(1, m))?,
                None => return Err(named("Image creation needs a size parameter".into())),
            };
            if !args.quiet {
                outln!("Formatting '{file}', fmt=luks size={size}");
            }
            crate::luks_file::create(&host, size, &args.options).map_err(named)?;
            return Ok(0);
        }
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        other => return Err(named(format!("Unknown file format '{other}'"))),
    };
    let mut opts = Qcow2Opts::default();
    let mut raw_opts = RawOpts::default();
    let option_size = match format {
        Format::Qcow2 => {
            opts = opts::parse(&args.options).map_err(fail)?;
            opts.size
        }
        Format::Raw => {
            raw_opts = opts::parse_raw(&args.options).map_err(fail)?;
            raw_opts.size
        }
    };
    let given_size = match &args.size {
        Some(text) => Some(parse_image_size(text).map_err(|m| Failure::new(1, m))?),
        None => None,
    };
    if given_size.is_some() && option_size.is_some() {
        return Err(named("The image size must be specified only once".into()));
    }
    let mut size = given_size.or(option_size);
    // The new file may not replace its own backing file, under any name.
    let mut inputs = Vec::new();
    if let Some(b) = &args.backing {
        opts.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_format {
        opts.backing_fmt = Some(f.clone());
    }
    if format == Format::Raw && (opts.backing_file.is_some() || opts.backing_fmt.is_some()) {
        let key = if opts.backing_file.is_some() {
            "backing_file"
        } else {
            "backing_fmt"
        };
        return Err(named(format!("Invalid parameter '{key}'")));
    }
    if let Some(backing) = opts.backing_file.clone() {
        if backing == file {
            return Err(named(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            ));
        }
        if backing.is_empty() {
            return Err(named("Expected backing file name, got empty string".into()));
        }
        let described = crate::nodes::backing_json::is_json(&backing);
        let full = resolve_relative(Path::new(&host), &backing);
        if !described {
            inputs.extend(crate::target::identity_of(&full));
        }
        if !args.unsafe_backing {
            let (detected, backing_size) = if described {
                // Opened through the same resolver and policy as any chain.
                let options = crate::source::with_policy(Path::new(&host), &OpenOptions::new());
                crate::nodes::backing_json::probe(
                    &file,
                    &backing,
                    opts.backing_fmt.as_deref(),
                    &options,
                )
                .map_err(|e| crate::source::open_error_text(&e))
            } else {
                open_backing(&full, opts.backing_fmt.as_deref())
            }
            .map_err(|m| named(format!("{m}\nCould not open backing image.")))?;
            if opts.backing_fmt.is_none() {
                return Err(named(format!(
                    "Backing file specified without backing format\nDetected format of {detected}."
                )));
            }
            size = size.or(Some(backing_size));
        } else if opts.backing_fmt.is_none() {
            return Err(named(
                "Backing file specified without backing format".into(),
            ));
        }
    }
    let Some(size) = size else {
        return Err(named("Image creation needs a size parameter".into()));
    };
    if !args.quiet {
        let fields = match format {
            Format::Qcow2 => opts.formatting_fields(size),
            Format::Raw => raw_opts.formatting_fields(size),
        };
        outln!("Formatting '{file}', fmt={} {fields}", args.format);
    }
    match format {
        Format::Raw => create_raw(&host, size, &raw_opts, &inputs).map_err(named),
        Format::Qcow2 => {
            let options = opts.to_create_options(size).map_err(named)?;
            create_data_file(&options, &inputs).map_err(named)?;
            create_qcow2(&host, &options, &inputs).map_err(named)
        }
    }?;
    Ok(0)
}

/// Opens the backing file as qemu-img does to learn its size: `(format name, virtual size)`.
fn open_backing(path: &Path, format: Option<&str>) -> Result<(&'static str, u64), String> {
    let shown = path.display();
    let format = match format {
        Some("qcow2") => Format::Qcow2,
        Some("raw") => Format::Raw,
        Some(other) => return Err(format!("Unknown driver '{other}'")),
        None => {
            File::open(path).map_err(|e| format!("Could not open '{shown}': {}", io_text(&e)))?;
            format_of(path, None)?
        }
    };
    match format {
        Format::Raw => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("Could not open '{shown}': {}", io_text(&e)))?;
            // qemu sees a raw file in whole sectors.
            Ok(("raw", meta.len().div_ceil(512) * 512))
        }
        Format::Qcow2 => {
            let mut magic = [0u8; 4];
            let mut f = File::open(path)
                .map_err(|e| format!("Could not open '{shown}': {}", io_text(&e)))?;
            let n = std::io::Read::read(&mut f, &mut magic).unwrap_or(0);
            if n < 4 || magic != *b"QFI\xfb" {
                return Err("Image is not in qcow2 format".into());
            }
            let image = Image::open(path, &OpenOptions::metadata_only().without_key(true))
                .map_err(|e| format!("Could not open '{shown}': {e}"))?;
            Ok(("qcow2", image.size()))
        }
    }
}

/// A new raw file as QEMU's file driver makes it: whole sectors, the first block written (QEMU
/// does so its alignment probe finds a block there), the rest a hole, reserved or zeros.
/// An unknown preallocation mode is refused after the file was created (empty), as QEMU does.
fn create_raw(
    file: &str,
    size: u64,
    opts: &RawOpts,
    inputs: &[FileIdentity],
) -> Result<(), String> {
    let storage = replace_file(Path::new(file), inputs)?;
    let mode = opts.preallocation()?;
    let size = size.next_multiple_of(512);
    grow_raw(&storage, 0, size, mode)?;
    write_first_block(storage.file(), size)
}

/// Zeros over the first 4 KiB (at most the file): what QEMU writes into a new raw file.
pub fn write_first_block(file: &File, size: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let n = size.min(4096) as usize;
    file.write_all_at(&vec![0u8; n], 0)
        .map_err(|e| format!("Could not write to the new file: {}", io_text(&e)))
}

/// Grows a raw file from `old` to `new` bytes as preallocation `mode` asks: a hole, reserved
/// blocks (`fallocate`) or written zeros over the new part.
pub fn grow_raw(
    storage: &qcow2::FileStorage,
    old: u64,
    new: u64,
    mode: RawPreallocation,
) -> Result<(), String> {
    use qcow2::storage::Storage;
    use std::os::unix::fs::FileExt;
    let file = storage.file();
    let resize = |e: std::io::Error| format!("Could not resize file: {}", io_text(&e));
    match mode {
        RawPreallocation::Off => file.set_len(new).map_err(resize),
        RawPreallocation::Falloc => {
            file.set_len(old.min(new)).map_err(resize)?;
            if new > old {
                storage
                    .allocate(old, new - old)
                    .map_err(|e| format!("Could not preallocate new data: {}", io_text(&e)))?;
            }
            Ok(())
        }
        RawPreallocation::Full => {
            file.set_len(old.min(new)).map_err(resize)?;
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK as usize];
            let mut pos = old;
            while pos < new {
                let n = (new - pos).min(CHUNK) as usize;
                file.write_all_at(&zeros[..n], pos).map_err(|e| {
                    format!("Could not write zeros for preallocation: {}", io_text(&e))
                })?;
                pos += n as u64;
            }
            Ok(())
        }
    }
}

/// Makes the external data file a new qcow2 image names (as QEMU does, relative to the working
/// directory): a raw file of the virtual size, preallocated as the image asks.
pub fn create_data_file(
    options: &CreateOptions,
    inputs: &[FileIdentity],
) -> Result<Option<qcow2::FileStorage>, String> {
    let Some(name) = &options.data_file else {
        return Ok(None);
    };
    let storage = replace_file(Path::new(name), inputs)?;
    let mode = match options.preallocation {
        qcow2::Preallocation::Falloc => RawPreallocation::Falloc,
        qcow2::Preallocation::Full => RawPreallocation::Full,
        _ => RawPreallocation::Off,
    };
    grow_raw(&storage, 0, options.size, mode)?;
    write_first_block(storage.file(), options.size)?;
    Ok(Some(storage))
}

/// Writes a new qcow2 image at `file` (replacing what is there, unless it is one of `inputs`)
/// and closes it cleanly. The backing file is recorded, never opened.
pub fn create_qcow2(
    file: &str,
    options: &CreateOptions,
    inputs: &[FileIdentity],
) -> Result<(), String> {
    let image = open_new_qcow2(file, options, inputs, CacheMode::WRITEBACK)?;
    image.close().map_err(|e| e.to_string())
}

/// Writes a new qcow2 image at `file` and returns it open for writing (without its backing).
pub fn open_new_qcow2(
    file: &str,
    options: &CreateOptions,
    inputs: &[FileIdentity],
    cache: CacheMode,
) -> Result<Image, String> {
    let storage = replace_file(Path::new(file), inputs)?;
    Image::create_in(crate::target::with_cache(storage, cache)?, file, options)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_image_size;

    #[test]
    fn image_sizes_parse_with_qemu_img_messages() {
        assert_eq!(parse_image_size("1G"), Ok(1 << 30));
        assert_eq!(
            parse_image_size("1x").unwrap_err(),
            "Invalid image size specified: '1x'."
        );
        assert!(parse_image_size("-1")
            .unwrap_err()
            .contains("Must be between"));
        assert!(parse_image_size("8E")
            .unwrap_err()
            .contains("Must be between"));
    }
}
