//! A qcow2 (v2 and v3) image engine.
//!
//! Layers, each usable alone and depending only on the ones below:
//! - [`storage`]: positioned I/O ([`Storage`]) over files, memory and a recording store that
//!   simulates power cuts; QEMU-compatible image locks;
//! - [`format`](mod@format): zero-copy on-disk types and pure codecs, no I/O;
//! - [`image`]: the engine: open with full validation; reads through L1/L2 with a bounded cache,
//!   compressed clusters, backing chains and external data files; crash-safe writes, zero writes,
//!   discard, resize and compressed writes; internal snapshots; `map`, `info`, `check` and repair;
//!   commit and rebase of backing chains.
//!
//! The only `unsafe` the project allows would be file mapping; none is used.
#![forbid(unsafe_code)]

pub mod error;
pub mod format;
pub mod image;
pub mod storage;

pub use error::{ChainProblem, Error, Result};
pub use image::{
    BackingPolicy, CheckReport, CommitOptions, CreateOptions, Extent, ExtentKind, Image, ImageInfo,
    NewBacking, OpenOptions, Preallocation, RebaseOptions, Repair, SnapshotInfo, SnapshotView,
};
pub use storage::{FileStorage, MemoryStorage, Storage};
