//! Encrypted images both ways against QEMU: LUKS and legacy AES images that qemu-img made and
//! qemu-io wrote read byte-for-byte as qemu-img reads them; images we make and write read back
//! through qemu-img with the secret and check clean; a wrong password, a missing key and a
//! damaged LUKS header fail with QEMU's words and no panic.

mod common;

use std::path::Path;

use common::*;
use qcow2_testdata::{qemu_img, qemu_io, scratch_dir};

const SECRET: &str = "secret,id=sec0,data=astrochicken";

fn opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path_str(path)
    )
}

/// The guest bytes as qemu-img converts them to raw, with the secret.
fn qemu_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("qemu.raw");
    let out = qemu_img(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts(path),
        "-O",
        "raw",
        path_str(&raw),
    ]);
    assert!(out.status.success(), "qemu-img convert: {}", stderr(&out));
    std::fs::read(&raw).unwrap()
}

/// The guest bytes as we convert them to raw, with the secret.
fn our_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("ours.raw");
    let out = tool(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "raw",
        "--image-opts",
        &opts(path),
        path_str(&raw),
    ]);
    no_panic(&out);
    assert_eq!(code(&out), 0, "convert: {}", stderr(&out));
    std::fs::read(&raw).unwrap()
}

/// Writes that cover whole clusters, a cluster boundary, parts of sectors and single bytes.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 0xfe00 0x400",
    "write -P 0x33 3 1",
    "write -P 0x44 0x30101 700",
    "write -z 0x20000 0x800",
];

fn qemu_io_writes(path: &Path) {
    let mut args = vec!["--object", SECRET];
    for w in WRITES {
        args.extend(["-c", w]);
    }
    let spec = opts(path);
    args.extend(["--image-opts", &spec]);
    let out = qemu_io(&args);
    assert!(out.status.success(), "qemu-io: {}", stderr(&out));
    assert!(!stdout(&out).contains("error"), "{}", stdout(&out));
}

fn our_io_writes(path: &Path) {
    let mut args = vec!["io", "--object", SECRET];
    for w in WRITES {
        args.extend(["-c", w]);
    }
    let spec = opts(path);
    args.extend(["--image-opts", &spec]);
    let out = tool(&args);
    no_panic(&out);
    assert_eq!(code(&out), 0, "io: {}{}", stdout(&out), stderr(&out));
    assert!(!stdout(&out).contains("error"), "{}", stdout(&out));
}

fn assert_qemu_check_clean(path: &Path) {
    let out = qemu_img(&["check", "--object", SECRET, "--image-opts", &opts(path)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn images_qemu_encrypted_read_as_qemu_reads_them() {
    let dir = scratch_dir("qemu_encrypted");
    for (name, o) in [
        (
            "luks.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ),
        ("aes.qcow2", "encrypt.format=aes,encrypt.key-secret=sec0"),
        (
            "luks-cbc.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.hash-alg=sha1,cluster_size=4096",
        ),
    ] {
        let path = dir.join(name);
        let out = qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            o,
            path_str(&path),
            "1M",
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        qemu_io_writes(&path);
        let theirs = qemu_raw(&path);
        assert_eq!(theirs[3], 0x33, "{name}");
        assert_eq!(our_raw(&path), theirs, "{name}");
    }
}

#[test]
fn images_we_encrypt_read_back_through_qemu_and_check_clean() {
    let dir = scratch_dir("ours_encrypted");
    for (name, o) in [
        (
            "luks.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ),
        ("aes.qcow2", "encryption=on,encrypt.key-secret=sec0"),
        (
            "luks-small.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             cluster_size=512",
        ),
    ] {
        let path = dir.join(name);
        let out = tool(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            o,
            path_str(&path),
            "1M",
        ]);
        no_panic(&out);
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        our_io_writes(&path);
        assert_qemu_check_clean(&path);
        let theirs = qemu_raw(&path);
        assert_eq!(&theirs[0..3], &[0x11; 3], "{name}");
        assert_eq!(theirs[3], 0x33, "{name}");
        assert_eq!(&theirs[0xfe00..0x10200], &[0x22; 0x400][..], "{name}");
        assert_eq!(our_raw(&path), theirs, "{name}");
    }
}

#[test]
fn a_wrong_or_missing_password_fails_with_qemus_words() {
    let dir = scratch_dir("wrong_password");
    let path = dir.join("luks.qcow2");
    let out = tool(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path_str(&path),
        "1M",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = ours_as(
        "qemu-io",
        &dir,
        &[
            "--object",
            "secret,id=sec0,data=platypus",
            "-c",
            "read 0 512",
            "--image-opts",
            &opts(&path),
        ],
    );
    no_panic(&out);
    assert_eq!(
        stderr(&out),
        "qemu-io: can't open: Invalid password, cannot unlock any keyslot\n"
    );
    let out = ours_as("qemu-img", &dir, &["check", path_str(&path)]);
    no_panic(&out);
    assert!(
        stderr(&out).contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        stderr(&out)
    );
    // info needs no key, as qemu-img's opens without I/O.
    let out = ours_as("qemu-img", &dir, &["info", path_str(&path)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("encrypted: yes\n"));
    assert!(stdout(&out).contains("        cipher alg: aes-256\n"));
}

#[test]
fn a_damaged_luks_header_is_an_error_not_a_panic() {
    let dir = scratch_dir("damaged_luks");
    let good = dir.join("good.qcow2");
    let out = tool(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path_str(&good),
        "1M",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let bytes = std::fs::read(&good).unwrap();
    // The LUKS area follows header, refcount table, refcount block and L1 table.
    let luks = 0x40000;
    assert_eq!(&bytes[luks..luks + 4], b"LUKS");
    // (offset in the LUKS header, bytes written there, what QEMU says)
    let damage: &[(usize, &[u8], &str)] = &[
        (0, b"XXXX", "Volume is not in LUKS format"),
        (108, &1000u32.to_be_bytes(), "not supported"),
        (108, &u32::MAX.to_be_bytes(), "not supported"),
        (
            104,
            &4u32.to_be_bytes(),
            "LUKS payload is overlapping with the header",
        ),
        (164, &0u32.to_be_bytes(), "LUKS key iteration count is zero"),
        (
            208 + 44,
            &5u32.to_be_bytes(),
            "Keyslot 0 is corrupted (stripes 5 != 4000)",
        ),
        (
            208 + 40,
            &u32::MAX.to_be_bytes(),
            "Keyslot 0 is overlapping",
        ),
        (
            208 + 48 + 40,
            &8u32.to_be_bytes(),
            "Keyslots 0 and 1 are overlapping",
        ),
        (
            40,
            &[b'x'; 32],
            "LUKS header cipher mode is not NUL terminated",
        ),
        (40, b"ctr-plain64\0", "Cipher mode 'ctr' not supported"),
        (72, b"md4\0", "Hash algorithm 'md4' not supported"),
    ];
    for (i, &(at, patch, message)) in damage.iter().enumerate() {
        let mut b = bytes.clone();
        b[luks + at..luks + at + patch.len()].copy_from_slice(patch);
        let path = dir.join(format!("bad{i}.qcow2"));
        std::fs::write(&path, &b).unwrap();
        let out = ours_as(
            "qemu-io",
            &dir,
            &[
                "--object",
                SECRET,
                "-c",
                "read 0 512",
                "--image-opts",
                &opts(&path),
            ],
        );
        no_panic(&out);
        assert!(
            stderr(&out).contains(message),
            "damage {i}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn amend_adds_and_erases_key_slots_that_qemu_then_uses() {
    let dir = scratch_dir("amend_keyslots");
    let path = dir.join("luks.qcow2");
    let s1 = "secret,id=sec1,data=hunter1";
    let out = tool(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path_str(&path),
        "1M",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let amend = |image_secret: &str, o: &str| {
        let spec = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret={image_secret}",
            path_str(&path)
        );
        ours_as(
            "qemu-img",
            &dir,
            &[
                "amend",
                "--object",
                SECRET,
                "--object",
                s1,
                "--image-opts",
                &spec,
                "-o",
                o,
            ],
        )
    };
    let out = amend(
        "sec0",
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = amend("sec1", "encrypt.state=inactive,encrypt.old-secret=sec0");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = amend("sec1", "encrypt.state=inactive,encrypt.keyslot=1");
    assert_eq!(
        stderr(&out),
        "qemu-img: Attempt to erase the only active keyslot 1 which will erase all the data in \
         the image irreversibly - refusing operation\n"
    );
    let read = |secret: &str| {
        let spec = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec",
            path_str(&path)
        );
        qemu_io(&[
            "--object",
            &format!("secret,id=sec,data={secret}"),
            "-c",
            "read 0 512",
            "--image-opts",
            &spec,
        ])
    };
    assert!(read("hunter1").status.success());
    assert!(stderr(&read("astrochicken")).contains("Invalid password"));
    assert_qemu_check_clean_with(&path, "secret,id=sec0,data=hunter1");
}

fn assert_qemu_check_clean_with(path: &Path, secret: &str) {
    let out = qemu_img(&["check", "--object", secret, "--image-opts", &opts(path)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
