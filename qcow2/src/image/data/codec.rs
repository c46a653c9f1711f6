//! Decompression of compressed clusters: raw deflate (any window up to 32 KiB, so foreign writers
//! work too) and zstd with one or several frames. Output is exactly one cluster; trailing bytes in
//! the last sector belong to the next cluster and are ignored.

use crate::format::CompressionType;

/// The largest zstd window accepted: 4 MiB, twice the largest cluster, so a hostile frame cannot ask
/// for a huge decoder buffer.
#[cfg(feature = "zstd")]
const ZSTD_MAX_WINDOW_LOG: u32 = 22;

/// Decompresses `input` into all of `out`, or says why it could not.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let status = d
            .decompress(
                &input[before_in as usize..],
                &mut out[before_out as usize..],
                flate2::FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate data is invalid: {e}"))?;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        let stalled = d.total_in() == before_in && d.total_out() == before_out;
        if status == flate2::Status::StreamEnd || stalled {
            return Err(format!(
                "deflate data ends after {} of {} bytes",
                d.total_out(),
                out.len()
            ));
        }
    }
}

#[cfg(not(feature = "zstd"))]
fn unzstd(_input: &[u8], _out: &mut [u8]) -> Result<(), String> {
    Err("zstd-compressed data needs the engine's `zstd` feature, which this build lacks".into())
}

#[cfg(feature = "zstd")]
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(|e| format!("zstd decoder could not start: {e}"))?;
    decoder
        .window_log_max(ZSTD_MAX_WINDOW_LOG)
        .map_err(|e| format!("zstd decoder could not be limited: {e}"))?;
    decoder
        .read_exact(out)
        .map_err(|e| format!("zstd data is invalid or too short: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn inflates_raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xAB; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &compressed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_accepts_several_frames() {
        let a = zstd::encode_all(&[1u8; 2048][..], 3).unwrap();
        let b = zstd::encode_all(&[2u8; 2048][..], 3).unwrap();
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &[a, b].concat(), &mut out).unwrap();
        assert_eq!(&out[..2048], &[1u8; 2048][..]);
        assert_eq!(&out[2048..], &[2u8; 2048][..]);
    }

    #[test]
    fn short_data_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0x03, 0x00], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0x28, 0xb5, 0x2f, 0xfd], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[], &mut out).is_err());
    }
}

/// Compresses one cluster the way QEMU does (raw deflate with a 4 KiB window, or one zstd frame).
/// Returns `None` when the result would not be smaller than `limit` bytes.
pub(crate) fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        #[cfg(feature = "zstd")]
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, zstd::DEFAULT_COMPRESSION_LEVEL).ok()?;
            (out.len() < limit).then_some(out)
        }
        // Without the feature nothing is compressed: the cluster is stored as it is.
        #[cfg(not(feature = "zstd"))]
        CompressionType::Zstd => None,
    }
}

#[cfg(test)]
mod compress_tests {
    use super::*;

    #[test]
    fn compressed_clusters_round_trip_and_incompressible_data_is_refused() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let kinds = if cfg!(feature = "zstd") {
            vec![CompressionType::Zlib, CompressionType::Zstd]
        } else {
            vec![CompressionType::Zlib]
        };
        for kind in kinds {
            let c = compress(kind, &data, data.len() - 1).expect("compressible");
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &noise, noise.len() - 1).is_none());
    }
}
