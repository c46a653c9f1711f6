//! `map` against `qemu-img map` on every fixture, byte for byte.

mod common;

use common::*;
use qcow2_testdata::{fixture, fixtures};

fn assert_map_matches(name: &str) {
    let f = fixture(name);
    let path = path_str(&f.path);
    for output in ["--output=json", "--output=human"] {
        let args = ["map", output, "-f", fmt(f), path];
        let qemu = qemu_in(dir_of(&f.path), &args);
        let ours = tool(&args);
        no_panic(&ours);
        assert_eq!(
            code(&ours),
            code(&qemu),
            "{name} {output}: {}",
            stderr(&ours)
        );
        assert_eq!(stdout(&ours), stdout(&qemu), "{name} {output}");
    }
}

#[test]
fn map_matches_qemu_img_on_every_fixture() {
    for f in fixtures() {
        assert_map_matches(&f.name);
    }
}

#[test]
fn map_json_parses_and_covers_the_whole_disk() {
    let f = fixture("chain-top");
    let out = tool(&["map", "--output=json", path_str(&f.path)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let total: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, f.virtual_size());
}

/// Where a raw backing file has holes, QEMU asks the file system and reports the range as
/// zeros: the same answers here, for both output forms.
#[test]
fn raw_backing_holes_read_as_zeros_as_in_qemu_img() {
    let dir = qcow2_testdata::scratch_dir("map_holes");
    let raw = dir.join("base.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 65536], 2 << 20).unwrap();
    drop(file);
    let top = dir.join("top.qcow2");
    qcow2_testdata::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&top),
        "8M",
    ]);
    qcow2_testdata::qemu_io(&["-c", "write 5M 64k", path_str(&top)]);
    for output in ["--output=json", "--output=human"] {
        let args = ["map", output, path_str(&top)];
        let ours = tool(&args);
        let qemu = qemu_in(&dir, &args);
        assert_eq!(code(&ours), code(&qemu), "{}", stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&qemu), "{output}");
    }
}

/// A metadata-preallocated image maps its clusters to holes of the file: QEMU guesses so from
/// the refcounts against the file's blocks and reports such clusters as zeros (iotest 250).
/// A plainly written image next to it must not be taken for one.
#[test]
fn metadata_preallocated_clusters_over_holes_map_as_zeros_as_in_qemu_img() {
    let dir = qcow2_testdata::scratch_dir("map_prealloc");
    for (options, writes) in [
        (
            "preallocation=metadata,cluster_size=64k",
            &["write -P 1 0 1M", "discard 2M 1M", "write -P 2 30M 64k"][..],
        ),
        (
            "cluster_size=64k",
            &["write -P 1 0 1M", "write -z 1M 1M"][..],
        ),
    ] {
        let img = dir.join("t.qcow2");
        qcow2_testdata::qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            path_str(&img),
            "32M",
        ]);
        for w in writes {
            qcow2_testdata::qemu_io(&["-c", w, path_str(&img)]);
        }
        for output in ["--output=json", "--output=human"] {
            let args = ["map", output, path_str(&img)];
            let ours = tool(&args);
            let qemu = qemu_in(&dir, &args);
            assert_eq!(code(&ours), code(&qemu), "{}", stderr(&ours));
            assert_eq!(stdout(&ours), stdout(&qemu), "{options} {output}");
        }
    }
}
