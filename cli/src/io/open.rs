//! What `io` opens, and how: the file named on the command line or by `open`, as a plain path, a
//! `json:{...}` filename, or a `key=value,...` option string (`--image-opts`, `open -o`), all
//! reduced to QEMU's flat dotted option names (`driver`, `file.filename`, `backing`, ...). Only
//! the options that change what this engine does are acted on; the cache and driver tuning
//! options QEMU takes are checked for the combinations QEMU refuses, then accepted.

use std::collections::BTreeMap;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

use qcow2::{BackingPolicy, FileStorage, Image, OpenOptions, Storage};

use crate::nodes::null::NullNode;
use crate::nodes::qcow2_options;
pub use crate::nodes::raw::RawImage;
use crate::source::{format_of, io_text, with_policy, Format, Guest};

/// Flat dotted options, as QEMU's block layer takes them.
pub type Options = BTreeMap<String, String>;

/// A request to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenSpec {
    /// The name given (path or `json:` string), for messages; `None` when only options name the file.
    pub name: Option<String>,
    pub options: Options,
    pub read_only: bool,
    pub force_share: bool,
    /// `-f`: the format driver, unless the options name one.
    pub format: Option<String>,
    /// `-s`: writes go to a temporary copy, dropped at close (QEMU's temporary overlay).
    pub snapshot: bool,
    /// `-C`: reads copy what they find below the image into it (see `copy_on_read`).
    pub copy_on_read: bool,
    /// `-n`, `-t none`: the image's files are read and written around the host page cache
    /// (also asked by the option `cache.direct=on`).
    pub direct_io: bool,
}

/// Splits a QemuOpts string (`a=1,b.c=x`, a doubled comma is a literal one) into options.
/// `implied`: the key a bare first value stands for (`file.filename` for `--image-opts`).
pub fn parse_option_string(text: &str, options: &mut Options) -> Result<(), String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((key, value)) => {
                options.insert(key.to_owned(), value.to_owned());
            }
            None => return Err(format!("Invalid parameter '{part}'")),
        }
    }
    Ok(())
}

/// Flattens a `json:{...}` filename's object into dotted options (QEMU's `qdict_flatten`).
pub fn parse_json_filename(text: &str, options: &mut Options) -> Result<(), String> {
    let body = double_quoted(&text["json:".len()..]);
    let value: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("Invalid JSON object given".into());
    };
    fn flatten(prefix: &str, map: &serde_json::Map<String, serde_json::Value>, out: &mut Options) {
        for (key, value) in map {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                serde_json::Value::Object(inner) => flatten(&name, inner, out),
                serde_json::Value::String(s) => {
                    out.insert(name, s.clone());
                }
                serde_json::Value::Null => {
                    out.insert(name, "null".into());
                }
                other => {
                    out.insert(name, other.to_string());
                }
            }
        }
    }
    flatten("", &map, options);
    Ok(())
}

/// Whether blkdebug options under `prefix` fail requests: only `inject-error` rules (or a
/// config file, which may hold them) do; `set-state` rules alone only move its state.
fn blkdebug_injects(o: &Options, prefix: &str) -> bool {
    o.keys().any(|k| {
        k.strip_prefix(prefix)
            .is_some_and(|k| k.starts_with("inject-error") || k == "config")
    })
}

/// `driver=blkdebug` without error rules over an `image.*` node: the image node itself, with
/// the file name given to blkdebug as its file.
fn without_blkdebug_top(o: &Options) -> Option<Options> {
    if o.get("driver").is_none_or(|d| d != "blkdebug") || blkdebug_injects(o, "") {
        return None;
    }
    let mut out = Options::new();
    for (k, v) in o {
        if let Some(inner) = k.strip_prefix("image.") {
            out.insert(inner.to_owned(), v.clone());
        }
    }
    if !out.contains_key("file.filename") {
        if let Some(f) = o.get("file.filename").or_else(|| o.get("filename")) {
            out.insert("file.filename".into(), f.clone());
        }
    }
    Some(out)
}

/// QEMU's JSON parser also takes single-quoted strings; rewrites them with double quotes.
fn double_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == '"' {
                        break;
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => {}
                        },
                        '"' => out.push_str("\\\""),
                        '\'' => break,
                        other => out.push(other),
                    }
                }
                out.push('"');
            }
            other => out.push(other),
        }
    }
    out
}

impl OpenSpec {
    /// The spec for a filename (plain or `json:`) with `-o`-style options on top.
    pub fn from_filename(name: &str, options: Options) -> Result<OpenSpec, String> {
        let mut spec = OpenSpec {
            name: Some(name.to_owned()),
            options,
            ..OpenSpec::default()
        };
        // `blkdebug::FILE` (no rules file) adds nothing this engine acts on: the file itself;
        // `blkdebug:RULES:FILE` puts a blkdebug node with the rules file under the format.
        let name = name.strip_prefix("blkdebug::").unwrap_or(name);
        if let Some((config, image)) = name
            .strip_prefix("blkdebug:")
            .and_then(|rest| rest.split_once(':'))
        {
            for (k, v) in [
                ("file.driver", "blkdebug"),
                ("file.config", config),
                ("file.image.filename", image),
            ] {
                spec.options.entry(k.into()).or_insert_with(|| v.to_owned());
            }
            return Ok(spec);
        }
        if name.starts_with("json:") {
            let mut from_json = Options::new();
            parse_json_filename(name, &mut from_json)?;
            for (k, v) in from_json {
                spec.options.entry(k).or_insert(v);
            }
        } else {
            spec.options
                .entry("file.filename".into())
                .or_insert_with(|| name.to_owned());
        }
        Ok(spec)
    }

    /// The host file the format driver sits on, and the format named, from the options.
    pub fn resolve(&self) -> Result<(String, Option<String>), String> {
        let unwrapped = without_blkdebug_top(&self.options);
        let o = unwrapped.as_ref().unwrap_or(&self.options);
        let mut driver = o.get("driver").cloned().or_else(|| self.format.clone());
        if driver.as_deref().is_some_and(|d| PROTOCOLS.contains(&d)) {
            // A protocol node alone reads as raw.
            driver = Some("raw".into());
        }
        let file = if let Some(f) = o
            .get("filename")
            .filter(|_| driver.as_deref() == Some("raw") && !o.contains_key("file.filename"))
        {
            f.clone()
        } else {
            let blkdebug_image = o.get("file.driver").is_some_and(|d| d == "blkdebug")
                && !blkdebug_injects(o, "file.");
            // blkdebug without error rules only passes requests on (its alignment options do
            // not change what the guest reads).
            if blkdebug_image {
                if let Some(f) = o
                    .get("file.image.filename")
                    .or_else(|| o.get("file.filename"))
                {
                    return Ok((f.clone(), driver));
                }
            }
            match o.get("file.driver").map(String::as_str) {
                None | Some("file" | "host_device" | "host_cdrom") => o
                    .get("file.filename")
                    .or_else(|| o.get("filename"))
                    .cloned()
                    .ok_or("A block device must be specified for \"file\"")?,
                Some("raw") if o.get("file.file.driver").is_none_or(|d| d == "file") => o
                    .get("file.file.filename")
                    .cloned()
                    .ok_or("A block device must be specified for \"file\"")?,
                Some(other) => return Err(format!("Unknown driver '{other}'")),
            }
        };
        Ok((file, driver))
    }

    /// The protocol driver the options name for the host file, if they name one.
    fn protocol(&self) -> Option<&str> {
        [self.options.get("driver"), self.options.get("file.driver")]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .find(|d| PROTOCOLS.contains(d))
    }

    /// Whether the boolean option `key` is on.
    fn option_on(&self, key: &str) -> bool {
        self.options
            .get(key)
            .is_some_and(|v| v == "on" || v == "true")
    }

    /// Whether the image's files bypass the page cache: `-n`, `-t none` or `cache.direct`.
    fn direct_io(&self) -> bool {
        self.direct_io || self.option_on("cache.direct")
    }

    /// Whether the image opens read-only (`-r`, or the `read-only` option).
    fn read_only(&self) -> bool {
        self.read_only || self.option_on("read-only")
    }

    /// A qcow2 image whose file is another qcow2 image's guest disk.
    fn open_nested(&self) -> Result<Target, String> {
        let driver = self.options.get("driver").or(self.format.as_ref());
        if driver.is_none_or(|d| d != "qcow2") {
            return Err("Unknown driver 'qcow2'".into());
        }
        let inner = OpenSpec {
            options: self
                .options
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("file.")?.to_owned(), v.clone())))
                .collect(),
            read_only: self.read_only(),
            force_share: self.force_share,
            ..OpenSpec::default()
        };
        let Target::Qcow2(inner) = inner.open()? else {
            return Err("Unknown driver 'qcow2'".into());
        };
        let name = self.name.clone().unwrap_or_default();
        self.open_qcow2_over(Box::new(crate::nodes::nested::ImageStorage(*inner)), &name)
    }

    /// A qcow2 image whose file is a blkdebug node with error rules over a host file.
    fn open_blkdebug(&self) -> Result<Target, String> {
        let o = &self.options;
        let file = o
            .get("file.image.filename")
            .or_else(|| o.get("file.image.file.filename"))
            .ok_or("A block device must be specified for \"image\"")?;
        let path = Path::new(file);
        let qcow2 = match o.get("driver").or(self.format.as_ref()) {
            Some(driver) => driver == "qcow2",
            None => format_of(path, None)? == Format::Qcow2,
        };
        if !qcow2 {
            return Err("blkdebug error rules are supported under qcow2 images only".into());
        }
        let rules = crate::nodes::blkdebug::rules_from_options(o, "file.")?;
        // Under the image, a copy-on-read write would arm rules on host offsets; only a node
        // above the image is modelled (see `copy_on_read`).
        if rules
            .iter()
            .any(|r| r.event() == crate::nodes::blkdebug::COR_WRITE)
        {
            return Err(
                "blkdebug event 'cor_write' under an image is not supported by qcow2-tool".into(),
            );
        }
        let storage = if self.read_only() {
            FileStorage::open_read_only(path)
        } else {
            FileStorage::open_read_write(path)
        }
        .map_err(|e| format!("Could not open '{file}': {}", io_text(&e)))?;
        let name = self.name.clone().unwrap_or_else(|| file.clone());
        let storage = Box::new(crate::nodes::blkdebug::Blkdebug::new(storage, rules));
        self.open_qcow2_over(storage, &name)
    }

    /// A qcow2 image whose file is a node other than a host file (a quorum).
    fn open_over_node(&self) -> Result<Target, String> {
        let driver = self.options.get("driver").or(self.format.as_ref());
        if driver.is_some_and(|d| d != "qcow2") {
            return Err("only qcow2 images open over this file node".into());
        }
        let store = crate::nodes::store::open(&self.options, "file.", "file", !self.read_only())?;
        let name = self.name.clone().unwrap_or_default();
        self.open_qcow2_over(store, &name)
    }

    /// A qcow2 image in `storage`, opened as the spec says.
    fn open_qcow2_over(&self, storage: Box<dyn Storage>, name: &str) -> Result<Target, String> {
        let options = if self.read_only() {
            OpenOptions::default().force_share(self.force_share)
        } else {
            OpenOptions::read_write()
        };
        let image = Image::from_storage(storage, name, &options)
            .map_err(|e| crate::io::qemu_open_error(name, &e))?;
        Ok(Target::Qcow2(Box::new(image)))
    }

    /// A null node as the whole disk.
    fn open_null(&self) -> Result<Target, String> {
        let mut options = self.options.clone();
        let driver = options
            .entry("driver".into())
            .or_insert_with(|| self.format.clone().unwrap_or_default())
            .clone();
        let node = NullNode::from_options(&options, "")?;
        Ok(Target::Raw(RawImage::over(
            Box::new(node),
            &driver,
            !self.read_only(),
        )))
    }

    /// Opens the file as the spec says.
    pub fn open(&self) -> Result<Target, String> {
        // What can be checked without the image is checked before anything opens.
        let runtime_given = qcow2_options::any_given(&self.options);
        if runtime_given {
            qcow2_options::check(&self.options, None)?;
        }
        if NullNode::is_named(&self.options, "")
            || self
                .format
                .as_deref()
                .is_some_and(|f| crate::nodes::null::DRIVERS.contains(&f))
                && !self.options.contains_key("driver")
        {
            return self.open_null();
        }
        // A data-file node given here replaces the file the header names (blkdebug over it,
        // a null node instead of it).
        let data_node = self
            .options
            .keys()
            .any(|k| k == "data-file" || k.starts_with("data-file."));
        match self.options.get("file.driver").map(String::as_str) {
            Some("qcow2" | "blkdebug") if data_node => {
                return Err("the 'data-file' option is supported only over a host file".into())
            }
            Some("qcow2") => return self.open_nested(),
            Some("quorum") => return self.open_over_node(),
            Some("blkdebug") if blkdebug_injects(&self.options, "file.") => {
                return self.open_blkdebug()
            }
            _ => {}
        }
        let (file, driver) = self.resolve()?;
        let path = Path::new(&file);
        let read_only = self.read_only();
        if let Some(protocol) = self.protocol() {
            check_protocol_file(protocol, path, !read_only)?;
        }
        let format = match driver.as_deref() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(other) => return Err(format!("Unknown driver '{other}'")),
            None => format_of(path, None)?,
        };
        match format {
            Format::Qcow2 => {
                let runtime = if runtime_given {
                    let facts = qcow2_options::ImageFacts::read(path);
                    qcow2_options::check(&self.options, facts.as_ref())?
                } else {
                    qcow2_options::Runtime::default()
                };
                let lazy_refcounts = runtime.lazy_refcounts;
                let options = if read_only {
                    OpenOptions::default().force_share(self.force_share)
                } else {
                    OpenOptions::read_write().lazy_refcounts(lazy_refcounts)
                };
                let mut options = with_policy(path, &options.direct_io(self.direct_io()));
                let keys = crate::secrets::resolve(&crate::secrets::key_ids(&self.options))?;
                if !keys.is_empty() {
                    options.keys = keys;
                }
                if self
                    .options
                    .get("backing")
                    .is_some_and(|b| b == "null" || b.is_empty())
                {
                    options.backing = BackingPolicy::Ignore;
                }
                options.backing_format = self.options.get("backing.driver").cloned();
                let image = if data_node {
                    let data_file = crate::nodes::store::open(
                        &self.options,
                        "data-file.",
                        "data-file",
                        !read_only,
                    )?;
                    Image::open_with_data_file(path, &options, data_file)
                } else {
                    Image::open(path, &options)
                }
                .map_err(|e| crate::io::qemu_open_error(&file, &e))?;
                crate::source::report_open_repair(&image);
                Ok(Target::Qcow2(Box::new(image)))
            }
            Format::Raw => RawImage::open(path, !read_only, self.direct_io()).map(Target::Raw),
        }
    }
}

/// The data file `data-file.filename` names (over the `file` protocol), to open instead of the
/// one the header names. Any other data-file node (blkdebug over it, a node name) is refused:
/// opening the header's file instead would ignore what was asked for.
pub fn data_file_override(options: &Options) -> Result<Option<PathBuf>, String> {
    let mut keys = options
        .iter()
        .filter(|(k, _)| *k == "data-file" || k.starts_with("data-file."))
        .peekable();
    if keys.peek().is_none() {
        return Ok(None);
    }
    let plain =
        keys.all(|(k, v)| k == "data-file.filename" || (k == "data-file.driver" && v == "file"));
    match options.get("data-file.filename") {
        Some(file) if plain => Ok(Some(PathBuf::from(file))),
        _ => Err(
            "the 'data-file' option is supported as a plain file name only \
                  (data-file.filename)"
                .into(),
        ),
    }
}

/// QEMU's protocol drivers for host files and devices.
const PROTOCOLS: &[&str] = &["file", "host_device", "host_cdrom"];

/// Opens the host file as the named protocol driver does: `file` takes regular files only,
/// `host_device` and `host_cdrom` character or block devices only.
fn check_protocol_file(protocol: &str, path: &Path, writable: bool) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let kind = FsOpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .and_then(|f| f.metadata())
        .map_err(|e| format!("Could not open '{shown}': {}", io_text(&e)))?
        .file_type();
    if protocol == "file" && !kind.is_file() {
        return Err(format!(
            "'file' driver requires '{shown}' to be a regular file"
        ));
    }
    if protocol != "file" && !kind.is_char_device() && !kind.is_block_device() {
        return Err(format!(
            "'{protocol}' driver requires '{shown}' to be either a character or block device"
        ));
    }
    Ok(())
}

/// What `io` has open.
pub enum Target {
    Qcow2(Box<Image>),
    Raw(RawImage),
}

impl Target {
    pub fn guest(&self) -> &dyn Guest {
        match self {
            Target::Qcow2(image) => image.as_ref(),
            Target::Raw(raw) => raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_filenames_flatten_to_dotted_options() {
        let mut o = Options::new();
        parse_json_filename(
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "a.qcow2"}, "backing": null}"#,
            &mut o,
        )
        .unwrap();
        assert_eq!(o["driver"], "qcow2");
        assert_eq!(o["file.filename"], "a.qcow2");
        assert_eq!(o["backing"], "null");
    }

    #[test]
    fn option_strings_keep_doubled_commas() {
        let mut o = Options::new();
        parse_option_string("driver=qcow2,file.filename=a,,b", &mut o).unwrap();
        assert_eq!(o["file.filename"], "a,b");
    }
}
