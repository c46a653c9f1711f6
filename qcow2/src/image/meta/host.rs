//! Positioned I/O on the image file with errors that say what was being done.

use crate::error::{Error, Result};
use crate::storage::{Storage, StorageExt};

/// The image file and its name, for I/O with context.
#[derive(Clone, Copy)]
pub(crate) struct Host<'a> {
    pub storage: &'a dyn Storage,
    pub name: &'a str,
}

impl Host<'_> {
    pub(crate) fn read_zero_filled(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.storage
            .read_zero_filled_at(buf, offset)
            .map_err(|e| Error::io(self.name, format!("reading the {what} at {offset:#x}"), e))
    }

    pub(crate) fn write(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(self.name, format!("writing the {what} at {offset:#x}"), e))
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io(self.name, format!("zeroing the {what} at {offset:#x}"), e))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(self.name, "flushing the image file", e))
    }

    /// Writes and makes durable: the publishing step of every new table.
    pub(crate) fn write_sync(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.write(buf, offset, what)?;
        self.sync()
    }
}
