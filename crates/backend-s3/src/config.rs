//! Configuration of the S3 backend: a URL plus the standard environment
//! variables of the cloud it names.
//!
//! - `s3://bucket/prefix?option=value&…`: Amazon S3 or an S3-compatible
//!   server (MinIO, Ceph, moto, …);
//! - `gs://bucket/prefix?…`: Google Cloud Storage (feature `gcs`);
//! - `az://container/prefix?account=NAME&…`: Azure Blob Storage (feature
//!   `azure`).
//!
//! | query option | schemes | default | meaning |
//! |---|---|---|---|
//! | `endpoint` | all | the cloud's (or its environment variable) | another server, for example `http://127.0.0.1:9000` (S3-compatible), a GCS emulator's base URL, an Azure endpoint |
//! | `region` | `s3` | `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1` | |
//! | `account` | `az` | `AZURE_STORAGE_ACCOUNT_NAME` | the storage account (required one way or the other) |
//! | `use_emulator` | `az` | `false` | talk to Azurite on its default loopback ports with its well-known development account |
//! | `allow_http` | all | `false` | allow a plain-HTTP endpoint; only when asked |
//! | `ext` | all | `json` | extension of document objects |
//! | `timeout_ms` | all | 10000 | bound on each request |
//! | `retries` | all | 3 | retries of a failed request (transient errors only) |
//! | `probe` | all | `true` | check on open that the server honours conditional writes |
//! | `skew_pct` | all | 10 | clock-skew margin of lease expiry, in percent of the TTL |
//! | `watch_ms` | all | 1000 | how often a [`watch`](runstate_core::Store::watch) lists the run (the stores have no change channel); at least 1 |
//!
//! An option another scheme does not know (`region` on `gs://`, say) is
//! refused as unknown, as a misspelt one is.
//!
//! Credentials never go in the URL (a URL with a user or password is
//! refused); they come from the cloud's standard environment variables,
//! as object_store's builders read them (`from_env`):
//!
//! - S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!   … or the instance's credential provider;
//! - GCS: `GOOGLE_SERVICE_ACCOUNT` (a key file's path),
//!   `GOOGLE_SERVICE_ACCOUNT_KEY` (its JSON), `GOOGLE_APPLICATION_CREDENTIALS`,
//!   or the instance's metadata service;
//! - Azure: `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`,
//!   `AZURE_STORAGE_CLIENT_ID` / `AZURE_STORAGE_CLIENT_SECRET` /
//!   `AZURE_STORAGE_TENANT_ID`, or a managed identity.
//!
//! They never appear in `Debug`, `Display` or errors: `Debug` says only
//! whether each secret variable is set.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use runstate_core::options::UrlOptions;
use runstate_core::secrets::redact_url;
use runstate_core::{Error, ErrorKind, Operation};

use crate::BACKEND;
use crate::errors::map_error;

/// The object store a configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// Amazon S3 or an S3-compatible server (`s3://`).
    S3,
    /// Google Cloud Storage (`gs://`, feature `gcs`). Its updates are
    /// conditional on generations; [`S3Store`](crate::S3Store) makes an
    /// update by ETag a compare-and-swap on the generation (one `HEAD`
    /// more per update, see the crate documentation).
    Gcs,
    /// Azure Blob Storage (`az://`, feature `azure`).
    Azure,
}

impl Provider {
    /// The URL scheme, without `://`.
    pub fn scheme(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Gcs => "gs",
            Provider::Azure => "az",
        }
    }

    /// The environment variables holding this cloud's secrets, which
    /// `Debug` reports only as set or unset.
    fn secret_vars(self) -> &'static [&'static str] {
        match self {
            Provider::S3 => &["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"],
            Provider::Gcs => &["GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_SERVICE_ACCOUNT"],
            Provider::Azure => &[
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_SAS_KEY",
                "AZURE_STORAGE_CLIENT_SECRET",
            ],
        }
    }
}

/// Settings of an [`S3Store`](crate::S3Store).
///
/// ```
/// use runstate_s3::S3Config;
/// let c = S3Config::from_url("s3://runs/lab/weppcloud?endpoint=http://127.0.0.1:9000&allow_http=true")?;
/// assert_eq!((c.bucket(), c.prefix()), ("runs", "lab/weppcloud"));
/// # Ok::<(), runstate_core::Error>(())
/// ```
#[derive(Clone)]
pub struct S3Config {
    pub(crate) provider: Provider,
    /// The bucket (the container on Azure).
    pub(crate) bucket: String,
    /// The Azure storage account, when given in the URL.
    pub(crate) account: Option<String>,
    /// Azure only: talk to Azurite.
    pub(crate) use_emulator: bool,
    pub(crate) prefix: String,
    pub(crate) endpoint: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) allow_http: bool,
    pub(crate) ext: String,
    pub(crate) timeout: Duration,
    pub(crate) retries: usize,
    pub(crate) probe: bool,
    pub(crate) skew_pct: u32,
    pub(crate) watch_interval: Duration,
}

fn config_error(message: impl Into<String>) -> Error {
    runstate_core::options::config_error(BACKEND, message)
}

/// A prefix is one or more `/`-separated segments of
/// `[A-Za-z0-9._-]`, none of them `.`, `..` or starting with `.`.
fn check_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() {
        return Ok(());
    }
    for segment in prefix.split('/') {
        let ok = !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(config_error(format!(
                "key prefix {prefix:?}: each `/`-separated part must be [A-Za-z0-9._-] and not start with `.`"
            )));
        }
    }
    Ok(())
}

impl S3Config {
    /// A configuration for `bucket` with every default.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            provider: Provider::S3,
            bucket: bucket.into(),
            account: None,
            use_emulator: false,
            prefix: String::new(),
            endpoint: None,
            region: None,
            allow_http: false,
            ext: "json".to_owned(),
            timeout: Duration::from_secs(10),
            retries: 3,
            probe: true,
            skew_pct: 10,
            watch_interval: Duration::from_secs(1),
        }
    }

    /// Parses an `s3://bucket/prefix?…`, `gs://bucket/prefix?…` or
    /// `az://container/prefix?account=…` URL (see the module
    /// documentation).
    ///
    /// ```
    /// use runstate_s3::{Provider, S3Config};
    /// let c = S3Config::from_url("az://runs/lab?account=weppstore&timeout_ms=2000")?;
    /// assert_eq!((c.provider(), c.bucket(), c.prefix()), (Provider::Azure, "runs", "lab"));
    /// assert_eq!(c.account(), Some("weppstore"));
    /// # Ok::<(), runstate_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) for another scheme, a missing bucket, a bad
    /// prefix or option, an option the scheme does not know, or
    /// credentials in the URL. (Whether the scheme's feature is compiled
    /// in is checked when the client is built, by
    /// [`object_store`](Self::object_store).)
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let parsed = url::Url::parse(url).map_err(|e| {
            config_error("invalid store URL (not shown: it may hold credentials)").with_source(e)
        })?;
        let provider = match parsed.scheme() {
            "s3" => Provider::S3,
            "gs" => Provider::Gcs,
            "az" => Provider::Azure,
            other => {
                return Err(config_error(format!(
                    "object store URLs start with s3://, gs:// or az://, not {other}://"
                )));
            }
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(config_error(
                "put credentials in the cloud's environment variables, not in the URL",
            ));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| config_error("the URL names no bucket (container)"))?;
        let mut config = S3Config::new(bucket);
        config.provider = provider;
        let prefix = parsed.path().trim_matches('/');
        check_prefix(prefix)?;
        config.prefix = prefix.to_owned();
        let mut options = UrlOptions::parse(BACKEND, parsed.query())?;
        config.endpoint = options.take("endpoint");
        if provider == Provider::S3 {
            config.region = options.take("region");
        }
        if provider == Provider::Azure {
            config.account = options.take("account");
            if let Some(account) = &config.account
                && (account.is_empty() || !account.bytes().all(|b| b.is_ascii_alphanumeric()))
            {
                return Err(config_error(
                    "option account must be a storage account name (letters and digits)",
                ));
            }
            config.use_emulator = options.take_bool("use_emulator")?.unwrap_or(false);
        }
        if let Some(allow) = options.take_bool("allow_http")? {
            config.allow_http = allow;
        }
        if let Some(probe) = options.take_bool("probe")? {
            config.probe = probe;
        }
        if let Some(ext) = options.take("ext") {
            config = config.with_ext(ext)?;
        }
        let day = Duration::from_secs(24 * 3600);
        if let Some(timeout) = options.take_ms("timeout_ms", Duration::ZERO..=day)? {
            config.timeout = timeout.max(Duration::from_millis(1));
        }
        if let Some(retries) = options.take_u64("retries", 0..=1000)? {
            config.retries = usize::try_from(retries).unwrap_or(usize::MAX);
        }
        if let Some(skew) = options.take_u64("skew_pct", 0..=1000)? {
            config.skew_pct = u32::try_from(skew).unwrap_or(u32::MAX);
        }
        if let Some(every) = options.take_ms("watch_ms", Duration::ZERO..=day)? {
            config = config.with_watch_interval(every);
        }
        options.finish()?;
        Ok(config)
    }

    /// Sets which object store the settings name (the default is
    /// [`Provider::S3`]). [`S3Store::from_object_store`](crate::S3Store::from_object_store)
    /// needs it to know how the store it is given makes updates
    /// conditional.
    pub fn with_provider(mut self, provider: Provider) -> Self {
        self.provider = provider;
        self
    }

    /// Sets the Azure storage account (else `AZURE_STORAGE_ACCOUNT_NAME`).
    pub fn with_account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// Azure: talk to the Azurite emulator (its default loopback ports
    /// and well-known development account, unless set otherwise).
    pub fn with_emulator(mut self, use_emulator: bool) -> Self {
        self.use_emulator = use_emulator;
        self
    }

    /// Sets the key prefix (`/`-separated).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) for a malformed prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, Error> {
        let prefix = prefix.into();
        let prefix = prefix.trim_matches('/').to_owned();
        check_prefix(&prefix)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Sets the document extension.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) unless it is 1 to 16 ASCII letters or digits.
    pub fn with_ext(mut self, ext: impl Into<String>) -> Result<Self, Error> {
        let ext = ext.into();
        if ext.is_empty() || ext.len() > 16 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(config_error(format!(
                "extension {ext:?} must be 1 to 16 ASCII letters or digits"
            )));
        }
        self.ext = ext;
        Ok(self)
    }

    /// Sets an S3-compatible endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>, allow_http: bool) -> Self {
        self.endpoint = Some(endpoint.into());
        self.allow_http = allow_http;
        self
    }

    /// Bounds each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether to probe conditional writes on open.
    pub fn with_probe(mut self, probe: bool) -> Self {
        self.probe = probe;
        self
    }

    /// Sets how many times a failed request is retried (transient errors
    /// only).
    pub fn with_retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// Sets the clock-skew margin of lease expiry, in percent of the TTL
    /// (see [the expiry rule](crate#lease-expiry)).
    pub fn with_skew_pct(mut self, skew_pct: u32) -> Self {
        self.skew_pct = skew_pct;
        self
    }

    /// Sets how often a [`watch`](runstate_core::Store::watch) lists the
    /// run (at least 1 ms): S3 has no change channel, so a watch polls.
    pub fn with_watch_interval(mut self, every: Duration) -> Self {
        self.watch_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the object_store S3 client these settings describe, the one
    /// [`S3Store::open`](crate::S3Store::open) uses: bucket, endpoint,
    /// region, `allow_http`, per-request timeout and retries, credentials
    /// from the AWS environment. Wrap it (in a limit, a tracing or a
    /// fault-injecting [`ObjectStore`]) and hand it to
    /// [`S3Store::from_object_store`](crate::S3Store::from_object_store).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](runstate_core::ErrorKind::Config) when object_store refuses the settings.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, Error> {
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint)?;
        }
        let client = ClientOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout.min(Duration::from_secs(5)))
            .with_allow_http(self.allow_http);
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: self.retries,
            retry_timeout: self
                .timeout
                .saturating_mul(u32::try_from(self.retries.saturating_add(1)).unwrap_or(u32::MAX)),
        };
        match self.provider {
            Provider::S3 => {
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
                if let Some(endpoint) = &self.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &self.region {
                    builder = builder.with_region(region);
                }
                let store = builder
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map_err(map_error)?;
                Ok(Arc::new(store))
            }
            Provider::Gcs => self.gcs(client, retry),
            Provider::Azure => self.azure(client, retry),
        }
    }

    #[cfg(feature = "gcs")]
    fn gcs(
        &self,
        client: ClientOptions,
        retry: RetryConfig,
    ) -> Result<Arc<dyn ObjectStore>, Error> {
        use object_store::gcp::GoogleCloudStorageBuilder;
        let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(&self.bucket);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_base_url(endpoint);
        }
        let store = builder
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(map_error)?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "gcs"))]
    fn gcs(&self, _: ClientOptions, _: RetryConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        Err(missing_feature("gs://", "gcs"))
    }

    #[cfg(feature = "azure")]
    fn azure(
        &self,
        client: ClientOptions,
        retry: RetryConfig,
    ) -> Result<Arc<dyn ObjectStore>, Error> {
        use object_store::azure::MicrosoftAzureBuilder;
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_container_name(&self.bucket)
            .with_use_emulator(self.use_emulator);
        if let Some(account) = &self.account {
            builder = builder.with_account(account);
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let store = builder
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(map_error)?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "azure"))]
    fn azure(&self, _: ClientOptions, _: RetryConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        Err(missing_feature("az://", "azure"))
    }

    /// The bound on one call of the store: the per-request timeout times
    /// the retries plus two, so object_store's own retries finish first.
    pub(crate) fn bound(&self) -> Duration {
        self.timeout
            .saturating_mul(u32::try_from(self.retries.saturating_add(2)).unwrap_or(u32::MAX))
    }

    /// The bucket (the container on Azure).
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Which object store the settings name.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The Azure storage account, when set (else the environment's).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The key prefix, without leading or trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The error for a scheme whose cloud is not compiled in.
#[cfg(any(not(feature = "gcs"), not(feature = "azure")))]
fn missing_feature(scheme: &str, feature: &str) -> Error {
    config_error(format!(
        "{scheme} URLs need runstate-s3's `{feature}` feature (runstate's `{feature}`), which \
         this build lacks"
    ))
}

/// The URL, without credentials (they are never part of it).
impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}/{}",
            self.provider.scheme(),
            self.bucket,
            self.prefix
        )?;
        let mut options = Vec::new();
        if let Some(account) = &self.account {
            options.push(format!("account={account}"));
        }
        if self.use_emulator {
            options.push("use_emulator=true".to_owned());
        }
        if let Some(endpoint) = &self.endpoint {
            // An endpoint could carry a password or a signed query.
            options.push(format!("endpoint={}", redact_url(endpoint)));
        }
        if let Some(region) = &self.region {
            options.push(format!("region={region}"));
        }
        if self.allow_http {
            options.push("allow_http=true".to_owned());
        }
        if self.ext != "json" {
            options.push(format!("ext={}", self.ext));
        }
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present = |var: &str| {
            if std::env::var_os(var).is_some() {
                "set (redacted)"
            } else {
                "unset"
            }
        };
        let mut debug = f.debug_struct("S3Config");
        debug
            .field("provider", &self.provider)
            .field("bucket", &self.bucket)
            .field("account", &self.account)
            .field("use_emulator", &self.use_emulator)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("ext", &self.ext)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("probe", &self.probe)
            .field("skew_pct", &self.skew_pct)
            .field("watch_interval", &self.watch_interval);
        for var in self.provider.secret_vars() {
            debug.field(var, &present(var));
        }
        debug.finish()
    }
}

/// Refuses an endpoint that carries credentials (`user:password@`) or a
/// query: the clients put the endpoint into every request's URL, and their
/// errors print it, so a secret there would reach errors and logs.
/// Credentials come from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let refuse = |why: &str| {
        Err(Error::new(
            ErrorKind::Config,
            // Not shown: a user name alone may be a token.
            format!("the endpoint option {why}: give credentials in the environment"),
        )
        .with_backend(BACKEND)
        .with_operation(Operation::Open))
    };
    let parsed = match url::Url::parse(endpoint) {
        Ok(parsed) => parsed,
        Err(_) => return refuse("is not a URL"),
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return refuse("is not an http or https URL");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return refuse("carries credentials");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return refuse("carries a query");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let c = S3Config::from_url("s3://b/p/q?endpoint=http://127.0.0.1:9000&region=eu-west-1&allow_http=true&ext=nodb&timeout_ms=500&retries=1&probe=false&watch_ms=250").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str(), c.ext.as_str()),
            ("b", "p/q", "nodb")
        );
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.allow_http && !c.probe);
        assert_eq!((c.timeout, c.retries), (Duration::from_millis(500), 1));
        assert_eq!(c.watch_interval, Duration::from_millis(250));
        let c = S3Config::from_url("s3://only-bucket").unwrap();
        assert_eq!(c.prefix, "");
        assert_eq!(c.watch_interval, Duration::from_secs(1));
        let c = S3Config::from_url("s3://b?watch_ms=0").unwrap();
        assert_eq!(c.watch_interval, Duration::from_millis(1), "at least 1 ms");
    }

    /// Issue 15: `gs://` and `az://` parse to their provider, with the
    /// options each knows, and print back without secrets.
    #[test]
    fn parses_gcs_and_azure_urls() {
        let c = S3Config::from_url(
            "gs://wepp-runs/lab/p?endpoint=http://127.0.0.1:4443&allow_http=true&timeout_ms=250",
        )
        .unwrap();
        assert_eq!(c.provider(), Provider::Gcs);
        assert_eq!((c.bucket(), c.prefix()), ("wepp-runs", "lab/p"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(
            c.to_string(),
            "gs://wepp-runs/lab/p?endpoint=http://127.0.0.1:4443&allow_http=true"
        );
        let c =
            S3Config::from_url("az://runs/lab?account=devstoreaccount1&use_emulator=true").unwrap();
        assert_eq!(c.provider(), Provider::Azure);
        assert_eq!((c.bucket(), c.prefix()), ("runs", "lab"));
        assert_eq!(c.account(), Some("devstoreaccount1"));
        assert!(c.use_emulator);
        assert_eq!(
            c.to_string(),
            "az://runs/lab?account=devstoreaccount1&use_emulator=true"
        );
        let debug = format!("{c:?}");
        assert!(debug.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{debug}");
        assert!(!debug.contains("AWS_SECRET_ACCESS_KEY"), "{debug}");
        assert_eq!(
            S3Config::from_url("s3://b/p").unwrap().provider(),
            Provider::S3
        );
        let c = S3Config::from_url(
            "az://c/p?account=a&endpoint=https%3A%2F%2Fu%3Ahunter2%40a.example%2F%3Fsas_token%3Dsecret2",
        )
        .unwrap();
        for shown in [c.to_string(), format!("{c:?}")] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("secret2"),
                "{shown}"
            );
        }
    }

    /// An endpoint holding credentials or a query is refused when the
    /// client is built (at opening), and the refusal shows no secret: the
    /// clients put the endpoint into every request's URL, and object_store's
    /// request errors print that URL. (Before, `http://u:pw@host` was
    /// handed to object_store.)
    #[test]
    fn an_endpoint_with_credentials_or_a_query_is_refused() {
        for endpoint in [
            "http://u:hunter2@127.0.0.1:9",
            "http://hunter2@127.0.0.1:9",
            "http://127.0.0.1:9/?X-Amz-Security-Token=hunter2",
            "http://127.0.0.1:9/#hunter2",
            "u:hunter2@127.0.0.1:9",
        ] {
            let config = S3Config::new("b").with_endpoint(endpoint, true);
            let error = config.object_store().map(|_| ()).expect_err(endpoint);
            assert_eq!(error.kind(), ErrorKind::Config, "{endpoint}: {error}");
            let shown = format!("{} {error:?}", runstate_core::display_chain(&error));
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        S3Config::new("b")
            .with_endpoint("http://127.0.0.1:9/base/", true)
            .object_store()
            .expect("a plain endpoint");
    }

    /// Each scheme builds its own cloud's client (no request is sent), or
    /// says which feature it needs.
    #[test]
    fn builds_the_client_of_the_scheme() {
        let s3 = S3Config::from_url("s3://b/p?endpoint=http://127.0.0.1:9&allow_http=true")
            .unwrap()
            .object_store()
            .unwrap();
        assert!(s3.to_string().starts_with("AmazonS3"), "{s3}");
        let gcs = S3Config::from_url("gs://b/p").unwrap().object_store();
        if cfg!(feature = "gcs") {
            // Built without credentials: they are looked up when a request
            // is made, or the build says they are missing.
            match gcs {
                Ok(store) => assert!(store.to_string().contains("GoogleCloudStorage"), "{store}"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::Config, "{e}"),
            }
        } else {
            let e = gcs.unwrap_err();
            assert!(e.to_string().contains("`gcs` feature"), "{e}");
        }
        let azure = S3Config::from_url("az://c/p?account=devstoreaccount1&use_emulator=true")
            .unwrap()
            .object_store();
        if cfg!(feature = "azure") {
            let store = azure.unwrap();
            assert!(store.to_string().contains("MicrosoftAzure"), "{store}");
        } else {
            let e = azure.unwrap_err();
            assert!(e.to_string().contains("`azure` feature"), "{e}");
        }
    }

    #[test]
    fn refuses_bad_input() {
        for (url, needle) in [
            ("http://b/p", "s3://"),
            ("s3://b/p%20q", "key prefix"),
            ("s3://b/.hidden", "key prefix"),
            ("s3://b/p?bogus=1", "unknown s3 URL option"),
            ("s3://key:secret@b/p", "environment variables"),
            ("gs://key:secret@b/p", "environment variables"),
            ("gs://b/p?region=eu", "unknown s3 URL option \"region\""),
            ("s3://b/p?account=a", "unknown s3 URL option \"account\""),
            ("az://c/p?account=a/../b", "account"),
            ("az://c/p?use_emulator=maybe", "use_emulator"),
            ("s3://b/p?retries=1&retries=2", "twice"),
            ("s3://b/p?ext=../x", "extension"),
            ("s3://b/p?watch_ms=soon", "watch_ms"),
        ] {
            let err = S3Config::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
            assert!(!err.to_string().contains("secret"), "{url}: {err}");
        }
    }
}
