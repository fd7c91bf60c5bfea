//! Configuration of the Redis backend, from a URL or by hand.
//!
//! | URL | meaning |
//! |---|---|
//! | `redis://[user[:password]@]host[:port][/db]` | TCP (port 6379, db 0 by default) |
//! | `rediss://…` | TLS (cargo feature `tls`) |
//! | `unix:///path/to/redis.sock` | Unix socket (`?db=N` selects the database) |
//! | `redis+cluster://[user[:password]@]host:port,host:port[/]` | a Redis Cluster, through any of the nodes listed (seeds; the others are discovered); database 0 only |
//!
//! | query option | default | meaning |
//! |---|---|---|
//! | `prefix` | `runstate` | first part of every key; `[A-Za-z0-9._:-]`, 1–64 bytes |
//! | `timeout_ms` | 5000 | bound on every call; a stalled server gives `Timeout` |
//! | `connect_timeout_ms` | 5000 | bound on connecting and reconnecting |
//! | `weppcloud_locks` | off | database number of WEPPcloud's `nodb-lock:*` keys; when set, a document WEPPcloud holds is `Locked` |
//! | `weppcloud_ext` | `nodb` | extension WEPPcloud gives document files (`nodb-lock:<run>:<name>.<ext>`) |
//! | `status_history` | 1000 | status messages kept per run (about: `XADD … MAXLEN ~`, so a few more may stay) |
//! | `status_minutes` | off | also drop status messages older than this many minutes (`XTRIM … MINID`, exact, by the server's clock, at each publish) |
//! | `db` | 0 | database, for `unix://` URLs |
//! | `wait_replicas` | 0 (off) | after every save, every grant and every `claim` (a fence seen from another lock service), `WAIT` for this many replicas to acknowledge it (in the same request, right after the write); fewer within `wait_timeout_ms` fails the call with a retryable `Backend` error (the write was made on the primary but may be lost by a failover) |
//! | `wait_timeout_ms` | 1000 | how long that `WAIT` may take |
//! | `tls_ca` | off | `rediss://` only: path of a PEM file of the certificate authorities to trust instead of the built-in web roots (a private CA) |
//!
//! Passwords never appear in `Debug`, `Display` or errors: they are shown
//! as `***`.
//!
//! TLS uses rustls. The first `rediss://` store makes *ring* rustls's
//! process-wide crypto provider when the program has installed none: with
//! a second provider compiled in (aws-lc-rs, which the S3 backend brings)
//! rustls would not choose one by itself. A program that wants another
//! provider installs it before opening the store.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use runstate_core::Error;
use runstate_core::options::{self, POSITIVE_MS, UrlOptions};

use crate::BACKEND;

/// Where the server is.
#[derive(Clone, PartialEq, Eq)]
pub enum Address {
    /// Plain TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// TCP with TLS (`rediss://`, cargo feature `tls`).
    Tls {
        /// Host name, also checked against the certificate.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } | Address::Tls { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { .. } => write!(f, "Tcp({self})"),
            Address::Tls { .. } => write!(f, "Tls({self})"),
            Address::Unix(_) => write!(f, "Unix({self})"),
        }
    }
}

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where WEPPcloud keeps its NoDb locks, for
/// [`RedisConfig::with_weppcloud_locks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeppcloudLocks {
    /// The database of the `nodb-lock:*` keys.
    pub db: i64,
    /// The extension of document files, `nodb` in WEPPcloud.
    pub ext: String,
}

/// Settings of a [`RedisStore`](crate::RedisStore).
///
/// ```
/// use runstate_redis::RedisConfig;
/// let config = RedisConfig::from_url("redis://app:hunter2@127.0.0.1:6379/2?prefix=lab")?;
/// assert_eq!(config.db(), 2);
/// assert_eq!(config.prefix(), "lab");
/// assert_eq!(config.to_string(), "redis://app:***@127.0.0.1:6379/2?prefix=lab");
/// assert!(!format!("{config:?}").contains("hunter2"));
/// # Ok::<(), runstate_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub(crate) address: Address,
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) weppcloud: Option<WeppcloudLocks>,
    pub(crate) status_history: u64,
    pub(crate) status_max_age: Option<Duration>,
    /// Seed nodes of a Redis Cluster; empty for one server (`address`).
    pub(crate) cluster: Vec<(String, u16)>,
    /// Built as a cluster's configuration ([`RedisConfig::cluster`]), so
    /// that one given no seed fails to open instead of opening one server.
    pub(crate) cluster_wanted: bool,
    /// Replicas that must acknowledge each save and grant (0: none).
    pub(crate) wait_replicas: u64,
    pub(crate) wait_timeout: Duration,
    /// PEM file of the CAs a `rediss://` server's certificate must chain
    /// to, instead of the built-in web roots.
    pub(crate) tls_ca: Option<PathBuf>,
}

/// How long a `WAIT` for replicas may take by default.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Status messages kept per run by default.
pub const DEFAULT_STATUS_HISTORY: u64 = 1000;
/// The most status messages a run may be configured to keep.
pub const MAX_STATUS_HISTORY: u64 = 1_000_000;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "runstate";
/// The default bound on every call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A `Config` error of the Redis backend.
pub(crate) fn config_error(message: impl Into<String>) -> Error {
    options::config_error(BACKEND, message)
}

fn check_prefix(prefix: &str) -> Result<(), Error> {
    // `<p>:cache` is where a `RedisCache` beside the store `<p>` keeps its
    // copies (`<p>:cache:{<run>}:<name>`): a store of that prefix would
    // share their keys.
    if prefix.ends_with(":cache") {
        return Err(config_error(format!(
            "key prefix {prefix:?} must not end in `:cache` (the keys of a cache beside \
             the store whose prefix it extends)"
        )));
    }
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(config_error(format!(
            "key prefix {prefix:?} must be 1 to 64 bytes of [A-Za-z0-9._:-]"
        )));
    }
    Ok(())
}

/// What [`database`] reads, for errors.
pub(crate) const DATABASE: &str = "a database number ≥ 0";

/// A database number (the URL's path, `db`, `weppcloud_locks`,
/// `weppcloud_cache_db`).
pub(crate) fn database(value: &str) -> Option<i64> {
    value.parse::<i64>().ok().filter(|db| *db >= 0)
}

impl RedisConfig {
    /// A configuration for `host:port` with every default.
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        RedisConfig {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            db: 0,
            username: None,
            password: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_TIMEOUT,
            weppcloud: None,
            status_history: DEFAULT_STATUS_HISTORY,
            status_max_age: None,
            cluster: Vec::new(),
            cluster_wanted: false,
            wait_replicas: 0,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            tls_ca: None,
        }
    }

    /// A configuration for a Redis Cluster reached through `seeds` (any
    /// nodes of it; the others are discovered), with every default.
    pub fn cluster(seeds: impl IntoIterator<Item = (String, u16)>) -> Self {
        let cluster: Vec<(String, u16)> = seeds.into_iter().collect();
        let mut config = match cluster.first() {
            Some((host, port)) => RedisConfig::tcp(host.clone(), *port),
            None => RedisConfig::tcp("127.0.0.1", 6379),
        };
        config.cluster = cluster;
        config.cluster_wanted = true;
        config
    }

    /// Refuses a cluster configuration a cluster cannot serve: no seed, a
    /// database other than 0, or WEPPcloud's locks (which live in another
    /// database, under keys without a run's hash tag).
    pub(crate) fn check_cluster(&self) -> Result<(), Error> {
        if self.cluster.is_empty() {
            return Err(config_error(
                "a Redis Cluster configuration needs a seed node",
            ));
        }
        if self.db != 0 {
            return Err(config_error(
                "a Redis Cluster has only database 0: leave the path of a redis+cluster URL empty",
            ));
        }
        if self.weppcloud.is_some() {
            return Err(config_error(
                "weppcloud_locks needs a standalone Redis (it reads another database), not a cluster",
            ));
        }
        Ok(())
    }

    /// Parses a `redis://`, `rediss://` or `unix://` URL (see the module
    /// documentation for the options).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) for an unknown scheme or option, a bad value,
    /// or `rediss://` without the `tls` feature. The URL itself is never
    /// repeated in the error, since it may hold a password.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Self::from_url_with(url, |_| Ok(()))
    }

    /// Parses `url` as [`from_url`](Self::from_url) does, letting `first`
    /// take the options of what is built on this store (a WEPPcloud lock
    /// service's) before this store takes its own: an option neither takes
    /// is refused, the names both know listed, so the options of one URL
    /// are checked once, in one place.
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url), and whatever `first` returns.
    pub(crate) fn from_url_with(
        url: &str,
        first: impl FnOnce(&mut UrlOptions) -> Result<(), Error>,
    ) -> Result<Self, Error> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            return Self::from_cluster_url(rest, first);
        }
        let parsed = url::Url::parse(url).map_err(|e| {
            config_error("invalid redis URL (not shown: it may hold a password)").with_source(e)
        })?;
        let mut config = RedisConfig::tcp("127.0.0.1", 6379);
        match parsed.scheme() {
            scheme @ ("redis" | "rediss") => {
                let host = parsed
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| config_error("redis URL has no host"))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = parsed.port().unwrap_or(6379);
                config.address = if scheme == "rediss" {
                    if !cfg!(feature = "tls") {
                        return Err(config_error(
                            "rediss:// needs TLS support: enable the cargo feature `tls` of runstate-redis",
                        ));
                    }
                    Address::Tls { host, port }
                } else {
                    Address::Tcp { host, port }
                };
                let path = parsed.path().trim_start_matches('/');
                if !path.is_empty() {
                    config.db = database(path).ok_or_else(|| {
                        // The path is not shown: a `/` left unencoded in a
                        // password makes its tail the path.
                        config_error(format!(
                            "the URL's path must be {DATABASE} (a `/` in a password must be \
                             written %2F)"
                        ))
                    })?;
                }
                if !parsed.username().is_empty() {
                    config.username = Some(decode(parsed.username())?);
                }
                if let Some(password) = parsed.password() {
                    config.password = Some(Secret(decode(password)?));
                }
            }
            "unix" | "redis+unix" => {
                if parsed.path().is_empty() {
                    return Err(config_error("unix:// URL has no socket path"));
                }
                config.address = Address::Unix(PathBuf::from(decode(parsed.path())?));
                if let Some(password) = parsed.password() {
                    config.password = Some(Secret(decode(password)?));
                }
            }
            other => {
                return Err(config_error(format!(
                    "unknown URL scheme {other:?} for redis (known: redis, rediss, unix, redis+cluster)"
                )));
            }
        }
        let mut options = UrlOptions::parse(BACKEND, parsed.query())?;
        first(&mut options)?;
        if options.contains("weppcloud") {
            // Not taken: it is no option of this store, so it stays out of
            // the list of known ones.
            return Err(config_error(
                "weppcloud=true makes a WEPPcloud lock service, not a document store: \
                 give it as the lock service of a file store of WEPPcloud run folders \
                 (file:///runs?ext=nodb&locks=redis://…/0?weppcloud=true); for a Redis \
                 document store that honours WEPPcloud's locks, see weppcloud_locks",
            ));
        }
        if let Some(prefix) = options.take("prefix") {
            check_prefix(&prefix)?;
            config.prefix = prefix;
        }
        if let Some(timeout) = options.take_ms("timeout_ms", POSITIVE_MS)? {
            config.timeout = timeout;
        }
        if let Some(timeout) = options.take_ms("connect_timeout_ms", POSITIVE_MS)? {
            config.connect_timeout = timeout;
        }
        if let Some(db) = options.take_with("db", DATABASE, database)? {
            config.db = db;
        }
        if let Some(db) = options.take_with("weppcloud_locks", DATABASE, database)? {
            config.weppcloud = Some(WeppcloudLocks {
                db,
                ext: "nodb".to_owned(),
            });
        }
        let weppcloud_ext = options.take("weppcloud_ext");
        if let Some(keep) = options.take_u64("status_history", 1..=MAX_STATUS_HISTORY)? {
            config.status_history = keep;
        }
        // Up to a year: any more is no limit at all.
        let a_year = "a number of minutes from 1 to 525600 (a year)";
        if let Some(minutes) = options.take_with("status_minutes", a_year, |v| {
            v.parse::<u64>().ok().filter(|m| (1..=525_600).contains(m))
        })? {
            config.status_max_age = Some(Duration::from_secs(minutes * 60));
        }
        if let Some(n) = options.take_u64("wait_replicas", 0..=64)? {
            config.wait_replicas = n;
        }
        if let Some(ms) = options.take_ms(
            "wait_timeout_ms",
            Duration::from_millis(1)..=Duration::from_secs(60),
        )? {
            config.wait_timeout = ms;
        }
        if let Some(path) = options.take("tls_ca") {
            if !matches!(config.address, Address::Tls { .. }) || path.is_empty() {
                return Err(config_error(
                    "tls_ca (a PEM file of CA certificates) needs a rediss:// URL and a path",
                ));
            }
            config.tls_ca = Some(PathBuf::from(path));
        }
        options.finish()?;
        if let Some(ext) = weppcloud_ext {
            match &mut config.weppcloud {
                Some(locks) => locks.ext = check_ext(ext)?,
                None => {
                    return Err(config_error(
                        "weppcloud_ext needs weppcloud_locks=<db> to be set too",
                    ));
                }
            }
        }
        Ok(config)
    }

    /// Parses what follows `redis+cluster://`: `[user[:password]@]host:port,
    /// host:port[/[0]][?options]`, by reading the first node as a
    /// `redis://` URL (so credentials and options mean the same) and
    /// taking the others as further seeds.
    fn from_cluster_url(
        rest: &str,
        first: impl FnOnce(&mut UrlOptions) -> Result<(), Error>,
    ) -> Result<Self, Error> {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (auth, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let mut seeds = Vec::new();
        for host in hosts.split(',') {
            let url = url::Url::parse(&format!("redis://{host}")).map_err(|e| {
                config_error("invalid node in a redis+cluster URL (not shown)").with_source(e)
            })?;
            let name = url
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| config_error("a node of a redis+cluster URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            seeds.push((name, url.port().unwrap_or(6379)));
        }
        let mut config = Self::from_url_with(
            &format!(
                "redis://{auth}{}{tail}",
                hosts.split(',').next().unwrap_or_default()
            ),
            first,
        )?;
        config.cluster = seeds;
        config.cluster_wanted = true;
        config.check_cluster()?;
        Ok(config)
    }

    /// Sets the key prefix.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) unless it is 1 to 64 bytes of `[A-Za-z0-9._:-]`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, Error> {
        let prefix = prefix.into();
        check_prefix(&prefix)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Trusts the certificate authorities in the PEM file at `path`, instead
    /// of the built-in web roots, for a `rediss://` server (a private CA).
    /// The file is read when the store opens (a missing or unreadable file
    /// is a `Config` error then); it has no effect without TLS.
    pub fn with_tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Sets the database.
    pub fn with_db(mut self, db: i64) -> Self {
        self.db = db;
        self
    }

    /// Sets the password (and optionally the ACL user name).
    pub fn with_auth(mut self, username: Option<String>, password: Secret) -> Self {
        self.username = username;
        self.password = Some(password);
        self
    }

    /// Bounds every call (1 ms to [`MAX_BOUND`](options::MAX_BOUND), about
    /// 24.8 days; a bound outside is brought to the nearer end).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = options::positive_bound(timeout);
        self
    }

    /// Bounds connecting and reconnecting (1 ms to
    /// [`MAX_BOUND`](options::MAX_BOUND); a bound outside is brought to the
    /// nearer end).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = options::positive_bound(timeout);
        self
    }

    /// Bounds each run's status history: about `keep` messages (1 ..=
    /// [`MAX_STATUS_HISTORY`]) and, with `max_age`, none older than that.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) for `keep` out of range or a zero `max_age`.
    pub fn with_status_history(
        mut self,
        keep: u64,
        max_age: Option<Duration>,
    ) -> Result<Self, Error> {
        if !(1..=MAX_STATUS_HISTORY).contains(&keep) {
            return Err(config_error(format!(
                "the status history must keep from 1 to {MAX_STATUS_HISTORY} messages, got {keep}"
            )));
        }
        self.status_history = keep;
        if max_age.is_some_and(|age| age.as_millis() == 0) {
            return Err(config_error(
                "the status history's maximum age must be at least 1 ms",
            ));
        }
        self.status_max_age = max_age;
        Ok(self)
    }

    /// Status messages kept per run, and their maximum age if any.
    pub fn status_history(&self) -> (u64, Option<Duration>) {
        (self.status_history, self.status_max_age)
    }

    /// Honours WEPPcloud's NoDb locks: a document whose
    /// `nodb-lock:<run>:<name>.<ext>` key exists in database `locks.db` is
    /// reported `Locked` and never written.
    pub fn with_weppcloud_locks(mut self, locks: WeppcloudLocks) -> Self {
        self.weppcloud = Some(locks);
        self
    }

    /// Waits for `replicas` replicas to acknowledge every save and grant
    /// (Redis `WAIT`, at most `timeout`: 1 ms to
    /// [`MAX_BOUND`](options::MAX_BOUND), brought to the nearer end
    /// outside); fewer fails the call with a retryable `Backend` error. 0
    /// turns it off.
    pub fn with_wait_replicas(mut self, replicas: u64, timeout: Duration) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout = options::positive_bound(timeout);
        self
    }

    /// The replicas each save and grant waits for, and how long.
    pub fn wait_replicas(&self) -> (u64, Duration) {
        (self.wait_replicas, self.wait_timeout)
    }

    /// The seed nodes of a Redis Cluster (empty for one server).
    pub fn cluster_nodes(&self) -> &[(String, u16)] {
        &self.cluster
    }

    /// The server's address (for a cluster, its first seed).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The database.
    pub fn db(&self) -> i64 {
        self.db
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The WEPPcloud lock settings, if enabled.
    pub fn weppcloud_locks(&self) -> Option<&WeppcloudLocks> {
        self.weppcloud.as_ref()
    }
}

fn check_ext(ext: String) -> Result<String, Error> {
    if ext.is_empty() || ext.len() > 16 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(config_error(format!(
            "weppcloud_ext {ext:?} must be 1 to 16 ASCII letters or digits"
        )));
    }
    Ok(ext)
}

fn decode(text: &str) -> Result<String, Error> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| config_error("redis URL credentials or path are not valid UTF-8"))
}

/// The URL with the password shown as `***`.
impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match (&self.username, &self.password) {
            (Some(user), Some(_)) => format!("{user}:***@"),
            (None, Some(_)) => ":***@".to_owned(),
            (Some(user), None) => format!("{user}@"),
            (None, None) => String::new(),
        };
        let mut options = Vec::new();
        if self.prefix != DEFAULT_PREFIX {
            options.push(format!("prefix={}", self.prefix));
        }
        if self.timeout != DEFAULT_TIMEOUT {
            options.push(format!("timeout_ms={}", self.timeout.as_millis()));
        }
        if self.connect_timeout != DEFAULT_TIMEOUT {
            options.push(format!(
                "connect_timeout_ms={}",
                self.connect_timeout.as_millis()
            ));
        }
        if let Some(locks) = &self.weppcloud {
            options.push(format!("weppcloud_locks={}", locks.db));
            if locks.ext != "nodb" {
                options.push(format!("weppcloud_ext={}", locks.ext));
            }
        }
        if self.status_history != DEFAULT_STATUS_HISTORY {
            options.push(format!("status_history={}", self.status_history));
        }
        if let Some(age) = self.status_max_age {
            // Whole minutes from the URL; a finer age set in Rust shows
            // rounded up.
            options.push(format!(
                "status_minutes={}",
                age.as_secs().div_ceil(60).max(1)
            ));
        }
        if self.wait_replicas != 0 {
            options.push(format!("wait_replicas={}", self.wait_replicas));
            if self.wait_timeout != DEFAULT_WAIT_TIMEOUT {
                options.push(format!("wait_timeout_ms={}", self.wait_timeout.as_millis()));
            }
        }
        if let Some(ca) = &self.tls_ca {
            options.push(format!("tls_ca={}", ca.display()));
        }
        match &self.address {
            _ if !self.cluster.is_empty() => {
                let nodes: Vec<String> = self
                    .cluster
                    .iter()
                    .map(|(host, port)| {
                        if host.contains(':') {
                            format!("[{host}]:{port}")
                        } else {
                            format!("{host}:{port}")
                        }
                    })
                    .collect();
                write!(f, "redis+cluster://{auth}{}/", nodes.join(","))?;
            }
            Address::Tcp { host, port } => write!(f, "redis://{auth}{host}:{port}/{}", self.db)?,
            Address::Tls { host, port } => write!(f, "rediss://{auth}{host}:{port}/{}", self.db)?,
            Address::Unix(path) => {
                write!(f, "unix://{auth}{}", path.display())?;
                options.insert(0, format!("db={}", self.db));
            }
        }
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("address", &self.address)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("weppcloud", &self.weppcloud)
            .field("status_history", &self.status_history)
            .field("status_max_age", &self.status_max_age)
            .field("cluster", &self.cluster)
            .field("cluster_wanted", &self.cluster_wanted)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .finish()
    }
}

/// Makes *ring* (the provider this crate enables) rustls's process-wide
/// crypto provider unless one is installed already: once, before the
/// first TLS connection. With another provider compiled into the same
/// program (aws-lc-rs, which the S3 backend's HTTP client brings) rustls
/// cannot pick one by itself, and every TLS connection would fail with
/// "no process-level CryptoProvider available".
#[cfg(feature = "tls")]
pub(crate) fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing a race to another installer is fine: one is in place.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// `info` trusting the CAs of [`RedisConfig::with_tls_ca`] (and no
/// others), when set.
///
/// # Errors
/// `Config` when the file cannot be read or holds no usable certificate.
#[cfg(feature = "tls")]
pub(crate) fn with_tls_ca(
    info: redis::ConnectionInfo,
    config: &RedisConfig,
) -> Result<redis::ConnectionInfo, Error> {
    let Some(path) = &config.tls_ca else {
        return Ok(info);
    };
    let unusable = || format!("cannot use the CA file tls_ca={}", path.display());
    let pem = std::fs::read(path).map_err(|e| config_error(unusable()).with_source(e))?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    let client = redis::Client::build_with_tls(info, certificates)
        .map_err(|e| config_error(unusable()).with_source(e))?;
    Ok(client.get_connection_info().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use runstate_core::ErrorKind;

    const SENTINEL: &str = "s3ntinel-PASSWORD-9f8e";

    #[test]
    fn parses_the_documented_forms() {
        let c =
            RedisConfig::from_url("redis://127.0.0.1:6380/3?prefix=a:b&timeout_ms=250").unwrap();
        assert_eq!(
            c.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 6380
            }
        );
        assert_eq!(
            (c.db, c.prefix.as_str(), c.timeout),
            (3, "a:b", Duration::from_millis(250))
        );
        let c = RedisConfig::from_url("redis://localhost").unwrap();
        assert_eq!(
            c.address,
            Address::Tcp {
                host: "localhost".into(),
                port: 6379
            }
        );
        let c = RedisConfig::from_url("unix:///run/redis.sock?db=2").unwrap();
        assert_eq!(
            (c.address.clone(), c.db),
            (Address::Unix("/run/redis.sock".into()), 2)
        );
        let c = RedisConfig::from_url("redis://[::1]:7000/0?weppcloud_locks=0").unwrap();
        assert_eq!(
            c.address,
            Address::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert_eq!(
            c.weppcloud,
            Some(WeppcloudLocks {
                db: 0,
                ext: "nodb".into()
            })
        );
    }

    #[test]
    fn refuses_bad_input_clearly() {
        for (url, needle) in [
            ("http://x", "unknown URL scheme"),
            ("redis://x?bogus=1", "unknown redis URL option"),
            ("redis://x?prefix=a%7Bb", "key prefix"),
            ("redis://x/notanumber", "database"),
            ("redis://x?timeout_ms=0", "timeout_ms"),
            ("redis://x?weppcloud_ext=nodb", "weppcloud_locks"),
            ("redis://x?status_history=0", "status_history"),
            ("redis://x?status_history=many", "status_history"),
            ("redis://x?status_minutes=0", "status_minutes"),
            (
                "redis://x?timeout_ms=soon",
                "option timeout_ms must be a number of milliseconds from 1 to 2147483647, got \"soon\"",
            ),
            (
                "redis://x?connect_timeout_ms=0",
                "option connect_timeout_ms must be a number of milliseconds from 1 to",
            ),
            ("redis://x?db=-1", "option db must be a database number ≥ 0"),
            (
                "redis://x?weppcloud_locks=x",
                "option weppcloud_locks must be a database number ≥ 0",
            ),
            (
                "redis://x?status_history=1000001",
                "option status_history must be a whole number from 1 to 1000000",
            ),
            (
                "redis://x?status_minutes=525601",
                "option status_minutes must be a number of minutes from 1 to 525600",
            ),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
            // The same refusal with a password in the URL never shows it.
            let url = url.replacen("://", &format!("://admin:{SENTINEL}@"), 1);
            let err = RedisConfig::from_url(&url).unwrap_err();
            let shown = format!("{} {err:?}", runstate_core::display_chain(&err));
            assert!(!shown.contains(SENTINEL), "{shown}");
        }
        let err = RedisConfig::tcp("h", 1)
            .with_status_history(0, None)
            .unwrap_err();
        assert!(err.to_string().contains("from 1 to 1000000"), "{err}");
    }

    /// A cluster configuration built in Rust is refused as its URL would
    /// be: no seed, another database, WEPPcloud's locks (before: no seed
    /// opened one server at 127.0.0.1:6379 instead; the others failed
    /// later, inside the client or on every script, with `Backend`).
    #[tokio::test]
    async fn a_cluster_built_in_rust_is_checked_on_opening() {
        let seed = || vec![("127.0.0.1".to_owned(), 1)];
        for (config, needle) in [
            (RedisConfig::cluster(Vec::new()), "seed"),
            (RedisConfig::cluster(seed()).with_db(3), "database 0"),
            (
                RedisConfig::cluster(seed()).with_weppcloud_locks(WeppcloudLocks {
                    db: 13,
                    ext: "nodb".to_owned(),
                }),
                "standalone",
            ),
        ] {
            let Err(err) = crate::RedisStore::open(config).await else {
                panic!("{needle}: opened");
            };
            assert_eq!(err.kind(), runstate_core::ErrorKind::Config, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn cluster_urls() {
        let url = format!(
            "redis+cluster://u:{SENTINEL}@127.0.0.1:7000,127.0.0.1:7001/?prefix=p&wait_replicas=1&wait_timeout_ms=250"
        );
        let c = RedisConfig::from_url(&url).unwrap();
        assert_eq!(
            c.cluster_nodes(),
            &[
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
        assert_eq!(c.prefix(), "p");
        assert_eq!(c.wait_replicas(), (1, Duration::from_millis(250)));
        assert_eq!(c.password.as_ref().unwrap().expose(), SENTINEL);
        let shown = c.to_string();
        assert_eq!(
            shown,
            "redis+cluster://u:***@127.0.0.1:7000,127.0.0.1:7001/?prefix=p&wait_replicas=1&wait_timeout_ms=250"
        );
        assert!(!format!("{c:?}").contains(SENTINEL));
        let plain = RedisConfig::from_url("redis+cluster://h1:7000,[::1]:7001").unwrap();
        assert_eq!(plain.cluster_nodes()[1], ("::1".to_owned(), 7001));
        assert_eq!(RedisConfig::from_url(&plain.to_string()).unwrap(), plain);
        for (url, needle) in [
            ("redis+cluster://h:1/2", "database 0"),
            ("redis+cluster://h:1?weppcloud_locks=0", "standalone"),
            ("redis+cluster://h:1,:2", "node"),
            ("redis+cluster://h:1?wait_replicas=x", "wait_replicas"),
            ("redis://h:1?wait_timeout_ms=0", "wait_timeout_ms"),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn status_history_options() {
        let c = RedisConfig::from_url("redis://h").unwrap();
        assert_eq!(c.status_history(), (DEFAULT_STATUS_HISTORY, None));
        let c = RedisConfig::from_url("redis://h?status_history=50&status_minutes=90").unwrap();
        assert_eq!(c.status_history(), (50, Some(Duration::from_secs(90 * 60))));
        assert_eq!(
            c.to_string(),
            "redis://h:6379/0?status_history=50&status_minutes=90"
        );
        assert_eq!(RedisConfig::from_url(&c.to_string()).unwrap(), c);
    }

    /// A store prefix ending in `:cache` would share the keys of the cache
    /// beside the store it extends (and a purge of that store would take
    /// its documents): refused.
    #[test]
    fn a_prefix_ending_in_cache_is_refused() {
        for url in ["redis://h/0?prefix=p:cache", "redis://h/0?prefix=cache"] {
            let refused = RedisConfig::from_url(url);
            if url.ends_with(":cache") {
                let err = refused.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Config, "{err}");
            } else {
                refused.unwrap();
            }
        }
        assert!(RedisConfig::tcp("h", 1).with_prefix("p:cache").is_err());
        assert!(RedisConfig::tcp("h", 1).with_prefix("p:cache:x").is_ok());
    }

    #[test]
    fn password_never_shows() {
        let url = format!("redis://admin:{SENTINEL}@127.0.0.1:6379/1?prefix=p");
        let c = RedisConfig::from_url(&url).unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose(), SENTINEL);
        for shown in [c.to_string(), format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains(SENTINEL), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        let bad = format!("redis://admin:{SENTINEL}@[::1/");
        let err = RedisConfig::from_url(&bad).unwrap_err();
        assert!(!runstate_core::display_chain(&err).contains(SENTINEL));
        assert!(!format!("{err:?}").contains(SENTINEL));
        // A `/` left unencoded in a password makes its tail the URL's path,
        // which the refusal used to quote.
        for bad in [
            format!("redis://u:12/{SENTINEL}@h/0"),
            format!("redis+cluster://u:12/{SENTINEL}@h:7000,h:7001/"),
        ] {
            let err = RedisConfig::from_url(&bad).unwrap_err();
            let shown = format!("{} {err:?}", runstate_core::display_chain(&err));
            assert!(!shown.contains(SENTINEL), "{shown}");
        }
    }

    #[test]
    fn unknown_and_repeated_options_are_refused_by_name() {
        let url = format!("redis://:{SENTINEL}@h/0?prefix=p&colour={SENTINEL}");
        let err = RedisConfig::from_url(&url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let shown = format!("{} {err:?}", runstate_core::display_chain(&err));
        assert!(!shown.contains(SENTINEL), "{shown}");
        assert!(
            shown.contains(
                "unknown redis URL option \"colour\" (known: prefix, timeout_ms, \
                 connect_timeout_ms, db, weppcloud_locks, weppcloud_ext, status_history, \
                 status_minutes, wait_replicas, wait_timeout_ms, tls_ca)"
            ),
            "{shown}"
        );
        for url in [
            "redis://h?prefix=a&prefix=b",
            "redis://h?timeout_ms=5&timeout_ms=5",
            "unix:///run/redis.sock?db=1&db=2",
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(err.to_string().contains("given twice"), "{url}: {err}");
        }
    }

    #[test]
    fn percent_encoded_passwords_are_decoded() {
        let c = RedisConfig::from_url("redis://:p%40ss%2Fword@h").unwrap();
        assert_eq!(c.password.unwrap().expose(), "p@ss/word");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn rediss_names_the_missing_feature() {
        let err = RedisConfig::from_url("rediss://h").unwrap_err();
        assert!(err.to_string().contains("feature `tls`"), "{err}");
    }
}
