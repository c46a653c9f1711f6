//! Overlays whose backing name is a `json:{...}` description (iotest 020's failing commit): ours
//! creates, reads and commits them as qemu-img/qemu-io do, opens only local nodes, and refuses a
//! remote driver before connecting to anything.

mod common;

use std::path::Path;

use common::{code, ours_as, path_str, stderr, stdout};
use qcow2_testdata::{qemu_img_ok, require_qemu, scratch_dir, socket_path};

/// Runs QEMU's `tool` with `args` in `dir`.
fn qemu(dir: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    require_qemu();
    std::process::Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("run the QEMU tool")
}

/// Makes `base.qcow2` in `dir`: 1 MiB of qcow2, all of it 0x5a, written by qemu-io.
fn filled_base(dir: &Path) {
    let base = dir.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let fill = qemu(
        dir,
        "qemu-io",
        &["-c", "write -P 0x5a 0 1M", path_str(&base)],
    );
    assert_eq!(code(&fill), 0, "{}", stderr(&fill));
}

/// A qcow2 backing name: blkdebug (failing the first data write with ENOSPC) over the file
/// `filename`, relative to the working directory as QEMU resolves it.
fn blkdebug_backing(filename: &str) -> String {
    format!(
        "json:{{'driver': 'qcow2', 'file': {{ 'driver': 'blkdebug', 'inject-error': [{{ \
         'event': 'write_aio', 'errno': 28, 'once': true }}], 'image': {{ 'driver': 'file', \
         'filename': '{filename}' }}}}}}"
    )
}

/// qemu-img arguments that create a qcow2 image `top` over the qcow2 backing name `backing`
/// (of `size`, or the backing file's).
fn overlay_args<'a>(backing: &'a str, top: &'a str, size: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec!["create", "-f", "qcow2", "-b", backing, "-F", "qcow2", top];
    args.extend(size);
    args
}

#[test]
fn an_overlay_over_a_json_backing_is_created_read_and_committed_as_qemu_does() {
    let backing = blkdebug_backing("base.qcow2");
    let mut images = Vec::new();
    for tool in ["ours", "qemu"] {
        let dir = scratch_dir(&format!("json_backing_{tool}"));
        let run = |name: &str, args: &[&str]| {
            if tool == "ours" {
                ours_as(name, &dir, args)
            } else {
                qemu(&dir, name, args)
            }
        };
        filled_base(&dir);

        let create = run("qemu-img", &overlay_args(&backing, "top.qcow2", None));
        assert_eq!(code(&create), 0, "{tool}: {}", stderr(&create));
        // The size comes from the backing file; option values show their commas doubled.
        assert!(stdout(&create).contains("size=1048576 backing_file=json:{'driver': 'qcow2',, "));
        images.push((tool, dir.clone(), stdout(&create)));

        let write = run("qemu-io", &["-c", "write -P 0x11 0 64k", "top.qcow2"]);
        assert_eq!(code(&write), 0, "{tool}: {}", stderr(&write));
        let commit = run("qemu-img", &["commit", "top.qcow2"]);
        assert_eq!(code(&commit), 1, "{tool}: {}", stdout(&commit));
        assert_eq!(
            stderr(&commit),
            "qemu-img: Block job failed: No space left on device\n",
            "{tool}"
        );
    }
    let (ours, theirs) = (&images[0], &images[1]);
    assert_eq!(ours.2, theirs.2, "the Formatting lines");
    // Each overlay reads the same through its json: backing name, with either tool.
    let mut bytes = Vec::new();
    for (_, dir, _) in &images {
        for tool in ["ours", "qemu"] {
            let out = format!("{tool}.raw");
            let args = ["convert", "-O", "raw", "top.qcow2", out.as_str()];
            let run = if tool == "ours" {
                ours_as("qemu-img", dir, &args)
            } else {
                qemu(dir, "qemu-img", &args)
            };
            assert_eq!(code(&run), 0, "{tool}: {}", stderr(&run));
            bytes.push(std::fs::read(dir.join(out)).unwrap());
        }
    }
    assert!(bytes.iter().all(|b| *b == bytes[0]));
    assert_eq!(bytes[0].len(), 1 << 20);
    assert!(bytes[0][..65536].iter().all(|&b| b == 0x11));
    assert!(bytes[0][65536..].iter().all(|&b| b == 0x5a));
}

#[test]
fn a_json_backing_with_a_remote_driver_is_refused_before_connecting() {
    let dir = scratch_dir("json_backing_nbd");
    let socket = socket_path("json_backing_nbd");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let backing = format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'nbd', 'server': {{'type': 'unix', \
         'path': '{}'}}}}}}",
        socket.display()
    );
    let top = dir.join("top.qcow2");
    let top = path_str(&top);
    qemu_img_ok(&[
        "create", "-q", "-f", "qcow2", "-u", "-b", &backing, "-F", "qcow2", top, "1M",
    ]);
    let before = std::fs::read(top).unwrap();
    for args in [
        vec!["-c", "write -P 1 0 4k", top],
        vec!["-r", "-c", "read 0 4k", top],
    ] {
        let out = ours_as("qemu-io", &dir, &args);
        assert_ne!(code(&out), 0, "{}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("'nbd' driver is not allowed"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    for args in [vec!["commit", top], vec!["info", "--backing-chain", top]] {
        let out = ours_as("qemu-img", &dir, &args);
        assert_ne!(code(&out), 0, "{args:?}");
        assert!(
            stderr(&out).contains("'nbd' driver is not allowed"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = ours_as("qemu-img", &dir, &overlay_args(&backing, "new.qcow2", None));
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("'nbd' driver is not allowed"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("new.qcow2").exists());
    // A blkdebug config file would be a host file read outside the policy.
    let config = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'config': \
                  '/etc/passwd', 'image': {'driver': 'file', 'filename': 'top.qcow2'}}}";
    let out = ours_as("qemu-img", &dir, &overlay_args(config, "c.qcow2", None));
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("'config' file is not read"),
        "{}",
        stderr(&out)
    );
    // Nothing connected to the socket, and the overlay is as it was.
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{accepted:?}"
    );
    assert_eq!(std::fs::read(top).unwrap(), before);
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn a_json_backing_file_outside_the_allowed_directory_is_refused() {
    let dir = scratch_dir("json_backing_beside");
    let elsewhere = scratch_dir("json_backing_beside_base");
    let base = elsewhere.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    let backing = blkdebug_backing(path_str(&base));
    let top = dir.join("top.qcow2");
    qemu_img_ok(&overlay_args(&backing, path_str(&top), Some("1M")));
    let follow = common::tool(&["io", "-c", "read 0 4k", path_str(&top)]);
    assert_eq!(code(&follow), 0, "{}", stderr(&follow));
    let beside = common::tool(&[
        "--backing-files=beside",
        "io",
        "-c",
        "read 0 4k",
        path_str(&top),
    ]);
    assert_ne!(code(&beside), 0);
    assert!(
        stderr(&beside).contains("not allowed by the backing policy"),
        "{}",
        stderr(&beside)
    );
    // create's probe of a json: backing name takes the policy too, for a bare new name as well.
    let create = |backing: &str, name: &str| {
        common::tool_in(
            Some(&elsewhere),
            &[
                &["--backing-files=beside"][..],
                &overlay_args(backing, name, None),
            ]
            .concat(),
        )
    };
    let out = create(&blkdebug_backing("base.qcow2"), "new.qcow2");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = create(&blkdebug_backing(path_str(&top)), "new2.qcow2");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("not allowed by the backing policy"),
        "{}",
        stderr(&out)
    );
    assert!(!elsewhere.join("new2.qcow2").exists());
}

#[test]
fn convert_onto_a_json_backing_matches_qemu() {
    let dir = scratch_dir("json_backing_convert");
    filled_base(&dir);
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path_str(&src), "1M"]);
    qemu_img_ok(&["bitmap", "--add", path_str(&src), "b0"]);
    let fill = qemu(
        &dir,
        "qemu-io",
        &["-c", "write -P 0x33 0 64k", path_str(&src)],
    );
    assert_eq!(code(&fill), 0, "{}", stderr(&fill));
    let backing = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'base.qcow2'}}";
    let mut maps = Vec::new();
    for tool in ["ours", "qemu"] {
        let dst = format!("{tool}.qcow2");
        let args = [
            "convert",
            "--bitmaps",
            "-B",
            backing,
            "-F",
            "qcow2",
            "-O",
            "qcow2",
            "src.qcow2",
            &dst,
        ];
        let out = if tool == "ours" {
            ours_as("qemu-img", &dir, &args)
        } else {
            qemu(&dir, "qemu-img", &args)
        };
        assert_eq!(code(&out), 0, "{tool}: {}", stderr(&out));
        let dst = dir.join(&dst);
        maps.push(qemu(&dir, "qemu-img", &["map", "--output=json", path_str(&dst)]).stdout);
        let info = qemu_img_ok(&["info", path_str(&dst)]);
        assert!(info.contains("backing file: json:{'driver'"), "{info}");
        assert!(info.contains("name: b0"), "{tool}: {info}");
    }
    assert_eq!(maps[0], maps[1]);
    let same = qemu(&dir, "qemu-img", &["compare", "ours.qcow2", "qemu.qcow2"]);
    assert_eq!(code(&same), 0, "{}", stdout(&same));
}

/// A `json:` name that describes nothing but a qcow2 file goes by that file's name, and that
/// image's own relative backing name resolves against its directory, as in QEMU.
#[test]
fn a_json_name_of_just_a_file_goes_by_that_file() {
    let dir = scratch_dir("json_backing_plain");
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&sub.join("b0.qcow2")),
        "1M",
    ]);
    let b0 = path_str(&sub.join("b0.qcow2")).to_owned();
    let fill = qemu(&dir, "qemu-io", &["-c", "write -P 0x44 512k 64k", &b0]);
    assert_eq!(code(&fill), 0, "{}", stderr(&fill));
    let mid = sub.join("mid.qcow2");
    qemu_img_ok(&overlay_args("b0.qcow2", path_str(&mid), None));
    let fill = qemu(
        &dir,
        "qemu-io",
        &["-c", "write -P 0x55 0 64k", path_str(&mid)],
    );
    assert_eq!(code(&fill), 0, "{}", stderr(&fill));
    let backing =
        "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'sub/mid.qcow2'}}";
    let create = qemu(&dir, "qemu-img", &overlay_args(backing, "top.qcow2", None));
    assert_eq!(code(&create), 0, "{}", stderr(&create));
    let ours = ours_as("qemu-img", &dir, &["map", "top.qcow2"]);
    let theirs = qemu(&dir, "qemu-img", &["map", "top.qcow2"]);
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    assert_eq!(stdout(&ours), stdout(&theirs));
    assert!(stdout(&ours).contains("sub/b0.qcow2"), "{}", stdout(&ours));
}

/// `info --backing-chain` walks through a `json:` backing name: a name of just a file shows that
/// file as qemu-img shows it (human and JSON output alike); any other description still lists
/// its layer, named by the description.
#[test]
fn info_walks_the_chain_through_a_json_backing_name() {
    let dir = scratch_dir("json_backing_info");
    filled_base(&dir);
    let base = dir.join("base.qcow2");
    let plain = format!(
        "json:{{\"driver\": \"qcow2\", \"file\": {{\"driver\": \"file\", \"filename\": \"{}\"}}}}",
        base.display()
    );
    for (top, backing) in [
        ("plain.qcow2", plain),
        ("debug.qcow2", blkdebug_backing(path_str(&base))),
    ] {
        qemu_img_ok(&overlay_args(
            &backing,
            path_str(&dir.join(top)),
            Some("1M"),
        ));
    }
    for output in ["human", "json"] {
        let args = ["info", "--backing-chain", "--output", output, "plain.qcow2"];
        let ours = ours_as("qemu-img", &dir, &args);
        assert_eq!(code(&ours), 0, "{}", stderr(&ours));
        assert_eq!(
            stdout(&ours),
            stdout(&qemu(&dir, "qemu-img", &args)),
            "{output}"
        );
    }
    let ours = ours_as(
        "qemu-img",
        &dir,
        &["info", "--backing-chain", "--output", "json", "debug.qcow2"],
    );
    assert_eq!(code(&ours), 0, "{}", stderr(&ours));
    let layers: serde_json::Value = serde_json::from_str(&stdout(&ours)).unwrap();
    let layers = layers.as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1]["virtual-size"], 1 << 20);
    assert!(layers[1]["filename"].as_str().unwrap().starts_with("json:"));
}
