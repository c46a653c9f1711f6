//! A qcow2 (v2 and v3) image engine.
//!
//! Layers, each usable alone and depending only on the ones below:
//! - [`storage`]: positioned I/O ([`Storage`]) over files and memory (and, with the `testing`
//!   feature, a recording store that simulates power cuts); QEMU-compatible image locks;
//! - [`format`](mod@format): on-disk types and pure codecs, no I/O;
//! - [`image`]: the engine: open with full validation; reads through L1/L2 with a bounded cache,
//!   compressed clusters, backing chains and external data files; crash-safe writes, zero writes,
//!   discard, resize and compressed writes; internal snapshots; `map`, `info`, `check` and repair;
//!   commit and rebase of backing chains.
//!
//! The common jobs, in memory here (`Image::create` and `Image::open` take paths):
//!
//! ```
//! use qcow2::{CreateOptions, Image, MemoryStorage, OpenOptions, SnapshotTime};
//!
//! // Create a 1 GiB image, write, snapshot, write again.
//! let options = CreateOptions::new(1 << 30);
//! let image = Image::create_in(Box::new(MemoryStorage::new()), "disk", &options)?;
//! image.write_at(&[0xab; 4096], 1 << 20)?;
//! image.create_snapshot("before-upgrade", SnapshotTime::now())?;
//! image.write_at(&[0xcd; 4096], 1 << 20)?;
//!
//! // Read the disk and one snapshot of it.
//! let mut now = [0u8; 4096];
//! image.read_at(&mut now, 1 << 20)?;
//! assert_eq!(now[0], 0xcd);
//! let mut then = [0u8; 4096];
//! image.open_snapshot("before-upgrade")?.read_at(&mut then, 1 << 20)?;
//! assert_eq!(then[0], 0xab);
//!
//! // Which ranges hold data (qemu-img map), asked in windows for large disks.
//! let data: Vec<_> = image.map(0, image.size())?.into_iter().filter(|e| e.data()).collect();
//! assert_eq!((data[0].start, data[0].length), (1 << 20, 65536));
//!
//! // A persistent dirty bitmap marks what changes from now on (incremental backups).
//! image.add_bitmap("since-now", 65536, false)?;
//! image.write_at(&[1; 512], 7 << 20)?;
//! assert_eq!(image.dirty_extents("since-now", 0, image.size())?, [(7 << 20, 65536)]);
//!
//! // Consistency (qemu-img check).
//! assert!(image.check()?.is_clean());
//! image.close()?;
//! # let _ = OpenOptions::default();
//! # Ok::<(), qcow2::Error>(())
//! ```
//!
//! [`transaction_support`] is the staging interface `qcow2-transaction` builds on; it is not
//! covered by semver. The `testing` feature (also outside semver) exposes the crash-test
//! machinery to this crate's tests, `qcow2-transaction`'s and the fuzzer.
//!
//! Backing files are opened only as [`OpenOptions::backing`] says (follow, refuse, ignore);
//! [`DiskCursor`] gives `std::io` access; `examples/` has whole programs. Linux only: image
//! locks are QEMU's open file description locks.
//!
//! The only `unsafe` the project allows would be file mapping; none is used.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

/// Chainable setters for the public fields of a `#[non_exhaustive]` options struct, so callers
/// outside the crate build it from `new()` or `Default` as they would with a literal. Exported
/// (hidden) for the sibling crates' options structs; not part of the supported API.
#[doc(hidden)]
#[macro_export]
macro_rules! setters {
    ($ty:ident { $($field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](", stringify!($ty), "#structfield.", stringify!($field), ").")]
                #[must_use]
                pub fn $field(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

pub mod crypto;
pub mod cursor;
mod disk_top;
pub mod error;
pub mod format;
pub mod image;
pub mod storage;
pub mod transaction_support;

pub use cursor::{Disk, DiskCursor};
pub use disk_top::DiskTop;
pub use error::{ChainProblem, Error, Result};
pub use format::SnapshotTime;
pub use image::{
    AmendOptions, BackingPolicy, BackingRequest, BackingResolver, CheckReport, CommitOptions,
    CompressedClusters, CopyStep, CreateOptions, Extent, ExtentKind, Image, ImageInfo, NewBacking,
    NewEncryption, OpenOptions, Preallocation, RebaseOptions, Repair, ResolvedBacking,
    SnapshotInfo, SnapshotView,
};
pub use storage::{FileStorage, MemoryStorage, Storage};

// Compile-time checks of what the docs promise about threads: a type that stops being
// `Send + Sync` fails the build here, not in a caller's.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Image>();
    send_sync::<SnapshotView<'static>>();
    send_sync::<Error>();
    send_sync::<FileStorage>();
    send_sync::<MemoryStorage>();
    send_sync::<DiskCursor<std::sync::Arc<Image>>>();
};
