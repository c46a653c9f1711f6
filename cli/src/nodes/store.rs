//! The store a node described by options gives a format node above it (a qcow2 image's
//! `data-file`, say): a host file (`file`), a null node, a raw node over another node (with its
//! window), or blkdebug over another node (with its error rules). Nodes nest through their
//! option prefixes (`data-file.file.image.filename`), as QEMU's block layer reads them.

use qcow2::{FileStorage, Storage};

use crate::io::open::Options;
use crate::nodes::blkdebug::{rules_from_options, Blkdebug};
use crate::nodes::null::{self, NullNode};
use crate::nodes::raw::{RawNode, Window};
use crate::source::io_text;

/// The store of the node whose options start with `prefix` (`"data-file."`); `child` is the
/// node's name as the parent calls it, for messages.
pub fn open(
    o: &Options,
    prefix: &str,
    child: &str,
    writable: bool,
) -> Result<Box<dyn Storage>, String> {
    open_with(
        o,
        prefix,
        child,
        writable,
        &mut |name: &str, writable: bool| {
            let path = std::path::Path::new(name);
            let file = if writable {
                FileStorage::open_read_write(path)
            } else {
                FileStorage::open_read_only(path)
            }
            .map_err(|e| format!("Could not open '{name}': {}", io_text(&e)))?;
            Ok(Box::new(file) as Box<dyn Storage>)
        },
    )
}

/// Opens a host file by its `filename` option, for writing or not.
pub type FileOpener<'a> = dyn FnMut(&str, bool) -> Result<Box<dyn Storage>, String> + 'a;

/// As [`open`], with every `file` node's host file opened by `files` (a backing name's nodes
/// open theirs through the library's policy gate).
pub fn open_with(
    o: &Options,
    prefix: &str,
    child: &str,
    writable: bool,
    files: &mut FileOpener<'_>,
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
        Some(d) if null::DRIVERS.contains(&d) => Ok(Box::new(NullNode::from_options(o, prefix)?)),
        None | Some("file" | "host_device" | "host_cdrom") => {
            let name = o
                .get(&key("filename"))
                .ok_or_else(|| format!("A block device must be specified for \"{child}\""))?;
            files(name, writable)
        }
        Some("raw") => {
            let file = open_with(o, &key("file."), "file", writable, files)?;
            let len = file.len().map_err(|e| io_text(&e))?;
            let window = Window::from_options(o, prefix, len)?;
            Ok(Box::new(RawNode::new(file, window)))
        }
        Some("blkdebug") => {
            let image = open_with(o, &key("image."), "image", writable, files)?;
            let rules = rules_from_options(o, prefix)?;
            Ok(Box::new(Blkdebug::new(image, rules)))
        }
        Some("quorum") => open_quorum(o, prefix, writable, files),
        Some(other) => Err(format!(
            "the '{other}' driver is not supported by qcow2-tool as the \"{child}\" node"
        )),
    }
}

/// A quorum node: its children are a JSON array (from a `json:` name) or numbered
/// `children.N.` options.
fn open_quorum(
    o: &Options,
    prefix: &str,
    writable: bool,
    files: &mut FileOpener<'_>,
) -> Result<Box<dyn Storage>, String> {
    let key = |k: &str| format!("{prefix}{k}");
    for unsupported in ["blkverify", "rewrite-corrupted"] {
        if o.get(&key(unsupported))
            .is_some_and(|v| v != "off" && v != "false")
        {
            return Err(format!(
                "quorum's '{unsupported}' option is not supported by qcow2-tool"
            ));
        }
    }
    match o.get(&key("read-pattern")).map(String::as_str) {
        None | Some("quorum") => {}
        Some("fifo") => {
            return Err("quorum's 'fifo' read pattern is not supported by qcow2-tool".into())
        }
        Some(_) => return Err("Please set read-pattern as fifo or quorum".into()),
    }
    // Each child's options, under a prefix of their own.
    let mut children = Options::new();
    if let Some(list) = o.get(&key("children")) {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(list).map_err(|_| "Option children is not a valid array")?;
        for (i, child) in list.iter().enumerate() {
            let serde_json::Value::Object(_) = child else {
                return Err("Option children is not a valid array".into());
            };
            let one = format!("json:{child}");
            let mut child_options = Options::new();
            crate::io::open::parse_json_filename(&one, &mut child_options)?;
            for (k, v) in child_options {
                children.insert(format!("{i}.{k}"), v);
            }
        }
    } else {
        for (k, v) in o {
            if let Some(rest) = k.strip_prefix(&key("children.")) {
                children.insert(rest.to_owned(), v.clone());
            }
        }
    }
    let mut indices: Vec<u64> = children
        .keys()
        .filter_map(|k| k.split_once('.').and_then(|(i, _)| i.parse().ok()))
        .collect();
    indices.sort_unstable();
    indices.dedup();
    let mut stores = Vec::with_capacity(indices.len());
    for i in indices {
        stores.push(open_with(
            &children,
            &format!("{i}."),
            &format!("children.{i}"),
            writable,
            files,
        )?);
    }
    let threshold = match o.get(&key("vote-threshold")) {
        Some(v) => v
            .parse::<i64>()
            .map_err(|_| "Parameter 'vote-threshold' expects a number".to_owned())?,
        None => 0,
    };
    Ok(Box::new(crate::nodes::quorum::QuorumNode::new(
        stores, threshold,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nodes::options_of as options;

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
            .err()
            .is_some_and(|e| e.contains("node-name='node0'")));
        let o = options(&[("data-file.driver", "qcow2")]);
        assert!(open(&o, "data-file.", "data-file", false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
