//! Opening a store by URL: [`open`], [`open_env`] and [`AnyStore`].

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use runstate_core::{
    Capabilities, Client, ClientConfig, Error, ErrorKind, Lock, Operation, Result, WaitPolicy,
};

use crate::doctor::{self, DoctorReport};

/// The environment variable [`open_env`] reads.
pub const URL_VAR: &str = "RUNSTATE_URL";

/// Options of the URL that the facade itself reads (and removes before the
/// backend parses the rest).
const TTL_OPTION: &str = "ttl_ms";
const WAIT_OPTION: &str = "wait_ms";
const LIMIT_OPTION: &str = "max_doc_bytes";
/// The lock service of a split store: documents in the URL's store,
/// leases from the store this option's value (a URL) names.
const LOCKS_OPTION: &str = "locks";
/// A cache in front of the store: `memory` or a Redis URL.
const CACHE_OPTION: &str = "cache";
/// The budget of a `cache=memory`, in bytes.
const CACHE_BYTES_OPTION: &str = "cache_bytes";

/// The backends `open` knows, whether or not their cargo feature is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// `file:` — the embedded file backend.
    File,
    /// `sqlite:` — SQLite through the SQL backend.
    Sqlite,
    /// `postgres:` / `postgresql:` — PostgreSQL through the SQL backend.
    Postgres,
    /// `mysql:` / `mariadb:` — MySQL or MariaDB through the SQL backend.
    Mysql,
    /// `redis:`, `rediss:`, `unix:` — the Redis backend.
    Redis,
    /// `s3:` — the S3 backend.
    S3,
    /// `memory:` — in this process's memory, no server and no files
    /// (`memory://name` shares one store per name within the process).
    Memory,
}

impl Scheme {
    /// Every scheme, in the order of the documentation.
    pub const ALL: [Scheme; 7] = [
        Scheme::File,
        Scheme::Sqlite,
        Scheme::Postgres,
        Scheme::Mysql,
        Scheme::Redis,
        Scheme::S3,
        Scheme::Memory,
    ];

    /// The backend's name (`file`, `sqlite`, `postgres`, `mysql`, `redis`,
    /// `s3`).
    pub fn name(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::Sqlite => "sqlite",
            Scheme::Postgres => "postgres",
            Scheme::Mysql => "mysql",
            Scheme::Redis => "redis",
            Scheme::S3 => "s3",
            Scheme::Memory => "memory",
        }
    }

    /// The URL schemes that select it.
    pub fn url_schemes(self) -> &'static [&'static str] {
        match self {
            Scheme::File => &["file"],
            Scheme::Sqlite => &["sqlite"],
            Scheme::Postgres => &["postgres", "postgresql"],
            Scheme::Mysql => &["mysql", "mariadb"],
            Scheme::Redis => &["redis", "rediss", "unix", "redis+unix"],
            Scheme::S3 => &["s3"],
            Scheme::Memory => &["memory"],
        }
    }

    /// The cargo feature of `runstate` that compiles it in (the memory
    /// store is always there).
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// Whether this build has it.
    pub fn enabled(self) -> bool {
        match self {
            Scheme::File => cfg!(feature = "file"),
            Scheme::Sqlite => cfg!(feature = "sqlite"),
            Scheme::Postgres => cfg!(feature = "postgres"),
            Scheme::Mysql => cfg!(feature = "mysql"),
            Scheme::Redis => cfg!(feature = "redis"),
            Scheme::S3 => cfg!(feature = "s3"),
            Scheme::Memory => true,
        }
    }

    /// The backend a URL names, whether or not its feature is on.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the URL has no scheme or an unknown one;
    /// the message lists the known schemes.
    pub fn of_url(url: &str) -> Result<Scheme> {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme)
            .filter(|s| !s.is_empty() && !s.contains(['/', '?', '@']))
            .ok_or_else(|| {
                config_error(format!(
                    "{} has no scheme (known: {})",
                    describe(url),
                    known_schemes()
                ))
            })?;
        let lower = scheme.to_ascii_lowercase();
        Scheme::ALL
            .into_iter()
            .find(|s| s.url_schemes().contains(&lower.as_str()))
            .ok_or_else(|| {
                config_error(format!(
                    "unknown URL scheme `{scheme}:` (known: {})",
                    known_schemes()
                ))
            })
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn known_schemes() -> String {
    Scheme::ALL
        .iter()
        .flat_map(|s| s.url_schemes().iter().map(|u| format!("{u}:")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn config_error(message: String) -> Error {
    Error::new(ErrorKind::Config, message).with_operation(Operation::Open)
}

/// A URL as it may be shown: the scheme and, when it parses, the URL with
/// its password and secret-looking options replaced by `***`.
fn describe(url: &str) -> String {
    format!("URL `{}`", redact_url(url))
}

/// `url` with every secret replaced by `***`: the password of the
/// authority, even one holding an unencoded `/`, `?` or `@`, and the values
/// of options whose names say they hold one (`password`, `secret`, `token`,
/// `key`, …). See [`runstate_core::secrets::redact_url`].
pub fn redact_url(url: &str) -> String {
    runstate_core::secrets::redact_url(url)
}

/// The facade's own URL options, and the URL without them.
struct Split {
    backend_url: String,
    client: ClientConfig,
}

fn split_options(url: &str) -> Result<Split> {
    let mut client = ClientConfig::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok(Split {
            backend_url: url.to_owned(),
            client,
        });
    };
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    let mut any_kept = false;
    let mut any_ours = false;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            TTL_OPTION => {
                client.ttl = parse_ms(&name, &value, Duration::from_millis(1))?;
                any_ours = true;
            }
            WAIT_OPTION => {
                client.wait = WaitPolicy::with_timeout(parse_ms(&name, &value, Duration::ZERO)?);
                any_ours = true;
            }
            LIMIT_OPTION => {
                client.limit = value
                    .parse::<u64>()
                    .ok()
                    .filter(|l| *l > 0)
                    .ok_or_else(|| {
                        config_error(format!(
                            "URL option {LIMIT_OPTION}={value:?} must be a positive number of bytes"
                        ))
                    })?;
                any_ours = true;
            }
            _ => {
                kept.append_pair(&name, &value);
                any_kept = true;
            }
        }
    }
    // Leave the URL untouched unless an option had to come out, so the
    // backend sees exactly what the user wrote.
    let backend_url = match (any_ours, any_kept) {
        (false, _) => url.to_owned(),
        (true, false) => base.to_owned(),
        (true, true) => format!("{base}?{}", kept.finish()),
    };
    Ok(Split {
        backend_url,
        client,
    })
}

/// Fails, naming the path, when a `sqlite:` URL names a database file that
/// does not exist (SQLite's own error says only "unable to open").
fn sqlite_file_exists(url: &str) -> Result<()> {
    let rest = url.split_once(':').map_or("", |(_, rest)| rest);
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() || path.starts_with(":memory:") || std::path::Path::new(path).exists() {
        return Ok(());
    }
    Err(config_error(format!("no SQLite database at {path}"))
        .with_source(std::io::Error::from(std::io::ErrorKind::NotFound)))
}

/// Whether `error` says only that the store a URL names does not exist: a
/// missing file root or SQLite database under [`OpenMode::Existing`] (a
/// [`Config`](ErrorKind::Config) error caused by a missing path). A bad
/// URL, an unknown scheme or a disabled feature is not this.
pub fn is_missing_store(error: &Error) -> bool {
    error.kind() == ErrorKind::Config
        && std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
}

/// `url` with `name=value` added, unless the URL sets that option itself.
fn with_default_option(url: &str, name: &str, value: &str) -> String {
    match url.split_once('?') {
        Some((_, query)) => {
            if url::form_urlencoded::parse(query.as_bytes()).any(|(n, _)| n == name) {
                url.to_owned()
            } else {
                format!("{url}&{name}={value}")
            }
        }
        None => format!("{url}?{name}={value}"),
    }
}

fn parse_ms(name: &str, value: &str, min: Duration) -> Result<Duration> {
    value
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d >= min && *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| {
            config_error(format!(
                "URL option {name}={value:?} must be a number of milliseconds from {} to 86400000",
                min.as_millis()
            ))
        })
}

/// An opened store of any backend: the [`Lock`] (and so [`Store`](runstate_core::Store)) it
/// implements, which backend it is, its URL with secrets redacted, and the
/// client defaults the URL set.
///
/// It dereferences to `dyn Lock`, so every store and lease operation is
/// called on it directly.
#[derive(Clone)]
pub struct AnyStore {
    lock: Arc<dyn Lock>,
    health: crate::layers::Health,
    scheme: Scheme,
    shown_url: String,
    client: ClientConfig,
    #[cfg(feature = "s3")]
    s3: Option<runstate_s3::S3Store>,
}

impl AnyStore {
    /// Wraps a store opened by hand (for example with settings a URL cannot
    /// express), so it can be used wherever an `AnyStore` is expected.
    pub fn from_lock(lock: Arc<dyn Lock>, scheme: Scheme, shown_url: impl Into<String>) -> Self {
        let health = crate::layers::Health::new();
        AnyStore {
            // Observed like every opened store, so `health()` sees its calls.
            lock: Arc::new(crate::layers::Observed::new(
                lock,
                (crate::layers::Tracing, health.clone()),
            )),
            health,
            scheme,
            shown_url: redact_url(&shown_url.into()),
            client: ClientConfig::default(),
            #[cfg(feature = "s3")]
            s3: None,
        }
    }

    /// The store and its leases.
    pub fn lock(&self) -> &Arc<dyn Lock> {
        &self.lock
    }

    /// The store and its leases, by value.
    pub fn into_lock(self) -> Arc<dyn Lock> {
        self.lock
    }

    /// Which backend it is.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Its URL, with passwords and secret options replaced by `***`.
    pub fn url(&self) -> &str {
        &self.shown_url
    }

    /// The client settings the URL chose (`ttl_ms`, `wait_ms`,
    /// `max_doc_bytes`; the defaults otherwise), with a new owner for this
    /// process.
    pub fn client_config(&self) -> &ClientConfig {
        &self.client
    }

    /// A typed client on this store with the URL's settings.
    pub fn client(&self) -> Client {
        Client::with_config(Arc::clone(&self.lock), self.client.clone())
    }

    /// How this store has been doing, from every call made through this
    /// handle (and its clones): ok / degraded / failing, the last error,
    /// latency percentiles per operation, calls in flight and failed lease
    /// renewals. See [`layers::Health`](crate::layers::Health).
    pub fn health(&self) -> crate::layers::HealthReport {
        self.health.report()
    }

    /// Probes what this backend honours, on a scratch run it removes
    /// afterwards: see [`doctor::probe`]. For S3 it also races conflicting
    /// conditional writes, which some S3-compatible servers accept both of.
    ///
    /// # Errors
    /// A backend failure that stops the probe itself (an unreachable
    /// server); a check that fails is a failed check in the report, not an
    /// error.
    pub async fn doctor(&self) -> Result<DoctorReport> {
        #[allow(unused_mut)] // only S3 adds checks of its own
        let mut report = doctor::probe(&*self.lock).await?;
        #[cfg(feature = "s3")]
        if let Some(s3) = &self.s3 {
            let found = s3.doctor().await?;
            report.push_check(
                "server honours create-only writes (If-None-Match)",
                found.create_only,
                "",
            );
            report.push_check(
                "server honours update-if-match writes (If-Match)",
                found.update_if_match,
                "",
            );
            report.push_check(
                "exactly one of racing conditional writes wins",
                found.exclusive_race,
                "",
            );
        }
        Ok(report)
    }
}

impl Deref for AnyStore {
    type Target = dyn Lock;

    fn deref(&self) -> &Self::Target {
        &*self.lock
    }
}

impl fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL, redacted, says everything the backend's own `Debug`
        // would, without trusting every backend to redact.
        f.debug_struct("AnyStore")
            .field("scheme", &self.scheme)
            .field("url", &self.shown_url)
            .finish_non_exhaustive()
    }
}

/// Opens the store a URL names (see the [crate documentation](crate#urls)
/// for the schemes and options).
///
/// ```no_run
/// # async fn demo() -> runstate::Result<()> {
/// let store = runstate::open("sqlite:///var/lib/runs/state.db?ttl_ms=60000").await?;
/// println!("{} runs", runstate::StoreExt::list_all_runs(&*store).await?.len());
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`ErrorKind::Config`] for a URL without a scheme or with an unknown one
/// (the message lists the known schemes), for a scheme whose cargo feature
/// is off (the message names the feature to enable), and for a bad option;
/// the backend's own errors when it cannot be reached or set up. URLs are
/// shown with their secrets redacted.
pub async fn open(url: &str) -> Result<AnyStore> {
    open_with(url, OpenMode::Create).await
}

/// Whether opening may create the store itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OpenMode {
    /// Create what is missing: the file backend's root folder, the SQLite
    /// database file (the default, as [`open`] does).
    #[default]
    Create,
    /// Open only a store that exists: a missing root folder or SQLite file
    /// is an error and nothing is created, for tools that only read (a
    /// typo in a URL must not leave an empty store behind). Server
    /// databases still get runstate's tables on first use, unless the URL
    /// says `migrate=false`.
    Existing,
}

/// [`open`], choosing whether a missing store may be created.
///
/// # Errors
/// As [`open`]; with [`OpenMode::Existing`], a missing root folder or
/// SQLite database file is a [`Config`](ErrorKind::Config) error.
pub async fn open_with(url: &str, mode: OpenMode) -> Result<AnyStore> {
    let scheme = Scheme::of_url(url)?;
    if !scheme.enabled() {
        return Err(feature_off(scheme, scheme.feature()));
    }
    if url.to_ascii_lowercase().starts_with("rediss:") && !cfg!(feature = "redis-tls") {
        return Err(feature_off(scheme, "redis-tls"));
    }
    runstate_core::secrets::check_userinfo(url).map_err(|e| e.with_operation(Operation::Open))?;
    let Split {
        backend_url,
        client,
    } = split_options(url)?;
    let backend_url = match (mode, scheme) {
        (OpenMode::Existing, Scheme::File) => with_default_option(&backend_url, "create", "false"),
        (OpenMode::Existing, Scheme::Sqlite) => {
            sqlite_file_exists(&backend_url)?;
            with_default_option(&backend_url, "mode", "rw")
        }
        _ => backend_url,
    };
    let shown_url = redact_url(url);
    let (backend_url, locks_url) = take_option(&backend_url, LOCKS_OPTION);
    let (backend_url, cache_url) = take_option(&backend_url, CACHE_OPTION);
    let (backend_url, cache_bytes) = take_option(&backend_url, CACHE_BYTES_OPTION);
    let mut store = open_backend(scheme, &backend_url)
        .await
        .map_err(|e| e.with_operation(Operation::Open))?;
    let weppcloud = locks_url.as_deref().is_some_and(is_weppcloud_url);
    if let (true, Some(locks_url)) = (weppcloud, &locks_url) {
        // WEPPcloud's own Redis as the lock service of its run folders.
        store.lock = open_weppcloud(scheme, &backend_url, Arc::clone(&store.lock), locks_url)
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
    } else if let Some(locks_url) = locks_url {
        // The lock service may be any backend; it is created if missing
        // (its state is leases only).
        let locks = Box::pin(open_with(&locks_url, OpenMode::Create))
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        let docs: Arc<dyn runstate_core::Store> = Arc::clone(&store.lock) as _;
        let mut split = crate::split::SplitStore::new(docs, locks.into_lock())?;
        if scheme == Scheme::File {
            // WEPPcloud's lock files, held in the run folders.
            split = split.with_document_locks(Arc::clone(&store.lock));
        }
        store.lock = Arc::new(split);
    }
    if let Some(cache) = open_cache(cache_url, cache_bytes).await? {
        store.lock = Arc::new(crate::cache::CachedStore::new(
            Arc::clone(&store.lock),
            cache,
        ));
    }
    // Every call is traced (one span each, at DEBUG) and counted for
    // `health()`.
    store.lock = Arc::new(crate::layers::Observed::new(
        Arc::clone(&store.lock),
        (crate::layers::Tracing, store.health.clone()),
    ));
    store.shown_url = shown_url;
    store.client = client;
    Ok(store)
}

/// Whether a lock service URL asks for WEPPcloud's locks
/// (`redis://…?weppcloud=true`).
fn is_weppcloud_url(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        url::form_urlencoded::parse(query.as_bytes()).any(|(name, _)| name == "weppcloud")
    })
}

/// A split store of WEPPcloud run folders (a file store) and WEPPcloud's
/// NoDb locks (see [`crate::weppcloud`]).
#[allow(unused_variables)] // without the file and redis features
async fn open_weppcloud(
    scheme: Scheme,
    file_url: &str,
    docs: Arc<dyn Lock>,
    locks_url: &str,
) -> Result<Arc<dyn Lock>> {
    if scheme != Scheme::File {
        return Err(config_error(format!(
            "a WEPPcloud lock service (weppcloud=true) serves WEPPcloud's run folders: its \
             document store must be a file: URL, not {scheme}:"
        )));
    }
    #[cfg(all(feature = "file", feature = "redis"))]
    {
        crate::weppcloud::compose(file_url, docs, locks_url).await
    }
    #[cfg(not(all(feature = "file", feature = "redis")))]
    {
        Err(feature_off(Scheme::Redis, "redis"))
    }
}

/// The cache a URL's `cache` option asks for: `memory` (with
/// `cache_bytes`, 64 MiB by default) or a `redis://` URL (the `redis`
/// feature).
async fn open_cache(
    cache: Option<String>,
    bytes: Option<String>,
) -> Result<Option<Arc<dyn runstate_core::Cache>>> {
    let budget = match bytes {
        Some(bytes) => Some(bytes.parse::<u64>().ok().filter(|b| *b > 0).ok_or_else(|| {
            config_error(format!(
                "URL option {CACHE_BYTES_OPTION}={bytes:?} must be a positive number of bytes"
            ))
        })?),
        None => None,
    };
    let Some(cache) = cache else {
        if budget.is_some() {
            return Err(config_error(format!(
                "URL option {CACHE_BYTES_OPTION} needs {CACHE_OPTION}=memory"
            )));
        }
        return Ok(None);
    };
    if cache == "memory" {
        let budget = budget.unwrap_or(64 * 1024 * 1024);
        return Ok(Some(Arc::new(crate::cache::MemoryCache::new(budget))));
    }
    match Scheme::of_url(&cache) {
        #[cfg(feature = "redis")]
        Ok(Scheme::Redis) => {
            let cache = runstate_redis::RedisCache::connect(&cache).await?;
            Ok(Some(Arc::new(cache)))
        }
        #[cfg(not(feature = "redis"))]
        Ok(Scheme::Redis) => Err(feature_off(Scheme::Redis, "redis")),
        _ => Err(config_error(format!(
            "URL option {CACHE_OPTION} must be `memory` or a redis:// URL, not {}",
            describe(&cache)
        ))),
    }
}

/// `url` without the option `name`, and that option's (decoded) value.
fn take_option(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    let mut any_kept = false;
    for (n, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if n == name {
            value = Some(v.into_owned());
        } else {
            kept.append_pair(&n, &v);
            any_kept = true;
        }
    }
    match (value, any_kept) {
        (None, _) => (url.to_owned(), None),
        (Some(v), false) => (base.to_owned(), Some(v)),
        (Some(v), true) => (format!("{base}?{}", kept.finish()), Some(v)),
    }
}

/// Opens the store named by the `RUNSTATE_URL` environment variable.
///
/// # Errors
/// [`ErrorKind::Config`] when it is unset or not UTF-8; otherwise as
/// [`open`].
pub async fn open_env() -> Result<AnyStore> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => open(&url).await,
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(config_error(format!(
            "{URL_VAR} is not set: set it to a store URL such as file:///var/lib/runs"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(config_error(format!("{URL_VAR} is not valid UTF-8")))
        }
    }
}

fn feature_off(scheme: Scheme, feature: &str) -> Error {
    config_error(format!(
        "the {} backend is not compiled in: enable the cargo feature `{feature}` of runstate \
         (runstate = {{ version = \"…\", features = [\"{feature}\"] }})",
        scheme.name()
    ))
}

fn wrap(lock: Arc<dyn Lock>, scheme: Scheme) -> AnyStore {
    AnyStore {
        lock,
        health: crate::layers::Health::new(),
        scheme,
        shown_url: String::new(),
        client: ClientConfig::default(),
        #[cfg(feature = "s3")]
        s3: None,
    }
}

async fn open_backend(scheme: Scheme, url: &str) -> Result<AnyStore> {
    match scheme {
        #[cfg(feature = "file")]
        Scheme::File => {
            let config = runstate_file::FileConfig::from_url(url)?;
            let store = runstate_file::FileStore::open(config).await?;
            Ok(wrap(Arc::new(store), scheme))
        }
        #[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
        Scheme::Sqlite | Scheme::Postgres | Scheme::Mysql => {
            let store = runstate_sql::SqlStore::connect(url).await?;
            Ok(wrap(Arc::new(store), scheme))
        }
        #[cfg(feature = "redis")]
        Scheme::Redis => {
            let store = runstate_redis::RedisStore::connect(url).await?;
            Ok(wrap(Arc::new(store), scheme))
        }
        #[cfg(feature = "s3")]
        Scheme::S3 => {
            let store = runstate_s3::S3Store::connect(url).await?;
            let mut any = wrap(Arc::new(store.clone()), scheme);
            any.s3 = Some(store);
            Ok(any)
        }
        Scheme::Memory => {
            let name = memory_name(url)?;
            let store = match name {
                Some(name) => runstate_core::memory::MemoryStore::named(&name),
                None => runstate_core::memory::MemoryStore::new(),
            };
            Ok(wrap(Arc::new(store), scheme))
        }
        #[allow(unreachable_patterns)] // every scheme compiled in
        _ => Err(feature_off(scheme, scheme.feature())),
    }
}

/// The store name of a `memory:` URL: `memory://name` (or `memory:name`);
/// `None` for `memory://` (a store of its own).
fn memory_name(url: &str) -> Result<Option<String>> {
    let rest = url.split_once(':').map_or("", |(_, rest)| rest);
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
    if let Some((option, _)) = url::form_urlencoded::parse(query.as_bytes()).next() {
        return Err(config_error(format!(
            "unknown memory URL option {option:?} (it has none besides ttl_ms, wait_ms and max_doc_bytes)"
        )));
    }
    let name = name.trim_end_matches('/');
    if name.is_empty() {
        return Ok(None);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(config_error(format!(
            "memory store name {name:?} must be made of [A-Za-z0-9._-]"
        )));
    }
    Ok(Some(name.to_owned()))
}

/// What a backend declares, as shown by `runstate doctor`.
pub(crate) fn capability_rows(capabilities: &Capabilities) -> Vec<(&'static str, String)> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    vec![
        ("backend", capabilities.backend.to_owned()),
        ("conditional put", yes_no(capabilities.conditional_put)),
        (
            "conditional delete",
            yes_no(capabilities.conditional_delete),
        ),
        ("leases", yes_no(capabilities.leases)),
        ("fencing", format!("{:?}", capabilities.fencing)),
        (
            "max document size",
            capabilities
                .max_document_size
                .map_or_else(|| "none".to_owned(), |m| format!("{m} bytes")),
        ),
        ("multi-host", yes_no(capabilities.multi_host)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_recognised_case_insensitively() {
        assert_eq!(Scheme::of_url("file:///x").ok(), Some(Scheme::File));
        assert_eq!(
            Scheme::of_url("POSTGRESQL://h/db").ok(),
            Some(Scheme::Postgres)
        );
        assert_eq!(Scheme::of_url("mariadb://h/db").ok(), Some(Scheme::Mysql));
        assert_eq!(Scheme::of_url("rediss://h").ok(), Some(Scheme::Redis));
        assert_eq!(
            Scheme::of_url("unix:///tmp/r.sock").ok(),
            Some(Scheme::Redis)
        );
        assert_eq!(Scheme::of_url("s3://bucket/p").ok(), Some(Scheme::S3));
    }

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let error = Scheme::of_url("ftp://host/x").expect_err("unknown");
        assert_eq!(error.kind(), ErrorKind::Config);
        let message = error.to_string();
        for scheme in ["file:", "sqlite:", "postgres:", "mysql:", "redis:", "s3:"] {
            assert!(message.contains(scheme), "{message}");
        }
        let error = Scheme::of_url("/just/a/path").expect_err("no scheme");
        assert!(error.to_string().contains("has no scheme"), "{error}");
    }

    #[test]
    fn a_backend_left_out_names_its_feature() {
        let error = feature_off(Scheme::Redis, "redis-tls");
        assert_eq!(error.kind(), ErrorKind::Config);
        let message = error.to_string();
        assert!(message.contains("cargo feature `redis-tls`"), "{message}");
        assert!(message.contains("features = [\"redis-tls\"]"), "{message}");
        for scheme in Scheme::ALL {
            assert_eq!(scheme.feature(), scheme.name());
        }
    }

    #[test]
    fn facade_options_are_taken_out() {
        let split = split_options("redis://h/0?prefix=a&ttl_ms=1500&wait_ms=0&max_doc_bytes=99")
            .expect("valid");
        assert_eq!(split.backend_url, "redis://h/0?prefix=a");
        assert_eq!(split.client.ttl, Duration::from_millis(1500));
        assert_eq!(split.client.wait.timeout, Duration::ZERO);
        assert_eq!(split.client.limit, 99);
        let untouched = split_options("postgres://u:p%40ss@h/db?sslmode=disable").expect("valid");
        assert_eq!(
            untouched.backend_url,
            "postgres://u:p%40ss@h/db?sslmode=disable"
        );
        let only = split_options("file:///x?ttl_ms=10").expect("valid");
        assert_eq!(only.backend_url, "file:///x");
        for bad in [
            "file:///x?ttl_ms=0",
            "file:///x?wait_ms=-1",
            "file:///x?max_doc_bytes=0",
        ] {
            let error = split_options(bad).err().expect(bad);
            assert_eq!(error.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let shown =
            redact_url("postgres://app:hunter2@db.example/runs?sslmode=require&sslpassword=x1");
        assert!(
            !shown.contains("hunter2") && !shown.contains("x1"),
            "{shown}"
        );
        assert!(shown.contains("app:***@db.example"), "{shown}");
        assert_eq!(redact_url("not a url hunter2"), "…");
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    }
}
