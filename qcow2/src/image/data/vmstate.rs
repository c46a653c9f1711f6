//! VM state: the bytes a VM snapshot saves beside the disk. QEMU stores them like guest data
//! in the active L1 table, from the first L1 entry past those the disk needs
//! (`l1_vm_state_index`), so an internal snapshot taken afterwards keeps them with the disk.
//! Writes there are ordinary allocating writes (same ordering, same overlap guard), but they
//! lie past the virtual size: they grow the L1 table as needed and leave dirty bitmaps alone,
//! which track the disk only.

use crate::error::{Error, Result};
use crate::format::limits::MAX_L1_ENTRIES;
use crate::image::{Image, Meta};

impl Image {
    /// The guest offset where VM state starts: past the last L1 entry the disk uses.
    pub fn vm_state_offset(&self) -> u64 {
        vm_state_start(&self.meta())
    }

    /// Writes `buf` at byte `pos` of the VM state area (`qemu-io write -b`).
    pub fn write_vm_state(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.require_writable()?;
        let _pass = self.write_pass()?;
        let mut m = self.meta_mut();
        let offset = self.vm_state_range(&m, pos, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let last_entry = (offset + buf.len() as u64 - 1) >> m.header.l1_shift();
        let needed = grown_l1_entries(m.l1.len() as u64, last_entry + 1);
        if needed > MAX_L1_ENTRIES {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!(
                    "VM state up to byte {} needs an L1 table larger than 32 MiB",
                    pos + buf.len() as u64
                ),
            });
        }
        if needed > m.l1.len() as u64 {
            self.grow_l1(&mut m, needed)?;
        }
        let result = self.write_clusters_at(&mut m, buf, offset);
        if let Err(e) = &result {
            if e.marks_image_corrupt() {
                self.mark_corrupt(&mut m);
            }
        }
        result
    }

    /// Reads `buf` from byte `pos` of the VM state area (`qemu-io read -b`); what was never
    /// written reads as zeros (or as the backing file there, as in QEMU).
    pub fn read_vm_state(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let m = self.meta();
        let offset = self.vm_state_range(&m, pos, buf.len() as u64)?;
        self.read_layer(&m, m.active(), buf, offset)
    }

    /// The guest offset of VM state byte `pos`, refusing requests that would end past what a
    /// signed 64-bit offset holds (QEMU's limit).
    fn vm_state_range(&self, m: &Meta, pos: u64, len: u64) -> Result<u64> {
        vm_state_start(m)
            .checked_add(pos)
            .filter(|start| {
                start
                    .checked_add(len)
                    .is_some_and(|end| end <= i64::MAX as u64)
            })
            .ok_or_else(|| Error::OutOfBounds {
                image: self.name.clone(),
                offset: pos,
                len,
                size: (i64::MAX as u64).saturating_sub(vm_state_start(m)),
            })
    }
}

fn vm_state_start(m: &Meta) -> u64 {
    m.header.l1_entries_for(m.header.size) << m.header.l1_shift()
}

/// The L1 size QEMU grows a table of `current` entries to when a write needs `min` entries:
/// by half again at each step, so a growing VM state moves the table seldom.
fn grown_l1_entries(current: u64, min: u64) -> u64 {
    let mut entries = current.max(1);
    while entries < min {
        entries = (entries * 3).div_ceil(2);
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::grown_l1_entries;

    #[test]
    fn l1_grows_by_half_again_as_qemu_grows_it() {
        assert_eq!(grown_l1_entries(0, 1), 1);
        assert_eq!(grown_l1_entries(1, 2), 2);
        assert_eq!(grown_l1_entries(2, 4), 5);
        assert_eq!(grown_l1_entries(128, 160), 192);
        assert_eq!(grown_l1_entries(7, 3), 7);
    }
}
