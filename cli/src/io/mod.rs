//! `io`: a subset of qemu-io. Commands run in order on one open image (read-write unless
//! `-r`), which is closed cleanly at the end: `read [-bpqrv] [-P PAT] OFF LEN`,
//! `write [-bcfnpqruz] [-P PAT] OFF LEN` (`-b`: the VM state area, see `vmstate`),
//! `discard [-q] OFF LEN`, `flush`, `map`, `alloc`, `length`, `truncate`, `readv`/`writev` and
//! the `aio_` forms (which complete in order here, with the same output). Commands come
//! from `-c` or, without it, from standard input one per line after a `qemu-io> ` prompt, as
//! qemu-io reads them. Output lines, messages (stdout or stderr, as qemu-io) and the exit code
//! (1 when any command failed) follow qemu-io. The options scripts pass (`-t`/`--cache`,
//! `-n`, `--aio`, `-U`, a repeated `-f`) are accepted as qemu-io accepts them. The cache mode
//! decides only whether each write is flushed before it completes (writethrough, qemu-io's
//! default), so a later `sigraise` leaves what QEMU would leave; aio modes change nothing.

pub mod breaks;
pub mod corruption_event;
pub mod open;
pub mod reopen;
pub mod vmstate;
pub mod zero_limits;

use std::time::{Duration, Instant};

use qcow2::Image;

use crate::io::open::{parse_option_string, OpenSpec, Options, RawImage, Target};
use crate::io::zero_limits::ZeroLimits;
use crate::nodes::copy_on_read::CopyOnRead;
use crate::size::parse_size;
use crate::source::{io_text, CmdResult, Failure, Guest};

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
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (qcow2 or raw); probed when absent. The last one given wins, as in qemu-io.
    #[arg(short = 'f', long = "format")]
    format: Vec<String>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe), checked and accepted; the
    /// last one given counts.
    #[arg(short = 't', long = "cache")]
    cache: Vec<String>,
    /// qemu-io's `-n` (cache=none), accepted.
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

fn valid_cache_mode(mode: &str) -> bool {
    matches!(
        mode,
        "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe"
    )
}

/// Whether a cache mode completes a write only once it is durable.
fn is_writethrough(mode: &str) -> bool {
    matches!(mode, "writethrough" | "directsync")
}

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
                'n' => writethrough = false,
                't' if !valid_cache_mode(value) => {
                    report!("Invalid cache option: {value}");
                    return false;
                }
                't' => writethrough = is_writethrough(value),
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
        let (read_only, force_share, snapshot, copy_on_read) = (
            spec.read_only,
            spec.force_share,
            spec.snapshot,
            spec.copy_on_read,
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
        let mut writethrough = None;
        let mut options = Options::new();
        for (c, value) in flags {
            match c {
                'r' | 'w' if mode.is_some() => {
                    report!("Only one -r/-w option may be given");
                    return false;
                }
                'r' => mode = Some(true),
                'w' => mode = Some(false),
                'c' if !valid_cache_mode(value) => {
                    report!("Invalid cache option: {value}");
                    return false;
                }
                'c' => writethrough = Some(is_writethrough(value)),
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
            if let Err(e) =
                crate::io::reopen::check(&self.spec, target, &options, writethrough.is_some())
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
                if let Some(writethrough) = writethrough {
                    self.writethrough = writethrough;
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
    for mode in &args.cache {
        if !valid_cache_mode(mode) {
            return Err(fail(format!("Invalid cache option: {mode}")));
        }
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
    let _ = (args.nocache, args.native_aio, &args.object, &args.trace);
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
        writethrough: match args.cache.last() {
            Some(mode) => is_writethrough(mode),
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
    // What lies past the end of the disk is not counted, as qemu-io stops at the end.
    let count = count.min(image.size().saturating_sub(offset));
    let end = offset + count;
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
                outln!("is_allocated failed: {}", errno_text(&e));
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
pub fn errno_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::OutOfBounds { .. } => "Input/output error".into(),
        qcow2::Error::InvalidArgument { .. } => "Invalid argument".into(),
        qcow2::Error::ReadOnly { .. } => "Permission denied".into(),
        qcow2::Error::Corrupt { .. } | qcow2::Error::MarkedCorrupt { .. } => {
            "Input/output error".into()
        }
        qcow2::Error::Io { source, .. } => io_text(source),
        other => other.to_string(),
    }
}

/// `read [-bCpqrv] [-P pattern [-s off] [-l len]] off len`; `-s`/`-l` limit the pattern check to
/// part of the data read.
fn read(cmd: &str, target: &Target, cor: Option<&CopyOnRead>, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt(cmd, words, "bCl:pP:qrs:v", READ_USAGE) else {
        return false;
    };
    let guest = target.guest();
    let (mut pattern, mut verbose, mut quiet, mut vm_state) = (None, false, false, false);
    let (mut pattern_offset, mut pattern_count) = (None, None);
    for (c, value) in flags {
        match c {
            'P' => match pattern_arg(value) {
                Ok(p) => pattern = Some(p),
                Err(()) => return false,
            },
            's' => match number_arg(value) {
                Ok(n) => pattern_offset = Some(n),
                Err(()) => return false,
            },
            'l' => match number_arg(value) {
                Ok(n) => pattern_count = Some(n),
                Err(()) => return false,
            },
            'q' => quiet = true,
            'v' => verbose = true,
            'b' => vm_state = true,
            _ => {}
        }
    }
    let Ok((offset, len)) = range_args(&words[first..], READ_USAGE, Some("")) else {
        return false;
    };
    if pattern.is_none() && (pattern_offset.is_some() || pattern_count.is_some()) {
        outln!("{READ_USAGE}");
        return false;
    }
    let pattern_offset = pattern_offset.unwrap_or(0);
    let pattern_count = pattern_count.unwrap_or(len.wrapping_sub(pattern_offset));
    if pattern_offset > len || pattern_count > len - pattern_offset {
        outln!("pattern verification range exceeds end of read data");
        return false;
    }
    if vm_state && !vmstate::aligned(offset, len) {
        return false;
    }
    if !vm_state && !in_bounds(offset, len, guest.size()) {
        outln!("{cmd} failed: Input/output error");
        return false;
    }
    let mut buf = vec![0u8; len as usize];
    let started = Instant::now();
    let result = match (vm_state, cor, target) {
        (true, _, _) => vmstate::read(target, &mut buf, offset),
        (false, Some(cor), Target::Qcow2(image)) => cor
            .read(image, &mut buf, offset)
            .map_err(|e| errno_text(&e)),
        (false, None, Target::Qcow2(image)) => Guest::read_at(
            &crate::io::corruption_event::Reporting(image),
            &mut buf,
            offset,
        ),
        _ => guest.read_at(&mut buf, offset),
    };
    if let Err(e) = result {
        outln!("{cmd} failed: {}", read_error_text(&e));
        return false;
    }
    let elapsed = started.elapsed();
    let mut ok = true;
    if let Some(p) = pattern {
        let checked = &buf[pattern_offset as usize..(pattern_offset + pattern_count) as usize];
        if checked.iter().any(|&b| b != p) {
            outln!(
                "Pattern verification failed at offset {}, {pattern_count} bytes",
                offset + pattern_offset
            );
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

/// A read error as qemu-io prints it: the engine's detail is QEMU's EIO.
fn read_error_text(e: &str) -> String {
    if e.contains("Input/output error") || e.contains("compressed") || e.contains("corrupt") {
        "Input/output error".into()
    } else {
        e.to_owned()
    }
}

/// `write`; `compress_filter`: the image sits under a `compress` filter node; `zero_limits`:
/// how a blkdebug node over the image splits zero writes.
fn write(
    cmd: &str,
    target: &Target,
    words: &[&str],
    compress_filter: bool,
    zero_limits: Option<ZeroLimits>,
) -> bool {
    let Ok((flags, first)) = getopt(cmd, words, "bcCfnpP:qrs:uz", WRITE_USAGE) else {
        return false;
    };
    let (mut compressed, mut fua, mut no_fallback, mut unmap, mut zero, mut quiet) =
        (false, false, false, false, false, false);
    let mut vm_state = false;
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
            'b' => vm_state = true,
            'C' | 's' => {
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
    if vm_state && zero {
        outln!("-b and -z cannot be specified at the same time");
        return false;
    }
    if fua && (compressed || vm_state) {
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
    if vm_state {
        if !vmstate::aligned(offset, len) {
            return false;
        }
        let buf = vec![pattern.unwrap_or(0xcd); len as usize];
        let started = Instant::now();
        if let Err(e) = vmstate::write(target, &buf, offset) {
            outln!("{cmd} failed: {e}");
            return false;
        }
        if !quiet {
            print_report("wrote", offset, len, started.elapsed());
        }
        return true;
    }
    if !in_bounds(offset, len, target.guest().size()) {
        outln!("{cmd} failed: Input/output error");
        return false;
    }
    let image = match target {
        Target::Qcow2(image) => image,
        Target::Raw(raw) => {
            if compressed {
                outln!("{cmd} failed: Operation not supported");
                return false;
            }
            let started = Instant::now();
            let buf = vec![if zero { 0 } else { pattern.unwrap_or(0xcd) }; len as usize];
            let result =
                raw.write_at(&buf, offset)
                    .and_then(|()| if fua { raw.flush() } else { Ok(()) });
            if let Err(e) = result {
                outln!("{cmd} failed: {}", io_text(&e));
                return false;
            }
            if !quiet {
                print_report("wrote", offset, len, started.elapsed());
            }
            return true;
        }
    };
    if compressed && !zero {
        if image.header().has_external_data_file() {
            outln!("{cmd} failed: Operation not supported");
            return false;
        }
        // qemu's qcow2 refuses misaligned compressed writes.
        let (cs, size) = (image.cluster_size(), image.size());
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != size) {
            outln!("{cmd} failed: Invalid argument");
            return false;
        }
    }
    let started = Instant::now();
    let was_corrupt = image.header().is_corrupt();
    let errno = |e: qcow2::Error| {
        if let qcow2::Error::Corrupt { .. } = &e {
            crate::io::corruption_event::report(image, &e, was_corrupt, false);
        }
        errno_text(&e)
    };
    let result = if zero {
        let pieces = match zero_limits {
            Some(limits) if !no_fallback => limits.pieces(offset, len),
            _ => vec![(offset, len, false)],
        };
        pieces
            .into_iter()
            .try_for_each(|(at, n, as_data)| {
                if as_data {
                    image.write_at(&vec![0; n as usize], at)
                } else {
                    image.write_zeroes(at, n, unmap)
                }
            })
            .map_err(errno)
    } else {
        let buf = vec![pattern.unwrap_or(0xcd); len as usize];
        if compressed {
            write_compressed(image, &buf, offset)
        } else if compress_filter {
            crate::nodes::compress_filter::write(image, &buf, offset, |whole, at| {
                write_compressed(image, whole, at)
            })
        } else {
            image
                .write_at(&buf, offset)
                .and_then(|()| if fua { image.flush() } else { Ok(()) })
                .map_err(errno)
        }
    };
    let elapsed = started.elapsed();
    if let Err(e) = result {
        outln!("{cmd} failed: {e}");
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

/// `alloc` on a raw image: everything is allocated.
fn alloc_raw(raw: &RawImage, words: &[&str]) -> bool {
    let Ok(offset) = number_arg(words[0]) else {
        return false;
    };
    let count = match words.get(1).map(|c| number_arg(c)) {
        Some(Ok(c)) => c,
        Some(Err(())) => return false,
        None => 512,
    };
    let end = offset.saturating_add(count).min(raw.size_now());
    outln!(
        "{}/{count} bytes allocated at offset {}",
        end.saturating_sub(offset),
        cvtstr(offset as f64)
    );
    true
}

/// `discard` on a raw image: accepted without effect (a hint QEMU may ignore too).
fn discard_raw(raw: &RawImage, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("discard", words, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let Ok((offset, len)) = range_args(&words[first..], DISCARD_USAGE, Some("")) else {
        return false;
    };
    if !in_bounds(offset, len, raw.size_now()) {
        outln!("discard failed: Input/output error");
        return false;
    }
    if let Err(e) = raw.discard(offset, len) {
        outln!("discard failed: {}", io_text(&e));
        return false;
    }
    if !flags.iter().any(|(c, _)| *c == 'q') {
        print_report("discard", offset, len, Duration::ZERO);
    }
    true
}

/// qemu-io's `info`: the format and, for qcow2, the cluster size.
fn info(target: &Target) -> bool {
    match target {
        Target::Qcow2(image) => {
            outln!("format name: qcow2");
            outln!("cluster size: {}", cvtstr(image.cluster_size() as f64));
            // Where QEMU would save VM state: the guest offset past the last L1 entry the
            // virtual size needs.
            let header = image.header();
            let vm_state = header.l1_entries_for(header.size) << header.l1_shift();
            outln!("vm state offset: {}", cvtstr(vm_state as f64));
            let bitmaps = crate::img::info::read_bitmaps(image).unwrap_or_default();
            out!(
                "{}",
                crate::img::info::format_specific(&image.info(), bitmaps.as_deref())
            );
        }
        Target::Raw(raw) if raw.driver == "raw" => {
            outln!("format name: raw");
            outln!("cluster size: 0 bytes");
            outln!("vm state offset: 0 bytes");
        }
        Target::Raw(raw) => {
            // A protocol driver names itself twice (as a format and as a protocol) and has
            // no format information to give, which fails the command.
            outln!("format name: {}", raw.driver);
            outln!("format name: {}", raw.driver);
            return false;
        }
    }
    true
}

/// An open failure in qemu's words where they are known, else the engine's own message.
pub fn qemu_open_error(file: &str, e: &qcow2::Error) -> String {
    let text = e.to_string();
    if let qcow2::Error::Chain {
        role: "backing",
        file: backing,
        problem: qcow2::ChainProblem::Missing,
        ..
    } = e
    {
        return format!(
            "Could not open backing file: Could not open '{backing}': No such file or directory"
        );
    }
    if let qcow2::Error::Io { source, .. } = e {
        if source.kind() == std::io::ErrorKind::NotFound && !text.contains("backing") {
            return format!("Could not open '{file}': {}", io_text(source));
        }
    }
    crate::source::open_error_text(e)
}

fn flush(image: &Image) -> bool {
    match image.flush() {
        Ok(()) => true,
        Err(e) => {
            report!("flush failed: {e}");
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
            let size = raw.size_now();
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
                report!("Failed to get allocation status: {e}");
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
    let (fixed, suffix) = match UNITS.iter().find(|(unit, _)| value >= *unit) {
        Some((unit, name)) => (format!("{:.3}", value / unit), *name),
        None => (format!("{value:.6}"), "bytes"),
    };
    // qemu-io cuts the number at its first ".000" (so 2.0004 MiB prints as "2 MiB").
    match fixed.find(".000") {
        Some(i) => format!("{} {suffix}", &fixed[..i]),
        None => format!("{fixed} {suffix}"),
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
