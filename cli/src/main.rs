//! `qcow2-tool`: a qemu-img/qemu-io style command line over the qcow2 engine. Each command lives
//! in its own module; this file only parses arguments and dispatches. Outputs and exit codes
//! mirror qemu-img/qemu-io so the two can be run side by side.
#![forbid(unsafe_code)]

#[macro_use]
mod console;
mod bench;
mod cache;
mod img;
mod io;
mod luks_file;
mod nodes;
mod opts;
mod output;
mod progress;
mod secrets;
mod serve;
mod size;
mod source;
mod target;
mod transaction;

use img::{
    amend, bitmap, check, commit, compare, convert, create, dd, info, map, measure, rebase, resize,
    snapshot,
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "qcow2-tool",
    version,
    about = "qemu-img/qemu-io style tool over the qcow2 engine"
)]
struct Cli {
    /// Which backing and data files an image may make the tool open: `follow` (anything, as
    /// qemu-img does), `beside` (only files in the image's own directory or below), `refuse`.
    /// Images name files by path, so an untrusted image can make `follow` read any file.
    #[arg(
        long = "backing-files",
        global = true,
        value_enum,
        default_value = "follow"
    )]
    backing_files: source::BackingFiles,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new image, as qemu-img create.
    Create(create::Args),
    /// Show what qemu-img info shows.
    Info(info::Args),
    /// Show the guest-to-host mapping, as qemu-img map.
    Map(map::Args),
    /// Check the image's consistency, as qemu-img check.
    Check(check::Args),
    /// Copy the guest bytes to a raw file or a new qcow2 image, as qemu-img convert.
    Convert(convert::Args),
    /// Change the virtual size, as qemu-img resize.
    Resize(resize::Args),
    /// Change format options of an image in place, as qemu-img amend.
    Amend(amend::Args),
    /// How large a new image would be, as qemu-img measure.
    Measure(measure::Args),
    /// Copy a range of a disk into a new image, as qemu-img dd.
    Dd(dd::Args),
    /// Merge an image into its backing file (or a deeper base), as qemu-img commit.
    Commit(commit::Args),
    /// Change the backing file (copying what would change unless -u), as qemu-img rebase.
    Rebase(rebase::Args),
    /// Compare the guest contents of two images, as qemu-img compare.
    Compare(compare::Args),
    /// List internal snapshots, as qemu-img snapshot.
    Snapshot(snapshot::Args),
    /// Run a group of snapshot actions atomically (a QMP-style transaction plan).
    Transaction(transaction::Args),
    /// Finish or roll back an interrupted group transaction.
    Recover(transaction::RecoverArgs),
    /// Run qemu-io commands (read, write, discard, flush, map).
    Io(io::Args),
    /// Time a read or write workload, as qemu-img bench.
    Bench(bench::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps, as qemu-img bitmap.
    Bitmap(bitmap::Args),
    /// Serve images as NBD exports, as qemu-nbd.
    Serve(serve::Args),
}

fn main() {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Invoked through a link named `qemu-img` or `qemu-io` (as qemu-iotests and scripts call
    // them), the tool names itself so in messages, and `qemu-io` means the `io` command.
    let invoked = argv
        .first()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    if let Some(name @ ("qemu-img" | "qemu-io")) = invoked.as_deref() {
        console::set_program(name);
        if name == "qemu-io" {
            argv.insert(1, "io".into());
        }
    }
    // compare reports errors with 2; everything else with 1.
    // The subcommand is the first word after the global options.
    let mut words = argv.iter().skip(1);
    let mut subcommand = words.next();
    while let Some(w) = subcommand.filter(|w| w.to_string_lossy().starts_with("--backing-files")) {
        if w == "--backing-files" {
            words.next();
        }
        subcommand = words.next();
    }
    let error_code = if subcommand.is_some_and(|a| a == "compare") {
        2
    } else {
        1
    };
    let subcommand = subcommand.map(|s| s.to_string_lossy().into_owned());
    if let Err(message) = secrets::preprocess(&mut argv, subcommand.as_deref()) {
        report!("{message}");
        std::process::exit(error_code);
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { error_code } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    source::set_backing_files(cli.backing_files);
    let result = match cli.command {
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Map(args) => map::run(args),
        Command::Check(args) => check::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Amend(args) => amend::run(args),
        Command::Measure(args) => measure::run(args),
        Command::Dd(args) => dd::run(args),
        Command::Commit(args) => commit::run(args),
        Command::Rebase(args) => rebase::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Transaction(args) => transaction::run(args),
        Command::Recover(args) => transaction::recover(args),
        Command::Io(args) => io::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Bitmap(args) => bitmap::run(args),
        Command::Serve(args) => serve::run(args),
    };
    let mut code = match result {
        Ok(code) => code,
        Err(failure) => {
            report!("{}", failure.message);
            failure.code
        }
    };
    if let Some(message) = console::finish() {
        report!("{message}");
        if code == 0 {
            code = error_code;
        }
    }
    std::process::exit(code);
}
