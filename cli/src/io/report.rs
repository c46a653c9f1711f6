//! What qemu-io prints: the report lines of a request, hex dumps, `map` lines, and QEMU's
//! words for failures.

use std::time::Duration;

use crate::source::io_text;

/// The `strerror` text qemu-io prints for a failed request.
pub fn errno_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::OutOfBounds { .. } => "Input/output error".into(),
        qcow2::Error::InvalidArgument { .. } => "Invalid argument".into(),
        qcow2::Error::ReadOnly { .. } => "Permission denied".into(),
        qcow2::Error::Corrupt { .. } | qcow2::Error::MarkedCorrupt { .. } => {
            "Input/output error".into()
        }
        qcow2::Error::Io { source, .. } => io_text(source),
        other => other.to_string(),
    }
}

/// A read error as qemu-io prints it: the engine's detail is QEMU's EIO.
pub(super) fn read_error_text(e: &str) -> String {
    if e.contains("Input/output error") || e.contains("compressed") || e.contains("corrupt") {
        "Input/output error".into()
    } else {
        e.to_owned()
    }
}

/// An open failure in qemu's words where they are known, else the engine's own message.
pub fn qemu_open_error(file: &str, e: &qcow2::Error) -> String {
    let text = e.to_string();
    if let qcow2::Error::Chain {
        role: "backing",
        file: backing,
        problem: qcow2::ChainProblem::Missing,
        ..
    } = e
    {
        return format!(
            "Could not open backing file: Could not open '{backing}': No such file or directory"
        );
    }
    if let qcow2::Error::Io { source, .. } = e {
        if source.kind() == std::io::ErrorKind::NotFound && !text.contains("backing") {
            return format!("Could not open '{file}': {}", io_text(source));
        }
    }
    crate::source::open_error_text(e)
}

pub(super) fn print_map_line(allocated: bool, start: u64, len: u64) {
    outln!(
        "{} ({len:#x}) bytes {} at offset {} ({start:#x})",
        cvtstr(len as f64),
        if allocated {
            "    allocated"
        } else {
            "not allocated"
        },
        cvtstr(start as f64)
    );
}

/// qemu-io's two report lines for one request.
pub(super) fn print_report(op: &str, offset: u64, len: u64, elapsed: Duration) {
    outln!("{op} {len}/{len} bytes at offset {offset}");
    outln!("{}", report_line(len, elapsed));
}

/// qemu-io's hex dump: 16 bytes a line, then the alphanumeric characters.
pub(super) fn dump_buffer(buf: &[u8], offset: u64) -> String {
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
pub(super) fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        (1024.0, "KiB"),
    ];
    let (fixed, suffix) = match UNITS.iter().find(|(unit, _)| value >= *unit) {
        Some((unit, name)) => (format!("{:.3}", value / unit), *name),
        None => (format!("{value:.6}"), "bytes"),
    };
    // qemu-io cuts the number at its first ".000" (so 2.0004 MiB prints as "2 MiB").
    match fixed.find(".000") {
        Some(i) => format!("{} {suffix}", &fixed[..i]),
        None => format!("{fixed} {suffix}"),
    }
}

/// qemu-io's timing line for one operation.
pub(super) fn report_line(bytes: u64, elapsed: Duration) -> String {
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
