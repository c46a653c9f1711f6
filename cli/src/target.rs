//! Files a command creates or replaces (`create`, `convert`): every such file goes through
//! [`replace_file`], which refuses a target that is one of the command's own inputs (whatever
//! name, symlink, hard link or `..` reached it) and takes QEMU's write lock, all before the
//! first byte of the old contents is touched.

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use qcow2::storage::{FileIdentity, Storage};
use qcow2::FileStorage;

use crate::cache::CacheMode;
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
        // An empty file is left as it is: on ext4 a truncation, even of an empty file, makes
        // the close start write-back of everything written since (auto_da_alloc), 0.3 s for a
        // 512 MiB convert output.
        let len = storage
            .file()
            .metadata()
            .map_err(|e| format!("Could not create '{shown}': {}", io_text(&e)))?
            .len();
        if len > 0 {
            storage
                .file()
                .set_len(0)
                .map_err(|e| format!("Could not create '{shown}': {}", io_text(&e)))?;
        }
    }
    Ok(storage)
}

/// Reads and writes `storage` around the page cache when `cache` asks (`none`, `directsync`).
pub fn set_direct(storage: &mut FileStorage, cache: CacheMode) -> Result<(), String> {
    storage
        .set_direct_io(cache.direct)
        .map_err(|e| format!("Could not open with cache.direct=on: {}", io_text(&e)))
}

/// `storage` as an image's store in cache mode `cache`: synced as the engine asks unless
/// `unsafe` (qemu-img's default for convert's target), around the page cache for `none` and
/// `directsync`.
pub fn with_cache(mut storage: FileStorage, cache: CacheMode) -> Result<Box<dyn Storage>, String> {
    storage.set_skip_syncs(cache.no_flush);
    set_direct(&mut storage, cache)?;
    Ok(Box::new(storage))
}
