//! Configuration of the S3 backend: a URL plus the standard AWS
//! environment variables.
//!
//! `s3://bucket/prefix?option=value&…`
//!
//! | query option | default | meaning |
//! |---|---|---|
//! | `endpoint` | AWS (or `AWS_ENDPOINT_URL`) | an S3-compatible server, for example `http://127.0.0.1:9000` |
//! | `region` | `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1` | |
//! | `allow_http` | `false` | allow a plain-HTTP endpoint; only when asked |
//! | `ext` | `json` | extension of document objects |
//! | `timeout_ms` | 10000 | bound on each request |
//! | `retries` | 3 | retries of a failed request (transient errors only) |
//! | `probe` | `true` | check on open that the server honours conditional writes |
//! | `skew_pct` | 10 | clock-skew margin of lease expiry, in percent of the TTL |
//! | `watch_ms` | 1000 | how often a [`watch`](runstate_core::Store::watch) lists the run (S3 has no change channel); at least 1 |
//!
//! Credentials come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …)
//! or the instance's credential provider, as object_store reads them. They
//! never appear in `Debug`, `Display` or errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use runstate_core::{Error, ErrorKind};

use crate::BACKEND;
use crate::errors::map_error;

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
    pub(crate) bucket: String,
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
    Error::new(ErrorKind::Config, message.into()).with_backend(BACKEND)
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
            bucket: bucket.into(),
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

    /// Parses an `s3://bucket/prefix?…` URL (see the module documentation).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for another scheme, a missing bucket, a bad
    /// prefix or option.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let parsed = url::Url::parse(url).map_err(|e| {
            config_error("invalid S3 URL (not shown: it may hold credentials)").with_source(e)
        })?;
        if parsed.scheme() != "s3" {
            return Err(config_error(format!(
                "S3 URLs start with s3://, not {}://",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(config_error(
                "put S3 credentials in the AWS environment variables, not in the URL",
            ));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| config_error("S3 URL has no bucket"))?;
        let mut config = S3Config::new(bucket);
        let prefix = parsed.path().trim_matches('/');
        check_prefix(prefix)?;
        config.prefix = prefix.to_owned();
        for (name, value) in parsed.query_pairs() {
            match &*name {
                "endpoint" => config.endpoint = Some(value.into_owned()),
                "region" => config.region = Some(value.into_owned()),
                "allow_http" => config.allow_http = parse_bool(&name, &value)?,
                "probe" => config.probe = parse_bool(&name, &value)?,
                "ext" => config = config.with_ext(value.into_owned())?,
                "timeout_ms" => {
                    config.timeout = Duration::from_millis(parse_number(&name, &value)?.max(1));
                }
                "retries" => {
                    config.retries =
                        usize::try_from(parse_number(&name, &value)?).unwrap_or(usize::MAX)
                }
                "skew_pct" => {
                    config.skew_pct =
                        u32::try_from(parse_number(&name, &value)?).unwrap_or(u32::MAX)
                }
                "watch_ms" => {
                    config.watch_interval =
                        Duration::from_millis(parse_number(&name, &value)?.max(1));
                }
                other => {
                    return Err(config_error(format!(
                        "unknown S3 URL option {other:?} (known: endpoint, region, allow_http, ext, \
                         timeout_ms, retries, probe, skew_pct, watch_ms)"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// Sets the key prefix (`/`-separated).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a malformed prefix.
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
    /// [`ErrorKind::Config`] unless it is 1 to 16 ASCII letters or digits.
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
    /// [`ErrorKind::Config`] when object_store refuses the settings.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, Error> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
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
        let store = builder
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(map_error)?;
        Ok(Arc::new(store))
    }

    /// The bound on one call of the store: the per-request timeout times
    /// the retries plus two, so object_store's own retries finish first.
    pub(crate) fn bound(&self) -> Duration {
        self.timeout
            .saturating_mul(u32::try_from(self.retries.saturating_add(2)).unwrap_or(u32::MAX))
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix, without leading or trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(config_error(format!(
            "option {name} must be true or false, got {value:?}"
        ))),
    }
}

fn parse_number(name: &str, value: &str) -> Result<u64, Error> {
    value
        .parse()
        .map_err(|_| config_error(format!("option {name} must be a number, got {value:?}")))
}

/// The URL, without credentials (they are never part of it).
impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)?;
        let mut options = Vec::new();
        if let Some(endpoint) = &self.endpoint {
            options.push(format!("endpoint={endpoint}"));
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
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("ext", &self.ext)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("probe", &self.probe)
            .field("skew_pct", &self.skew_pct)
            .field("watch_interval", &self.watch_interval)
            .field("AWS_SECRET_ACCESS_KEY", &present("AWS_SECRET_ACCESS_KEY"))
            .field("AWS_SESSION_TOKEN", &present("AWS_SESSION_TOKEN"))
            .finish()
    }
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

    #[test]
    fn refuses_bad_input() {
        for (url, needle) in [
            ("http://b/p", "s3://"),
            ("s3://b/p%20q", "key prefix"),
            ("s3://b/.hidden", "key prefix"),
            ("s3://b/p?bogus=1", "unknown S3 URL option"),
            ("s3://key:secret@b/p", "environment variables"),
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
