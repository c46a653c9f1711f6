//! `map`: the guest-to-host mapping as `qemu-img map` prints it (JSON lines or the human table
//! of data ranges).

use std::path::PathBuf;

use qcow2::{Extent, Image, OpenOptions};

use crate::output::{Json, OutputFormat};
use crate::size::parse_size;
use crate::source::{
    format_of, open_image, resolve_relative, CmdResult, Failure, Format, Guest, RawFile,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Image format (only qcow2 is mapped).
    #[arg(short = 'f')]
    format: Option<String>,
    /// First guest offset to map.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    start_offset: u64,
    /// Most bytes to map.
    #[arg(long, value_parser = parse_size)]
    max_length: Option<u64>,
    /// The file argument is an option string (`driver=qcow2,file.filename=...`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    file: PathBuf,
}

pub fn run(mut args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let fail = |m: String| Failure::new(1, m);
    if args.image_opts {
        if args.format.is_some() {
            return Err(fail(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        // Only options that name a host file and its format (filters that change nothing the
        // map shows, like a blkdebug node without rules, fall away) are mapped.
        let given = args.file.to_string_lossy().into_owned();
        let mut options = crate::io::open::Options::new();
        crate::io::open::parse_option_string(&given, &mut options).map_err(fail)?;
        let spec = crate::io::open::OpenSpec {
            options,
            ..Default::default()
        };
        let (file, driver) = spec
            .resolve()
            .map_err(|e| fail(format!("Could not open '{given}': {e}")))?;
        args.file = PathBuf::from(file);
        args.format = driver;
    }
    if format_of(&args.file, args.format.as_deref()).map_err(fail)? == Format::Raw {
        return raw(&args);
    }
    let image = open_image(&args.file, &OpenOptions::default()).map_err(fail)?;
    let start = args.start_offset.min(image.size());
    let len = args
        .max_length
        .unwrap_or(u64::MAX)
        .min(image.size() - start);
    let extents = image.map(start, len).map_err(|e| fail(e.to_string()))?;
    match args.output {
        OutputFormat::Json => {
            let lines: Vec<String> = extents
                .iter()
                .map(|e| entry_json(e).compact_map())
                .collect();
            outln!("[{}]", lines.join(",\n"));
            Ok(0)
        }
        OutputFormat::Human => human(&image, &args.file, &extents),
    }
}

/// A raw file maps to itself as one data range (holes of sparse files are not detected); the
/// end of a last partial sector past the file's end reads as zeros, as QEMU reports it.
fn raw(args: &Args) -> CmdResult {
    let file = RawFile::open(&args.file, false).map_err(|m| Failure::new(1, m))?;
    let size = file.size();
    let file_len = std::fs::metadata(&args.file)
        .map_err(|e| Failure::new(1, format!("Could not open '{}': {e}", args.file.display())))?
        .len();
    let start = args.start_offset.min(size);
    let len = args.max_length.unwrap_or(u64::MAX).min(size - start);
    let end = start + len;
    let data_end = file_len.clamp(start, end);
    let name = args.file.display().to_string();
    let entry = |s: u64, l: u64, data: bool| {
        format!(
            "{{ \"start\": {s}, \"length\": {l}, \"depth\": 0, \"present\": true, \"zero\": {}, \"data\": {data}, \"compressed\": false, \"offset\": {s}}}",
            !data
        )
    };
    match args.output {
        OutputFormat::Json if len == 0 => outln!("[]"),
        OutputFormat::Json => {
            let mut entries = Vec::new();
            if data_end > start {
                entries.push(entry(start, data_end - start, true));
            }
            if end > data_end {
                entries.push(entry(data_end, end - data_end, false));
            }
            outln!("[{}]", entries.join(",\n"));
        }
        OutputFormat::Human => {
            outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            if data_end > start {
                let n = data_end - start;
                outln!(
                    "{:<16}{:<16}{:<16}{name}",
                    c_hex(start),
                    c_hex(n),
                    c_hex(start)
                );
            }
        }
    }
    Ok(0)
}

/// One `qemu-img map --output=json` entry.
fn entry_json(e: &Extent) -> Json {
    let mut j = Json::obj();
    j.push("start", e.start);
    j.push("length", e.length);
    j.push("depth", e.depth);
    j.push("present", e.present());
    j.push("zero", e.zero());
    j.push("data", e.data());
    j.push("compressed", e.compressed());
    if let Some(offset) = e.offset() {
        j.push("offset", offset);
    }
    j
}

impl Json {
    /// qemu-img map's entry form: `{ "start": 0, ... "offset": 5}`.
    fn compact_map(&self) -> String {
        let Json::Obj(fields) = self else {
            return self.compact();
        };
        let inner: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}: {}", crate::output::quote(k), v.compact()))
            .collect();
        format!("{{ {}}}", inner.join(", "))
    }
}

/// The file that holds data mapped at each depth of the chain.
fn files_by_depth(image: &Image, top: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = Some(image);
    let mut path = top.to_path_buf();
    while let Some(img) = current {
        let info = img.info();
        // qemu-img names a data file as the header records it (QEMU 10 opens it relative to
        // the working directory; the library resolves it against the image's directory).
        let name = match &info.data_file {
            Some(data) => data.clone(),
            None => path.display().to_string(),
        };
        names.push(name);
        match (img.backing_image(), &info.backing_file) {
            (Some(below), _) => {
                path = below.path().map(|p| p.to_path_buf()).unwrap_or_default();
                current = Some(below);
            }
            (None, Some(raw)) if img.chain_depth() > 0 => {
                names.push(resolve_relative(&path, raw).display().to_string());
                current = None;
            }
            _ => current = None,
        }
    }
    names
}

/// qemu-img map's human table: data ranges only, with the file holding them.
fn human(image: &Image, top: &std::path::Path, extents: &[Extent]) -> CmdResult {
    let files = files_by_depth(image, top);
    outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    for e in extents {
        if e.data() && e.offset().is_none() {
            return Err(Failure::new(
                1,
                "File contains external, encrypted or compressed clusters.",
            ));
        }
        if e.data() && !e.zero() {
            let file = files
                .get(e.depth as usize)
                .map(String::as_str)
                .unwrap_or("");
            outln!(
                "{:<16}{:<16}{:<16}{file}",
                c_hex(e.start),
                c_hex(e.length),
                c_hex(e.offset().unwrap_or(0))
            );
        }
    }
    Ok(0)
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
fn c_hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}
