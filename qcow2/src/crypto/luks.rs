//! LUKS v1 as QEMU stores it inside a qcow2 image (the same bytes a LUKS device starts with):
//! a 592-byte big-endian header at the start of the area, then eight key slots, each holding
//! the master key split over 4000 stripes and sealed with a key derived from a password.
//!
//! The area is reached through [`HeaderArea`], which keeps every access inside it: sizes and
//! offsets from a damaged header are checked before use, and no buffer is larger than one key
//! slot's material (at most 64 × 4000 bytes).

use zeroize::Zeroizing;

use super::afsplit;
use super::cipher::{essiv_cipher, CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
use super::kdf::HashAlg;
use super::{random_bytes, CryptoError, Secret};

/// Bytes of the header proper.
pub const HEADER_LEN: usize = 592;
/// Key slots in a header.
pub const NUM_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot.
pub const STRIPES: u32 = 4000;
/// QEMU's default time for deriving a key slot's key, in milliseconds.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Where the first key slot's material starts: the header rounded up to 4 KiB.
const KEY_SLOT_OFFSET: u64 = 4096;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const UUID_LEN: usize = 40;
const MIN_ITERATIONS: u64 = 1000;
/// Overwrites of an erased key slot's material with random bytes.
const ERASE_PASSES: usize = 40;

/// The area holding the LUKS header and key material, addressed from its start.
pub trait HeaderArea {
    /// Reads `buf.len()` bytes at `offset`; a range outside the area is an error.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError>;
    /// Writes `buf` at `offset`; a range outside the area is an error.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), CryptoError>;
}

/// One key slot of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations for the password.
    pub iterations: u32,
    salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the start of the area.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes (always 4000).
    pub stripes: u32,
}

/// A master key, wiped from memory on drop.
pub type MasterKey = Zeroizing<Vec<u8>>;

/// A LUKS header, decoded and checked, with the algorithms it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks {
    cipher_name: String,
    cipher_mode_spec: String,
    hash_spec: String,
    /// Start of the encrypted payload, in sectors (unused inside qcow2, which maps data itself).
    pub payload_offset_sector: u32,
    /// Bytes of the master key.
    pub master_key_len: u32,
    master_key_digest: [u8; DIGEST_LEN],
    master_key_salt: [u8; SALT_LEN],
    /// PBKDF2 iterations for the master key digest.
    pub master_key_iterations: u32,
    /// The volume's UUID as text.
    pub uuid: String,
    /// The key slots.
    pub slots: Vec<KeySlot>,
    /// The payload cipher.
    pub cipher_alg: CipherAlg,
    /// Its mode.
    pub cipher_mode: CipherMode,
    /// How IVs are made.
    pub ivgen_alg: IvGenAlg,
    /// The hash keying ESSIV, when the header names one.
    pub ivgen_hash: Option<HashAlg>,
    /// The hash of PBKDF2 and the splitter.
    pub hash_alg: HashAlg,
}

/// What a new LUKS header uses; the defaults are QEMU's (aes-256, xts, plain64, sha256, 2 s).
#[derive(Debug, Clone)]
pub struct LuksParams {
    /// `cipher-alg`
    pub cipher_alg: CipherAlg,
    /// `cipher-mode`
    pub cipher_mode: CipherMode,
    /// `ivgen-alg`
    pub ivgen_alg: IvGenAlg,
    /// `ivgen-hash-alg` (ESSIV's hash; sha256 when ESSIV is asked for without one)
    pub ivgen_hash: Option<HashAlg>,
    /// `hash-alg`
    pub hash_alg: HashAlg,
    /// `iter-time`: milliseconds of PBKDF2 for the password.
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }
}

/// A key slot change, as `qemu-img amend -o encrypt.state=...` asks for it.
#[derive(Debug, Clone, Default)]
pub struct KeyslotChange {
    /// `state=active` (add a key) or `state=inactive` (erase keys).
    pub activate: bool,
    /// `keyslot`: the slot to fill or erase.
    pub keyslot: Option<i64>,
    /// `new-secret`: the password to add.
    pub new_secret: Option<Secret>,
    /// `old-secret`: erase the slots this password opens.
    pub old_secret: Option<Secret>,
    /// `secret`: the password that unlocks the master key for adding (default: the one the
    /// image was opened with).
    pub secret: Option<Secret>,
    /// `iter-time` for the new slot.
    pub iter_time_ms: Option<u64>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The text of a NUL-terminated field, or `None` without a NUL.
fn c_string(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&field[..end]).into_owned())
}

fn put_c_string(out: &mut [u8], s: &str) {
    let n = s.len().min(out.len() - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Luks {
    /// Reads and checks the header at the start of `area`.
    pub fn load(area: &dyn HeaderArea) -> Result<Luks, CryptoError> {
        let mut raw = [0u8; HEADER_LEN];
        area.read(0, &mut raw)?;
        Self::decode(&raw)
    }

    /// Decodes and checks a header as QEMU checks it, then the algorithms it names.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Luks, CryptoError> {
        let invalid = |m: String| Err(CryptoError::Invalid(m));
        if b[0..6] != MAGIC {
            return invalid("Volume is not in LUKS format".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return invalid(format!("LUKS version {version} is not supported"));
        }
        let Some(cipher_name) = c_string(&b[8..40]) else {
            return invalid("LUKS header cipher name is not NUL terminated".into());
        };
        let Some(cipher_mode_spec) = c_string(&b[40..72]) else {
            return invalid("LUKS header cipher mode is not NUL terminated".into());
        };
        let Some(hash_spec) = c_string(&b[72..104]) else {
            return invalid("LUKS header hash spec is not NUL terminated".into());
        };
        let payload_offset_sector = be32(b, 104);
        let master_key_len = be32(b, 108);
        let master_key_iterations = be32(b, 164);
        let slots: Vec<KeySlot> = (0..NUM_SLOTS)
            .map(|i| {
                let s = &b[208 + i * 48..208 + (i + 1) * 48];
                KeySlot {
                    active: be32(s, 0) == SLOT_ENABLED,
                    iterations: be32(s, 4),
                    salt: s[8..40].try_into().expect("32 bytes"),
                    key_offset_sector: be32(s, 40),
                    stripes: be32(s, 44),
                }
            })
            .collect();
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        if (payload_offset_sector as u64) < header_sectors {
            return invalid("LUKS payload is overlapping with the header".into());
        }
        if master_key_iterations == 0 {
            return invalid("LUKS key iteration count is zero".into());
        }
        let (cipher_mode, ivgen_alg, ivgen_hash) = parse_mode_spec(&cipher_mode_spec)?;
        let key_bytes = if cipher_mode == CipherMode::Xts {
            master_key_len / 2
        } else {
            master_key_len
        };
        let cipher_alg = (cipher_name == "aes")
            .then(|| CipherAlg::aes_with_key_len(key_bytes as usize))
            .flatten()
            .ok_or_else(|| {
                CryptoError::Unsupported(format!(
                    "Algorithm '{cipher_name}' with key size {key_bytes} bytes not supported"
                ))
            })?;
        if cipher_mode == CipherMode::Xts && master_key_len % 2 != 0 {
            return Err(CryptoError::Unsupported(format!(
                "Algorithm '{cipher_name}' with key size {master_key_len} bytes not supported"
            )));
        }
        let hash_alg = HashAlg::from_name(&hash_spec).ok_or_else(|| {
            CryptoError::Unsupported(format!("Hash algorithm '{hash_spec}' not supported"))
        })?;
        let split_sectors = split_key_sectors(master_key_len, header_sectors);
        for (i, s) in slots.iter().enumerate() {
            let raw_state = be32(&b[208 + i * 48..], 0);
            if s.stripes != STRIPES {
                return invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes
                ));
            }
            if raw_state != SLOT_ENABLED && raw_state != SLOT_DISABLED {
                return invalid(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            if s.active && s.iterations == 0 {
                return invalid(format!("Keyslot {i} iteration count is zero"));
            }
            let start = s.key_offset_sector as u64;
            if start < header_sectors {
                return invalid(format!("Keyslot {i} is overlapping with the LUKS header"));
            }
            if start + split_sectors > payload_offset_sector as u64 {
                return invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for (j, t) in slots.iter().enumerate().skip(i + 1) {
                let other = t.key_offset_sector as u64;
                if start < other + split_sectors && other < start + split_sectors {
                    return invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        if ivgen_alg == IvGenAlg::Essiv {
            let hash = ivgen_hash.ok_or_else(|| {
                CryptoError::Invalid("Missing IV generator hash specification".into())
            })?;
            essiv_cipher(cipher_alg, hash)?;
        }
        Ok(Luks {
            cipher_name,
            cipher_mode_spec,
            hash_spec,
            payload_offset_sector,
            master_key_len,
            master_key_digest: b[112..132].try_into().expect("20 bytes"),
            master_key_salt: b[132..164].try_into().expect("32 bytes"),
            master_key_iterations,
            uuid: c_string(&b[168..208])
                .unwrap_or_else(|| String::from_utf8_lossy(&b[168..208]).into_owned()),
            slots,
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash,
            hash_alg,
        })
    }

    /// The header's 592 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_c_string(&mut b[8..40], &self.cipher_name);
        put_c_string(&mut b[40..72], &self.cipher_mode_spec);
        put_c_string(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.master_key_len.to_be_bytes());
        b[112..132].copy_from_slice(&self.master_key_digest);
        b[132..164].copy_from_slice(&self.master_key_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        put_c_string(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The payload cipher for a master key this header unlocked.
    pub fn payload_cipher(&self, master: &[u8]) -> Result<SectorCipher, CryptoError> {
        SectorCipher::new(
            self.cipher_alg,
            self.cipher_mode,
            self.ivgen_alg,
            self.ivgen_hash,
            master,
        )
    }

    /// Bytes from the start of the area to the payload: what the area must hold.
    pub fn area_len(&self) -> u64 {
        self.payload_offset_sector as u64 * SECTOR_SIZE
    }

    /// The master key from the first active slot `password` opens.
    pub fn unlock(
        &self,
        area: &dyn HeaderArea,
        password: &Secret,
    ) -> Result<MasterKey, CryptoError> {
        for i in 0..NUM_SLOTS {
            if let Some(key) = self.try_slot(area, i, password)? {
                return Ok(key);
            }
        }
        Err(CryptoError::WrongPassword)
    }

    /// The cipher a key slot's material is encrypted with: the payload's algorithm, keyed by
    /// PBKDF2 of `password` over the slot's salt and iterations.
    fn slot_cipher(
        &self,
        password: &Secret,
        salt: &[u8],
        iterations: u32,
    ) -> Result<SectorCipher, CryptoError> {
        let mut slot_key = Zeroizing::new(vec![0u8; self.master_key_len as usize]);
        self.hash_alg
            .pbkdf2(password.bytes(), salt, iterations, &mut slot_key);
        SectorCipher::new(
            self.cipher_alg,
            self.cipher_mode,
            self.ivgen_alg,
            self.ivgen_hash,
            &slot_key,
        )
    }

    /// The master key from slot `index` when it is active and `password` opens it.
    fn try_slot(
        &self,
        area: &dyn HeaderArea,
        index: usize,
        password: &Secret,
    ) -> Result<Option<MasterKey>, CryptoError> {
        let slot = &self.slots[index];
        if !slot.active {
            return Ok(None);
        }
        let n = self.master_key_len as usize;
        let mut split = Zeroizing::new(vec![0u8; n * STRIPES as usize]);
        area.read(slot.key_offset_sector as u64 * SECTOR_SIZE, &mut split)?;
        let cipher = self.slot_cipher(password, &slot.salt, slot.iterations)?;
        cipher.decrypt(0, &mut split);
        let mut master = Zeroizing::new(vec![0u8; n]);
        afsplit::merge(self.hash_alg, &split, STRIPES as usize, &mut master);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash_alg.pbkdf2(
            &master,
            &self.master_key_salt,
            self.master_key_iterations,
            &mut digest,
        );
        Ok((digest == self.master_key_digest).then_some(master))
    }

    /// A new header for `params` with a fresh master key (returned with it): no slot active
    /// yet; [`Luks::store_key`] fills slot 0 once the area exists.
    pub fn create(params: &LuksParams) -> Result<(Luks, MasterKey), CryptoError> {
        let ivgen_hash = match (params.ivgen_alg, params.ivgen_hash) {
            (IvGenAlg::Essiv, None) => Some(HashAlg::Sha256),
            (_, h) => h,
        };
        if params.ivgen_alg == IvGenAlg::Essiv {
            essiv_cipher(params.cipher_alg, ivgen_hash.unwrap_or(HashAlg::Sha256))?;
        }
        let mut mode_spec = format!("{}-{}", params.cipher_mode.name(), params.ivgen_alg.name());
        if let Some(h) = ivgen_hash {
            mode_spec = format!("{mode_spec}:{}", h.name());
        }
        let master_key_len = params.cipher_alg.key_len()
            * if params.cipher_mode == CipherMode::Xts {
                2
            } else {
                1
            };
        let mut master_key_salt = [0u8; SALT_LEN];
        random_bytes(&mut master_key_salt)?;
        let mut master = Zeroizing::new(vec![0u8; master_key_len]);
        random_bytes(&mut master)?;
        // The payload cipher must accept the key before anything is written.
        SectorCipher::new(
            params.cipher_alg,
            params.cipher_mode,
            params.ivgen_alg,
            ivgen_hash,
            &master,
        )?;
        let rate = params
            .hash_alg
            .iterations_per_second(&master, &master_key_salt, DIGEST_LEN);
        // As cryptsetup: an eighth of the time, so eight slots together take the time asked.
        let iterations = scaled_iterations(rate, params.iter_time_ms)? / 8;
        let master_key_iterations = iterations.max(MIN_ITERATIONS) as u32;
        let mut master_key_digest = [0u8; DIGEST_LEN];
        params.hash_alg.pbkdf2(
            &master,
            &master_key_salt,
            master_key_iterations,
            &mut master_key_digest,
        );
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        let split_sectors = split_key_sectors(master_key_len as u32, header_sectors);
        let slots = (0..NUM_SLOTS as u64)
            .map(|i| KeySlot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset_sector: (header_sectors + i * split_sectors) as u32,
                stripes: STRIPES,
            })
            .collect();
        let luks = Luks {
            cipher_name: "aes".into(),
            cipher_mode_spec: mode_spec,
            hash_spec: params.hash_alg.name().into(),
            payload_offset_sector: (header_sectors + NUM_SLOTS as u64 * split_sectors) as u32,
            master_key_len: master_key_len as u32,
            master_key_digest,
            master_key_salt,
            master_key_iterations,
            uuid: random_uuid()?,
            slots,
            cipher_alg: params.cipher_alg,
            cipher_mode: params.cipher_mode,
            ivgen_alg: params.ivgen_alg,
            ivgen_hash,
            hash_alg: params.hash_alg,
        };
        Ok((luks, master))
    }

    /// Seals `master` into slot `index` under `password` (iterations for `iter_time_ms`), then
    /// writes the slot's material and the header.
    pub fn store_key(
        &mut self,
        area: &dyn HeaderArea,
        index: usize,
        password: &Secret,
        master: &[u8],
        iter_time_ms: u64,
    ) -> Result<(), CryptoError> {
        let n = self.master_key_len as usize;
        let mut salt = [0u8; SALT_LEN];
        random_bytes(&mut salt)?;
        let rate = self
            .hash_alg
            .iterations_per_second(password.bytes(), &salt, n);
        let iterations = scaled_iterations(rate, iter_time_ms)?.max(MIN_ITERATIONS) as u32;
        let cipher = self.slot_cipher(password, &salt, iterations)?;
        let mut split = Zeroizing::new(vec![0u8; n * STRIPES as usize]);
        afsplit::split(self.hash_alg, master, STRIPES as usize, &mut split)?;
        cipher.encrypt(0, &mut split);
        let slot = &mut self.slots[index];
        area.write(slot.key_offset_sector as u64 * SECTOR_SIZE, &split)?;
        slot.salt = salt;
        slot.iterations = iterations;
        slot.stripes = STRIPES;
        slot.active = true;
        area.write(0, &self.encode())
    }

    /// Disables slot `index` in the header, then overwrites its material with random bytes.
    fn erase_key(&mut self, area: &dyn HeaderArea, index: usize) -> Result<(), CryptoError> {
        let slot = &mut self.slots[index];
        slot.salt = [0; SALT_LEN];
        slot.iterations = 0;
        slot.active = false;
        let at = slot.key_offset_sector as u64 * SECTOR_SIZE;
        let header = area.write(0, &self.encode());
        let mut garbage =
            Zeroizing::new(vec![0u8; self.master_key_len as usize * STRIPES as usize]);
        for _ in 0..ERASE_PASSES {
            random_bytes(&mut garbage)?;
            area.write(at, &garbage)?;
        }
        header
    }

    fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }

    /// Adds or erases keys as `qemu-img amend` does, with its checks and messages.
    /// `opened_with` is the password the image was opened with.
    pub fn change_keyslots(
        &mut self,
        area: &dyn HeaderArea,
        change: &KeyslotChange,
        opened_with: Option<&Secret>,
        force: bool,
    ) -> Result<(), CryptoError> {
        let refuse = |m: String| Err(CryptoError::Refused(m));
        let last = NUM_SLOTS - 1;
        let slot_index = |k: i64| -> Result<usize, CryptoError> {
            usize::try_from(k)
                .ok()
                .filter(|&k| k < NUM_SLOTS)
                .ok_or_else(|| {
                    CryptoError::Refused(format!(
                        "Invalid keyslot {k} specified, must be between 0 and {last}"
                    ))
                })
        };
        if change.activate {
            let Some(new) = &change.new_secret else {
                return refuse("'new-secret' is required to activate a keyslot".into());
            };
            if change.old_secret.is_some() {
                return refuse("'old-secret' must not be given when activating keyslots".into());
            }
            let index = match change.keyslot {
                Some(k) => slot_index(k)?,
                None => match self.slots.iter().position(|s| !s.active) {
                    Some(i) => i,
                    None => return refuse("Can't add a keyslot - all keyslots are in use".into()),
                },
            };
            if !force && self.slots[index].active {
                return refuse(format!(
                    "Refusing to overwrite active keyslot {index} - please erase it first"
                ));
            }
            let unlock = change
                .secret
                .as_ref()
                .or(opened_with)
                .ok_or(CryptoError::MissingSecret)?;
            let master = self.unlock(area, unlock)?;
            let iter_time = change.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS);
            return self.store_key(area, index, new, &master, iter_time);
        }
        if change.new_secret.is_some() {
            return refuse("'new-secret' must not be given when erasing keyslots".into());
        }
        if change.iter_time_ms.is_some() {
            return refuse("'iter-time' must not be given when erasing keyslots".into());
        }
        if change.secret.is_some() {
            return refuse("'secret' must not be given when erasing keyslots".into());
        }
        if let Some(k) = change.keyslot {
            let index = slot_index(k)?;
            if let Some(old) = &change.old_secret {
                if self.try_slot(area, index, old)?.is_none() {
                    return refuse(format!(
                        "Given keyslot {index} doesn't contain the given old password for erase operation"
                    ));
                }
            }
            if !force && !self.slots[index].active {
                return refuse(format!(
                    "Given keyslot {index} is already erased (inactive) "
                ));
            }
            if !force && self.active_count() == 1 {
                return refuse(format!(
                    "Attempt to erase the only active keyslot {index} which will erase all the \
                     data in the image irreversibly - refusing operation"
                ));
            }
            return self.erase_key(area, index);
        }
        let Some(old) = &change.old_secret else {
            return refuse(
                "To erase keyslot(s), either explicit keyslot index or the password currently \
                 contained in them must be given"
                    .into(),
            );
        };
        let mut matching = Vec::new();
        for i in 0..NUM_SLOTS {
            if self.try_slot(area, i, old)?.is_some() {
                matching.push(i);
            }
        }
        if matching.is_empty() {
            return refuse("No keyslots match given (old) password for erase operation".into());
        }
        if !force && matching.len() == self.active_count() {
            return refuse(
                "All the active keyslots match the (old) password that was given and erasing \
                 them will erase all the data in the image irreversibly - refusing operation"
                    .into(),
            );
        }
        for i in matching {
            self.erase_key(area, i)?;
        }
        Ok(())
    }
}

/// `<mode>-<ivgen>[:<hash>]`, as the header's cipher mode field spells it.
fn parse_mode_spec(spec: &str) -> Result<(CipherMode, IvGenAlg, Option<HashAlg>), CryptoError> {
    let Some((mode, rest)) = spec.split_once('-') else {
        return Err(CryptoError::Invalid(format!(
            "Unexpected cipher mode string format '{spec}'"
        )));
    };
    let (ivgen, hash) = match rest.split_once(':') {
        Some((i, h)) => (i, Some(h)),
        None => (rest, None),
    };
    let hash = hash
        .map(|h| {
            HashAlg::from_name(h).ok_or_else(|| {
                CryptoError::Unsupported(format!("Hash algorithm '{h}' not supported"))
            })
        })
        .transpose()?;
    let mode = CipherMode::from_name(mode)
        .ok_or_else(|| CryptoError::Unsupported(format!("Cipher mode '{mode}' not supported")))?;
    let ivgen = IvGenAlg::from_name(ivgen)
        .ok_or_else(|| CryptoError::Unsupported(format!("IV generator '{ivgen}' not supported")))?;
    Ok((mode, ivgen, hash))
}

/// Sectors of one slot's key material: the split key rounded up to sectors, then to the
/// header's 4 KiB (cryptsetup's layout, which QEMU follows).
fn split_key_sectors(master_key_len: u32, header_sectors: u64) -> u64 {
    let bytes = master_key_len as u64 * STRIPES as u64;
    bytes.div_ceil(SECTOR_SIZE).next_multiple_of(header_sectors)
}

/// Iterations for `ms` milliseconds at `rate` per second, within the header's 32 bits.
fn scaled_iterations(rate: u64, ms: u64) -> Result<u64, CryptoError> {
    let n = rate.checked_mul(ms).ok_or_else(|| {
        CryptoError::Invalid(format!("PBKDF iterations {rate} too large to scale"))
    })? / 1000;
    if n > u32::MAX as u64 {
        return Err(CryptoError::Invalid(format!(
            "PBKDF iterations {n} larger than {}",
            u32::MAX
        )));
    }
    Ok(n)
}

fn random_uuid() -> Result<String, CryptoError> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

const _: () = assert!(UUID_LEN == 208 - 168);

#[cfg(test)]
mod tests {
    use super::*;

    /// A header area in memory.
    struct Memory(std::sync::Mutex<Vec<u8>>);

    impl HeaderArea for Memory {
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
            let m = self.0.lock().unwrap();
            let at = offset as usize;
            let src = m
                .get(at..at + buf.len())
                .ok_or_else(|| CryptoError::Invalid("outside".into()))?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write(&self, offset: u64, buf: &[u8]) -> Result<(), CryptoError> {
            let mut m = self.0.lock().unwrap();
            let at = offset as usize;
            m.get_mut(at..at + buf.len())
                .ok_or_else(|| CryptoError::Invalid("outside".into()))?
                .copy_from_slice(buf);
            Ok(())
        }
    }

    fn new_volume(password: &Secret) -> (Memory, Luks) {
        let params = LuksParams {
            iter_time_ms: 1,
            ..LuksParams::default()
        };
        let (mut luks, master) = Luks::create(&params).unwrap();
        let area = Memory(std::sync::Mutex::new(vec![0; luks.area_len() as usize]));
        luks.store_key(&area, 0, password, &master, 1).unwrap();
        (area, luks)
    }

    #[test]
    fn a_new_header_decodes_to_itself_and_unlocks_with_its_password_only() {
        let pw = Secret::new("pw");
        let (area, luks) = new_volume(&pw);
        assert_eq!(luks.area_len(), 2068480);
        let loaded = Luks::load(&area).unwrap();
        assert_eq!(loaded, luks);
        assert!(loaded.unlock(&area, &pw).is_ok());
        assert!(matches!(
            loaded.unlock(&area, &Secret::new("other")),
            Err(CryptoError::WrongPassword)
        ));
    }

    #[test]
    fn damaged_headers_decode_to_errors_never_panics() {
        let (_, luks) = new_volume(&Secret::new("pw"));
        let good = luks.encode();
        for at in 0..HEADER_LEN {
            for value in [0u8, 1, 0x7f, 0xff] {
                let mut b = good;
                b[at] = value;
                if let Ok(l) = Luks::decode(&b) {
                    // Whatever decodes has a key length the ciphers accept.
                    assert!(l.master_key_len <= 64);
                }
            }
        }
    }
}
