//! Sanity checks of the generated fixture set against QEMU itself.

use std::fs;

use qcow2_testdata::{
    copy_fixture, fixture, fixtures, qemu_check, qemu_convert_raw, qemu_info, qemu_json, qemu_map,
    require_qemu, scratch_dir,
};
use serde_json::Value;

const EXPECTED: &[&str] = &[
    "c512",
    "c4k",
    "c64k",
    "c2m",
    "rc1",
    "rc2",
    "rc4",
    "rc8",
    "rc16",
    "rc32",
    "rc64",
    "v2",
    "v2-c4k",
    "ext-l2-32k",
    "ext-l2-64k",
    "ext-l2-2m",
    "ext-l2-overlay",
    "zlib",
    "zstd",
    "zlib-c4k",
    "zstd-c512",
    "chain-base",
    "chain-mid",
    "chain-top",
    "snap",
    "snap-v2",
    "lazy-dirty",
    "lazy-clean",
    "big-4t",
    "odd-4k",
    "odd-64k",
    "odd-zlib",
    "datafile-raw",
    "datafile",
    "bitmaps",
    "unknown-ext",
];

#[test]
fn expected_names_present() {
    let names: Vec<&str> = fixtures().iter().map(|f| f.name.as_str()).collect();
    for n in EXPECTED {
        assert!(names.contains(n), "fixture {n} missing; have {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate fixture names");
}

#[test]
fn every_image_exists_and_checks_as_expected() {
    require_qemu();
    for f in fixtures() {
        assert!(f.path.is_file(), "{}: {} missing", f.name, f.path.display());
        for d in f.deps() {
            assert!(
                d.is_file(),
                "{}: dependency {} missing",
                f.name,
                d.display()
            );
        }
        if !f.is_qcow2() {
            continue;
        }
        let (code, report) = qemu_check(&f.path);
        assert_eq!(
            code,
            f.expected_check_exit(),
            "{}: qemu-img check exit code; report {report}",
            f.name
        );
        if code == 2 {
            assert!(report["corruptions"].as_u64().unwrap_or(0) > 0, "{report}");
        }
        assert_eq!(report["check-errors"], 0, "{}: {report}", f.name);
    }
}

#[test]
fn lazy_dirty_is_dirty_with_corruptions() {
    let f = fixture("lazy-dirty");
    let (code, report) = qemu_check(&f.path);
    assert_eq!(code, 2);
    assert!(report["corruptions"].as_u64().unwrap() >= 2, "{report}");
    let info = qemu_info(&f.path);
    assert_eq!(info["dirty-flag"], true);
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
    // qemu_json on check must not panic on exit code 2
    let v = qemu_json(&["check", "-f", "qcow2", f.path.to_str().unwrap()]);
    assert_eq!(v["corruptions"], report["corruptions"]);
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn qemu_info_matches_notes() {
    for f in fixtures() {
        let info = qemu_info(&f.path);
        let ctx = format!("{}: {info}", f.name);
        assert_eq!(info["format"], f.format(), "{ctx}");
        assert_eq!(info["virtual-size"], f.virtual_size(), "{ctx}");
        if !f.is_qcow2() {
            continue;
        }
        let data = &info["format-specific"]["data"];
        assert_eq!(info["cluster-size"], f.cluster_size().unwrap(), "{ctx}");
        assert_eq!(data["refcount-bits"], f.refcount_bits().unwrap(), "{ctx}");
        assert_eq!(data["compat"], f.compat().unwrap(), "{ctx}");
        if f.compat() == Some("1.1") {
            assert_eq!(data["extended-l2"], f.note("extl2") == Some("on"), "{ctx}");
        }
        assert_eq!(
            data["compression-type"],
            if f.note("compression") == Some("zstd") {
                "zstd"
            } else {
                "zlib"
            },
            "{ctx}"
        );
        if f.note("compression").is_some() {
            let (_, report) = qemu_check(&f.path);
            assert!(
                report["compressed-clusters"].as_u64().unwrap_or(0) > 0,
                "{}: no compressed clusters: {report}",
                f.name
            );
        }
        match f.note("backing") {
            Some(b) => assert_eq!(info["backing-filename"], b, "{ctx}"),
            None => assert!(info.get("backing-filename").is_none(), "{ctx}"),
        }
        match f.note("data_file") {
            Some(d) => assert_eq!(data["data-file"], d, "{ctx}"),
            None => assert!(data.get("data-file").is_none(), "{ctx}"),
        }
        assert_eq!(info["dirty-flag"], f.has_note("dirty"), "{ctx}");
        assert_eq!(names_of(&info["snapshots"]), f.snapshots, "{ctx}");
        let bitmaps: Vec<String> = f
            .note("bitmaps")
            .map(|b| b.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        assert_eq!(names_of(&data["bitmaps"]), bitmaps, "{ctx}");
    }
}

/// Header extension types found in cluster 0 of a qcow2 v3 image.
fn header_extensions(path: &std::path::Path) -> Vec<(u32, u32)> {
    let buf = fs::read(path).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(buf[o..o + 4].try_into().unwrap());
    assert_eq!(be32(0), 0x5146_49fb);
    let mut off = if be32(4) >= 3 { be32(100) as usize } else { 72 };
    let mut out = Vec::new();
    loop {
        let (typ, len) = (be32(off), be32(off + 4));
        if typ == 0 {
            return out;
        }
        out.push((typ, len));
        off += 8 + ((len as usize + 7) & !7);
    }
}

#[test]
fn feature_table_and_unknown_extension() {
    for f in fixtures() {
        let Some(ft) = f.note("feature_table") else {
            continue;
        };
        let has = header_extensions(&f.path)
            .iter()
            .any(|&(t, _)| t == 0x6803_f857);
        assert_eq!(has, ft == "yes", "{}: feature table", f.name);
    }
    let exts = header_extensions(&fixture("unknown-ext").path);
    assert!(exts.contains(&(0x1234_5678, 29)), "{exts:x?}");
    let exts = header_extensions(&fixture("bitmaps").path);
    assert!(
        exts.iter().any(|&(t, l)| t == 0x2385_2875 && l == 24),
        "{exts:x?}"
    );
}

#[test]
fn guest_data_spot_checks() {
    // last partial cluster of odd-4k
    let d = qemu_convert_raw(&fixture("odd-4k").path, None);
    assert_eq!(d.len() as u64, fixture("odd-4k").virtual_size());
    assert!(d[5 << 20..].iter().all(|&b| b == 0x13));
    assert!(d[4096..8192].iter().all(|&b| b == 0));

    // chain: top over mid over raw base
    let d = qemu_convert_raw(&fixture("chain-top").path, None);
    assert_eq!(d.len(), 8 << 20);
    assert!(d[..1000].iter().all(|&b| b == 0xd1));
    assert!(d[1000..4096].iter().all(|&b| b == 0xb1));
    assert!(d[4096..8192].iter().all(|&b| b == 0xc1));
    assert_eq!(d[2 << 20], 0xb1);
    assert!(d[(1 << 20)..(1 << 20) + 12345].iter().all(|&b| b == 0xb2));
    assert!(d[320 << 10..512 << 10].iter().all(|&b| b == 0));
    assert!(d[(6 << 20)..(8 << 20) - 4096].iter().all(|&b| b == 0));
    assert!(d[(8 << 20) - 4096..].iter().all(|&b| b == 0xd4));

    // snapshots see their own data
    let snap = &fixture("snap").path;
    let s1 = qemu_convert_raw(snap, Some("s1"));
    let s3 = qemu_convert_raw(snap, Some("s3"));
    let active = qemu_convert_raw(snap, None);
    assert_eq!(s1[65536], 0x01);
    assert_eq!(s3[65536], 0x00);
    assert_eq!(s3[200 << 10], 0x01);
    assert_eq!(active[0], 0x08);
    assert_eq!(active[600 << 10], 0x06);

    // external data file
    let d = qemu_convert_raw(&fixture("datafile-raw").path, None);
    assert!(d[..65536].iter().all(|&b| b == 0x41));
    let raw = fs::read(fixture("datafile-raw").deps()[0].as_path()).unwrap();
    assert_eq!(raw, d, "data_file_raw: data file is the guest image");
}

#[test]
fn big_image_is_sparse_and_mapped() {
    let f = fixture("big-4t");
    assert!(!f.convertible());
    assert_eq!(f.virtual_size(), 4 << 40);
    assert!(fs::metadata(&f.path).unwrap().len() < 16 << 20);
    let map = qemu_map(&f.path);
    let data_starts: Vec<u64> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["start"].as_u64().unwrap())
        .collect();
    assert!(data_starts.contains(&(1 << 40)), "{data_starts:?}");
    assert!(
        data_starts.contains(&((4 << 40) - 65536)),
        "{data_starts:?}"
    );
}

#[test]
fn scratch_and_copy() {
    let dir = scratch_dir("scratch_and_copy");
    assert!(fs::read_dir(&dir).unwrap().next().is_none());
    let img = copy_fixture("chain-top", &dir);
    assert!(dir.join("chain-mid.qcow2").is_file());
    assert!(dir.join("chain-base.raw").is_file());
    let (code, _) = qemu_check(&img);
    assert_eq!(code, 0);
    let dir2 = scratch_dir("scratch_and_copy");
    assert_eq!(dir, dir2);
    assert!(fs::read_dir(&dir2).unwrap().next().is_none(), "not wiped");
}

#[test]
#[should_panic(expected = "unknown fixture")]
fn unknown_fixture_panics() {
    fixture("no-such-image");
}
