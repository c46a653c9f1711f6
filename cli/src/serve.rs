//! `serve`: images as NBD exports, with `qemu-nbd`'s spelling (`-k SOCKET` or `-b ADDR -p PORT`,
//! `-x NAME`, `-r`, `-t`, `-f`, `-e`, `--pid-file`), several images as `NAME=PATH`. SIGINT and
//! SIGTERM stop accepting, let connections end, then flush and close every image cleanly and
//! remove the socket. The server itself is the `qcow2-nbd` library.

use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use qcow2::OpenOptions;
use qcow2_nbd::{Export, Listener, Server};

use crate::source::{format_of, open_image, CmdResult, Failure, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Serve on this Unix socket.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Serve on TCP at this address (loopback by default).
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: String,
    /// TCP port.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Export name (for a single image given without NAME=).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    name: String,
    /// Export description.
    #[arg(short = 'D', long = "description")]
    description: Option<String>,
    /// Read-only exports.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Image format (qcow2 only).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Accepted for qemu-nbd compatibility: any number of clients may connect.
    #[arg(short = 'e', long = "shared")]
    shared: Option<u32>,
    /// Offer this persistent bitmap as the context `qemu:dirty-bitmap:NAME` (repeatable).
    #[arg(short = 'B', long = "bitmap")]
    bitmaps: Vec<String>,
    /// Write the process id here once the server listens.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Images: PATH, or NAME=PATH for several exports.
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    if args.format.as_deref().is_some_and(|f| f != "qcow2") {
        return Err(fail("only qcow2 images can be served".into()));
    }
    let _ = args.shared;
    // SIGINT and SIGTERM are taken by a thread of ours (sigwait), blocked everywhere else: every
    // thread started from here on inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| fail(format!("blocking signals: {e}")))?;

    let mut exports = Vec::new();
    for spec in &args.images {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if args.images.len() > 1 || !n.is_empty() => (n.to_string(), p),
            _ => (args.name.clone(), spec.as_str()),
        };
        let path = PathBuf::from(path);
        if format_of(&path, args.format.as_deref()).map_err(fail)? != Format::Qcow2 {
            return Err(fail(format!(
                "{}: only qcow2 images can be served",
                path.display()
            )));
        }
        let options = if args.read_only {
            OpenOptions::default()
        } else {
            OpenOptions::read_write()
        };
        let image = open_image(&path, &options).map_err(fail)?;
        for b in &args.bitmaps {
            if !image.bitmaps().iter().any(|i| &i.name == b) {
                return Err(fail(format!("Bitmap '{b}' is not found")));
            }
        }
        exports.push(Export {
            bitmaps: args.bitmaps.clone(),
            name,
            image: Arc::new(image),
            read_only: args.read_only,
            description: args.description.clone(),
        });
    }
    let server = Server::new(exports).map_err(|e| fail(e.to_string()))?;
    let listener = match &args.socket {
        Some(path) => Listener::Unix(
            UnixListener::bind(path)
                .map_err(|e| fail(format!("Failed to bind socket to {}: {e}", path.display())))?,
        ),
        None => Listener::Tcp(
            TcpListener::bind((args.bind.as_str(), args.port))
                .map_err(|e| fail(format!("Failed to bind {}:{}: {e}", args.bind, args.port)))?,
        ),
    };
    let wake_addr = match &listener {
        Listener::Unix(_) => None,
        Listener::Tcp(l) => l.local_addr().ok(),
    };
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .map_err(|e| fail(format!("{}: {e}", pid_file.display())))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        let socket = args.socket.clone();
        std::thread::spawn(move || {
            if signals.wait().is_ok() {
                stop.store(true, Ordering::SeqCst);
                // Wake the accept so the server sees the flag.
                match (&socket, wake_addr) {
                    (Some(path), _) => drop(UnixStream::connect(path)),
                    (None, Some(addr)) => drop(std::net::TcpStream::connect(addr)),
                    _ => {}
                }
            }
        });
    }
    let served = server.run(&listener, args.persistent, &stop);
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    let mut failed = served.err().map(|e| e.to_string());
    // Every connection has ended: each image is ours alone again, and closes cleanly.
    for export in server.exports() {
        if let Err(e) = export.image.flush() {
            failed.get_or_insert(e.to_string());
        }
    }
    drop(server);
    match failed {
        Some(m) => Err(fail(m)),
        None => Ok(0),
    }
}
