//! Headers QEMU reads leniently, read the same way: a backing name of length 0 means no backing
//! file, and a repeated backing-format extension takes the later one. Each crafted image gives
//! the same `info --output=json` and the same reads in both tools.

mod common;

use std::path::Path;

use common::{code, path_str, stderr, stdout, tool};
use qcow2_testdata::{qemu_img, qemu_img_ok, qemu_io, scratch_dir};

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The header extensions of a v3 image: (type, data), in order.
fn extensions(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut pos = be32(b, 100) as usize;
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(b, pos), be32(b, pos + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, b[pos + 8..pos + 8 + len].to_vec()));
        pos += 8 + len.div_ceil(8) * 8;
    }
}

/// Rewrites the extension area with `exts` and puts the backing name right after it.
fn rewrite(b: &mut [u8], exts: &[(u32, Vec<u8>)], name: &[u8]) {
    let mut area = Vec::new();
    for (kind, data) in exts {
        area.extend(kind.to_be_bytes());
        area.extend((data.len() as u32).to_be_bytes());
        area.extend(data);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend([0u8; 8]);
    let start = be32(b, 100) as usize;
    let name_at = start + area.len();
    b[start..name_at].copy_from_slice(&area);
    b[name_at..name_at + name.len()].copy_from_slice(name);
    b[8..16].copy_from_slice(&(name_at as u64).to_be_bytes());
    b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
}

fn same_as_qemu(image: &Path) {
    let ours = tool(&["info", "--output=json", path_str(image)]);
    let theirs = qemu_img(&["info", "--output=json", path_str(image)]);
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    assert_eq!(stdout(&ours), String::from_utf8_lossy(&theirs.stdout));
    let read = "read -P 0x7 0 64k";
    let ours = tool(&["io", "-r", "-c", read, path_str(image)]);
    let theirs = qemu_io(&["-r", "-c", read, path_str(image)]);
    assert_eq!(code(&ours), code(&theirs), "{}", stderr(&ours));
}

#[test]
fn an_empty_backing_name_and_a_repeated_backing_format_read_as_in_qemu() {
    let dir = scratch_dir("header_quirks");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    qemu_io(&["-c", "write -P 7 0 64k", path_str(&base)]);
    for (name, edit) in [("empty-name.qcow2", 0), ("repeated-format.qcow2", 1)] {
        let image = dir.join(name);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            path_str(&image),
            "1M",
        ]);
        let mut b = std::fs::read(&image).unwrap();
        let mut exts = extensions(&b);
        if edit == 0 {
            rewrite(&mut b, &exts, b"");
        } else {
            let at = exts.iter().position(|e| e.0 == 0xE279_2ACA).unwrap();
            exts.insert(at, (0xE279_2ACA, b"raw".to_vec()));
            rewrite(&mut b, &exts, b"base.qcow2");
        }
        std::fs::write(&image, &b).unwrap();
        same_as_qemu(&image);
    }
}
