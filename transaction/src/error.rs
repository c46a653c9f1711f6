//! What can go wrong with a group transaction, always naming the image and the reason.

use std::path::PathBuf;

use crate::journal::JournalError;

/// Errors of group transactions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxnError {
    /// An action was refused before anything was written.
    #[error("{image}: {reason}")]
    Invalid {
        /// The image (or file) concerned.
        image: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// `Transaction::add` refused an action (the transaction goes on without it).
    #[error("action {index} ({action}) refused: {reason}")]
    Refused {
        /// The action's position in the transaction.
        index: usize,
        /// What the action is and which image it names.
        action: String,
        /// Why it was refused.
        reason: Box<TxnError>,
    },
    /// The action cannot act on an image in use: its handle stays the caller's, and what the
    /// action needs (a new top for the handle, a changed active state) the engine cannot swap
    /// under the caller's I/O.
    #[error(
        "{image}: {action} is not supported on an image in use (a live handle); close it, or \
         act on it by path when nothing has it open"
    )]
    LiveUnsupported {
        /// The image (or file) concerned.
        image: PathBuf,
        /// The action refused, with its QMP name: "an external snapshot (blockdev-snapshot-sync)".
        action: &'static str,
    },
    /// Preparing failed; the transaction was rolled back and nothing changed.
    #[error("aborted, nothing changed: {0}")]
    Aborted(Box<TxnError>),
    /// Preparing failed and rolling back failed too; nothing was published, and `recover`
    /// finishes the rollback.
    #[error("aborted, nothing published, but cleanup failed (run recover to finish): {0}")]
    AbortIncomplete(Box<TxnError>),
    /// Writing the commit decision failed and it is unknown whether it reached the disk;
    /// nothing was published, and `recover` decides from the journal.
    #[error("the commit decision may or may not be durable (run recover to settle it): {0}")]
    InDoubt(Box<TxnError>),
    /// The decision to commit is durable but a later step failed; `recover` finishes it.
    #[error("committed, but a later step failed (run recover to finish): {0}")]
    CommittedIncomplete(Box<TxnError>),
    /// The engine failed on an image.
    #[error("{image}: {source}")]
    Image {
        /// The image (or file) concerned.
        image: PathBuf,
        /// The engine's error.
        #[source]
        source: qcow2::Error,
    },
    /// A file of the group could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The group's journal could not be read or written, or is not valid.
    #[error("journal of group {group}: {source}")]
    Journal {
        /// The group directory.
        group: PathBuf,
        /// What is wrong with the journal.
        #[source]
        source: JournalError,
    },
    /// Another process holds the group.
    #[error("group {0} is locked by another process")]
    GroupLocked(PathBuf),
    /// Recovery found an image it did not leave in this state; it changes nothing.
    #[error(
        "{image}: changed by someone else since the transaction began ({reason}); recovery stops \
         and changes nothing. Put the original file back and run recover again; or, if the change \
         is wanted, check every image the plan named (qemu-img check), then remove the group's \
         txn.journal by hand to give up the interrupted transaction"
    )]
    ForeignChange {
        /// The image (or file) concerned.
        image: PathBuf,
        /// What recovery found.
        reason: String,
    },
    /// Execution stopped at a named event (tests simulate power cuts with this).
    #[error("interrupted at {0}")]
    Interrupted(String),
}

impl TxnError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TxnError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn image(image: impl Into<PathBuf>, source: qcow2::Error) -> Self {
        TxnError::Image {
            image: image.into(),
            source,
        }
    }
}
