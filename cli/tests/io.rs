//! `io -c 'read ...'` against qemu-io.

mod common;

use common::*;
use qcow2_testdata::{fixture, qemu_convert_raw, qemu_io};

#[test]
fn read_with_a_matching_pattern_exits_0_and_prints_qemu_io_first_line() {
    let f = fixture("c64k");
    let bytes = qemu_convert_raw(&f.path, None);
    let pattern = bytes[0];
    assert!(bytes[..4096].iter().all(|&b| b == pattern));
    let cmd = format!("read -P {pattern:#04x} 0 4k");
    let ours = tool(&["io", "-r", "-f", "qcow2", "-c", &cmd, path_str(&f.path)]);
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    let qemu = qemu_io(&["-r", "-f", "qcow2", "-c", &cmd, path_str(&f.path)]);
    assert_eq!(code(&qemu), 0);
    let first = |s: String| s.lines().next().unwrap_or("").to_string();
    assert_eq!(first(stdout(&ours)), first(stdout(&qemu)));
    assert_eq!(first(stdout(&ours)), "read 4096/4096 bytes at offset 0");
}

#[test]
fn read_with_a_wrong_pattern_exits_1_like_qemu_io() {
    let f = fixture("c64k");
    let bytes = qemu_convert_raw(&f.path, None);
    let wrong = bytes[0].wrapping_add(1);
    let cmd = format!("read -P {wrong:#04x} 0 4k");
    let ours = tool(&["io", "-r", "-c", &cmd, path_str(&f.path)]);
    let qemu = qemu_io(&["-r", "-f", "qcow2", "-c", &cmd, path_str(&f.path)]);
    assert_eq!(code(&ours), 1);
    assert_eq!(code(&qemu), 1);
    let head = |s: String| s.lines().take(2).collect::<Vec<_>>().join("\n");
    assert_eq!(head(stdout(&ours)), head(stdout(&qemu)));
}

#[test]
fn read_through_a_backing_chain_sees_backing_data() {
    let f = fixture("chain-top");
    let bytes = qemu_convert_raw(&f.path, None);
    // A stretch that comes from the raw base (depth 2 in qemu-img map).
    let at = 0x80000;
    let p = bytes[at];
    assert!(bytes[at..at + 4096].iter().all(|&b| b == p));
    let cmd = format!("read -P {p} {at} 4096");
    let out = tool(&["io", "-r", "-c", &cmd, path_str(&f.path)]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
}

#[test]
fn verbose_read_dumps_like_qemu_io() {
    let f = fixture("c64k");
    let cmd = "read -v 0 40";
    let ours = tool(&["io", "-r", "-c", cmd, path_str(&f.path)]);
    let qemu = qemu_io(&["-r", "-f", "qcow2", "-c", cmd, path_str(&f.path)]);
    let head = |s: String| s.lines().take(4).collect::<Vec<_>>().join("\n");
    assert_eq!(head(stdout(&ours)), head(stdout(&qemu)));
}

#[test]
fn out_of_range_reads_bad_commands_and_read_only_writes_fail() {
    let f = fixture("c64k");
    for cmd in [
        "read 1G 1",
        "write 0 1",
        "discard 0 64k",
        "frobnicate",
        "read 0",
        "read -P 300 0 1",
    ] {
        // -r: the fixtures are shared and must not be written.
        let out = tool(&["io", "-r", "-c", cmd, path_str(&f.path)]);
        no_panic(&out);
        assert_eq!(code(&out), 1, "{cmd}");
    }
}
