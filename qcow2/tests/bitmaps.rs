//! Persistent dirty bitmaps made by QEMU survive this engine's writes: QEMU still lists them as
//! consistent, `qemu-img check` is clean, and the dirty ranges QEMU exports over NBD
//! (`qemu-nbd -B` read by `nbdinfo --map=qemu:dirty-bitmap:NAME`) are exactly the granules a
//! model says were written.

use std::collections::BTreeSet;
use std::path::Path;

use qcow2::{Image, OpenOptions};
use qcow2_testdata::{qemu_check, qemu_img_ok, qemu_info, qemu_io, scratch_dir};

/// One QEMU-made bitmap and the guest granules it must mark.
struct Expect {
    name: String,
    granularity: u64,
    enabled: bool,
    dirty: BTreeSet<u64>,
}

impl Expect {
    fn new(name: &str, granularity: u64, enabled: bool) -> Self {
        Expect {
            name: name.into(),
            granularity,
            enabled,
            dirty: BTreeSet::new(),
        }
    }

    fn note(&mut self, offset: u64, len: u64) {
        if !self.enabled || len == 0 {
            return;
        }
        let g = self.granularity;
        for granule in offset / g..=(offset + len - 1) / g {
            self.dirty.insert(granule);
        }
    }

    /// The model as merged `(start, length)` ranges, clipped to the disk.
    fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &granule in &self.dirty {
            let start = granule * self.granularity;
            let end = (start + self.granularity).min(size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => out.push((start, end - start)),
            }
        }
        out
    }
}

/// The dirty ranges QEMU itself exports for bitmap `name` of `image`.
fn qemu_dirty_ranges(image: &Path, name: &str) -> Vec<(u64, u64)> {
    qcow2_testdata::qemu_dirty_map(image, name)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

/// qemu-img info's bitmap list as (name, flags).
fn qemu_bitmaps(image: &Path) -> Vec<(String, Vec<String>)> {
    let info = qemu_info(image);
    let list = &info["format-specific"]["data"]["bitmaps"];
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (b["name"].as_str().unwrap().to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A deterministic mix of writes, zero writes and discards, noted in every model.
fn workload(image: &Image, expect: &mut [Expect], seed: u64, ops: usize) {
    let size = image.size();
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    for _ in 0..ops {
        let offset = (next() % (size / 512)) * 512;
        let len = ((next() % 256) * 512 + 512).min(size - offset);
        match next() % 4 {
            0 => image.write_zeroes(offset, len, next() % 2 == 0).unwrap(),
            1 => image.discard(offset, len).unwrap(),
            _ => image.write_at(&vec![0x5a; len as usize], offset).unwrap(),
        }
        for e in expect.iter_mut() {
            e.note(offset, len);
        }
    }
}

fn assert_bitmaps_match(image_path: &Path, expect: &[Expect], size: u64) {
    let listed = qemu_bitmaps(image_path);
    assert_eq!(listed.len(), expect.len());
    for (name, flags) in &listed {
        assert!(
            !flags.iter().any(|f| f == "in-use"),
            "{name} is in use after a clean close: {flags:?}"
        );
    }
    let (code, report) = qemu_check(image_path);
    assert_eq!(code, 0, "qemu-img check: {report}");
    let ours = Image::open(image_path, &OpenOptions::default()).unwrap();
    for e in expect {
        let want = e.ranges(size);
        assert_eq!(
            qemu_dirty_ranges(image_path, &e.name),
            want,
            "QEMU's view of bitmap {}",
            e.name
        );
        assert_eq!(
            ours.dirty_extents(&e.name, 0, size).unwrap(),
            want,
            "our view of bitmap {}",
            e.name
        );
    }
}

#[test]
fn qemu_made_bitmaps_mark_exactly_what_we_write() {
    let dir = scratch_dir("bitmaps_mark");
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let size = 32u64 << 20;
    qemu_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "32M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 7 0 32M",
        base.to_str().unwrap(),
    ]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let top_s = top.to_str().unwrap();
    let mut expect = vec![
        Expect::new("g512", 512, true),
        Expect::new("g64k", 65536, true),
        Expect::new("g1m", 1 << 20, true),
        Expect::new("off", 65536, false),
    ];
    for e in &expect {
        let g = e.granularity.to_string();
        let mut args = vec!["bitmap", "--add", "-g", &g];
        if !e.enabled {
            args.push("--disable");
        }
        args.extend([top_s, &e.name]);
        qemu_img_ok(&args);
    }
    // QEMU dirties the bitmaps first; its bits must survive our session.
    qemu_io(&["-f", "qcow2", "-c", "write 20M 4k", top_s]);
    for e in &mut expect {
        e.note(20 << 20, 4096);
    }
    qemu_img_ok(&["snapshot", "-c", "s1", top_s]);
    {
        let image = Image::open(&top, &OpenOptions::read_write()).unwrap();
        workload(&image, &mut expect, 1, 40);
        image.close().unwrap();
    }
    assert_bitmaps_match(&top, &expect, size);
    // QEMU and we take turns: its writes and ours add up.
    qemu_io(&["-f", "qcow2", "-c", "write 30M 64k", top_s]);
    for e in &mut expect {
        e.note(30 << 20, 65536);
    }
    {
        let image = Image::open(&top, &OpenOptions::read_write()).unwrap();
        workload(&image, &mut expect, 2, 20);
        image.close().unwrap();
    }
    assert_bitmaps_match(&top, &expect, size);
}

#[test]
fn a_hundred_bitmaps_stay_consistent_through_snapshots() {
    let dir = scratch_dir("bitmaps_hundred");
    let path = dir.join("d.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "8M"]);
    let mut expect = Vec::new();
    for i in 0..100 {
        let name = format!("bitmap-{i:03}");
        let g = 512u64 << (i % 12);
        qemu_img_ok(&["bitmap", "--add", "-g", &g.to_string(), p, &name]);
        expect.push(Expect::new(&name, g, true));
    }
    {
        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        assert_eq!(image.bitmaps().len(), 100);
        assert!(image.bitmaps().iter().all(|b| b.enabled && b.consistent()));
        workload(&image, &mut expect, 3, 10);
        image
            .create_snapshot("snap", qcow2::format::SnapshotTime::default())
            .unwrap();
        workload(&image, &mut expect, 4, 10);
        image.close().unwrap();
    }
    let listed = qemu_bitmaps(&path);
    assert_eq!(listed.len(), 100);
    assert!(listed.iter().all(|(_, f)| f == &["auto".to_string()]));
    assert_eq!(qemu_check(&path).0, 0);
    for e in expect.iter().step_by(17) {
        assert_eq!(qemu_dirty_ranges(&path, &e.name), e.ranges(8 << 20));
    }
}

#[test]
fn a_crash_leaves_bitmaps_in_use_for_qemu_and_complete_for_us() {
    let dir = scratch_dir("bitmaps_crash");
    let path = dir.join("d.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "8M"]);
    qemu_img_ok(&["bitmap", "--add", p, "b0"]);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    // Reading does not touch the bitmaps on disk.
    let before = std::fs::read(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    image.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    image.write_at(&[1; 4096], 1 << 20).unwrap();
    image.flush().unwrap();
    // What a power cut now leaves: QEMU must see the bitmap as in use.
    let crashed = dir.join("crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    image.close().unwrap();
    let listed = qemu_bitmaps(&crashed);
    assert_eq!(listed[0].1, vec!["in-use".to_string(), "auto".to_string()]);
    assert_eq!(qemu_check(&crashed).0, 0);
    // The clean close saved it.
    assert_eq!(qemu_bitmaps(&path)[0].1, vec!["auto".to_string()]);
    assert_eq!(qemu_dirty_ranges(&path, "b0"), vec![(1 << 20, 65536)]);
    // Once QEMU has had the crashed image open for writing, it cleared this engine's
    // autoclear bit: the in-use bitmap is reported, kept, and not trusted by us either.
    let touched = dir.join("touched.qcow2");
    std::fs::copy(&crashed, &touched).unwrap();
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write 4M 512",
        touched.to_str().unwrap(),
    ]);
    let again = Image::open(&touched, &OpenOptions::read_write()).unwrap();
    assert!(again.bitmaps()[0].in_use);
    assert!(again.dirty_extents("b0", 0, 8 << 20).is_err());
    again.write_at(&[2; 512], 0).unwrap();
    again.close().unwrap();
    assert_eq!(
        qemu_bitmaps(&touched)[0].1,
        vec!["in-use".to_string(), "auto".to_string()]
    );
    assert_eq!(qemu_check(&touched).0, 0);
    // Our own next open trusts what our session kept durable: the bitmap is back, complete.
    let ours = Image::open(&crashed, &OpenOptions::read_write()).unwrap();
    assert!(ours.bitmaps()[0].consistent());
    assert_eq!(
        ours.dirty_extents("b0", 0, 8 << 20).unwrap(),
        vec![(1 << 20, 65536)]
    );
    ours.write_at(&[2; 512], 0).unwrap();
    ours.close().unwrap();
    assert_eq!(qemu_bitmaps(&crashed)[0].1, vec!["auto".to_string()]);
    assert_eq!(
        qemu_dirty_ranges(&crashed, "b0"),
        vec![(0, 65536), (1 << 20, 65536)]
    );
    assert_eq!(qemu_check(&crashed).0, 0);
}

#[test]
fn resize_keeps_the_bits_tracked_in_the_same_session() {
    let dir = scratch_dir("bitmaps_resize_session");
    let path = dir.join("d.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "8M"]);
    qemu_img_ok(&["bitmap", "--add", p, "b0"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "512", p, "b1"]);
    let mut expect = [Expect::new("b0", 65536, true), Expect::new("b1", 512, true)];
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let write = |image: &Image, expect: &mut [Expect], offset: u64, len: u64| {
        image.write_at(&vec![0x33; len as usize], offset).unwrap();
        for e in expect.iter_mut() {
            e.note(offset, len);
        }
    };
    write(&image, &mut expect, 100_000, 3000);
    write(&image, &mut expect, 7 << 20, 5000);
    // Shrinking to a size inside a granule keeps that granule's bit and drops the rest.
    let shrunk = (3 << 20) + 512;
    image.resize(shrunk, true).unwrap();
    for e in expect.iter_mut() {
        e.dirty.retain(|&g| g * e.granularity < shrunk);
    }
    write(&image, &mut expect, 2 << 20, 512);
    image.resize(20 << 20, false).unwrap();
    write(&image, &mut expect, 19 << 20, 70_000);
    image.close().unwrap();
    assert_eq!(qemu_check(&path).0, 0);
    let listed = qemu_bitmaps(&path);
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|(_, flags)| flags == &["auto"]),
        "{listed:?}"
    );
    for e in &expect {
        assert_eq!(
            qemu_dirty_ranges(&path, &e.name),
            e.ranges(20 << 20),
            "{}",
            e.name
        );
    }
}

/// Bytes of the first directory entry, for the hostile cases.
fn directory_offset(path: &Path) -> u64 {
    let image = Image::open(path, &OpenOptions::metadata_only()).unwrap();
    image
        .header()
        .extensions
        .bitmaps
        .unwrap()
        .bitmap_directory_offset
}

#[test]
fn hostile_bitmap_directories_are_refused_by_name_like_qemu_refuses_them() {
    use std::os::unix::fs::FileExt;
    let dir = scratch_dir("bitmaps_hostile");
    let clean = dir.join("clean.qcow2");
    let c = clean.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", c, "8M"]);
    qemu_img_ok(&["bitmap", "--add", c, "victim"]);
    let dir_at = directory_offset(&clean);
    // (what, byte offset inside the entry, bytes)
    let cases: &[(&str, u64, &[u8])] = &[
        ("granularity below 512", 17, &[8]),
        ("granularity above 2 GiB", 17, &[32]),
        ("reserved flag", 12, &[0, 0, 0, 4]),
        ("bitmap type", 16, &[2]),
        ("extra data", 20, &[0, 0, 0, 8]),
        ("unaligned table", 0, &[0, 0, 0, 0, 0, 0, 0x12, 0x34]),
        ("table size", 8, &[0, 0, 0, 9]),
        ("empty table", 8, &[0, 0, 0, 0]),
        ("name size", 18, &[0, 0]),
    ];
    for (what, at, bytes) in cases {
        let path = dir.join(format!("{}.qcow2", what.replace(' ', "-")));
        std::fs::copy(&clean, &path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(bytes, dir_at + at).unwrap();
        drop(f);
        let before = std::fs::read(&path).unwrap();
        let qemu = qcow2_testdata::qemu_img(&["info", path.to_str().unwrap()]);
        assert!(!qemu.status.success(), "{what}: qemu-img opens it");
        for options in [OpenOptions::default(), OpenOptions::read_write()] {
            let err = Image::open(&path, &options).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("bitmap") && text.contains(&format!("{dir_at:#x}")),
                "{what}: {text}"
            );
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "{what}");
    }
}

/// Power cuts at every write of a session that adds, changes and removes bitmaps and writes
/// guest data: every crashed image opens, checks without corruption, lists each bitmap as
/// consistent or in use, and QEMU accepts a sample of them.
#[test]
fn power_cuts_in_bitmap_changes_leave_bitmaps_consistent_or_in_use() {
    use qcow2::storage::recording::{RecordingStorage, Survivors};
    use qcow2::{CreateOptions, MemoryStorage};
    use std::sync::Arc;
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::new(8 << 20);
    let image = Image::create_in(Box::new(store.clone()), "crash.qcow2", &options).unwrap();
    image.flush().unwrap();
    let start = store.op_count();
    image.add_bitmap("b0", 65536, false).unwrap();
    image.add_bitmap("b1", 512, true).unwrap();
    image.write_at(&[1; 8192], 1 << 20).unwrap();
    image.flush().unwrap();
    image.merge_bitmap("b1", "b0", None).unwrap();
    image.write_zeroes(2 << 20, 65536, true).unwrap();
    image.set_bitmap_enabled("b1", true).unwrap();
    image.remove_bitmap("b0").unwrap();
    image.add_bitmap("b2", 1 << 20, false).unwrap();
    image.write_at(&[2; 512], 5 << 20).unwrap();
    image.close().unwrap();
    let ops = store.ops();
    let dir = scratch_dir("bitmaps_crash_matrix");
    let sample = dir.join("cut.qcow2");
    let mut qemu_checked = 0;
    for k in start..=ops.len() {
        for survivors in [
            Survivors::None,
            Survivors::All,
            Survivors::TornSectors(k as u64),
        ] {
            let bytes = store.crash_image(k, survivors);
            let what = format!("cut after {k} of {} ops, {survivors:?}", ops.len());
            let image = Image::from_storage(
                Box::new(MemoryStorage::from_bytes(bytes.clone())),
                "crashed",
                &OpenOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let report = image
                .check()
                .unwrap_or_else(|e| panic!("{what}: check: {e}"));
            assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
            for b in image.bitmaps() {
                if b.consistent() {
                    image
                        .dirty_extents(&b.name, 0, 8 << 20)
                        .unwrap_or_else(|e| panic!("{what}: bitmap {}: {e}", b.name));
                }
            }
            if k % 7 == 0 && matches!(survivors, Survivors::All) {
                std::fs::write(&sample, &bytes).unwrap();
                let (code, json) = qemu_check(&sample);
                assert!(
                    code == 0 || code == 3,
                    "{what}: qemu-img check {code}: {json}"
                );
                qemu_checked += 1;
            }
        }
    }
    assert!(qemu_checked > 3);
}

/// The step beyond QEMU: after a power cut at any write of a session, our next read-write open
/// gives every bitmap back consistent, marking at least every granule whose data on the crashed
/// disk differs from the session's start; a disabled bitmap stays empty.
#[test]
fn after_any_power_cut_our_bitmaps_come_back_consistent_and_complete() {
    use qcow2::storage::recording::{RecordingStorage, Survivors};
    use qcow2::{CreateOptions, MemoryStorage};
    use std::sync::Arc;
    let size = 4u64 << 20;
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::new(size);
    let image = Image::create_in(Box::new(store.clone()), "durable.qcow2", &options).unwrap();
    image.add_bitmap("g64k", 65536, false).unwrap();
    image.add_bitmap("g512", 512, false).unwrap();
    image.add_bitmap("off", 65536, true).unwrap();
    image.close().unwrap();
    let image = Image::from_storage(
        Box::new(store.clone()),
        "durable.qcow2",
        &OpenOptions::read_write(),
    )
    .unwrap();
    let start = store.op_count();
    let mut state = 7u64;
    for i in 0..40 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // A quarter of the disk, so later writes land in place in clusters earlier ones made.
        let offset = ((state >> 33) % (size / 4 / 512)) * 512;
        let len = (((state >> 20) % 64 + 1) * 512).min(size - offset);
        match i % 5 {
            3 => image.write_zeroes(offset, len, i % 2 == 0).unwrap(),
            4 => image.discard(offset, len).unwrap(),
            _ => image
                .write_at(&vec![i as u8 + 1; len as usize], offset)
                .unwrap(),
        }
        if i % 9 == 8 {
            image.flush().unwrap();
        }
    }
    image.close().unwrap();
    let ops = store.ops().len();
    let covered = |extents: &[(u64, u64)], offset: u64, len: u64, g: u64| {
        let first = offset / g * g;
        let end = (offset + len).div_ceil(g) * g;
        let end = end.min(size);
        let mut pos = first;
        for &(s, l) in extents {
            if s <= pos && pos < s + l {
                pos = s + l;
            }
        }
        pos >= end
    };
    let mut tested = 0;
    for k in start..=ops {
        for survivors in [
            Survivors::None,
            Survivors::All,
            Survivors::TornSectors(k as u64),
        ] {
            let bytes = store.crash_image(k, survivors);
            let what = format!("cut after {k} of {ops} ops, {survivors:?}");
            let image = Image::from_storage(
                Box::new(MemoryStorage::from_bytes(bytes)),
                "crashed",
                &OpenOptions::read_write(),
            )
            .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let listed = image.bitmaps();
            assert_eq!(listed.len(), 3, "{what}");
            assert!(listed.iter().all(|b| b.consistent()), "{what}: {listed:?}");
            assert!(
                image.dirty_extents("off", 0, size).unwrap().is_empty(),
                "{what}"
            );
            // What the crashed disk really holds: every granule whose data differs from the
            // session's start (all zeros) is marked, whatever reached the disk in what order.
            let mut content = vec![0u8; size as usize];
            image.read_at(&mut content, 0).unwrap();
            for (name, g) in [("g64k", 65536u64), ("g512", 512)] {
                let extents = image.dirty_extents(name, 0, size).unwrap();
                for (n, granule) in content.chunks(g as usize).enumerate() {
                    if granule.iter().any(|&b| b != 0) {
                        assert!(
                            covered(&extents, n as u64 * g, g, g),
                            "{what}: bitmap {name} misses changed data at {:#x}",
                            n as u64 * g
                        );
                    }
                }
            }
            let report = image.check().unwrap();
            assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
            tested += 1;
        }
    }
    assert!(tested > 100, "{tested} cuts");
}
