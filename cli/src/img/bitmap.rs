//! `bitmap`: persistent dirty bitmaps, as `qemu-img bitmap` changes them. The operations run in
//! the order given, each through the library's crash-safe bitmap calls, with qemu-img's messages
//! (`Operation OP on bitmap NAME failed: ...`) and exit codes.

use std::path::PathBuf;

use qcow2::{Image, OpenOptions};

use crate::size::parse_size;
use crate::source::{open_image, CmdResult, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `(--add [-g GRAN] [--disable] | --remove | --clear | --enable | --disable | --merge SRC
    /// [-b SRC_IMAGE [-F FMT]])... [-f FMT] FILE BITMAP`, in qemu-img's order.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// One requested change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

struct Parsed {
    ops: Vec<Op>,
    granularity: Option<String>,
    source: Option<PathBuf>,
    source_format: Option<String>,
    format: Option<String>,
    file: PathBuf,
    bitmap: String,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut ops = Vec::new();
    let (mut granularity, mut source, mut source_format, mut format) = (None, None, None, None);
    let mut positional = Vec::new();
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<'_, String>, flag: &str| {
        it.next()
            .cloned()
            .ok_or_else(|| format!("option '{flag}' requires an argument"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--add" => ops.push(Op::Add),
            "--remove" => ops.push(Op::Remove),
            "--clear" => ops.push(Op::Clear),
            "--enable" => ops.push(Op::Enable),
            "--disable" => ops.push(Op::Disable),
            "--merge" => ops.push(Op::Merge(value(&mut it, "--merge")?)),
            "-g" | "--granularity" => granularity = Some(value(&mut it, a)?),
            "-b" | "--source-file" => source = Some(PathBuf::from(value(&mut it, a)?)),
            "-F" | "--source-format" => source_format = Some(value(&mut it, a)?),
            "-f" => format = Some(value(&mut it, a)?),
            "-q" => {}
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!("unrecognized option '{s}'"))
            }
            _ => positional.push(a.clone()),
        }
    }
    if ops.is_empty() {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        );
    }
    if granularity.is_some() && !ops.contains(&Op::Add) {
        return Err("granularity only supported with --add".into());
    }
    if source.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err("-b requires --merge".into());
    }
    let [file, bitmap]: [String; 2] = positional
        .try_into()
        .map_err(|_| "Expecting filename and bitmap name".to_string())?;
    Ok(Parsed {
        ops,
        granularity,
        source,
        source_format,
        format,
        file: PathBuf::from(file),
        bitmap,
    })
}

pub fn run(args: Args) -> CmdResult {
    let fail = |m: String| Failure::new(1, m);
    let p = parse(&args.args).map_err(fail)?;
    if p.format.as_deref().is_some_and(|f| f != "qcow2") {
        return Err(fail(format!(
            "Format '{}' does not support persistent bitmaps",
            p.format.unwrap_or_default()
        )));
    }
    if p.source_format.as_deref().is_some_and(|f| f != "qcow2") {
        return Err(fail(format!(
            "Format '{}' does not support persistent bitmaps",
            p.source_format.clone().unwrap_or_default()
        )));
    }
    let granularity = match &p.granularity {
        Some(g) => Some(
            parse_size(g)
                .map_err(|_| fail("Granularity must be power of 2 and at least 512".into()))?,
        ),
        None => None,
    };
    let image = open_image(&p.file, &OpenOptions::read_write()).map_err(fail)?;
    let source = match &p.source {
        Some(path) => Some(open_image(path, &OpenOptions::default()).map_err(fail)?),
        None => None,
    };
    let shown = p.file.display().to_string();
    for op in &p.ops {
        let done = match op {
            Op::Add => {
                let g = granularity.unwrap_or_else(|| image.default_bitmap_granularity());
                if !g.is_power_of_two() || g < 512 {
                    Err("Granularity must be power of 2 and at least 512".to_string())
                } else {
                    let disabled = p.ops.contains(&Op::Disable);
                    image.add_bitmap(&p.bitmap, g, disabled).map_err(|e| {
                        let text = reason(&e);
                        if text.contains("v2") {
                            format!(
                                "Can't make bitmap '{}' persistent in '{shown}': {text}",
                                p.bitmap
                            )
                        } else {
                            text
                        }
                    })
                }
            }
            Op::Remove => image.remove_bitmap(&p.bitmap).map_err(|e| reason(&e)),
            Op::Clear => image.clear_bitmap(&p.bitmap).map_err(|e| reason(&e)),
            Op::Enable => image
                .set_bitmap_enabled(&p.bitmap, true)
                .map_err(|e| reason(&e)),
            // With --add, --disable only decides how the new bitmap starts.
            Op::Disable if p.ops.contains(&Op::Add) => Ok(()),
            Op::Disable => image
                .set_bitmap_enabled(&p.bitmap, false)
                .map_err(|e| reason(&e)),
            Op::Merge(src) => image
                .merge_bitmap(&p.bitmap, src, source.as_ref())
                .map_err(|e| reason(&e)),
        };
        if let Err(why) = done {
            let _ = close(image);
            return Err(fail(format!(
                "Operation {} on bitmap {} failed: {why}",
                op.name(),
                p.bitmap
            )));
        }
    }
    close(image).map_err(fail)?;
    Ok(0)
}

fn close(image: Image) -> Result<(), String> {
    image.close().map_err(|e| e.to_string())
}

/// The reason alone, as qemu-img words it (the library's invalid-argument text is QEMU's).
fn reason(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::InvalidArgument { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
