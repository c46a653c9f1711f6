//! `convert -n`: copy into a target that exists already (qemu-img's "skip target image
//! creation"). Data ranges are written; ranges that read as zeros are written as zeros too,
//! since the target may hold old bytes there, unless `--target-is-zero` says it reads as zeros
//! already. The target must be at least as large as the source.

use std::path::Path;

use qcow2::storage::{FileIdentity, Storage};
use qcow2::OpenOptions;

use crate::source::{open_image, CmdResult, Failure, Guest};

/// Bytes read and written per step.
const CHUNK: u64 = 2 << 20;

/// Where the copy goes.
enum Target {
    Raw(qcow2::FileStorage),
    Qcow2(Box<qcow2::Image>),
}

impl Target {
    fn size(&self) -> Result<u64, String> {
        match self {
            Target::Raw(file) => file.len().map_err(|e| e.to_string()),
            Target::Qcow2(image) => Ok(image.size()),
        }
    }

    fn write(&self, data: &[u8], at: u64) -> Result<(), String> {
        match self {
            Target::Raw(file) => file.write_at(data, at).map_err(|e| e.to_string()),
            Target::Qcow2(image) => image.write_at(data, at).map_err(|e| e.to_string()),
        }
    }

    fn zero(&self, at: u64, len: u64, zeros: &[u8]) -> Result<(), String> {
        match self {
            Target::Raw(_) => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write(&zeros[..n], at + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Target::Qcow2(image) => image
                .write_zeroes(at, len, false)
                .map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Target::Raw(file) => file.flush().map_err(|e| e.to_string()),
            Target::Qcow2(image) => image.close().map_err(|e| e.to_string()),
        }
    }
}

/// Copies `guest` into the existing `dst` of `format`.
pub fn copy(
    guest: &dyn Guest,
    dst: &Path,
    format: &str,
    target_is_zero: bool,
    inputs: &[FileIdentity],
) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let name = dst.display();
    if let Some(id) = crate::target::identity_of(dst) {
        if inputs.contains(&id) {
            return Err(fail(format!(
                "{name}: the output is also an input; nothing was written"
            )));
        }
    }
    let target = match format {
        "raw" => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dst)
                .map_err(|e| {
                    let e = crate::source::io_text(&e);
                    fail(format!(
                        "Could not open '{name}': Could not open '{name}': {e}"
                    ))
                })?;
            Target::Raw(crate::target::lock_for_write(file, dst).map_err(fail)?)
        }
        _ => Target::Qcow2(Box::new(
            open_image(dst, &OpenOptions::read_write()).map_err(fail)?,
        )),
    };
    let size = guest.size();
    if target.size().map_err(fail)? < size {
        return Err(fail("output file is smaller than input file".into()));
    }
    let zeros = vec![0u8; CHUNK as usize];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < size {
        let window = (64 * CHUNK).min(size - at);
        for region in guest.regions(at, window).map_err(fail)? {
            let end = region.start + region.length;
            if !region.data {
                if !target_is_zero {
                    target
                        .zero(region.start, region.length, &zeros)
                        .map_err(|e| {
                            fail(format!("error while writing at byte {}: {e}", region.start))
                        })?;
                }
                continue;
            }
            let mut pos = region.start;
            while pos < end {
                let n = (end - pos).min(CHUNK) as usize;
                guest
                    .read_at(&mut buf[..n], pos)
                    .map_err(|e| fail(format!("error while reading at byte {pos}: {e}")))?;
                target
                    .write(&buf[..n], pos)
                    .map_err(|e| fail(format!("error while writing at byte {pos}: {e}")))?;
                pos += n as u64;
            }
        }
        at += window;
    }
    target.finish().map_err(fail)?;
    Ok(0)
}
