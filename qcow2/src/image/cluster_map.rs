//! Hash maps and sets keyed by cluster index or host offset. Keys are small distinct integers, so one
//! multiplication hashes them well; SipHash dominated the per-cluster loops of snapshot
//! operations on images with a million clusters.

use std::collections::{HashMap, HashSet};

/// Hashes cluster indexes with one multiplication: they are small distinct integers, and SipHash
/// dominated snapshot operations on images with a million clusters.
#[derive(Default, Clone, Copy)]
pub(crate) struct ClusterHasher(u64);

impl std::hash::Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        // The table picks buckets by the low bits, which a product only fills from the key's low
        // bits: host offsets are cluster aligned (16 zero bits or more), so fold the high half in.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) type ClusterMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<ClusterHasher>>;

/// A set of cluster indexes or host offsets, hashed as [`ClusterMap`] keys are.
pub(crate) type ClusterSet = HashSet<u64, std::hash::BuildHasherDefault<ClusterHasher>>;
