//! Directed write tests against QEMU: refcount table growth, L1 growth, copy-on-write over
//! backing files, snapshot-shared and compressed clusters, compressed writes, repair of leaks and
//! of dirty images. Every image ends with `qemu-img check` at exit 0 and reads back as expected
//! through `qemu-img convert`.

use std::path::Path;

use qcow2::{CreateOptions, Error, Image, OpenOptions, Repair};
use qcow2_testdata::{
    copy_fixture, qemu_check, qemu_convert_raw, qemu_img, require_qemu, scratch_dir,
};

fn assert_qemu_clean(path: &Path) {
    let (code, json) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check of {}: {json}", path.display());
}

fn assert_reads_as(path: &Path, expected: &[u8]) {
    let qemu = qemu_convert_raw(path, None);
    assert_eq!(qemu.len(), expected.len(), "size of {}", path.display());
    let first = qemu.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "{}: first difference at {first:?}",
        path.display()
    );
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn refcount_table_grows_when_512_byte_clusters_fill_it() {
    require_qemu();
    let path = scratch_dir("reftable-growth").join("a.qcow2");
    let options = CreateOptions::new(16 << 20).cluster_size(512);
    let image = Image::create(&path, &options).unwrap();
    let before = image.header().refcount_table_offset;
    let data = pattern(12 << 20, 7);
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        image.write_at(chunk, i as u64 * (256 << 10)).unwrap();
    }
    let after = image.header();
    assert_ne!(
        after.refcount_table_offset, before,
        "the refcount table moved"
    );
    assert!(after.refcount_table_clusters > 1);
    assert!(image.check().unwrap().is_clean());
    image.close().unwrap();
    assert_qemu_clean(&path);
    let mut expected = data;
    expected.resize(16 << 20, 0);
    assert_reads_as(&path, &expected);
}

#[test]
fn growing_moves_the_l1_table_and_shrinking_keeps_data_unless_asked() {
    require_qemu();
    let path = scratch_dir("resize").join("a.qcow2");
    let options = CreateOptions::new(1 << 20).cluster_size(512);
    let image = Image::create(&path, &options).unwrap();
    image.write_at(&pattern(4096, 1), 0).unwrap();
    let l1_before = image.header().l1_table_offset;
    image.resize(64 << 20, false).unwrap();
    assert_ne!(image.header().l1_table_offset, l1_before);
    image
        .write_at(&pattern(4096, 2), (64 << 20) - 4096)
        .unwrap();
    assert!(matches!(
        image.resize(1 << 20, false),
        Err(Error::InvalidArgument { .. })
    ));
    image.close().unwrap();
    assert_qemu_clean(&path);
    let mut expected = vec![0u8; 64 << 20];
    expected[..4096].copy_from_slice(&pattern(4096, 1));
    expected[(64 << 20) - 4096..].copy_from_slice(&pattern(4096, 2));
    assert_reads_as(&path, &expected);

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.resize(2048, true).unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path);
    assert_reads_as(&path, &pattern(4096, 1)[..2048]);
}

/// Writes partial and whole clusters over an existing image and checks it against the bytes
/// QEMU read before plus the writes.
fn overwrite_and_compare(fixture: &str, writes: &[(u64, usize)]) {
    require_qemu();
    let dir = scratch_dir(&format!("overwrite-{fixture}"));
    let path = copy_fixture(fixture, &dir);
    let mut expected = qemu_convert_raw(&path, None);
    let snapshots: Vec<(String, Vec<u8>)> = Image::open(&path, &OpenOptions::default())
        .unwrap()
        .snapshot_entries()
        .iter()
        .map(|s| (s.name_str(), qemu_convert_raw(&path, Some(&s.name_str()))))
        .collect();
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let offset = offset.min(expected.len() as u64 - len as u64);
        let data = pattern(len, i as u8 + 1);
        image.write_at(&data, offset).unwrap();
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    let mut ours = vec![0u8; expected.len()];
    image.read_at(&mut ours, 0).unwrap();
    assert!(
        ours == expected,
        "{fixture}: our read after writing differs"
    );
    image.close().unwrap();
    assert_qemu_clean(&path);
    assert_reads_as(&path, &expected);
    for (name, before) in snapshots {
        assert!(
            qemu_convert_raw(&path, Some(&name)) == before,
            "{fixture}: snapshot {name} changed"
        );
    }
}

const SCATTERED: &[(u64, usize)] = &[
    (0, 100),
    (1000, 5000),
    (65536 + 17, 65536),
    (3 << 20, 4096),
    (5 << 20 | 511, 700),
    (u64::MAX, 3000),
];

#[test]
fn copy_on_write_over_a_qcow2_and_raw_backing_chain() {
    overwrite_and_compare("chain-top", SCATTERED);
    overwrite_and_compare("chain-mid", SCATTERED);
}

#[test]
fn copy_on_write_keeps_qemu_made_snapshots_intact() {
    overwrite_and_compare("snap", SCATTERED);
    overwrite_and_compare("snap-v2", SCATTERED);
}

#[test]
fn copy_on_write_out_of_compressed_clusters() {
    overwrite_and_compare("zlib", SCATTERED);
    overwrite_and_compare("zstd", SCATTERED);
}

#[test]
fn copy_on_write_of_subclusters_over_a_backing_file() {
    overwrite_and_compare("ext-l2-overlay", SCATTERED);
    overwrite_and_compare("ext-l2-64k", SCATTERED);
}

#[test]
fn writes_into_external_data_files() {
    overwrite_and_compare("datafile-raw", SCATTERED);
}

#[test]
fn compressed_writes_are_read_by_qemu_and_counted_as_compressed() {
    require_qemu();
    for (kind, name) in [
        (qcow2::format::CompressionType::Zlib, "zlib"),
        (qcow2::format::CompressionType::Zstd, "zstd"),
    ] {
        let path = scratch_dir(&format!("compress-{name}")).join("a.qcow2");
        let options = CreateOptions::new(4 << 20)
            .cluster_size(65536)
            .compression_type(kind);
        let image = Image::create(&path, &options).unwrap();
        let mut data: Vec<u8> = (0..2 << 20).map(|i: u32| (i / 300) as u8).collect();
        // One cluster of noise that does not compress and must be written normally.
        let mut x = 7u64;
        for b in &mut data[65536..131072] {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        image.write_compressed(&data, 0).unwrap();
        image.write_at(&pattern(1000, 3), 4096).unwrap();
        data[4096..5096].copy_from_slice(&pattern(1000, 3));
        image.close().unwrap();
        let (code, json) = qemu_check(&path);
        assert_eq!(code, 0, "{name}: {json}");
        assert!(
            json["compressed-clusters"].as_u64().unwrap() >= 20,
            "{name}: {json}"
        );
        data.resize(4 << 20, 0);
        assert_reads_as(&path, &data);
    }
}

#[test]
fn zero_writes_and_discards_on_v2_and_v3() {
    require_qemu();
    for version in [2, 3] {
        let path = scratch_dir(&format!("zero-v{version}")).join("a.qcow2");
        let options = CreateOptions::new(4 << 20)
            .cluster_size(4096)
            .version(version);
        let image = Image::create(&path, &options).unwrap();
        image.write_at(&pattern(1 << 20, 9), 0).unwrap();
        image.write_zeroes(1000, 20000, false).unwrap();
        image.write_zeroes(65536, 65536, true).unwrap();
        image.discard(200_000, 100_000).unwrap();
        image.close().unwrap();
        assert_qemu_clean(&path);
        let mut expected = pattern(1 << 20, 9);
        expected.resize(4 << 20, 0);
        expected[1000..21000].fill(0);
        expected[65536..131072].fill(0);
        let first = 200_000usize.next_multiple_of(4096);
        let end = 300_000 & !4095;
        expected[first..end].fill(0);
        assert_reads_as(&path, &expected);
        let map = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
        assert!(map.status.success());
    }
}

#[test]
fn leaks_are_counted_like_qemu_and_repaired() {
    require_qemu();
    let path = scratch_dir("leaks").join("a.qcow2");
    let options = CreateOptions::new(1 << 20).cluster_size(65536);
    Image::create(&path, &options).unwrap().close().unwrap();
    // Raise the refcount of cluster 3 (the L1 table) and of cluster 9 (past the end): leaks.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0x20000 + 6..0x20000 + 8].copy_from_slice(&2u16.to_be_bytes());
    bytes[0x20000 + 18..0x20000 + 20].copy_from_slice(&1u16.to_be_bytes());
    bytes.resize(10 * 65536, 0);
    std::fs::write(&path, &bytes).unwrap();
    let (code, json) = qemu_check(&path);
    assert_eq!(code, 3, "{json}");
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let report = image.check().unwrap();
    assert_eq!(report.leaks, json["leaks"].as_u64().unwrap());
    let repaired = image.check_and_repair(Repair::Leaks).unwrap();
    assert_eq!(repaired.leaks, 0);
    assert_eq!(repaired.leaks_fixed, report.leaks);
    image.close().unwrap();
    assert_qemu_clean(&path);
}

#[test]
fn a_dirty_lazy_refcount_image_is_repaired_on_read_write_open() {
    require_qemu();
    let dir = scratch_dir("dirty");
    let path = copy_fixture("lazy-dirty", &dir);
    let before = qemu_convert_raw(&path, None);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert!(!image.header().is_dirty());
    image.close().unwrap();
    assert_qemu_clean(&path);
    assert_reads_as(&path, &before);
}

#[test]
fn writes_fail_cleanly_on_read_only_images_and_past_the_end() {
    require_qemu();
    let dir = scratch_dir("refusals");
    let path = copy_fixture("c64k", &dir);
    let ro = Image::open(&path, &OpenOptions::default()).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    drop(ro);
    let rw = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let size = rw.size();
    assert!(matches!(
        rw.write_at(&[1, 2], size - 1),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        rw.write_compressed(&[0; 10], 1),
        Err(Error::InvalidArgument { .. })
    ));
    rw.close().unwrap();
    assert_qemu_clean(&path);
}

#[test]
fn preallocated_metadata_images_pass_qemu_check_and_read_as_zeros() {
    require_qemu();
    let path = scratch_dir("prealloc").join("a.qcow2");
    let options = CreateOptions::new(8 << 20)
        .cluster_size(65536)
        .preallocation(qcow2::Preallocation::Metadata);
    let image = Image::create(&path, &options).unwrap();
    image.write_at(&pattern(5000, 4), 70_000).unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path);
    let (_, json) = qemu_check(&path);
    assert_eq!(json["allocated-clusters"].as_u64(), Some(128), "{json}");
    let mut expected = vec![0u8; 8 << 20];
    expected[70_000..75_000].copy_from_slice(&pattern(5000, 4));
    assert_reads_as(&path, &expected);
}

#[test]
fn repair_all_rebuilds_refcounts_that_are_too_low() {
    require_qemu();
    let path = scratch_dir("repair-all").join("a.qcow2");
    let options = CreateOptions::new(1 << 20).cluster_size(65536);
    let image = Image::create(&path, &options).unwrap();
    image.write_at(&pattern(200_000, 5), 0).unwrap();
    image.close().unwrap();
    // Zero the refcount of the first data cluster (cluster 5): a corruption, not a leak.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0x20000 + 10..0x20000 + 12].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (code, _) = qemu_check(&path);
    assert_eq!(code, 2);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let report = image.check_and_repair(Repair::All).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.corruptions_fixed > 0);
    image.close().unwrap();
    assert_qemu_clean(&path);
    let mut expected = pattern(200_000, 5);
    expected.resize(1 << 20, 0);
    assert_reads_as(&path, &expected);
}

#[test]
fn out_of_space_mid_write_fails_cleanly_and_leaves_at_most_leaks() {
    use qcow2::storage::recording::{Fault, RecordingStorage};
    use std::sync::Arc;
    for fail_at in [0usize, 1, 2, 3, 5, 8] {
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let options = CreateOptions::new(4 << 20).cluster_size(4096);
        let image = Image::create_in(Box::new(store.clone()), "enospc.qcow2", &options).unwrap();
        image.write_at(&pattern(50_000, 1), 0).unwrap();
        image.flush().unwrap();
        let writes_so_far = store.write_count();
        store.inject(Some(Fault::WriteFrom(
            writes_so_far + fail_at,
            std::io::ErrorKind::StorageFull,
        )));
        let result = image
            .write_at(&pattern(300_000, 2), 100_000)
            .and_then(|_| image.flush());
        if result.is_ok() {
            // The write and flush needed fewer host writes than this.
            assert!(fail_at > 0, "the first write of the request must fail");
            continue;
        }
        assert!(
            matches!(result, Err(Error::Io { .. })),
            "fail_at {fail_at}: {result:?}"
        );
        drop(image);
        store.inject(None);
        let reopened = Image::from_storage(
            Box::new(qcow2::MemoryStorage::from_bytes(store.live_bytes())),
            "after",
            &OpenOptions::metadata_only(),
        )
        .unwrap();
        let report = reopened.check().unwrap();
        assert_eq!(
            report.corruptions, 0,
            "fail_at {fail_at}: {:?}",
            report.messages
        );
        let mut first = vec![0u8; 50_000];
        reopened.read_at(&mut first, 0).unwrap();
        assert!(
            first == pattern(50_000, 1),
            "fail_at {fail_at}: flushed data changed"
        );
    }
}

/// A write whose new clusters come as one run, failing at any of its data writes, gives back
/// the clusters of the run it did not link: after the failure the image holds no leak.
#[test]
fn a_failed_write_gives_back_the_rest_of_its_run() {
    use qcow2::storage::recording::{Fault, RecordingStorage};
    use std::sync::Arc;
    let mut failures = 0;
    for fail_at in 0..6usize {
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let options = CreateOptions::new(4 << 20).cluster_size(4096);
        let image = Image::create_in(Box::new(store.clone()), "run.qcow2", &options).unwrap();
        image.write_at(&pattern(8192, 1), 0).unwrap();
        image.flush().unwrap();
        let writes_so_far = store.write_count();
        store.inject(Some(Fault::WriteOnce(
            writes_so_far + fail_at,
            std::io::ErrorKind::Other,
        )));
        // From inside one cluster to inside the fourth after it: four new clusters, one run.
        let failed = image
            .write_at(&pattern(3 * 4096, 2), 100_000 + 2000)
            .is_err();
        store.inject(None);
        if !failed {
            continue;
        }
        failures += 1;
        image.flush().unwrap();
        let report = image.check().unwrap();
        assert!(
            report.is_clean(),
            "fail_at {fail_at}: {:?}",
            report.messages
        );
        let mut first = vec![0u8; 8192];
        image.read_at(&mut first, 0).unwrap();
        assert!(first == pattern(8192, 1), "fail_at {fail_at}: data changed");
    }
    assert!(
        failures >= 2,
        "only {failures} of the writes failed inside the run"
    );
}

/// Found by the CLI's resize tests: an L1 table spanning several refblock ranges of a
/// 512-byte-cluster image needs a contiguous run longer than one range; the new refblocks now go
/// after the run instead of into it, so allocation no longer chases its own tail.
#[test]
fn growing_a_512_byte_cluster_image_to_1_gib_allocates_one_contiguous_l1() {
    require_qemu();
    let path = scratch_dir("resize-big-l1").join("a.qcow2");
    let options = CreateOptions::new(4 << 20).cluster_size(512);
    let image = Image::create(&path, &options).unwrap();
    image.write_at(&pattern(3000, 1), 0).unwrap();
    image.resize(1 << 30, false).unwrap();
    image.write_at(&pattern(3000, 2), (1 << 30) - 3000).unwrap();
    let len = image.file_len();
    image.close().unwrap();
    assert!(len < 4 << 20, "file grew to {len} bytes");
    assert_qemu_clean(&path);
    let map = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
    assert!(map.status.success());
}

/// The overlap guard: an L2 entry that points into the active L1 table (corrupt metadata) makes
/// the write fail and the image marked corrupt, as QEMU does, instead of overwriting the table.
#[test]
fn a_write_that_would_hit_metadata_marks_the_image_corrupt_and_fails() {
    require_qemu();
    let path = scratch_dir("overlap-guard").join("a.qcow2");
    let options = CreateOptions::new(1 << 20).cluster_size(65536);
    let image = Image::create(&path, &options).unwrap();
    image.write_at(&[7; 100], 0).unwrap();
    image.close().unwrap();
    // The L2 table is cluster 4; its first entry points at cluster 5. Point it at the L1 (3).
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0x40000..0x40008].copy_from_slice(&0x8000_0000_0003_0000u64.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let err = image.write_at(&[1; 512], 0).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("L1"), "{err}");
    drop(image);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        after[0x30000..0x30010],
        bytes[0x30000..0x30010],
        "the L1 table is intact"
    );
    let ro = Image::open(&path, &OpenOptions::default()).unwrap();
    assert!(ro.header().is_corrupt());
    drop(ro);
    assert!(matches!(
        Image::open(&path, &OpenOptions::read_write()),
        Err(Error::MarkedCorrupt { .. })
    ));
}

/// Growing over a longer backing file reads zeros in the new area, as in QEMU (v3); a v2 image
/// cannot hide the backing data and is refused, as QEMU refuses it.
#[test]
fn growing_over_a_longer_backing_file_reads_zeros_like_qemu() {
    require_qemu();
    let dir = scratch_dir("grow-over-backing");
    std::fs::write(dir.join("base.raw"), pattern(4 << 20, 3)).unwrap();
    for version in [3, 2] {
        let ours = dir.join(format!("ours-v{version}.qcow2"));
        let theirs = dir.join(format!("theirs-v{version}.qcow2"));
        let options = CreateOptions::new((1 << 20) + 1024)
            .cluster_size(65536)
            .version(version)
            .backing_file(Some("base.raw".into()))
            .backing_format(Some("raw".into()));
        Image::create(&ours, &options).unwrap().close().unwrap();
        std::fs::copy(&ours, &theirs).unwrap();
        let image = Image::open(&ours, &OpenOptions::read_write()).unwrap();
        let result = image.resize(8 << 20, false);
        image.close().unwrap();
        let qemu = qemu_img(&["resize", "-f", "qcow2", theirs.to_str().unwrap(), "8M"]);
        assert_eq!(
            result.is_ok(),
            qemu.status.success(),
            "v{version}: {result:?}"
        );
        assert_qemu_clean(&ours);
        let cmp = qemu_img(&["compare", ours.to_str().unwrap(), theirs.to_str().unwrap()]);
        assert!(
            cmp.status.success(),
            "v{version}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
}

/// A partial write into a new cluster past the end of the file writes only the request (the rest
/// reads as zeros without being written), while a new cluster inside the file, which may hold old
/// bytes, has the file system zero it before the request lands.
#[test]
fn partial_writes_into_new_clusters_write_zeros_only_where_old_bytes_lie() {
    require_qemu();
    let path = scratch_dir("partial-new-cluster").join("a.qcow2");
    let cs = 65536usize;
    let size = 4 * 1024 * 1024;
    let image = Image::create(
        &path,
        &CreateOptions::new(size as u64).cluster_size(cs as u64),
    )
    .unwrap();
    let mut model = vec![0u8; size];
    // A whole cluster of old bytes, then freed: its host cluster keeps them.
    image.write_at(&pattern(cs, 7), 0).unwrap();
    image.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    // Past the end of the file: only 4 KiB at 8 KiB into the new cluster are written.
    let data = pattern(4096, 1);
    image.write_at(&data, cs as u64 + 8192).unwrap();
    model[cs + 8192..cs + 8192 + 4096].copy_from_slice(&data);
    image.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().len();
    // The cluster's first bytes are a hole of the file (never written): data reading zeros.
    let first = image.map(cs as u64, cs as u64).unwrap()[0];
    let host_offset = first
        .offset()
        .filter(|_| first.data())
        .unwrap_or_else(|| panic!("not allocated: {first:?}"));
    assert!(host_offset >= before, "allocated past the old end");
    // Only the request was written; the file then reaches over the whole new cluster (a sparse
    // extension), so readers that do not take a short file as zeros read zeros there too.
    assert_eq!(
        after,
        host_offset + cs as u64,
        "the file covers the new cluster"
    );
    // Inside the file: the freed cluster 0 is reused and must not show its old bytes.
    image.discard(0, cs as u64).unwrap();
    image.write_at(&data, 2 * cs as u64 + 4096).unwrap();
    model[2 * cs + 4096..2 * cs + 8192].copy_from_slice(&data);
    let reused = image.map(2 * cs as u64, cs as u64).unwrap()[0].kind;
    assert!(
        matches!(reused, qcow2::ExtentKind::Data { host_offset } if host_offset < before),
        "the freed cluster inside the file is reused: {reused:?}"
    );
    image.close().unwrap();
    assert_qemu_clean(&path);
    assert_reads_as(&path, &model);
}

/// Small writes into freed clusters inside the file, on standard and extended L2 images with and
/// without a backing file: the zeroed (or, with subclusters, partly written) new clusters read
/// as QEMU expects, `qemu-img check` finds nothing and `qemu-img compare` finds the images
/// equal to raw files holding the expected bytes.
#[test]
fn small_writes_into_reused_clusters_read_back_in_qemu() {
    require_qemu();
    let dir = scratch_dir("reused-clusters");
    let cs = 65536usize;
    let size = 2 << 20;
    let base = pattern(size, 3);
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    for (name, extended, backing) in [
        ("std", false, false),
        ("ext", true, false),
        ("std-backing", false, true),
        ("ext-backing", true, true),
    ] {
        let path = dir.join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&path);
        let mut options = CreateOptions::new(size as u64)
            .cluster_size(cs as u64)
            .extended_l2(extended);
        if backing {
            options = options
                .backing_file(Some("base.raw".into()))
                .backing_format(Some("raw".into()));
        }
        let image = Image::create(&path, &options).unwrap();
        let mut model = if backing {
            base.clone()
        } else {
            vec![0u8; size]
        };
        let old = pattern(size, 9);
        image.write_at(&old, 0).unwrap();
        model.copy_from_slice(&old);
        image.flush().unwrap();
        // Every other cluster of the first half freed, and the whole second half (a run that
        // one zeroing covers ahead), then small writes at odd places land in them.
        let n = size / cs;
        let freed: Vec<usize> = (0..n / 2).step_by(2).chain(n / 2..n).collect();
        for &k in &freed {
            image.discard((k * cs) as u64, cs as u64).unwrap();
            // Discarded clusters read as zeros on v3, backing file or not.
            model[k * cs..(k + 1) * cs].fill(0);
        }
        for (i, &k) in freed.iter().enumerate() {
            let at = k * cs + 1536 * (i % 37) + 512;
            let data = pattern(4096 + 1000 * (i % 3), i as u8);
            image.write_at(&data, at as u64).unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
        }
        image.close().unwrap();
        assert_qemu_clean(&path);
        qcow2_testdata::assert_qemu_compare_equal(&path, &model, name);
        assert_reads_as(&path, &model);
    }
}

#[test]
fn a_data_file_given_by_the_caller_replaces_the_one_the_header_names() {
    require_qemu();
    let dir = scratch_dir("data-file-given");
    let path = dir.join("a.qcow2");
    let named = dir.join("a.data");
    std::fs::write(&named, []).unwrap();
    let options = CreateOptions::new(1 << 20).data_file(Some(named.display().to_string()));
    Image::create(&path, &options).unwrap().close().unwrap();
    // The caller's store gets the guest data; the header's file is never opened.
    let given = std::sync::Arc::new(qcow2::MemoryStorage::new());
    let image =
        Image::open_with_data_file(&path, &OpenOptions::read_write(), Box::new(given.clone()))
            .unwrap();
    image.write_at(&pattern(8192, 5), 65536).unwrap();
    let mut back = vec![0u8; 8192];
    image.read_at(&mut back, 65536).unwrap();
    assert_eq!(back, pattern(8192, 5));
    image.close().unwrap();
    let mut stored = vec![0u8; 8192];
    qcow2::storage::StorageExt::read_exact_at(&*given, &mut stored, 65536).unwrap();
    assert_eq!(stored, pattern(8192, 5));
    assert!(std::fs::read(&named).unwrap().iter().all(|&b| b == 0));
    assert_qemu_clean(&path);

    // An image without an external data file has no place for one.
    let plain = dir.join("plain.qcow2");
    Image::create(&plain, &CreateOptions::new(1 << 20))
        .unwrap()
        .close()
        .unwrap();
    let err = Image::open_with_data_file(
        &plain,
        &OpenOptions::read_write(),
        Box::new(qcow2::MemoryStorage::new()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

/// A data write into a cluster the image owns that fails once is reported, as QEMU reports it:
/// retrying it would hide an error the storage gave (a blkdebug `once` rule, a transient
/// ENOSPC). The write leaves the old data readable and the next write succeeds.
#[test]
fn an_in_place_write_that_fails_once_is_reported_not_retried() {
    use qcow2::storage::recording::{Fault, RecordingStorage};
    use std::sync::Arc;
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::new(1 << 20).cluster_size(4096);
    let image = Image::create_in(Box::new(store.clone()), "once.qcow2", &options).unwrap();
    image.write_at(&[0x5a; 16384], 0).unwrap();
    image.flush().unwrap();
    let writes_so_far = store.write_count();
    store.inject(Some(Fault::WriteOnce(
        writes_so_far,
        std::io::ErrorKind::StorageFull,
    )));
    let err = image.write_at(&[0x11; 8192], 4096).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
        "{err:?}"
    );
    let mut buf = vec![0u8; 16384];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    image.write_at(&[0x11; 8192], 4096).unwrap();
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf[4096..12288].iter().all(|&b| b == 0x11));
    image.close().unwrap();
}
