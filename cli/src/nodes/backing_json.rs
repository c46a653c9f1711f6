//! `json:{...}` backing names: the resolver the commands give the library. It accepts only local
//! nodes this tool implements (a qcow2 or raw format over `file`, `blkdebug` and `raw` nodes) and
//! refuses any other driver by name before anything is opened; the host files it needs open
//! through the library's policy gate. A relative `filename` inside resolves against the working
//! directory, as QEMU's file node resolves it (QEMU passes a `json:` backing name on as it is).

use std::path::PathBuf;

use qcow2::{
    BackingRequest, BackingResolver, ChainProblem, Image, OpenOptions, ResolvedBacking, Storage,
};

use crate::io::open::{parse_json_filename, Options};

/// The formats a `json:` backing name may put directly below an image.
const FORMATS: &[&str] = &["qcow2", "raw"];
/// The nodes a `json:` backing name may put below that format.
const NODES: &[&str] = &["file", "blkdebug", "raw"];
/// Options of the format node besides its `file` child (a raw format's window).
const FORMAT_OPTIONS: &[&str] = &["driver", "filename", "offset", "size"];

/// Resolves `json:` backing names into local nodes.
#[derive(Debug, Default)]
pub struct JsonBacking;

impl BackingResolver for JsonBacking {
    fn resolve(&self, request: &mut BackingRequest<'_>) -> qcow2::Result<ResolvedBacking> {
        let o = checked_options(request)?;
        let format = o.get("driver").cloned();
        let writable = request.writable();
        let mut refused = None;
        let opened = {
            let mut files = |name: &str, _writable: bool| {
                request.open_file(name).map_err(|e| {
                    let text = e.to_string();
                    refused = Some(e);
                    text
                })
            };
            if format.as_deref() == Some("raw") {
                crate::nodes::store::open_with(&o, "", "backing", writable, &mut files)
            } else {
                crate::nodes::store::open_with(&o, "file.", "file", writable, &mut files)
            }
        };
        let storage = match (opened, refused) {
            (Ok(storage), _) => storage,
            (Err(_), Some(e)) => return Err(e),
            (Err(text), None) => return Err(request.refuse(ChainProblem::Unresolvable(text))),
        };
        Ok(ResolvedBacking::new(storage, format).path(plain_file(&o).map(PathBuf::from)))
    }
}

/// The file a qcow2 description names when it is nothing but that file (`file` with a
/// `filename`, no other option): QEMU then knows the image by that file name.
fn plain_file(o: &Options) -> Option<&str> {
    if o.get("driver").is_some_and(|d| d != "qcow2") {
        return None;
    }
    let plain = o.iter().all(|(k, v)| match k.as_str() {
        "driver" | "file.filename" => true,
        "file.driver" => v == "file",
        _ => false,
    });
    o.get("file.filename").filter(|_| plain).map(String::as_str)
}

/// The name's options, flattened, once every driver in it is one this resolver opens.
fn checked_options(request: &BackingRequest<'_>) -> qcow2::Result<Options> {
    checked(request.name()).map_err(|problem| request.refuse(problem))
}

/// [`checked_options`] for a name on its own.
fn checked(name: &str) -> Result<Options, ChainProblem> {
    let mut o = Options::new();
    parse_json_filename(name, &mut o).map_err(ChainProblem::Unresolvable)?;
    for (key, value) in &o {
        let allowed = if key == "driver" {
            FORMATS
        } else if key.ends_with(".driver") {
            NODES
        } else {
            continue;
        };
        if !allowed.contains(&value.as_str()) {
            return Err(ChainProblem::DriverRefused {
                driver: value.clone(),
            });
        }
    }
    // A blkdebug config file is a host file read outside the policy gate.
    if o.keys().any(|k| k == "config" || k.ends_with(".config")) {
        return Err(ChainProblem::Unresolvable(
            "blkdebug's 'config' file is not read for a json: backing name".into(),
        ));
    }
    // Drivers nested as JSON text (quorum's children) are not among the accepted ones anyway;
    // any other option of the format node would be silently ignored, so it is refused.
    if let Some(key) = o
        .keys()
        .find(|k| !k.starts_with("file.") && !FORMAT_OPTIONS.contains(&k.as_str()))
    {
        return Err(ChainProblem::Unresolvable(format!(
            "option '{key}' is not supported in a json: backing name"
        )));
    }
    // `filename` on the format node names its file, as QEMU reads it.
    if let Some(name) = o.get("filename").cloned() {
        if !o.keys().any(|k| k.starts_with("file.")) {
            o.insert("file.filename".into(), name);
        }
    }
    Ok(o)
}

/// The host file a `json:` backing name describes (below any raw and blkdebug nodes, whose
/// windows and error rules do not change an image's metadata), the format it names, and its
/// options, after the same checks as opening it: for commands that read metadata only.
pub fn described_file(name: &str) -> Result<(String, Option<String>, Options), ChainProblem> {
    let o = checked(name)?;
    let format = o.get("driver").cloned();
    let mut prefix = if format.as_deref() == Some("raw") {
        String::new()
    } else {
        "file.".to_owned()
    };
    loop {
        match o.get(&format!("{prefix}driver")).map(String::as_str) {
            None | Some("file") => break,
            Some("raw") => prefix.push_str("file."),
            Some("blkdebug") => prefix.push_str("image."),
            Some(other) => {
                return Err(ChainProblem::DriverRefused {
                    driver: other.to_owned(),
                })
            }
        }
    }
    let file = o
        .get(&format!("{prefix}filename"))
        .cloned()
        .ok_or_else(|| ChainProblem::Unresolvable("the description names no file".to_owned()))?;
    Ok((file, format, o))
}

/// Opens the `json:` backing name `name` as the image `image` would, for its format name and
/// virtual size (qemu-img create reads them from the backing file). `format` is the one the
/// caller gives (`-F`), which wins over the name's.
pub fn probe(
    image: &str,
    name: &str,
    format: Option<&str>,
    options: &OpenOptions,
) -> qcow2::Result<(&'static str, u64)> {
    let mut request = BackingRequest::new(image, name, options, false);
    let resolved = JsonBacking.resolve(&mut request)?;
    let is_qcow2 = match format.or(resolved.format.as_deref()) {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(request.refuse(ChainProblem::UnsupportedFormat(other.to_string())))
        }
        None => {
            let mut magic = [0u8; 4];
            let n = resolved
                .storage
                .read_at(&mut magic, 0)
                .map_err(|e| qcow2::Error::io(image, format!("probing {name:?}"), e))?;
            n == 4 && magic == *b"QFI\xfb"
        }
    };
    if is_qcow2 {
        let below = Image::from_storage(
            resolved.storage,
            name,
            &OpenOptions::metadata_only().without_key(true),
        )?;
        Ok(("qcow2", below.size()))
    } else {
        let len = resolved
            .storage
            .len()
            .map_err(|e| qcow2::Error::io(image, format!("reading the length of {name:?}"), e))?;
        Ok(("raw", len.next_multiple_of(512)))
    }
}

/// Whether a backing name is a `json:` description rather than a path.
pub fn is_json(name: &str) -> bool {
    name.starts_with("json:")
}

/// The resolver every chain this tool opens gets.
pub fn resolver() -> std::sync::Arc<dyn BackingResolver> {
    std::sync::Arc::new(JsonBacking)
}
