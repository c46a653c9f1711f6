//! The store a node described by options gives a format node above it (a qcow2 image's
//! `data-file`, say): a host file (`file`), a null node, a raw node over another node (with its
//! window), or blkdebug over another node (with its error rules). Nodes nest through their
//! option prefixes (`data-file.file.image.filename`), as QEMU's block layer reads them.

use qcow2::{FileStorage, Storage};

use crate::blkdebug::{rules_from_options, Blkdebug};
use crate::io_open::Options;
use crate::null_node::{self, NullNode};
use crate::raw_node::{RawNode, Window};
use crate::source::io_text;

/// The store of the node whose options start with `prefix` (`"data-file."`); `child` is the
/// node's name as the parent calls it, for messages.
pub fn open(
    o: &Options,
    prefix: &str,
    child: &str,
    writable: bool,
) -> Result<Box<dyn Storage>, String> {
    let key = |k: &str| format!("{prefix}{k}");
    let has_children = o.keys().any(|k| k.starts_with(prefix));
    if !has_children {
        return match o.get(prefix.trim_end_matches('.')) {
            // A reference to a node defined elsewhere: no other node exists in this process.
            Some(reference) => Err(format!(
                "Cannot find device='{reference}' nor node-name='{reference}'"
            )),
            None => Err(format!("A block device must be specified for \"{child}\"")),
        };
    }
    match o.get(&key("driver")).map(String::as_str) {
        Some(d) if null_node::DRIVERS.contains(&d) => {
            Ok(Box::new(NullNode::from_options(o, prefix)?))
        }
        None | Some("file" | "host_device" | "host_cdrom") => {
            let name = o
                .get(&key("filename"))
                .ok_or_else(|| format!("A block device must be specified for \"{child}\""))?;
            let path = std::path::Path::new(name);
            let file = if writable {
                FileStorage::open_read_write(path)
            } else {
                FileStorage::open_read_only(path)
            }
            .map_err(|e| format!("Could not open '{name}': {}", io_text(&e)))?;
            Ok(Box::new(file))
        }
        Some("raw") => {
            let file = open(o, &key("file."), "file", writable)?;
            let len = file.len().map_err(|e| io_text(&e))?;
            let window = Window::from_options(o, prefix, len)?;
            Ok(Box::new(RawNode::new(file, window)))
        }
        Some("blkdebug") => {
            let image = open(o, &key("image."), "image", writable)?;
            let rules = rules_from_options(o, prefix)?;
            Ok(Box::new(Blkdebug::new(image, rules)))
        }
        Some(other) => Err(format!(
            "the '{other}' driver is not supported by qcow2-tool as the \"{child}\" node"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nodes_nest_through_their_prefixes() {
        let dir = std::env::temp_dir().join(format!("node_store_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("data");
        std::fs::write(&file, vec![7u8; 4096]).unwrap();
        let o = options(&[
            ("data-file.driver", "raw"),
            ("data-file.size", "1024"),
            ("data-file.file.driver", "file"),
            ("data-file.file.filename", file.to_str().unwrap()),
        ]);
        let store = open(&o, "data-file.", "data-file", false).unwrap();
        assert_eq!(store.len().unwrap(), 1024);
        let o = options(&[("data-file", "node0")]);
        assert!(open(&o, "data-file.", "data-file", false)
            .unwrap_err()
            .contains("node-name='node0'"));
        let o = options(&[("data-file.driver", "qcow2")]);
        assert!(open(&o, "data-file.", "data-file", false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
