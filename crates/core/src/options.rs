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

/// The longest bound on a wait, a timeout or an interval that URL options
/// take, and that the Redis and SQL configuration setters bring longer
/// bounds down to: 2^31 − 1 ms, about 24.8 days (the file store's lock
/// timeout alone also takes `Duration::MAX` in code, as an endless wait).
/// No caller means a longer bound, and beyond it what the backends
/// derive from one breaks: PostgreSQL refuses a longer `statement_timeout`
/// (every connection would fail), SQLite reads a longer `busy_timeout` as
/// no wait at all, and adding a much longer one to a clock instant
/// overflows (a panic on some platforms already at a few hundred years).
pub const MAX_BOUND: Duration = Duration::from_millis(2_147_483_647);

/// The range of [`UrlOptions::take_ms`] for any positive bound on a wait,
/// a timeout or an interval: at least 1 ms, at most [`MAX_BOUND`].
pub const POSITIVE_MS: RangeInclusive<Duration> = Duration::from_millis(1)..=MAX_BOUND;

/// `bound` brought within [`POSITIVE_MS`]: what a configuration setter
/// stores for a bound given in code (a zero one is 1 ms, a longer one
/// than [`MAX_BOUND`], `Duration::MAX` included, is [`MAX_BOUND`]), as
/// the URL options are refused outside it.
#[must_use]
pub fn positive_bound(bound: Duration) -> Duration {
    bound.clamp(*POSITIVE_MS.start(), *POSITIVE_MS.end())
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

/// A name typed in a URL, fit for an error message: quoted (escaped) and
/// cut short, since a value may have been typed where the name should be.
fn shown_name(name: &str) -> String {
    let short: String = name.chars().take(40).collect();
    if short.len() < name.len() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

/// What a value from `start` to `end` is, in words, for an error: "a
/// {noun} from 1 to 60", or, when `end` is the largest `u64` or more (no
/// upper bound to speak of), "a positive {noun}" or "a {noun} of at least 5".
fn expected(noun: &str, start: u128, end: u128) -> String {
    match start {
        _ if end < u128::from(u64::MAX) => format!("a {noun} from {start} to {end}"),
        0 => format!("a {noun}"),
        1 => format!("a positive {noun}"),
        _ => format!("a {noun} of at least {start}"),
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
                // Two hex digits: `from_str_radix` alone also takes a sign
                // (`%+1`).
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
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
                    format!(
                        "URL option {} does not decode to UTF-8 (a bad %-escape?)",
                        shown_name(&name)
                    ),
                )
            })?;
            if pairs.iter().any(|(seen, _)| *seen == name) {
                return Err(config_error(
                    backend,
                    format!("URL option {} is given twice", shown_name(&name)),
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

    /// Takes a whole number of milliseconds within `range` ([`POSITIVE_MS`]
    /// for any positive one).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when it is not a number or out of range.
    pub fn take_ms(
        &mut self,
        name: &'static str,
        range: RangeInclusive<Duration>,
    ) -> Result<Option<Duration>, Error> {
        let what = expected(
            "number of milliseconds",
            range.start().as_millis(),
            range.end().as_millis(),
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
        let what = expected(
            "whole number",
            u128::from(*range.start()),
            u128::from(*range.end()),
        );
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
        self.finish_passing(|_| false, "").map(drop)
    }

    /// Ends parsing like [`finish`](Self::finish), except that the options
    /// not taken that `pass_on` accepts are returned, in the order given,
    /// instead of refused: for a backend that hands some options to its
    /// driver, as the SQL backend does to sqlx. `pass_on_names` says which
    /// those are (`"the postgres driver's: sslmode, …"`), after the known
    /// ones in the error.
    ///
    /// # Errors
    /// As [`finish`](Self::finish), for the first option neither taken nor
    /// accepted by `pass_on`.
    pub fn finish_passing(
        self,
        pass_on: impl Fn(&str) -> bool,
        pass_on_names: &str,
    ) -> Result<Vec<(String, String)>, Error> {
        let Some((name, value)) = self.pairs.iter().find(|(name, _)| !pass_on(name)) else {
            return Ok(self.pairs);
        };
        let mut known = self.known.join(", ");
        if !pass_on_names.is_empty() {
            known.push_str("; ");
            known.push_str(pass_on_names);
        }
        // A word without a value (`?hunter2`, or `hunter2=` once a layer
        // passed it on) may be a value typed where a name goes: not shown.
        let shown = if value.is_empty() {
            "without a value (not shown: a value may have been typed where its name goes)"
                .to_owned()
        } else {
            shown_name(name)
        };
        Err(config_error(
            self.backend,
            format!(
                "unknown {} URL option {shown} (known: {known})",
                self.backend
            ),
        ))
    }

    /// Ends parsing, returning the options not taken, in the order given,
    /// unchecked: for a layer that passes them all on to a backend which
    /// checks them (as the facade does). A backend passing some on to a
    /// driver uses [`finish_passing`](Self::finish_passing), which still
    /// refuses the others.
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
        // A bare word is not shown (it may be a password).
        assert!(!e.message().contains("flag"), "{e}");
        assert!(e.message().contains("without a value"), "{e}");
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

    #[test]
    fn open_ended_ranges_read_as_words() {
        let mut o = UrlOptions::parse("t", Some("a=0&b=0&c=2&d=0&e=x")).unwrap();
        let e = o.take_ms("a", POSITIVE_MS).unwrap_err();
        assert!(
            e.message()
                .contains("a must be a number of milliseconds from 1 to 2147483647, got \"0\""),
            "{e}"
        );
        let e = o.take_u64("b", 1..=u64::MAX).unwrap_err();
        assert!(
            e.message().contains("b must be a positive whole number"),
            "{e}"
        );
        let e = o.take_u64("c", 5..=u64::MAX).unwrap_err();
        assert!(e.message().contains("a whole number of at least 5"), "{e}");
        let e = o.take_u64("d", 1..=7).unwrap_err();
        assert!(e.message().contains("a whole number from 1 to 7"), "{e}");
        let e = o.take_u64("e", 0..=u64::MAX).unwrap_err();
        assert!(e.message().contains("e must be a whole number, got"), "{e}");
    }

    /// A bound longer than `MAX_BOUND` is refused in a URL and brought
    /// down to it in code: SQLite took `timeout_ms=2147483648` as no busy
    /// wait at all, PostgreSQL failed every connection with it, and
    /// `Duration::MAX` given to a setter panicked at the first call.
    #[test]
    fn bounds_stop_at_max_bound() {
        let mut o = UrlOptions::parse(
            "t",
            Some("a=2147483647&b=2147483648&c=18446744073709551615"),
        )
        .unwrap();
        assert_eq!(o.take_ms("a", POSITIVE_MS).unwrap(), Some(MAX_BOUND));
        for name in ["b", "c"] {
            let e = o.take_ms(name, POSITIVE_MS).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{e}");
            assert!(e.message().contains("from 1 to 2147483647"), "{e}");
        }
        assert_eq!(positive_bound(Duration::MAX), MAX_BOUND);
        assert_eq!(positive_bound(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            positive_bound(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn finish_passing_returns_what_passes_and_refuses_the_rest() {
        let driver = |name: &str| name.starts_with("ssl");
        let mut o = UrlOptions::parse("t", Some("sslmode=x&ours=1&sslkey=k")).unwrap();
        assert_eq!(o.take("ours").as_deref(), Some("1"));
        assert_eq!(
            o.finish_passing(driver, "the driver's: ssl*").unwrap(),
            [
                ("sslmode".to_owned(), "x".to_owned()),
                ("sslkey".to_owned(), "k".to_owned())
            ]
        );
        let mut o = UrlOptions::parse("t", Some("sslmode=x&passwd=hunter2")).unwrap();
        let _ = o.take("ours");
        let e = o.finish_passing(driver, "the driver's: ssl*").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.message()
                .contains("unknown t URL option \"passwd\" (known: ours; the driver's: ssl*)"),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let none = UrlOptions::parse("t", None).unwrap();
        assert!(none.finish_passing(driver, "").unwrap().is_empty());
    }

    #[test]
    fn long_names_are_cut_short_in_errors() {
        let long = "x".repeat(500);
        let e = UrlOptions::parse("t", Some(&format!("{long}=1")))
            .unwrap()
            .finish()
            .unwrap_err();
        assert!(
            e.message().contains(&format!("\"{}\"…", "x".repeat(40))),
            "{e}"
        );
        assert!(!e.message().contains(&"x".repeat(41)), "{e}");
        let e = UrlOptions::parse("t", Some(&format!("{long}=1&{long}=2"))).unwrap_err();
        assert!(!e.message().contains(&"x".repeat(41)), "{e}");
    }

    /// A word given without `=` that is no option (a password typed where
    /// an option goes) is refused without being shown; it used to be
    /// quoted, 40 characters of it.
    #[test]
    fn a_bare_unknown_word_is_not_shown() {
        let e = UrlOptions::parse("t", Some("s3cr3tpassw0rd"))
            .unwrap()
            .finish()
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e}");
        assert!(e.message().contains("without a value"), "{e}");
        // So is one a layer passed on as `name=`.
        let e = UrlOptions::parse("t", Some("s3cr3tpassw0rd="))
            .unwrap()
            .finish()
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e}");
        // A known flag given bare is still taken.
        let mut o = UrlOptions::parse("t", Some("flag")).unwrap();
        assert_eq!(o.take("flag").as_deref(), Some(""));
        o.finish().unwrap();
    }

    /// A `%` must be followed by two hex digits: `%+1` was read as 0x01.
    #[test]
    fn a_percent_needs_two_hex_digits() {
        for bad in ["a=%+1", "a=%-1", "a=% 1", "%+1=x"] {
            assert!(UrlOptions::parse("t", Some(bad)).is_err(), "{bad}");
        }
        let mut o = UrlOptions::parse("t", Some("a=%2F%2f")).unwrap();
        assert_eq!(o.take("a").as_deref(), Some("//"));
    }
}
