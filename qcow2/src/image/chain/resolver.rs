//! Backing names that are not file paths (`json:{...}` descriptions of a node graph). The library
//! does not interpret them: a caller that does supplies a [`BackingResolver`], which builds the
//! storage below the image. Every host file it needs is opened through [`BackingRequest`], so
//! the caller's [`BackingPolicy`](crate::BackingPolicy) still decides which files an untrusted
//! image may make the library open.

use std::path::{Path, PathBuf};

use crate::error::{ChainProblem, Error, Result};
use crate::image::{open_locked, OpenOptions};
use crate::storage::Storage;

/// Opens what a backing name that is not a file path describes.
pub trait BackingResolver: Send + Sync + std::fmt::Debug {
    /// Builds the storage under the backing image `request.name()`. Host files are opened only
    /// through [`BackingRequest::open_file`]; a name the resolver does not accept is refused
    /// with [`BackingRequest::refuse`].
    fn resolve(&self, request: &mut BackingRequest<'_>) -> Result<ResolvedBacking>;
}

/// What a [`BackingResolver`] found below an image.
#[non_exhaustive]
pub struct ResolvedBacking {
    /// The bytes the backing image's format reads (a file, or nodes over files).
    pub storage: Box<dyn Storage>,
    /// "qcow2" or "raw" when the name says; otherwise the recorded format or a probe decides.
    pub format: Option<String>,
    /// The host file the storage is, when the name describes nothing but that file (opened
    /// through [`BackingRequest::open_file`]): the image then goes by that path, and its own
    /// relative names resolve against its directory, as QEMU simplifies such a name.
    pub path: Option<PathBuf>,
}

/// A backing name handed to a [`BackingResolver`], with the gate its host files open through.
#[derive(Debug)]
pub struct BackingRequest<'a> {
    image: &'a str,
    name: &'a str,
    options: &'a OpenOptions,
    writable: bool,
    opened: Vec<PathBuf>,
}

impl ResolvedBacking {
    /// The storage below the image, in `format` ("qcow2" or "raw") when the name says.
    pub fn new(storage: Box<dyn Storage>, format: Option<String>) -> ResolvedBacking {
        ResolvedBacking {
            storage,
            format,
            path: None,
        }
    }

    /// Sets [`path`](ResolvedBacking#structfield.path).
    #[must_use]
    pub fn path(mut self, path: Option<PathBuf>) -> ResolvedBacking {
        self.path = path;
        self
    }
}

impl std::fmt::Debug for ResolvedBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedBacking")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Whether the library resolves `name` as a file path; other names go to the resolver.
pub(crate) fn is_plain_path(name: &str) -> bool {
    !name.starts_with("json:")
}

impl<'a> BackingRequest<'a> {
    /// A request for the backing name `name` of the image `image`, opened with `options`
    /// (whose policy governs the files opened), for writing when `writable`.
    pub fn new(
        image: &'a str,
        name: &'a str,
        options: &'a OpenOptions,
        writable: bool,
    ) -> BackingRequest<'a> {
        BackingRequest {
            image,
            name,
            options,
            writable,
            opened: Vec::new(),
        }
    }

    /// The image that names the backing file.
    pub fn image(&self) -> &str {
        self.image
    }

    /// The backing name as the image records it.
    pub fn name(&self) -> &str {
        self.name
    }

    /// Whether the backing file is opened for writing (the base of a commit).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The canonical paths of the host files opened so far.
    pub fn opened(&self) -> &[PathBuf] {
        &self.opened
    }

    /// The error refusing this name for `problem`.
    pub fn refuse(&self, problem: ChainProblem) -> Error {
        Error::Chain {
            image: self.image.to_string(),
            role: "backing",
            file: self.name.to_string(),
            problem,
        }
    }

    /// Opens the host file `filename` if the policy allows it, locked as the image's own files
    /// are. A relative name resolves against the working directory, as QEMU's file node does.
    pub fn open_file(&mut self, filename: &str) -> Result<Box<dyn Storage>> {
        let path = Path::new(filename);
        check_policy(self.image, "backing", filename, path, self.options)?;
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                return Error::Chain {
                    image: self.image.to_string(),
                    role: "backing",
                    file: filename.to_string(),
                    problem: ChainProblem::Missing,
                };
            }
            Error::io(self.image, format!("resolving {filename:?}"), e)
        })?;
        let storage = open_locked(
            path,
            self.writable,
            self.options,
            self.image,
            &format!("the backing file {filename:?}"),
        )?;
        self.opened.push(canonical);
        Ok(storage)
    }
}

/// Checks the path `path` (named `name` by the image) against the policy, and refuses what is
/// not a regular file or block device.
pub(crate) fn check_policy(
    image: &str,
    role: &'static str,
    name: &str,
    path: &Path,
    options: &OpenOptions,
) -> Result<()> {
    let chain_error = |problem| Error::Chain {
        image: image.to_string(),
        role,
        file: name.to_string(),
        problem,
    };
    match &options.backing {
        crate::BackingPolicy::Follow => {}
        crate::BackingPolicy::Refuse | crate::BackingPolicy::Ignore => {
            return Err(chain_error(ChainProblem::RefusedByPolicy))
        }
        crate::BackingPolicy::AllowDirs(dirs) => {
            let real = std::fs::canonicalize(path)
                .map_err(|_| chain_error(ChainProblem::RefusedByPolicy))?;
            let allowed = dirs
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .any(|d| real.starts_with(d));
            if !allowed {
                return Err(chain_error(ChainProblem::RefusedByPolicy));
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_fifo() {
            Some("FIFO")
        } else if t.is_char_device() {
            Some("character device")
        } else if t.is_socket() {
            Some("socket")
        } else if t.is_dir() {
            Some("directory")
        } else {
            None
        };
        if let Some(kind) = kind {
            return Err(chain_error(ChainProblem::NotAFile { kind }));
        }
    }
    Ok(())
}
