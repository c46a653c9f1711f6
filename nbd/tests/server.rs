//! The server around the protocol: TCP and unix listeners, the connection limit (a client over
//! the limit gets no greeting until a slot frees, as with qemu-nbd), the shutdown handle, and
//! the non-persistent exit after the last client.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use qcow2::{CreateOptions, Image, MemoryStorage};
use qcow2_nbd::wire::*;
use qcow2_nbd::{Export, Listener, Server, ServerOptions};

fn export() -> Export {
    let options = CreateOptions::new(1 << 20);
    let image = Image::create_in(Box::new(MemoryStorage::new()), "mem", &options).unwrap();
    image.write_at(&[7; 512], 0).unwrap();
    Export::new("e", Arc::new(image))
}

/// Handshake with EXPORT_NAME (simple replies), then a 512-byte read at 0.
fn read_first_sector<S: Read + Write>(s: &mut S) -> Vec<u8> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, greeting());
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&encode_option(OPT_EXPORT_NAME, b"e")).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    let req = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    s.write_all(&encode_request(&req, Replies::Simple)).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let mut data = vec![0u8; 512];
    s.read_exact(&mut data).unwrap();
    data
}

#[test]
fn tcp_server_serves_until_shut_down() {
    let server = Server::new(
        vec![export()],
        ServerOptions::default().max_connections(0).persistent(true),
    );
    let listener = Listener::tcp("127.0.0.1:0").unwrap();
    let addr = listener.tcp_addr().unwrap();
    let stop = server.shutdown_handle();
    std::thread::scope(|s| {
        let running = s.spawn(|| server.run(listener));
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).unwrap();
            assert_eq!(read_first_sector(&mut c), vec![7; 512]);
        }
        // A client still connected at shutdown is disconnected.
        let mut idle = TcpStream::connect(addr).unwrap();
        let mut g = [0u8; 18];
        idle.read_exact(&mut g).unwrap();
        stop.shutdown();
        running.join().unwrap().unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(idle.read(&mut b), Ok(0) | Err(_)));
    });
}

#[test]
fn a_client_over_the_limit_waits_for_a_free_slot() {
    let dir = std::env::temp_dir().join(format!("q2nbd-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let server = Server::new(vec![export()], ServerOptions::default().persistent(true));
    let listener = Listener::unix(&sock).unwrap();
    let stop = server.shutdown_handle();
    std::thread::scope(|s| {
        let running = s.spawn(|| server.run(listener));
        let mut first = UnixStream::connect(&sock).unwrap();
        assert_eq!(read_first_sector(&mut first), vec![7; 512]);
        // The second connection is queued by the kernel but not accepted: no greeting yet.
        let mut second = UnixStream::connect(&sock).unwrap();
        second.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            second.read(&mut b).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock)
        );
        second.set_nonblocking(false).unwrap();
        drop(first);
        assert_eq!(read_first_sector(&mut second), vec![7; 512]);
        drop(second);
        stop.shutdown();
        running.join().unwrap().unwrap();
    });
    // The listener's socket file goes with it.
    assert!(!sock.exists());

    // Not persistent (qemu-nbd without -t): the server returns once its last client is gone.
    let server = Server::new(vec![export()], ServerOptions::default());
    let listener = Listener::unix(&sock).unwrap();
    std::thread::scope(|s| {
        let running = s.spawn(|| server.run(listener));
        let mut only = UnixStream::connect(&sock).unwrap();
        assert_eq!(read_first_sector(&mut only), vec![7; 512]);
        drop(only);
        running.join().unwrap().unwrap();
    });
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
