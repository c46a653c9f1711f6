//! Power cuts during commit and rebase. Each file of the chain sits on its own recording store;
//! a shared clock notes, after every operation on any store, how far each store has got, so a
//! cut at one instant loses exactly the unflushed writes of every file (a flush of one file does
//! not order another). At every cut (a stride of them plus both sides of every flush; all of
//! them with `QCOW2_CRASH_FULL=1`) and with the unflushed writes dropped, kept or torn:
//!
//! - the top's header names the old or the new backing file, never garbage;
//! - the top reads the guest content it had before (commit and safe rebase);
//! - our check finds no corruption in any file (leaks are allowed);
//! - `qemu-img check` agrees on a sample;
//! - running the operation again finishes it with the state a clean run reaches.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use qcow2::storage::recording::{Op, RecordingStorage, Survivors};
use qcow2::{
    BackingPolicy, CommitOptions, CreateOptions, Image, MemoryStorage, NewBacking, OpenOptions,
    RebaseOptions, Storage,
};

type Files = BTreeMap<String, Vec<u8>>;

const SIZE: u64 = 384 << 10;

/// Builds a qcow2 image in memory with the engine.
fn qcow2_file(cluster_size: u64, backing: Option<(&str, &str)>, fill: impl Fn(&Image)) -> Vec<u8> {
    let store = Arc::new(RecordingStorage::new(Vec::new()));
    let options = CreateOptions::new(SIZE)
        .cluster_size(cluster_size)
        .backing_file(backing.map(|b| b.0.to_string()))
        .backing_format(
            backing
                .map(|b| b.1)
                .filter(|f| !f.is_empty())
                .map(str::to_string),
        );
    let image = Image::create_in(Box::new(store.clone()), "fixture", &options).unwrap();
    fill(&image);
    image.close().unwrap();
    store.live_bytes()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 700) as u8))
        .collect()
}

/// base (4 KiB clusters or raw) <- mid (16 KiB, qcow2 base only) <- top (8 KiB clusters), with
/// plain, compressed, zero-hiding and partial writes in the overlays, plus two unrelated files
/// to rebase onto.
fn fixture(raw_base: bool) -> Files {
    fixture_with(raw_base, true)
}

/// As [`fixture`]; without `top_format` the top's header names no backing format (as images
/// from before QEMU required one).
fn fixture_with(raw_base: bool, top_format: bool) -> Files {
    let mut files = Files::new();
    let base_name = if raw_base { "base.raw" } else { "base.qcow2" };
    if raw_base {
        files.insert(base_name.into(), pattern(SIZE as usize, 1));
    } else {
        files.insert(
            base_name.into(),
            qcow2_file(4096, None, |i| {
                i.write_at(&pattern(SIZE as usize, 1), 0).unwrap();
            }),
        );
        files.insert(
            "mid.qcow2".into(),
            qcow2_file(16384, Some((base_name, "qcow2")), |i| {
                i.write_at(&pattern(100 << 10, 2), 16 << 10).unwrap();
                i.write_zeroes(200 << 10, 32 << 10, false).unwrap();
                for n in 0..8u64 {
                    i.write_at(&pattern(2048, 20 + n as u8), 240_000 + n * 17_000)
                        .unwrap();
                }
            }),
        );
    }
    let below = match (raw_base, top_format) {
        (true, _) => (base_name, "raw"),
        (false, true) => ("mid.qcow2", "qcow2"),
        (false, false) => ("mid.qcow2", ""),
    };
    files.insert(
        "top.qcow2".into(),
        qcow2_file(8192, Some(below), |i| {
            i.write_at(&pattern(40 << 10, 3), 8 << 10).unwrap();
            i.write_compressed(&pattern(8 << 10, 4), 96 << 10).unwrap();
            i.write_zeroes(120 << 10, 16 << 10, false).unwrap();
            i.write_zeroes(208 << 10, 8 << 10, true).unwrap();
            i.write_at(&pattern(3000, 5), 300_000).unwrap();
            // Scattered small writes: many extents, so many separate commit and copy writes.
            for n in 0..12u64 {
                i.write_at(&pattern(1024, 6 + n as u8), 140_000 + n * 13_000)
                    .unwrap();
            }
        }),
    );
    files.insert("other.raw".into(), pattern(256 << 10, 7));
    files
}

/// Opens `name` and its chain as the headers name it, each file from `storage_for`.
fn open_chain(
    name: &str,
    storage_for: &mut dyn FnMut(&str) -> Option<Box<dyn Storage>>,
    writable: &dyn Fn(&str) -> bool,
) -> Result<Image, String> {
    let storage = storage_for(name).ok_or_else(|| format!("no file named {name:?}"))?;
    let options = OpenOptions::default()
        .writable(writable(name))
        .backing(BackingPolicy::Ignore);
    let mut image = Image::from_storage(storage, name, &options).map_err(|e| e.to_string())?;
    if let Some(below) = image.backing_file_name() {
        let format = image.header().extensions.backing_format.clone();
        if format.as_deref() == Some(b"raw") {
            let storage = storage_for(&below).ok_or_else(|| format!("no file named {below:?}"))?;
            image
                .attach_raw_backing(storage)
                .map_err(|e| e.to_string())?;
        } else {
            image.attach_backing(open_chain(&below, storage_for, writable)?);
        }
    }
    Ok(image)
}

fn content(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// Checks every qcow2 image of a chain: no corruption, no check errors.
fn check_chain(image: &Image, what: &str) {
    let report = image
        .check()
        .unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    assert_eq!(report.check_errors, 0, "{what}: {:?}", report.messages);
    if let Some(below) = image.backing_image() {
        check_chain(below, what);
    }
}

/// The stores of a run and the shared clock over them.
struct Clock {
    stores: Vec<(String, Arc<RecordingStorage>)>,
    /// After each operation on any store: every store's operation count.
    log: Mutex<Vec<Vec<usize>>>,
}

impl Clock {
    fn tick(&self) {
        let counts = self.stores.iter().map(|(_, s)| s.op_count()).collect();
        self.log.lock().unwrap().push(counts);
    }
}

/// A store that ticks the clock after each operation.
struct Tracked {
    store: Arc<RecordingStorage>,
    clock: Arc<Clock>,
}

impl Storage for Tracked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.store.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.store.write_at(buf, offset)?;
        self.clock.tick();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.store.flush()?;
        self.clock.tick();
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.store.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.store.set_len(len)?;
        self.clock.tick();
        Ok(())
    }
}

/// One operation on a chain, and what it must leave.
struct Case {
    name: &'static str,
    files: Files,
    /// Files opened writable.
    writable: Vec<&'static str>,
    /// The backing names the top may show: before and after.
    names: [Option<&'static str>; 2],
    /// Whether the top's guest content must stay as it was.
    keeps_content: bool,
    /// Whether the top ends up with no cluster of its own.
    empties_top: bool,
    run: fn(&mut Image, &Files),
}

fn new_backing(files: &Files, name: &str) -> NewBacking {
    let bytes = files[name].clone();
    if name.ends_with(".raw") {
        NewBacking::Raw(Box::new(MemoryStorage::from_bytes(bytes)))
    } else {
        let mut store = |n: &str| -> Option<Box<dyn Storage>> {
            let b = files.get(n)?.clone();
            Some(Box::new(MemoryStorage::from_bytes(b)))
        };
        NewBacking::Qcow2(Box::new(open_chain(name, &mut store, &|_| false).unwrap()))
    }
}

fn rebase(image: &mut Image, files: &Files, name: Option<&str>, format: &str, header_only: bool) {
    let options = RebaseOptions::default()
        .name(name.map(str::to_string))
        .format(name.map(|_| format.to_string()))
        .header_only(header_only);
    let new = name.filter(|_| !header_only).map(|n| new_backing(files, n));
    image.rebase(&options, new, &mut |_, _| {}).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "commit into the backing file, emptying the top",
            files: fixture(false),
            writable: vec!["top.qcow2", "mid.qcow2"],
            names: [Some("mid.qcow2"), Some("mid.qcow2")],
            keeps_content: true,
            empties_top: true,
            run: |top, _| {
                top.commit(&CommitOptions::default(), &mut |_, _| {})
                    .unwrap()
            },
        },
        Case {
            name: "commit -b into a deeper base",
            files: fixture(false),
            writable: vec!["base.qcow2"],
            names: [Some("mid.qcow2"), Some("mid.qcow2")],
            keeps_content: true,
            empties_top: false,
            run: |top, _| {
                let options = CommitOptions::default().base_depth(2).empty_top(false);
                top.commit(&options, &mut |_, _| {}).unwrap()
            },
        },
        Case {
            name: "commit into a raw base",
            files: fixture(true),
            writable: vec!["top.qcow2", "base.raw"],
            names: [Some("base.raw"), Some("base.raw")],
            keeps_content: true,
            empties_top: true,
            run: |top, _| {
                top.commit(&CommitOptions::default(), &mut |_, _| {})
                    .unwrap()
            },
        },
        Case {
            name: "rebase past the middle image",
            files: fixture(false),
            writable: vec!["top.qcow2"],
            names: [Some("mid.qcow2"), Some("base.qcow2")],
            keeps_content: true,
            empties_top: false,
            run: |top, files| rebase(top, files, Some("base.qcow2"), "qcow2", false),
        },
        Case {
            name: "rebase from qcow2 onto raw",
            files: fixture(false),
            writable: vec!["top.qcow2"],
            names: [Some("mid.qcow2"), Some("other.raw")],
            keeps_content: true,
            empties_top: false,
            run: |top, files| rebase(top, files, Some("other.raw"), "raw", false),
        },
        Case {
            name: "rebase adds a backing format the header lacked",
            files: fixture_with(false, false),
            writable: vec!["top.qcow2"],
            names: [Some("mid.qcow2"), Some("base.qcow2")],
            keeps_content: true,
            empties_top: false,
            run: |top, files| rebase(top, files, Some("base.qcow2"), "qcow2", false),
        },
        Case {
            name: "flatten",
            files: fixture(true),
            writable: vec!["top.qcow2"],
            names: [Some("base.raw"), None],
            keeps_content: true,
            empties_top: false,
            run: |top, files| rebase(top, files, None, "", false),
        },
        Case {
            name: "rebase -u",
            files: fixture(false),
            writable: vec!["top.qcow2"],
            names: [Some("mid.qcow2"), Some("other.raw")],
            keeps_content: false,
            empties_top: false,
            run: |top, files| rebase(top, files, Some("other.raw"), "raw", true),
        },
    ]
}

fn cut_points(log_len: usize, flush_after: &[bool]) -> Vec<usize> {
    if std::env::var_os("QCOW2_CRASH_FULL").is_some() {
        return (0..=log_len).collect();
    }
    let stride = (log_len / 60).max(1);
    (0..=log_len)
        .filter(|&k| {
            k % stride == 0 || k == log_len || flush_after.get(k).copied().unwrap_or(false)
        })
        .collect()
}

fn run_case(case: &Case) {
    let Case { name, files, .. } = case;
    let writable = |n: &str| case.writable.contains(&n);
    let mut memory = |n: &str| -> Option<Box<dyn Storage>> {
        Some(Box::new(MemoryStorage::from_bytes(files.get(n)?.clone())))
    };
    let before = content(&open_chain("top.qcow2", &mut memory, &|_| false).unwrap());

    // The recorded run.
    let clock = Arc::new(Clock {
        stores: files
            .iter()
            .map(|(n, b)| (n.clone(), Arc::new(RecordingStorage::new(b.clone()))))
            .collect(),
        log: Mutex::new(Vec::new()),
    });
    clock.tick();
    {
        let mut tracked = |n: &str| -> Option<Box<dyn Storage>> {
            let (_, store) = clock.stores.iter().find(|(name, _)| name == n)?;
            Some(Box::new(Tracked {
                store: store.clone(),
                clock: clock.clone(),
            }))
        };
        let mut top = open_chain("top.qcow2", &mut tracked, &writable).unwrap();
        (case.run)(&mut top, files);
        top.close().unwrap();
    }
    let log = clock.log.lock().unwrap().clone();
    let finals: Files = clock
        .stores
        .iter()
        .map(|(n, s)| (n.clone(), s.live_bytes()))
        .collect();
    let expected_final = final_state(case, &finals, &before, &format!("{name}: clean run"));

    // Entry k follows a flush (on any store); cuts go on both sides of each.
    let ops: Vec<Vec<Op>> = clock.stores.iter().map(|(_, s)| s.ops()).collect();
    let is_flush = |k: usize| {
        k > 0
            && k < log.len()
            && (0..ops.len())
                .any(|i| log[k][i] != log[k - 1][i] && ops[i][log[k][i] - 1] == Op::Flush)
    };
    let flush_near: Vec<bool> = (0..log.len())
        .map(|k| is_flush(k) || is_flush(k + 1))
        .collect();
    let mut tested = 0;
    for k in cut_points(log.len() - 1, &flush_near) {
        for (s, survivors) in [
            Survivors::None,
            Survivors::All,
            Survivors::TornSectors(k as u64 * 31 + 7),
        ]
        .into_iter()
        .enumerate()
        {
            let what = format!("{name}: cut at {k} of {}, {survivors:?}", log.len() - 1);
            let crashed: Files = clock
                .stores
                .iter()
                .enumerate()
                .map(|(i, (n, store))| {
                    let survivors = match survivors {
                        Survivors::TornSectors(seed) => Survivors::TornSectors(seed + i as u64),
                        other => other,
                    };
                    (n.clone(), store.crash_image(log[k][i], survivors))
                })
                .collect();
            let mut from_crash = |n: &str| -> Option<Box<dyn Storage>> {
                Some(Box::new(MemoryStorage::from_bytes(crashed.get(n)?.clone())))
            };
            let top = open_chain("top.qcow2", &mut from_crash, &|_| false)
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let shown = top.backing_file_name();
            assert!(
                case.names.iter().any(|n| n.map(str::to_string) == shown),
                "{what}: the top names {shown:?}"
            );
            check_chain(&top, &what);
            if case.keeps_content {
                assert!(content(&top) == before, "{what}: the top's content changed");
            }
            drop(top);

            // QEMU agrees on a sample: at most leaks, never corruption.
            if s == 2 && k % 8 == 0 {
                let dir = qcow2_testdata::scratch_dir(&format!("chain-crash-{name}-{k}"));
                for (n, bytes) in &crashed {
                    std::fs::write(dir.join(n), bytes).unwrap();
                }
                for n in crashed.keys().filter(|n| n.ends_with(".qcow2")) {
                    let (code, json) = qcow2_testdata::qemu_check(&dir.join(n));
                    assert!(code == 0 || code == 3, "{what}: qemu-img check {n}: {json}");
                }
                let _ = std::fs::remove_dir_all(&dir);
            }

            // Running it again finishes the job.
            {
                let rerun: BTreeMap<String, Arc<RecordingStorage>> = crashed
                    .iter()
                    .map(|(n, b)| (n.clone(), Arc::new(RecordingStorage::new(b.clone()))))
                    .collect();
                {
                    let mut store = |n: &str| -> Option<Box<dyn Storage>> {
                        Some(Box::new(rerun.get(n)?.clone()))
                    };
                    let mut top = open_chain("top.qcow2", &mut store, &writable)
                        .unwrap_or_else(|e| panic!("{what}: rerun open: {e}"));
                    (case.run)(&mut top, files);
                    top.close().unwrap();
                }
                let after: Files = rerun
                    .iter()
                    .map(|(n, s)| (n.clone(), s.live_bytes()))
                    .collect();
                let state = final_state(case, &after, &before, &format!("{what}: rerun"));
                assert!(state == expected_final, "{what}: the rerun ends elsewhere");
            }
            tested += 1;
        }
    }
    eprintln!(
        "{name}: {tested} crash images over {} instants",
        log.len() - 1
    );
    assert!(tested > 30, "{name}: only {tested} crash images");
}

/// Checks the state after a finished operation and returns what identifies it: the guest
/// content of every qcow2 file's chain and of every raw file.
fn final_state(case: &Case, files: &Files, before: &[u8], what: &str) -> Vec<Vec<u8>> {
    let mut memory = |n: &str| -> Option<Box<dyn Storage>> {
        Some(Box::new(MemoryStorage::from_bytes(files.get(n)?.clone())))
    };
    let top = open_chain("top.qcow2", &mut memory, &|_| false).unwrap();
    assert_eq!(
        top.backing_file_name().as_deref(),
        case.names[1],
        "{what}: backing name"
    );
    check_chain(&top, what);
    if case.keeps_content {
        assert!(content(&top) == before, "{what}: the top's content changed");
    }
    if case.empties_top {
        let own = top
            .map(0, top.size())
            .unwrap()
            .into_iter()
            .filter(|e| e.depth == 0 && e.present())
            .count();
        assert_eq!(own, 0, "{what}: the top still holds data");
    }
    drop(top);
    files
        .keys()
        .map(|n| {
            if n.ends_with(".raw") {
                files[n].clone()
            } else {
                content(&open_chain(n, &mut memory, &|_| false).unwrap())
            }
        })
        .collect()
}

#[test]
fn commit_survives_a_crash_at_every_write() {
    for case in cases().iter().filter(|c| c.name.starts_with("commit")) {
        run_case(case);
    }
}

#[test]
fn rebase_survives_a_crash_at_every_write() {
    for case in cases().iter().filter(|c| !c.name.starts_with("commit")) {
        run_case(case);
    }
}
