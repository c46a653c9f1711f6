//! A small positional encoding for journal payloads: integers, byte strings, fixed arrays.
//! Every read is bounds-checked, so a corrupt payload is an error, never a panic.

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
}

/// A path or name from the bytes a Unix file name is made of.
pub fn os_str(bytes: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes).to_os_string()
}

pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }
    pub fn array48(&mut self) -> Option<[u8; 48]> {
        self.bytes()?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_short_input_is_none() {
        let w = Writer::default().u64(7).bytes(b"abc").bytes(&[9u8; 48]);
        let mut r = Reader(&w.0);
        assert_eq!(r.u64(), Some(7));
        assert_eq!(r.bytes(), Some(&b"abc"[..]));
        assert_eq!(r.array48(), Some([9u8; 48]));
        assert_eq!(r.u64(), None);
        assert_eq!(Reader(&w.0[..10]).bytes(), None);
    }
}
