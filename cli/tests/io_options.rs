//! `io` called as scripts call qemu-io (the qemu-iotests harness among them): commands from
//! standard input after a prompt, and the cache, aio, force-share and repeated format options.
//! Each case runs both tools on copies of one image and compares exit codes and output lines
//! (timing lines aside).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{code, path_str, stderr, stdout};
use qcow2_testdata::{qemu_img_ok, scratch_dir};

/// Runs `program` with `args`, feeding `input` on standard input.
fn run(program: &str, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("wait")
}

/// Output without the throughput lines, whose figures differ run to run.
fn steady(text: &str) -> String {
    text.split('\n')
        .map(|l| match l.find(" ops; ") {
            Some(_) => "<timing>",
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `io ARGS` and `qemu-io ARGS` on two copies of `base`, with `input` on standard input.
fn both(dir: &Path, base: &Path, args: &[&str], input: &str) -> (Output, Output) {
    let mut out = Vec::new();
    for (i, program) in [env!("CARGO_BIN_EXE_qcow2-tool"), "qemu-io"]
        .into_iter()
        .enumerate()
    {
        let copy = dir.join(format!("copy{i}.qcow2"));
        std::fs::copy(base, &copy).unwrap();
        let mut full: Vec<&str> = if i == 0 { vec!["io"] } else { vec![] };
        full.extend_from_slice(args);
        full.push(path_str(&copy));
        out.push(run(program, &full, input));
    }
    let theirs = out.pop().unwrap();
    (out.pop().unwrap(), theirs)
}

#[test]
fn commands_from_standard_input_print_qemu_io_prompts() {
    let dir = scratch_dir("io_stdin");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let input = "write -P 0x5a 0 4k\nread -P 0x5a 0 4k\n\nread -P 0x11 0 512\nquit\nread 0 1\n";
    let (ours, theirs) = both(&dir, &base, &["-f", "qcow2"], input);
    assert_eq!(code(&ours), code(&theirs), "{}", stderr(&ours));
    assert_eq!(steady(&stdout(&ours)), steady(&stdout(&theirs)));
    assert!(stdout(&ours).starts_with("qemu-io> wrote 4096/4096"));
}

#[test]
fn cache_aio_force_share_and_repeated_formats_are_taken_as_qemu_io_takes_them() {
    let dir = scratch_dir("io_options");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let cases: &[&[&str]] = &[
        &["--cache", "writeback", "--aio", "threads", "-f", "qcow2"],
        &["-t", "none", "-f", "raw", "-f", "qcow2"],
        &["-n", "-f", "qcow2"],
        &["-r", "-U", "-f", "qcow2"],
        &["-U", "-f", "qcow2"],
        &["-t", "bogus", "-f", "qcow2"],
        &["--aio", "bogus", "-f", "qcow2"],
    ];
    for case in cases {
        let mut args = case.to_vec();
        args.extend(["-c", "read -P 0 0 4k"]);
        let (ours, theirs) = both(&dir, &base, &args, "");
        assert_eq!(code(&ours), code(&theirs), "{case:?}: {}", stderr(&ours));
        assert_eq!(steady(&stdout(&ours)), steady(&stdout(&theirs)), "{case:?}");
        if code(&theirs) != 0 {
            let why = |o: &Output| {
                let e = stderr(o);
                e.rsplit(": ").next().unwrap_or_default().trim().to_string()
            };
            assert_eq!(why(&ours), why(&theirs), "{case:?}");
        }
    }
}

#[test]
fn alloc_length_truncate_vectored_and_aio_commands_print_what_qemu_io_prints() {
    let dir = scratch_dir("io_commands");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let commands = [
        "write 0 4k",
        "alloc 0 4k",
        "alloc 4k 8k",
        "alloc 0 128k",
        "alloc 100 512",
        "aio_write -P 3 64k 4k",
        "aio_flush",
        "aio_read -P 3 64k 4k",
        "readv -P 3 64k 2k 2k",
        "readv -P 9 64k 1k",
        "writev -P 4 128k 1k 1k",
        "read -P 4 128k 2k",
        "truncate 2M",
        "length",
        "alloc 0 2M",
        "truncate 512k",
        "length",
        "alloc 0",
    ];
    let mut args = vec!["-f", "qcow2"];
    for c in &commands {
        args.extend(["-c", c]);
    }
    let (ours, theirs) = both(&dir, &base, &args, "");
    assert_eq!(code(&ours), code(&theirs), "{}", stderr(&ours));
    assert_eq!(steady(&stdout(&ours)), steady(&stdout(&theirs)));
}

/// A `data-file.filename` in the open options replaces the data file the header names, as in
/// qemu-io: the write lands in the file asked for, never in the header's.
#[test]
fn a_data_file_option_names_the_data_file_as_in_qemu_io() {
    let dir = scratch_dir("io-data-file-option");
    let mut results = Vec::new();
    for (i, program) in [env!("CARGO_BIN_EXE_qcow2-tool"), "qemu-io"]
        .into_iter()
        .enumerate()
    {
        let img = dir.join(format!("t{i}.qcow2"));
        let data = dir.join(format!("t{i}.data"));
        let other = dir.join(format!("other{i}.data"));
        let o = format!("data_file={}", data.display());
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            path_str(&img),
            "64k",
        ]);
        std::fs::write(&other, []).unwrap();
        let spec = format!(
            "json:{{'driver':'qcow2','file':{{'driver':'file','filename':'{}'}},\
             'data-file':{{'driver':'file','filename':'{}'}}}}",
            img.display(),
            other.display()
        );
        let mut args = if i == 0 { vec!["io"] } else { vec![] };
        args.extend(["-c", "write -P 7 0 64k", &spec]);
        let out = run(program, &args, "");
        assert_eq!(code(&out), 0, "{program}: {}", stderr(&out));
        let written = std::fs::read(&other).unwrap();
        assert!(written.len() == 65536 && written.iter().all(|&b| b == 7));
        let header_file = std::fs::read(&data).unwrap();
        assert!(
            header_file.iter().all(|&b| b == 0),
            "{program}: header's file untouched"
        );
        results.push(steady(&stdout(&out)));
    }
    assert_eq!(results[0], results[1]);
}

/// Any other `data-file` node (blkdebug over the file, say) is refused, not ignored: opening the
/// header's file instead would write where the caller did not ask.
#[test]
fn a_data_file_node_other_than_a_file_is_refused() {
    let dir = scratch_dir("io-data-file-node");
    let img = dir.join("t.qcow2");
    let data = dir.join("t.data");
    let o = format!("data_file={}", data.display());
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        path_str(&img),
        "64k",
    ]);
    let spec = format!(
        "json:{{'driver':'qcow2','file':{{'driver':'file','filename':'{}'}},\
         'data-file':{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}}}}}}",
        img.display(),
        data.display()
    );
    let out = run(
        env!("CARGO_BIN_EXE_qcow2-tool"),
        &["io", "-c", "write -P 7 0 64k", &spec],
        "",
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("'data-file' option"),
        "{}",
        stderr(&out)
    );
    let written = std::fs::read(&data).unwrap();
    assert!(written.iter().all(|&b| b == 0), "nothing is written");
}
