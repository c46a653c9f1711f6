//! The group lock: an exclusive OFD lock on `group.lock` in the group directory, so one
//! transaction runs per group at a time, across processes.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg};

/// The held group lock; dropping it releases the lock explicitly, because a child forked by
/// another thread may share the file description until it execs.
pub(crate) struct GroupLock(File);

impl Drop for GroupLock {
    fn drop(&mut self) {
        let unlock = libc::flock {
            l_type: libc::F_UNLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let _ = fcntl(&self.0, FcntlArg::F_OFD_SETLK(&unlock));
    }
}

/// Opens (creating) the lock file and takes the exclusive lock; `Ok(None)` when another process
/// holds it.
pub(crate) fn lock_group(path: &Path) -> io::Result<Option<GroupLock>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(Some(GroupLock(file))),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    }
}
