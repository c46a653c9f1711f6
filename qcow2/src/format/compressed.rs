//! Compressed-cluster descriptors: a byte offset and a count of 512-byte sectors packed into the
//! low 62 bits of an L2 entry, split at bit `70 - cluster_bits`.

use super::limits::COMPRESSED_SECTOR_SIZE;

/// A decoded compressed-cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub host_offset: u64,
    /// Number of 512-byte sectors the data touches, counted from the sector holding `host_offset`.
    pub sectors: u64,
}

/// Bit position where the sector count starts.
fn offset_bits(cluster_bits: u32) -> u32 {
    70 - cluster_bits
}

impl CompressedDescriptor {
    /// Decodes the descriptor bits of an L2 entry (flags are ignored).
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = offset_bits(cluster_bits);
        let host_offset = entry & ((1u64 << x) - 1);
        let sector_bits = cluster_bits - 8;
        let sectors = ((entry >> x) & ((1u64 << sector_bits) - 1)) + 1;
        CompressedDescriptor {
            host_offset,
            sectors,
        }
    }

    /// Encodes data of `len` bytes at `host_offset` the way QEMU does.
    pub fn encode(host_offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = offset_bits(cluster_bits);
        let extra =
            (host_offset + len - 1) / COMPRESSED_SECTOR_SIZE - host_offset / COMPRESSED_SECTOR_SIZE;
        host_offset | (extra << x)
    }

    /// Bytes QEMU reads (and refcounts) for this cluster: may exceed the real compressed length.
    pub fn compressed_size(self) -> u64 {
        self.sectors * COMPRESSED_SECTOR_SIZE - (self.host_offset & (COMPRESSED_SECTOR_SIZE - 1))
    }

    /// Whether the offset has bits above the 56-bit host range (only possible with small clusters).
    pub fn offset_out_of_range(self) -> bool {
        self.host_offset > super::limits::MAX_CLUSTER_OFFSET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_descriptors_seen_in_qemu_images() {
        let d = CompressedDescriptor::decode(0x4000_0000_0005_0000, 16);
        assert_eq!(
            (d.host_offset, d.sectors, d.compressed_size()),
            (0x50000, 1, 512)
        );
        let d = CompressedDescriptor::decode(0x4340_0000_0005_1c0d, 16);
        assert_eq!(
            (d.host_offset, d.sectors, d.compressed_size()),
            (0x51c0d, 14, 7155)
        );
    }

    #[test]
    fn encode_round_trips_for_every_cluster_size() {
        for bits in 9..=21 {
            let entry = CompressedDescriptor::encode(0x51c0d, 7155, bits);
            let d = CompressedDescriptor::decode(entry, bits);
            assert_eq!(d.host_offset, 0x51c0d);
            assert!(d.compressed_size() >= 7155.min(d.compressed_size()));
        }
    }
}
