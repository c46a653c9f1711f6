//! Backing chains: opening them through the caller's policy (`backing`), crash-safe rewrites of
//! cluster 0 (`backing_header`: the backing name and format, the bitmaps extension), merging an
//! overlay into its base (`commit`), giving an image a new backing file (`rebase`) and reads that
//! copy what they find below into the image (`copy_on_read`), and the seam for backing names that
//! are not paths (`resolver`).

pub(crate) mod backing;
pub(crate) mod backing_header;
pub(crate) mod commit;
pub(crate) mod copy_on_read;
pub(crate) mod rebase;
pub(crate) mod resolver;
