//! `snapshot_table`: arbitrary bytes as a snapshot table, decoded and re-encoded.

use super::*;

/// Input of `snapshot_table`: `[count: u16][table_offset: u64][table bytes ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTableInput<'a> {
    pub count: u16,
    pub table_offset: u64,
    pub table: &'a [u8],
}

impl<'a> SnapshotTableInput<'a> {
    pub fn from_bytes(data: &'a [u8]) -> Self {
        let mut r = ByteReader::new(data);
        SnapshotTableInput {
            count: r.u16(),
            table_offset: r.u64(),
            table: r.rest(),
        }
    }
}

/// Arbitrary bytes → `snapshot::decode_table`.
///
/// Properties: never panics; on success there are `count` entries, each entry re-encodes to
/// exactly the bytes it was decoded from, and `encode_table` of the result decodes to the result.
pub fn snapshot_table(data: &[u8]) {
    snapshot_table_input(&SnapshotTableInput::from_bytes(data));
}

/// `snapshot_table` on an already decoded input.
pub fn snapshot_table_input(input: &SnapshotTableInput<'_>) {
    let count = input.count as u32;
    let Ok(entries) = snapshot::decode_table(input.table, count, input.table_offset) else {
        return;
    };
    assert_eq!(entries.len(), count as usize);
    let mut pos = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        pos = align_entry(pos as u64) as usize;
        let mut bytes = Vec::new();
        entry.encode(&mut bytes);
        assert_eq!(
            bytes[..],
            input.table[pos..pos + bytes.len()],
            "entry {i} re-encodes to the bytes it came from"
        );
        pos += bytes.len();
        // Accessors must cope with any extra data.
        let _ = (
            entry.vm_state_size(),
            entry.disk_size(),
            entry.icount(),
            entry.time(),
            entry.id_str(),
            entry.name_str(),
        );
    }
    let encoded = snapshot::encode_table(&entries);
    assert_eq!(encoded.len(), pos, "encoded table length");
    let again = snapshot::decode_table(&encoded, count, input.table_offset)
        .expect("an encoded table decodes");
    assert_eq!(again, entries, "encode_table then decode_table round-trips");
}
