//! Metadata in memory and on its way to disk: positioned I/O (`host`), the bounded L2 cache
//! (`l2_cache`, `cluster_map`), refcounts and their growth (`refcounts`, `refcount_deltas`), and
//! the order cached metadata is written back in (`writeback`).

pub(crate) mod cluster_map;
pub(crate) mod host;
pub(crate) mod l2_cache;
pub(crate) mod refcount_deltas;
pub(crate) mod refcounts;
pub(crate) mod writeback;
