//! The server: listens on a unix socket or TCP, limits concurrent connections as qemu-nbd's
//! `--shared` does, runs each connection on its own thread (handshake under a time limit, then
//! transmission), and shuts down on request: every socket is closed and every thread joined
//! before `run` returns, so the caller can then flush and close the images.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qcow2::setters;

use crate::export::Export;
use crate::negotiate::negotiate;
use crate::transmit::{transmit, ConnectionOptions};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket; its file is removed when the listener is dropped.
    Unix {
        /// The bound socket.
        listener: UnixListener,
        /// The socket file's path.
        path: PathBuf,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a unix socket at `path`, replacing a stale socket file left there (never any
    /// other kind of file).
    pub fn unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Listens on TCP.
    pub fn tcp(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// The TCP address bound (None for a unix socket).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are written whole; waiting to coalesce them only adds latency.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    /// Where to connect to wake a blocked `accept`.
    fn wake_address(&self) -> Option<Wake> {
        match self {
            Listener::Unix { path, .. } => Some(Wake::Unix(path.clone())),
            Listener::Tcp(l) => {
                let mut a = l.local_addr().ok()?;
                if a.ip().is_unspecified() {
                    a.set_ip(match a {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                Some(Wake::Tcp(a))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Wake {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// An accepted connection.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads with a deadline for the whole handshake (a slow client cannot hold a connection slot).
struct DeadlineReader<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake time limit reached",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Connections served at once; more wait to be accepted (qemu-nbd `-e`). 0 = no limit.
    /// Any value but 1 advertises multi-conn: all connections share one `Image` per export, so
    /// a flush on one covers writes finished on every other.
    pub max_connections: usize,
    /// Keep serving after the last client leaves (qemu-nbd `-t`); otherwise `run` returns once
    /// a client has come and every client has gone.
    pub persistent: bool,
    /// Time allowed for a client's handshake (qemu's default is 10 s).
    pub handshake_limit: Duration,
    /// How each connection runs its requests.
    pub connection: ConnectionOptions,
}

setters!(ServerOptions {
    max_connections: usize,
    persistent: bool,
    handshake_limit: Duration,
    connection: ConnectionOptions,
});

impl ServerOptions {
    /// qemu-nbd's defaults: one connection at a time, not persistent, a 10 s handshake limit.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 1,
            persistent: false,
            handshake_limit: Duration::from_secs(10),
            connection: ConnectionOptions::default(),
        }
    }
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    active: usize,
    /// A client has connected at least once.
    served: bool,
    open: HashMap<u64, Stream>,
    threads: Vec<JoinHandle<()>>,
}

struct State {
    stop: AtomicBool,
    conns: Mutex<Conns>,
    changed: Condvar,
    wake: Mutex<Option<Wake>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded bookkeeping stays usable after a panicking connection thread.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        // Wake the accept loop with a connection of our own; it sees the flag and stops.
        match &*lock(&self.wake) {
            Some(Wake::Unix(p)) => drop(UnixStream::connect(p)),
            Some(Wake::Tcp(a)) => drop(TcpStream::connect_timeout(a, Duration::from_secs(1))),
            None => {}
        }
    }
}

/// Stops a running server from another thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<State>);

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("stopping", &self.0.stop.load(Ordering::SeqCst))
            .finish()
    }
}

impl ShutdownHandle {
    /// Makes `run` close every connection and return.
    pub fn shutdown(&self) {
        self.0.request_stop();
    }
}

/// A server over a fixed set of exports.
pub struct Server {
    exports: Arc<Vec<Export>>,
    options: ServerOptions,
    state: Arc<State>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.exports)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `exports` (clients choose one by name); nothing listens until
    /// [`Server::run`].
    pub fn new(exports: Vec<Export>, options: ServerOptions) -> Server {
        Server {
            exports: Arc::new(exports),
            options,
            state: Arc::new(State {
                stop: AtomicBool::new(false),
                conns: Mutex::new(Conns::default()),
                changed: Condvar::new(),
                wake: Mutex::new(None),
            }),
        }
    }

    /// The exports, in the order given to [`Server::new`].
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// A handle that stops [`Server::run`] from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.state.clone())
    }

    /// Accepts and serves connections until shut down (or, unless persistent, until the last
    /// client leaves). Every connection is closed and joined before it returns; the listener
    /// (and its socket file) is dropped.
    pub fn run(&self, listener: Listener) -> io::Result<()> {
        *lock(&self.state.wake) = listener.wake_address();
        let result = self.accept_loop(&listener);
        let threads = {
            let mut c = lock(&self.state.conns);
            for s in c.open.values() {
                s.shutdown();
            }
            std::mem::take(&mut c.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        // Connections that were accepted while the last threads were being collected.
        let rest = std::mem::take(&mut lock(&self.state.conns).threads);
        for t in rest {
            let _ = t.join();
        }
        result
    }

    fn accept_loop(&self, listener: &Listener) -> io::Result<()> {
        let limit = self.options.max_connections;
        loop {
            {
                let mut c = lock(&self.state.conns);
                while !self.stopping() && limit > 0 && c.active >= limit {
                    c = self
                        .state
                        .changed
                        .wait(c)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
            if self.stopping() {
                return Ok(());
            }
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if out_of_resources(&e) => {
                    // Out of descriptors or memory: retrying at once would spin; a moment
                    // lets finishing connections give some back.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e),
            };
            if self.stopping() {
                return Ok(());
            }
            // A connection that cannot get a thread is dropped; the server goes on.
            let _ = self.start(stream);
        }
    }

    fn stopping(&self) -> bool {
        self.state.stop.load(Ordering::SeqCst)
    }

    fn start(&self, stream: Stream) -> io::Result<()> {
        let registry = stream.try_clone()?;
        let mut c = lock(&self.state.conns);
        let id = c.next_id;
        c.next_id += 1;
        c.threads.retain(|t| !t.is_finished());
        let exports = self.exports.clone();
        let options = self.options.clone();
        let state = self.state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _ = serve_connection(stream, &exports, &options);
                let mut c = lock(&state.conns);
                c.open.remove(&id);
                c.active -= 1;
                let last = c.active == 0 && c.served;
                drop(c);
                state.changed.notify_all();
                if last && !options.persistent {
                    state.request_stop();
                }
            })?;
        c.active += 1;
        c.served = true;
        c.open.insert(id, registry);
        c.threads.push(thread);
        Ok(())
    }
}

/// Accept errors that concern one connection, not the listener.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// ENFILE, EMFILE, ENOBUFS, ENOMEM: the process or system is short of something for a while.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23) | Some(24) | Some(105) | Some(12))
}

/// Runs one accepted connection: the handshake under the time limit, then transmission.
fn serve_connection(
    mut stream: Stream,
    exports: &[Export],
    options: &ServerOptions,
) -> io::Result<()> {
    let multi_conn = options.max_connections != 1;
    let mut writer = stream.try_clone()?;
    let deadline = Instant::now() + options.handshake_limit;
    let neg = {
        let mut r = DeadlineReader {
            stream: &mut stream,
            deadline,
        };
        negotiate(&mut r, &mut writer, exports, multi_conn)?
    };
    let Some(neg) = neg else {
        return Ok(());
    };
    stream.set_read_timeout(None)?;
    transmit(
        stream,
        writer,
        &exports[neg.export],
        &neg,
        options.connection,
    )
}

/// Serves one client over any byte stream, without time limits: the handshake, then
/// transmission until the client leaves. For embedding and for fuzzing.
pub fn serve_stream<R: Read, W: Write + Send>(
    mut reader: R,
    mut writer: W,
    exports: &[Export],
    options: &ServerOptions,
) -> io::Result<()> {
    let multi_conn = options.max_connections != 1;
    let Some(neg) = negotiate(&mut reader, &mut writer, exports, multi_conn)? else {
        return Ok(());
    };
    transmit(
        reader,
        writer,
        &exports[neg.export],
        &neg,
        options.connection,
    )
}
