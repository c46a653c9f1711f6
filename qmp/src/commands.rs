//! The commands, with QEMU's arguments, results and messages. Every change (`transaction`,
//! the standalone snapshot and bitmap commands) is one group transaction over the served disks'
//! live handles: validated action by action, staged with the disks' writes paused, decided in
//! the journal, published, resumed.

use std::path::PathBuf;
use std::sync::Arc;

use qcow2::DiskTop;
use qcow2_transaction::{Action, BitmapSource, Group, OverlayMode, TxnError};
use serde_json::{json, Value};

use crate::args::Args;
use crate::QmpError;

/// A served disk: its export (and node) name, the disk top the server writes through, the top
/// image's path.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The node name QMP commands use (`device`, `node-name`), the export's name.
    pub name: String,
    /// The disk the server writes through; transactions pause its writes, and an external
    /// snapshot gives it a new top image.
    pub top: Arc<DiskTop>,
    /// The top image file's canonical path, as the group's manifest records it (it follows
    /// external snapshots).
    pub path: PathBuf,
    /// How the server completes the disk's writes.
    pub cache: WriteCache,
}

/// How a disk's writes complete, as `query-named-block-nodes` reports it in `cache` (whether
/// they bypass the page cache is the image's own: [`qcow2::Image::is_direct_io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteCache {
    /// A write is acknowledged before it is durable (otherwise the server flushes each one).
    pub writeback: bool,
    /// The server never syncs (`cache=unsafe`).
    pub no_flush: bool,
}

impl Default for WriteCache {
    fn default() -> Self {
        WriteCache {
            writeback: true,
            no_flush: false,
        }
    }
}

/// What the commands act on.
pub struct Served {
    pub group: Group,
    pub disks: Vec<Disk>,
}

/// Commands `query-commands` lists.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "quit",
    "query-version",
    "query-commands",
    "query-block-exports",
    "query-named-block-nodes",
    "transaction",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "blockdev-snapshot-sync",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
];

/// Runs command `name` (after negotiation).
pub fn execute(s: &mut Served, name: &str, arguments: Option<&Value>) -> Result<Value, QmpError> {
    let mut args = Args::new(arguments, "")?;
    match name {
        "query-version" => {
            args.done()?;
            Ok(crate::monitor::version())
        }
        "query-commands" => {
            args.done()?;
            Ok(COMMANDS.iter().map(|c| json!({ "name": c })).collect())
        }
        "query-block-exports" => {
            args.done()?;
            Ok(s.disks
                .iter()
                .map(|d| {
                    json!({"id": d.name, "type": "nbd", "node-name": d.name, "shutting-down": false})
                })
                .collect())
        }
        "query-named-block-nodes" => {
            let _flat = args.opt_bool("flat")?;
            args.done()?;
            Ok(s.disks.iter().map(node_info).collect())
        }
        "transaction" => transaction(s, args),
        "blockdev-snapshot-internal-sync" => {
            let planned = snapshot_create(s, &mut args)?;
            args.done()?;
            run(s, vec![planned]).map(|()| json!({}))
        }
        "blockdev-snapshot-delete-internal-sync" => snapshot_delete(s, args),
        "blockdev-snapshot-sync" => {
            let planned = external_create(s, &mut args)?;
            args.done()?;
            run(s, vec![planned]).map(|()| json!({}))
        }
        _ if name.starts_with("block-dirty-bitmap-") => {
            let planned = bitmap(s, &name["block-dirty-bitmap-".len()..], &mut args)
                .ok_or_else(|| not_found(name))??;
            args.done()?;
            run(s, vec![planned]).map(|()| json!({}))
        }
        _ => Err(not_found(name)),
    }
}

fn not_found(name: &str) -> QmpError {
    QmpError::not_found(format!("The command {name} has not been found"))
}

/// An action and the disk it acts on; `None` for QMP's `abort` action.
type Planned = Option<(usize, Action)>;

fn disk(s: &Served, name: &str) -> Result<usize, QmpError> {
    s.disks.iter().position(|d| d.name == name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

fn snapshot_create(s: &Served, args: &mut Args) -> Result<Planned, QmpError> {
    let device = args.str("device")?;
    let name = args.str("name")?;
    let i = disk(s, &device)?;
    if name.is_empty() {
        return Err(QmpError::generic("Name is empty"));
    }
    if s.disks[i]
        .top
        .image()
        .snapshots()
        .iter()
        .any(|x| x.name == name)
    {
        return Err(QmpError::generic(format!(
            "Snapshot with name '{name}' already exists on device '{device}'"
        )));
    }
    Ok(Some((
        i,
        Action::InternalCreate {
            image: s.disks[i].path.clone(),
            name,
        },
    )))
}

/// `blockdev-snapshot-sync`: a new qcow2 overlay at `snapshot-file` (or, with `mode:
/// existing`, one the caller made) becomes the disk's top; the export writes into it from the
/// transaction's pause on.
fn external_create(s: &Served, args: &mut Args) -> Result<Planned, QmpError> {
    let device = args.opt_str("device")?;
    let node = args.opt_str("node-name")?;
    let file = args.str("snapshot-file")?;
    let new_node = args.opt_str("snapshot-node-name")?;
    let format = args.opt_str("format")?;
    let mode = args.opt_str("mode")?;
    let name = match (device, node) {
        (Some(d), None) | (None, Some(d)) => d,
        (Some(d), Some(n)) if d == n => d,
        (d, n) => {
            return Err(QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                d.unwrap_or_default(),
                n.unwrap_or_default()
            )))
        }
    };
    let i = disk(s, &name)?;
    if let Some(n) = &new_node {
        if s.disks.iter().any(|d| d.name == *n) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
    }
    if let Some(f) = format.filter(|f| f != "qcow2") {
        return Err(QmpError::generic(format!(
            "only qcow2 overlays are supported, not '{f}'"
        )));
    }
    let mode = match mode.as_deref() {
        None | Some("absolute-paths") => OverlayMode::NewAbsolute,
        Some("existing") => OverlayMode::Existing,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{other}'"
            )))
        }
    };
    Ok(Some((
        i,
        Action::ExternalCreate {
            image: s.disks[i].path.clone(),
            overlay: PathBuf::from(file),
            mode,
        },
    )))
}

/// `block-dirty-bitmap-<op>`; `None` for an unknown op.
fn bitmap(s: &Served, op: &str, args: &mut Args) -> Option<Result<Planned, QmpError>> {
    let known = ["add", "remove", "clear", "enable", "disable", "merge"];
    if !known.contains(&op) {
        return None;
    }
    Some((|| {
        let node = args.str("node")?;
        let i = disk(s, &node)?;
        let image = s.disks[i].path.clone();
        let action = match op {
            "merge" => {
                let target = args.str("target")?;
                let list = args.array("bitmaps")?;
                let mut sources = Vec::new();
                for (k, v) in list.iter().enumerate() {
                    let path = format!("{}[{k}]", args.path("bitmaps"));
                    let name = match v {
                        Value::String(n) => n.clone(),
                        Value::Object(_) => {
                            let mut a = Args::new(Some(v), &path)?;
                            let other = a.str("node")?;
                            let name = a.str("name")?;
                            a.done()?;
                            if disk(s, &other)? != i {
                                return Err(QmpError::generic(
                                    "merging a bitmap of another node is not supported",
                                ));
                            }
                            name
                        }
                        _ => {
                            return Err(QmpError::generic(format!(
                                "Invalid parameter type for '{path}', expected: string or object"
                            )))
                        }
                    };
                    sources.push(BitmapSource { image: None, name });
                }
                Action::BitmapMerge {
                    image,
                    target,
                    sources,
                }
            }
            _ => {
                let name = args.str("name")?;
                match op {
                    "add" => {
                        let granularity = args.opt_u64("granularity")?;
                        let persistent = args.opt_bool("persistent")?.unwrap_or(false);
                        let disabled = args.opt_bool("disabled")?.unwrap_or(false);
                        if let Some(g) = granularity {
                            if g < 512 || !g.is_power_of_two() {
                                return Err(QmpError::generic(
                                    "Granularity must be power of 2 and at least 512",
                                ));
                            }
                        }
                        if !persistent {
                            return Err(QmpError::generic(
                                "only persistent bitmaps are supported: pass \"persistent\": true",
                            ));
                        }
                        Action::BitmapAdd {
                            image,
                            name,
                            granularity,
                            disabled,
                        }
                    }
                    "remove" => Action::BitmapRemove { image, name },
                    "clear" => Action::BitmapClear { image, name },
                    "enable" => Action::BitmapEnable { image, name },
                    _ => Action::BitmapDisable { image, name },
                }
            }
        };
        Ok(Some((i, action)))
    })())
}

/// QMP's `transaction`: every action checked, then one group transaction; the first failure is
/// the one reported, and nothing is changed then.
fn transaction(s: &mut Served, mut args: Args) -> Result<Value, QmpError> {
    let actions = args.array("actions")?;
    let grouped = match args.opt("properties") {
        None => false,
        Some(p) => {
            let mut props = Args::new(Some(p), "properties")?;
            let mode = props.opt_str("completion-mode")?;
            props.done()?;
            match mode.as_deref() {
                None | Some("individual") => false,
                Some("grouped") => true,
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'properties.completion-mode' does not accept value '{other}'"
                    )))
                }
            }
        }
    };
    args.done()?;
    let mut planned = Vec::new();
    for (k, action) in actions.iter().enumerate() {
        let path = format!("actions[{k}]");
        let mut a = Args::new(Some(action), &path)?;
        let kind = a.str("type")?;
        let data = a.req("data")?;
        a.done()?;
        let mut d = Args::new(Some(data), &format!("{path}.data"))?;
        if grouped {
            return Err(QmpError::generic(format!(
                "Action '{kind}' does not support transaction property completion-mode = grouped"
            )));
        }
        let one =
            match kind.as_str() {
                "abort" => None,
                "blockdev-snapshot-internal-sync" => snapshot_create(s, &mut d)?,
                "blockdev-snapshot-sync" => external_create(s, &mut d)?,
                "blockdev-snapshot" => return Err(QmpError::generic(
                    "blockdev-snapshot needs an overlay node made with blockdev-add, which this \
                     server does not offer; use blockdev-snapshot-sync",
                )),
                "blockdev-backup" | "drive-backup" => {
                    return Err(QmpError::generic(format!(
                        "Action type '{kind}' is not supported by this server"
                    )))
                }
                _ => match kind.strip_prefix("block-dirty-bitmap-") {
                    Some(op) => bitmap(s, op, &mut d).ok_or_else(|| bad_type(&path, &kind))??,
                    None => return Err(bad_type(&path, &kind)),
                },
            };
        d.done()?;
        planned.push(one);
    }
    if planned.is_empty() {
        return Ok(json!({}));
    }
    run(s, planned).map(|()| json!({}))
}

fn bad_type(path: &str, kind: &str) -> QmpError {
    QmpError::generic(format!(
        "Parameter '{path}.type' does not accept value '{kind}'"
    ))
}

/// One group transaction over the disks' live handles.
fn run(s: &mut Served, planned: Vec<Planned>) -> Result<(), QmpError> {
    let Served { group, disks } = s;
    let mut txn = group.begin().map_err(failure)?;
    let mut actions = Vec::new();
    for p in planned {
        let Some((i, action)) = p else {
            return Err(QmpError::generic("Transaction aborted using Abort action"));
        };
        let d = &disks[i];
        if !actions.contains(&i) {
            txn.attach_top(d.top.clone()).map_err(failure)?;
            actions.push(i);
        }
        txn.add(action).map_err(failure)?;
    }
    let committed = txn.prepare().map_err(failure)?.commit();
    // An external snapshot gave a disk a new top (also when the commit did not finish: the
    // export writes where its top is).
    for &i in &actions {
        let d = &mut disks[i];
        if let Some(p) = d.top.image().path() {
            d.path = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        }
    }
    committed.map_err(failure)?;
    Ok(())
}

/// The message of a transaction error, as QEMU words what it words (bitmap refusals carry
/// QEMU's text already).
fn failure(e: TxnError) -> QmpError {
    fn desc(e: &TxnError) -> String {
        match e {
            TxnError::Refused { reason, .. } | TxnError::Aborted(reason) => desc(reason),
            TxnError::Invalid { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
    QmpError::generic(desc(&e))
}

fn snapshot_delete(s: &mut Served, mut args: Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let id = args.opt_str("id")?;
    let name = args.opt_str("name")?;
    args.done()?;
    let i = disk(s, &device)?;
    if id.is_none() && name.is_none() {
        return Err(QmpError::generic("Please specify a snapshot id or name"));
    }
    let found = s.disks[i].top.image().snapshots().into_iter().find(|x| {
        id.as_ref().is_none_or(|id| *id == x.id) && name.as_ref().is_none_or(|n| *n == x.name)
    });
    let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "null".into());
    let Some(snap) = found else {
        return Err(QmpError::generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
            shown(&id),
            shown(&name)
        )));
    };
    let action = Action::InternalDelete {
        image: s.disks[i].path.clone(),
        name: snap.id.clone(),
    };
    run(s, vec![Some((i, action))])?;
    Ok(snapshot_info(&snap))
}

fn snapshot_info(x: &qcow2::image::SnapshotInfo) -> Value {
    let mut v = json!({
        "id": x.id,
        "name": x.name,
        "vm-state-size": x.vm_state_size,
        "date-sec": x.time.secs,
        "date-nsec": x.date_nsec,
        "vm-clock-sec": x.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": x.vm_clock_nsec % 1_000_000_000,
    });
    if let Some(icount) = x.icount {
        v["icount"] = json!(icount);
    }
    v
}

/// A disk as `query-named-block-nodes` shows a qcow2 node (BlockDeviceInfo).
fn node_info(d: &Disk) -> Value {
    let img = d.top.image();
    let info = img.info();
    let bitmaps: Vec<Value> = img
        .bitmaps()
        .into_iter()
        .map(|b| {
            let count: u64 = img
                .dirty_extents(&b.name, 0, img.size())
                .map(|e| e.iter().map(|(_, len)| len).sum())
                .unwrap_or(0);
            json!({
                "name": b.name,
                "count": count,
                "granularity": b.granularity,
                "recording": b.enabled,
                "busy": false,
                "persistent": true,
                "inconsistent": b.in_use,
            })
        })
        .collect();
    let file = d.path.display().to_string();
    json!({
        "node-name": d.name,
        "file": file,
        "ro": !img.is_writable(),
        "drv": "qcow2",
        "backing_file_depth": img.chain_depth(),
        "active": true,
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {
            "writeback": d.cache.writeback,
            "direct": img.is_direct_io(),
            "no-flush": d.cache.no_flush,
        },
        "image": {
            "filename": file,
            "format": "qcow2",
            "virtual-size": img.size(),
            "actual-size": img.file_len(),
            "cluster-size": info.cluster_size,
            "dirty-flag": false,
            "snapshots": img.snapshots().iter().map(snapshot_info).collect::<Vec<_>>(),
            "format-specific": {"type": "qcow2", "data": {
                "compat": info.compat,
                "lazy-refcounts": info.lazy_refcounts,
                "refcount-bits": info.refcount_bits,
                "corrupt": false,
                "extended-l2": false,
            }},
        },
        "dirty-bitmaps": bitmaps,
    })
}
