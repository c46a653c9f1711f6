//! The group journal: an append-only file of checksummed records, each padded to 512 bytes so no
//! two records share a sector. One `Decision` record is the group's commit point.
//!
//! Reading stops at the first bad record at the tail (a torn append, ignored); a bad record
//! followed by a good one of the same transaction is corruption in the middle and a hard error.

use std::io;

use qcow2::storage::{Storage, StorageExt};

/// Record magic.
const MAGIC: [u8; 4] = *b"QTXJ";
const VERSION: u16 = 1;
/// Header: magic, version, kind, transaction id, sequence number, payload length.
const HEADER_LEN: usize = 4 + 2 + 2 + 16 + 4 + 4;
/// Records start on sector boundaries.
pub const SECTOR: usize = 512;
/// Payloads larger than this are refused (a journal names paths, not data).
const MAX_PAYLOAD: usize = 1 << 20;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// A transaction starts (its id in the record header).
    Begin = 1,
    /// A member image: index, path, (device, inode) and its state switch before.
    Image = 2,
    /// A staged state: image index, the switch that publishes it, and its L1 and snapshot
    /// table offsets.
    Staged = 3,
    /// An overlay: index, temporary name and final name.
    Overlay = 4,
    /// Every member is prepared.
    Prepared = 5,
    /// The commit point: payload 1 commits, 0 aborts.
    Decision = 6,
    /// The transaction is finished; recovery has nothing to do.
    End = 7,
    /// An overlay merged into its backing file and removed (external snapshot delete).
    Retire = 8,
    /// Several records written and synced as one, under one checksum: a torn batch is a torn
    /// tail as a whole, never a hole followed by valid records. Reading flattens it.
    Batch = 9,
    /// One image's bitmap changes, applied after the decision (and again by recovery).
    Bitmaps = 10,
    /// One bitmap change is applied (image index, change index): recovery goes on after it.
    BitmapDone = 11,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Begin,
            2 => Kind::Image,
            3 => Kind::Staged,
            4 => Kind::Overlay,
            5 => Kind::Prepared,
            6 => Kind::Decision,
            7 => Kind::End,
            8 => Kind::Retire,
            9 => Kind::Batch,
            10 => Kind::Bitmaps,
            11 => Kind::BitmapDone,
            _ => return None,
        })
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// What the record says.
    pub kind: Kind,
    /// The transaction's id, bound to the group (see `identity`).
    pub txn: [u8; 16],
    /// Position of the record in its transaction, from 0.
    pub seq: u32,
    /// The kind's fields, encoded.
    pub payload: Vec<u8>,
}

/// Why a journal cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing the journal file failed.
    #[error("journal I/O: {0}")]
    Io(#[from] io::Error),
    /// A record fails its checksum but valid records follow: not a torn tail, so the journal
    /// is damaged and recovery refuses to guess.
    #[error("journal record at byte {offset} is corrupt but valid records follow it")]
    CorruptInTheMiddle {
        /// Byte offset of the bad record in the journal file.
        offset: u64,
    },
    /// A batch record's checksum holds but its inner records do not decode.
    #[error("journal record at byte {offset} has a valid checksum but a malformed batch")]
    MalformedBatch {
        /// Byte offset of the batch record in the journal file.
        offset: u64,
    },
}

/// Encodes a record, padded to whole sectors.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(SECTOR);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(record.kind as u16).to_le_bytes());
    out.extend_from_slice(&record.txn);
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&(record.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&record.payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(out.len().next_multiple_of(SECTOR), 0);
    out
}

/// Decodes the record at the start of `bytes`: the record and its padded length, or `None`
/// when the bytes are not a valid record.
pub fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    if bytes.len() < HEADER_LEN + 4 || bytes[..4] != MAGIC {
        return None;
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    let kind = Kind::from_u16(u16::from_le_bytes([bytes[6], bytes[7]]))?;
    let mut txn = [0u8; 16];
    txn.copy_from_slice(&bytes[8..24]);
    let seq = u32::from_le_bytes(bytes[24..28].try_into().ok()?);
    let len = u32::from_le_bytes(bytes[28..32].try_into().ok()?) as usize;
    if version != VERSION || len > MAX_PAYLOAD || bytes.len() < HEADER_LEN + len + 4 {
        return None;
    }
    let body = &bytes[..HEADER_LEN + len];
    let crc = u32::from_le_bytes(
        bytes[HEADER_LEN + len..HEADER_LEN + len + 4]
            .try_into()
            .ok()?,
    );
    if crc32fast::hash(body) != crc {
        return None;
    }
    let record = Record {
        kind,
        txn,
        seq,
        payload: bytes[HEADER_LEN..HEADER_LEN + len].to_vec(),
    };
    Some((record, (HEADER_LEN + len + 4).next_multiple_of(SECTOR)))
}

/// Reads every record of the journal: a torn tail is dropped, corruption followed by a valid
/// record of the same transaction is an error.
pub fn read_all(bytes: &[u8]) -> Result<Vec<Record>, JournalError> {
    let mut records: Vec<Record> = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        match decode(&bytes[pos..]) {
            // A record of another transaction is what an unfinished reset left past ours.
            Some((record, _)) if records.first().is_some_and(|r| r.txn != record.txn) => break,
            Some((record, len)) if record.kind == Kind::Batch => {
                let inner =
                    unbatch(&record).ok_or(JournalError::MalformedBatch { offset: pos as u64 })?;
                records.extend(inner);
                pos += len;
            }
            Some((record, len)) => {
                records.push(record);
                pos += len;
            }
            None => {
                // Anything valid later that belongs to the same transaction (or anything at all
                // when the first record is the bad one: the journal is reset durably before a
                // transaction writes) means this is not a torn tail.
                let txn = records.first().map(|r| r.txn);
                let mut probe = pos + SECTOR;
                while probe < bytes.len() {
                    if let Some((later, _)) = decode(&bytes[probe..]) {
                        if txn.is_none_or(|t| t == later.txn) {
                            return Err(JournalError::CorruptInTheMiddle { offset: pos as u64 });
                        }
                    }
                    probe += SECTOR;
                }
                break;
            }
        }
    }
    Ok(records)
}

/// The records a batch holds: (kind u16, length u32, payload) each, little-endian.
fn unbatch(batch: &Record) -> Option<Vec<Record>> {
    let mut out = Vec::new();
    let mut rest = &batch.payload[..];
    while !rest.is_empty() {
        let kind = Kind::from_u16(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?))?;
        let len = u32::from_le_bytes(rest.get(2..6)?.try_into().ok()?) as usize;
        let payload = rest.get(6..6usize.checked_add(len)?)?.to_vec();
        if kind == Kind::Batch {
            return None;
        }
        out.push(Record {
            kind,
            txn: batch.txn,
            seq: batch.seq.checked_add(out.len() as u32)?,
            payload,
        });
        rest = &rest[6 + len..];
    }
    Some(out)
}

/// Appends records to a journal file, each made durable before `append` returns.
pub struct Journal {
    storage: Box<dyn Storage>,
    end: u64,
    txn: [u8; 16],
    seq: u32,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("end", &self.end)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts a new transaction in an empty journal. The reset is durable before any record of
    /// the new transaction is written, so nothing of an older one can follow a torn first record.
    pub fn start(storage: Box<dyn Storage>, txn: [u8; 16]) -> io::Result<Journal> {
        // A finished transaction leaves the journal empty already.
        if storage.len()? != 0 {
            storage.set_len(0)?;
            storage.flush()?;
        }
        Ok(Journal {
            storage,
            end: 0,
            txn,
            seq: 0,
        })
    }

    /// Appends one record and syncs it.
    pub fn append(&mut self, kind: Kind, payload: Vec<u8>) -> io::Result<()> {
        self.append_all(vec![(kind, payload)])
    }

    /// Appends records with one write and one sync, as one [`Kind::Batch`] record: they all
    /// reach the disk or, torn, none of them counts.
    pub fn append_all(&mut self, mut records: Vec<(Kind, Vec<u8>)>) -> io::Result<()> {
        let count = records.len() as u32;
        let (kind, payload) = if records.len() == 1 {
            records.remove(0)
        } else {
            let mut payload = Vec::new();
            for (kind, p) in records {
                payload.extend_from_slice(&(kind as u16).to_le_bytes());
                payload.extend_from_slice(&(p.len() as u32).to_le_bytes());
                payload.extend_from_slice(&p);
            }
            (Kind::Batch, payload)
        };
        let bytes = encode(&Record {
            kind,
            txn: self.txn,
            seq: self.seq,
            payload,
        });
        self.storage.write_at(&bytes, self.end)?;
        self.storage.flush()?;
        self.end += bytes.len() as u64;
        self.seq += count;
        Ok(())
    }

    /// Ends the transaction: an empty journal means nothing is in flight (an `End` record would
    /// mean the same, and cost the same sync).
    pub fn finish(&mut self) -> io::Result<()> {
        self.storage.set_len(0)?;
        self.storage.flush()?;
        self.end = 0;
        Ok(())
    }

    /// Reads the whole journal from storage.
    pub fn load(storage: &dyn Storage) -> Result<Vec<Record>, JournalError> {
        let len = storage.len()?;
        let mut bytes = vec![0u8; len as usize];
        storage.read_exact_at(&mut bytes, 0)?;
        read_all(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, seq: u32, payload: &[u8]) -> Record {
        Record {
            kind,
            txn: [7; 16],
            seq,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_start_on_sectors() {
        let r = rec(Kind::Image, 3, b"disk0.qcow2");
        let bytes = encode(&r);
        assert_eq!(bytes.len() % SECTOR, 0);
        assert_eq!(decode(&bytes), Some((r, SECTOR)));
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let mut bytes = encode(&rec(Kind::Begin, 0, b""));
        let mut last = encode(&rec(Kind::Decision, 1, &[1]));
        last[10] ^= 0xFF;
        bytes.extend(last);
        let records = read_all(&bytes).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, Kind::Begin);
    }

    #[test]
    fn corruption_in_the_middle_is_a_hard_error() {
        let mut bytes = encode(&rec(Kind::Begin, 0, b""));
        let mut middle = encode(&rec(Kind::Image, 1, b"x"));
        middle[35] ^= 1;
        bytes.extend(middle);
        bytes.extend(encode(&rec(Kind::Prepared, 2, b"")));
        assert!(matches!(
            read_all(&bytes),
            Err(JournalError::CorruptInTheMiddle { offset: 512 })
        ));
    }

    #[test]
    fn a_batch_reads_as_its_records_and_tears_as_a_whole() {
        let mut journal = Journal::start(Box::new(qcow2::MemoryStorage::new()), [7; 16]).unwrap();
        journal.append(Kind::Begin, Vec::new()).unwrap();
        journal
            .append_all(vec![
                (Kind::Image, b"a".to_vec()),
                (Kind::Overlay, b"b".to_vec()),
            ])
            .unwrap();
        let bytes = {
            let mut b = vec![0u8; journal.end as usize];
            journal.storage.read_exact_at(&mut b, 0).unwrap();
            b
        };
        let records = read_all(&bytes).unwrap();
        let kinds: Vec<Kind> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [Kind::Begin, Kind::Image, Kind::Overlay]);
        assert_eq!(records[2].seq, 2);
        assert_eq!(records[2].payload, b"b");
        let mut torn = bytes.clone();
        torn[SECTOR + 40] ^= 1;
        assert_eq!(read_all(&torn).unwrap().len(), 1);
    }

    #[test]
    fn records_of_another_transaction_end_the_journal() {
        let mut bytes = encode(&rec(Kind::Begin, 0, b""));
        let mut stale = rec(Kind::Decision, 5, &[1]);
        stale.txn = [9; 16];
        bytes.extend(encode(&stale));
        let records = read_all(&bytes).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, Kind::Begin);
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let _ = read_all(&bytes);
        }
        let mut header = encode(&rec(Kind::Begin, 0, b""));
        header[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&header).is_none());
    }
}
