//! The engine next to its Rust peers and a raw file: the same workloads on the same fixtures, in
//! one process run, so every figure reads as a percentage of raw pread/pwrite measured minutes
//! apart at most.
//!
//! Engines: `raw` (pread/pwrite on a raw file with the same bytes), `qcow2-engine` (this
//! workspace), `imago` (its `sync` API) and `qcow2-rs` (its synchronous pread/pwrite backend,
//! driven by `futures::executor::block_on`: that backend never yields, so no runtime is needed).
//!
//! Fixtures are the criterion benches' (`qcow2_benches`): a 1 GiB image with 64 KiB clusters,
//! every cluster written in guest order, and a raw file written the same way. Every run is QD1,
//! one thread, page-aligned buffers, page cache warm (one untimed pass first). Allocating writes
//! go into an [`AllocTarget`] of each engine's own: the host file is already written and its
//! metadata is reset before each run, so a run measures the engine, not the host's page allocator. Opening and closing
//! (which flushes) stay outside the clock.
//!
//! Usage: `cargo run --release [-- ROUNDS [WORKLOAD...]]` (5 rounds by default; medians).
//! Workloads: read-seq-64k, read-rand-4k, overwrite-seq-64k, overwrite-rand-4k, alloc-write-64k,
//! alloc-write-4k.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use qcow2_benches::*;

/// `raw` is a raw file with the same guest bytes; `raw-host` is pread/pwrite on the qcow2 host
/// file itself, at the host offsets the guest offsets map to: the same page-cache layout as the
/// engines see (how a file was filled changes 4K speed by a third).
const ENGINES: [&str; 5] = ["raw", "raw-host", "qcow2-engine", "imago", "qcow2-rs"];

/// Random 4K requests per run: enough to leave the CPU caches, short enough for 5 rounds.
const RANDOM_COUNT: usize = 1 << 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Overwrite,
    Alloc,
}

struct Workload {
    name: &'static str,
    kind: Kind,
    len: usize,
    offsets: Vec<u64>,
}

fn workloads() -> Vec<Workload> {
    let seq = sequential_offsets(GIB, 64 * KIB);
    let rand = random_offsets(RANDOM_COUNT, GIB, 4 * KIB, 1);
    vec![
        Workload {
            name: "read-seq-64k",
            kind: Kind::Read,
            len: 64 * KIB as usize,
            offsets: seq.clone(),
        },
        Workload {
            name: "read-rand-4k",
            kind: Kind::Read,
            len: 4 * KIB as usize,
            offsets: rand.clone(),
        },
        Workload {
            name: "overwrite-seq-64k",
            kind: Kind::Overwrite,
            len: 64 * KIB as usize,
            offsets: seq.clone(),
        },
        Workload {
            name: "overwrite-rand-4k",
            kind: Kind::Overwrite,
            len: 4 * KIB as usize,
            offsets: rand,
        },
        Workload {
            name: "alloc-write-64k",
            kind: Kind::Alloc,
            len: 64 * KIB as usize,
            offsets: seq.clone(),
        },
        // One 4K write at each cluster start: the rest of each new cluster must read as zeros.
        Workload {
            name: "alloc-write-4k",
            kind: Kind::Alloc,
            len: 4 * KIB as usize,
            offsets: seq,
        },
    ]
}

/// One engine's open image (or file), behind the two calls a workload makes. (One lives at a
/// time, so the variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Engine {
    Raw(File),
    Ours(qcow2::Image),
    Imago(FormatAccess<imago::file::File>),
    Qcow2Rs(qcow2_rs::dev::Qcow2Dev<qcow2_rs::sync_io::Qcow2IoSync>),
}

impl Engine {
    fn open(engine: &str, path: &Path, writable: bool) -> Engine {
        let fail =
            |e: &dyn std::fmt::Display| -> ! { panic!("{engine}: open {}: {e}", path.display()) };
        match engine {
            "raw" => Engine::Raw(open_raw(path, writable)),
            "qcow2-engine" => {
                let options = if writable {
                    qcow2::OpenOptions::read_write()
                } else {
                    qcow2::OpenOptions::default()
                };
                Engine::Ours(qcow2::Image::open(path, &options).unwrap_or_else(|e| fail(&e)))
            }
            "imago" => {
                let image = imago::qcow2::Qcow2::<imago::file::File>::builder_path(path)
                    .write(writable)
                    .open(PermissiveImplicitOpenGate::default())
                    .unwrap_or_else(|e| fail(&e));
                Engine::Imago(FormatAccess::new(image))
            }
            "qcow2-rs" => {
                let params = qcow2_rs::dev::Qcow2DevParams::new(9, None, None, !writable, false);
                let dev = qcow2_rs::utils::qcow2_setup_dev_sync(path, &params)
                    .unwrap_or_else(|e| fail(&format!("{e:?}")));
                futures::executor::block_on(dev.qcow2_prep_io())
                    .unwrap_or_else(|e| fail(&format!("{e:?}")));
                Engine::Qcow2Rs(dev)
            }
            _ => unreachable!("unknown engine {engine}"),
        }
    }

    fn read(&self, buf: &mut [u8], at: u64) {
        match self {
            Engine::Raw(f) => f.read_exact_at(buf, at).expect("raw read"),
            Engine::Ours(i) => i.read_at(buf, at).expect("qcow2-engine read"),
            Engine::Imago(i) => i.read(&mut *buf, at).expect("imago read"),
            Engine::Qcow2Rs(d) => {
                let n = futures::executor::block_on(d.read_at(buf, at)).expect("qcow2-rs read");
                assert_eq!(n, buf.len(), "qcow2-rs short read");
            }
        }
    }

    fn write(&self, buf: &[u8], at: u64) {
        match self {
            Engine::Raw(f) => f.write_all_at(buf, at).expect("raw write"),
            Engine::Ours(i) => i.write_at(buf, at).expect("qcow2-engine write"),
            Engine::Imago(i) => i.write(buf, at).expect("imago write"),
            Engine::Qcow2Rs(d) => {
                futures::executor::block_on(d.write_at(buf, at)).expect("qcow2-rs write")
            }
        }
    }

    /// Writes cached metadata back (outside the clock, as qemu-img bench's close).
    fn close(self) {
        match self {
            Engine::Raw(f) => f.sync_all().expect("raw sync"),
            Engine::Ours(i) => i.close().expect("qcow2-engine close"),
            Engine::Imago(i) => i.flush().expect("imago flush"),
            Engine::Qcow2Rs(d) => {
                futures::executor::block_on(d.flush_meta()).expect("qcow2-rs flush")
            }
        }
    }
}

/// The files every workload runs on.
struct Fixtures {
    raw_read: std::path::PathBuf,
    qcow2_read: std::path::PathBuf,
    raw_write: std::path::PathBuf,
    qcow2_write: std::path::PathBuf,
    /// One allocating-write target per engine: imago and qcow2-rs zero new clusters with
    /// `fallocate`, which splits the host file's extents (a shared target ended up with 12,000
    /// of them, and plain 64K pwrites into it ran at 70% of the raw file's speed).
    allocs: BTreeMap<&'static str, AllocTarget>,
    /// Host offset of each guest cluster of `qcow2_read` and `qcow2_write`.
    read_hosts: Vec<u64>,
    write_hosts: Vec<u64>,
    /// Where the engine puts guest cluster 0 of the alloc target; later clusters follow it.
    alloc_base: u64,
}

/// The host offset of every guest cluster of a fully allocated image.
fn host_map(path: &Path) -> Vec<u64> {
    let image = open_ro(path, 4 * MIB);
    let mut hosts = Vec::with_capacity((GIB / CLUSTER) as usize);
    for extent in image.map(0, GIB).expect("map") {
        let qcow2::ExtentKind::Data { host_offset } = extent.kind else {
            panic!("{}: {extent:?} is not data", path.display());
        };
        hosts.extend((0..extent.length / CLUSTER).map(|k| host_offset + k * CLUSTER));
    }
    hosts
}

impl Fixtures {
    fn make() -> Fixtures {
        let raw_read = raw(GIB);
        let qcow2_read = allocated(GIB);
        let qcow2_write = writable_copy(&qcow2_read, "overwrite-1G.qcow2");
        let allocs: BTreeMap<&'static str, AllocTarget> = ENGINES[2..]
            .iter()
            .map(|&e| {
                (
                    e,
                    AllocTarget::new(&format!("alloc-1G-{e}.qcow2"), GIB, None),
                )
            })
            .collect();
        let alloc = &allocs["qcow2-engine"];
        let image = alloc.open();
        image
            .write_at(&[1; CLUSTER as usize], 0)
            .expect("probe write");
        image.close().expect("close");
        let alloc_base = host_map_first(&alloc.path);
        alloc.reset();
        Fixtures {
            raw_write: writable_copy(&raw_read, "overwrite-1G.raw"),
            read_hosts: host_map(&qcow2_read),
            write_hosts: host_map(&qcow2_write),
            qcow2_write,
            raw_read,
            qcow2_read,
            allocs,
            alloc_base,
        }
    }

    /// The allocating-write target of `engine` (`raw-host` uses ours).
    fn alloc_target(&self, engine: &str) -> &AllocTarget {
        self.allocs
            .get(engine)
            .unwrap_or(&self.allocs["qcow2-engine"])
    }

    /// The offsets `raw-host` uses for a workload's guest offsets.
    fn host_offsets(&self, w: &Workload) -> Vec<u64> {
        let via = |hosts: &[u64]| -> Vec<u64> {
            w.offsets
                .iter()
                .map(|&g| hosts[(g / CLUSTER) as usize] + g % CLUSTER)
                .collect()
        };
        match w.kind {
            Kind::Read => via(&self.read_hosts),
            Kind::Overwrite => via(&self.write_hosts),
            Kind::Alloc => w.offsets.iter().map(|&g| self.alloc_base + g).collect(),
        }
    }

    /// The file an engine runs a workload on. Allocating writes on raw go to the written raw
    /// file at the same offsets (a pwrite into cached pages, as the engines' data writes are).
    fn path(&self, engine: &str, kind: Kind) -> &Path {
        match (engine == "raw", kind) {
            // raw-host runs on the engines' files.
            (true, Kind::Read) => &self.raw_read,
            (true, _) => &self.raw_write,
            (false, Kind::Read) => &self.qcow2_read,
            (false, Kind::Overwrite) => &self.qcow2_write,
            // raw-host writes where our engine puts the clusters, in our engine's target.
            (false, Kind::Alloc) => &self.alloc_target(engine).path,
        }
    }
}

/// One timed pass of `w` through `engine`.
fn run(fixtures: &Fixtures, engine: &str, w: &Workload, buf: &mut AlignedBuf) -> Duration {
    let engine_code = engine != "raw" && engine != "raw-host";
    if w.kind == Kind::Alloc && engine_code {
        fixtures.alloc_target(engine).reset();
    }
    let host_offsets;
    let offsets = if engine == "raw-host" {
        host_offsets = fixtures.host_offsets(w);
        &host_offsets
    } else {
        &w.offsets
    };
    let open = Engine::open(
        if engine == "raw-host" { "raw" } else { engine },
        fixtures.path(engine, w.kind),
        w.kind != Kind::Read,
    );
    let start = Instant::now();
    match w.kind {
        Kind::Read => {
            for &at in offsets {
                open.read(buf.as_mut_slice(), at);
            }
            std::hint::black_box(buf.as_slice()[0]);
        }
        Kind::Overwrite | Kind::Alloc => {
            for &at in offsets {
                open.write(buf.as_slice(), at);
            }
        }
    }
    let elapsed = start.elapsed();
    open.close();
    if w.kind != Kind::Read {
        // Dirty pages left to the kernel's writeback would slow whichever run comes next.
        open_raw(fixtures.path(engine, w.kind), true)
            .sync_all()
            .expect("sync");
    }
    if w.kind == Kind::Alloc && engine_code {
        verify_alloc(fixtures, engine, w, buf);
    }
    elapsed
}

/// Reads an allocating run's first and last request back through our engine and checks the
/// image, so a peer that wrote nothing (or a broken image) cannot look fast.
fn verify_alloc(fixtures: &Fixtures, engine: &str, w: &Workload, buf: &AlignedBuf) {
    let image = open_ro(&fixtures.alloc_target(engine).path, 4 * MIB);
    let mut got = vec![0u8; CLUSTER as usize];
    let mut want = vec![0u8; CLUSTER as usize];
    want[..w.len].copy_from_slice(buf.as_slice());
    for &at in [w.offsets[0], w.offsets[w.offsets.len() - 1]].iter() {
        image.read_at(&mut got, at).expect("verify read");
        assert!(
            got == want,
            "{engine}: {} left wrong bytes in the cluster at {at:#x}",
            w.name
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args
        .next()
        .map(|r| r.parse().expect("ROUNDS is a number"))
        .unwrap_or(5);
    let only: Vec<String> = args.collect();
    let fixtures = Fixtures::make();
    let workloads: Vec<Workload> = workloads()
        .into_iter()
        .filter(|w| only.is_empty() || only.iter().any(|o| o == w.name))
        .collect();
    let mut buf = AlignedBuf::new(64 * KIB as usize, 0);
    fill_random(buf.as_mut_slice(), 1 << 40);

    // seconds[(workload, engine)] over the rounds.
    let mut seconds: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..=rounds {
        for (wi, w) in workloads.iter().enumerate() {
            let mut one = AlignedBuf::new(w.len, 0);
            one.as_mut_slice().copy_from_slice(&buf.as_slice()[..w.len]);
            // Each round starts with another engine, so no engine always runs first or last.
            for k in 0..ENGINES.len() {
                let engine = ENGINES[(k + round) % ENGINES.len()];
                let t = run(&fixtures, engine, w, &mut one);
                // Round 0 warms the page cache and the fixtures' layout; it is not counted.
                if round > 0 {
                    seconds
                        .entry((wi, engine))
                        .or_default()
                        .push(t.as_secs_f64());
                }
            }
        }
        eprintln!("round {round}/{rounds} done");
    }

    println!(
        "{:<18} {:<13} {:>10} {:>12} {:>8} {:>10}",
        "workload", "engine", "MB/s", "IOPS", "% raw", "% raw-host"
    );
    for (wi, w) in workloads.iter().enumerate() {
        let ops = w.offsets.len() as f64;
        let raw_secs = median(seconds[&(wi, "raw")].clone());
        let host_secs = median(seconds[&(wi, "raw-host")].clone());
        for engine in ENGINES {
            let secs = median(seconds[&(wi, engine)].clone());
            println!(
                "{:<18} {:<13} {:>10.0} {:>12.0} {:>7.0}% {:>9.0}%",
                w.name,
                engine,
                ops * w.len as f64 / secs / 1e6,
                ops / secs,
                100.0 * raw_secs / secs,
                100.0 * host_secs / secs
            );
        }
    }
    println!(
        "(QD1, one thread, page-aligned buffers, medians of {rounds} rounds; MB/s = 10^6 B/s)"
    );
}

/// The host offset of guest cluster 0 of an image.
fn host_map_first(path: &Path) -> u64 {
    let image = open_ro(path, 4 * MIB);
    match image.map(0, CLUSTER).expect("map")[0].kind {
        qcow2::ExtentKind::Data { host_offset } => host_offset,
        other => panic!("{}: cluster 0 is {other:?}", path.display()),
    }
}
