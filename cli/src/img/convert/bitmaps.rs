//! `convert --bitmaps [--skip-broken-bitmaps]`: copies the source's persistent bitmaps into the
//! new qcow2 image once its data is written (so the copy itself marks nothing), with qemu-img's
//! refusals and warnings. Inconsistent bitmaps stop the conversion before anything is created,
//! unless they are skipped; so does an output that cannot hold bitmaps (raw, v2), which
//! qemu-img refuses only after creating it.

use std::path::Path;

use qcow2::{Image, OpenOptions};

use crate::source::{Failure, Input};

/// Which bitmaps to copy, checked before the output exists: `None` without `--bitmaps`.
pub fn plan(
    bitmaps: bool,
    skip_broken: bool,
    output_format: &str,
    output_version: Option<u32>,
    input: &Input,
) -> Result<Option<Vec<String>>, Failure> {
    let fail = |m: &str| Failure::new(1, m);
    if skip_broken && !bitmaps {
        return Err(fail("Use of --skip-broken-bitmaps requires --bitmaps"));
    }
    if !bitmaps {
        return Ok(None);
    }
    let Input::Qcow2(image) = input else {
        return Err(fail("Source lacks bitmap support"));
    };
    if output_format != "qcow2" || output_version.is_some_and(|v| v < 3) {
        let driver = if output_format == "qcow2" {
            "qcow2"
        } else {
            "raw"
        };
        return Err(fail(&format!(
            "Format driver '{driver}' does not support bitmaps"
        )));
    }
    let listed = image.bitmaps();
    // qemu-img meets the bitmaps newest first.
    for b in listed.iter().rev().filter(|b| !b.consistent()) {
        if !skip_broken {
            return Err(fail(&format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            )));
        }
        eprintln!(
            "qcow2-tool: warning: Skipping inconsistent bitmap '{}'",
            b.name
        );
    }
    Ok(Some(
        listed
            .into_iter()
            .filter(|b| b.consistent())
            .map(|b| b.name)
            .collect(),
    ))
}

/// Adds each bitmap to the converted image with its granularity and state, and its bits.
pub fn copy(source: &Input, names: &[String], dst: &Path) -> Result<(), Failure> {
    let fail = |m: String| Failure::new(1, m);
    let Input::Qcow2(source) = source else {
        return Ok(());
    };
    if names.is_empty() {
        return Ok(());
    }
    let target = Image::open(
        dst,
        &crate::source::with_policy(dst, &OpenOptions::read_write()),
    )
    .map_err(|e| fail(format!("Could not open '{}': {e}", dst.display())))?;
    let listed = source.bitmaps();
    for name in names {
        let Some(b) = listed.iter().find(|b| &b.name == name) else {
            continue;
        };
        let copied = target
            .add_bitmap(name, b.granularity, !b.enabled)
            .and_then(|()| target.merge_bitmap(name, name, Some(source)));
        copied.map_err(|e| fail(format!("Failed to populate bitmap {name}: {e}")))?;
    }
    target.close().map_err(|e| fail(e.to_string()))
}
