//! Image creation with qemu-img's options, laid out the way qemu-img lays out a new image: header
//! cluster, refcount table, refcount blocks, then the L1 table (the file ends right after the L1
//! entries).

use std::path::Path;

use crate::crypto::luks::Luks;
use crate::crypto::Secret;
use crate::error::{Error, Result};
use crate::format::extension::Extensions;
use crate::format::features::{Compatible, Incompatible};
use crate::format::header::CompressionType;
use crate::format::limits::*;
use crate::format::{refcount, Header};
use crate::image::{Image, NewEncryption, OpenOptions};
use crate::storage::{FileStorage, Storage};

/// How much to allocate up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: clusters are allocated on first write.
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated (the data reads as zeros).
    Metadata,
    /// As `Metadata`, and the host file's blocks for the data are reserved (`fallocate`).
    Falloc,
    /// As `Metadata`, and zeros are written over the data clusters.
    Full,
}

/// qemu-img's create options for qcow2: [`CreateOptions::new`] with the virtual size, then
/// chained setters for the rest. The defaults are qemu-img's: 64 KiB clusters, 16-bit
/// refcounts, version 3, zlib, no backing file, no preallocation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateOptions {
    /// The virtual disk size in bytes, at most [`MAX_VIRTUAL_SIZE`](crate::format::limits::MAX_VIRTUAL_SIZE).
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB (`cluster_size=`).
    pub cluster_size: u64,
    /// Refcount width in bits: a power of two up to 64; only 16 for version 2
    /// (`refcount_bits=`).
    pub refcount_bits: u32,
    /// 2 for compat=0.10, 3 for compat=1.1.
    pub version: u32,
    /// Set the lazy refcounts compatible bit (`lazy_refcounts=on`, version 3 only).
    pub lazy_refcounts: bool,
    /// Extended L2 entries with 32 subclusters per cluster (`extended_l2=on`, version 3
    /// only, clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// How compressed clusters are encoded (`compression_type=`); zstd needs version 3.
    pub compression_type: CompressionType,
    /// The backing file name recorded in the header, relative to the new image's directory
    /// unless absolute (`-b`). [`Image::create`] opens the new image with its chain, so the file
    /// must be there (and a `json:` name needs [`Image::create_with`] and a resolver);
    /// [`Image::create_in`] only records it, as `qemu-img create -u` does.
    pub backing_file: Option<String>,
    /// The backing file's format recorded with its name (`-F`: "qcow2" or "raw").
    pub backing_format: Option<String>,
    /// How much to allocate up front.
    pub preallocation: Preallocation,
    /// External data file name (guest data lives there at its guest offsets).
    pub data_file: Option<String>,
    /// The data file is a valid raw image by itself: every cluster is mapped up front.
    pub data_file_raw: bool,
    /// Encrypt the image (`encrypt.format=luks` or `aes` with `encrypt.key-secret`).
    pub encryption: Option<NewEncryption>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            refcount_bits: 16,
            version: 3,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }
}

setters!(CreateOptions {
    size: u64,
    cluster_size: u64,
    refcount_bits: u32,
    version: u32,
    lazy_refcounts: bool,
    extended_l2: bool,
    compression_type: CompressionType,
    backing_file: Option<String>,
    backing_format: Option<String>,
    preallocation: Preallocation,
    data_file: Option<String>,
    data_file_raw: bool,
    encryption: Option<NewEncryption>,
});

impl CreateOptions {
    /// qemu-img's defaults for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Self::default()
        }
    }

    /// What the new image preallocates: a raw data file needs every cluster mapped (its
    /// guest offset) up front, as QEMU maps it.
    fn create_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// Checks the options as qemu-img does, before anything is written.
    fn validate(&self, image: &str) -> Result<u32> {
        let invalid = |reason: String| Error::InvalidArgument {
            image: image.to_string(),
            reason,
        };
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
        {
            return Err(invalid(format!(
                "cluster size {cs} must be a power of two between 512 and 2 MiB"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(invalid(format!(
                "refcount width {} must be a power of two up to 64",
                self.refcount_bits
            )));
        }
        if self.version != 2 && self.version != 3 {
            return Err(invalid(format!(
                "compat level for version {} does not exist",
                self.version
            )));
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return Err(invalid("compat=0.10 supports only 16-bit refcounts".into()));
            }
            if self.lazy_refcounts {
                return Err(invalid("lazy refcounts need compat=1.1".into()));
            }
            if self.extended_l2 {
                return Err(invalid("extended L2 entries need compat=1.1".into()));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(invalid("zstd compression needs compat=1.1".into()));
            }
        }
        if self.extended_l2 && cs < 1 << MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(invalid(format!(
                "extended L2 entries need clusters of 16 KiB or more, not {cs} bytes"
            )));
        }
        if self.size > MAX_VIRTUAL_SIZE
            || self.size % 512 != 0 && self.size > MAX_VIRTUAL_SIZE - 512
        {
            return Err(invalid(format!("virtual size {} is too large", self.size)));
        }
        if let Some(b) = &self.backing_file {
            if b.len() as u32 > MAX_BACKING_FILE_NAME {
                return Err(invalid(
                    "the backing file name is longer than 1023 bytes".into(),
                ));
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(invalid("data-file-raw requires data-file".into()));
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(invalid("external data files need compat=1.1".into()));
        }
        if self.encryption.is_some() && self.data_file.is_some() {
            return Err(invalid(
                "encryption with an external data file is not supported".into(),
            ));
        }
        if let Some(f) = &self.backing_format {
            if f != "qcow2" && f != "raw" {
                return Err(invalid(format!("backing format {f:?} is not supported")));
            }
        }
        Ok(cs.trailing_zeros())
    }

    /// The header and the first clusters of a new image; `crypto_len` bytes of clusters after
    /// the L1 table hold the LUKS header (zeros here, filled once the file exists).
    fn layout(&self, cluster_bits: u32, crypto_len: u64) -> Result<(Header, Vec<u8>)> {
        let cs = 1u64 << cluster_bits;
        let order = self.refcount_bits.trailing_zeros();
        let mut incompatible = 0;
        if self.extended_l2 {
            incompatible |= Incompatible::EXTENDED_L2;
        }
        if self.compression_type == CompressionType::Zstd {
            incompatible |= Incompatible::COMPRESSION_TYPE;
        }
        if self.data_file.is_some() {
            incompatible |= Incompatible::EXTERNAL_DATA_FILE;
        }
        let mut header = Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size: self.size,
            crypt_method: self.encryption.as_ref().map_or(0, NewEncryption::method),
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                Compatible::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                crate::format::features::Autoclear::RAW_EXTERNAL_DATA
            } else {
                0
            },
            refcount_order: order,
            header_length: if self.version >= 3 {
                V3_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            },
            compression_type: self.compression_type,
            unknown_header_bytes: Vec::new(),
            extensions: Extensions {
                backing_format: self.backing_format.as_ref().map(|f| f.as_bytes().to_vec()),
                data_file: self.data_file.as_ref().map(|f| f.as_bytes().to_vec()),
                ..Extensions::default()
            },
            backing_file: self.backing_file.as_ref().map(|b| b.as_bytes().to_vec()),
        };
        let l1_entries = header.l1_entries_for(self.size);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(Error::InvalidArgument {
                image: String::new(),
                reason: format!(
                    "virtual size {} needs an L1 table larger than 32 MiB",
                    self.size
                ),
            });
        }
        // An empty disk has an empty L1 table that takes no cluster (nothing would count it).
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let crypto_clusters = crypto_len.div_ceil(cs);
        // Refcount table and blocks must cover themselves, the header, the L1 table and the
        // LUKS area.
        let per_block = refcount::entries_per_block(cluster_bits, order);
        let (mut reftable_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + reftable_clusters + blocks + l1_clusters + crypto_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_table == reftable_clusters {
                break;
            }
            blocks = need_blocks;
            reftable_clusters = need_table;
        }
        let reftable_offset = cs;
        let blocks_offset = reftable_offset + reftable_clusters * cs;
        let l1_offset = blocks_offset + blocks * cs;
        header.refcount_table_clusters = reftable_clusters as u32;
        // An empty L1 table sits at offset 0, as qemu-img writes it.
        header.l1_table_offset = if l1_entries == 0 { 0 } else { l1_offset };
        header.l1_size = l1_entries as u32;
        let crypto_offset = l1_offset + l1_clusters * cs;
        if crypto_len > 0 {
            header.extensions.crypto = Some(crate::format::extension::CryptoHeaderExtension {
                offset: crypto_offset,
                length: crypto_len,
            });
        }

        let used = 1 + reftable_clusters + blocks + l1_clusters + crypto_clusters;
        let mut file_len = l1_offset + (l1_entries * 8).max(if l1_entries == 0 { 0 } else { 8 });
        if crypto_len > 0 {
            file_len = crypto_offset + crypto_clusters * cs;
        }
        let mut bytes = vec![0u8; file_len.max(l1_offset) as usize];
        let head = header.encode().map_err(|e| Error::from_format("", e))?;
        bytes[..head.len()].copy_from_slice(&head);
        for b in 0..blocks {
            let at = (reftable_offset + b * 8) as usize;
            bytes[at..at + 8].copy_from_slice(&(blocks_offset + b * cs).to_be_bytes());
        }
        for k in 0..used {
            let block = (blocks_offset + (k / per_block) * cs) as usize;
            refcount::set(
                &mut bytes[block..block + cs as usize],
                (k % per_block) as usize,
                order,
                1,
            );
        }
        Ok((header, bytes))
    }
}

/// A new image's LUKS header, before its area exists: the header, the master key, and the
/// password for slot 0 with its iteration time.
struct NewLuks {
    luks: Luks,
    master: crate::crypto::luks::MasterKey,
    password: Secret,
    iter_time_ms: u64,
}

impl NewLuks {
    fn prepare(options: &CreateOptions, name: &str) -> Result<Option<NewLuks>> {
        let Some(NewEncryption::Luks { password, params }) = &options.encryption else {
            return Ok(None);
        };
        let (luks, master) = Luks::create(params).map_err(|e| Error::crypto(name, e))?;
        Ok(Some(NewLuks {
            luks,
            master,
            password: password.clone(),
            iter_time_ms: params.iter_time_ms,
        }))
    }

    fn area_len(this: &Option<NewLuks>) -> u64 {
        this.as_ref().map_or(0, |l| l.luks.area_len())
    }

    /// Fills key slot 0 and writes the header into the zeroed area the layout reserved.
    fn write(self, storage: &dyn Storage, header: &Header, name: &str) -> Result<()> {
        let ext = header
            .extensions
            .crypto
            .expect("the layout reserves the LUKS area");
        let mut luks = self.luks;
        let area = crate::image::encryption::Area { storage, ext };
        luks.store_key(&area, 0, &self.password, &self.master, self.iter_time_ms)
            .map_err(|e| Error::crypto(name, e))
    }
}

/// The key a new encrypted image opens with.
fn open_keys(options: &CreateOptions) -> Vec<Option<Secret>> {
    match &options.encryption {
        Some(NewEncryption::Luks { password, .. } | NewEncryption::Aes { password }) => {
            vec![Some(password.clone())]
        }
        None => Vec::new(),
    }
}

impl Image {
    /// Creates a new image at `path` (which must not exist) and opens it for writing.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<Image> {
        Self::create_with(path, options, &OpenOptions::default())
    }

    /// As [`Image::create`], opening the new image with `open`'s choices for what lies below it
    /// (backing policy and resolver, data file, cache): for a backing name only a
    /// [`BackingResolver`](crate::BackingResolver) understands (`json:{...}`), say. The image
    /// always opens for writing; its password is the one `options` encrypts it with unless
    /// `open` gives keys.
    pub fn create_with(
        path: impl AsRef<Path>,
        options: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let cluster_bits = options.validate(&name)?;
        let luks = NewLuks::prepare(options, &name)?;
        let (header, bytes) = options
            .layout(cluster_bits, NewLuks::area_len(&luks))
            .map_err(|e| rename(e, &name))?;
        let mut storage =
            FileStorage::create_new(path).map_err(|e| Error::io(&name, "creating the image", e))?;
        // A create that fails leaves nothing behind, as qemu-img's does.
        let mut made = RemoveUnlessKept(Some(path));
        // Locked before the first byte is written, like every other write path.
        if let Err(detail) = storage
            .lock_image(true)
            .map_err(|e| Error::io(&name, "locking the new image", e))?
        {
            return Err(Error::Locked {
                image: name.clone(),
                detail,
            });
        }
        storage
            .write_at(&bytes, 0)
            .map_err(|e| Error::io(&name, "writing the new image", e))?;
        if let Some(luks) = luks {
            luks.write(&storage, &header, &name)?;
        }
        storage
            .flush()
            .map_err(|e| Error::io(&name, "writing the new image", e))?;
        drop(storage);
        let keys = if open.keys.is_empty() {
            open_keys(options)
        } else {
            open.keys.clone()
        };
        let image = Image::open(
            path,
            &OpenOptions {
                writable: true,
                keys,
                ..open.clone()
            },
        )?;
        image.preallocate(0, options.size, options.create_preallocation())?;
        made.0 = None;
        Ok(image)
    }

    /// Creates a new image in `storage` (which must be empty) and opens it for writing. A backing
    /// file is recorded but not opened (there is no directory to resolve it against).
    pub fn create_in(
        storage: Box<dyn Storage>,
        name: &str,
        options: &CreateOptions,
    ) -> Result<Image> {
        let cluster_bits = options.validate(name)?;
        let luks = NewLuks::prepare(options, name)?;
        let (header, bytes) = options
            .layout(cluster_bits, NewLuks::area_len(&luks))
            .map_err(|e| rename(e, name))?;
        storage
            .write_at(&bytes, 0)
            .map_err(|e| Error::io(name, "writing the new image", e))?;
        if let Some(luks) = luks {
            luks.write(&*storage, &header, name)?;
        }
        storage
            .flush()
            .map_err(|e| Error::io(name, "writing the new image", e))?;
        let image = Image::from_storage(
            storage,
            name,
            &OpenOptions {
                writable: true,
                backing: crate::image::BackingPolicy::Ignore,
                keys: open_keys(options),
                ..OpenOptions::default()
            },
        )?;
        image.preallocate(0, options.size, options.create_preallocation())?;
        Ok(image)
    }
}

fn rename(e: Error, name: &str) -> Error {
    match e {
        Error::InvalidArgument { reason, .. } => Error::InvalidArgument {
            image: name.to_string(),
            reason,
        },
        other => other,
    }
}

/// Removes the file it names when dropped, unless its name is taken back first.
struct RemoveUnlessKept<'a>(Option<&'a Path>);

impl Drop for RemoveUnlessKept<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
