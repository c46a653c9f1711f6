//! What the commands read guest bytes from: a qcow2 image (with its backing chain), one of its
//! internal snapshots, or a raw file. Also the error type every command returns.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use qcow2::{Image, OpenOptions, SnapshotView};

/// A command's failure: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// What a command returns: its exit code, or a failure.
pub type CmdResult = Result<i32, Failure>;

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The two formats the tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

/// The format named by `-f`, or the one probed from the file's magic.
pub fn format_of(path: &Path, forced: Option<&str>) -> Result<Format, String> {
    match forced {
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") => Ok(Format::Raw),
        Some(other) => Err(format!("Unknown file format '{other}'")),
        None => {
            // QEMU names the file twice: the image open, then the protocol open under it.
            let mut file = File::open(path).map_err(|e| {
                let shown = path.display();
                format!(
                    "Could not open '{shown}': Could not open '{shown}': {}",
                    io_text(&e)
                )
            })?;
            let mut magic = [0u8; 4];
            let n = file.read(&mut magic).unwrap_or(0);
            Ok(if n == 4 && magic == QCOW2_MAGIC {
                Format::Qcow2
            } else {
                Format::Raw
            })
        }
    }
}

/// Which backing and data files images may make the tool open (`--backing-files`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackingFiles {
    /// Whatever the image names, anywhere (qemu-img's behaviour).
    Follow,
    /// Only files in the directory of the image named on the command line (or below it).
    Beside,
    /// None: an image that names a backing or data file is refused.
    Refuse,
}

static BACKING_FILES: std::sync::OnceLock<BackingFiles> = std::sync::OnceLock::new();

/// Sets the policy for this run (once, from the command line).
pub fn set_backing_files(policy: BackingFiles) {
    let _ = BACKING_FILES.set(policy);
}

static FORCE_SHARE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `-U`/`--force-share` for this run: read-only opens skip the check for other writers, as
/// qemu-img's do (the write lock of a running VM no longer refuses `info` or `map`).
pub fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `options` with the run's backing-file policy (and `-U`, for read-only opens) applied to a
/// chain opened from `path`.
pub fn with_policy(path: &Path, options: &OpenOptions) -> OpenOptions {
    let mut options = options.clone();
    if options.keys.is_empty() && !options.without_key {
        // Keys an `--image-opts` string named for this file.
        options.keys = crate::secrets::keys_for_path(path);
    }
    if !options.writable && FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed) {
        options.force_share = true;
    }
    if options.backing_resolver.is_none() {
        options.backing_resolver = Some(crate::nodes::backing_json::resolver());
    }
    if options.backing == qcow2::BackingPolicy::Follow {
        options.backing = match BACKING_FILES.get().copied().unwrap_or(BackingFiles::Follow) {
            BackingFiles::Follow => qcow2::BackingPolicy::Follow,
            BackingFiles::Refuse => qcow2::BackingPolicy::Refuse,
            BackingFiles::Beside => {
                let top = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                let dir = top.parent().map(Path::to_path_buf).unwrap_or_default();
                // An image not made yet (create's backing probe): its directory exists.
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                };
                qcow2::BackingPolicy::AllowDirs(vec![dir])
            }
        };
    }
    options
}

/// Whether a chain opened from `top` may go on to the backing file at `next`, under the run's
/// policy (for commands that walk a chain by name, as `info --backing-chain` does). FIFOs,
/// sockets, directories and character devices are never followed.
pub fn may_follow(top: &Path, next: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let refused = || {
        format!(
            "Could not open backing file '{}': not allowed by --backing-files",
            next.display()
        )
    };
    match BACKING_FILES.get().copied().unwrap_or(BackingFiles::Follow) {
        BackingFiles::Follow => {}
        BackingFiles::Refuse => return Err(refused()),
        BackingFiles::Beside => {
            let dir = std::fs::canonicalize(top)
                .ok()
                .and_then(|t| t.parent().map(Path::to_path_buf));
            let real = std::fs::canonicalize(next).ok();
            if !matches!((&dir, &real), (Some(d), Some(r)) if r.starts_with(d)) {
                return Err(refused());
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(next) {
        let t = meta.file_type();
        if t.is_fifo() || t.is_socket() || t.is_char_device() || t.is_dir() {
            return Err(format!(
                "Could not open backing file '{}': not a regular file or block device",
                next.display()
            ));
        }
    }
    Ok(())
}

/// Opens a qcow2 image with its backing chain and data file, as the run's policy allows.
pub fn open_image(path: &Path, options: &OpenOptions) -> Result<Image, String> {
    let name = path.to_string_lossy();
    if name.starts_with("blkdebug:") && !name.starts_with("blkdebug::") {
        // A blkdebug node with rules under the format: opened as its options say.
        let mut spec = crate::io::open::OpenSpec::from_filename(&name, Default::default())?;
        spec.read_only = !options.writable;
        spec.format = Some("qcow2".into());
        return match spec
            .open()
            .map_err(|e| format!("Could not open '{name}': {e}"))?
        {
            crate::io::open::Target::Qcow2(image) => Ok(*image),
            crate::io::open::Target::Raw(_) => Err("Image is not in qcow2 format".into()),
        };
    }
    let image = Image::open(path, &with_policy(path, options)).map_err(|e| {
        format!(
            "Could not open '{}': {}",
            crate::secrets::shown_name(path),
            open_error_text(&e)
        )
    })?;
    report_open_repair(&image);
    Ok(image)
}

/// Prints what repairing a dirty image at open did, as QEMU prints it while opening.
pub fn report_open_repair(image: &Image) {
    for line in image.open_repair_messages() {
        errln!("{line}");
    }
}

/// The block drivers qemu-img 10 knows by name (`qemu-img --help`), any of which it records as
/// a backing format.
pub const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Why an image did not open, in the words qemu's qcow2 driver uses for the same header check
/// (scripts and qemu-iotests match on them); other errors keep the engine's own text.
pub fn open_error_text(e: &qcow2::Error) -> String {
    let (structure, reason) = match e {
        qcow2::Error::Corrupt {
            structure, reason, ..
        } => (structure.as_str(), reason.as_str()),
        qcow2::Error::Unsupported {
            structure, what, ..
        } => (structure.as_str(), what.as_str()),
        qcow2::Error::Io {
            image,
            context,
            source,
        } if context == "opening the image" => {
            return format!("Could not open '{image}': {}", io_text(source))
        }
        // The caller's own option was wrong: QEMU names the option, not the image.
        qcow2::Error::InvalidArgument { reason, .. } if reason.starts_with("'data-file'") => {
            return reason.clone()
        }
        qcow2::Error::Chain {
            role: "backing",
            problem: qcow2::ChainProblem::UnsupportedFormat(format),
            ..
        } if !QEMU_DRIVERS.contains(&format.as_str()) => {
            return format!("Could not open backing file: Unknown driver '{format}'")
        }
        qcow2::Error::Chain {
            role: "data",
            problem: qcow2::ChainProblem::Missing,
            file,
            ..
        } => return format!("Could not open '{file}': No such file or directory"),
        qcow2::Error::Chain {
            role: "data",
            problem: qcow2::ChainProblem::Required,
            ..
        } => return "'data-file' is required for this image".into(),
        _ => return e.to_string(),
    };
    let qemu = match structure {
        // The encryption checks are worded as QEMU words them already.
        "header field crypt_method" | "full disk encryption extension" => return reason.to_owned(),
        "header field incompatible_features" => {
            return format!("Unsupported qcow2 feature(s): {reason}")
        }
        "header field magic" => "Image is not in qcow2 format",
        "header field size" => "Image is too big",
        "header field header_length" if reason.contains("cluster size") => {
            "qcow2 header exceeds cluster size"
        }
        "header field backing_file_offset" => "Invalid backing file offset",
        "header field backing_file_size" => "Backing file name too long",
        "header field refcount_table_clusters" => "Reference count table too large",
        "header field refcount_table_offset" => "Reference count table offset invalid",
        "header field nb_snapshots" => "Snapshot table too large",
        "header field snapshots_offset" => "Snapshot table offset invalid",
        "header field l1_size" if reason.starts_with("L1 table is too small") => {
            "L1 table is too small"
        }
        "header field l1_size" => "Active L1 table too large",
        "header field l1_table_offset" => "Active L1 table offset invalid",
        s if s.starts_with("header extension ") && reason.contains("runs past the end") => {
            "Header extension too large"
        }
        _ => return e.to_string(),
    };
    qemu.to_owned()
}

pub use qcow2::image::resolve_relative;

/// The host file a `file:`-prefixed name means, as QEMU's file protocol reads it; other names
/// unchanged. A relative result whose first component holds a colon gets `./` in front, as
/// QEMU names it, so it is not read as another protocol prefix again.
pub fn file_protocol_path(name: &str) -> String {
    let Some(path) = name.strip_prefix("file:") else {
        return name.to_owned();
    };
    let first = path.split('/').next().unwrap_or_default();
    if !path.starts_with('/') && first.contains(':') {
        format!("./{path}")
    } else {
        path.to_owned()
    }
}

/// A raw file read as a guest disk.
pub struct RawFile {
    file: qcow2::FileStorage,
    size: u64,
}

impl RawFile {
    /// Opens `path`, read around the page cache when `direct` (`-T none`).
    pub fn open(path: &Path, direct: bool) -> Result<RawFile, String> {
        let failed =
            |e: std::io::Error| format!("Could not open '{}': {}", path.display(), io_text(&e));
        let file = File::open(path).map_err(failed)?;
        let size = file
            .metadata()
            .map_err(failed)?
            .len()
            // QEMU sees a raw file in whole sectors; the tail of the last one reads as zeros.
            .next_multiple_of(512);
        let mut file = qcow2::FileStorage::from_file(file, false);
        file.set_direct_io(direct).map_err(failed)?;
        Ok(RawFile { file, size })
    }
}

/// Whether a range holds data to copy or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub length: u64,
    pub data: bool,
    /// Not allocated in the top image: read from its backing chain (what `convert -B` skips).
    pub below: bool,
}

/// A guest disk to read.
pub trait Guest: Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String>;
    /// As `read_at`, with the error as the `strerror` text qemu-img prints after its context.
    fn read_errno(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.read_at(buf, offset)
    }
    /// Ranges of `[offset, offset + len)`: data, or known zeros.
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String>;
    /// The host file and offset that hold `[offset, offset + len)` byte for byte, where one
    /// does (a raw file): what `convert -C` asks the kernel to copy.
    fn host_range(&self, _offset: u64, _len: u64) -> Option<(&std::fs::File, u64)> {
        None
    }
}

fn regions_of(extents: Vec<qcow2::Extent>) -> Vec<Region> {
    let mut out: Vec<Region> = Vec::with_capacity(extents.len());
    for e in extents {
        let data = e.data();
        let below = e.depth > 0;
        match out.last_mut() {
            Some(last)
                if last.data == data
                    && last.below == below
                    && last.start + last.length == e.start =>
            {
                last.length += e.length
            }
            _ => out.push(Region {
                start: e.start,
                length: e.length,
                data,
                below,
            }),
        }
    }
    out
}

impl Guest for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        Image::read_at(self, buf, offset).map_err(|e| e.to_string())
    }
    fn read_errno(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        Image::read_at(self, buf, offset).map_err(|e| crate::io::errno_text(&e))
    }
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        self.map(offset, len)
            .map(regions_of)
            .map_err(|e| e.to_string())
    }
}

impl Guest for SnapshotView<'_> {
    fn size(&self) -> u64 {
        SnapshotView::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        SnapshotView::read_at(self, buf, offset).map_err(|e| e.to_string())
    }
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        self.map(offset, len)
            .map(regions_of)
            .map_err(|e| e.to_string())
    }
}

impl Guest for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn host_range(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64)> {
        // Past the end of the file (the tail of the last sector) reads as zeros: not a range
        // of the file. A file read around the page cache is read through its store (aligned).
        if qcow2::Storage::is_direct_io(&self.file) {
            return None;
        }
        let file_len = self.file.file().metadata().ok()?.len();
        (offset.checked_add(len)? <= file_len).then_some((self.file.file(), offset))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        qcow2::storage::StorageExt::read_zero_filled_at(&self.file, buf, offset)
            .map_err(|e| format!("error while reading at offset {offset}: {e}"))
    }
    /// Holes of the file (`SEEK_DATA`/`SEEK_HOLE`) read as zeros and are never read; the rest
    /// is data (zeros written into it are found when it is read).
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        store_regions(&self.file, offset, len)
    }
}

/// The regions of `[offset, offset + len)` of a store read raw: what the store knows to read
/// as zeros (a file's holes, `SEEK_DATA`/`SEEK_HOLE`) is zeros, the rest is data.
pub fn store_regions(
    store: &dyn qcow2::Storage,
    offset: u64,
    len: u64,
) -> Result<Vec<Region>, String> {
    let mut out: Vec<Region> = Vec::new();
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let (hole, n) = store
            .hole_at(pos, end - pos)
            .map_err(|e| format!("error while reading at offset {pos}: {}", io_text(&e)))?
            .map_or((false, end - pos), |(hole, n)| (hole, n.max(1)));
        match out.last_mut() {
            Some(last) if last.data != hole => last.length += n,
            _ => out.push(Region {
                start: pos,
                length: n,
                data: !hole,
                below: false,
            }),
        }
        pos += n;
    }
    Ok(out)
}

/// An opened input: a qcow2 image, a raw file, or a node its options describe (a null node).
pub enum Input {
    Qcow2(Box<Image>),
    Raw(RawFile),
    Node(crate::nodes::raw::RawImage),
    /// A blkdebug node with error rules over another input.
    Blkdebug(Box<crate::nodes::blkdebug::GuestNode>),
}

impl Input {
    /// Every host file the input reads from (its chain and data file included).
    pub fn files(&self) -> Vec<qcow2::storage::FileIdentity> {
        match self {
            Input::Qcow2(image) => image.files_in_use(),
            Input::Raw(raw) => qcow2::storage::FileIdentity::of(raw.file.file())
                .into_iter()
                .collect(),
            Input::Node(node) => node.files(),
            Input::Blkdebug(node) => node.inner().files(),
        }
    }

    /// Opens `path` as `-f` says, or as its magic says; a `json:` or blkdebug name with error
    /// rules opens as its options say.
    pub fn open(path: &Path, forced: Option<&str>) -> Result<Input, String> {
        Input::open_cached(path, forced, false)
    }

    /// [`Input::open`], with an image or raw file read around the page cache when `direct`
    /// (`-T none`; nodes a `json:` name describes keep their own options).
    pub fn open_cached(path: &Path, forced: Option<&str>, direct: bool) -> Result<Input, String> {
        let name = path.to_string_lossy();
        if name.starts_with("json:")
            || (name.starts_with("blkdebug:") && !name.starts_with("blkdebug::"))
        {
            let mut spec = crate::io::open::OpenSpec::from_filename(&name, Default::default())?;
            if let Some(node) = blkdebug_over_image(&spec.options, forced)? {
                return Ok(Input::Blkdebug(Box::new(node)));
            }
            spec.read_only = true;
            spec.format = forced.map(str::to_owned);
            return match spec
                .open()
                .map_err(|e| format!("Could not open '{name}': {e}"))?
            {
                crate::io::open::Target::Qcow2(image) => Ok(Input::Qcow2(image)),
                crate::io::open::Target::Raw(node) => Ok(Input::Node(node)),
            };
        }
        match format_of(path, forced)? {
            Format::Qcow2 => Ok(Input::Qcow2(Box::new(open_image(
                path,
                &OpenOptions::default().direct_io(direct),
            )?))),
            Format::Raw => Ok(Input::Raw(RawFile::open(path, direct)?)),
        }
    }

    pub fn guest(&self) -> &dyn Guest {
        match self {
            Input::Qcow2(image) => image.as_ref(),
            Input::Raw(raw) => raw,
            Input::Node(node) => node,
            Input::Blkdebug(node) => node.as_ref(),
        }
    }
}

/// A top-level blkdebug node with error rules over an image node (`image.driver`), opened
/// read-only; `None` when the options describe something else.
fn blkdebug_over_image(
    o: &crate::io::open::Options,
    forced: Option<&str>,
) -> Result<Option<crate::nodes::blkdebug::GuestNode>, String> {
    let top = o.get("driver").map(String::as_str).or(forced);
    if top != Some("blkdebug") || !o.contains_key("image.driver") {
        return Ok(None);
    }
    let rules = crate::nodes::blkdebug::rules_from_options(o, "")?;
    let inner = crate::io::open::OpenSpec {
        options: o
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("image.")?.to_owned(), v.clone())))
            .collect(),
        read_only: true,
        ..Default::default()
    };
    let input = match inner.open()? {
        crate::io::open::Target::Qcow2(image) => Input::Qcow2(image),
        crate::io::open::Target::Raw(_) => {
            return Err("blkdebug error rules over a raw image are not supported".into())
        }
    };
    Ok(Some(crate::nodes::blkdebug::GuestNode::new(input, rules)))
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    // chunks_exact yields 16-byte slices only.
    let words_zero = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0);
    words_zero && chunks.remainder().iter().all(|&b| b == 0)
}

/// An I/O error as C's `strerror` prints it (without Rust's ` (os error N)` suffix).
pub fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Several inputs read one after another as one disk, as `qemu-img convert a b c` reads them:
/// each starts where the previous one ends.
pub struct Concat {
    /// Each input with the guest offset it starts at.
    parts: Vec<(u64, Input)>,
    size: u64,
}

impl Concat {
    pub fn new(inputs: Vec<Input>) -> Concat {
        let mut size = 0;
        let mut parts = Vec::with_capacity(inputs.len());
        for input in inputs {
            let len = input.guest().size();
            parts.push((size, input));
            size += len;
        }
        Concat { parts, size }
    }

    /// Every host file any input reads from.
    pub fn files(&self) -> Vec<qcow2::storage::FileIdentity> {
        self.parts.iter().flat_map(|(_, i)| i.files()).collect()
    }

    /// The parts overlapping `[offset, offset + len)`: (part start, input, offset within the
    /// part, length within the part).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, &Input, u64, u64)> {
        let end = offset + len;
        self.parts.iter().filter_map(move |(start, input)| {
            let part_end = start + input.guest().size();
            let (from, to) = (offset.max(*start), end.min(part_end));
            (from < to).then(|| (*start, input, from - start, to - from))
        })
    }
}

impl Guest for Concat {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        for (start, input, within, len) in self.pieces(offset, buf.len() as u64) {
            let at = (start + within - offset) as usize;
            input
                .guest()
                .read_at(&mut buf[at..at + len as usize], within)?;
        }
        Ok(())
    }
    fn host_range(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64)> {
        let mut pieces = self.pieces(offset, len);
        let (_, input, within, piece_len) = pieces.next()?;
        if piece_len != len {
            return None;
        }
        input.guest().host_range(within, len)
    }
    fn regions(&self, offset: u64, len: u64) -> Result<Vec<Region>, String> {
        let mut out = Vec::new();
        for (start, input, within, len) in self.pieces(offset, len) {
            for r in input.guest().regions(within, len)? {
                out.push(Region {
                    start: r.start + start,
                    ..r
                });
            }
        }
        Ok(out)
    }
}
