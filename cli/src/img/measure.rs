//! `measure`: how large a new image would be, as `qemu-img measure` prints it (`required size`,
//! `fully allocated size`, and `bitmaps size` when a qcow2 v3 target could keep the source's
//! bitmaps). The arithmetic lives in the library (`qcow2::image::measure`).

use std::path::PathBuf;

use qcow2::image::{measure, Extent, MeasureTarget};
use qcow2::OpenOptions;

use crate::output::OutputFormat;
use crate::source::{format_of, open_image, CmdResult, Failure, Format, RawFile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go, as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Source format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Target format (raw unless given).
    #[arg(short = 'O')]
    target_format: Option<String>,
    /// Target creation options, as `create -o`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a new, empty image of this size instead of a source image.
    #[arg(long = "size")]
    size: Option<String>,
    /// Measure this internal snapshot of the source.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// The source image.
    file: Option<PathBuf>,
}

/// A raw file's data and holes as extents (holes read as zeros), as QEMU's block status sees
/// them through `SEEK_DATA`/`SEEK_HOLE`.
fn raw_extents(path: &std::path::Path, size: u64) -> Result<Vec<Extent>, String> {
    use qcow2::storage::Storage;
    let file = qcow2::FileStorage::open_read_only(path)
        .map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let (hole, n) = file
            .hole_at(at, size - at)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .unwrap_or((false, size - at));
        let n = n.clamp(1, size - at);
        let kind = if hole {
            qcow2::ExtentKind::Zero {
                host_offset: Some(at),
            }
        } else {
            qcow2::ExtentKind::Data { host_offset: at }
        };
        out.push(Extent {
            start: at,
            length: n,
            depth: 0,
            kind,
        });
        at += n;
    }
    Ok(out)
}

pub fn run(args: Args) -> CmdResult {
    crate::source::set_force_share(args.force_share);
    let fail = |m: String| Failure::new(1, m);
    let size_arg = match (&args.size, &args.file) {
        (Some(_), Some(_)) => {
            return Err(fail(
                "--size N cannot be used together with a filename.".into(),
            ))
        }
        (None, None) => {
            return Err(fail(
                "Either --size N or one filename must be specified.".into(),
            ))
        }
        (Some(s), None) => Some(crate::img::create::parse_image_size(s).map_err(fail)?),
        (None, Some(_)) => None,
    };
    // The source: its size, its extents (qcow2) and whether it can carry bitmaps.
    let mut source: Option<(u64, Option<Vec<Extent>>, Option<qcow2::Image>)> = None;
    if let Some(path) = &args.file {
        match format_of(path, args.format.as_deref()).map_err(fail)? {
            Format::Qcow2 => {
                let image = open_image(path, &OpenOptions::default()).map_err(fail)?;
                let (size, extents) = match &args.snapshot {
                    Some(name) => {
                        let view = image.open_snapshot(name).map_err(|_| {
                            fail("Failed to load snapshot: Can't find snapshot".into())
                        })?;
                        let size = view.size();
                        (size, view.map(0, size).map_err(|e| fail(e.to_string()))?)
                    }
                    None => {
                        let size = image.size();
                        (size, image.map(0, size).map_err(|e| fail(e.to_string()))?)
                    }
                };
                source = Some((size, Some(extents), Some(image)));
            }
            Format::Raw => {
                let raw = RawFile::open(path, false).map_err(fail)?;
                let size = crate::source::Guest::size(&raw);
                let extents = raw_extents(path, size).map_err(fail)?;
                source = Some((size, Some(extents), None));
            }
        }
    }
    let size = size_arg.or(source.as_ref().map(|s| s.0)).unwrap_or(0);
    let (required, fully, bitmaps) = match args.target_format.as_deref().unwrap_or("raw") {
        "raw" => {
            crate::opts::parse_raw(&args.options).map_err(|(m, _)| fail(m))?;
            let bytes = size.next_multiple_of(512);
            (bytes, bytes, None)
        }
        "qcow2" => {
            let mut opts = crate::opts::parse(&args.options).map_err(|(m, _)| fail(m))?;
            let all_data = matches!(opts.preallocation.as_deref(), Some("falloc" | "full"))
                || opts.backing_file.is_some();
            // Preallocation changes only what counts as written; the rest validates as create.
            if matches!(opts.preallocation.as_deref(), Some("falloc" | "full")) {
                opts.preallocation = None;
            }
            let options = opts.to_create_options(size.max(512)).map_err(|e| {
                fail(if e == crate::opts::IMAGE_TOO_LARGE {
                    "The image size is too large (try using a larger cluster size)".into()
                } else {
                    e
                })
            })?;
            let target = MeasureTarget::new(options.cluster_size)
                .refcount_bits(options.refcount_bits)
                .extended_l2(options.extended_l2)
                .all_data(all_data);
            let extents = source.as_ref().and_then(|s| s.1.as_deref());
            let m = measure(size, extents, &target);
            // Bitmaps only where both ends can hold them: a qcow2 source, a v3 target.
            let bitmaps = match source.as_ref().and_then(|s| s.2.as_ref()) {
                Some(image) if options.version >= 3 => {
                    Some(image.bitmaps_size(options.cluster_size))
                }
                _ => None,
            };
            (m.required, m.fully_allocated, bitmaps)
        }
        other => return Err(fail(format!("Unknown file format '{other}'"))),
    };
    match args.output {
        OutputFormat::Human => {
            outln!("required size: {required}");
            outln!("fully allocated size: {fully}");
            if let Some(b) = bitmaps {
                outln!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            outln!("{{");
            if let Some(b) = bitmaps {
                outln!("    \"bitmaps\": {b},");
            }
            outln!("    \"required\": {required},");
            outln!("    \"fully-allocated\": {fully}");
            outln!("}}");
        }
    }
    Ok(0)
}
