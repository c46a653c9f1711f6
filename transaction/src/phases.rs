//! The phases of one group transaction, as a caller drives them (QEMU's transaction API, with a
//! durable decision between prepare and commit):
//!
//! - [`Group::begin`] finishes an interrupted transaction and gives a [`Transaction`];
//! - [`Transaction::add`] validates the plan with one more action at once and names the action
//!   it refuses; [`Transaction::attach`] lets actions reach an image the caller holds open;
//! - [`Transaction::prepare`] journals every image, stages each new state where no reader sees
//!   it, and gives a [`Prepared`] transaction;
//! - [`Prepared::commit`] writes the decision (the commit point), publishes and cleans up;
//!   [`Prepared::abort`], or dropping a [`Prepared`], takes everything back.
//!
//! Live images (attached handles) are paused at one instant: every one is held first (new guest
//! writes wait, reads go on), then each drains its in-flight writes. The pause lasts from the
//! staging of their steps to the last publish and bitmap change after the decision, so the
//! group is a crash-consistent cut. Before it, outside the pause: validation, opening the other
//! images, writing back what the live images cache, the journal's intent records, and every
//! step on an image nobody else has open (overlays are created then). Inside it: staging on the
//! live images (copy of the L1 table, the new snapshot table, raised refcounts, one sync each),
//! the decision record (one sync), the header switches (one sync each) and the bitmap changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2::{DiskTop, Image};

use crate::codec::Writer;
use crate::error::TxnError;
use crate::group::{
    each_selected, plan_steps, validate, Action, Group, LiveHandle, NewRecord, Outcome,
};
use crate::journal::{Journal, Kind};
use crate::step::Step;

/// A transaction being planned: nothing is written until [`Transaction::prepare`].
pub struct Transaction<'g> {
    group: &'g mut Group,
    pub(crate) actions: Vec<Action>,
    /// Live handles, with their canonical paths.
    live: Vec<LiveHandle>,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("actions", &self.actions)
            .field(
                "live",
                &self.live.iter().map(|h| &h.path).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Group {
    /// Starts a transaction, after finishing one a crash interrupted.
    pub fn begin(&mut self) -> Result<Transaction<'_>, TxnError> {
        self.recover()?;
        Ok(Transaction {
            group: self,
            actions: Vec::new(),
            live: Vec::new(),
        })
    }

    /// Runs `actions` atomically: every one takes effect, or none does, also across a crash
    /// (after `recover`). The one-call form of `begin`, `prepare` and `commit`.
    ///
    /// Errors: `Invalid` (refused, nothing written), `Aborted` (rolled back, nothing changed),
    /// `AbortIncomplete` and `InDoubt` (nothing published; `recover` finishes the cleanup or
    /// decides from the journal), `CommittedIncomplete` (committed; `recover` finishes it).
    pub fn run(&mut self, actions: &[Action]) -> Result<Outcome, TxnError> {
        let mut txn = self.begin()?;
        txn.actions = actions.to_vec();
        txn.prepare()?.commit()
    }
}

impl<'g> Transaction<'g> {
    /// Lets actions act on `handle`, an image the caller holds open for writing (and keeps
    /// serving I/O through), instead of opening its file: actions name it by its path (any
    /// spelling of it). Returns the canonical path.
    pub fn attach(&mut self, handle: Arc<Image>) -> Result<PathBuf, TxnError> {
        self.attach_live(handle, None)
    }

    /// As [`Transaction::attach`] for the image `top` serves now, and an external snapshot of
    /// it (`Action::ExternalCreate`) makes its overlay `top`'s image inside the pause: guest
    /// writes that waited, and every later one, go to the overlay.
    pub fn attach_top(&mut self, top: Arc<DiskTop>) -> Result<PathBuf, TxnError> {
        self.attach_live(top.image(), Some(top))
    }

    fn attach_live(
        &mut self,
        handle: Arc<Image>,
        top: Option<Arc<DiskTop>>,
    ) -> Result<PathBuf, TxnError> {
        let named = handle
            .path()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(handle.name()));
        let invalid = |reason: String| TxnError::Invalid {
            image: named.clone(),
            reason,
        };
        if !handle.is_writable() {
            return Err(invalid("the handle is read-only".into()));
        }
        let path = self
            .group
            .fs
            .canonicalize(&named)
            .map_err(|e| invalid(format!("the handle's file cannot be found: {e}")))?;
        match self.live.iter_mut().find(|h| h.path == path) {
            Some(h) if Arc::ptr_eq(&h.image, &handle) => {
                if top.is_some() {
                    h.top = top;
                }
            }
            Some(_) => return Err(invalid("another handle of this file is attached".into())),
            None => self.live.push(LiveHandle {
                path: path.clone(),
                image: handle,
                top,
            }),
        }
        Ok(path)
    }

    /// Adds `action` after checking the plan with it against the images as they are now (what
    /// `prepare` checks again); a refused action is named and left out.
    pub fn add(&mut self, action: Action) -> Result<(), TxnError> {
        self.actions.push(action);
        let checked = self.validate().map(drop);
        checked.map_err(|reason| {
            let index = self.actions.len() - 1;
            let action = self.actions.pop().map(|a| a.describe()).unwrap_or_default();
            TxnError::Refused {
                index,
                action,
                reason: Box::new(reason),
            }
        })
    }

    /// The actions added so far.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    fn validate(&self) -> Result<Vec<crate::group::Member>, TxnError> {
        let fs = &*self.group.fs;
        let group_dir = fs
            .canonicalize(&self.group.dir)
            .map_err(|e| TxnError::io(&self.group.dir, e))?;
        validate(
            fs,
            &self.actions,
            &self.group.manifest()?,
            &group_dir,
            &self.live,
        )
    }

    /// Validates the plan, journals every image it touches and stages each new state: readers
    /// see the old state, and a crash leaves at most leaked clusters. Live images are paused from
    /// their staging on (see the module doc). On error nothing has changed (`Invalid`,
    /// `Aborted`) or `recover` finishes the rollback (`AbortIncomplete`).
    pub fn prepare(self) -> Result<Prepared<'g>, TxnError> {
        let members = self.validate()?;
        let group = self.group;
        let live: Vec<Arc<Image>> = members
            .iter()
            .filter_map(|m| m.image.as_ref()?.live().cloned())
            .collect();
        // Write back what the live images cache now, so the flush inside the pause finds little.
        for (img, path) in live.iter().zip(members.iter().filter(|m| m.is_live())) {
            img.flush().map_err(|e| TxnError::image(&path.path, e))?;
        }
        let nonce: [u8; 8] = crate::fs::random_bytes()[..8]
            .try_into()
            .unwrap_or_default();
        let txn = group.id.bind(nonce);
        let journal = group
            .start_journal(txn)
            .map_err(|e| TxnError::Aborted(Box::new(e)))?;
        let images: Vec<PathBuf> = members.iter().map(|m| m.path.clone()).collect();
        let overlays: Vec<PathBuf> = members.iter().filter_map(|m| m.overlay.clone()).collect();
        let (records, steps) = plan_steps(&*group.fs, members, &txn);
        let mut prepared = Prepared {
            group,
            journal,
            steps,
            staged: Vec::new(),
            outcome: Outcome {
                images,
                overlays,
                paused: None,
            },
            live,
            paused_at: None,
            state: State::Open,
        };
        match prepared.prepare(&records) {
            Ok(()) => Ok(prepared),
            Err(e @ TxnError::Interrupted(_)) => {
                prepared.state = State::Cut;
                Err(e)
            }
            Err(e) => Err(prepared.abort_with(e)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Prepared, no decision yet: dropping aborts.
    Open,
    /// Committed or aborted.
    Done,
    /// A simulated power cut stopped it: nothing more is written, as after a real one.
    Cut,
}

/// A prepared transaction: every new state staged, no decision yet. Commit it, or abort it
/// (dropping it aborts too).
pub struct Prepared<'g> {
    group: &'g mut Group,
    journal: Journal,
    steps: Vec<Box<dyn Step>>,
    /// The `Staged` payloads recovery needs, journaled with the decision.
    staged: Vec<Vec<u8>>,
    outcome: Outcome,
    /// Live images, paused while `paused_at` is set.
    live: Vec<Arc<Image>>,
    paused_at: Option<Instant>,
    state: State,
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("images", &self.outcome.images)
            .field("live", &self.live.len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Prepared<'_> {
    /// Journals members and intents (one sync: recovery knows every file the transaction may
    /// touch before anything is touched), prepares the steps on images nobody else has open,
    /// then pauses the live images and stages theirs.
    fn prepare(&mut self, records: &[NewRecord]) -> Result<(), TxnError> {
        let journal_path = self.group.journal_path();
        let mut first = vec![(Kind::Begin, Vec::new())];
        first.extend(records.iter().cloned());
        self.journal
            .append_all(first)
            .map_err(|e| TxnError::io(&journal_path, e))?;
        self.group.event("begin")?;
        let mut staged = Vec::new();
        for live in [false, true] {
            if live {
                self.pause()?;
            }
            let selected = self.steps.iter_mut().filter(|s| s.live() == live).collect();
            for r in each_selected(&*self.group.fs, selected, |step, fs| step.prepare(fs)) {
                staged.extend(r?);
            }
        }
        self.staged = staged;
        for i in 0..self.steps.len() {
            self.group.event(&format!("prepared {i}"))?;
        }
        Ok(())
    }

    /// Holds every live image's writes at one instant, then waits for each to drain.
    fn pause(&mut self) -> Result<(), TxnError> {
        if self.live.is_empty() {
            return Ok(());
        }
        for img in &self.live {
            qcow2::transaction_support::hold_writes(img);
        }
        self.paused_at = Some(Instant::now());
        for img in &self.live {
            qcow2::transaction_support::wait_writes_drained(img);
        }
        self.group.event("quiesced")
    }

    /// Lets the live images' writes go on; returns how long they were paused.
    fn resume(&mut self) -> Option<Duration> {
        let since = self.paused_at.take()?;
        for img in &self.live {
            img.resume_writes();
        }
        Some(since.elapsed())
    }

    /// Writes the decision, the commit point, then publishes every image, applies the bitmap
    /// changes, resumes the live images and cleans up.
    ///
    /// Errors: `Aborted` (the decision could not be written and everything was taken back),
    /// `InDoubt` (`recover` decides from the journal), `CommittedIncomplete` (committed; live
    /// images whose switch may be missing have their writes fenced; `recover` finishes it).
    pub fn commit(mut self) -> Result<Outcome, TxnError> {
        let result = self.commit_inner();
        self.state = match &result {
            Err(TxnError::Interrupted(_)) => State::Cut,
            _ => State::Done,
        };
        if let (Err(TxnError::CommittedIncomplete(_)), Some(_)) = (&result, self.paused_at) {
            // Still paused: a switch may be missing, and recovery may still publish a staged
            // state whose clusters a guest write would change in place.
            for img in &self.live {
                qcow2::transaction_support::fence_writes(img);
            }
        }
        result.map(|()| self.outcome.clone())
    }

    fn commit_inner(&mut self) -> Result<(), TxnError> {
        // The commit point: what recovery needs to publish, and the decision, under one checksum
        // and one sync. When the record may be half-written, an abort record written over it
        // settles the question; if even that fails, recovery decides from what is on disk.
        let journal_path = self.group.journal_path();
        let mut decision: Vec<NewRecord> = std::mem::take(&mut self.staged)
            .into_iter()
            .map(|p| (Kind::Staged, p))
            .collect();
        decision.push((Kind::Prepared, Vec::new()));
        decision.push((Kind::Decision, vec![1]));
        self.group.fs.event("decision_write");
        if let Err(e) = self.journal.append_all(decision) {
            let e = TxnError::io(&journal_path, e);
            return Err(match self.journal.append(Kind::Decision, vec![0]) {
                Ok(()) => self.abort_with(e),
                Err(_) => {
                    // Recovery may yet publish the staged states: no guest write may change
                    // what they share before it.
                    for img in &self.live {
                        qcow2::transaction_support::fence_writes(img);
                    }
                    TxnError::InDoubt(Box::new(e))
                }
            });
        }
        self.group.event("prepared")?;
        self.group.event("decided")?;

        // Roll forward; failures from here on are finished by recover.
        let incomplete = |e| TxnError::CommittedIncomplete(Box::new(e));
        let original = self.group.manifest().map_err(incomplete)?;
        let mut manifest = original.clone();
        let published = each_selected(
            &*self.group.fs,
            self.steps.iter_mut().collect(),
            |step, fs| step.commit(fs),
        );
        for (i, pivot) in published.into_iter().enumerate() {
            if let Some((old_top, new_top)) = pivot.map_err(incomplete)? {
                manifest.pivot(&old_top, &new_top);
            }
            self.group.event(&format!("published {i}"))?;
        }
        // Bitmap changes, one at a time, each journaled once done: recovery goes on from the
        // first one not done, and one change applied twice is the same change.
        for (i, step) in self.steps.iter().enumerate() {
            let Some((image, path, changes)) = step.bitmaps() else {
                continue;
            };
            for (k, change) in changes.iter().enumerate() {
                self.group.fs.event("bitmap_apply");
                let fs = &*self.group.fs;
                crate::bitmaps::apply(image, path, std::slice::from_ref(change), &|p| {
                    fs.open_read_only(p)
                })
                .map_err(incomplete)?;
                let done = Writer::default().u64(i as u64).u64(k as u64);
                self.journal
                    .append(Kind::BitmapDone, done.0)
                    .map_err(|e| incomplete(TxnError::io(&journal_path, e)))?;
                self.group.event(&format!("bitmap {i}.{k} applied"))?;
            }
        }
        // Every live image shows its new state: guests write on.
        self.outcome.paused = self.resume();
        if manifest != original {
            manifest.generation += 1;
            let at = self.group.manifest_path();
            manifest
                .store(&*self.group.fs, &at)
                .map_err(|e| incomplete(TxnError::io(&at, e)))?;
        }
        let cleaned = each_selected(
            &*self.group.fs,
            self.steps.iter_mut().collect(),
            |step, fs| step.clean(fs),
        );
        for c in cleaned {
            c.map_err(incomplete)?;
        }
        self.group.event("closed")?;
        self.journal
            .finish()
            .map_err(|e| incomplete(TxnError::io(&journal_path, e)))
    }

    /// Takes back everything `prepare` built and resumes the live images. `Err` only when the
    /// rollback could not finish (`AbortIncomplete`: `recover` finishes it).
    pub fn abort(mut self) -> Result<(), TxnError> {
        let cause = TxnError::Interrupted("abort requested by the caller".into());
        match self.abort_with(cause) {
            TxnError::Aborted(_) => Ok(()),
            e => Err(e),
        }
    }

    /// Takes back what preparing built, newest first, resumes the live images (their old state
    /// is what readers saw all along) and closes the journal. Returns the error to report:
    /// `Aborted` when everything is undone, `AbortIncomplete` when `recover` must finish (the
    /// journal then stays open and recovery rolls back).
    fn abort_with(&mut self, cause: TxnError) -> TxnError {
        self.state = State::Done;
        self.group.fs.event("abort");
        let mut undone = true;
        for step in self.steps.iter_mut().rev() {
            undone &= step.abort(&*self.group.fs).is_ok();
        }
        self.resume();
        for step in self.steps.iter_mut() {
            undone &= step.clean(&*self.group.fs).is_ok();
        }
        undone = undone && self.journal.finish().is_ok();
        if undone {
            TxnError::Aborted(Box::new(cause))
        } else {
            TxnError::AbortIncomplete(Box::new(cause))
        }
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        if self.state == State::Open {
            let _ = self.abort_with(TxnError::Interrupted("dropped before a decision".into()));
        }
        // After a simulated power cut the test owns what is left; its writers must not hang.
        self.resume();
    }
}
