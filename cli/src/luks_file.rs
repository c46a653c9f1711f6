//! `create -f luks`: a raw LUKS volume (QEMU's `luks` format driver), the LUKS header and key
//! slots followed by the encrypted payload. Only created, as qemu-iotests' check for LUKS
//! support creates one; images are otherwise qcow2 with LUKS inside.

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2::crypto::luks::{HeaderArea, Luks};
use qcow2::crypto::CryptoError;

use crate::opts::Qcow2Opts;

/// The volume file, its LUKS area starting at byte 0.
struct FileArea<'a>(&'a File);

impl HeaderArea for FileArea<'_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.0
            .read_exact_at(buf, offset)
            .map_err(|source| CryptoError::Io {
                context: "Could not read encryption header".into(),
                source,
            })
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), CryptoError> {
        self.0
            .write_all_at(buf, offset)
            .map_err(|source| CryptoError::Io {
                context: "Could not write encryption header".into(),
                source,
            })
    }
}

/// Creates the LUKS volume `path` of `size` payload bytes from `-o` lists (`key-secret`,
/// `iter-time`, `cipher-alg`, ...).
pub fn create(path: &str, size: u64, lists: &[String]) -> Result<(), String> {
    let mut opts = Qcow2Opts::default();
    opts.encrypt.push(("format".into(), "luks".into()));
    for list in lists {
        for pair in list.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "on"));
            if k == "size" {
                continue;
            }
            opts.encrypt.push((k.to_owned(), v.to_owned()));
        }
    }
    let Some(qcow2::NewEncryption::Luks { password, params }) = opts
        .encryption_options()
        .map_err(|m| m.replace("encrypt.", ""))?
    else {
        return Err("LUKS options expected".into());
    };
    let (mut luks, master) = Luks::create(&params).map_err(|e| e.to_string())?;
    let file = File::create_new(path)
        .map_err(|e| format!("Could not create '{path}': {}", crate::source::io_text(&e)))?;
    let payload = luks.area_len();
    let result = file
        .set_len(payload + size.next_multiple_of(512))
        .map_err(|e| crate::source::io_text(&e))
        .and_then(|_| {
            luks.store_key(&FileArea(&file), 0, &password, &master, params.iter_time_ms)
                .map_err(|e| e.to_string())
        })
        .and_then(|_| file.sync_all().map_err(|e| crate::source::io_text(&e)));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}
