//! `compare`: whether two disks read the same, as `qemu-img compare` decides it. Exit 0 when
//! identical, 1 when they differ (or sizes differ in strict mode), 2 on error. Ranges that read
//! as zeros in both are skipped without reading.

use std::path::PathBuf;

use crate::progress::{Progress, SKIP_TWO};
use crate::source::{is_zero, CmdResult, Failure, Guest, Input, Region};

/// Bytes compared per request.
const CHUNK: u64 = 2 << 20;
/// Guest bytes mapped per `map` call.
const MAP_WINDOW: u64 = 1 << 30;
/// qemu-img compares in 512-byte sectors and reports the first differing one.
const SECTOR: u64 = 512;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Open without waiting for other writers to let go (read-only opens only), as `qemu-img -U`.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Format of the first image; probed when absent.
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image; probed when absent.
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Strict mode: images of different size differ.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: print nothing but errors; the exit code tells the result.
    #[arg(short = 'q')]
    quiet: bool,
    a: PathBuf,
    b: PathBuf,
}

/// The outcome of comparing a range.
enum Verdict {
    Same,
    MismatchAt(u64),
}

pub fn run(args: Args) -> CmdResult {
    macro_rules! say {
        ($($t:tt)*) => {
            if !args.quiet {
                outln!($($t)*);
            }
        };
    }
    crate::source::set_force_share(args.force_share);
    crate::console::hold_stdout();
    let fail = |m: String| Failure::new(2, m);
    let a = Input::open(&args.a, args.format_a.as_deref()).map_err(fail)?;
    let b = Input::open(&args.b, args.format_b.as_deref()).map_err(fail)?;
    let (ga, gb) = (a.guest(), b.guest());
    let (na, nb) = (args.a.to_string_lossy(), args.b.to_string_lossy());
    let (sa, sb) = (
        Side {
            guest: ga,
            name: &na,
        },
        Side {
            guest: gb,
            name: &nb,
        },
    );
    let (size_a, size_b) = (ga.size(), gb.size());
    if args.strict && size_a != size_b {
        say!("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut progress = Progress::new(args.progress, SKIP_TWO);

    let mut window = 0;
    while window < common {
        let len = MAP_WINDOW.min(common - window);
        let ra = ga.regions(window, len).map_err(fail)?;
        let rb = gb.regions(window, len).map_err(fail)?;
        for (start, length, data_a, data_b) in segments(&ra, &rb) {
            let verdict = match (data_a, data_b) {
                (false, false) => Verdict::Same,
                (true, true) => compare_range(&sa, &sb, start, length, &mut progress, total)?,
                (true, false) => zero_range(&sa, start, length, &mut progress, total)?,
                (false, true) => zero_range(&sb, start, length, &mut progress, total)?,
            };
            if let Verdict::MismatchAt(offset) = verdict {
                say!("Content mismatch at offset {offset}!");
                progress.finish();
                return Ok(1);
            }
            progress.advance(start + length, total);
        }
        window += len;
    }

    if size_a != size_b {
        say!("Warning: Image size mismatch!");
        let longer = if size_a > size_b { &sa } else { &sb };
        let mut pos = common;
        while pos < total {
            let len = MAP_WINDOW.min(total - pos);
            for r in longer.guest.regions(pos, len).map_err(fail)? {
                if r.data {
                    if let Verdict::MismatchAt(offset) =
                        zero_range(longer, r.start, r.length, &mut progress, total)?
                    {
                        say!("Content mismatch at offset {offset}!");
                        progress.finish();
                        return Ok(1);
                    }
                }
            }
            pos += len;
        }
    }
    progress.advance(total, total);
    // qemu-img prints the verdict before it ends the progress line.
    say!("Images are identical.");
    progress.finish();
    Ok(0)
}

/// Splits two region lists over the same range at every boundary of either:
/// `(start, length, data in a, data in b)`.
fn segments(a: &[Region], b: &[Region]) -> Vec<(u64, u64, bool, bool)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (ra, rb) = (a[i], b[j]);
        let start = ra.start.max(rb.start);
        let end = (ra.start + ra.length).min(rb.start + rb.length);
        if end > start {
            out.push((start, end - start, ra.data, rb.data));
        }
        if ra.start + ra.length == end {
            i += 1;
        }
        if rb.start + rb.length == end {
            j += 1;
        }
    }
    out
}

/// The sector-aligned offset of the first byte where `x` and `y` differ, if any.
fn first_difference(x: &[u8], y: &[u8], base: u64) -> Option<u64> {
    let at = x.iter().zip(y).position(|(p, q)| p != q)? as u64;
    Some(base + at / SECTOR * SECTOR)
}

/// One of the two inputs, with the name qemu-img reports its read errors under.
struct Side<'a> {
    guest: &'a dyn Guest,
    name: &'a str,
}

fn compare_range(
    a: &Side,
    b: &Side,
    start: u64,
    length: u64,
    progress: &mut Progress,
    total: u64,
) -> Result<Verdict, Failure> {
    let mut bufs = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut pos = start;
    let end = start + length;
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        read(a, &mut bufs.0[..n], pos)?;
        read(b, &mut bufs.1[..n], pos)?;
        if bufs.0[..n] != bufs.1[..n] {
            if let Some(offset) = first_difference(&bufs.0[..n], &bufs.1[..n], pos) {
                return Ok(Verdict::MismatchAt(offset));
            }
        }
        pos += n as u64;
        progress.advance(pos, total);
    }
    Ok(Verdict::Same)
}

/// Checks that `[start, start + length)` of `g` reads as zeros.
fn zero_range(
    g: &Side,
    start: u64,
    length: u64,
    progress: &mut Progress,
    total: u64,
) -> Result<Verdict, Failure> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = start;
    let end = start + length;
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        read(g, &mut buf[..n], pos)?;
        if !is_zero(&buf[..n]) {
            let at = buf[..n].iter().position(|&x| x != 0).unwrap_or(0) as u64;
            return Ok(Verdict::MismatchAt(pos + at / SECTOR * SECTOR));
        }
        pos += n as u64;
        progress.advance(pos, total);
    }
    Ok(Verdict::Same)
}

/// Reads for the comparison; a failed read ends it with exit code 4, as in qemu-img.
fn read(g: &Side, buf: &mut [u8], offset: u64) -> Result<(), Failure> {
    g.guest.read_errno(buf, offset).map_err(|e| {
        Failure::new(
            4,
            format!("Error while reading offset {offset} of {}: {e}", g.name),
        )
    })
}
