//! The server against a raw client over a socket pair: handshake answers, reply forms (simple,
//! structured, extended), sparse reads, block status, error replies, limits, concurrency and
//! hostile byte streams. Real clients (qemu-img, nbdinfo, fio) are tested in the CLI's tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use qcow2::{CreateOptions, Image, MemoryStorage};
use qcow2_nbd::wire::*;
use qcow2_nbd::{serve_stream, ConnectionOptions, Export, ServerOptions};

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 65536;

fn image(version: u32) -> Arc<Image> {
    let options = CreateOptions::new(SIZE).version(version);
    Arc::new(Image::create_in(Box::new(MemoryStorage::new()), "mem", &options).unwrap())
}

fn exports() -> Vec<Export> {
    let img = image(3);
    img.write_at(&[0x11; 65536], 0).unwrap();
    let mut rw = Export::new("", img.clone());
    rw.allocation_depth = true;
    let mut ro = Export::new("ro", img);
    ro.read_only = true;
    ro.description = Some("read-only view".into());
    vec![rw, ro]
}

fn serve(exports: Vec<Export>, workers: usize) -> (UnixStream, JoinHandle<()>) {
    let (client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let options = ServerOptions::default()
            .max_connections(0)
            .connection(ConnectionOptions::default().workers(workers));
        let r = server.try_clone().unwrap();
        let _ = serve_stream(r, server, &exports, &options);
    });
    (client, t)
}

struct Client {
    s: UnixStream,
    mode: Replies,
}

#[derive(Debug)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    fn new(s: UnixStream) -> Client {
        let mut c = Client {
            s,
            mode: Replies::Simple,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(g, greeting());
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.s.write_all(&encode_option(option, data)).unwrap();
    }

    fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut data).unwrap();
        OptReply {
            option: be32(&h[8..]),
            kind: be32(&h[12..]),
            data,
        }
    }

    /// Sends an option and collects replies up to the final one (ACK or an error).
    fn haggle(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.option(option, data);
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    fn ack(&mut self, option: u32) {
        let r = self.haggle(option, &[]);
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
        match option {
            OPT_STRUCTURED_REPLY => self.mode = Replies::Structured,
            OPT_EXTENDED_HEADERS => self.mode = Replies::Extended,
            _ => {}
        }
    }

    fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<OptReply> {
        self.haggle(OPT_SET_META_CONTEXT, &encode_meta_request(name, queries))
    }

    /// Negotiates the reply mode of `mode` (structured or extended).
    fn reply_mode(&mut self, mode: Replies) {
        self.ack(if mode == Replies::Extended {
            OPT_EXTENDED_HEADERS
        } else {
            OPT_STRUCTURED_REPLY
        });
    }

    /// GO; returns (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let r = self.haggle(OPT_GO, &encode_info_request(name, &[INFO_BLOCK_SIZE]));
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
        let export = r
            .iter()
            .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 0])
            .unwrap();
        (
            be64(&export.data[2..]),
            u16::from_be_bytes([export.data[10], export.data[11]]),
        )
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&encode_request(&r, self.mode)).unwrap();
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u64);
        self.s.write_all(data).unwrap();
    }

    /// One chunk (structured or extended mode).
    fn chunk(&mut self) -> Chunk {
        let (hl, magic) = match self.mode {
            Replies::Extended => (32, EXTENDED_REPLY_MAGIC),
            _ => (20, STRUCTURED_REPLY_MAGIC),
        };
        let mut h = vec![0u8; hl];
        self.s.read_exact(&mut h).unwrap();
        if be32(&h) == SIMPLE_REPLY_MAGIC {
            // A simple reply in structured mode: 16 bytes, 4 already read too many.
            assert_eq!(self.mode, Replies::Structured);
            let error = be32(&h[4..]);
            let cookie = be64(&h[8..]);
            // The 4 extra bytes belong to the next message: refuse that situation in tests by
            // only calling chunk() when a chunk is expected.
            panic!("simple reply (error {error}, cookie {cookie}) where a chunk was expected");
        }
        assert_eq!(be32(&h), magic);
        let len = if self.mode == Replies::Extended {
            be64(&h[24..]) as usize
        } else {
            be32(&h[16..]) as usize
        };
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: be64(&h[8..]),
            payload,
        }
    }

    /// All chunks of one reply (up to DONE), for a client with one request outstanding.
    fn reply(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        (be32(&h[4..]), be64(&h[8..]))
    }

    /// The error of a reply to a non-read command in structured mode (0 for a simple OK).
    fn status(&mut self) -> u32 {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        if be32(&m) == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.s.read_exact(&mut rest).unwrap();
            return be32(&rest);
        }
        let hl = if self.mode == Replies::Extended {
            32
        } else {
            20
        };
        let mut h = vec![0u8; hl];
        h[..4].copy_from_slice(&m);
        self.s.read_exact(&mut h[4..]).unwrap();
        let len = if self.mode == Replies::Extended {
            be64(&h[24..]) as usize
        } else {
            be32(&h[16..]) as usize
        };
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        match u16::from_be_bytes([h[6], h[7]]) {
            CHUNK_NONE => 0,
            CHUNK_ERROR => be32(&payload),
            other => panic!("unexpected chunk type {other}"),
        }
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// The (id, name) of each META_CONTEXT reply.
fn contexts_of(replies: &[OptReply]) -> Vec<(u32, Vec<u8>)> {
    replies
        .iter()
        .filter(|r| r.kind == REP_META_CONTEXT)
        .map(|r| (be32(&r.data), r.data[4..].to_vec()))
        .collect()
}

fn connect_structured(exports: Vec<Export>) -> (Client, JoinHandle<()>) {
    let (s, t) = serve(exports, 4);
    let mut c = Client::new(s);
    c.ack(OPT_STRUCTURED_REPLY);
    (c, t)
}

/// Decodes a READ reply into the bytes it describes (holes as zeros), checking chunk rules.
fn assemble(chunks: &[Chunk], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xAAu8; len];
    let mut covered = vec![false; len];
    for c in chunks {
        let (start, n) = match c.kind {
            CHUNK_OFFSET_DATA => {
                let s = be64(&c.payload) - offset;
                let n = c.payload.len() - 8;
                out[s as usize..s as usize + n].copy_from_slice(&c.payload[8..]);
                (s as usize, n)
            }
            CHUNK_OFFSET_HOLE => {
                let s = (be64(&c.payload) - offset) as usize;
                let n = be32(&c.payload[8..]) as usize;
                assert!(n > 0);
                out[s..s + n].fill(0);
                (s, n)
            }
            other => panic!("chunk type {other} in a successful read"),
        };
        for b in &mut covered[start..start + n] {
            assert!(!*b, "overlapping read chunks");
            *b = true;
        }
    }
    assert!(covered.iter().all(|&b| b), "read chunks leave a gap");
    out
}

#[test]
fn handshake_lists_exports_and_answers_options_as_qemu() {
    let (s, t) = serve(exports(), 4);
    let mut c = Client::new(s);
    let r = c.haggle(OPT_LIST, &[]);
    let names: Vec<Vec<u8>> = r
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| r.data[4..4 + be32(&r.data) as usize].to_vec())
        .collect();
    assert_eq!(names, vec![b"".to_vec(), b"ro".to_vec()]);
    assert!(r[1].data.ends_with(b"read-only view"));
    assert_eq!(c.haggle(OPT_LIST, b"x")[0].kind, REP_ERR_INVALID);
    assert_eq!(c.haggle(99, b"abc")[0].kind, REP_ERR_UNSUP);
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].kind, REP_ERR_POLICY);
    // SET before structured replies is refused; LIST is allowed.
    assert_eq!(
        c.set_meta("", &["base:allocation"])[0].kind,
        REP_ERR_INVALID
    );
    let r = c.haggle(OPT_LIST_META_CONTEXT, &encode_meta_request("", &[]));
    let listed: Vec<&[u8]> = r
        .iter()
        .filter(|r| r.kind == REP_META_CONTEXT)
        .map(|r| &r.data[4..])
        .collect();
    assert_eq!(
        listed,
        vec![&b"base:allocation"[..], b"qemu:allocation-depth"]
    );
    let r = c.haggle(
        OPT_LIST_META_CONTEXT,
        &encode_meta_request("ro", &["qemu:"]),
    );
    assert_eq!(r.len(), 1, "ro has no allocation-depth context: {r:?}");
    let r = c.haggle(OPT_INFO, &encode_info_request("nope", &[]));
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    assert_eq!(r[0].data, b"export 'nope' not present");
    // Malformed INFO data.
    assert_eq!(c.haggle(OPT_INFO, &[0, 0, 0, 9])[0].kind, REP_ERR_INVALID);
    c.ack(OPT_STRUCTURED_REPLY);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ERR_INVALID);
    // INFO on the read-only export: name, description, block size, export, ACK.
    let r = c.haggle(
        OPT_INFO,
        &encode_info_request("ro", &[INFO_NAME, INFO_BLOCK_SIZE]),
    );
    let kinds: Vec<u16> = r
        .iter()
        .filter(|r| r.kind == REP_INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    assert_eq!(
        kinds,
        vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, INFO_EXPORT]
    );
    let bs = r
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[1] == 3)
        .unwrap();
    assert_eq!(
        (
            be32(&bs.data[2..]),
            be32(&bs.data[6..]),
            be32(&bs.data[10..])
        ),
        (1, 4096, 32 << 20)
    );
    // SET selects exact names only, once each, and ignores unknown ones.
    let r = c.set_meta(
        "",
        &[
            "base:",
            "qemu:allocation-depth",
            "base:allocation",
            "x:y",
            "base:allocation",
        ],
    );
    assert_eq!(
        contexts_of(&r),
        vec![
            (1, b"qemu:allocation-depth".to_vec()),
            (0, b"base:allocation".to_vec())
        ]
    );
    let (size, flags) = c.go("");
    assert_eq!(size, SIZE);
    // qemu-nbd -e 0: 0x0ded.
    assert_eq!(flags, 0x0ded);
    c.request(0, CMD_DISC, 0, 0, 0);
    assert!(c.closed());
    t.join().unwrap();
}

#[test]
fn unknown_client_flags_and_bad_option_magic_close_the_connection() {
    let (mut s, t) = serve(exports(), 4);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&4u32.to_be_bytes()).unwrap();
    assert!(Client {
        s,
        mode: Replies::Simple
    }
    .closed());
    t.join().unwrap();

    let (s, t) = serve(exports(), 4);
    let mut c = Client::new(s);
    c.s.write_all(&[0x55; 16]).unwrap();
    assert!(c.closed());
    t.join().unwrap();
}

#[test]
fn export_name_ends_haggling_with_the_old_reply() {
    let (s, t) = serve(exports(), 4);
    let mut g = Client::new(s);
    g.option(OPT_EXPORT_NAME, b"ro");
    let mut r = [0u8; 10];
    g.s.read_exact(&mut r).unwrap();
    assert_eq!(be64(&r), SIZE);
    // Read-only, no DF (no structured replies), multi-conn: 0x058f less DF = 0x050f.
    assert_eq!(u16::from_be_bytes([r[8], r[9]]), 0x050f);
    // Simple replies: a read answers with the header and then the data.
    g.request(0, CMD_READ, 7, 0, 512);
    assert_eq!(g.simple(), (0, 7));
    let mut data = [0u8; 512];
    g.s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0x11; 512]);
    // Writes to a read-only export: EPERM.
    g.write(8, 0, &[1; 512], 0);
    assert_eq!(g.simple(), (EPERM, 8));
    drop(g);
    t.join().unwrap();
}

#[test]
fn structured_reads_send_holes_and_respect_df() {
    let (mut c, t) = connect_structured(exports());
    c.go("");
    // 64 KiB of data then 128 KiB that reads as zeros.
    c.request(0, CMD_READ, 1, 0, 3 * CLUSTER);
    let r = c.reply();
    assert_eq!(r.iter().map(|c| c.kind).collect::<Vec<_>>(), [1, 2]);
    assert!(r.iter().all(|c| c.cookie == 1));
    assert_eq!(r[0].flags, 0);
    let bytes = assemble(&r, 0, 3 * CLUSTER as usize);
    assert!(bytes[..65536].iter().all(|&b| b == 0x11));
    assert!(bytes[65536..].iter().all(|&b| b == 0));
    // DF: one data chunk, zeros written out.
    c.request(CMD_FLAG_DF, CMD_READ, 2, 4096, 2 * CLUSTER);
    let r = c.reply();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, CHUNK_OFFSET_DATA);
    assert_eq!(
        assemble(&r, 4096, 2 * CLUSTER as usize),
        bytes[4096..4096 + 2 * 65536]
    );
    // Unaligned reads inside a hole.
    c.request(0, CMD_READ, 3, 100_003, 17);
    let r = c.reply();
    assert_eq!((r.len(), r[0].kind), (1, CHUNK_OFFSET_HOLE));
    // Zero length: a NONE chunk.
    c.request(0, CMD_READ, 4, 0, 0);
    assert_eq!(c.reply()[0].kind, CHUNK_NONE);
    // Errors: past the end, over the maximum, bad flags; the connection stays up.
    for (cookie, flags, off, len) in [
        (5, 0, SIZE - 512, 1024),
        (6, 0, 0, (32 << 20) + 1),
        (7, CMD_FLAG_NO_HOLE, 0, 512),
    ] {
        c.request(flags, CMD_READ, cookie, off, len);
        let r = c.reply();
        assert_eq!((r.len(), r[0].kind, r[0].cookie), (1, CHUNK_ERROR, cookie));
        assert_eq!(be32(&r[0].payload), EINVAL);
    }
    c.request(0, 42, 8, 0, 0);
    assert_eq!(c.status(), EINVAL);
    c.request(0, CMD_READ, 9, 0, 512);
    assert_eq!(assemble(&c.reply(), 0, 512), [0x11; 512]);
    drop(c);
    t.join().unwrap();
}

#[test]
fn writes_zeroes_trims_and_flushes() {
    let (mut c, t) = connect_structured(exports());
    c.go("");
    c.write(1, 3 * CLUSTER, &[0x22; 65536], CMD_FLAG_FUA);
    assert_eq!(c.status(), 0);
    // FAST_ZERO inside an allocated cluster cannot be fast: ENOTSUP, data untouched.
    c.request(
        CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        2,
        3 * CLUSTER + 512,
        512,
    );
    assert_eq!(c.status(), ENOTSUP);
    c.request(0, CMD_READ, 3, 3 * CLUSTER, 1024);
    assert_eq!(assemble(&c.reply(), 3 * CLUSTER, 1024), [0x22; 1024]);
    // Without FAST_ZERO the same range is zeroed.
    c.request(
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        4,
        3 * CLUSTER + 512,
        512,
    );
    assert_eq!(c.status(), 0);
    // A whole cluster is fast.
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 5, 0, CLUSTER);
    assert_eq!(c.status(), 0);
    c.request(0, CMD_READ, 6, 0, 4 * CLUSTER);
    let bytes = assemble(&c.reply(), 0, 4 * CLUSTER as usize);
    let mut want = vec![0u8; 4 * CLUSTER as usize];
    want[3 * CLUSTER as usize..].fill(0x22);
    want[3 * CLUSTER as usize + 512..3 * CLUSTER as usize + 1024].fill(0);
    assert_eq!(bytes, want);
    c.request(0, CMD_TRIM, 7, 3 * CLUSTER, CLUSTER);
    assert_eq!(c.status(), 0);
    c.request(0, CMD_FLUSH, 8, 0, 0);
    assert_eq!(c.status(), 0);
    c.request(0, CMD_CACHE, 9, 0, CLUSTER);
    assert_eq!(c.status(), 0);
    // Writes past the end: ENOSPC; zero writes may exceed the payload limit.
    c.write(10, SIZE - 512, &[1; 1024], 0);
    assert_eq!(c.status(), ENOSPC);
    c.request(0, CMD_WRITE_ZEROES, 11, 0, SIZE);
    assert_eq!(c.status(), 0);
    drop(c);
    t.join().unwrap();
}

#[test]
fn an_oversized_write_is_refused_and_the_connection_closed() {
    let (mut c, t) = connect_structured(exports());
    c.go("");
    c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1);
    assert_eq!(c.status(), EINVAL);
    assert!(c.closed());
    t.join().unwrap();
}

fn extents(chunk: &Chunk, mode: Replies) -> (u32, Vec<(u64, u64)>) {
    let id = be32(&chunk.payload);
    let v = if mode == Replies::Extended {
        assert_eq!(chunk.kind, CHUNK_BLOCK_STATUS_EXT);
        let n = be32(&chunk.payload[4..]) as usize;
        (0..n)
            .map(|i| {
                let at = 8 + 16 * i;
                (be64(&chunk.payload[at..]), be64(&chunk.payload[at + 8..]))
            })
            .collect()
    } else {
        assert_eq!(chunk.kind, CHUNK_BLOCK_STATUS);
        chunk.payload[4..]
            .chunks_exact(8)
            .map(|e| (be32(e) as u64, be32(&e[4..]) as u64))
            .collect()
    };
    (id, v)
}

#[test]
fn block_status_reports_allocation_and_depth() {
    for mode in [Replies::Structured, Replies::Extended] {
        let (s, t) = serve(exports(), 4);
        let mut c = Client::new(s);
        c.reply_mode(mode);
        // No context selected yet: EINVAL after GO.
        c.set_meta("", &["base:allocation", "qemu:allocation-depth"]);
        let (_, flags) = c.go("");
        assert_eq!(
            flags & TF_BLOCK_STATUS_PAYLOAD != 0,
            mode == Replies::Extended
        );
        c.write(1, 2 * CLUSTER, &[5; 4096], 0);
        assert_eq!(c.status(), 0);
        c.request(0, CMD_BLOCK_STATUS, 2, 0, SIZE);
        let r = c.reply();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].flags, 0);
        let (id0, e0) = extents(&r[0], mode);
        let (id1, e1) = extents(&r[1], mode);
        assert_eq!((id0, id1), (0, 1));
        let c64 = CLUSTER;
        assert_eq!(e0, vec![(c64, 0), (c64, 3), (c64, 0), (SIZE - 3 * c64, 3)]);
        assert_eq!(e1, vec![(c64, 1), (c64, 0), (c64, 1), (SIZE - 3 * c64, 0)]);
        // REQ_ONE: one extent each, no longer than the request.
        c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 100, 1000);
        let r = c.reply();
        assert_eq!(extents(&r[0], mode).1, vec![(1000, 0)]);
        c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, c64, SIZE - c64);
        let r = c.reply();
        assert_eq!(extents(&r[0], mode).1, vec![(c64, 3)]);
        // Length 0 and past the end: EINVAL.
        c.request(0, CMD_BLOCK_STATUS, 5, 0, 0);
        assert_eq!(c.status(), EINVAL);
        c.request(0, CMD_BLOCK_STATUS, 6, SIZE, 1);
        assert_eq!(c.status(), EINVAL);
        if mode == Replies::Extended {
            // The payload form: only context 1, and a bad id.
            let mut p = (2 * c64).to_be_bytes().to_vec();
            p.extend_from_slice(&1u32.to_be_bytes());
            c.request(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 7, 0, p.len() as u64);
            c.s.write_all(&p).unwrap();
            let r = c.reply();
            assert_eq!(r.len(), 1);
            assert_eq!(extents(&r[0], mode), (1, vec![(c64, 1), (c64, 0)]));
            p[8..].copy_from_slice(&9u32.to_be_bytes());
            c.request(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 8, 0, p.len() as u64);
            c.s.write_all(&p).unwrap();
            assert_eq!(c.status(), EINVAL);
        }
        drop(c);
        t.join().unwrap();
    }
}

/// An export with a recording 64 KiB-granule bitmap `b0` that saw a write into cluster 1.
fn bitmap_export() -> Vec<Export> {
    let img = image(3);
    img.add_bitmap("b0", CLUSTER, false).unwrap();
    img.write_at(&[0x22; 100], CLUSTER + 10).unwrap();
    let mut e = Export::new("", img);
    e.bitmaps = vec!["b0".into()];
    vec![e]
}

#[test]
fn dirty_bitmap_context_reports_dirty_granules_and_tracks_new_writes() {
    for mode in [Replies::Structured, Replies::Extended] {
        let (s, t) = serve(bitmap_export(), 4);
        let mut c = Client::new(s);
        c.reply_mode(mode);
        // LIST finds the bitmap under its namespace; a namespace selects nothing in SET.
        let r = c.haggle(
            OPT_LIST_META_CONTEXT,
            &encode_meta_request("", &["qemu:dirty-bitmap:"]),
        );
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"qemu:dirty-bitmap:b0");
        let r = c.set_meta("", &["qemu:dirty-bitmap:", "qemu:allocation-depth"]);
        assert_eq!(r.len(), 1, "nothing selected: {r:?}");
        let r = c.set_meta("", &["qemu:dirty-bitmap:b0", "base:allocation"]);
        assert_eq!(
            contexts_of(&r),
            vec![
                (2, b"qemu:dirty-bitmap:b0".to_vec()),
                (0, b"base:allocation".to_vec())
            ]
        );
        c.go("");
        let c64 = CLUSTER;
        c.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE);
        let r = c.reply();
        assert_eq!(r.len(), 2);
        // Chunks come in the order the contexts were selected.
        assert_eq!(
            extents(&r[0], mode),
            (2, vec![(c64, 0), (c64, 1), (SIZE - 2 * c64, 0)])
        );
        assert_eq!(extents(&r[1], mode).0, 0);
        // A write through the export dirties its granules; the next answer shows it.
        c.write(2, 3 * c64 + 4096, &[9; 8192], 0);
        assert_eq!(c.status(), 0);
        c.request(0, CMD_BLOCK_STATUS, 3, c64 / 2, 4 * c64);
        let r = c.reply();
        assert_eq!(
            extents(&r[0], mode),
            (
                2,
                vec![(c64 / 2, 0), (c64, 1), (c64, 0), (c64, 1), (c64 / 2, 0)]
            )
        );
        c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, c64 + 100, 4 * c64);
        let r = c.reply();
        assert_eq!(extents(&r[0], mode), (2, vec![(c64 - 100, 1)]));
        drop(c);
        t.join().unwrap();
    }
}

#[test]
fn block_status_needs_a_context_for_the_chosen_export() {
    let (mut c, t) = connect_structured(exports());
    // Contexts set for "ro" do not apply to "".
    c.set_meta("ro", &["base:allocation"]);
    c.go("");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(c.status(), EINVAL);
    drop(c);
    t.join().unwrap();
}

#[test]
fn pipelined_requests_are_all_answered() {
    let (mut c, t) = connect_structured(exports());
    c.go("");
    let n = 64u64;
    let writer = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut w = Client {
            s: writer,
            mode: Replies::Structured,
        };
        for i in 0..n {
            let off = (i % 32) * CLUSTER;
            if i % 2 == 0 {
                w.write(i, off, &vec![i as u8; 4096], 0);
            } else {
                w.request(0, CMD_FLUSH, i, 0, 0);
            }
        }
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&h[4..]), 0);
        let cookie = be64(&h[8..]) as usize;
        assert!(!seen[cookie], "cookie {cookie} answered twice");
        seen[cookie] = true;
    }
    sender.join().unwrap();
    c.request(0, CMD_DISC, 0, 0, 0);
    assert!(c.closed());
    t.join().unwrap();
}

#[test]
fn extended_writes_without_payload_len_are_read_as_qemu_sends_them() {
    let (s, t) = serve(exports(), 4);
    let mut c = Client::new(s);
    // Each mode once, without data; extended headers may follow structured replies.
    let kind = |c: &mut Client, option: u32, data: &[u8]| c.haggle(option, data)[0].kind;
    assert_eq!(kind(&mut c, OPT_STRUCTURED_REPLY, &[1]), REP_ERR_INVALID);
    c.ack(OPT_STRUCTURED_REPLY);
    assert_eq!(kind(&mut c, OPT_STRUCTURED_REPLY, &[]), REP_ERR_INVALID);
    assert_eq!(kind(&mut c, OPT_EXTENDED_HEADERS, &[1]), REP_ERR_INVALID);
    c.ack(OPT_EXTENDED_HEADERS);
    assert_eq!(kind(&mut c, OPT_EXTENDED_HEADERS, &[]), REP_ERR_INVALID);
    // After extended headers, structured replies are refused as qemu refuses them.
    assert_eq!(
        kind(&mut c, OPT_STRUCTURED_REPLY, &[]),
        REP_ERR_EXT_HEADER_REQD
    );
    c.go("");
    c.write(1, CLUSTER, &[9; 1000], CMD_FLAG_FUA);
    assert_eq!(c.status(), 0);
    c.request(0, CMD_READ, 2, CLUSTER, 2000);
    let r = c.reply();
    let bytes = assemble(&r, CLUSTER, 2000);
    assert_eq!(&bytes[..1000], &[9; 1000][..]);
    assert!(bytes[1000..].iter().all(|&b| b == 0));
    drop(c);
    t.join().unwrap();
}

/// A tiny deterministic generator for the hostile streams.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn hostile_streams_end_cleanly() {
    let exports = exports();
    let options = ServerOptions::default()
        .max_connections(0)
        .connection(ConnectionOptions::default().workers(2));
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // A valid prefix (flags, SR, meta, GO) followed by mutated requests.
    let mut prefix = 3u32.to_be_bytes().to_vec();
    prefix.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    prefix.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("", &["base:allocation", "qemu:allocation-depth"]),
    ));
    prefix.extend(encode_option(OPT_GO, &encode_info_request("", &[])));
    for round in 0..300 {
        let mut input = if round % 3 == 0 {
            Vec::new()
        } else {
            prefix.clone()
        };
        for _ in 0..(rng.next() % 12) {
            let kind = (rng.next() % 10) as u16;
            let r = Request {
                flags: (rng.next() % 64) as u16,
                kind,
                cookie: rng.next(),
                offset: match rng.next() % 4 {
                    0 => 0,
                    1 => rng.next() % SIZE,
                    2 => SIZE - 512,
                    _ => rng.next(),
                },
                length: match rng.next() % 4 {
                    0 => 0,
                    1 => rng.next() % 70_000,
                    2 => u32::MAX as u64,
                    _ => rng.next() % (SIZE * 2),
                },
            };
            let mut b = encode_request(&r, Replies::Structured);
            if kind == CMD_WRITE && r.length < 70_000 {
                b.resize(b.len() + r.length as usize, 0x5a);
            }
            input.extend(b);
        }
        // Flip some bytes anywhere.
        for _ in 0..(rng.next() % 4) {
            if !input.is_empty() {
                let i = (rng.next() as usize) % input.len();
                input[i] ^= 1 << (rng.next() % 8);
            }
        }
        let mut sink = Vec::new();
        let _ = serve_stream(&input[..], &mut sink, &exports, &options);
    }
}

/// A memory store that counts the syncs asked of it.
#[derive(Default)]
struct CountingSyncs {
    bytes: MemoryStorage,
    syncs: Arc<std::sync::atomic::AtomicUsize>,
}

impl qcow2::Storage for CountingSyncs {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.bytes.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.bytes.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bytes.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.bytes.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.bytes.set_len(len)
    }
}

/// A write-through export (`--cache=writethrough`) makes each write durable before its reply,
/// FUA or not; a write-back one leaves it to FLUSH.
#[test]
fn a_write_through_export_syncs_every_write() {
    for write_through in [false, true] {
        let store = CountingSyncs::default();
        let syncs = store.syncs.clone();
        let img = Image::create_in(Box::new(store), "mem", &CreateOptions::new(SIZE)).unwrap();
        img.write_at(&[1; 4096], 0).unwrap();
        let export = Export::new("", Arc::new(img)).write_through(write_through);
        let (mut c, t) = connect_structured(vec![export]);
        c.go("");
        for (cookie, kind) in [(1, CMD_WRITE), (2, CMD_WRITE_ZEROES), (3, CMD_TRIM)] {
            let before = syncs.load(std::sync::atomic::Ordering::SeqCst);
            if kind == CMD_WRITE {
                c.write(cookie, 0, &[2; 4096], 0);
            } else {
                c.request(0, kind, cookie, 8192, 4096);
            }
            assert_eq!(c.status(), 0);
            let after = syncs.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(after > before, write_through, "command {kind}");
        }
        drop(c);
        t.join().unwrap();
    }
}
