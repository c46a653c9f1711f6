//! The `nbd` target: arbitrary bytes as a client's side of a connection to a server exporting a
//! small in-memory image. The server must end or answer, never panic, hang or allocate beyond
//! the wire limits; what it sends back must start with the fixed-newstyle greeting. Depends only
//! on `qcow2`, `qcow2_nbd` and `std`, so `nbd/tests/fuzz_replay.rs` compiles the same code.

use std::io::{self, Read, Write};
use std::sync::Arc;

use qcow2::{CreateOptions, Image, MemoryStorage};
use qcow2_nbd::{serve_connection, Export};

/// The client's bytes, then end of stream; everything the server writes is kept (bounded).
struct Scripted<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Replies are checked for their start only; a read of many MiB is not kept.
        let room = (1usize << 20).saturating_sub(self.output.len());
        self.output.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A 4 MiB image with a little data, in memory.
fn export(read_only: bool) -> Export {
    let storage = Box::new(MemoryStorage::new());
    let image = Image::create_in(
        storage,
        "fuzz.qcow2",
        &CreateOptions {
            size: 4 << 20,
            ..CreateOptions::default()
        },
    )
    .expect("a new image");
    image.write_at(&[0x5a; 65536], 1 << 20).expect("data");
    Export {
        name: "exp".into(),
        image: Arc::new(image),
        read_only,
        description: Some("fuzz".into()),
        bitmaps: Vec::new(),
    }
}

/// First byte: bit 0 makes the export read-only. The rest is the client's stream.
pub fn nbd(data: &[u8]) {
    serve_script(data);
}

/// Serves `data` (see [`nbd`]) and returns what the server sent (its first MiB).
pub fn serve_script(data: &[u8]) -> Vec<u8> {
    let (read_only, input) = match data.split_first() {
        Some((flags, rest)) => (flags & 1 != 0, rest),
        None => (false, data),
    };
    let exports = [export(read_only)];
    let mut stream = Scripted {
        input,
        output: Vec::new(),
    };
    let _ = serve_connection(&exports, &mut stream);
    assert!(
        stream.output.starts_with(b"NBDMAGICIHAVEOPT"),
        "the server did not greet first"
    );
    stream.output
}

/// Seeds: a real client's conversation (flags, STRUCTURED_REPLY, SET_META_CONTEXT, GO), then
/// requests of every kind, read-write and read-only.
pub fn nbd_seeds() -> Vec<(String, Vec<u8>)> {
    let opt = |option: u32, data: &[u8]| {
        let mut v = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    };
    let string = |s: &str| {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let request = |flags: u16, kind: u16, offset: u64, len: u32| {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&9u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let mut handshake = 3u32.to_be_bytes().to_vec();
    handshake.extend(opt(8, &[]));
    handshake.extend(opt(3, &[]));
    let mut meta = string("exp");
    meta.extend_from_slice(&2u32.to_be_bytes());
    meta.extend(string("base:allocation"));
    meta.extend(string("qemu:allocation-depth"));
    handshake.extend(opt(9, &meta));
    handshake.extend(opt(10, &meta));
    let mut go = string("exp");
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    handshake.extend(opt(6, &go));
    handshake.extend(opt(7, &go));
    let mut session = handshake.clone();
    session.extend(request(0, 0, 0, 8192));
    session.extend(request(0, 0, (1 << 20) - 4096, 16384));
    session.extend(request(4, 0, 1 << 20, 4096));
    session.extend(request(0, 7, 0, 4 << 20));
    session.extend(request(8, 7, 1 << 20, 4096));
    let mut write = request(1, 1, 2 << 20, 512);
    write.extend_from_slice(&[0xa5; 512]);
    session.extend(write);
    session.extend(request(0, 6, 3 << 20, 65536));
    session.extend(request(16, 6, 3 << 20, 512));
    session.extend(request(0, 4, 3 << 20, 65536));
    session.extend(request(0, 3, 0, 0));
    session.extend(request(0, 5, 0, 4096));
    session.extend(request(0, 2, 0, 0));
    let mut old_style = 1u32.to_be_bytes().to_vec();
    old_style.extend(opt(1, b"exp"));
    old_style.extend(request(0, 0, 0, 512));
    vec![
        ("seed-session".into(), [&[0u8][..], &session].concat()),
        (
            "seed-session-read-only".into(),
            [&[1u8][..], &session].concat(),
        ),
        ("seed-export-name".into(), [&[0u8][..], &old_style].concat()),
        (
            "seed-abort".into(),
            [&[0u8][..], &3u32.to_be_bytes(), &opt(2, &[])].concat(),
        ),
    ]
}
