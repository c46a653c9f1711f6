//! Encrypted images as QEMU writes them: the legacy AES-CBC method (`crypt_method` 1, a key
//! taken straight from the password) and LUKS (`crypt_method` 2, a LUKS v1 header stored in the
//! image's own clusters). Pure codecs and key handling; the engine (`image`) does the I/O.
//!
//! - `cipher`: AES in ECB, CBC or XTS over 512-byte sectors, with the IV generators;
//! - `kdf`: the hashes, PBKDF2 and its iteration benchmark;
//! - `afsplit`: the anti-forensic splitter that spreads a master key over 4000 stripes;
//! - `luks`: the LUKS header, unlocking, creation and key slot management.

mod afsplit;
mod cipher;
mod kdf;
pub mod luks;

pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
pub use kdf::HashAlg;

use zeroize::Zeroizing;

/// `crypt_method` of the legacy AES-CBC format.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` of LUKS.
pub const CRYPT_LUKS: u32 = 2;

/// A password or key: wiped from memory when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A secret holding `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why encrypting, unlocking or managing keys failed. Displayed in QEMU's words, which scripts
/// and qemu-iotests compare.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// No active key slot opens with the password given.
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassword,
    /// The image is encrypted and no password was given.
    #[error("Parameter 'encrypt.key-secret' is required for cipher")]
    MissingSecret,
    /// The LUKS header is damaged or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// The header asks for an algorithm this engine does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A key slot change was refused (it would lose the data, or overwrite a key).
    #[error("{0}")]
    Refused(String),
    /// Reading or writing the LUKS header area failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The storage's error.
        #[source]
        source: std::io::Error,
    },
}

/// Fills `buf` from the kernel's random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|source| CryptoError::Io {
            context: "reading random bytes".into(),
            source,
        })
}
