//! The NBD wire format, as pure codecs: constants, option and request parsing with every length
//! bounded before it sizes a buffer, and reply encoders. Nothing here does I/O, so a fuzz target
//! can drive it directly.

/// "NBDMAGIC", the first 8 bytes a server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the greeting's second word and the prefix of every client option.
pub const OPT_MAGIC: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_READ_ONLY: u16 = 1 << 1;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_SEND_DF: u16 = 1 << 7;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TX_SEND_CACHE: u16 = 1 << 10;
pub const TX_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const CHUNK_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// The largest READ or WRITE payload (qemu-nbd's limit); larger READs fail, larger WRITEs end
/// the connection, as with qemu-nbd.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload accepted (qemu disconnects past 32 MiB; the options served here
/// need a few KiB).
pub const MAX_OPTION_DATA: u32 = 1 << 20;
/// The longest export or context name (the spec's limit).
pub const MAX_STRING: usize = 4096;
/// At most this many extents per block-status chunk (qemu's cap).
pub const MAX_EXTENTS: usize = 131_072;

/// A transmission request header (28 bytes, compact form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a request header; `None` when the magic is wrong (the connection must end).
    pub fn decode(b: &[u8; 28]) -> Option<Request> {
        if u32::from_be_bytes([b[0], b[1], b[2], b[3]]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

/// A cursor over option data that never reads past the end.
pub struct Cursor<'a>(pub &'a [u8]);

impl Cursor<'_> {
    pub fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.0.split_at_checked(2)?;
        self.0 = rest;
        Some(u16::from_be_bytes([head[0], head[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_at_checked(4)?;
        self.0 = rest;
        Some(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }

    /// A length-prefixed (u32) string of at most [`MAX_STRING`] bytes.
    pub fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        let (head, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        let s = String::from_utf8(head.to_vec()).ok()?;
        (!s.contains('\0')).then_some(s)
    }
}

/// What INFO and GO ask: the export's name and the info types requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Parses INFO/GO data; `None` for malformed data (answered with ERR_INVALID).
    pub fn decode(data: &[u8]) -> Option<InfoRequest> {
        let mut c = Cursor(data);
        let name = c.string()?;
        let n = c.u16()? as usize;
        let mut infos = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            infos.push(c.u16()?);
        }
        c.0.is_empty().then_some(InfoRequest { name, infos })
    }
}

/// What LIST_META_CONTEXT and SET_META_CONTEXT ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn decode(data: &[u8]) -> Option<MetaRequest> {
        let mut c = Cursor(data);
        let export = c.string()?;
        let n = c.u32()? as usize;
        let mut queries = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            queries.push(c.string()?);
        }
        c.0.is_empty().then_some(MetaRequest { export, queries })
    }
}

/// An option reply: magic, option, type, then the payload.
pub fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// An ERROR chunk (always the last of its reply).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut out = chunk_header(CHUNK_DONE, CHUNK_ERROR, cookie, 6 + msg.len() as u32).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_options_decode_within_bounds() {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[7] = 1;
        b[27] = 9;
        let r = Request::decode(&b).unwrap();
        assert_eq!((r.kind, r.length), (CMD_WRITE, 9));
        b[0] = 0;
        assert!(Request::decode(&b).is_none());
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"exp");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let info = InfoRequest::decode(&go).unwrap();
        assert_eq!(info.name, "exp");
        assert_eq!(info.infos, vec![INFO_BLOCK_SIZE]);
        assert!(InfoRequest::decode(&go[..go.len() - 1]).is_none());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(InfoRequest::decode(&huge).is_none());
        assert!(MetaRequest::decode(&huge).is_none());
    }
}
