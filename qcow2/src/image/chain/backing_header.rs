//! Changing the backing file name and format in cluster 0 so that a crash at any write leaves
//! either the old or the new backing file readable, never a mix or garbage.
//!
//! Assumption: a write that lies within one 512-byte sector reaches the disk whole or not at
//! all (sector atomicity, what disks promise and what `RecordingStorage` simulates). The rewrite
//! is a sequence of states, each published by flushed writes of at most one sector:
//!
//! 1. both names are staged in bytes of cluster 0 that no state references yet;
//! 2. the 12-byte offset/size field (bytes 8..20) switches to the staged copy of the old name;
//! 3. the extension area and the offset/size field switch to the new layout (pointing at the
//!    staged new name);
//! 4. the new name lands where QEMU keeps it (right after the end marker) and the field switches
//!    there; the staging bytes are cleared.
//!
//! Before writing anything, every state a crash could leave (each prefix of the sector writes) is
//! decoded and must mean the old or the new backing file; otherwise the rewrite is refused.

use crate::error::{Error, Result};
use crate::format::extension::kind as ext_kind;
use crate::format::features::Autoclear;
use crate::format::limits::{MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME};
use crate::format::Header;
use crate::image::{Image, Meta};
use crate::storage::SECTOR;

/// What a header says, ignoring where the name sits and the feature name table (which only
/// names features in messages).
fn meaning(bytes: &[u8]) -> Option<Header> {
    let mut h = Header::decode(bytes).ok()?;
    h.backing_file_offset = 0;
    h.backing_file_size = 0;
    h.extensions.feature_names.clear();
    h.extensions.has_feature_table = false;
    if h.backing_file.is_none() {
        // A format without a name is never used.
        h.extensions.backing_format = None;
    }
    if h.autoclear_features & Autoclear::BITMAPS == 0 {
        // Without its autoclear bit the bitmaps extension is ignored (QEMU drops it), so an
        // extension written before the bit is set, or left after it is cleared, means nothing.
        h.extensions.bitmaps = None;
    }
    Some(h)
}

/// Puts a name's offset and size into bytes 8..20.
fn set_name_field(bytes: &mut [u8], offset: u64, len: usize) {
    bytes[8..16].copy_from_slice(&offset.to_be_bytes());
    bytes[16..20].copy_from_slice(&(len as u32).to_be_bytes());
}

/// The sector writes that turn `from` into `to`: one write per changed sector, covering its
/// changed bytes, in `order`.
fn sector_writes(from: &[u8], to: &[u8], tail_first: bool) -> Vec<(usize, usize)> {
    let sector = SECTOR as usize;
    let mut writes: Vec<(usize, usize)> = (0..from.len().div_ceil(sector))
        .filter_map(|s| {
            let range = s * sector..((s + 1) * sector).min(from.len());
            let first = range.clone().find(|&i| from[i] != to[i])?;
            let last = range.rev().find(|&i| from[i] != to[i])?;
            Some((first, last + 1))
        })
        .collect();
    if tail_first {
        // Sector 0 (which holds the offset/size field) goes last.
        writes.reverse();
    }
    writes
}

/// The sector writes (byte ranges) that reach a state, and the state.
type StateWrites = (Vec<(usize, usize)>, Vec<u8>);

/// States for an extension area that grows across a sector boundary, which the staged
/// rewrite cannot move in one sector write: first sector 0 alone ends the area early with the
/// old extensions minus the feature name table (which only names features in messages), so
/// nothing past sector 0 is read; then every later sector gets its final bytes; then sector 0
/// gets its own. `None` when the shortened area does not fit in sector 0.
fn compact_first(old: &[u8], old_header: &Header, target: &[u8]) -> Option<Vec<Vec<u8>>> {
    let sector = SECTOR as usize;
    let mut bare = old_header.clone();
    bare.backing_file = None;
    let encoded = bare.encode().ok()?;
    let start = old_header.header_length as usize;
    // The encoded records, ending with the end marker, minus the feature name table.
    let mut area = Vec::new();
    let mut pos = start;
    while pos + 8 <= encoded.len() {
        let kind = u32::from_be_bytes(encoded[pos..pos + 4].try_into().ok()?);
        let len = u32::from_be_bytes(encoded[pos + 4..pos + 8].try_into().ok()?) as usize;
        let end = (pos + 8 + len).next_multiple_of(8).min(encoded.len());
        if kind != ext_kind::FEATURE_NAME_TABLE {
            area.extend_from_slice(&encoded[pos..end]);
        }
        if kind == ext_kind::END {
            break;
        }
        pos = end;
    }
    if start + area.len() > sector {
        return None;
    }
    let mut shortened = old.to_vec();
    shortened[start..start + area.len()].copy_from_slice(&area);
    let mut tail_final = shortened.clone();
    tail_final[sector..].copy_from_slice(&target[sector..]);
    Some(vec![shortened, tail_final, target.to_vec()])
}

impl Image {
    /// Records `name` (None: no backing file) and `format` as the backing file in the header,
    /// crash-safely. Everything else in the image is flushed first.
    pub(crate) fn set_backing_header(
        &self,
        m: &mut Meta,
        name: Option<&[u8]>,
        format: Option<&[u8]>,
    ) -> Result<()> {
        let invalid = |reason: String| Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        };
        if name.is_some_and(|n| n.len() > MAX_BACKING_FILE_NAME as usize) {
            return Err(invalid(format!(
                "a backing file name is at most {MAX_BACKING_FILE_NAME} bytes"
            )));
        }
        if format.is_some_and(|f| f.len() > MAX_BACKING_FORMAT_NAME as usize) {
            return Err(invalid(format!(
                "a backing format name is at most {MAX_BACKING_FORMAT_NAME} bytes"
            )));
        }
        self.rewrite_header(m, |h| {
            h.backing_file = name.map(<[u8]>::to_vec);
            h.extensions.backing_format = name.and(format).map(<[u8]>::to_vec);
        })
    }

    /// Rewrites cluster 0 with whatever `change` makes of the header (extensions, feature bits,
    /// the backing file), crash-safely as the module doc says: every state a power cut can leave
    /// means the old header or the new one, or nothing is written. Everything else in the image
    /// is flushed first.
    pub(crate) fn rewrite_header(
        &self,
        m: &mut Meta,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let invalid = |reason: String| Error::InvalidArgument {
            image: self.name.clone(),
            reason,
        };
        self.flush_all(m)?;
        let cs = m.header.cluster_size() as usize;
        let mut old = vec![0u8; cs];
        self.host()
            .read_zero_filled(&mut old, 0, "header cluster")?;
        let old_header = Header::decode(&old).map_err(|e| Error::from_format(&self.name, e))?;
        let mut new_header = old_header.clone();
        change(&mut new_header);
        let name_owned = new_header.backing_file.clone();
        let name = name_owned.as_deref();
        let mut target = new_header
            .encode()
            .map_err(|e| Error::from_format(&self.name, e))?;
        let new_ext_end = match name {
            Some(n) => target.len() - n.len(),
            None => target.len(),
        };
        target.resize(cs, 0);

        // Staging room: past everything the old and the new layout use.
        let old_name = old_header.backing_file.clone();
        let old_used = match &old_name {
            Some(n) => old_header.backing_file_offset as usize + n.len(),
            None => 0,
        };
        // Where the old extensions end, as an encoder lays them out; a header laid out otherwise
        // is caught by the state checks below (its meaning would change).
        let old_ext_end = {
            let mut bare = old_header.clone();
            bare.backing_file = None;
            bare.encode()
                .map_err(|e| Error::from_format(&self.name, e))?
                .len()
        };
        let mut next = old_used
            .max(old_ext_end)
            .max(new_ext_end + name.map_or(0, <[u8]>::len))
            .next_multiple_of(8);
        let mut stage = |len: usize| {
            let at = next;
            next = (next + len).next_multiple_of(8);
            at
        };
        let old_copy = old_name.as_ref().map(|n| (stage(n.len()), n.clone()));
        let new_copy = name.map(|n| (stage(n.len()), n.to_vec()));
        if next > cs {
            return Err(invalid(format!(
                "cluster 0 ({cs} bytes) has no room to stage the backing file name for a crash-safe rewrite"
            )));
        }

        let mut states = Vec::new();
        // 1: both names staged.
        let mut s = old.clone();
        for (at, n) in old_copy.iter().chain(new_copy.iter()) {
            s[*at..*at + n.len()].copy_from_slice(n);
        }
        states.push(s.clone());
        // 2: the old name is read from its staged copy.
        if let Some((at, n)) = &old_copy {
            set_name_field(&mut s, *at as u64, n.len());
            states.push(s.clone());
        }
        // 3: the new extension area, pointing at the staged new name.
        s[20..new_ext_end].copy_from_slice(&target[20..new_ext_end]);
        s[..8].copy_from_slice(&target[..8]);
        match &new_copy {
            Some((at, n)) => set_name_field(&mut s, *at as u64, n.len()),
            None => set_name_field(&mut s, 0, 0),
        }
        states.push(s.clone());
        // 4: the name where QEMU keeps it, then the staging bytes cleared.
        if let Some(n) = name {
            s[new_ext_end..new_ext_end + n.len()].copy_from_slice(n);
            states.push(s.clone());
            s[8..20].copy_from_slice(&target[8..20]);
            states.push(s.clone());
        }
        states.push(target.clone());

        let old_meaning = meaning(&old);
        let new_meaning = meaning(&target);
        if old_meaning.is_none() || new_meaning.is_none() {
            return Err(invalid("the rewritten header would not decode".into()));
        }
        let acceptable = |bytes: &[u8]| {
            let m = meaning(bytes);
            m == old_meaning || m == new_meaning
        };
        // The sector writes from `old` through `states`, each leaving a state that means the
        // old or the new header; `None` when some write cannot.
        let plan_through = |states: &[Vec<u8>]| -> Option<Vec<StateWrites>> {
            let mut plans = Vec::new();
            let mut from = old.clone();
            for to in states {
                let plan = [true, false]
                    .into_iter()
                    .map(|tail_first| sector_writes(&from, to, tail_first))
                    .find(|writes| {
                        let mut state = from.clone();
                        writes.iter().all(|&(a, b)| {
                            state[a..b].copy_from_slice(&to[a..b]);
                            acceptable(&state)
                        })
                    })?;
                plans.push((plan, to.clone()));
                from = to.clone();
            }
            Some(plans)
        };
        let plans = plan_through(&states)
            .or_else(|| plan_through(&compact_first(&old, &old_header, &target)?))
            .ok_or_else(|| {
                invalid("the header layout does not allow a crash-safe rewrite".into())
            })?;

        for (writes, to) in plans {
            for (a, b) in writes {
                self.host()
                    .write_sync(&to[a..b], a as u64, "header (rewrite)")?;
            }
        }
        m.header = Header::decode(&target).map_err(|e| Error::from_format(&self.name, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::storage::recording::Survivors;
    use crate::storage::{RecordingStorage, Storage, StorageExt};
    use crate::{CreateOptions, Image, RebaseOptions};

    fn image(cluster_size: u64, backing: &str) -> (Arc<RecordingStorage>, Image) {
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size,
            backing_file: Some(backing.to_string()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        };
        let image = Image::create_in(Box::new(store.clone()), "t", &options).unwrap();
        (store, image)
    }

    fn header_only(name: Option<&str>, format: Option<&str>) -> RebaseOptions {
        RebaseOptions {
            name: name.map(str::to_string),
            format: format.map(str::to_string),
            header_only: true,
            ..RebaseOptions::default()
        }
    }

    #[test]
    fn the_rewritten_cluster_zero_is_what_qemu_would_write() {
        let (store, mut image) = image(65536, "old-backing.qcow2");
        let options = header_only(Some("a/much/longer/new/backing/name.raw"), Some("raw"));
        image.rebase(&options, None, &mut |_, _| {}).unwrap();
        let mut cluster0 = vec![0u8; 65536];
        store.read_exact_at(&mut cluster0, 0).unwrap();
        let mut expected = image.header().encode().unwrap();
        expected.resize(65536, 0);
        assert!(cluster0 == expected, "staging bytes are left in cluster 0");
        assert_eq!(
            image.backing_file_name().as_deref(),
            Some("a/much/longer/new/backing/name.raw")
        );
    }

    #[test]
    fn no_room_to_stage_the_names_is_refused_before_any_write() {
        let old = "o".repeat(150);
        let (store, mut image) = image(512, &old);
        let before = store.op_count();
        let options = header_only(Some(&"n".repeat(300)), Some("qcow2"));
        let err = image.rebase(&options, None, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
        let writes = store.ops()[before..]
            .iter()
            .filter(|op| matches!(op, crate::storage::recording::Op::Write { .. }))
            .count();
        assert_eq!(writes, 0);
        assert_eq!(image.backing_file_name(), Some(old));
        assert!(store.len().unwrap() > 0);
    }

    #[test]
    fn overlong_names_are_refused() {
        let (_, mut image) = image(65536, "b.qcow2");
        let options = header_only(Some(&"n".repeat(1024)), Some("qcow2"));
        assert!(image.rebase(&options, None, &mut |_, _| {}).is_err());
        let options = header_only(Some("b"), Some(&"f".repeat(16)));
        assert!(image.rebase(&options, None, &mut |_, _| {}).is_err());
    }

    /// qemu-iotests 031: an unknown extension after the feature name table ends the area in the
    /// second sector; a backing format extension in front moves everything after it, across
    /// the sector boundary. The area is shortened within sector 0 first, so every cut leaves
    /// the old or the new header, with the unknown extension kept.
    #[test]
    fn a_backing_file_is_added_crash_safely_before_an_extension_area_crossing_a_sector() {
        use crate::format::extension::UnknownExtension;
        let store = Arc::new(RecordingStorage::new(Vec::new()));
        let options = CreateOptions {
            size: 64 << 20,
            cluster_size: 65536,
            ..CreateOptions::default()
        };
        let image = Image::create_in(Box::new(store.clone()), "t", &options).unwrap();
        let mut header = image.header();
        image.close().unwrap();
        let unknown = UnknownExtension {
            kind: 0x1234_5678,
            data: b"This is a test header extension".to_vec(),
        };
        header.extensions.unknown.push(unknown.clone());
        let bytes = header.encode().unwrap();
        assert!(bytes.len() > 512, "the area must cross into sector 1");
        store.write_at(&bytes, 0).unwrap();
        store.flush().unwrap();
        let mut image = Image::from_storage(
            Box::new(store.clone()),
            "t",
            &crate::OpenOptions::read_write(),
        )
        .unwrap();
        let before = store.op_count();
        let name = "/some/backing/file/path";
        let options = header_only(Some(name), Some("host_device"));
        image.rebase(&options, None, &mut |_, _| {}).unwrap();
        image.close().unwrap();
        let ops = store.ops();
        assert!(ops.len() > before, "the rebase wrote nothing");
        each_cut(&store, before, |cut, reopened| {
            let h = reopened.header();
            assert_eq!(
                h.extensions.unknown,
                std::slice::from_ref(&unknown),
                "cut {cut}"
            );
            if let Some(n) = reopened.backing_file_name() {
                assert_eq!(n, name, "cut {cut}");
                assert_eq!(
                    h.extensions.backing_format.as_deref(),
                    Some(&b"host_device"[..]),
                    "cut {cut}"
                );
            }
        });
        let mut cluster0 = vec![0u8; 65536];
        store.read_exact_at(&mut cluster0, 0).unwrap();
        let mut expected = image_header_bytes(&store);
        expected.resize(65536, 0);
        assert!(
            cluster0 == expected,
            "cluster 0 is not what QEMU would write"
        );
    }

    /// Opens the image as a power cut after each operation from `before` on would leave it (none,
    /// all or torn sectors of the unflushed writes surviving) and hands it to `check`.
    fn each_cut(store: &Arc<RecordingStorage>, before: usize, check: impl Fn(usize, Image)) {
        for cut in before..=store.op_count() {
            for survivors in [
                Survivors::None,
                Survivors::All,
                Survivors::TornSectors(cut as u64),
            ] {
                let crashed = crate::MemoryStorage::from_bytes(store.crash_image(cut, survivors));
                let options = crate::OpenOptions {
                    backing: crate::BackingPolicy::Ignore,
                    ..crate::OpenOptions::default()
                };
                let reopened = Image::from_storage(Box::new(crashed), "t", &options)
                    .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
                check(cut, reopened);
            }
        }
    }

    /// The encoding of the header stored in `store`.
    fn image_header_bytes(store: &Arc<RecordingStorage>) -> Vec<u8> {
        let mut cluster0 = vec![0u8; 65536];
        store.read_exact_at(&mut cluster0, 0).unwrap();
        crate::format::Header::decode(&cluster0)
            .unwrap()
            .encode()
            .unwrap()
    }

    /// An overlay's cluster 0 (backing format and feature table) ends past the first sector,
    /// so the new bitmaps extension and the autoclear bit land in different sectors.
    #[test]
    fn an_overlay_gets_its_first_bitmap_crash_safely() {
        let (store, image) = image(65536, "base.qcow2");
        let before = store.op_count();
        image.add_bitmap("b1", 65536, false).unwrap();
        image.close().unwrap();
        let ops = store.ops();
        each_cut(&store, before, |cut, reopened| {
            let names: Vec<String> = reopened.bitmaps().into_iter().map(|b| b.name).collect();
            assert!(names.is_empty() || names == ["b1"], "cut {cut}: {names:?}");
            assert_eq!(reopened.backing_file_name().as_deref(), Some("base.qcow2"));
        });
        assert!(ops.len() > before, "the add wrote nothing");
    }
}
