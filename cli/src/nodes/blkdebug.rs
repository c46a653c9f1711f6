//! blkdebug's error injection (`blkdebug:RULES:IMAGE` names, `driver=blkdebug` nodes with
//! `inject-error` and `set-state` rules): a store over the image file that fails requests once
//! the engine has reported an event a rule names, as QEMU's blkdebug does. Rules may name any
//! of QEMU's events; those the engine never reports ([`Event`]) never fire, as in QEMU when
//! the format takes another path.

use std::io;
use std::sync::Mutex;

use qcow2::storage::Event;
use qcow2::Storage;

use crate::io::open::Options;

/// QEMU's blkdebug event names, all accepted in rules.
const EVENT_NAMES: [&str; 48] = [
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// Whether `name` is one of QEMU's blkdebug events.
pub fn is_event(name: &str) -> bool {
    EVENT_NAMES.contains(&name)
}

/// The kinds of request a rule can fail, by QEMU's names; a rule without `iotype` fails all
/// but block-status queries.
const IO_TYPES: [&str; 6] = [
    "read",
    "write",
    "write-zeroes",
    "discard",
    "flush",
    "block-status",
];

/// The kind of a request, as an index into [`IO_TYPES`].
#[derive(Debug, Clone, Copy)]
enum IoType {
    Read = 0,
    Write = 1,
    WriteZeroes = 2,
    Flush = 4,
    BlockStatus = 5,
}

/// The errno blkdebug injects when a rule names none.
const EIO: i32 = 5;

/// What a rule does when its event comes in its state.
#[derive(Debug, Clone)]
enum Action {
    /// Arms an error for the requests that follow.
    Inject {
        errno: i32,
        once: bool,
        /// The 512-byte sector a request must touch to fail; any request when `None`.
        sector: Option<u64>,
        /// Bit `i` set: requests of [`IO_TYPES`]`[i]` fail.
        iotypes: u8,
    },
    /// Moves the node to another state.
    SetState(i64),
}

/// One `inject-error` or `set-state` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    event: &'static str,
    /// The state the rule acts in; 0 for any.
    state: i64,
    action: Action,
}

/// Which list a rule comes from.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    InjectError,
    SetState,
}

impl Kind {
    fn section(self) -> &'static str {
        match self {
            Kind::InjectError => "inject-error",
            Kind::SetState => "set-state",
        }
    }
}

fn number(key: &str, value: &str) -> Result<i64, String> {
    value
        .parse()
        .map_err(|_| format!("Parameter '{key}' expects a number"))
}

/// QEMU's name of the event a copy-on-read write reports.
pub const COR_WRITE: &str = "cor_write";

impl Rule {
    /// The event that arms the rule, by QEMU's name.
    pub fn event(&self) -> &'static str {
        self.event
    }

    fn parse(kind: Kind, fields: &[(String, String)]) -> Result<Rule, String> {
        let mut event = None;
        let mut state = 0;
        let (mut errno, mut once, mut sector, mut iotypes) = (EIO, false, None, 0b1_1111u8);
        let mut new_state = 0;
        for (key, value) in fields {
            match (kind, key.as_str()) {
                (_, "event") => {
                    event = Some(
                        EVENT_NAMES
                            .into_iter()
                            .find(|e| e == value)
                            .ok_or_else(|| format!("invalid parameter value: {value}"))?,
                    )
                }
                (_, "state") => state = number(key, value)?,
                (Kind::SetState, "new_state") => new_state = number(key, value)?,
                (Kind::InjectError, "errno") => {
                    errno = i32::try_from(number(key, value)?)
                        .map_err(|_| "Parameter 'errno' is out of range".to_owned())?
                }
                (Kind::InjectError, "once") => {
                    once = match value.as_str() {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err("Parameter 'once' expects 'on' or 'off'".into()),
                    }
                }
                (Kind::InjectError, "sector") => sector = u64::try_from(number(key, value)?).ok(),
                (Kind::InjectError, "iotype") => {
                    let i = IO_TYPES
                        .iter()
                        .position(|t| t == value)
                        .ok_or_else(|| format!("invalid parameter value: {value}"))?;
                    iotypes = 1 << i;
                }
                // Whether the error comes before or instead of the request: the same here.
                (Kind::InjectError, "immediately") => {}
                (_, other) => {
                    return Err(format!(
                        "blkdebug {} option '{other}' is not supported by qcow2-tool",
                        kind.section()
                    ))
                }
            }
        }
        let action = match kind {
            Kind::InjectError => Action::Inject {
                errno,
                once,
                sector,
                iotypes,
            },
            Kind::SetState => Action::SetState(new_state),
        };
        Ok(Rule {
            event: event.ok_or("Missing event name for rule")?,
            state,
            action,
        })
    }
}

/// The rules of a blkdebug config file: `[inject-error]` and `[set-state]` sections of
/// `key = "value"` lines.
pub fn rules_from_config(path: &str) -> Result<Vec<Rule>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("Could not read blkdebug config file: {e}"))?;
    let mut sections: Vec<(Kind, Vec<(String, String)>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let kind = [Kind::InjectError, Kind::SetState]
                .into_iter()
                .find(|k| k.section() == name)
                .ok_or_else(|| {
                    format!("blkdebug section [{name}] is not supported by qcow2-tool")
                })?;
            sections.push((kind, Vec::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("Invalid blkdebug config line: {line}"))?;
        let (_, section) = sections
            .last_mut()
            .ok_or_else(|| format!("blkdebug config line outside a section: {line}"))?;
        let value = value.trim().trim_matches('"');
        section.push((key.trim().to_owned(), value.to_owned()));
    }
    sections.iter().map(|(k, s)| Rule::parse(*k, s)).collect()
}

/// The rules of the blkdebug node whose options start with `prefix`: its config file, then its
/// `inject-error` and `set-state` lists (JSON arrays from a `json:` name, or `LIST.N.key`
/// options).
pub fn rules_from_options(o: &Options, prefix: &str) -> Result<Vec<Rule>, String> {
    let mut rules = match o.get(&format!("{prefix}config")) {
        Some(path) => rules_from_config(path)?,
        None => Vec::new(),
    };
    for kind in [Kind::InjectError, Kind::SetState] {
        let key = format!("{prefix}{}", kind.section());
        if let Some(list) = o.get(&key) {
            let list: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(list)
                .map_err(|_| format!("Parameter '{key}' expects a list of rules"))?;
            for fields in list {
                let fields: Vec<(String, String)> = fields
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                    .collect();
                rules.push(Rule::parse(kind, &fields)?);
            }
        }
        let mut numbered: std::collections::BTreeMap<u64, Vec<(String, String)>> =
            Default::default();
        for (k, v) in o {
            let Some((index, field)) = k
                .strip_prefix(&format!("{key}."))
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            let index = index
                .parse()
                .map_err(|_| format!("Invalid parameter '{k}'"))?;
            numbered
                .entry(index)
                .or_default()
                .push((field.to_owned(), v.clone()));
        }
        for fields in numbered.values() {
            rules.push(Rule::parse(kind, fields)?);
        }
    }
    Ok(rules)
}

/// Which rules exist, which are armed, and the node's state.
struct State {
    /// `None` once a `once` rule has fired.
    rules: Vec<Option<Rule>>,
    /// The inject rules the last event with such rules armed, in the order blkdebug tries them.
    active: Vec<usize>,
    /// The state rules act in; blkdebug starts in state 1.
    state: i64,
    /// Whether anything was written since the last flush: QEMU sends no flush down otherwise,
    /// so no rule sees one.
    written: bool,
}

/// A blkdebug node's rules and state, shared by its two places: under the format (a store)
/// and above it (a guest disk).
struct Faults(Mutex<State>);

impl Faults {
    /// The node as it opens: blkdebug reports the `none` event then, arming its rules.
    fn new(rules: Vec<Rule>) -> Faults {
        let faults = Faults(Mutex::new(State {
            rules: rules.into_iter().map(Some).collect(),
            active: Vec::new(),
            state: 1,
            written: false,
        }));
        faults.event("none");
        faults
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails a request of kind `io` on `[offset, offset + len)` when the first armed rule that
    /// covers it says so.
    fn check(&self, io: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        let hit = state.active.iter().copied().find(|&i| {
            matches!(state.rules[i], Some(Rule { action: Action::Inject { sector, iotypes, .. }, .. })
                if iotypes & (1 << io as u8) != 0
                    && sector.is_none_or(|s| {
                        let at = s.saturating_mul(512);
                        len > 0 && offset <= at && at < offset.saturating_add(len)
                    }))
        });
        let Some(index) = hit else {
            return Ok(());
        };
        let Some(Rule {
            action: Action::Inject { errno, once, .. },
            ..
        }) = state.rules[index]
        else {
            return Ok(());
        };
        if once {
            state.rules[index] = None;
            state.active.retain(|&i| i != index);
        }
        if errno == 0 {
            return Ok(());
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    /// The rules for the event named `name` in the current state act: inject rules replace the
    /// armed list (when there are any), set-state rules pick the state that holds once all
    /// have acted.
    fn event(&self, name: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        // blkdebug visits rules newest first and the last set-state it meets wins: the oldest.
        let mut new_state = None;
        let mut armed = Vec::new();
        for (i, rule) in s.rules.iter().enumerate() {
            let Some(rule) = rule else { continue };
            if rule.event != name || (rule.state != 0 && rule.state != s.state) {
                continue;
            }
            match rule.action {
                Action::Inject { .. } => armed.push(i),
                Action::SetState(to) => {
                    new_state.get_or_insert(to);
                }
            }
        }
        if !armed.is_empty() {
            s.active = armed;
        }
        s.state = new_state.unwrap_or(s.state);
    }
}

/// A store that fails requests as its rules say.
pub struct Blkdebug<S> {
    inner: S,
    faults: Faults,
}

impl<S: Storage> Blkdebug<S> {
    pub fn new(inner: S, rules: Vec<Rule>) -> Blkdebug<S> {
        Blkdebug {
            inner,
            faults: Faults::new(rules),
        }
    }

    fn check(&self, io: IoType, offset: u64, len: u64) -> io::Result<()> {
        self.faults.check(io, offset, len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.faults.lock()
    }
}

impl<S: Storage> Storage for Blkdebug<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.lock().written = true;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(IoType::WriteZeroes, offset, len)?;
        self.lock().written = true;
        self.inner.write_zeroes(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        if !std::mem::take(&mut self.lock().written) {
            return Ok(());
        }
        self.check(IoType::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn hole_at(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        self.inner.hole_at(offset, len)
    }
    fn identity(&self) -> Option<qcow2::storage::FileIdentity> {
        self.inner.identity()
    }
    fn event(&self, event: Event) {
        self.faults.event(event.name());
        self.inner.event(event);
    }
}

/// A blkdebug node between a copy-on-read filter and the image: it sees the reads the filter
/// makes and the writes that copy them (`cor_write` arms its rules).
pub struct CopyWatch(Faults);

impl CopyWatch {
    pub fn new(rules: Vec<Rule>) -> CopyWatch {
        CopyWatch(Faults::new(rules))
    }

    /// A read of `[offset, offset + len)` through the node.
    pub fn read(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.check(IoType::Read, offset, len)
    }

    /// The copy's write of `[offset, offset + len)`: QEMU reports `cor_write` first.
    pub fn copy_write(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.event(COR_WRITE);
        self.0.check(IoType::Write, offset, len)
    }
}

/// A blkdebug node above the format (`driver=blkdebug` with an `image` node that is an
/// image): its rules fail guest reads and block-status queries. The format's events go to
/// the format's own file, not here, so only rules armed at open (`none`) fire.
pub struct GuestNode {
    inner: crate::source::Input,
    faults: Faults,
}

impl GuestNode {
    pub fn new(inner: crate::source::Input, rules: Vec<Rule>) -> GuestNode {
        GuestNode {
            inner,
            faults: Faults::new(rules),
        }
    }

    pub fn inner(&self) -> &crate::source::Input {
        &self.inner
    }
}

impl crate::source::Guest for GuestNode {
    fn size(&self) -> u64 {
        self.inner.guest().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.read_errno(buf, offset)
    }
    fn read_errno(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.faults
            .check(IoType::Read, offset, buf.len() as u64)
            .map_err(|e| crate::source::io_text(&e))?;
        self.inner.guest().read_errno(buf, offset)
    }
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<crate::source::Region>, String> {
        self.faults
            .check(IoType::BlockStatus, offset, len)
            .map_err(|e| crate::source::io_text(&e))?;
        self.inner.guest().regions(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2::MemoryStorage;

    fn rule(kind: Kind, fields: &[(&str, &str)]) -> Rule {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Rule::parse(kind, &fields).unwrap()
    }

    #[test]
    fn an_event_arms_its_rules_and_once_rules_fire_once() {
        for once in ["on", "off"] {
            let r = rule(Kind::InjectError, &[("event", "l2_load"), ("once", once)]);
            let store = Blkdebug::new(MemoryStorage::new(), vec![r]);
            let mut buf = [0u8; 8];
            assert!(store.read_at(&mut buf, 0).is_ok());
            store.event(Event::ReadAio);
            assert!(store.read_at(&mut buf, 0).is_ok());
            store.event(Event::L2Load);
            let err = store.read_at(&mut buf, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(5));
            assert_eq!(store.read_at(&mut buf, 0).is_ok(), once == "on");
        }
    }

    #[test]
    fn set_state_rules_gate_inject_rules_by_state() {
        // As iotest 066 asks: the first write_aio moves to state 2, the second one fails.
        let rules = vec![
            rule(
                Kind::SetState,
                &[("event", "write_aio"), ("new_state", "2")],
            ),
            rule(Kind::InjectError, &[("event", "write_aio"), ("state", "2")]),
        ];
        let store = Blkdebug::new(MemoryStorage::new(), rules);
        store.event(Event::WriteAio);
        assert!(store.write_at(&[1; 8], 0).is_ok());
        store.event(Event::WriteAio);
        let err = store.write_at(&[1; 8], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(5));
    }

    #[test]
    fn iotype_and_sector_narrow_a_rule() {
        let r = rule(
            Kind::InjectError,
            &[
                ("event", "write_aio"),
                ("iotype", "write"),
                ("sector", "2"),
                ("errno", "28"),
            ],
        );
        let store = Blkdebug::new(MemoryStorage::new(), vec![r]);
        store.event(Event::WriteAio);
        let mut buf = [0u8; 2048];
        assert!(store.read_at(&mut buf, 0).is_ok());
        assert!(store.write_at(&buf[..512], 0).is_ok());
        let err = store.write_at(&buf, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
    }

    #[test]
    fn unknown_events_and_options_are_refused() {
        let parse = |kind, fields: &[(&str, &str)]| {
            let fields: Vec<(String, String)> = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Rule::parse(kind, &fields)
        };
        assert!(parse(Kind::InjectError, &[("event", "no_such_event")]).is_err());
        assert!(parse(Kind::InjectError, &[("errno", "5")]).is_err());
        assert!(parse(Kind::SetState, &[("event", "l1_update"), ("errno", "5")]).is_err());
        assert!(parse(Kind::InjectError, &[("event", "cor_write")]).is_ok());
    }
}
