//! The write gate: a caller that needs the image's guest content to stand still (a live group
//! snapshot) pauses guest writes. Writes already past the gate finish; new ones wait at it until
//! the last pause ends. Reads, flushes and metadata operations (staging, publishing, bitmaps)
//! never wait, so the pausing caller can stage and publish while guests still read.
//!
//! The gate is taken before the metadata lock and never while holding it, so a writer waiting
//! here holds nothing the pausing caller needs.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::image::Image;

#[derive(Default)]
struct GateState {
    /// Pauses in force (several callers may pause one image).
    pauses: u32,
    /// Writes past the gate and not finished.
    active: u32,
    /// Writes waiting at the gate.
    waiting: u32,
    /// Guest writes fail instead of waiting: a live transaction left the image in a state only
    /// recovery may finish.
    fenced: bool,
    /// Guest writes fail with `Superseded`: an external snapshot made an overlay the disk's
    /// top, and a write that waited here belongs there.
    superseded: bool,
}

/// Admission of guest writes, with pauses.
#[derive(Default)]
pub(crate) struct WriteGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The counters stay meaningful after a panicking writer: it left through `Pass::drop`.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// A guest write admitted through the gate; dropping it lets a pause complete.
pub(crate) struct Pass<'a>(&'a WriteGate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.active -= 1;
        // Only a pause waits for writes to drain; without one, a wake-up is a wasted syscall
        // on every guest write. A pause that starts after this unlock sees `active` already
        // lowered, so no wake-up is lost.
        let draining = g.pauses > 0;
        drop(g);
        if draining {
            self.0.changed.notify_all();
        }
    }
}

/// Writes paused on one image for as long as it lives (see [`Image::quiesce`]).
pub struct Quiesced<'a>(&'a Image);

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Quiesced").field(&self.0.name).finish()
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.0.resume_writes();
    }
}

impl Image {
    /// Waits until guest writes may go on, and counts this one in.
    pub(crate) fn write_pass(&self) -> crate::Result<Pass<'_>> {
        let gate = &self.gate;
        let mut g = gate.lock();
        // A superseded image's waiting writes still wait for the pause to end: the live
        // transaction that replaced it resumes every disk at one instant.
        if g.pauses > 0 && !g.fenced {
            g.waiting += 1;
            while g.pauses > 0 && !g.fenced {
                g = gate.wait(g);
            }
            g.waiting -= 1;
        }
        if g.fenced {
            return Err(crate::Error::InvalidArgument {
                image: self.name.clone(),
                reason: "writes are fenced: a live group transaction did not finish; close the \
                         image and run recover on its group"
                    .into(),
            });
        }
        if g.superseded {
            return Err(crate::Error::Superseded {
                image: self.name.clone(),
            });
        }
        g.active += 1;
        Ok(Pass(gate))
    }

    /// Stops admitting guest writes (`write_at`, `write_zeroes`, `discard`, `write_compressed`)
    /// and waits until those already admitted have finished. Every call must be matched by one
    /// [`Image::resume_writes`]; [`Image::quiesce`] pairs them for a scope.
    pub fn pause_writes(&self) {
        self.hold_writes();
        self.wait_writes_drained();
    }

    /// The first half of [`Image::pause_writes`]: new writes wait from now on, without waiting
    /// for those in flight. Pausing several images at one instant holds them all first, then
    /// waits for each to drain.
    pub(crate) fn hold_writes(&self) {
        self.gate.lock().pauses += 1;
    }

    /// The second half of [`Image::pause_writes`]: waits until no admitted write is in flight.
    pub(crate) fn wait_writes_drained(&self) {
        let gate = &self.gate;
        let mut g = gate.lock();
        while g.active > 0 {
            g = gate.wait(g);
        }
    }

    /// Makes every waiting and every later guest write fail: for an image whose live
    /// transaction is decided but not published, where a write could change data a staged
    /// snapshot shares. Only closing the image (and recovering its group) ends it.
    pub(crate) fn fence_writes(&self) {
        self.gate.lock().fenced = true;
        self.gate.changed.notify_all();
    }

    /// Makes every waiting and every later guest write fail with `Superseded`: an overlay is
    /// this image's disk's top now ([`crate::DiskTop`] sends the write there). Reads, and
    /// writes the overlay makes into its backing file (none today), are not guest writes.
    pub(crate) fn supersede_writes(&self) {
        self.gate.lock().superseded = true;
    }

    /// Ends one pause; writes go on once no pause is left.
    pub fn resume_writes(&self) {
        let gate = &self.gate;
        let mut g = gate.lock();
        g.pauses = g.pauses.saturating_sub(1);
        drop(g);
        gate.changed.notify_all();
    }

    /// Pauses guest writes until the returned guard is dropped.
    pub fn quiesce(&self) -> Quiesced<'_> {
        self.pause_writes();
        Quiesced(self)
    }

    /// Guest writes waiting at a paused gate (tests see a writer blocked without sleeping).
    pub(crate) fn writes_waiting(&self) -> u32 {
        self.gate.lock().waiting
    }
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, Image, MemoryStorage};

    fn image() -> Image {
        let options = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        Image::create_in(Box::new(MemoryStorage::new()), "mem", &options).unwrap()
    }

    #[test]
    fn a_paused_image_holds_new_writes_and_serves_reads() {
        let img = image();
        img.write_at(&[1; 512], 0).unwrap();
        std::thread::scope(|s| {
            let paused = img.quiesce();
            let writer = s.spawn(|| img.write_at(&[2; 512], 0).unwrap());
            while img.writes_waiting() == 0 {
                std::thread::yield_now();
            }
            let mut buf = [0; 512];
            img.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [1; 512], "a write got past the pause");
            drop(paused);
            writer.join().unwrap();
        });
        let mut buf = [0; 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 512]);
    }

    #[test]
    fn nested_pauses_release_writes_only_after_the_last() {
        let img = image();
        std::thread::scope(|s| {
            img.pause_writes();
            img.pause_writes();
            let writer = s.spawn(|| img.write_zeroes(0, 4096, false).unwrap());
            while img.writes_waiting() == 0 {
                std::thread::yield_now();
            }
            img.resume_writes();
            assert_eq!(img.writes_waiting(), 1, "one pause is still in force");
            img.resume_writes();
            writer.join().unwrap();
        });
    }

    #[test]
    fn a_fenced_image_fails_waiting_and_new_writes() {
        let img = image();
        std::thread::scope(|s| {
            img.pause_writes();
            let writer = s.spawn(|| img.write_at(&[2; 512], 0));
            while img.writes_waiting() == 0 {
                std::thread::yield_now();
            }
            img.fence_writes();
            assert!(writer.join().unwrap().is_err());
        });
        assert!(img.write_at(&[3; 512], 0).is_err());
        let mut buf = [1; 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 512]);
    }
}
