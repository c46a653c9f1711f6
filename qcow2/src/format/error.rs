//! The error a pure decoder returns: which structure, where it sits, and what is wrong with it.

use std::fmt;

/// Whether an image is broken or merely uses something this engine does not implement.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The bytes break the format or one of QEMU's limits.
    Invalid(String),
    /// The bytes are valid qcow2 but use a feature the engine refuses (encryption, unknown
    /// incompatible bits, an unknown compression type).
    Unsupported(String),
}

/// A decoding failure located in the image: `"L2 table at 0x50000: offset not cluster aligned"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// The structure or field, e.g. `"header field cluster_bits"` or `"L2 table"`.
    pub structure: String,
    /// Byte offset of that structure in the image file.
    pub offset: u64,
    /// What is wrong.
    pub problem: Problem,
}

impl FormatError {
    /// A structure that breaks the format.
    pub fn invalid(structure: impl Into<String>, offset: u64, reason: impl Into<String>) -> Self {
        FormatError {
            structure: structure.into(),
            offset,
            problem: Problem::Invalid(reason.into()),
        }
    }

    /// A valid structure that uses a feature the engine does not implement.
    pub fn unsupported(structure: impl Into<String>, offset: u64, what: impl Into<String>) -> Self {
        FormatError {
            structure: structure.into(),
            offset,
            problem: Problem::Unsupported(what.into()),
        }
    }

    /// The reason text alone.
    pub fn reason(&self) -> &str {
        match &self.problem {
            Problem::Invalid(r) | Problem::Unsupported(r) => r,
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {:#x}: {}",
            self.structure,
            self.offset,
            self.reason()
        )
    }
}

impl std::error::Error for FormatError {}

/// Shorthand for decoder results.
pub type FormatResult<T> = Result<T, FormatError>;
