//! The transmission phase of one connection: a reader that parses requests and their payloads,
//! a small pool of workers that executes them concurrently, and replies written whole (one
//! request's chunks never interleave with another's) in completion order.
//!
//! Memory is bounded: at most `MAX_IN_FLIGHT` requests and `MAX_IN_FLIGHT_BYTES` of payload and
//! read buffers are outstanding per connection; the reader stops reading until work drains.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};

use qcow2::setters;

use crate::commands::{error_reply, execute, Failure, Reply};
use crate::export::Export;
use crate::negotiate::Negotiated;
use crate::wire::*;

/// Requests outstanding per connection, as in qemu.
pub const MAX_IN_FLIGHT: usize = 16;
/// Payload and read-buffer bytes outstanding per connection (one request is always admitted).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Socket read buffer.
const READ_BUFFER: usize = 256 << 10;

/// How a connection runs its requests.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ConnectionOptions {
    /// Worker threads per connection; 0 runs every request on the reader (no concurrency).
    pub workers: usize,
}

setters!(ConnectionOptions { workers: usize });

impl ConnectionOptions {
    /// Four workers per connection.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions { workers: 4 }
    }
}

/// One request waiting for a worker.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: usize,
}

/// State shared by the reader and the workers.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Requests admitted and not yet answered.
    in_flight: usize,
    bytes: usize,
    idle: usize,
    spawned: usize,
    closing: bool,
}

struct Shared<W> {
    queue: Mutex<Queue>,
    /// Signals workers (new job or closing).
    work: Condvar,
    /// Signals the reader (a request finished).
    room: Condvar,
    out: Mutex<Output<W>>,
}

struct Output<W> {
    w: W,
    /// A write failed: the client is gone; later replies are dropped.
    dead: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked cannot leave the queue or the writer inconsistent in a way that
    // matters more than serving the remaining requests.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<W: Write> Shared<W> {
    fn send(&self, reply: &Reply) {
        let mut out = lock(&self.out);
        if out.dead {
            return;
        }
        if out
            .w
            .write_all(&reply.0)
            .and_then(|_| out.w.flush())
            .is_err()
        {
            out.dead = true;
        }
    }
}

/// The bytes a request holds while outstanding: its payload or its read buffer.
fn cost(req: &Request, payload: &[u8]) -> usize {
    if req.kind == CMD_READ {
        req.length.min(MAX_PAYLOAD as u64) as usize
    } else {
        payload.len()
    }
}

/// Serves requests until the client disconnects (DISC, EOF, or a protocol violation), then
/// finishes what is outstanding. Returns the I/O error that ended the connection, if any.
pub fn transmit<R: Read, W: Write + Send>(
    reader: R,
    writer: W,
    export: &Export,
    neg: &Negotiated,
    options: ConnectionOptions,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let shared = Shared {
        queue: Mutex::new(Queue::default()),
        work: Condvar::new(),
        room: Condvar::new(),
        out: Mutex::new(Output {
            w: writer,
            dead: false,
        }),
    };
    std::thread::scope(|scope| {
        let result = read_loop(&mut reader, &shared, export, neg, options, scope);
        let mut q = lock(&shared.queue);
        q.closing = true;
        shared.work.notify_all();
        drop(q);
        result
    })
}

fn worker<W: Write>(shared: &Shared<W>, export: &Export, neg: &Negotiated) {
    let mut q = lock(&shared.queue);
    loop {
        if let Some(job) = q.jobs.pop_front() {
            q.idle -= 1;
            drop(q);
            let reply = execute(export, neg, &job.req, &job.payload);
            drop(job.payload);
            shared.send(&reply);
            drop(reply);
            q = lock(&shared.queue);
            q.in_flight -= 1;
            q.bytes -= job.cost;
            q.idle += 1;
            shared.room.notify_one();
        } else if q.closing {
            return;
        } else {
            q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on EOF before the first byte.
fn read_header<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn read_loop<'scope, 'env, R: Read, W: Write + Send>(
    reader: &mut BufReader<R>,
    shared: &'scope Shared<W>,
    export: &'scope Export,
    neg: &'scope Negotiated,
    options: ConnectionOptions,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> io::Result<()> {
    let mode = neg.mode;
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    let hdr = &mut hdr[..mode.request_len()];
    loop {
        if !read_header(reader, hdr)? {
            return Ok(());
        }
        let req = match parse_request(hdr, mode) {
            Ok(r) => r,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        let payload_len = if req.kind == CMD_WRITE
            || (mode == Replies::Extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0)
        {
            // qemu's client sends WRITE without PAYLOAD_LEN in extended mode: the length is the
            // payload either way.
            req.length
        } else {
            0
        };
        if payload_len > MAX_PAYLOAD as u64 {
            // The payload cannot be skipped safely: answer, then hang up (as qemu does).
            let f = Failure {
                errno: EINVAL,
                message: format!("payload of {payload_len} bytes exceeds {MAX_PAYLOAD}"),
            };
            wait_idle(shared);
            shared.send(&error_reply(mode, &req, &f));
            return Err(io::Error::new(io::ErrorKind::InvalidData, f.message));
        }
        let mut payload = Vec::new();
        if payload_len > 0 {
            // Grow with what arrives, so a client that announces 32 MiB and sends nothing
            // costs nothing.
            payload.reserve(payload_len.min(READ_BUFFER as u64) as usize);
            reader
                .by_ref()
                .take(payload_len)
                .read_to_end(&mut payload)?;
            if payload.len() as u64 != payload_len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if req.kind == CMD_DISC {
            // Outstanding requests finish (the scope joins the workers); nothing more is read.
            return Ok(());
        }
        let cost = cost(&req, &payload);
        let mut q = lock(&shared.queue);
        let idle_now = q.in_flight == 0 && reader.buffer().is_empty();
        if options.workers == 0 || idle_now {
            // Nothing else is waiting: answering here saves a thread hand-off per request.
            drop(q);
            shared.send(&execute(export, neg, &req, &payload));
            continue;
        }
        while q.in_flight > 0
            && (q.in_flight >= MAX_IN_FLIGHT || q.bytes + cost > MAX_IN_FLIGHT_BYTES)
        {
            q = shared.room.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.in_flight += 1;
        q.bytes += cost;
        q.jobs.push_back(Job { req, payload, cost });
        if q.idle == 0 && q.spawned < options.workers {
            q.spawned += 1;
            q.idle += 1;
            scope.spawn(move || worker(shared, export, neg));
        }
        shared.work.notify_one();
    }
}

/// Waits until every admitted request has been answered.
fn wait_idle<W>(shared: &Shared<W>) {
    let mut q = lock(&shared.queue);
    while q.in_flight > 0 {
        q = shared.room.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}
