//! A qcow2 (v2 and v3) image engine.
//!
//! Layers, each usable alone and depending only on the ones below:
//! - [`storage`]: positioned I/O ([`Storage`]) over files and memory;
//! - [`format`]: zero-copy on-disk types and pure codecs, no I/O;
//! - [`image`]: the engine: open with full validation, guest reads through L1/L2 with a bounded
//!   cache, compressed clusters, backing chains, external data files, snapshots, `map`, `info` and
//!   `check`.
#![forbid(unsafe_code)]

pub mod error;
pub mod format;
pub mod image;
pub mod storage;

pub use error::{ChainProblem, Error, Result};
pub use image::{
    BackingPolicy, CheckReport, CreateOptions, Extent, ExtentKind, Image, ImageInfo, OpenOptions,
    Preallocation, Repair, SnapshotInfo, SnapshotView,
};
pub use storage::{FileStorage, MemoryStorage, Storage};
