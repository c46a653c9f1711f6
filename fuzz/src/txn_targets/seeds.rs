//! Seed inputs for both targets, written by `transaction/tests/fuzz_replay.rs`.

use super::*;

/// Seeds for `journal`: real journals of a few groups and plans, taken at several cut points of
/// the recorded run (with checksums kept as written). `transaction/tests/fuzz_replay.rs` writes
/// them to `fuzz/regressions/journal/` (see the README).
pub fn journal_seeds() -> Vec<(String, Vec<u8>)> {
    let groups: [(&str, Vec<ImageConfig>, Vec<u8>); 3] = [
        (
            "create",
            vec![ImageConfig {
                shape: 0b0101_0100,
                writes: vec![[0, 0, 16, 7, 0x11]],
            }],
            // InternalCreate d0 "new"
            vec![(2 << 5)],
        ),
        (
            "revert-delete",
            vec![
                ImageConfig {
                    shape: 0b1010_0000,
                    writes: vec![[0, 0, 0, 3, 0x22], [1, 1, 0, 3, 0x33]],
                },
                ImageConfig {
                    shape: 0b0101_1000,
                    writes: vec![[0, 2, 0, 1, 0x44]],
                },
            ],
            // InternalRevert d0 "s0", InternalDelete d1 "s1"
            vec![2, 1 | (1 << 2) | (1 << 5)],
        ),
        (
            "create-two",
            vec![
                ImageConfig {
                    shape: 0b0001_0001,
                    writes: vec![],
                },
                ImageConfig {
                    shape: 0b0001_0100,
                    writes: vec![],
                },
            ],
            // InternalCreate d0 "x", InternalCreate d1 "new2"
            vec![7 << 5, (1 << 2) | (3 << 5)],
        ),
    ];
    let mut seeds = Vec::new();
    for (label, images, actions) in groups {
        let base = build(&images);
        let run = base.settled();
        let mut group = open_group(&run).expect("opening a fresh group");
        group
            .run(&plan(&images, &actions))
            .expect("a seed plan commits");
        drop(group);
        let log = run.log();
        let points = ["begin", "prepared", "decided", "published 0", "closed"];
        for point in points {
            let Some(at) = event_index(&log, point) else {
                continue;
            };
            let cut = at + 1;
            let crashed = run.crash(cut, Survivors::All);
            let journal = crashed
                .file(&Path::new(GROUP).join("txn.journal"))
                .unwrap_or_default();
            // A fixed transaction id, so the seed files are the same on every run.
            let journal: Vec<u8> = journal::read_all(&journal)
                .expect("a real journal reads")
                .into_iter()
                .flat_map(|r| {
                    journal::encode(&Record {
                        txn: sim_group().bind([0x5E; 8]),
                        ..r
                    })
                })
                .collect();
            let input = JournalInput {
                images: images.clone(),
                actions: actions.clone(),
                cut: cut as u16,
                flags: 1,
                journal,
            };
            seeds.push((
                format!("{label}-at-{}", point.replace(' ', "-")),
                input.to_bytes(),
            ));
        }
    }
    seeds
}

/// Seeds for `transaction`: groups with snapshots, valid plans of every action kind, and each kind
/// of trouble (a cut before and after the decision, torn, an injected error once or for good).
/// `transaction/tests/fuzz_replay.rs` writes them to `fuzz/regressions/transaction/`.
pub fn transaction_seeds() -> Vec<(String, Vec<u8>)> {
    // Two snapshots and two writes, 64 KiB clusters, 2 MiB; one snapshot, 512-byte clusters, 1 MiB.
    let a = ImageConfig {
        shape: 0b1000_0001,
        writes: vec![[0, 0, 0, 15, 0x5A], [1, 0x40, 0, 31, 0xA5]],
    };
    let b = ImageConfig {
        shape: 0b0100_1000,
        writes: vec![[0, 0x10, 0, 7, 0x77]],
    };
    let c = ImageConfig {
        shape: 0b0000_0101,
        writes: vec![],
    };
    // kind | image << 2 | name << 5 (names: s0 s1 new new2 1 "" s0 x; overlays o0 o1 d0 nodir)
    let create = |i: u8, name: u8| (i << 2) | (name << 5);
    let delete = |i: u8, name: u8| 1 | (i << 2) | (name << 5);
    let revert = |i: u8, name: u8| 2 | (i << 2) | (name << 5);
    let external = |i: u8, overlay: u8| 3 | (i << 2) | (overlay << 5);
    let add_b1 = |i: u8| 3 | (i << 2) | (6 << 5);
    let clear_b0 = |i: u8| 3 | (i << 2) | (7 << 5);
    // 512-byte clusters (the spare cluster value 3 gives a bitmap `b0`), one snapshot.
    let d = ImageConfig {
        shape: 0b0101_1100,
        writes: vec![[0, 0x20, 0, 3, 0x33]],
    };
    let trouble = |flags: u8, fault_at: u16, cut: u32, survivors: u8, seed: u32| {
        let mut t = vec![flags];
        t.extend_from_slice(&fault_at.to_be_bytes());
        t.extend_from_slice(&cut.to_be_bytes());
        t.push(survivors);
        t.extend_from_slice(&seed.to_be_bytes());
        t
    };
    // (name, images, actions, trouble)
    type Case = (&'static str, Vec<ImageConfig>, Vec<u8>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "mixed-cut-early",
            vec![a.clone(), b.clone()],
            vec![create(0, 2), delete(1, 0)],
            trouble(0, 0, 40, 0, 0),
        ),
        (
            "mixed-cut-late-torn",
            vec![a.clone(), b.clone()],
            vec![create(0, 2), delete(1, 0)],
            trouble(0, 0, 100_000, 2, 7),
        ),
        (
            "revert-and-overlay-cut-all",
            vec![a.clone(), b.clone(), c.clone()],
            vec![revert(0, 1), external(2, 0), create(1, 7)],
            trouble(0, 0, 150, 1, 0),
        ),
        (
            "create-three-eio-persistent",
            vec![a.clone(), b.clone(), c.clone()],
            vec![create(0, 2), create(1, 3), create(2, 7)],
            trouble(0b101, 25, 90, 3, 11),
        ),
        (
            "delete-revert-enospc-once-no-cut",
            vec![a.clone()],
            vec![delete(0, 0), revert(0, 1)],
            trouble(0b1011, 12, 0, 0, 0),
        ),
        (
            "overlay-eio-once",
            vec![c.clone(), b.clone()],
            vec![external(0, 1), create(1, 2)],
            trouble(0b001, 30, 60, 2, 3),
        ),
        (
            "refused-duplicate-name",
            vec![a.clone()],
            vec![create(0, 0)],
            trouble(0, 0, 0, 0, 0),
        ),
        (
            "bitmaps-snapshot-new-bitmap-cut",
            vec![d.clone(), a.clone()],
            vec![create(0, 2), add_b1(0), clear_b0(0), external(1, 0)],
            trouble(0, 0, 120, 2, 5),
        ),
        (
            "bitmaps-revert-clear-eio-once",
            vec![d.clone()],
            vec![revert(0, 0), clear_b0(0), add_b1(0)],
            trouble(0b001, 20, 60, 1, 9),
        ),
        (
            "bitmaps-refused-clear-without-bitmap",
            vec![a.clone(), d],
            vec![add_b1(1), clear_b0(0)],
            trouble(0, 0, 0, 0, 0),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, images, actions, trouble)| {
            let mut bytes = Vec::new();
            group_bytes(&images, &actions, &mut bytes);
            bytes.extend(trouble);
            (name.to_string(), bytes)
        })
        .collect()
}
