//! `convert -O raw|qcow2`: copies the guest bytes of an image (or of one of its snapshots) into a
//! sparse raw file or a new qcow2 image (`-o` as `create`, `-c` for compressed clusters). Only
//! data ranges are read; zero and unallocated ranges, and all-zero blocks (raw) or clusters
//! (qcow2) inside data, stay holes.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use qcow2::storage::FileIdentity;
use qcow2::{CreateOptions, Image};

use crate::opts;
use crate::progress::Progress;
use crate::source::{is_zero, CmdResult, Failure, Guest, Input};

/// Bytes read per request.
const CHUNK: usize = 2 << 20;
/// Buffer alignment.
const PAGE: usize = 4096;
/// Requests in flight: the page-cache copies overlap (qemu-img keeps 8 coroutines busy);
/// measured best at 4 on a 1 GiB image.
const WORKERS: usize = 4;
/// Guest bytes mapped per `map` call, so huge images need little memory.
const MAP_WINDOW: u64 = 1 << 30;
/// Granularity of hole detection in data (as qemu-img's default `-S 4k`).
const SPARSE_BLOCK: usize = 4096;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', required = true)]
    output_format: String,
    /// Write compressed clusters (qcow2 output).
    #[arg(short = 'c')]
    compress: bool,
    /// Output format options `k=v,...` (repeatable), as for create.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Quiet (accepted for qemu-img compatibility; convert prints nothing but progress).
    #[arg(short = 'q')]
    quiet: bool,
    /// Snapshot id or name to copy.
    #[arg(short = 's', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Snapshot as `snapshot.id=ID`, `snapshot.name=NAME` or `ID_OR_NAME`.
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAM")]
    snapshot_param: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2).
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps, skip inconsistent bitmaps instead of failing.
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Write into the existing target instead of creating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the target reads as zeros already, so zero ranges are not written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Target cache mode (none, writeback, writethrough, directsync, unsafe); checked and
    /// accepted: the engine's own write-back order applies.
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode, checked and accepted.
    #[arg(short = 'T')]
    source_cache: Option<String>,
    /// Out-of-order writes (accepted: workers already write in any order).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Parallel requests (1 to 16, qemu-img's limits), accepted.
    #[arg(short = 'm')]
    parallel: Option<u32>,
    /// Sparse detection: all-zero blocks of SIZE bytes are not written (default 4k; 0 writes
    /// everything, fully allocating the output).
    #[arg(short = 'S', value_name = "SIZE")]
    sparse: Option<String>,
    /// Copy offloading: raw data goes from file to file inside the kernel (copy_file_range,
    /// which shares extents where the file system can), refused where qemu-img refuses it.
    #[arg(short = 'C')]
    copy_offload: bool,
    /// Backing file of the output (qcow2): ranges the source's top image does not allocate are
    /// left to it.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the `-B` backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Rate limit in bytes per second (k, M, G suffixes; 0 for none).
    #[arg(short = 'r', value_name = "RATE")]
    rate: Option<String>,
    /// Source images (several are read one after another as one disk), then the output.
    #[arg(required = true, num_args = 1..)]
    src: Vec<PathBuf>,
    dst: PathBuf,
}

/// Which snapshot to copy.
enum Selector {
    IdOrName(String),
    Id(String),
    Name(String),
}

fn parse_snapshot_param(text: &str) -> Result<Selector, String> {
    if !text.contains('=') {
        return Ok(Selector::IdOrName(text.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v.to_string()),
            Some(("snapshot.name", v)) => name = Some(v.to_string()),
            _ => return Err(format!("Invalid snapshot parameter '{part}'")),
        }
    }
    match (id, name) {
        (Some(id), None) => Ok(Selector::Id(id)),
        (None, Some(name)) => Ok(Selector::Name(name)),
        (Some(id), Some(name)) => Ok(Selector::Id(format!("{id}\0{name}"))),
        (None, None) => Err("empty snapshot parameter".into()),
    }
}

/// The id of the snapshot a selector names.
fn snapshot_id(image: &Image, selector: &Selector) -> Result<String, String> {
    let entries = image.snapshot_entries();
    let found = match selector {
        Selector::IdOrName(key) => entries
            .iter()
            .find(|s| s.id_str() == *key)
            .or_else(|| entries.iter().find(|s| s.name_str() == *key)),
        Selector::Name(name) => entries.iter().find(|s| s.name_str() == *name),
        Selector::Id(key) => match key.split_once('\0') {
            Some((id, name)) => entries
                .iter()
                .find(|s| s.id_str() == id && s.name_str() == name),
            None => entries.iter().find(|s| s.id_str() == *key),
        },
    };
    let key = match selector {
        Selector::IdOrName(k) | Selector::Name(k) => k.clone(),
        Selector::Id(k) => k.replace('\0', "/"),
    };
    found
        .map(|s| s.id_str())
        .ok_or_else(|| format!("Failed to load snapshot: Can't find snapshot '{key}'"))
}

/// What to write.
enum Output {
    Raw(opts::RawOpts),
    Qcow2(CreateOptions),
}

/// qemu-img's largest `-S`: 32768 sectors.
const MAX_SPARSE: u64 = 16 << 20;

/// `-S`: the sparse detection block in bytes, `None` for `-S 0` (write everything).
fn parse_sparse(text: Option<&str>) -> Result<Option<usize>, String> {
    let Some(text) = text else {
        return Ok(Some(SPARSE_BLOCK));
    };
    let bytes = crate::size::parse_size(text)
        .map_err(|_| format!("Invalid buffer size for sparse output specified: '{text}'."))?;
    if bytes % 512 != 0 || bytes > MAX_SPARSE {
        return Err(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
        ));
    }
    Ok((bytes > 0).then_some(bytes as usize))
}

/// `-r`: bytes per second, `None` for no limit.
fn parse_rate(text: Option<&str>) -> Result<Option<u64>, String> {
    let Some(text) = text else { return Ok(None) };
    let rate = crate::size::parse_size(text)
        .map_err(|_| format!("Invalid rate limit specified: '{text}'."))?;
    Ok((rate > 0).then_some(rate))
}

/// Keeps the bytes copied at or below a rate: each worker waits until the bytes done so far
/// are due.
struct RateLimit {
    rate: u64,
    start: std::time::Instant,
    done: Mutex<u64>,
}

impl RateLimit {
    fn account(&self, bytes: u64) {
        let due = {
            let mut done = lock(&self.done);
            *done += bytes;
            std::time::Duration::from_secs_f64(*done as f64 / self.rate as f64)
        };
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let fail = |m: String| Failure::new(1, m);
    let sparse = parse_sparse(args.sparse.as_deref()).map_err(fail)?;
    let rate = parse_rate(args.rate.as_deref()).map_err(fail)?;
    if args.src.len() > 1 && args.backing.is_some() {
        return Err(fail(
            "Having a backing file for the target makes no sense when concatenating multiple input images".into(),
        ));
    }
    if args.copy_offload && args.compress {
        return Err(fail("Cannot enable copy offloading when -c is used".into()));
    }
    if args.copy_offload && args.sparse.is_some() {
        return Err(fail("Cannot enable copy offloading when -S is used".into()));
    }
    let limit = rate.map(|rate| RateLimit {
        rate,
        start: std::time::Instant::now(),
        done: Mutex::new(0),
    });
    let copy_opts = CopyOpts {
        sparse,
        limit: limit.as_ref(),
        offload: args.copy_offload,
    };
    let copy = |guest: &dyn Guest, args: &Args, output: Output, inputs: &[FileIdentity]| {
        copy(guest, args, &copy_opts, output, inputs)
    };
    let _ = (args.quiet, args.out_of_order);
    for mode in [&args.cache, &args.source_cache].into_iter().flatten() {
        if !matches!(
            mode.as_str(),
            "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe"
        ) {
            return Err(fail(format!("Invalid cache option: {mode}")));
        }
    }
    if args.parallel.is_some_and(|m| !(1..=16).contains(&m)) {
        return Err(fail(
            "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
        ));
    }
    if args.target_is_zero && !args.no_create {
        return Err(fail("--target-is-zero requires use of -n flag".into()));
    }
    if args.no_create {
        if args.snapshot.is_some() || args.snapshot_param.is_some() || args.bitmaps {
            return Err(fail(
                "-n with a snapshot or --bitmaps is not supported by qcow2-tool".into(),
            ));
        }
        if !args.options.is_empty() {
            return Err(fail("-o has no effect when skipping image creation".into()));
        }
        if !matches!(args.output_format.as_str(), "raw" | "qcow2") {
            return Err(fail(format!(
                "Unknown file format '{}'",
                args.output_format
            )));
        }
        let input = open_sources(&args).map_err(fail)?;
        let inputs = input.files();
        return crate::convert_existing::copy(
            &input,
            &args.dst,
            &args.output_format,
            args.target_is_zero,
            &inputs,
        );
    }
    let mut raw_opts = opts::RawOpts::default();
    let qcow2_opts = match args.output_format.as_str() {
        "raw" => {
            if args.backing.is_some() {
                return Err(fail(
                    "Backing file not supported for file format 'raw'".into(),
                ));
            }
            if args.compress {
                return Err(fail(
                    "Compression not supported for this file format".into(),
                ));
            }
            raw_opts = opts::parse_raw(&args.options).map_err(|(m, _)| fail(m))?;
            None
        }
        "qcow2" => {
            let o = opts::parse(&args.options).map_err(|(m, _)| fail(m))?;
            if args.compress && o.preallocation.as_deref().is_some_and(|p| p != "off") {
                return Err(fail(
                    "Compression and preallocation not supported at the same time".into(),
                ));
            }
            let mut o = o;
            if let Some(b) = &args.backing {
                o.backing_file = Some(b.clone());
            }
            if let Some(f) = &args.backing_format {
                o.backing_fmt = Some(f.clone());
            }
            if o.backing_file.is_some() && o.backing_fmt.is_none() {
                return Err(fail(
                    "Use of backing file requires explicit backing format".into(),
                ));
            }
            Some(o)
        }
        other => return Err(fail(format!("Unknown file format '{other}'"))),
    };
    let selector = match (&args.snapshot, &args.snapshot_param) {
        (Some(_), Some(_)) => return Err(fail("-s and -l are mutually exclusive".into())),
        (Some(s), None) => Some(Selector::IdOrName(s.clone())),
        (None, Some(l)) => Some(parse_snapshot_param(l).map_err(fail)?),
        (None, None) => None,
    };
    // The output options are checked against the source size before anything is written.
    let output_for = |guest: &dyn Guest| -> Result<Output, Failure> {
        match &qcow2_opts {
            None => Ok(Output::Raw(raw_opts.clone())),
            Some(o) => o
                .to_create_options(guest.size())
                .map(Output::Qcow2)
                .map_err(|m| {
                    fail(format!(
                        "{}: error while converting qcow2: {m}",
                        args.dst.display()
                    ))
                }),
        }
    };
    if args.src.len() > 1 {
        if args.bitmaps {
            return Err(fail(
                "Copying bitmaps only possible with single source".into(),
            ));
        }
        if selector.is_some() {
            return Err(fail(
                "-l with several sources is not supported by qcow2-tool".into(),
            ));
        }
        let input = open_sources(&args).map_err(fail)?;
        let inputs = input.files();
        return copy(&input, &args, output_for(&input)?, &inputs);
    }
    let input = Input::open(&args.src[0], args.format.as_deref()).map_err(fail)?;
    let version = qcow2_opts.as_ref().and_then(|o| match o.compat.as_deref() {
        Some("0.10") | Some("v2") => Some(2),
        _ => None,
    });
    let bitmaps = crate::convert_bitmaps::plan(
        args.bitmaps,
        args.skip_broken_bitmaps,
        &args.output_format,
        version,
        &input,
    )?;
    // The output may not be any file the input reads, under whatever name.
    let inputs = input.files();
    let code = match (&input, selector) {
        (_, None) => copy(input.guest(), &args, output_for(input.guest())?, &inputs),
        (Input::Qcow2(image), Some(selector)) => {
            let id = snapshot_id(image, &selector).map_err(fail)?;
            let view = image
                .open_snapshot(&id)
                .map_err(|e| fail(format!("Failed to load snapshot: {e}")))?;
            copy(&view, &args, output_for(&view)?, &inputs)
        }
        (Input::Raw(_), Some(_)) => Err(fail(
            "Failed to load snapshot: raw images have no snapshots".into(),
        )),
    }?;
    if let Some(names) = bitmaps {
        crate::convert_bitmaps::copy(&input, &names, &args.dst)?;
    }
    Ok(code)
}

/// The sources as one disk (one source reads as itself).
fn open_sources(args: &Args) -> Result<crate::source::Concat, String> {
    let inputs = args
        .src
        .iter()
        .map(|p| Input::open(p, args.format.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::source::Concat::new(inputs))
}

/// How the bytes are copied: `-S` and `-r`.
struct CopyOpts<'a> {
    /// Sparse detection block; `None` writes everything.
    sparse: Option<usize>,
    limit: Option<&'a RateLimit>,
    /// `-C`: copy file ranges inside the kernel where the source has them.
    offload: bool,
}

fn copy(
    guest: &dyn Guest,
    args: &Args,
    how: &CopyOpts<'_>,
    output: Output,
    inputs: &[FileIdentity],
) -> CmdResult {
    match output {
        Output::Raw(opts) => copy_raw(guest, args, how, opts, inputs),
        Output::Qcow2(options) => copy_qcow2(guest, args, how, &options, inputs),
    }
}

fn copy_raw(
    guest: &dyn Guest,
    args: &Args,
    how: &CopyOpts<'_>,
    opts: opts::RawOpts,
    inputs: &[FileIdentity],
) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let dst_name = args.dst.display();
    let storage = crate::target::replace_file(&args.dst, inputs)
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    // An unknown preallocation mode is refused once the file exists (empty), as QEMU does.
    let mode = opts
        .preallocation()
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    let out = storage.file();
    let size = guest.size();
    // QEMU's file driver makes whole sectors, and writes the first block.
    let file_size = size.next_multiple_of(512);
    crate::create::grow_raw(&storage, 0, file_size, mode)
        .and_then(|()| crate::create::write_first_block(out, file_size))
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    // Data ranges cut into chunks; zero ranges are holes already.
    let chunks = |window: u64, window_len: u64| -> Result<Vec<(u64, usize)>, String> {
        let mut chunks = Vec::new();
        for region in guest.regions(window, window_len)? {
            let end = region.start + region.length;
            let mut pos = region.start;
            // Without sparse detection (-S 0) zero ranges are written too.
            while (region.data || how.sparse.is_none()) && pos < end {
                let n = (CHUNK as u64).min(end - pos);
                chunks.push((pos, n as usize));
                pos += n;
            }
        }
        Ok(chunks)
    };
    let process = |chunk: &mut [u8], pos: u64, _: &dyn Fn()| -> Result<(), String> {
        if how.offload {
            if let Some((src, at)) = guest.host_range(pos, chunk.len() as u64) {
                if copy_in_kernel(src, at, out, pos, chunk.len()) {
                    if let Some(limit) = how.limit {
                        limit.account(chunk.len() as u64);
                    }
                    return Ok(());
                }
            }
        }
        guest
            .read_at(chunk, pos)
            .map_err(|e| format!("error while reading at byte {pos}: {e}"))?;
        write_nonzero(out, chunk, pos, how.sparse)
            .map_err(|e| format!("error while writing at byte {pos}: {e}"))?;
        if let Some(limit) = how.limit {
            limit.account(chunk.len() as u64);
        }
        Ok(())
    };
    run_chunks(size, args.progress, chunks, process, false).map_err(fail)?;
    Ok(0)
}

/// Copies into a new qcow2 image: data ranges widened to whole output clusters, all-zero
/// clusters skipped, the rest written (compressed with `-c`) in runs of clusters.
fn copy_qcow2(
    guest: &dyn Guest,
    args: &Args,
    how: &CopyOpts<'_>,
    options: &CreateOptions,
    inputs: &[FileIdentity],
) -> CmdResult {
    let dst = args.dst.display().to_string();
    let fail = |m: String| Failure::new(1, m);
    let data_file = crate::create::create_data_file(options, inputs)
        .map_err(|m| fail(format!("{dst}: error while converting qcow2: {m}")))?;
    let mut image = crate::create::open_new_qcow2(&dst, options, inputs)
        .map_err(|m| fail(format!("{dst}: error while converting qcow2: {m}")))?;
    if let Some(storage) = data_file {
        image.attach_data_file(Box::new(storage));
    }
    // With a backing file, what the source's top image does not allocate is left to it, and
    // zeros are written as zeros (the backing file may hold data there), as qemu-img does. The
    // backing file must open (checked once the image exists, as qemu-img checks it).
    let has_backing = options.backing_file.is_some();
    if let Some(backing) = &options.backing_file {
        let path = crate::source::resolve_relative(&args.dst, backing);
        std::fs::File::open(&path).map_err(|e| {
            fail(format!(
                "Could not open '{dst}': Could not open backing file: Could not open '{}': {}",
                path.display(),
                crate::source::io_text(&e)
            ))
        })?;
    }
    let cs = image.cluster_size();
    let src_size = guest.size();
    // The output may be larger (qemu rounds it up to whole sectors): the tail reads as zeros.
    let size = image.size();
    // Zero blocks are skipped: whole clusters (they stay unallocated), or, where every cluster
    // is preallocated already, each all-zero block (qemu-img's default `-S 4k`), which stays a
    // hole in the file.
    // A larger -S block skips only zero runs that long.
    // Compressed clusters are written whole, so -S other than 0 means each zero cluster.
    let granularity = how.sparse.map(|block| {
        if args.compress {
            cs as usize
        } else if options.preallocation == qcow2::Preallocation::Off && !options.data_file_raw {
            block.max(cs as usize)
        } else {
            block
        }
    });
    let chunks = |window: u64, window_len: u64| -> Result<Vec<(u64, usize)>, String> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for region in guest.regions(window, window_len)? {
            let skip = if has_backing {
                region.below
            } else {
                !region.data && how.sparse.is_some()
            };
            if skip {
                continue;
            }
            let start = region.start & !(cs - 1);
            let mut end = (region.start + region.length)
                .next_multiple_of(cs)
                .min(size);
            if region.start + region.length == src_size {
                end = size;
            }
            match ranges.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => ranges.push((start, end)),
            }
        }
        let mut chunks = Vec::new();
        for (start, end) in ranges {
            let mut pos = start;
            while pos < end {
                let n = (CHUNK as u64).min(end - pos);
                chunks.push((pos, n as usize));
                pos += n;
            }
        }
        Ok(chunks)
    };
    let process = |chunk: &mut [u8], pos: u64, my_turn: &dyn Fn()| -> Result<(), String> {
        let readable = src_size.saturating_sub(pos).min(chunk.len() as u64) as usize;
        guest
            .read_at(&mut chunk[..readable], pos)
            .map_err(|e| format!("error while reading at byte {pos}: {e}"))?;
        chunk[readable..].fill(0);
        // Reads overlap; writes allocate in guest order, so the host offsets are qemu-img's.
        my_turn();
        write_clusters(&image, chunk, pos, granularity, args.compress, has_backing)
            .map_err(|e| format!("error while writing at byte {pos}: {e}"))?;
        if let Some(limit) = how.limit {
            limit.account(chunk.len() as u64);
        }
        Ok(())
    };
    run_chunks(size, args.progress, chunks, process, true).map_err(fail)?;
    image
        .close()
        .map_err(|e| fail(format!("{dst}: error while converting qcow2: {e}")))?;
    Ok(0)
}

/// Writes the blocks of `granularity` bytes of `chunk` (starting at a block-aligned `offset`)
/// that are not all zeros, in runs of adjacent blocks; everything without a granularity.
fn write_clusters(
    image: &Image,
    chunk: &[u8],
    offset: u64,
    granularity: Option<usize>,
    compress: bool,
    zero_fill: bool,
) -> qcow2::Result<()> {
    let mut run_start = None;
    let mut pos = 0;
    let flush = |start: usize, end: usize| {
        let data = &chunk[start..end];
        let at = offset + start as u64;
        if compress {
            image.write_compressed(data, at)
        } else {
            image.write_at(data, at)
        }
    };
    let Some(granularity) = granularity else {
        return flush(0, chunk.len());
    };
    // Runs of blocks alike: data is written, zeros skipped (or written as zeros).
    let run = |start: usize, end: usize, zero: bool| match (zero, zero_fill) {
        (false, _) => flush(start, end),
        (true, true) => image.write_zeroes(offset + start as u64, (end - start) as u64, false),
        (true, false) => Ok(()),
    };
    let mut current: Option<bool> = None;
    while pos < chunk.len() {
        let end = (pos + granularity).min(chunk.len());
        let zero = is_zero(&chunk[pos..end]);
        match (current, run_start) {
            (Some(kind), Some(start)) if kind != zero => {
                run(start, pos, kind)?;
                run_start = Some(pos);
            }
            (None, _) => run_start = Some(pos),
            _ => {}
        }
        current = Some(zero);
        pos = end;
    }
    if let (Some(kind), Some(start)) = (current, run_start) {
        run(start, chunk.len(), kind)?;
    }
    Ok(())
}

/// Runs `process` over the chunks `chunks` lists for each window of the disk, on `WORKERS`
/// threads with page-aligned buffers, reporting progress. `process` gets a function that waits
/// until every earlier chunk is done, when `ordered` (what comes after it runs in chunk order);
/// every chunk taken is marked done, failed or not, so no worker waits forever.
fn run_chunks(
    size: u64,
    show_progress: bool,
    chunks: impl Fn(u64, u64) -> Result<Vec<(u64, usize)>, String>,
    process: impl Fn(&mut [u8], u64, &dyn Fn()) -> Result<(), String> + Sync,
    ordered: bool,
) -> Result<(), String> {
    let progress = Mutex::new(Progress::new(show_progress));
    let mut window = 0;
    while window < size {
        let window_len = MAP_WINDOW.min(size - window);
        let chunks = chunks(window, window_len)?;
        let next = AtomicUsize::new(0);
        let error = Mutex::new(None);
        // Chunks done in order so far, and a wake-up for workers waiting their turn.
        let turn = (Mutex::new(0usize), std::sync::Condvar::new());
        std::thread::scope(|scope| {
            for _ in 0..WORKERS {
                scope.spawn(|| {
                    // Page-aligned buffers copy to and from the page cache fastest.
                    let mut backing = vec![0u8; CHUNK + PAGE];
                    let skew = backing.as_ptr().align_offset(PAGE).min(PAGE);
                    let buf = &mut backing[skew..skew + CHUNK];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(pos, n)) = chunks.get(i) else {
                            break;
                        };
                        let wait = || {
                            if ordered {
                                let mut done = lock(&turn.0);
                                while *done < i {
                                    done = turn.1.wait(done).unwrap_or_else(|e| e.into_inner());
                                }
                            }
                        };
                        let result = process(&mut buf[..n], pos, &wait);
                        if ordered {
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
                        lock(&progress).update(pos + n as u64, size);
                    }
                });
            }
        });
        if let Some(e) = lock(&error).take() {
            return Err(e);
        }
        window += window_len;
        lock(&progress).update(window, size);
    }
    let mut progress = lock(&progress);
    progress.update(size, size);
    progress.finish();
    Ok(())
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to` with copy_file_range. False when
/// the kernel or the file systems cannot (the caller then copies through memory, which
/// rewrites whatever part was copied with the same bytes).
fn copy_in_kernel(
    src: &std::fs::File,
    from: u64,
    dst: &std::fs::File,
    to: u64,
    len: usize,
) -> bool {
    let (Ok(mut off_in), Ok(mut off_out)) = (i64::try_from(from), i64::try_from(to)) else {
        return false;
    };
    let mut done = 0;
    while done < len {
        match nix::fcntl::copy_file_range(
            src,
            Some(&mut off_in),
            dst,
            Some(&mut off_out),
            len - done,
        ) {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Locks a mutex, ignoring poisoning (a panicking worker already failed the command).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes the blocks of `chunk` that are not all zeros (the file is already zero there);
/// everything without a block size.
fn write_nonzero(
    out: &std::fs::File,
    chunk: &[u8],
    offset: u64,
    block: Option<usize>,
) -> std::io::Result<()> {
    let Some(block) = block else {
        return out.write_all_at(chunk, offset);
    };
    let mut run_start = None;
    let mut pos = 0;
    while pos < chunk.len() {
        let end = (pos + block).min(chunk.len());
        let zero = is_zero(&chunk[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                out.write_all_at(&chunk[start..pos], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        out.write_all_at(&chunk[start..], offset + start as u64)?;
    }
    Ok(())
}
