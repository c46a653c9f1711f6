//! The engine's encrypted images on their own: keys at open, sub-sector writes from many
//! threads at once, and hostile encryption headers.

use std::sync::Arc;

use qcow2::crypto::luks::LuksParams;
use qcow2::crypto::{CryptoError, Secret};
use qcow2::{CreateOptions, Error, Image, NewEncryption, OpenOptions};
use qcow2_testdata::scratch_dir;

fn luks(password: &str) -> NewEncryption {
    NewEncryption::Luks {
        password: Secret::new(password),
        params: LuksParams {
            iter_time_ms: 1,
            ..LuksParams::default()
        },
    }
}

fn keyed(password: &str) -> OpenOptions {
    OpenOptions::read_write().keys(vec![Some(Secret::new(password))])
}

#[test]
fn keys_decide_what_opens() {
    let dir = scratch_dir("keys");
    let path = dir.join("a.qcow2");
    let image = Image::create(
        &path,
        &CreateOptions::new(1 << 20).encryption(Some(luks("right"))),
    )
    .unwrap();
    image.write_at(&[7u8; 4096], 8192).unwrap();
    image.close().unwrap();

    let wrong = Image::open(&path, &keyed("wrong")).unwrap_err();
    assert!(matches!(
        wrong,
        Error::Crypto {
            source: CryptoError::WrongPassword,
            ..
        }
    ));
    let missing = Image::open(&path, &OpenOptions::read_write()).unwrap_err();
    assert!(matches!(
        missing,
        Error::Crypto {
            source: CryptoError::MissingSecret,
            ..
        }
    ));
    // Without a key, the metadata is there but the data is not.
    let locked = Image::open(&path, &OpenOptions::new().without_key(true)).unwrap();
    assert!(locked.info().luks.is_some());
    assert!(locked.read_at(&mut [0u8; 512], 8192).is_err());
    drop(locked);

    let image = Image::open(&path, &keyed("right")).unwrap();
    let mut buf = [0u8; 4096];
    image.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    assert!(image.check().unwrap().is_clean());
}

#[test]
fn concurrent_sub_sector_writes_to_one_sector_all_land() {
    let dir = scratch_dir("concurrent");
    let path = dir.join("a.qcow2");
    let image = Arc::new(
        Image::create(
            &path,
            &CreateOptions::new(1 << 20).encryption(Some(NewEncryption::Aes {
                password: Secret::new("pw"),
            })),
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let image = Arc::clone(&image);
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let at = 1000 + t as u64 * 16 + i;
                    image.write_at(&[t + 1], at).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut buf = [0u8; 128];
    image.read_at(&mut buf, 1000).unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, (i / 16) as u8 + 1, "byte {i}");
    }
}

/// Whole-sector writes run beside each other, but a write widened to whole sectors (read,
/// merge, write back) must not swallow a whole-sector write that lands between its read and its
/// write: each round, started together on two threads, leaves the sector as one of the two
/// orders would.
#[test]
fn a_sub_sector_write_never_undoes_a_concurrent_whole_sector_write() {
    let dir = scratch_dir("concurrent-mixed");
    let image = Arc::new(
        Image::create(
            dir.join("a.qcow2"),
            &CreateOptions::new(1 << 20).encryption(Some(luks("pw"))),
        )
        .unwrap(),
    );
    const ROUNDS: usize = 3000;
    let start = Arc::new(std::sync::Barrier::new(2));
    let done = Arc::new(std::sync::Barrier::new(2));
    let partial = {
        let (image, start, done) = (Arc::clone(&image), Arc::clone(&start), Arc::clone(&done));
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                start.wait();
                if round % 2 == 0 {
                    image.write_at(&[0xEE], 4096 + 100).unwrap();
                } else {
                    image.write_zeroes(4096 + 200, 3, false).unwrap();
                }
                done.wait();
            }
        })
    };
    for round in 0..ROUNDS {
        let fill = (round % 200) as u8 + 1;
        start.wait();
        image.write_at(&[fill; 512], 4096).unwrap();
        // Other sectors, written beside the widened write.
        image.write_at(&[fill; 4096], 65536).unwrap();
        done.wait();
        let mut sector = [0u8; 512];
        image.read_at(&mut sector, 4096).unwrap();
        for (i, &b) in sector.iter().enumerate() {
            let by_partial = match (round % 2, i) {
                (0, 100) => Some(0xEE),
                (1, 200..=202) => Some(0),
                _ => None,
            };
            assert!(
                b == fill || Some(b) == by_partial,
                "round {round}: byte {i} is {b:#x}, not {fill:#x}: the widened write undid the \
                 whole-sector one"
            );
        }
    }
    partial.join().unwrap();
    let mut other = vec![0u8; 4096];
    image.read_at(&mut other, 65536).unwrap();
    assert!(other.iter().all(|&b| b == (((ROUNDS - 1) % 200) as u8 + 1)));
    assert!(image.check().unwrap().is_clean());
}

#[test]
fn a_crypto_extension_past_the_file_or_on_a_clear_image_is_refused() {
    let dir = scratch_dir("hostile_ext");
    let path = dir.join("a.qcow2");
    Image::create(
        &path,
        &CreateOptions::new(1 << 20).encryption(Some(luks("pw"))),
    )
    .unwrap()
    .close()
    .unwrap();
    let good = std::fs::read(&path).unwrap();
    // The extension follows the 112-byte v3 header: magic, length, offset, length.
    assert_eq!(&good[112..116], &0x0537_be77u32.to_be_bytes());
    let cases: [(usize, &[u8]); 3] = [
        (128, &u64::MAX.to_be_bytes()),
        (120, &0x1234u64.to_be_bytes()),
        (32, &0u32.to_be_bytes()),
    ];
    for (i, (at, patch)) in cases.iter().enumerate() {
        let mut b = good.clone();
        b[*at..*at + patch.len()].copy_from_slice(patch);
        let bad = dir.join(format!("bad{i}.qcow2"));
        std::fs::write(&bad, &b).unwrap();
        let e = Image::open(&bad, &keyed("pw")).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "case {i}: {e}");
    }
}
