//! Image locks QEMU understands: shared OFD byte-range locks on the image file, one byte per
//! permission. Byte 100 + n says "I use permission n", byte 200 + n says "nobody else may use
//! permission n". A writer holds 100, 101, 103, 201 and 203 (consistent read, write, resize; it
//! shares neither write nor resize); a reader holds 100 and 201. Before taking them, each byte is
//! tested against the opposite range, so a writer and QEMU exclude each other both ways.

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut probe = flock(libc::F_WRLCK, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(io::Error::from)?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// The permission names QEMU prints.
fn name(perm: i64) -> &'static str {
    match perm {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        _ => "resize",
    }
}

/// Takes the locks for a reader or a writer, or says which permission another process blocks.
pub(crate) fn lock_image(file: &File, writable: bool) -> io::Result<Result<(), String>> {
    let (used, unshared): (&[i64], &[i64]) = if writable {
        (&[CONSISTENT_READ, WRITE, RESIZE], &[WRITE, RESIZE])
    } else {
        (&[CONSISTENT_READ], &[WRITE])
    };
    for &p in used {
        if held_by_others(file, SHARED_BASE + p)? {
            return Ok(Err(format!(
                "another open of it does not share the {} permission",
                name(p)
            )));
        }
    }
    for &p in unshared {
        if held_by_others(file, PERM_BASE + p)? {
            return Ok(Err(format!(
                "another open of it holds the {} permission",
                name(p)
            )));
        }
    }
    for byte in used
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p))
    {
        fcntl(file, FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte))).map_err(io::Error::from)?;
    }
    Ok(Ok(()))
}

/// Drops every image lock this open file description holds. Closing the file would do the same,
/// but a child forked by another thread may share the description until it execs, so the locks
/// are released explicitly.
pub(crate) fn unlock_image(file: &File) {
    let all = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: PERM_BASE as libc::off_t,
        l_len: (SHARED_BASE + 100 - PERM_BASE) as libc::off_t,
        l_pid: 0,
    };
    let _ = fcntl(file, FcntlArg::F_OFD_SETLK(&all));
}
