//! Guest I/O through the engine, each group with a raw-file baseline doing the same I/O at the
//! same offsets (pread/pwrite on a file of the same size), so every figure reads as a ratio.
//!
//! Groups: sequential 64K and random 4K reads (allocated image with a warm and a cold L2 cache,
//! unallocated image, zlib and zstd images, a 3-deep chain); 64K and random 4K overwrites; 64K,
//! 4K and random 4K allocating writes; 4K copy-on-write over a backing file; 1 and 2 reader
//! threads.

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use qcow2::format::CompressionType;
use qcow2::Image;
use qcow2_benches::*;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// One table: with 64 KiB clusters it maps 512 MiB, half of the 1 GiB image, so about half of
/// the random reads miss.
const COLD_L2_CACHE: u64 = CLUSTER;
/// Enough for every table of the image (the engine's default).
const WARM_L2_CACHE: u64 = 4 * MIB;
/// Random offsets per list: enough that the list does not fit a CPU cache's worth of hits.
const RANDOM_COUNT: usize = 1 << 16;

fn read_qcow2(group: &mut Group, name: &str, image: &Image, offsets: &[u64], len: usize) {
    let mut buf = AlignedBuf::new(len, 0);
    let mut cycle = Cycle::new(offsets);
    group.bench_function(name, |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            image.read_at(buf.as_mut_slice(), at).expect("qcow2 read");
            black_box(buf.as_slice()[0]);
        })
    });
}

fn read_raw(group: &mut Group, name: &str, file: &std::fs::File, offsets: &[u64], len: usize) {
    let mut buf = AlignedBuf::new(len, 0);
    let mut cycle = Cycle::new(offsets);
    group.bench_function(name, |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            file.read_exact_at(buf.as_mut_slice(), at)
                .expect("raw read");
            black_box(buf.as_slice()[0]);
        })
    });
}

/// Checks that a fixture reads back what its recipe wrote, so a bench never times wrong data.
fn expect_bytes(image: &Image, at: u64, fill: fn(&mut [u8], u64), what: &str) {
    let mut got = vec![0u8; CLUSTER as usize];
    let mut want = vec![0u8; CLUSTER as usize];
    image.read_at(&mut got, at).expect("fixture read");
    fill(&mut want, at);
    assert!(got == want, "{what}: wrong bytes at {at:#x}");
}

/// Sequential or random reads of every read fixture, against the raw file.
fn reads(c: &mut Criterion, group_name: &str, len: usize, random: bool) {
    let allocated = allocated(GIB);
    let raw_path = raw(GIB);
    let offsets = if random {
        random_offsets(RANDOM_COUNT, GIB, len as u64, 1)
    } else {
        sequential_offsets(GIB, len as u64)
    };
    let small_offsets = if random {
        random_offsets(RANDOM_COUNT, COMPRESSED_SIZE, len as u64, 2)
    } else {
        sequential_offsets(COMPRESSED_SIZE, len as u64)
    };
    let warm = open_ro(&allocated, WARM_L2_CACHE);
    let cold = open_ro(&allocated, COLD_L2_CACHE);
    expect_bytes(&warm, 5 * CLUSTER, fill_random, "allocated");
    let unallocated = open_ro(&empty(GIB), WARM_L2_CACHE);
    let chain = open_ro(&chain(), WARM_L2_CACHE);
    expect_bytes(&chain, 4 * CLUSTER, fill_random, "chain base");
    let zlib = open_ro(&compressed(CompressionType::Zlib), WARM_L2_CACHE);
    let zstd = open_ro(&compressed(CompressionType::Zstd), WARM_L2_CACHE);
    expect_bytes(&zlib, 3 * CLUSTER, fill_compressible, "zlib");
    expect_bytes(&zstd, 3 * CLUSTER, fill_compressible, "zstd");
    let raw_file = open_raw(&raw_path, false);
    let sparse = open_raw(&sparse_raw(GIB), false);
    let compressible = open_raw(&compressible_raw(), false);

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(len as u64));
    read_raw(&mut group, "raw", &raw_file, &offsets, len);
    read_qcow2(&mut group, "qcow2-warm-l2", &warm, &offsets, len);
    read_qcow2(&mut group, "qcow2-cold-l2", &cold, &offsets, len);
    read_raw(&mut group, "raw-sparse", &sparse, &offsets, len);
    read_qcow2(&mut group, "qcow2-unallocated", &unallocated, &offsets, len);
    read_qcow2(&mut group, "qcow2-chain3", &chain, &offsets, len);
    read_raw(&mut group, "raw-64M", &compressible, &small_offsets, len);
    read_qcow2(&mut group, "qcow2-zlib-64M", &zlib, &small_offsets, len);
    read_qcow2(&mut group, "qcow2-zstd-64M", &zstd, &small_offsets, len);
    group.finish();
}

fn read_seq_64k(c: &mut Criterion) {
    reads(c, "read-seq-64k", 64 * KIB as usize, false);
}

fn read_rand_4k(c: &mut Criterion) {
    reads(c, "read-rand-4k", 4 * KIB as usize, true);
}

/// Overwrites of allocated clusters, against pwrite to a raw file of the same size.
fn overwrites(c: &mut Criterion, group_name: &str, len: usize, random: bool) {
    // Every image starts as a new copy made the same way, and gets the same untimed pass over
    // the offsets and the same write-back before its clock starts: the groups differ only in
    // what they measure.
    let image_path = fresh_copy(&allocated(GIB), "overwrite-1G.qcow2");
    let raw_path = writable_copy(&raw(GIB), "overwrite-1G.raw");
    let offsets = if random {
        random_offsets(RANDOM_COUNT, GIB, len as u64, 3)
    } else {
        sequential_offsets(GIB, len as u64)
    };
    let buf = AlignedBuf::new(len, 0x5a);
    let raw_file = open_raw(&raw_path, true);
    for &at in &offsets {
        raw_file
            .write_all_at(buf.as_slice(), at)
            .expect("raw write");
    }
    raw_file.sync_all().expect("sync");
    let image = warmed_up(&image_path, &offsets, &buf);

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(len as u64));
    let mut cycle = Cycle::new(&offsets);
    group.bench_function("raw", |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            raw_file
                .write_all_at(buf.as_slice(), at)
                .expect("raw write");
        })
    });
    let mut cycle = Cycle::new(&offsets);
    group.bench_function("qcow2", |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            image.write_at(buf.as_slice(), at).expect("qcow2 write");
        })
    });
    image.close().expect("close");
    // The same image with one enabled persistent bitmap (64 KiB granularity) whose every bit is
    // set: a write into a dirty granule costs what it costs without the bitmap.
    let image = warmed_up(
        &fresh_copy(&allocated_with_bitmap(GIB), "overwrite-1G-bitmap.qcow2"),
        &offsets,
        &buf,
    );
    let mut cycle = Cycle::new(&offsets);
    group.bench_function("qcow2-bitmap", |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            image.write_at(buf.as_slice(), at).expect("qcow2 write");
        })
    });
    // The worst case of the durable-bits rule: every write sets a bit of a cleared bitmap and
    // lands in place, so each waits for one sync of the bitmap's bytes. Last, on the image the
    // previous function measured, since its syncs change the file's page-cache state.
    group.bench_function("qcow2-bitmap-first-write", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                image.clear_bitmap("b0").expect("clear");
                let n = (iters - done).min(offsets.len() as u64) as usize;
                let started = Instant::now();
                for &at in &offsets[..n] {
                    image.write_at(buf.as_slice(), at).expect("qcow2 write");
                }
                total += started.elapsed();
                done += n as u64;
            }
            total
        })
    });
    group.finish();
    image.close().expect("close");
}

/// Opens `path` read-write, writes `buf` once at every offset and writes everything back: the
/// state every overwrite group starts its clock in.
fn warmed_up(path: &Path, offsets: &[u64], buf: &AlignedBuf) -> Image {
    let image = open_rw(path);
    for &at in offsets {
        image.write_at(buf.as_slice(), at).expect("qcow2 write");
    }
    image.flush().expect("flush");
    image
}

fn overwrite_64k(c: &mut Criterion) {
    overwrites(c, "overwrite-seq-64k", 64 * KIB as usize, false);
}

fn overwrite_4k(c: &mut Criterion) {
    overwrites(c, "overwrite-rand-4k", 4 * KIB as usize, true);
}

/// Writes `buf` at each offset of passes over `offsets` into `target`, resetting the target
/// (untimed) before each pass: every timed write allocates. Closing (which writes back dirty
/// metadata and syncs) is outside the clock, as qemu-img bench's final close is. With `bitmap`,
/// the image gets one enabled persistent bitmap (untimed) before each pass, whose first change
/// (marking it in use) also happens before the clock starts.
fn allocating_pass(
    target: &AllocTarget,
    offsets: &[u64],
    buf: &[u8],
    iters: u64,
    bitmap: bool,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut remaining = iters;
    while remaining > 0 {
        target.reset();
        let image = target.open();
        if bitmap {
            image
                .add_bitmap("b0", 64 * KIB, false)
                .expect("add a bitmap");
        }
        // The session's first change marks its bitmaps in use on disk (one sync): a cost per
        // open, not per write, paid here (an empty write) for both kinds of pass alike.
        image.write_at(&[], 0).expect("empty write");
        let n = remaining.min(offsets.len() as u64) as usize;
        let started = Instant::now();
        for &at in &offsets[..n] {
            image.write_at(buf, at).expect("allocating write");
        }
        total += started.elapsed();
        image.close().expect("close");
        remaining -= n as u64;
    }
    total
}

/// Checks that an allocating write of `len` bytes at `at` reads back with zeros (or the
/// backing file's bytes) around it, although the host cluster held old bytes.
fn check_allocation(target: &AllocTarget, at: u64, len: usize, backing: bool) {
    target.reset();
    let image = target.open();
    image.write_at(&vec![0x5a; len], at).expect("write");
    let start = at - at % CLUSTER;
    let mut got = vec![0u8; CLUSTER as usize];
    image.read_at(&mut got, start).expect("read");
    let mut want = vec![0u8; CLUSTER as usize];
    if backing {
        fill_random(&mut want, start);
    }
    let inner = (at - start) as usize;
    want[inner..inner + len].fill(0x5a);
    assert!(got == want, "allocating write at {at:#x} reads back wrong");
    image.close().expect("close");
}

/// One write per cluster, in guest order: 64K writes cover it, 4K writes land inside it (not at
/// its start when copying on write, so both a head and a tail are copied).
fn one_per_cluster(cow: bool) -> Vec<u64> {
    (0..GIB / CLUSTER)
        .map(|k| k * CLUSTER + if cow { (k % 15 + 1) * 4 * KIB } else { 0 })
        .collect()
}

/// One 4K write per cluster, the clusters in random order, each at a random 4K block of its
/// cluster.
fn one_per_cluster_random() -> Vec<u64> {
    let mut clusters: Vec<u64> = (0..GIB / CLUSTER).collect();
    clusters.sort_by_key(|&k| splitmix64(k ^ 0x5eed));
    clusters
        .into_iter()
        .map(|k| k * CLUSTER + splitmix64(k) % (CLUSTER / (4 * KIB)) * 4 * KIB)
        .collect()
}

fn allocating(
    c: &mut Criterion,
    group_name: &str,
    len: usize,
    target: &AllocTarget,
    offsets: &[u64],
    cow: bool,
) {
    check_allocation(target, offsets[7], len, cow);
    let raw_file = open_raw(&writable_copy(&raw(GIB), "overwrite-1G.raw"), true);
    let buf = AlignedBuf::new(len, 0x5a);

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(len as u64));
    let mut cycle = Cycle::new(offsets);
    group.bench_function("raw", |b| {
        b.iter(|| {
            let (at, _) = cycle.next_offset();
            raw_file
                .write_all_at(buf.as_slice(), at)
                .expect("raw write");
        })
    });
    group.bench_function("qcow2", |b| {
        b.iter_custom(|iters| allocating_pass(target, offsets, buf.as_slice(), iters, false))
    });
    group.bench_function("qcow2-bitmap", |b| {
        b.iter_custom(|iters| allocating_pass(target, offsets, buf.as_slice(), iters, true))
    });
    group.finish();
}

fn alloc_write_64k(c: &mut Criterion) {
    let target = AllocTarget::new("alloc-1G.qcow2", GIB, None);
    let offsets = one_per_cluster(false);
    allocating(
        c,
        "alloc-write-64k",
        64 * KIB as usize,
        &target,
        &offsets,
        false,
    );
}

fn alloc_write_4k(c: &mut Criterion) {
    let target = AllocTarget::new("alloc-1G.qcow2", GIB, None);
    let offsets = one_per_cluster(false);
    allocating(
        c,
        "alloc-write-4k",
        4 * KIB as usize,
        &target,
        &offsets,
        false,
    );
}

/// Random 4K writes, each into a new cluster inside the file (the rest of which must read as
/// zeros over old bytes), beside the raw file's 4K pwrites at the same guest offsets.
fn alloc_write_rand_4k(c: &mut Criterion) {
    let target = AllocTarget::new("alloc-1G.qcow2", GIB, None);
    let offsets = one_per_cluster_random();
    allocating(
        c,
        "alloc-write-rand-4k",
        4 * KIB as usize,
        &target,
        &offsets,
        false,
    );
}

fn cow_write_4k(c: &mut Criterion) {
    let base = allocated(GIB);
    let target = AllocTarget::new("cow-1G.qcow2", GIB, Some(&base));
    let offsets = one_per_cluster(true);
    allocating(c, "cow-write-4k", 4 * KIB as usize, &target, &offsets, true);
}

/// Runs `iters` calls of `io` split over `threads` threads, each on its own random offsets.
fn threaded(threads: u64, iters: u64, io: &(dyn Fn(&mut [u8], u64) + Sync)) -> Duration {
    let lists: Vec<Vec<u64>> = (0..threads)
        .map(|t| random_offsets(RANDOM_COUNT, GIB, 4 * KIB, 10 + t))
        .collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (t, list) in lists.iter().enumerate() {
            let share = iters / threads + u64::from((t as u64) < iters % threads);
            scope.spawn(move || {
                let mut buf = AlignedBuf::new(4 * KIB as usize, 0);
                let mut cycle = Cycle::new(list);
                for _ in 0..share {
                    io(buf.as_mut_slice(), cycle.next_offset().0);
                }
                black_box(buf.as_slice()[0]);
            });
        }
    });
    started.elapsed()
}

fn reader_threads(c: &mut Criterion) {
    let image = open_ro(&allocated(GIB), WARM_L2_CACHE);
    let raw_file = open_raw(&raw(GIB), false);
    let mut group = c.benchmark_group("read-rand-4k-threads");
    group.throughput(Throughput::Bytes(4 * KIB));
    for threads in [1, 2] {
        group.bench_function(format!("raw-{threads}"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, &|buf, at| {
                    raw_file.read_exact_at(buf, at).expect("raw read")
                })
            })
        });
        group.bench_function(format!("qcow2-{threads}"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, &|buf, at| {
                    image.read_at(buf, at).expect("qcow2 read")
                })
            })
        });
    }
    group.finish();
}

/// Random 4K overwrites from one and two threads on one image (issue 16's target: two threads
/// at 1.8x one), beside pwrite from as many threads to a raw file. Every offset is written once
/// before the clock starts, as in the single-thread overwrite groups.
fn writer_threads(c: &mut Criterion) {
    let image = open_rw(&fresh_copy(&allocated(GIB), "overwrite-threads-1G.qcow2"));
    let raw_file = open_raw(&writable_copy(&raw(GIB), "overwrite-1G.raw"), true);
    let buf = AlignedBuf::new(4 * KIB as usize, 0x5a);
    for t in 0..2 {
        for at in random_offsets(RANDOM_COUNT, GIB, 4 * KIB, 10 + t) {
            image.write_at(buf.as_slice(), at).expect("qcow2 write");
            raw_file
                .write_all_at(buf.as_slice(), at)
                .expect("raw write");
        }
    }
    image.flush().expect("flush");
    raw_file.sync_all().expect("sync");
    let mut group = c.benchmark_group("overwrite-rand-4k-threads");
    group.throughput(Throughput::Bytes(4 * KIB));
    for threads in [1, 2] {
        group.bench_function(format!("raw-{threads}"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, &|buf, at| {
                    raw_file.write_all_at(buf, at).expect("raw write")
                })
            })
        });
        group.bench_function(format!("qcow2-{threads}"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, &|buf, at| {
                    image.write_at(buf, at).expect("qcow2 write")
                })
            })
        });
    }
    group.finish();
    image.close().expect("close");
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = read_seq_64k, read_rand_4k, overwrite_64k, overwrite_4k, alloc_write_64k,
        alloc_write_4k, alloc_write_rand_4k, cow_write_4k, reader_threads, writer_threads
}
criterion_main!(benches);
