//! Guest data: the read path through L1/L2 (`layer`), writes in place and copy-on-write
//! (`write`), zero writes and discards (`zero`), compressed clusters (`compress`, `codec`), and
//! the extent map (`map`, and `extents`, which walks it a window at a time); `quiesce` is the gate
//! a live group snapshot closes on guest writes; `vmstate` is the VM state area past the disk.

pub(crate) mod codec;
pub(crate) mod compress;
pub(crate) mod extents;
pub(crate) mod layer;
pub(crate) mod map;
pub(crate) mod preallocated;
pub(crate) mod quiesce;
pub(crate) mod vmstate;
pub(crate) mod write;
pub(crate) mod zero;
