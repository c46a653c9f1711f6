//! Compressed writes of whole clusters. Compressed data is packed byte-wise: it continues in the
//! last cluster used for compressed data and spills into the next cluster when that one is free,
//! so several compressed clusters share host clusters (each adds one to the refcount of every host
//! cluster it touches). Data that does not compress is written as a normal cluster.

use crate::error::{Error, Result};
use crate::format::table::COMPRESSED;
use crate::format::CompressedDescriptor;
use crate::image::{Image, Meta};

/// Whole clusters compressed ahead of their write ([`Image::compress_clusters`]), so the
/// compression runs on any thread while the writes that allocate host space keep their order.
#[derive(Debug)]
pub struct CompressedClusters {
    offset: u64,
    len: usize,
    /// Per cluster, the compressed bytes, or `None` where the data does not compress (it is
    /// written as a normal cluster).
    clusters: Vec<Option<Vec<u8>>>,
}

impl CompressedClusters {
    /// Guest offset of the first cluster.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Image {
    /// Writes whole clusters compressed, starting at a cluster boundary. The last cluster of the
    /// disk may be partial.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let clusters = self.compress_clusters(buf, offset)?;
        self.write_compressed_clusters(&clusters, buf)
    }

    /// Compresses whole clusters of `buf` (for `offset`, as [`write_compressed`] takes them)
    /// without writing anything: takes no image lock, so threads compress in parallel.
    ///
    /// [`write_compressed`]: Image::write_compressed
    pub fn compress_clusters(&self, buf: &[u8], offset: u64) -> Result<CompressedClusters> {
        self.require_writable()?;
        if self.encryption.is_some() {
            // Compressed clusters are stored as they are: they would hold the data in clear.
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "Compression is not supported with encryption".into(),
            });
        }
        let cs = self.cluster_size();
        let size = self.size();
        self.check_bounds(offset, buf.len() as u64, size)?;
        let end = offset + buf.len() as u64;
        if offset % cs != 0 || (end % cs != 0 && end != size) {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: format!("compressed writes must cover whole clusters ({cs} bytes)"),
            });
        }
        let kind = {
            let m = self.meta();
            if m.header.has_external_data_file() {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: "compressed clusters are not possible with an external data file"
                        .into(),
                });
            }
            m.header.compression_type
        };
        let mut partial = Vec::new();
        let clusters = buf
            .chunks(cs as usize)
            .map(|chunk| {
                let cluster = if chunk.len() == cs as usize {
                    chunk
                } else {
                    // The disk's last cluster, zero-padded to a whole one.
                    partial.resize(cs as usize, 0);
                    partial[..chunk.len()].copy_from_slice(chunk);
                    &partial[..]
                };
                crate::image::codec::compress(kind, cluster, cs as usize - 1)
            })
            .collect();
        Ok(CompressedClusters {
            offset,
            len: buf.len(),
            clusters,
        })
    }

    /// Writes clusters [`compress_clusters`] prepared from `buf`: compressed where they
    /// compress, `buf`'s bytes where they do not. Host space is allocated here, in call order.
    ///
    /// [`compress_clusters`]: Image::compress_clusters
    pub fn write_compressed_clusters(
        &self,
        clusters: &CompressedClusters,
        buf: &[u8],
    ) -> Result<()> {
        if buf.len() != clusters.len {
            return Err(Error::InvalidArgument {
                image: self.name.clone(),
                reason: "the buffer is not the one the clusters were compressed from".into(),
            });
        }
        let cs = self.cluster_size();
        for (i, (chunk, compressed)) in buf.chunks(cs as usize).zip(&clusters.clusters).enumerate()
        {
            let guest = clusters.offset + i as u64 * cs;
            match compressed {
                Some(data) => {
                    // Admitted per cluster, as `write_at` admits the other branch.
                    let _pass = self.write_pass()?;
                    let mut m = self.meta_mut();
                    self.write_one_compressed(&mut m, guest, data)?;
                }
                None => self.write_at(chunk, guest)?,
            }
        }
        Ok(())
    }

    fn write_one_compressed(&self, m: &mut Meta, guest: u64, data: &[u8]) -> Result<()> {
        let cs = m.header.cluster_size();
        self.bitmaps_mark(m, guest, cs.min(m.header.size - guest))?;
        self.mark_dirty(m)?;
        // The L2 table comes first, as in QEMU, so the compressed data follows it in the file.
        self.ensure_l2(m, guest)?;
        let host_offset = self.alloc_bytes(m, data.len() as u64)?;
        self.guard(m, host_offset, data.len() as u64, None)?;
        self.host().write(data, host_offset, "compressed data")?;
        m.ws_mut()?.l2_after_data_sync = true;
        let descriptor =
            CompressedDescriptor::encode(host_offset, data.len() as u64, m.header.cluster_bits);
        self.link_cluster(m, guest, descriptor | COMPRESSED, 0)?;
        Ok(())
    }

    /// Finds room for `len` bytes of compressed data (less than one cluster) and counts the
    /// reference: the partly used cluster first, spilling into the next cluster when that is the
    /// one allocated, else a fresh cluster.
    fn alloc_bytes(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = m.header.cluster_size();
        debug_assert!(len < cs);
        // A cluster whose refcount is already at the maximum takes no more compressed data.
        let host = self.host();
        let cursor = match m.ws()?.refcounts.compressed_cursor.filter(|c| c % cs != 0) {
            Some(cur) => {
                let rc = &mut m.ws_mut()?.refcounts;
                (rc.get(host, cur / cs)? < rc.max()).then_some(cur)
            }
            None => None,
        };
        let start = match cursor {
            Some(cur) if cur + len <= cur.next_multiple_of(cs) => {
                m.ws_mut()?.refcounts.adjust(host, cur, 1, 1)?;
                cur
            }
            Some(cur) => {
                let next = self.alloc_for(m, 1, "compressed cluster")?;
                if next == cur.next_multiple_of(cs) {
                    // Contiguous: the data starts in the old cluster and spills into the new one.
                    m.ws_mut()?.refcounts.adjust(host, cur, 1, 1)?;
                    cur
                } else {
                    next
                }
            }
            None => self.alloc_for(m, 1, "compressed cluster")?,
        };
        m.ws_mut()?.refcounts.compressed_cursor = Some(start + len);
        Ok(start)
    }
}
