//! A qemu-io command's words: argument counts, getopt(3) options, patterns, numbers and
//! ranges, checked and reported as qemu-io reports them.

use super::commands::MAX_REQUEST;
use crate::size::parse_size;

/// qemu-io's argument count check (on stderr).
pub(super) fn arg_count_ok(name: &str, n: usize, min: usize, max: Option<usize>) -> bool {
    if n >= min && max.is_none_or(|m| n <= m) {
        return true;
    }
    match max {
        Some(0) => errln!("bad argument count {n} to {name}, expected 0 arguments"),
        Some(m) if m == min => {
            errln!("bad argument count {n} to {name}, expected {min} arguments")
        }
        Some(m) => {
            errln!("bad argument count {n} to {name}, expected between {min} and {m} arguments")
        }
        None => errln!("bad argument count {n} to {name}, expected at least {min} arguments"),
    }
    false
}

/// A command's options (with their arguments) and the index of its first operand.
pub(super) type Parsed<'a> = (Vec<(char, &'a str)>, usize);

/// getopt(3) over a command's words (no permutation): the options with their arguments, and
/// the index of the first operand. Errors are printed as getopt and qemu-io print them.
pub(super) fn getopt<'a>(
    cmd: &str,
    words: &[&'a str],
    spec: &str,
    usage: &str,
) -> Result<Parsed<'a>, ()> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        if word == "--" {
            i += 1;
            break;
        }
        if word.len() < 2 || !word.starts_with('-') {
            break;
        }
        let flags = &word[1..];
        for (k, c) in flags.char_indices() {
            let takes_arg = match c {
                ':' => None,
                _ => spec
                    .find(c)
                    .map(|at| spec[at + c.len_utf8()..].starts_with(':')),
            };
            match takes_arg {
                None => {
                    errln!("{cmd}: invalid option -- '{c}'");
                    outln!("{usage}");
                    return Err(());
                }
                Some(false) => found.push((c, "")),
                Some(true) => {
                    let rest = &flags[k + c.len_utf8()..];
                    let value = if rest.is_empty() {
                        i += 1;
                        match words.get(i) {
                            Some(v) => *v,
                            None => {
                                errln!("{cmd}: option requires an argument -- '{c}'");
                                outln!("{usage}");
                                return Err(());
                            }
                        }
                    } else {
                        rest
                    };
                    found.push((c, value));
                    break;
                }
            }
        }
        i += 1;
    }
    Ok((found, i))
}

pub(super) fn parse_pattern(text: &str) -> Option<u8> {
    let value = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        i64::from_str_radix(&text[1..], 8).ok()?
    } else {
        text.parse().ok()?
    };
    u8::try_from(value).ok()
}

/// A pattern option's byte, or qemu-io's message.
pub(super) fn pattern_arg(text: &str) -> Result<u8, ()> {
    parse_pattern(text).ok_or_else(|| outln!("{text} is not a valid pattern byte"))
}

/// qemu-io's `cvtnum` with its error messages.
pub(super) fn number_arg(text: &str) -> Result<u64, ()> {
    match parse_size(text) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => {
            outln!("Parsing error: argument too large -- {text}");
            Err(())
        }
        Err(_) if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) => {
            outln!("Parsing error: argument too large -- {text}");
            Err(())
        }
        Err(_) => {
            outln!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
            );
            Err(())
        }
    }
}

/// The `off len` operands of a command.
/// `limit`: the note of the request-size limit message, or `None` for no limit.
pub(super) fn range_args(
    words: &[&str],
    usage: &str,
    limit: Option<&str>,
) -> Result<(u64, u64), ()> {
    let [off, len] = words else {
        outln!("{usage}");
        return Err(());
    };
    let offset = number_arg(off)?;
    let len_value = number_arg(len)?;
    if let Some(note) = limit.filter(|_| len_value > MAX_REQUEST) {
        outln!("length cannot exceed {MAX_REQUEST}{note}, given {len}");
        return Err(());
    }
    Ok((offset, len_value))
}

/// Whether `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(super) fn in_bounds(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}
