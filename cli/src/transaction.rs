//! `transaction PLAN.json` and `recover GROUP_DIR`: atomic group snapshots. The plan follows
//! QMP's `transaction` command; relative paths resolve against the plan file's directory.

use std::path::{Path, PathBuf};

use qcow2_transaction::{Action, BitmapSource, Group, OverlayMode, Recovery, TxnError};
use serde_json::Value;

use crate::source::{CmdResult, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan: {"group": DIR, "actions": [{"type": ..., "data": {...}}, ...]}.
    plan: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The group directory (journal, lock, manifest).
    group: PathBuf,
}

/// Reads a plan and turns it into the group directory and its actions.
pub fn parse_plan(text: &str, base: &Path) -> Result<(PathBuf, Vec<Action>), String> {
    let plan: Value =
        serde_json::from_str(text).map_err(|e| format!("the plan is not JSON: {e}"))?;
    let group = plan["group"]
        .as_str()
        .ok_or("the plan needs a \"group\" directory")?;
    let actions = plan["actions"]
        .as_array()
        .ok_or("the plan needs an \"actions\" list")?;
    let path = |data: &Value, key: &str, i: usize| -> Result<PathBuf, String> {
        data[key]
            .as_str()
            .map(|p| base.join(p))
            .ok_or_else(|| format!("action {i}: \"data\" needs \"{key}\""))
    };
    let text_field = |data: &Value, keys: &[&str], i: usize| -> Result<String, String> {
        keys.iter()
            .find_map(|k| data[*k].as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("action {i}: \"data\" needs \"{}\"", keys.join("\" or \"")))
    };
    let flag = |data: &Value, key: &str, i: usize| -> Result<bool, String> {
        match &data[key] {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            _ => Err(format!("action {i}: \"{key}\" is true or false")),
        }
    };
    let mut out = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        let data = &a["data"];
        let kind = a["type"]
            .as_str()
            .ok_or_else(|| format!("action {i} has no \"type\""))?;
        out.push(match kind {
            "blockdev-snapshot-internal-sync" => Action::InternalCreate {
                image: path(data, "image", i)?,
                name: text_field(data, &["name"], i)?,
            },
            "blockdev-snapshot-delete-internal-sync" => Action::InternalDelete {
                image: path(data, "image", i)?,
                name: text_field(data, &["id", "name"], i)?,
            },
            "snapshot-revert-internal" => Action::InternalRevert {
                image: path(data, "image", i)?,
                name: text_field(data, &["name", "id"], i)?,
            },
            "blockdev-snapshot-sync" => {
                if let Some(f) = data["format"].as_str() {
                    if f != "qcow2" {
                        return Err(format!("action {i}: overlays are qcow2, not {f}"));
                    }
                }
                let mode = match data["mode"].as_str() {
                    None | Some("absolute-paths") => OverlayMode::NewAbsolute,
                    Some("existing") => OverlayMode::Existing,
                    Some(other) => {
                        return Err(format!(
                            "action {i}: mode is \"absolute-paths\" or \"existing\", not {other:?}"
                        ))
                    }
                };
                Action::ExternalCreate {
                    image: path(data, "image", i)?,
                    overlay: path(data, "snapshot-file", i)?,
                    mode,
                }
            }
            "blockdev-snapshot-delete-external" => Action::ExternalDelete {
                image: path(data, "image", i)?,
            },
            "block-dirty-bitmap-add" => {
                if data["persistent"].as_bool() == Some(false) {
                    return Err(format!(
                        "action {i}: a bitmap of an image at rest is persistent; \"persistent\": \
                         false has no meaning here"
                    ));
                }
                let granularity = match &data["granularity"] {
                    Value::Null => None,
                    g => Some(g.as_u64().ok_or_else(|| {
                        format!("action {i}: \"granularity\" is a number of bytes")
                    })?),
                };
                Action::BitmapAdd {
                    image: path(data, "node", i)?,
                    name: text_field(data, &["name"], i)?,
                    granularity,
                    disabled: flag(data, "disabled", i)?,
                }
            }
            "block-dirty-bitmap-remove" => Action::BitmapRemove {
                image: path(data, "node", i)?,
                name: text_field(data, &["name"], i)?,
            },
            "block-dirty-bitmap-clear" => Action::BitmapClear {
                image: path(data, "node", i)?,
                name: text_field(data, &["name"], i)?,
            },
            "block-dirty-bitmap-enable" => Action::BitmapEnable {
                image: path(data, "node", i)?,
                name: text_field(data, &["name"], i)?,
            },
            "block-dirty-bitmap-disable" => Action::BitmapDisable {
                image: path(data, "node", i)?,
                name: text_field(data, &["name"], i)?,
            },
            "block-dirty-bitmap-merge" => {
                let list = data["bitmaps"]
                    .as_array()
                    .ok_or_else(|| format!("action {i}: \"data\" needs a \"bitmaps\" list"))?;
                let mut sources = Vec::new();
                for b in list {
                    sources.push(match b {
                        Value::String(name) => BitmapSource {
                            image: None,
                            name: name.clone(),
                        },
                        Value::Object(_) => BitmapSource {
                            image: Some(path(b, "node", i)?),
                            name: text_field(b, &["name"], i)?,
                        },
                        _ => {
                            return Err(format!(
                            "action {i}: each of \"bitmaps\" is a name or {{\"node\", \"name\"}}"
                        ))
                        }
                    });
                }
                Action::BitmapMerge {
                    image: path(data, "node", i)?,
                    target: text_field(data, &["target"], i)?,
                    sources,
                }
            }
            other => return Err(format!("action {i}: unknown type {other:?}")),
        });
    }
    Ok((base.join(group), out))
}

pub fn run(args: Args) -> CmdResult {
    let text = std::fs::read_to_string(&args.plan)
        .map_err(|e| Failure::new(1, format!("{}: {e}", args.plan.display())))?;
    let base = args
        .plan
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (group_dir, actions) = parse_plan(&text, base).map_err(|m| Failure::new(1, m))?;
    let mut group = Group::open(&group_dir).map_err(|e| Failure::new(1, e.to_string()))?;
    if group.opened_with() != Recovery::Clean {
        errln!(
            "recovered an interrupted transaction first ({:?})",
            group.opened_with()
        );
    }
    match group.run(&actions) {
        Ok(outcome) => {
            for a in &actions {
                outln!("{}", describe(a));
            }
            outln!(
                "Transaction committed: {} image(s), {} overlay(s).",
                outcome.images.len(),
                outcome.overlays.len()
            );
            Ok(0)
        }
        Err(e @ TxnError::CommittedIncomplete(_)) => Err(Failure::new(
            3,
            format!("{e}; run: qcow2-tool recover {}", group_dir.display()),
        )),
        Err(e @ (TxnError::AbortIncomplete(_) | TxnError::InDoubt(_))) => Err(Failure::new(
            1,
            format!("{e}; run: qcow2-tool recover {}", group_dir.display()),
        )),
        Err(e @ TxnError::Aborted(_)) => Err(Failure::new(1, format!("transaction {e}"))),
        Err(e) => Err(Failure::new(
            1,
            format!("transaction aborted, nothing changed: {e}"),
        )),
    }
}

pub fn recover(args: RecoverArgs) -> CmdResult {
    let group = Group::open_existing(&args.group).map_err(|e| Failure::new(1, e.to_string()))?;
    outln!(
        "{}",
        match group.opened_with() {
            Recovery::Clean => "Nothing to recover.",
            Recovery::RolledBack => "Rolled back an interrupted transaction.",
            Recovery::RolledForward => "Finished a committed transaction.",
        }
    );
    Ok(0)
}

fn describe(a: &Action) -> String {
    match a {
        Action::InternalCreate { image, name } => {
            format!("{}: created snapshot {name}", image.display())
        }
        Action::InternalDelete { image, name } => {
            format!("{}: deleted snapshot {name}", image.display())
        }
        Action::InternalRevert { image, name } => {
            format!("{}: reverted to snapshot {name}", image.display())
        }
        Action::ExternalCreate {
            image,
            overlay,
            mode,
        } if mode.creates() => format!("{}: new overlay {}", image.display(), overlay.display()),
        Action::ExternalCreate { image, overlay, .. } => {
            format!(
                "{}: existing overlay {}",
                image.display(),
                overlay.display()
            )
        }
        Action::ExternalDelete { image } => {
            format!(
                "{}: merged into its backing file and removed",
                image.display()
            )
        }
        Action::BitmapAdd { image, name, .. } => {
            format!("{}: added bitmap {name}", image.display())
        }
        Action::BitmapRemove { image, name } => {
            format!("{}: removed bitmap {name}", image.display())
        }
        Action::BitmapClear { image, name } => {
            format!("{}: cleared bitmap {name}", image.display())
        }
        Action::BitmapEnable { image, name } => {
            format!("{}: enabled bitmap {name}", image.display())
        }
        Action::BitmapDisable { image, name } => {
            format!("{}: disabled bitmap {name}", image.display())
        }
        Action::BitmapMerge { image, target, .. } => {
            format!("{}: merged into bitmap {target}", image.display())
        }
        // Actions added to the library later than this tool.
        other => format!("{other:?}"),
    }
}
