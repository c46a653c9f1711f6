//! A disk's top image as several users share it (an NBD export's connections, a VMM's I/O
//! threads). An external snapshot of the disk puts an overlay above the top while I/O goes on:
//! every user moves to the overlay at once, and a write that waited on the old top during the
//! snapshot's pause lands in the overlay, never below it.

use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::image::Image;

/// The image a disk's guest I/O goes to now: the disk's top, which an external snapshot
/// (`qcow2_transaction::Transaction::attach_top`) replaces with its new overlay.
///
/// Reads and metadata queries take [`DiskTop::image`]; guest writes go through
/// [`DiskTop::write`], which moves a write that reaches a replaced top on to its successor.
pub struct DiskTop {
    current: RwLock<Arc<Image>>,
}

impl std::fmt::Debug for DiskTop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DiskTop")
            .field(&self.image().name())
            .finish()
    }
}

impl DiskTop {
    /// A disk whose top is `image`.
    pub fn new(image: Arc<Image>) -> DiskTop {
        DiskTop {
            current: RwLock::new(image),
        }
    }

    /// The top now. A read through it sees every write completed before the call; a write
    /// through it may find it replaced (`Error::Superseded`): use [`DiskTop::write`].
    pub fn image(&self) -> Arc<Image> {
        // The slot holds a plain `Arc`: a panic elsewhere cannot leave it half-written.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs the guest write `write` on the top. When the top was replaced while the write
    /// waited (an external snapshot paused it), it runs again on the new top: the old one
    /// refuses before changing anything.
    pub fn write<T>(&self, mut write: impl FnMut(&Image) -> Result<T>) -> Result<T> {
        let mut image = self.image();
        loop {
            match write(&image) {
                Err(Error::Superseded { image: name }) => {
                    let next = self.image();
                    // The slot changes before the old top refuses writes, so a refusal always
                    // finds a newer top; an image superseded outside a `DiskTop` does not.
                    if Arc::ptr_eq(&next, &image) {
                        return Err(Error::Superseded { image: name });
                    }
                    image = next;
                }
                other => return other,
            }
        }
    }

    /// Closes the top and, going down its chain, every image nobody else holds (the overlays
    /// external snapshots put over one another keep the images below them).
    pub fn close(self) -> Result<()> {
        let mut next = Some(
            self.current
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        );
        while let Some(image) = next.take() {
            let Ok(image) = Arc::try_unwrap(image) else {
                // Still someone's handle: closing it is theirs.
                break;
            };
            next = image.backing_arc().cloned();
            image.close()?;
        }
        Ok(())
    }

    /// Makes `overlay` the top. Its backing image must be the current top, and guest writes on
    /// the current top must be paused; waiting and later writes on it then fail with
    /// `Superseded`, and [`DiskTop::write`] sends them to `overlay`. Returns the old top.
    pub(crate) fn push(&self, overlay: Arc<Image>) -> Result<Arc<Image>> {
        let mut slot = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let old = slot.clone();
        match overlay.backing_arc() {
            Some(below) if Arc::ptr_eq(below, &old) => {}
            _ => {
                return Err(Error::InvalidArgument {
                    image: overlay.name().to_string(),
                    reason: format!(
                        "its backing image is not the disk's current top {}",
                        old.name()
                    ),
                })
            }
        }
        *slot = overlay;
        drop(slot);
        old.supersede_writes();
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, MemoryStorage};

    fn image(size: u64, backing: Option<Arc<Image>>) -> Image {
        let mut img = Image::create_in(
            Box::new(MemoryStorage::new()),
            "mem",
            &CreateOptions::new(size),
        )
        .unwrap();
        if let Some(b) = backing {
            img.attach_shared_backing(b);
        }
        img
    }

    #[test]
    fn a_write_waiting_on_a_replaced_top_lands_in_the_overlay() {
        let base = Arc::new(image(1 << 20, None));
        base.write_at(&[1; 512], 0).unwrap();
        let top = DiskTop::new(base.clone());
        let overlay = Arc::new(image(1 << 20, Some(base.clone())));
        std::thread::scope(|s| {
            base.pause_writes();
            let writer = s.spawn(|| top.write(|img| img.write_at(&[2; 512], 0)));
            while base.writes_waiting() == 0 {
                std::thread::yield_now();
            }
            let old = top.push(overlay.clone()).unwrap();
            assert!(Arc::ptr_eq(&old, &base));
            base.resume_writes();
            writer.join().unwrap().unwrap();
        });
        let mut buf = [0; 512];
        base.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 512], "the write went below the new top");
        top.image().read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 512]);
        assert!(matches!(
            base.write_at(&[3; 512], 0),
            Err(Error::Superseded { .. })
        ));
    }

    #[test]
    fn only_an_overlay_of_the_current_top_is_pushed() {
        let base = Arc::new(image(1 << 20, None));
        let top = DiskTop::new(base.clone());
        let stranger = Arc::new(image(1 << 20, None));
        assert!(top.push(stranger).is_err());
        assert!(Arc::ptr_eq(&top.image(), &base));
        base.write_at(&[1; 512], 0).unwrap();
    }
}
