//! A recording, crash-simulating store for tests. It logs every write, zeroing, flush and length
//! change in order and can rebuild the bytes a power cut would leave at any point: everything up to the
//! last flush before the cut, plus any chosen subset of the later (unflushed) writes, torn at
//! 512-byte sector granularity. It can also fail the n-th write or flush, to test error paths.

use std::io;
use std::sync::Mutex;

use super::Storage;

/// Bytes a store persists atomically: 512-byte aligned sectors.
pub const SECTOR: u64 = super::SECTOR;

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at`: the bytes written at a store offset.
    Write {
        /// Store offset of the first byte.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `write_zeroes`: a range made to read as zeros (a file asks the file system for it).
    Zero {
        /// Store offset of the first byte.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `flush`: every earlier operation is durable.
    Flush,
    /// `set_len` to this many bytes.
    SetLen(u64),
}

/// Which unflushed writes survive a simulated crash.
#[derive(Debug, Clone, Copy)]
pub enum Survivors {
    /// None of the writes since the last flush reach the disk.
    None,
    /// All of them do.
    All,
    /// Each 512-byte sector of each unflushed write or zeroing survives or not, by a seeded
    /// coin.
    TornSectors(u64),
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The n-th write (counting from 0; zeroings count as writes) and every later one fail
    /// with this error kind.
    WriteFrom(usize, io::ErrorKind),
    /// Only the n-th write fails.
    WriteOnce(usize, io::ErrorKind),
    /// The n-th flush and every later one fail.
    FlushFrom(usize),
}

#[derive(Default)]
struct State {
    initial: Vec<u8>,
    live: Vec<u8>,
    ops: Vec<Op>,
    writes: usize,
    flushes: usize,
    fault: Option<Fault>,
}

/// A store that records everything done to it.
#[derive(Default)]
pub struct RecordingStorage {
    state: Mutex<State>,
}

impl std::fmt::Debug for RecordingStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("RecordingStorage")
            .field("live_len", &s.live.len())
            .field("ops", &s.ops.len())
            .field("writes", &s.writes)
            .field("flushes", &s.flushes)
            .field("fault", &s.fault)
            .finish_non_exhaustive()
    }
}

impl RecordingStorage {
    /// A store starting with `initial` bytes (already durable).
    pub fn new(initial: Vec<u8>) -> Self {
        RecordingStorage {
            state: Mutex::new(State {
                live: initial.clone(),
                initial,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies and records a write or zeroing, unless an armed fault fails it.
    fn record_write(&self, op: Op) -> io::Result<()> {
        let mut state = self.lock();
        let index = state.writes;
        state.writes += 1;
        match state.fault {
            Some(Fault::WriteFrom(n, kind)) if index >= n => {
                return Err(io::Error::new(kind, "injected write failure"));
            }
            Some(Fault::WriteOnce(n, kind)) if index == n => {
                return Err(io::Error::new(kind, "injected write failure"));
            }
            _ => {}
        }
        apply(&mut state.live, &op);
        state.ops.push(op);
        Ok(())
    }

    /// Arms a fault (replacing any other).
    pub fn inject(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// The operations so far.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// How many writes and zeroings were asked of the store, failed ones included: the index
    /// the next one has for [`Fault::WriteFrom`] and [`Fault::WriteOnce`].
    pub fn write_count(&self) -> usize {
        self.lock().writes
    }

    /// How many operations were recorded.
    pub fn op_count(&self) -> usize {
        self.lock().ops.len()
    }

    /// The current bytes, as if nothing were lost.
    pub fn live_bytes(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// The bytes a crash right after the first `cut` operations leaves behind.
    pub fn crash_image(&self, cut: usize, survivors: Survivors) -> Vec<u8> {
        let state = self.lock();
        let ops = &state.ops[..cut.min(state.ops.len())];
        let last_flush = ops
            .iter()
            .rposition(|op| *op == Op::Flush)
            .map_or(0, |i| i + 1);
        let mut bytes = state.initial.clone();
        for op in &ops[..last_flush] {
            apply(&mut bytes, op);
        }
        let mut coin = match survivors {
            Survivors::TornSectors(seed) => seed | 1,
            _ => 1,
        };
        for op in &ops[last_flush..] {
            match (op, survivors) {
                (_, Survivors::None) => {}
                (Op::Write { .. } | Op::Zero { .. }, Survivors::TornSectors(_)) => {
                    // Sector by sector, each one either fully old or fully new.
                    let (offset, end) = op.range();
                    let mut pos = offset;
                    while pos < end {
                        let next = ((pos / SECTOR) + 1) * SECTOR;
                        let piece_end = next.min(end);
                        coin ^= coin << 13;
                        coin ^= coin >> 7;
                        coin ^= coin << 17;
                        if coin & 1 == 1 {
                            apply(&mut bytes, &op.piece(pos, piece_end));
                        }
                        pos = piece_end;
                    }
                }
                (op, _) => apply(&mut bytes, op),
            }
        }
        bytes
    }
}

impl Op {
    /// The store range `[start, end)` a write or zeroing changes.
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { offset, data } => (*offset, offset + data.len() as u64),
            Op::Zero { offset, len } => (*offset, offset + len),
            Op::Flush | Op::SetLen(_) => (0, 0),
        }
    }

    /// The part `[start, end)` of a write or zeroing (inside its range).
    fn piece(&self, start: u64, end: u64) -> Op {
        match self {
            Op::Write { offset, data } => Op::Write {
                offset: start,
                data: data[(start - offset) as usize..(end - offset) as usize].to_vec(),
            },
            _ => Op::Zero {
                offset: start,
                len: end - start,
            },
        }
    }
}

fn apply(bytes: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*offset as usize..end].copy_from_slice(data);
        }
        Op::Zero { offset, len } => {
            let end = (offset + len) as usize;
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*offset as usize..end].fill(0);
        }
        Op::SetLen(len) => bytes.resize(*len as usize, 0),
        Op::Flush => {}
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(super::read_from_bytes(&self.lock().live, buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record_write(Op::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record_write(Op::Zero { offset, len })
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.lock();
        let index = state.flushes;
        state.flushes += 1;
        if let Some(Fault::FlushFrom(n)) = state.fault {
            if index >= n {
                return Err(io::Error::other("injected flush failure"));
            }
        }
        state.ops.push(Op::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        let op = Op::SetLen(len);
        apply(&mut state.live, &op);
        state.ops.push(op);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_flushed_writes_and_chooses_among_later_ones() {
        let s = RecordingStorage::new(vec![0; 1024]);
        s.write_at(&[1; 1024], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 1024], 0).unwrap();
        assert_eq!(s.crash_image(3, Survivors::None), vec![1; 1024]);
        assert_eq!(s.crash_image(3, Survivors::All), vec![2; 1024]);
        assert_eq!(s.crash_image(1, Survivors::None), vec![0; 1024]);
        let torn = s.crash_image(3, Survivors::TornSectors(5));
        assert!(
            torn[..512].iter().all(|&b| b == torn[0])
                && torn[512..].iter().all(|&b| b == torn[512])
        );
    }

    #[test]
    fn a_zeroing_is_replayed_and_torn_like_a_write() {
        let s = RecordingStorage::new(vec![1; 1024]);
        s.flush().unwrap();
        s.write_zeroes(0, 1536).unwrap();
        assert_eq!(s.live_bytes(), vec![0; 1536]);
        assert_eq!(s.crash_image(1, Survivors::All), vec![1; 1024]);
        assert_eq!(s.crash_image(2, Survivors::None), vec![1; 1024]);
        assert_eq!(s.crash_image(2, Survivors::All), vec![0; 1536]);
        // Each sector is either fully old or fully zero, and some seed tears the zeroing.
        let torn = (0..16)
            .map(|seed| s.crash_image(2, Survivors::TornSectors(seed)))
            .find(|t| t[..512] != t[512..1024])
            .expect("a seed tears the zeroing");
        for sector in torn[..1024].chunks(512) {
            assert!(sector.iter().all(|&b| b == sector[0]));
        }
    }

    #[test]
    fn injected_faults_fail_the_chosen_operation() {
        let s = RecordingStorage::new(Vec::new());
        s.inject(Some(Fault::WriteFrom(1, io::ErrorKind::StorageFull)));
        s.write_at(&[1], 0).unwrap();
        assert_eq!(
            s.write_at(&[1], 1).unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
        s.inject(Some(Fault::FlushFrom(0)));
        assert!(s.flush().is_err());
    }
}
