//! Commit (`qemu-img commit`): the guest data an image and the images between it and a chosen
//! base hold above that base is written into the base; then, unless asked to keep it, the top is
//! emptied so that everything reads through to the base.
//!
//! The top's guest content never changes: the base only receives ranges that some layer above
//! it covers, and the base is flushed before the top loses a single cluster. Emptying drops L2
//! entries to "unallocated" (as QEMU's discard does), so a crash at any write leaves the top
//! reading the same bytes, and running the commit again finishes the job.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::table::{be_u64_at, OFFSET_MASK};
use crate::image::backing::{open_chain_writable_at, Backing};
use crate::image::{resolve_relative, Image, OpenOptions};

/// Largest piece copied at once (bounds memory).
const COPY_CHUNK: u64 = 1 << 20;

/// How to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitOptions {
    /// Depth of the base in the opened chain: 1 is the top's own backing file.
    pub base_depth: u32,
    /// Empty the top afterwards (qemu-img commit without `-d` and without `-b`).
    pub empty_top: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            base_depth: 1,
            empty_top: true,
        }
    }
}

setters!(CommitOptions {
    base_depth: u32,
    empty_top: bool,
});

impl CommitOptions {
    /// Commit into the backing file (depth 1) and empty the top afterwards.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Image {
    /// The image at `depth` below this one in the opened chain (1 is the backing file).
    pub(crate) fn backing_at(&self, depth: u32) -> Option<&Backing> {
        let below = self.backing.as_ref()?;
        match (depth, below) {
            (0, _) => None,
            (1, b) => Some(b),
            (_, Backing::Qcow2(image)) => image.backing_at(depth - 1),
            (_, Backing::Raw { .. }) => None,
        }
    }

    /// The file names of the chain below the image at `path`, as its headers name them, resolved
    /// like the engine resolves them: element 0 is depth 1. Stops at a raw file or a cycle.
    pub fn chain_paths(path: &Path, options: &OpenOptions) -> Result<Vec<PathBuf>> {
        let image = Image::open(path, options)?;
        let mut out = Vec::new();
        let mut current: &Image = &image;
        let mut current_path = path.to_path_buf();
        while let Some(name) = current.backing_file_name() {
            let below = resolve_relative(&current_path, &name);
            out.push(below.clone());
            match &current.backing {
                Some(Backing::Qcow2(next)) => {
                    current = next;
                    current_path = below;
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Opens the image at `path` for a commit into the image at `base_depth` of its chain: the
    /// top opens writable only when it is to be emptied; the base always opens writable.
    pub fn open_for_commit(
        path: &Path,
        options: &OpenOptions,
        commit: &CommitOptions,
    ) -> Result<Image> {
        let options = OpenOptions {
            writable: commit.empty_top,
            ..options.clone()
        };
        open_chain_writable_at(
            path,
            &options,
            &mut Vec::new(),
            Some(commit.base_depth as usize),
        )
    }

    /// Commits this image (and the images between it and the base) into the base, then empties
    /// this image if asked. `progress` receives (bytes done, bytes to do).
    pub fn commit(
        &self,
        options: &CommitOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let invalid = |reason: String| Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        };
        let base = self.backing_at(options.base_depth).ok_or_else(|| {
            invalid(if self.backing.is_none() {
                "the image has no backing file to commit into".to_string()
            } else {
                format!(
                    "the opened backing chain has no image at depth {}",
                    options.base_depth
                )
            })
        })?;
        if options.empty_top {
            self.require_writable()?;
        }
        let size = self.size();
        if let Backing::Qcow2(image) = base {
            image.require_writable()?;
        }
        // A smaller base grows first (QEMU grows it too); the new area reads as zeros, which the
        // top never sees through the layers above.
        if base.size() < size {
            match base {
                Backing::Qcow2(image) => image.resize(size, false)?,
                Backing::Raw { storage, .. } => storage
                    .set_len(size)
                    .map_err(|e| Error::io(&self.name, "growing the raw base", e))?,
            }
        }

        // Every range some layer above the base decides.
        let above: Vec<(u64, u64, bool)> = self
            .map(0, size)?
            .into_iter()
            .filter(|e| e.depth < options.base_depth)
            .map(|e| (e.start, e.length, e.zero()))
            .collect();
        let total: u64 = above.iter().map(|e| e.1).sum();
        let mut done = 0;
        progress(done, total);
        let mut buf = Vec::new();
        for (start, length, zero) in above {
            let mut pos = start;
            let end = start + length;
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK - pos % COPY_CHUNK);
                buf.resize(n as usize, 0);
                if zero {
                    buf.fill(0);
                } else {
                    self.read_at(&mut buf, pos)?;
                }
                write_base(&self.name, base, &buf, pos, zero)?;
                pos += n;
                done += n;
                progress(done, total);
            }
        }
        // The base holds everything durably before the top may forget any of it.
        match base {
            Backing::Qcow2(image) => image.flush()?,
            Backing::Raw { storage, .. } => storage
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing the raw base", e))?,
        }
        if options.empty_top {
            self.empty_layer()?;
        }
        Ok(())
    }

    /// Drops every cluster mapping of the active layer, so the whole disk reads through to the
    /// backing file, and frees the clusters.
    pub(crate) fn empty_layer(&self) -> Result<()> {
        self.storage.event(crate::storage::Event::EmptyImagePrepare);
        let mut m = self.meta_mut();
        let cluster_bits = m.header.cluster_bits;
        let l2_bits = m.header.l2_bits();
        let words = if m.header.extended_l2() { 2 } else { 1 };
        let size = m.header.size;
        for l1_index in 0..m.l1.len() {
            let l2_offset = m.l1[l1_index] & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let table = self.l2_table(&m, l2_offset, l1_index as u64, m.header.l1_table_offset)?;
            let used: Vec<u64> = (0..1u64 << l2_bits)
                .filter(|&i| (0..words).any(|w| be_u64_at(&table, (i as usize) * words + w) != 0))
                .collect();
            drop(table);
            for index in used {
                let guest =
                    ((l1_index as u64) << (cluster_bits + l2_bits)) | (index << cluster_bits);
                if guest < size {
                    self.unmap_cluster(&mut m, guest)?;
                }
            }
            self.flush_l2(&mut m)?;
        }
        self.flush_all(&mut m)
    }
}

/// Writes committed guest bytes into the base. Zeros free the base's clusters where they can
/// (QEMU's commit unmaps too), so a committed zero range costs no space.
fn write_base(top: &str, base: &Backing, buf: &[u8], offset: u64, zero: bool) -> Result<()> {
    match base {
        Backing::Qcow2(image) if zero => image.write_zeroes(offset, buf.len() as u64, true),
        Backing::Qcow2(image) => image.write_at(buf, offset),
        Backing::Raw { storage, .. } => storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(top, format!("writing the raw base at {offset:#x}"), e)),
    }
}
