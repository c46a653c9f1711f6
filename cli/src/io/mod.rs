//! `io`: a subset of qemu-io. Commands run in order on one open image (read-write unless
//! `-r`), which is closed cleanly at the end: `read [-bpqrv] [-P PAT] OFF LEN`,
//! `write [-bcfnpqruz] [-P PAT] OFF LEN` (`-b`: the VM state area, see `vmstate`),
//! `discard [-q] OFF LEN`, `flush`, `map`, `alloc`, `length`, `truncate`, `readv`/`writev` and
//! the `aio_` forms (which complete in order here, with the same output). Commands come
//! from `-c` or, without it, from standard input one per line after a `qemu-io> ` prompt, as
//! qemu-io reads them. Output lines, messages (stdout or stderr, as qemu-io) and the exit code
//! (1 when any command failed) follow qemu-io. The options scripts pass (`-t`/`--cache`,
//! `-n`, `--aio`, `-U`, a repeated `-f`) are accepted as qemu-io accepts them. The cache mode
//! decides whether each write is flushed before it completes (writethrough, qemu-io's
//! default), so a later `sigraise` leaves what QEMU would leave, and whether the image's files
//! bypass the page cache (`-n`, `none`, `directsync`: O_DIRECT); aio modes change nothing.
//!
//! This module holds the session (options, the command loop, `open`/`close`/`reopen`); the data
//! commands are in `commands`, their argument parsing in `words`, what they print in `report`.

pub mod breaks;
mod commands;
pub mod corruption_event;
pub mod open;
pub mod reopen;
mod report;
pub mod vmstate;
mod words;
pub mod zero_limits;

pub use report::{errno_text, qemu_open_error};

use self::commands::{
    alloc, alloc_raw, discard, discard_raw, flush, info, map, read, truncate, write, READV_USAGE,
    WRITEV_USAGE,
};
use self::report::cvtstr;
use self::words::{arg_count_ok, getopt, number_arg};
use crate::cache::CacheMode;
use crate::io::open::{parse_option_string, OpenSpec, Options, Target};
use crate::io::zero_limits::ZeroLimits;
use crate::nodes::copy_on_read::CopyOnRead;
use crate::source::{io_text, CmdResult, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Command to run (repeatable), e.g. `write -P 0x11 0 4k`.
    #[arg(short = 'c', value_name = "CMD")]
    commands: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (qcow2 or raw); probed when absent. The last one given wins, as in qemu-io.
    #[arg(short = 'f', long = "format")]
    format: Vec<String>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe); the last one given counts.
    /// `none` and `directsync` bypass the host page cache (O_DIRECT).
    #[arg(short = 't', long = "cache")]
    cache: Vec<String>,
    /// qemu-io's `-n`: cache=none, around the host page cache (O_DIRECT).
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// AIO mode (threads, native, io_uring), checked and accepted.
    #[arg(long = "aio", short = 'i')]
    aio: Vec<String>,
    /// qemu-io's `-k` (native AIO), accepted.
    #[arg(short = 'k', long = "native-aio")]
    native_aio: bool,
    /// Discard mode (ignore/off, unmap/on), checked and accepted.
    #[arg(short = 'd', long = "discard")]
    discard: Option<String>,
    /// Open without taking the write-sharing lock (read-only images only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Writes go to a temporary copy and are dropped at exit (qemu-io's `-s`).
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Reads copy what they find in the backing chain into the image (qemu-io's `-C`).
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    /// FILE is an option string (`driver=qcow2,file.filename=...`), not a file name.
    #[arg(long = "image-opts", action = clap::ArgAction::Count)]
    image_opts: u8,
    /// QEMU objects (secrets); accepted, none are needed by qcow2 without encryption.
    #[arg(long = "object")]
    object: Vec<String>,
    /// Trace events; accepted and ignored.
    #[arg(short = 'T', long = "trace")]
    trace: Vec<String>,
    /// The file to open; without it, commands start with no file (`open` opens one).
    file: Option<String>,
}

/// qemu-io's prompt before each command read from standard input.
const PROMPT: &str = "qemu-io> ";

const OPEN_USAGE: &str =
    "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path";
const REOPEN_USAGE: &str =
    "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options";

/// The open image and how it was opened (for `reopen`).
struct Session {
    target: Option<Target>,
    writable: bool,
    spec: OpenSpec,
    image_opts: bool,
    /// The temporary copy an `-s` open writes to, removed at close.
    temp: Option<std::path::PathBuf>,
    /// A command marked the image corrupt: as QEMU ejects such a node, later I/O commands fail
    /// with "No medium found" (building on metadata known to be wrong would lose data).
    ejected: bool,
    /// Each write is flushed before it completes (the cache mode's write-through).
    writethrough: bool,
    /// Reads copy what they find below the image into it.
    copy_on_read: Option<CopyOnRead>,
    /// The image sits under a `compress` filter: its writes go out compressed.
    compress: bool,
    /// blkdebug breakpoints and the aio requests they hold.
    breaks: crate::io::breaks::Breaks,
}

impl Session {
    /// Whether a blkdebug node sits over the image (breakpoints need one).
    fn has_blkdebug(&self) -> bool {
        self.spec
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("blkdebug:"))
            || ["driver", "file.driver"]
                .iter()
                .any(|k| self.spec.options.get(*k).is_some_and(|d| d == "blkdebug"))
    }

    /// The guest range an aio request (`... OFFSET LEN`) touches, widened to whole clusters.
    fn aio_range(&self, words: &[&str]) -> Option<(u64, u64)> {
        let [.., offset, len] = words else {
            return None;
        };
        let (offset, len) = (number_arg(offset).ok()?, number_arg(len).ok()?);
        let cs = match &self.target {
            Some(Target::Qcow2(image)) => image.cluster_size(),
            _ => 512,
        };
        let end = offset.checked_add(len)?;
        Some((offset - offset % cs, end.checked_next_multiple_of(cs)?))
    }

    /// qemu-io's `openfile`: refuses while a file is open; errors as qemu-io prints them.
    fn open(&mut self, spec: OpenSpec) -> bool {
        if self.target.is_some() {
            report!("file open already, try 'help close'");
            return false;
        }
        let name = spec.name.clone();
        match self.open_target(spec) {
            Ok(()) => true,
            Err(e) => {
                match name {
                    Some(name) => report!("can't open device {name}: {e}"),
                    None => report!("can't open: {e}"),
                }
                false
            }
        }
    }

    fn open_target(&mut self, asked: OpenSpec) -> Result<(), String> {
        let mut spec = asked.clone();
        let copy_on_read = crate::nodes::copy_on_read::take_from(&mut spec)?;
        let filtered = crate::nodes::compress_filter::inner_spec(&spec);
        let under = filtered.as_ref().unwrap_or(&spec);
        let target = if under.snapshot {
            self.open_temporary_copy(under)
        } else {
            under.open()
        }?;
        if filtered.is_some() {
            crate::nodes::compress_filter::check_inner(&target)?;
        }
        self.compress = filtered.is_some();
        self.writable = !spec.read_only
            && !spec
                .options
                .get("read-only")
                .is_some_and(|v| v == "on" || v == "true");
        if let Target::Raw(raw) = &target {
            self.writable &= raw.writable;
        }
        self.target = Some(target);
        self.copy_on_read = copy_on_read;
        // As asked, so a reopen takes the filters out again.
        self.spec = asked;
        Ok(())
    }

    /// `-s`: opens a copy of the file beside it (so relative backing names still resolve);
    /// `close` removes it, so the writes never reach the file itself.
    fn open_temporary_copy(&mut self, spec: &OpenSpec) -> Result<Target, String> {
        let (file, _) = spec.resolve()?;
        let path = std::path::Path::new(&file);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let copy = path.with_file_name(format!(".{name}.io-snapshot-{}", std::process::id()));
        std::fs::copy(path, &copy)
            .map_err(|e| format!("Could not open '{file}': {}", io_text(&e)))?;
        self.temp = Some(copy.clone());
        let mut on_copy = spec.clone();
        on_copy.snapshot = false;
        on_copy.options.remove("filename");
        on_copy
            .options
            .insert("file.filename".into(), copy.to_string_lossy().into_owned());
        on_copy.open().inspect_err(|_| self.remove_temp())
    }

    fn remove_temp(&mut self) {
        if let Some(t) = self.temp.take() {
            let _ = std::fs::remove_file(t);
        }
    }

    /// Closes the open image cleanly (flushing what it holds).
    fn close(&mut self) -> bool {
        self.ejected = false;
        self.copy_on_read = None;
        let closed = self.close_target();
        self.remove_temp();
        closed
    }

    fn close_target(&mut self) -> bool {
        match self.target.take() {
            Some(Target::Qcow2(image)) if self.writable => match image.close() {
                Ok(()) => true,
                Err(e) => {
                    report!("{e}");
                    false
                }
            },
            _ => true,
        }
    }

    /// Write-through: a completed write is flushed, as QEMU flushes a write it was asked to
    /// make durable (its failure fails the write).
    fn settle_write(&self, target: &Target) -> bool {
        if !self.writethrough {
            return true;
        }
        let flushed = match target {
            Target::Qcow2(image) => image.flush().map_err(|e| e.to_string()),
            Target::Raw(raw) => raw.flush().map_err(|e| io_text(&e)),
        };
        flushed.map_err(|e| outln!("write failed: {e}")).is_ok()
    }

    /// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
    fn open_command(&mut self, words: &[&str]) -> bool {
        let Ok((flags, first)) = getopt("open", words, "snCro:ki:t:d:U", OPEN_USAGE) else {
            return false;
        };
        let mut spec = OpenSpec::default();
        let mut options = Options::new();
        let mut writethrough = true;
        for (c, value) in flags {
            match c {
                'r' => spec.read_only = true,
                's' => spec.snapshot = true,
                'C' => spec.copy_on_read = true,
                'U' => spec.force_share = true,
                'n' => {
                    writethrough = false;
                    spec.direct_io = true;
                }
                't' => match CacheMode::parse(value) {
                    Some(mode) => {
                        writethrough = mode.write_through();
                        spec.direct_io = mode.direct;
                    }
                    None => {
                        report!("Invalid cache option: {value}");
                        return false;
                    }
                },
                'o' => {
                    if self.image_opts {
                        outln!("--image-opts and 'open -o' are mutually exclusive");
                        return false;
                    }
                    if let Err(e) = parse_option_string(value, &mut options) {
                        report!("{e}");
                        return false;
                    }
                }
                _ => {}
            }
        }
        let rest = &words[first..];
        let mut rest = rest.to_vec();
        if self.image_opts && rest.len() == 1 {
            if let Err(e) = parse_option_string(rest[0], &mut options) {
                report!("{e}");
                return false;
            }
            rest.clear();
        }
        let (read_only, force_share, snapshot, copy_on_read, direct_io) = (
            spec.read_only,
            spec.force_share,
            spec.snapshot,
            spec.copy_on_read,
            spec.direct_io,
        );
        let spec = match rest.as_slice() {
            [name] => match OpenSpec::from_filename(name, options) {
                Ok(s) => s,
                Err(e) => {
                    report!("can't open device {name}: {e}");
                    return false;
                }
            },
            [] => OpenSpec {
                options,
                ..OpenSpec::default()
            },
            _ => {
                outln!("{OPEN_USAGE}");
                return false;
            }
        };
        let opened = self.open(OpenSpec {
            read_only,
            force_share,
            snapshot,
            copy_on_read,
            direct_io,
            ..spec
        });
        if opened {
            self.writethrough = writethrough;
        }
        opened
    }

    /// `reopen [-r|-w] [-c cache] [-o options]`: the image closed and opened again with the new
    /// mode and options on top of the old ones.
    fn reopen_command(&mut self, words: &[&str]) -> bool {
        let Ok((flags, first)) = getopt("reopen", words, "c:o:rw", REOPEN_USAGE) else {
            return false;
        };
        if first != words.len() {
            outln!("{REOPEN_USAGE}");
            return false;
        }
        let mut spec = self.spec.clone();
        let mut mode = None;
        let mut cache = None;
        let mut options = Options::new();
        for (c, value) in flags {
            match c {
                'r' | 'w' if mode.is_some() => {
                    report!("Only one -r/-w option may be given");
                    return false;
                }
                'r' => mode = Some(true),
                'w' => mode = Some(false),
                'c' => match CacheMode::parse(value) {
                    Some(mode) => cache = Some(mode),
                    None => {
                        report!("Invalid cache option: {value}");
                        return false;
                    }
                },
                'o' => {
                    if let Err(e) = parse_option_string(value, &mut options) {
                        report!("{e}");
                        return false;
                    }
                }
                _ => {}
            }
        }
        if options.contains_key("read-only") && mode.is_some() {
            report!("Cannot set both -r/-w and 'read-only'");
            return false;
        }
        if let Some(target) = &self.target {
            if let Err(e) = crate::io::reopen::check(&self.spec, target, &options, cache.is_some())
            {
                report!("{e}");
                return false;
            }
        }
        if let Some(ro) = options.remove("read-only") {
            mode = crate::io::reopen::parse_bool("read-only", &ro).ok();
        }
        if let Some(read_only) = mode {
            spec.read_only = read_only;
        }
        if let Some(cache) = cache {
            spec.direct_io = cache.direct;
            spec.options.remove("cache.direct");
        }
        spec.options.remove("read-only");
        // As qcow2 joins reopen options: a new value of one of these groups replaces the
        // whole group's old values, so they never conflict with each other.
        let groups: [fn(&str) -> bool; 2] = [
            |k| matches!(k, "cache-size" | "l2-cache-size" | "refcount-cache-size"),
            |k| k == "overlap-check" || k.starts_with("overlap-check."),
        ];
        for in_group in groups {
            if options.keys().any(|k| in_group(k)) {
                spec.options.retain(|k, _| !in_group(k));
            }
        }
        for (k, v) in options {
            spec.options.insert(k, v);
        }
        let was_open = self.spec.clone();
        if !self.close() {
            return false;
        }
        match self.open_target(spec) {
            Ok(()) => {
                if let Some(cache) = cache {
                    self.writethrough = cache.write_through();
                }
                true
            }
            Err(e) => {
                report!("{e}");
                // The old image stays open when the new options are refused, as in a failed
                // bdrv_reopen.
                let _ = self.open(was_open);
                false
            }
        }
    }
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let mut cache = None;
    for mode in &args.cache {
        cache = Some(
            CacheMode::parse(mode).ok_or_else(|| fail(format!("Invalid cache option: {mode}")))?,
        );
    }
    for mode in &args.aio {
        if !matches!(mode.as_str(), "threads" | "native" | "io_uring") {
            return Err(fail(format!("Invalid aio option: {mode}")));
        }
    }
    if let Some(mode) = args.discard.as_deref() {
        if !matches!(mode, "ignore" | "off" | "unmap" | "on") {
            return Err(fail(format!("Invalid discard option: {mode}")));
        }
    }
    let _ = (args.native_aio, &args.object, &args.trace);
    let format = args.format.last().cloned();
    if format.is_some() && args.image_opts > 0 {
        return Err(fail(
            "--image-opts and --format are mutually exclusive".into(),
        ));
    }
    let mut session = Session {
        target: None,
        writable: false,
        spec: OpenSpec::default(),
        image_opts: args.image_opts > 0,
        temp: None,
        ejected: false,
        copy_on_read: None,
        compress: false,
        writethrough: match cache {
            Some(mode) => mode.write_through(),
            None => !args.nocache,
        },
        breaks: Default::default(),
    };
    if let Some(file) = &args.file {
        let mut spec = if args.image_opts > 0 {
            let mut options = Options::new();
            parse_option_string(file, &mut options).map_err(fail)?;
            OpenSpec {
                options,
                ..OpenSpec::default()
            }
        } else {
            match OpenSpec::from_filename(file, Options::new()) {
                Ok(spec) => spec,
                Err(e) => return Err(fail(format!("can't open device {file}: {e}"))),
            }
        };
        spec.read_only = args.read_only;
        spec.force_share = args.force_share;
        spec.snapshot = args.snapshot;
        spec.copy_on_read = args.copy_on_read;
        spec.direct_io = cache.map_or(args.nocache, |mode| mode.direct);
        spec.format = format;
        if args.force_share && !args.read_only {
            return Err(fail(format!(
                "can't open device {file}: force-share=on can only be used with read-only images"
            )));
        }
        if !session.open(spec) {
            return Ok(1);
        }
    }
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
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&name, rest)) = words.split_first() else {
            continue;
        };
        if matches!(name, "quit" | "q") {
            break;
        }
        match run_command(&mut session, name, rest) {
            Flow::Done(succeeded) => ok &= succeeded,
            Flow::Stop => break,
        }
    }
    if !session.close() {
        ok = false;
    }
    Ok(if ok { 0 } else { 1 })
}

/// After a command: go on (with whether it succeeded) or stop reading commands.
enum Flow {
    Done(bool),
    Stop,
}

fn run_command(session: &mut Session, name: &str, rest: &[&str]) -> Flow {
    use crate::io::breaks::Outcome;
    match name {
        "break" | "remove_break" | "resume" | "wait_break" => {
            if session.target.is_none() {
                errln!("no file open, try 'help open'");
                return Flow::Done(false);
            }
            let node = session.has_blkdebug();
            return match session.breaks.command(name, rest, node) {
                Outcome::Done(ok) => Flow::Done(ok),
                Outcome::Run(held) => Flow::Done(run_held(session, held)),
            };
        }
        "aio_write" | "aio_read" if session.breaks.active() => {
            if let Some(range) = session.aio_range(rest) {
                if session.breaks.hold(name, rest, range).is_some() {
                    return Flow::Done(true);
                }
            }
        }
        "aio_flush" if session.breaks.active() => {
            let held = session.breaks.release();
            if !run_held(session, held) {
                return Flow::Done(false);
            }
        }
        _ => {}
    }
    run_now(session, name, rest)
}

/// Runs requests a breakpoint held, in order; whether all succeeded.
fn run_held(session: &mut Session, held: Vec<crate::io::breaks::Held>) -> bool {
    let mut ok = true;
    for h in held {
        let words: Vec<&str> = h.words.iter().map(String::as_str).collect();
        if let Flow::Done(succeeded) = run_now(session, &h.name, &words) {
            ok &= succeeded;
        }
    }
    ok
}

/// Runs a command now (no breakpoint holds it).
fn run_now(session: &mut Session, name: &str, rest: &[&str]) -> Flow {
    // The aio forms complete before the next command here: their output is the same.
    let name = match name {
        "aio_read" => "read",
        "aio_write" => "write",
        "aio_flush" => "flush",
        "c" => "close",
        "o" => "open",
        other => other,
    };
    let (min, max) = match name {
        "read" | "r" | "write" | "w" | "discard" | "d" => (2, None),
        "readv" | "writev" => (2, None),
        "flush" | "f" | "map" | "length" | "l" | "close" | "info" | "i" => (0, Some(0)),
        "alloc" => (1, Some(2)),
        "truncate" | "t" => (1, Some(3)),
        "sigraise" => (1, Some(1)),
        "open" | "reopen" => (0, None),
        _ => {
            errln!("command \"{name}\" not found");
            return Flow::Done(false);
        }
    };
    if !arg_count_ok(name, rest.len(), min, max) {
        return Flow::Done(false);
    }
    match name {
        "open" => return Flow::Done(session.open_command(rest)),
        "sigraise" => return sigraise(rest[0]),
        _ => {}
    }
    if session.target.is_none() {
        errln!("no file open, try 'help open'");
        return Flow::Done(false);
    }
    match name {
        "close" => return Flow::Done(session.close()),
        "reopen" => return Flow::Done(session.reopen_command(rest)),
        _ => {}
    }
    let writes = matches!(
        name,
        "write" | "w" | "discard" | "d" | "writev" | "truncate" | "t"
    );
    if writes && !session.writable {
        report!("Block node is read-only");
        return Flow::Done(false);
    }
    if writes
        && session
            .copy_on_read
            .as_ref()
            .is_some_and(|c| !c.takes_other_requests())
    {
        outln!("{name}: a blkdebug node above the image takes only reads in qcow2-tool");
        return Flow::Done(false);
    }
    if session.ejected {
        let long = match name {
            "r" => "read",
            "w" => "write",
            "d" => "discard",
            "f" => "flush",
            "t" => "truncate",
            "l" => "length",
            "i" => "info",
            other => other,
        };
        outln!("{long} failed: No medium found");
        return Flow::Done(false);
    }
    let Some(target) = &session.target else {
        return Flow::Done(false);
    };
    let cor = session.copy_on_read.as_ref();
    let succeeded = match (name, target) {
        ("read" | "r", t) => read("read", t, cor, rest),
        ("readv", t) => vectored(rest, READV_USAGE, |words| read("readv", t, cor, words)),
        ("length" | "l", t) => {
            outln!("{}", cvtstr(t.guest().size() as f64));
            true
        }
        ("map", t) => map(t),
        ("info" | "i", t) => info(t),
        ("alloc", Target::Qcow2(image)) => alloc(image, rest),
        ("alloc", Target::Raw(raw)) => alloc_raw(raw, rest),
        ("writev", t) => {
            let c = session.compress;
            vectored(rest, WRITEV_USAGE, |w| write("writev", t, w, c, None))
                && session.settle_write(t)
        }
        ("write" | "w", t) => match ZeroLimits::from_options(&session.spec.options) {
            Ok(limits) => {
                write("write", t, rest, session.compress, limits) && session.settle_write(t)
            }
            Err(e) => {
                outln!("write failed: {e}");
                false
            }
        },
        ("truncate" | "t", Target::Qcow2(image)) => truncate(image, rest),
        ("truncate" | "t", Target::Raw(raw)) => match number_arg(rest[rest.len() - 1]) {
            Ok(size) => raw
                .truncate(size)
                .map_err(|e| outln!("truncate: {}", io_text(&e)))
                .is_ok(),
            Err(()) => false,
        },
        ("flush" | "f", Target::Qcow2(image)) => flush(image),
        ("flush" | "f", Target::Raw(raw)) => raw.flush().is_ok(),
        ("discard" | "d", Target::Qcow2(image)) => discard(image, rest),
        ("discard" | "d", Target::Raw(raw)) => discard_raw(raw, rest),
        _ => false,
    };
    if let Some(Target::Qcow2(image)) = &session.target {
        if !succeeded && session.writable && image.header().is_corrupt() {
            session.ejected = true;
        }
    }
    Flow::Done(succeeded)
}

/// `sigraise SIG`: the process raises the signal at once (no clean close), after flushing its
/// output, as qemu-io does: scripts use it to leave an image as a crash would.
fn sigraise(arg: &str) -> Flow {
    let Ok(n) = number_arg(arg) else {
        return Flow::Done(false);
    };
    let Some(signal) = i32::try_from(n)
        .ok()
        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
    else {
        outln!("signal argument '{arg}' is too large to be a valid signal");
        return Flow::Done(false);
    };
    let _ = crate::console::finish();
    let _ = nix::sys::signal::raise(signal);
    Flow::Stop
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

#[cfg(test)]
mod tests {
    use super::report::{cvtstr, dump_buffer};
    use super::words::parse_pattern;

    #[test]
    fn cvtstr_matches_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(16.0), "16 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(2_000_000.0), "1.907 MiB");
        assert_eq!(cvtstr(1_049_600.0), "1.001 MiB");
        assert_eq!(cvtstr(2_097_151.0), "2 MiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
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
