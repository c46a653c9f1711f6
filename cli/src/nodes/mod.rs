//! Block nodes the commands open besides qcow2 and raw files, named by QEMU's driver names in
//! options and `json:` names: blkdebug, null, quorum, raw windows, a qcow2 image as a file, the
//! copy-on-read and compress filters, the qcow2 runtime options QEMU checks at open, and the
//! resolver for `json:` backing names.

pub mod backing_json;
pub mod blkdebug;
pub mod compress_filter;
pub mod copy_on_read;
pub mod nested;
pub mod null;
pub mod qcow2_options;
pub mod quorum;
pub mod raw;
pub mod store;

/// Node options from `(key, value)` pairs, for tests.
#[cfg(test)]
pub(crate) fn options_of(pairs: &[(&str, &str)]) -> crate::io::open::Options {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
