//! `dd`: copy a range of a disk into a new image, as `qemu-img dd` does with its dd-style
//! operands (`if=`, `of=`, `bs=`, `count=`, `skip=`): the output holds `count` blocks (or the
//! rest of the input) starting `skip` blocks in; a skip past the end gives an empty output with
//! qemu-img's warning.

use qcow2::CreateOptions;

use crate::source::{CmdResult, Failure, Input};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open the input without waiting for other writers to let go, as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Input format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (raw unless given).
    #[arg(short = 'O')]
    output_format: Option<String>,
    /// `if=FILE`, `of=FILE`, `bs=SIZE`, `count=N`, `skip=N`.
    #[arg(num_args = 0..)]
    operands: Vec<String>,
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let fail = |m: String| Failure::new(1, m);
    let (mut input, mut output) = (None, None);
    let (mut bs, mut count, mut skip) = (512u64, None, None);
    for op in &args.operands {
        let (key, value) = op.split_once('=').unwrap_or((op.as_str(), ""));
        // qemu-img's messages: a value that is no size, then one out of range.
        let number = |v: &str, max: u64| {
            let min = u64::from(key == "bs");
            if v.trim_start().starts_with('-') {
                return Err(fail(format!(
                    "Invalid {key} specified. Must be between {min} and {max}."
                )));
            }
            let n = crate::size::parse_size(v)
                .map_err(|_| fail(format!("Invalid {key} specified: '{v}'.")))?;
            if n < min || n > max {
                return Err(fail(format!(
                    "Invalid {key} specified. Must be between {min} and {max}."
                )));
            }
            Ok(n)
        };
        const INT_MAX: u64 = i32::MAX as u64;
        const INT64_MAX: u64 = i64::MAX as u64;
        match key {
            "if" => input = Some(value.to_string()),
            "of" => output = Some(value.to_string()),
            "bs" => bs = number(value, INT_MAX)?,
            "count" => count = Some(number(value, INT64_MAX)?),
            "skip" => skip = Some(number(value, INT64_MAX)?),
            _ => return Err(fail(format!("unrecognized operand {key}"))),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(fail("Must specify both input and output files".into()));
    };
    let source = Input::open(std::path::Path::new(&input), args.format.as_deref()).map_err(fail)?;
    let guest = source.guest();
    let mut size = guest.size();
    if let Some(c) = count {
        size = size.min(c.saturating_mul(bs));
    }
    let skip_bytes = skip.map(|s| s.checked_mul(bs));
    let beyond = matches!(skip_bytes, Some(None)) || skip_bytes.flatten().is_some_and(|s| s > size);
    let offset = if beyond {
        0
    } else {
        skip_bytes.flatten().unwrap_or(0)
    };
    let out_size = if beyond { 0 } else { size - offset };
    let inputs = source.files();
    let out_path = std::path::Path::new(&output);
    let mut buf = vec![0u8; bs.min(1 << 20) as usize];
    match args.output_format.as_deref().unwrap_or("raw") {
        "raw" => {
            let file = crate::target::replace_file(out_path, &inputs).map_err(fail)?;
            use qcow2::storage::Storage;
            file.set_len(out_size.next_multiple_of(512))
                .map_err(|e| fail(format!("{output}: {e}")))?;
            if beyond {
                report!("{input}: cannot skip to specified offset");
                return Ok(0);
            }
            copy(guest, offset, out_size, &mut buf, |data, at| {
                file.write_at(data, at).map_err(|e| e.to_string())
            })
            .map_err(fail)?;
            file.flush().map_err(|e| fail(format!("{output}: {e}")))?;
        }
        "qcow2" => {
            let options = CreateOptions::new(out_size.next_multiple_of(512));
            let image = crate::img::create::open_new_qcow2(
                &output,
                &options,
                &inputs,
                crate::cache::CacheMode::WRITEBACK,
            )
            .map_err(fail)?;
            if beyond {
                report!("{input}: cannot skip to specified offset");
                image.close().map_err(|e| fail(e.to_string()))?;
                return Ok(0);
            }
            copy(guest, offset, out_size, &mut buf, |data, at| {
                if crate::source::is_zero(data) {
                    // A fresh image reads zeros already.
                    return Ok(());
                }
                image.write_at(data, at).map_err(|e| e.to_string())
            })
            .map_err(fail)?;
            image.close().map_err(|e| fail(e.to_string()))?;
        }
        other => return Err(fail(format!("Unknown file format '{other}'"))),
    }
    Ok(0)
}

/// Copies `len` guest bytes from `offset` of `guest` to offset 0 onward of the output.
fn copy(
    guest: &dyn crate::source::Guest,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    mut write: impl FnMut(&[u8], u64) -> Result<(), String>,
) -> Result<(), String> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        guest
            .read_at(&mut buf[..n], offset + done)
            .map_err(|e| format!("error while reading from input image file: {e}"))?;
        write(&buf[..n], done)
            .map_err(|e| format!("error while writing to output image file: {e}"))?;
        done += n as u64;
    }
    Ok(())
}
