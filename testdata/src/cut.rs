//! Proof that a group snapshot is a crash-consistent cut: writers log every write with a tick
//! taken before it starts and one taken after it is acknowledged, each block holds a stamp that
//! names the write that made it, and [`WriteLog::check_cut`] compares a snapshot's content with
//! the log: every write acknowledged before the pause is in it, no write that started after the
//! pause began is. [`NbdWriter`] is a minimal NBD client (fixed newstyle, `GO`, simple replies)
//! so the same writers can go through a server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Sets a writers' stop flag when dropped, also when a failing assertion unwinds: a scope whose
/// writer threads loop until told to stop would otherwise never end.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    pub disk: usize,
    pub block: u64,
    pub stamp: u64,
    /// Tick before the write was issued.
    pub start: u64,
    /// Tick after it was acknowledged.
    pub ack: u64,
}

/// A clock and the log of acknowledged writes, shared by every writer thread.
#[derive(Debug, Default)]
pub struct WriteLog {
    clock: AtomicU64,
    entries: Mutex<Vec<Logged>>,
}

impl WriteLog {
    /// The next tick (never 0, so a stamp is never a zero block).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Runs one write of `block` on `disk`: takes the start tick, which is also the stamp, fills
    /// the block with it, calls `write`, and logs the write once `write` has returned.
    pub fn write(
        &self,
        disk: usize,
        block: u64,
        block_size: usize,
        write: impl FnOnce(&[u8]),
    ) -> Logged {
        let start = self.tick();
        write(&stamped(start, block_size));
        let ack = self.tick();
        let logged = Logged {
            disk,
            block,
            stamp: start,
            start,
            ack,
        };
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(logged);
        logged
    }

    /// Writes random blocks of `disk` (of `blocks` blocks of `block_size` bytes) until `stop`
    /// is set. Writer `thread` of `threads` owns the blocks `b` with `b % threads == thread`,
    /// so the writes of one block are ordered, as [`WriteLog::check_cut`] needs; `write(data,
    /// offset)` does one write and returns once it is acknowledged.
    pub fn write_until(
        &self,
        stop: &AtomicBool,
        disk: usize,
        (thread, threads): (u64, u64),
        blocks: u64,
        block_size: usize,
        mut write: impl FnMut(&[u8], u64),
    ) {
        let mut x = disk as u64 * 7919 + thread * 104_729 + 1;
        while !stop.load(Ordering::SeqCst) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let block = ((x >> 33) % (blocks / threads)) * threads + thread;
            self.write(disk, block, block_size, |data| {
                write(data, block * block_size as u64)
            });
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a snapshot of `disk` (its raw guest bytes) against the log: `before` is a tick
    /// taken before the pause began, `after` one taken once every image was held. Each block
    /// must hold the last write acknowledged before `before`, or a later write that started
    /// before `after`; a block never written before `after` must read as zeros. Blocks are
    /// written by one thread each, one write at a time, so their writes are ordered. Returns
    /// how many blocks held a write.
    pub fn check_cut(
        &self,
        disk: usize,
        raw: &[u8],
        block_size: usize,
        before: u64,
        after: u64,
    ) -> Result<usize, String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_block: HashMap<u64, Vec<Logged>> = HashMap::new();
        for e in entries.iter().filter(|e| e.disk == disk) {
            by_block.entry(e.block).or_default().push(*e);
        }
        let mut held = 0;
        for (b, chunk) in raw.chunks(block_size).enumerate() {
            let b = b as u64;
            let mut writes = by_block.remove(&b).unwrap_or_default();
            writes.sort_by_key(|w| w.start);
            let required = writes.iter().rposition(|w| w.ack < before);
            let stamp = read_stamp(chunk)
                .ok_or_else(|| format!("disk {disk} block {b}: torn or foreign content"))?;
            if stamp == 0 {
                if let Some(r) = required {
                    return Err(format!(
                        "disk {disk} block {b}: zeros, but write {:?} was acknowledged before the \
                         pause",
                        writes[r]
                    ));
                }
                continue;
            }
            held += 1;
            let Some(at) = writes.iter().position(|w| w.stamp == stamp) else {
                // Started but never logged: the writer stopped before its acknowledgement, so
                // it must have started before the pause to be here at all.
                if stamp < after && required.is_none_or(|r| writes[r].start < stamp) {
                    continue;
                }
                return Err(format!(
                    "disk {disk} block {b}: stamp {stamp} is no logged write that could be in \
                     the cut ({before}..{after})"
                ));
            };
            if writes[at].start >= after {
                return Err(format!(
                    "disk {disk} block {b}: write {:?} started after the pause ({after}) but is \
                     in the snapshot",
                    writes[at]
                ));
            }
            if let Some(r) = required.filter(|&r| at < r) {
                return Err(format!(
                    "disk {disk} block {b}: holds {:?}, older than {:?} acknowledged before the \
                     pause ({before})",
                    writes[at], writes[r]
                ));
            }
        }
        Ok(held)
    }
}

/// A block filled with `stamp` (little-endian, repeated): a torn write shows as mixed stamps.
pub fn stamped(stamp: u64, block_size: usize) -> Vec<u8> {
    stamp
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(block_size)
        .collect()
}

/// The stamp a block holds (0 for zeros); `None` when the block is not one stamp repeated.
pub fn read_stamp(block: &[u8]) -> Option<u64> {
    let first: [u8; 8] = block.get(..8)?.try_into().ok()?;
    block
        .chunks(8)
        .all(|c| c == &first[..c.len()])
        .then(|| u64::from_le_bytes(first))
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// A minimal NBD client that writes one request at a time and waits for each reply, so an
/// acknowledged write is one the server answered.
pub struct NbdWriter {
    stream: UnixStream,
    cookie: u64,
}

impl NbdWriter {
    /// Connects to `socket` and selects `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> std::io::Result<NbdWriter> {
        let mut s = UnixStream::connect(socket)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if u64::from_be_bytes(hello[..8].try_into().expect("8 bytes")) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes")) != IHAVEOPT
        {
            return Err(bad("not an NBD newstyle server"));
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend(IHAVEOPT.to_be_bytes());
        opt.extend(OPT_GO.to_be_bytes());
        opt.extend((4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend((export.len() as u32).to_be_bytes());
        opt.extend(export.as_bytes());
        opt.extend(0u16.to_be_bytes());
        s.write_all(&opt)?;
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            if u64::from_be_bytes(head[..8].try_into().expect("8 bytes")) != REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
            std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink())?;
            if kind == REP_ACK {
                break;
            }
            if kind & 0x8000_0000 != 0 {
                return Err(bad("the server refused the export"));
            }
        }
        Ok(NbdWriter {
            stream: s,
            cookie: 0,
        })
    }

    /// Writes `data` at `offset` and waits for the server's answer.
    pub fn write(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend(REQUEST_MAGIC.to_be_bytes());
        req.extend(0u16.to_be_bytes());
        req.extend(CMD_WRITE.to_be_bytes());
        req.extend(self.cookie.to_be_bytes());
        req.extend(offset.to_be_bytes());
        req.extend((data.len() as u32).to_be_bytes());
        req.extend(data);
        self.stream.write_all(&req)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(reply[8..].try_into().expect("8 bytes"));
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad reply",
            ));
        }
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        Ok(())
    }

    /// Says goodbye (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) -> std::io::Result<()> {
        let mut req = Vec::with_capacity(28);
        req.extend(REQUEST_MAGIC.to_be_bytes());
        req.extend(0u16.to_be_bytes());
        req.extend(CMD_DISC.to_be_bytes());
        req.extend(0u64.to_be_bytes());
        req.extend(0u64.to_be_bytes());
        req.extend(0u32.to_be_bytes());
        self.stream.write_all(&req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_refuses_a_missing_and_a_late_write() {
        let log = WriteLog::default();
        let mut disk = vec![0u8; 4 * 512];
        let first = log.write(0, 0, 512, |_| {});
        disk[..512].copy_from_slice(&stamped(first.stamp, 512));
        let before = log.tick();
        let after = log.tick();
        let late = log.write(0, 1, 512, |_| {});
        assert_eq!(log.check_cut(0, &disk, 512, before, after), Ok(1));
        disk[512..1024].copy_from_slice(&stamped(late.stamp, 512));
        assert!(log.check_cut(0, &disk, 512, before, after).is_err());
        let zeros = vec![0u8; 4 * 512];
        assert!(log.check_cut(0, &zeros, 512, before, after).is_err());
    }
}
