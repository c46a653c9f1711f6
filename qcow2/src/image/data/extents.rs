//! The extent map of a range, computed one window at a time: a caller walks a 1 PiB sparse disk
//! without the engine holding a list of everything. The sequence equals what [`Image::map`]
//! returns for the whole range: extents that meet at a window boundary with the same meaning are
//! merged before they are handed out.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::image::map::Extent;
use crate::image::Image;

/// Guest bytes mapped per window: 16384 clusters of 64 KiB, so a window's list stays small.
const WINDOW: u64 = 1 << 30;

/// An iterator over the extents of a guest range (see [`Image::extents`]).
#[derive(Debug)]
pub struct Extents<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    ready: VecDeque<Extent>,
    /// The last extent of the window mapped last: the next window may continue it.
    carry: Option<Extent>,
    /// A range outside the disk: handed out once, then nothing.
    refused: Option<Error>,
}

impl Image {
    /// The extents of `[offset, offset + len)`, like [`Image::map`], mapped a window at a time
    /// as the iterator advances. A range outside the disk yields one error.
    pub fn extents(&self, offset: u64, len: u64) -> Extents<'_> {
        Extents {
            image: self,
            pos: offset,
            end: offset.saturating_add(len),
            ready: VecDeque::new(),
            carry: None,
            refused: self.check_bounds(offset, len, self.size()).err(),
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if let Some(e) = self.refused.take() {
            self.pos = self.end;
            return Some(Err(e));
        }
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(Ok(e));
            }
            if self.pos >= self.end {
                return self.carry.take().map(Ok);
            }
            let len = WINDOW.min(self.end - self.pos);
            let window = match self.image.map(self.pos, len) {
                Ok(w) => w,
                Err(e) => {
                    self.pos = self.end;
                    self.carry = None;
                    return Some(Err(e));
                }
            };
            self.pos += len;
            for e in window {
                match &mut self.carry {
                    Some(c) if c.merges_with(&e) => c.length += e.length,
                    _ => {
                        if let Some(done) = self.carry.replace(e) {
                            self.ready.push_back(done);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, Image, MemoryStorage};

    #[test]
    fn windows_join_into_what_map_returns() {
        let options = CreateOptions {
            size: 3 << 30,
            ..CreateOptions::default()
        };
        let img = Image::create_in(Box::new(MemoryStorage::new()), "mem", &options).unwrap();
        // Data that runs across the first window boundary, and a zeroed range across the second.
        img.write_at(&vec![1u8; 256 << 10], (1 << 30) - (128 << 10))
            .unwrap();
        img.write_at(&vec![2u8; 64 << 10], (2 << 30) - (64 << 10))
            .unwrap();
        img.write_zeroes((2 << 30) - (64 << 10), 128 << 10, false)
            .unwrap();
        let whole = img.map(0, img.size()).unwrap();
        let walked: Vec<_> = img.extents(0, img.size()).map(Result::unwrap).collect();
        assert_eq!(walked, whole);
        assert!(walked.len() >= 4, "{walked:?}");
        let part: Vec<_> = img.extents(1 << 20, 1 << 30).map(Result::unwrap).collect();
        assert_eq!(part, img.map(1 << 20, 1 << 30).unwrap());
        let mut outside = img.extents(img.size() - 1, 2);
        assert!(outside.next().unwrap().is_err());
        assert!(outside.next().is_none());
    }
}
