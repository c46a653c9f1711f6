//! An NBD export server over the qcow2 engine, as an outside tool would build it: it uses only
//! the `qcow2` library's public API (`Image::read_at`, `write_at`, `write_zeroes`, `discard`,
//! `flush`, `map` and `dirty_extents`).
//!
//! - [`wire`]: the protocol's constants and pure codecs (no I/O; fuzzable);
//! - [`negotiate`]: the fixed-newstyle handshake up to GO / EXPORT_NAME;
//! - [`commands`]: one request against an export's image, encoded as its whole reply;
//! - [`transmit`]: one connection's transmission phase (a reader plus a small worker pool,
//!   out-of-order replies, bounded memory);
//! - [`server`]: listeners (unix socket, TCP), connection limits, shutdown;
//! - [`export`]: what is exported and what is advertised for it.
//!
//! Metadata contexts: `base:allocation`, `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`
//! for the persistent bitmaps an [`Export`] names. Not implemented: TLS (STARTTLS is refused
//! with `ERR_POLICY`), resize, and the old-style handshake.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

pub mod commands;
pub mod export;
pub mod negotiate;
pub mod server;
pub mod transmit;
pub mod wire;

pub use export::{Context, ContextKind, DetectZeroes, Export};
pub use server::{serve_stream, Listener, Server, ServerOptions, ShutdownHandle};
pub use transmit::ConnectionOptions;

// Compile-time checks of what the docs promise about threads: a type that stops being
// `Send + Sync` fails the build here, not in a caller's.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Server>();
    send_sync::<Export>();
    send_sync::<ShutdownHandle>();
};
