//! Building a group of images on the recording file system, and what a reader sees of it.

use super::*;

/// A fresh file system with the images of `configs`, all durable.
pub(crate) fn build(configs: &[ImageConfig]) -> SimFs {
    let fs = SimFs::new();
    fs.add_dir(Path::new("/vm"));
    fs.add_dir(Path::new(GROUP));
    for (i, c) in configs.iter().enumerate() {
        let p = image_path(i);
        let storage = fs.create_new(&p).expect("creating an image file");
        let options = CreateOptions::new(c.size()).cluster_size(c.cluster_size());
        let img = Image::create_in(storage, &p.display().to_string(), &options)
            .expect("creating an image");
        if c.bitmap() {
            img.add_bitmap("b0", 65536, false).expect("adding a bitmap");
            img.write_at(&[0xB0; 512], 0).expect("writing image data");
        }
        let phases = c.snapshots() + 1;
        for phase in 0..phases {
            for w in c.writes.iter().filter(|w| w[0] as usize % phases == phase) {
                let offset = u16::from_be_bytes([w[1], w[2]]) as u64 * c.size() / 65536;
                let len = ((w[3] as u64 + 1) * 512).min(c.size() - offset);
                img.write_at(&vec![w[4]; len as usize], offset)
                    .expect("writing image data");
            }
            if phase < c.snapshots() {
                let time = SnapshotTime {
                    secs: 1 + phase as i64,
                    nanos: 0,
                };
                img.create_snapshot(&format!("s{phase}"), time)
                    .expect("creating a snapshot");
            }
        }
        img.close().expect("closing a new image");
    }
    // The group exists already, with its identity: a plan's run writes only what it does.
    drop(open_group(&fs).expect("opening a fresh group"));
    fs.settled()
}

pub(crate) fn open_group(fs: &SimFs) -> Result<Group, TxnError> {
    Group::open_in(Arc::new(fs.clone()), GROUP, None)
}

/// A hash of a layer's guest-visible content that reads only what `map` says holds data: every
/// non-zero 512-byte block with its offset, so equal content hashes equal whatever the allocation.
pub(crate) fn hash_content(
    map: impl Fn(u64, u64) -> qcow2::Result<Vec<qcow2::Extent>>,
    mut read: impl FnMut(&mut [u8], u64) -> qcow2::Result<()>,
    size: u64,
    ctx: &str,
) -> u64 {
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 64 << 10];
    let extents = map(0, size).unwrap_or_else(|e| panic!("{ctx}: map: {e}"));
    for e in extents.iter().filter(|e| e.data()) {
        let mut pos = e.start;
        let end = e.start + e.length;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            read(&mut buf[..n], pos).unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
            for (k, block) in buf[..n].chunks(512).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    h.write_u64(pos + k as u64 * 512);
                    h.write(block);
                }
            }
            pos += n as u64;
        }
    }
    h.finish()
}

/// Per image: (snapshot name, content hash) in table order, and the active content hash.
pub(crate) type ImageView = (Vec<(String, u64)>, u64, Vec<BitmapView>);

/// A bitmap as a reader sees it: name, enabled, and whether it marks nothing (`None` when it is
/// in use). Its exact bits are not compared: a revert marks the whole disk while it stages, so a
/// rolled-back plan may leave more bits than before (a superset is the durable-bits promise).
pub(crate) type BitmapView = (String, bool, Option<bool>);

/// What a reader sees: every image, every overlay that exists (with its backing name), the
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) images: BTreeMap<PathBuf, ImageView>,
    pub(crate) overlays: BTreeMap<PathBuf, Option<String>>,
    pub(crate) manifest: Option<Vec<u8>>,
}

pub(crate) fn view(fs: &SimFs, n_images: usize, ctx: &str) -> View {
    let mut images = BTreeMap::new();
    for p in (0..n_images).map(image_path) {
        let img = fs
            .open_read_only(&p)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let mut snaps = Vec::new();
        for s in img.snapshots() {
            let snap = img
                .open_snapshot(&s.id)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let hash = hash_content(
                |o, l| snap.map(o, l),
                |b, o| snap.read_at(b, o),
                snap.size(),
                ctx,
            );
            snaps.push((s.name.clone(), hash));
        }
        let active = hash_content(
            |o, l| img.map(o, l),
            |b, o| img.read_at(b, o),
            img.size(),
            ctx,
        );
        let bitmaps = img
            .bitmaps()
            .into_iter()
            .map(|b| {
                let empty = (!b.in_use).then(|| {
                    img.dirty_extents(&b.name, 0, img.size())
                        .unwrap_or_else(|e| panic!("{ctx}: bitmap {}: {e}", b.name))
                        .is_empty()
                });
                (b.name, b.enabled, empty)
            })
            .collect();
        images.insert(p, (snaps, active, bitmaps));
    }
    let mut overlays = BTreeMap::new();
    for o in OVERLAYS[..2].iter().map(PathBuf::from) {
        if fs.exists(&o) {
            let img = fs
                .open_read_only(&o)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            overlays.insert(o, img.backing_file_name());
        }
    }
    let manifest = fs.file(&Path::new(GROUP).join("group.manifest"));
    View {
        images,
        overlays,
        manifest,
    }
}

/// Every image and overlay checks clean, no stray file exists, and the journal holds no
/// unfinished transaction.
pub(crate) fn assert_sound(fs: &SimFs, n_images: usize, ctx: &str) {
    let mut files: Vec<PathBuf> = (0..n_images).map(image_path).collect();
    files.extend(
        OVERLAYS[..2]
            .iter()
            .map(PathBuf::from)
            .filter(|o| fs.exists(o)),
    );
    fs.audit(&files, Path::new(GROUP))
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
}

/// Recovers `fs` (by opening the group), checks the outcome is one of `expect` and sound, and
/// that a second recovery writes nothing.
pub(crate) fn recover_and_check(fs: &SimFs, n_images: usize, expect: &[&View], ctx: &str) {
    let group = open_group(fs).unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}"));
    drop(group);
    let v = view(fs, n_images, ctx);
    assert!(
        expect.contains(&&v),
        "{ctx}: the group is in none of the expected states: {v:#?}\nexpected: {expect:#?}"
    );
    assert_sound(fs, n_images, ctx);
    let again = fs.settled();
    let group = open_group(&again).unwrap_or_else(|e| panic!("{ctx}: second recovery: {e}"));
    assert_eq!(
        group.opened_with(),
        Recovery::Clean,
        "{ctx}: second recovery"
    );
    drop(group);
    assert!(
        again.log().iter().all(|op| matches!(op, FsOp::Event(_))),
        "{ctx}: a second recovery wrote something"
    );
}
