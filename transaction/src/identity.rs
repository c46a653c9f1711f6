//! The group's identity: a random secret in `group.id`, made when the group is first opened.
//! Every transaction id is bound to it (an 8-byte nonce and a SipHash-2-4 tag of the nonce keyed
//! by the secret), so recovery acts only on a journal this group wrote: a CRC-valid journal
//! written by anyone else, or copied from another group, is refused before it can make recovery
//! rename or delete anything.

use std::path::Path;

use crate::error::TxnError;
use crate::fs::GroupFs;

/// The file holding the secret, in the group directory.
pub const FILE: &str = "group.id";
/// Where a new identity is written before it is renamed into place.
pub const TEMP_FILE: &str = "group.id.tmp";
const HEADER: &str = "qcow2-group-id 1 ";

/// A group's secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GroupId(pub [u8; 16]);

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupId(..)")
    }
}

impl GroupId {
    /// Reads the group's secret, making it first when the group has none yet.
    pub(crate) fn load_or_create(fs: &dyn GroupFs, dir: &Path) -> Result<GroupId, TxnError> {
        let path = dir.join(FILE);
        match fs.read(&path) {
            Ok(bytes) => Self::decode(&bytes).ok_or_else(|| TxnError::Invalid {
                image: path.clone(),
                reason: "is not a group identity file; it was changed by someone else".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Written aside and renamed into place: a power cut leaves no half identity.
                let id = GroupId(fs.new_group_secret());
                let tmp = dir.join(TEMP_FILE);
                fs.write_synced(&tmp, id.encode().as_bytes())
                    .map_err(|e| TxnError::io(&tmp, e))?;
                fs.rename(&tmp, &path).map_err(|e| TxnError::io(&path, e))?;
                fs.sync_dir(dir).map_err(|e| TxnError::io(dir, e))?;
                Ok(id)
            }
            Err(e) => Err(TxnError::io(&path, e)),
        }
    }

    fn encode(&self) -> String {
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{HEADER}{hex}\n")
    }

    fn decode(bytes: &[u8]) -> Option<GroupId> {
        let text = std::str::from_utf8(bytes).ok()?;
        let hex = text.strip_prefix(HEADER)?.strip_suffix('\n')?;
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(GroupId(id))
    }

    /// A transaction id bound to this group: the nonce, then its tag.
    pub fn bind(&self, nonce: [u8; 8]) -> [u8; 16] {
        let mut txn = [0u8; 16];
        txn[..8].copy_from_slice(&nonce);
        txn[8..].copy_from_slice(&siphash24(&self.0, &nonce).to_le_bytes());
        txn
    }

    /// Whether this group made the transaction id `txn`.
    pub fn made(&self, txn: &[u8; 16]) -> bool {
        let nonce: [u8; 8] = txn[..8].try_into().unwrap_or_default();
        self.bind(nonce) == *txn
    }
}

/// SipHash-2-4 of `data` under `key`: a keyed hash nobody can compute without the key.
fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let k0 = u64::from_le_bytes(key[..8].try_into().unwrap_or_default());
    let k1 = u64::from_le_bytes(key[8..].try_into().unwrap_or_default());
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let m = u64::from_le_bytes(c.try_into().unwrap_or_default());
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = data.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    round(&mut v);
    round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // The SipHash paper's key 00..0f; messages 00..(n-1).
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(&key, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(&key, &msg[..8]), 0x93f5_f579_9a93_2462);
        assert_eq!(siphash24(&key, &msg[..15]), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn ids_are_bound_to_their_group() {
        let a = GroupId([1; 16]);
        let b = GroupId([2; 16]);
        let txn = a.bind([9; 8]);
        assert!(a.made(&txn));
        assert!(!b.made(&txn));
        let mut forged = txn;
        forged[0] ^= 1;
        assert!(!a.made(&forged));
        assert_eq!(GroupId::decode(a.encode().as_bytes()), Some(a));
        assert_eq!(GroupId::decode(b"qcow2-group-id 1 zz\n"), None);
    }
}
