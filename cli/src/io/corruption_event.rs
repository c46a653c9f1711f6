//! QEMU's corruption-event line, `qcow2: Marking image as corrupt: ...`, for an invalid L2
//! entry a guest read or write met on a writable image (the engine marks the image corrupt then,
//! as QEMU does). The test suites compare QEMU's exact text, so the engine's error (structure
//! `L2 entry N` at the entry's offset, and its reason) is restated in QEMU's words; other
//! corruptions keep the engine's reason.

use qcow2::{Error, Image};

use crate::source::{Guest, Region};

/// QEMU's description of the corruption `e`, when it is one QEMU words its own way.
fn qemu_reason(image: &Image, e: &Error, reading: bool) -> Option<String> {
    let Error::Corrupt {
        structure,
        offset,
        reason,
        ..
    } = e
    else {
        return None;
    };
    let index: u64 = structure.strip_prefix("L2 entry ")?.parse().ok()?;
    let entry_size = if image.header().extended_l2() { 16 } else { 8 };
    let l2 = offset.checked_sub(index * entry_size)?;
    // C's `%#x` prints zero without the prefix.
    let index = if index == 0 {
        "0".to_string()
    } else {
        format!("{index:#x}")
    };
    if reason.starts_with("invalid subcluster bitmap") {
        // QEMU's read path words it with two spaces, its write path with one.
        let gap = if reading { "  " } else { " " };
        return Some(format!(
            "Invalid cluster entry found{gap}(L2 offset: {l2:#x}, L2 index: {index})"
        ));
    }
    let host = reason
        .strip_prefix("data cluster offset ")?
        .strip_suffix(" is not cluster aligned")?;
    Some(format!(
        "Cluster allocation offset {host} unaligned (L2 offset: {l2:#x}, L2 index: {index})"
    ))
}

/// Prints the event line when `e` has just made `image` corrupt (it was not before).
pub fn report(image: &Image, e: &Error, was_corrupt: bool, reading: bool) {
    if was_corrupt || !image.header().is_corrupt() {
        return;
    }
    let reason = match (qemu_reason(image, e, reading), e) {
        (Some(text), _) => text,
        (None, Error::Corrupt { reason, .. }) => reason.clone(),
        (None, other) => other.to_string(),
    };
    errln!(
        "qcow2: Marking image as corrupt: {reason}; further corruption events will be suppressed"
    );
}

/// A qcow2 image read by `io`: a read that finds the image corrupt reports it as QEMU does.
pub struct Reporting<'a>(pub &'a Image);

impl Guest for Reporting<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let was_corrupt = self.0.header().is_corrupt();
        self.0.read_at(buf, offset).map_err(|e| {
            report(self.0, &e, was_corrupt, true);
            crate::io::errno_text(&e)
        })
    }
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        Guest::regions(self.0, offset, len)
    }
}
