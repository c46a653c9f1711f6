//! The NBD wire format: constants, and pure encoders and decoders for handshake options, option
//! replies, transmission requests and replies. Nothing here does I/O, so a fuzz target can drive
//! every decoder with arbitrary bytes; all integers are big-endian.

/// "NBDMAGIC": the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the second 8 bytes of the greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact (28-byte) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple (16-byte) reply header.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk (20-byte header).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags the server sends.
/// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks the fixed-newstyle handshake.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`: the server can skip the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
// Client flags.
/// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`: the client wants no zero padding after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// `NBD_OPT_EXPORT_NAME`: choose an export and end the handshake (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: the client ends the handshake.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: upgrade to TLS (refused with `ERR_POLICY`).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export without choosing it.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe and choose an export, ending the handshake.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: use structured reply chunks.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: list the metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: choose the metadata contexts BLOCK_STATUS reports.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: use 32-byte request and reply headers with 64-bit lengths.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// `NBD_REP_ACK`: the option succeeded (last reply to it).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export, in reply to LIST.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one piece of export information, in reply to INFO or GO.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one metadata context and its id.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`: the option is not known.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_POLICY`: the option is known but refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// `NBD_REP_ERR_INVALID`: the option's data is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_UNKNOWN`: no export has that name.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_TOO_BIG`: the option's data is too long.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: the request needs extended headers first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

// Info types (in INFO/GO requests and replies).
/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: writes are refused.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`: the FUA command flag is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`: TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: the DF (don't fragment) read flag is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes finished on all.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`: CACHE is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`: the FAST_ZERO flag is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: BLOCK_STATUS may carry a payload selecting contexts.
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Commands.
/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: the client disconnects.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: make finished writes durable.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`: the range's contents may be discarded.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`: prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`: report the range's metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// `NBD_CMD_FLAG_FUA`: durable before the reply.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: WRITE_ZEROES must keep the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: READ replies in one chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: BLOCK_STATUS reports one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: fail WRITE_ZEROES rather than write slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN`: the length field is the payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply chunk flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

// Chunk types.
/// `NBD_REPLY_TYPE_NONE`: no payload (ends a reply).
pub const CHUNK_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: an offset and the data read there.
pub const CHUNK_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: an offset and a length that read as zeros.
pub const CHUNK_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: a context id and 32-bit extents.
pub const CHUNK_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: a context id and 64-bit extents.
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR`: an error value and message.
pub const CHUNK_ERROR: u16 = 0x8001;

// Error values.
/// `NBD_EPERM`: operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// `NBD_EIO`: I/O error.
pub const EIO: u32 = 5;
/// `NBD_EINVAL`: invalid request.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`: no space left.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: the reply would be too large (DF read).
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: not supported (a FAST_ZERO that cannot be fast).
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Names, descriptions and context queries longer than this are refused (the spec's hard limit).
pub const MAX_STRING: usize = 4096;
/// The largest READ/WRITE/CACHE length and BLOCK_STATUS payload (qemu's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Error messages in ERROR chunks are cut to this many bytes.
pub const MAX_MESSAGE: usize = 4096;

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of a client option header (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
// Header lengths of the three reply forms.
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// A decoding failure that leaves the stream unusable (the server disconnects).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// An option header without [`IHAVEOPT`]; the value found.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// A request header with neither request magic; the value found.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// Fewer bytes than the structure needs.
    #[error("short {what}: {got} of {need} bytes")]
    Short {
        /// The structure: "option header", "request header".
        what: &'static str,
        /// Bytes available.
        got: usize,
        /// Bytes the structure takes.
        need: usize,
    },
}

/// Why an option's data was refused; answered with `REP_ERR_INVALID` and this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The 18-byte greeting: magic, IHAVEOPT and the handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// Length of the option's data in bytes.
    pub len: u32,
}

/// Decodes a 16-byte option header.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, WireError> {
    if b.len() < OPTION_HEADER_LEN {
        return Err(WireError::Short {
            what: "option header",
            got: b.len(),
            need: OPTION_HEADER_LEN,
        });
    }
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        len: be32(b, 12),
    })
}

/// Encodes a client option (for tests and fuzz seeds).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Reads a length-prefixed (u32) string at `*at`, advancing it.
fn take_string<'a>(data: &'a [u8], at: &mut usize, what: &str) -> Result<&'a [u8], Invalid> {
    let bad = || Invalid(format!("option data too short for the {what}"));
    if data.len() < *at + 4 {
        return Err(bad());
    }
    let len = be32(data, *at) as usize;
    *at += 4;
    if data.len() - *at < len {
        return Err(bad());
    }
    let s = &data[*at..*at + len];
    *at += len;
    Ok(s)
}

/// Checks an export name as qemu does: at most 4096 bytes, no NUL, UTF-8.
fn export_name(raw: &[u8]) -> Result<String, Invalid> {
    if raw.len() > MAX_STRING {
        return Err(Invalid(format!(
            "export name of {} bytes is longer than {MAX_STRING}",
            raw.len()
        )));
    }
    if raw.contains(&0) {
        return Err(Invalid("export name contains a NUL byte".into()));
    }
    String::from_utf8(raw.to_vec()).map_err(|_| Invalid("export name is not UTF-8".into()))
}

/// The data of an INFO or GO option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// The information types asked for (`INFO_*`), in order.
    pub infos: Vec<u16>,
}

/// Decodes INFO/GO data: u32 name length, name, u16 count, count × u16 info types.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Invalid> {
    let mut at = 0;
    let name = export_name(take_string(data, &mut at, "export name")?)?;
    if data.len() < at + 2 {
        return Err(Invalid("option data too short for the info count".into()));
    }
    let count = be16(data, at) as usize;
    at += 2;
    if data.len() - at != count * 2 {
        return Err(Invalid(format!(
            "{count} info requests need {} bytes, got {}",
            count * 2,
            data.len() - at
        )));
    }
    let infos = (0..count).map(|i| be16(data, at + 2 * i)).collect();
    Ok(InfoRequest { name, infos })
}

/// Encodes INFO/GO data (for tests and fuzz seeds).
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The data of a LIST_META_CONTEXT or SET_META_CONTEXT option. Queries longer than the string
/// limit are dropped (they can match nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export's name.
    pub name: String,
    /// The context queries (`base:allocation`, `qemu:dirty-bitmap:`); none means all.
    pub queries: Vec<String>,
}

/// Decodes META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query).
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Invalid> {
    let mut at = 0;
    let name = export_name(take_string(data, &mut at, "export name")?)?;
    if data.len() < at + 4 {
        return Err(Invalid("option data too short for the query count".into()));
    }
    let count = be32(data, at);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let q = take_string(data, &mut at, "query")?;
        if q.len() <= MAX_STRING {
            if let Ok(q) = std::str::from_utf8(q) {
                queries.push(q.to_string());
            }
        }
    }
    if at != data.len() {
        return Err(Invalid(format!(
            "{} bytes after the last query",
            data.len() - at
        )));
    }
    Ok(MetaRequest { name, queries })
}

/// Encodes META_CONTEXT data (for tests and fuzz seeds).
pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Payload of an INFO_EXPORT reply.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// Payload of an INFO_BLOCK_SIZE reply.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// Payload of an INFO_NAME or INFO_DESCRIPTION reply.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// Payload of a META_CONTEXT reply.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Payload of a SERVER reply to LIST: name length, name, then the description.
pub fn list_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// Which request and reply headers a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// Nothing negotiated: compact requests, simple replies.
    Simple,
    /// STRUCTURED_REPLY: compact requests, structured chunks (simple replies allowed for
    /// commands without payload).
    Structured,
    /// EXTENDED_HEADERS: 32-byte requests and 32-byte reply chunks only.
    Extended,
}

impl Replies {
    /// Length of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            Replies::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }

    /// Length of a chunk header in this mode (the simple reply's for `Simple`).
    pub fn chunk_header_len(self) -> usize {
        match self {
            Replies::Simple => SIMPLE_REPLY_LEN,
            Replies::Structured => STRUCTURED_HEADER_LEN,
            Replies::Extended => EXTENDED_HEADER_LEN,
        }
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// The effect length, or the payload length for WRITE (and with PAYLOAD_LEN).
    pub length: u64,
}

/// Decodes a request header of the mode's length.
pub fn parse_request(b: &[u8], mode: Replies) -> Result<Request, WireError> {
    let need = mode.request_len();
    if b.len() < need {
        return Err(WireError::Short {
            what: "request header",
            got: b.len(),
            need,
        });
    }
    let magic = be32(b, 0);
    let expected = match mode {
        Replies::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    if magic != expected {
        return Err(WireError::BadRequestMagic(magic));
    }
    let length = match mode {
        Replies::Extended => be64(b, 24),
        _ => be32(b, 24) as u64,
    };
    Ok(Request {
        flags: be16(b, 4),
        kind: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length,
    })
}

/// Encodes a request header (for tests and fuzz seeds); compact mode keeps the low 32 bits of
/// the length.
pub fn encode_request(r: &Request, mode: Replies) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXTENDED_REQUEST_LEN);
    let magic = match mode {
        Replies::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    v.extend_from_slice(&magic.to_be_bytes());
    v.extend_from_slice(&r.flags.to_be_bytes());
    v.extend_from_slice(&r.kind.to_be_bytes());
    v.extend_from_slice(&r.cookie.to_be_bytes());
    v.extend_from_slice(&r.offset.to_be_bytes());
    match mode {
        Replies::Extended => v.extend_from_slice(&r.length.to_be_bytes()),
        _ => v.extend_from_slice(&(r.length as u32).to_be_bytes()),
    }
    v
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured or extended chunk header (`mode` must not be `Simple`); `offset` is the
/// request's offset, echoed by extended headers.
pub fn chunk_header(
    out: &mut Vec<u8>,
    mode: Replies,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    if mode == Replies::Extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        // Callers keep compact payloads under 4 GiB (chunks are split below that).
        out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    }
}

/// Appends an ERROR chunk (flagged DONE) carrying `error` and a message cut to the limit.
pub fn error_chunk(
    out: &mut Vec<u8>,
    mode: Replies,
    cookie: u64,
    offset: u64,
    error: u32,
    msg: &str,
) {
    let mut end = msg.len().min(MAX_MESSAGE);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    chunk_header(
        out,
        mode,
        REPLY_FLAG_DONE,
        CHUNK_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends an OFFSET_HOLE chunk. Compact holes are at most u32::MAX bytes (callers split).
pub fn hole_chunk(
    out: &mut Vec<u8>,
    mode: Replies,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    offset: u64,
    len: u32,
) {
    chunk_header(out, mode, flags, CHUNK_OFFSET_HOLE, cookie, req_offset, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// One extent of a block-status answer: a length and the context's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// The context's flags for the range (for `base:allocation`: 1 hole, 2 zero).
    pub flags: u32,
}

/// Appends a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT (extended) chunk for one context.
/// Compact extents must each fit 32 bits (callers cap them).
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    mode: Replies,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    context: u32,
    extents: &[StatusExtent],
) {
    if mode == Replies::Extended {
        let len = 8 + 16 * extents.len() as u64;
        chunk_header(
            out,
            mode,
            flags,
            CHUNK_BLOCK_STATUS_EXT,
            cookie,
            req_offset,
            len,
        );
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            out.extend_from_slice(&e.len.to_be_bytes());
            out.extend_from_slice(&(e.flags as u64).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        chunk_header(
            out,
            mode,
            flags,
            CHUNK_BLOCK_STATUS,
            cookie,
            req_offset,
            len,
        );
        out.extend_from_slice(&context.to_be_bytes());
        for e in extents {
            out.extend_from_slice(&(e.len as u32).to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
    }
}

/// A BLOCK_STATUS payload (extended headers with PAYLOAD_LEN): an effect length and the context
/// ids to answer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPayload {
    /// Bytes to report on from the request's offset.
    pub length: u64,
    /// Ids of the contexts to report, as SET_META_CONTEXT assigned them.
    pub ids: Vec<u32>,
}

/// Decodes a BLOCK_STATUS payload: u64 effect length, then n × u32 ids (n ≥ 1).
pub fn parse_status_payload(b: &[u8]) -> Option<StatusPayload> {
    if b.len() < 12 || (b.len() - 8) % 4 != 0 {
        return None;
    }
    let length = be64(b, 0);
    let ids = b[8..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(StatusPayload { length, ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_header_round_trips_and_rejects_bad_magic() {
        let o = encode_option(OPT_GO, b"abc");
        assert_eq!(
            parse_option_header(&o).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 3
            }
        );
        let mut bad = o.clone();
        bad[0] ^= 1;
        assert!(matches!(
            parse_option_header(&bad),
            Err(WireError::BadOptionMagic(_))
        ));
        assert!(parse_option_header(&o[..10]).is_err());
    }

    #[test]
    fn info_request_round_trips_and_checks_lengths() {
        let d = encode_info_request("exp", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "exp");
        assert_eq!(r.infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        // A name length beyond the data.
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        // NUL in the name.
        assert!(parse_info_request(&encode_info_request("a\0b", &[])).is_err());
    }

    #[test]
    fn meta_request_round_trips() {
        let d = encode_meta_request("", &["base:allocation", "qemu:"]);
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.queries, vec!["base:allocation", "qemu:"]);
        assert!(parse_meta_request(&d[..d.len() - 2]).is_err());
        // A huge query count with no data for it fails without allocating.
        let mut d = encode_meta_request("", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&d).is_err());
    }

    #[test]
    fn requests_round_trip_in_both_header_modes() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x1122334455667788,
            offset: 4096,
            length: 512,
        };
        for mode in [Replies::Structured, Replies::Extended] {
            let b = encode_request(&r, mode);
            assert_eq!(b.len(), mode.request_len());
            assert_eq!(parse_request(&b, mode).unwrap(), r);
        }
        let b = encode_request(&r, Replies::Simple);
        assert!(parse_request(&b, Replies::Extended).is_err());
    }

    #[test]
    fn greeting_matches_qemu_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn status_payload_needs_at_least_one_id() {
        assert!(parse_status_payload(&[0; 8]).is_none());
        assert!(parse_status_payload(&[0; 13]).is_none());
        let p = parse_status_payload(&[0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 1]).unwrap();
        assert_eq!(p.length, 4096);
        assert_eq!(p.ids, vec![1]);
    }
}
