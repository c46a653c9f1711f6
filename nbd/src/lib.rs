//! An NBD export server over the qcow2 engine, for tools that reach disks through NBD (backup
//! tools, `nbdcopy`, `qemu-img` with `nbd+unix://`, fio's `nbd` engine, VMs).
//!
//! - [`wire`]: the protocol's constants and codecs, pure and bounded (a fuzz target drives them);
//! - [`server`]: one connection, from the fixed-newstyle handshake (`INFO`, `GO`, `LIST`,
//!   `ABORT`, `STRUCTURED_REPLY`, `LIST`/`SET_META_CONTEXT`, `EXPORT_NAME`) through
//!   transmission (`READ` with holes as `OFFSET_HOLE` chunks, `WRITE`, `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES` with `NO_HOLE` and `FAST_ZERO`, `BLOCK_STATUS` for `base:allocation` and
//!   `qemu:allocation-depth`, `CACHE`, `DISC`, `FUA`);
//! - [`Server`]: named exports, each one shared [`qcow2::Image`], served on a Unix socket or a
//!   TCP listener with a thread per connection.
//!
//! It uses only the `qcow2` library's public API, as any tool embedding the engine would. Not
//! implemented yet: TLS, extended headers, dirty-bitmap contexts, requests of one connection
//! handled concurrently (they are answered in order; connections run in parallel).

#![forbid(unsafe_code)]

pub mod server;
pub mod wire;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use server::{serve_connection, Export};

/// A set of named exports, served to any number of connections.
#[derive(Debug, Clone)]
pub struct Server {
    exports: Arc<Vec<Export>>,
}

/// A listening socket the server accepts from.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Server {
    /// A server for `exports` (names must differ; the empty name selects the only export).
    pub fn new(exports: Vec<Export>) -> io::Result<Server> {
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("export name {:?} is used twice", e.name),
                ));
            }
        }
        Ok(Server {
            exports: Arc::new(exports),
        })
    }

    /// The exports served.
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// Accepts connections until `stop` is set (checked after each accepted connection: to stop
    /// a waiting server, set it and connect once), or, unless `persistent`, until the first
    /// client has gone. Each connection runs on a thread of its own; this returns after every
    /// connection has ended.
    pub fn run(&self, listener: &Listener, persistent: bool, stop: &AtomicBool) -> io::Result<()> {
        std::thread::scope(|scope| -> io::Result<()> {
            loop {
                let stream: Box<dyn ReadWrite> = match listener {
                    Listener::Unix(l) => Box::new(l.accept()?.0),
                    Listener::Tcp(l) => {
                        let (s, _) = l.accept()?;
                        let _ = s.set_nodelay(true);
                        Box::new(s)
                    }
                };
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let exports = Arc::clone(&self.exports);
                let worker = scope.spawn(move || {
                    // A client's protocol or I/O error ends only its own connection.
                    let _ = serve_connection(&exports, BufferedStream::new(stream));
                });
                if !persistent {
                    let _ = worker.join();
                    return Ok(());
                }
            }
        })
    }
}

/// A socket stream of either kind.
pub trait ReadWrite: io::Read + io::Write + Send {}
impl<T: io::Read + io::Write + Send> ReadWrite for T {}

/// Buffered reads and writes over one socket: requests arrive in small pieces, and replies are
/// assembled from headers and data, so both sides are batched; every reply is flushed.
struct BufferedStream {
    inner: io::BufReader<Box<dyn ReadWrite>>,
}

impl BufferedStream {
    fn new(stream: Box<dyn ReadWrite>) -> Self {
        BufferedStream {
            inner: io::BufReader::with_capacity(256 << 10, stream),
        }
    }
}

impl io::Read for BufferedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl io::Write for BufferedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.get_mut().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.get_mut().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.get_mut().flush()
    }
}
