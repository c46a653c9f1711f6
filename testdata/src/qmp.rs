//! A real QMP client for tests: the `qemu.qmp` Python package (from PyPI, in a virtual
//! environment under the target directory that `.ci/run` creates) runs a small driver that
//! executes one command per input line and prints each reply as one JSON line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The driver: every input line is `{"execute": ..., "arguments": ...}`; every output line is
/// `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`.
const DRIVER: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient, ExecuteError

async def main():
    qmp = QMPClient('qcow2-test')
    await qmp.connect(sys.argv[1])
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            ret = await qmp.execute(cmd['execute'], cmd.get('arguments'))
            out = {'return': ret}
        except ExecuteError as e:
            out = {'error': {'class': e.error_class, 'desc': str(e)}}
        print(json.dumps(out), flush=True)
        if cmd['execute'] == 'quit':
            break
    await qmp.disconnect()

asyncio.run(main())
"#;

/// The virtual environment's Python with `qemu.qmp`, creating the environment if it is
/// missing; `None` (with the reason printed) when it cannot be installed here. CI installs it.
pub fn qmp_python() -> Option<PathBuf> {
    let venv = crate::target_dir().join("qmp-venv");
    let python = venv.join("bin/python");
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import qemu.qmp"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "qemu.qmp"])
            .status()
            .is_ok_and(|s| s.success());
    if made && works(&python) {
        return Some(python);
    }
    eprintln!(
        "SKIPPED: the qemu.qmp Python package could not be installed into {} \
         (python3 -m venv; pip install qemu.qmp); .ci/run installs it",
        venv.display()
    );
    None
}

/// A running `qemu.qmp` client connected to a QMP socket.
pub struct QmpClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl QmpClient {
    /// Connects to `socket` with `python` (from [`qmp_python`]).
    pub fn connect(python: &Path, socket: &Path) -> QmpClient {
        let mut child = Command::new(python)
            .args(["-c", DRIVER])
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the qemu.qmp driver");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        QmpClient {
            child,
            stdin,
            stdout,
        }
    }

    /// Executes one command; returns `{"return": ...}` or `{"error": ...}`.
    pub fn execute(&mut self, name: &str, arguments: serde_json::Value) -> serde_json::Value {
        let cmd = serde_json::json!({"execute": name, "arguments": arguments});
        let stdin = self.stdin.as_mut().expect("the client is open");
        writeln!(stdin, "{cmd}").expect("send to the qemu.qmp driver");
        stdin.flush().expect("send to the qemu.qmp driver");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the reply");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the qemu.qmp driver said {line:?} ({e})"))
    }

    /// Sends a command without waiting for its reply (a test then cuts the server off).
    pub fn send(&mut self, name: &str, arguments: serde_json::Value) {
        let cmd = serde_json::json!({"execute": name, "arguments": arguments});
        let stdin = self.stdin.as_mut().expect("the client is open");
        writeln!(stdin, "{cmd}").expect("send to the qemu.qmp driver");
        stdin.flush().expect("send to the qemu.qmp driver");
    }

    /// Ends the driver whatever state it is in (after the server was killed).
    pub fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Executes a command that must succeed; returns its result.
    pub fn ok(&mut self, name: &str, arguments: serde_json::Value) -> serde_json::Value {
        let reply = self.execute(name, arguments);
        match reply.get("return") {
            Some(r) => r.clone(),
            None => panic!("{name} failed: {reply}"),
        }
    }

    /// Disconnects and waits for the driver (which must exit cleanly: qemu.qmp raises on a
    /// protocol problem).
    pub fn close(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for the qemu.qmp driver");
        assert!(status.success(), "the qemu.qmp driver failed: {status}");
    }
}
