//! The hashes LUKS names, PBKDF2 over their HMAC, and the benchmark that turns an iteration
//! time into an iteration count as QEMU does.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// A hash algorithm, named as QEMU and the LUKS header name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// `sha1`
    Sha1,
    /// `sha224`
    Sha224,
    /// `sha256`
    Sha256,
    /// `sha384`
    Sha384,
    /// `sha512`
    Sha512,
}

impl HashAlg {
    /// The name in headers and options.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// The algorithm a name stands for.
    pub fn from_name(name: &str) -> Option<HashAlg> {
        [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ]
        .into_iter()
        .find(|h| h.name() == name)
    }

    /// Bytes of a digest.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenated `parts`.
    pub(crate) fn digest(self, parts: &[&[u8]]) -> zeroize::Zeroizing<Vec<u8>> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        zeroize::Zeroizing::new(match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        })
    }

    /// PBKDF2 with this hash's HMAC: fills `out` from `password` and `salt`.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// PBKDF2 iterations this machine runs per second for these inputs: runs grow tenfold
    /// until one takes long enough to time, then the rate is scaled from it.
    pub(crate) fn iterations_per_second(self, key: &[u8], salt: &[u8], out_len: usize) -> u64 {
        let mut out = zeroize::Zeroizing::new(vec![0u8; out_len]);
        let mut iterations: u64 = 1 << 12;
        loop {
            let start = std::time::Instant::now();
            self.pbkdf2(key, salt, iterations as u32, &mut out);
            let ms = start.elapsed().as_millis() as u64;
            if ms >= 100 || iterations >= u32::MAX as u64 / 10 {
                return iterations * 1000 / ms.max(1);
            }
            iterations *= if ms < 10 { 10 } else { 2 };
        }
    }
}
