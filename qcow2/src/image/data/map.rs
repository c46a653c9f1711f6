//! The block-status API: which guest ranges hold data, zeros or nothing, and at which depth of the
//! backing chain. Adjacent ranges with the same meaning merge as `qemu-img map` merges them.

use crate::error::Result;
use crate::image::backing::Backing;
use crate::image::layer::{Layer, Run};
use crate::image::{Image, Meta};

/// What a guest range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Guest data stored at `host_offset` (of the image file, its data file, or a raw backing file).
    Data {
        /// Host offset of the range's first byte.
        host_offset: u64,
    },
    /// Guest data mapped to `host_offset`, where the host file has a hole: it reads as zeros
    /// (qemu-img: `data` and `zero`). Reported for an image that looks metadata-preallocated,
    /// as QEMU reports it.
    DataHole {
        /// Host offset of the range's first byte.
        host_offset: u64,
    },
    /// Compressed data.
    Compressed,
    /// Explicitly zero (a zero flag or zero subclusters); `host_offset` when a cluster stays
    /// preallocated.
    Zero {
        /// Host offset of the preallocated range's first byte, if any.
        host_offset: Option<u64>,
    },
    /// Allocated nowhere in the chain: reads as zeros. `host_offset` is set where the image keeps
    /// a host cluster for the range anyway (unallocated subclusters of an allocated cluster).
    Unallocated {
        /// Host offset of the range's first byte in a kept host cluster, if any.
        host_offset: Option<u64>,
    },
}

/// A guest range with one meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the range, in bytes.
    pub start: u64,
    /// Length of the range, in bytes.
    pub length: u64,
    /// 0 for the image itself, 1 for its backing file, and so on.
    pub depth: u32,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// Allocated in some layer (qemu-img's `present`).
    pub fn present(&self) -> bool {
        !matches!(self.kind, ExtentKind::Unallocated { .. })
    }
    /// Reads as zeros without reading data (qemu-img's `zero`).
    pub fn zero(&self) -> bool {
        matches!(
            self.kind,
            ExtentKind::Zero { .. } | ExtentKind::Unallocated { .. } | ExtentKind::DataHole { .. }
        )
    }
    /// Holds data (qemu-img's `data`).
    pub fn data(&self) -> bool {
        matches!(
            self.kind,
            ExtentKind::Data { .. } | ExtentKind::Compressed | ExtentKind::DataHole { .. }
        )
    }
    /// Compressed (qemu-img's `compressed`).
    pub fn compressed(&self) -> bool {
        matches!(self.kind, ExtentKind::Compressed)
    }
    /// The host offset of the first byte, when the range maps to one place.
    pub fn offset(&self) -> Option<u64> {
        match self.kind {
            ExtentKind::Data { host_offset } | ExtentKind::DataHole { host_offset } => {
                Some(host_offset)
            }
            ExtentKind::Zero { host_offset } | ExtentKind::Unallocated { host_offset } => {
                host_offset
            }
            _ => None,
        }
    }

    /// Whether `next` directly continues this extent with the same meaning.
    pub(crate) fn merges_with(&self, next: &Extent) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && match (self.kind, next.kind) {
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b })
                | (
                    ExtentKind::DataHole { host_offset: a },
                    ExtentKind::DataHole { host_offset: b },
                ) => a + self.length == b,
                (
                    ExtentKind::Zero {
                        host_offset: Some(a),
                    },
                    ExtentKind::Zero {
                        host_offset: Some(b),
                    },
                )
                | (
                    ExtentKind::Unallocated {
                        host_offset: Some(a),
                    },
                    ExtentKind::Unallocated {
                        host_offset: Some(b),
                    },
                ) => a + self.length == b,
                (a, b) => a == b,
            }
    }
}

/// Appends `extent`, merging it into the last one when it continues it.
fn push(out: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = out.last_mut() {
        if last.merges_with(&extent) {
            last.length += extent.length;
            return;
        }
    }
    out.push(extent);
}

/// Pushes guest range `[start, start + len)` mapped to `host_offset` of `storage`, split where
/// the host file has holes (they read as zeros), as QEMU asks the file system. A hole becomes
/// `hole_kind` at its host offset: allocated data reading zeros in a qcow2 file, plain zeros in a
/// raw one.
fn push_data(
    out: &mut Vec<Extent>,
    (name, storage): (&str, &dyn crate::storage::Storage),
    hole_kind: fn(u64) -> ExtentKind,
    start: u64,
    len: u64,
    depth: u32,
    host_offset: u64,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let host = host_offset + done;
        let (hole, n) = storage
            .hole_at(host, len - done)
            .map_err(|e| crate::error::Error::io(name, "asking the file system for holes", e))?
            .unwrap_or((false, len - done));
        let n = n.clamp(1, len - done);
        let kind = if hole {
            hole_kind(host)
        } else {
            ExtentKind::Data { host_offset: host }
        };
        push(
            out,
            Extent {
                start: start + done,
                length: n,
                depth,
                kind,
            },
        );
        done += n;
    }
    Ok(())
}

impl Image {
    /// The extents of guest range `[offset, offset + len)` through the whole opened chain.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let m = self.meta();
        self.check_bounds(offset, len, m.header.size)?;
        let mut out = Vec::new();
        self.map_layer(&m, m.active(), offset, len, 0, &mut out)?;
        Ok(out)
    }

    pub(crate) fn map_layer(
        &self,
        m: &Meta,
        layer: Layer<'_>,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        // QEMU asks the file system about data clusters only for images it takes to be
        // metadata-preallocated (`preallocated`); elsewhere a data cluster is data.
        let preallocated = self.metadata_preallocated(m);
        while pos < end {
            let (run, run_len) = self.lookup(m, layer, pos, end - pos)?;
            let kind = match run {
                Run::Data { host_offset } if preallocated && self.data_store(m).is_some() => {
                    let file = self.data_store(m).expect("checked in the guard");
                    let hole = |h| ExtentKind::DataHole { host_offset: h };
                    let host = (self.name.as_str(), file);
                    push_data(out, host, hole, pos, run_len, depth, host_offset)?;
                    pos += run_len;
                    continue;
                }
                Run::Data { host_offset } => ExtentKind::Data { host_offset },
                Run::Compressed { .. } => ExtentKind::Compressed,
                Run::Zero { host_offset } => ExtentKind::Zero { host_offset },
                Run::Unallocated => {
                    self.map_backing(pos, run_len, depth, None, out)?;
                    pos += run_len;
                    continue;
                }
                Run::UnallocatedAlloc { host_offset } => {
                    self.map_backing(pos, run_len, depth, Some(host_offset), out)?;
                    pos += run_len;
                    continue;
                }
            };
            push(
                out,
                Extent {
                    start: pos,
                    length: run_len,
                    depth,
                    kind,
                },
            );
            pos += run_len;
        }
        Ok(())
    }

    /// Maps a range unallocated in this image through the backing chain.
    fn map_backing(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        host_offset: Option<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        // Where nothing lies below, the range reads as this image's zeros; a host offset kept for
        // unallocated subclusters shows, as qemu-img shows it.
        let unallocated = |start: u64, length, depth| Extent {
            start,
            length,
            depth,
            kind: ExtentKind::Unallocated {
                host_offset: host_offset.map(|h| h + (start - offset)),
            },
        };
        let Some(backing) = &self.backing else {
            push(out, unallocated(offset, len, depth));
            return Ok(());
        };
        let inside = backing.size().saturating_sub(offset).min(len);
        if inside > 0 {
            match backing {
                Backing::Qcow2(image) => {
                    let bm = image.meta();
                    image.map_layer(&bm, bm.active(), offset, inside, depth + 1, out)?
                }
                Backing::Raw { storage, .. } => {
                    let hole = |h| ExtentKind::Zero {
                        host_offset: Some(h),
                    };
                    let raw = (self.name.as_str(), &**storage);
                    push_data(out, raw, hole, offset, inside, depth + 1, offset)?
                }
            }
        }
        if inside < len {
            // Past the end of the backing file the image reads zeros of its own.
            push(out, unallocated(offset + inside, len - inside, depth));
        }
        Ok(())
    }
}

impl Image {
    /// The store guest data clusters live in: the data file when the image has one (if it is
    /// open), else the image file.
    fn data_store(&self, m: &Meta) -> Option<&dyn crate::storage::Storage> {
        if m.header.has_external_data_file() {
            self.data_file.as_deref()
        } else {
            Some(&*self.storage)
        }
    }
}
