//! Whole-image jobs: `create`, `info`, `measure` (qemu-img measure's sizes), `check` and
//! `repair` (check -r), `resize`, and `guard` (writes never land on metadata; the layout is
//! checked before the first write).

pub(crate) mod amend;
pub(crate) mod check;
pub(crate) mod create;
pub(crate) mod guard;
pub(crate) mod info;
pub(crate) mod measure;
pub(crate) mod preallocate;
pub(crate) mod repair;
pub(crate) mod resize;
