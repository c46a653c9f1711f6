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

/// A `data-file` node in the open options replaces the data file the header names: writes land
/// in the file the caller named, as with qemu-io, and the header's file is left alone.
#[test]
fn a_data_file_option_replaces_the_header_data_file() {
    let dir = scratch_dir("io-data-file-option");
    let mut files = Vec::new();
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
        args.extend(["-c", "write -P 7 0 64k", spec.as_str()]);
        let out = run(program, &args, "");
        assert_eq!(code(&out), 0, "{program}: {}", stderr(&out));
        files.push((
            std::fs::read(&data).unwrap(),
            std::fs::read(&other).unwrap(),
        ));
    }
    assert_eq!(files[0], files[1]);
    let (header_file, given) = &files[0];
    assert!(
        header_file.iter().all(|&b| b == 0),
        "the header's file is untouched"
    );
    assert_eq!(given.len(), 65536);
    assert!(given.iter().all(|&b| b == 7));
}

/// `-n`, `-t none|directsync`, `open -n` and `open -o cache.direct=on` read and write the
/// image's file around the page cache (O_DIRECT), qcow2 and raw, as qemu-io's do; `-t writeback`
/// leaves what it wrote in the cache. Real qemu-io reads back what was written.
#[test]
fn nocache_modes_bypass_the_page_cache() {
    let dir = scratch_dir("io_nocache");
    for format in ["qcow2", "raw"] {
        let img = dir.join(format!("t.{format}"));
        let file = path_str(&img);
        let open_n = format!("open -n -o driver={format} {file}");
        let open_o = format!("open -o driver={format},cache.direct=on {file}");
        let ways: [(&[&str], bool); 6] = [
            (&["-n", "-f", format, file], true),
            (&["-t", "none", "-f", format, file], true),
            (&["-t", "directsync", "-f", format, file], true),
            (&["-c", &open_n], true),
            (&["-c", &open_o], true),
            (&["-t", "writeback", "-f", format, file], false),
        ];
        for (way, direct) in ways {
            let _ = std::fs::remove_file(&img);
            qemu_img_ok(&["create", "-q", "-f", format, file, "16M"]);
            let mut args = way.to_vec();
            args.extend(["-c", "write -P 7 0 8M", "-c", "write -P 8 1000 3000"]);
            let out = run(
                env!("CARGO_BIN_EXE_qcow2-tool"),
                &[&["io"], &args[..]].concat(),
                "",
            );
            assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
            let cached = qcow2_testdata::page_cache_bytes(&img);
            assert_eq!(cached < 1 << 20, direct, "{args:?}: {cached} bytes cached");
            let check = run(
                "qemu-io",
                &[
                    "-f",
                    format,
                    "-c",
                    "read -P 7 4096 4M",
                    "-c",
                    "read -P 8 1000 3000",
                    file,
                ],
                "",
            );
            assert_eq!(code(&check), 0, "{args:?}");
            assert!(!stdout(&check).contains("verification failed"), "{args:?}");
        }
    }
}
