//! `bench`: `qemu-img bench` over the engine. Same flags, defaults, request order and summary
//! lines, so one invocation runs with both tools and the two timings compare directly.
//!
//! Requests go out in qemu-img's order: request 0 at `offset`, each next one `step` further,
//! wrapping at the virtual size (`(offset + i * step) % size` for i ≥ 1); a request that runs
//! past the end fails with EIO, as it does in qemu-img. The engine is synchronous, so the queue
//! depth is `depth` worker threads, each taking the next request index from one shared counter:
//! `-d 1` is queue depth 1. Reads run in parallel (they take `&self`); writes serialize inside
//! the engine. As in qemu-img, nothing is flushed during the run unless `--flush-interval` asks,
//! and closing the image (which flushes) happens after the clock stops.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use qcow2::storage::{Storage, StorageExt};
use qcow2::{Image, OpenOptions};

use crate::cache::CacheMode;
use crate::size::{int_arg, size_arg};
use crate::source::{format_of, io_text, open_image, CmdResult, Failure, Format};

/// Buffers start on a page boundary: unaligned buffers read measurably slower.
const BUFFER_ALIGN: usize = 4096;

/// qemu-img's `INT_MAX` limits on counts and sizes.
const INT_MAX: u64 = i32::MAX as u64;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe): none and directsync
    /// bypass the page cache (O_DIRECT), writethrough and directsync flush after every write,
    /// unsafe never syncs.
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Number of requests (75000).
    #[arg(short = 'c', long = "count", allow_hyphen_values = true)]
    count: Option<String>,
    /// Requests in flight, as worker threads (64).
    #[arg(short = 'd', long = "depth", allow_hyphen_values = true)]
    depth: Option<String>,
    /// Offset of the first request (0).
    #[arg(short = 'o', long = "offset", allow_hyphen_values = true)]
    offset: Option<String>,
    /// Bytes per request (4K).
    #[arg(short = 's', long = "buffer-size", allow_hyphen_values = true)]
    buffer_size: Option<String>,
    /// Offset increment between requests (the request size).
    #[arg(short = 'S', long = "step-size", allow_hyphen_values = true)]
    step_size: Option<String>,
    /// qemu's AIO backend (threads, native, io_uring); accepted, the engine is synchronous.
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// qemu's native AIO (needs -t none or directsync, as in qemu-img).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte written (0).
    #[arg(long = "pattern", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many requests.
    #[arg(long = "flush-interval", allow_hyphen_values = true)]
    flush_interval: Option<String>,
    /// Accepted for qemu-img compatibility: flushes never drain other workers here.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Open without taking the image locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Leave out the extra MB/s and IOPS line (the summary stays as qemu-img prints it).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    #[arg(num_args = 0..)]
    files: Vec<PathBuf>,
}

/// The workload, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Workload {
    count: u64,
    depth: u64,
    offset: u64,
    size: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    /// The cache mode (`-t`): whether the page cache is bypassed and writes are flushed.
    cache: CacheMode,
}

impl Workload {
    /// The guest offset of request `index`, as qemu-img computes it: the first request goes
    /// where `-o` says, later ones wrap at the virtual size.
    fn request_offset(&self, index: u64, image_size: u64) -> u64 {
        if index == 0 {
            return self.offset;
        }
        if image_size == 0 {
            return 0;
        }
        let at = self.offset as u128 + index as u128 * self.step as u128;
        (at % image_size as u128) as u64
    }
}

/// Checks the arguments in qemu-img's order and returns the workload.
fn workload(args: &Args) -> Result<Workload, Failure> {
    let count = match &args.count {
        Some(t) => int_arg("request count", t, 1, INT_MAX)?,
        None => 75_000,
    };
    let depth = match &args.depth {
        Some(t) => int_arg("queue depth", t, 1, INT_MAX)?,
        None => 64,
    };
    let offset = match &args.offset {
        Some(t) => size_arg("offset", t, 0, i64::MAX as u64)?,
        None => 0,
    };
    let size = match &args.buffer_size {
        Some(t) => size_arg("buffer size", t, 1, INT_MAX)?,
        None => 4096,
    };
    let step = match &args.step_size {
        Some(t) => size_arg("step size", t, 0, INT_MAX)?,
        None => 0,
    };
    let pattern = match &args.pattern {
        Some(t) => int_arg("pattern byte", t, 0, 0xff)? as u8,
        None => 0,
    };
    let flush_interval = match &args.flush_interval {
        Some(t) => int_arg("flush interval", t, 0, INT_MAX)?,
        None => 0,
    };
    let cache = match args.cache.as_deref() {
        None => CacheMode::WRITEBACK,
        Some(name) => {
            CacheMode::parse(name).ok_or_else(|| Failure::new(1, "Invalid cache mode"))?
        }
    };
    let direct = cache.direct;
    let native = args.native || args.aio.as_deref() == Some("native");
    if let Some(aio) = args.aio.as_deref() {
        if !matches!(aio, "threads" | "native" | "io_uring") {
            return Err(Failure::new(1, format!("Invalid aio option: {aio}")));
        }
    }
    if args.files.len() != 1 {
        return Err(Failure::new(
            1,
            "Expecting one image file name\nTry 'qcow2-tool bench --help' for more info",
        ));
    }
    if !args.write && flush_interval != 0 {
        return Err(Failure::new(
            1,
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval != 0 && flush_interval < depth {
        return Err(Failure::new(
            1,
            "Flush interval can't be smaller than depth",
        ));
    }
    if native && !direct {
        return Err(Failure::new(
            1,
            format!(
                "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
                args.files[0].display()
            ),
        ));
    }
    Ok(Workload {
        count,
        depth,
        offset,
        size,
        step: if step == 0 { size } else { step },
        write: args.write,
        pattern,
        flush_interval,
        cache,
    })
}

/// The opened disk: a qcow2 image or a raw file.
enum Disk {
    Qcow2(Box<Image>),
    /// Held with QEMU's image locks (the write lock when writing) for the whole run.
    Raw(qcow2::FileStorage),
}

impl Disk {
    fn open(
        path: &Path,
        format: Option<&str>,
        write: bool,
        force_share: bool,
        cache: CacheMode,
    ) -> Result<Disk, String> {
        match format_of(path, format)? {
            Format::Qcow2 => {
                let options = OpenOptions::default()
                    .writable(write)
                    .force_share(force_share)
                    .direct_io(cache.direct)
                    .skip_syncs(cache.no_flush);
                Ok(Disk::Qcow2(Box::new(open_image(path, &options)?)))
            }
            Format::Raw => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)
                    .map_err(|e| format!("Could not open '{}': {}", path.display(), io_text(&e)))?;
                let mut raw = if write {
                    crate::target::lock_for_write(file, path)
                        .map_err(|m| format!("{}: {m}", path.display()))?
                } else {
                    qcow2::FileStorage::from_file(file, false)
                };
                raw.set_direct_io(cache.direct)
                    .map_err(|e| format!("Could not open '{}': {}", path.display(), io_text(&e)))?;
                Ok(Disk::Raw(raw))
            }
        }
    }

    fn size(&self) -> Result<u64, String> {
        match self {
            Disk::Qcow2(image) => Ok(image.size()),
            Disk::Raw(raw) => raw
                .file()
                .metadata()
                .map(|m| m.len())
                .map_err(|e| io_text(&e)),
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        match self {
            Disk::Qcow2(image) => image.read_at(buf, offset).map_err(|e| errno_text(&e)),
            Disk::Raw(raw) => raw.read_exact_at(buf, offset).map_err(|e| io_text(&e)),
        }
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        match self {
            Disk::Qcow2(image) => image.write_at(buf, offset).map_err(|e| errno_text(&e)),
            Disk::Raw(raw) => raw.write_at(buf, offset).map_err(|e| io_text(&e)),
        }
    }

    fn flush(&self) -> Result<(), String> {
        match self {
            Disk::Qcow2(image) => image.flush().map_err(|e| errno_text(&e)),
            Disk::Raw(raw) => raw.file().sync_data().map_err(|e| io_text(&e)),
        }
    }

    /// Closes the disk after the run, flushing what was written (as qemu-img's `blk_unref`).
    fn close(self, wrote: bool, unsafe_cache: bool) -> Result<(), String> {
        match self {
            Disk::Qcow2(image) if wrote => image.close().map_err(|e| e.to_string()),
            Disk::Raw(raw) if wrote && !unsafe_cache => {
                raw.file().sync_data().map_err(|e| io_text(&e))
            }
            _ => Ok(()),
        }
    }
}

/// The `strerror` text qemu-img prints for a failed request.
fn errno_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::OutOfBounds { .. } => "Input/output error".into(),
        qcow2::Error::InvalidArgument { .. } => "Invalid argument".into(),
        qcow2::Error::ReadOnly { .. } => "Permission denied".into(),
        qcow2::Error::Io { source, .. } => io_text(source),
        other => other.to_string(),
    }
}

/// A `len`-byte buffer starting on a [`BUFFER_ALIGN`] boundary, carved out of a larger
/// allocation (no unsafe code): the backing vector and the start of the aligned window.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let bytes = vec![fill; len + BUFFER_ALIGN];
        let misalign = bytes.as_ptr() as usize % BUFFER_ALIGN;
        let start = (BUFFER_ALIGN - misalign) % BUFFER_ALIGN;
        AlignedBuf { bytes, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// What the workers share.
struct Shared<'a> {
    disk: &'a Disk,
    work: Workload,
    image_size: u64,
    next: AtomicU64,
    completed: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared<'_> {
    /// One worker: takes request indexes until the count is reached or a request fails.
    fn worker(&self) {
        let w = &self.work;
        let mut buf = AlignedBuf::new(w.size as usize, w.pattern);
        while !self.failed.load(Ordering::Relaxed) {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= w.count {
                break;
            }
            if let Err(e) = self.request(&mut buf, index) {
                self.failed.store(true, Ordering::Relaxed);
                let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
                break;
            }
        }
    }

    fn request(&self, buf: &mut AlignedBuf, index: u64) -> Result<(), String> {
        let w = &self.work;
        let offset = w.request_offset(index, self.image_size);
        // qemu's block layer refuses requests past the end before any driver sees them.
        if offset
            .checked_add(w.size)
            .is_none_or(|end| end > self.image_size)
        {
            return Err("Input/output error".into());
        }
        if w.write {
            self.disk.write(buf.as_slice(), offset)?;
            if w.cache.write_through() {
                self.disk.flush()?;
            }
        } else {
            self.disk.read(buf.as_mut_slice(), offset)?;
        }
        let done = self.completed.fetch_add(1, Ordering::Relaxed) + 1;
        if w.flush_interval != 0 && done % w.flush_interval == 0 {
            self.disk.flush()?;
        }
        Ok(())
    }
}

/// Runs the workload on `depth` threads and returns the elapsed time, or the first failure.
fn run_workload(disk: &Disk, work: Workload, image_size: u64) -> Result<Duration, String> {
    let shared = Shared {
        disk,
        work,
        image_size,
        next: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // More workers than requests would only idle.
    let threads = work.depth.min(work.count) as usize;
    let start_line = Barrier::new(threads + 1);
    let elapsed = std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                start_line.wait();
                shared.worker();
            });
        }
        // Every worker exists and waits; the clock starts as they are released.
        let started = Instant::now();
        start_line.wait();
        started
    })
    .elapsed();
    match shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}

pub fn run(args: Args) -> CmdResult {
    let work = workload(&args)?;
    let path = &args.files[0];
    let disk = Disk::open(
        path,
        args.format.as_deref(),
        work.write,
        args.force_share,
        work.cache,
    )
    .map_err(|m| Failure::new(1, m))?;
    let image_size = disk.size().map_err(|m| Failure::new(1, m))?;
    outln!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        work.count,
        if work.write { "write" } else { "read" },
        work.size,
        work.depth,
        work.offset,
        work.step
    );
    if work.flush_interval != 0 {
        outln!("Sending flush every {} requests", work.flush_interval);
    }
    let elapsed = run_workload(&disk, work, image_size)
        .map_err(|e| Failure::new(1, format!("Failed request: {e}")))?;
    let seconds = elapsed.as_secs_f64();
    outln!("Run completed in {seconds:3.3} seconds.");
    if !args.quiet {
        let bytes = (work.count * work.size) as f64;
        let (mb_s, iops) = if seconds > 0.0 {
            (bytes / seconds / 1e6, work.count as f64 / seconds)
        } else {
            (f64::INFINITY, f64::INFINITY)
        };
        outln!("Throughput: {mb_s:.1} MB/s, {iops:.0} IOPS");
    }
    disk.close(work.write, work.cache.no_flush)
        .map_err(|m| Failure::new(1, m))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(offset: u64, step: u64) -> Workload {
        Workload {
            count: 10,
            depth: 1,
            offset,
            size: 4096,
            step,
            write: false,
            pattern: 0,
            flush_interval: 0,
            cache: CacheMode::WRITEBACK,
        }
    }

    #[test]
    fn requests_step_from_the_offset_and_wrap_at_the_virtual_size() {
        let w = work(8192, 4096);
        let offsets: Vec<u64> = (0..4).map(|i| w.request_offset(i, 16384)).collect();
        assert_eq!(offsets, [8192, 12288, 0, 4096]);
    }

    #[test]
    fn a_first_offset_past_the_end_is_kept_and_later_ones_wrap() {
        let w = work(20000, 4096);
        assert_eq!(w.request_offset(0, 16384), 20000);
        assert_eq!(w.request_offset(1, 16384), (20000 + 4096) % 16384);
        assert_eq!(work(0, 4096).request_offset(5, 0), 0);
    }

    #[test]
    fn aligned_buffers_start_on_a_page_boundary() {
        for len in [1, 512, 4096, 65536] {
            let mut b = AlignedBuf::new(len, 0xa5);
            assert_eq!(b.as_slice().as_ptr() as usize % BUFFER_ALIGN, 0);
            assert_eq!(b.as_mut_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0xa5));
        }
    }
}
