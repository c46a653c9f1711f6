//! Internal snapshots against QEMU: ours are listed and read by qemu-img exactly as the model
//! says, QEMU's are listed, applied and deleted by us, `qemu-img check` stays at exit 0 after
//! every step, 64-bit times survive QEMU rewriting the table, and refused operations leave the
//! image byte for byte as it was.

use std::path::Path;

use qcow2::format::SnapshotTime;
use qcow2::{CreateOptions, Error, Image, OpenOptions};
use qcow2_testdata::{
    copy_fixture, qemu_check, qemu_convert_raw, qemu_img_ok, qemu_json, require_qemu, scratch_dir,
};

fn assert_qemu_clean(path: &Path, what: &str) {
    let (code, json) = qemu_check(path);
    assert_eq!(code, 0, "{what}: qemu-img check: {json}");
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 1000) as u8))
        .collect()
}

fn time(secs: i64) -> SnapshotTime {
    SnapshotTime {
        secs,
        nanos: 123_000,
    }
}

/// Writes, snapshots, more writes, apply, delete — checked against QEMU after every step.
fn lifecycle(name: &str, options: CreateOptions) {
    require_qemu();
    let path = scratch_dir(&format!("snap-{name}")).join("a.qcow2");
    let size = options.size as usize;
    let cs = options.cluster_size as usize;
    let image = Image::create(&path, &options).unwrap();
    let mut model = vec![0u8; size];
    let write = |image: &Image, model: &mut Vec<u8>, offset: usize, len: usize, seed: u8| {
        let data = fill(len, seed);
        image.write_at(&data, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    };
    write(&image, &mut model, 0, 3 * cs + 100, 1);
    write(&image, &mut model, size / 2, cs, 2);
    image.write_zeroes(cs as u64 * 5, cs as u64, false).unwrap();
    let a = model.clone();
    image.create_snapshot("first", time(1_700_000_000)).unwrap();
    write(&image, &mut model, 100, 2 * cs, 3);
    write(&image, &mut model, size - 500, 500, 4);
    let b = model.clone();
    image
        .create_snapshot("second", time(1_700_000_100))
        .unwrap();
    write(&image, &mut model, cs / 2, cs, 5);
    image.flush().unwrap();
    {
        let view = image.open_snapshot("first").unwrap();
        let mut back = vec![0u8; size];
        view.read_at(&mut back, 0).unwrap();
        assert!(back == a, "{name}: our view of the first snapshot");
    }
    drop(image);
    assert_qemu_clean(&path, name);
    assert!(
        qemu_convert_raw(&path, Some("first")) == a,
        "{name}: qemu reads first"
    );
    assert!(
        qemu_convert_raw(&path, Some("second")) == b,
        "{name}: qemu reads second"
    );
    assert!(
        qemu_convert_raw(&path, None) == model,
        "{name}: qemu reads the active state"
    );
    let listed = qemu_img_ok(&["snapshot", "-l", path.to_str().unwrap()]);
    assert!(
        listed.contains("first") && listed.contains("second"),
        "{listed}"
    );

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.apply_snapshot("first").unwrap();
    let mut back = vec![0u8; size];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == a, "{name}: apply restores the first snapshot");
    write(&image, &mut back, 10, 3 * cs, 6);
    image.delete_snapshot("second").unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path, name);
    assert!(
        qemu_convert_raw(&path, Some("first")) == a,
        "{name}: writes after apply left first alone"
    );
    assert!(
        qemu_convert_raw(&path, None) == back,
        "{name}: active after apply and writes"
    );

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.delete_snapshot("first").unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path, name);
    assert!(qemu_convert_raw(&path, None) == back);
}

fn opts(size: u64, cluster: u64) -> CreateOptions {
    CreateOptions::new(size).cluster_size(cluster)
}

#[test]
fn snapshot_lifecycle_4k_and_64k_clusters() {
    lifecycle("4k", opts(4 << 20, 4096));
    lifecycle("64k", opts(16 << 20, 65536));
}

#[test]
fn snapshot_lifecycle_extended_l2_and_compat_0_10() {
    lifecycle("extl2", opts(8 << 20, 65536).extended_l2(true));
    lifecycle("v2", opts(4 << 20, 4096).version(2));
}

#[test]
fn snapshot_lifecycle_refcount_widths_and_lazy_refcounts() {
    for bits in [2, 16, 64] {
        lifecycle(
            &format!("rc{bits}"),
            opts(4 << 20, 4096).refcount_bits(bits),
        );
    }
    lifecycle("lazy", opts(4 << 20, 4096).lazy_refcounts(true));
}

#[test]
fn qemu_made_snapshots_are_listed_applied_and_deleted() {
    require_qemu();
    let dir = scratch_dir("qemu-snapshots");
    let path = copy_fixture("snap", &dir);
    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let ours: Vec<String> = image.snapshots().iter().map(|s| s.name.clone()).collect();
    drop(image);
    let json = qemu_json(&["info", path.to_str().unwrap()]);
    let theirs: Vec<String> = json["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ours, theirs);
    let contents: Vec<Vec<u8>> = theirs
        .iter()
        .map(|n| qemu_convert_raw(&path, Some(n)))
        .collect();

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.apply_snapshot(&theirs[1]).unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path, "apply");
    assert!(qemu_convert_raw(&path, None) == contents[1]);

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.delete_snapshot(&theirs[0]).unwrap();
    image.write_at(&[0x77; 70000], 4096).unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path, "delete");
    for (name, content) in theirs.iter().zip(&contents).skip(1) {
        assert!(
            qemu_convert_raw(&path, Some(name)) == *content,
            "snapshot {name}"
        );
    }
}

#[test]
fn times_beyond_32_bits_round_trip_and_survive_qemu_rewriting_the_table() {
    require_qemu();
    let path = scratch_dir("snapshot-times").join("a.qcow2");
    let image = Image::create(&path, &opts(1 << 20, 65536)).unwrap();
    image.write_at(&[1; 4096], 0).unwrap();
    let times = [
        0i64,
        -3_155_760_000,
        2_147_483_648,
        4_294_967_297,
        32_503_680_000,
    ];
    for (i, &secs) in times.iter().enumerate() {
        image.create_snapshot(&format!("t{i}"), time(secs)).unwrap();
    }
    image.close().unwrap();
    let p = path.to_str().unwrap();
    let json = qemu_json(&["info", p]);
    for (i, &secs) in times.iter().enumerate() {
        assert_eq!(
            json["snapshots"][i]["date-sec"].as_u64(),
            Some(secs as u32 as u64)
        );
    }
    // QEMU rewrites the table twice; our tagged field must survive both.
    qemu_img_ok(&["snapshot", "-c", "qemu-made", p]);
    qemu_img_ok(&["snapshot", "-d", "qemu-made", p]);
    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let back: Vec<i64> = image.snapshots().iter().map(|s| s.time.secs).collect();
    assert_eq!(back, times);
    assert_qemu_clean(&path, "times");
}

#[test]
fn a_refused_snapshot_leaves_the_image_byte_for_byte_unchanged() {
    require_qemu();
    let path = scratch_dir("snapshot-refused").join("a.qcow2");
    let image = Image::create(&path, &opts(1 << 20, 4096).refcount_bits(1)).unwrap();
    image.write_at(&[9; 10000], 0).unwrap();
    image.flush().unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = image
        .create_snapshot("too-many-references", time(1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(std::fs::read(&path).unwrap() == before);
    image.close().unwrap();
    assert_qemu_clean(&path, "refused");
}

/// Snapshot operations count references in runs of clusters: compressed clusters that share
/// host clusters must add up, and runs must cross refcount blocks (512-byte clusters: a block
/// covers 2048 to 64 clusters here) at every refcount width.
#[test]
fn snapshots_over_shared_compressed_clusters_and_many_refcount_blocks_match_qemu() {
    require_qemu();
    for bits in [2u32, 8, 16, 64] {
        let name = format!("runs-rc{bits}");
        let path = scratch_dir(&format!("snap-{name}")).join("a.qcow2");
        let size = 1usize << 20;
        let cs = 512;
        let image =
            Image::create(&path, &opts(size as u64, cs as u64).refcount_bits(bits)).unwrap();
        let mut model = vec![0u8; size];
        // Plain clusters in one long run, then compressed ones (a few dozen bytes each, so many
        // share one host cluster), then plain ones again.
        let plain = fill(400 * cs, 1);
        image.write_at(&plain, 0).unwrap();
        model[..plain.len()].copy_from_slice(&plain);
        for c in 400..900 {
            let data = vec![c as u8; cs];
            image.write_compressed(&data, (c * cs) as u64).unwrap();
            model[c * cs..(c + 1) * cs].copy_from_slice(&data);
        }
        let tail = fill(600 * cs, 2);
        image.write_at(&tail, (1000 * cs) as u64).unwrap();
        model[1000 * cs..1600 * cs].copy_from_slice(&tail);
        image.flush().unwrap();
        if bits == 2 {
            // Host clusters holding three compressed clusters already count 3, the most two
            // bits hold: a snapshot would need 6, and is refused before any write.
            let before = std::fs::read(&path).unwrap();
            let err = image.create_snapshot("first", time(1)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { .. }),
                "{name}: {err}"
            );
            assert!(std::fs::read(&path).unwrap() == before, "{name}: refused");
            drop(image);
            assert_qemu_clean(&path, &name);
            assert!(qemu_convert_raw(&path, None) == model, "{name}");
            continue;
        }
        let first = model.clone();
        image.create_snapshot("first", time(1)).unwrap();
        let data = fill(300 * cs, 3);
        image.write_at(&data, (350 * cs) as u64).unwrap();
        model[350 * cs..650 * cs].copy_from_slice(&data);
        let second = model.clone();
        image.create_snapshot("second", time(2)).unwrap();
        drop(image);
        assert_qemu_clean(&path, &name);
        assert!(qemu_convert_raw(&path, Some("first")) == first, "{name}");
        assert!(qemu_convert_raw(&path, Some("second")) == second, "{name}");
        assert!(qemu_convert_raw(&path, None) == model, "{name}");

        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        image.delete_snapshot("first").unwrap();
        image.apply_snapshot("second").unwrap();
        image.close().unwrap();
        assert_qemu_clean(&path, &name);
        assert!(qemu_convert_raw(&path, None) == second, "{name}: reverted");
        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        image.delete_snapshot("second").unwrap();
        image.close().unwrap();
        let (code, json) = qemu_check(&path);
        assert_eq!(code, 0, "{name}: {json}");
        assert_eq!(json["leaks"].as_u64().unwrap_or(0), 0, "{name}: {json}");
        assert!(
            qemu_convert_raw(&path, None) == second,
            "{name}: after deletes"
        );
    }
}

#[test]
fn a_thousand_snapshots_with_a_third_deleted_list_like_qemu() {
    require_qemu();
    let path = scratch_dir("many-snapshots").join("a.qcow2");
    let image = Image::create(&path, &opts(1 << 20, 65536)).unwrap();
    for i in 0..1000u64 {
        if i % 10 == 0 {
            image.write_at(&[i as u8; 512], (i % 16) * 65536).unwrap();
        }
        image
            .create_snapshot(&format!("s{i}"), time(1_700_000_000 + i as i64))
            .unwrap();
        if i % 3 == 2 {
            image.delete_snapshot(&format!("s{}", i - 1)).unwrap();
        }
    }
    let ours: Vec<(String, String)> = image
        .snapshots()
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    image.close().unwrap();
    assert_eq!(ours.len(), 667);
    let json = qemu_json(&["info", path.to_str().unwrap()]);
    let theirs: Vec<(String, String)> = json["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(ours, theirs);
    assert_qemu_clean(&path, "many");
}

#[test]
fn a_staged_batch_publishes_with_one_switch_or_is_abandoned_without_a_trace() {
    use qcow2::transaction_support::{self as ts, SnapshotChange};
    require_qemu();
    let path = scratch_dir("staged").join("a.qcow2");
    let image = Image::create(&path, &opts(2 << 20, 65536)).unwrap();
    image.write_at(&fill(300_000, 1), 0).unwrap();
    image.create_snapshot("old", time(100)).unwrap();
    image.write_at(&fill(100_000, 2), 500_000).unwrap();
    let mut active = vec![0u8; 2 << 20];
    image.read_at(&mut active, 0).unwrap();
    image.flush().unwrap();
    let before = std::fs::read(&path).unwrap();

    let batch = [
        SnapshotChange::Create {
            name: "a".into(),
            time: time(200),
        },
        SnapshotChange::Create {
            name: "b".into(),
            time: time(201),
        },
        SnapshotChange::Delete {
            id_or_name: "old".into(),
        },
    ];
    let staged = ts::stage(&image, &batch).unwrap();
    assert_ne!(staged.switch(), ts::current_state(&image));
    ts::abandon(&image, staged).unwrap();
    image.flush().unwrap();
    assert!(
        std::fs::read(&path).unwrap()[..72] == before[..72],
        "header unchanged"
    );
    assert!(image.check().unwrap().is_clean());

    let staged = ts::stage(&image, &batch).unwrap();
    ts::publish(&image, staged).unwrap();
    let names: Vec<String> = image.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b"]);
    image.close().unwrap();
    assert_qemu_clean(&path, "batch");
    assert!(qemu_convert_raw(&path, Some("a")) == active);
    assert!(qemu_convert_raw(&path, Some("b")) == active);

    // Snapshot the current state and revert to "a" in one switch.
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.write_at(&fill(4096, 9), 0).unwrap();
    let mut current = vec![0u8; 2 << 20];
    image.read_at(&mut current, 0).unwrap();
    let staged = ts::stage(
        &image,
        &[
            SnapshotChange::Create {
                name: "pre-revert".into(),
                time: time(300),
            },
            SnapshotChange::Revert {
                id_or_name: "a".into(),
            },
        ],
    )
    .unwrap();
    ts::publish(&image, staged).unwrap();
    image.close().unwrap();
    assert_qemu_clean(&path, "create+revert");
    assert!(qemu_convert_raw(&path, None) == active);
    assert!(qemu_convert_raw(&path, Some("pre-revert")) == current);
}

/// Found by fuzzing: an empty disk's L1 table took a cluster that nothing counted, so a snapshot
/// of it leaked one cluster.
#[test]
fn snapshots_of_an_empty_disk_leave_no_leak() {
    require_qemu();
    let path = scratch_dir("snapshot-empty").join("a.qcow2");
    let image = Image::create(&path, &opts(0, 512)).unwrap();
    image.create_snapshot("a", time(1)).unwrap();
    image.resize(4096, false).unwrap();
    image.write_at(&[1; 4096], 0).unwrap();
    image.create_snapshot("b", time(2)).unwrap();
    image.apply_snapshot("a").unwrap();
    assert!(image.check().unwrap().is_clean());
    image.close().unwrap();
    assert_qemu_clean(&path, "empty");
}

/// A failed write (out of space, once) at any point of a snapshot create: the call fails and the
/// image keeps its snapshots, its content and clean refcounts.
#[test]
fn out_of_space_during_snapshot_create_leaves_no_trace() {
    use qcow2::storage::recording::{Fault, RecordingStorage};
    use std::sync::Arc;
    for fail_at in 0..40usize {
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let image =
            Image::create_in(Box::new(store.clone()), "enospc", &opts(1 << 20, 4096)).unwrap();
        image.write_at(&fill(200_000, 3), 0).unwrap();
        image.create_snapshot("kept", time(1)).unwrap();
        image.write_at(&fill(50_000, 4), 100_000).unwrap();
        image.flush().unwrap();
        let writes = store.write_count();
        store.inject(Some(Fault::WriteOnce(
            writes + fail_at,
            std::io::ErrorKind::StorageFull,
        )));
        let result = image.create_snapshot("new", time(2));
        store.inject(None);
        if result.is_ok() {
            // The fault came after the last write of the operation.
            continue;
        }
        assert_eq!(image.snapshots().len(), 1, "fail_at {fail_at}");
        drop(image);
        let reopened = Image::from_storage(
            Box::new(qcow2::MemoryStorage::from_bytes(store.live_bytes())),
            "after",
            &OpenOptions::metadata_only(),
        )
        .unwrap();
        let report = reopened.check().unwrap();
        assert!(
            report.is_clean(),
            "fail_at {fail_at}: {:?}",
            report.messages
        );
        let names: Vec<String> = reopened.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["kept"], "fail_at {fail_at}");
    }
}
