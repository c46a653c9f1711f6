//! `resize`: changes the virtual size as `qemu-img resize` does. `SIZE` is absolute or relative
//! (`+N`, `-N`); shrinking needs `--shrink` (and then drops what lies past the new end).

use std::path::PathBuf;

use qcow2::{OpenOptions, Preallocation};

use crate::opts::RawPreallocation;

use crate::opts::MAX_IMAGE_SIZE;
use crate::source::{format_of, io_text, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Allow the new size to be smaller than the current one.
    #[arg(long)]
    shrink: bool,
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Preallocation of the new area: off, metadata (qcow2), falloc or full.
    #[arg(long, value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet: no `Image resized.` line.
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// `(sign, bytes)` of a size argument: sign is 0 for an absolute size.
fn parse_resize_size(text: &str) -> Result<(i32, u64), String> {
    let (sign, number) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (0, text),
    };
    let bytes = crate::size::parse_size(number).map_err(|_| {
        if !number.is_empty() && number.chars().all(|c| c.is_ascii_digit()) {
            format!("Value '{number}' is out of range for parameter 'size'")
        } else {
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.".to_string()
        }
    })?;
    Ok((sign, bytes))
}

const SHRINK_WARNING: &str = "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let (sign, bytes) = parse_resize_size(&args.size).map_err(fail)?;
    let prealloc = match args.preallocation.as_deref() {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => return Err(fail(format!("Invalid preallocation mode '{other}'"))),
    };
    let format = format_of(&args.file, args.format.as_deref()).map_err(fail)?;
    let name = args.file.display().to_string();
    let resized = || {
        if !args.quiet {
            outln!("Image resized.");
        }
        Ok(0)
    };
    let target = |current: u64| -> Result<u64, Failure> {
        let total = match sign {
            0 => bytes as i128,
            _ => i128::from(current) + i128::from(sign) * bytes as i128,
        };
        if total <= 0 || total > MAX_IMAGE_SIZE as i128 {
            return Err(fail("New image size must be positive".into()));
        }
        let total = total as u64;
        if prealloc != Preallocation::Off && total <= current {
            return Err(fail(
                "Preallocation can only be used for growing images".into(),
            ));
        }
        if total < current && !args.shrink {
            return Err(fail(format!(
                "Use the --shrink option to perform a shrink operation.\n{}: {SHRINK_WARNING}",
                crate::console::program()
            )));
        }
        Ok(total)
    };
    match format {
        Format::Raw => {
            // Read access too: QEMU's locks are read locks, which need it.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&args.file)
                .map_err(|e| fail(format!("Could not open '{name}': {}", io_text(&e))))?;
            let current = file
                .metadata()
                .map_err(|e| fail(format!("Could not open '{name}': {}", io_text(&e))))?
                .len();
            let total = target(current)?;
            let mode = match prealloc {
                Preallocation::Off => RawPreallocation::Off,
                Preallocation::Falloc => RawPreallocation::Falloc,
                Preallocation::Full => RawPreallocation::Full,
                Preallocation::Metadata => {
                    return Err(fail("Unsupported preallocation mode: metadata".into()))
                }
            };
            let storage = crate::target::lock_for_write(file, &args.file)
                .map_err(|m| fail(format!("{name}: {m}")))?;
            crate::img::create::grow_raw(&storage, current, total, mode).map_err(fail)?;
            resized()
        }
        Format::Qcow2 => {
            let image = open_image(&args.file, &OpenOptions::read_write()).map_err(fail)?;
            let total = target(image.size())?;
            if total % 512 != 0 {
                return Err(fail("The new size must be a multiple of 512".into()));
            }
            image
                .resize_preallocated(total, args.shrink, prealloc)
                .map_err(|e| match e {
                    // The library's invalid-argument text is QEMU's wording.
                    qcow2::Error::InvalidArgument { reason, .. } => fail(reason),
                    e => fail(e.to_string()),
                })?;
            image.close().map_err(|e| fail(e.to_string()))?;
            resized()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_resize_size;

    #[test]
    fn sizes_may_be_relative() {
        assert_eq!(parse_resize_size("+1M"), Ok((1, 1 << 20)));
        assert_eq!(parse_resize_size("-4k"), Ok((-1, 4096)));
        assert_eq!(parse_resize_size("2G"), Ok((0, 2 << 30)));
        assert!(parse_resize_size("x").unwrap_err().contains("expects"));
        assert!(parse_resize_size("100000000000000000000")
            .unwrap_err()
            .contains("out of range"));
    }
}
