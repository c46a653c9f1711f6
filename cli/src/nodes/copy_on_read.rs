//! Copy-on-read for `io` (qemu-io's `-C`, `open -C`, or a `copy-on-read` filter node): reads
//! copy what they find below the image into it (`qcow2::Image::read_at_copying`). A blkdebug
//! node between them, with rules armed by `cor_write`, sees the requests the copy makes and
//! fails them as QEMU's would. It sees nothing else here, so an image under one takes reads
//! only (other requests are refused rather than passed by the rules unseen).

use qcow2::{CopyStep, Image};

use crate::io::open::{OpenSpec, Options};
use crate::nodes::blkdebug::{rules_from_options, CopyWatch, COR_WRITE};

/// How reads copy: with a blkdebug node's rules watching, or plainly.
pub struct CopyOnRead {
    rules: Option<CopyWatch>,
}

/// Takes the copy-on-read filter (and a blkdebug node above the image) out of `spec`, leaving
/// the image's own options; `None` when reads do not copy.
pub fn take_from(spec: &mut OpenSpec) -> Result<Option<CopyOnRead>, String> {
    let read_only = spec.read_only
        || spec
            .options
            .get("read-only")
            .is_some_and(|v| v == "on" || v == "true");
    if spec
        .options
        .get("driver")
        .is_some_and(|d| d == "copy-on-read")
    {
        // The filter takes write permission on its child at open.
        if read_only {
            return Err("Block node is read-only".into());
        }
        spec.options = child(&spec.options, "file.");
    } else if !spec.copy_on_read {
        return Ok(None);
    } else if read_only {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    let o = &spec.options;
    let blkdebug_rules = o.get("driver").is_some_and(|d| d == "blkdebug")
        && o.keys()
            .any(|k| k == "config" || k.starts_with("inject-error"));
    if !blkdebug_rules {
        return Ok(Some(CopyOnRead { rules: None }));
    }
    let rules = rules_from_options(o, "")?;
    if rules.iter().any(|r| r.event() != COR_WRITE) {
        return Err(
            "blkdebug above an image: only 'cor_write' rules are supported by qcow2-tool".into(),
        );
    }
    spec.options = child(o, "image.");
    Ok(Some(CopyOnRead {
        rules: Some(CopyWatch::new(rules)),
    }))
}

/// The options of the child under `prefix`; the file name given to the node above names the
/// host file at the bottom.
fn child(o: &Options, prefix: &str) -> Options {
    let mut out: Options = o
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_owned(), v.clone())))
        .collect();
    if !out.contains_key("file.filename") {
        let name = out.remove("filename").or_else(|| {
            o.get("file.filename")
                .or_else(|| o.get("filename"))
                .cloned()
        });
        if let Some(name) = name {
            out.insert("file.filename".into(), name);
        }
    }
    out
}

impl CopyOnRead {
    /// Reads guest bytes, copying what lies below the image into it.
    pub fn read(&self, image: &Image, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        let Some(rules) = &self.rules else {
            return image.read_at_copying(buf, offset);
        };
        image.read_at_copying_observed(buf, offset, &|step| match step {
            CopyStep::Read { offset, len } => rules.read(offset, len),
            CopyStep::Copy { offset, len } => rules.copy_write(offset, len),
        })
    }

    /// Whether requests other than reads may pass: not through a blkdebug node, whose rules
    /// would not see them here.
    pub fn takes_other_requests(&self) -> bool {
        self.rules.is_none()
    }
}
