//! `io`: a read-only subset of qemu-io. `read [-v] [-q] [-P PAT] OFF LEN` prints qemu-io's
//! lines; a pattern mismatch makes the run exit 1. Commands that write arrive with the write
//! engine and are refused.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::size::parse_size;
use crate::source::{CmdResult, Failure, Guest, Input};

/// qemu's BDRV_REQUEST_MAX_BYTES.
const MAX_REQUEST: u64 = 2_147_483_136;

const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Command to run (repeatable), e.g. `read -P 0x11 0 4k`.
    #[arg(short = 'c', value_name = "CMD")]
    commands: Vec<String>,
    /// Open read-only (the only mode for now).
    #[arg(short = 'r')]
    read_only: bool,
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    let _ = args.read_only;
    if args.commands.is_empty() {
        return Err(Failure::new(
            1,
            "io: interactive mode is not supported; pass -c CMD",
        ));
    }
    let input = Input::open(&args.file, args.format.as_deref()).map_err(|m| Failure::new(1, m))?;
    let guest = input.guest();
    let mut ok = true;
    for line in &args.commands {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&name, rest)) = words.split_first() else {
            continue;
        };
        let succeeded = match name {
            "read" | "r" => read(guest, rest),
            "write" | "w" | "writev" | "discard" | "d" | "flush" | "f" | "map" | "aio_write"
            | "truncate" | "zone_append" => {
                eprintln!("{name}: not implemented yet (needs the write engine)");
                false
            }
            _ => {
                eprintln!("command \"{name}\" not found");
                false
            }
        };
        ok &= succeeded;
    }
    Ok(if ok { 0 } else { 1 })
}

/// Options of one `read` command.
struct ReadOptions {
    pattern: Option<u8>,
    verbose: bool,
    quiet: bool,
    offset: u64,
    len: u64,
}

fn parse_pattern(text: &str) -> Option<u8> {
    let value = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        i64::from_str_radix(&text[1..], 8).ok()?
    } else {
        text.parse().ok()?
    };
    u8::try_from(value).ok()
}

/// getopt-style parsing of `read`'s arguments. Errors are printed as qemu-io prints them.
fn parse_read(words: &[&str]) -> Result<ReadOptions, ()> {
    let (mut pattern, mut verbose, mut quiet) = (None, false, false);
    let mut i = 0;
    while i < words.len() && words[i].len() > 1 && words[i].starts_with('-') {
        let flags = &words[i][1..];
        for (k, c) in flags.char_indices() {
            match c {
                'v' => verbose = true,
                'q' => quiet = true,
                'P' => {
                    let rest = &flags[k + 1..];
                    let value = if rest.is_empty() {
                        i += 1;
                        *words.get(i).ok_or_else(|| println!("{READ_USAGE}"))?
                    } else {
                        rest
                    };
                    pattern = Some(parse_pattern(value).ok_or_else(|| {
                        println!("non-numeric pattern '{value}'");
                    })?);
                    break;
                }
                _ => {
                    println!("{READ_USAGE}");
                    return Err(());
                }
            }
        }
        i += 1;
    }
    let [off, len] = words[i..] else {
        println!("{READ_USAGE}");
        return Err(());
    };
    let offset = parse_size(off).map_err(|_| println!("non-numeric offset argument -- {off}"))?;
    let len = parse_size(len).map_err(|_| println!("non-numeric length argument -- {len}"))?;
    Ok(ReadOptions {
        pattern,
        verbose,
        quiet,
        offset,
        len,
    })
}

fn read(guest: &dyn Guest, words: &[&str]) -> bool {
    let Ok(opts) = parse_read(words) else {
        return false;
    };
    if opts.len > MAX_REQUEST {
        println!("length cannot exceed {MAX_REQUEST}, given {}", opts.len);
        return false;
    }
    if opts
        .offset
        .checked_add(opts.len)
        .is_none_or(|end| end > guest.size())
    {
        println!("read failed: Input/output error");
        return false;
    }
    let mut buf = vec![0u8; opts.len as usize];
    let started = Instant::now();
    if let Err(e) = guest.read_at(&mut buf, opts.offset) {
        println!("read failed: {e}");
        return false;
    }
    let elapsed = started.elapsed();
    let mut ok = true;
    if let Some(p) = opts.pattern {
        if buf.iter().any(|&b| b != p) {
            println!(
                "Pattern verification failed at offset {}, {} bytes",
                opts.offset, opts.len
            );
            ok = false;
        }
    }
    if opts.quiet {
        return ok;
    }
    if opts.verbose {
        print!("{}", dump_buffer(&buf, opts.offset));
    }
    println!(
        "read {}/{} bytes at offset {}",
        opts.len, opts.len, opts.offset
    );
    println!("{}", report_line(opts.len, elapsed));
    ok
}

/// qemu-io's hex dump: 16 bytes a line, then the alphanumeric characters.
fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut s = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        s += &format!("{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            s += &format!("{b:02x} ");
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

/// qemu-io's `cvtstr`: `4 KiB`, `1.907 MiB`, `16 bytes`.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        (1024.0, "KiB"),
    ];
    let (scaled, suffix) = UNITS
        .iter()
        .find(|(unit, _)| value >= *unit)
        .map_or((value, "bytes"), |(unit, name)| (value / unit, *name));
    let fixed = format!("{scaled:.6}");
    match fixed.find(".000") {
        Some(i) => format!("{} {suffix}", &fixed[..i]),
        None => format!("{scaled:.3} {suffix}"),
    }
}

/// qemu-io's timing line for one operation.
fn report_line(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(bytes as f64),
        elapsed.as_secs(),
        elapsed.subsec_millis() / 10,
        cvtstr(bytes as f64 / secs),
        1.0 / secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_matches_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(16.0), "16 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(2_000_000.0), "1.907 MiB");
    }

    #[test]
    fn patterns_parse_as_c_integers() {
        assert_eq!(parse_pattern("0x55"), Some(0x55));
        assert_eq!(parse_pattern("17"), Some(17));
        assert_eq!(parse_pattern("010"), Some(8));
        assert_eq!(parse_pattern("0"), Some(0));
        assert_eq!(parse_pattern("256"), None);
        assert_eq!(parse_pattern("x"), None);
    }

    #[test]
    fn dump_matches_qemu_io_layout() {
        let dump = dump_buffer(&[0x41; 20], 0);
        assert_eq!(
            dump,
            "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n\
             00000010:  41 41 41 41  AAAA\n"
        );
    }
}
