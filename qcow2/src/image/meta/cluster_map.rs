//! Hash maps and sets keyed by host offset: the L2 table cache, the refblock cache and the set of
//! refblock offsets the overlap guard asks about on every write. Keys are distinct aligned
//! integers, so one multiplication hashes them well, for a fraction of SipHash's cost per lookup.

use std::collections::{HashMap, HashSet};

/// Hashes host offsets with one multiplication (see the module docs).
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
