//! The data commands of qemu-io: `read`, `write` (and their vectored forms), `discard`,
//! `alloc`, `truncate`, `map`, `info` and `flush`, on a qcow2 image or a raw one.

use std::time::{Duration, Instant};

use qcow2::Image;

use super::open::{RawImage, Target};
use super::report::{
    cvtstr, dump_buffer, errno_text, print_map_line, print_report, read_error_text,
};
use super::vmstate;
use super::words::{getopt, in_bounds, number_arg, pattern_arg, range_args};
use super::zero_limits::ZeroLimits;
use crate::nodes::copy_on_read::CopyOnRead;
use crate::source::{io_text, Guest};

/// qemu's BDRV_REQUEST_MAX_BYTES.
pub(super) const MAX_REQUEST: u64 = 2_147_483_136;

pub(super) const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
pub(super) const WRITE_USAGE: &str = "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
pub(super) const READV_USAGE: &str =
    "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset";
pub(super) const WRITEV_USAGE: &str =
    "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset";
pub(super) const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

/// `alloc OFF [COUNT]`: how many bytes of the range this image itself allocates (data or zero
/// clusters, not the backing chain), in qemu-io's words.
pub(super) fn alloc(image: &Image, words: &[&str]) -> bool {
    let Ok(offset) = number_arg(words[0]) else {
        return false;
    };
    let count = match words.get(1) {
        Some(c) => match number_arg(c) {
            Ok(c) => c,
            Err(()) => return false,
        },
        None => 512,
    };
    // What lies past the end of the disk is not counted, as qemu-io stops at the end.
    let count = count.min(image.size().saturating_sub(offset));
    let end = offset + count;
    let mut allocated = 0;
    if offset < end {
        match image.map(offset, end - offset) {
            Ok(extents) => {
                for e in extents.iter().filter(|e| e.depth == 0) {
                    if !matches!(e.kind, qcow2::ExtentKind::Unallocated { .. }) {
                        allocated += e.length;
                    }
                }
            }
            Err(e) => {
                outln!("is_allocated failed: {}", errno_text(&e));
                return false;
            }
        }
    }
    outln!(
        "{allocated}/{count} bytes allocated at offset {}",
        cvtstr(offset as f64)
    );
    true
}

/// `truncate SIZE`: the new virtual size, growing or shrinking (qemu-io lets a shrink drop
/// data).
pub(super) fn truncate(image: &Image, words: &[&str]) -> bool {
    let Ok(size) = number_arg(words[words.len() - 1]) else {
        return false;
    };
    match image.resize(size, true) {
        Ok(()) => true,
        Err(e) => {
            outln!("truncate: {}", errno_text(&e));
            false
        }
    }
}

/// `read [-bCpqrv] [-P pattern [-s off] [-l len]] off len`; `-s`/`-l` limit the pattern check to
/// part of the data read.
pub(super) fn read(cmd: &str, target: &Target, cor: Option<&CopyOnRead>, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt(cmd, words, "bCl:pP:qrs:v", READ_USAGE) else {
        return false;
    };
    let guest = target.guest();
    let (mut pattern, mut verbose, mut quiet, mut vm_state) = (None, false, false, false);
    let (mut pattern_offset, mut pattern_count) = (None, None);
    for (c, value) in flags {
        match c {
            'P' => match pattern_arg(value) {
                Ok(p) => pattern = Some(p),
                Err(()) => return false,
            },
            's' => match number_arg(value) {
                Ok(n) => pattern_offset = Some(n),
                Err(()) => return false,
            },
            'l' => match number_arg(value) {
                Ok(n) => pattern_count = Some(n),
                Err(()) => return false,
            },
            'q' => quiet = true,
            'v' => verbose = true,
            'b' => vm_state = true,
            _ => {}
        }
    }
    let Ok((offset, len)) = range_args(&words[first..], READ_USAGE, Some("")) else {
        return false;
    };
    if pattern.is_none() && (pattern_offset.is_some() || pattern_count.is_some()) {
        outln!("{READ_USAGE}");
        return false;
    }
    let pattern_offset = pattern_offset.unwrap_or(0);
    let pattern_count = pattern_count.unwrap_or(len.wrapping_sub(pattern_offset));
    if pattern_offset > len || pattern_count > len - pattern_offset {
        outln!("pattern verification range exceeds end of read data");
        return false;
    }
    if vm_state && !vmstate::aligned(offset, len) {
        return false;
    }
    if !vm_state && !in_bounds(offset, len, guest.size()) {
        outln!("{cmd} failed: Input/output error");
        return false;
    }
    let mut buf = vec![0u8; len as usize];
    let started = Instant::now();
    let result = match (vm_state, cor, target) {
        (true, _, _) => vmstate::read(target, &mut buf, offset),
        (false, Some(cor), Target::Qcow2(image)) => cor
            .read(image, &mut buf, offset)
            .map_err(|e| errno_text(&e)),
        (false, None, Target::Qcow2(image)) => Guest::read_at(
            &crate::io::corruption_event::Reporting(image),
            &mut buf,
            offset,
        ),
        _ => guest.read_at(&mut buf, offset),
    };
    if let Err(e) = result {
        outln!("{cmd} failed: {}", read_error_text(&e));
        return false;
    }
    let elapsed = started.elapsed();
    let mut ok = true;
    if let Some(p) = pattern {
        let checked = &buf[pattern_offset as usize..(pattern_offset + pattern_count) as usize];
        if checked.iter().any(|&b| b != p) {
            outln!(
                "Pattern verification failed at offset {}, {pattern_count} bytes",
                offset + pattern_offset
            );
            ok = false;
        }
    }
    if quiet {
        return ok;
    }
    if verbose {
        out!("{}", dump_buffer(&buf, offset));
    }
    print_report("read", offset, len, elapsed);
    ok
}

/// `write`; `compress_filter`: the image sits under a `compress` filter node; `zero_limits`:
/// how a blkdebug node over the image splits zero writes.
pub(super) fn write(
    cmd: &str,
    target: &Target,
    words: &[&str],
    compress_filter: bool,
    zero_limits: Option<ZeroLimits>,
) -> bool {
    let Ok((flags, first)) = getopt(cmd, words, "bcCfnpP:qrs:uz", WRITE_USAGE) else {
        return false;
    };
    let (mut compressed, mut fua, mut no_fallback, mut unmap, mut zero, mut quiet) =
        (false, false, false, false, false, false);
    let mut vm_state = false;
    let mut pattern = None;
    for (c, value) in flags {
        match c {
            'c' => compressed = true,
            'f' => fua = true,
            'n' => no_fallback = true,
            'P' => match pattern_arg(value) {
                Ok(p) => pattern = Some(p),
                Err(()) => return false,
            },
            'q' => quiet = true,
            'u' => unmap = true,
            'z' => zero = true,
            'b' => vm_state = true,
            'C' | 's' => {
                outln!("write: -{c} is not supported by qcow2-tool");
                return false;
            }
            _ => {}
        }
    }
    if words.len() - first != 2 {
        outln!("{WRITE_USAGE}");
        return false;
    }
    if vm_state && zero {
        outln!("-b and -z cannot be specified at the same time");
        return false;
    }
    if fua && (compressed || vm_state) {
        outln!("-f and -b or -c cannot be specified at the same time");
        return false;
    }
    if no_fallback && !zero {
        outln!("-n requires -z to be specified");
        return false;
    }
    if unmap && !zero {
        outln!("-u requires -z to be specified");
        return false;
    }
    if zero && pattern.is_some() {
        outln!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    // Beyond the request limit, -n (no fallback) zero writes are allowed.
    let note = (!no_fallback).then_some(" without -n");
    let Ok((offset, len)) = range_args(&words[first..], WRITE_USAGE, note) else {
        return false;
    };
    if compressed && !zero {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return false;
        }
        if len % 512 != 0 {
            outln!("{len} is not a sector-aligned value for 'count'");
            return false;
        }
    }
    if vm_state {
        if !vmstate::aligned(offset, len) {
            return false;
        }
        let buf = vec![pattern.unwrap_or(0xcd); len as usize];
        let started = Instant::now();
        if let Err(e) = vmstate::write(target, &buf, offset) {
            outln!("{cmd} failed: {e}");
            return false;
        }
        if !quiet {
            print_report("wrote", offset, len, started.elapsed());
        }
        return true;
    }
    if !in_bounds(offset, len, target.guest().size()) {
        outln!("{cmd} failed: Input/output error");
        return false;
    }
    let image = match target {
        Target::Qcow2(image) => image,
        Target::Raw(raw) => {
            if compressed {
                outln!("{cmd} failed: Operation not supported");
                return false;
            }
            let started = Instant::now();
            let buf = vec![if zero { 0 } else { pattern.unwrap_or(0xcd) }; len as usize];
            let result =
                raw.write_at(&buf, offset)
                    .and_then(|()| if fua { raw.flush() } else { Ok(()) });
            if let Err(e) = result {
                outln!("{cmd} failed: {}", io_text(&e));
                return false;
            }
            if !quiet {
                print_report("wrote", offset, len, started.elapsed());
            }
            return true;
        }
    };
    if compressed && !zero {
        if image.header().has_external_data_file() {
            outln!("{cmd} failed: Operation not supported");
            return false;
        }
        // qemu's qcow2 refuses misaligned compressed writes.
        let (cs, size) = (image.cluster_size(), image.size());
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != size) {
            outln!("{cmd} failed: Invalid argument");
            return false;
        }
    }
    let started = Instant::now();
    let was_corrupt = image.header().is_corrupt();
    let errno = |e: qcow2::Error| {
        if let qcow2::Error::Corrupt { .. } = &e {
            crate::io::corruption_event::report(image, &e, was_corrupt, false);
        }
        errno_text(&e)
    };
    let result = if zero {
        let pieces = match zero_limits {
            Some(limits) if !no_fallback => limits.pieces(offset, len),
            _ => vec![(offset, len, false)],
        };
        pieces
            .into_iter()
            .try_for_each(|(at, n, as_data)| {
                if as_data {
                    image.write_at(&vec![0; n as usize], at)
                } else {
                    image.write_zeroes(at, n, unmap)
                }
            })
            .map_err(errno)
    } else {
        let buf = vec![pattern.unwrap_or(0xcd); len as usize];
        if compressed {
            write_compressed(image, &buf, offset)
        } else if compress_filter {
            crate::nodes::compress_filter::write(image, &buf, offset, |whole, at| {
                write_compressed(image, whole, at)
            })
        } else {
            image
                .write_at(&buf, offset)
                .and_then(|()| if fua { image.flush() } else { Ok(()) })
                .map_err(errno)
        }
    };
    let elapsed = started.elapsed();
    if let Err(e) = result {
        outln!("{cmd} failed: {e}");
        return false;
    }
    if !quiet {
        print_report("wrote", offset, len, elapsed);
    }
    true
}

/// Compressed clusters qemu's qcow2 has in flight at once (QCOW2_MAX_WORKERS).
pub(super) const QEMU_COMPRESS_TASKS: usize = 8;

/// A compressed write as qemu's qcow2 does it: cluster by cluster, each refused (EIO) when the
/// cluster already has a host cluster. qemu starts clusters as task slots free up and stops
/// once a refusal is seen: the refused cluster's slot still starts one more, so clusters more
/// than its task count past the first refused one are not written.
/// Errors are the `strerror` text qemu-io prints.
pub(super) fn write_compressed(image: &Image, buf: &[u8], offset: u64) -> Result<(), String> {
    let cs = image.cluster_size() as usize;
    let mut refused = false;
    let mut limit = usize::MAX;
    for (i, cluster) in buf.chunks(cs).enumerate() {
        if i >= limit {
            break;
        }
        let at = offset + (i * cs) as u64;
        if allocated_in_top(image, at, cluster.len() as u64).map_err(|e| errno_text(&e))? {
            refused = true;
            limit = limit.min(i + QEMU_COMPRESS_TASKS + 1);
            continue;
        }
        image
            .write_compressed(cluster, at)
            .map_err(|e| errno_text(&e))?;
    }
    if refused {
        return Err("Input/output error".into());
    }
    Ok(())
}

/// Whether any cluster of `[offset, offset + len)` has a host cluster in the image itself
/// (data, compressed data, or a zero cluster that keeps its allocation).
pub(super) fn allocated_in_top(image: &Image, offset: u64, len: u64) -> qcow2::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    Ok(image
        .map(offset, len)?
        .iter()
        .any(|e| e.depth == 0 && has_host_cluster(e.kind)))
}

/// Whether an extent of the image itself keeps a host cluster.
pub(super) fn has_host_cluster(kind: qcow2::ExtentKind) -> bool {
    use qcow2::ExtentKind;
    match kind {
        ExtentKind::Data { .. } | ExtentKind::DataHole { .. } | ExtentKind::Compressed => true,
        ExtentKind::Zero { host_offset } | ExtentKind::Unallocated { host_offset } => {
            host_offset.is_some()
        }
    }
}

pub(super) fn discard(image: &Image, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("discard", words, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let mut quiet = false;
    for (c, _) in flags {
        match c {
            'q' => quiet = true,
            'C' => {
                outln!("discard: -C is not supported by qcow2-tool");
                return false;
            }
            _ => {}
        }
    }
    let Ok((offset, len)) = range_args(&words[first..], DISCARD_USAGE, Some("")) else {
        return false;
    };
    if !in_bounds(offset, len, image.size()) {
        outln!("discard failed: Input/output error");
        return false;
    }
    let started = Instant::now();
    // The engine discards as qemu's qcow2 does (v2 over a backing file keeps its data; clusters
    // without a host cluster stay as they are).
    let result = image.discard(offset, len);
    if let Err(e) = result {
        outln!("discard failed: {}", errno_text(&e));
        return false;
    }
    if !quiet {
        print_report("discard", offset, len, started.elapsed());
    }
    true
}

/// `alloc` on a raw image: everything is allocated.
pub(super) fn alloc_raw(raw: &RawImage, words: &[&str]) -> bool {
    let Ok(offset) = number_arg(words[0]) else {
        return false;
    };
    let count = match words.get(1).map(|c| number_arg(c)) {
        Some(Ok(c)) => c,
        Some(Err(())) => return false,
        None => 512,
    };
    let end = offset.saturating_add(count).min(raw.size_now());
    outln!(
        "{}/{count} bytes allocated at offset {}",
        end.saturating_sub(offset),
        cvtstr(offset as f64)
    );
    true
}

/// `discard` on a raw image: accepted without effect (a hint QEMU may ignore too).
pub(super) fn discard_raw(raw: &RawImage, words: &[&str]) -> bool {
    let Ok((flags, first)) = getopt("discard", words, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let Ok((offset, len)) = range_args(&words[first..], DISCARD_USAGE, Some("")) else {
        return false;
    };
    if !in_bounds(offset, len, raw.size_now()) {
        outln!("discard failed: Input/output error");
        return false;
    }
    if let Err(e) = raw.discard(offset, len) {
        outln!("discard failed: {}", io_text(&e));
        return false;
    }
    if !flags.iter().any(|(c, _)| *c == 'q') {
        print_report("discard", offset, len, Duration::ZERO);
    }
    true
}

/// qemu-io's `info`: the format and, for qcow2, the cluster size.
pub(super) fn info(target: &Target) -> bool {
    match target {
        Target::Qcow2(image) => {
            outln!("format name: qcow2");
            outln!("cluster size: {}", cvtstr(image.cluster_size() as f64));
            // Where QEMU would save VM state: the guest offset past the last L1 entry the
            // virtual size needs.
            let header = image.header();
            let vm_state = header.l1_entries_for(header.size) << header.l1_shift();
            outln!("vm state offset: {}", cvtstr(vm_state as f64));
            let bitmaps = crate::img::info::read_bitmaps(image).unwrap_or_default();
            out!(
                "{}",
                crate::img::info::format_specific(&image.info(), bitmaps.as_deref())
            );
        }
        Target::Raw(raw) if raw.driver == "raw" => {
            outln!("format name: raw");
            outln!("cluster size: 0 bytes");
            outln!("vm state offset: 0 bytes");
        }
        Target::Raw(raw) => {
            // A protocol driver names itself twice (as a format and as a protocol) and has
            // no format information to give, which fails the command.
            outln!("format name: {}", raw.driver);
            outln!("format name: {}", raw.driver);
            return false;
        }
    }
    true
}

pub(super) fn flush(image: &Image) -> bool {
    match image.flush() {
        Ok(()) => true,
        Err(e) => {
            report!("flush failed: {e}");
            false
        }
    }
}

/// Guest bytes mapped per `map` call.
pub(super) const MAP_WINDOW: u64 = 1 << 30;

/// qemu-io's `map`: ranges allocated (or not) in the top layer, adjacent ones merged.
pub(super) fn map(target: &Target) -> bool {
    let image = match target {
        Target::Qcow2(image) => image,
        Target::Raw(raw) => {
            let size = raw.size_now();
            if size > 0 {
                print_map_line(true, 0, size);
            }
            return true;
        }
    };
    let size = image.size();
    let mut run: Option<(bool, u64, u64)> = None;
    let mut window = 0;
    while window < size {
        let len = MAP_WINDOW.min(size - window);
        let extents = match image.map(window, len) {
            Ok(e) => e,
            Err(e) => {
                report!("Failed to get allocation status: {e}");
                return false;
            }
        };
        for e in extents {
            let allocated = e.depth == 0 && e.present();
            match &mut run {
                Some((a, _, l)) if *a == allocated => *l += e.length,
                _ => {
                    if let Some((a, start, l)) = run {
                        print_map_line(a, start, l);
                    }
                    run = Some((allocated, e.start, e.length));
                }
            }
        }
        window += len;
    }
    if let Some((a, start, l)) = run {
        print_map_line(a, start, l);
    }
    true
}
