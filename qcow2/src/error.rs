//! The library's error type. Every variant names the image it concerns, and format errors also
//! name the structure and its offset: `L2 table at 0x50000 of image a.qcow2: not cluster aligned`.

use std::io;

use crate::format::{FormatError, Problem};

/// The structure named by the error for a refcount table entry that points at an unaligned
/// refcount block: found only when a refcount there is needed, it marks the image corrupt.
pub(crate) const UNALIGNED_REFBLOCK: &str = "refcount table entry";
/// How an L2 entry's reason starts when its subcluster bitmap contradicts itself.
pub(crate) const INVALID_SUBCLUSTER_BITMAP: &str = "invalid subcluster bitmap";
/// How an L2 entry's reason ends when its data cluster offset is not cluster aligned.
pub(crate) const UNALIGNED_DATA_CLUSTER: &str = "is not cluster aligned";

/// The start of the structure named by the error for an allocation refused because it would
/// take a metadata cluster counted free: it marks the image corrupt.
pub(crate) const PREVENTED_ALLOCATION: &str = "allocation";

/// Why a backing or data file was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainProblem {
    /// The chain leads back to an image already in it.
    Loop,
    /// The chain is deeper than the configured limit.
    TooDeep {
        /// The deepest chain accepted ([`OpenOptions::max_backing_depth`](crate::OpenOptions)).
        limit: usize,
    },
    /// The caller's policy does not allow opening this file.
    RefusedByPolicy,
    /// The backing format is neither qcow2 nor raw.
    UnsupportedFormat(String),
    /// The image names a backing file, but was opened from storage that has no directory to resolve
    /// the name against.
    NoDirectory,
    /// The name leads to something that is not a regular file or block device (a FIFO, which
    /// would hang the reader, or a character device such as `/dev/zero`, which would acknowledge
    /// writes and read back something else).
    NotAFile {
        /// What it is instead: "FIFO", "character device", "directory", "socket".
        kind: &'static str,
    },
    /// The named file does not exist.
    Missing,
    /// The image keeps its data in an external data file but names none, and the caller gave
    /// none ([`OpenOptions::data_file`](crate::OpenOptions)).
    Required,
    /// The name is not a file path (a `json:{...}` description) and the caller gave no
    /// [`BackingResolver`](crate::BackingResolver) to open such names.
    NoResolver,
    /// The name asks for a block driver the caller's resolver does not open below an image (a
    /// network protocol, say).
    DriverRefused {
        /// The driver as the name calls it ("nbd", "ssh").
        driver: String,
    },
    /// The caller's resolver could not make sense of the name.
    Unresolvable(String),
}

impl std::fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainProblem::Loop => {
                write!(f, "the backing chain loops back to an image already in it")
            }
            ChainProblem::TooDeep { limit } => {
                write!(
                    f,
                    "the backing chain is deeper than the limit of {limit} images"
                )
            }
            ChainProblem::RefusedByPolicy => {
                write!(f, "opening it is not allowed by the backing policy")
            }
            ChainProblem::UnsupportedFormat(fmt) => {
                write!(f, "backing format {fmt:?} is not supported")
            }
            ChainProblem::NotAFile { kind } => {
                write!(f, "it is a {kind}, not a regular file or block device")
            }
            ChainProblem::Missing => write!(f, "No such file or directory"),
            ChainProblem::Required => {
                write!(
                    f,
                    "the image names no data file; one must be given to open it"
                )
            }
            ChainProblem::NoDirectory => {
                write!(
                    f,
                    "the image was opened without a path to resolve the name against"
                )
            }
            ChainProblem::NoResolver => {
                write!(
                    f,
                    "the name is not a file path and nothing was given to resolve it"
                )
            }
            ChainProblem::DriverRefused { driver } => {
                write!(f, "the '{driver}' driver is not allowed below an image")
            }
            ChainProblem::Unresolvable(reason) => write!(f, "{reason}"),
        }
    }
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the storage under an image.
    #[error("image {image}: {context}: {source}")]
    Io {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// What the engine was doing: "reading L2 table", "opening the image".
        context: String,
        /// The storage's error.
        #[source]
        source: io::Error,
    },
    /// The image breaks the format or a limit; `structure` and `offset` say where.
    #[error("{structure} at {offset:#x} of image {image}: {reason}")]
    Corrupt {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// The structure at fault, as the spec names it: "L2 table", "refcount block".
        structure: String,
        /// Host offset of the structure (or the header field) in the image file.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The image is valid but uses something this engine does not implement.
    #[error("{structure} at {offset:#x} of image {image}: {what}")]
    Unsupported {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// The structure using the feature: "header field crypt_method".
        structure: String,
        /// Host offset of the structure (or the header field) in the image file.
        offset: u64,
        /// The feature not implemented.
        what: String,
    },
    /// A backing or external data file could not be opened.
    #[error("image {image}: {role} file {file:?}: {problem}")]
    Chain {
        /// The image whose header names the file.
        image: String,
        /// "backing" or "data".
        role: &'static str,
        /// The file name as the header records it.
        file: String,
        /// Why it was not opened.
        problem: ChainProblem,
    },
    /// A guest request outside the virtual disk.
    #[error(
        "image {image}: request of {len} bytes at {offset:#x} is beyond the virtual size {size:#x}"
    )]
    OutOfBounds {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// Guest offset of the request, in bytes.
        offset: u64,
        /// Length of the request, in bytes.
        len: u64,
        /// The virtual disk size, in bytes.
        size: u64,
    },
    /// No snapshot has this id or name.
    #[error("image {image}: no snapshot with id or name {name:?}")]
    SnapshotNotFound {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// The id or name asked for.
        name: String,
    },
    /// A write to an image opened read-only.
    #[error("image {image}: the image is open read-only")]
    ReadOnly {
        /// The image, as named when it was opened (path or storage name).
        image: String,
    },
    /// The image has the corrupt bit set and cannot be opened for writing.
    #[error("image {image}: the image is marked corrupt; open it read-only or repair it with check -r all")]
    MarkedCorrupt {
        /// The image, as named when it was opened (path or storage name).
        image: String,
    },
    /// Another process holds the image.
    #[error("image {image}: the image is locked by another process ({detail})")]
    Locked {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// Which of QEMU's lock permissions conflicts, as a sentence ("another open of it holds
        /// the write permission").
        detail: String,
    },
    /// A guest write reached an image that an external snapshot has put an overlay above: the
    /// disk's writes go to the overlay now. [`crate::DiskTop`] retries such a write on the new top.
    #[error(
        "image {image}: an external snapshot put an overlay above this image; write to the overlay"
    )]
    Superseded {
        /// The image, as named when it was opened (path or storage name).
        image: String,
    },
    /// The image's encryption refused the request: a wrong or missing password, a damaged or
    /// unsupported LUKS header, a refused key slot change. Displayed in QEMU's words alone.
    #[error("{source}")]
    Crypto {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// What went wrong.
        #[source]
        source: crate::crypto::CryptoError,
    },
    /// The caller asked for something invalid.
    #[error("image {image}: {reason}")]
    InvalidArgument {
        /// The image, as named when it was opened (path or storage name).
        image: String,
        /// What is invalid about the request.
        reason: String,
    },
}

impl Error {
    /// Attaches an image name to a pure decoder's error.
    pub fn from_format(image: &str, e: FormatError) -> Self {
        match e.problem {
            Problem::Invalid(reason) => Error::Corrupt {
                image: image.to_string(),
                structure: e.structure,
                offset: e.offset,
                reason,
            },
            Problem::Unsupported(what) => Error::Unsupported {
                image: image.to_string(),
                structure: e.structure,
                offset: e.offset,
                what,
            },
        }
    }

    /// An encryption error of an image.
    pub fn crypto(image: &str, source: crate::crypto::CryptoError) -> Self {
        Error::Crypto {
            image: image.to_string(),
            source,
        }
    }

    /// An I/O error with what the engine was doing.
    pub fn io(image: &str, context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            image: image.to_string(),
            context: context.into(),
            source,
        }
    }

    /// Whether this corruption, found while writing, means the image must be marked corrupt
    /// (QEMU's "corruption events": metadata a write depends on is invalid, an unaligned
    /// refcount block or an invalid L2 entry).
    pub(crate) fn marks_image_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { structure, .. }
            if structure == UNALIGNED_REFBLOCK
                || structure.starts_with(&format!("{PREVENTED_ALLOCATION} over ")))
            || self.is_fatal_l2_entry()
    }

    /// An L2 entry QEMU takes for a fatal corruption event when a request meets it: a
    /// contradictory subcluster bitmap, or a data cluster offset that is not aligned.
    pub(crate) fn is_fatal_l2_entry(&self) -> bool {
        matches!(self, Error::Corrupt { structure, reason, .. }
            if structure.starts_with("L2 entry ")
                && (reason.starts_with(INVALID_SUBCLUSTER_BITMAP)
                    || reason.ends_with(UNALIGNED_DATA_CLUSTER)))
    }

    /// A corruption at a place in the image.
    pub fn corrupt(
        image: &str,
        structure: impl Into<String>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            image: image.to_string(),
            structure: structure.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// For `std::io` callers (`DiskCursor`, and code that returns `io::Result`): an I/O error keeps
/// its kind; the others map to the nearest kind and keep the engine's error as the source.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Corrupt { .. } | Error::MarkedCorrupt { .. } => io::ErrorKind::InvalidData,
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::Chain { .. } => io::ErrorKind::NotFound,
            Error::Crypto { .. } => io::ErrorKind::PermissionDenied,
            Error::OutOfBounds { .. } | Error::InvalidArgument { .. } => {
                io::ErrorKind::InvalidInput
            }
            Error::SnapshotNotFound { .. } => io::ErrorKind::NotFound,
            Error::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            Error::Locked { .. } => io::ErrorKind::WouldBlock,
            Error::Superseded { .. } => io::ErrorKind::ReadOnlyFilesystem,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand for engine results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
