//! What a server exports: a named, open `Image` with its options, the transmission flags and
//! block sizes advertised for it, and the metadata contexts it offers.

use std::sync::Arc;

use qcow2::Image;

use crate::wire::*;

/// Context id of `base:allocation` (fixed, as qemu numbers it).
pub const CONTEXT_BASE_ALLOCATION: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub const CONTEXT_ALLOCATION_DEPTH: u32 = 1;

pub const BASE_ALLOCATION: &str = "base:allocation";
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Block sizes advertised in INFO_BLOCK_SIZE, as qemu-nbd advertises them for a file: the
/// engine accepts byte-granular requests, so the minimum is 1.
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const BLOCK_MAX: u32 = MAX_PAYLOAD;

/// One export: an image shared by every connection to it.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    /// Sent as INFO_DESCRIPTION and in LIST replies.
    pub description: Option<String>,
    pub image: Arc<Image>,
    /// Refuse writes (the image may still be open read-write for another export).
    pub read_only: bool,
    /// Offer `qemu:allocation-depth` (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Honour TRIM and let WRITE_ZEROES without NO_HOLE free clusters (qemu-nbd's
    /// `--discard=unmap`); otherwise TRIM is a no-op and zero writes keep their clusters.
    pub unmap: bool,
}

impl Export {
    /// An export of `image` under `name`, writable if the image is, with `base:allocation` only.
    pub fn new(name: impl Into<String>, image: Arc<Image>) -> Export {
        Export {
            name: name.into(),
            description: None,
            image,
            read_only: false,
            allocation_depth: false,
            unmap: true,
        }
    }

    /// The size advertised: the image size rounded down to 512 bytes, as qemu does.
    pub fn size(&self) -> u64 {
        self.image.size() & !511
    }

    /// The transmission flags for a connection that negotiated `mode`. `multi_conn` says whether
    /// the server allows several connections (flush on one then covers all: every connection
    /// shares the one `Image` and its one cache).
    pub fn flags(&self, mode: Replies, multi_conn: bool, status_payload: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if mode != Replies::Simple {
            f |= TF_SEND_DF;
        }
        if multi_conn {
            f |= TF_CAN_MULTI_CONN;
        }
        if mode == Replies::Extended && status_payload {
            f |= TF_BLOCK_STATUS_PAYLOAD;
        }
        f
    }

    /// The contexts this export offers, with their ids, in qemu's order.
    pub fn contexts(&self) -> Vec<(u32, &'static str)> {
        let mut v = vec![(CONTEXT_BASE_ALLOCATION, BASE_ALLOCATION)];
        if self.allocation_depth {
            v.push((CONTEXT_ALLOCATION_DEPTH, ALLOCATION_DEPTH));
        }
        v
    }

    /// Contexts answering a LIST_META_CONTEXT query: an empty list means all; a namespace
    /// (`base:`, `qemu:`) lists what it holds; a full name lists itself.
    pub fn list_contexts(&self, queries: &[String]) -> Vec<(u32, &'static str)> {
        let all = self.contexts();
        if queries.is_empty() {
            return all;
        }
        let mut out: Vec<(u32, &'static str)> = Vec::new();
        for q in queries {
            for &(id, name) in &all {
                let hit = name == q || (q.ends_with(':') && name.starts_with(q.as_str()));
                if hit && !out.iter().any(|&(i, _)| i == id) {
                    out.push((id, name));
                }
            }
        }
        out
    }

    /// Contexts selected by SET_META_CONTEXT: exact names only (namespaces select nothing),
    /// each once, in query order.
    pub fn select_contexts(&self, queries: &[String]) -> Vec<(u32, &'static str)> {
        let all = self.contexts();
        let mut out: Vec<(u32, &'static str)> = Vec::new();
        for q in queries {
            if let Some(&(id, name)) = all.iter().find(|&&(_, n)| n == q) {
                if !out.iter().any(|&(i, _)| i == id) {
                    out.push((id, name));
                }
            }
        }
        out
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("image", &self.image.name())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}
