//! The group manifest: each disk's current top image, so external snapshots (which pivot a disk
//! to a new overlay) are recorded somewhere a crash cannot tear. It is rewritten whole to a
//! temporary file, synced, and renamed into place.

use std::path::{Path, PathBuf};

use crate::fs::{parent, GroupFs};

const HEADER: &str = "qcow2-group-manifest 1";

/// Disks and their top images, in first-seen order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Incremented by every transaction that changes a disk's top.
    pub generation: u64,
    /// (disk, current top)
    pub disks: Vec<(PathBuf, PathBuf)>,
}

impl Manifest {
    /// Reads the manifest, or an empty one when there is none.
    pub fn load(fs: &dyn GroupFs, path: &Path) -> std::io::Result<Manifest> {
        let bytes = match fs.read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => return Err(e),
        };
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a group manifest");
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad());
        }
        let generation = lines
            .next()
            .and_then(|l| l.strip_prefix("generation "))
            .and_then(|g| g.parse().ok())
            .ok_or_else(bad)?;
        let disks = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (d, t) = l.split_once('\t').ok_or_else(bad)?;
                Ok((PathBuf::from(d), PathBuf::from(t)))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Manifest { generation, disks })
    }

    /// Points the disk whose top is `old_top` (or a new disk) at `new_top`.
    pub fn pivot(&mut self, old_top: &Path, new_top: &Path) {
        match self.disks.iter_mut().find(|(_, t)| t == old_top) {
            Some((_, t)) => *t = new_top.to_path_buf(),
            None => self
                .disks
                .push((old_top.to_path_buf(), new_top.to_path_buf())),
        }
    }

    /// Where [`Manifest::store`] writes before renaming into place.
    pub fn temp_path(path: &Path) -> PathBuf {
        path.with_extension("manifest.tmp")
    }

    /// Writes the manifest durably: temporary file, sync, rename, directory sync.
    pub fn store(&self, fs: &dyn GroupFs, path: &Path) -> std::io::Result<()> {
        let tmp = Self::temp_path(path);
        let mut text = format!("{HEADER}\ngeneration {}\n", self.generation);
        for (d, t) in &self.disks {
            text += &format!("{}\t{}\n", d.display(), t.display());
        }
        fs.write_synced(&tmp, text.as_bytes())?;
        fs.event("manifest_rename");
        fs.rename(&tmp, path)?;
        fs.sync_dir(parent(path))
    }
}
