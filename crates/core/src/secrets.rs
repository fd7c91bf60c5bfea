//! Keeping secrets out of everything runstate shows: URLs with their
//! password and secret-looking options replaced by `***`, and a string
//! wrapper whose `Debug` and `Display` never print it.

use std::fmt;

/// The mark that replaces a secret.
pub const REDACTED: &str = "***";

/// Words that make a URL option's value a secret when they appear in its
/// name (case-insensitively): `password`, `secret_key`, `token`,
/// `sslkey`, `credentials`, …
const SECRET_WORDS: [&str; 7] = [
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "auth",
];

/// Whether a URL option named `name` holds a secret, by its name.
pub fn is_secret_option(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| lower.contains(word))
}

/// `url` with every secret replaced by `***`: the password of the
/// authority (`scheme://user:password@host`) and the values of options
/// whose names say they hold one ([`is_secret_option`]).
///
/// Written for URLs as people type them, not only valid ones: a password
/// may contain an unencoded `/`, `?`, `#`, `@` or `:`, so the userinfo
/// ends at the last `@` that is followed by something shaped like a host
/// (`host`, `host:port`, `[::1]:port`, or a comma-separated list of them,
/// up to the first `/`, `?`, `#` or the end). Over-redacting is preferred
/// to leaking: when in doubt, more is replaced. `file:` URLs hold paths,
/// not secrets, and are returned unchanged; text without a URL scheme is
/// shown as `…`.
///
/// ```
/// use runstate_core::secrets::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:pa/ss?w@db:5432/runs?sslmode=require&password=x"),
///     "postgres://app:***@db:5432/runs?sslmode=require&password=***"
/// );
/// assert_eq!(redact_url("redis://:hunter2@127.0.0.1/0"), "redis://:***@127.0.0.1/0");
/// ```
pub fn redact_url(url: &str) -> String {
    if url
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("file:"))
    {
        // A path holds no secret; options may (a nested `locks` URL).
        return redact_rest(url);
    }
    // Not even a scheme: where a secret might sit cannot be told.
    let scheme_ok = url.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if !scheme_ok {
        return "…".to_owned();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        // No authority (`sqlite:path`, `unix:/run/redis.sock?…`): only
        // options can hold secrets.
        return match url.split_once('?') {
            Some((base, query)) => format!("{base}?{}", redact_query(query)),
            None => url.to_owned(),
        };
    };
    // The userinfo ends at the last `@` followed by a host-shaped
    // authority; failing that (a host with odd characters: `${DB_HOST}`,
    // a space, a non-ASCII name), at the last `@` before any fragment, so
    // that a password is never shown merely because its host looks odd.
    let at = userinfo_end(rest).or_else(|| {
        let end = rest.find('#').unwrap_or(rest.len());
        rest[..end].rfind('@')
    });
    let (userinfo, after) = match at {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    // No userinfo, but an authority shaped `user:secret` (a port that is
    // not a number): a mistyped URL whose password must not show either.
    let after = match (userinfo, after.find(['/', '?', '#'])) {
        (None, end) => {
            let authority = &after[..end.unwrap_or(after.len())];
            match authority.rsplit_once(':') {
                Some((host, port))
                    if !port.is_empty()
                        && !port.bytes().all(|b| b.is_ascii_digit())
                        && !authority.ends_with(']')
                        && !authority.contains(',') =>
                {
                    return format!(
                        "{scheme}://{host}:{REDACTED}{}",
                        redact_rest(&after[authority.len()..])
                    );
                }
                _ => after,
            }
        }
        _ => after,
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _password)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            }
            None => out.push_str(userinfo),
        }
        out.push('@');
    }
    out.push_str(&redact_rest(after));
    out
}

/// The part of a URL after its authority, with secret options redacted.
fn redact_rest(after: &str) -> String {
    match after.split_once('?') {
        Some((base, query)) => format!("{base}?{}", redact_query(query)),
        None => after.to_owned(),
    }
}

/// Refuses a URL whose password holds an unencoded `/`, `?` or `#`:
/// URL parsers split it at the wrong place and end up showing pieces of it
/// as a host, a path or an option name. The error says how to write it and
/// shows the URL redacted.
///
/// # Errors
/// [`ErrorKind::Config`](crate::ErrorKind::Config) for such a URL.
pub fn check_userinfo(url: &str) -> Result<(), crate::Error> {
    let Some((_, rest)) = url.split_once("://") else {
        return Ok(());
    };
    // No authority (`file:///path`, `unix:///socket`): nothing to check;
    // an `@` in a path or an option is not a password's.
    if rest.starts_with('/') {
        return Ok(());
    }
    let Some(at) = userinfo_end(rest) else {
        return Ok(());
    };
    // Where a standard parser ends the authority; a userinfo reaching past
    // it, where what comes before is no `host[:port]`, is a password with
    // a delimiter inside.
    let standard_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let standard = &rest[..standard_end];
    let host_port = match standard.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
        None => !standard.is_empty(),
    };
    if at > standard_end && !host_port {
        return Err(crate::Error::new(
            crate::ErrorKind::Config,
            format!(
                "the user or password in {} holds an unencoded '/', '?' or '#': \
                 percent-encode it (%2F, %3F, %23)",
                redact_url(url)
            ),
        ));
    }
    Ok(())
}

/// Where the userinfo of `rest` (a URL after `scheme://`) ends: the last
/// `@` followed by a host-shaped (or empty) authority.
fn userinfo_end(rest: &str) -> Option<usize> {
    rest.char_indices()
        .filter(|&(_, c)| c == '@')
        .map(|(at, _)| at)
        .rev()
        .find(|&at| {
            let host = &rest[at + 1..];
            let end = host.find(['/', '?', '#']).unwrap_or(host.len());
            host[..end]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]%,".contains(&b))
        })
}

/// A query string with the values of secret options replaced; pairs are
/// kept as written otherwise (no re-encoding).
fn redact_query(query: &str) -> String {
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut out: Vec<String> = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((name, _)) if is_secret_option(&decode(name)) => {
                out.push(format!("{name}={REDACTED}"));
            }
            // A URL inside an option (a split store's `locks=redis://…`)
            // is redacted in turn, and shown decoded.
            Some((name, value)) if decode(value).contains("://") => {
                out.push(format!("{name}={}", redact_url(&decode(value))));
            }
            _ => out.push(pair.to_owned()),
        }
    }
    let mut joined = out.join("&");
    if let Some(fragment) = fragment {
        joined.push('#');
        joined.push_str(fragment);
    }
    joined
}

/// Percent-decodes an option name for matching (invalid escapes are kept).
fn decode(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(value as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A secret string (a password, a token): `Debug` and `Display` print
/// `***`; [`expose`](Secret::expose) gives the value to the code that must
/// send it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for sending it to the server that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_url_delimiters_are_redacted() {
        for (url, shown) in [
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pa?ss@h:5432/db", "postgres://u:***@h:5432/db"),
            (
                "redis://:pa?ss@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "mysql://root:p@ss#w/rd@[::1]:3306/test",
                "mysql://root:***@[::1]:3306/test",
            ),
            ("redis://:a:b:c@h", "redis://:***@h"),
            (
                "redis+cluster://:pw@h1:7000,h2:7001/0",
                "redis+cluster://:***@h1:7000,h2:7001/0",
            ),
            (
                "s3://bucket/prefix?secret_access_key=abc&region=x",
                "s3://bucket/prefix?secret_access_key=***&region=x",
            ),
            ("sqlite:runs.db?mode=rwc", "sqlite:runs.db?mode=rwc"),
            (
                "unix:///run/redis.sock?db=1&password=x",
                "unix:///run/redis.sock?db=1&password=***",
            ),
            (
                "postgres://h/db?sslkey=%2Fk&Pass%77ord=y",
                "postgres://h/db?sslkey=***&Pass%77ord=***",
            ),
            ("file:///srv/runs?ext=nodb", "file:///srv/runs?ext=nodb"),
            (
                "file:///srv/runs?ext=nodb&locks=redis%3A%2F%2F%3Apw%40cache%3A6379%2F0%3Fprefix%3Dw",
                "file:///srv/runs?ext=nodb&locks=redis://:***@cache:6379/0?prefix=w",
            ),
            (
                "file:data?locks=postgres://u:pw@db/x",
                "file:data?locks=postgres://u:***@db/x",
            ),
            ("postgres://user@h/db", "postgres://user@h/db"),
            ("postgres://h:5432/db", "postgres://h:5432/db"),
            ("not a url hunter2", "…"),
            (
                "redis+cluster://h1:7000,h2/0",
                "redis+cluster://h1:7000,h2/0",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn no_secret_survives_in_odd_urls() {
        for url in [
            "postgres://u:s3cr3t/x@h/db",
            "postgres://u:s3cr3t?x@h/db?a=b",
            "redis://:s3cr3t@",
            "redis://u:s3cr3t@/path",
            "postgres://u:s3cr3t",
            "x://u:s3cr3t@h@",
            "postgres://app:s3cr3t@${DB_HOST}:5432/runs",
            "postgres://u:s3cr3t@bücher.example:5432/db",
            "redis://:s3cr3t@my host:6379/0",
            "file:///r?locks=redis%3A%2F%2Fu%3As3cr3t%40%24%7BH%7D%3A6379%2F0",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cr3t"), "{url} -> {shown}");
        }
    }

    #[test]
    fn unencoded_delimiters_in_a_password_are_refused() {
        for bad in [
            "postgres://u:pa/ss@h/db",
            "redis://:pa?ss@h:6379/0",
            "mysql://root:p#w@h/db",
        ] {
            let error = check_userinfo(bad).expect_err(bad);
            assert_eq!(error.kind(), crate::ErrorKind::Config);
            assert!(!error.to_string().contains("pa") || !error.to_string().contains("ss@"));
            assert!(error.to_string().contains("***"), "{error}");
        }
        for good in [
            "postgres://u:pa%2Fss@h/db",
            "postgres://h/db?x=a@b",
            "redis://h:6379/0",
            "sqlite:x.db",
            "postgres://u@h/db",
            "mysql://root:p@w@h/db",
            "file:///mnt/backup@2024/runs",
            "file:///srv/runs?ext=nodb&note=a@b",
            "unix:///run/redis@1.sock",
            "file:///runs?ext=nodb&locks=redis://:pw@cache:6379/0",
        ] {
            assert!(check_userinfo(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
