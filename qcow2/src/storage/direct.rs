//! Direct I/O: reads and writes that bypass the host page cache (`O_DIRECT`, QEMU's
//! `cache.direct=on`, the `none` and `directsync` cache modes). The kernel then wants every
//! request aligned in memory, in offset and in length, to the device's logical block (512 bytes
//! or 4 KiB). An aligned request passes as it is; any other goes through an aligned bounce
//! buffer, and a block it covers only in part is read, changed and written back whole.
//!
//! The block size is probed as QEMU probes it: the smallest read of the file's first block the
//! kernel accepts. A probe can pass where the file has no data yet (the kernel checks alignment
//! only where it reads the device), so a request the kernel refuses as unaligned makes the
//! alignment 4 KiB, which every device accepts, and runs again.
//!
//! Two writes that share a block (never the same bytes: the engine never overlaps concurrent
//! writes, and a guest that does gets no promise) would each write back the other's old bytes,
//! so a read-modify-write holds the lock of its 4 KiB region's stripe. A block a write covers
//! whole needs no lock: any other write touching it overlaps its bytes.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The largest alignment direct I/O needs (4 KiB logical blocks); bounce buffers keep it.
pub const DIRECT_ALIGN: usize = 4096;
const MAX_ALIGN: u64 = DIRECT_ALIGN as u64;
/// The alignments tried, smallest first.
const PROBED: [u64; 4] = [512, 1024, 2048, 4096];
/// The most a bounce buffer holds: longer unaligned requests go through it in parts.
const BOUNCE_MAX: usize = 1 << 20;
/// Locks for read-modify-write, by 4 KiB region modulo their count.
const STRIPES: usize = 64;

thread_local! {
    /// Each thread's bounce buffer, kept between requests (allocating and faulting in a fresh
    /// one per request would cost more than the copy).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Direct I/O on a file opened with `O_DIRECT`.
#[derive(Debug)]
pub(crate) struct DirectIo {
    /// The block every request is aligned to (a power of two, 512 to 4096).
    align: AtomicU64,
    stripes: Vec<Mutex<()>>,
}

fn is_unaligned_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Runs `f` on a `DIRECT_ALIGN`-aligned slice of `len` bytes of this thread's bounce buffer.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| {
        let mut vec = cell.borrow_mut();
        if vec.len() < len + DIRECT_ALIGN {
            vec.resize(len + DIRECT_ALIGN, 0);
        }
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        f(&mut vec[start..start + len])
    })
}

/// Reads the aligned range `buf` covers at `offset` (aligned), as far as the file goes; returns
/// how many bytes were read. A read that ends short of a block boundary has met the end of the
/// file (the next read would be unaligned).
fn read_aligned(file: &File, buf: &mut [u8], offset: u64, align: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if n as u64 % align != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads one block for a read-modify-write; what lies past the end of the file reads as zeros.
fn read_block(file: &File, block: &mut [u8], offset: u64, align: u64) -> io::Result<()> {
    let n = read_aligned(file, block, offset, align)?;
    block[n..].fill(0);
    Ok(())
}

impl DirectIo {
    /// Direct I/O on `file` (open with `O_DIRECT`), aligned as its device asks.
    pub fn probe(file: &File) -> DirectIo {
        let align = PROBED
            .into_iter()
            .find(|&align| {
                with_bounce(align as usize, |block| match file.read_at(block, 0) {
                    Err(e) => !is_unaligned_refusal(&e),
                    Ok(_) => true,
                })
            })
            .unwrap_or(MAX_ALIGN);
        DirectIo {
            align: AtomicU64::new(align),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The block requests are aligned to now.
    pub fn align(&self) -> u64 {
        self.align.load(Ordering::Relaxed)
    }

    /// Runs `op` with the current alignment; when the kernel refuses it as unaligned, runs it
    /// again with the largest (a refused request changed nothing).
    fn aligned<R>(&self, mut op: impl FnMut(u64) -> io::Result<R>) -> io::Result<R> {
        let align = self.align();
        match op(align) {
            Err(e) if is_unaligned_refusal(&e) && align < MAX_ALIGN => {
                self.align.store(MAX_ALIGN, Ordering::Relaxed);
                op(MAX_ALIGN)
            }
            other => other,
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; short only at the end of the file.
    pub fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.aligned(|align| read_with(file, buf, offset, align))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.aligned(|align| self.write_with(file, buf, offset, align))
    }

    fn write_with(&self, file: &File, buf: &[u8], offset: u64, align: u64) -> io::Result<()> {
        if is_aligned(buf, offset, align) {
            return file.write_all_at(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let block = at - at % align;
            let span = ((end - block).next_multiple_of(align)).min(BOUNCE_MAX as u64) as usize;
            let stop = end.min(block + span as u64);
            let (head, tail) = (block < at, stop % align != 0);
            let last = block + span as u64 - align;
            let _locks = self.lock_regions(head.then_some(block), tail.then_some(last));
            with_bounce(span, |bounce| -> io::Result<()> {
                let a = align as usize;
                if head {
                    read_block(file, &mut bounce[..a], block, align)?;
                }
                if tail && (!head || last != block) {
                    read_block(file, &mut bounce[span - a..], last, align)?;
                }
                let skip = (at - block) as usize;
                let from = (at - offset) as usize;
                let n = (stop - at) as usize;
                bounce[skip..skip + n].copy_from_slice(&buf[from..from + n]);
                file.write_all_at(bounce, block)
            })?;
            at = stop;
        }
        Ok(())
    }

    /// Locks the stripes of the 4 KiB regions of the blocks given, in stripe order (so two
    /// writers never wait on each other crosswise). Regions, not blocks: two writers that see
    /// different alignments while it changes still meet on the same lock.
    fn lock_regions(&self, a: Option<u64>, b: Option<u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut ids: Vec<usize> = [a, b]
            .into_iter()
            .flatten()
            .map(|block| (block / MAX_ALIGN) as usize % STRIPES)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

fn is_aligned(buf: &[u8], offset: u64, align: u64) -> bool {
    offset % align == 0
        && buf.len() as u64 % align == 0
        && buf.as_ptr().align_offset(align as usize) == 0
}

fn read_with(file: &File, buf: &mut [u8], offset: u64, align: u64) -> io::Result<usize> {
    if is_aligned(buf, offset, align) {
        return read_aligned(file, buf, offset, align);
    }
    let end = offset + buf.len() as u64;
    let mut at = offset;
    while at < end {
        let block = at - at % align;
        let span = ((end - block).next_multiple_of(align)).min(BOUNCE_MAX as u64) as usize;
        let want = (end.min(block + span as u64) - at) as usize;
        let skip = (at - block) as usize;
        let got = with_bounce(span, |bounce| -> io::Result<usize> {
            let n = read_aligned(file, bounce, block, align)?;
            let got = n.saturating_sub(skip).min(want);
            let from = (at - offset) as usize;
            buf[from..from + got].copy_from_slice(&bounce[skip..skip + got]);
            Ok(got)
        })?;
        at += got as u64;
        if got < want {
            break;
        }
    }
    Ok((at - offset) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, Storage};
    use std::path::PathBuf;

    /// A new file open for direct I/O, or `None` where the temp dir's file system has none.
    fn direct_file(name: &str) -> Option<(PathBuf, FileStorage)> {
        let path = std::env::temp_dir().join(format!("qcow2-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut store = FileStorage::create_new(&path).unwrap();
        match store.set_direct_io(true) {
            Ok(()) => Some((path, store)),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                eprintln!("skipped: {e}");
                let _ = std::fs::remove_file(&path);
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Random reads and writes of any offset, length and buffer alignment read back what a
    /// byte model holds, including across the end of the file.
    #[test]
    fn unaligned_requests_match_a_byte_model() {
        let Some((path, store)) = direct_file("model") else {
            return;
        };
        assert!(store.is_direct_io());
        let align = store.direct_align().unwrap();
        assert!(PROBED.contains(&align), "{align}");
        // The page cache is really bypassed: the kernel refuses an unaligned request.
        let refused = store.file().write_at(&[1u8; 10], 1).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EINVAL));
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..400u64 {
            let offset = next(&mut seed) % (3 << 20);
            let len = match next(&mut seed) % 4 {
                0 => next(&mut seed) % 700 + 1,
                1 => (next(&mut seed) % 4 + 1) * 4096,
                2 => next(&mut seed) % (BOUNCE_MAX as u64 * 2) + 1,
                _ => next(&mut seed) % 20_000 + 1,
            } as usize;
            // A buffer starting at an arbitrary address, and sometimes at an aligned one.
            let shift = (next(&mut seed) % 2) as usize * (next(&mut seed) % 64) as usize;
            if round % 3 == 0 {
                let mut space = vec![0u8; len + shift];
                let data = &mut space[shift..];
                data.fill((round % 250) as u8 + 1);
                store.write_at(data, offset).unwrap();
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(data);
            } else {
                let mut space = vec![0xa5u8; len + shift];
                let got = store.read_at(&mut space[shift..], offset).unwrap();
                let want = model.len().saturating_sub(offset as usize).min(len);
                // The file may be longer than the model: a write ending inside a block past
                // the end grows the file to that block's end, with zeros.
                assert!(
                    got >= want,
                    "round {round}: read {got} of {len} at {offset}"
                );
                let data = &space[shift..shift + want];
                assert!(
                    data == &model[offset as usize..offset as usize + want],
                    "round {round}: {len} bytes at {offset}"
                );
                assert!(space[shift + want..shift + got].iter().all(|&b| b == 0));
            }
        }
        let len = store.len().unwrap();
        assert!(len >= model.len() as u64 && len <= model.len().next_multiple_of(4096) as u64);
        std::fs::remove_file(path).unwrap();
    }

    /// A request the kernel refuses as unaligned runs again at 4 KiB, which then sticks.
    #[test]
    fn an_unaligned_refusal_raises_the_alignment_to_4k() {
        let io = DirectIo {
            align: AtomicU64::new(512),
            stripes: Vec::new(),
        };
        let mut tried = Vec::new();
        let got = io.aligned(|align| {
            tried.push(align);
            if align < MAX_ALIGN {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(align)
            }
        });
        assert_eq!(got.unwrap(), MAX_ALIGN);
        assert_eq!(tried, [512, MAX_ALIGN]);
        assert_eq!(io.align(), MAX_ALIGN);
        // Other errors are not retried.
        let io = DirectIo {
            align: AtomicU64::new(512),
            stripes: Vec::new(),
        };
        let err = io.aligned(|_| -> io::Result<()> { Err(io::ErrorKind::Other.into()) });
        assert!(err.is_err());
        assert_eq!(io.align(), 512);
    }

    /// Writers that share blocks but never bytes leave every byte as its writer wrote it: the
    /// read-modify-write of a shared block does not write back a neighbour's old bytes.
    #[test]
    fn concurrent_writes_sharing_blocks_keep_each_others_bytes() {
        let Some((path, store)) = direct_file("shared") else {
            return;
        };
        const WRITERS: u64 = 4;
        const PIECE: u64 = 300;
        const ROUNDS: u64 = 200;
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let store = &store;
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        // Piece i of round r belongs to writer i % WRITERS.
                        let at = (r * WRITERS + w) * PIECE;
                        store.write_at(&[w as u8 + 1; PIECE as usize], at).unwrap();
                    }
                });
            }
        });
        let mut all = vec![0u8; (ROUNDS * WRITERS * PIECE) as usize];
        assert_eq!(store.read_at(&mut all, 0).unwrap(), all.len());
        for (i, piece) in all.chunks(PIECE as usize).enumerate() {
            let w = i as u64 % WRITERS;
            assert!(piece.iter().all(|&b| b == w as u8 + 1), "piece {i} lost");
        }
        std::fs::remove_file(path).unwrap();
    }
}
