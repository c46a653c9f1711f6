//! Internal snapshots: read-only views of a snapshot (`view`), and create, delete and revert,
//! staged in fresh clusters and published by one header write (`ops`).

pub(crate) mod complete;
pub(crate) mod ops;
pub(crate) mod view;
