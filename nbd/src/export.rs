//! What a server exports: a named, open `Image` with its options, the transmission flags and
//! block sizes advertised for it, and the metadata contexts it offers (`base:allocation`,
//! `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`), numbered as qemu numbers them.

use std::sync::Arc;

use qcow2::{setters, DiskTop, Image};

use crate::wire::*;

/// Context id of `base:allocation` (fixed, as qemu numbers it).
pub const CONTEXT_BASE_ALLOCATION: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub const CONTEXT_ALLOCATION_DEPTH: u32 = 1;

/// Context id of the first exported dirty bitmap; the i-th has `CONTEXT_FIRST_BITMAP + i`.
pub const CONTEXT_FIRST_BITMAP: u32 = 2;

/// The standard context: holes and zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's context: how deep in the backing chain each range is allocated.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of the context that reports a persistent dirty bitmap.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A metadata context an export offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The id SET_META_CONTEXT hands out and BLOCK_STATUS chunks carry.
    pub id: u32,
    /// The context's name, as clients query it.
    pub name: String,
}

/// What a context reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKind<'a> {
    /// `base:allocation`: HOLE and ZERO bits.
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 the export's own image, 2 its backing file...
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: bit 0 set where the persistent bitmap `NAME` is dirty.
    DirtyBitmap(&'a str),
}

/// Minimum block size advertised in INFO_BLOCK_SIZE, as qemu-nbd advertises it for a file: the
/// engine accepts byte-granular requests.
pub const BLOCK_MIN: u32 = 1;
/// Preferred block size advertised in INFO_BLOCK_SIZE.
pub const BLOCK_PREFERRED: u32 = 4096;
/// Maximum block size advertised in INFO_BLOCK_SIZE: the largest payload accepted.
pub const BLOCK_MAX: u32 = MAX_PAYLOAD;

/// One export: an image shared by every connection to it.
#[derive(Clone)]
#[non_exhaustive]
pub struct Export {
    /// The name clients ask for (NBD_OPT_GO, NBD_OPT_EXPORT_NAME).
    pub name: String,
    /// Sent as INFO_DESCRIPTION and in LIST replies.
    pub description: Option<String>,
    /// The disk every connection to this export reads and writes: its top image, which an
    /// external snapshot (`qcow2_transaction::Transaction::attach_top`) replaces with the new
    /// overlay while clients go on.
    pub top: Arc<DiskTop>,
    /// Refuse writes (the image may still be open read-write for another export).
    pub read_only: bool,
    /// Offer `qemu:allocation-depth` (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Persistent bitmaps of the image offered as `qemu:dirty-bitmap:NAME` (qemu-nbd's `-B`).
    /// The caller checks that each exists and is consistent (`Image::bitmaps`); a bitmap that
    /// cannot be read later fails the BLOCK_STATUS request that asks for it.
    pub bitmaps: Vec<String>,
    /// Honour TRIM and let WRITE_ZEROES without NO_HOLE free clusters (qemu-nbd's
    /// `--discard=unmap`); otherwise TRIM is a no-op and zero writes keep their clusters.
    pub unmap: bool,
    /// Make every write durable before acknowledging it, as if each carried FUA (qemu-nbd's
    /// `--cache=writethrough` and `directsync`).
    pub write_through: bool,
    /// What a WRITE whose payload is all zeros becomes (qemu-nbd's `--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
}

/// What a WRITE of nothing but zero bytes becomes, as QEMU's `detect-zeroes` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// A zero write that keeps the clusters allocated.
    On,
    /// A zero write that may free the clusters (when the export honours TRIM, `unmap`).
    Unmap,
}

setters!(Export {
    description: Option<String>,
    read_only: bool,
    allocation_depth: bool,
    bitmaps: Vec<String>,
    unmap: bool,
    write_through: bool,
    detect_zeroes: DetectZeroes,
});

impl Export {
    /// An export of `image` under `name`, writable if the image is, with `base:allocation` only.
    pub fn new(name: impl Into<String>, image: Arc<Image>) -> Export {
        Export::with_top(name, Arc::new(DiskTop::new(image)))
    }

    /// An export of the disk `top` serves, under `name`: the server follows the disk when an
    /// external snapshot gives it a new top.
    pub fn with_top(name: impl Into<String>, top: Arc<DiskTop>) -> Export {
        Export {
            name: name.into(),
            description: None,
            top,
            read_only: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
            unmap: true,
            write_through: false,
            detect_zeroes: DetectZeroes::Off,
        }
    }

    /// The disk's top image now: reads, flushes and status queries go to it.
    pub fn image(&self) -> Arc<Image> {
        self.top.image()
    }

    /// The size advertised: the image size rounded down to 512 bytes, as qemu does.
    pub fn size(&self) -> u64 {
        self.image().size() & !511
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

    /// The contexts this export offers, in qemu's order.
    pub fn contexts(&self) -> Vec<Context> {
        let mut v = vec![Context {
            id: CONTEXT_BASE_ALLOCATION,
            name: BASE_ALLOCATION.into(),
        }];
        if self.allocation_depth {
            v.push(Context {
                id: CONTEXT_ALLOCATION_DEPTH,
                name: ALLOCATION_DEPTH.into(),
            });
        }
        for (i, b) in self.bitmaps.iter().enumerate() {
            v.push(Context {
                id: CONTEXT_FIRST_BITMAP + i as u32,
                name: format!("{DIRTY_BITMAP_PREFIX}{b}"),
            });
        }
        v
    }

    /// What the context `id` reports, if this export offers it.
    pub fn context_kind(&self, id: u32) -> Option<ContextKind<'_>> {
        match id {
            CONTEXT_BASE_ALLOCATION => Some(ContextKind::BaseAllocation),
            CONTEXT_ALLOCATION_DEPTH if self.allocation_depth => Some(ContextKind::AllocationDepth),
            CONTEXT_ALLOCATION_DEPTH => None,
            _ => {
                let i = usize::try_from(id.checked_sub(CONTEXT_FIRST_BITMAP)?).ok()?;
                self.bitmaps.get(i).map(|b| ContextKind::DirtyBitmap(b))
            }
        }
    }

    /// Contexts answering a LIST_META_CONTEXT query: an empty list means all; a namespace
    /// (`base:`, `qemu:`, `qemu:dirty-bitmap:`) lists what it holds; a full name lists itself.
    pub fn list_contexts(&self, queries: &[String]) -> Vec<Context> {
        let all = self.contexts();
        if queries.is_empty() {
            return all;
        }
        let mut out: Vec<Context> = Vec::new();
        for q in queries {
            for c in &all {
                let hit = c.name == *q || (q.ends_with(':') && c.name.starts_with(q.as_str()));
                if hit && !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
                }
            }
        }
        out
    }

    /// Contexts selected by SET_META_CONTEXT: exact names only (namespaces select nothing),
    /// each once, in query order.
    pub fn select_contexts(&self, queries: &[String]) -> Vec<Context> {
        let all = self.contexts();
        let mut out: Vec<Context> = Vec::new();
        for q in queries {
            if let Some(c) = all.iter().find(|c| c.name == *q) {
                if !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
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
            .field("image", &self.image().name())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}
