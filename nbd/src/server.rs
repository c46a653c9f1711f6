//! One NBD connection: the fixed-newstyle handshake, then transmission against the export's
//! shared [`Image`]. A malformed or hostile byte stream ends the connection (or gets the
//! protocol's error reply); it never panics and never sizes a buffer beyond the wire limits.

use std::io::{self, Read, Write};
use std::sync::Arc;

use qcow2::{Extent, Image};

use crate::wire::*;

/// One export: a name and the image behind it, shared by every connection.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub image: Arc<Image>,
    pub read_only: bool,
    pub description: Option<String>,
    /// Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (qemu-nbd's `-B`).
    pub bitmaps: Vec<String>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The meta contexts an export offers, by id (qemu's numbering): 0 `base:allocation`,
/// 1 `qemu:allocation-depth`, 2 + i the i-th exported bitmap.
fn contexts(export: &Export) -> Vec<String> {
    let mut names = vec![
        "base:allocation".to_string(),
        "qemu:allocation-depth".to_string(),
    ];
    names.extend(
        export
            .bitmaps
            .iter()
            .map(|b| format!("qemu:dirty-bitmap:{b}")),
    );
    names
}

/// Serves one connection until the client disconnects or breaks the protocol.
pub fn serve_connection<S: Read + Write>(exports: &[Export], stream: S) -> io::Result<()> {
    let mut conn = Connection {
        stream,
        structured: false,
        contexts: None,
    };
    let Some(export) = conn.handshake(exports)? else {
        return Ok(());
    };
    conn.transmission(&export)
}

struct Connection<S> {
    stream: S,
    structured: bool,
    /// Contexts chosen by SET_META_CONTEXT: the export they were chosen for, and their ids.
    contexts: Option<(String, Vec<u32>)>,
}

impl<S: Read + Write> Connection<S> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.stream.read_exact(buf)
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
        self.send(&option_reply(option, kind, payload))
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) -> io::Result<()> {
        self.reply(option, kind, message.as_bytes())
    }

    fn tx_flags(&self, export: &Export) -> u16 {
        let mut f = TX_HAS_FLAGS
            | TX_SEND_FLUSH
            | TX_SEND_FUA
            | TX_SEND_TRIM
            | TX_SEND_WRITE_ZEROES
            | TX_SEND_CACHE
            | TX_SEND_FAST_ZERO
            // Every connection writes through the one shared image, and a flush makes every
            // acknowledged write of every connection durable.
            | TX_CAN_MULTI_CONN;
        if export.read_only {
            // As qemu-nbd: nothing to trim or zero on a read-only export.
            f |= TX_READ_ONLY;
            f &= !(TX_SEND_TRIM | TX_SEND_WRITE_ZEROES | TX_SEND_FAST_ZERO);
        }
        if self.structured {
            f |= TX_SEND_DF;
        }
        f
    }

    /// Option haggling; the export chosen by GO or EXPORT_NAME, or `None` when the client left.
    fn handshake(&mut self, exports: &[Export]) -> io::Result<Option<Export>> {
        let mut greeting = Vec::with_capacity(18);
        greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&OPT_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send(&greeting)?;
        let client = self.u32()?;
        if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Ok(None);
        }
        let no_zeroes = client & CLIENT_NO_ZEROES != 0;
        let find = |name: &str| -> Option<Export> {
            exports
                .iter()
                .find(|e| e.name == name)
                .or_else(|| (name.is_empty() && exports.len() == 1).then(|| &exports[0]))
                .cloned()
        };
        loop {
            if self.u64()? != OPT_MAGIC {
                return Ok(None);
            }
            let option = self.u32()?;
            let len = self.u32()?;
            if len > MAX_OPTION_DATA {
                return Ok(None);
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let Some(export) = std::str::from_utf8(&data).ok().and_then(find) else {
                        return Ok(None);
                    };
                    let mut out = export.image.size().to_be_bytes().to_vec();
                    out.extend_from_slice(&self.tx_flags(&export).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    self.send(&out)?;
                    self.select_for(&export.name);
                    return Ok(Some(export));
                }
                OPT_ABORT => {
                    // The client may hang up without reading the ACK.
                    let _ = self.reply(option, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.error(
                            option,
                            REP_ERR_INVALID,
                            "option 'list' has unexpected length",
                        )?;
                        continue;
                    }
                    for e in exports {
                        let mut p = (e.name.len() as u32).to_be_bytes().to_vec();
                        p.extend_from_slice(e.name.as_bytes());
                        if let Some(d) = &e.description {
                            p.extend_from_slice(d.as_bytes());
                        }
                        self.reply(option, REP_SERVER, &p)?;
                    }
                    self.reply(option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(req) = InfoRequest::decode(&data) else {
                        self.error(option, REP_ERR_INVALID, "malformed INFO/GO request")?;
                        continue;
                    };
                    let Some(export) = find(&req.name) else {
                        let shown: String = req.name.chars().take(80).collect();
                        self.error(
                            option,
                            REP_ERR_UNKNOWN,
                            &format!("export '{shown}' not present"),
                        )?;
                        continue;
                    };
                    if req.infos.contains(&INFO_NAME) {
                        let mut p = INFO_NAME.to_be_bytes().to_vec();
                        p.extend_from_slice(export.name.as_bytes());
                        self.reply(option, REP_INFO, &p)?;
                    }
                    if let Some(d) = &export.description {
                        let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(d.as_bytes());
                        self.reply(option, REP_INFO, &p)?;
                    }
                    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    p.extend_from_slice(&1u32.to_be_bytes());
                    p.extend_from_slice(&4096u32.to_be_bytes());
                    p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    self.reply(option, REP_INFO, &p)?;
                    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                    p.extend_from_slice(&export.image.size().to_be_bytes());
                    p.extend_from_slice(&self.tx_flags(&export).to_be_bytes());
                    self.reply(option, REP_INFO, &p)?;
                    self.reply(option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        self.select_for(&export.name);
                        return Ok(Some(export));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.error(option, REP_ERR_INVALID, "unexpected data")?;
                    } else if self.structured {
                        self.error(
                            option,
                            REP_ERR_INVALID,
                            "structured reply already negotiated",
                        )?;
                    } else {
                        self.structured = true;
                        self.reply(option, REP_ACK, &[])?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = option == OPT_SET_META_CONTEXT;
                    if set {
                        // Every SET replaces the selection, even a failing one.
                        self.contexts = None;
                    }
                    if set && !self.structured {
                        self.error(
                            option,
                            REP_ERR_INVALID,
                            "request option 'set meta context' when structured reply is not negotiated",
                        )?;
                        continue;
                    }
                    let Some(req) = MetaRequest::decode(&data) else {
                        self.error(option, REP_ERR_INVALID, "malformed meta context request")?;
                        continue;
                    };
                    let Some(export) = find(&req.export) else {
                        self.error(option, REP_ERR_UNKNOWN, "export not present")?;
                        continue;
                    };
                    let names = contexts(&export);
                    let ids = matching_contexts(&names, &req.queries, set);
                    for &id in &ids {
                        let mut p = if set { id } else { 0 }.to_be_bytes().to_vec();
                        p.extend_from_slice(names[id as usize].as_bytes());
                        self.reply(option, REP_META_CONTEXT, &p)?;
                    }
                    if set {
                        self.contexts = Some((export.name.clone(), ids));
                    }
                    self.reply(option, REP_ACK, &[])?;
                }
                OPT_STARTTLS => self.error(option, REP_ERR_POLICY, "TLS not configured")?,
                other => self.error(
                    option,
                    REP_ERR_UNSUP,
                    &format!("Unsupported option {other}"),
                )?,
            }
        }
    }

    /// Contexts chosen for another export do not apply to the one finally picked.
    fn select_for(&mut self, export: &str) {
        if self.contexts.as_ref().is_some_and(|(e, _)| e != export) {
            self.contexts = None;
        }
    }

    fn transmission(&mut self, export: &Export) -> io::Result<()> {
        let image = &*export.image;
        let size = image.size();
        loop {
            let mut header = [0u8; 28];
            match self.stream.read_exact(&mut header) {
                Ok(()) => {}
                // A client may just close at a request boundary.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(r) = Request::decode(&header) else {
                return Ok(());
            };
            let end = r.offset.checked_add(r.length as u64);
            let in_bounds = end.is_some_and(|e| e <= size);
            match r.kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    if r.length > MAX_PAYLOAD {
                        // The payload is not read: the stream cannot go on (as qemu-nbd).
                        let _ = self.fail(r, EINVAL, "write payload too large");
                        return Ok(());
                    }
                    let mut data = vec![0u8; r.length as usize];
                    self.read_exact(&mut data)?;
                    if export.read_only {
                        self.fail(r, EPERM, "Export is read-only")?;
                    } else if !in_bounds {
                        self.fail(r, EINVAL, "operation past EOF")?;
                    } else {
                        let done = image
                            .write_at(&data, r.offset)
                            .and_then(|_| fua(image, r.flags));
                        self.finish(r, done)?;
                    }
                }
                CMD_READ => {
                    if r.length > MAX_PAYLOAD {
                        self.fail(r, EINVAL, "read length larger than the maximum")?;
                    } else if !in_bounds {
                        self.fail(r, EINVAL, "operation past EOF")?;
                    } else if r.flags & CMD_FLAG_DF != 0 && !self.structured {
                        self.fail(r, EINVAL, "DF without structured replies")?;
                    } else {
                        self.read(image, r)?;
                    }
                }
                CMD_FLUSH => {
                    let done = image.flush();
                    self.finish(r, done)?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    if export.read_only {
                        self.fail(r, EPERM, "Export is read-only")?;
                    } else if !in_bounds {
                        self.fail(r, EINVAL, "operation past EOF")?;
                    } else if r.kind == CMD_TRIM {
                        // A hint: only whole clusters are freed.
                        let done = image
                            .discard(r.offset, r.length as u64)
                            .and_then(|_| fua(image, r.flags));
                        self.finish(r, done)?;
                    } else if r.flags & CMD_FLAG_FAST_ZERO != 0 && !fast_zero_possible(image, r) {
                        self.fail(r, ENOTSUP, "zeroing this range would write zeros")?;
                    } else {
                        let unmap = r.flags & CMD_FLAG_NO_HOLE == 0;
                        let done = image
                            .write_zeroes(r.offset, r.length as u64, unmap)
                            .and_then(|_| fua(image, r.flags));
                        self.finish(r, done)?;
                    }
                }
                CMD_CACHE => {
                    if in_bounds {
                        self.finish(r, Ok(()))?;
                    } else {
                        self.fail(r, EINVAL, "operation past EOF")?;
                    }
                }
                CMD_BLOCK_STATUS => {
                    let ids = match &self.contexts {
                        Some((e, ids)) if e == &export.name && !ids.is_empty() => ids.clone(),
                        _ => {
                            self.fail(r, EINVAL, "CMD_BLOCK_STATUS not negotiated")?;
                            continue;
                        }
                    };
                    if r.length == 0 {
                        self.fail(r, EINVAL, "need non-zero length")?;
                    } else if !in_bounds {
                        self.fail(r, EINVAL, "operation past EOF")?;
                    } else {
                        self.block_status(export, r, &ids)?;
                    }
                }
                other => self.fail(
                    r,
                    EINVAL,
                    &format!("invalid request type ({other}) received"),
                )?,
            }
        }
    }

    /// Answers a request that carries no data: success or the engine's error.
    fn finish(&mut self, r: Request, done: qcow2::Result<()>) -> io::Result<()> {
        match done {
            Ok(()) => self.send(&simple_reply(0, r.cookie)),
            Err(e) => self.fail(r, errno(&e), &e.to_string()),
        }
    }

    fn fail(&mut self, r: Request, error: u32, message: &str) -> io::Result<()> {
        if self.structured {
            self.send(&error_chunk(r.cookie, error, message))
        } else {
            self.send(&simple_reply(error, r.cookie))
        }
    }

    /// READ: with structured replies, ranges that read as zeros go out as holes, the rest as
    /// data chunks (one data chunk with DF); otherwise one simple reply and the bytes.
    fn read(&mut self, image: &Image, r: Request) -> io::Result<()> {
        let len = r.length as u64;
        if !self.structured || r.flags & CMD_FLAG_DF != 0 || len == 0 {
            let mut data = vec![0u8; r.length as usize];
            if let Err(e) = image.read_at(&mut data, r.offset) {
                return self.fail(r, errno(&e), &e.to_string());
            }
            if !self.structured {
                self.send(&simple_reply(0, r.cookie))?;
                return self.send(&data);
            }
            if len == 0 {
                return self.send(&chunk_header(CHUNK_DONE, CHUNK_NONE, r.cookie, 0));
            }
            let mut out =
                chunk_header(CHUNK_DONE, CHUNK_OFFSET_DATA, r.cookie, 8 + r.length).to_vec();
            out.extend_from_slice(&r.offset.to_be_bytes());
            out.extend_from_slice(&data);
            return self.send(&out);
        }
        let runs = match image.map(r.offset, len) {
            Ok(extents) => runs(&extents, r.offset, len, |e| !e.zero()),
            Err(e) => return self.fail(r, errno(&e), &e.to_string()),
        };
        // Data is read before any chunk goes out, so a failing read gets a clean error reply.
        let mut chunks: Vec<(u64, u64, Option<Vec<u8>>)> = Vec::with_capacity(runs.len());
        for (start, length, data) in runs {
            if data {
                let mut buf = vec![0u8; length as usize];
                if let Err(e) = image.read_at(&mut buf, start) {
                    return self.fail(r, errno(&e), &e.to_string());
                }
                chunks.push((start, length, Some(buf)));
            } else {
                chunks.push((start, length, None));
            }
        }
        let last = chunks.len() - 1;
        for (i, (start, length, data)) in chunks.into_iter().enumerate() {
            let flags = if i == last { CHUNK_DONE } else { 0 };
            match data {
                Some(bytes) => {
                    let mut out =
                        chunk_header(flags, CHUNK_OFFSET_DATA, r.cookie, 8 + length as u32)
                            .to_vec();
                    out.extend_from_slice(&start.to_be_bytes());
                    out.extend_from_slice(&bytes);
                    self.send(&out)?;
                }
                None => {
                    let mut out = chunk_header(flags, CHUNK_OFFSET_HOLE, r.cookie, 12).to_vec();
                    out.extend_from_slice(&start.to_be_bytes());
                    out.extend_from_slice(&(length as u32).to_be_bytes());
                    self.send(&out)?;
                }
            }
        }
        Ok(())
    }

    /// BLOCK_STATUS: one chunk per selected context, extents merged by equal flags.
    fn block_status(&mut self, export: &Export, r: Request, ids: &[u32]) -> io::Result<()> {
        let image = &*export.image;
        let end = r.offset + r.length as u64;
        let extents = match image.map(r.offset, r.length as u64) {
            Ok(e) => e,
            Err(e) => return self.fail(r, errno(&e), &e.to_string()),
        };
        // Dirty bitmaps: (start, length, dirty) runs covering the request, per exported bitmap.
        let mut dirty_runs: Vec<Vec<(u64, u64, bool)>> = Vec::new();
        for name in &export.bitmaps {
            let dirty = match image.dirty_extents(name, r.offset, r.length as u64) {
                Ok(d) => d,
                Err(e) => return self.fail(r, errno(&e), &e.to_string()),
            };
            let mut runs = Vec::new();
            let mut pos = r.offset;
            for (start, len) in dirty {
                if start > pos {
                    runs.push((pos, start - pos, false));
                }
                runs.push((start, len, true));
                pos = start + len;
            }
            if pos < end {
                runs.push((pos, end - pos, false));
            }
            dirty_runs.push(runs);
        }
        for (n, &id) in ids.iter().enumerate() {
            if id >= 2 {
                let runs = &dirty_runs[(id - 2) as usize];
                let mut list: Vec<(u64, u32)> = Vec::new();
                for &(_, len, dirty) in runs {
                    let f = u32::from(dirty);
                    match list.last_mut() {
                        Some((l, lf)) if *lf == f && *l + len <= u32::MAX as u64 => *l += len,
                        _ => list.push((len, f)),
                    }
                }
                self.send_status(r, id, list, n == ids.len() - 1)?;
                continue;
            }
            let flags_of = |e: &Extent| -> u32 {
                if id == 0 {
                    (if e.data() { 0 } else { 1 }) | (if e.zero() { 2 } else { 0 })
                } else if e.present() {
                    e.depth + 1
                } else {
                    0
                }
            };
            let mut list: Vec<(u64, u32)> = Vec::new();
            for e in &extents {
                let start = e.start.max(r.offset);
                let end = (e.start + e.length).min(r.offset + r.length as u64);
                if end <= start {
                    continue;
                }
                let f = flags_of(e);
                match list.last_mut() {
                    Some((len, lf)) if *lf == f && *len + (end - start) <= u32::MAX as u64 => {
                        *len += end - start
                    }
                    _ => list.push((end - start, f)),
                }
            }
            self.send_status(r, id, list, n == ids.len() - 1)?;
        }
        Ok(())
    }

    /// One BLOCK_STATUS chunk: `(length, flags)` extents for context `id`.
    fn send_status(
        &mut self,
        r: Request,
        id: u32,
        mut list: Vec<(u64, u32)>,
        last: bool,
    ) -> io::Result<()> {
        if r.flags & CMD_FLAG_REQ_ONE != 0 {
            list.truncate(1);
        }
        list.truncate(MAX_EXTENTS);
        let flags = if last { CHUNK_DONE } else { 0 };
        let mut out = chunk_header(
            flags,
            CHUNK_BLOCK_STATUS,
            r.cookie,
            4 + 8 * list.len() as u32,
        )
        .to_vec();
        out.extend_from_slice(&id.to_be_bytes());
        for (len, f) in list {
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
        self.send(&out)
    }
}

/// The ids of the contexts `queries` select: exact names for SET; for LIST also the namespace
/// wildcards, and everything when there is no query.
fn matching_contexts(names: &[String], queries: &[String], set: bool) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut add = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    if queries.is_empty() && !set {
        for id in 0..names.len() {
            add(id as u32);
        }
    }
    for q in queries {
        for (id, name) in names.iter().enumerate() {
            let wildcard = !set && name.starts_with(q.as_str()) && q.ends_with(':');
            if q == name || wildcard {
                add(id as u32);
            }
        }
    }
    ids.sort_unstable();
    ids
}

/// Merges extents into runs of `[start, start + len)` clipped to the request, by `keep`.
fn runs(
    extents: &[Extent],
    offset: u64,
    len: u64,
    keep: impl Fn(&Extent) -> bool,
) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents {
        let start = e.start.max(offset);
        let end = (e.start + e.length).min(offset + len);
        if end <= start {
            continue;
        }
        let k = keep(e);
        match out.last_mut() {
            Some((s, l, d))
                if *d == k && *s + *l == start && *l + (end - start) <= MAX_PAYLOAD as u64 =>
            {
                *l += end - start
            }
            _ => out.push((start, end - start, k)),
        }
    }
    if out.is_empty() {
        out.push((offset, len, true));
    }
    out
}

/// Whether zeroing the range needs no data written: whole clusters, or the tail of the disk.
fn fast_zero_possible(image: &Image, r: Request) -> bool {
    let cs = image.cluster_size();
    let end = r.offset + r.length as u64;
    image.header().version >= 3 && r.offset % cs == 0 && (end % cs == 0 || end == image.size())
}

fn fua(image: &Image, flags: u16) -> qcow2::Result<()> {
    if flags & CMD_FLAG_FUA != 0 {
        image.flush()
    } else {
        Ok(())
    }
}

/// The NBD error for an engine error.
fn errno(e: &qcow2::Error) -> u32 {
    match e {
        qcow2::Error::OutOfBounds { .. } | qcow2::Error::InvalidArgument { .. } => EINVAL,
        qcow2::Error::ReadOnly { .. } => EPERM,
        qcow2::Error::Io { source, .. } if source.raw_os_error() == Some(28) => ENOSPC,
        _ => EIO,
    }
}
