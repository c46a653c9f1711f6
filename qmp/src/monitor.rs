//! One QMP session at a time over a byte stream: the greeting, capabilities negotiation, then
//! `execute` requests answered in order, each reply one line ending in CRLF with the request's
//! `id` echoed. Errors that cannot be tied to a request (bad JSON, a non-object) carry no id.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::{Mutex, MutexGuard};

use qcow2_transaction::Group;
use serde_json::{json, Map, Value};

use crate::commands::{self, Disk, Served};
use crate::framing::{Frame, Splitter};
use crate::QmpError;

/// The monitor of a server: its group and disks, and what `quit` does.
pub struct Monitor {
    served: Mutex<Option<Served>>,
    quit: Box<dyn Fn() + Send + Sync>,
}

/// What a request asks the session to do after replying.
enum After {
    Continue,
    Quit,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// A monitor over `disks` (live handles the caller serves), whose transactions go through
    /// `group`. `quit` stops the server.
    pub fn new(group: Group, disks: Vec<Disk>, quit: Box<dyn Fn() + Send + Sync>) -> Monitor {
        Monitor {
            served: Mutex::new(Some(Served { group, disks })),
            quit,
        }
    }

    fn served(&self) -> MutexGuard<'_, Option<Served>> {
        // A panicking command leaves the group as its transaction's drop left it (aborted).
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the monitor: waits for a running command, then gives back the group and releases
    /// the disks' handles, so the caller can close the images. Later commands fail.
    pub fn close(&self) -> Option<Group> {
        self.served().take().map(|s| s.group)
    }

    /// Serves clients on `listener` one after another until the monitor is closed.
    pub fn listen(&self, listener: UnixListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if self.served().is_none() {
                return;
            }
            let Ok(mut reader) = stream.try_clone() else {
                continue;
            };
            if let Ok(true) = self.session(&mut reader, stream) {
                // The server is stopping; the client hangs up first, as it does with QEMU
                // (qemu.qmp reports a server hang-up before its own disconnect as an error).
                // The process's exit closes the socket if the client never does.
                let _ = io::copy(&mut reader, &mut io::sink());
                return;
            }
        }
    }

    /// Runs one session; `Ok(true)` when the client asked to quit.
    pub fn session(&self, mut reader: impl Read, mut writer: impl Write) -> io::Result<bool> {
        let greeting = json!({"QMP": {"version": version(), "capabilities": []}});
        send(&mut writer, &greeting)?;
        let mut negotiated = false;
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for frame in splitter.push(&buf[..n]) {
                let object = match frame {
                    Frame::Object(bytes) => bytes,
                    Frame::NotObject => {
                        send_error(
                            &mut writer,
                            None,
                            &generic("QMP input must be a JSON object"),
                        )?;
                        continue;
                    }
                    Frame::Broken => {
                        send_error(&mut writer, None, &generic("JSON parse error"))?;
                        return Ok(false);
                    }
                };
                let request: Map<String, Value> = match serde_json::from_slice(&object) {
                    Ok(Value::Object(o)) => o,
                    Ok(_) => {
                        send_error(
                            &mut writer,
                            None,
                            &generic("QMP input must be a JSON object"),
                        )?;
                        continue;
                    }
                    Err(e) => {
                        let desc = format!("JSON parse error, {e}");
                        send_error(&mut writer, None, &generic(&desc))?;
                        continue;
                    }
                };
                let id = request.get("id").cloned();
                match self.request(&request, &mut negotiated) {
                    Ok((value, after)) => {
                        let mut reply = json!({ "return": value });
                        if let Some(id) = id {
                            reply["id"] = id;
                        }
                        send(&mut writer, &reply)?;
                        if let After::Quit = after {
                            (self.quit)();
                            return Ok(true);
                        }
                    }
                    Err(e) => send_error(&mut writer, id, &e)?,
                }
            }
        }
    }

    /// Checks the request's envelope and runs it.
    fn request(
        &self,
        request: &Map<String, Value>,
        negotiated: &mut bool,
    ) -> Result<(Value, After), QmpError> {
        if let Some(k) = request
            .keys()
            .find(|k| !["execute", "arguments", "id"].contains(&k.as_str()))
        {
            return Err(generic(&format!("QMP input member '{k}' is unexpected")));
        }
        let name = match request.get("execute") {
            None => return Err(generic("QMP input lacks member 'execute'")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(generic("QMP input member 'execute' must be a string")),
        };
        let arguments = match request.get("arguments") {
            None | Some(Value::Object(_)) => request.get("arguments"),
            Some(_) => return Err(generic("QMP input member 'arguments' must be an object")),
        };
        if name == "qmp_capabilities" {
            if *negotiated {
                return Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            let mut args = crate::args::Args::new(arguments, "")?;
            if let Some(enable) = args.opt("enable") {
                let list = enable.as_array().ok_or_else(|| {
                    generic("Invalid parameter type for 'enable', expected: array")
                })?;
                if let Some(v) = list.first() {
                    // No capability is offered (the greeting lists none).
                    let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    return Err(generic(&format!(
                        "Parameter 'null' does not accept value '{shown}'"
                    )));
                }
            }
            args.done()?;
            *negotiated = true;
            return Ok((json!({}), After::Continue));
        }
        if !*negotiated {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if name == "quit" {
            crate::args::Args::new(arguments, "")?.done()?;
            return Ok((json!({}), After::Quit));
        }
        let mut served = self.served();
        let served = served
            .as_mut()
            .ok_or_else(|| generic("the server is shutting down"))?;
        commands::execute(served, name, arguments).map(|v| (v, After::Continue))
    }
}

fn generic(desc: &str) -> QmpError {
    QmpError::generic(desc)
}

/// What `query-version` and the greeting report: this crate's version in QEMU's shape.
pub fn version() -> Value {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": part(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": part(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": part(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("qcow2-qmp ", env!("CARGO_PKG_VERSION")),
    })
}

/// Writes one message as one line ending in CRLF.
fn send(w: &mut impl Write, message: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.extend_from_slice(b"\r\n");
    w.write_all(&line)?;
    w.flush()
}

fn send_error(w: &mut impl Write, id: Option<Value>, e: &QmpError) -> io::Result<()> {
    let mut reply = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        reply["id"] = id;
    }
    send(w, &reply)
}
