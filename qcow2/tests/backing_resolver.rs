//! Backing names that are not paths (`json:{...}`): the library refuses them unless the caller
//! gives a resolver, and a resolver's host files are still subject to the backing policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{
    BackingPolicy, BackingRequest, BackingResolver, ChainProblem, CreateOptions, Error,
    FileStorage, Image, OpenOptions, ResolvedBacking,
};
use qcow2_testdata::scratch_dir;

const SIZE: u64 = 1 << 20;

/// A resolver for names `json:FILE`: the qcow2 image in FILE, opened through the gate.
#[derive(Debug)]
struct PlainFile;

impl BackingResolver for PlainFile {
    fn resolve(&self, request: &mut BackingRequest<'_>) -> qcow2::Result<ResolvedBacking> {
        let file = request.name()["json:".len()..].to_string();
        let storage = request.open_file(&file)?;
        Ok(ResolvedBacking::new(storage, Some("qcow2".into())))
    }
}

/// A base holding 0x5a in its first 64 KiB and an overlay naming it by `backing_name`.
fn base_and_overlay(dir: &Path, backing_name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let image = Image::create(&base, &CreateOptions::new(SIZE)).unwrap();
    image.write_at(&[0x5a; 65536], 0).unwrap();
    image.close().unwrap();
    let top = dir.join("top.qcow2");
    overlay_naming(&top, backing_name);
    (base, top)
}

/// A new qcow2 image at `path` whose header names the qcow2 backing file `backing_name`,
/// recorded, not opened: `Image::create` would open the chain without a resolver.
fn overlay_naming(path: &Path, backing_name: &str) {
    let options = CreateOptions::new(SIZE)
        .backing_file(Some(backing_name.to_string()))
        .backing_format(Some("qcow2".into()));
    let storage = FileStorage::create_new(path).unwrap();
    Image::create_in(Box::new(storage), "overlay", &options)
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_json_backing_name_without_a_resolver_is_refused_naming_image_and_name() {
    let dir = scratch_dir("json_backing_no_resolver");
    let name = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'base.qcow2'}}";
    let (_, top) = base_and_overlay(&dir, name);
    let err = Image::open(&top, &OpenOptions::new()).unwrap_err();
    let message = err.to_string();
    match &err {
        Error::Chain {
            image,
            role: "backing",
            file,
            problem: ChainProblem::NoResolver,
        } => {
            assert_eq!(Path::new(image), top, "{message}");
            assert_eq!(file, name, "{message}");
        }
        other => panic!("expected a refusal for want of a resolver, got {other:?}"),
    }
    assert!(
        message.contains("top.qcow2") && message.contains(name),
        "{message}"
    );
    // The image alone still opens.
    assert!(Image::open(&top, &OpenOptions::metadata_only()).is_ok());
}

#[test]
fn a_resolved_backing_reads_through_and_its_files_obey_the_policy() {
    let dir = scratch_dir("json_backing_policy");
    let elsewhere = scratch_dir("json_backing_policy_elsewhere");
    let base = elsewhere.join("base.qcow2");
    let name = format!("json:{}", base.display());
    let (_, top) = base_and_overlay(&dir, &name);
    // `base_and_overlay` made its base beside the overlay; the name points at another one.
    std::fs::rename(dir.join("base.qcow2"), &base).unwrap();
    let resolver: Arc<dyn BackingResolver> = Arc::new(PlainFile);

    let follow = OpenOptions::new().backing_resolver(Some(resolver.clone()));
    let image = Image::open(&top, &follow).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    drop(image);

    for policy in [
        BackingPolicy::Refuse,
        BackingPolicy::AllowDirs(vec![dir.clone()]),
    ] {
        let options = follow.clone().backing(policy.clone());
        let err = Image::open(&top, &options).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Chain {
                    problem: ChainProblem::RefusedByPolicy,
                    ..
                }
            ),
            "{policy:?}: {err:?}"
        );
    }
    let inside = follow.backing(BackingPolicy::AllowDirs(vec![elsewhere.clone()]));
    assert!(Image::open(&top, &inside).is_ok());
}

/// A resolver that says which file the image is; `claimed` may lie.
#[derive(Debug)]
struct Claiming {
    file: PathBuf,
    claimed: PathBuf,
}

impl BackingResolver for Claiming {
    fn resolve(&self, request: &mut BackingRequest<'_>) -> qcow2::Result<ResolvedBacking> {
        let storage = request.open_file(self.file.to_str().unwrap())?;
        Ok(ResolvedBacking::new(storage, Some("qcow2".into())).path(Some(self.claimed.clone())))
    }
}

#[test]
fn a_resolved_image_goes_by_its_path_only_when_that_is_the_file_opened() {
    let dir = scratch_dir("json_backing_claimed_path");
    let (base, _) = base_and_overlay(&dir, "json:whatever");
    // `mid` sits over `base` by a relative name, and `top` over `mid` by a json: name.
    let mid = dir.join("mid.qcow2");
    let options = CreateOptions::new(SIZE)
        .backing_file(Some("base.qcow2".into()))
        .backing_format(Some("qcow2".into()));
    Image::create(&mid, &options).unwrap().close().unwrap();
    let top = dir.join("top2.qcow2");
    overlay_naming(&top, "json:mid");

    let open = |claimed: &Path| {
        let resolver = Claiming {
            file: mid.clone(),
            claimed: claimed.to_path_buf(),
        };
        let options = OpenOptions::new().backing_resolver(Some(Arc::new(resolver)));
        Image::open(&top, &options)
    };
    let image = open(&mid).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    drop(image);
    // A path that is not the file opened is not believed: the relative name has no directory.
    let err = open(&base).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Chain {
                problem: ChainProblem::NoDirectory,
                ..
            }
        ),
        "{err:?}"
    );
}

/// `Image::create` opens the new image with its chain and so refuses a `json:` backing name it
/// cannot resolve (leaving no file); `Image::create_with` takes the resolver and the image reads
/// through it at once.
#[test]
fn create_with_a_resolver_opens_a_json_backing() {
    let dir = scratch_dir("json_backing_create_with");
    let base = dir.join("base.qcow2");
    let image = Image::create(&base, &CreateOptions::new(SIZE)).unwrap();
    image.write_at(&[0x5a; 65536], 0).unwrap();
    image.close().unwrap();
    let top = dir.join("top.qcow2");
    let options = CreateOptions::new(SIZE)
        .backing_file(Some(format!("json:{}", base.display())))
        .backing_format(Some("qcow2".into()));
    let err = Image::create(&top, &options).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Chain {
                problem: ChainProblem::NoResolver,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!top.exists(), "the refused create left its file");
    let open = OpenOptions::new().backing_resolver(Some(Arc::new(PlainFile)));
    let image = Image::create_with(&top, &options, &open).unwrap();
    assert!(image.is_writable());
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    image.write_at(&[1; 512], 0).unwrap();
    image.close().unwrap();
}
