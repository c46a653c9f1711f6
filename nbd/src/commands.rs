//! Executes one transmission request against an export's `Image` and encodes the whole reply:
//! sparse READs (OFFSET_HOLE for ranges that read as zeros without data), writes, zero writes,
//! trims, flushes and BLOCK_STATUS for `base:allocation`, `qemu:allocation-depth` and
//! `qemu:dirty-bitmap:NAME`.

use qcow2::{Error, Extent, Image};

use crate::export::{ContextKind, DetectZeroes, Export};
use crate::negotiate::Negotiated;
use crate::wire::*;

/// base:allocation bits.
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;
/// The most extents in one BLOCK_STATUS chunk (qemu's cap).
pub const MAX_EXTENTS: usize = 131_072;
/// BLOCK_STATUS maps at most this much of a request (the client asks again for the rest), so
/// one request never walks an unbounded range.
pub const MAX_STATUS_SPAN: u64 = 1 << 32;
/// First window mapped for BLOCK_STATUS; windows double up to `MAX_STATUS_WINDOW`.
const FIRST_STATUS_WINDOW: u64 = 64 << 20;
const MAX_STATUS_WINDOW: u64 = 1 << 30;

/// A request that failed: the NBD error value and a message for the client.
#[derive(Debug)]
pub struct Failure {
    /// The NBD error value (`EIO`, `EINVAL`, ... from [`crate::wire`]).
    pub errno: u32,
    /// A message for the client's ERROR chunk (structured replies only).
    pub message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

/// Maps an engine error to the NBD error a client can act on.
fn engine_failure(e: Error) -> Failure {
    let errno = match &e {
        Error::ReadOnly { .. } => EPERM,
        Error::OutOfBounds { .. } | Error::InvalidArgument { .. } => EINVAL,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(28) | Some(122) | Some(27) => ENOSPC,
            Some(30) | Some(1) => EPERM,
            _ => EIO,
        },
        _ => EIO,
    };
    Failure::new(errno, e.to_string())
}

/// The reply to a request: its bytes, ready to send.
#[derive(Debug)]
pub struct Reply(pub Vec<u8>);

/// A success reply without payload: a NONE chunk with extended headers (which have no simple
/// replies), a simple reply otherwise.
fn ok_reply(mode: Replies, req: &Request) -> Reply {
    match mode {
        Replies::Extended => ok_none(mode, req),
        _ => {
            let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN);
            simple_reply(&mut out, 0, req.cookie);
            Reply(out)
        }
    }
}

/// An error reply: an ERROR chunk once structured replies are on, a simple reply otherwise.
pub fn error_reply(mode: Replies, req: &Request, f: &Failure) -> Reply {
    let mut out = Vec::new();
    match mode {
        Replies::Simple => simple_reply(&mut out, f.errno, req.cookie),
        _ => error_chunk(&mut out, mode, req.cookie, req.offset, f.errno, &f.message),
    }
    Reply(out)
}

/// Executes `req` (whose payload, if any, is `payload`) and returns the reply.
pub fn execute(export: &Export, neg: &Negotiated, req: &Request, payload: &[u8]) -> Reply {
    let mode = neg.mode;
    let result = match req.kind {
        CMD_READ => read(export, mode, req),
        CMD_WRITE => write(export, req, payload).map(|()| ok_reply(mode, req)),
        CMD_FLUSH => flags_ok(req, CMD_FLAG_FUA)
            .and_then(|()| export.image().flush().map_err(engine_failure))
            .map(|()| ok_reply(mode, req)),
        CMD_TRIM => trim(export, req).map(|()| ok_reply(mode, req)),
        CMD_CACHE => cache(export, req).map(|()| ok_reply(mode, req)),
        CMD_WRITE_ZEROES => write_zeroes(export, req).map(|()| ok_reply(mode, req)),
        CMD_BLOCK_STATUS => block_status(export, neg, req, payload),
        other => Err(Failure::new(
            EINVAL,
            format!("invalid request type ({other}) received"),
        )),
    };
    result.unwrap_or_else(|f| error_reply(mode, req, &f))
}

/// Refuses flags outside `allowed` (PAYLOAD_LEN is checked by the reader).
fn flags_ok(req: &Request, allowed: u16) -> Result<(), Failure> {
    let extra = req.flags & !(allowed | CMD_FLAG_PAYLOAD_LEN);
    if extra != 0 {
        return Err(Failure::new(
            EINVAL,
            format!("unsupported flags {extra:#x} for command {}", req.kind),
        ));
    }
    Ok(())
}

/// Refuses a range that leaves the export, with `errno`.
fn in_bounds(export: &Export, req: &Request, len: u64, errno: u32) -> Result<(), Failure> {
    let size = export.size();
    if req.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Failure::new(
            errno,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {}",
                req.offset, len, size
            ),
        ));
    }
    Ok(())
}

fn writable(export: &Export) -> Result<(), Failure> {
    if export.read_only {
        return Err(Failure::new(EPERM, "Export is read-only"));
    }
    Ok(())
}

fn fua(export: &Export, req: &Request) -> Result<(), Failure> {
    if export.write_through || req.flags & CMD_FLAG_FUA != 0 {
        export.image().flush().map_err(engine_failure)?;
    }
    Ok(())
}

fn write(export: &Export, req: &Request, payload: &[u8]) -> Result<(), Failure> {
    writable(export)?;
    flags_ok(req, CMD_FLAG_FUA)?;
    in_bounds(export, req, payload.len() as u64, ENOSPC)?;
    if !payload.is_empty() {
        let zeroes = export.detect_zeroes != DetectZeroes::Off && payload.iter().all(|&b| b == 0);
        let unmap = export.unmap && export.detect_zeroes == DetectZeroes::Unmap;
        export
            .top
            .write(|image| {
                if zeroes {
                    image.write_zeroes(req.offset, payload.len() as u64, unmap)
                } else {
                    image.write_at(payload, req.offset)
                }
            })
            .map_err(engine_failure)?;
    }
    fua(export, req)
}

fn trim(export: &Export, req: &Request) -> Result<(), Failure> {
    writable(export)?;
    flags_ok(req, CMD_FLAG_FUA)?;
    in_bounds(export, req, req.length, EINVAL)?;
    if export.unmap && req.length > 0 {
        export
            .top
            .write(|image| image.discard(req.offset, req.length))
            .map_err(engine_failure)?;
    }
    fua(export, req)
}

/// Refuses a READ or CACHE longer than the largest payload, with qemu's message.
fn within_max_len(req: &Request) -> Result<(), Failure> {
    if req.length > MAX_PAYLOAD as u64 {
        return Err(Failure::new(
            EINVAL,
            format!(
                "len ({}) is larger than max len ({MAX_PAYLOAD})",
                req.length
            ),
        ));
    }
    Ok(())
}

fn cache(export: &Export, req: &Request) -> Result<(), Failure> {
    flags_ok(req, CMD_FLAG_FUA)?;
    within_max_len(req)?;
    // A prefetch hint: the engine keeps no data cache to warm, so bounds are all there is.
    in_bounds(export, req, req.length, EINVAL)
}

fn write_zeroes(export: &Export, req: &Request) -> Result<(), Failure> {
    writable(export)?;
    flags_ok(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
    in_bounds(export, req, req.length, ENOSPC)?;
    if req.length == 0 {
        return fua(export, req);
    }
    if req.flags & CMD_FLAG_FAST_ZERO != 0 && !zeroing_is_fast(&export.image(), req) {
        return Err(Failure::new(
            ENOTSUP,
            "fast zeroing is not possible for this range",
        ));
    }
    let unmap = export.unmap && req.flags & CMD_FLAG_NO_HOLE == 0;
    export
        .top
        .write(|image| image.write_zeroes(req.offset, req.length, unmap))
        .map_err(engine_failure)?;
    fua(export, req)
}

/// Whether zeroing the range only changes metadata: a v3 image without an external data file,
/// and a range of whole clusters (subclusters with extended L2; the disk's end counts as a
/// boundary). Anything else means writing zero bytes, which FAST_ZERO asks to refuse.
fn zeroing_is_fast(image: &Image, req: &Request) -> bool {
    let h = image.header();
    if h.version < 3 || h.has_external_data_file() {
        return false;
    }
    let grain = if h.extended_l2() {
        h.cluster_size() / 32
    } else {
        h.cluster_size()
    };
    let end = req.offset + req.length;
    req.offset % grain == 0 && (end % grain == 0 || end >= image.size())
}

/// A run of a READ reply: bytes that read as zeros without data, or data.
#[derive(Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    hole: bool,
}

fn read(export: &Export, mode: Replies, req: &Request) -> Result<Reply, Failure> {
    let allowed = if mode == Replies::Simple {
        CMD_FLAG_FUA
    } else {
        CMD_FLAG_FUA | CMD_FLAG_DF
    };
    flags_ok(req, allowed)?;
    within_max_len(req)?;
    in_bounds(export, req, req.length, EINVAL)?;
    // qemu flushes before a READ with FUA.
    fua(export, req)?;
    let image = export.image();
    let len = req.length as usize;
    let mut out = Vec::new();
    if mode == Replies::Simple {
        out.reserve(SIMPLE_REPLY_LEN + len);
        simple_reply(&mut out, 0, req.cookie);
        out.resize(SIMPLE_REPLY_LEN + len, 0);
        image
            .read_at(&mut out[SIMPLE_REPLY_LEN..], req.offset)
            .map_err(engine_failure)?;
        return Ok(Reply(out));
    }
    if len == 0 {
        return Ok(ok_none(mode, req));
    }
    let runs = if req.flags & CMD_FLAG_DF != 0 {
        vec![Run {
            start: req.offset,
            len: req.length,
            hole: false,
        }]
    } else {
        read_runs(&image, req.offset, req.length)?
    };
    let hdr = mode.chunk_header_len();
    let data_bytes: u64 = runs.iter().filter(|r| !r.hole).map(|r| r.len).sum();
    out.reserve(runs.len() * (hdr + 12) + data_bytes as usize);
    for (i, run) in runs.iter().enumerate() {
        let flags = if i + 1 == runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if run.hole {
            // Runs lie inside a request of at most 32 MiB, so they fit 32 bits.
            hole_chunk(
                &mut out,
                mode,
                flags,
                req.cookie,
                req.offset,
                run.start,
                run.len as u32,
            );
        } else {
            chunk_header(
                &mut out,
                mode,
                flags,
                CHUNK_OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + run.len,
            );
            out.extend_from_slice(&run.start.to_be_bytes());
            let at = out.len();
            out.resize(at + run.len as usize, 0);
            image
                .read_at(&mut out[at..], run.start)
                .map_err(engine_failure)?;
        }
    }
    Ok(Reply(out))
}

/// A NONE chunk with DONE (a zero-length READ in structured mode, any success in extended).
fn ok_none(mode: Replies, req: &Request) -> Reply {
    let mut out = Vec::new();
    chunk_header(
        &mut out,
        mode,
        REPLY_FLAG_DONE,
        CHUNK_NONE,
        req.cookie,
        req.offset,
        0,
    );
    Reply(out)
}

/// Splits a read range into data runs and runs that read as zeros, merging neighbours.
fn read_runs(image: &Image, offset: u64, len: u64) -> Result<Vec<Run>, Failure> {
    let extents = image.map(offset, len).map_err(engine_failure)?;
    let mut runs: Vec<Run> = Vec::new();
    for e in extents {
        let hole = e.zero();
        match runs.last_mut() {
            Some(last) if last.hole == hole => last.len += e.length,
            _ => runs.push(Run {
                start: e.start,
                len: e.length,
                hole,
            }),
        }
    }
    Ok(runs)
}

/// The base:allocation flags of an extent: data is 0; anything that reads as zeros without
/// data (a zero cluster or nothing allocated in the chain) is HOLE|ZERO, as qemu reports it.
fn allocation_flags(e: &Extent) -> u32 {
    if e.data() {
        0
    } else {
        STATE_HOLE | STATE_ZERO
    }
}

/// The qemu:allocation-depth value: 0 unallocated, 1 the exported image, 2 its backing file...
fn depth_value(e: &Extent) -> u32 {
    if e.present() {
        e.depth + 1
    } else {
        0
    }
}

/// `qemu:dirty-bitmap:` flags: set where the bitmap has a dirty granule.
const STATE_DIRTY: u32 = 1 << 0;

/// The image of `top`'s chain that holds bitmap `name`: after an external snapshot the disk's
/// bitmaps stay on the image below the new overlay, as in QEMU, and stop recording writes.
/// `top` itself when no image has it (its lookup then names the missing bitmap).
fn holder_of_bitmap<'a>(top: &'a Image, name: &str) -> &'a Image {
    let mut image = top;
    loop {
        if image.bitmaps().iter().any(|b| b.name == name) {
            return image;
        }
        match image.backing_image() {
            Some(below) => image = below,
            None => return top,
        }
    }
}

/// Appends the dirty and clean runs of bitmap `name` over `[pos, pos + len)` to `list`.
fn dirty_status(
    export: &Export,
    name: &str,
    pos: u64,
    len: u64,
    list: &mut Vec<StatusExtent>,
) -> Result<(), Failure> {
    let end = pos + len;
    let mut at = pos;
    let top = export.image();
    for (start, run) in holder_of_bitmap(&top, name)
        .dirty_extents(name, pos, len)
        .map_err(engine_failure)?
    {
        if start > at {
            push_status(list, start - at, 0);
        }
        push_status(list, run, STATE_DIRTY);
        at = start + run;
    }
    if at < end {
        push_status(list, end - at, 0);
    }
    Ok(())
}

/// Appends an extent, merging it into the previous one when the flags match.
fn push_status(list: &mut Vec<StatusExtent>, len: u64, flags: u32) {
    match list.last_mut() {
        Some(last) if last.flags == flags => last.len += len,
        _ => list.push(StatusExtent { len, flags }),
    }
}

fn block_status(
    export: &Export,
    neg: &Negotiated,
    req: &Request,
    payload: &[u8],
) -> Result<Reply, Failure> {
    let mode = neg.mode;
    flags_ok(req, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE)?;
    if mode == Replies::Simple || neg.contexts.is_empty() {
        return Err(Failure::new(EINVAL, "CMD_BLOCK_STATUS not negotiated"));
    }
    let (length, ids): (u64, Vec<u32>) = if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        let p = parse_status_payload(payload)
            .filter(|p| {
                p.ids.iter().enumerate().all(|(i, id)| {
                    neg.contexts.iter().any(|c| c.id == *id) && !p.ids[..i].contains(id)
                })
            })
            .ok_or_else(|| Failure::new(EINVAL, "CMD_BLOCK_STATUS payload not valid"))?;
        (p.length, p.ids)
    } else {
        (req.length, neg.contexts.iter().map(|c| c.id).collect())
    };
    if length == 0 {
        return Err(Failure::new(EINVAL, "need non-zero length"));
    }
    in_bounds(export, req, length, EINVAL)?;
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    // One list per requested context; `ids` only holds ids negotiated for this export.
    let mut lists: Vec<(u32, ContextKind<'_>, Vec<StatusExtent>)> = ids
        .iter()
        .filter_map(|&id| Some((id, export.context_kind(id)?, Vec::new())))
        .collect();
    let want_map = lists.iter().any(|(_, kind, _)| {
        matches!(
            kind,
            ContextKind::BaseAllocation | ContextKind::AllocationDepth
        )
    });
    let span = length.min(MAX_STATUS_SPAN);
    let end = req.offset + span;
    let mut pos = req.offset;
    let mut window = FIRST_STATUS_WINDOW;
    // Enough is known once a list has a closed extent (REQ_ONE) or passes the cap; lists that
    // know enough take no more extents, so memory stays bounded by the cap.
    let done = |list: &Vec<StatusExtent>| list.len() > MAX_EXTENTS || (req_one && list.len() >= 2);
    while pos < end && !lists.iter().all(|(_, _, list)| done(list)) {
        let n = window.min(end - pos);
        let extents = if want_map {
            export.image().map(pos, n).map_err(engine_failure)?
        } else {
            Vec::new()
        };
        for (_, kind, list) in lists.iter_mut().filter(|(_, _, l)| !done(l)) {
            match *kind {
                ContextKind::BaseAllocation => {
                    for e in &extents {
                        push_status(list, e.length, allocation_flags(e));
                    }
                }
                ContextKind::AllocationDepth => {
                    for e in &extents {
                        push_status(list, e.length, depth_value(e));
                    }
                }
                ContextKind::DirtyBitmap(name) => dirty_status(export, name, pos, n, list)?,
            }
        }
        pos += n;
        window = (window * 2).min(MAX_STATUS_WINDOW);
    }
    let keep = if req_one { 1 } else { MAX_EXTENTS };
    let mut out = Vec::new();
    let last = lists.len();
    for (i, (id, _, list)) in lists.iter_mut().enumerate() {
        list.truncate(keep);
        let flags = if i + 1 == last { REPLY_FLAG_DONE } else { 0 };
        block_status_chunk(&mut out, mode, flags, req.cookie, req.offset, *id, list);
    }
    Ok(Reply(out))
}
