//! The write-zeroes alignment of a blkdebug node over the image (`opt-write-zero`): QEMU's block
//! layer splits a zero write at that alignment, and blkdebug refuses the pieces smaller than it,
//! so those pieces fall back to writing zeros as data. qemu-io's `write -z` through such a node
//! leaves data clusters at the unaligned head and tail, which iotest 204's map shows.

use crate::io::open::Options;

/// How a zero write through the node reaches the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroLimits {
    /// Pieces of a zero write smaller than this (at its unaligned head and tail) are written
    /// as zeros.
    align: u64,
}

impl ZeroLimits {
    /// The limits a top-level blkdebug node's options set, if they set any.
    pub fn from_options(o: &Options) -> Result<Option<ZeroLimits>, String> {
        if o.get("driver").is_none_or(|d| d != "blkdebug") {
            return Ok(None);
        }
        let Some(opt) = o.get("opt-write-zero") else {
            return Ok(None);
        };
        let opt = crate::size::parse_size(opt)
            .map_err(|_| format!("Parameter 'opt-write-zero' expects a size, not '{opt}'"))?;
        let request = match o.get("align") {
            Some(a) => crate::size::parse_size(a)
                .map_err(|_| format!("Parameter 'align' expects a size, not '{a}'"))?,
            None => 1,
        };
        let align = opt.max(request);
        Ok((align > 1).then_some(ZeroLimits { align }))
    }

    /// The pieces of a zero write of `len` bytes at `offset`: `(offset, len, as_data)`, where
    /// `as_data` pieces are written as zeros and the others as a zero write.
    pub fn pieces(self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset.saturating_add(len);
        let head_end = offset.next_multiple_of(self.align).min(end);
        let tail_start = (end - end % self.align).max(head_end);
        [
            (offset, head_end - offset, true),
            (head_end, tail_start - head_end, false),
            (tail_start, end - tail_start, true),
        ]
        .into_iter()
        .filter(|&(_, l, _)| l > 0)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pairs: &[(&str, &str)]) -> Option<ZeroLimits> {
        let o: Options = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ZeroLimits::from_options(&o).unwrap()
    }

    #[test]
    fn unaligned_head_and_tail_become_data() {
        const M: u64 = 1 << 20;
        let l = limits(&[("driver", "blkdebug"), ("opt-write-zero", "15M")]).unwrap();
        // iotest 204: 32M..64M splits at 45M and 60M.
        assert_eq!(
            l.pieces(32 * M, 32 * M),
            vec![
                (32 * M, 13 * M, true),
                (45 * M, 15 * M, false),
                (60 * M, 4 * M, true)
            ]
        );
        // Within one aligned unit: all data.
        assert_eq!(l.pieces(M, M), vec![(M, M, true)]);
        assert_eq!(l.pieces(0, 15 * M), vec![(0, 15 * M, false)]);
    }

    #[test]
    fn only_blkdebug_with_opt_write_zero_sets_limits() {
        assert_eq!(
            limits(&[("driver", "qcow2"), ("opt-write-zero", "1M")]),
            None
        );
        assert_eq!(limits(&[("driver", "blkdebug"), ("align", "4k")]), None);
        let o: Options = [("driver", "blkdebug"), ("opt-write-zero", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(ZeroLimits::from_options(&o).is_err());
    }
}
