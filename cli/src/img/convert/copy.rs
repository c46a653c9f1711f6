//! The copy loop of `convert`, for new and existing targets: the disk is cut into chunks that
//! worker threads read, scan for zero blocks and compress in parallel. Writes that allocate
//! host space (qcow2 output without `-W`) are made in guest order, so the output's layout is
//! the one qemu-img gives; every other write goes out as soon as its chunk is ready.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use qcow2::storage::Storage;
use qcow2::FileStorage;

use crate::progress::{Progress, SKIP_ONE};
use crate::source::is_zero;

/// Bytes read per request.
pub const CHUNK: usize = 2 << 20;
/// Buffer alignment.
const PAGE: usize = 4096;
/// Guest bytes mapped per `map` call, so huge images need little memory.
pub const MAP_WINDOW: u64 = 1 << 30;
/// qemu-img's limit for `-m`.
pub const MAX_WORKERS: u64 = 16;

/// The worker count without `-m`: the core count, but at least 4. On the 2-core VM with other
/// work running, 4 workers took 0.39 s where 2 took 1.08 s and qemu-img 0.51 s (qcow2 to
/// qcow2, medians of 5; benches/README.md): workers blocked in the kernel (a source read, the
/// file's write lock) leave the cores to the others.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(4, MAX_WORKERS as usize)
}

/// A piece of the disk for one worker: guest bytes to copy (`data`, at most [`CHUNK`]) or a
/// range the target must read as zeros (any length; nothing is read for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub pos: u64,
    pub len: u64,
    pub data: bool,
}

/// Cuts the data ranges `[start, end)` of `[from, to)` into chunks; the gaps between them
/// become zero chunks when `zero_gaps` (a target that may hold old bytes there).
pub fn cut(data: &[(u64, u64)], from: u64, to: u64, zero_gaps: bool) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut at = from;
    let gap = |chunks: &mut Vec<Chunk>, start: u64, end: u64| {
        if zero_gaps && start < end {
            chunks.push(Chunk {
                pos: start,
                len: end - start,
                data: false,
            });
        }
    };
    for &(start, end) in data {
        gap(&mut chunks, at, start);
        let mut pos = start;
        while pos < end {
            let n = (CHUNK as u64).min(end - pos);
            chunks.push(Chunk {
                pos,
                len: n,
                data: true,
            });
            pos += n;
        }
        at = at.max(end);
    }
    gap(&mut chunks, at, to);
    chunks
}

/// Runs of blocks alike in `buf`: `(start, end, zero)`, blocks of `block` bytes (the last one
/// may be short); one data run without a block size.
pub fn runs(buf: &[u8], block: Option<usize>) -> Vec<(usize, usize, bool)> {
    let Some(block) = block else {
        return vec![(0, buf.len(), false)];
    };
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + block).min(buf.len());
        let zero = is_zero(&buf[pos..end]);
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => out.push((pos, end, zero)),
        }
        pos = end;
    }
    out
}

/// How the workers run.
pub struct Workers {
    pub count: usize,
    /// Guest bytes whose chunks are listed (block status) before they are copied.
    pub window: u64,
    /// Chunks are committed in list order (see [`run`]).
    pub ordered: bool,
    pub progress: bool,
}

/// Runs `process` over the chunks `chunks` lists for each window of the disk, on
/// `workers.count` threads with page-aligned buffers of [`CHUNK`] bytes, reporting progress.
/// `process` gets a function that waits until every earlier chunk is done, when ordered (what
/// comes after it runs in chunk order); every chunk taken is marked done, failed or not, so no
/// worker waits forever.
pub fn run(
    size: u64,
    workers: &Workers,
    chunks: impl Fn(u64, u64) -> Result<Vec<Chunk>, String>,
    process: impl Fn(Chunk, &mut [u8], &dyn Fn()) -> Result<(), String> + Sync,
) -> Result<(), String> {
    // The progress shown and the data bytes copied so far.
    let progress = Mutex::new((Progress::new(workers.progress, SKIP_ONE), 0u64));
    // qemu-img measures progress in data chunks copied of all there are, so a first pass
    // counts them; zero ranges take no time and are not counted.
    let total = if workers.progress {
        data_bytes(size, &chunks)?
    } else {
        0
    };
    let mut window = 0;
    while window < size {
        let window_len = workers.window.min(size - window);
        let chunks = chunks(window, window_len)?;
        let next = AtomicUsize::new(0);
        let error = Mutex::new(None);
        // Chunks done in order so far, and a wake-up for workers waiting their turn.
        let turn = (Mutex::new(0usize), Condvar::new());
        std::thread::scope(|scope| {
            for _ in 0..workers.count.min(chunks.len()) {
                scope.spawn(|| {
                    // Page-aligned buffers copy to and from the page cache fastest.
                    let mut backing = vec![0u8; CHUNK + PAGE];
                    let skew = backing.as_ptr().align_offset(PAGE).min(PAGE);
                    let buf = &mut backing[skew..skew + CHUNK];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&chunk) = chunks.get(i) else {
                            break;
                        };
                        let wait = || {
                            if workers.ordered {
                                let mut done = lock(&turn.0);
                                while *done < i {
                                    done = turn.1.wait(done).unwrap_or_else(|e| e.into_inner());
                                }
                            }
                        };
                        let result = process(chunk, buf, &wait);
                        if workers.ordered {
                            // Done in order: wait for the earlier ones if `process` did not.
                            wait();
                            *lock(&turn.0) = i + 1;
                            turn.1.notify_all();
                        }
                        if let Err(e) = result {
                            lock(&error).get_or_insert(e);
                            // Stop every worker.
                            next.store(chunks.len(), Ordering::Relaxed);
                            return;
                        }
                        if chunk.data {
                            // Counted under the lock, so the figures printed only grow.
                            let (progress, done) = &mut *lock(&progress);
                            *done += chunk.len;
                            progress.report(*done, total);
                        }
                    }
                });
            }
        });
        if let Some(e) = lock(&error).take() {
            return Err(e);
        }
        window += window_len;
    }
    let (progress, _) = &mut *lock(&progress);
    progress.report(total, total);
    progress.finish();
    Ok(())
}

/// The bytes of data chunks `chunks` lists for the whole disk.
fn data_bytes(
    size: u64,
    chunks: &impl Fn(u64, u64) -> Result<Vec<Chunk>, String>,
) -> Result<u64, String> {
    let mut total = 0;
    let mut window = 0;
    while window < size {
        let window_len = MAP_WINDOW.min(size - window);
        total += chunks(window, window_len)?
            .iter()
            .filter(|c| c.data)
            .map(|c| c.len)
            .sum::<u64>();
        window += window_len;
    }
    Ok(total)
}

/// Locks a mutex, ignoring poisoning (a panicking worker already failed the command).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A raw output file.
pub struct RawTarget<'a> {
    pub storage: &'a FileStorage,
    /// The file reads as zeros wherever nothing is written (new, or `--target-is-zero`).
    pub fresh: bool,
}

impl RawTarget<'_> {
    pub fn file(&self) -> &File {
        self.storage.file()
    }

    pub fn write(&self, data: &[u8], at: u64) -> std::io::Result<()> {
        qcow2::storage::Storage::write_at(self.storage, data, at)
    }

    /// Makes `[at, at + len)` read as zeros: nothing to do in a fresh file; elsewhere the parts
    /// that hold data become holes (zeros are written where the file cannot punch them), and
    /// holes are left as they are.
    pub fn zero(&self, at: u64, len: u64) -> std::io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        let end = at + len;
        let mut pos = at;
        while pos < end {
            // A file that cannot tell is all data.
            let (hole, n) = self
                .storage
                .hole_at(pos, end - pos)?
                .map_or((false, end - pos), |(hole, n)| (hole, n.max(1)));
            if !hole {
                punch(self.storage, pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }
}

/// Makes `[at, at + len)` of `storage` read as zeros without changing its size: a punched
/// hole, or written zeros where the file system (or device) cannot punch.
fn punch(storage: &FileStorage, at: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use qcow2::storage::Storage;
    if let (Ok(offset), Ok(n)) = (i64::try_from(at), i64::try_from(len)) {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(storage.file(), flags, offset, n).is_ok() {
            return Ok(());
        }
    }
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        storage.write_at(&zeros[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Makes `[at, at + len)` of an existing qcow2 image read as zeros, leaving alone the ranges
/// that are zero clusters of the image itself already.
pub fn zero_qcow2(image: &qcow2::Image, at: u64, len: u64) -> qcow2::Result<()> {
    for extent in image.map(at, len)? {
        // Only the image's own zero clusters are left alone: an unallocated range is made a
        // zero cluster too, as qemu-img makes it (it may read through to a backing file, and
        // its `map` then shows the range allocated as zeros, as qemu-img's does).
        if !(extent.depth == 0 && extent.present() && extent.zero()) {
            image.write_zeroes(extent.start, extent.length, false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_ranges_become_chunks_and_gaps_zero_chunks() {
        let chunk = |pos, len, data| Chunk { pos, len, data };
        let big = CHUNK as u64;
        assert_eq!(
            cut(&[(10, 20), (20 + big, 20 + 3 * big)], 0, 100 * big, true),
            [
                chunk(0, 10, false),
                chunk(10, 10, true),
                chunk(20, big, false),
                chunk(20 + big, big, true),
                chunk(20 + 2 * big, big, true),
                chunk(20 + 3 * big, 97 * big - 20, false),
            ]
        );
        assert_eq!(cut(&[(0, 5)], 0, 9, false), [chunk(0, 5, true)]);
    }

    #[test]
    fn runs_merge_blocks_alike() {
        let mut buf = vec![0u8; 10];
        buf[4] = 1;
        assert_eq!(
            runs(&buf, Some(2)),
            [(0, 4, true), (4, 6, false), (6, 10, true)]
        );
        assert_eq!(
            runs(&buf, Some(4)),
            [(0, 4, true), (4, 8, false), (8, 10, true)]
        );
        assert_eq!(runs(&buf, None), [(0, 10, false)]);
    }

    #[test]
    fn zeroing_an_existing_raw_file_punches_data_and_keeps_its_size() {
        let dir = std::env::temp_dir().join(format!("convert-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.raw");
        let storage = FileStorage::create_new(&path).unwrap();
        let file = storage.file();
        file.write_all_at(&[7u8; 3 << 20], 0).unwrap();
        file.set_len(8 << 20).unwrap();
        let target = RawTarget {
            storage: &storage,
            fresh: false,
        };
        target.zero(4096 + 3, 2 << 20).unwrap();
        let mut back = vec![1u8; 8 << 20];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4099].iter().all(|&b| b == 7));
        assert!(back[4099..4099 + (2 << 20)].iter().all(|&b| b == 0));
        assert!(back[4099 + (2 << 20)..3 << 20].iter().all(|&b| b == 7));
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
