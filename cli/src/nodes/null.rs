//! QEMU's `null-co` and `null-aio` protocol nodes: a disk of `size` bytes (1 GiB unless given)
//! that discards every write. QEMU leaves a read's buffer as it was unless `read-zeroes` is
//! on; here reads always return zeros (a defined value costs nothing), and only the block
//! status differs: with `read-zeroes` the node reports zeros, without it data, as QEMU does.
//! Tests use it as a bottomless source or sink (a `convert` source, a qcow2 data file).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow2::Storage;

use crate::io::open::Options;

/// The size of a null node whose options give none (QEMU's default).
const DEFAULT_SIZE: u64 = 1 << 30;

/// The drivers this module stands for.
pub const DRIVERS: [&str; 2] = ["null-co", "null-aio"];

/// The options a null node takes besides its driver, and the generic node options QEMU's block
/// layer accepts on every node (none of which changes what a null node does).
const KNOWN: &[&str] = &[
    "driver",
    "size",
    "read-zeroes",
    "latency-ns",
    "filename",
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
];

/// A null node.
#[derive(Debug)]
pub struct NullNode {
    /// Writes past the end grow it, as the store contract asks of every backend.
    size: AtomicU64,
    read_zeroes: bool,
}

impl NullNode {
    /// The node the options under `prefix` (`""` for the top node, `"data-file."`, ...) describe.
    pub fn from_options(o: &Options, prefix: &str) -> Result<NullNode, String> {
        let driver = o
            .get(&format!("{prefix}driver"))
            .map_or("null-co", String::as_str);
        for key in o.keys().filter_map(|k| k.strip_prefix(prefix)) {
            if !KNOWN.contains(&key) {
                return Err(format!(
                    "Block protocol '{driver}' doesn't support the option '{key}'"
                ));
            }
        }
        let size = match o.get(&format!("{prefix}size")) {
            Some(v) => crate::size::parse_size(v)
                .map_err(|_| "Parameter 'size' expects a size".to_owned())?,
            None => DEFAULT_SIZE,
        };
        let read_zeroes = match o.get(&format!("{prefix}read-zeroes")).map(String::as_str) {
            None | Some("off" | "false") => false,
            Some("on" | "true") => true,
            Some(_) => return Err("Parameter 'read-zeroes' expects 'on' or 'off'".into()),
        };
        // Emulated latency only slows requests down; it changes no result.
        if let Some(v) = o.get(&format!("{prefix}latency-ns")) {
            if v.parse::<i64>()
                .map_err(|_| "Parameter 'latency-ns' expects a number")?
                < 0
            {
                return Err("latency-ns is invalid".into());
            }
        }
        Ok(NullNode {
            size: AtomicU64::new(size),
            read_zeroes,
        })
    }

    /// Whether the options under `prefix` name a null driver.
    pub fn is_named(o: &Options, prefix: &str) -> bool {
        o.get(&format!("{prefix}driver"))
            .is_some_and(|d| DRIVERS.contains(&d.as_str()))
    }
}

impl Storage for NullNode {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.size.load(Ordering::Relaxed);
        let n =
            usize::try_from(size.saturating_sub(offset)).map_or(buf.len(), |n| n.min(buf.len()));
        buf[..n].fill(0);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.size.fetch_max(end, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.size
            .fetch_max(offset.saturating_add(len), Ordering::Relaxed);
        Ok(())
    }

    /// `read-zeroes` reports the whole node as reading zeros; otherwise all of it is data.
    fn hole_at(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        let size = self.size.load(Ordering::Relaxed);
        Ok(Some((
            self.read_zeroes,
            len.min(size.saturating_sub(offset)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nodes::options_of as options;

    #[test]
    fn a_null_node_reads_zeros_up_to_its_size_and_forgets_writes() {
        let node = NullNode::from_options(
            &options(&[("data-file.driver", "null-co"), ("data-file.size", "4096")]),
            "data-file.",
        )
        .unwrap();
        node.write_at(&[0xaa; 512], 0).unwrap();
        let mut buf = [0xffu8; 1024];
        assert_eq!(node.read_at(&mut buf, 3584).unwrap(), 512);
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert_eq!(node.len().unwrap(), 4096);
        assert_eq!(node.hole_at(0, 8192).unwrap(), Some((false, 4096)));
    }

    #[test]
    fn null_node_options_are_checked() {
        let node = NullNode::from_options(&options(&[("driver", "null-co")]), "").unwrap();
        assert_eq!(node.len().unwrap(), 1 << 30);
        let zeroes =
            NullNode::from_options(&options(&[("read-zeroes", "true"), ("size", "1M")]), "")
                .unwrap();
        assert_eq!(zeroes.hole_at(0, 512).unwrap(), Some((true, 512)));
        let err = NullNode::from_options(&options(&[("driver", "null-aio"), ("x", "1")]), "")
            .unwrap_err();
        assert_eq!(
            err,
            "Block protocol 'null-aio' doesn't support the option 'x'"
        );
        assert!(NullNode::from_options(&options(&[("read-zeroes", "maybe")]), "").is_err());
        assert!(NullNode::from_options(&options(&[("latency-ns", "-1")]), "").is_err());
    }
}
