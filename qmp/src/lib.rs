//! A QMP control socket (QEMU's monitor protocol) over qcow2 group transactions, as
//! `qcow2-tool serve --qmp` runs it beside the NBD exports: an unchanged QMP client (the
//! `qemu.qmp` Python package, `qmp-shell`) takes live, atomic group snapshots of the served
//! disks with QEMU's `transaction` command.
//!
//! - [`framing`]: object boundaries in the client's JSON stream (bounded);
//! - `args` (private): strict argument checking with QEMU's messages;
//! - [`monitor`]: a session: greeting, capabilities negotiation, `execute` with `id`, replies;
//! - `commands` (private): the commands, each going through the group's journal, so a server
//!   killed mid-transaction is all-or-nothing after `recover`.
//!
//! Every disk is a live handle the NBD server keeps writing through: a transaction pauses its
//! guest writes from staging to publish (`qcow2_transaction::Transaction::attach_top`). An
//! external snapshot (`blockdev-snapshot-sync`) makes its new overlay the disk's top inside
//! that pause, and the export writes into the overlay from then on; `blockdev-snapshot` (an
//! overlay node made with `blockdev-add`) is refused, as there is no `blockdev-add`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

mod args;
mod commands;
pub mod framing;
pub mod monitor;

pub use commands::{Disk, WriteCache};
pub use monitor::Monitor;

// Compile-time checks of what the docs promise about threads: a type that stops being
// `Send + Sync` fails the build here, not in a caller's.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    // Sessions on several threads share one monitor.
    send_sync::<Monitor>();
    send_sync::<Disk>();
};

/// A QMP error: its class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class QEMU sends: "GenericError", "CommandNotFound".
    pub class: &'static str,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`, the class QEMU uses for nearly everything.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`: the command does not exist (or is not allowed yet).
    pub fn not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}
