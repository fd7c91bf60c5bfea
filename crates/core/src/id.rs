//! Validated identifiers: [`RunId`] and [`DocName`].
//!
//! Both are built only through validation, so every backend can use them as
//! path segments, key parts or row values without escaping: a value of these
//! types can never traverse a directory, hide a file, carry a NUL or look
//! different on screen from what it is.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ErrorKind};

/// Longest identifier accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Which kind of identifier failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// A [`RunId`].
    Run,
    /// A [`DocName`].
    Doc,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Run => "run id",
            IdKind::Doc => "document name",
        })
    }
}

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdProblem {
    /// The identifier is empty.
    Empty,
    /// Longer than [`MAX_ID_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A byte outside `[A-Za-z0-9._-]`.
    BadByte {
        /// The offending byte.
        byte: u8,
        /// Its zero-based byte offset.
        position: usize,
    },
    /// Exactly `.` or `..`.
    DotName,
    /// Starts with `.`, which is reserved for hidden bookkeeping.
    LeadingDot,
}

/// The detailed reason behind an [`ErrorKind::InvalidKey`] error.
///
/// Kept as the error's source, so callers can find the offending byte and
/// its position with `std::error::Error::source` and a downcast.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {shown}: {}", describe(.problem))]
pub struct InvalidId {
    /// What was being validated.
    pub kind: IdKind,
    /// The input, escaped for display (control and non-ASCII characters are
    /// shown as escapes, so a right-to-left override cannot disguise it).
    pub shown: String,
    /// What is wrong with it.
    pub problem: IdProblem,
}

fn describe(problem: &IdProblem) -> String {
    match problem {
        IdProblem::Empty => "it is empty".to_owned(),
        IdProblem::TooLong { len } => {
            format!("it is {len} bytes long, the limit is {MAX_ID_LEN}")
        }
        IdProblem::BadByte { byte, position } => format!(
            "byte 0x{byte:02x} at position {position} is not allowed \
             (allowed: A-Z a-z 0-9 . _ -)"
        ),
        IdProblem::DotName => "`.` and `..` are not allowed".to_owned(),
        IdProblem::LeadingDot => {
            "it starts with `.`, which is reserved for hidden bookkeeping".to_owned()
        }
    }
}

fn escape_for_display(input: &str) -> String {
    const SHOWN_MAX: usize = 64;
    // A URL given where an id goes (`runstate ls postgres://app:pw@db/runs`)
    // is shown with its secrets replaced, as everywhere else.
    let redacted;
    let input = if input.contains('@') || input.contains("://") {
        redacted = crate::secrets::redact_url(input);
        redacted.as_str()
    } else {
        input
    };
    let mut out = String::from("\"");
    for (i, c) in input.chars().enumerate() {
        if i == SHOWN_MAX {
            out.push('…');
            break;
        }
        if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out.push('"');
    out
}

/// Checks `input` against the identifier rules shared by runs and documents.
fn validate(kind: IdKind, input: &str) -> Result<(), InvalidId> {
    let bytes = input.as_bytes();
    let problem = if bytes.is_empty() {
        Some(IdProblem::Empty)
    } else if bytes.len() > MAX_ID_LEN {
        Some(IdProblem::TooLong { len: bytes.len() })
    } else if let Some(position) = bytes
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        Some(IdProblem::BadByte {
            byte: bytes[position],
            position,
        })
    } else if input == "." || input == ".." {
        Some(IdProblem::DotName)
    } else if bytes[0] == b'.' {
        Some(IdProblem::LeadingDot)
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(InvalidId {
            kind,
            shown: escape_for_display(input),
            problem,
        }),
    }
}

macro_rules! identifier {
    ($(#[$meta:meta])* $name:ident, $kind:expr) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Box<str>);

        impl $name {
            /// Validates `input` and wraps it.
            ///
            /// # Errors
            /// [`ErrorKind::InvalidKey`] when `input` is empty, longer than
            /// 128 bytes, contains a byte outside `[A-Za-z0-9._-]`, is `.` or
            /// `..`, or starts with `.`. The error's source is an
            /// [`InvalidId`] with the offending byte and its position.
            pub fn new(input: impl AsRef<str>) -> Result<Self, Error> {
                let input = input.as_ref();
                match validate($kind, input) {
                    Ok(()) => Ok(Self(input.into())),
                    Err(invalid) => Err(Error::new(ErrorKind::InvalidKey, invalid.to_string())
                        .with_source(invalid)),
                }
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                validate($kind, &raw).map_err(serde::de::Error::custom)?;
                Ok(Self(raw.into_boxed_str()))
            }
        }
    };
}

identifier!(
    /// The identifier of a run: 1 to 128 bytes of `[A-Za-z0-9._-]`, not `.`
    /// or `..`, not starting with `.`.
    ///
    /// ```
    /// use runstate_core::RunId;
    /// let run = RunId::new("CedarRiver_Obs.MultDaymet")?;
    /// assert_eq!(run.as_str(), "CedarRiver_Obs.MultDaymet");
    /// assert!(RunId::new("../etc").is_err());
    /// # Ok::<(), runstate_core::Error>(())
    /// ```
    RunId,
    IdKind::Run
);

identifier!(
    /// The name of a document inside a run, with the same rules as
    /// [`RunId`]. In the file backend it is the file name without extension.
    ///
    /// ```
    /// use runstate_core::DocName;
    /// let name = DocName::new("prescribed_fire.landuse")?;
    /// assert_eq!(name.to_string(), "prescribed_fire.landuse");
    /// # Ok::<(), runstate_core::Error>(())
    /// ```
    DocName,
    IdKind::Doc
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_ids() {
        for id in [
            "Test_Watershed_15",
            "CedarRiver_Obs.MultDaymet",
            "prescribed_fire.landuse",
            "rlew-appreciated-tremolo",
            "a",
            "a..b",
            "x.",
            &"z".repeat(128),
        ] {
            assert!(RunId::new(id).is_ok(), "{id}");
            assert!(DocName::new(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn reports_byte_and_position() {
        let err = RunId::new("ab/c").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidKey);
        let invalid = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<InvalidId>())
            .expect("source is InvalidId");
        assert_eq!(
            invalid.problem,
            IdProblem::BadByte {
                byte: b'/',
                position: 2
            }
        );
        assert!(err.to_string().contains("0x2f at position 2"), "{err}");
    }

    #[test]
    fn refuses_bad_ids() {
        let long = "a".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a\\b",
            "a\0b",
            "%2e%2e",
            "a b",
            "é",
            "\u{202e}x",
            &long,
            ".hidden",
        ] {
            let err = DocName::new(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidKey, "{bad:?}");
        }
    }

    /// A URL typed where a run goes (`runstate ls postgres://…`) is refused
    /// without showing its password, which the error used to quote.
    #[test]
    fn a_url_given_as_an_id_shows_no_password() {
        for url in [
            "postgres://app:hunter2@db/runs",
            "redis://:hunter2@127.0.0.1/0",
            "app:hunter2@db",
        ] {
            let err = RunId::new(url).unwrap_err();
            let shown = format!("{err} {err:?} {}", crate::display_chain(&err));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert_eq!(err.kind(), ErrorKind::InvalidKey);
        }
    }

    #[test]
    fn display_escapes_tricky_characters() {
        let err = RunId::new("a\u{202e}b").unwrap_err();
        assert!(err.to_string().contains("\\u{202e}"), "{err}");
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<RunId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<RunId>("\"../x\"").is_err());
    }
}
