//! Compressed writes of whole clusters. Compressed data is packed byte-wise: it continues in the
//! last cluster used for compressed data and spills into the next cluster when that one is free,
//! so several compressed clusters share host clusters (each adds one to the refcount of every host
//! cluster it touches). Data that does not compress is written as a normal cluster.

use crate::error::{Error, Result};
use crate::format::table::COMPRESSED;
use crate::format::CompressedDescriptor;
use crate::image::{Image, Meta};

impl Image {
    /// Writes whole clusters compressed, starting at a cluster boundary. The last cluster of the
    /// disk may be partial.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.require_writable()?;
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
        {
            let m = self.meta();
            if m.header.has_external_data_file() {
                return Err(Error::InvalidArgument {
                    image: self.name.clone(),
                    reason: "compressed clusters are not possible with an external data file"
                        .into(),
                });
            }
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let guest = offset + i as u64 * cs;
            let mut cluster = vec![0u8; cs as usize];
            cluster[..chunk.len()].copy_from_slice(chunk);
            let kind = self.meta().header.compression_type;
            match crate::image::codec::compress(kind, &cluster, cs as usize - 1) {
                Some(data) => {
                    // Admitted per cluster, as `write_at` admits the other branch.
                    let _pass = self.write_pass()?;
                    let mut m = self.meta_mut();
                    self.write_one_compressed(&mut m, guest, &data)?;
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
        self.l2_needs_refblocks(m)?;
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
                let next = self.alloc(m, 1)?;
                if next == cur.next_multiple_of(cs) {
                    // Contiguous: the data starts in the old cluster and spills into the new one.
                    m.ws_mut()?.refcounts.adjust(host, cur, 1, 1)?;
                    cur
                } else {
                    next
                }
            }
            None => self.alloc(m, 1)?,
        };
        m.ws_mut()?.refcounts.compressed_cursor = Some(start + len);
        Ok(start)
    }
}
