//! Persistent dirty bitmap changes as transaction actions (QMP's `block-dirty-bitmap-*`).
//!
//! A bitmap change writes nothing before the group's decision: validation replays the plan's
//! changes on a model of each image's bitmaps (so a plan QEMU would refuse is refused before any
//! write), and the changes are applied after the decision, once every snapshot switch is
//! published, one at a time in plan order per image, each followed by a journal record. Recovery
//! goes on from the first change without its record. That one change may have landed already,
//! so each change is idempotent on its own:
//!
//! - add skips a bitmap of that name that exists already, remove skips one that is gone;
//! - enable, disable and clear set a state, merge sets bits (a union) read from sources that no
//!   later change has touched yet; a bitmap of another image that a merge reads belongs to an
//!   image the plan does not change.
//!
//! Bitmaps added to an overlay the plan creates are added while preparing, to the overlay under
//! its temporary name, which no reader sees until the commit renames it.

use std::path::{Path, PathBuf};

use qcow2::Image;

use crate::codec::{Reader, Writer};
use crate::error::TxnError;

/// One bitmap a merge reads (QMP's `BlockDirtyBitmapOrStr`): a bitmap of the target's image, or
/// of another image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSource {
    /// `None`: the image of the merge's target.
    pub image: Option<PathBuf>,
    /// The bitmap's name.
    pub name: String,
}

/// A validated bitmap change of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BitmapChange {
    Add {
        name: String,
        granularity: u64,
        disabled: bool,
    },
    Remove {
        name: String,
    },
    Clear {
        name: String,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    /// Sources are `(image, name)`; the image is canonical, `None` for the target's own image.
    Merge {
        target: String,
        sources: Vec<(Option<PathBuf>, String)>,
    },
}

/// Reads another image's size and bitmap list.
pub(crate) type OtherImage<'a> =
    dyn FnMut(&Path) -> Result<(u64, Vec<qcow2::image::BitmapInfo>), TxnError> + 'a;

/// What validation knows of one bitmap while it replays a plan.
#[derive(Debug, Clone)]
struct Modelled {
    name: String,
    in_use: bool,
}

/// Replays `changes` on the bitmaps `img` has now and refuses what QEMU would refuse, with its
/// messages. `others` reads a bitmap list of another image (for merge sources).
pub(crate) fn check(
    img: &Image,
    path: &Path,
    changes: &[BitmapChange],
    other: &mut OtherImage<'_>,
) -> Result<(), TxnError> {
    let invalid = |reason: String| TxnError::Invalid {
        image: path.to_path_buf(),
        reason,
    };
    let mut model: Vec<Modelled> = img
        .bitmaps()
        .into_iter()
        .map(|b| Modelled {
            name: b.name,
            in_use: b.in_use,
        })
        .collect();
    let find = |model: &[Modelled], name: &str| -> Result<usize, TxnError> {
        model
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| invalid(format!("Dirty bitmap '{name}' not found")))
    };
    let usable = |model: &[Modelled], name: &str| -> Result<usize, TxnError> {
        let i = find(model, name)?;
        if model[i].in_use {
            return Err(invalid(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(i)
    };
    for change in changes {
        match change {
            BitmapChange::Add {
                name, granularity, ..
            } => {
                if model.iter().any(|b| &b.name == name) {
                    return Err(invalid(format!("Bitmap already exists: {name}")));
                }
                img.check_new_bitmap(name, *granularity)
                    .map_err(|e| invalid(reason(e)))?;
                if model.len() as u32 >= qcow2::format::limits::MAX_BITMAPS {
                    return Err(invalid(format!(
                        "Can't have more than {} bitmaps",
                        qcow2::format::limits::MAX_BITMAPS
                    )));
                }
                model.push(Modelled {
                    name: name.clone(),
                    in_use: false,
                });
            }
            BitmapChange::Remove { name } => {
                let i = find(&model, name)?;
                model.remove(i);
            }
            BitmapChange::Clear { name }
            | BitmapChange::Enable { name }
            | BitmapChange::Disable { name } => {
                usable(&model, name)?;
            }
            BitmapChange::Merge { target, sources } => {
                usable(&model, target)?;
                for (image, name) in sources {
                    match image {
                        None => {
                            usable(&model, name)?;
                        }
                        Some(source) => {
                            let (size, list) = other(source)?;
                            let found = list.iter().find(|b| &b.name == name).ok_or_else(|| {
                                invalid(format!(
                                    "Dirty bitmap '{name}' not found in {}",
                                    source.display()
                                ))
                            })?;
                            if found.in_use {
                                return Err(invalid(format!(
                                    "Bitmap '{name}' of {} is inconsistent and cannot be used",
                                    source.display()
                                )));
                            }
                            if size != img.size() {
                                return Err(invalid(format!(
                                    "Bitmaps are incompatible and can't be merged: {} is {size} \
                                     bytes, this image {}",
                                    source.display(),
                                    img.size()
                                )));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The reason of an image's refusal, without the image name `check` already reports.
fn reason(e: qcow2::Error) -> String {
    match e {
        qcow2::Error::InvalidArgument { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Applies `changes` to `img` in order, each one idempotent (see the module doc). `open_source`
/// opens another image, read-only, for a merge.
pub(crate) fn apply(
    img: &Image,
    path: &Path,
    changes: &[BitmapChange],
    open_source: &dyn Fn(&Path) -> qcow2::Result<Image>,
) -> Result<(), TxnError> {
    let err = |e| TxnError::image(path, e);
    for change in changes {
        let exists = |name: &str| img.bitmaps().iter().any(|b| b.name == name);
        match change {
            BitmapChange::Add {
                name,
                granularity,
                disabled,
            } => {
                if !exists(name) {
                    img.add_bitmap(name, *granularity, *disabled).map_err(err)?;
                }
            }
            BitmapChange::Remove { name } => {
                if exists(name) {
                    img.remove_bitmap(name).map_err(err)?;
                }
            }
            BitmapChange::Clear { name } => img.clear_bitmap(name).map_err(err)?,
            BitmapChange::Enable { name } => img.set_bitmap_enabled(name, true).map_err(err)?,
            BitmapChange::Disable { name } => img.set_bitmap_enabled(name, false).map_err(err)?,
            BitmapChange::Merge { target, sources } => {
                for (image, name) in sources {
                    match image {
                        None => img.merge_bitmap(target, name, None).map_err(err)?,
                        Some(source) => {
                            let other =
                                open_source(source).map_err(|e| TxnError::image(source, e))?;
                            img.merge_bitmap(target, name, Some(&other)).map_err(err)?;
                            other.close().map_err(|e| TxnError::image(source, e))?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The journal payload of one image's bitmap changes: its index, then each change.
pub(crate) fn encode(index: usize, changes: &[BitmapChange]) -> Vec<u8> {
    let mut w = Writer::default()
        .u64(index as u64)
        .u64(changes.len() as u64);
    for c in changes {
        w = match c {
            BitmapChange::Add {
                name,
                granularity,
                disabled,
            } => w
                .u64(1)
                .bytes(name.as_bytes())
                .u64(*granularity)
                .u64(u64::from(*disabled)),
            BitmapChange::Remove { name } => w.u64(2).bytes(name.as_bytes()),
            BitmapChange::Clear { name } => w.u64(3).bytes(name.as_bytes()),
            BitmapChange::Enable { name } => w.u64(4).bytes(name.as_bytes()),
            BitmapChange::Disable { name } => w.u64(5).bytes(name.as_bytes()),
            BitmapChange::Merge { target, sources } => {
                let mut w = w.u64(6).bytes(target.as_bytes()).u64(sources.len() as u64);
                for (image, name) in sources {
                    let image = image
                        .as_ref()
                        .map(|p| p.as_os_str().as_encoded_bytes())
                        .unwrap_or_default();
                    w = w.bytes(image).bytes(name.as_bytes());
                }
                w
            }
        };
    }
    w.0
}

/// Decodes [`encode`]'s payload; `None` when it is malformed.
pub(crate) fn decode(payload: &[u8]) -> Option<(u64, Vec<BitmapChange>)> {
    let mut r = Reader(payload);
    let index = r.u64()?;
    let count = r.u64()?;
    let text = |r: &mut Reader| -> Option<String> { String::from_utf8(r.bytes()?.to_vec()).ok() };
    let mut changes = Vec::new();
    for _ in 0..count {
        changes.push(match r.u64()? {
            1 => BitmapChange::Add {
                name: text(&mut r)?,
                granularity: r.u64()?,
                disabled: r.u64()? != 0,
            },
            2 => BitmapChange::Remove {
                name: text(&mut r)?,
            },
            3 => BitmapChange::Clear {
                name: text(&mut r)?,
            },
            4 => BitmapChange::Enable {
                name: text(&mut r)?,
            },
            5 => BitmapChange::Disable {
                name: text(&mut r)?,
            },
            6 => {
                let target = text(&mut r)?;
                let n = r.u64()?;
                let mut sources = Vec::new();
                for _ in 0..n {
                    let image = r.bytes()?;
                    let image =
                        (!image.is_empty()).then(|| PathBuf::from(crate::codec::os_str(image)));
                    sources.push((image, text(&mut r)?));
                }
                BitmapChange::Merge { target, sources }
            }
            _ => return None,
        });
    }
    r.0.is_empty().then_some((index, changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_truncated_payloads_are_refused() {
        let changes = vec![
            BitmapChange::Add {
                name: "b1".into(),
                granularity: 65536,
                disabled: true,
            },
            BitmapChange::Disable { name: "b0".into() },
            BitmapChange::Merge {
                target: "b1".into(),
                sources: vec![
                    (None, "b0".into()),
                    (Some(PathBuf::from("/vm/other.qcow2")), "x".into()),
                ],
            },
            BitmapChange::Clear { name: "b0".into() },
            BitmapChange::Enable { name: "b0".into() },
            BitmapChange::Remove { name: "b0".into() },
        ];
        let bytes = encode(3, &changes);
        assert_eq!(decode(&bytes), Some((3, changes)));
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
