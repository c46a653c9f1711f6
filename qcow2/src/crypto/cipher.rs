//! Sector encryption: AES-128/192/256 in ECB, CBC or XTS mode, one 512-byte sector at a time,
//! each sector's IV made by the IV generator from its sector number (plain: the low 32 bits,
//! plain64: all 64, little-endian; essiv: plain64 encrypted with a key hashed from the main key).

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

use super::kdf::HashAlg;
use super::CryptoError;

/// Bytes of one encryption sector (both formats).
pub const SECTOR_SIZE: u64 = 512;

/// A block cipher with its key size, named as QEMU names it (`aes-256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// `aes-128`
    Aes128,
    /// `aes-192`
    Aes192,
    /// `aes-256`
    Aes256,
}

impl CipherAlg {
    /// QEMU's name (`cipher-alg` option, `qemu-img info`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// The algorithm a QEMU name stands for.
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Key bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant whose key is `len` bytes.
    pub(crate) fn aes_with_key_len(len: usize) -> Option<CipherAlg> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| a.key_len() == len)
    }
}

/// A block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// `ecb`: no IV.
    Ecb,
    /// `cbc`
    Cbc,
    /// `xts`: the key is two cipher keys.
    Xts,
}

impl CipherMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }

    /// The mode a QEMU name stands for.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// How each sector's IV is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// `plain`: the sector number's low 32 bits.
    Plain,
    /// `plain64`: the whole sector number.
    Plain64,
    /// `essiv`: the sector number encrypted under a hash of the key.
    Essiv,
}

impl IvGenAlg {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// The generator a QEMU name stands for.
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// AES with one of its key sizes; round keys are wiped on drop (the `zeroize` feature).
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Option<Aes> {
        Some(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).ok()?),
            24 => Aes::A192(Aes192::new_from_slice(key).ok()?),
            32 => Aes::A256(Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    fn encrypt(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    fn decrypt(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.decrypt_block(b),
            Aes::A192(c) => c.decrypt_block(b),
            Aes::A256(c) => c.decrypt_block(b),
        }
    }
}

enum Xts {
    A128(Box<Xts128<Aes128>>),
    A192(Box<Xts128<Aes192>>),
    A256(Box<Xts128<Aes256>>),
}

enum Mode {
    Ecb(Aes),
    Cbc(Aes),
    Xts(Xts),
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(aes) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                aes.encrypt(&mut iv);
            }
        }
        iv
    }
}

/// A keyed cipher for whole sectors: the payload cipher of an image, or the one that seals a
/// LUKS key slot.
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(..)")
    }
}

impl SectorCipher {
    /// A cipher for `alg` in `mode` keyed with `key` (twice the cipher's key for XTS), IVs from
    /// `ivgen` (`ivgen_hash` keys ESSIV).
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<SectorCipher, CryptoError> {
        let bad_key = || CryptoError::Invalid(format!("Invalid key length {}", key.len()));
        let key_len = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
        if key.len() != key_len {
            return Err(bad_key());
        }
        let mode = match mode {
            CipherMode::Ecb => Mode::Ecb(Aes::new(key).ok_or_else(bad_key)?),
            CipherMode::Cbc => Mode::Cbc(Aes::new(key).ok_or_else(bad_key)?),
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                fn pair<C: KeyInit>(k1: &[u8], k2: &[u8]) -> Option<(C, C)> {
                    Some((C::new_from_slice(k1).ok()?, C::new_from_slice(k2).ok()?))
                }
                let xts = match alg {
                    CipherAlg::Aes128 => {
                        pair(k1, k2).map(|(a, b)| Xts::A128(Box::new(Xts128::new(a, b))))
                    }
                    CipherAlg::Aes192 => {
                        pair(k1, k2).map(|(a, b)| Xts::A192(Box::new(Xts128::new(a, b))))
                    }
                    CipherAlg::Aes256 => {
                        pair(k1, k2).map(|(a, b)| Xts::A256(Box::new(Xts128::new(a, b))))
                    }
                };
                Mode::Xts(xts.ok_or_else(bad_key)?)
            }
        };
        let ivgen = match ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = ivgen_hash.ok_or_else(|| {
                    CryptoError::Invalid("Missing IV generator hash specification".into())
                })?;
                let essiv_alg = essiv_cipher(alg, hash)?;
                let salt = hash.digest(&[key]);
                let n = essiv_alg.key_len().min(salt.len());
                IvGen::Essiv(Box::new(Aes::new(&salt[..n]).ok_or_else(bad_key)?))
            }
        };
        Ok(SectorCipher { mode, ivgen })
    }

    /// The legacy qcow AES-CBC cipher: AES-128 keyed with the password's first 16 bytes
    /// (zero-padded), plain64 IVs.
    pub fn legacy_aes(password: &[u8]) -> SectorCipher {
        let mut key = zeroize::Zeroizing::new([0u8; 16]);
        let n = password.len().min(16);
        key[..n].copy_from_slice(&password[..n]);
        SectorCipher {
            mode: Mode::Cbc(Aes::new(&key[..]).expect("16-byte key")),
            ivgen: IvGen::Plain64,
        }
    }

    /// Encrypts whole sectors in place; the first is sector number `first_sector`.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, sector) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.ivgen.iv(first_sector.wrapping_add(i as u64));
            match &self.mode {
                Mode::Ecb(aes) => sector.chunks_exact_mut(16).for_each(|b| aes.encrypt(b)),
                Mode::Cbc(aes) => {
                    let mut prev = iv;
                    for b in sector.chunks_exact_mut(16) {
                        b.iter_mut().zip(&prev).for_each(|(x, p)| *x ^= p);
                        aes.encrypt(b);
                        prev.copy_from_slice(b);
                    }
                }
                Mode::Xts(xts) => match xts {
                    Xts::A128(x) => x.encrypt_sector(sector, iv),
                    Xts::A192(x) => x.encrypt_sector(sector, iv),
                    Xts::A256(x) => x.encrypt_sector(sector, iv),
                },
            }
        }
    }

    /// Decrypts whole sectors in place; the first is sector number `first_sector`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, sector) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.ivgen.iv(first_sector.wrapping_add(i as u64));
            match &self.mode {
                Mode::Ecb(aes) => sector.chunks_exact_mut(16).for_each(|b| aes.decrypt(b)),
                Mode::Cbc(aes) => {
                    let mut prev = iv;
                    for b in sector.chunks_exact_mut(16) {
                        let mut this = [0u8; 16];
                        this.copy_from_slice(b);
                        aes.decrypt(b);
                        b.iter_mut().zip(&prev).for_each(|(x, p)| *x ^= p);
                        prev = this;
                    }
                }
                Mode::Xts(xts) => match xts {
                    Xts::A128(x) => x.decrypt_sector(sector, iv),
                    Xts::A192(x) => x.decrypt_sector(sector, iv),
                    Xts::A256(x) => x.decrypt_sector(sector, iv),
                },
            }
        }
    }
}

/// The cipher ESSIV encrypts IVs with: the main algorithm when the hash's digest fits its key,
/// otherwise the AES whose key is the digest's size.
pub(crate) fn essiv_cipher(alg: CipherAlg, hash: HashAlg) -> Result<CipherAlg, CryptoError> {
    if hash.digest_len() == alg.key_len() {
        return Ok(alg);
    }
    CipherAlg::aes_with_key_len(hash.digest_len()).ok_or_else(|| {
        CryptoError::Unsupported(format!(
            "No AES cipher with key size {} available",
            hash.digest_len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector_number() {
        for (alg, mode, ivgen) in [
            (CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64),
            (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv),
            (CipherAlg::Aes192, CipherMode::Cbc, IvGenAlg::Plain),
            (CipherAlg::Aes128, CipherMode::Ecb, IvGenAlg::Plain64),
        ] {
            let n = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
            let key: Vec<u8> = (0..n as u8).collect();
            let c = SectorCipher::new(alg, mode, ivgen, Some(HashAlg::Sha256), &key).unwrap();
            let plain: Vec<u8> = (0..1024).map(|i| (i % 512 % 251) as u8).collect();
            let mut buf = plain.clone();
            c.encrypt(7, &mut buf);
            assert_ne!(buf, plain);
            let mut other = plain.clone();
            c.encrypt(8, &mut other);
            assert_eq!(mode == CipherMode::Ecb, other[..512] == buf[..512]);
            assert_eq!(other[..512], buf[512..]);
            c.decrypt(7, &mut buf);
            assert_eq!(buf, plain);
        }
    }

    #[test]
    fn a_wrong_key_length_is_an_error() {
        let e = SectorCipher::new(
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGenAlg::Plain64,
            None,
            &[0; 32],
        );
        assert!(e.is_err());
    }
}
