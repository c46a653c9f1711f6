//! Files a command creates or replaces (`create`, `convert`): every such file goes through
//! [`replace_file`], which refuses a target that is one of the command's own inputs (whatever
//! name, symlink, hard link or `..` reached it) and takes QEMU's write lock, all before the
//! first byte of the old contents is touched.

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use qcow2::storage::{FileIdentity, Storage};
use qcow2::FileStorage;

use crate::source::io_text;

/// The identity of the file at `path` (after symlinks), if it exists.
pub fn identity_of(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| FileIdentity {
        device: m.dev(),
        inode: m.ino(),
    })
}

/// Takes QEMU's write lock on an open file that a command writes or resizes in place.
pub fn lock_for_write(file: std::fs::File, path: &Path) -> Result<FileStorage, String> {
    let shown = path.display();
    let mut storage = FileStorage::from_file(file, true);
    match storage.lock_image(true) {
        Ok(Ok(())) => Ok(storage),
        Ok(Err(_)) => Err(format!(
            "Failed to get \"write\" lock\nIs another process using the image [{shown}]?"
        )),
        Err(e) => Err(format!("Could not lock '{shown}': {}", io_text(&e))),
    }
}

/// Opens `path` to replace its contents: refuses FIFOs and sockets (opening them could hang),
/// refuses a file that is one of `inputs`, takes QEMU's write lock, then empties it. Messages
/// follow qemu-img's; the caller puts the file name (and what it was doing) in front.
pub fn replace_file(path: &Path, inputs: &[FileIdentity]) -> Result<FileStorage, String> {
    let shown = path.display();
    if let Ok(meta) = std::fs::metadata(path) {
        let kind = meta.file_type();
        if kind.is_fifo() || kind.is_socket() {
            return Err(format!(
                "Could not create '{shown}': the target is a FIFO or socket, not a file"
            ));
        }
    }
    // Open without truncating: nothing changes until the checks below have passed.
    let file = FileOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("Could not create '{shown}': {}", io_text(&e)))?;
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    let identity =
        FileIdentity::of(&file).map_err(|e| format!("Could not create '{shown}': {e}"))?;
    if inputs.contains(&identity) {
        return Err(
            "the output is also an input (the same file as an image being read, \
             or a file of its backing chain); refusing to overwrite it"
                .into(),
        );
    }
    let mut storage = FileStorage::from_file(file, true);
    if regular {
        match storage.lock_image(true) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(format!(
                    "Failed to get \"write\" lock\nIs another process using the image [{shown}]?"
                ))
            }
            Err(e) => return Err(format!("Could not lock '{shown}': {e}")),
        }
        storage
            .file()
            .set_len(0)
            .map_err(|e| format!("Could not create '{shown}': {}", io_text(&e)))?;
    }
    Ok(storage)
}

/// An output file whose syncs are skipped (`convert -t unsafe`): the command ends with its
/// bytes in the page cache, as qemu-img's default for convert leaves them.
#[derive(Debug)]
pub struct Unsynced(pub FileStorage);

impl Storage for Unsynced {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.allocate(offset, len)
    }
    fn hole_at(&self, offset: u64, len: u64) -> std::io::Result<Option<(bool, u64)>> {
        self.0.hole_at(offset, len)
    }
    fn identity(&self) -> Option<FileIdentity> {
        self.0.identity()
    }
}

/// `storage` as an image's store: synced as the engine asks when `durable`, never otherwise.
pub fn with_syncs(storage: FileStorage, durable: bool) -> Box<dyn Storage> {
    if durable {
        Box::new(storage)
    } else {
        Box::new(Unsynced(storage))
    }
}
