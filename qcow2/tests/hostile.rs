//! The hostile corpus (`testdata/hostile/`, built by `testdata/make-hostile.py`): every image is
//! answered with a typed error that names the structure and its offset, and never with a panic, a
//! hang or an allocation beyond the limits.
//!
//! The expectations live in [`CASES`], which must agree with `testdata/hostile/expected.tsv`; each
//! corpus file has its own `#[test]` that checks its case (plus a word of the reason).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qcow2::{ChainProblem, Error, Image, OpenOptions};
use qcow2_testdata::{qemu_img_ok, scratch_dir};

/// When the error appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Open,
    /// Opening works; reading the whole disk fails.
    Read,
    /// Opening works; opening this snapshot fails.
    Snapshot(&'static str),
}

/// Which error variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Corrupt,
    Unsupported,
    ChainLoop,
    ChainMissing,
}

/// One row of `expected.tsv`.
#[derive(Debug, Clone, Copy)]
struct Case {
    file: &'static str,
    when: When,
    kind: Kind,
    /// A substring of the error's `structure` (empty for chain and I/O errors).
    structure: &'static str,
    offset: Option<u64>,
}

const fn case(
    file: &'static str,
    when: When,
    kind: Kind,
    structure: &'static str,
    offset: Option<u64>,
) -> Case {
    Case {
        file,
        when,
        kind,
        structure,
        offset,
    }
}

use Kind::*;
use When::*;

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Header fields.
    case("bad-magic.qcow2", Open, Corrupt, "header field magic", Some(0x0)),
    case("version-1.qcow2", Open, Unsupported, "header field version", Some(0x4)),
    case("version-4.qcow2", Open, Unsupported, "header field version", Some(0x4)),
    case("cluster-bits-8.qcow2", Open, Corrupt, "header field cluster_bits", Some(0x14)),
    case("cluster-bits-22.qcow2", Open, Corrupt, "header field cluster_bits", Some(0x14)),
    case("l1-size-over-32mib.qcow2", Open, Corrupt, "header field l1_size", Some(0x24)),
    case("l1-size-at-limit-past-eof.qcow2", Open, Corrupt, "header field l1_table_offset", Some(0x28)),
    case("l1-size-too-small.qcow2", Open, Corrupt, "header field l1_size", Some(0x24)),
    case("l1-offset-unaligned.qcow2", Open, Corrupt, "header field l1_table_offset", Some(0x28)),
    case("l1-offset-beyond-eof.qcow2", Open, Corrupt, "header field l1_table_offset", Some(0x28)),
    case("reftable-offset-unaligned.qcow2", Open, Corrupt, "header field refcount_table_offset", Some(0x30)),
    case("reftable-offset-beyond-eof.qcow2", Open, Corrupt, "header field refcount_table_offset", Some(0x30)),
    case("reftable-offset-zero.qcow2", Open, Corrupt, "header field refcount_table_offset", Some(0x30)),
    case("reftable-clusters-zero.qcow2", Open, Corrupt, "header field refcount_table_clusters", Some(0x38)),
    case("reftable-clusters-huge.qcow2", Open, Corrupt, "header field refcount_table_clusters", Some(0x38)),
    case("refcount-order-7.qcow2", Open, Corrupt, "header field refcount_order", Some(0x60)),
    case("header-length-100.qcow2", Open, Corrupt, "header field header_length", Some(0x64)),
    case("header-length-over-cluster.qcow2", Open, Corrupt, "header field header_length", Some(0x64)),
    case("nb-snapshots-100000.qcow2", Open, Corrupt, "header field nb_snapshots", Some(0x3c)),
    case("snapshots-offset-beyond-eof.qcow2", Open, Corrupt, "header field snapshots_offset", Some(0x40)),
    case("crypt-method-1.qcow2", Open, Corrupt, "header field l1_table_offset", Some(0x28)),
    case("crypt-method-2.qcow2", Open, Corrupt, "header field crypt_method", Some(0x20)),
    case("incompat-bit-5.qcow2", Open, Unsupported, "header field incompatible_features", Some(0x48)),
    case("compression-type-2.qcow2", Open, Unsupported, "header field compression_type", Some(0x68)),
    case("compression-bit-without-type.qcow2", Open, Corrupt, "header field compression_type", Some(0x68)),
    case("virtual-size-2-63.qcow2", Open, Corrupt, "header field size", Some(0x18)),
    // Header extensions.
    case("ext-past-cluster.qcow2", Open, Corrupt, "header extension 0x12345678", Some(0x70)),
    case("ext-bitmaps-wrong-length.qcow2", Open, Corrupt, "bitmaps extension", Some(0x70)),
    case("ext-backing-format-20-bytes.qcow2", Open, Corrupt, "backing format extension", Some(0x70)),
    case("ext-encryption.qcow2", Open, Corrupt, "full disk encryption extension", Some(0x70)),
    // L1 entries.
    case("l1-entry-at-l1.qcow2", Read, Corrupt, "L1 entry 0", Some(0x600)),
    case("l1-entry-at-reftable.qcow2", Read, Corrupt, "L1 entry 0", Some(0x600)),
    case("l1-entry-beyond-eof.qcow2", Read, Corrupt, "L1 entry 0", Some(0x600)),
    case("l1-entry-unaligned.qcow2", Read, Corrupt, "L1 entry 0", Some(0xc00)),
    case("l1-entry-reserved-bits.qcow2", Read, Corrupt, "L1 entry 0", Some(0x600)),
    // L2 entries.
    case("l2-data-overlaps-l1.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("l2-data-beyond-eof.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("l2-data-unaligned.qcow2", Read, Corrupt, "L2 entry 0", Some(0x1000)),
    case("l2-reserved-bits.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("l2-zero-flag-v2.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("compressed-beyond-eof.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("compressed-into-header.qcow2", Read, Corrupt, "L2 entry 0", Some(0x800)),
    case("compressed-garbage.qcow2", Read, Corrupt, "compressed cluster", Some(0xa00)),
    // Extended L2.
    case("extl2-alloc-and-zero.qcow2", Read, Corrupt, "L2 entry 0", Some(0x8000)),
    case("extl2-alloc-unallocated.qcow2", Read, Corrupt, "L2 entry 0", Some(0x8000)),
    // Snapshot table.
    case("snapshot-extra-data-2000.qcow2", Open, Corrupt, "snapshot table entry 0", Some(0xa00)),
    case("snapshot-name-past-eof.qcow2", Open, Corrupt, "snapshot table entry 0", Some(0xa00)),
    case("snapshot-l1-unaligned.qcow2", Snapshot("unaligned"), Corrupt, "L1 table of snapshot 1", Some(0x610)),
    case("snapshot-disk-size-huge.qcow2", Snapshot("huge"), Corrupt, "L1 table of snapshot 1", Some(0xa00)),
    case("snapshot-table-over-reftable.qcow2", Open, Corrupt, "snapshot table", Some(0x200)),
    // Truncated files.
    case("truncated-0.qcow2", Open, Corrupt, "header", Some(0x0)),
    case("truncated-50.qcow2", Open, Corrupt, "header", Some(0x0)),
    case("truncated-header-cluster.qcow2", Open, Corrupt, "header field l1_table_offset", Some(0x28)),
    // Backing chains.
    case("backing-self.qcow2", Open, ChainLoop, "", None),
    case("backing-loop-a.qcow2", Open, ChainLoop, "", None),
    case("backing-loop-b.qcow2", Open, ChainLoop, "", None),
    case("backing-missing.qcow2", Open, ChainMissing, "", None),
];

/// No corpus image may take longer than this to open, read and check.
const WATCHDOG: Duration = Duration::from_secs(10);

/// Reads are capped at this many guest bytes (every corpus image is far smaller; the cap keeps a
/// regression from allocating a huge buffer).
const MAX_READ: u64 = 64 << 20;

fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/hostile");
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn corpus_path(file: &str) -> PathBuf {
    corpus_dir().join(file)
}

fn find_case(file: &str) -> Case {
    *CASES
        .iter()
        .find(|c| c.file == file)
        .unwrap_or_else(|| panic!("{file} is not in CASES"))
}

/// Reads all guest bytes (up to [`MAX_READ`]) in one request.
fn read_whole_disk(image: &Image) -> qcow2::Result<()> {
    let mut buf = vec![0u8; image.size().min(MAX_READ) as usize];
    image.read_at(&mut buf, 0)
}

/// Runs `check` and only requires it to return: on a hostile image it may report problems or
/// fail with an error, but must not panic.
fn check_returns(image: &Image) {
    let _ = image.check();
}

/// Produces the error the case expects, following `when`.
fn provoke(case: &Case) -> Error {
    let path = corpus_path(case.file);
    let opened = Image::open(&path, &OpenOptions::default());
    match case.when {
        When::Open => match opened {
            Ok(image) => panic!("{}: opened ({image:?}), expected an error", case.file),
            Err(e) => e,
        },
        When::Read => {
            let image = opened.unwrap_or_else(|e| panic!("{}: open failed: {e}", case.file));
            let err = match read_whole_disk(&image) {
                Ok(()) => panic!("{}: the whole disk read without an error", case.file),
                Err(e) => e,
            };
            check_returns(&image);
            err
        }
        When::Snapshot(name) => {
            let image = opened.unwrap_or_else(|e| panic!("{}: open failed: {e}", case.file));
            read_whole_disk(&image)
                .unwrap_or_else(|e| panic!("{}: active layer read failed: {e}", case.file));
            let err = match image.open_snapshot(name) {
                Ok(view) => panic!(
                    "{}: snapshot {name} opened ({:?}), expected an error",
                    case.file,
                    view.entry()
                ),
                Err(e) => e,
            };
            check_returns(&image);
            err
        }
    }
}

/// Checks the error of `file` against its case: variant, structure, offset, the message (image
/// name and hex offset) and a word of the reason.
fn expect_case(file: &str, reason_word: &str) {
    let case = find_case(file);
    let err = provoke(&case);
    let message = err.to_string();
    let path = corpus_path(file);
    let (image, structure, offset, reason) = match (&err, case.kind) {
        (
            Error::Corrupt {
                image,
                structure,
                offset,
                reason,
            },
            Kind::Corrupt,
        )
        | (
            Error::Unsupported {
                image,
                structure,
                offset,
                what: reason,
            },
            Kind::Unsupported,
        ) => (image, structure, offset, reason),
        _ => panic!("{file}: expected {:?}, got {err:?} ({message})", case.kind),
    };
    assert_eq!(
        Path::new(image),
        path,
        "{file}: error names the wrong image: {message}"
    );
    assert!(
        structure.contains(case.structure),
        "{file}: structure {structure:?} does not contain {:?}: {message}",
        case.structure
    );
    let expected_offset = case.offset.expect("format errors have an offset");
    assert_eq!(
        *offset, expected_offset,
        "{file}: offset {offset:#x}, expected {expected_offset:#x}: {message}"
    );
    assert!(
        message.contains(file),
        "{file}: message does not name the image: {message}"
    );
    assert!(
        message.contains(&format!("{expected_offset:#x}")),
        "{file}: message does not give the offset {expected_offset:#x}: {message}"
    );
    assert!(
        reason.contains(reason_word),
        "{file}: reason {reason:?} does not contain {reason_word:?}: {message}"
    );
}

/// Checks a backing-chain case: the image whose backing file closes the loop (`at`) and the name
/// it gives (`backing`).
fn expect_chain_loop(file: &str, at: &str, backing: &str) {
    let case = find_case(file);
    assert_eq!(case.kind, Kind::ChainLoop);
    let err = provoke(&case);
    let message = err.to_string();
    match &err {
        Error::Chain {
            image,
            role,
            file: named,
            problem: ChainProblem::Loop,
        } => {
            assert_eq!(Path::new(image), corpus_path(at), "{message}");
            assert_eq!(*role, "backing", "{message}");
            assert_eq!(named, backing, "{message}");
            assert!(message.contains(at), "{message}");
        }
        _ => panic!("{file}: expected a backing loop, got {err:?} ({message})"),
    }
    // Without following the chain the image itself is fine, and check runs.
    let image = Image::open(corpus_path(file), &OpenOptions::metadata_only())
        .unwrap_or_else(|e| panic!("{file}: metadata-only open failed: {e}"));
    check_returns(&image);
}

// ---------------------------------------------------------------------------------------------
// Header fields
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_magic_is_refused() {
    expect_case("bad-magic.qcow2", "magic");
}

#[test]
fn version_1_is_refused() {
    expect_case("version-1.qcow2", "version 1");
}

#[test]
fn version_4_is_refused() {
    expect_case("version-4.qcow2", "version 4");
}

#[test]
fn cluster_bits_8_is_refused() {
    expect_case("cluster-bits-8.qcow2", "8");
}

#[test]
fn cluster_bits_22_is_refused() {
    expect_case("cluster-bits-22.qcow2", "22");
}

#[test]
fn l1_size_above_32_mib_is_refused() {
    expect_case("l1-size-over-32mib.qcow2", "32 MiB");
}

#[test]
fn l1_size_at_the_limit_past_the_end_of_the_file_is_refused_before_allocating() {
    expect_case("l1-size-at-limit-past-eof.qcow2", "end of the file");
}

#[test]
fn l1_size_too_small_for_the_virtual_size_is_refused() {
    expect_case("l1-size-too-small.qcow2", "too small");
}

#[test]
fn unaligned_l1_table_offset_is_refused() {
    expect_case("l1-offset-unaligned.qcow2", "aligned");
}

#[test]
fn l1_table_offset_beyond_the_end_of_the_file_is_refused() {
    expect_case("l1-offset-beyond-eof.qcow2", "end of the file");
}

#[test]
fn unaligned_refcount_table_offset_is_refused() {
    expect_case("reftable-offset-unaligned.qcow2", "aligned");
}

#[test]
fn refcount_table_offset_beyond_the_end_of_the_file_is_refused() {
    expect_case("reftable-offset-beyond-eof.qcow2", "end of the file");
}

#[test]
fn refcount_table_offset_zero_is_refused() {
    expect_case("reftable-offset-zero.qcow2", "header");
}

#[test]
fn zero_refcount_table_clusters_is_refused() {
    expect_case("reftable-clusters-zero.qcow2", "empty");
}

#[test]
fn huge_refcount_table_clusters_is_refused() {
    expect_case("reftable-clusters-huge.qcow2", "8 MiB");
}

#[test]
fn refcount_order_7_is_refused() {
    expect_case("refcount-order-7.qcow2", "7");
}

#[test]
fn header_length_100_is_refused() {
    expect_case("header-length-100.qcow2", "100");
}

#[test]
fn header_length_larger_than_the_cluster_is_refused() {
    expect_case("header-length-over-cluster.qcow2", "1024");
}

#[test]
fn nb_snapshots_100000_is_refused() {
    expect_case("nb-snapshots-100000.qcow2", "100000");
}

#[test]
fn snapshots_offset_beyond_the_end_of_the_file_is_refused() {
    expect_case("snapshots-offset-beyond-eof.qcow2", "end of the file");
}

#[test]
fn crypt_method_1_is_checked_like_any_image() {
    // Legacy AES has no header to check; the cut-off L1 table is what is refused.
    expect_case("crypt-method-1.qcow2", "past the end");
}

#[test]
fn crypt_method_2_without_its_luks_header_is_refused() {
    expect_case("crypt-method-2.qcow2", "Missing CRYPTO header");
}

#[test]
fn unknown_incompatible_bit_5_is_unsupported() {
    expect_case("incompat-bit-5.qcow2", "20");
}

#[test]
fn compression_type_2_is_unsupported() {
    expect_case("compression-type-2.qcow2", "2");
}

#[test]
fn compression_bit_without_a_compression_type_is_refused() {
    expect_case("compression-bit-without-type.qcow2", "bit 3");
}

#[test]
fn virtual_size_2_pow_63_is_refused() {
    expect_case("virtual-size-2-63.qcow2", "9223372036854775808");
}

// ---------------------------------------------------------------------------------------------
// Header extensions
// ---------------------------------------------------------------------------------------------

#[test]
fn extension_running_past_the_header_cluster_is_refused() {
    expect_case("ext-past-cluster.qcow2", "runs past");
}

#[test]
fn bitmaps_extension_of_the_wrong_length_is_refused() {
    expect_case("ext-bitmaps-wrong-length.qcow2", "16");
}

#[test]
fn backing_format_of_20_bytes_is_refused() {
    expect_case("ext-backing-format-20-bytes.qcow2", "20");
}

#[test]
fn encryption_extension_on_a_clear_image_is_refused() {
    expect_case("ext-encryption.qcow2", "only expected with LUKS");
}

// ---------------------------------------------------------------------------------------------
// L1 entries
// ---------------------------------------------------------------------------------------------

#[test]
fn l1_entry_pointing_at_the_l1_table_is_refused() {
    expect_case("l1-entry-at-l1.qcow2", "L1 table");
}

#[test]
fn l1_entry_pointing_at_the_refcount_table_is_refused() {
    expect_case("l1-entry-at-reftable.qcow2", "refcount table");
}

#[test]
fn l1_entry_beyond_the_end_of_the_file_is_refused() {
    expect_case("l1-entry-beyond-eof.qcow2", "end of the file");
}

#[test]
fn unaligned_l1_entry_is_refused() {
    expect_case("l1-entry-unaligned.qcow2", "aligned");
}

#[test]
fn l1_entry_with_reserved_bits_is_refused() {
    expect_case("l1-entry-reserved-bits.qcow2", "reserved");
}

// ---------------------------------------------------------------------------------------------
// L2 entries
// ---------------------------------------------------------------------------------------------

#[test]
fn l2_entry_whose_data_overlaps_the_l1_table_is_refused() {
    expect_case("l2-data-overlaps-l1.qcow2", "L1 table");
}

#[test]
fn l2_entry_whose_data_is_beyond_the_end_of_the_file_is_refused() {
    expect_case("l2-data-beyond-eof.qcow2", "end of the file");
}

#[test]
fn unaligned_l2_entry_is_refused() {
    expect_case("l2-data-unaligned.qcow2", "aligned");
}

#[test]
fn l2_entry_with_reserved_bits_is_refused() {
    expect_case("l2-reserved-bits.qcow2", "reserved");
}

#[test]
fn zero_flag_in_a_version_2_image_is_refused() {
    expect_case("l2-zero-flag-v2.qcow2", "version 2");
}

#[test]
fn compressed_descriptor_beyond_the_end_of_the_file_is_refused() {
    expect_case("compressed-beyond-eof.qcow2", "end of the file");
}

#[test]
fn compressed_descriptor_pointing_into_the_header_is_refused() {
    expect_case("compressed-into-header.qcow2", "header");
}

#[test]
fn l2_entry_errors_do_not_stutter() {
    for file in ["l2-reserved-bits.qcow2", "extl2-alloc-and-zero.qcow2"] {
        let message = provoke(&find_case(file)).to_string();
        let stutter = message
            .split(" at ")
            .zip(message.split(" at ").skip(1))
            .any(|(a, b)| a.starts_with("0x") && !a.contains(' ') && b.starts_with("0x"));
        assert!(!stutter, "{file}: {message}");
    }
}

#[test]
fn garbage_compressed_data_is_refused() {
    expect_case("compressed-garbage.qcow2", "deflate");
}

// ---------------------------------------------------------------------------------------------
// Extended L2
// ---------------------------------------------------------------------------------------------

#[test]
fn subcluster_with_alloc_and_zero_bits_both_set_is_refused() {
    expect_case("extl2-alloc-and-zero.qcow2", "subcluster bitmap");
}

#[test]
fn alloc_bits_on_an_unallocated_cluster_are_refused() {
    expect_case("extl2-alloc-unallocated.qcow2", "subcluster bitmap");
}

// ---------------------------------------------------------------------------------------------
// Snapshot table
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_with_2000_bytes_of_extra_data_is_refused() {
    expect_case("snapshot-extra-data-2000.qcow2", "extra");
}

#[test]
fn snapshot_name_running_past_the_end_of_the_file_is_refused() {
    expect_case("snapshot-name-past-eof.qcow2", "end of the file");
}

#[test]
fn snapshot_with_an_unaligned_l1_table_fails_when_opened() {
    expect_case("snapshot-l1-unaligned.qcow2", "aligned");
}

#[test]
fn snapshot_with_a_disk_size_its_l1_table_cannot_map_is_refused() {
    expect_case("snapshot-disk-size-huge.qcow2", "disk size");
}

#[test]
fn snapshot_l1_error_says_which_check_failed() {
    let err = provoke(&find_case("snapshot-l1-unaligned.qcow2"));
    let message = err.to_string();
    assert!(message.contains("0x610"), "{message}");
    assert!(!message.contains(" or "), "ambiguous reason: {message}");
}

#[test]
fn snapshot_table_on_the_refcount_table_is_refused() {
    expect_case("snapshot-table-over-reftable.qcow2", "refcount table");
}

// ---------------------------------------------------------------------------------------------
// Truncated files
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_file_is_refused() {
    expect_case("truncated-0.qcow2", "0 bytes");
}

#[test]
fn file_of_50_bytes_is_refused() {
    expect_case("truncated-50.qcow2", "50 bytes");
}

#[test]
fn header_cluster_without_its_tables_is_refused() {
    expect_case("truncated-header-cluster.qcow2", "end of the file");
}

// ---------------------------------------------------------------------------------------------
// Backing chains
// ---------------------------------------------------------------------------------------------

#[test]
fn image_naming_itself_as_backing_file_is_a_loop() {
    expect_chain_loop(
        "backing-self.qcow2",
        "backing-self.qcow2",
        "backing-self.qcow2",
    );
}

#[test]
fn two_images_backing_each_other_are_a_loop_from_a() {
    expect_chain_loop(
        "backing-loop-a.qcow2",
        "backing-loop-b.qcow2",
        "backing-loop-a.qcow2",
    );
}

#[test]
fn two_images_backing_each_other_are_a_loop_from_b() {
    expect_chain_loop(
        "backing-loop-b.qcow2",
        "backing-loop-a.qcow2",
        "backing-loop-b.qcow2",
    );
}

/// A backing file that does not exist is a chain error a caller can match, naming the image
/// and the name it gives; the image itself still opens without its chain.
#[test]
fn missing_backing_file_is_a_chain_error_naming_the_image() {
    let file = "backing-missing.qcow2";
    let case = find_case(file);
    let err = provoke(&case);
    let message = err.to_string();
    match &err {
        Error::Chain {
            image,
            role: "backing",
            file: named,
            problem: ChainProblem::Missing,
        } => {
            assert_eq!(Path::new(image), corpus_path(file), "{message}");
            assert_eq!(named, "no-such-backing-file.qcow2", "{message}");
            assert!(message.contains(file), "{message}");
        }
        _ => panic!("{file}: expected a missing backing file, got {err:?} ({message})"),
    }
    assert!(Image::open(corpus_path(file), &OpenOptions::metadata_only()).is_ok());
}

/// Builds `d00.qcow2` (no backing file) ... `dNN.qcow2`, each backed by the one before.
fn make_chain(dir: &Path, top: usize) {
    for i in 0..=top {
        let path = dir.join(format!("d{i:02}.qcow2"));
        let path = path.to_str().expect("UTF-8 scratch path");
        let backing = format!("d{:02}.qcow2", i.saturating_sub(1));
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
        if i > 0 {
            args.extend(["-u", "-b", backing.as_str(), "-F", "qcow2"]);
        }
        args.extend([path, "64K"]);
        qemu_img_ok(&args);
    }
}

#[test]
fn backing_chain_of_70_is_too_deep_for_the_default_limit_of_64() {
    let dir = scratch_dir("backing_chain_of_70");
    make_chain(&dir, 69);
    let options = OpenOptions::default();
    assert_eq!(options.max_backing_depth, 64);

    // d69 is the top; with 64 images below it accepted, the 65th (d05) may not open d04.
    let err = Image::open(dir.join("d69.qcow2"), &options).unwrap_err();
    let message = err.to_string();
    match &err {
        Error::Chain {
            image,
            role,
            file,
            problem: ChainProblem::TooDeep { limit },
        } => {
            assert_eq!(*limit, 64, "{message}");
            assert_eq!(*role, "backing", "{message}");
            assert_eq!(Path::new(image), dir.join("d05.qcow2"), "{message}");
            assert_eq!(file, "d04.qcow2", "{message}");
            assert!(message.contains("d05.qcow2"), "{message}");
        }
        _ => panic!("expected a too-deep chain, got {err:?} ({message})"),
    }

    // Exactly at the limit: d64 has 64 images below it and opens.
    let image = Image::open(dir.join("d64.qcow2"), &options)
        .unwrap_or_else(|e| panic!("a chain of depth 64 must open: {e}"));
    assert_eq!(image.chain_depth(), 64);
    read_whole_disk(&image).unwrap();
    // One over: d65 is refused.
    assert!(matches!(
        Image::open(dir.join("d65.qcow2"), &options),
        Err(Error::Chain {
            problem: ChainProblem::TooDeep { limit: 64 },
            ..
        })
    ));
    // A larger limit opens the whole chain.
    let deep = OpenOptions::default().max_backing_depth(70);
    let image = Image::open(dir.join("d69.qcow2"), &deep).unwrap();
    assert_eq!(image.chain_depth(), 69);
}

// ---------------------------------------------------------------------------------------------
// The corpus as a whole
// ---------------------------------------------------------------------------------------------

fn corpus_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
        .expect("read testdata/hostile")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    files.sort();
    files
}

fn manifest_row(c: &Case) -> String {
    let when = match c.when {
        When::Open => "open".to_string(),
        When::Read => "read".to_string(),
        When::Snapshot(name) => format!("snapshot:{name}"),
    };
    let kind = match c.kind {
        Kind::Corrupt => "Corrupt",
        Kind::Unsupported => "Unsupported",
        Kind::ChainLoop => "Chain:Loop",
        Kind::ChainMissing => "Chain:Missing",
    };
    let structure = if c.structure.is_empty() {
        "-"
    } else {
        c.structure
    };
    let offset = c.offset.map_or("-".to_string(), |o| format!("{o:#x}"));
    format!("{}\t{when}\t{kind}\t{structure}\t{offset}", c.file)
}

#[test]
fn manifest_matches_the_cases_and_every_file_has_one() {
    let manifest = std::fs::read_to_string(corpus_dir().join("expected.tsv")).unwrap();
    let rows: Vec<&str> = manifest.lines().filter(|l| !l.is_empty()).collect();
    let ours: Vec<String> = CASES.iter().map(manifest_row).collect();
    assert_eq!(rows, ours, "expected.tsv and CASES disagree");

    let mut listed: Vec<String> = CASES.iter().map(|c| c.file.to_string()).collect();
    listed.sort();
    assert_eq!(corpus_files(), listed, "files in testdata/hostile vs CASES");

    let total: u64 = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total < 200 << 10, "the corpus is {total} bytes");
}

/// Opens, reads and checks one file in every way the engine offers, ignoring the results: only
/// panics and time matter here.
fn exercise(path: &Path) {
    for options in [OpenOptions::default(), OpenOptions::metadata_only()] {
        let Ok(image) = Image::open(path, &options) else {
            continue;
        };
        let _ = read_whole_disk(&image);
        let _ = image.map(0, image.size());
        let _ = image.info();
        check_returns(&image);
        let names: Vec<String> = image
            .snapshot_entries()
            .iter()
            .map(|s| s.id_str())
            .collect();
        for name in names {
            if let Ok(view) = image.open_snapshot(&name) {
                let mut buf = vec![0u8; view.size().min(MAX_READ) as usize];
                let _ = view.read_at(&mut buf, 0);
                let _ = view.map(0, view.size());
            }
        }
    }
}

enum Progress {
    Started(String),
    Finished(String),
}

#[test]
fn every_corpus_file_is_answered_within_the_watchdog_time() {
    let files = corpus_files();
    assert!(files.len() > 50);
    watch(files);
}

/// Runs [`exercise`] on each file in a worker thread; fails if one file takes longer than
/// [`WATCHDOG`] or the worker panics. The main thread only waits on the channel (no sleeps).
fn watch(files: Vec<String>) {
    let (tx, rx) = mpsc::channel();
    let dir = corpus_dir();
    let worker = {
        let files = files.clone();
        std::thread::spawn(move || {
            for file in files {
                tx.send(Progress::Started(file.clone())).unwrap();
                exercise(&dir.join(&file));
                tx.send(Progress::Finished(file)).unwrap();
            }
        })
    };

    let mut finished = 0;
    let mut current: Option<(String, Instant)> = None;
    while finished < files.len() {
        match rx.recv_timeout(WATCHDOG) {
            Ok(Progress::Started(file)) => current = Some((file, Instant::now())),
            Ok(Progress::Finished(file)) => {
                let (started, at) = current.take().expect("finished before it started");
                assert_eq!(started, file);
                assert!(
                    at.elapsed() < WATCHDOG,
                    "{file} took {:?} to open, read and check",
                    at.elapsed()
                );
                finished += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{} did not finish open, read and check within {WATCHDOG:?}",
                current.map_or("(between files)".to_string(), |(f, _)| f)
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let file = current.map_or("(between files)".to_string(), |(f, _)| f);
                match worker.join() {
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        panic!("the engine panicked on {file}: {msg}")
                    }
                    Ok(()) => panic!("the worker stopped early at {file}"),
                }
            }
        }
    }
    worker.join().expect("worker");
}

/// A create that fails after making the file (here: its backing file is missing) leaves no file
/// behind, as qemu-img's does.
#[test]
fn a_failed_create_leaves_no_file() {
    let dir = qcow2_testdata::scratch_dir("failed_create");
    let path = dir.join("new.qcow2");
    let options = qcow2::CreateOptions::new(1 << 20)
        .backing_file(Some("missing-base.qcow2".into()))
        .backing_format(Some("qcow2".into()));
    let err = Image::create(&path, &options).expect_err("the backing file is missing");
    assert!(matches!(err, Error::Chain { .. }), "{err}");
    assert!(!path.exists(), "the failed create left {}", path.display());
}
