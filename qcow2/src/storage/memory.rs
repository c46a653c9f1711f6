//! The in-memory backend: a growable byte vector behind a lock, for tests and the fuzzer.

use std::io;
use std::sync::RwLock;

use super::Storage;

/// A store held in memory.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.read_lock().clone()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves plain bytes behind; they are still usable.
        self.bytes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|end| usize::try_from(end).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(super::read_from_bytes(&self.read_lock(), buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len())?;
        let mut bytes = self.write_lock();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.read_lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length out of range"))?;
        self.write_lock().resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    #[test]
    fn reads_past_the_end_are_short_and_zero_filled_on_request() {
        let s = MemoryStorage::from_bytes(vec![1, 2, 3]);
        let mut buf = [9u8; 5];
        assert_eq!(s.read_at(&mut buf, 1).unwrap(), 2);
        s.read_zero_filled_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        assert!(s.read_exact_at(&mut buf, 0).is_err());
        s.write_at(&[7], 6).unwrap();
        assert_eq!(s.to_bytes(), vec![1, 2, 3, 0, 0, 0, 7]);
    }
}
