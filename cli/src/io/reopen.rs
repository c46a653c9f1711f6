//! What qemu-io's `reopen` may change: the checks QEMU's block layer makes before it reopens a
//! node, in its words. A node keeps its name and its driver (the image, its file and its
//! backing node alike); `-c` and the cache options are two ways to say one thing, so not both;
//! the boolean node options take QEMU's boolean spellings only.

use crate::io::open::{OpenSpec, Options, Target};

/// The node options that take a boolean.
const BOOLEANS: [&str; 4] = [
    "read-only",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
];

/// The nodes whose name and driver `reopen` keeps, by option prefix.
const NODES: [&str; 3] = ["", "file.", "backing."];

/// QEMU's boolean option parser: its value, or its message.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Refuses `new` options (the `-o` of `reopen`) that would change what the open node is, as
/// QEMU refuses them. `cache_flag`: `-c` was given.
pub fn check(
    old: &OpenSpec,
    target: &Target,
    new: &Options,
    cache_flag: bool,
) -> Result<(), String> {
    if cache_flag && (new.contains_key("cache.direct") || new.contains_key("cache.no-flush")) {
        return Err("Cannot set both -c and the cache options".into());
    }
    for key in BOOLEANS {
        if let Some(value) = new.get(key) {
            parse_bool(key, value)?;
        }
    }
    for prefix in NODES {
        if let Some(name) = new.get(&format!("{prefix}node-name")) {
            // A node opened without a name has one QEMU generated, which no option repeats.
            if old.options.get(&format!("{prefix}node-name")) != Some(name) {
                return Err("Cannot change the option 'node-name'".into());
            }
        }
        if let Some(driver) = new.get(&format!("{prefix}driver")) {
            let current = old
                .options
                .get(&format!("{prefix}driver"))
                .cloned()
                .or_else(|| implied_driver(target, prefix));
            if current.as_ref() != Some(driver) {
                return Err("Cannot change the option 'driver'".into());
            }
        }
    }
    Ok(())
}

/// The driver of the node at `prefix` when the options name none: the format the image was
/// opened as, the `file` protocol under it, the backing file's format.
fn implied_driver(target: &Target, prefix: &str) -> Option<String> {
    match (prefix, target) {
        ("", Target::Qcow2(_)) => Some("qcow2".into()),
        ("", Target::Raw(raw)) => Some(raw.driver.clone()),
        ("file.", Target::Raw(raw)) if raw.driver != "raw" => None,
        ("file.", _) => Some("file".into()),
        ("backing.", Target::Qcow2(image)) => match image.backing_image() {
            Some(_) => Some("qcow2".into()),
            None if image.chain_depth() > 0 => Some("raw".into()),
            None => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_take_qemu_spellings() {
        assert_eq!(parse_bool("read-only", "y"), Ok(true));
        assert_eq!(parse_bool("read-only", "off"), Ok(false));
        assert_eq!(
            parse_bool("cache.direct", "baz").unwrap_err(),
            "Parameter 'cache.direct' expects 'on' or 'off'"
        );
    }
}
