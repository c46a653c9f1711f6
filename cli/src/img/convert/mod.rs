//! `convert -O raw|qcow2`: copies the guest bytes of an image (or of one of its snapshots) into a
//! sparse raw file or a new qcow2 image (`-o` as `create`, `-c` for compressed clusters). Only
//! data ranges are read; zero and unallocated ranges, and all-zero blocks (raw) or clusters
//! (qcow2) inside data, stay holes.

pub mod bitmaps;
pub mod copy;
pub mod existing;
pub mod salvage;

use std::path::PathBuf;
use std::sync::Mutex;

use qcow2::storage::FileIdentity;
use qcow2::{CreateOptions, Image};

use crate::cache::CacheMode;
use crate::img::convert::copy::{cut, lock, runs, Chunk, RawTarget, Workers};
use crate::opts;
use crate::source::{CmdResult, Failure, Guest, Input};

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
    /// Output format: raw (qemu-img's default) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
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
    /// Copy what can be read of a failing source: unreadable sectors become zeros (warned
    /// about), failed block-status queries count as data.
    #[arg(long)]
    salvage: bool,
    /// With -n: the target reads as zeros already, so zero ranges are not written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Target cache mode (none, writeback, writethrough, directsync, unsafe): `unsafe` skips
    /// every sync of the output (qemu-img's default for convert); with the others, and without
    /// `-t`, the output is synced before the command ends, and `none` and `directsync` write it
    /// around the host page cache (O_DIRECT).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode: `none` and `directsync` read the sources around the host page cache
    /// (O_DIRECT).
    #[arg(short = 'T')]
    source_cache: Option<String>,
    /// Out-of-order writes: qcow2 output is allocated as chunks finish, not in guest order
    /// (raw output is always written as chunks finish).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Parallel workers, 1 to 16 (qemu-img's limits); the core count, at least 4, without it.
    #[arg(short = 'm', value_name = "NUM_COROUTINES", allow_hyphen_values = true)]
    parallel: Option<String>,
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
pub struct RateLimit {
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
    let workers = match &args.parallel {
        Some(text) => {
            crate::size::int_arg("number of coroutines", text, 1, copy::MAX_WORKERS)? as usize
        }
        None => copy::default_workers(),
    };
    let limit = rate.map(|rate| RateLimit {
        rate,
        start: std::time::Instant::now(),
        done: Mutex::new(0),
    });
    let _ = args.quiet;
    let parse = |mode: &Option<String>| {
        mode.as_deref()
            .map(|name| {
                CacheMode::parse(name).ok_or_else(|| fail(format!("Invalid cache option: {name}")))
            })
            .transpose()
    };
    // Without `-t` the output is synced at the end (qemu-img's default, `unsafe`, is not
    // followed there: a finished convert leaves a durable file).
    let cache = parse(&args.cache)?.unwrap_or(CacheMode::WRITEBACK);
    let source_direct = parse(&args.source_cache)?.is_some_and(|mode| mode.direct);
    let copy_opts = CopyOpts {
        sparse,
        limit: limit.as_ref(),
        offload: args.copy_offload,
        compress: args.compress,
        // Salvaging goes through the disk in order, a chunk at a time, so each warning comes
        // where qemu-img's does.
        workers: if args.salvage { 1 } else { workers },
        window: if args.salvage {
            copy::CHUNK as u64
        } else {
            copy::MAP_WINDOW
        },
        out_of_order: args.out_of_order,
        cache,
        progress: args.progress,
    };
    let copy = |guest: &dyn Guest, args: &Args, output: Output, inputs: &[FileIdentity]| {
        if args.salvage {
            let salvage = crate::img::convert::salvage::Salvage::new(guest, args.quiet);
            salvage.survey(copy_opts.window);
            return copy(&salvage, args, &copy_opts, output, inputs);
        }
        copy(guest, args, &copy_opts, output, inputs)
    };
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
        let input = open_sources(&args, source_direct).map_err(fail)?;
        let inputs = input.files();
        return crate::img::convert::existing::copy(
            &input,
            &args.dst,
            &args.output_format,
            args.target_is_zero,
            &inputs,
            &copy_opts,
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
        let input = open_sources(&args, source_direct).map_err(fail)?;
        let inputs = input.files();
        return copy(&input, &args, output_for(&input)?, &inputs);
    }
    let input =
        Input::open_cached(&args.src[0], args.format.as_deref(), source_direct).map_err(fail)?;
    let version = qcow2_opts.as_ref().and_then(|o| match o.compat.as_deref() {
        Some("0.10") | Some("v2") => Some(2),
        _ => None,
    });
    let bitmaps = crate::img::convert::bitmaps::plan(
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
        (Input::Raw(_) | Input::Node(_), Some(_)) => Err(fail(
            "Failed to load snapshot: raw images have no snapshots".into(),
        )),
        (Input::Blkdebug(_), Some(_)) => Err(fail(
            "Failed to load snapshot: snapshots under a blkdebug node are not supported".into(),
        )),
    }?;
    if let Some(names) = bitmaps {
        crate::img::convert::bitmaps::copy(&input, &names, &args.dst)?;
    }
    Ok(code)
}

/// The sources as one disk (one source reads as itself).
fn open_sources(args: &Args, direct: bool) -> Result<crate::source::Concat, String> {
    let inputs = args
        .src
        .iter()
        .map(|p| Input::open_cached(p, args.format.as_deref(), direct))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::source::Concat::new(inputs))
}

/// How the bytes are copied: `-S`, `-r`, `-C`, `-c`, `-m`, `-W`, `-t` and `-p`.
pub struct CopyOpts<'a> {
    /// Sparse detection block; `None` writes everything.
    pub sparse: Option<usize>,
    pub limit: Option<&'a RateLimit>,
    /// `-C`: copy file ranges inside the kernel where the source has them.
    pub offload: bool,
    pub compress: bool,
    pub workers: usize,
    /// Guest bytes mapped (block status) ahead of the copy at a time.
    pub window: u64,
    /// `-W`: qcow2 output need not be allocated in guest order.
    pub out_of_order: bool,
    /// The output's cache mode (`-t`): synced before the command ends unless `unsafe`, written
    /// around the page cache for `none` and `directsync`.
    pub cache: CacheMode,
    pub progress: bool,
}

impl CopyOpts<'_> {
    /// The output is synced before the command ends (every `-t` mode but `unsafe`).
    pub fn durable(&self) -> bool {
        !self.cache.no_flush
    }

    fn workers(&self, ordered: bool) -> Workers {
        Workers {
            count: self.workers,
            window: self.window,
            ordered,
            progress: self.progress,
        }
    }

    fn account(&self, bytes: u64) {
        if let Some(limit) = self.limit {
            limit.account(bytes);
        }
    }
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
    let mut storage = crate::target::replace_file(&args.dst, inputs)
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    // An unknown preallocation mode is refused once the file exists (empty), as QEMU does.
    let mode = opts
        .preallocation()
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    let out = storage.file();
    // QEMU's file driver makes whole sectors, and writes the first block.
    let file_size = guest.size().next_multiple_of(512);
    crate::img::create::grow_raw(&storage, 0, file_size, mode)
        .and_then(|()| crate::img::create::write_first_block(out, file_size))
        .and_then(|()| crate::target::set_direct(&mut storage, how.cache))
        .map_err(|m| fail(format!("{dst_name}: error while converting raw: {m}")))?;
    let target = RawTarget {
        storage: &storage,
        fresh: true,
    };
    copy_into_raw(guest, &target, how).map_err(fail)?;
    Ok(0)
}

/// Copies `guest` into a raw file (new or existing), syncing it at the end unless `-t unsafe`.
/// Data ranges are cut into chunks; all-zero blocks and zero ranges are made zeros in the
/// target (nothing to do in a fresh one, holes punched in an existing one).
pub fn copy_into_raw(
    guest: &dyn Guest,
    out: &RawTarget<'_>,
    how: &CopyOpts<'_>,
) -> Result<(), String> {
    let chunks = |window: u64, window_len: u64| -> Result<Vec<Chunk>, String> {
        let mut data = Vec::new();
        for region in guest.regions(window, window_len)? {
            // Without sparse detection (-S 0) zero ranges are written too.
            if region.data || how.sparse.is_none() {
                push_merged(&mut data, region.start, region.start + region.length);
            }
        }
        Ok(cut(&data, window, window + window_len, !out.fresh))
    };
    let written = |e: std::io::Error, at: u64| format!("error while writing at byte {at}: {e}");
    let process = |chunk: Chunk, buf: &mut [u8], _: &dyn Fn()| -> Result<(), String> {
        let pos = chunk.pos;
        if !chunk.data {
            return out.zero(pos, chunk.len).map_err(|e| written(e, pos));
        }
        let buf = &mut buf[..chunk.len as usize];
        if how.offload {
            if let Some((src, at)) = guest.host_range(pos, chunk.len) {
                if copy_in_kernel(src, at, out.file(), pos, buf.len()) {
                    how.account(chunk.len);
                    return Ok(());
                }
            }
        }
        guest
            .read_at(buf, pos)
            .map_err(|e| format!("error while reading at byte {pos}: {e}"))?;
        for (start, end, zero) in runs(buf, how.sparse) {
            let at = pos + start as u64;
            let result = if zero {
                out.zero(at, (end - start) as u64)
            } else {
                out.write(&buf[start..end], at)
            };
            result.map_err(|e| written(e, at))?;
        }
        how.account(chunk.len);
        Ok(())
    };
    copy::run(guest.size(), &how.workers(false), chunks, process)?;
    if how.durable() {
        out.file()
            .sync_data()
            .map_err(|e| format!("error while flushing: {}", crate::source::io_text(&e)))?;
    }
    Ok(())
}

/// Adds `[start, end)` to ascending ranges, merged with the last one where they touch.
fn push_merged(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 >= start => last.1 = last.1.max(end),
        _ => ranges.push((start, end)),
    }
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
    let data_file = crate::img::create::create_data_file(options, inputs)
        .map_err(|m| fail(format!("{dst}: error while converting qcow2: {m}")))?;
    let mut image = crate::img::create::open_new_qcow2(&dst, options, inputs, how.cache)
        .map_err(|m| fail(format!("{dst}: error while converting qcow2: {m}")))?;
    if let Some(storage) = data_file {
        let storage = crate::target::with_cache(storage, how.cache)
            .map_err(|m| fail(format!("{dst}: error while converting qcow2: {m}")))?;
        image.attach_data_file(storage);
    }
    // With a backing file, what the source's top image does not allocate is left to it, and
    // zeros are written as zeros (the backing file may hold data there), as qemu-img does. The
    // backing file must open (checked once the image exists, as qemu-img checks it).
    let has_backing = options.backing_file.is_some();
    if let Some(backing) = options
        .backing_file
        .as_ref()
        .filter(|b| crate::nodes::backing_json::is_json(b))
    {
        // Described, not named: it opens as below any image.
        let policy = crate::source::with_policy(&args.dst, &qcow2::OpenOptions::new());
        crate::nodes::backing_json::probe(
            &dst,
            backing,
            options.backing_format.as_deref(),
            &policy,
        )
        .map_err(|e| {
            fail(format!(
                "Could not open '{dst}': Could not open backing file: {}",
                crate::source::open_error_text(&e)
            ))
        })?;
    } else if let Some(backing) = &options.backing_file {
        let path = crate::source::resolve_relative(&args.dst, backing);
        std::fs::File::open(&path).map_err(|e| {
            fail(format!(
                "Could not open '{dst}': Could not open backing file: Could not open '{}': {}",
                path.display(),
                crate::source::io_text(&e)
            ))
        })?;
    }
    let cs = image.cluster_size() as usize;
    // Zero blocks are skipped: whole clusters (they stay unallocated), or, where every cluster
    // is preallocated already, each all-zero block (qemu-img's default `-S 4k`), which stays a
    // hole in the file.
    // A larger -S block skips only zero runs that long.
    // Compressed clusters are written whole, so -S other than 0 means each zero cluster.
    let granularity = how.sparse.map(|block| {
        if how.compress {
            cs
        } else if options.preallocation == qcow2::Preallocation::Off && !options.data_file_raw {
            block.max(cs)
        } else {
            block
        }
    });
    // Preallocated clusters of an encrypted image hold zeros on disk, which do not decrypt
    // to zeros (QEMU's has_zero_init is false there): zeros are written everywhere.
    let garbage_prealloc =
        options.encryption.is_some() && options.preallocation != qcow2::Preallocation::Off;
    let target = Qcow2Target {
        image: &image,
        new: true,
        below: has_backing,
        zeros: if has_backing || garbage_prealloc {
            Zeros::Write
        } else {
            Zeros::Skip
        },
        zero_gaps: garbage_prealloc,
        granularity,
    };
    copy_into_qcow2(guest, &target, how).map_err(fail)?;
    image
        .close()
        .map_err(|e| fail(format!("{dst}: error while converting qcow2: {e}")))?;
    Ok(0)
}

/// What zero blocks become in a qcow2 target.
pub enum Zeros {
    /// Nothing: the target reads as zeros there already.
    Skip,
    /// Zero writes (over a backing file that may hold data there).
    Write,
    /// Zero writes where the target does not read as zeros already (an existing target).
    WhereNonZero,
}

/// A qcow2 output and how the copy treats it.
pub struct Qcow2Target<'a> {
    pub image: &'a Image,
    /// Created for this copy: its tail past the source (whole sectors) is written as zeros.
    pub new: bool,
    /// Ranges the source's top image leaves to its backing file are left to the output's.
    pub below: bool,
    pub zeros: Zeros,
    /// Ranges the source has as zeros are made zeros (an existing target holding old bytes).
    pub zero_gaps: bool,
    /// Zero detection block; `None` writes everything.
    pub granularity: Option<usize>,
}

/// Copies `guest` into a qcow2 image. Workers read, scan and compress in parallel; the writes
/// follow in guest order (without `-W`), so clusters are allocated where qemu-img puts them.
pub fn copy_into_qcow2(
    guest: &dyn Guest,
    t: &Qcow2Target<'_>,
    how: &CopyOpts<'_>,
) -> Result<(), String> {
    let image = t.image;
    let cs = image.cluster_size();
    let src_size = guest.size();
    // A new output may be larger (qemu rounds it up to whole sectors): the tail reads as zeros.
    // An existing one keeps its bytes past the source.
    let size = if t.new { image.size() } else { src_size };
    let chunks = |window: u64, window_len: u64| -> Result<Vec<Chunk>, String> {
        let mut data: Vec<(u64, u64)> = Vec::new();
        for region in guest.regions(window, window_len)? {
            let skip = if t.below {
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
            push_merged(&mut data, start, end);
        }
        Ok(cut(&data, window, window + window_len, t.zero_gaps))
    };
    let zero = |at: u64, len: u64| match t.zeros {
        Zeros::Skip => Ok(()),
        Zeros::Write => image.write_zeroes(at, len, false),
        Zeros::WhereNonZero => copy::zero_qcow2(image, at, len),
    };
    let written = |e: qcow2::Error, at: u64| format!("error while writing at byte {at}: {e}");
    let process = |chunk: Chunk, buf: &mut [u8], my_turn: &dyn Fn()| -> Result<(), String> {
        let pos = chunk.pos;
        if !chunk.data {
            my_turn();
            return copy::zero_qcow2(image, pos, chunk.len).map_err(|e| written(e, pos));
        }
        let buf = &mut buf[..chunk.len as usize];
        let readable = src_size.saturating_sub(pos).min(chunk.len) as usize;
        guest
            .read_at(&mut buf[..readable], pos)
            .map_err(|e| format!("error while reading at byte {pos}: {e}"))?;
        buf[readable..].fill(0);
        // Reading, zero detection and compression overlap between workers; the writes wait
        // for their turn, so the host offsets are allocated in guest order.
        let runs = runs(buf, t.granularity);
        let packed = if how.compress {
            runs.iter()
                .map(|&(start, end, zero)| {
                    (!zero)
                        .then(|| image.compress_clusters(&buf[start..end], pos + start as u64))
                        .transpose()
                })
                .collect::<qcow2::Result<Vec<_>>>()
                .map_err(|e| written(e, pos))?
        } else {
            Vec::new()
        };
        my_turn();
        for (i, &(start, end, is_zero)) in runs.iter().enumerate() {
            let at = pos + start as u64;
            let data = &buf[start..end];
            let result = match (is_zero, packed.get(i)) {
                (true, _) => zero(at, data.len() as u64),
                (false, Some(Some(clusters))) => image.write_compressed_clusters(clusters, data),
                (false, _) => image.write_at(data, at),
            };
            result.map_err(|e| written(e, at))?;
        }
        how.account(chunk.len);
        Ok(())
    };
    copy::run(size, &how.workers(!how.out_of_order), chunks, process)
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
