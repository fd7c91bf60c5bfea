//! Opening a store by URL: [`open`], [`open_env`] and [`AnyStore`].

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use runstate_core::options::UrlOptions;
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
/// Every option the facade takes out of a URL.
const FACADE_OPTIONS: [&str; 6] = [
    TTL_OPTION,
    WAIT_OPTION,
    LIMIT_OPTION,
    LOCKS_OPTION,
    CACHE_OPTION,
    CACHE_BYTES_OPTION,
];
/// On a lock service's URL: its leases are WEPPcloud's NoDb locks.
const WEPPCLOUD_OPTION: &str = "weppcloud";

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
    /// `s3:` — the S3 backend; also `gs:` (Google Cloud Storage, feature
    /// `gcs`) and `az:` (Azure Blob Storage, feature `azure`), which it
    /// serves through object_store's clients for them.
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
            Scheme::Redis => &["redis", "rediss", "unix", "redis+unix", "redis+cluster"],
            Scheme::S3 => &["s3", "gs", "az"],
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

/// The largest `ttl_ms` and `wait_ms`: a day.
const MAX_MS: Duration = Duration::from_secs(24 * 3600);

/// The facade's own URL options (taken out before the backend parses the
/// rest), and the URL without them.
struct FacadeOptions {
    /// The URL the backend opens: the one given when none of the facade's
    /// options was in it (so the backend sees exactly what the user wrote),
    /// else rebuilt from the options left.
    backend_url: String,
    ttl: Option<Duration>,
    wait: Option<Duration>,
    limit: Option<u64>,
    locks: Option<String>,
    cache: Option<String>,
    cache_bytes: Option<u64>,
}

impl fmt::Debug for FacadeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URLs may hold passwords: shown redacted.
        let shown = |url: &Option<String>| url.as_deref().map(redact_url);
        f.debug_struct("FacadeOptions")
            .field("backend_url", &redact_url(&self.backend_url))
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .field("limit", &self.limit)
            .field("locks", &shown(&self.locks))
            .field("cache", &shown(&self.cache))
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

impl FacadeOptions {
    /// Takes the facade's options out of `url` (a URL of `scheme`).
    ///
    /// # Errors
    /// `Config` for a bad value, a name given twice, or an option that does
    /// not decode; on a `memory:` URL, for any option not the facade's
    /// (the memory store has none of its own). Values of options whose
    /// names say they hold secrets are never shown.
    fn parse(scheme: Scheme, url: &str) -> Result<FacadeOptions> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let open = |e: Error| e.with_operation(Operation::Open);
        let mut options = UrlOptions::parse(scheme.name(), query).map_err(open)?;
        let ours = FACADE_OPTIONS.iter().any(|name| options.contains(name));
        let ttl = options
            .take_ms(TTL_OPTION, Duration::from_millis(1)..=MAX_MS)
            .map_err(open)?;
        let wait = options
            .take_ms(WAIT_OPTION, Duration::ZERO..=MAX_MS)
            .map_err(open)?;
        let limit = options.take_u64(LIMIT_OPTION, 1..=u64::MAX).map_err(open)?;
        let locks = options.take(LOCKS_OPTION);
        let cache = options.take(CACHE_OPTION);
        let cache_bytes = options
            .take_u64(CACHE_BYTES_OPTION, 1..=u64::MAX)
            .map_err(open)?;
        if scheme == Scheme::Memory {
            // Every option the memory store has is the facade's: anything
            // left is refused by name, the known ones listed.
            options.finish().map_err(open)?;
            return Ok(FacadeOptions {
                backend_url: base.to_owned(),
                ttl,
                wait,
                limit,
                locks,
                cache,
                cache_bytes,
            });
        }
        let backend_url = if ours {
            with_query(base, &options.into_rest())
        } else {
            url.to_owned()
        };
        Ok(FacadeOptions {
            backend_url,
            ttl,
            wait,
            limit,
            locks,
            cache,
            cache_bytes,
        })
    }

    /// The client settings these options choose.
    fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::default();
        if let Some(ttl) = self.ttl {
            client.ttl = ttl;
        }
        if let Some(wait) = self.wait {
            client.wait = WaitPolicy::with_timeout(wait);
        }
        if let Some(limit) = self.limit {
            client.limit = limit;
        }
        client
    }

    /// Checks the options of a lock service's URL (the value of `locks`)
    /// and moves its lease settings (`ttl_ms`, `wait_ms`, which belong to
    /// the leases) to `outer`, the document store's options.
    ///
    /// # Errors
    /// `Config` for an option that has no meaning on a lock service
    /// (`locks`, `cache`, `cache_bytes`, `max_doc_bytes`: they go on the
    /// document store's URL) and for a lease setting given on both URLs.
    fn lend_to(&self, outer: &mut FacadeOptions) -> Result<()> {
        for (name, given) in [
            (LOCKS_OPTION, self.locks.is_some()),
            (CACHE_OPTION, self.cache.is_some()),
            (CACHE_BYTES_OPTION, self.cache_bytes.is_some()),
            (LIMIT_OPTION, self.limit.is_some()),
        ] {
            if given {
                return Err(config_error(format!(
                    "URL option {name} is for the document store's URL, not inside {LOCKS_OPTION}="
                )));
            }
        }
        for (name, inner, outer) in [
            (TTL_OPTION, self.ttl, &mut outer.ttl),
            (WAIT_OPTION, self.wait, &mut outer.wait),
        ] {
            match (inner, &outer) {
                (Some(_), Some(_)) => {
                    return Err(config_error(format!(
                        "URL option {name} is given both on the document store's URL and inside \
                         {LOCKS_OPTION}=: give it once"
                    )));
                }
                (Some(inner), None) => *outer = Some(inner),
                (None, _) => {}
            }
        }
        Ok(())
    }
}

/// `base` with `options` as its query (form-encoded).
fn with_query(base: &str, options: &[(String, String)]) -> String {
    if options.is_empty() {
        return base.to_owned();
    }
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in options {
        query.append_pair(name, value);
    }
    format!("{base}?{}", query.finish())
}

/// `url` with `name=value` added, unless the URL sets that option itself.
///
/// # Errors
/// `Config` when the URL's options do not parse (see [`UrlOptions::parse`]).
fn with_default_option(scheme: Scheme, url: &str, name: &str, value: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let options =
        UrlOptions::parse(scheme.name(), query).map_err(|e| e.with_operation(Operation::Open))?;
    if options.contains(name) {
        return Ok(url.to_owned());
    }
    Ok(match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("{base}?{query}&{name}={value}"),
        None => format!("{base}?{name}={value}"),
    })
}

/// What the `weppcloud` option of a lock service's URL asks for.
///
/// # Errors
/// `Config` for a value that is not true or false.
fn weppcloud_mode(scheme: Scheme, lock_url: &str) -> Result<(bool, String)> {
    let (base, query) = match lock_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (lock_url, None),
    };
    let open = |e: Error| e.with_operation(Operation::Open);
    let mut options = UrlOptions::parse(scheme.name(), query).map_err(open)?;
    match options.take_bool(WEPPCLOUD_OPTION).map_err(open)? {
        Some(true) => Ok((true, lock_url.to_owned())),
        // `weppcloud=false` is a plain lock service: the option goes.
        Some(false) => Ok((false, with_query(base, &options.into_rest()))),
        None => Ok((false, lock_url.to_owned())),
    }
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

/// `url` with its scheme in lower case, when it names one
/// ([`Scheme::of_url`]); otherwise as it is.
fn lower_scheme(url: &str) -> String {
    match url.split_once(':') {
        Some((scheme, rest)) if Scheme::of_url(url).is_ok() => {
            format!("{}:{rest}", scheme.to_ascii_lowercase())
        }
        _ => url.to_owned(),
    }
}

/// [`open`], choosing whether a missing store may be created.
///
/// # Errors
/// As [`open`]; with [`OpenMode::Existing`], a missing root folder or
/// SQLite database file is a [`Config`](ErrorKind::Config) error.
pub async fn open_with(url: &str, mode: OpenMode) -> Result<AnyStore> {
    let scheme = usable_scheme(url)?;
    // Schemes are told apart case-insensitively (RFC 3986), and each
    // backend reads its URL with the scheme in lower case.
    let url = &lower_scheme(url);
    let mut options = FacadeOptions::parse(scheme, url)?;
    // The lock service's URL is checked before anything is opened, and
    // its lease settings become the client's.
    let lock_service = match options.locks.take().map(|url| lower_scheme(&url)) {
        Some(lock_url) => {
            let lock_scheme = usable_scheme(&lock_url)?;
            let (weppcloud, lock_url) = weppcloud_mode(lock_scheme, &lock_url)?;
            let lock_options = FacadeOptions::parse(lock_scheme, &lock_url)?;
            lock_options.lend_to(&mut options)?;
            Some((weppcloud, lock_options.backend_url))
        }
        None => None,
    };
    let budget = cache_budget(options.cache.as_deref(), options.cache_bytes)?;
    let backend_url = match (mode, scheme) {
        (OpenMode::Existing, Scheme::File) => {
            with_default_option(scheme, &options.backend_url, "create", "false")?
        }
        (OpenMode::Existing, Scheme::Sqlite) => {
            sqlite_file_exists(&options.backend_url)?;
            with_default_option(scheme, &options.backend_url, "mode", "rw")?
        }
        _ => options.backend_url.clone(),
    };
    let mut store = open_backend(scheme, &backend_url)
        .await
        .map_err(|e| e.with_operation(Operation::Open))?;
    match lock_service {
        Some((true, lock_url)) => {
            // WEPPcloud's own Redis as the lock service of its run folders.
            store.lock = open_weppcloud(scheme, &backend_url, Arc::clone(&store.lock), &lock_url)
                .await
                .map_err(|e| e.with_operation(Operation::Open))?;
        }
        Some((false, lock_url)) => {
            // The lock service may be any backend, opened as the store is:
            // under `Existing`, a mistyped lock service is refused, not
            // created.
            let locks = Box::pin(open_with(&lock_url, mode))
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
        None => {}
    }
    if let Some(cache) = open_cache(options.cache.as_deref(), budget).await? {
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
    store.shown_url = redact_url(url);
    store.client = options.client();
    Ok(store)
}

/// The backend `url` names, checked to be compiled in, and its user info
/// checked to parse.
///
/// # Errors
/// `Config` for an unknown scheme, a backend (or Redis TLS) whose cargo
/// feature is off, or user info that does not parse.
fn usable_scheme(url: &str) -> Result<Scheme> {
    let scheme = Scheme::of_url(url)?;
    if !scheme.enabled() {
        return Err(feature_off(scheme, scheme.feature()));
    }
    if url.to_ascii_lowercase().starts_with("rediss:") && !cfg!(feature = "redis-tls") {
        return Err(feature_off(scheme, "redis-tls"));
    }
    runstate_core::secrets::check_userinfo(url).map_err(|e| e.with_operation(Operation::Open))?;
    Ok(scheme)
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

/// The default budget of `cache=memory`: 64 MiB.
const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The byte budget of the in-process cache `cache` asks for, if it asks
/// for one.
///
/// # Errors
/// `Config` for `cache_bytes` without `cache=memory` (a Redis cache has
/// no budget of runstate's: its server's `maxmemory` is).
fn cache_budget(cache: Option<&str>, bytes: Option<u64>) -> Result<Option<u64>> {
    match (cache, bytes) {
        (Some("memory"), bytes) => Ok(Some(bytes.unwrap_or(DEFAULT_CACHE_BYTES))),
        (_, None) => Ok(None),
        (_, Some(_)) => Err(config_error(format!(
            "URL option {CACHE_BYTES_OPTION} is the budget of {CACHE_OPTION}=memory; it needs \
             that option (a Redis cache's budget is its server's maxmemory)"
        ))),
    }
}

/// The cache a URL's `cache` option asks for: `memory` (with the budget
/// [`cache_budget`] found) or a `redis://` URL (the `redis` feature).
async fn open_cache(
    cache: Option<&str>,
    budget: Option<u64>,
) -> Result<Option<Arc<dyn runstate_core::Cache>>> {
    let Some(cache) = cache else {
        return Ok(None);
    };
    if cache == "memory" {
        let budget = budget.unwrap_or(DEFAULT_CACHE_BYTES);
        return Ok(Some(Arc::new(crate::cache::MemoryCache::new(budget))));
    }
    let cache = &lower_scheme(cache);
    match Scheme::of_url(cache) {
        #[cfg(feature = "redis")]
        Ok(Scheme::Redis) => {
            usable_scheme(cache)?;
            let cache = runstate_redis::RedisCache::connect(cache)
                .await
                .map_err(|e| e.with_operation(Operation::Open))?;
            Ok(Some(Arc::new(cache)))
        }
        #[cfg(not(feature = "redis"))]
        Ok(Scheme::Redis) => Err(feature_off(Scheme::Redis, "redis")),
        _ => Err(config_error(format!(
            "URL option {CACHE_OPTION} must be `memory` or a redis:// URL, not {}",
            describe(cache)
        ))),
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

/// The store name of a `memory:` URL (its options already taken by
/// [`FacadeOptions::parse`]): `memory://name` (or `memory:name`); `None`
/// for `memory://` (a store of its own).
fn memory_name(url: &str) -> Result<Option<String>> {
    let rest = url.split_once(':').map_or("", |(_, rest)| rest);
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let name = rest.split_once('?').map_or(rest, |(name, _)| name);
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
        assert_eq!(Scheme::of_url("gs://bucket/p").ok(), Some(Scheme::S3));
        assert_eq!(Scheme::of_url("az://container/p").ok(), Some(Scheme::S3));
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

    fn facade(url: &str) -> Result<FacadeOptions> {
        FacadeOptions::parse(Scheme::of_url(url)?, url)
    }

    #[test]
    fn facade_options_are_taken_out() {
        let split =
            facade("redis://h/0?prefix=a&ttl_ms=1500&wait_ms=0&max_doc_bytes=99").expect("valid");
        assert_eq!(split.backend_url, "redis://h/0?prefix=a");
        let client = split.client();
        assert_eq!(client.ttl, Duration::from_millis(1500));
        assert_eq!(client.wait.timeout, Duration::ZERO);
        assert_eq!(client.limit, 99);
        let untouched = facade("postgres://u:p%40ss@h/db?sslmode=disable").expect("valid");
        assert_eq!(
            untouched.backend_url,
            "postgres://u:p%40ss@h/db?sslmode=disable"
        );
        let only = facade("file:///x?ttl_ms=10").expect("valid");
        assert_eq!(only.backend_url, "file:///x");
        let composed =
            facade("file:///x?ext=nodb&locks=redis://c:6379/0&cache=memory&cache_bytes=4096")
                .expect("valid");
        assert_eq!(composed.backend_url, "file:///x?ext=nodb");
        assert_eq!(composed.locks.as_deref(), Some("redis://c:6379/0"));
        assert_eq!(composed.cache.as_deref(), Some("memory"));
        assert_eq!(composed.cache_bytes, Some(4096));
        let encoded =
            facade("file:///x?locks=redis%3A%2F%2Fc%3A6379%2F0%3Fprefix%3Dwepp").expect("valid");
        assert_eq!(
            encoded.locks.as_deref(),
            Some("redis://c:6379/0?prefix=wepp")
        );
        for bad in [
            "file:///x?ttl_ms=0",
            "file:///x?wait_ms=-1",
            "file:///x?max_doc_bytes=0",
            "file:///x?cache_bytes=0",
            "file:///x?ttl_ms=1&ttl_ms=2",
            "file:///x?ttl_ms=%zz",
        ] {
            let error = facade(bad).expect_err(bad);
            assert_eq!(error.kind(), ErrorKind::Config, "{bad}");
            assert_eq!(error.operation(), Some(Operation::Open), "{bad}");
        }
    }

    #[test]
    fn memory_urls_refuse_unknown_options_by_name() {
        let error = facade("memory://m?ttl_ms=5&colour=blue").expect_err("unknown option");
        assert_eq!(error.kind(), ErrorKind::Config);
        let message = error.to_string();
        assert!(message.contains("\"colour\""), "{message}");
        assert!(!message.contains("blue"), "{message}");
        assert!(message.contains("ttl_ms"), "{message}");
        let ok = facade("memory://m?ttl_ms=5&cache=memory").expect("valid");
        assert_eq!(ok.backend_url, "memory://m");
        assert_eq!(
            memory_name(&ok.backend_url).expect("name").as_deref(),
            Some("m")
        );
    }

    #[test]
    fn parsed_options_never_show_a_password() {
        let parsed = facade(
            "postgres://app:hunter2@db/runs?ttl_ms=5&locks=redis%3A%2F%2F%3Asecret9%40c%2F0&cache=redis%3A%2F%2F%3Asecret8%40c%2F0",
        )
        .expect("valid");
        let shown = format!("{parsed:?}");
        for secret in ["hunter2", "secret9", "secret8"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn lock_service_urls_lend_their_lease_settings() {
        let mut outer = facade("file:///x?wait_ms=5&locks=redis://c/0?ttl_ms=900").expect("valid");
        let lock_url = outer.locks.take().expect("locks");
        let inner = facade(&lock_url).expect("valid");
        inner.lend_to(&mut outer).expect("lent");
        assert_eq!(inner.backend_url, "redis://c/0");
        assert_eq!(outer.client().ttl, Duration::from_millis(900));
        assert_eq!(outer.client().wait.timeout, Duration::from_millis(5));
        for (outer, inner) in [
            ("file:///x?ttl_ms=5", "redis://c/0?ttl_ms=900"),
            ("file:///x", "redis://c/0?cache=memory"),
            ("file:///x", "redis://c/0?max_doc_bytes=10"),
            ("file:///x", "redis://c/0?locks=redis://d/0"),
        ] {
            let mut outer = facade(outer).expect("valid");
            let error = facade(inner)
                .expect("valid")
                .lend_to(&mut outer)
                .expect_err(inner);
            assert_eq!(error.kind(), ErrorKind::Config, "{inner}");
        }
    }

    #[test]
    fn weppcloud_is_a_boolean_option_of_the_lock_service() {
        let (on, url) = weppcloud_mode(Scheme::Redis, "redis://c/0?weppcloud=true").expect("ok");
        assert!(on);
        assert_eq!(url, "redis://c/0?weppcloud=true");
        let (on, url) =
            weppcloud_mode(Scheme::Redis, "redis://c/0?prefix=p&weppcloud=false").expect("ok");
        assert!(!on, "weppcloud=false is a plain lock service");
        assert_eq!(url, "redis://c/0?prefix=p");
        let (on, _) = weppcloud_mode(Scheme::Redis, "redis://c/0?prefix=p").expect("ok");
        assert!(!on);
        let error = weppcloud_mode(Scheme::Redis, "redis://:pw@c/0?weppcloud=maybe")
            .expect_err("not a boolean");
        assert_eq!(error.kind(), ErrorKind::Config);
    }

    /// A word without a value after a facade option (`?ttl_ms=1&hunter2`:
    /// a password typed where an option goes) is refused without being
    /// shown; the facade passed it on as `hunter2=`, which the backend then
    /// quoted.
    #[tokio::test]
    async fn a_bare_word_passed_on_by_the_facade_is_not_shown() {
        let root = std::env::temp_dir().join(format!("runstate-bare-{:x}", fastrand::u64(..)));
        let file = format!("file://{}?ttl_ms=1000&s3cr3tpassw0rd", root.display());
        for url in [
            "memory://?ttl_ms=1000&s3cr3tpassw0rd",
            "memory://?s3cr3tpassw0rd",
            file.as_str(),
        ] {
            let refused = open(url).await.expect_err("an unknown option");
            let shown = format!(
                "{refused} {refused:?} {}",
                runstate_core::display_chain(&refused)
            );
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A scheme in capitals opens the backend it names (the file and SQL
    /// backends used to refuse their own URL, read case-sensitively).
    #[cfg(all(feature = "file", feature = "sqlite"))]
    #[tokio::test]
    async fn schemes_in_capitals_open_their_backend() {
        let root = std::env::temp_dir().join(format!("runstate-caps-{:x}", fastrand::u64(..)));
        open(&format!("FILE://{}", root.display())).await.unwrap();
        open("MEMORY://").await.unwrap();
        let db = root.join("caps.db");
        open(&format!("SQLite://{}", db.display())).await.unwrap();
        assert!(db.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Opening an existing store with a lock service that does not exist
    /// refuses it and creates nothing (it used to be created).
    #[cfg(all(feature = "file", feature = "sqlite"))]
    #[tokio::test]
    async fn an_existing_store_never_creates_its_lock_service() {
        let root = std::env::temp_dir().join(format!("runstate-locks-{:x}", fastrand::u64(..)));
        open(&format!("file://{}", root.display())).await.unwrap();
        let typo = root.join("typo.db");
        let url = format!(
            "file://{}?locks={}",
            root.display(),
            encode(&format!("sqlite://{}", typo.display()))
        );
        let refused = open_with(&url, OpenMode::Existing)
            .await
            .expect_err("a missing lock service");
        assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
        assert!(!typo.exists(), "created");
        open_with(&url, OpenMode::Create).await.unwrap();
        assert!(typo.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[cfg(all(feature = "file", feature = "sqlite"))]
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn composed_urls_honour_every_option_or_refuse_it() {
        // The lock service's lease TTL is the client's (it used to be
        // dropped with the lock service's own client settings).
        let store = open("memory://o1?wait_ms=7&locks=memory://o1-locks?ttl_ms=900")
            .await
            .expect("opens");
        assert_eq!(store.capabilities().backend, "memory+memory");
        assert_eq!(store.client_config().ttl, Duration::from_millis(900));
        assert_eq!(store.client_config().wait.timeout, Duration::from_millis(7));
        // weppcloud=false is a plain lock service, not WEPPcloud mode.
        let store = open("memory://o2?locks=memory://o2-locks?weppcloud=false")
            .await
            .expect("opens");
        assert_eq!(store.capabilities().backend, "memory+memory");
        // A budget for a cache that has none is refused, not ignored.
        let error = open("memory://o3?cache=redis://127.0.0.1:1/0&cache_bytes=5")
            .await
            .expect_err("no budget to set");
        assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    }

    /// Every refusal of a composed URL names the option, never a password
    /// of the URLs inside it.
    #[tokio::test]
    async fn refusals_of_composed_urls_show_no_secret() {
        for url in [
            "memory://s1?locks=redis%3A%2F%2F%3Ahunter2%40127.0.0.1%3A1%2F0%3Fttl_ms%3Dsoon",
            "memory://s2?locks=redis%3A%2F%2F%3Ahunter2%40127.0.0.1%3A1%2F0%3Fcache%3Dmemory",
            "memory://s3?cache=redis%3A%2F%2F%3Ahunter2%40127.0.0.1%3A1%2F0&cache_bytes=5",
            "memory://s4?cache=ftp%3A%2F%2Fu%3Ahunter2%40h%2Fx",
            "memory://s5?password=hunter2",
        ] {
            let error = open(url).await.expect_err(url);
            assert_eq!(error.kind(), ErrorKind::Config, "{url}: {error}");
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("hunter2"), "{url}: {shown}");
        }
    }

    #[test]
    fn cache_bytes_needs_an_in_process_cache() {
        assert_eq!(cache_budget(None, None).expect("ok"), None);
        assert_eq!(
            cache_budget(Some("memory"), None).expect("ok"),
            Some(DEFAULT_CACHE_BYTES)
        );
        assert_eq!(cache_budget(Some("memory"), Some(7)).expect("ok"), Some(7));
        for cache in [None, Some("redis://c/0")] {
            let error = cache_budget(cache, Some(7)).expect_err("no budget to set");
            assert_eq!(error.kind(), ErrorKind::Config);
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
