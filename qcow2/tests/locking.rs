//! Image locks interoperate with QEMU's: while qemu-io holds an image for writing we cannot open
//! it, and while we hold it for writing qemu-io cannot, in both directions.

use std::io::Write;
use std::process::{Command, Stdio};

use qcow2::{CreateOptions, Error, Image, OpenOptions};
use qcow2_testdata::{qemu_io, require_qemu, scratch_dir};

#[test]
fn a_qemu_io_writer_keeps_us_out_and_we_keep_qemu_io_out() {
    require_qemu();
    let path = scratch_dir("locks").join("a.qcow2");
    let options = CreateOptions::new(1 << 20);
    let ours = Image::create(&path, &options).unwrap();
    let p = path.to_str().unwrap();
    let blocked = qemu_io(&["-c", "read 0 512", p]);
    assert!(
        !blocked.status.success(),
        "qemu-io opened an image we hold for writing"
    );
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("lock"));
    ours.close().unwrap();

    // qemu-io waits on its stdin, holding the image open for writing until we close the pipe.
    let mut qemu = Command::new("qemu-io")
        .arg(p)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = qemu.stdin.as_mut().unwrap();
    // A command that prints once the image is open tells us qemu-io holds the locks.
    stdin.write_all(b"read 0 512\n").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    let stdout = qemu.stdout.as_mut().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.contains("read 512/512"), "{line}");

    let writer = Image::open(&path, &OpenOptions::read_write());
    assert!(matches!(writer, Err(Error::Locked { .. })), "{writer:?}");
    let reader_open = Image::open(&path, &OpenOptions::default());
    assert!(matches!(reader_open, Err(Error::Locked { .. })));
    let forced = Image::open(&path, &OpenOptions::default().force_share(true));
    assert!(forced.is_ok());

    drop(qemu.stdin.take());
    assert!(qemu.wait().unwrap().success());
    Image::open(&path, &OpenOptions::read_write())
        .unwrap()
        .close()
        .unwrap();
}
