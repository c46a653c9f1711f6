//! The anti-forensic splitter (LUKS v1): a key becomes `stripes` blocks of which all are needed
//! to get it back, so wiping any part of a key slot destroys the key. Each step diffuses the
//! running block with the hash, in digest-sized pieces prefixed by their big-endian index.

use super::kdf::HashAlg;

fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let digest_len = hash.digest_len();
    for (i, piece) in block.chunks_mut(digest_len).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Splits `key` into `out` (`key.len() * stripes` bytes), random stripes first.
pub(crate) fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    out: &mut [u8],
) -> Result<(), super::CryptoError> {
    let n = key.len();
    let mut block = zeroize::Zeroizing::new(vec![0u8; n]);
    super::random_bytes(&mut out[..n * (stripes - 1)])?;
    for stripe in out[..n * (stripes - 1)].chunks(n) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    let last = &mut out[n * (stripes - 1)..n * stripes];
    last.copy_from_slice(key);
    xor_into(last, &block);
    Ok(())
}

/// Joins the `stripes` blocks of `input` back into `key`.
pub(crate) fn merge(hash: HashAlg, input: &[u8], stripes: usize, key: &mut [u8]) {
    let n = key.len();
    let mut block = zeroize::Zeroizing::new(vec![0u8; n]);
    for stripe in input[..n * (stripes - 1)].chunks(n) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    key.copy_from_slice(&input[n * (stripes - 1)..n * stripes]);
    xor_into(key, &block);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        let key: Vec<u8> = (0..64).collect();
        let mut split_key = vec![0u8; 64 * 4000];
        split(HashAlg::Sha256, &key, 4000, &mut split_key).unwrap();
        let mut back = vec![0u8; 64];
        merge(HashAlg::Sha256, &split_key, 4000, &mut back);
        assert_eq!(back, key);
        split_key[100] ^= 1;
        merge(HashAlg::Sha256, &split_key, 4000, &mut back);
        assert_ne!(back, key);
    }
}
