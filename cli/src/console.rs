//! Output that never panics: `println!` panics when stdout is a closed pipe (`| head`) or a full
//! device, which aborted a command halfway (an `io` script skipped its later writes). Commands
//! print through `outln!`/`out!` instead: the first failed write is remembered, later output is
//! dropped, the command's work goes on, and `main` reports the error once and exits non-zero,
//! as the QEMU tools do. Messages to stderr (`errln!`) ignore failures: there is nowhere left
//! to report them.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

/// The name messages start with: the name the tool was invoked by (`qemu-img`, `qemu-io` through
/// a link of that name), as QEMU's tools name themselves after `argv[0]`.
static PROGRAM: OnceLock<String> = OnceLock::new();

/// Records the invoked name; the first call wins.
pub fn set_program(name: &str) {
    let _ = PROGRAM.set(name.to_owned());
}

/// The name to start messages with (`qcow2-tool` unless invoked under another name).
pub fn program() -> &'static str {
    PROGRAM.get().map_or("qcow2-tool", String::as_str)
}

/// The first error writing to stdout, if any.
static FAILED: Mutex<Option<io::ErrorKind>> = Mutex::new(None);

fn failed() -> std::sync::MutexGuard<'static, Option<io::ErrorKind>> {
    FAILED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Output held back until [`finish`], when [`hold_stdout`] asked for it.
static HELD: Mutex<Option<String>> = Mutex::new(None);

fn held() -> std::sync::MutexGuard<'static, Option<String>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds stdout back until the command ends when it is not a terminal, as C's stdio buffers a
/// pipe: qemu-img's errors (stderr, unbuffered) then come before its report, and tests that
/// merge the two streams see them in that order.
pub fn hold_stdout() {
    if !io::stdout().is_terminal() {
        held().get_or_insert_with(String::new);
    }
}

/// Writes to stdout unless an earlier write failed.
pub fn write_out(args: fmt::Arguments<'_>) {
    if let Some(buf) = held().as_mut() {
        let _ = fmt::Write::write_fmt(buf, args);
        return;
    }
    let mut failed = failed();
    if failed.is_some() {
        return;
    }
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        *failed = Some(e.kind());
    }
}

/// Writes to stderr, ignoring failures.
pub fn write_err(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Flushes stdout; the first output error of the run, as a message, if there was one.
pub fn finish() -> Option<String> {
    let held = held().take();
    if let Some(buf) = held {
        write_out(format_args!("{buf}"));
    }
    if let Err(e) = io::stdout().lock().flush() {
        failed().get_or_insert(e.kind());
    }
    (*failed()).map(|kind| {
        format!(
            "Failed to write to standard output: {}",
            io::Error::from(kind)
        )
    })
}

/// `print!` that never panics.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::console::write_out(format_args!($($arg)*)) };
}

/// `println!` that never panics.
#[macro_export]
macro_rules! outln {
    () => { $crate::console::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    () => { $crate::console::write_err(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::write_err(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::console::write_err(format_args!($($arg)*)) };
}

/// A message on stderr after the program's name, as QEMU's `error_report` prints it.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        $crate::console::write_err(format_args!(
            "{}: {}\n",
            $crate::console::program(),
            format_args!($($arg)*)
        ))
    };
}
