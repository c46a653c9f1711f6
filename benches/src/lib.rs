//! Fixtures and helpers shared by the benches.
//!
//! Every fixture is made by code here, the same way every time: deterministic data (a hash of the
//! byte offset), written in the same order through the engine, so two runs measure the same host
//! layout. Fixtures live in `$QCOW2_BENCH_DIR`, else `benches/target/bench-fixtures`, under a
//! version directory ([`FIXTURE_VERSION`]); each is built under a temporary name and renamed into
//! place, so an interrupted build is never reused, and a finished one is reused by later runs.
//!
//! Allocating-write targets ([`AllocTarget`]) follow the measurement advice: the host file
//! is reserved with one `fallocate` and written to its full length once, then [`AllocTarget::reset`] writes a freshly created
//! image's metadata (header, refcount table, refcount block, L1) back over its head. The engine
//! then allocates into clusters that are free by refcount but already written and cached on the
//! host, so a run measures the engine's allocation path, not the host's page allocator.

use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qcow2::format::CompressionType;
use qcow2::{CreateOptions, Image, OpenOptions};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// The cluster size of every fixture (QEMU's default).
pub const CLUSTER: u64 = 64 * KIB;
/// Bump when a fixture's recipe changes, so old fixtures are not reused.
pub const FIXTURE_VERSION: u32 = 2;
/// Size of the compressed images: compressing a whole GiB would dominate fixture time.
pub const COMPRESSED_SIZE: u64 = 64 * MIB;
/// Size of each image of the group-transaction bench.
pub const GROUP_IMAGE_SIZE: u64 = 256 * MIB;
/// Buffers start on a page boundary (16-byte alignment reads measurably slower).
pub const BUFFER_ALIGN: usize = 4096;
/// Chunk size used to write fixtures.
const FILL_CHUNK: u64 = MIB;

/// Where fixtures go.
pub fn fixture_dir() -> PathBuf {
    let base = match std::env::var_os("QCOW2_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-fixtures"),
    };
    base.join(format!("v{FIXTURE_VERSION}"))
}

/// Whether the 4 and 16 GiB snapshot fixtures are wanted (`QCOW2_BENCH_BIG=1`).
pub fn big_enabled() -> bool {
    std::env::var("QCOW2_BENCH_BIG").is_ok_and(|v| v == "1")
}

/// splitmix64: a fast, well-mixed hash of a counter.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Incompressible bytes determined by their guest offset (`offset` must be 8-aligned).
pub fn fill_random(buf: &mut [u8], offset: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let v = splitmix64((offset >> 3) + i as u64).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// Bytes that compress about 4:1, determined by their guest offset (8-aligned): one word in
/// four is random, the others repeat the 4 KiB block number.
pub fn fill_compressible(buf: &mut [u8], offset: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let at = offset + 8 * i as u64;
        let v = if (at >> 3) % 4 == 0 {
            splitmix64(at >> 3)
        } else {
            at >> 12
        };
        word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
    }
}

/// `count` offsets, multiples of `align`, spread over `[0, span)` by a fixed hash sequence.
pub fn random_offsets(count: usize, span: u64, align: u64, seed: u64) -> Vec<u64> {
    let slots = span / align;
    (0..count as u64)
        .map(|i| (splitmix64(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d)) % slots) * align)
        .collect()
}

/// Offsets `0, step, 2*step, ...` below `span`.
pub fn sequential_offsets(span: u64, step: u64) -> Vec<u64> {
    (0..span / step).map(|i| i * step).collect()
}

/// Cycles through a list of offsets.
pub struct Cycle<'a> {
    offsets: &'a [u64],
    next: usize,
}

impl<'a> Cycle<'a> {
    pub fn new(offsets: &'a [u64]) -> Self {
        Cycle { offsets, next: 0 }
    }

    /// The next offset, and whether the list just wrapped (the next call starts over).
    pub fn next_offset(&mut self) -> (u64, bool) {
        let at = self.offsets[self.next];
        self.next += 1;
        let wrapped = self.next == self.offsets.len();
        if wrapped {
            self.next = 0;
        }
        (at, wrapped)
    }
}

/// A `len`-byte buffer starting on a [`BUFFER_ALIGN`] boundary, carved out of a larger
/// allocation without unsafe code.
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, fill: u8) -> AlignedBuf {
        let bytes = vec![fill; len + BUFFER_ALIGN];
        let start = (BUFFER_ALIGN - bytes.as_ptr() as usize % BUFFER_ALIGN) % BUFFER_ALIGN;
        AlignedBuf { bytes, start, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

fn io_err(e: qcow2::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Builds `name` in the fixture directory once: `build` writes a temporary path that is renamed
/// into place when it succeeds.
fn make_once(name: &str, build: impl FnOnce(&Path) -> io::Result<()>) -> PathBuf {
    let dir = fixture_dir();
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(name);
    if path.exists() {
        return path;
    }
    let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    eprintln!("making bench fixture {}", path.display());
    build(&tmp).unwrap_or_else(|e| panic!("make {}: {e}", path.display()));
    fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
    path
}

/// Writes `[start, end)` of a new image through the engine, in order, with `fill`.
fn write_range(image: &Image, start: u64, end: u64, fill: fn(&mut [u8], u64)) -> io::Result<()> {
    let mut buf = AlignedBuf::new(FILL_CHUNK as usize, 0);
    let mut at = start;
    while at < end {
        let len = FILL_CHUNK.min(end - at) as usize;
        fill(&mut buf.as_mut_slice()[..len], at);
        image.write_at(&buf.as_slice()[..len], at).map_err(io_err)?;
        at += len as u64;
    }
    Ok(())
}

fn create_options(size: u64) -> CreateOptions {
    CreateOptions::new(size).cluster_size(CLUSTER)
}

fn size_name(size: u64) -> String {
    if size % GIB == 0 {
        format!("{}G", size / GIB)
    } else {
        format!("{}M", size / MIB)
    }
}

/// A qcow2 image of `size` bytes (64 KiB clusters), every cluster written with
/// [`fill_random`] in guest order.
pub fn allocated(size: u64) -> PathBuf {
    make_once(&format!("allocated-{}.qcow2", size_name(size)), |tmp| {
        let image = Image::create(tmp, &create_options(size)).map_err(io_err)?;
        write_range(&image, 0, size, fill_random)?;
        image.close().map_err(io_err)
    })
}

/// A raw file with the same guest bytes as [`allocated`], written the way the engine writes the
/// image's data: one pwrite per 64 KiB cluster. (How a file was filled decides the host page
/// cache's folio sizes, which changes 4K read and write speed by a third.)
pub fn raw(size: u64) -> PathBuf {
    make_once(&format!("data-{}.raw", size_name(size)), |tmp| {
        let file = File::create(tmp)?;
        let mut buf = AlignedBuf::new(CLUSTER as usize, 0);
        for at in (0..size).step_by(CLUSTER as usize) {
            fill_random(buf.as_mut_slice(), at);
            file.write_all_at(buf.as_slice(), at)?;
        }
        file.sync_all()
    })
}

/// [`allocated`] with one enabled persistent bitmap (`b0`, 64 KiB granularity) added before the
/// data was written, so every granule's bit is set: writes into it cost what a write into a dirty
/// granule costs, with no first-touch syncs in the fixture's history.
pub fn allocated_with_bitmap(size: u64) -> PathBuf {
    make_once(
        &format!("allocated-bitmap-{}.qcow2", size_name(size)),
        |tmp| {
            let image = Image::create(tmp, &create_options(size)).map_err(io_err)?;
            image.add_bitmap("b0", 64 * KIB, false).map_err(io_err)?;
            write_range(&image, 0, size, fill_random)?;
            image.close().map_err(io_err)
        },
    )
}

/// A sparse raw file of `size` bytes (the raw analogue of an empty image).
pub fn sparse_raw(size: u64) -> PathBuf {
    make_once(&format!("sparse-{}.raw", size_name(size)), |tmp| {
        File::create(tmp)?.set_len(size)
    })
}

/// A new, empty qcow2 image of `size` bytes.
pub fn empty(size: u64) -> PathBuf {
    make_once(&format!("empty-{}.qcow2", size_name(size)), |tmp| {
        Image::create(tmp, &create_options(size))
            .map_err(io_err)?
            .close()
            .map_err(io_err)
    })
}

/// A new copy of the fixture at `source` under `name`, made on every call: benches that compare
/// two images start both from a copy with the same history (a copy reused between runs keeps
/// whatever the last run's syncs and writes did to its page cache and extents).
pub fn fresh_copy(source: &Path, name: &str) -> PathBuf {
    let path = fixture_dir().join(name);
    let _ = fs::remove_file(&path);
    fs::copy(source, &path).unwrap_or_else(|e| panic!("copy to {}: {e}", path.display()));
    path
}

/// A copy of the fixture at `source` under `name`, for benches that write to it. It is reused
/// between runs: overwrites change its bytes, never its layout.
pub fn writable_copy(source: &Path, name: &str) -> PathBuf {
    make_once(name, |tmp| fs::copy(source, tmp).map(|_| ()))
}

/// A [`COMPRESSED_SIZE`] image whose every cluster is compressed with `kind`, holding
/// [`fill_compressible`] bytes.
pub fn compressed(kind: CompressionType) -> PathBuf {
    let label = match kind {
        CompressionType::Zlib => "zlib",
        _ => "zstd",
    };
    make_once(
        &format!("{label}-{}.qcow2", size_name(COMPRESSED_SIZE)),
        |tmp| {
            let options = create_options(COMPRESSED_SIZE).compression_type(kind);
            let image = Image::create(tmp, &options).map_err(io_err)?;
            let mut buf = AlignedBuf::new(CLUSTER as usize, 0);
            for at in (0..COMPRESSED_SIZE).step_by(CLUSTER as usize) {
                fill_compressible(buf.as_mut_slice(), at);
                image.write_compressed(buf.as_slice(), at).map_err(io_err)?;
            }
            image.close().map_err(io_err)
        },
    )
}

/// The bytes of [`compressed`] images, for checking reads and for the raw baseline.
pub fn compressible_raw() -> PathBuf {
    make_once(
        &format!("compressible-{}.raw", size_name(COMPRESSED_SIZE)),
        |tmp| {
            let file = File::create(tmp)?;
            let mut buf = AlignedBuf::new(FILL_CHUNK as usize, 0);
            for at in (0..COMPRESSED_SIZE).step_by(FILL_CHUNK as usize) {
                fill_compressible(buf.as_mut_slice(), at);
                file.write_all_at(buf.as_slice(), at)?;
            }
            file.sync_all()
        },
    )
}

/// A 3-deep chain over the 1 GiB [`allocated`] image: `chain-mid` holds every fourth cluster
/// (index ≡ 1 mod 4), `chain-top` the clusters with index ≡ 2 mod 4; the other half of the
/// clusters read from the base through two unallocated layers. Returns the top.
pub fn chain() -> PathBuf {
    let base = allocated(GIB);
    let base_name = base.file_name().expect("file name").to_string_lossy();
    let overlay = |name: &str, backing: String, residue: u64| {
        make_once(name, |tmp| {
            // The overlay names its backing file relative to its own directory.
            let options = create_options(GIB)
                .backing_file(Some(backing))
                .backing_format(Some("qcow2".into()));
            let image = Image::create(tmp, &options).map_err(io_err)?;
            let mut buf = AlignedBuf::new(CLUSTER as usize, 0);
            for at in (residue * CLUSTER..GIB).step_by(4 * CLUSTER as usize) {
                // Different bytes from the base, so a read from the wrong layer is visible.
                fill_random(buf.as_mut_slice(), at ^ (residue << 40));
                image.write_at(buf.as_slice(), at).map_err(io_err)?;
            }
            image.close().map_err(io_err)
        })
    };
    let mid = overlay("chain-mid.qcow2", base_name.into_owned(), 1);
    let mid_name = mid.file_name().expect("file name").to_string_lossy();
    overlay("chain-top.qcow2", mid_name.into_owned(), 2)
}

/// Reserves `len` bytes of blocks for `file` in one `fallocate` call.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len as i64)
        .map_err(io::Error::from)
}

/// A host file that an allocating-write bench writes into, and the metadata of a fresh image
/// that [`AllocTarget::reset`] puts back.
pub struct AllocTarget {
    pub path: PathBuf,
    fresh: Vec<u8>,
}

impl AllocTarget {
    /// A target of guest size `size` (64 KiB clusters), with `backing` as its backing file
    /// (a name in the fixture directory) when given. The host file is written to its full
    /// length once; the target starts reset.
    pub fn new(name: &str, size: u64, backing: Option<&Path>) -> AllocTarget {
        let options = create_options(size)
            .backing_file(backing.map(|b| {
                b.file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned()
            }))
            .backing_format(backing.map(|_| "qcow2".into()));
        let fresh_path = make_once(&format!("{name}.fresh"), |tmp| {
            Image::create(tmp, &options)
                .map_err(io_err)?
                .close()
                .map_err(io_err)
        });
        let fresh = fs::read(&fresh_path).expect("read the fresh image");
        // Data clusters, L2 tables, and slack for refcount growth.
        let host_len = fresh.len() as u64 + size + 64 * MIB;
        // The file's blocks are reserved in one call first, so it has a few extents, as the raw
        // baseline file does: filled in place without that, it had thousands, and 64K writes into
        // it ran at 70% of the raw file's speed (ext4 maps every written page).
        let path = make_once(name, |tmp| {
            let file = File::create(tmp)?;
            preallocate(&file, host_len)?;
            let mut buf = AlignedBuf::new(FILL_CHUNK as usize, 0);
            for at in (0..host_len).step_by(FILL_CHUNK as usize) {
                fill_random(buf.as_mut_slice(), at ^ (7 << 40));
                file.write_all_at(buf.as_slice(), at)?;
            }
            file.sync_all()
        });
        let target = AllocTarget { path, fresh };
        target.reset();
        target
    }

    /// Puts the fresh image's metadata back: every guest cluster is unallocated again and every
    /// host cluster past the metadata is free, but still written.
    pub fn reset(&self) {
        let file = FsOpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path.display()));
        file.write_all_at(&self.fresh, 0)
            .unwrap_or_else(|e| panic!("reset {}: {e}", self.path.display()));
    }

    /// Opens the target for writing.
    pub fn open(&self) -> Image {
        Image::open(&self.path, &OpenOptions::read_write())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path.display()))
    }
}

/// Opens a qcow2 fixture read-only with `l2_cache_bytes` of L2 cache.
pub fn open_ro(path: &Path, l2_cache_bytes: u64) -> Image {
    let options = OpenOptions::default().l2_cache_bytes(l2_cache_bytes);
    Image::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Opens a qcow2 fixture for writing.
pub fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::read_write())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Opens a raw file for reading, or for reading and writing.
pub fn open_raw(path: &Path, writable: bool) -> File {
    FsOpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_deterministic_and_offset_dependent() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        fill_random(&mut a, 4096);
        fill_random(&mut b, 4096);
        assert_eq!(a, b);
        fill_random(&mut b, 8192);
        assert_ne!(a, b);
        let mut c = vec![0u8; 64];
        fill_random(&mut c[..32], 4096);
        fill_random(&mut c[32..], 4096 + 32);
        assert_eq!(a, c, "a chunked fill equals a whole one");
    }

    #[test]
    fn random_offsets_are_aligned_and_in_range() {
        let offsets = random_offsets(1000, GIB, 4096, 1);
        assert!(offsets.iter().all(|&o| o % 4096 == 0 && o < GIB));
        assert_eq!(offsets, random_offsets(1000, GIB, 4096, 1));
    }

    #[test]
    fn aligned_buffers_start_on_a_page() {
        let b = AlignedBuf::new(4096, 1);
        assert_eq!(b.as_slice().as_ptr() as usize % BUFFER_ALIGN, 0);
    }
}
