//! `convert -n`: copy into a target that exists already (qemu-img's "skip target image
//! creation"). Data ranges are written; ranges that read as zeros are made zeros too, since the
//! target may hold old bytes there, unless `--target-is-zero` says it reads as zeros already:
//! holes are punched only where a raw target holds data, and zero clusters are written where a
//! qcow2 target has no zero cluster of its own, as qemu-img writes them. The target must be at
//! least as large as the source.

use std::path::Path;

use qcow2::storage::{FileIdentity, Storage};
use qcow2::OpenOptions;

use crate::img::convert::copy::RawTarget;
use crate::img::convert::{copy_into_qcow2, copy_into_raw, CopyOpts, Qcow2Target, Zeros};
use crate::source::{open_image, CmdResult, Failure, Guest};

/// Copies `guest` into the existing `dst` of `format`.
pub fn copy(
    guest: &dyn Guest,
    dst: &Path,
    format: &str,
    target_is_zero: bool,
    inputs: &[FileIdentity],
    how: &CopyOpts<'_>,
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
    let size = guest.size();
    let too_small = || fail("output file is smaller than input file".into());
    if format == "raw" {
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
        let mut storage = crate::target::lock_for_write(file, dst).map_err(fail)?;
        crate::target::set_direct(&mut storage, how.cache).map_err(fail)?;
        if storage.len().map_err(|e| fail(e.to_string()))? < size {
            return Err(too_small());
        }
        let target = RawTarget {
            storage: &storage,
            fresh: target_is_zero,
        };
        copy_into_raw(guest, &target, how).map_err(fail)?;
        return Ok(0);
    }
    let options = OpenOptions::read_write()
        .skip_syncs(!how.durable())
        .direct_io(how.cache.direct);
    let image = open_image(dst, &options).map_err(fail)?;
    if image.size() < size {
        return Err(too_small());
    }
    let cs = image.cluster_size() as usize;
    let target = Qcow2Target {
        image: &image,
        new: false,
        below: false,
        zeros: if target_is_zero {
            Zeros::Skip
        } else {
            Zeros::WhereNonZero
        },
        zero_gaps: !target_is_zero,
        // Whole zero clusters become zero clusters; smaller zero blocks are written as data.
        granularity: how.sparse.map(|block| block.max(cs)),
    };
    copy_into_qcow2(guest, &target, how).map_err(fail)?;
    image.close().map_err(|e| fail(e.to_string()))?;
    Ok(0)
}
