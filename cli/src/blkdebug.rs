//! blkdebug's error injection (`blkdebug:RULES:IMAGE` names, `driver=blkdebug` nodes with
//! `inject-error` rules): a store over the image file that fails requests once the engine has
//! reported an event a rule names, as QEMU's blkdebug does. Only the events the engine
//! reports ([`Event`]) can be named, and `cor_write`, which only a node above the image sees
//! (see `copy_on_read`); a rule naming another is refused rather than left to never fire.

use std::io;
use std::sync::Mutex;

use qcow2::storage::Event;
use qcow2::Storage;

use crate::io_open::Options;

/// The events the engine reports, by QEMU's names.
const EVENTS: [Event; 3] = [Event::L2Load, Event::ReadAio, Event::WriteAio];

/// QEMU's name of the event a copy-on-read write reports.
const COR_WRITE: &str = "cor_write";

/// What arms a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleEvent {
    /// An event the engine reports on the image file.
    File(Event),
    /// A copy-on-read write, seen by a blkdebug node above the image.
    CorWrite,
}

impl RuleEvent {
    fn parse(name: &str) -> Option<RuleEvent> {
        if name == COR_WRITE {
            return Some(RuleEvent::CorWrite);
        }
        EVENTS
            .into_iter()
            .find(|e| e.name() == name)
            .map(RuleEvent::File)
    }
}

/// The errno blkdebug injects when a rule names none.
const EIO: i32 = 5;

/// One `inject-error` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub event: RuleEvent,
    errno: i32,
    once: bool,
    /// The 512-byte sector a request must touch to fail; any request when `None`.
    sector: Option<u64>,
}

impl Rule {
    fn parse(fields: &[(String, String)]) -> Result<Rule, String> {
        let mut event = None;
        let mut rule = Rule {
            event: RuleEvent::CorWrite,
            errno: EIO,
            once: false,
            sector: None,
        };
        for (key, value) in fields {
            match key.as_str() {
                "event" => {
                    event = Some(RuleEvent::parse(value).ok_or_else(|| {
                        format!("blkdebug event '{value}' is not supported by qcow2-tool")
                    })?)
                }
                "errno" => {
                    rule.errno = value
                        .parse()
                        .map_err(|_| "Parameter 'errno' expects a number".to_owned())?
                }
                "once" => {
                    rule.once = match value.as_str() {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err("Parameter 'once' expects 'on' or 'off'".into()),
                    }
                }
                "sector" => {
                    let sector: i64 = value
                        .parse()
                        .map_err(|_| "Parameter 'sector' expects a number".to_owned())?;
                    rule.sector = u64::try_from(sector).ok();
                }
                // Whether the error comes before or instead of the request: the same here.
                "immediately" => {}
                other => {
                    return Err(format!(
                        "blkdebug rule option '{other}' is not supported by qcow2-tool"
                    ))
                }
            }
        }
        rule.event = event.ok_or("Missing event name for rule")?;
        Ok(rule)
    }
}

/// The rules of a blkdebug config file: `[inject-error]` sections of `key = "value"` lines.
pub fn rules_from_config(path: &str) -> Result<Vec<Rule>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("Could not read blkdebug config file: {e}"))?;
    let mut sections: Vec<Vec<(String, String)>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if name != "inject-error" {
                return Err(format!(
                    "blkdebug section [{name}] is not supported by qcow2-tool"
                ));
            }
            sections.push(Vec::new());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("Invalid blkdebug config line: {line}"))?;
        let section = sections
            .last_mut()
            .ok_or_else(|| format!("blkdebug config line outside a section: {line}"))?;
        let value = value.trim().trim_matches('"');
        section.push((key.trim().to_owned(), value.to_owned()));
    }
    sections.iter().map(|s| Rule::parse(s)).collect()
}

/// The rules of the blkdebug node whose options start with `prefix`: its config file, then
/// its `inject-error` list (a JSON array from a `json:` name, or `inject-error.N.key` options).
pub fn rules_from_options(o: &Options, prefix: &str) -> Result<Vec<Rule>, String> {
    let mut rules = match o.get(&format!("{prefix}config")) {
        Some(path) => rules_from_config(path)?,
        None => Vec::new(),
    };
    let key = format!("{prefix}inject-error");
    if let Some(list) = o.get(&key) {
        let list: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(list)
            .map_err(|_| format!("Parameter '{key}' expects a list of rules"))?;
        for fields in list {
            let fields: Vec<(String, String)> = fields
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            rules.push(Rule::parse(&fields)?);
        }
    }
    let mut numbered: std::collections::BTreeMap<u64, Vec<(String, String)>> = Default::default();
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
        rules.push(Rule::parse(fields)?);
    }
    Ok(rules)
}

/// Which rules exist and which are armed.
struct State {
    /// `None` once a `once` rule has fired.
    rules: Vec<Option<Rule>>,
    /// The rules the last event with rules armed, newest first, as blkdebug keeps them.
    active: Vec<usize>,
    /// Whether anything was written since the last flush: QEMU sends no flush down otherwise,
    /// so no rule sees one.
    written: bool,
}

/// A blkdebug node's rules: events arm them, requests they cover fail.
pub struct Rules {
    state: Mutex<State>,
}

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules {
            state: Mutex::new(State {
                rules: rules.into_iter().map(Some).collect(),
                active: Vec::new(),
                written: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails the request on `[offset, offset + len)` when an armed rule covers it.
    pub fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        let hit = state.active.iter().copied().find(|&i| {
            state.rules[i].as_ref().is_some_and(|r| {
                r.sector.is_none_or(|s| {
                    let at = s.saturating_mul(512);
                    offset <= at && at < offset.saturating_add(len)
                })
            })
        });
        let Some(index) = hit else {
            return Ok(());
        };
        let Some(rule) = state.rules[index].clone() else {
            return Ok(());
        };
        if rule.once {
            state.rules[index] = None;
            state.active.retain(|&i| i != index);
        }
        Err(io::Error::from_raw_os_error(rule.errno))
    }

    /// An event with rules arms exactly those rules, as blkdebug replaces its active list.
    pub fn event(&self, event: RuleEvent) {
        let mut state = self.lock();
        let armed: Vec<usize> = (0..state.rules.len())
            .rev()
            .filter(|&i| state.rules[i].as_ref().is_some_and(|r| r.event == event))
            .collect();
        if !armed.is_empty() {
            state.active = armed;
        }
    }
}

/// A store that fails requests as its rules say.
pub struct Blkdebug<S> {
    inner: S,
    rules: Rules,
}

impl<S: Storage> Blkdebug<S> {
    pub fn new(inner: S, rules: Vec<Rule>) -> Blkdebug<S> {
        Blkdebug {
            inner,
            rules: Rules::new(rules),
        }
    }
}

impl<S: Storage> Storage for Blkdebug<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.rules.check(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.rules.check(offset, buf.len() as u64)?;
        self.rules.lock().written = true;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if !std::mem::take(&mut self.rules.lock().written) {
            return Ok(());
        }
        self.rules.check(0, 0)?;
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
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
    fn identity(&self) -> Option<qcow2::storage::FileIdentity> {
        self.inner.identity()
    }
    fn event(&self, event: Event) {
        self.rules.event(RuleEvent::File(event));
        self.inner.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2::MemoryStorage;

    #[test]
    fn an_event_arms_its_rules_and_once_rules_fire_once() {
        let rule = |once| Rule {
            event: RuleEvent::File(Event::L2Load),
            errno: 5,
            once,
            sector: None,
        };
        for once in [true, false] {
            let store = Blkdebug::new(MemoryStorage::new(), vec![rule(once)]);
            let mut buf = [0u8; 8];
            assert!(store.read_at(&mut buf, 0).is_ok());
            store.event(Event::ReadAio);
            assert!(store.read_at(&mut buf, 0).is_ok());
            store.event(Event::L2Load);
            let err = store.read_at(&mut buf, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(5));
            assert_eq!(store.read_at(&mut buf, 0).is_ok(), once);
        }
    }
}
