//! Random write / zero / discard sequences against a plain byte-vector model, over a matrix of
//! create options. After each sequence the image passes `qemu-img check` and `qemu-img compare`
//! finds it identical to the model; our own reads agree too.

use std::path::Path;

use qcow2::{CreateOptions, Image, OpenOptions};
use qcow2_testdata::{qemu_img, require_qemu, scratch_dir};

/// A small deterministic generator (xorshift64*), so failures replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
    Compressed { offset: u64, len: u64, byte: u8 },
    Flush,
    Reopen,
}

fn random_ops(rng: &mut Rng, size: u64, cluster: u64, count: usize) -> Vec<Op> {
    (0..count)
        .map(|_| {
            let aligned = rng.below(2) == 0;
            let offset = if aligned {
                rng.below(size / cluster) * cluster
            } else {
                rng.below(size)
            };
            let max = (size - offset).min(cluster * 3);
            let len = if aligned {
                (cluster * (1 + rng.below(3))).min(size - offset)
            } else {
                1 + rng.below(max)
            };
            match rng.below(10) {
                0..=5 => Op::Write {
                    offset,
                    len,
                    byte: 1 + rng.below(255) as u8,
                },
                6 => Op::Zero {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                },
                7 => Op::Discard { offset, len },
                8 if rng.below(2) == 0 => {
                    let offset = rng.below(size / cluster) * cluster;
                    Op::Compressed {
                        offset,
                        len: cluster.min(size - offset),
                        byte: rng.below(256) as u8,
                    }
                }
                8 => Op::Flush,
                _ => Op::Reopen,
            }
        })
        .collect()
}

/// What a discard does to the model: whole clusters read as zeros afterwards (v3, no backing).
fn apply(model: &mut [u8], op: Op, cluster: u64, size: u64) {
    match op {
        Op::Write { offset, len, byte } => {
            model[offset as usize..(offset + len) as usize].fill(byte)
        }
        Op::Zero { offset, len, .. } => model[offset as usize..(offset + len) as usize].fill(0),
        Op::Discard { offset, len } => {
            let first = offset.next_multiple_of(cluster);
            let end = offset + len;
            let end = if end >= size {
                size
            } else {
                end & !(cluster - 1)
            };
            if first < end {
                model[first as usize..end as usize].fill(0);
            }
        }
        Op::Compressed { offset, len, byte } => model[offset as usize..(offset + len) as usize]
            .copy_from_slice(&compressible(len, byte)),
        Op::Flush | Op::Reopen => {}
    }
}

/// Cluster data that compresses well but differs from cluster to cluster.
fn compressible(len: u64, byte: u8) -> Vec<u8> {
    (0..len)
        .map(|i| byte.wrapping_add((i / 97) as u8))
        .collect()
}

fn run(image: &mut Image, path: &Path, op: Op) {
    match op {
        Op::Write { offset, len, byte } => {
            image.write_at(&vec![byte; len as usize], offset).unwrap()
        }
        Op::Zero { offset, len, unmap } => image.write_zeroes(offset, len, unmap).unwrap(),
        Op::Discard { offset, len } => image.discard(offset, len).unwrap(),
        Op::Compressed { offset, len, byte } => image
            .write_compressed(&compressible(len, byte), offset)
            .unwrap(),
        Op::Flush => image.flush().unwrap(),
        Op::Reopen => {
            // A read-only placeholder would conflict with our own write lock, so swap in an
            // image held in memory while the real one closes.
            let placeholder = Image::create_in(
                Box::new(qcow2::MemoryStorage::new()),
                "placeholder",
                &CreateOptions::new(512),
            )
            .unwrap();
            std::mem::replace(image, placeholder).close().unwrap();
            *image = Image::open(path, &OpenOptions::read_write()).unwrap();
        }
    }
}

fn check_against_qemu(path: &Path, model: &[u8], what: &str) {
    let check = qemu_img(&["check", path.to_str().unwrap()]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    qcow2_testdata::assert_qemu_compare_equal(path, model, what);
    // Sample ranges through qemu-io's pattern check too.
    let mut checked = 0;
    for start in (0..model.len()).step_by(model.len() / 7 + 1) {
        let len = 512.min(model.len() - start);
        let byte = model[start];
        if model[start..start + len].iter().all(|&b| b == byte) {
            let cmd = format!("read -P {byte} {start} {len}");
            let out = qcow2_testdata::qemu_io(&["-r", "-c", &cmd, path.to_str().unwrap()]);
            assert!(
                out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
                "{what}: qemu-io {cmd}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{what}: no uniform range to sample");
}

fn sequence(name: &str, options: CreateOptions, seed: u64, count: usize) {
    sequence_over(name, options, seed, count, None)
}

/// Makes a backing file in a directory and returns its guest content.
type MakeBacking = dyn Fn(&Path) -> Vec<u8>;

/// Like `sequence`, over a backing file: (format, a function making it in the directory).
fn sequence_over(
    name: &str,
    mut options: CreateOptions,
    seed: u64,
    count: usize,
    backing: Option<(&str, &MakeBacking)>,
) {
    require_qemu();
    let dir = scratch_dir(name);
    let path = dir.join("image.qcow2");
    let cluster = options.cluster_size;
    let size = options.size;
    let mut model = vec![0u8; size as usize];
    if let Some((format, make)) = backing {
        let base = make(&dir);
        let n = base.len().min(model.len());
        model[..n].copy_from_slice(&base[..n]);
        options.backing_file = Some(format!("base.{format}"));
        options.backing_format = Some(format.to_string());
    }
    let mut image = Image::create(&path, &options).unwrap();
    let mut rng = Rng(seed);
    for (i, op) in random_ops(&mut rng, size, cluster, count)
        .into_iter()
        .enumerate()
    {
        run(&mut image, &path, op);
        apply(&mut model, op, cluster, size);
        if i % 16 == 15 {
            let mut back = vec![0u8; size as usize];
            image.read_at(&mut back, 0).unwrap();
            assert!(
                back == model,
                "{name}: our read differs from the model after op {i} {op:?}"
            );
        }
    }
    let report = image.check().unwrap();
    assert!(report.is_clean(), "{name}: our check: {report:?}");
    image.close().unwrap();
    // Read-only, the tables are cached in slices: odd-sized reads through a one-slice cache
    // miss and cross slice boundaries all the time, and must agree too.
    let ro = OpenOptions::default().l2_cache_bytes(4096);
    let image = Image::open(&path, &ro).unwrap();
    let pieces = size.div_ceil(3000);
    for k in 0..pieces {
        // A fixed permutation of the pieces (7919 is prime, so it visits each once).
        let start = (k * 7919 % pieces) * 3000;
        let end = (start + 3000).min(size);
        let mut piece = vec![0u8; (end - start) as usize];
        image.read_at(&mut piece, start).unwrap();
        assert!(
            piece[..] == model[start as usize..end as usize],
            "{name}: a read-only read at {start:#x} differs from the model"
        );
    }
    drop(image);
    check_against_qemu(&path, &model, name);
}

fn options(size: u64, cluster: u64) -> CreateOptions {
    CreateOptions::new(size).cluster_size(cluster)
}

#[test]
fn random_sequence_64k_clusters() {
    sequence("seq-64k", options(8 << 20, 65536), 1, 200);
}

#[test]
fn random_sequence_512_byte_clusters_grows_refcount_structures() {
    sequence("seq-512", options(4 << 20, 512), 2, 400);
}

#[test]
fn random_sequence_every_refcount_width() {
    for bits in [1, 2, 4, 8, 32, 64] {
        let o = options(2 << 20, 4096).refcount_bits(bits);
        sequence(&format!("seq-rc{bits}"), o, 3 + bits as u64, 120);
    }
}

#[test]
fn random_sequence_compat_0_10() {
    let o = options(4 << 20, 4096).version(2);
    sequence("seq-v2", o, 9, 150);
}

#[test]
fn random_sequence_extended_l2() {
    let o = options(8 << 20, 65536).extended_l2(true);
    sequence("seq-extl2", o, 10, 200);
}

#[test]
fn random_sequence_lazy_refcounts() {
    let o = options(4 << 20, 4096).lazy_refcounts(true);
    sequence("seq-lazy", o, 11, 150);
}

#[test]
fn random_sequence_2m_clusters() {
    sequence("seq-2m", options(32 << 20, 2 << 20), 12, 60);
}

/// Found by the crash tests: a copy-on-write out of a compressed cluster whose host bytes were
/// freed and reused by another compressed cluster with the same descriptor read the old bytes
/// from the decompression cache.
#[test]
fn cow_out_of_a_compressed_cluster_in_reused_space_reads_the_new_data() {
    let dir = scratch_dir("compressed-reuse");
    let path = dir.join("a.qcow2");
    let image = Image::create(&path, &options(1 << 20, 4096)).unwrap();
    let mut model = vec![0u8; 1 << 20];
    for i in 0..3u64 {
        let data = compressible(4096, i as u8 + 1);
        image.write_compressed(&data, i * 8192).unwrap();
        model[(i * 8192) as usize..(i * 8192 + 4096) as usize].copy_from_slice(&data);
        image.write_at(&[0xEE; 100], i * 8192 + 1000).unwrap();
        model[(i * 8192 + 1000) as usize..(i * 8192 + 1100) as usize].fill(0xEE);
    }
    let mut back = vec![0u8; 1 << 20];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == model);
    image.close().unwrap();
    check_against_qemu(&path, &model, "compressed-reuse");
}

fn base_content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4096) as u8 ^ 0x5a).collect()
}

#[test]
fn random_sequence_over_a_raw_backing_file() {
    let make = |dir: &Path| {
        let data = base_content(3 << 20);
        std::fs::write(dir.join("base.raw"), &data).unwrap();
        data
    };
    sequence_over(
        "seq-over-raw",
        options(4 << 20, 4096),
        21,
        150,
        Some(("raw", &make)),
    );
}

#[test]
fn random_sequence_over_a_qcow2_backing_file() {
    let make = |dir: &Path| {
        let data = base_content(4 << 20);
        let raw = dir.join("base.src");
        std::fs::write(&raw, &data).unwrap();
        let base = dir.join("base.qcow2");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16384",
            raw.to_str().unwrap(),
            base.to_str().unwrap(),
        ]);
        data
    };
    sequence_over(
        "seq-over-qcow2",
        options(6 << 20, 65536),
        22,
        150,
        Some(("qcow2", &make)),
    );
}
