//! QEMU's `compress` filter driver (`driver=compress` over a qcow2 node): reads, zero writes and
//! discards pass through; every other write goes out compressed, widened to whole clusters with
//! what the image reads around it (the filter's request alignment is the cluster size, so QEMU's
//! block layer pads each write the same way).

use qcow2::Image;

use crate::io::open::{OpenSpec, Target};

/// The node under a `compress` filter when `spec` names one on top: the `file.*` options, with
/// the filter's own read-only and sharing settings.
pub fn inner_spec(spec: &OpenSpec) -> Option<OpenSpec> {
    if spec.options.get("driver")? != "compress" {
        return None;
    }
    let mut options: crate::io::open::Options = spec
        .options
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("file.")?.to_owned(), v.clone())))
        .collect();
    if let Some(ro) = spec.options.get("read-only") {
        options.insert("read-only".into(), ro.clone());
    }
    Some(OpenSpec {
        name: spec.name.clone(),
        options,
        format: None,
        ..spec.clone()
    })
}

/// Refuses a node the filter cannot sit on, with QEMU's message: only qcow2 compresses.
pub fn check_inner(target: &Target) -> Result<(), String> {
    match target {
        Target::Qcow2(_) => Ok(()),
        Target::Raw(_) => Err("Compression is not supported for underlying format: raw".into()),
    }
}

/// The whole clusters a write of `len` bytes at `offset` touches, clipped to the disk's end.
fn widened(image: &Image, offset: u64, len: u64) -> (u64, u64) {
    let cs = image.cluster_size();
    let start = offset - offset % cs;
    let end = (offset + len).next_multiple_of(cs).min(image.size());
    (start, end)
}

/// Writes `buf` at `offset` through the filter: the touched clusters are read, overlaid with
/// `buf`, and handed to `write` as one compressed write of whole clusters.
pub fn write(
    image: &Image,
    buf: &[u8],
    offset: u64,
    write: impl FnOnce(&[u8], u64) -> Result<(), String>,
) -> Result<(), String> {
    let (start, end) = widened(image, offset, buf.len() as u64);
    let mut whole = vec![0u8; (end - start) as usize];
    let head = (offset - start) as usize;
    if head > 0 || whole.len() > head + buf.len() {
        image
            .read_at(&mut whole, start)
            .map_err(|e| crate::io::errno_text(&e))?;
    }
    whole[head..head + buf.len()].copy_from_slice(buf);
    write(&whole, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_compress_driver_on_top_is_a_filter() {
        let mut spec = OpenSpec::default();
        spec.options.insert("driver".into(), "qcow2".into());
        assert!(inner_spec(&spec).is_none());
        spec.options.insert("driver".into(), "compress".into());
        spec.options.insert("file.driver".into(), "qcow2".into());
        spec.options
            .insert("file.file.filename".into(), "t.qcow2".into());
        let inner = inner_spec(&spec).unwrap();
        assert_eq!(inner.options["driver"], "qcow2");
        assert_eq!(inner.options["file.filename"], "t.qcow2");
        assert!(!inner.options.contains_key("file.driver"));
    }
}
