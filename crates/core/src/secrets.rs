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

/// `url` with every secret replaced by `***`: the password of its
/// userinfo (`scheme://user:password@host`) and the values of options
/// whose names say they hold one ([`is_secret_option`]), whatever the
/// scheme: one runstate does not know, one whose URLs are paths (`file:`)
/// and one without `//` (`redis:/u:pw@h`, or `user:pw@host/db`, which
/// reads as scheme `user`) alike. A URL inside an option (a split store's
/// `locks=redis://…`) is redacted in turn.
///
/// Written for URLs as people type them, not only valid ones: a password
/// may contain an unencoded `/`, `?`, `#`, `@` or `:`, so the userinfo
/// ends at the last `@` that is followed by something shaped like a host
/// (`host`, `host:port`, `[::1]:port`, or a comma-separated list of them,
/// up to the first `/`, `?`, `#` or the end). Over-redacting is preferred
/// to leaking: when in doubt, more is replaced. Without `//`, whether such
/// an `@` ends a userinfo cannot be told, so all before it is replaced but
/// a `user:` (`file:backup@2024/runs` shows as `file:***@2024/runs`). Text
/// without a URL scheme is shown as `…`.
///
/// ```
/// use runstate_core::secrets::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:pa/ss?w@db:5432/runs?sslmode=require&password=x"),
///     "postgres://app:***@db:5432/runs?sslmode=require&password=***"
/// );
/// assert_eq!(redact_url("redis://:hunter2@127.0.0.1/0"), "redis://:***@127.0.0.1/0");
/// assert_eq!(redact_url("file://user:hunter2@nas/runs"), "file://user:***@nas/runs");
/// assert_eq!(redact_url("user:hunter2@db/runs"), "user:***@db/runs");
/// ```
pub fn redact_url(url: &str) -> String {
    let scheme = url.split_once(':').filter(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    match scheme {
        // Not even a scheme: where a secret might sit cannot be told.
        None => "…".to_owned(),
        Some((scheme, rest)) => match rest.strip_prefix("//") {
            Some(rest) => format!("{scheme}://{}", redact_hier(rest, true)),
            None => format!("{scheme}:{}", redact_hier(rest, false)),
        },
    }
}

/// What follows `scheme://` (`authority`) or, without `//`, `scheme:`,
/// with its secrets replaced.
fn redact_hier(rest: &str, authority: bool) -> String {
    // The userinfo ends at the last `@` followed by a host-shaped
    // authority; failing that (a host with odd characters: `${DB_HOST}`,
    // a space, a non-ASCII name), at the last `@`, so that a password is
    // never shown merely because its host looks odd (nor because it holds
    // a `#`: an `@` in a fragment is taken for a userinfo's, more hidden).
    let at = userinfo_end(rest).or_else(|| rest.rfind('@'));
    let Some(at) = at else {
        return redact_no_userinfo(rest, authority);
    };
    let before = &rest[..at];
    // The `@` of a URL inside an option (`?locks=redis://u:pw@h`): what
    // comes before the options is redacted on its own (it may hold a
    // userinfo too), and the options as a query, that URL with them. The
    // options start at the last `?` before that URL's `://`: a password,
    // this URL's or that one's, may hold a `?` too.
    let options = before.find("://").and_then(|n| before[..n].rfind('?'));
    if let Some(q) = options {
        return format!(
            "{}?{}",
            redact_hier(&rest[..q], authority),
            redact_query(&rest[q + 1..])
        );
    }
    let after = redact_rest(&rest[at + 1..]);
    match before.split_once(':') {
        // A "user" holding a `?` is a query typed in front of the `@`
        // (`h/db?password=a:b@c`): its options are redacted as well.
        Some((user, _password)) => format!("{}:{REDACTED}@{after}", redact_rest(user)),
        // With `//` and no `:`, there is no password, and the `@` may be a
        // path's or an option's (`file:///backup@2024`, `?note=a@b`).
        None if authority => redact_no_userinfo(rest, authority),
        // Without `//` it cannot be told: `u:pw@h` reads as scheme `u`
        // and a path `pw`. Hidden either way.
        None => {
            let lead = &before[..before.len() - before.trim_start_matches('/').len()];
            format!("{lead}{REDACTED}@{after}")
        }
    }
}

/// What follows `scheme://` or `scheme:` when it holds no userinfo.
fn redact_no_userinfo(rest: &str, authority: bool) -> String {
    if authority {
        // An authority shaped `user:secret` (a port that is not a number):
        // a mistyped URL whose password must not show either.
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some((host, port)) = authority.rsplit_once(':')
            && !port.is_empty()
            && !port.bytes().all(|b| b.is_ascii_digit())
            && !authority.ends_with(']')
            && !authority.contains(',')
        {
            return format!("{host}:{REDACTED}{}", redact_rest(&rest[authority.len()..]));
        }
    }
    redact_rest(rest)
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
            // A URL inside an option (a split store's `locks=redis://…`,
            // or anything holding `user:password@`) is redacted in turn,
            // and shown decoded.
            Some((name, value)) if looks_like_url(&decode(value)) => {
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

/// Whether an option's value may be a URL with secrets of its own.
fn looks_like_url(value: &str) -> bool {
    value.contains("://") || (value.contains(':') && value.contains('@'))
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
    fn passwords_are_redacted_whatever_the_scheme() {
        for (url, shown) in [
            ("file://user:pw@h/x", "file://user:***@h/x"),
            (
                "FILE://user:pw@h/x?ext=nodb",
                "FILE://user:***@h/x?ext=nodb",
            ),
            ("ftp://user:pw@h/x", "ftp://user:***@h/x"),
            (
                "x-custom+v2://u:pw@h:1/x?token=t",
                "x-custom+v2://u:***@h:1/x?token=***",
            ),
            (
                "file:///srv/runs?secret=s&ext=nodb",
                "file:///srv/runs?secret=***&ext=nodb",
            ),
            // Not URLs a parser reads, but credentials all the same.
            ("user:pw@host:5432/db", "user:***@host:5432/db"),
            ("redis:/u:pw@h/0", "redis:/u:***@h/0"),
            ("redis:u:pw@h/0", "redis:u:***@h/0"),
            (
                "postgres:u:pw@db/x?password=y",
                "postgres:u:***@db/x?password=***",
            ),
            // An `@` that is not a userinfo's leaves the rest alone.
            (
                "file:///mnt/backup@2024/runs",
                "file:///mnt/backup@2024/runs",
            ),
            ("postgres://user@h/db?a=b@c", "postgres://user@h/db?a=b@c"),
            (
                "postgres://u:pw@h/db?locks=redis://:pw2@c/0?prefix=p&x=1",
                "postgres://u:***@h/db?locks=redis://:***@c/0?prefix=p&x=1",
            ),
            (
                "file:///r?locks=redis://:p?w@c/0&cache=redis://u:p?w@d/1",
                "file:///r?locks=redis://:***@c/0&cache=redis://u:***@d/1",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn no_secret_survives_whatever_the_scheme() {
        for url in [
            "file://user:s3cr3t@h/x",
            "file://:s3cr3t@h/x",
            "File://u:s3cr3t/x@h/x",
            "gopher://u:s3cr3t@h",
            "s3cr3t-scheme-less user:s3cr3t@h",
            "u:s3cr3t@h/x",
            "s3:/u:s3cr3t@bucket/x",
            "redis:/u:s3cr3t/x@h/0",
            "postgres://h/db?password=s3cr3t@x",
            "postgres://h/db?password=a:s3cr3t@x",
            "file:///r?locks=redis:/u:s3cr3t@h/0",
            "file:///r?locks=u%3As3cr3t%40h",
            "unix:///run/redis.sock?auth=s3cr3t",
            "postgres://u:p?s3cr3t@h/db?locks=redis://:x@c/0",
            "file:///r?locks=redis://:p?s3cr3t@c/0&cache=redis://:s3cr3t@d",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cr3t"), "{url} -> {shown}");
        }
    }

    #[test]
    fn no_password_survives_any_shape_of_url() {
        // Every scheme, with or without `//`, hosts plain and odd, paths
        // and options with `@`s of their own, passwords holding the
        // delimiters people type unencoded.
        let mut tried = 0;
        for scheme in ["file", "FILE", "redis", "postgres", "x-y"] {
            for sep in ["://", ":/", ":"] {
                for user in ["", "u"] {
                    for host in ["h", "h:1", "[::1]:2", "my host", "${H}"] {
                        for path in ["", "/db", "/a@b"] {
                            for query in ["", "?a=b", "?locks=redis://:q@c/0", "?note=x@y"] {
                                for password in [
                                    "s3cr3t",
                                    "a?s3cr3t",
                                    "s3cr3t/x",
                                    "p#s3cr3t",
                                    "x@s3cr3t",
                                    "a:s3cr3t",
                                    "?x=s3cr3t",
                                    "s3cr3t?y=1",
                                ] {
                                    let url = format!(
                                        "{scheme}{sep}{user}:{password}@{host}{path}{query}"
                                    );
                                    let shown = redact_url(&url);
                                    assert!(!shown.contains("s3cr3t"), "{url} -> {shown}");
                                    tried += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(tried, 14_400);
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
