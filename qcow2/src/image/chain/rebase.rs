//! Rebase (`qemu-img rebase`): puts another backing file under an image. The safe mode first
//! copies into the image exactly the clusters whose content would change with the new backing
//! file (all backing data when there is none: flattening), flushes, and only then switches the
//! name in the header (crash-safely, see `backing_header`). Until the switch the image reads
//! through the old chain; the copies hold what that chain shows, so the guest content is the same
//! at every instant, and a rerun skips what is already copied. The unsafe mode only rewrites
//! the name and format.

use std::path::Path;

use super::resolver;
use crate::error::{Error, Result};
use crate::image::backing::{self, open_chain, Backing};
use crate::image::{open_locked, resolve_relative, Image, OpenOptions};
use crate::storage::Storage;

/// Largest piece compared or copied at once (bounds memory).
const CHUNK: u64 = 1 << 20;

/// What a rebase puts under the image.
pub enum NewBacking {
    /// A qcow2 image with its own chain, opened read-only.
    Qcow2(Box<Image>),
    /// A raw file.
    Raw(Box<dyn Storage>),
}

impl std::fmt::Debug for NewBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewBacking::Qcow2(image) => f.debug_tuple("Qcow2").field(image).finish(),
            NewBacking::Raw(_) => f.write_str("Raw"),
        }
    }
}

impl NewBacking {
    /// Opens the file `name` names for the image at `image_path` (resolved against that image's
    /// directory, as the header name will be) as `format` ("qcow2" or "raw").
    pub fn open(
        image_path: &Path,
        name: &str,
        format: &str,
        options: &OpenOptions,
    ) -> Result<NewBacking> {
        let path = resolve_relative(image_path, name);
        let read_only = OpenOptions {
            writable: false,
            ..options.clone()
        };
        if !resolver::is_plain_path(name) {
            // Described, not named: the caller's resolver builds it, as for any backing file.
            let above = image_path.display().to_string();
            let chosen = Some(format.to_string());
            let chain = &mut Vec::new();
            return match backing::open_resolved(
                &above, name, chosen, None, &read_only, chain, None,
            )? {
                Backing::Qcow2(image) => Ok(NewBacking::Qcow2(Box::new(
                    std::sync::Arc::try_unwrap(image).map_err(|_| Error::InvalidArgument {
                        image: above.clone(),
                        reason: "the new backing image is shared".into(),
                    })?,
                ))),
                Backing::Raw { storage, .. } => Ok(NewBacking::Raw(storage)),
            };
        }
        match format {
            "qcow2" => Ok(NewBacking::Qcow2(Box::new(open_chain(
                &path,
                &read_only,
                &mut Vec::new(),
            )?))),
            "raw" => Ok(NewBacking::Raw(open_locked(
                &path,
                false,
                &read_only,
                &path.display().to_string(),
                "the new backing file",
            )?)),
            other => Err(Error::InvalidArgument {
                image: image_path.display().to_string(),
                reason: format!("backing format {other:?} is not supported"),
            }),
        }
    }

    fn into_backing(self, image: &str) -> Result<Backing> {
        Ok(match self {
            NewBacking::Qcow2(image) => Backing::Qcow2((*image).into()),
            NewBacking::Raw(storage) => {
                let size = storage
                    .len()
                    .map_err(|e| Error::io(image, "reading the new backing file length", e))?
                    // QEMU sees a raw file in whole sectors.
                    .next_multiple_of(512);
                Backing::Raw { storage, size }
            }
        })
    }
}

/// How to rebase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebaseOptions {
    /// The new backing file name as the header records it; `None` removes the backing file.
    pub name: Option<String>,
    /// The new backing format ("qcow2", "raw"); recorded with the name.
    pub format: Option<String>,
    /// Rewrite the header only (`-u`): the caller promises the content matches.
    pub header_only: bool,
    /// Write the clusters a safe rebase copies compressed (`-c`).
    pub compress: bool,
}

setters!(RebaseOptions {
    name: Option<String>,
    format: Option<String>,
    header_only: bool,
    compress: bool,
});

impl RebaseOptions {
    /// Safe-mode rebase onto no backing file; set [`name`](Self#structfield.name) and
    /// [`format`](Self#structfield.format) for a new one.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Image {
    /// Rebases this image onto `new` (opened by the caller; `None` with no name). The image must
    /// be writable and, in safe mode, opened with its current backing chain. `progress` receives
    /// (bytes done, bytes to do).
    pub fn rebase(
        &mut self,
        options: &RebaseOptions,
        new: Option<NewBacking>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.require_writable()?;
        let invalid = |image: &Image, reason: &str| Error::InvalidArgument {
            image: image.name.clone(),
            reason: reason.to_string(),
        };
        if options.name.is_some() != new.is_some() && !options.header_only {
            return Err(invalid(
                self,
                "a safe rebase needs the new backing file opened exactly when it is named",
            ));
        }
        if options.name.is_none() && options.format.is_some() {
            return Err(invalid(self, "a backing format needs a backing file name"));
        }
        let new = new.map(|n| n.into_backing(&self.name)).transpose()?;
        if !options.header_only {
            if self.backing_file_name().is_some() && self.backing.is_none() {
                return Err(invalid(
                    self,
                    "a safe rebase needs the current backing chain opened",
                ));
            }
            self.copy_changed_clusters(new.as_ref(), options.compress, progress)?;
        }
        {
            let mut m = self.meta_mut();
            self.set_backing_header(
                &mut m,
                options.name.as_deref().map(str::as_bytes),
                options.format.as_deref().map(str::as_bytes),
            )?;
        }
        self.backing = new;
        Ok(())
    }

    /// Copies into this image every cluster not fully its own whose content under `new` would
    /// differ from what it reads now (compressed when `compress`), then flushes.
    fn copy_changed_clusters(
        &self,
        new: Option<&Backing>,
        compress: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let size = self.size();
        // The unit copied: a subcluster where the image has them (QEMU aligns its copies so,
        // leaving the other subclusters unallocated), else a cluster; compressed writes take
        // whole clusters.
        let cs = if self.header().extended_l2() && !compress {
            self.cluster_size() / crate::format::limits::SUBCLUSTERS_PER_CLUSTER as u64
        } else {
            self.cluster_size()
        };
        let below: Vec<(u64, u64)> = self
            .map(0, size)?
            .into_iter()
            .filter(|e| !(e.depth == 0 && e.present()))
            .map(|e| (e.start, e.length))
            .collect();
        let total: u64 = below.iter().map(|e| e.1).sum();
        let mut done = 0;
        progress(done, total);
        // Unit indices to copy, ascending.
        let mut changed: Vec<u64> = Vec::new();
        let (mut old_buf, mut new_buf) = (Vec::new(), Vec::new());
        for (start, length) in below {
            let end = start + length;
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(CHUNK - pos % CHUNK);
                old_buf.resize(n as usize, 0);
                new_buf.resize(n as usize, 0);
                self.read_backing(&mut old_buf, pos)?;
                match new {
                    Some(b) => b.read(&self.name, &mut new_buf, pos)?,
                    None => new_buf.fill(0),
                }
                if old_buf != new_buf {
                    // Which clusters of the piece differ.
                    let mut at = pos;
                    while at < pos + n {
                        let piece_end = ((at / cs + 1) * cs).min(pos + n);
                        let (a, b) = ((at - pos) as usize, (piece_end - pos) as usize);
                        let cluster = at / cs;
                        if old_buf[a..b] != new_buf[a..b] && changed.last() != Some(&cluster) {
                            changed.push(cluster);
                        }
                        at = piece_end;
                    }
                }
                pos += n;
                done += n;
                progress(done, total);
            }
        }
        // Whole clusters, in runs: what the image reads now becomes its own data. Past the old
        // backing file's end the image reads zeros of its own, which it keeps as zero clusters
        // (as qemu-img does), not as zeros written out.
        let old_end = self.backing.as_ref().map_or(0, |b| b.size());
        let past_old_end = |cluster: u64| cluster * cs >= old_end;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < changed.len() {
            let mut j = i + 1;
            while j < changed.len()
                && changed[j] == changed[j - 1] + 1
                && past_old_end(changed[j]) == past_old_end(changed[i])
                && (j - i) as u64 * cs < CHUNK
            {
                j += 1;
            }
            let start = changed[i] * cs;
            let end = ((changed[j - 1] + 1) * cs).min(size);
            if past_old_end(changed[i]) {
                self.write_zeroes(start, end - start, false)?;
                i = j;
                continue;
            }
            buf.resize((end - start) as usize, 0);
            self.read_at(&mut buf, start)?;
            if compress {
                self.write_compressed(&buf, start)?;
            } else {
                self.write_at(&buf, start)?;
            }
            i = j;
        }
        self.flush()
    }
}
