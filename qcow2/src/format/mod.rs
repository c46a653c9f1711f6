//! Zero-copy on-disk types and pure codecs for qcow2. Nothing in this module does I/O: every
//! function takes bytes and returns values or a [`FormatError`] that names the structure and its
//! offset, so a forensic tool can use it alone and the fuzzer can drive it directly.

pub mod bitmap;
pub mod compressed;
pub mod error;
pub mod extension;
pub mod features;
pub mod header;
pub mod limits;
pub mod refcount;
pub mod snapshot;
pub mod table;

pub use compressed::CompressedDescriptor;
pub use error::{FormatError, FormatResult, Problem};
pub use extension::Extensions;
pub use header::{CompressionType, Header};
pub use snapshot::{SnapshotEntry, SnapshotTime};
pub use table::{ClusterMapping, L1Entry, SubclusterBitmap, SubclusterState};
