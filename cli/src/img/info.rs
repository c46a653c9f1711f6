//! `info`: what `qemu-img info` shows, in its human layout or its JSON keys and key order.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcow2::format::features::Autoclear;
use qcow2::{Image, ImageInfo, OpenOptions};

use crate::img::snapshot::snapshot_table;
use crate::io::open::{parse_option_string, OpenSpec, Options};
use crate::nodes::backing_json::is_json;
use crate::output::{size_to_str, Json, OutputFormat};
use crate::source::{format_of, open_image, resolve_relative, CmdResult, Failure, Format};

/// The deepest chain `--backing-chain` walks (QEMU's own limit is 16 for opens).
const MAX_CHAIN: usize = 64;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// The file argument is an option string (`driver=qcow2,file.filename=a.qcow2`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// The image: a path, a `json:{...}` filename, or with `--image-opts` an option string.
    file: PathBuf,
}

/// One persistent dirty bitmap, as qemu-img lists it.
pub struct Bitmap {
    name: String,
    granularity: u64,
    in_use: bool,
    auto: bool,
}

/// What one image of the chain shows.
struct Facts {
    /// The image as qemu-img names it: its file, or the `json:` name options made necessary.
    name: String,
    filename: String,
    virtual_size: u64,
    file_length: u64,
    actual_size: u64,
    qcow2: Option<(ImageInfo, Option<Vec<Bitmap>>)>,
    full_backing: Option<PathBuf>,
    /// The file node, when it is a quorum rather than a host file.
    quorum: Option<Quorum>,
}

/// A quorum file node, as qemu-img shows it: its own name and size, and each child file.
struct Quorum {
    name: String,
    length: u64,
    /// Each child: its file name, length and disk size.
    children: Vec<(String, u64, u64)>,
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    if let Some(facts) = over_quorum(&args).map_err(|m| Failure::new(1, m))? {
        print(&args, vec![facts]);
        return Ok(0);
    }
    let mut chain = Vec::new();
    let (top, name, mut forced) = first_image(&args).map_err(|m| Failure::new(1, m))?;
    let mut path = top.clone();
    // qemu-img names the first image of the chain that comes round again.
    let mut seen = std::collections::HashSet::new();
    loop {
        // A `json:` backing name describes the layer's file rather than naming it.
        let mut described = None;
        if let Some(json) = path.to_str().filter(|p| is_json(p)).map(str::to_owned) {
            let (file, driver, options) = crate::nodes::backing_json::described_file(&json)
                .map_err(|e| Failure::new(1, format!("Could not open '{json}': {e}")))?;
            forced = forced.or(driver);
            described = Some(described_name(&options, &file));
            path = PathBuf::from(file);
            crate::source::may_follow(&top, &path).map_err(|m| Failure::new(1, m))?;
        }
        if !seen.insert(std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
            return Err(Failure::new(
                1,
                format!(
                    "Backing file '{}' creates an infinite loop.",
                    path.display()
                ),
            ));
        }
        let mut facts = gather(&path, forced.as_deref()).map_err(|m| Failure::new(1, m))?;
        if chain.is_empty() {
            facts.name.clone_from(&name);
        } else if let Some(described) = described {
            facts.name = described;
        }
        let next = facts.full_backing.clone();
        forced = facts
            .qcow2
            .as_ref()
            .and_then(|(info, _)| info.backing_format.clone());
        chain.push(facts);
        match next {
            Some(next) if args.backing_chain => {
                if chain.len() >= MAX_CHAIN {
                    return Err(Failure::new(1, "Backing chain is too deep"));
                }
                if !next.to_str().is_some_and(is_json) {
                    crate::source::may_follow(&top, &next).map_err(|m| Failure::new(1, m))?;
                }
                path = next;
            }
            _ => break,
        }
    }
    print(&args, chain);
    Ok(0)
}

/// Prints the chain's facts as `--output` asks.
fn print(args: &Args, chain: Vec<Facts>) {
    match args.output {
        OutputFormat::Json => {
            let mut items: Vec<Json> = chain.iter().map(to_json).collect();
            let json = if args.backing_chain {
                Json::Arr(items)
            } else {
                items.remove(0)
            };
            outln!("{}", json.pretty());
        }
        OutputFormat::Human => {
            let blocks: Vec<String> = chain.iter().map(to_human).collect();
            out!("{}", blocks.join("\n"));
        }
    }
}

/// A qcow2 image whose file is a quorum node: the image alone (no directory resolves its
/// backing file name, so qemu-img cannot determine the backing file's path either).
fn over_quorum(args: &Args) -> Result<Option<Facts>, String> {
    let given = args.file.to_string_lossy();
    let mut options = Options::new();
    if args.image_opts {
        parse_option_string(&given, &mut options)?;
    } else if given.starts_with("json:") {
        crate::io::open::parse_json_filename(&given, &mut options)?;
    }
    if options.get("file.driver").is_none_or(|d| d != "quorum") {
        return Ok(None);
    }
    let fail = |e: String| format!("Could not open '{given}': {e}");
    if options
        .get("driver")
        .or(args.format.as_ref())
        .is_some_and(|d| d != "qcow2")
    {
        return Err(fail(
            "only qcow2 images over a quorum node are supported".into(),
        ));
    }
    let store = crate::nodes::store::open(&options, "file.", "file", false).map_err(fail)?;
    let length = store.len().map_err(|e| fail(crate::source::io_text(&e)))?;
    let image = Image::from_storage(store, &given, &OpenOptions::metadata_only())
        .map_err(|e| fail(crate::source::open_error_text(&e)))?;
    let info = image.info();
    let bitmaps = read_bitmaps(&image)?;
    // Each child file, as QEMU lists them (the last added first).
    let mut children = Vec::new();
    let mut child_names = Vec::new();
    for i in 0.. {
        let Some(file) = quorum_child_file(&options, i) else {
            break;
        };
        let meta = std::fs::metadata(&file).map_err(|e| fail(crate::source::io_text(&e)))?;
        child_names.push(format!(
            "{{\"driver\": \"file\", \"filename\": {}}}",
            serde_json::Value::from(file.clone())
        ));
        children.push((file, meta.len(), meta.blocks() * 512));
    }
    children.reverse();
    let threshold = options
        .get("file.vote-threshold")
        .cloned()
        .unwrap_or_default();
    let quorum_name = format!(
        "json:{{\"children\": [{}], \"driver\": \"quorum\", \"vote-threshold\": {threshold}}}",
        child_names.join(", ")
    );
    let actual_size = children.iter().map(|c| c.2).sum();
    // qemu-img names the image by its options, rebuilt in its own layout; the file node is all
    // there is besides the driver.
    let only_file = options
        .keys()
        .all(|k| k == "driver" || k.starts_with("file."));
    let name = if only_file {
        let body = quorum_name.strip_prefix("json:").unwrap_or(&quorum_name);
        format!("json:{{\"driver\": \"qcow2\", \"file\": {body}}}")
    } else {
        given.into_owned()
    };
    // The node is as long as its children, in whole sectors.
    let length = length.next_multiple_of(512);
    Ok(Some(Facts {
        name,
        filename: quorum_name.clone(),
        virtual_size: info.virtual_size,
        file_length: length,
        actual_size,
        qcow2: Some((info, bitmaps)),
        full_backing: None,
        quorum: Some(Quorum {
            name: quorum_name,
            length,
            children,
        }),
    }))
}

/// The host file of quorum child `i`, from a `json:` array or `children.N.` options.
fn quorum_child_file(options: &Options, i: usize) -> Option<String> {
    if let Some(list) = options.get("file.children") {
        let list: Vec<serde_json::Value> = serde_json::from_str(list).ok()?;
        return list.get(i)?.get("filename")?.as_str().map(str::to_owned);
    }
    options.get(&format!("file.children.{i}.filename")).cloned()
}

/// The top image's file, the name to show for it, and its format, from the file argument.
fn first_image(args: &Args) -> Result<(PathBuf, String, Option<String>), String> {
    let given = args.file.to_string_lossy();
    let spec = if args.image_opts {
        if args.format.is_some() {
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        let mut options = Options::new();
        parse_option_string(&given, &mut options)?;
        OpenSpec {
            options,
            ..OpenSpec::default()
        }
    } else if given.starts_with("json:") {
        OpenSpec::from_filename(&given, Options::new())?
    } else {
        let path = crate::source::file_protocol_path(&given);
        return Ok((PathBuf::from(&path), path, args.format.clone()));
    };
    let (file, driver) = spec
        .resolve()
        .map_err(|e| format!("Could not open '{given}': {e}"))?;
    let name = described_name(&spec.options, &file);
    Ok((
        PathBuf::from(file),
        name,
        driver.or_else(|| args.format.clone()),
    ))
}

/// The name qemu-img gives an image opened from options: options that only say where the file
/// is and which driver reads it name the image by its file; anything more keeps the options in
/// the name.
fn described_name(options: &Options, file: &str) -> String {
    let plain = options.iter().all(|(k, v)| match k.as_str() {
        "driver" | "file.filename" | "filename" | "data-file.filename" => true,
        "file.driver" => v == "file",
        _ => false,
    });
    if plain {
        file.to_owned()
    } else {
        json_name(options)
    }
}

fn gather(path: &Path, forced: Option<&str>) -> Result<Facts, String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let shown = path.display();
        format!(
            "Could not open '{shown}': Could not open '{shown}': {}",
            crate::source::io_text(&e)
        )
    })?;
    let actual_size = meta.blocks() * 512;
    let filename = path.display().to_string();
    match format_of(path, forced)? {
        Format::Raw => Ok(Facts {
            name: filename.clone(),
            filename,
            // QEMU sees a raw file in whole sectors.
            virtual_size: meta.len().next_multiple_of(512),
            file_length: meta.len(),
            actual_size,
            qcow2: None,
            full_backing: None,
            quorum: None,
        }),
        Format::Qcow2 => {
            let image = open_image(path, &OpenOptions::metadata_only().without_key(true))?;
            let info = image.info();
            let bitmaps = read_bitmaps(&image)?;
            // A `json:` name stays as it is: it resolves against the working directory.
            let full_backing = info.backing_file.as_deref().map(|b| {
                if is_json(b) {
                    PathBuf::from(b)
                } else {
                    resolve_relative(path, b)
                }
            });
            Ok(Facts {
                name: filename.clone(),
                filename,
                virtual_size: info.virtual_size,
                file_length: info.file_length,
                actual_size,
                qcow2: Some((info, bitmaps)),
                full_backing,
                quorum: None,
            })
        }
    }
}

/// The persistent bitmaps, as the library read and validated them at open.
pub fn read_bitmaps(image: &Image) -> Result<Option<Vec<Bitmap>>, String> {
    let header = image.header();
    if header.extensions.bitmaps.is_none() || header.autoclear_features & Autoclear::BITMAPS == 0 {
        return Ok(None);
    }
    Ok(Some(
        image
            .bitmaps()
            .into_iter()
            .map(|b| Bitmap {
                name: b.name,
                granularity: b.granularity,
                in_use: b.in_use,
                auto: b.enabled,
            })
            .collect(),
    ))
}

fn bitmap_flags(b: &Bitmap) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    flags
}

/// qemu-img info's JSON object, keys in qemu-img's order.
fn to_json(f: &Facts) -> Json {
    let mut file_child = Json::obj();
    file_child.push("children", Json::Arr(vec![]));
    // The file protocol reports its length in whole 512-byte sectors.
    file_child.push("virtual-size", f.file_length.next_multiple_of(512));
    file_child.push("filename", f.filename.as_str());
    file_child.push("format", "file");
    file_child.push("actual-size", f.actual_size);
    let mut file_specific = Json::obj();
    file_specific.push("type", "file");
    file_specific.push("data", Json::obj());
    file_child.push("format-specific", file_specific);
    file_child.push("dirty-flag", false);
    if let Some(q) = &f.quorum {
        let count = q.children.len();
        let children = q
            .children
            .iter()
            .enumerate()
            .map(|(k, (file, len, actual))| {
                let mut info = Json::obj();
                info.push("children", Json::Arr(vec![]));
                info.push("virtual-size", len.next_multiple_of(512));
                info.push("filename", file.as_str());
                info.push("format", "file");
                info.push("actual-size", *actual);
                let mut specific = Json::obj();
                specific.push("type", "file");
                specific.push("data", Json::obj());
                info.push("format-specific", specific);
                info.push("dirty-flag", false);
                let mut child = Json::obj();
                child.push("name", format!("children.{}", count - 1 - k));
                child.push("info", info);
                child
            })
            .collect();
        file_child = Json::obj();
        file_child.push("children", Json::Arr(children));
        file_child.push("virtual-size", q.length);
        file_child.push("filename", q.name.as_str());
        file_child.push("format", "quorum");
        file_child.push("actual-size", f.actual_size);
    }
    let mut child = Json::obj();
    child.push("name", "file");
    child.push("info", file_child);

    let mut o = Json::obj();
    o.push("children", Json::Arr(vec![child]));
    let Some((info, bitmaps)) = &f.qcow2 else {
        o.push("virtual-size", f.virtual_size);
        o.push("filename", f.name.as_str());
        o.push("format", "raw");
        o.push("actual-size", f.actual_size);
        o.push("dirty-flag", false);
        return o;
    };
    if !info.snapshots.is_empty() {
        let snaps = info
            .snapshots
            .iter()
            .map(|s| {
                let mut j = Json::obj();
                if let Some(icount) = s.icount {
                    j.push("icount", icount);
                }
                j.push("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                j.push("name", s.name.as_str());
                j.push("date-sec", u64::from(s.date_sec));
                j.push("date-nsec", s.date_nsec);
                j.push("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                j.push("id", s.id.as_str());
                j.push("vm-state-size", s.vm_state_size);
                j
            })
            .collect::<Vec<_>>();
        o.push("snapshots", Json::Arr(snaps));
    }
    if let Some(fmt) = &info.backing_format {
        o.push("backing-filename-format", fmt.as_str());
    }
    o.push("virtual-size", info.virtual_size);
    o.push("filename", f.name.as_str());
    o.push("cluster-size", info.cluster_size);
    o.push("format", "qcow2");
    o.push("actual-size", f.actual_size);

    let mut data = Json::obj();
    data.push("compat", info.compat);
    data.push("compression-type", info.compression_type);
    let v3 = info.compat != "0.10";
    if v3 {
        data.push("lazy-refcounts", info.lazy_refcounts);
        if let Some(bitmaps) = bitmaps {
            let list = bitmaps
                .iter()
                .map(|b| {
                    let mut j = Json::obj();
                    let flags = bitmap_flags(b)
                        .into_iter()
                        .map(Json::from)
                        .collect::<Vec<_>>();
                    j.push("flags", Json::Arr(flags));
                    j.push("name", b.name.as_str());
                    j.push("granularity", b.granularity);
                    j
                })
                .collect::<Vec<_>>();
            data.push("bitmaps", Json::Arr(list));
        }
    }
    data.push("refcount-bits", info.refcount_bits);
    if let Some(encrypt) = encrypt_json(info) {
        data.push("encrypt", encrypt);
    }
    if v3 {
        if let Some(data_file) = &info.data_file {
            data.push("data-file", data_file.as_str());
        }
        if info.has_data_file {
            data.push("data-file-raw", info.data_file_raw);
        }
        data.push("corrupt", info.corrupt);
        data.push("extended-l2", info.extended_l2);
    }
    let mut specific = Json::obj();
    specific.push("type", "qcow2");
    specific.push("data", data);
    o.push("format-specific", specific);
    if info.encryption_format.is_some() {
        o.push("encrypted", true);
    }
    if let Some(full) = &f.full_backing {
        o.push("full-backing-filename", full.display().to_string());
    }
    if let Some(backing) = &info.backing_file {
        o.push("backing-filename", backing.as_str());
    }
    o.push("dirty-flag", info.dirty);
    o
}

/// qemu-img info's human block for one image.
fn to_human(f: &Facts) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        f.name,
        if f.qcow2.is_some() { "qcow2" } else { "raw" },
        size_to_str(f.virtual_size),
        f.virtual_size,
        size_to_str(f.actual_size)
    );
    if let Some((info, bitmaps)) = &f.qcow2 {
        if info.encryption_format.is_some() {
            s += "encrypted: yes\n";
        }
        s += &format!("cluster_size: {}\n", info.cluster_size);
        if info.dirty {
            s += "cleanly shut down: no\n";
        }
        if let Some(backing) = &info.backing_file {
            s += &format!("backing file: {backing}");
            match &f.full_backing {
                Some(full) => {
                    let full = full.display().to_string();
                    if &full != backing {
                        s += &format!(" (actual path: {full})");
                    }
                }
                None => s += " (cannot determine actual path)",
            }
            s += "\n";
        }
        if let Some(fmt) = &info.backing_format {
            s += &format!("backing file format: {fmt}\n");
        }
        if !info.snapshots.is_empty() {
            s += "Snapshot list:\n";
            s += &snapshot_table(&info.snapshots);
        }
        s += &format_specific(info, bitmaps.as_deref());
    }
    if let Some(q) = &f.quorum {
        s += &format!(
            "Child node '/file':\n    image: {}\n    file format: quorum\n    virtual size: {} ({} bytes)\n    disk size: {}\n",
            q.name,
            size_to_str(q.length),
            q.length,
            size_to_str(f.actual_size)
        );
        let count = q.children.len();
        for (k, (file, len, actual)) in q.children.iter().enumerate() {
            s += &format!(
                "    Child node '/file/children.{}':\n        filename: {file}\n        protocol type: file\n        file length: {} ({} bytes)\n        disk size: {}\n",
                count - 1 - k,
                size_to_str(len.next_multiple_of(512)),
                len.next_multiple_of(512),
                size_to_str(*actual)
            );
        }
        return s;
    }
    s += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
        f.filename,
        size_to_str(f.file_length.next_multiple_of(512)),
        f.file_length.next_multiple_of(512),
        size_to_str(f.actual_size)
    );
    s
}

/// The qcow2 part of qemu-img info's human output (qemu-io's `info` prints the same).
pub fn format_specific(info: &ImageInfo, bitmaps: Option<&[Bitmap]>) -> String {
    let mut s = String::new();
    s += "Format specific information:\n";
    s += &format!("    compat: {}\n", info.compat);
    s += &format!("    compression type: {}\n", info.compression_type);
    let v3 = info.compat != "0.10";
    if v3 {
        s += &format!("    lazy refcounts: {}\n", info.lazy_refcounts);
        if let Some(bitmaps) = bitmaps {
            s += "    bitmaps:\n";
            for (i, b) in bitmaps.iter().enumerate() {
                s += &format!("        [{i}]:\n            flags:\n");
                for (j, flag) in bitmap_flags(b).iter().enumerate() {
                    s += &format!("                [{j}]: {flag}\n");
                }
                s += &format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                );
            }
        }
    }
    s += &format!("    refcount bits: {}\n", info.refcount_bits);
    s += &encrypt_human(info);
    if v3 {
        if let Some(data_file) = &info.data_file {
            s += &format!("    data file: {data_file}\n");
        }
        if info.has_data_file {
            s += &format!("    data file raw: {}\n", info.data_file_raw);
        }
        s += &format!("    corrupt: {}\n", info.corrupt);
        s += &format!("    extended l2: {}\n", info.extended_l2);
    }
    s
}

/// The `encrypt` fields of qemu-img info, in its order: (name, value) pairs and the key slots.
fn encrypt_fields(info: &ImageInfo) -> Option<(Vec<EncField>, Vec<SlotFields>)> {
    let format = info.encryption_format?;
    let Some(luks) = &info.luks else {
        return Some((
            vec![("format", EncValue::Str(format.to_owned()))],
            Vec::new(),
        ));
    };
    let mut f = vec![("ivgen alg", EncValue::Str(luks.ivgen_alg.name().to_owned()))];
    if let Some(h) = luks
        .ivgen_hash
        .filter(|_| luks.ivgen_alg == qcow2::crypto::IvGenAlg::Essiv)
    {
        f.push(("ivgen hash alg", EncValue::Str(h.name().to_owned())));
    }
    f.push(("detached header", EncValue::Bool(false)));
    f.push(("hash alg", EncValue::Str(luks.hash_alg.name().to_owned())));
    f.push((
        "cipher alg",
        EncValue::Str(luks.cipher_alg.name().to_owned()),
    ));
    f.push(("uuid", EncValue::Str(luks.uuid.clone())));
    f.push(("format", EncValue::Str(format.to_owned())));
    f.push((
        "cipher mode",
        EncValue::Str(luks.cipher_mode.name().to_owned()),
    ));
    let slots = luks
        .slots
        .iter()
        .map(|slot| SlotFields {
            active: slot.active,
            iters: slot.iterations,
            key_offset: slot.key_offset_sector as u64 * 512,
            stripes: slot.stripes,
        })
        .collect();
    Some((f, slots))
}

/// One `encrypt` field: its human name and value.
type EncField = (&'static str, EncValue);

enum EncValue {
    Str(String),
    Bool(bool),
}

struct SlotFields {
    active: bool,
    iters: u32,
    key_offset: u64,
    stripes: u32,
}

/// The `encrypt:` block of the human output.
fn encrypt_human(info: &ImageInfo) -> String {
    let Some((fields, slots)) = encrypt_fields(info) else {
        return String::new();
    };
    let mut s = String::from("    encrypt:\n");
    let show = |v: &EncValue| match v {
        EncValue::Str(t) => t.clone(),
        EncValue::Bool(b) => b.to_string(),
    };
    for (name, value) in &fields {
        s += &format!("        {name}: {}\n", show(value));
    }
    if let Some(luks) = &info.luks {
        s += "        slots:\n";
        for (i, slot) in slots.iter().enumerate() {
            s += &format!(
                "            [{i}]:\n                active: {}\n",
                slot.active
            );
            if slot.active {
                s += &format!("                iters: {}\n", slot.iters);
            }
            s += &format!("                key offset: {}\n", slot.key_offset);
            if slot.active {
                s += &format!("                stripes: {}\n", slot.stripes);
            }
        }
        s += &format!(
            "        payload offset: {}\n        master key iters: {}\n",
            luks.area_len(),
            luks.master_key_iterations
        );
    }
    s
}

/// The `encrypt` object of the JSON output.
fn encrypt_json(info: &ImageInfo) -> Option<Json> {
    let (fields, slots) = encrypt_fields(info)?;
    let mut o = Json::obj();
    for (name, value) in fields {
        let key = name.replace(' ', "-");
        match value {
            EncValue::Str(t) => o.push(&key, t.as_str()),
            EncValue::Bool(b) => o.push(&key, b),
        }
    }
    if let Some(luks) = &info.luks {
        let list = slots
            .iter()
            .map(|slot| {
                let mut j = Json::obj();
                j.push("active", slot.active);
                if slot.active {
                    j.push("iters", u64::from(slot.iters));
                }
                j.push("key-offset", slot.key_offset);
                if slot.active {
                    j.push("stripes", u64::from(slot.stripes));
                }
                j
            })
            .collect::<Vec<_>>();
        o.push("slots", Json::Arr(list));
        o.push("payload-offset", luks.area_len());
        o.push("master-key-iters", u64::from(luks.master_key_iterations));
    }
    Some(o)
}

/// QEMU's `json:{...}` name for an image opened from options: nested objects for dotted keys
/// (`file.filename` becomes `"file": {"filename": ...}`), the file's driver made explicit.
fn json_name(options: &crate::io::open::Options) -> String {
    fn insert(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, value: &str) {
        match key.split_once('.') {
            Some((head, rest)) => {
                let child = obj
                    .entry(head.to_owned())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let serde_json::Value::Object(map) = child {
                    insert(map, rest, value);
                }
            }
            None => {
                obj.insert(key.to_owned(), serde_json::Value::String(value.to_owned()));
            }
        }
    }
    let mut obj = serde_json::Map::new();
    for (k, v) in options {
        insert(&mut obj, k, v);
    }
    if let Some(serde_json::Value::Object(file)) = obj.get_mut("file") {
        file.entry("driver")
            .or_insert_with(|| serde_json::Value::String("file".into()));
    }
    format!("json:{}", serde_json::Value::Object(obj))
}
