//! Power cuts inside every standalone bitmap command (add, remove, enable, disable, merge,
//! clear) and inside resizes of an image with bitmaps. At each cut, with the unflushed writes
//! dropped, kept or torn:
//!
//! - the crashed image opens read-only and checks without corruption (leaks allowed, as in the
//!   other crash tests);
//! - after our read-write open (which recovers what the durable bit vouches for) the bitmap set
//!   (disk size, names, granularities, enabled flags) is the one before the step or the one after
//!   it, every bitmap consistent; each bitmap's bits are those before or after the step, or, for
//!   the bit-changing steps (merge, clear), lie between the two;
//! - on a sample of cuts, once closed, `qemu-img check` finds no corruption and `qemu-img info`
//!   lists the same bitmaps, none in use.
//!
//! Every write is cut; QEMU checks a sample of the cuts by default and every cut with
//! `QCOW2_CRASH_FULL=1`.

use std::collections::BTreeSet;
use std::sync::Arc;

use qcow2::storage::recording::{RecordingStorage, Survivors};
use qcow2::{CreateOptions, Image, MemoryStorage, OpenOptions};
use qcow2_testdata::{qemu_check, qemu_info, scratch_dir};

/// One bitmap as a user sees it: name, granularity, enabled, dirty granules (byte offsets).
type Bitmap = (String, u64, bool, BTreeSet<u64>);

/// The disk size and every bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    size: u64,
    bitmaps: Vec<Bitmap>,
}

fn state(image: &Image) -> State {
    let size = image.size();
    let bitmaps = image
        .bitmaps()
        .into_iter()
        .map(|b| {
            assert!(b.consistent(), "bitmap {} is in use", b.name);
            let mut granules = BTreeSet::new();
            for (o, l) in image.dirty_extents(&b.name, 0, size).unwrap() {
                let g = b.granularity;
                granules.extend((o / g..(o + l).div_ceil(g)).map(|n| n * g));
            }
            (b.name, b.granularity, b.enabled, granules)
        })
        .collect();
    State { size, bitmaps }
}

/// One recorded step: its name, the ops recorded before and after it, and the states around it.
struct Step {
    name: &'static str,
    /// Bits may lie between the states (a merge or clear cut short), not only at either end.
    bits_between: bool,
    ops: (usize, usize),
    before: State,
    after: State,
}

fn session(cluster_size: u64) -> (Arc<RecordingStorage>, Vec<Step>) {
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::new(8 << 20).cluster_size(cluster_size);
    let image = Image::create_in(Box::new(store.clone()), "crash.qcow2", &options).unwrap();
    image.add_bitmap("b0", 65536, false).unwrap();
    image.add_bitmap("b1", 512, false).unwrap();
    image.write_at(&[1; 8192], 1 << 20).unwrap();
    image.write_at(&[2; 70_000], 5 << 20).unwrap();
    image.set_bitmap_enabled("b1", false).unwrap();
    image.write_at(&[3; 512], 7 << 20).unwrap();
    image.close().unwrap();
    let image = Image::from_storage(
        Box::new(store.clone()),
        "crash.qcow2",
        &OpenOptions::read_write(),
    )
    .unwrap();
    type Action = Box<dyn Fn(&Image)>;
    let actions: Vec<(&'static str, bool, Action)> = vec![
        (
            "add",
            false,
            Box::new(|i| i.add_bitmap("b2", 4096, false).unwrap()),
        ),
        (
            "enable",
            false,
            Box::new(|i| i.set_bitmap_enabled("b1", true).unwrap()),
        ),
        (
            "merge",
            true,
            Box::new(|i| i.merge_bitmap("b2", "b0", None).unwrap()),
        ),
        (
            "disable",
            false,
            Box::new(|i| i.set_bitmap_enabled("b0", false).unwrap()),
        ),
        ("clear", true, Box::new(|i| i.clear_bitmap("b1").unwrap())),
        (
            "grow",
            false,
            Box::new(|i| i.resize(12 << 20, false).unwrap()),
        ),
        (
            "remove",
            false,
            Box::new(|i| i.remove_bitmap("b0").unwrap()),
        ),
        // A granule of b2 straddles the new end; bits past it go.
        (
            "shrink",
            false,
            Box::new(|i| i.resize((5 << 20) + 2048, true).unwrap()),
        ),
    ];
    let mut steps = Vec::new();
    for (name, bits_between, action) in actions {
        let before = state(&image);
        let start = store.op_count();
        action(&image);
        steps.push(Step {
            name,
            bits_between,
            ops: (start, store.op_count()),
            before,
            after: state(&image),
        });
    }
    let last = steps.last().map(|s| s.after.clone()).unwrap();
    let start = store.op_count();
    image.close().unwrap();
    steps.push(Step {
        name: "close",
        bits_between: false,
        ops: (start, store.op_count()),
        before: last.clone(),
        after: last,
    });
    (store, steps)
}

/// Whether `got` is `before` or `after`, or (for `bits_between`) has their names and flags with
/// every bitmap's bits between the two.
fn acceptable(step: &Step, got: &State) -> bool {
    if *got == step.before || *got == step.after {
        return true;
    }
    if !step.bits_between || got.size != step.before.size {
        return false;
    }
    let shape = |s: &State| -> Vec<(String, u64, bool)> {
        s.bitmaps.iter().map(|b| (b.0.clone(), b.1, b.2)).collect()
    };
    if shape(got) != shape(&step.before) && shape(got) != shape(&step.after) {
        return false;
    }
    got.bitmaps
        .iter()
        .zip(step.before.bitmaps.iter().zip(&step.after.bitmaps))
        .all(|(g, (b, a))| {
            let low: BTreeSet<u64> = b.3.intersection(&a.3).copied().collect();
            let high: BTreeSet<u64> = b.3.union(&a.3).copied().collect();
            low.is_subset(&g.3) && g.3.is_subset(&high)
        })
}

#[test]
fn every_cut_in_a_bitmap_command_leaves_the_bitmaps_of_one_side_whole() {
    cut_everywhere(65536);
}

/// Small clusters: bitmaps of several data clusters, tables of several entries.
#[test]
fn every_cut_with_512_byte_clusters_leaves_the_bitmaps_of_one_side_whole() {
    cut_everywhere(512);
}

fn cut_everywhere(cluster_size: u64) {
    let (store, steps) = session(cluster_size);
    let full = std::env::var_os("QCOW2_CRASH_FULL").is_some();
    // Every cut is cheap; QEMU checks a sample of them unless asked for all.
    let stride = if full { 1 } else { 5 };
    let dir = scratch_dir(&format!("bitmap_crash_commands_{cluster_size}"));
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
                drop(image);

                let memory = Arc::new(MemoryStorage::from_bytes(bytes));
                let image = Image::from_storage(
                    Box::new(memory.clone()),
                    "crashed",
                    &OpenOptions::read_write(),
                )
                .unwrap_or_else(|e| panic!("{what}: read-write open: {e}"));
                let got = state(&image);
                assert!(
                    acceptable(step, &got),
                    "{what}: got {got:?}\nbefore {:?}\nafter {:?}",
                    step.before,
                    step.after
                );
                image
                    .close()
                    .unwrap_or_else(|e| panic!("{what}: close: {e}"));
                cuts += 1;
                if matches!(survivors, Survivors::TornSectors(_)) && (k - first) % stride == 0 {
                    std::fs::write(&sample, memory.to_bytes()).unwrap();
                    let (code, json) = qemu_check(&sample);
                    assert!(
                        code == 0 || code == 3,
                        "{what}: qemu-img check {code}: {json}"
                    );
                    let listed = qemu_info(&sample)["format-specific"]["data"]["bitmaps"].clone();
                    let names: Vec<&str> = listed
                        .as_array()
                        .map(|a| a.iter().map(|b| b["name"].as_str().unwrap()).collect())
                        .unwrap_or_default();
                    let ours: Vec<&str> = got.bitmaps.iter().map(|b| b.0.as_str()).collect();
                    assert_eq!(names, ours, "{what}");
                    assert!(!listed.to_string().contains("in-use"), "{what}: {listed}");
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
