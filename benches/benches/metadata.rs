//! Metadata operations: internal snapshot create and delete against allocated size (1 GiB; 4 and
//! 16 GiB with `QCOW2_BENCH_BIG=1`), and a 4-image group snapshot transaction.
//!
//! Throughput is the allocated guest bytes the operation covers, so the figure reads as
//! "allocated GiB snapshotted per second". The raw baseline is the least I/O a durable snapshot
//! needs: rewriting every refcount block that counts the allocated clusters (16-bit refcounts,
//! 2 bytes per cluster) and one fdatasync. The group bench compares four images in one
//! transaction with one image's snapshot (the target: within 10%) and with four raw
//! files each rewritten and synced likewise.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow2::format::SnapshotTime;
use qcow2_benches::*;
use qcow2_transaction::{Action, Group};

/// The refcount bytes of `size` allocated bytes: what every snapshot must at least rewrite.
fn refcount_bytes(size: u64) -> usize {
    (size / CLUSTER * 2) as usize
}

/// The raw baseline: one pwrite of the refcount bytes per file, then fdatasync of each.
fn raw_durable_rewrite(files: &[std::fs::File], bytes: &[u8]) {
    for file in files {
        file.write_all_at(bytes, 0).expect("raw write");
    }
    for file in files {
        file.sync_data().expect("raw sync");
    }
}

fn snapshot_time() -> SnapshotTime {
    SnapshotTime {
        secs: 1_700_000_000,
        nanos: 0,
    }
}

fn snapshots(c: &mut Criterion) {
    let mut sizes = vec![GIB];
    if big_enabled() {
        sizes.extend([4 * GIB, 16 * GIB]);
    }
    for size in sizes {
        let label = format!("{}G", size / GIB);
        let path = writable_copy(&allocated(size), &format!("snapshot-{label}.qcow2"));
        let raw_file = open_raw(&writable_copy(&raw(GIB), "overwrite-1G.raw"), true);
        let image = open_rw(&path);
        // A run interrupted between create and delete leaves a snapshot: start clean.
        while let Some(s) = image.snapshot_entries().first() {
            let id = String::from_utf8_lossy(&s.id).into_owned();
            image
                .delete_snapshot(&id)
                .expect("delete a leftover snapshot");
        }
        let refcounts = vec![0u8; refcount_bytes(size)];

        let mut group = c.benchmark_group(format!("snapshot-{label}"));
        group.throughput(Throughput::Bytes(size));
        group.bench_function("raw", |b| {
            b.iter(|| raw_durable_rewrite(std::slice::from_ref(&raw_file), &refcounts))
        });
        group.bench_function("create", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    image
                        .create_snapshot("bench", snapshot_time())
                        .expect("create");
                    total += started.elapsed();
                    image.delete_snapshot("bench").expect("delete");
                }
                total
            })
        });
        group.bench_function("delete", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    image
                        .create_snapshot("bench", snapshot_time())
                        .expect("create");
                    let started = Instant::now();
                    image.delete_snapshot("bench").expect("delete");
                    total += started.elapsed();
                }
                total
            })
        });
        group.finish();
        image.close().expect("close");
    }
}

fn internal(images: &[PathBuf], create: bool) -> Vec<Action> {
    images
        .iter()
        .map(|image| {
            let (image, name) = (image.clone(), "bench".to_string());
            if create {
                Action::InternalCreate { image, name }
            } else {
                Action::InternalDelete { image, name }
            }
        })
        .collect()
}

fn group_transaction(c: &mut Criterion) {
    let source = allocated(GROUP_IMAGE_SIZE);
    let images: Vec<PathBuf> = (0..4)
        .map(|i| writable_copy(&source, &format!("group-{i}.qcow2")))
        .collect();
    let raw_source = raw(GIB);
    let raw_files: Vec<std::fs::File> = (0..4)
        .map(|i| open_raw(&writable_copy(&raw_source, &format!("group-{i}.raw")), true))
        .collect();
    let dir = fixture_dir().join("group");
    let mut txn = Group::open(&dir).expect("open the group");
    // Leftovers of an interrupted run.
    for image in &images {
        if open_rw(image).find_snapshot("bench").is_some() {
            txn.run(&internal(std::slice::from_ref(image), false))
                .expect("delete a leftover snapshot");
        }
    }
    let refcounts = vec![0u8; refcount_bytes(GROUP_IMAGE_SIZE)];
    let timed_pair = |txn: &mut Group, list: &[PathBuf], iters: u64| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let started = Instant::now();
            txn.run(&internal(list, true)).expect("group create");
            total += started.elapsed();
            txn.run(&internal(list, false)).expect("group delete");
        }
        total
    };

    let mut group = c.benchmark_group("group-snapshot-256M");
    // Each function's throughput is the allocated bytes it covers; compare times, not rates,
    // against the one-image figure.
    group.throughput(Throughput::Bytes(4 * GROUP_IMAGE_SIZE));
    group.bench_function("raw-4", |b| {
        b.iter(|| raw_durable_rewrite(&raw_files, &refcounts))
    });
    group.throughput(Throughput::Bytes(GROUP_IMAGE_SIZE));
    group.bench_function("qcow2-1-image", |b| {
        b.iter_custom(|iters| timed_pair(&mut txn, &images[..1], iters))
    });
    group.throughput(Throughput::Bytes(4 * GROUP_IMAGE_SIZE));
    group.bench_function("qcow2-4-images", |b| {
        b.iter_custom(|iters| timed_pair(&mut txn, &images, iters))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = snapshots, group_transaction
}
criterion_main!(benches);
