//! Backing chains and external data files, opened only through the caller's [`BackingPolicy`]:
//! an untrusted image must not make the library open arbitrary host files. Names resolve against
//! the directory of the image that names them; loops and overly deep chains are refused (QEMU
//! itself hangs on a backing loop).

use std::path::{Path, PathBuf};

use crate::error::{ChainProblem, Error, Result};
use crate::format::limits::QCOW_MAGIC;
use crate::image::{open_file, open_locked, resolve_relative, Image, OpenOptions};
use crate::storage::Storage;

use super::resolver::{self, BackingRequest};

/// Which backing and data files an image may make the library open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Open whatever the image names.
    Follow,
    /// Refuse to open an image that names a backing or data file.
    Refuse,
    /// Open the image alone: unallocated clusters read as zeros and data-file clusters cannot be
    /// read. For inspecting metadata (`info`, `check`, `map` of one layer).
    Ignore,
    /// Open only files inside these directories (compared after resolving symlinks).
    AllowDirs(Vec<PathBuf>),
}

/// What lies below an image.
pub(crate) enum Backing {
    /// Shared: an external snapshot of a live disk puts its overlay over the image the disk's
    /// users still hold.
    Qcow2(std::sync::Arc<Image>),
    Raw {
        storage: Box<dyn Storage>,
        size: u64,
    },
}

impl Backing {
    /// The backing file's virtual size.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(image) => image.size(),
            Backing::Raw { size, .. } => *size,
        }
    }
}

/// Opens the image at `path` and, as the policy allows, its data file and backing chain.
/// `chain` holds the canonical paths of the images above it (for loop detection).
pub(crate) fn open_chain(
    path: &Path,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Image> {
    open_chain_writable_at(path, options, chain, None)
}

/// As [`open_chain`], but the image at depth `writable_depth` of the chain (0 is `path` itself)
/// opens for writing too: the target of a commit.
pub(crate) fn open_chain_writable_at(
    path: &Path,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
) -> Result<Image> {
    open_chain_over(path, options, chain, writable_depth, None)
}

/// As [`open_chain_writable_at`]; a `data_file` given replaces the one the header names (QEMU's
/// `data-file` option): the caller chose it, so no policy applies and no name is resolved.
pub(crate) fn open_chain_over(
    path: &Path,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
    data_file: Option<Box<dyn Storage>>,
) -> Result<Image> {
    let name = path.display().to_string();
    let storage = open_locked(path, options.writable, options, &name, "the image")?;
    let canonical =
        std::fs::canonicalize(path).map_err(|e| Error::io(&name, "resolving the path", e))?;
    let layer = Layer {
        storage,
        name,
        path: Some(path.to_path_buf()),
        canonical,
    };
    open_layer(layer, options, chain, writable_depth, data_file)
}

/// One qcow2 image of a chain before its header is read: its storage, its name for messages,
/// the path its own names resolve against (none when a resolver built its storage) and the
/// canonical path that identifies it for loop detection.
struct Layer {
    storage: Box<dyn Storage>,
    name: String,
    path: Option<PathBuf>,
    canonical: PathBuf,
}

/// Opens `layer` and, as the policy allows, its data file and backing chain.
fn open_layer(
    layer: Layer,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
    data_file: Option<Box<dyn Storage>>,
) -> Result<Image> {
    let Layer {
        storage,
        name,
        path,
        canonical,
    } = layer;
    let mut image = Image::open_alone(storage, name, path, options)?;
    let data_given = data_file.is_some();
    if let Some(store) = data_file {
        if !image.meta().header.has_external_data_file() {
            return Err(Error::InvalidArgument {
                image: image.name.clone(),
                reason: "'data-file' can only be set for images with an external data file".into(),
            });
        }
        image.data_file = Some(store);
    }
    if options.backing != BackingPolicy::Ignore {
        attach_files(
            &mut image,
            &canonical,
            options,
            chain,
            writable_depth,
            data_given,
        )?;
    }
    if options.writable {
        image.enable_writes(options)?;
    }
    Ok(image)
}

/// Opens the data file and the backing chain of `image` as the policy allows.
fn attach_files(
    image: &mut Image,
    canonical: &Path,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
    data_given: bool,
) -> Result<()> {
    // The image being attached to sits at depth `chain.len()`.
    let backing_writable = writable_depth == Some(chain.len() + 1);
    let needs_data_file = image.meta().header.has_external_data_file();
    if !data_given && (needs_data_file || image.data_file_name.is_some()) {
        let (data_name, data_path) = match (&options.data_file, image.data_file_name.clone()) {
            (Some(path), _) => (path.display().to_string(), path.clone()),
            (None, Some(name)) => {
                let path = permitted(image, "data", &name, options)?;
                (name, path)
            }
            (None, None) => {
                return Err(Error::Chain {
                    image: image.name.clone(),
                    role: "data",
                    file: String::new(),
                    problem: ChainProblem::Required,
                })
            }
        };
        let storage = open_locked(
            &data_path,
            options.writable,
            options,
            &image.name,
            &format!("the data file {data_name:?}"),
        )
        .map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::Chain {
                    image: image.name.clone(),
                    role: "data",
                    file: data_name.clone(),
                    problem: ChainProblem::Missing,
                }
            }
            e => e,
        })?;
        image.data_file = Some(storage);
    }
    let Some(backing_name) = image.backing_file_name() else {
        return Ok(());
    };
    let chain_error = |image: &Image, problem| Error::Chain {
        image: image.name.clone(),
        role: "backing",
        file: backing_name.clone(),
        problem,
    };
    if chain.len() + 1 > options.max_backing_depth {
        return Err(chain_error(
            image,
            ChainProblem::TooDeep {
                limit: options.max_backing_depth,
            },
        ));
    }
    if !resolver::is_plain_path(&backing_name) {
        return attach_resolved(
            image,
            canonical,
            &backing_name,
            options,
            chain,
            writable_depth,
        );
    }
    let backing_path = permitted(image, "backing", &backing_name, options)?;
    let backing_canonical = std::fs::canonicalize(&backing_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            return chain_error(image, ChainProblem::Missing);
        }
        Error::io(
            &image.name,
            format!("opening the backing file {backing_name:?}"),
            e,
        )
    })?;
    if backing_canonical == canonical || chain.contains(&backing_canonical) {
        return Err(chain_error(image, ChainProblem::Loop));
    }

    let is_qcow2 = match backing_format(image, options)? {
        Some(is_qcow2) => is_qcow2,
        None => open_file(&backing_path, false)
            .and_then(|file| probe_is_qcow2(&*file))
            .map_err(|e| {
                Error::io(
                    &image.name,
                    format!("probing the backing file {backing_name:?}"),
                    e,
                )
            })?,
    };
    let backing = if is_qcow2 {
        chain.push(canonical.to_path_buf());
        let below_options = OpenOptions {
            writable: backing_writable,
            backing_format: None,
            keys: options.keys.get(1..).unwrap_or_default().to_vec(),
            ..options.clone()
        };
        let below = open_chain_writable_at(&backing_path, &below_options, chain, writable_depth);
        chain.pop();
        Backing::Qcow2(std::sync::Arc::new(below?))
    } else {
        let storage = open_locked(
            &backing_path,
            backing_writable,
            options,
            &image.name,
            &format!("the backing file {backing_name:?}"),
        )?;
        let size = storage
            .len()
            .map_err(|e| Error::io(&image.name, "reading the backing file length", e))?
            // QEMU sees a raw file in whole sectors; the tail of the last reads as zeros.
            .next_multiple_of(512);
        Backing::Raw { storage, size }
    };
    image.backing = Some(backing);
    Ok(())
}

/// The backing format the image's header records.
fn recorded_format(image: &Image) -> Option<String> {
    image
        .meta()
        .header
        .extensions
        .backing_format
        .as_ref()
        .map(|f| String::from_utf8_lossy(f).into_owned())
}

/// Whether the backing file is qcow2 (`Some(true)`), raw (`Some(false)`) or to be probed
/// (`None`): the caller's `backing.driver` wins over the format the header records.
fn backing_format(image: &Image, options: &OpenOptions) -> Result<Option<bool>> {
    let recorded = recorded_format(image);
    match options.backing_format.clone().or(recorded).as_deref() {
        Some("qcow2") => Ok(Some(true)),
        Some("raw") => Ok(Some(false)),
        Some(other) => Err(Error::Chain {
            image: image.name.clone(),
            role: "backing",
            file: image.backing_file_name().unwrap_or_default(),
            problem: ChainProblem::UnsupportedFormat(other.to_string()),
        }),
        None => Ok(None),
    }
}

/// Attaches the backing file a name that is not a path describes, built by the caller's
/// resolver from files the policy allows.
fn attach_resolved(
    image: &mut Image,
    canonical: &Path,
    backing_name: &str,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
) -> Result<()> {
    let recorded = recorded_format(image);
    let below = OpenOptions {
        writable: writable_depth == Some(chain.len() + 1),
        backing_format: None,
        keys: options.keys.get(1..).unwrap_or_default().to_vec(),
        ..options.clone()
    };
    chain.push(canonical.to_path_buf());
    let backing = open_resolved(
        &image.name,
        backing_name,
        options.backing_format.clone(),
        recorded,
        &below,
        chain,
        writable_depth,
    );
    chain.pop();
    image.backing = Some(backing?);
    Ok(())
}

/// Opens the backing file `backing_name` (not a path) of the image `above` with the caller's
/// resolver; `below` are the options it opens with. Its format is the caller's `chosen` one,
/// else the one the name gives, else the one the header `recorded`, else a probe. `chain`
/// holds the images above, the one it backs included.
pub(crate) fn open_resolved(
    above: &str,
    backing_name: &str,
    chosen: Option<String>,
    recorded: Option<String>,
    below: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    writable_depth: Option<usize>,
) -> Result<Backing> {
    let chain_error = |problem| Error::Chain {
        image: above.to_string(),
        role: "backing",
        file: backing_name.to_string(),
        problem,
    };
    let Some(resolver) = below.backing_resolver.clone() else {
        return Err(chain_error(ChainProblem::NoResolver));
    };
    let mut request = BackingRequest::new(above, backing_name, below, below.writable);
    let resolved = resolver.resolve(&mut request)?;
    let opened = request.opened().to_vec();
    if opened.iter().any(|p| chain.contains(p)) {
        return Err(chain_error(ChainProblem::Loop));
    }
    let format = chosen.or(resolved.format).or(recorded);
    let is_qcow2 = match format.as_deref() {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(chain_error(ChainProblem::UnsupportedFormat(
                other.to_string(),
            )))
        }
        None => probe_is_qcow2(&*resolved.storage).map_err(|e| {
            Error::io(
                above,
                format!("probing the backing file {backing_name:?}"),
                e,
            )
        })?,
    };
    let storage = resolved.storage;
    // Only a file the gate opened may stand for the image.
    let path = resolved
        .path
        .filter(|p| std::fs::canonicalize(p).is_ok_and(|real| opened.first() == Some(&real)));
    Ok(if is_qcow2 {
        // Without a path of its own the image's names have no directory to resolve against
        // (QEMU refuses relative names under a json: name too); it is known by the first file
        // it was built on.
        let layer = Layer {
            storage,
            name: path
                .as_ref()
                .map_or_else(|| backing_name.to_string(), |p| p.display().to_string()),
            path,
            canonical: opened
                .first()
                .cloned()
                .unwrap_or_else(|| PathBuf::from(backing_name)),
        };
        let image = open_layer(layer, below, chain, writable_depth, None)?;
        Backing::Qcow2(std::sync::Arc::new(image))
    } else {
        let size = storage
            .len()
            .map_err(|e| Error::io(above, "reading the backing file length", e))?
            // QEMU sees a raw file in whole sectors.
            .next_multiple_of(512);
        Backing::Raw { storage, size }
    })
}

/// Resolves a name from the image and checks it against the policy.
fn permitted(
    image: &Image,
    role: &'static str,
    name: &str,
    options: &OpenOptions,
) -> Result<PathBuf> {
    let base = image.path.as_deref();
    let path = match base {
        Some(base) => resolve_relative(base, name),
        // Without a directory only an absolute name means one file.
        None if Path::new(name).is_absolute() => PathBuf::from(name),
        None => {
            return Err(Error::Chain {
                image: image.name.clone(),
                role,
                file: name.to_string(),
                problem: ChainProblem::NoDirectory,
            })
        }
    };
    resolver::check_policy(&image.name, role, name, &path, options)?;
    Ok(path)
}

fn probe_is_qcow2(storage: &dyn Storage) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let n = storage.read_at(&mut magic, 0)?;
    Ok(n == 4 && u32::from_be_bytes(magic) == QCOW_MAGIC)
}

impl Image {
    /// Reads guest bytes of an unallocated range from the backing chain; zeros where there is no
    /// backing file or past its end.
    pub(crate) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.read(&self.name, buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

impl Backing {
    /// Reads guest bytes at `offset`; past the end they read as zeros. `above` names the image
    /// this one backs, for messages.
    pub(crate) fn read(&self, above: &str, buf: &mut [u8], offset: u64) -> Result<()> {
        let backing = self;
        let size = backing.size();
        let available = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past_end) = buf.split_at_mut(available);
        past_end.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match backing {
            Backing::Qcow2(image) => {
                let m = image.meta();
                image.read_layer(&m, m.active(), inside, offset)
            }
            Backing::Raw { storage, .. } => {
                use crate::storage::StorageExt;
                storage
                    .read_zero_filled_at(inside, offset)
                    .map_err(|e| Error::io(above, "reading the raw backing file", e))
            }
        }
    }
}
