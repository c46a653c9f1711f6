//! Every image QEMU makes reads through the engine exactly as QEMU reads it: guest bytes of the
//! active layer and of every snapshot, and `check` counters equal to `qemu-img check`'s.

use qcow2::{Image, OpenOptions};
use qcow2_testdata::{fixtures, qemu_check, qemu_convert_raw, require_qemu, Fixture};

fn qcow2_fixtures() -> impl Iterator<Item = &'static Fixture> {
    require_qemu();
    fixtures().iter().filter(|f| f.is_qcow2())
}

/// Reads the whole guest disk in uneven chunks, so requests start and end inside clusters.
fn read_all(size: u64, mut read: impl FnMut(&mut [u8], u64) -> qcow2::Result<()>) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let mut pos = 0u64;
    let mut chunk = 1000u64;
    while pos < size {
        let len = chunk.min(size - pos);
        read(&mut out[pos as usize..(pos + len) as usize], pos).unwrap();
        pos += len;
        chunk = if chunk > 3 << 20 { 1000 } else { chunk * 3 + 7 };
    }
    out
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn every_fixture_reads_like_qemu_img_convert() {
    for f in qcow2_fixtures().filter(|f| f.convertible()) {
        let image = Image::open(&f.path, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let ours = read_all(image.size(), |buf, off| image.read_at(buf, off));
        let qemu = qemu_convert_raw(&f.path, None);
        assert_eq!(ours.len(), qemu.len(), "{}: size", f.name);
        assert!(
            ours == qemu,
            "{}: first difference at {:?}",
            f.name,
            first_difference(&ours, &qemu)
        );
    }
}

#[test]
fn every_snapshot_reads_like_qemu_img_convert_of_the_snapshot() {
    let mut seen = 0;
    for f in qcow2_fixtures().filter(|f| !f.snapshots.is_empty()) {
        let image = Image::open(&f.path, &OpenOptions::default()).unwrap();
        for name in &f.snapshots {
            let view = image.open_snapshot(name).unwrap();
            let ours = read_all(view.size(), |buf, off| view.read_at(buf, off));
            let qemu = qemu_convert_raw(&f.path, Some(name));
            assert!(
                ours == qemu,
                "{} snapshot {name}: first difference at {:?}",
                f.name,
                first_difference(&ours, &qemu)
            );
            seen += 1;
        }
    }
    assert!(
        seen >= 5,
        "the fixture set should hold several snapshots, saw {seen}"
    );
}

#[test]
fn check_counts_what_qemu_img_check_counts() {
    for f in qcow2_fixtures() {
        let image = Image::open(&f.path, &OpenOptions::metadata_only()).unwrap();
        let report = image.check().unwrap();
        let (code, json) = qemu_check(&f.path);
        let field = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let ours = [
            ("corruptions", report.corruptions),
            ("leaks", report.leaks),
            ("check-errors", report.check_errors),
            ("image-end-offset", report.image_end_offset),
            ("total-clusters", report.total_clusters),
            ("allocated-clusters", report.allocated_clusters),
            ("fragmented-clusters", report.fragmented_clusters),
            ("compressed-clusters", report.compressed_clusters),
        ];
        for (key, value) in ours {
            assert_eq!(
                value,
                field(key),
                "{}: {key} ({:?})",
                f.name,
                report.messages
            );
        }
        assert_eq!(report.exit_code(), code, "{}: exit code", f.name);
    }
}

#[test]
fn map_of_a_4_tib_sparse_image_walks_only_what_is_allocated() {
    let f = qcow2_testdata::fixture("big-4t");
    let image = Image::open(&f.path, &OpenOptions::default()).unwrap();
    let extents = image.map(0, image.size()).unwrap();
    let data: u64 = extents.iter().filter(|e| e.data()).map(|e| e.length).sum();
    assert!(data > 0 && data < 64 << 20, "{data} bytes of data");
    assert_eq!(
        extents.last().map(|e| e.start + e.length),
        Some(image.size())
    );
}
