//! The `ops` input: an image configuration and a sequence of steps, decoded by hand.

use super::*;

/// Most steps one `ops` input runs (every step re-reads the whole disk).
pub(crate) const OPS_MAX_STEPS: usize = 64;
/// Virtual sizes stay within this many clusters (512-byte clusters need more than 64 for a second
/// L2 table, so L1 growth is reachable) ...
pub(crate) const OPS_MAX_CLUSTERS: u64 = 160;
/// ... and within this many bytes, so the full read after every step stays cheap with 64 KiB
/// clusters.
pub(crate) const OPS_MAX_BYTES: u64 = 1 << 20;
/// Largest cluster the `ops` target creates (keeps images small).
pub(crate) const OPS_MAX_CLUSTER_BITS: u32 = 16;
/// Extended L2 entries need clusters of at least 16 KiB.
pub(crate) const OPS_MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Snapshots alive at once; further creates are skipped (every snapshot is read at each check).
pub(crate) const OPS_MAX_SNAPSHOTS: usize = 6;
/// `check()` and the snapshot views run every this many steps (and after reopens and snapshot
/// operations).
pub(crate) const OPS_CHECK_EVERY: usize = 8;
/// Durable checkpoints kept for crash cuts (each holds a copy of the disk).
pub(crate) const OPS_MAX_CHECKPOINTS: usize = 8;
/// Snapshot names: few, so apply and delete find them and duplicate names occur. None is numeric,
/// so a name never matches an id.
pub(crate) const OPS_SNAPSHOT_NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// The name of the one persistent bitmap an `ops` image may have.
pub(crate) const OPS_BITMAP: &str = "dirty";
/// The backing file name recorded in the header; the content is attached from memory.
pub(crate) const OPS_BACKING_NAME: &str = "base";

/// Whether bytes that a grow exposes beyond the old last cluster read the backing file. That is
/// what the engine does today: `resize` zero-writes only the tail of the old last cluster, so the
/// rest of the new area is unallocated and reads through to the backing file. QEMU (since 5.1)
/// makes the whole new area read as zeros instead (v3: zero clusters; v2 refuses the resize when
/// the backing file is longer than the old size). Set to `false` once the engine follows QEMU.
pub(crate) const OPS_GROW_EXPOSES_BACKING: bool = false;

/// Input of `ops`: a bounded image configuration, then up to [`OPS_MAX_STEPS`] steps.
///
/// Layout: `[cluster_bits][refcount_order][flags][size: u8 clusters, u16 odd bytes]` and, when
/// flags bit 4 asks for a backing file, `[backing: u16 length, u8 seed]`; then steps, each an
/// opcode byte and its fields (see [`OpsStep::read`]). Flags: bit 0 version 2 (else 3); bit 1
/// lazy refcounts, bit 2 extended L2 (with clusters of 16 KiB or more), bit 3 zstd, bit 6 a
/// persistent bitmap from the start (all v3 only); bit 4 a raw backing file; bit 5 a
/// sector-aligned size; bit 7 bitmap granules of 512 bytes (else the cluster size). Version 2
/// forces 16-bit refcounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsInput {
    pub config: OpsConfig,
    pub steps: Vec<OpsStep>,
}

/// The image an `ops` input creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    pub cluster_bits: BoundedU32<MIN_CLUSTER_BITS, OPS_MAX_CLUSTER_BITS>,
    pub refcount_bits: u32,
    pub version: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub zstd: bool,
    pub size: u64,
    /// The raw backing file's content, if any.
    pub backing: Option<Vec<u8>>,
    /// The granularity of bitmap [`OPS_BITMAP`], when the image starts with one.
    pub bitmap: Option<u64>,
}

/// A guest byte range, chosen relative to the disk's size when the step runs (sizes change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSel {
    /// Bits 0-1: grain (cluster, byte, sector, subcluster); bit 2: run to the end of the disk;
    /// bit 3: add an odd tail; bits 5-7 all set: overrun the disk (a request that must be refused).
    pub mode: u8,
    pub start: u32,
    pub len: u16,
}

/// Which snapshot an apply or delete names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSel {
    /// By id (the `index`-th snapshot's, or a free id), else by name.
    pub by_id: bool,
    pub index: u8,
}

/// One step of an `ops` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsStep {
    Write {
        range: RangeSel,
        byte: u8,
    },
    WriteZeroes {
        range: RangeSel,
        unmap: bool,
    },
    Discard {
        range: RangeSel,
    },
    /// Whole clusters from the `cluster`-th (modulo the disk's clusters), one or two of them.
    /// Requests that must be refused: `misaligned` shifts the start by half a cluster; `past_end`
    /// starts `cluster` (modulo 4096) clusters after the end of the disk.
    WriteCompressed {
        cluster: u16,
        two: bool,
        misaligned: bool,
        past_end: bool,
        /// 0: one byte repeated; 1: pseudo-random (incompressible); 2: half random, half zeros;
        /// 3: a byte stepping every 512 bytes.
        kind: u8,
        byte: u8,
    },
    Resize {
        clusters: u8,
        odd: u16,
        sector_aligned: bool,
        allow_data_loss: bool,
    },
    Flush,
    CreateSnapshot {
        name: u8,
    },
    ApplySnapshot(SnapshotSel),
    DeleteSnapshot(SnapshotSel),
    /// Close the image and open its bytes again (in a fresh recording store).
    Reopen,
    /// Clear every bit of bitmap [`OPS_BITMAP`].
    BitmapClear,
    /// Enable or disable bitmap [`OPS_BITMAP`].
    BitmapEnable(bool),
    /// Remove bitmap [`OPS_BITMAP`], or add it (granularity 512 << `granularity_shift` % 8)
    /// when there is none.
    BitmapRemoveOrAdd {
        granularity_shift: u8,
    },
    /// Materialise a power cut and check the crashed image (the live image carries on).
    Crash {
        /// Bit 2 set: cut at a durable checkpoint (`cut` picks which); else anywhere since the
        /// oldest kept checkpoint. Bits 0-1: unflushed writes lost, kept, or torn (twice as often).
        mode: u8,
        cut: u16,
        seed: u16,
    },
}

impl RangeSel {
    pub(crate) fn read(r: &mut ByteReader<'_>) -> Self {
        RangeSel {
            mode: r.u8(),
            start: r.u32(),
            len: r.u16(),
        }
    }

    /// `(offset, len)` for a disk of `size` bytes: the offset is a multiple of the grain in
    /// `[0, size]`, the length a multiple of it up to four clusters (unless it runs to the end).
    pub(crate) fn resolve(self, size: u64, cs: u64) -> (u64, u64) {
        let grain = match self.mode & 3 {
            0 => cs,
            1 => 1,
            2 => 512,
            _ => cs / 32,
        };
        let offset = self.start as u64 % (size / grain + 1) * grain;
        let room = size - offset;
        let mut len = if self.mode & 4 != 0 {
            room
        } else {
            let max = room.min(4 * cs);
            self.len as u64 % (max / grain + 1) * grain
        };
        if self.mode & 8 != 0 {
            len = (len + 1 + (self.mode >> 4) as u64).min(room);
        }
        if self.mode & 0xE0 == 0xE0 {
            len = room + 1 + self.len as u64 % cs;
        }
        (offset, len)
    }
}

impl SnapshotSel {
    pub(crate) fn read(r: &mut ByteReader<'_>) -> Self {
        let b = r.u8();
        SnapshotSel {
            by_id: b & 0x80 != 0,
            index: b & 0x7F,
        }
    }

    /// The id or name to pass to the engine.
    pub(crate) fn key(self, snapshots: &[ModelSnapshot]) -> String {
        if self.by_id {
            let i = self.index as usize % (snapshots.len() + 1);
            match snapshots.get(i) {
                Some(s) => s.id.clone(),
                None => next_snapshot_id(snapshots),
            }
        } else {
            OPS_SNAPSHOT_NAMES[self.index as usize % OPS_SNAPSHOT_NAMES.len()].to_string()
        }
    }
}

/// A virtual size of `clusters` (modulo the bound) whole clusters plus `odd` bytes, at most the
/// bound itself.
pub(crate) fn ops_size(clusters: u8, odd: u16, sector_aligned: bool, cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    let max_clusters = OPS_MAX_CLUSTERS.min(OPS_MAX_BYTES >> cluster_bits);
    let mut odd = odd as u64 % cs;
    if sector_aligned {
        odd &= !511;
    }
    (clusters as u64 % (max_clusters + 1) * cs + odd).min(max_clusters * cs)
}

/// `len` bytes of the backing file's pattern; never zero, so backing data and zeros differ.
pub(crate) fn backing_pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize).wrapping_add(i / 97) as u8 | 0x80)
        .collect()
}

/// Data for a compressed write (see [`OpsStep::WriteCompressed`]).
pub(crate) fn compressed_data(len: usize, kind: u8, byte: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ byte as u64;
    let mut random = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    (0..len)
        .map(|i| match kind & 3 {
            0 => byte,
            1 => random(),
            2 if i < len / 2 => random(),
            2 => 0,
            _ => byte.wrapping_add((i / 512) as u8),
        })
        .collect()
}

impl OpsStep {
    /// Decodes one step: an opcode byte, then the step's fields.
    pub(crate) fn read(r: &mut ByteReader<'_>) -> Self {
        let op = r.u8();
        // Bitmap commands take three of the 256 opcode values, leaving the older meaning of
        // every other value (and of the committed regression inputs) as it was.
        match op {
            0xF0 => return OpsStep::BitmapClear,
            0xF1 => return OpsStep::BitmapEnable(r.u8() & 1 != 0),
            0xF2 => {
                return OpsStep::BitmapRemoveOrAdd {
                    granularity_shift: r.u8(),
                }
            }
            _ => {}
        }
        match op % 16 {
            0..=2 | 13 => OpsStep::Write {
                range: RangeSel::read(r),
                byte: r.u8(),
            },
            3 | 14 => OpsStep::WriteZeroes {
                range: RangeSel::read(r),
                unmap: r.u8() & 1 != 0,
            },
            4 | 15 => OpsStep::Discard {
                range: RangeSel::read(r),
            },
            5 => {
                let cluster = r.u16();
                let flags = r.u8();
                OpsStep::WriteCompressed {
                    cluster,
                    two: flags & 1 != 0,
                    misaligned: flags & 0xF0 == 0xF0,
                    past_end: flags & 0xF0 == 0xE0,
                    kind: flags >> 1 & 3,
                    byte: r.u8(),
                }
            }
            6 => {
                let clusters = r.u8();
                let odd = r.u16();
                let flags = r.u8();
                OpsStep::Resize {
                    clusters,
                    odd,
                    sector_aligned: flags & 2 != 0,
                    allow_data_loss: flags & 1 != 0,
                }
            }
            7 => OpsStep::Flush,
            8 => OpsStep::CreateSnapshot { name: r.u8() },
            9 => OpsStep::ApplySnapshot(SnapshotSel::read(r)),
            10 => OpsStep::DeleteSnapshot(SnapshotSel::read(r)),
            11 => OpsStep::Reopen,
            _ => OpsStep::Crash {
                mode: r.u8(),
                cut: r.u16(),
                seed: r.u16(),
            },
        }
    }
}

impl OpsInput {
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut r = ByteReader::new(data);
        let cluster_bits = BoundedU32::<MIN_CLUSTER_BITS, OPS_MAX_CLUSTER_BITS>::read(&mut r);
        let refcount_order = BoundedU32::<0, MAX_REFCOUNT_ORDER>::read(&mut r).get();
        let flags = r.u8();
        let v3 = flags & 1 == 0;
        let bits = cluster_bits.get();
        let size = ops_size(r.u8(), r.u16(), flags & 0x20 != 0, bits);
        let backing = (flags & 0x10 != 0).then(|| {
            let max = ops_size(u8::MAX, u16::MAX, false, bits) + (1 << bits);
            let len = r.u16() as u64 * 512 % (max + 1) + r.u8() as u64 % 512;
            backing_pattern(len as usize, r.u8())
        });
        let config = OpsConfig {
            cluster_bits,
            refcount_bits: if v3 { 1 << refcount_order } else { 16 },
            version: if v3 { 3 } else { 2 },
            lazy_refcounts: v3 && flags & 2 != 0,
            extended_l2: v3 && flags & 4 != 0 && bits >= OPS_MIN_EXTENDED_L2_CLUSTER_BITS,
            zstd: v3 && flags & 8 != 0,
            size,
            backing,
            bitmap: (v3 && flags & 0x40 != 0).then_some(if flags & 0x80 != 0 {
                512
            } else {
                1 << bits
            }),
        };
        let mut steps = Vec::new();
        while r.remaining() > 0 && steps.len() < OPS_MAX_STEPS {
            steps.push(OpsStep::read(&mut r));
        }
        OpsInput { config, steps }
    }
}
