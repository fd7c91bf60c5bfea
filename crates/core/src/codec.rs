//! Codecs for typed documents: JSON (default) and bincode 2 (feature
//! `bincode`), each enforcing a size limit while encoding.

use std::fmt;
use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

/// How a typed document is turned into bytes and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// Compact JSON with object keys sorted, so equal values always encode
    /// to equal bytes (a `HashMap`'s iteration order never reaches the
    /// stored bytes).
    #[default]
    Json,
    /// bincode 2 with its standard configuration.
    #[cfg(feature = "bincode")]
    Bincode,
}

/// bincode refuses to allocate more than this while decoding, so a corrupt
/// length prefix cannot ask for terabytes.
#[cfg(feature = "bincode")]
const BINCODE_DECODE_LIMIT: usize = 1 << 30;

impl Codec {
    /// The codec's name, as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            #[cfg(feature = "bincode")]
            Codec::Bincode => "bincode",
        }
    }

    /// Encodes `value`, failing as soon as the output would exceed `limit`
    /// bytes.
    ///
    /// # Errors
    /// [`ErrorKind::TooLarge`] over the limit; [`ErrorKind::InvalidArgument`]
    /// when the value cannot be represented (for example a JSON map whose
    /// keys are not strings, or a float that is NaN or infinite in JSON).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T, limit: u64) -> Result<Vec<u8>> {
        let mut out = Limited::new(limit);
        let outcome: std::result::Result<(), Error> = match self {
            // A NaN or infinite float would be written as `null` and never
            // read back (see `finite`): refused before anything is encoded.
            Codec::Json => match crate::finite::check(value) {
                Err(crate::finite::Walk::NonFinite) => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "value cannot be encoded as json: a float is NaN or infinite, which \
                         JSON cannot hold (serde_json would write null and the document would \
                         never read back)",
                    ));
                }
                _ => serde_json::to_value(value)
                    .and_then(|canonical| write_json(&mut out, &canonical))
                    .map_err(|e| self.encode_error(e)),
            },
            #[cfg(feature = "bincode")]
            Codec::Bincode => {
                bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
                    .map(drop)
                    .map_err(|e| self.encode_error(e))
            }
        };
        if out.exceeded {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("encoded document exceeds the limit of {limit} bytes"),
            ));
        }
        outcome.map(|()| out.buf)
    }

    /// Decodes `bytes` into a `T`.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] naming the codec when the bytes are not a
    /// valid encoding of `T` (including trailing garbage).
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| json_decode_error(&e)),
            #[cfg(feature = "bincode")]
            Codec::Bincode => {
                let config = bincode::config::standard().with_limit::<BINCODE_DECODE_LIMIT>();
                let (value, read) = bincode::serde::decode_from_slice(bytes, config)
                    .map_err(|e| bincode_decode_error(&e))?;
                if read != bytes.len() {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "not a valid {} document: {} trailing bytes after the value",
                            self.name(),
                            bytes.len() - read
                        ),
                    ));
                }
                Ok(value)
            }
        }
    }

    fn encode_error(self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("value cannot be encoded as {}", self.name()),
        )
        .with_source(source)
    }
}

/// A `Corrupt` error for JSON that does not decode: where (line, column)
/// and what was expected, never the value found. serde_json's own message
/// quotes the offending value (`invalid type: string "hunter2", expected
/// u32`), and a document may hold secrets, so neither that message nor the
/// serde_json error itself is kept.
fn json_decode_error(error: &serde_json::Error) -> Error {
    use serde_json::error::Category;
    let what = match error.classify() {
        Category::Io => "cannot be read".to_owned(),
        Category::Syntax => "is not well-formed JSON".to_owned(),
        Category::Eof => "ends too early".to_owned(),
        Category::Data => data_problem(&error.to_string()),
    };
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "not a valid json document: it {what} at line {} column {}",
            error.line(),
            error.column()
        ),
    )
}

/// The part of a serde data error that comes from the expected type, not
/// from the document: `invalid type: string "x", expected u32` becomes
/// `has an invalid type (expected u32)`; a missing or duplicate field is
/// named, since field names come from the type.
fn data_problem(message: &str) -> String {
    // serde_json appends " at line L column C"; the position is reported
    // separately.
    let message = message
        .rfind(" at line ")
        .map_or(message, |at| &message[..at]);
    for (prefix, said) in [
        ("missing field ", "lacks the field "),
        ("duplicate field ", "repeats the field "),
    ] {
        if let Some(field) = message.strip_prefix(prefix) {
            return format!("{said}{field}");
        }
    }
    let problem = message.split(':').next().unwrap_or("invalid data").trim();
    let problem = match problem {
        "invalid type" => "has a value of the wrong type",
        "invalid value" => "has an invalid value",
        "invalid length" => "has a sequence of the wrong length",
        "unknown field" => "has an unknown field",
        "unknown variant" => "has an unknown variant",
        _ => "does not match the expected type",
    };
    match message.rfind(", expected ") {
        // What follows "expected" describes the Rust type (`u32`, `struct
        // Climate`, `one of ...` listing the type's own fields).
        Some(at) => format!(
            "{problem} (expected {})",
            &message[at + ", expected ".len()..]
        ),
        None => problem.to_owned(),
    }
}

/// A `Corrupt` error for bincode that does not decode, naming only the
/// kind of problem (bincode's messages may quote decoded values).
#[cfg(feature = "bincode")]
fn bincode_decode_error(error: &bincode::error::DecodeError) -> Error {
    use bincode::error::DecodeError;
    let what = match error {
        DecodeError::UnexpectedEnd { .. } => "ends too early",
        DecodeError::LimitExceeded => "declares a length over the decoding limit",
        DecodeError::Utf8 { .. } => "holds a string that is not UTF-8",
        DecodeError::UnexpectedVariant { .. } => "holds an unknown enum variant",
        DecodeError::InvalidBooleanValue(_) => "holds an invalid boolean",
        DecodeError::InvalidCharEncoding(_) => "holds an invalid character",
        _ => "does not match the expected type",
    };
    Error::new(
        ErrorKind::Corrupt,
        format!("not a valid bincode document: it {what}"),
    )
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Writes `value` byte for byte as `serde_json::to_writer` does (compact,
/// object keys in the map's order), except that a string needing no
/// escape is copied in one piece: serde_json looks at each byte of a
/// string on its own, which made encoding a document's long text the
/// largest client cost of a small update. Strings that do need escapes,
/// numbers, booleans and null are left to serde_json, so the output is
/// the same.
fn write_json<W: io::Write>(out: &mut W, value: &serde_json::Value) -> serde_json::Result<()> {
    use serde_json::Value;
    let punct = |out: &mut W, mark: &[u8]| out.write_all(mark).map_err(serde_json::Error::io);
    match value {
        Value::String(text) => write_json_str(out, text),
        Value::Array(items) => {
            punct(out, b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    punct(out, b",")?;
                }
                write_json(out, item)?;
            }
            punct(out, b"]")
        }
        Value::Object(map) => {
            punct(out, b"{")?;
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    punct(out, b",")?;
                }
                write_json_str(out, key)?;
                punct(out, b":")?;
                write_json(out, item)?;
            }
            punct(out, b"}")
        }
        scalar => serde_json::to_writer(out, scalar),
    }
}

/// A JSON string: copied between quotes when it holds nothing JSON
/// escapes (control characters, `"` and `\`, as serde_json's table),
/// otherwise written by serde_json.
fn write_json_str<W: io::Write>(out: &mut W, text: &str) -> serde_json::Result<()> {
    // No early exit, so the compiler checks many bytes per instruction.
    let escapes = text.bytes().fold(false, |found, b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escapes {
        return serde_json::to_writer(out, text);
    }
    out.write_all(b"\"")
        .and_then(|()| out.write_all(text.as_bytes()))
        .and_then(|()| out.write_all(b"\""))
        .map_err(serde_json::Error::io)
}

/// A `Vec` writer that refuses to grow past a limit.
struct Limited {
    buf: Vec<u8>,
    limit: u64,
    exceeded: bool,
}

impl Limited {
    fn new(limit: u64) -> Self {
        Limited {
            buf: Vec::with_capacity(limit.min(4096) as usize),
            limit,
            exceeded: false,
        }
    }
}

impl io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() as u64 + data.len() as u64 > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("document size limit exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;
    use crate::display_chain;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        zeta: u32,
        alpha: String,
        map: HashMap<String, u32>,
    }

    fn sample() -> Doc {
        Doc {
            zeta: 7,
            alpha: "a".into(),
            map: (0..50).map(|i| (format!("k{i}"), i)).collect(),
        }
    }

    #[test]
    fn json_is_compact_sorted_and_stable() {
        let a = Codec::Json.encode(&sample(), 1 << 20).unwrap();
        let b = Codec::Json.encode(&sample(), 1 << 20).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(text.starts_with("{\"alpha\":\"a\",\"map\":{\"k0\":0,\"k1\":1,\"k10\":10"));
        assert!(!text.contains(' '));
        assert_eq!(Codec::Json.decode::<Doc>(&a).unwrap(), sample());
    }

    /// The JSON writer gives exactly serde_json's bytes for the canonical
    /// value: strings with and without escapes (every control character,
    /// quotes, backslashes, DEL, non-ASCII), keys needing escapes, nested
    /// arrays and objects, and every kind of number.
    #[test]
    fn json_bytes_are_serde_jsons() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}z", b as char)).collect();
        texts.extend(
            [
                "",
                "plain",
                "quote \" inside",
                "back\\slash",
                "é ü 漢字 🦀 \u{2028}\u{2029}",
                "tab\tnewline\ncr\r",
            ]
            .map(String::from),
        );
        texts.push("o".repeat(5000));
        texts.push(format!("{}\"{}", "o".repeat(300), "p".repeat(300)));
        let value = serde_json::json!({
            "texts": texts,
            "keys": texts.iter().map(|t| (t.clone(), serde_json::Value::from(1))).collect::<serde_json::Map<_, _>>(),
            "numbers": [0, -1, u64::MAX, i64::MIN, 1.5, -0.0, 1e300, 2.2250738585072014e-308],
            "nested": [[], {}, [[{"a": [null, true, false]}]], {"": ""}],
        });
        let ours = Codec::Json.encode(&value, 1 << 24).unwrap();
        let theirs = serde_json::to_vec(&serde_json::to_value(&value).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(theirs).unwrap()
        );
        for text in &texts {
            let ours = Codec::Json.encode(text, 1 << 24).unwrap();
            assert_eq!(ours, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn limit_is_enforced_while_encoding() {
        let err = Codec::Json.encode(&"x".repeat(100), 50).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(Codec::Json.encode(&"x".repeat(10), 12).is_ok());
    }

    #[test]
    fn corrupt_errors_never_quote_the_document() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Secretive {
            pin: u32,
        }
        for bytes in [
            &br#"{"pin":"hunter2-secret"}"#[..],
            br#"{"hunter2-secret":1}"#,
            br#"{"pin":1,"pin":2}"#,
            br#"["hunter2-secret"]"#,
            b"hunter2-secret",
        ] {
            let error = Codec::Json.decode::<Secretive>(bytes).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Corrupt);
            let shown = format!("{} {:?} {}", error, error, display_chain(&error));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("line 1 column"), "{shown}");
        }
        let wrong_type = Codec::Json
            .decode::<Secretive>(br#"{"pin":"x"}"#)
            .unwrap_err();
        assert!(
            wrong_type.to_string().contains("expected u32"),
            "{wrong_type}"
        );
        let missing = Codec::Json.decode::<Secretive>(b"{}").unwrap_err();
        assert!(missing.to_string().contains("field `pin`"), "{missing}");
    }

    #[test]
    fn garbage_is_corrupt() {
        let err = Codec::Json.decode::<Doc>(b"{\"zeta\":").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("json"));
    }

    #[cfg(feature = "bincode")]
    #[test]
    fn bincode_round_trips_and_rejects_trailing_bytes() {
        let bytes = Codec::Bincode.encode(&sample(), 1 << 20).unwrap();
        assert_eq!(Codec::Bincode.decode::<Doc>(&bytes).unwrap(), sample());
        let mut longer = bytes.clone();
        longer.push(0);
        let err = Codec::Bincode.decode::<Doc>(&longer).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let err = Codec::Bincode.decode::<Doc>(b"{\"json\":1}").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }
}
