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
