//! QEMU's `--object secret,id=ID,data=...|file=...[,format=raw|base64]` and the options that
//! name a secret for an encrypted image (`encrypt.key-secret`, `backing.encrypt.key-secret`,
//! ...). Secrets are taken off the command line before the commands parse it, so every command
//! accepts `--object`; commands that have no `--image-opts` of their own get it here too: the
//! option string becomes the file name it names, and its key secrets are kept for that file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use qcow2::crypto::Secret;

use crate::io::open::Options;

fn secrets() -> &'static Mutex<HashMap<String, Secret>> {
    static SECRETS: OnceLock<Mutex<HashMap<String, Secret>>> = OnceLock::new();
    SECRETS.get_or_init(Default::default)
}

/// Key secret ids by depth in the chain, for files named by `--image-opts` strings that a
/// command without image options of its own received.
fn file_keys() -> &'static Mutex<HashMap<PathBuf, Vec<Option<String>>>> {
    static KEYS: OnceLock<Mutex<HashMap<PathBuf, Vec<Option<String>>>>> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// The option strings that named files, by file: QEMU names the image by the string.
fn given_names() -> &'static Mutex<HashMap<PathBuf, String>> {
    static NAMES: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

/// How QEMU names the image at `path` in messages: the `--image-opts` string that named it, or
/// the path.
pub fn shown_name(path: &Path) -> String {
    given_names()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .cloned()
        .unwrap_or_else(|| path.display().to_string())
}

/// Registers one `--object` value; objects other than secrets are accepted and ignored.
fn add_object(text: &str) -> Result<(), String> {
    let mut parts = text.split(',');
    let kind = parts.next().unwrap_or_default();
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind != "secret" {
        return Ok(());
    }
    let mut fields = HashMap::new();
    for p in parts {
        let (k, v) = p.split_once('=').unwrap_or((p, "on"));
        fields.insert(k.to_owned(), v.to_owned());
    }
    let id = fields.get("id").ok_or("Parameter 'id' is missing")?.clone();
    let raw = match (fields.get("data"), fields.get("file")) {
        (Some(d), None) => d.clone().into_bytes(),
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| format!("Unable to read {f}: {}", crate::source::io_text(&e)))?,
        (Some(_), Some(_)) => return Err("'data' and 'file' are mutually exclusive".into()),
        (None, None) => return Err("Either 'data' or 'file' must be provided".into()),
    };
    let bytes = match fields.get("format").map(String::as_str) {
        None | Some("raw") => raw,
        Some("base64") => base64_decode(&raw).ok_or("Invalid base64 data")?,
        Some(other) => return Err(format!("Invalid parameter value for 'format': {other}")),
    };
    secrets()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, Secret::new(bytes));
    Ok(())
}

fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in text
        .iter()
        .filter(|c| !c.is_ascii_whitespace() && **c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The secret with this id, or QEMU's message.
pub fn lookup(id: &str) -> Result<Secret, String> {
    secrets()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .cloned()
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// The key secret ids an option map names, by depth (`encrypt.key-secret`, then
/// `backing.encrypt.key-secret`, ...).
pub fn key_ids(options: &Options) -> Vec<Option<String>> {
    let mut ids = Vec::new();
    let mut prefix = String::new();
    for _ in 0..16 {
        ids.push(options.get(&format!("{prefix}encrypt.key-secret")).cloned());
        prefix.push_str("backing.");
    }
    while ids.last().is_some_and(Option::is_none) {
        ids.pop();
    }
    ids
}

/// The secrets for key ids, each looked up.
pub fn resolve(ids: &[Option<String>]) -> Result<Vec<Option<Secret>>, String> {
    ids.iter()
        .map(|id| id.as_deref().map(lookup).transpose())
        .collect()
}

/// The keys for the chain opened from `path`, as an `--image-opts` string given to a command
/// without image options of its own named them (a secret id without `--object` is no key).
pub fn keys_for_path(path: &Path) -> Vec<Option<Secret>> {
    let keys = file_keys().lock().unwrap_or_else(|e| e.into_inner());
    keys.get(path)
        .map(|ids| {
            ids.iter()
                .map(|id| id.as_deref().and_then(|id| lookup(id).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Options that take a value, for the commands whose `--image-opts` is handled here: their
/// values are never image option strings.
const VALUE_FLAGS: &[&str] = &[
    "-o", "-f", "-F", "-O", "-b", "-B", "-t", "-T", "-r", "-l", "-s", "-S", "-m", "-a", "-W",
    "--output", "--object",
];

/// Takes `--object` values off `argv` (registering the secrets) and, for `subcommand`s that
/// have no `--image-opts` of their own, replaces each image option string by the file it names
/// (the keys an option string names are registered for every command).
pub fn preprocess(
    argv: &mut Vec<std::ffi::OsString>,
    subcommand: Option<&str>,
) -> Result<(), String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut iter = std::mem::take(argv).into_iter();
    if let Some(first) = iter.next() {
        out.push(first);
    }
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy().into_owned();
        if text == "--object" {
            if let Some(value) = iter.next() {
                add_object(&value.to_string_lossy())?;
            }
            continue;
        }
        if let Some(value) = text.strip_prefix("--object=") {
            add_object(value)?;
            continue;
        }
        out.push(arg);
    }
    // These take `--image-opts` themselves; their option strings still give their keys here.
    let native = matches!(subcommand, Some("io" | "info" | "create" | "amend") | None);
    if out.iter().any(|a| a == "--image-opts") {
        let mut rewritten = false;
        for i in 1..out.len() {
            let prev = out[i - 1].to_string_lossy().into_owned();
            if VALUE_FLAGS.contains(&prev.as_str()) {
                continue;
            }
            let text = out[i].to_string_lossy().into_owned();
            if text.starts_with('-') || !text.contains('=') {
                continue;
            }
            let mut options = Options::new();
            if crate::io::open::parse_option_string(&text, &mut options).is_err() {
                continue;
            }
            let Some(file) = options
                .get("file.filename")
                .or_else(|| options.get("filename"))
                .cloned()
            else {
                continue;
            };
            file_keys()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(PathBuf::from(&file), key_ids(&options));
            given_names()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(PathBuf::from(&file), text);
            if !native {
                out[i] = file.into();
                rewritten = true;
            }
        }
        // Without an option string the flag stays, for the command to refuse as it does.
        if rewritten {
            out.retain(|a| a != "--image-opts");
        }
    }
    *argv = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_image_options_come_off_the_command_line() {
        let mut argv: Vec<std::ffi::OsString> = [
            "qemu-img",
            "check",
            "--object",
            "secret,id=k0,data=pw",
            "--image-opts",
            "driver=qcow2,file.filename=/x/a.qcow2,encrypt.key-secret=k0",
        ]
        .iter()
        .map(Into::into)
        .collect();
        preprocess(&mut argv, Some("check")).unwrap();
        assert_eq!(argv, vec!["qemu-img", "check", "/x/a.qcow2"]);
        let keys = keys_for_path(Path::new("/x/a.qcow2"));
        assert_eq!(keys, vec![Some(Secret::new("pw"))]);
        assert_eq!(lookup("nope").unwrap_err(), "No secret with id 'nope'");
        add_object("secret,id=b,data=aGVsbG8=,format=base64").unwrap();
        assert_eq!(lookup("b").unwrap(), Secret::new("hello"));
    }
}
