//! URL query options, parsed the same way for every backend: decoded once,
//! each taken by name with a typed parser, a name given twice refused, an
//! unknown name refused with the list of known ones, and the value of an
//! option whose name says it holds a secret never repeated in an error.
//!
//! ```
//! use std::time::Duration;
//! use runstate_core::options::UrlOptions;
//!
//! # fn main() -> runstate_core::Result<()> {
//! let mut options = UrlOptions::parse("redis", Some("timeout_ms=250&prefix=wepp"))?;
//! let timeout = options.take_ms("timeout_ms", Duration::from_millis(1)..=Duration::from_secs(3600))?;
//! let prefix = options.take("prefix");
//! options.finish()?; // anything left is an unknown option
//! assert_eq!(timeout, Some(Duration::from_millis(250)));
//! assert_eq!(prefix.as_deref(), Some("wepp"));
//!
//! let error = UrlOptions::parse("redis", Some("timout_ms=250")).and_then(|o| o.finish());
//! assert!(error.is_err());
//! # Ok(()) }
//! ```

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::secrets::{REDACTED, is_secret_option};
use crate::{Error, ErrorKind};

/// A `Config` error of `backend`: the one constructor every backend's URL
/// and configuration checks use, so they all read alike.
pub fn config_error(backend: &'static str, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into()).with_backend(backend)
}

/// The value `value` of option `name` as a positive whole number of
/// milliseconds; for backends that parse their own options.
///
/// # Errors
/// A [`config_error`] of `backend` naming the option and the value.
pub fn positive_ms(backend: &'static str, name: &str, value: &str) -> Result<Duration, Error> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(config_error(
            backend,
            format!("option {name} must be a positive number of milliseconds, got {value:?}"),
        )),
    }
}

/// The query options of one URL, decoded (`%XX` and `+`, as
/// `application/x-www-form-urlencoded`), in the order given.
///
/// Take each known option by name ([`take`](Self::take),
/// [`take_ms`](Self::take_ms), …), then call [`finish`](Self::finish)
/// (every option must be known) or [`into_rest`](Self::into_rest) (the
/// rest is passed on, e.g. to a database driver).
#[must_use = "call finish() so unknown options are refused"]
pub struct UrlOptions {
    backend: &'static str,
    pairs: Vec<(String, String)>,
    known: Vec<&'static str>,
}

impl std::fmt::Debug for UrlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_map();
        for (name, value) in &self.pairs {
            list.entry(name, &shown(name, value));
        }
        list.finish()
    }
}

/// A value as errors and `Debug` may show it.
fn shown(name: &str, value: &str) -> String {
    if is_secret_option(name) {
        REDACTED.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Decodes one form-encoded component; `None` when it is not UTF-8 once
/// decoded or holds a `%` not followed by two hex digits.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

impl UrlOptions {
    /// Parses `query` (the part after `?`, without it; `None` or empty for
    /// no options).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an option without a name, one that does
    /// not decode to UTF-8, or a name given twice (which of the two was
    /// meant cannot be told).
    pub fn parse(backend: &'static str, query: Option<&str>) -> Result<Self, Error> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = part.split_once('=').unwrap_or((part, ""));
            let name = decode(raw_name).filter(|n| !n.is_empty()).ok_or_else(|| {
                config_error(
                    backend,
                    "a URL option has no name or does not decode to UTF-8",
                )
            })?;
            let value = decode(raw_value).ok_or_else(|| {
                config_error(
                    backend,
                    format!("URL option {name} does not decode to UTF-8 (a bad %-escape?)"),
                )
            })?;
            if pairs.iter().any(|(seen, _)| *seen == name) {
                return Err(config_error(
                    backend,
                    format!("URL option {name} is given twice"),
                ));
            }
            pairs.push((name, value));
        }
        Ok(UrlOptions {
            backend,
            pairs,
            known: Vec::new(),
        })
    }

    /// Whether no option is left.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether `name` was given (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.pairs.iter().any(|(n, _)| n == name)
    }

    /// Removes `name` and returns its value, if given. Every name asked
    /// for is a known option in [`finish`](Self::finish)'s error.
    pub fn take(&mut self, name: &'static str) -> Option<String> {
        if !self.known.contains(&name) {
            self.known.push(name);
        }
        let at = self.pairs.iter().position(|(n, _)| n == name)?;
        Some(self.pairs.remove(at).1)
    }

    /// Takes `name` and parses it with `parse`; `what` says what was
    /// expected ("a number of messages from 1 to 1000000", …).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the option and, unless it holds a
    /// secret, the value, when `parse` returns `None`.
    pub fn take_with<T>(
        &mut self,
        name: &'static str,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, Error> {
        let Some(value) = self.take(name) else {
            return Ok(None);
        };
        match parse(&value) {
            Some(parsed) => Ok(Some(parsed)),
            None => Err(self.invalid(name, &value, what)),
        }
    }

    /// Takes a whole number of milliseconds within `range`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when it is not a number or out of range.
    pub fn take_ms(
        &mut self,
        name: &'static str,
        range: RangeInclusive<Duration>,
    ) -> Result<Option<Duration>, Error> {
        let what = format!(
            "a number of milliseconds from {} to {}",
            range.start().as_millis(),
            range.end().as_millis()
        );
        self.take_with(name, &what, |v| {
            v.parse::<u64>()
                .ok()
                .map(Duration::from_millis)
                .filter(|d| range.contains(d))
        })
    }

    /// Takes a whole number within `range`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when it is not a number or out of range.
    pub fn take_u64(
        &mut self,
        name: &'static str,
        range: RangeInclusive<u64>,
    ) -> Result<Option<u64>, Error> {
        let what = format!("a whole number from {} to {}", range.start(), range.end());
        self.take_with(name, &what, |v| {
            v.parse::<u64>().ok().filter(|n| range.contains(n))
        })
    }

    /// Takes `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`, in any
    /// case).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for any other value.
    pub fn take_bool(&mut self, name: &'static str) -> Result<Option<bool>, Error> {
        self.take_with(name, "true or false", parse_bool)
    }

    /// The error for a value of `name` that is not `what`.
    pub fn invalid(&self, name: &str, value: &str, what: &str) -> Error {
        config_error(
            self.backend,
            format!(
                "URL option {name} must be {what}, got {}",
                shown(name, value)
            ),
        )
    }

    /// Ends parsing: every option must have been taken.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the first unknown option (by name only:
    /// its value may be a secret) and listing the known ones.
    pub fn finish(self) -> Result<(), Error> {
        match self.pairs.first() {
            None => Ok(()),
            Some((name, _)) => Err(config_error(
                self.backend,
                format!(
                    "unknown {} URL option {name:?} (known: {})",
                    self.backend,
                    self.known.join(", ")
                ),
            )),
        }
    }

    /// Ends parsing, returning the options not taken, in the order given
    /// (for a backend that passes them on, as the SQL backend does to its
    /// driver).
    pub fn into_rest(self) -> Vec<(String, String)> {
        self.pairs
    }

    /// The names taken so far: the options this backend knows.
    pub fn known(&self) -> &[&'static str] {
        &self.known
    }
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, in any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_takes_and_finishes() {
        let mut o = UrlOptions::parse("t", Some("a=1&b=x%20y+z&c=&&flag")).unwrap();
        assert_eq!(o.take("b").as_deref(), Some("x y z"));
        assert_eq!(o.take_u64("a", 0..=5).unwrap(), Some(1));
        assert_eq!(o.take("c").as_deref(), Some(""));
        assert!(o.contains("flag"));
        assert_eq!(o.take("missing"), None);
        let e = o.finish().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("\"flag\""), "{e}");
        assert!(e.message().contains("b, a, c, missing"), "{e}");
    }

    #[test]
    fn refuses_twice_given_names_bad_escapes_and_empty_names() {
        for query in ["a=1&a=2", "a=%zz", "a=%e9", "=1", "%ff=1"] {
            let e = UrlOptions::parse("t", Some(query)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{query}");
        }
    }

    #[test]
    fn secret_values_never_show() {
        let mut o = UrlOptions::parse("t", Some("password=hunter2&sslkey=abc")).unwrap();
        let e = o.take_u64("password", 0..=1).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!format!("{o:?}").contains("abc"));
        let e = o.finish().unwrap_err();
        assert!(!e.to_string().contains("abc"), "{e}");
    }

    #[test]
    fn typed_values_and_ranges() {
        let mut o = UrlOptions::parse("t", Some("t_ms=0&u_ms=10&b=YES&n=7&bad=maybe")).unwrap();
        let ms = Duration::from_millis(1)..=Duration::from_secs(1);
        assert!(o.take_ms("t_ms", ms.clone()).is_err());
        assert_eq!(
            o.take_ms("u_ms", ms).unwrap(),
            Some(Duration::from_millis(10))
        );
        assert_eq!(o.take_bool("b").unwrap(), Some(true));
        assert!(o.take_u64("n", 8..=9).is_err());
        let e = o.take_bool("bad").unwrap_err();
        assert!(e.message().contains("\"maybe\""), "{e}");
        assert!(o.finish().is_ok());
    }
}
