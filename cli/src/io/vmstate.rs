//! `read -b` and `write -b` of `io`: requests to the VM state area past the guest disk
//! (`qcow2::Image::read_vm_state`), which only qcow2 has. qemu-io wants them sector-aligned and
//! leaves them unchecked against the disk size.

use crate::io::errno_text;
use crate::io::open::Target;

const SECTOR: u64 = 512;

/// Whether `offset` and `len` are whole sectors; prints qemu-io's complaint when not.
pub fn aligned(offset: u64, len: u64) -> bool {
    if offset % SECTOR != 0 {
        outln!("{offset} is not a sector-aligned value for 'offset'");
        return false;
    }
    if len % SECTOR != 0 {
        outln!("{len} is not a sector-aligned value for 'count'");
        return false;
    }
    true
}

/// Reads VM state; the error is the `strerror` text qemu-io prints.
pub fn read(target: &Target, buf: &mut [u8], offset: u64) -> Result<(), String> {
    match target {
        Target::Qcow2(image) => image.read_vm_state(buf, offset).map_err(|e| errno_text(&e)),
        Target::Raw(_) => Err(NO_VM_STATE.into()),
    }
}

/// Writes VM state; the error is the `strerror` text qemu-io prints.
pub fn write(target: &Target, buf: &[u8], offset: u64) -> Result<(), String> {
    match target {
        Target::Qcow2(image) => image
            .write_vm_state(buf, offset)
            .map_err(|e| errno_text(&e)),
        Target::Raw(_) => Err(NO_VM_STATE.into()),
    }
}

/// A raw image has nowhere to keep VM state (QEMU's ENOTSUP).
const NO_VM_STATE: &str = "Operation not supported";
