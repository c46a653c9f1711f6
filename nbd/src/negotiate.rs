//! The fixed-newstyle handshake: the greeting, client flags, and option haggling up to GO or
//! EXPORT_NAME, answered as qemu-nbd answers (see `shared/nbd-qmp-facts.md` §1.2–1.3).

use std::io::{self, Read, Write};

use crate::export::{Context, Export, BLOCK_MAX, BLOCK_MIN, BLOCK_PREFERRED};
use crate::wire::*;

/// Option data above this is skipped unread into memory and refused with `ERR_TOO_BIG`; no
/// option a client sends legitimately comes near it.
pub const MAX_OPTION_DATA: u32 = 1 << 20;
/// Option data above this ends the connection, as in qemu.
pub const MAX_OPTION_SKIP: u32 = MAX_PAYLOAD;

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// Index into the server's exports.
    pub export: usize,
    /// Which reply form the client negotiated (simple, structured or extended).
    pub mode: Replies,
    /// Contexts selected for this export (empty: BLOCK_STATUS is refused).
    pub contexts: Vec<Context>,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// A handshake failure after which the connection closes.
fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The contexts chosen by the last SET_META_CONTEXT, and for which export.
struct Selection {
    export: String,
    contexts: Vec<Context>,
}

/// Runs the handshake. `Ok(None)` means the client left (ABORT, or EOF before an option);
/// errors mean a protocol violation or an I/O failure, after which the caller closes.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
    multi_conn: bool,
) -> io::Result<Option<Negotiated>> {
    w.write_all(&greeting())?;
    w.flush()?;
    let mut cf = [0u8; 4];
    match r.read_exact(&mut cf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut mode = Replies::Simple;
    let mut selection: Option<Selection> = None;
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let OptionHeader { option, len } =
            parse_option_header(&hdr).map_err(|e| violation(e.to_string()))?;
        if len > MAX_OPTION_SKIP {
            return Err(violation(format!("option {option} data of {len} bytes")));
        }
        if len > MAX_OPTION_DATA {
            io::copy(&mut r.by_ref().take(len as u64), &mut io::sink())?;
            out.clear();
            let msg = format!("option {option} data of {len} bytes is too long");
            option_reply(&mut out, option, REP_ERR_TOO_BIG, msg.as_bytes());
            w.write_all(&out)?;
            w.flush()?;
            continue;
        }
        let mut data = Vec::new();
        r.by_ref().take(len as u64).read_to_end(&mut data)?;
        if data.len() != len as usize {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.clear();
        let err = |out: &mut Vec<u8>, kind: u32, msg: &str| {
            option_reply(out, option, kind, msg.as_bytes());
        };
        match option {
            OPT_EXPORT_NAME => {
                if mode == Replies::Extended {
                    return Err(violation("EXPORT_NAME after extended headers"));
                }
                let name = String::from_utf8_lossy(&data);
                let Some(index) = exports.iter().position(|e| e.name == name) else {
                    return Err(violation(format!("export {name:?} not present")));
                };
                let contexts = contexts_for(&selection, &exports[index]);
                let flags = exports[index].flags(mode, multi_conn, false);
                out.extend_from_slice(&exports[index].size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out)?;
                w.flush()?;
                return Ok(Some(Negotiated {
                    export: index,
                    mode,
                    contexts,
                    flags,
                }));
            }
            OPT_ABORT => {
                err(&mut out, REP_ACK, "");
                // The client may already be gone.
                let _ = w.write_all(&out).and_then(|_| w.flush());
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "option 'list' has unexpected length",
                    );
                } else {
                    for e in exports {
                        let desc = e.description.as_deref().unwrap_or("");
                        option_reply(&mut out, option, REP_SERVER, &list_server(&e.name, desc));
                    }
                    err(&mut out, REP_ACK, "");
                }
            }
            OPT_STARTTLS => err(&mut out, REP_ERR_POLICY, "TLS not configured"),
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(Invalid(msg)) => err(&mut out, REP_ERR_INVALID, &msg),
                Ok(req) => match exports.iter().position(|e| e.name == req.name) {
                    None => err(&mut out, REP_ERR_UNKNOWN, &not_present(&req.name)),
                    Some(index) => {
                        let export = &exports[index];
                        let contexts = contexts_for(&selection, export);
                        let status_payload = option == OPT_INFO || !contexts.is_empty();
                        let flags = export.flags(mode, multi_conn, status_payload);
                        if req.infos.contains(&INFO_NAME) {
                            let p = info_string(INFO_NAME, &export.name);
                            option_reply(&mut out, option, REP_INFO, &p);
                        }
                        if let Some(d) = &export.description {
                            let p = info_string(INFO_DESCRIPTION, d);
                            option_reply(&mut out, option, REP_INFO, &p);
                        }
                        let p = info_block_size(BLOCK_MIN, BLOCK_PREFERRED, BLOCK_MAX);
                        option_reply(&mut out, option, REP_INFO, &p);
                        let p = info_export(export.size(), flags);
                        option_reply(&mut out, option, REP_INFO, &p);
                        err(&mut out, REP_ACK, "");
                        if option == OPT_GO {
                            w.write_all(&out)?;
                            w.flush()?;
                            return Ok(Some(Negotiated {
                                export: index,
                                mode,
                                contexts,
                                flags,
                            }));
                        }
                    }
                },
            },
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => match switch_mode(option, &data, mode) {
                Ok(next) => {
                    mode = next;
                    err(&mut out, REP_ACK, "");
                }
                Err((kind, msg)) => err(&mut out, kind, &msg),
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Every SET replaces the selection, even one that fails.
                    selection = None;
                }
                if set && mode == Replies::Simple {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "request option 'set meta context' when structured reply is not negotiated",
                    );
                } else {
                    match parse_meta_request(&data) {
                        Err(Invalid(msg)) => err(&mut out, REP_ERR_INVALID, &msg),
                        Ok(req) => match exports.iter().find(|e| e.name == req.name) {
                            None => err(&mut out, REP_ERR_UNKNOWN, &not_present(&req.name)),
                            Some(export) => {
                                let chosen = if set {
                                    export.select_contexts(&req.queries)
                                } else {
                                    export.list_contexts(&req.queries)
                                };
                                for c in &chosen {
                                    // LIST replies carry id 0; SET hands out the real ids.
                                    let id = if set { c.id } else { 0 };
                                    option_reply(
                                        &mut out,
                                        option,
                                        REP_META_CONTEXT,
                                        &meta_context(id, &c.name),
                                    );
                                }
                                err(&mut out, REP_ACK, "");
                                if set {
                                    selection = Some(Selection {
                                        export: export.name.clone(),
                                        contexts: chosen,
                                    });
                                }
                            }
                        },
                    }
                }
            }
            _ => err(
                &mut out,
                REP_ERR_UNSUP,
                &format!("Unsupported option {option}"),
            ),
        }
        w.write_all(&out)?;
        w.flush()?;
    }
}

/// STRUCTURED_REPLY or EXTENDED_HEADERS: the reply mode it switches to, or the error reply
/// qemu sends (no data allowed, each once, and no going back from extended headers).
fn switch_mode(option: u32, data: &[u8], mode: Replies) -> Result<Replies, (u32, String)> {
    let (wanted, name) = if option == OPT_EXTENDED_HEADERS {
        (Replies::Extended, "extended headers")
    } else {
        (Replies::Structured, "structured reply")
    };
    if !data.is_empty() {
        Err((
            REP_ERR_INVALID,
            format!("option '{name}' has unexpected length"),
        ))
    } else if mode == wanted {
        Err((REP_ERR_INVALID, format!("{name} already negotiated")))
    } else if mode == Replies::Extended {
        Err((
            REP_ERR_EXT_HEADER_REQD,
            "extended headers already negotiated".into(),
        ))
    } else {
        Ok(wanted)
    }
}

/// The contexts a SET chose, if it named `export`.
fn contexts_for(selection: &Option<Selection>, export: &Export) -> Vec<Context> {
    match selection {
        Some(s) if s.export == export.name => s.contexts.clone(),
        _ => Vec::new(),
    }
}

/// qemu's message for an unknown export, with the name cut to 80 characters.
fn not_present(name: &str) -> String {
    let mut cut: String = name.chars().take(80).collect();
    if cut.len() < name.len() {
        cut.push_str("...");
    }
    format!("export '{cut}' not present")
}
