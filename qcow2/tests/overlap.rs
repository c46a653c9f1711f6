//! A refcount table that points a refcount block at other metadata (the active L1 table, a
//! snapshot's L2 table) is refused for writing before anything is written: updating that block
//! would overwrite every guest mapping or the snapshot. QEMU's `qemu-img check` calls these
//! images corrupt too. Metadata counted free opens for writing, but is never allocated.

use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2::{Image, OpenOptions};
use qcow2_testdata::{qemu_check, qemu_img_ok, qemu_io, scratch_dir};

fn header_u64(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn poke_u64(path: &Path, at: u64, value: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_be_bytes(), at).unwrap();
}

/// A 64 MiB image with data, one snapshot and more data after it.
fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "64M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 1M", p]);
    qemu_img_ok(&["snapshot", "-c", "s1", p]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 2 0 64k", p]);
    path
}

#[test]
fn refcount_blocks_on_other_metadata_refuse_writes_and_change_nothing() {
    let dir = scratch_dir("overlap_refblocks");
    let reftable_at = |p: &Path| header_u64(p, 48);
    type Target = Box<dyn Fn(&Path) -> u64>;
    let cases: Vec<(&str, Target, &str)> = vec![
        (
            "active-l1",
            Box::new(|p: &Path| header_u64(p, 40)),
            "active L1 table",
        ),
        (
            "snapshot-l2",
            Box::new(|p: &Path| {
                // The snapshot's L1 table, then its first L2 table.
                let image = Image::open(p, &OpenOptions::metadata_only()).unwrap();
                let s = &image.snapshot_entries()[0];
                header_u64(p, s.l1_table_offset) & 0x00FF_FFFF_FFFF_FE00
            }),
            "snapshot 1",
        ),
        (
            "snapshot-table",
            Box::new(|p: &Path| header_u64(p, 64)),
            "snapshot table",
        ),
    ];
    for (name, target, what) in cases {
        let path = image(&dir, &format!("{name}.qcow2"));
        let t = target(&path);
        assert_ne!(t % 65536, 1, "{name}");
        poke_u64(&path, reftable_at(&path), t);
        let before = std::fs::read(&path).unwrap();
        let (code, _) = qemu_check(&path);
        assert_eq!(code, 2, "{name}: qemu-img check calls it corrupt");
        let err = Image::open(&path, &OpenOptions::read_write()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("refcount table entry 0") && text.contains(what),
            "{name}: {text}"
        );
        // Reading is still possible, and nothing was written.
        let ro = Image::open(&path, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4096];
        ro.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![2u8; 4096], "{name}");
        assert!(
            std::fs::read(&path).unwrap() == before,
            "{name}: the file changed"
        );
    }
}

#[test]
fn metadata_counted_free_is_never_allocated_and_marks_the_image_corrupt() {
    let dir = scratch_dir("overlap_counted_free");
    let path = image(&dir, "l1-free.qcow2");
    // The active L1 table's cluster gets refcount 0 in the first refblock (16-bit counts).
    let l1 = header_u64(&path, 40);
    let refblock = header_u64(&path, header_u64(&path, 48));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0, 0], refblock + (l1 >> 16) * 2).unwrap();
    drop(f);
    let theirs = dir.join("l1-free-qemu.qcow2");
    std::fs::copy(&path, &theirs).unwrap();
    let l1_bytes = |p: &Path| std::fs::read(p).unwrap()[l1 as usize..l1 as usize + 65536].to_vec();
    let l1_before = l1_bytes(&path);

    // The image opens for writing, as in QEMU; the first allocation would take the L1 table's
    // cluster, so it is refused and the image marked corrupt, the table untouched.
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let err = image.write_at(&[3; 65536], 1 << 20).unwrap_err();
    assert!(
        matches!(&err, qcow2::Error::Corrupt { structure, reason, .. }
            if structure.contains("active L1")
                && reason == &format!("Preventing invalid allocation of clusters at offset {l1}")),
        "{err}"
    );
    assert!(image.header().is_corrupt());
    drop(image);
    assert_eq!(l1_bytes(&path), l1_before, "the L1 table changed");
    // QEMU fails the same write (its overlap check catches it) and marks the image corrupt too.
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 3 1M 64k",
        theirs.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("write failed: Input/output error"));
    let corrupt = |p: &Path| header_u64(p, 72) & 2 != 0;
    assert!(corrupt(&path) && corrupt(&theirs));
    assert!(Image::open(&path, &OpenOptions::read_write()).is_err());

    // check -r all rebuilds the counts and clears the mark; then the image takes writes and
    // QEMU agrees.
    let options = OpenOptions::read_write().for_repair(true);
    let image = Image::open(&path, &options).unwrap();
    image.check_and_repair(qcow2::Repair::All).unwrap();
    image.close().unwrap();
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.write_at(&[3; 65536], 1 << 20).unwrap();
    image.close().unwrap();
    assert_eq!(qemu_check(&path).0, 0);
}
