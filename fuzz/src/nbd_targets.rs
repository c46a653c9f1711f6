//! Fuzz targets for the NBD server (`qcow2-nbd`): `nbd_server` drives a whole session (handshake
//! and transmission) from the input bytes against an in-memory image; `nbd_wire` drives every
//! decoder of the pure codec and checks that what decodes re-encodes to the same bytes.
//!
//! Depends only on `qcow2`, `qcow2_nbd` and `std`, so the stable replay test
//! (`nbd/tests/fuzz_replay.rs`) compiles this very file.

use std::sync::Arc;

use qcow2::{CreateOptions, Image, MemoryStorage};
use qcow2_nbd::wire::*;
use qcow2_nbd::{serve_stream, ConnectionOptions, Export, ServerOptions};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The targets of this file, by name.
pub const NBD_TARGETS: &[(&str, Target)] = &[("nbd_server", nbd_server), ("nbd_wire", nbd_wire)];

/// Virtual size of the fuzzed export: small, so every request range is cheap.
const SIZE: u64 = 1 << 20;

/// How a session input starts: its first byte picks a canned handshake prefix, so the fuzzer
/// also spends its time in the transmission phase of each reply mode.
fn prefix(selector: u8) -> Vec<u8> {
    let mut p = Vec::new();
    match selector % 4 {
        0 => {}
        1 | 2 => {
            p.extend_from_slice(&3u32.to_be_bytes());
            let opt = if selector % 4 == 1 {
                OPT_STRUCTURED_REPLY
            } else {
                OPT_EXTENDED_HEADERS
            };
            p.extend(encode_option(opt, &[]));
            p.extend(encode_option(
                OPT_SET_META_CONTEXT,
                &encode_meta_request(
                    "",
                    &[
                        "base:allocation",
                        "qemu:allocation-depth",
                        "qemu:dirty-bitmap:b0",
                    ],
                ),
            ));
            p.extend(encode_option(
                OPT_GO,
                &encode_info_request("", &[INFO_BLOCK_SIZE]),
            ));
        }
        _ => {
            p.extend_from_slice(&3u32.to_be_bytes());
            p.extend(encode_option(OPT_EXPORT_NAME, b""));
        }
    }
    p
}

fn exports() -> (Arc<Image>, Vec<Export>) {
    let options = CreateOptions::new(SIZE).cluster_size(4096);
    // An in-memory image is created the same way every time; failing here is a harness bug.
    let image = Arc::new(
        Image::create_in(Box::new(MemoryStorage::new()), "fuzz", &options)
            .expect("create the in-memory image"),
    );
    // A recording bitmap, so `qemu:dirty-bitmap:b0` has dirty and clean runs to report.
    image
        .add_bitmap("b0", 8192, false)
        .expect("add a bitmap to the in-memory image");
    image
        .write_at(&[0x5a; 12288], 4096)
        .expect("seed the in-memory image");
    let mut rw = Export::new("", image.clone());
    rw.allocation_depth = true;
    rw.bitmaps = vec!["b0".into()];
    let mut ro = Export::new("ro", image.clone());
    ro.read_only = true;
    ro.description = Some("fuzz".into());
    ro.bitmaps = vec!["b0".into()];
    (image, vec![rw, ro])
}

/// One session: `[selector][client bytes...]`. Checked: no panic, no hang, the greeting goes
/// out first, and the image is sound afterwards (no corruption, leak or check error).
pub fn nbd_server(data: &[u8]) {
    nbd_session(data);
}

/// Runs [`nbd_server`]'s session and returns what the server sent (empty for an empty input).
pub fn nbd_session(data: &[u8]) -> Vec<u8> {
    let Some((&selector, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut input = prefix(selector);
    input.extend_from_slice(rest);
    let (image, exports) = exports();
    let options = ServerOptions::default()
        .max_connections(0)
        .connection(ConnectionOptions::default().workers(0));
    let mut out = Vec::new();
    let _ = serve_stream(&input[..], &mut out, &exports, &options);
    assert_eq!(out[..GREETING_LEN], greeting(), "the greeting comes first");
    drop(exports);
    let report = image.check().expect("check the image after the session");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "the session left the image unsound"
    );
    out
}

/// Every decoder on the same bytes; what decodes re-encodes to the bytes it came from.
pub fn nbd_wire(data: &[u8]) {
    if let Ok(h) = parse_option_header(data) {
        let mut again = encode_option(h.option, &[]);
        again[12..16].copy_from_slice(&h.len.to_be_bytes());
        assert_eq!(again[..], data[..OPTION_HEADER_LEN]);
    }
    if let Ok(r) = parse_info_request(data) {
        assert_eq!(encode_info_request(&r.name, &r.infos), data);
    }
    if let Ok(r) = parse_meta_request(data) {
        let queries: Vec<&str> = r.queries.iter().map(String::as_str).collect();
        let again = encode_meta_request(&r.name, &queries);
        // Over-long or non-UTF-8 queries are dropped, so compare decodings, not bytes.
        assert_eq!(parse_meta_request(&again).ok(), Some(r));
    }
    for mode in [Replies::Structured, Replies::Extended] {
        if let Ok(r) = parse_request(data, mode) {
            assert_eq!(encode_request(&r, mode)[..], data[..mode.request_len()]);
        }
    }
    if let Some(p) = parse_status_payload(data) {
        assert_eq!(p.ids.len() * 4 + 8, data.len());
        assert_eq!(p.length.to_be_bytes()[..], data[..8]);
    }
}

fn request(mode: Replies, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    encode_request(
        &Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        },
        mode,
    )
}

/// Seeds for `nbd_server`, shaped like what real clients send (see the facts digest §1.10).
pub fn nbd_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    // nbdinfo --json: SR, INFO, LIST_META_CONTEXT, GO, a read, DISC.
    let mut s = vec![0u8];
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    s.extend(encode_option(
        OPT_INFO,
        &encode_info_request("", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
    ));
    s.extend(encode_option(
        OPT_LIST_META_CONTEXT,
        &encode_meta_request("", &[]),
    ));
    s.extend(encode_option(
        OPT_GO,
        &encode_info_request("", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
    ));
    s.extend(request(Replies::Structured, 0, CMD_READ, 1, 0, 8192));
    s.extend(request(Replies::Structured, 0, CMD_DISC, 0, 0, 0));
    seeds.push(("nbdinfo".to_string(), s));
    // nbdinfo --list: SR, LIST, INFO per export, ABORT.
    let mut s = vec![0u8];
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    s.extend(encode_option(OPT_LIST, &[]));
    s.extend(encode_option(OPT_INFO, &encode_info_request("ro", &[])));
    s.extend(encode_option(OPT_STARTTLS, &[]));
    s.extend(encode_option(99, b"x"));
    s.extend(encode_option(OPT_ABORT, &[]));
    seeds.push(("list".to_string(), s));
    // ABORT straight after the client flags.
    let mut s = vec![0u8];
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend(encode_option(OPT_ABORT, &[]));
    seeds.push(("abort".to_string(), s));
    // The read-only export: every context listed and set by hand, then reads, block status of
    // each context, and writes that must be refused.
    let mut s = vec![0u8];
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    s.extend(encode_option(
        OPT_LIST_META_CONTEXT,
        &encode_meta_request("ro", &["qemu:"]),
    ));
    s.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request(
            "ro",
            &[
                "base:allocation",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:nosuch",
            ],
        ),
    ));
    s.extend(encode_option(
        OPT_GO,
        &encode_info_request("ro", &[INFO_NAME, INFO_DESCRIPTION]),
    ));
    let m = Replies::Structured;
    s.extend(request(m, 0, CMD_READ, 1, 0, 32768));
    s.extend(request(m, CMD_FLAG_DF, CMD_READ, 2, 4096, 4096));
    s.extend(request(m, 0, CMD_BLOCK_STATUS, 3, 0, SIZE));
    s.extend(request(
        m,
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        4,
        8192,
        4096,
    ));
    s.extend(request(m, CMD_FLAG_FUA, CMD_WRITE, 5, 0, 512));
    s.extend(std::iter::repeat_n(0xa5, 512));
    s.extend(request(m, 0, CMD_WRITE_ZEROES, 6, 0, 4096));
    s.extend(request(m, 0, CMD_TRIM, 7, 0, 4096));
    s.extend(request(m, 0, CMD_FLUSH, 8, 0, 0));
    s.extend(request(m, 0, CMD_CACHE, 9, 0, 4096));
    s.extend(request(m, 0, CMD_DISC, 0, 0, 0));
    seeds.push(("read-only".to_string(), s));
    // Each transmission command in each assisted mode.
    for (selector, mode, name) in [
        (1u8, Replies::Structured, "structured"),
        (2, Replies::Extended, "extended"),
        (3, Replies::Simple, "simple"),
    ] {
        let mut s = vec![selector];
        s.extend(request(mode, CMD_FLAG_FUA, CMD_WRITE, 1, 8192, 4096));
        s.extend(std::iter::repeat_n(0x33, 4096));
        s.extend(request(mode, 0, CMD_READ, 2, 0, 65536));
        s.extend(request(mode, CMD_FLAG_DF, CMD_READ, 3, 100, 9000));
        s.extend(request(
            mode,
            CMD_FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            4,
            4096,
            8192,
        ));
        s.extend(request(
            mode,
            CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES,
            5,
            4096,
            100,
        ));
        s.extend(request(mode, 0, CMD_TRIM, 6, 0, 65536));
        s.extend(request(
            mode,
            CMD_FLAG_REQ_ONE,
            CMD_BLOCK_STATUS,
            7,
            0,
            SIZE,
        ));
        s.extend(request(mode, 0, CMD_BLOCK_STATUS, 8, 512, 100_000));
        s.extend(request(mode, 0, CMD_CACHE, 9, 0, 4096));
        s.extend(request(mode, 0, CMD_FLUSH, 10, 0, 0));
        s.extend(request(mode, 0, 42, 11, 0, 0));
        if mode == Replies::Extended {
            let mut p = SIZE.to_be_bytes().to_vec();
            p.extend_from_slice(&1u32.to_be_bytes());
            s.extend(request(
                mode,
                CMD_FLAG_PAYLOAD_LEN,
                CMD_BLOCK_STATUS,
                12,
                0,
                p.len() as u64,
            ));
            s.extend(p);
        }
        s.extend(request(mode, 0, CMD_DISC, 0, 0, 0));
        seeds.push((format!("commands-{name}"), s));
    }
    seeds
}
