//! Several threads write and read one `Image` at once: in-place overwrites run under the shared
//! metadata lock, allocations, zero writes, discards, flushes and snapshots under the exclusive
//! one. Each writer owns its own clusters (so the final content is known whatever the
//! interleaving) and checks every read of them against its model while the others write; a
//! further thread reads everything, flushes and takes snapshots, which turns owned clusters into
//! shared ones under the writers' feet. After joining, the image equals the merged model, our
//! check finds nothing, and qemu-img agrees (check clean, compare equal to a raw copy).
//!
//! Power cuts under the same kind of load are in `crash.rs`
//! (`crash_during_concurrent_writers_and_snapshots`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qcow2::{CreateOptions, Image, OpenOptions, SnapshotTime};

const WRITERS: u64 = 4;
const CLUSTER: u64 = 4096;
const SIZE: u64 = 4 << 20;

/// A small deterministic generator per thread (no shared state, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Guest clusters of writer `t`: every WRITERS-th one, so neighbours belong to other threads
/// and share L2 tables and refcount blocks with them.
fn owned(t: u64, i: u64) -> u64 {
    (i * WRITERS + t) * CLUSTER
}

fn writer(image: &Image, t: u64, ops: usize) -> Vec<u8> {
    let clusters = SIZE / CLUSTER / WRITERS;
    let mut model = vec![0u8; (clusters * CLUSTER) as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * 0x1234_5678));
    let mut buf = vec![0u8; CLUSTER as usize];
    for op in 0..ops {
        let i = rng.below(clusters);
        let guest = owned(t, i);
        let local = (i * CLUSTER) as usize;
        let start = rng.below(CLUSTER) as usize;
        let len = 1 + rng.below(CLUSTER - start as u64) as usize;
        match rng.below(10) {
            0 => {
                image
                    .write_zeroes(guest + start as u64, len as u64, op % 2 == 0)
                    .unwrap();
                model[local + start..local + start + len].fill(0);
            }
            1 => {
                image.discard(guest, CLUSTER).unwrap();
                model[local..local + CLUSTER as usize].fill(0);
            }
            2..=3 => {
                image.read_at(&mut buf, guest).unwrap();
                let expected = &model[local..local + CLUSTER as usize];
                if let Some(i) = buf.iter().zip(expected).position(|(a, b)| a != b) {
                    panic!(
                        "writer {t}: byte {:#x} reads {:#x}, written {:#x} (op {op})",
                        guest + i as u64,
                        buf[i],
                        expected[i]
                    );
                }
            }
            _ => {
                let byte = (op as u8).wrapping_mul(7).wrapping_add(t as u8) | 1;
                image
                    .write_at(&vec![byte; len], guest + start as u64)
                    .unwrap();
                model[local + start..local + start + len].fill(byte);
            }
        }
    }
    model
}

/// The writers' models merged into the guest view.
fn merge(models: &[Vec<u8>]) -> Vec<u8> {
    let mut disk = vec![0u8; SIZE as usize];
    for (t, model) in models.iter().enumerate() {
        for (i, chunk) in model.chunks(CLUSTER as usize).enumerate() {
            let at = owned(t as u64, i as u64) as usize;
            disk[at..at + CLUSTER as usize].copy_from_slice(chunk);
        }
    }
    disk
}

#[test]
fn writers_readers_flushes_and_snapshots_on_threads_match_the_model_and_qemu() {
    let dir = qcow2_testdata::scratch_dir("concurrent-model");
    let path = dir.join("threads.qcow2");
    let options = CreateOptions::default().size(SIZE).cluster_size(CLUSTER);
    let image = Arc::new(Image::create(&path, &options).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let ops = if cfg!(debug_assertions) { 3000 } else { 20000 };
    let models = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let image = &image;
                s.spawn(move || writer(image, t, ops))
            })
            .collect();
        let (image, done) = (&image, &done);
        let other = s.spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut rng = Rng(42);
            let mut snapshots = 0;
            while !done.load(Ordering::Acquire) {
                let at = rng.below(SIZE / buf.len() as u64) * buf.len() as u64;
                image.read_at(&mut buf, at).unwrap();
                match rng.below(50) {
                    0 => image.flush().unwrap(),
                    1 if snapshots < 8 => {
                        image
                            .create_snapshot(&format!("s{snapshots}"), SnapshotTime::now())
                            .unwrap();
                        snapshots += 1;
                    }
                    _ => {}
                }
            }
            snapshots
        });
        // Joined all before unwrapping: a writer that failed must still stop the reader.
        let joined: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::Release);
        let models: Vec<Vec<u8>> = joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        let snapshots = other.join().unwrap();
        assert!(snapshots > 0, "no snapshot was taken while the writers ran");
        models
    });
    let expected = merge(&models);
    let mut content = vec![0u8; SIZE as usize];
    image.read_at(&mut content, 0).unwrap();
    let first_difference = content.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the image differs from the model");
    let report = image.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.messages);
    Arc::into_inner(image).unwrap().close().unwrap();

    // QEMU reads the same bytes and finds nothing to repair.
    let (code, json) = qcow2_testdata::qemu_check(&path);
    assert_eq!(code, 0, "qemu-img check: {json}");
    let raw = dir.join("model.raw");
    std::fs::write(&raw, &expected).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Reopened, the image still reads as the model.
    let reopened = Image::open(&path, &OpenOptions::default()).unwrap();
    reopened.read_at(&mut content, 0).unwrap();
    assert!(content == expected, "reopened image differs from the model");
}
