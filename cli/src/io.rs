//! `io`: a subset of qemu-io. Commands run in order on one open image (read-write unless
//! `-r`), which is closed cleanly at the end: `read [-pqrv] [-P PAT] OFF LEN`,
//! `write [-cfnpqruz] [-P PAT] OFF LEN`, `discard [-q] OFF LEN`, `flush`, `map`, `alloc`,
//! `length`, `truncate`, `readv`/`writev` and the `aio_` forms (which complete in order here, with
//! the same output). Commands come
//! from `-c` or, without it, from standard input one per line after a `qemu-io> ` prompt, as
//! qemu-io reads them. Output lines, messages (stdout or stderr, as qemu-io) and the exit code
//! (1 when any command failed) follow qemu-io. The options scripts pass (`-t`/`--cache`,
//! `-n`, `--aio`, `-U`, a repeated `-f`) are accepted as qemu-io accepts them; cache and aio
//! modes do not change how this engine writes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qcow2::{Image, OpenOptions};

use crate::size::parse_size;
use crate::source::{format_of, io_text, open_image, CmdResult, Failure, Format, Guest, RawFile};

/// qemu's BDRV_REQUEST_MAX_BYTES.
const MAX_REQUEST: u64 = 2_147_483_136;

const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const WRITE_USAGE: &str = "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
const READV_USAGE: &str =
    "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset";
const WRITEV_USAGE: &str =
    "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Command to run (repeatable), e.g. `write -P 0x11 0 4k`.
    #[arg(short = 'c', value_name = "CMD")]
    commands: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r')]
    read_only: bool,
    /// Image format (qcow2 or raw); probed when absent. The last one given wins, as in qemu-io.
    #[arg(short = 'f')]
    format: Vec<String>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe), checked and accepted.
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// qemu-io's `-n` (cache=none), accepted.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// AIO mode (threads, native, io_uring), checked and accepted.
    #[arg(long = "aio", short = 'i')]
    aio: Option<String>,
    /// Open without taking the write-sharing lock (read-only images only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file: PathBuf,
}

/// qemu-io's prompt before each command read from standard input.
const PROMPT: &str = "qemu-io> ";

/// The opened file.
enum Target {
    Qcow2(Box<Image>),
    Raw(RawFile),
}

impl Target {
    fn guest(&self) -> &dyn Guest {
        match self {
            Target::Qcow2(image) => image.as_ref(),
            Target::Raw(raw) => raw,
        }
    }
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    if let Some(mode) = args.cache.as_deref() {
        if !matches!(
            mode,
            "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe"
        ) {
            return Err(fail(format!("Invalid cache option: {mode}")));
        }
    }
    if let Some(mode) = args.aio.as_deref() {
        if !matches!(mode, "threads" | "native" | "io_uring") {
            return Err(fail(format!("Invalid aio option: {mode}")));
        }
    }
    let _ = args.nocache;
    if args.force_share && !args.read_only {
        return Err(fail(format!(
            "can't open device {}: force-share=on can only be used with read-only images",
            args.file.display()
        )));
    }
    let format = args.format.last().map(String::as_str);
    let target = match format_of(&args.file, format).map_err(fail)? {
        Format::Qcow2 => {
            let options = if args.read_only {
                OpenOptions::default().force_share(args.force_share)
            } else {
                OpenOptions::read_write()
            };
            Target::Qcow2(Box::new(open_image(&args.file, &options).map_err(fail)?))
        }
        Format::Raw => Target::Raw(RawFile::open(&args.file).map_err(fail)?),
    };
    let writable = !args.read_only;
    let mut ok = true;
    let from_stdin = args.commands.is_empty();
    let mut stdin_lines = std::io::stdin().lines();
    let mut given = args.commands.iter();
    loop {
        let line = if from_stdin {
            out!("{PROMPT}");
            match stdin_lines.next() {
                Some(Ok(line)) => line,
                _ => break,
            }
        } else {
            match given.next() {
                Some(line) => line.clone(),
                None => break,
            }
        };
        let line = &line;
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&name, rest)) = words.split_first() else {
            continue;
        };
        if matches!(name, "quit" | "q") {
            break;
        }
        // The aio forms complete before the next command here: their output is the same.
        let name = match name {
            "aio_read" => "read",
            "aio_write" => "write",
            "aio_flush" => "flush",
            other => other,
        };
        let (min, max) = match name {
            "read" | "r" | "write" | "w" | "discard" | "d" | "readv" | "writev" => (2, None),
            "flush" | "f" | "map" | "length" | "l" => (0, Some(0)),
            "alloc" => (1, Some(2)),
            "truncate" | "t" => (1, Some(3)),
            _ => {
                errln!("command \"{name}\" not found");
                ok = false;
                continue;
            }
        };
        if !arg_count_ok(name, rest.len(), min, max) {
            ok = false;
            continue;
        }
        let writes = matches!(
            name,
            "write" | "w" | "discard" | "d" | "writev" | "truncate" | "t"
        );
        if writes && !writable {
            errln!("qcow2-tool: Block node is read-only");
            ok = false;
            continue;
        }
        let succeeded = match (name, &target) {
            ("read" | "r", t) => read(t.guest(), rest),
            ("readv", t) => vectored(rest, READV_USAGE, |words| read(t.guest(), words)),
            ("length" | "l", t) => {
                outln!("{}", cvtstr(t.guest().size() as f64));
                true
            }
            ("map", t) => map(t),
            ("alloc", Target::Qcow2(image)) => alloc(image, rest),
            ("writev", Target::Qcow2(image)) => vectored(rest, WRITEV_USAGE, |w| write(image, w)),
            ("truncate" | "t", Target::Qcow2(image)) => truncate(image, rest),
            ("flush" | "f", Target::Qcow2(image)) => flush(image),
            ("flush" | "f", Target::Raw(_)) => true,
            ("write" | "w", Target::Qcow2(image)) => write(image, rest),
            ("discard" | "d", Target::Qcow2(image)) => discard(image, rest),
            (_, Target::Raw(_)) => {
                outln!("{name} failed: Operation not supported");
                false
            }
            _ => false,
        };
        ok &= succeeded;
        // An image marked corrupt takes no further commands (qemu-io stops too): later
        // writes would build on metadata already known to be wrong.
        if let Target::Qcow2(image) = &target {
            if !succeeded && image.header().is_corrupt() {
                errln!("qcow2-tool: the image is now marked corrupt; the remaining commands are skipped");
                break;
            }
        }
    }
    if let Target::Qcow2(image) = target {
        if writable {
            if let Err(e) = image.close() {
                errln!("qcow2-tool: {e}");
                ok = false;
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// `readv`/`writev`: options and an offset, then several lengths, run as one request of their
/// total (the engine takes one buffer; the output is the same).
fn vectored(words: &[&str], usage: &str, run: impl FnOnce(&[&str]) -> bool) -> bool {
    let cmd = usage.split(' ').next().unwrap_or_default();
    let Ok((_, first)) = getopt(cmd, words, "CfP:qrv", usage) else {
        return false;
    };
    let rest = &words[first..];
    if rest.len() < 2 {
        outln!("{usage}");
        return false;
    }
    let mut total = 0u64;
    for len in &rest[1..] {
        let Ok(n) = number_arg(len) else {
            return false;
        };
        total = total.saturating_add(n);
    }
    let total = total.to_string();
    let mut words: Vec<&str> = words[..first].to_vec();
    words.extend([rest[0], total.as_str()]);
    run(&words)
}

/// `alloc OFF [COUNT]`: how many bytes of the range this image itself allocates (data or zero
/// clusters, not the backing chain), in qemu-io's words.
fn alloc(image: &Image, words: &[&str]) -> bool {
    let Ok(offset) = number_arg(words[0]) else {
        return false;
    };
    let count = match words.get(1) {
        Some(c) => match number_arg(c) {
            Ok(c) => c,
            Err(()) => return false,
        },
        None => 512,
    };
    let end = offset.saturating_add(count).min(image.size());
    let mut allocated = 0;
    if offset < end {
        match image.map(offset, end - offset) {
            Ok(extents) => {
                for e in extents.iter().filter(|e| e.depth == 0) {
                    if !matches!(e.kind, qcow2::ExtentKind::Unallocated { .. }) {
                        allocated += e.length;
                    }
                }
            }
            Err(e) => {
                outln!("alloc failed: {}", errno_text(&e));
                return false;
            }
        }
    }
    outln!(
        "{allocated}/{count} bytes allocated at offset {}",
        cvtstr(offset as f64)
    );
    true
}

/// `truncate SIZE`: the new virtual size, growing or shrinking (qemu-io lets a shrink drop
/// data).
fn truncate(image: &Image, words: &[&str]) -> bool {
    let Ok(size) = number_arg(words[words.len() - 1]) else {
        return false;
    };
    match image.resize(size, true) {
        Ok(()) => true,
        Err(e) => {
            outln!("truncate: {}", errno_text(&e));
            false
        }
    }
}

/// qemu-io's argument count check (on stderr).
fn arg_count_ok(name: &str, n: usize, min: usize, max: Option<usize>) -> bool {
    if n >= min && max.is_none_or(|m| n <= m) {
        return true;
    }
    match max {
        Some(0) => errln!("bad argument count {n} to {name}, expected 0 arguments"),
        Some(m) if m == min => {
            errln!("bad argument count {n} to {name}, expected {min} arguments")
        }
        Some(m) => {
            errln!("bad argument count {n} to {name}, expected between {min} and {m} arguments")
        }
        None => errln!("bad argument count {n} to {name}, expected at least {min} arguments"),
    }
    false
}

/// A command's options (with their arguments) and the index of its first operand.
type Parsed<'a> = (Vec<(char, &'a str)>, usize);

/// getopt(3) over a command's words (no permutation): the options with their arguments, and
/// the index of the first operand. Errors are printed as getopt and qemu-io print them.
fn getopt<'a>(cmd: &str, words: &[&'a str], spec: &str, usage: &str) -> Result<Parsed<'a>, ()> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        if word == "--" {
            i += 1;
            break;
        }
        if word.len() < 2 || !word.starts_with('-') {
            break;
        }
        let flags = &word[1..];
        for (k, c) in flags.char_indices() {
            let takes_arg = match c {
                ':' => None,
                _ => spec
                    .find(c)
                    .map(|at| spec[at + c.len_utf8()..].starts_with(':')),
            };
            match takes_arg {
                None => {
                    errln!("{cmd}: invalid option -- '{c}'");
                    outln!("{usage}");
                    return Err(());
                }
                Some(false) => found.push((c, "")),
                Some(true) => {
                    let rest = &flags[k + c.len_utf8()..];
                    let value = if rest.is_empty() {
                        i += 1;
                        match words.get(i) {
                            Some(v) => *v,
                            None => {
                                errln!("{cmd}: option requires an argument -- '{c}'");
                                outln!("{usage}");
                                return Err(());
                            }
                        }
                    } else {
                        rest
                    };
                    found.push((c, value));
                    break;
                }
            }
        }
        i += 1;
    }
    Ok((found, i))
}

fn parse_pattern(text: &str) -> Option<u8> {
    let value = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        i64::from_str_radix(&text[1..], 8).ok()?
    } else {
        text.parse().ok()?
    };
    u8::try_from(value).ok()
}

/// A pattern option's byte, or qemu-io's message.
fn pattern_arg(text: &str) -> Result<u8, ()> {
    parse_pattern(text).ok_or_else(|| outln!("{text} is not a valid pattern byte"))
}

/// qemu-io's `cvtnum` with its error messages.
fn number_arg(text: &str) -> Result<u64, ()> {
    match parse_size(text) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => {
            outln!("Parsing error: argument too large -- {text}");
            Err(())
        }
        Err(_) if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) => {
            outln!("Parsing error: argument too large -- {text}");
            Err(())
        }
        Err(_) => {
            outln!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
            );
            Err(())
        }
    }
}

/// The `off len` operands of a command.
/// `limit`: the note of the request-size limit message, or `None` for no limit.
fn range_args(words: &[&str], usage: &str, limit: Option<&str>) -> Result<(u64, u64), ()> {
    let [off, len] = words else {
        outln!("{usage}");
        return Err(());
    };
    let offset = number_arg(off)?;
    let len_value = number_arg(len)?;
    if let Some(note) = limit.filter(|_| len_value > MAX_REQUEST) {
        outln!("length cannot exceed {MAX_REQUEST}{note}, given {len}");
        return Err(());
    }
    Ok((offset, len_value))
}

/// Whether `[offset, offset + len)` lies inside a disk of `size` bytes.
fn in_bounds(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// The `strerror` text qemu-io prints for a failed request.
fn errno_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::OutOfBounds { .. } => "Input/output error".into(),
        qcow2::Error::InvalidArgument { .. } => "Invalid argument".into(),
        qcow2::Error::ReadOnly { .. } => "Permission denied".into(),
        qcow2::Error::Io { source, .. } => io_text(source),
        other => other.to_string(),
    }
}

fn read(guest: &dyn Guest, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("read", words, "pP:qrv", READ_USAGE) else {
        return false;
    };
    let (mut pattern, mut verbose, mut quiet) = (None, false, false);
    for (c, value) in flags {
        match c {
            'P' => match pattern_arg(value) {
                Ok(p) => pattern = Some(p),
                Err(()) => return false,
            },
            'q' => quiet = true,
            'v' => verbose = true,
            _ => {}
        }
    }
    let Ok((offset, len)) = range_args(&words[first..], READ_USAGE, Some("")) else {
        return false;
    };
    if !in_bounds(offset, len, guest.size()) {
        outln!("read failed: Input/output error");
        return false;
    }
    let mut buf = vec![0u8; len as usize];
    let started = Instant::now();
    if let Err(e) = guest.read_at(&mut buf, offset) {
        outln!("read failed: {e}");
        return false;
    }
    let elapsed = started.elapsed();
    let mut ok = true;
    if let Some(p) = pattern {
        if buf.iter().any(|&b| b != p) {
            outln!("Pattern verification failed at offset {offset}, {len} bytes");
            ok = false;
        }
    }
    if quiet {
        return ok;
    }
    if verbose {
        out!("{}", dump_buffer(&buf, offset));
    }
    print_report("read", offset, len, elapsed);
    ok
}

fn write(image: &Image, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("write", words, "bcCfnpP:qrs:uz", WRITE_USAGE) else {
        return false;
    };
    let (mut compressed, mut fua, mut no_fallback, mut unmap, mut zero, mut quiet) =
        (false, false, false, false, false, false);
    let mut pattern = None;
    for (c, value) in flags {
        match c {
            'c' => compressed = true,
            'f' => fua = true,
            'n' => no_fallback = true,
            'P' => match pattern_arg(value) {
                Ok(p) => pattern = Some(p),
                Err(()) => return false,
            },
            'q' => quiet = true,
            'u' => unmap = true,
            'z' => zero = true,
            'b' | 'C' | 's' => {
                outln!("write: -{c} is not supported by qcow2-tool");
                return false;
            }
            _ => {}
        }
    }
    if words.len() - first != 2 {
        outln!("{WRITE_USAGE}");
        return false;
    }
    if fua && compressed {
        outln!("-f and -b or -c cannot be specified at the same time");
        return false;
    }
    if no_fallback && !zero {
        outln!("-n requires -z to be specified");
        return false;
    }
    if unmap && !zero {
        outln!("-u requires -z to be specified");
        return false;
    }
    if zero && pattern.is_some() {
        outln!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    // Beyond the request limit, -n (no fallback) zero writes are allowed.
    let note = (!no_fallback).then_some(" without -n");
    let Ok((offset, len)) = range_args(&words[first..], WRITE_USAGE, note) else {
        return false;
    };
    if compressed && !zero {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return false;
        }
        if len % 512 != 0 {
            outln!("{len} is not a sector-aligned value for 'count'");
            return false;
        }
    }
    if !in_bounds(offset, len, image.size()) {
        outln!("write failed: Input/output error");
        return false;
    }
    if compressed && !zero {
        if image.header().has_external_data_file() {
            outln!("write failed: Operation not supported");
            return false;
        }
        // qemu's qcow2 refuses misaligned compressed writes.
        let (cs, size) = (image.cluster_size(), image.size());
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != size) {
            outln!("write failed: Invalid argument");
            return false;
        }
    }
    let started = Instant::now();
    let errno = |e: qcow2::Error| errno_text(&e);
    let result = if zero {
        image.write_zeroes(offset, len, unmap).map_err(errno)
    } else {
        let buf = vec![pattern.unwrap_or(0xcd); len as usize];
        if compressed {
            write_compressed(image, &buf, offset)
        } else {
            image
                .write_at(&buf, offset)
                .and_then(|()| if fua { image.flush() } else { Ok(()) })
                .map_err(errno)
        }
    };
    let elapsed = started.elapsed();
    if let Err(e) = result {
        outln!("write failed: {e}");
        return false;
    }
    if !quiet {
        print_report("wrote", offset, len, elapsed);
    }
    true
}

/// Compressed clusters qemu's qcow2 has in flight at once (QCOW2_MAX_WORKERS).
const QEMU_COMPRESS_TASKS: usize = 8;

/// A compressed write as qemu's qcow2 does it: cluster by cluster, each refused (EIO) when the
/// cluster already has a host cluster. qemu starts clusters as task slots free up and stops
/// once a refusal is seen: the refused cluster's slot still starts one more, so clusters more
/// than its task count past the first refused one are not written.
/// Errors are the `strerror` text qemu-io prints.
fn write_compressed(image: &Image, buf: &[u8], offset: u64) -> Result<(), String> {
    let cs = image.cluster_size() as usize;
    let mut refused = false;
    let mut limit = usize::MAX;
    for (i, cluster) in buf.chunks(cs).enumerate() {
        if i >= limit {
            break;
        }
        let at = offset + (i * cs) as u64;
        if allocated_in_top(image, at, cluster.len() as u64).map_err(|e| errno_text(&e))? {
            refused = true;
            limit = limit.min(i + QEMU_COMPRESS_TASKS + 1);
            continue;
        }
        image
            .write_compressed(cluster, at)
            .map_err(|e| errno_text(&e))?;
    }
    if refused {
        return Err("Input/output error".into());
    }
    Ok(())
}

/// Whether any cluster of `[offset, offset + len)` has a host cluster in the image itself
/// (data, compressed data, or a zero cluster that keeps its allocation).
fn allocated_in_top(image: &Image, offset: u64, len: u64) -> qcow2::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    Ok(image
        .map(offset, len)?
        .iter()
        .any(|e| e.depth == 0 && has_host_cluster(e.kind)))
}

/// Whether an extent of the image itself keeps a host cluster.
fn has_host_cluster(kind: qcow2::ExtentKind) -> bool {
    use qcow2::ExtentKind;
    match kind {
        ExtentKind::Data { .. } | ExtentKind::DataHole { .. } | ExtentKind::Compressed => true,
        ExtentKind::Zero { host_offset } | ExtentKind::Unallocated { host_offset } => {
            host_offset.is_some()
        }
    }
}

fn discard(image: &Image, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("discard", words, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let mut quiet = false;
    for (c, _) in flags {
        match c {
            'q' => quiet = true,
            'C' => {
                outln!("discard: -C is not supported by qcow2-tool");
                return false;
            }
            _ => {}
        }
    }
    let Ok((offset, len)) = range_args(&words[first..], DISCARD_USAGE, Some("")) else {
        return false;
    };
    if !in_bounds(offset, len, image.size()) {
        outln!("discard failed: Input/output error");
        return false;
    }
    let started = Instant::now();
    // The engine discards as qemu's qcow2 does (v2 over a backing file keeps its data; clusters
    // without a host cluster stay as they are).
    let result = image.discard(offset, len);
    if let Err(e) = result {
        outln!("discard failed: {}", errno_text(&e));
        return false;
    }
    if !quiet {
        print_report("discard", offset, len, started.elapsed());
    }
    true
}

fn flush(image: &Image) -> bool {
    match image.flush() {
        Ok(()) => true,
        Err(e) => {
            errln!("qcow2-tool: flush failed: {e}");
            false
        }
    }
}

/// Guest bytes mapped per `map` call.
const MAP_WINDOW: u64 = 1 << 30;

/// qemu-io's `map`: ranges allocated (or not) in the top layer, adjacent ones merged.
fn map(target: &Target) -> bool {
    let image = match target {
        Target::Qcow2(image) => image,
        Target::Raw(raw) => {
            let size = raw.size();
            if size > 0 {
                print_map_line(true, 0, size);
            }
            return true;
        }
    };
    let size = image.size();
    let mut run: Option<(bool, u64, u64)> = None;
    let mut window = 0;
    while window < size {
        let len = MAP_WINDOW.min(size - window);
        let extents = match image.map(window, len) {
            Ok(e) => e,
            Err(e) => {
                errln!("qcow2-tool: Failed to get allocation status: {e}");
                return false;
            }
        };
        for e in extents {
            let allocated = e.depth == 0 && e.present();
            match &mut run {
                Some((a, _, l)) if *a == allocated => *l += e.length,
                _ => {
                    if let Some((a, start, l)) = run {
                        print_map_line(a, start, l);
                    }
                    run = Some((allocated, e.start, e.length));
                }
            }
        }
        window += len;
    }
    if let Some((a, start, l)) = run {
        print_map_line(a, start, l);
    }
    true
}

fn print_map_line(allocated: bool, start: u64, len: u64) {
    outln!(
        "{} ({len:#x}) bytes {} at offset {} ({start:#x})",
        cvtstr(len as f64),
        if allocated {
            "    allocated"
        } else {
            "not allocated"
        },
        cvtstr(start as f64)
    );
}

/// qemu-io's two report lines for one request.
fn print_report(op: &str, offset: u64, len: u64, elapsed: Duration) {
    outln!("{op} {len}/{len} bytes at offset {offset}");
    outln!("{}", report_line(len, elapsed));
}

/// qemu-io's hex dump: 16 bytes a line, then the alphanumeric characters.
fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut s = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        s += &format!("{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            s += &format!("{b:02x} ");
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

/// qemu-io's `cvtstr`: `4 KiB`, `1.907 MiB`, `16 bytes`.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        (1024.0, "KiB"),
    ];
    let (scaled, suffix) = UNITS
        .iter()
        .find(|(unit, _)| value >= *unit)
        .map_or((value, "bytes"), |(unit, name)| (value / unit, *name));
    let fixed = format!("{scaled:.6}");
    match fixed.find(".000") {
        Some(i) => format!("{} {suffix}", &fixed[..i]),
        None => format!("{scaled:.3} {suffix}"),
    }
}

/// qemu-io's timing line for one operation.
fn report_line(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(bytes as f64),
        elapsed.as_secs(),
        elapsed.subsec_millis() / 10,
        cvtstr(bytes as f64 / secs),
        1.0 / secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_matches_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(16.0), "16 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(2_000_000.0), "1.907 MiB");
    }

    #[test]
    fn patterns_parse_as_c_integers() {
        assert_eq!(parse_pattern("0x55"), Some(0x55));
        assert_eq!(parse_pattern("17"), Some(17));
        assert_eq!(parse_pattern("010"), Some(8));
        assert_eq!(parse_pattern("0"), Some(0));
        assert_eq!(parse_pattern("256"), None);
        assert_eq!(parse_pattern("x"), None);
    }

    #[test]
    fn dump_matches_qemu_io_layout() {
        let dump = dump_buffer(&[0x41; 20], 0);
        assert_eq!(
            dump,
            "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n\
             00000010:  41 41 41 41  AAAA\n"
        );
    }
}
