//! Helpers shared by the CLI tests: run `qcow2-tool` and `qemu-img` the same way.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs qcow2-tool with `args` in `dir` (the image's directory when given).
pub fn tool_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2-tool"));
    cmd.args(args).env("LC_ALL", "C");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().expect("run qcow2-tool")
}

pub fn tool(args: &[&str]) -> Output {
    tool_in(None, args)
}

/// Runs qcow2-tool in `dir` under the name `qemu-img` or `qemu-io` (a link there, as
/// qemu-iotests' wrappers call it), so it acts and names itself as that tool.
pub fn ours_as(name: &str, dir: &Path, args: &[&str]) -> Output {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qcow2-tool"), &link).expect("link");
    }
    Command::new(&link)
        .args(args)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("run qcow2-tool under a qemu tool's name")
}

/// Runs qemu-img in `dir`: QEMU opens a relative data file name from the working directory.
pub fn qemu_in(dir: &Path, args: &[&str]) -> Output {
    qcow2_testdata::require_qemu();
    Command::new("qemu-img")
        .args(args)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("run qemu-img")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

/// Asserts the tool ran without a panic.
pub fn no_panic(out: &Output) {
    assert!(
        !stderr(out).contains("panicked"),
        "qcow2-tool panicked:\n{}",
        stderr(out)
    );
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The directory of a fixture.
pub fn dir_of(p: &Path) -> &Path {
    p.parent().expect("fixture has a directory")
}

/// `-f` for a fixture.
pub fn fmt(f: &qcow2_testdata::Fixture) -> &'static str {
    if f.is_qcow2() {
        "qcow2"
    } else {
        "raw"
    }
}

/// `qemu-img info`'s bitmap list of `path`.
pub fn bitmaps(path: &Path) -> serde_json::Value {
    qcow2_testdata::qemu_bitmaps(path)
}

/// A new 64 MiB image (`lazy_refcounts` as given) whose `io` writer ran `commands`, wrote
/// 0x5a at 0 and was killed by `sigraise 9`: qemu-io writes through by default, so the data
/// and its L2 entry are on disk, while lazy refcounts leave the data cluster's refcount off it.
pub fn crashed_writer_image(path: &Path, lazy_refcounts: bool, commands: &[&str]) {
    let lazy = format!(
        "lazy_refcounts={}",
        if lazy_refcounts { "on" } else { "off" }
    );
    let p = path_str(path);
    let out = tool(&["create", "-q", "-f", "qcow2", "-o", &lazy, p, "64M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut args = vec!["io"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.extend(["-c", "write -P 0x5a 0 512", "-c", "sigraise 9", p]);
    assert!(
        tool(&args).status.code().is_none(),
        "killed by its own signal"
    );
}
