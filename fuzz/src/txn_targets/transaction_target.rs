//! `transaction`: a plan, an optional injected error and a power cut, checked all-or-nothing.

use super::*;

/// Known findings the fuzz binaries step over while their fix is outstanding, so one finding
/// does not hide the next: `run.sh` sets `QCOW2_FUZZ_TOLERATE_KNOWN`; the stable replay test
/// does not, so the regression inputs (listed in `regressions/KNOWN_FAILING`) still fail there.
#[allow(dead_code)] // used while a finding is outstanding; none is now
pub(crate) fn tolerate_known() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    TOLERATE_KNOWN.load(Ordering::Relaxed)
        || *SET.get_or_init(|| std::env::var_os("QCOW2_FUZZ_TOLERATE_KNOWN").is_some())
}

/// Set by the replay of a local corpus, which the fuzzer grew while stepping over known findings.
pub static TOLERATE_KNOWN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether `validate` must accept the plan, from the configs alone: names must exist (id first,
/// then name) for delete and revert, be new and non-empty for create, no snapshot is deleted
/// twice or reverted to after its delete, an image gets at most one overlay and then no internal
/// change, and an overlay path must be free, in an existing directory, and not chosen twice.
pub(crate) fn expect_valid(images: &[ImageConfig], actions: &[u8]) -> bool {
    #[derive(Default)]
    struct Changes {
        created: Vec<&'static str>,
        deleted: Vec<usize>,
        internal: bool,
        reverted: bool,
        overlay: Option<&'static str>,
        b1: bool,
    }
    let mut per: Vec<Changes> = images.iter().map(|_| Changes::default()).collect();
    for &a in actions {
        let a = ActionSel(a);
        let Some(i) = a.image(images.len()) else {
            return false;
        };
        let existing: Vec<(String, String)> = (0..images[i].snapshots())
            .map(|k| ((k + 1).to_string(), format!("s{k}")))
            .collect();
        let find = |key: &str| {
            existing
                .iter()
                .position(|(id, _)| id == key)
                .or_else(|| existing.iter().position(|(_, n)| n == key))
        };
        let c = &mut per[i];
        let name = a.name();
        match a.bitmap() {
            Some(BitmapSel::AddB1) => {
                if c.b1 {
                    return false;
                }
                c.b1 = true;
                continue;
            }
            Some(BitmapSel::ClearB0) => {
                if !images[i].bitmap() {
                    return false;
                }
                continue;
            }
            None => {}
        }
        // The engine stages a revert only as an image's last change.
        if c.reverted && a.0 & 3 != 3 {
            return false;
        }
        match a.0 & 3 {
            0 => {
                if name.is_empty()
                    || c.created.contains(&name)
                    || existing.iter().any(|(_, n)| n == name)
                {
                    return false;
                }
                c.created.push(name);
                c.internal = true;
            }
            kind @ (1 | 2) => {
                let Some(k) = find(name) else { return false };
                if c.deleted.contains(&k) {
                    return false;
                }
                if kind == 1 {
                    c.deleted.push(k);
                } else {
                    c.reverted = true;
                }
                c.internal = true;
            }
            _ => {
                let o = a.overlay();
                if c.overlay.is_some() || o.starts_with("/nodir/") || o.starts_with(GROUP) {
                    return false;
                }
                c.overlay = Some(o);
            }
        }
    }
    let mut overlays = BTreeSet::new();
    for c in &per {
        if let Some(o) = c.overlay {
            let taken = (0..images.len()).any(|i| image_path(i) == Path::new(o));
            if c.internal || taken || !overlays.insert(o) {
                return false;
            }
        }
    }
    true
}

/// Fault and crash choices: `[flags][fault at: u16][cut: u32][survivors][seed: u32]`. Flags: bit
/// 0 injects a fault, bit 1 picks ENOSPC over EIO, bit 2 makes it persistent, bit 3 skips the
/// crash (recover what the run left).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trouble {
    pub(crate) flags: u8,
    pub(crate) fault_at: u16,
    pub(crate) cut: u32,
    pub(crate) survivors: u8,
    pub(crate) seed: u32,
}

impl Trouble {
    pub(crate) fn read(r: &mut Bytes<'_>) -> Self {
        Trouble {
            flags: r.u8(),
            fault_at: r.u16(),
            cut: r.u32(),
            survivors: r.u8(),
            seed: r.u32(),
        }
    }

    pub(crate) fn fault(self, attempts: usize) -> Option<Fault> {
        (self.flags & 1 == 1).then(|| Fault {
            at: self.fault_at as usize % attempts.max(1),
            errno: if self.flags & 2 != 0 { ENOSPC } else { EIO },
            persistent: self.flags & 4 != 0,
        })
    }

    pub(crate) fn survivors(self) -> Survivors {
        match self.survivors % 4 {
            0 => Survivors::None,
            1 => Survivors::All,
            _ => Survivors::torn(self.seed as u64),
        }
    }
}

// Linux errno values (the transaction crate is Linux-only), so this file needs no `libc`.
pub(crate) const EIO: i32 = 5;
pub(crate) const ENOSPC: i32 = 28;

pub(crate) fn event_index(log: &[FsOp], name: &str) -> Option<usize> {
    log.iter().position(|op| *op == FsOp::Event(name.into()))
}

/// Whether the log changes any file or name (flushes and directory syncs change nothing: closing
/// an image opened for writing flushes it).
pub(crate) fn wrote_anything(log: &[FsOp]) -> bool {
    log.iter().any(|op| {
        !matches!(
            op,
            FsOp::Event(_) | FsOp::Flush { .. } | FsOp::SyncDir { .. }
        )
    })
}

/// `[group][trouble]`: builds 1–3 images, runs 1–4 actions, optionally with an injected error,
/// cuts power anywhere, recovers, and checks the invariants of TRANSACTIONS.md 5.2.
pub fn transaction(data: &[u8]) {
    let mut r = Bytes(data);
    let (configs, actions) = read_group(&mut r, 3, 4);
    let trouble = Trouble::read(&mut r);
    let n = configs.len();
    let plan = plan(&configs, &actions);
    let base = build(&configs);
    let pre = view(&base, n, "pre");
    count(0);

    // A clean run first: the reference post-state, the log length and the I/O count.
    let clean = base.settled();
    let mut group = open_group(&clean).expect("opening a fresh group");
    let result = group.run(&plan);
    drop(group);
    let valid = expect_valid(&configs, &actions);
    match result {
        Err(TxnError::Invalid { image, reason }) => {
            count(1);
            assert!(
                !valid,
                "a valid plan {plan:?} is refused: {}: {reason}",
                image.display()
            );
            assert!(
                !wrote_anything(&clean.log()),
                "a refused plan wrote: {:?}",
                clean.log()
            );
            assert_eq!(
                view(&clean, n, "refused"),
                pre,
                "a refused plan changed the group"
            );
            return;
        }
        Err(e) if valid => panic!("plan {plan:?} fails without any fault: {e}"),
        Err(e) => panic!("invalid plan {plan:?} is not refused with Invalid: {e}"),
        Ok(_) => assert!(valid, "an invalid plan {plan:?} is accepted"),
    }
    let post = view(&clean, n, "post");
    check_post(&configs, &actions, &pre, &post);
    assert_sound(&clean, n, "after a clean run");

    // The run under test: the same plan, optionally with an error injected.
    let fs = base.settled();
    let fault = trouble.fault(clean.attempts());
    let mut group = open_group(&fs).expect("opening a fresh group");
    if fault.is_some() {
        count(2);
    }
    fs.inject(fault);
    let result = group.run(&plan);
    fs.inject(None);
    let ctx = format!("plan {plan:?}, fault {fault:?}");
    let settled: Vec<&View> = match &result {
        Ok(_) => vec![&post],
        Err(TxnError::Aborted(_)) => {
            assert_eq!(view(&fs, n, &ctx), pre, "{ctx}: aborted but changed");
            assert_sound(&fs, n, &ctx);
            vec![&pre]
        }
        Err(TxnError::AbortIncomplete(_)) => vec![&pre],
        Err(TxnError::InDoubt(_)) => vec![&pre, &post],
        Err(TxnError::CommittedIncomplete(_)) => vec![&post],
        Err(e) => panic!("{ctx}: unexpected error {e}"),
    };
    if result.is_err() {
        count(3);
    }
    drop(group);
    if result.is_ok() {
        assert_eq!(
            view(&fs, n, &ctx),
            post,
            "{ctx}: committed, but not the clean run's state"
        );
    }

    if trouble.flags & 8 != 0 {
        recover_and_check(&fs, n, &settled, &format!("{ctx}, no cut"));
        return;
    }
    let log = fs.log();
    let cut = trouble.cut as usize % (log.len() + 1);
    let survivors = trouble.survivors();
    let decision_write = event_index(&log, "decision_write");
    let decided = event_index(&log, "decided");
    count(4);
    // Before the decision write: the old state; once the decision is durable: the new one.
    let expect: Vec<&View> = if decided.is_some_and(|d| cut >= d) {
        count(5);
        vec![&post]
    } else if decision_write.is_none_or(|w| cut <= w) {
        vec![&pre]
    } else {
        vec![&pre, &post]
    };
    let crashed = fs.crash(cut, survivors);
    let ctx = format!("{ctx}, cut {cut}/{} {survivors:?}", log.len());
    recover_and_check(&crashed, n, &expect, &ctx);
}

/// The committed state against the plan: images the plan does not name are unchanged, every
/// pre-existing snapshot that is not deleted keeps its content, the snapshot names are the old
/// ones minus the deleted plus the created, and overlays exist exactly where the plan puts them.
pub(crate) fn check_post(configs: &[ImageConfig], actions: &[u8], pre: &View, post: &View) {
    let mut overlays = BTreeMap::new();
    for (i, p) in (0..configs.len()).map(|i| (i, image_path(i))) {
        let sels: Vec<ActionSel> = actions
            .iter()
            .map(|&a| ActionSel(a))
            .filter(|a| a.image(configs.len()) == Some(i))
            .collect();
        let (old, new) = (&pre.images[&p], &post.images[&p]);
        if sels.is_empty() {
            assert_eq!(
                old,
                new,
                "{}: untouched by the plan, yet changed",
                p.display()
            );
            continue;
        }
        let mut names: Vec<String> = old.0.iter().map(|(n, _)| n.clone()).collect();
        let mut bitmaps = old.2.clone();
        for a in &sels {
            match a.bitmap() {
                Some(BitmapSel::AddB1) => {
                    bitmaps.push(("b1".into(), true, Some(true)));
                    continue;
                }
                Some(BitmapSel::ClearB0) => {
                    bitmaps[0].2 = Some(true);
                    continue;
                }
                None => {}
            }
            match a.0 & 3 {
                0 => names.push(a.name().to_string()),
                1 => {
                    let k = (0..old.0.len())
                        .position(|k| (k + 1).to_string() == a.name())
                        .or_else(|| old.0.iter().position(|(n, _)| n == a.name()))
                        .expect("validated");
                    let gone = &old.0[k].0;
                    let at = names.iter().position(|n| n == gone).expect("deleted once");
                    names.remove(at);
                }
                2 => {}
                _ => {
                    overlays.insert(PathBuf::from(a.overlay()), Some(format!("d{i}.qcow2")));
                }
            }
        }
        let mut got: Vec<String> = new.0.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        got.sort();
        assert_eq!(got, names, "{}: snapshot names after commit", p.display());
        // Bitmap changes follow the snapshot switch, so a clear wins over a revert's marks
        // whatever the plan's order.
        assert_eq!(new.2, bitmaps, "{}: bitmaps after commit", p.display());
        for (name, hash) in &old.0 {
            if new.0.iter().any(|(n, _)| n == name) {
                assert!(
                    new.0.contains(&(name.clone(), *hash)),
                    "{}: snapshot {name} changed content",
                    p.display()
                );
            }
        }
    }
    assert_eq!(post.overlays, overlays, "overlays after commit");
    assert_eq!(
        post.manifest.is_some(),
        !overlays.is_empty(),
        "manifest after commit"
    );
}
