//! A qcow2 image as the file of another (`driver=qcow2,file.driver=qcow2,...`): the outer
//! image's bytes are the inner image's guest bytes, so the inner image's virtual size is the
//! outer file's fixed length.

use std::io;

use qcow2::{Image, Storage};

/// The guest disk of an image, read and written as a store.
pub struct ImageStorage(pub Image);

impl Storage for ImageStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.0.size();
        if offset >= size {
            return Ok(0);
        }
        let n = usize::try_from(size - offset).map_or(buf.len(), |left| left.min(buf.len()));
        self.0.read_at(&mut buf[..n], offset)?;
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.0.write_at(buf, offset)?)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.0.flush()?)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }

    /// A guest disk does not change size under its user: shrinking keeps the bytes (nothing
    /// reads past what the outer image uses), growing past the virtual size fails.
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.0.size() {
            return Err(io::Error::other(format!(
                "the inner image's virtual size {} cannot grow to {len}",
                self.0.size()
            )));
        }
        Ok(())
    }
}
