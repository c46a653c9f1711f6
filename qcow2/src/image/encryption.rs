//! An open image's encryption: the payload cipher unlocked at open (or none, for an image
//! opened without its key to read metadata only), the LUKS header for `info` and key slot
//! changes, and the sector arithmetic of QEMU's two formats. LUKS derives each sector's IV from
//! the host offset, legacy AES from the guest offset; both work in 512-byte sectors, so guest
//! requests are widened to whole sectors before they reach the data path.

use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::crypto::luks::{HeaderArea, KeyslotChange, Luks, LuksParams};
use crate::crypto::{CryptoError, Secret, SectorCipher, CRYPT_AES, CRYPT_LUKS, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::format::extension::CryptoHeaderExtension;
use crate::format::Header;
use crate::storage::{Storage, StorageExt};

/// The encryption state of an open encrypted image.
pub(crate) struct Encryption {
    method: u32,
    /// `None` while the image is open without its key.
    cipher: Option<SectorCipher>,
    luks: Option<Mutex<Luks>>,
    area: Option<CryptoHeaderExtension>,
    opened_with: Option<Secret>,
    /// Guest writes of whole sectors share it; a write widened to whole sectors (read, merge,
    /// write back) holds it alone, so no other write lands between its read and its write.
    writes: RwLock<()>,
}

/// The LUKS area of an image file: every access stays inside the extension's range.
pub(crate) struct Area<'a> {
    pub storage: &'a dyn Storage,
    pub ext: CryptoHeaderExtension,
}

impl Area<'_> {
    fn check(&self, offset: u64, len: usize) -> Result<u64, CryptoError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.ext.length => Ok(self.ext.offset + offset),
            _ => Err(CryptoError::Invalid(
                "Request for data outside of extension header".into(),
            )),
        }
    }
}

impl HeaderArea for Area<'_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        let at = self.check(offset, buf.len())?;
        self.storage
            .read_exact_at(buf, at)
            .map_err(|source| CryptoError::Io {
                context: "Could not read encryption header".into(),
                source,
            })
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), CryptoError> {
        let at = self.check(offset, buf.len())?;
        self.storage
            .write_at(buf, at)
            .map_err(|source| CryptoError::Io {
                context: "Could not write encryption header".into(),
                source,
            })
    }
}

/// How a new image is encrypted.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NewEncryption {
    /// LUKS with these parameters, slot 0 opened by the password.
    Luks {
        /// The password for key slot 0.
        password: Secret,
        /// Algorithms and iteration time.
        params: LuksParams,
    },
    /// The legacy AES-CBC format, keyed by the password (deprecated by QEMU: weak).
    Aes {
        /// The password.
        password: Secret,
    },
}

impl NewEncryption {
    /// The header's `crypt_method`.
    pub fn method(&self) -> u32 {
        match self {
            NewEncryption::Luks { .. } => CRYPT_LUKS,
            NewEncryption::Aes { .. } => CRYPT_AES,
        }
    }
}

impl Encryption {
    /// The encryption of an image whose header is `header`, unlocked with `key`. Without a key
    /// the image opens locked when `without_key` allows it (data I/O then fails).
    pub(crate) fn open(
        storage: &dyn Storage,
        name: &str,
        header: &Header,
        key: Option<&Secret>,
        without_key: bool,
    ) -> Result<Option<Encryption>> {
        let method = header.crypt_method;
        if method == 0 {
            return Ok(None);
        }
        let err = |e| Error::crypto(name, e);
        if key.is_none() && !without_key {
            return Err(err(CryptoError::MissingSecret));
        }
        if method == CRYPT_AES {
            return Ok(Some(Encryption {
                method,
                cipher: key.map(|k| SectorCipher::legacy_aes(k.bytes())),
                luks: None,
                area: None,
                opened_with: key.cloned(),
                writes: RwLock::new(()),
            }));
        }
        let ext = header.extensions.crypto.ok_or_else(|| {
            err(CryptoError::Invalid(format!(
                "Missing CRYPTO header for crypt method {method}"
            )))
        })?;
        let area = Area { storage, ext };
        let luks = Luks::load(&area).map_err(err)?;
        let cipher = match key {
            Some(k) => {
                let master = luks.unlock(&area, k).map_err(err)?;
                Some(luks.payload_cipher(&master).map_err(err)?)
            }
            None => None,
        };
        Ok(Some(Encryption {
            method,
            cipher,
            luks: Some(Mutex::new(luks)),
            area: Some(ext),
            opened_with: key.cloned(),
            writes: RwLock::new(()),
        }))
    }

    /// The pass of a write (or zeroing, or discard) of whole sectors: such writes run side by
    /// side, but never during a widened write.
    pub(crate) fn whole_sectors_pass(&self) -> RwLockReadGuard<'_, ()> {
        self.writes.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The pass of a write widened to whole sectors: it excludes every other write while the
    /// sectors it read are merged and written back.
    pub(crate) fn widened_pass(&self) -> RwLockWriteGuard<'_, ()> {
        self.writes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the LUKS header, for LUKS images.
    pub(crate) fn luks(&self) -> Option<Luks> {
        self.luks
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn cipher(&self, name: &str) -> Result<&SectorCipher> {
        self.cipher
            .as_ref()
            .ok_or_else(|| Error::crypto(name, CryptoError::MissingSecret))
    }

    /// The sector number the IV of the sector at these offsets comes from.
    fn sector(&self, host: u64, guest: u64) -> u64 {
        if self.method == CRYPT_LUKS {
            host / SECTOR_SIZE
        } else {
            guest / SECTOR_SIZE
        }
    }

    /// Encrypts whole sectors bound for `host` (guest offset `guest`).
    pub(crate) fn encrypt(&self, name: &str, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let c = self.cipher(name)?;
        c.encrypt(self.sector(host, guest), buf);
        Ok(())
    }

    /// Decrypts whole sectors read from `host` (guest offset `guest`).
    pub(crate) fn decrypt(&self, name: &str, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let c = self.cipher(name)?;
        c.decrypt(self.sector(host, guest), buf);
        Ok(())
    }

    /// Adds or erases LUKS key slots as `qemu-img amend` does.
    pub(crate) fn change_keyslots(
        &self,
        storage: &dyn Storage,
        name: &str,
        change: &KeyslotChange,
        force: bool,
    ) -> Result<()> {
        let (Some(luks), Some(ext)) = (&self.luks, self.area) else {
            return Err(Error::InvalidArgument {
                image: name.to_string(),
                reason: "Only LUKS encrypted images support amending key slots".into(),
            });
        };
        let mut luks = luks.lock().unwrap_or_else(|e| e.into_inner());
        let area = Area { storage, ext };
        luks.change_keyslots(&area, change, self.opened_with.as_ref(), force)
            .map_err(|e| Error::crypto(name, e))?;
        storage
            .flush()
            .map_err(|e| Error::io(name, "flushing the encryption header", e))
    }
}

/// The sector-aligned span `[start, end)` around `[offset, offset + len)`.
pub(crate) fn sector_span(offset: u64, len: u64) -> (u64, u64) {
    (
        offset - offset % SECTOR_SIZE,
        (offset + len).next_multiple_of(SECTOR_SIZE),
    )
}
