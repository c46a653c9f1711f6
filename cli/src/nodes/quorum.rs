//! QEMU's `quorum` node: several children holding the same bytes. A read asks every child and
//! returns the version at least `vote-threshold` children agree on (the largest group); a write
//! or flush succeeds when at least that many children take it. Children of different lengths
//! make the node's length an I/O error, as in QEMU. The node cannot be resized (QEMU's cannot
//! either), and `rewrite-corrupted`, `blkverify` and the `fifo` read pattern are not offered.

use std::io;

use qcow2::Storage;

/// A quorum over its children.
pub struct QuorumNode {
    children: Vec<Box<dyn Storage>>,
    threshold: usize,
}

/// The errno of a failed vote: QEMU's quorum answers EIO.
fn no_quorum() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::EIO)
}

impl QuorumNode {
    /// A quorum of `children` needing `threshold` votes, checked as QEMU checks it.
    pub fn new(children: Vec<Box<dyn Storage>>, threshold: i64) -> Result<QuorumNode, String> {
        if children.is_empty() {
            return Err("Number of provided children must be 1 or more".into());
        }
        if threshold < 1 {
            return Err("Parameter 'vote-threshold' expects a value >= 1".into());
        }
        let threshold = usize::try_from(threshold).unwrap_or(usize::MAX);
        if threshold > children.len() {
            return Err("threshold may not exceed children count".into());
        }
        Ok(QuorumNode {
            children,
            threshold,
        })
    }

    /// Runs `op` on every child; succeeds when at least the threshold did, else fails with the
    /// first child's error.
    fn on_all(&self, op: impl Fn(&dyn Storage) -> io::Result<()>) -> io::Result<()> {
        let mut first_error = None;
        let mut done = 0;
        for child in &self.children {
            match op(child.as_ref()) {
                Ok(()) => done += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if done < self.threshold => Err(e),
            _ => Ok(()),
        }
    }
}

impl Storage for QuorumNode {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut versions: Vec<(usize, Vec<u8>, usize)> = Vec::new();
        let mut first_error = None;
        let mut read = 0;
        for child in &self.children {
            let mut mine = vec![0u8; buf.len()];
            match child.read_at(&mut mine, offset) {
                Ok(n) => {
                    read += 1;
                    mine.truncate(n);
                    match versions
                        .iter_mut()
                        .find(|(len, v, _)| *len == n && *v == mine)
                    {
                        Some((_, _, votes)) => *votes += 1,
                        None => versions.push((n, mine, 1)),
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if read < self.threshold {
            return Err(first_error.unwrap_or_else(no_quorum));
        }
        // The first version with the most votes wins, as QEMU picks it.
        let mut winner: Option<&(usize, Vec<u8>, usize)> = None;
        for v in &versions {
            if winner.is_none_or(|w| v.2 > w.2) {
                winner = Some(v);
            }
        }
        match winner {
            Some((n, bytes, votes)) if *votes >= self.threshold => {
                buf[..*n].copy_from_slice(bytes);
                Ok(*n)
            }
            _ => Err(no_quorum()),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.on_all(|c| c.write_at(buf, offset))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_all(|c| c.write_zeroes(offset, len))
    }

    fn flush(&self) -> io::Result<()> {
        self.on_all(|c| c.flush())
    }

    fn len(&self) -> io::Result<u64> {
        let mut lens = self.children.iter().map(|c| c.len());
        let first = lens.next().unwrap_or(Ok(0))?;
        for len in lens {
            if len? != first {
                return Err(no_quorum());
            }
        }
        Ok(first)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(nix::libc::ENOTSUP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2::MemoryStorage;

    fn child(bytes: &[u8]) -> Box<dyn Storage> {
        let m = MemoryStorage::new();
        m.write_at(bytes, 0).unwrap();
        Box::new(m)
    }

    #[test]
    fn reads_return_what_enough_children_agree_on() {
        let q = QuorumNode::new(vec![child(&[1; 8]), child(&[2; 8]), child(&[1; 8])], 2).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(q.read_at(&mut buf, 0).unwrap(), 8);
        assert_eq!(buf, [1; 8]);
        let split = QuorumNode::new(vec![child(&[1; 8]), child(&[2; 8])], 2).unwrap();
        assert_eq!(
            split.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
            Some(nix::libc::EIO)
        );
        q.write_at(&[9; 8], 0).unwrap();
        q.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [9; 8]);
    }

    #[test]
    fn quorum_options_are_checked() {
        assert!(QuorumNode::new(vec![], 1).is_err());
        assert!(QuorumNode::new(vec![child(&[0])], 0).is_err());
        assert_eq!(
            QuorumNode::new(vec![child(&[0])], 2).err().unwrap(),
            "threshold may not exceed children count"
        );
        let uneven = QuorumNode::new(vec![child(&[0; 4]), child(&[0; 8])], 1).unwrap();
        assert!(uneven.len().is_err());
    }
}
