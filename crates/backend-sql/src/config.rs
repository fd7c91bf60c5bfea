//! Configuration of the SQL backend, from a URL or by hand.
//!
//! | URL | database | cargo feature |
//! |---|---|---|
//! | `postgres://user:password@host:5432/db` (or `postgresql://`) | PostgreSQL | `postgres` |
//! | `mysql://user:password@host:3306/db` (or `mariadb://`) | MySQL 8 / MariaDB 10.5+ | `mysql` |
//! | `sqlite://path/to/file.db` (created when missing), `sqlite:///abs/path.db` | SQLite | `sqlite` |
//!
//! | query option | default | meaning |
//! |---|---|---|
//! | `prefix` | `runstate_` | prefix of every table; `[a-z][a-z0-9_]*`, at most 32 bytes |
//! | `timeout_ms` | 5000 | statement timeout on the server, and bound on every call |
//! | `acquire_timeout_ms` | 5000 | bound on waiting for a pooled connection |
//! | `max_connections` | 10 (SQLite: 4) | pool size |
//! | `migrate` | `true` | apply the embedded migrations on open; `false` to leave DDL to [`SqlStore::migrate`](crate::SqlStore::migrate) |
//!
//! Any other query option is passed to sqlx (for example `sslmode`). The
//! password never appears in `Debug`, `Display` or errors.

use std::fmt;
use std::time::Duration;

use runstate_core::{Error, ErrorKind};

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Dialect {
    /// The backend name in errors and capabilities.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::MySql => "mysql",
            Dialect::Sqlite => "sqlite",
        }
    }

    fn feature_enabled(self) -> bool {
        match self {
            Dialect::Postgres => cfg!(feature = "postgres"),
            Dialect::MySql => cfg!(feature = "mysql"),
            Dialect::Sqlite => cfg!(feature = "sqlite"),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of a [`SqlStore`](crate::SqlStore).
///
/// ```
/// use runstate_sql::{Dialect, SqlConfig};
/// let c = SqlConfig::from_url("postgres://app:hunter2@127.0.0.1:5432/test?prefix=lab_&timeout_ms=2000")?;
/// assert_eq!(c.dialect(), Dialect::Postgres);
/// assert_eq!(c.prefix(), "lab_");
/// assert_eq!(c.to_string(), "postgres://app:***@127.0.0.1:5432/test?prefix=lab_&timeout_ms=2000");
/// assert!(!format!("{c:?}").contains("hunter2"));
/// # Ok::<(), runstate_core::Error>(())
/// ```
#[derive(Clone)]
pub struct SqlConfig {
    pub(crate) dialect: Dialect,
    /// The URL handed to sqlx: runstate's own options removed. Holds the
    /// password; never printed.
    pub(crate) driver_url: String,
    /// The URL as shown: password replaced by `***`.
    shown: String,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) acquire_timeout: Duration,
    pub(crate) max_connections: u32,
    pub(crate) migrate: bool,
}

/// The default table prefix.
pub const DEFAULT_PREFIX: &str = "runstate_";
/// The default statement timeout and bound on every call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into()).with_backend("sql")
}

/// Checks a table prefix against the allowlist `[a-z][a-z0-9_]{0,31}`: it
/// is spliced into SQL as an identifier, so nothing else may pass.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), Error> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix.as_bytes()[0].is_ascii_lowercase()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(config_error(format!(
            "table prefix {prefix:?} must match [a-z][a-z0-9_]* and be at most 32 bytes"
        )))
    }
}

fn parse_ms(name: &str, value: &str) -> Result<Duration, Error> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(config_error(format!(
            "option {name} must be a positive number of milliseconds, got {value:?}"
        ))),
    }
}

/// Replaces the password of a `scheme://user:password@host…` URL by `***`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[scheme_end + 3 + at..]
                ),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

impl SqlConfig {
    /// Parses a database URL (see the module documentation).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an unknown scheme, a scheme whose cargo
    /// feature is off (the error names the feature), or a bad option. The
    /// URL is never repeated unredacted.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (scheme, rest) = url.split_once(':').ok_or_else(|| {
            config_error("database URL has no scheme (postgres://, mysql://, sqlite://)")
        })?;
        let dialect = match scheme {
            "postgres" | "postgresql" => Dialect::Postgres,
            "mysql" | "mariadb" => Dialect::MySql,
            "sqlite" => Dialect::Sqlite,
            other => {
                return Err(config_error(format!(
                    "unknown database URL scheme {other:?} (known: postgres, postgresql, mysql, mariadb, sqlite)"
                )));
            }
        };
        if !dialect.feature_enabled() {
            return Err(config_error(format!(
                "{scheme}:// needs the cargo feature `{}` of runstate-sql (or of runstate)",
                dialect.name()
            )));
        }
        let (base, query) = match rest.split_once('?') {
            Some((base, query)) => (base, query),
            None => (rest, ""),
        };
        let mut config = SqlConfig {
            dialect,
            driver_url: String::new(),
            shown: String::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            acquire_timeout: DEFAULT_TIMEOUT,
            max_connections: if dialect == Dialect::Sqlite { 4 } else { 10 },
            migrate: true,
        };
        let mut passed: Vec<(String, String)> = Vec::new();
        let mut ours: Vec<(String, String)> = Vec::new();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let (name, value) = (name.into_owned(), value.into_owned());
            match name.as_str() {
                "prefix" => {
                    check_prefix(&value)?;
                    config.prefix.clone_from(&value);
                }
                "timeout_ms" => config.timeout = parse_ms(&name, &value)?,
                "acquire_timeout_ms" => config.acquire_timeout = parse_ms(&name, &value)?,
                "max_connections" => {
                    config.max_connections =
                        value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            config_error(format!(
                                "max_connections must be a positive number, got {value:?}"
                            ))
                        })?;
                }
                "migrate" => {
                    config.migrate = match value.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(config_error(format!(
                                "migrate must be true or false, got {value:?}"
                            )));
                        }
                    };
                }
                _ => {
                    passed.push((name, value));
                    continue;
                }
            }
            ours.push((name, value));
        }
        if dialect == Dialect::Sqlite && !passed.iter().any(|(n, _)| n == "mode") {
            // `sqlite://path` creates the database.
            passed.push(("mode".to_owned(), "rwc".to_owned()));
        }
        let driver_scheme = match dialect {
            Dialect::MySql => "mysql",
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        };
        let encode = |pairs: &[(String, String)]| {
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish()
        };
        config.driver_url = if passed.is_empty() {
            format!("{driver_scheme}:{base}")
        } else {
            format!("{driver_scheme}:{base}?{}", encode(&passed))
        };
        let mut shown_pairs = ours;
        shown_pairs.extend(
            passed
                .into_iter()
                .filter(|(n, _)| n != "mode" || dialect != Dialect::Sqlite)
                .map(|(name, value)| {
                    // Options passed on to the driver may carry secrets
                    // (`password`, `sslpassword`, …); show their names only.
                    let lower = name.to_ascii_lowercase();
                    let secret = ["pass", "secret", "token", "key", "credential"]
                        .iter()
                        .any(|word| lower.contains(word));
                    (name, if secret { "***".to_owned() } else { value })
                }),
        );
        let shown_base = redact(&format!("{scheme}:{base}"));
        config.shown = if shown_pairs.is_empty() {
            shown_base
        } else {
            format!("{shown_base}?{}", encode(&shown_pairs))
        };
        Ok(config)
    }

    /// Sets the table prefix.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] unless it matches `[a-z][a-z0-9_]*` (≤ 32 bytes).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, Error> {
        let prefix = prefix.into();
        check_prefix(&prefix)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Sets the statement timeout and bound on every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the bound on waiting for a pooled connection.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets the pool size.
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Whether to apply migrations on open.
    pub fn with_migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// The database.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The table prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The statement timeout and call bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The URL with the password shown as `***`.
impl fmt::Display for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("dialect", &self.dialect)
            .field("url", &self.shown)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("max_connections", &self.max_connections)
            .field("migrate", &self.migrate)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENTINEL: &str = "S3ntinel-sql-PW-77a1";

    #[test]
    fn parses_and_strips_our_options() {
        let c =
            SqlConfig::from_url("postgres://u:p@h:5432/db?sslmode=disable&prefix=t_&migrate=false")
                .unwrap();
        assert_eq!(c.dialect, Dialect::Postgres);
        assert_eq!(c.prefix, "t_");
        assert!(!c.migrate);
        assert_eq!(c.driver_url, "postgres://u:p@h:5432/db?sslmode=disable");
        let c = SqlConfig::from_url("mariadb://root@127.0.0.1:3306/test").unwrap();
        assert_eq!(c.dialect, Dialect::MySql);
        assert_eq!(c.driver_url, "mysql://root@127.0.0.1:3306/test");
        let c = SqlConfig::from_url("sqlite://data/runs.db?prefix=x_").unwrap();
        assert_eq!(c.driver_url, "sqlite://data/runs.db?mode=rwc");
        assert_eq!(c.to_string(), "sqlite://data/runs.db?prefix=x_");
    }

    #[test]
    fn refuses_bad_input() {
        for (url, needle) in [
            ("oracle://x", "unknown database URL scheme"),
            ("postgres://h/db?prefix=Bad", "table prefix"),
            ("postgres://h/db?prefix=a;drop", "table prefix"),
            ("postgres://h/db?timeout_ms=-1", "timeout_ms"),
            ("postgres://h/db?migrate=maybe", "migrate"),
            ("nourl", "no scheme"),
        ] {
            let err = SqlConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn password_never_shows() {
        let c = SqlConfig::from_url(&format!(
            "mysql://root:{SENTINEL}@127.0.0.1:3306/test?prefix=p_"
        ))
        .unwrap();
        for shown in [c.to_string(), format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains(SENTINEL), "{shown}");
        }
        assert!(c.driver_url.contains(SENTINEL));
        assert_eq!(
            c.to_string(),
            "mysql://root:***@127.0.0.1:3306/test?prefix=p_"
        );
    }

    #[test]
    fn secret_driver_options_never_show() {
        let c = SqlConfig::from_url(&format!(
            "postgres://app@db/runs?sslmode=require&sslpassword={SENTINEL}"
        ))
        .unwrap();
        for shown in [c.to_string(), format!("{c:?}")] {
            assert!(!shown.contains(SENTINEL), "{shown}");
        }
        assert!(c.to_string().contains("sslmode=require"));
        assert!(
            c.to_string().contains("sslpassword=***")
                || c.to_string().contains("sslpassword=%2A%2A%2A")
        );
        assert!(c.driver_url.contains(SENTINEL), "the driver still gets it");
    }
}
