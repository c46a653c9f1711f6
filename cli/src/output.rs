//! The human/JSON choice and the printers both share: a JSON value that keeps key order and
//! prints the way QEMU prints it (four-space indent, empty containers on two lines, non-ASCII as
//! `\uXXXX`), and qemu's human size format (`2.15 MiB`).

use std::fmt::Write;

/// `--output=human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

/// A JSON value whose objects keep their keys in insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Obj(Vec<(String, Json)>),
    Arr(Vec<Json>),
    Str(String),
    UInt(u64),
    Int(i64),
    Bool(bool),
}

impl Json {
    /// An empty object, to fill with [`Json::push`].
    pub fn obj() -> Json {
        Json::Obj(Vec::new())
    }

    /// Appends `key: value` to an object (a no-op on other values).
    pub fn push(&mut self, key: &str, value: impl Into<Json>) {
        if let Json::Obj(fields) = self {
            fields.push((key.to_string(), value.into()));
        }
    }

    /// QEMU's pretty form, without a trailing newline.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write_pretty(&mut out, 0);
        out
    }

    fn write_pretty(&self, out: &mut String, level: usize) {
        let indent = |out: &mut String, level: usize| out.push_str(&" ".repeat(4 * level));
        match self {
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (key, value)) in fields.iter().enumerate() {
                    indent(out, level + 1);
                    out.push_str(&quote(key));
                    out.push_str(": ");
                    value.write_pretty(out, level + 1);
                    if i + 1 < fields.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                indent(out, level);
                out.push('}');
            }
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    indent(out, level + 1);
                    item.write_pretty(out, level + 1);
                    if i + 1 < items.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                indent(out, level);
                out.push(']');
            }
            scalar => out.push_str(&scalar.compact()),
        }
    }

    /// The one-line form (scalars only are used this way by the printers).
    pub fn compact(&self) -> String {
        match self {
            Json::Str(s) => quote(s),
            Json::UInt(n) => n.to_string(),
            Json::Int(n) => n.to_string(),
            Json::Bool(b) => b.to_string(),
            Json::Obj(fields) => {
                let inner: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{}: {}", quote(k), v.compact()))
                    .collect();
                format!("{{{}}}", inner.join(", "))
            }
            Json::Arr(items) => {
                let inner: Vec<String> = items.iter().map(Json::compact).collect();
                format!("[{}]", inner.join(", "))
            }
        }
    }
}

impl From<u64> for Json {
    fn from(n: u64) -> Json {
        Json::UInt(n)
    }
}
impl From<u32> for Json {
    fn from(n: u32) -> Json {
        Json::UInt(n.into())
    }
}
impl From<i64> for Json {
    fn from(n: i64) -> Json {
        Json::Int(n)
    }
}
impl From<bool> for Json {
    fn from(b: bool) -> Json {
        Json::Bool(b)
    }
}
impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::Str(s.to_string())
    }
}
impl From<String> for Json {
    fn from(s: String) -> Json {
        Json::Str(s)
    }
}
impl From<Vec<Json>> for Json {
    fn from(items: Vec<Json>) -> Json {
        Json::Arr(items)
    }
}

/// A JSON string literal escaped as QEMU escapes it.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// qemu's `size_to_str`: three significant digits and a binary unit (`0 B`, `516 KiB`).
pub fn size_to_str(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(bytes / (1000/1024)) picks the unit so that the value stays below 1000.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let exponent = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let index = ((exponent - 1).max(0) / 10).min(6) as usize;
    let value = bytes as f64 / (1u64 << (index * 10)) as f64;
    format!("{} {}B", format_g3(value), SUFFIXES[index])
}

/// C's `%0.3g` for a non-negative value.
pub fn format_g3(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let sci = format!("{value:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa), exp.abs())
    } else {
        let decimals = (2 - exp) as usize;
        strip(&format!("{value:.decimals$}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(528384), "516 KiB");
        assert_eq!(size_to_str(2252800), "2.15 MiB");
        assert_eq!(size_to_str(2753024), "2.63 MiB");
        assert_eq!(size_to_str(16 << 20), "16 MiB");
        assert_eq!(size_to_str(4 << 40), "4 TiB");
    }

    #[test]
    fn pretty_json_matches_qemu_layout() {
        let mut o = Json::obj();
        o.push("children", Json::Arr(vec![]));
        o.push("a", 1u64);
        let mut inner = Json::obj();
        inner.push("type", "file");
        inner.push("data", Json::obj());
        o.push("format-specific", inner);
        assert_eq!(
            o.pretty(),
            "{\n    \"children\": [\n    ],\n    \"a\": 1,\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
    }

    #[test]
    fn strings_escape_like_qemu() {
        assert_eq!(quote("a/b\"c\\\n"), "\"a/b\\\"c\\\\\\n\"");
        assert_eq!(quote("é"), "\"\\u00E9\"");
        assert_eq!(quote("\u{1F600}"), "\"\\uD83D\\uDE00\"");
    }
}
