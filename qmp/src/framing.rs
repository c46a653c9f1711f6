//! QMP input framing: clients send a stream of JSON values with no newlines (qemu.qmp) or
//! several glued together, split anywhere. [`Splitter`] finds where each top-level value ends by
//! bracket matching (strings, single-quoted strings and escapes included), with a bound on one
//! message's size, so hostile input costs at most [`MAX_MESSAGE`] bytes of memory.

/// The longest message accepted; a longer one ends the connection.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The deepest nesting accepted (serde_json's own limit is 128).
pub const MAX_DEPTH: usize = 64;

/// One framed input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level object, its bytes.
    Object(Vec<u8>),
    /// A complete top-level value that is no object (QMP refuses it).
    NotObject,
    /// Brackets that do not match, nesting too deep, or a message over `MAX_MESSAGE`: the
    /// stream cannot be resynchronised.
    Broken,
}

/// Accumulates bytes and cuts them into frames.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Scan position in `buf`.
    at: usize,
    /// Open brackets.
    stack: Vec<u8>,
    /// Inside a string opened by this quote.
    quote: Option<u8>,
    escaped: bool,
    /// A bare scalar (number, literal) is being read.
    scalar: bool,
}

impl Splitter {
    /// Adds bytes; returns every frame they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while self.at < self.buf.len() {
            let c = self.buf[self.at];
            self.at += 1;
            if let Some(q) = self.quote {
                if self.escaped {
                    self.escaped = false;
                } else if c == b'\\' {
                    self.escaped = true;
                } else if c == q {
                    self.quote = None;
                    if self.stack.is_empty() {
                        self.emit(&mut out, Frame::NotObject);
                    }
                }
                continue;
            }
            if self.scalar && (c.is_ascii_whitespace() || b"{}[]\"'".contains(&c)) {
                self.scalar = false;
                self.at -= 1;
                self.emit(&mut out, Frame::NotObject);
                continue;
            }
            match c {
                b'{' | b'[' => {
                    if self.stack.len() >= MAX_DEPTH {
                        return self.broken(out);
                    }
                    self.stack.push(c);
                }
                b'}' | b']' => {
                    let open = if c == b'}' { b'{' } else { b'[' };
                    if self.stack.pop() != Some(open) {
                        return self.broken(out);
                    }
                    if self.stack.is_empty() {
                        let frame = if open == b'{' {
                            let start = self.buf[..self.at]
                                .iter()
                                .position(|b| !b.is_ascii_whitespace())
                                .unwrap_or(0);
                            Frame::Object(self.buf[start..self.at].to_vec())
                        } else {
                            Frame::NotObject
                        };
                        self.emit(&mut out, frame);
                    }
                }
                b'"' | b'\'' => self.quote = Some(c),
                c if c.is_ascii_whitespace() => {}
                _ if self.stack.is_empty() => self.scalar = true,
                _ => {}
            }
        }
        if self.buf.len() > MAX_MESSAGE {
            return self.broken(out);
        }
        out
    }

    /// Ends the current frame at the scan position and drops its bytes.
    fn emit(&mut self, out: &mut Vec<Frame>, frame: Frame) {
        out.push(frame);
        self.buf.drain(..self.at);
        self.at = 0;
    }

    fn broken(&mut self, mut out: Vec<Frame>) -> Vec<Frame> {
        *self = Splitter::default();
        out.push(Frame::Broken);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Object(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn glued_and_split_objects_come_out_whole() {
        let mut s = Splitter::default();
        let first = s.push(br#"{"execute":"qmp_capabilities"}{"execute":"q","id":"a}"}{"exe"#);
        assert_eq!(
            objects(&first),
            [
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"q","id":"a}"}"#
            ]
        );
        let rest = s.push(br#"cute": 'x\'}', "id": 2}"#);
        assert_eq!(objects(&rest), [r#"{"execute": 'x\'}', "id": 2}"#]);
    }

    #[test]
    fn scalars_and_arrays_are_no_objects_and_bad_nesting_breaks() {
        let mut s = Splitter::default();
        assert_eq!(
            s.push(b"[1,2] 42 \"s\" "),
            [Frame::NotObject, Frame::NotObject, Frame::NotObject]
        );
        assert_eq!(s.push(b"{]"), [Frame::Broken]);
        assert_eq!(s.push(&[b'['; MAX_DEPTH + 1]), [Frame::Broken]);
        let long = vec![b' '; 10];
        assert!(s.push(&long).is_empty());
        let mut big = vec![b'{', b'"'];
        big.resize(MAX_MESSAGE + 1, b'a');
        assert_eq!(s.push(&big), [Frame::Broken]);
    }
}
