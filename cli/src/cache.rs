//! QEMU's cache modes (`-t`, `--cache`), one parser for every command that takes them: what each
//! mode asks of the engine (QEMU's `cache.direct`, `cache.writeback` and `cache.no-flush`).

/// What a cache mode asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// Bypass the host page cache (`O_DIRECT`): `none` and `directsync`.
    pub direct: bool,
    /// A write completes before it is durable; without it (`writethrough`, `directsync`) each
    /// write is flushed before it completes.
    pub writeback: bool,
    /// Never sync (`unsafe`).
    pub no_flush: bool,
}

impl CacheMode {
    /// QEMU's default for its tools and servers.
    pub const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        writeback: true,
        no_flush: false,
    };

    /// The mode QEMU calls `name`, or `None` for a name it does not know.
    pub fn parse(name: &str) -> Option<CacheMode> {
        let (direct, writeback, no_flush) = match name {
            "none" | "off" => (true, true, false),
            "directsync" => (true, false, false),
            "writeback" => (false, true, false),
            "writethrough" => (false, false, false),
            "unsafe" => (false, true, true),
            _ => return None,
        };
        Some(CacheMode {
            direct,
            writeback,
            no_flush,
        })
    }

    /// Whether each write is flushed before it completes.
    pub fn write_through(self) -> bool {
        !self.writeback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_ask_what_qemu_documents() {
        let none = CacheMode::parse("none").unwrap();
        assert!(none.direct && none.writeback && !none.no_flush);
        assert_eq!(CacheMode::parse("off"), Some(none));
        let sync = CacheMode::parse("directsync").unwrap();
        assert!(sync.direct && sync.write_through());
        assert_eq!(CacheMode::parse("writeback"), Some(CacheMode::WRITEBACK));
        assert!(CacheMode::parse("writethrough").unwrap().write_through());
        assert!(CacheMode::parse("unsafe").unwrap().no_flush);
        assert_eq!(CacheMode::parse("direct"), None);
    }
}
