//! qemu-io's blkdebug breakpoints (`break EVENT TAG`, `wait_break`, `resume`, `remove_break`)
//! over aio requests, as iotest 046 drives them. This engine completes each request before
//! the next command, so a breakpoint is kept as qemu-io's scheduling would play out: the next
//! `aio_write` (`write_aio`) or `aio_read` (`read_aio`) after `break` stops at the event and
//! is reported suspended; later aio requests touching a cluster it touches wait behind it (as
//! QEMU's cluster allocation makes them wait), others run at once; `resume` runs the
//! suspended request, then those waiting, in order. Breakpoints on other events never stop a
//! request (this model cannot tell whether a request reaches them).

/// A request held back, with the guest range it touches.
pub struct Held {
    pub name: String,
    pub words: Vec<String>,
    range: (u64, u64),
}

struct Suspended {
    tag: String,
    request: Held,
    /// Requests waiting behind this one.
    waiting: Vec<Held>,
}

/// The breakpoints set and the requests they hold.
#[derive(Default)]
pub struct Breaks {
    /// `(event, tag)` breakpoints not yet hit.
    armed: Vec<(String, String)>,
    suspended: Vec<Suspended>,
}

/// What the session does after a breakpoint command.
pub enum Outcome {
    /// Done, with whether it succeeded.
    Done(bool),
    /// Resumed: run these requests now, in order.
    Run(Vec<Held>),
}

impl Breaks {
    /// `break`, `remove_break`, `resume`, `wait_break`; `node` says whether a blkdebug node
    /// sits over the image (where breakpoints live).
    pub fn command(&mut self, name: &str, args: &[&str], node: bool) -> Outcome {
        match (name, args) {
            ("break", [event, tag]) => {
                if !node {
                    outln!("Could not set breakpoint: Operation not supported");
                    return Outcome::Done(false);
                }
                if !crate::nodes::blkdebug::is_event(event) {
                    outln!("Could not set breakpoint: No such file or directory");
                    return Outcome::Done(false);
                }
                self.armed.push((event.to_string(), tag.to_string()));
                Outcome::Done(true)
            }
            ("remove_break", [tag]) => {
                let before = self.armed.len();
                self.armed.retain(|(_, t)| t != tag);
                let removed = self.armed.len() != before;
                let run = self.resume_all(tag);
                if !removed && run.is_empty() {
                    outln!("Could not remove breakpoint {tag}: No such file or directory");
                    return Outcome::Done(false);
                }
                Outcome::Run(run)
            }
            ("resume", [tag]) => {
                let Some(i) = self.suspended.iter().position(|s| s.tag == *tag) else {
                    outln!("Could not resume request: No such file or directory");
                    return Outcome::Done(false);
                };
                Outcome::Run(self.resume_at(i))
            }
            // A request stops at its breakpoint as it is issued here, so there is nothing left
            // to wait for (one that never stops would make qemu-io wait forever).
            ("wait_break", [_]) => Outcome::Done(true),
            _ => {
                outln!("{name}: wrong number of arguments");
                Outcome::Done(false)
            }
        }
    }

    fn resume_at(&mut self, i: usize) -> Vec<Held> {
        let s = self.suspended.remove(i);
        outln!("blkdebug: Resuming request '{}'", s.tag);
        let mut run = vec![s.request];
        run.extend(s.waiting);
        run
    }

    fn resume_all(&mut self, tag: &str) -> Vec<Held> {
        let mut run = Vec::new();
        while let Some(i) = self.suspended.iter().position(|s| s.tag == tag) {
            run.extend(self.resume_at(i));
        }
        run
    }

    /// Takes an aio request (`aio_write`/`aio_read` with its words; `range` the guest bytes
    /// it touches, widened to whole clusters) when a breakpoint stops it or a suspended
    /// request holds it back; `None` when it runs now.
    pub fn hold(&mut self, name: &str, words: &[&str], range: (u64, u64)) -> Option<()> {
        let request = Held {
            name: name.to_owned(),
            words: words.iter().map(|w| w.to_string()).collect(),
            range,
        };
        let overlaps = |r: &Held| r.range.0 < range.1 && range.0 < r.range.1;
        if let Some(s) = self
            .suspended
            .iter_mut()
            .find(|s| overlaps(&s.request) || s.waiting.iter().any(overlaps))
        {
            s.waiting.push(request);
            return Some(());
        }
        let event = if name == "aio_write" {
            "write_aio"
        } else {
            "read_aio"
        };
        let i = self.armed.iter().position(|(e, _)| e == event)?;
        let (_, tag) = self.armed.remove(i);
        outln!("blkdebug: Suspended request '{tag}'");
        self.suspended.push(Suspended {
            tag,
            request,
            waiting: Vec::new(),
        });
        Some(())
    }

    /// Whether anything is set or held (aio requests then go through [`Breaks::hold`]).
    pub fn active(&self) -> bool {
        !self.armed.is_empty() || !self.suspended.is_empty()
    }

    /// Requests still held (at `aio_flush` or close): QEMU would wait for them forever; they
    /// run here, so nothing is lost.
    pub fn release(&mut self) -> Vec<Held> {
        let mut run = Vec::new();
        for s in self.suspended.drain(..) {
            run.push(s.request);
            run.extend(s.waiting);
        }
        run
    }
}
