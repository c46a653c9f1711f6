//! `serve`: exports images over NBD with qemu-nbd's option spelling (`-k`, `-b`, `-p`, `-x`,
//! `-r`, `-f`, `-t`, `-e`, `-A`, `-B`, `-D`, `-n`, `--cache`, `--aio`, `--pid-file`), several at
//! once as `NAME=PATH`; with `--qmp SOCKET --group DIR`, a QMP monitor takes live group
//! snapshots of them. A thin
//! shell over the `qcow2-nbd` library: it opens the images, listens, and on SIGINT/SIGTERM/
//! SIGHUP (or, without `-t`, when the last client leaves) stops the server, flushes and closes
//! every image, and removes the socket and the pid file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use qcow2::{DiskTop, Image, OpenOptions};
use qcow2_nbd::{ConnectionOptions, DetectZeroes, Export, Listener, Server, ServerOptions};
use qcow2_qmp::{Disk, Monitor, WriteCache};
use qcow2_transaction::Group;

use crate::cache::CacheMode;
use crate::source::{open_image, CmdResult, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on (loopback unless given).
    #[arg(
        short = 'b',
        long = "bind",
        value_name = "ADDR",
        default_value = "127.0.0.1"
    )]
    bind: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Export name of a single image (default "").
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    export_name: Option<String>,
    /// Export description (INFO_DESCRIPTION and LIST).
    #[arg(short = 'D', long = "description", value_name = "TEXT")]
    description: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format; only qcow2.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once (0 = unlimited); any value but 1 advertises multi-conn.
    #[arg(short = 'e', long = "shared", default_value_t = 1, value_name = "NUM")]
    shared: usize,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer this persistent bitmap as the context `qemu:dirty-bitmap:NAME` (repeatable; every
    /// image served must have it).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmap: Vec<String>,
    /// What TRIM and hole-punching zero writes do: `unmap` frees clusters, `ignore` keeps them.
    #[arg(long = "discard", default_value = "unmap", value_name = "MODE")]
    discard: String,
    /// What a write of nothing but zeros becomes: `off` (data), `on` (a zero write), `unmap`
    /// (a zero write that frees clusters; needs `--discard=unmap`).
    #[arg(long = "detect-zeroes", value_name = "MODE")]
    detect_zeroes: Option<String>,
    /// Cache mode: `writeback` (the default), `none` and `directsync` (around the host page
    /// cache, O_DIRECT), `writethrough` and `directsync` (each write durable before its reply),
    /// `unsafe` (never sync).
    #[arg(long = "cache", value_name = "MODE")]
    cache: Option<String>,
    /// Bypass the host page cache: `--cache=none`.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// AIO mode (threads, native, io_uring), checked as qemu-nbd checks it (`native` needs
    /// `--cache=none` or `directsync`); requests run on worker threads in every mode.
    #[arg(long = "aio", value_name = "MODE")]
    aio: Vec<String>,
    /// Write the process id here once the server listens (removed on exit).
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Worker threads per connection (0: one request at a time).
    #[arg(long = "workers", default_value_t = 4)]
    workers: usize,
    /// Listen for QMP clients on this unix socket (qemu-storage-daemon's monitor): live group
    /// snapshots and bitmap changes of the served disks. Needs `--group`.
    #[arg(long = "qmp", value_name = "SOCKET")]
    qmp: Option<PathBuf>,
    /// The group directory whose journal every QMP transaction goes through (recovered before
    /// the images open; `qcow2-tool recover DIR` after a crash).
    #[arg(long = "group", value_name = "DIR")]
    group: Option<PathBuf>,
    /// `PATH`, or `NAME=PATH` for each of several exports.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
}

/// Splits the positional arguments into (export name, path) pairs.
fn exports_of(args: &Args) -> Result<Vec<(String, PathBuf)>, String> {
    if args.images.len() == 1 {
        let arg = &args.images[0];
        if let Some(name) = &args.export_name {
            return Ok(vec![(name.clone(), PathBuf::from(arg))]);
        }
        return Ok(vec![match arg.split_once('=') {
            Some((name, path)) if !Path::new(arg).exists() => (name.to_string(), path.into()),
            _ => (String::new(), PathBuf::from(arg)),
        }]);
    }
    if args.export_name.is_some() {
        return Err("-x names a single export; give several images as NAME=PATH".into());
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for arg in &args.images {
        let Some((name, path)) = arg.split_once('=') else {
            return Err(format!(
                "'{arg}': several images must be given as NAME=PATH"
            ));
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("export name '{name}' is given twice"));
        }
        out.push((name.to_string(), path.into()));
    }
    Ok(out)
}

/// Refuses bitmaps the image lacks or cannot vouch for, with qemu-nbd's messages.
fn check_bitmaps(image: &Image, names: &[String]) -> Result<(), String> {
    let present = image.bitmaps();
    for name in names {
        match present.iter().find(|b| &b.name == name) {
            None => return Err(format!("Bitmap '{name}' is not found")),
            Some(b) if !b.consistent() => {
                return Err(format!(
                    "Bitmap '{name}' is inconsistent and cannot be used"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Listens for QMP clients on `socket`, over the served disks (by export name).
fn start_monitor(
    socket: &Path,
    group: Group,
    list: &[(String, PathBuf)],
    exports: &[Export],
    cache: CacheMode,
    handle: qcow2_nbd::ShutdownHandle,
) -> Result<Arc<Monitor>, String> {
    let mut disks = Vec::new();
    for ((name, path), export) in list.iter().zip(exports) {
        let path =
            std::fs::canonicalize(path).map_err(|e| format!("serve: {}: {e}", path.display()))?;
        disks.push(Disk {
            name: name.clone(),
            top: export.top.clone(),
            path,
            cache: WriteCache {
                writeback: cache.writeback,
                no_flush: cache.no_flush,
            },
        });
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(socket);
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| format!("serve: QMP socket {}: {e}", socket.display()))?;
    let monitor = Arc::new(Monitor::new(
        group,
        disks,
        Box::new(move || handle.shutdown()),
    ));
    let serving = monitor.clone();
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || serving.listen(listener))
        .map_err(|e| format!("serve: {e}"))?;
    Ok(monitor)
}

/// The cache mode `--cache` and `-n` ask for, with qemu-nbd's messages.
fn cache_mode(args: &Args) -> Result<CacheMode, String> {
    match (&args.cache, args.nocache) {
        (Some(_), true) => Err("-n and --cache can only be specified once".into()),
        (None, true) => Ok(CacheMode::parse("none").expect("a known mode")),
        (None, false) => Ok(CacheMode::WRITEBACK),
        (Some(name), false) => {
            CacheMode::parse(name).ok_or_else(|| format!("Invalid cache mode `{name}'"))
        }
    }
}

/// Whether `--aio` asks for `native`, with qemu-nbd's messages for a bad or repeated mode.
fn aio_is_native(args: &Args) -> Result<bool, String> {
    match args.aio.as_slice() {
        [] => Ok(false),
        [mode] => match mode.as_str() {
            "threads" | "io_uring" => Ok(false),
            "native" => Ok(true),
            other => Err(format!("Invalid aio mode '{other}'")),
        },
        _ => Err("--aio can only be specified once".into()),
    }
}

/// Writes the pid file whole (via a rename), so a reader never sees a partial one.
fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    if let Some(f) = &args.format {
        if f != "qcow2" {
            return Err(fail(format!(
                "serve: format '{f}' is not supported (qcow2 only)"
            )));
        }
    }
    let unmap = match args.discard.as_str() {
        "unmap" | "on" => true,
        "ignore" | "off" => false,
        other => return Err(fail(format!("Invalid discard mode '{other}'"))),
    };
    let detect_zeroes = match args.detect_zeroes.as_deref() {
        None | Some("off") => DetectZeroes::Off,
        Some("on") => DetectZeroes::On,
        Some("unmap") if unmap => DetectZeroes::Unmap,
        Some("unmap") => {
            return Err(fail(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap"
                    .into(),
            ))
        }
        Some(other) => {
            return Err(fail(format!(
                "Failed to parse detect_zeroes mode: invalid parameter value: {other}"
            )))
        }
    };
    let cache = cache_mode(&args).map_err(fail)?;
    let native_aio = aio_is_native(&args).map_err(fail)?;
    let list = exports_of(&args).map_err(|m| fail(format!("serve: {m}")))?;
    if args.qmp.is_some() && args.group.is_none() {
        return Err(fail(
            "serve: --qmp needs --group DIR: every live transaction goes through a group journal"
                .into(),
        ));
    }
    if args.qmp.is_some() && args.read_only {
        return Err(fail(
            "serve: --qmp changes the disks, which -r serves read-only".into(),
        ));
    }
    // The group first: its recovery finishes an interrupted transaction before any image opens.
    let group = match &args.group {
        Some(dir) => Some(Group::open(dir).map_err(|e| fail(format!("serve: {e}")))?),
        None => None,
    };
    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // the one thread waiting in sigwait receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| fail(format!("serve: blocking signals: {e}")))?;
    let options = OpenOptions::default()
        .writable(!args.read_only)
        .direct_io(cache.direct)
        .skip_syncs(cache.no_flush);
    let mut exports = Vec::new();
    for (name, path) in &list {
        if native_aio && !cache.direct {
            return Err(fail(format!(
                "Failed to blk_new_open '{}': aio=native was specified, but it requires \
                 cache.direct=on, which was not specified.",
                path.display()
            )));
        }
        let image = open_image(path, &options).map_err(fail)?;
        check_bitmaps(&image, &args.bitmap).map_err(fail)?;
        exports.push(
            Export::new(name.clone(), Arc::new(image))
                .description(args.description.clone())
                .read_only(args.read_only)
                .allocation_depth(args.allocation_depth)
                .bitmaps(args.bitmap.clone())
                .unmap(unmap)
                .write_through(cache.write_through())
                .detect_zeroes(detect_zeroes),
        );
    }
    let tops: Vec<Arc<DiskTop>> = exports.iter().map(|e| e.top.clone()).collect();
    let listener = match &args.socket {
        Some(path) => Listener::unix(path),
        None => Listener::tcp((args.bind.as_str(), args.port)),
    }
    .map_err(|e| fail(format!("Failed to listen: {e}")))?;
    let server = Server::new(
        exports,
        ServerOptions::default()
            .max_connections(args.shared)
            .persistent(args.persistent)
            .connection(ConnectionOptions::default().workers(args.workers)),
    );
    let handle = server.shutdown_handle();
    let monitor = match (&args.qmp, group) {
        (Some(socket), Some(group)) => Some(
            start_monitor(
                socket,
                group,
                &list,
                server.exports(),
                cache,
                handle.clone(),
            )
            .map_err(fail)?,
        ),
        _ => None,
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                handle.shutdown();
            }
        })
        .map_err(|e| fail(format!("serve: {e}")))?;
    if let Some(p) = &args.pid_file {
        write_pid_file(p).map_err(|e| fail(format!("Failed to write pid file: {e}")))?;
    }
    let served = server.run(listener);
    drop(server);
    if let Some(monitor) = &monitor {
        // Waits for a running command, and gives back the monitor's handles of the images.
        drop(monitor.close());
    }
    if let Some(socket) = &args.qmp {
        let _ = std::fs::remove_file(socket);
    }
    let mut failure = served.err().map(|e| format!("serve: {e}"));
    for top in tops {
        // Closes the top and the images external snapshots put it over.
        let closed = match Arc::try_unwrap(top) {
            Ok(top) => top.close(),
            // Unreachable once `run` has joined every connection; flush at least.
            Err(shared) => shared.image().flush(),
        };
        if let Err(e) = closed {
            failure.get_or_insert(format!("serve: closing the image: {e}"));
        }
    }
    if let Some(p) = &args.pid_file {
        let _ = std::fs::remove_file(p);
    }
    match failure {
        Some(m) => Err(fail(m)),
        None => Ok(0),
    }
}
