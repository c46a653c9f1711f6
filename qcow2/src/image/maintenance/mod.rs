//! Whole-image jobs: `create`, `info`, `measure` (qemu-img measure's sizes), `check` and
//! `repair` (check -r), `resize`, `amend` (with `downgrade` to compat=0.10 and
//! `amend_progress`, QEMU's progress figures), and `guard` (writes never land on metadata; the
//! layout is checked before the first write).

pub(crate) mod amend;
pub(crate) mod amend_progress;
pub(crate) mod check;
pub(crate) mod create;
pub(crate) mod downgrade;
pub(crate) mod guard;
pub(crate) mod info;
pub(crate) mod measure;
pub(crate) mod preallocate;
pub(crate) mod repair;
pub(crate) mod resize;
