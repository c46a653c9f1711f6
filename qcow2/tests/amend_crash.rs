//! Power cuts at every write of `amend`: a refcount width change, lazy refcounts on and off, a
//! downgrade to compat=0.10 (zero clusters expanded, in the active layer and in a snapshot's
//! tables) and the upgrade back. Every cut image must open, show no corruption, read exactly
//! the guest bytes it held before in the active layer and in the snapshot (amend never changes
//! them) and be either the old or the new version; QEMU's check agrees on a sample of cuts.

use std::sync::Arc;

use qcow2::storage::recording::{RecordingStorage, Survivors};
use qcow2::{AmendOptions, CreateOptions, Image, MemoryStorage, OpenOptions, SnapshotTime};
use qcow2_testdata::{qemu_check, scratch_dir};

const SIZE: u64 = 1 << 20;

struct Step {
    name: &'static str,
    /// Recorded ops before and after the step.
    ops: (usize, usize),
    /// Header versions acceptable after a cut (before or after the step).
    versions: (u32, u32),
}

/// The guest bytes expected of the active layer and of the snapshot.
struct Models {
    active: Vec<u8>,
    snapshot: Vec<u8>,
}

fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// The guest bytes of the snapshot the session takes.
fn read_snapshot(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    image
        .open_snapshot("zeros")
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    buf
}

fn version_of(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[4..8].try_into().unwrap())
}

/// An image with data, a plain zero cluster and a preallocated zero cluster, and a snapshot
/// of them the active layer has moved on from, then the steps and the models.
fn session() -> (Arc<RecordingStorage>, Models, Vec<Step>) {
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::default().size(SIZE).cluster_size(4096);
    let image = Image::create_in(Box::new(store.clone()), "amend.qcow2", &options).unwrap();
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8 + 1).collect();
    image.write_at(&data, 0).unwrap();
    image.write_at(&data[..8192], 512 * 1024).unwrap();
    // A preallocated zero cluster (the host cluster stays) and plain zero clusters.
    image.write_zeroes(512 * 1024, 4096, false).unwrap();
    image.write_zeroes(768 * 1024, 16 * 1024, false).unwrap();
    image
        .create_snapshot("zeros", SnapshotTime::default())
        .unwrap();
    let snapshot_model = read_all(&image);
    image.write_at(&data[..4096], 768 * 1024).unwrap();
    image.write_zeroes(0, 4096, false).unwrap();
    image.flush().unwrap();
    let model = read_all(&image);
    let plan: [(&str, AmendOptions, (u32, u32)); 5] = [
        (
            "refcount_bits=8",
            AmendOptions::default().refcount_bits(Some(8)),
            (3, 3),
        ),
        (
            "lazy_refcounts=on",
            AmendOptions::default().lazy_refcounts(Some(true)),
            (3, 3),
        ),
        (
            "compat=0.10,refcount_bits=16",
            AmendOptions::default()
                .version(Some(2))
                .refcount_bits(Some(16)),
            (3, 2),
        ),
        (
            "compat=1.1",
            AmendOptions::default().version(Some(3)),
            (2, 3),
        ),
        (
            "refcount_bits=64",
            AmendOptions::default().refcount_bits(Some(64)),
            (3, 3),
        ),
    ];
    let mut steps = Vec::new();
    for (name, options, versions) in plan {
        let first = store.op_count();
        image.amend(&options, &mut |_, _| {}).unwrap();
        image.flush().unwrap();
        assert_eq!(read_all(&image), model, "{name}: guest bytes changed");
        assert_eq!(
            read_snapshot(&image),
            snapshot_model,
            "{name}: snapshot bytes changed"
        );
        steps.push(Step {
            name,
            ops: (first, store.op_count()),
            versions,
        });
    }
    image.close().unwrap();
    let models = Models {
        active: model,
        snapshot: snapshot_model,
    };
    (store, models, steps)
}

#[test]
fn every_cut_in_amend_leaves_a_consistent_image_with_the_same_bytes() {
    let (store, models, steps) = session();
    let (model, snapshot_model) = (models.active, models.snapshot);
    let full = std::env::var_os("QCOW2_CRASH_FULL").is_some();
    let stride = if full { 1 } else { 7 };
    let dir = scratch_dir("amend_crash");
    let sample = dir.join("cut.qcow2");
    let (mut cuts, mut qemu_checked) = (0, 0);
    for step in &steps {
        let (first, last) = step.ops;
        assert!(last > first, "{}: wrote nothing", step.name);
        for k in first..=last {
            for survivors in [
                Survivors::None,
                Survivors::All,
                Survivors::TornSectors(k as u64),
            ] {
                let what = format!(
                    "{}: cut after op {k} ({first}..{last}), {survivors:?}",
                    step.name
                );
                let bytes = store.crash_image(k, survivors);
                let version = version_of(&bytes);
                assert!(
                    version == step.versions.0 || version == step.versions.1,
                    "{what}: version {version}"
                );
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
                assert!(read_all(&image) == model, "{what}: guest bytes differ");
                assert!(
                    read_snapshot(&image) == snapshot_model,
                    "{what}: snapshot bytes differ"
                );
                drop(image);
                let image = Image::from_storage(
                    Box::new(MemoryStorage::from_bytes(bytes.clone())),
                    "crashed",
                    &OpenOptions::read_write(),
                )
                .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
                assert!(read_all(&image) == model, "{what}: guest bytes differ (rw)");
                image
                    .close()
                    .unwrap_or_else(|e| panic!("{what}: close: {e}"));
                cuts += 1;
                if matches!(survivors, Survivors::TornSectors(_)) && (k - first) % stride == 0 {
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
    }
    assert!(
        cuts > 100 && qemu_checked > 5,
        "{cuts} cuts, {qemu_checked} checked by QEMU"
    );
}
