//! qcow2's runtime options (cache sizes, lazy refcounts, overlap checks, discard passing, the
//! cache cleaning interval), checked as QEMU's qcow2 driver checks them when it opens or
//! reopens an image: in its order and words, and before the image is opened for writing, so a
//! refused reopen leaves the image as it was. Of these only `lazy-refcounts` changes what this
//! engine does: the cache and overlap settings tune QEMU's own caches and checks (this engine
//! checks every allocation against all metadata, whatever `overlap-check` says).

use std::io::Read;
use std::path::Path;

use qcow2::format::Header;

use crate::io::open::Options;
use crate::opts::{parse_bool_opt, parse_number_opt, parse_size_opt};

/// The boolean options.
const BOOLEANS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check.main-header",
    "overlap-check.active-l1",
    "overlap-check.active-l2",
    "overlap-check.refcount-table",
    "overlap-check.refcount-block",
    "overlap-check.snapshot-table",
    "overlap-check.inactive-l1",
    "overlap-check.inactive-l2",
    "overlap-check.bitmap-directory",
];

/// The size options.
const SIZES: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
];

/// The overlap-check modes.
const OVERLAP_MODES: [&str; 4] = ["none", "constant", "cached", "all"];

/// QEMU's default L2 cache limit (DEFAULT_L2_CACHE_MAX_SIZE): 32 MiB.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// QEMU caches at least this many refcount blocks (MIN_REFCOUNT_CACHE_SIZE).
const MIN_REFCOUNT_CACHE: u64 = 4;
/// The largest cache entry count QEMU takes (INT_MAX).
const MAX_CACHE_ENTRIES: u64 = i32::MAX as u64;
/// The longest cleaning interval QEMU takes, in seconds (UINT_MAX).
const MAX_CLEAN_INTERVAL: u64 = u32::MAX as u64;
/// The largest qcow2 cluster: the header always fits in this much of the file.
const MAX_CLUSTER: u64 = 2 << 20;

/// What the checks need to know of the image.
#[derive(Debug, Clone, Copy)]
pub struct ImageFacts {
    pub cluster_size: u64,
    pub virtual_size: u64,
    pub l2_entry_size: u64,
    pub version: u32,
}

impl ImageFacts {
    /// The facts from the header of the qcow2 file at `path`; `None` when it cannot be read
    /// (opening the image then reports why).
    pub fn read(path: &Path) -> Option<ImageFacts> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_CLUSTER)
            .read_to_end(&mut bytes)
            .ok()?;
        let header = Header::decode(&bytes).ok()?;
        Some(ImageFacts {
            cluster_size: header.cluster_size(),
            virtual_size: header.size,
            l2_entry_size: header.l2_entry_size(),
            version: header.version,
        })
    }
}

/// What the options change for this engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runtime {
    /// `lazy-refcounts`, when given.
    pub lazy_refcounts: Option<bool>,
}

/// Whether any qcow2 runtime option is given.
pub fn any_given(o: &Options) -> bool {
    o.keys().any(|k| {
        BOOLEANS.contains(&k.as_str())
            || SIZES.contains(&k.as_str())
            || matches!(k.as_str(), "cache-clean-interval" | "overlap-check")
            || k.starts_with("overlap-check.")
    })
}

/// Checks the options as QEMU's qcow2 driver does; `facts` of the image, when known, allow the
/// checks that depend on it.
pub fn check(o: &Options, facts: Option<&ImageFacts>) -> Result<Runtime, String> {
    // Every option is parsed by its type first.
    let mut flags = std::collections::BTreeMap::new();
    for &key in BOOLEANS {
        if let Some(v) = o.get(key) {
            flags.insert(key, parse_bool_opt(key, v)?.value);
        }
    }
    let mut sizes = std::collections::BTreeMap::new();
    for &key in SIZES {
        if let Some(v) = o.get(key) {
            sizes.insert(key, parse_size_opt(key, v)?);
        }
    }
    let clean_interval = o
        .get("cache-clean-interval")
        .map(|v| parse_number_opt("cache-clean-interval", v))
        .transpose()?;

    check_cache_sizes(&sizes, facts)?;
    if clean_interval.is_some_and(|i| i > MAX_CLEAN_INTERVAL) {
        return Err("Cache clean interval too big".into());
    }
    let lazy_refcounts = flags.get("lazy-refcounts").copied();
    if let Some(facts) = facts {
        if lazy_refcounts == Some(true) && facts.version < 3 {
            return Err(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            );
        }
    }
    let mode = o.get("overlap-check");
    let template = o.get("overlap-check.template");
    if let (Some(mode), Some(template)) = (mode, template) {
        if mode != template {
            return Err(format!(
                "Conflicting values for qcow2 options 'overlap-check' ('{mode}') and 'overlap-check.template' ('{template}')"
            ));
        }
    }
    if let Some(mode) = mode.or(template) {
        if !OVERLAP_MODES.contains(&mode.as_str()) {
            return Err(format!(
                "Unsupported value '{mode}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
            ));
        }
    }
    if let Some(facts) = facts {
        if flags.get("discard-no-unref") == Some(&true) && facts.version < 3 {
            return Err("discard-no-unref is only supported since qcow2 version 3".into());
        }
    }
    Ok(Runtime { lazy_refcounts })
}

/// The cache-size options: their combinations, then (knowing the image) the entry size and
/// the entry counts the sizes come to.
fn check_cache_sizes(
    sizes: &std::collections::BTreeMap<&str, u64>,
    facts: Option<&ImageFacts>,
) -> Result<(), String> {
    let all = sizes.get("cache-size").copied();
    let l2 = sizes.get("l2-cache-size").copied();
    let refcount = sizes.get("refcount-cache-size").copied();
    if let Some(all) = all {
        if l2.is_some() && refcount.is_some() {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            );
        }
        if l2.is_some_and(|l2| l2 > all) {
            return Err("l2-cache-size may not exceed cache-size".into());
        }
        if refcount.is_some_and(|rc| rc > all) {
            return Err("refcount-cache-size may not exceed cache-size".into());
        }
    }
    let Some(facts) = facts else {
        return Ok(());
    };
    let cs = facts.cluster_size;
    let max_l2 = facts
        .virtual_size
        .div_ceil(cs)
        .saturating_mul(facts.l2_entry_size)
        .next_multiple_of(cs);
    let min_refcount = MIN_REFCOUNT_CACHE * cs;
    let mut l2_size = max_l2.min(l2.unwrap_or(DEFAULT_L2_CACHE_MAX));
    let mut refcount_size = refcount.unwrap_or(0);
    if let Some(all) = all {
        if l2.is_some() {
            refcount_size = all.saturating_sub(l2_size);
        } else if refcount.is_some() {
            l2_size = all - refcount_size;
        } else if all >= max_l2.saturating_add(min_refcount) {
            l2_size = max_l2;
            refcount_size = all - l2_size;
        } else {
            refcount_size = all.min(min_refcount);
            l2_size = all - refcount_size;
        }
    }
    let entry = match sizes.get("l2-cache-entry-size") {
        Some(&entry) => entry,
        // A cache too small for the whole disk uses 4 KiB entries.
        None if l2_size < max_l2 => cs.min(4096),
        None => cs,
    };
    if !entry.is_power_of_two() || !(512..=cs).contains(&entry) {
        return Err(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        ));
    }
    if l2_size / entry > MAX_CACHE_ENTRIES {
        return Err("L2 cache size too big".into());
    }
    if refcount_size / cs > MAX_CACHE_ENTRIES {
        return Err("Refcount cache size too big".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nodes::options_of as options;

    const SMALL: ImageFacts = ImageFacts {
        cluster_size: 65536,
        virtual_size: 64 << 20,
        l2_entry_size: 8,
        version: 3,
    };

    #[test]
    fn runtime_options_are_refused_in_qemu_words() {
        let err = |pairs: &[(&str, &str)], facts: &ImageFacts| {
            check(&options(pairs), Some(facts)).unwrap_err()
        };
        assert_eq!(
            err(&[("refcount-cache-size", "256T")], &SMALL),
            "Refcount cache size too big"
        );
        assert_eq!(
            err(&[("cache-clean-interval", "-1")], &SMALL),
            "Cache clean interval too big"
        );
        assert!(err(
            &[
                ("overlap-check", "constant"),
                ("overlap-check.template", "all")
            ],
            &SMALL
        )
        .starts_with("Conflicting values"));
        assert!(err(&[("overlap-check.template", "blubb")], &SMALL)
            .starts_with("Unsupported value 'blubb'"));
        assert_eq!(
            err(&[("lazy-refcounts", "42")], &SMALL),
            "Parameter 'lazy-refcounts' expects 'on' or 'off'"
        );
        let huge = ImageFacts {
            cluster_size: 256 << 10,
            virtual_size: 32 << 50,
            ..SMALL
        };
        assert_eq!(
            err(
                &[("l2-cache-entry-size", "512"), ("l2-cache-size", "1T")],
                &huge
            ),
            "L2 cache size too big"
        );
        let v2 = ImageFacts {
            version: 2,
            ..SMALL
        };
        assert!(err(&[("lazy-refcounts", "on")], &v2).starts_with("Lazy refcounts require"));
    }

    #[test]
    fn valid_runtime_options_pass_and_lazy_refcounts_is_reported() {
        let o = options(&[
            ("lazy-refcounts", "on"),
            ("overlap-check", "all"),
            ("cache-size", "1M"),
            ("l2-cache-entry-size", "4k"),
            ("cache-clean-interval", "10"),
        ]);
        assert!(any_given(&o));
        assert_eq!(
            check(&o, Some(&SMALL)),
            Ok(Runtime {
                lazy_refcounts: Some(true)
            })
        );
        assert!(!any_given(&options(&[("file.filename", "x")])));
    }
}
