//! qcow2 creation options as `qemu-img create -o` and `qemu-img convert -o` take them: parsing
//! (QemuOpts syntax, with QEMU's messages), the `Formatting '...'` line, and validation in the
//! order qemu's qcow2 driver validates, so the first error reported is the one qemu-img reports.

use qcow2::format::CompressionType;
use qcow2::{CreateOptions, Preallocation};

/// create's refusal of a disk whose L1 table would exceed QEMU's limit (`measure` words it
/// without the format name, as qemu-img measure does).
pub const IMAGE_TOO_LARGE: &str =
    "The image size is too large for file format 'qcow2' (try using a larger cluster size)";

/// qemu's QCOW_MAX_L1_SIZE, in bytes.
const MAX_L1_BYTES: u64 = 0x0200_0000;
/// The largest image size qemu-img accepts.
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// A boolean option: its value and the text it was given as (qemu prints the text back).
#[derive(Debug, Clone)]
pub struct BoolOpt {
    pub value: bool,
    pub text: String,
}

/// The qcow2 options given with `-o`, as given (`None` = not given).
#[derive(Debug, Clone, Default)]
pub struct Qcow2Opts {
    pub size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub refcount_bits: Option<u64>,
    pub compat: Option<String>,
    pub lazy_refcounts: Option<BoolOpt>,
    pub extended_l2: Option<BoolOpt>,
    pub compression_type: Option<String>,
    pub preallocation: Option<String>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: Option<BoolOpt>,
    /// The file protocol's extent size hint: a hint for XFS's allocator, which this tool does
    /// not pass on (setting it needs an ioctl); accepted so option lists written for qemu-img
    /// still create the image.
    pub extent_size_hint: Option<u64>,
    /// `encryption=on` (the legacy AES format), as given.
    pub encryption: Option<BoolOpt>,
    /// The `encrypt.*` options, in the order given (`encrypt.` stripped).
    pub encrypt: Vec<(String, String)>,
}

/// qemu-img's `is_valid_option_list`: not empty, no leading comma, no unescaped trailing comma.
fn valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing % 2 == 0
}

/// Splits `k=v,k2=v2` into pairs; `,,` is a literal comma; a bare `k` means `k=on`.
fn split_pairs(list: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = list.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        let mut value = None::<String>;
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.peek() == Some(&'=') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                if c == ',' {
                    if chars.peek() == Some(&',') {
                        chars.next();
                        v.push(',');
                        continue;
                    }
                    break;
                }
                v.push(c);
            }
            value = Some(v);
        } else if chars.peek() == Some(&',') {
            chars.next();
        }
        pairs.push((key, value.unwrap_or_else(|| "on".to_string())));
    }
    pairs
}

/// qemu's `qemu_strtosz` for a QEMU_OPT_SIZE option.
pub(crate) fn parse_size_opt(name: &str, value: &str) -> Result<u64, String> {
    if value.trim_start().starts_with('-') {
        return Err(format!(
            "Value '{value}' is out of range for parameter '{name}'"
        ));
    }
    crate::size::parse_size(value).map_err(|_| {
        if !value.is_empty()
            && value.chars().all(|c| c.is_ascii_digit())
            && value.parse::<u64>().is_err()
        {
            format!("Value '{value}' is out of range for parameter '{name}'")
        } else {
            format!("Parameter '{name}' expects a non-negative number below 2^64\n{SIZE_HINT}")
        }
    })
}

/// qemu's QEMU_OPT_NUMBER parsing (`strtoull` with base 0: leading blanks skipped, a minus
/// sign negates modulo 2^64).
pub(crate) fn parse_number_opt(name: &str, value: &str) -> Result<u64, String> {
    let value = value.trim_start();
    if let Some(rest) = value.strip_prefix('-') {
        if !rest.starts_with(['-', '+', ' ']) {
            return parse_number_opt(name, rest).map(u64::wrapping_neg);
        }
    }
    let parsed = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()
    } else if value.len() > 1 && value.starts_with('0') {
        u64::from_str_radix(&value[1..], 8).ok()
    } else {
        value.parse().ok()
    };
    parsed.ok_or_else(|| format!("Parameter '{name}' expects a number"))
}

/// qapi_bool_parse.
pub(crate) fn parse_bool_opt(name: &str, value: &str) -> Result<BoolOpt, String> {
    let parsed = match value {
        "on" | "yes" | "true" | "y" => true,
        "off" | "no" | "false" | "n" => false,
        _ => return Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    };
    Ok(BoolOpt {
        value: parsed,
        text: value.to_string(),
    })
}

/// Parses the `-o` lists (joined with commas, as qemu-img joins repeated `-o`). Errors:
/// `Err((message, with_filename))` — qemu-img prefixes some with the image name.
pub fn parse(lists: &[String]) -> Result<Qcow2Opts, (String, bool)> {
    let mut opts = Qcow2Opts::default();
    for list in lists {
        if !valid_option_list(list) {
            return Err((format!("Invalid option list: {list}"), false));
        }
    }
    let joined = lists.join(",");
    let err = |m: String| (m, true);
    for (key, value) in split_pairs(&joined) {
        match key.as_str() {
            "size" => opts.size = Some(parse_size_opt("size", &value).map_err(err)?),
            "cluster_size" => {
                opts.cluster_size = Some(parse_size_opt("cluster_size", &value).map_err(err)?)
            }
            "refcount_bits" => {
                opts.refcount_bits = Some(parse_number_opt("refcount_bits", &value).map_err(err)?)
            }
            "compat" => opts.compat = Some(value),
            "lazy_refcounts" => {
                opts.lazy_refcounts = Some(parse_bool_opt("lazy_refcounts", &value).map_err(err)?)
            }
            "extended_l2" => {
                opts.extended_l2 = Some(parse_bool_opt("extended_l2", &value).map_err(err)?)
            }
            "compression_type" => opts.compression_type = Some(value),
            "preallocation" => opts.preallocation = Some(value),
            "backing_file" => opts.backing_file = Some(value),
            "backing_fmt" => opts.backing_fmt = Some(value),
            "data_file" => opts.data_file = Some(value),
            "data_file_raw" => {
                opts.data_file_raw = Some(parse_bool_opt("data_file_raw", &value).map_err(err)?)
            }
            "extent_size_hint" => {
                opts.extent_size_hint =
                    Some(parse_size_opt("extent_size_hint", &value).map_err(err)?)
            }
            "encryption" => {
                opts.encryption = Some(parse_bool_opt("encryption", &value).map_err(err)?)
            }
            "encrypt.format"
            | "encrypt.key-secret"
            | "encrypt.cipher-alg"
            | "encrypt.cipher-mode"
            | "encrypt.ivgen-alg"
            | "encrypt.ivgen-hash-alg"
            | "encrypt.hash-alg"
            | "encrypt.iter-time" => {
                let name = key.trim_start_matches("encrypt.").to_owned();
                opts.encrypt.retain(|(k, _)| *k != name);
                opts.encrypt.push((name, value));
            }
            "nocow" => {
                return Err(err(format!(
                    "Parameter '{key}' is not supported by qcow2-tool"
                )))
            }
            _ => return Err(err(format!("Invalid parameter '{key}'"))),
        }
    }
    Ok(opts)
}

/// The `-o` options of a raw image.
#[derive(Debug, Clone, Default)]
pub struct RawOpts {
    pub size: Option<u64>,
    pub preallocation: Option<String>,
}

/// How a raw file is preallocated (file-posix's modes; `metadata` has no meaning there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawPreallocation {
    Off,
    Falloc,
    Full,
}

impl RawOpts {
    /// The preallocation mode, checked as QEMU's file driver checks it (after the
    /// `Formatting` line; qemu-img puts the file name in front).
    pub fn preallocation(&self) -> Result<RawPreallocation, String> {
        match self.preallocation.as_deref() {
            None | Some("off") => Ok(RawPreallocation::Off),
            Some("falloc") => Ok(RawPreallocation::Falloc),
            Some("full") => Ok(RawPreallocation::Full),
            Some("metadata") => Err("Unsupported preallocation mode: metadata".into()),
            Some(other) => Err(format!("invalid parameter value: {other}")),
        }
    }

    /// The option part of the `Formatting '...', fmt=raw ...` line.
    pub fn formatting_fields(&self, size: u64) -> String {
        match &self.preallocation {
            Some(p) => format!("size={size} preallocation={p}"),
            None => format!("size={size}"),
        }
    }
}

/// The `-o` lists for a raw image: `size` and `preallocation` are known.
pub fn parse_raw(lists: &[String]) -> Result<RawOpts, (String, bool)> {
    for list in lists {
        if !valid_option_list(list) {
            return Err((format!("Invalid option list: {list}"), false));
        }
    }
    let mut opts = RawOpts::default();
    for (key, value) in split_pairs(&lists.join(",")) {
        match key.as_str() {
            "size" => opts.size = Some(parse_size_opt("size", &value).map_err(|m| (m, true))?),
            "preallocation" => opts.preallocation = Some(value),
            _ => return Err((format!("Invalid parameter '{key}'"), true)),
        }
    }
    Ok(opts)
}

/// A string option's value as qemu-img prints it in its option list: each comma doubled, the
/// way it would be written in `-o` (a `json:` backing name shows `,,` between its members).
fn escaped(value: &str) -> String {
    value.replace(',', ",,")
}

impl Qcow2Opts {
    /// The option part of qemu-img's `Formatting '...', fmt=qcow2 ...` line, in the order of
    /// qemu's qcow2 option list (those with defaults always, the others only when given).
    /// `size` is the size as given.
    pub fn formatting_fields(&self, size: u64) -> String {
        let mut f = Vec::new();
        if let Some(e) = &self.encryption {
            f.push(format!("encryption={}", e.text));
        }
        for name in [
            "format",
            "key-secret",
            "cipher-alg",
            "cipher-mode",
            "ivgen-alg",
            "ivgen-hash-alg",
            "hash-alg",
            "iter-time",
        ] {
            if let Some((_, v)) = self.encrypt.iter().find(|(k, _)| k == name) {
                f.push(format!("encrypt.{name}={}", escaped(v)));
            }
        }
        f.push(format!(
            "cluster_size={}",
            self.cluster_size.unwrap_or(65536)
        ));
        let text = |o: &Option<BoolOpt>| o.as_ref().map_or("off".to_string(), |b| b.text.clone());
        f.push(format!("extended_l2={}", text(&self.extended_l2)));
        if let Some(p) = &self.preallocation {
            f.push(format!("preallocation={p}"));
        }
        f.push(format!(
            "compression_type={}",
            self.compression_type.as_deref().unwrap_or("zlib")
        ));
        f.push(format!("size={size}"));
        if let Some(c) = &self.compat {
            f.push(format!("compat={c}"));
        }
        if let Some(b) = &self.backing_file {
            f.push(format!("backing_file={}", escaped(b)));
        }
        if let Some(b) = &self.backing_fmt {
            f.push(format!("backing_fmt={}", escaped(b)));
        }
        if let Some(d) = &self.data_file {
            f.push(format!("data_file={}", escaped(d)));
        }
        if let Some(r) = &self.data_file_raw {
            f.push(format!("data_file_raw={}", r.text));
        }
        f.push(format!("lazy_refcounts={}", text(&self.lazy_refcounts)));
        f.push(format!(
            "refcount_bits={}",
            // qemu prints the number back signed.
            self.refcount_bits.unwrap_or(16) as i64
        ));
        if let Some(hint) = self.extent_size_hint {
            f.push(format!("extent_size_hint={hint}"));
        }
        f.join(" ")
    }

    /// The library's options for an image of `size` bytes, checked in the order qemu's qcow2
    /// driver checks (enumerations first, then the combinations). Messages as qemu's.
    pub fn to_create_options(&self, size: u64) -> Result<CreateOptions, String> {
        // The file protocol checks its option first; the hint is a 32-bit field of XFS.
        if self
            .extent_size_hint
            .is_some_and(|h| h > u64::from(u32::MAX))
        {
            return Err("Extent size hint is too large".into());
        }
        let version = match self.compat.as_deref() {
            None | Some("1.1") | Some("v3") => 3,
            Some("0.10") | Some("v2") => 2,
            Some(other) => {
                return Err(format!(
                    "Parameter 'version' does not accept value '{other}'"
                ))
            }
        };
        let preallocation = match self.preallocation.as_deref() {
            None | Some("off") => Preallocation::Off,
            Some("metadata") => Preallocation::Metadata,
            Some("falloc") => Preallocation::Falloc,
            Some("full") => Preallocation::Full,
            Some(other) => {
                return Err(format!(
                    "Parameter 'preallocation' does not accept value '{other}'"
                ))
            }
        };
        let compression_type = match self.compression_type.as_deref() {
            None | Some("zlib") => CompressionType::Zlib,
            Some("zstd") => CompressionType::Zstd,
            Some(other) => {
                return Err(format!(
                    "Parameter 'compression-type' does not accept value '{other}'"
                ))
            }
        };
        let extended_l2 = self.extended_l2.as_ref().is_some_and(|b| b.value);
        let lazy_refcounts = self.lazy_refcounts.as_ref().is_some_and(|b| b.value);
        const V3_HINT: &str = "compatibility level 1.1 and above (use version=v3 or greater)";
        if extended_l2 && version < 3 {
            return Err(format!(
                "Extended L2 entries are only supported with {V3_HINT}"
            ));
        }
        let cluster_size = self.cluster_size.unwrap_or(65536);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err("Cluster size must be a power of two between 512 and 2048k".into());
        }
        if extended_l2 && cluster_size < 16384 {
            return Err(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            );
        }
        if self.backing_file.is_some() && preallocation != Preallocation::Off && !extended_l2 {
            return Err(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                    .into(),
            );
        }
        let data_file_raw = self.data_file_raw.as_ref().is_some_and(|b| b.value);
        if self.data_file.is_some() && version < 3 {
            return Err(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
                    .into(),
            );
        }
        if data_file_raw && self.data_file.is_none() {
            return Err("data-file-raw requires data-file".into());
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        if lazy_refcounts && version < 3 {
            return Err(format!("Lazy refcounts only supported with {V3_HINT}"));
        }
        let refcount_bits = self.refcount_bits.unwrap_or(16);
        if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        if version < 3 && refcount_bits != 16 {
            return Err(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
                    .into(),
            );
        }
        if compression_type != CompressionType::Zlib && version < 3 {
            return Err(format!(
                "Non-zlib compression type is only supported with {V3_HINT}"
            ));
        }
        // qemu rounds the size up to whole sectors.
        let size = size.div_ceil(512) * 512;
        let l2_entries = cluster_size / if extended_l2 { 16 } else { 8 };
        let l1_entries = size.div_ceil(cluster_size * l2_entries);
        if l1_entries > MAX_L1_BYTES / 8 {
            return Err(IMAGE_TOO_LARGE.into());
        }
        let encryption = self.encryption_options()?;
        Ok(CreateOptions::new(size)
            .encryption(encryption)
            .cluster_size(cluster_size)
            .refcount_bits(refcount_bits as u32)
            .version(version)
            .lazy_refcounts(lazy_refcounts)
            .extended_l2(extended_l2)
            .compression_type(compression_type)
            .backing_file(self.backing_file.clone())
            .backing_format(self.backing_fmt.clone())
            .preallocation(preallocation)
            .data_file(self.data_file.clone())
            .data_file_raw(data_file_raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(list: &str) -> Result<Qcow2Opts, (String, bool)> {
        parse(&[list.to_string()])
    }

    #[test]
    fn option_lists_split_like_qemu_opts() {
        assert_eq!(
            split_pairs("a=1,b,c=x,,y"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "on".into()),
                ("c".into(), "x,y".into())
            ]
        );
        assert!(!valid_option_list("a=1,"));
        assert!(valid_option_list("a=1,,"));
        assert!(!valid_option_list(",a=1"));
        assert!(!valid_option_list(""));
    }

    #[test]
    fn values_parse_with_qemu_messages() {
        let o = one("cluster_size=4k,refcount_bits=8,lazy_refcounts=yes,compat=v2").unwrap();
        assert_eq!(o.cluster_size, Some(4096));
        assert_eq!(o.refcount_bits, Some(8));
        assert_eq!(o.lazy_refcounts.unwrap().text, "yes");
        assert_eq!(one("foo=bar").unwrap_err().0, "Invalid parameter 'foo'");
        assert_eq!(
            one("lazy_refcounts=maybe").unwrap_err().0,
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            one("refcount_bits=-1").map(|o| o.refcount_bits),
            Ok(Some(u64::MAX))
        );
        assert_eq!(
            one("refcount_bits=abc").unwrap_err().0,
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(
            one("cluster_size=-1").unwrap_err().0,
            "Value '-1' is out of range for parameter 'cluster_size'"
        );
        assert!(one("cluster_size=abc")
            .unwrap_err()
            .0
            .starts_with("Parameter 'cluster_size' expects a non-negative number"));
    }

    #[test]
    fn formatting_fields_follow_qemu_order() {
        let o = Qcow2Opts::default();
        assert_eq!(
            o.formatting_fields(1 << 30),
            "cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        let o = one("preallocation=metadata,compat=1.1,extended_l2=on,compression_type=zstd,backing_file=b,backing_fmt=raw")
            .unwrap();
        assert_eq!(
            o.formatting_fields(512),
            "cluster_size=65536 extended_l2=on preallocation=metadata compression_type=zstd size=512 compat=1.1 backing_file=b backing_fmt=raw lazy_refcounts=off refcount_bits=16"
        );
    }

    #[test]
    fn validation_reports_the_first_problem_qemu_reports() {
        let err = |list: &str| one(list).unwrap().to_create_options(1 << 20).unwrap_err();
        assert!(err("compat=0.10,extended_l2=on,cluster_size=3000").starts_with("Extended L2"));
        assert!(err("cluster_size=3000").starts_with("Cluster size"));
        assert!(err("compat=0.10,refcount_bits=3,lazy_refcounts=on").starts_with("Lazy"));
        assert!(err("compat=0.10,refcount_bits=8,compression_type=zstd").starts_with("Different"));
        assert!(err("compat=4,compression_type=lz4").contains("'version'"));
        let big = one("cluster_size=512")
            .unwrap()
            .to_create_options(1 << 40)
            .unwrap_err();
        assert!(big.starts_with("The image size is too large"));
        let o = one("").map(|_| ()).unwrap_err();
        assert!(o.0.starts_with("Invalid option list"));
        assert_eq!(
            Qcow2Opts::default().to_create_options(100).unwrap().size,
            512
        );
    }
}

impl Qcow2Opts {
    fn encrypt_opt(&self, name: &str) -> Option<&str> {
        self.encrypt
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The encryption asked for: `encryption=on` or `encrypt.format=aes` is the legacy
    /// format, `encrypt.format=luks` LUKS with the `encrypt.*` parameters; the password is
    /// the secret `encrypt.key-secret` names.
    pub fn encryption_options(&self) -> Result<Option<qcow2::NewEncryption>, String> {
        use qcow2::crypto::luks::LuksParams;
        use qcow2::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
        let legacy = self.encryption.as_ref().is_some_and(|e| e.value);
        let format = match (self.encrypt_opt("format"), legacy) {
            (Some(f), true) if f != "aes" => {
                return Err(
                    "Options \"encrypt.format\" and \"encryption\" are mutually exclusive".into(),
                )
            }
            (Some(f), _) => f,
            (None, true) => "aes",
            (None, false) if self.encrypt.is_empty() => return Ok(None),
            (None, false) => return Err("Parameter 'encrypt.format' is required".into()),
        };
        let secret = || -> Result<qcow2::crypto::Secret, String> {
            let id = self
                .encrypt_opt("key-secret")
                .ok_or("Parameter 'encrypt.key-secret' is required for cipher")?;
            crate::secrets::lookup(id)
        };
        match format {
            "aes" => Ok(Some(qcow2::NewEncryption::Aes {
                password: secret()?,
            })),
            "luks" => {
                let mut params = LuksParams::default();
                let bad = |name: &str, v: &str| {
                    format!("Parameter 'encrypt.{name}' does not accept value '{v}'")
                };
                if let Some(v) = self.encrypt_opt("cipher-alg") {
                    params.cipher_alg =
                        CipherAlg::from_name(v).ok_or_else(|| bad("cipher-alg", v))?;
                }
                if let Some(v) = self.encrypt_opt("cipher-mode") {
                    params.cipher_mode =
                        CipherMode::from_name(v).ok_or_else(|| bad("cipher-mode", v))?;
                }
                if let Some(v) = self.encrypt_opt("ivgen-alg") {
                    params.ivgen_alg = IvGenAlg::from_name(v).ok_or_else(|| bad("ivgen-alg", v))?;
                }
                if let Some(v) = self.encrypt_opt("ivgen-hash-alg") {
                    params.ivgen_hash =
                        Some(HashAlg::from_name(v).ok_or_else(|| bad("ivgen-hash-alg", v))?);
                }
                if let Some(v) = self.encrypt_opt("hash-alg") {
                    params.hash_alg = HashAlg::from_name(v).ok_or_else(|| bad("hash-alg", v))?;
                }
                if let Some(v) = self.encrypt_opt("iter-time") {
                    params.iter_time_ms = parse_number_opt("encrypt.iter-time", v)?;
                }
                Ok(Some(qcow2::NewEncryption::Luks {
                    password: secret()?,
                    params,
                }))
            }
            other => Err(format!(
                "Parameter 'encrypt.format' does not accept value '{other}'"
            )),
        }
    }
}

/// What `amend -o` asks for, parsed and checked with qemu-img's messages.
#[derive(Debug, Clone, Default)]
pub struct AmendOpts {
    pub options: qcow2::AmendOptions,
    /// `backing_file=` and `backing_fmt=`: allowed only when they repeat what the image says.
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    /// A LUKS key slot change (`encrypt.state` and its companions).
    pub keyslots: Option<qcow2::crypto::luks::KeyslotChange>,
}

/// Parses `amend -o` lists: only the options qcow2 can change in place.
pub fn parse_amend(lists: &[String]) -> Result<AmendOpts, String> {
    for list in lists {
        if !valid_option_list(list) {
            return Err(format!("Invalid option list: {list}"));
        }
    }
    let mut out = AmendOpts::default();
    for (key, value) in split_pairs(&lists.join(",")) {
        match key.as_str() {
            "compat" => {
                out.options.version = Some(match value.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => return Err(format!("Unknown compatibility level {other}")),
                })
            }
            "lazy_refcounts" => {
                out.options.lazy_refcounts = Some(parse_bool_opt("lazy_refcounts", &value)?.value)
            }
            "refcount_bits" => {
                let bits = parse_number_opt("refcount_bits", &value)?;
                out.options.refcount_bits = Some(u32::try_from(bits).unwrap_or(u32::MAX))
            }
            "size" => out.options.size = Some(parse_size_opt("size", &value)?),
            "cluster_size" | "extended_l2" | "compression_type" | "preallocation"
            | "encryption" | "encrypt.format" => {
                return Err(format!(
                    "Invalid parameter '{key}'\nThis option is only supported for image creation"
                ))
            }
            "backing_file" => out.backing_file = Some(value),
            "backing_fmt" => out.backing_fmt = Some(value),
            "data_file" => out.options.data_file = Some(value),
            "data_file_raw" => {
                out.options.data_file_raw = Some(parse_bool_opt("data_file_raw", &value)?.value)
            }
            "encrypt.state" => {
                out.keyslots.get_or_insert_with(Default::default).activate = match value.as_str() {
                    "active" => true,
                    "inactive" => false,
                    other => {
                        return Err(format!(
                            "Parameter 'encrypt.state' does not accept value '{other}'"
                        ))
                    }
                }
            }
            "encrypt.keyslot" => {
                let n = parse_number_opt("encrypt.keyslot", &value)?;
                out.keyslots.get_or_insert_with(Default::default).keyslot = Some(n as i64);
            }
            "encrypt.new-secret" => {
                out.keyslots.get_or_insert_with(Default::default).new_secret =
                    Some(crate::secrets::lookup(&value)?)
            }
            "encrypt.old-secret" => {
                out.keyslots.get_or_insert_with(Default::default).old_secret =
                    Some(crate::secrets::lookup(&value)?)
            }
            "encrypt.iter-time" => {
                out.keyslots
                    .get_or_insert_with(Default::default)
                    .iter_time_ms = Some(parse_number_opt("encrypt.iter-time", &value)?)
            }
            k if k.starts_with("encrypt.") => {
                return Err(format!(
                    "Parameter '{key}' is not supported by qcow2-tool amend"
                ))
            }
            _ => return Err(format!("Invalid parameter '{key}'")),
        }
    }
    Ok(out)
}
