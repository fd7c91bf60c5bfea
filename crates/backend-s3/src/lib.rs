//! # runstate-s3
//!
//! The S3 backend of runstate, on object_store: documents are objects in a
//! bucket, versions are ETags, and leases are small objects changed only by
//! conditional writes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use runstate_core::{Client, RunId};
//! use runstate_s3::S3Store;
//!
//! # async fn example() -> runstate_core::Result<()> {
//! let store = S3Store::connect("s3://weppcloud-runs/archive?region=us-west-2").await?;
//! let run = Client::new(Arc::new(store)).run(RunId::new("Mica_flume1")?);
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! ```text
//! s3://bucket/prefix/<run>/<name>.<ext>                  exactly the saved bytes
//! s3://bucket/prefix/.runstate/locks/<run>/run.lease      lease of the run lock
//! s3://bucket/prefix/.runstate/locks/<run>/doc.<name>.lease
//! s3://bucket/prefix/.runstate/probe/…                   scratch keys of the probe
//! ```
//!
//! ## What is guaranteed, exactly
//!
//! - `Create` is `If-None-Match: *`, `Update(version)` is `If-Match`
//!   with the version's ETag: both atomic on the server.
//! - Conditional deletes are not offered ([`Capabilities::conditional_delete`]
//!   is `false`; they fail with `Unsupported`).
//! - Leases are compare-and-swap writes of lease objects; expiry follows the
//!   waiter's monotonic clock (see [`leases`](crate#lease-expiry)).
//! - **Fencing is [`Fencing::VersionOnly`]**: S3 cannot make a write
//!   conditional on another object. A save under a lease is refused with
//!   `Fenced` when the lease's own local deadline has passed or the lease
//!   object is no longer the version this grant wrote (one `HEAD` just
//!   before the write), and the write itself is always conditional on the
//!   document's version (`If-Match` on the version loaded under the lease,
//!   or on the version seen just before the write for an overwrite), so no
//!   update is ever lost. What it cannot promise: a holder whose lease
//!   expires in the instant between that check and its write still writes
//!   if nobody changed the document meanwhile.
//! - A conditional-write probe runs on open (and on demand with
//!   [`S3Store::doctor`]); on a server that ignores the conditional headers
//!   the store refuses `Create`, `Update` and every lease operation with
//!   `Unsupported` instead of pretending.
//!
//! ## Lease expiry
//!
//! A waiter never compares its wall clock with object timestamps: a held
//! lease version (ETag) is expired `ttl × (1 + skew_pct / 100)` after this
//! store first saw it (or wrote it). A store seeing a lease for the first
//! time therefore waits a full TTL plus the margin before taking it over.

#![forbid(unsafe_code)]

mod config;
mod errors;
mod leases;
mod probe;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode as OsPutMode,
    PutOptions as OsPutOptions, PutPayload, RetryConfig, UpdateVersion,
};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Error, ErrorKind, Fence, Fencing, GetOptions, Lease,
    ListPage, Lock, LockInfo, LockKey, Operation, Owner, PutMode, PutOptions, ReleaseSignals,
    Result, RunId, Store, StoredDoc, Version, async_trait,
};

pub use config::S3Config;
pub use probe::ProbeReport;

use crate::errors::{map_error, timed_out, unconditional_server};
use crate::leases::{LeaseBody, Sightings, info};

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "s3";

/// The largest object a single PUT may write.
const MAX_OBJECT: u64 = 5 * 1024 * 1024 * 1024;

/// The S3 backend. Cheap to clone; clones share the client.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    config: S3Config,
    store: Arc<dyn ObjectStore>,
    /// The key prefix with a trailing `/`, or empty.
    root: String,
    capabilities: Capabilities,
    probe: Option<ProbeReport>,
    sightings: Sightings,
    /// The last lease object this store wrote at each path, so a lock it
    /// released can be taken again without reading it first.
    written: Mutex<HashMap<String, (String, LeaseBody)>>,
    signals: ReleaseSignals,
    bound: Duration,
}

fn version_of(e_tag: Option<String>) -> Result<Version> {
    e_tag.map(Version::new).ok_or_else(|| {
        Error::new(ErrorKind::Backend, "the server returned no ETag").with_backend(BACKEND)
    })
}

impl S3Store {
    /// Builds the client and, unless disabled, probes whether the server
    /// honours conditional writes.
    ///
    /// # Errors
    /// `Config` for bad settings; backend errors when the bucket cannot be
    /// reached during the probe.
    pub async fn open(config: S3Config) -> Result<S3Store> {
        let context = |e: Error| e.with_operation(Operation::Open);
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        let client = ClientOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .with_allow_http(config.allow_http);
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: config.retries,
            retry_timeout: config.timeout * u32::try_from(config.retries + 1).unwrap_or(u32::MAX),
        };
        let store: Arc<dyn ObjectStore> = Arc::new(
            builder
                .with_client_options(client)
                .with_retry(retry)
                .build()
                .map_err(|e| context(map_error(e)))?,
        );
        let root = if config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", config.prefix)
        };
        let bound = config.timeout * u32::try_from(config.retries + 2).unwrap_or(u32::MAX);
        let probe = if config.probe {
            let scratch = Path::from(format!("{root}.runstate/probe"));
            let report = match tokio::time::timeout(bound * 4, probe::probe(&store, &scratch)).await
            {
                Ok(Ok(report)) => report,
                Ok(Err(e)) => return Err(context(map_error(e))),
                Err(_) => return Err(context(timed_out(bound * 4))),
            };
            if !report.honoured() {
                tracing::warn!(%report, bucket = %config.bucket, "S3 server ignores conditional writes; leases disabled");
            }
            Some(report)
        } else {
            None
        };
        let conditional = probe.is_none_or(|p| p.honoured());
        let capabilities = Capabilities::full(BACKEND)
            .with_conditional_delete(false)
            .with_fencing(Fencing::VersionOnly)
            .with_multi_host(true)
            .with_max_document_size(Some(MAX_OBJECT))
            .with_conditional_put(conditional)
            .with_leases(conditional);
        Ok(S3Store {
            inner: Arc::new(Inner {
                sightings: Sightings::new(config.skew_pct),
                config,
                store,
                root,
                capabilities,
                probe,
                written: Mutex::new(HashMap::new()),
                signals: ReleaseSignals::new(),
                bound,
            }),
        })
    }

    /// Parses `url` (see [`S3Config::from_url`]) and opens the store.
    ///
    /// # Errors
    /// As [`S3Config::from_url`] and [`S3Store::open`].
    pub async fn connect(url: &str) -> Result<S3Store> {
        Self::open(S3Config::from_url(url)?).await
    }

    /// The settings.
    pub fn config(&self) -> &S3Config {
        &self.inner.config
    }

    /// What the probe found on open, if it ran.
    pub fn probe_report(&self) -> Option<ProbeReport> {
        self.inner.probe
    }

    /// Probes now whether the server honours conditional writes (it races
    /// conflicting conditional writes on a scratch key, then removes it).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn doctor(&self) -> Result<ProbeReport> {
        let scratch = Path::from(format!("{}.runstate/probe", self.inner.root));
        self.inner
            .bounded(probe::probe(&self.inner.store, &scratch))
            .await
            .map_err(|e| e.with_operation(Operation::Doctor))
    }

    /// Deletes every object under this store's prefix and returns how
    /// many. For tests and for decommissioning a prefix.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn purge_prefix(&self) -> Result<u64> {
        let prefix =
            (!self.inner.root.is_empty()).then(|| Path::from(self.inner.config.prefix.as_str()));
        self.inner.delete_under(prefix.as_ref()).await
    }
}

impl Inner {
    async fn bounded<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, object_store::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.bound, request).await {
            Ok(outcome) => outcome.map_err(map_error),
            Err(_) => Err(timed_out(self.bound)),
        }
    }

    /// [`bounded`](Self::bounded), with an absent object as `None`.
    async fn found<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, object_store::Error>>,
    ) -> Result<Option<T>> {
        match self.bounded(request).await {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn doc_path(&self, run: &RunId, doc: &DocName) -> Path {
        Path::from(format!("{}{run}/{doc}.{}", self.root, self.config.ext))
    }

    fn run_path(&self, run: &RunId) -> Path {
        Path::from(format!("{}{run}", self.root))
    }

    fn locks_path(&self, run: Option<&RunId>) -> Path {
        match run {
            Some(run) => Path::from(format!("{}.runstate/locks/{run}", self.root)),
            None => Path::from(format!("{}.runstate/locks", self.root)),
        }
    }

    fn lease_path(&self, key: &LockKey) -> Path {
        let file = match key.doc() {
            None => "run.lease".to_owned(),
            Some(doc) => format!("doc.{doc}.lease"),
        };
        self.locks_path(Some(key.run())).join(file)
    }

    fn lock_of(&self, path: &Path) -> Option<LockKey> {
        let mut parts: Vec<String> = path.parts().map(|p| p.as_ref().to_owned()).collect();
        let file = parts.pop()?;
        let run = RunId::new(parts.pop()?).ok()?;
        if file == "run.lease" {
            return Some(LockKey::Run(run));
        }
        let doc = DocName::new(file.strip_prefix("doc.")?.strip_suffix(".lease")?).ok()?;
        Some(LockKey::Doc(run, doc))
    }

    fn doc_of(&self, path: &Path) -> Option<DocName> {
        let file = path.filename()?;
        DocName::new(file.strip_suffix(&format!(".{}", self.config.ext))?).ok()
    }

    fn require_conditional(&self) -> Result<()> {
        if self.capabilities.conditional_put {
            Ok(())
        } else {
            Err(unconditional_server())
        }
    }

    async fn put_object(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: OsPutMode,
    ) -> Result<Option<String>> {
        let result = self
            .bounded(
                self.store
                    .put_opts(path, PutPayload::from(bytes), OsPutOptions::from(mode)),
            )
            .await?;
        Ok(result.e_tag)
    }

    async fn delete_under(&self, prefix: Option<&Path>) -> Result<u64> {
        let paths: Vec<Path> = self
            .bounded(
                self.store
                    .list(prefix)
                    .map_ok(|meta| meta.location)
                    .try_collect(),
            )
            .await?;
        let count = paths.len() as u64;
        let stream = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
        let deleted: Vec<Path> = self
            .bounded(self.store.delete_stream(stream).try_collect())
            .await?;
        let _ = deleted;
        Ok(count)
    }

    // ------------------------------------------------------------ leases

    /// The lease object at `path`: its ETag, body and when this store first
    /// saw that version.
    async fn read_lease(&self, path: &Path) -> Result<Option<(String, LeaseBody, Instant)>> {
        let seen_at = Instant::now();
        let Some(got) = self.found(self.store.get(path)).await? else {
            return Ok(None);
        };
        let etag = got.meta.e_tag.clone().unwrap_or_default();
        let bytes = self.bounded(got.bytes()).await?;
        let body: LeaseBody = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("lease object {path} is not valid JSON"),
            )
            .with_backend(BACKEND)
            .with_source(e)
        })?;
        let first = self.sightings.saw(path.as_ref(), &etag, seen_at);
        Ok(Some((etag, body, first)))
    }

    /// Writes a lease body; `None` when the condition failed.
    async fn write_lease(
        &self,
        path: &Path,
        body: &LeaseBody,
        mode: OsPutMode,
        at: Instant,
    ) -> Result<Option<String>> {
        let json = serde_json::to_vec(body).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding a lease")
                .with_backend(BACKEND)
                .with_source(e)
        })?;
        match self.put_object(path, Bytes::from(json), mode).await {
            Ok(Some(etag)) => {
                self.sightings.saw(path.as_ref(), &etag, at);
                self.written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.as_ref().to_owned(), (etag.clone(), body.clone()));
                Ok(Some(etag))
            }
            Ok(None) => Err(
                Error::new(ErrorKind::Backend, "the server returned no ETag").with_backend(BACKEND),
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::AlreadyExists | ErrorKind::Precondition | ErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn if_match(etag: &str) -> OsPutMode {
        OsPutMode::Update(UpdateVersion {
            e_tag: Some(etag.to_owned()),
            version: None,
        })
    }

    fn locked(&self, key: &LockKey, holder: Option<LockInfo>) -> Error {
        let mut error = Error::new(ErrorKind::Locked, "the lock is held")
            .with_backend(BACKEND)
            .with_operation(Operation::Acquire)
            .with_lock(key);
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    async fn live_holder(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        Ok(match self.read_lease(&self.lease_path(key)).await? {
            Some((_, body, first)) if body.held => {
                let left = self.sightings.remaining(body.ttl(), first);
                if left.is_zero() {
                    None
                } else {
                    info(key, &body, left)
                }
            }
            _ => None,
        })
    }

    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.require_conditional()?;
        if ttl.is_zero() {
            return Err(
                Error::new(ErrorKind::InvalidArgument, "a lease TTL must be positive")
                    .with_backend(BACKEND),
            );
        }
        let path = self.lease_path(key);
        let issued = Instant::now();
        let since = SystemTime::now();
        // A lock this store released can be retaken without reading it.
        let cached = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path.as_ref())
            .cloned();
        if let Some((etag, body)) = cached
            && !body.held
        {
            let grant = LeaseBody::held(owner, body.fence + 1, ttl, since);
            if let Some(new) = self
                .write_lease(&path, &grant, Self::if_match(&etag), issued)
                .await?
            {
                return Ok(Lease::new(
                    key.clone(),
                    owner.clone(),
                    Fence(grant.fence),
                    ttl,
                    issued,
                    since,
                )
                .with_token(new));
            }
        }
        let mut attempted: Option<LeaseBody> = None;
        for _ in 0..3 {
            let (grant, mode) = match self.read_lease(&path).await? {
                None => (LeaseBody::held(owner, 1, ttl, since), OsPutMode::Create),
                Some((etag, body, first)) => {
                    // The very grant this call wrote, whose reply was lost
                    // and retried into a conflict, is ours. (Other tasks
                    // may share the owner id, so nothing less identifies it.)
                    if attempted.as_ref() == Some(&body) {
                        return Ok(Lease::new(
                            key.clone(),
                            owner.clone(),
                            Fence(body.fence),
                            ttl,
                            issued,
                            since,
                        )
                        .with_token(etag));
                    }
                    let left = self.sightings.remaining(body.ttl(), first);
                    if body.held && !left.is_zero() {
                        return Err(self.locked(key, info(key, &body, left)));
                    }
                    (
                        LeaseBody::held(owner, body.fence + 1, ttl, since),
                        Self::if_match(&etag),
                    )
                }
            };
            if let Some(new) = self.write_lease(&path, &grant, mode, issued).await? {
                return Ok(Lease::new(
                    key.clone(),
                    owner.clone(),
                    Fence(grant.fence),
                    ttl,
                    issued,
                    since,
                )
                .with_token(new));
            }
            attempted = Some(grant);
        }
        Err(self.locked(key, self.live_holder(key).await?))
    }

    fn lease_lost(
        &self,
        lease: &Lease,
        holder: Option<LockInfo>,
        op: Operation,
        why: &str,
    ) -> Error {
        let mut error = Error::new(ErrorKind::LeaseLost, why.to_owned())
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(lease.key());
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    /// The ETag of the lease object this grant wrote: a lease without one
    /// was not granted by this backend and can be nobody's.
    fn token<'a>(&self, lease: &'a Lease, op: Operation) -> Result<&'a str> {
        match lease.token() {
            Some(token) if !token.is_empty() => Ok(token),
            _ => Err(self.lease_lost(
                lease,
                None,
                op,
                "this lease was not granted by the S3 backend",
            )),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.require_conditional()?;
        let path = self.lease_path(lease.key());
        let token = self.token(lease, Operation::Release)?;
        let lapsed = lease.is_expired();
        let freed = self
            .write_lease(
                &path,
                &LeaseBody::free(lease.fence().get()),
                Self::if_match(token),
                Instant::now(),
            )
            .await?;
        match (freed, lapsed) {
            (Some(_), false) => Ok(()),
            (Some(_), true) => Err(self.lease_lost(
                lease,
                None,
                Operation::Release,
                "the lease expired before it was released",
            )),
            (None, _) => Err(self.lease_lost(
                lease,
                self.live_holder(lease.key()).await?,
                Operation::Release,
                "the lease was taken over, released or broken",
            )),
        }
    }

    /// A write fenced by `lease` (see the crate documentation for exactly
    /// what is checked).
    async fn fenced_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: &PutMode,
    ) -> Result<Version> {
        self.require_conditional()?;
        let run = lease.key().run();
        lease.key().check_covers(run, doc)?;
        let fenced = |holder: Option<LockInfo>, why: &str| {
            let mut error = Error::new(
                ErrorKind::Fenced,
                format!(
                    "lease with fence {}: {why}; nothing was written",
                    lease.fence()
                ),
            )
            .with_backend(BACKEND)
            .with_lock(lease.key());
            if let Some(holder) = holder {
                error = error.with_holder(holder);
            }
            error
        };
        if lease.is_expired() {
            return Err(fenced(None, "its deadline has passed"));
        }
        let lease_path = self.lease_path(lease.key());
        let current = self
            .found(self.store.head(&lease_path))
            .await?
            .and_then(|meta| meta.e_tag);
        if current.is_none() || current.as_deref() != lease.token() {
            return Err(fenced(
                self.live_holder(lease.key()).await?,
                "the lease object changed",
            ));
        }
        let path = self.doc_path(run, doc);
        for _ in 0..3 {
            let os_mode = match mode {
                PutMode::Create => OsPutMode::Create,
                PutMode::Update(v) => Self::if_match(v.as_str()),
                // Conditional on what is there now, so a write slipping in
                // between is never overwritten blindly.
                PutMode::Overwrite => match self.found(self.store.head(&path)).await? {
                    Some(meta) => match meta.e_tag {
                        Some(etag) => Self::if_match(&etag),
                        None => OsPutMode::Overwrite,
                    },
                    None => OsPutMode::Create,
                },
            };
            match self.put_object(&path, bytes.clone(), os_mode).await {
                Ok(etag) => return version_of(etag),
                Err(e)
                    if *mode == PutMode::Overwrite
                        && matches!(
                            e.kind(),
                            ErrorKind::AlreadyExists | ErrorKind::Precondition
                        ) =>
                {
                    continue;
                }
                Err(e) if matches!(mode, PutMode::Update(_)) && e.kind() == ErrorKind::NotFound => {
                    return Err(
                        Error::new(ErrorKind::Precondition, "the document does not exist")
                            .with_backend(BACKEND),
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Precondition,
            "the document kept changing during the save",
        )
        .with_backend(BACKEND))
    }
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("config", &self.inner.config)
            .field("probe", &self.inner.probe)
            .finish()
    }
}

fn page<T: Clone + Ord>(mut all: Vec<T>, after: Option<&T>, limit: usize) -> ListPage<T> {
    all.sort();
    all.dedup();
    let start = after.map_or(0, |a| all.partition_point(|x| x <= a));
    let limit = limit.max(1);
    let more = all.len() > start + limit;
    ListPage {
        items: all.into_iter().skip(start).take(limit).collect(),
        more,
    }
}

#[async_trait]
impl Store for S3Store {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let inner = &self.inner;
        let path = inner.doc_path(run, doc);
        let outcome = async {
            let Some(got) = inner.found(inner.store.get(&path)).await? else {
                return Ok(None);
            };
            // The size is known from the headers, before the body is read.
            if let Some(limit) = options.limit
                && got.meta.size > limit
            {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "document is {} bytes, over the limit of {limit}",
                        got.meta.size
                    ),
                )
                .with_backend(BACKEND));
            }
            let version = version_of(got.meta.e_tag.clone())?;
            let bytes = inner.bounded(got.bytes()).await?;
            Ok(Some(StoredDoc { bytes, version }))
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let inner = &self.inner;
        let outcome = async {
            if let Some(lease) = options.lease {
                lease.key().check_covers(run, doc)?;
                return inner.fenced_put(lease, doc, bytes, &options.mode).await;
            }
            let mode = match &options.mode {
                PutMode::Overwrite => OsPutMode::Overwrite,
                PutMode::Create => {
                    inner.require_conditional()?;
                    OsPutMode::Create
                }
                PutMode::Update(v) => {
                    inner.require_conditional()?;
                    Inner::if_match(v.as_str())
                }
            };
            match inner
                .put_object(&inner.doc_path(run, doc), bytes, mode)
                .await
            {
                Ok(etag) => version_of(etag),
                Err(e)
                    if matches!(options.mode, PutMode::Update(_))
                        && e.kind() == ErrorKind::NotFound =>
                {
                    Err(
                        Error::new(ErrorKind::Precondition, "the document does not exist")
                            .with_backend(BACKEND),
                    )
                }
                Err(e) => Err(e),
            }
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let inner = &self.inner;
        let outcome = async {
            let path = inner.doc_path(run, doc);
            let existed = inner.found(inner.store.head(&path)).await?.is_some();
            // Nothing to delete needs no condition; anything else would.
            if if_version.is_some() && existed {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "S3 conditional deletes are not offered by this backend (see its capabilities)",
                )
                .with_backend(BACKEND));
            }
            if existed {
                match inner.bounded(inner.store.delete(&path)).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Ok(existed)
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Delete, run, doc))
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let inner = &self.inner;
        let listing = inner
            .bounded(inner.store.list_with_delimiter(Some(&inner.run_path(run))))
            .await
            .map_err(|e| e.with_operation(Operation::ListDocs).with_run(run))?;
        let mut all: Vec<DocMeta> = Vec::with_capacity(listing.objects.len());
        for meta in listing.objects {
            if let Some(name) = inner.doc_of(&meta.location) {
                all.push(DocMeta {
                    name,
                    version: version_of(meta.e_tag)?,
                    size: meta.size,
                });
            }
        }
        // Object keys sort with their extension; documents sort by name.
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let start = after.map_or(0, |a| all.partition_point(|m| m.name <= *a));
        let limit = limit.max(1);
        let more = all.len() > start + limit;
        Ok(ListPage {
            items: all.into_iter().skip(start).take(limit).collect(),
            more,
        })
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let inner = &self.inner;
        let root = (!inner.root.is_empty()).then(|| Path::from(inner.config.prefix.as_str()));
        let listing = inner
            .bounded(inner.store.list_with_delimiter(root.as_ref()))
            .await
            .map_err(|e| e.with_operation(Operation::ListRuns))?;
        let runs: Vec<RunId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| RunId::new(n).ok()))
            .collect();
        Ok(page(runs, after, limit))
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner;
        let prefix = inner.run_path(run);
        let outcome = async {
            let paths: Vec<Path> = inner
                .bounded(
                    inner
                        .store
                        .list(Some(&prefix))
                        .map_ok(|meta| meta.location)
                        .try_collect(),
                )
                .await?;
            let docs = paths.iter().filter(|p| inner.doc_of(p).is_some()).count() as u64;
            let stream = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
            let _: Vec<Path> = inner
                .bounded(inner.store.delete_stream(stream).try_collect())
                .await?;
            Ok(docs)
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::DeleteRun).with_run(run))
    }
}

#[async_trait]
impl Lock for S3Store {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.inner
            .try_acquire(key, owner, ttl)
            .await
            .map_err(|e| e.with_operation(Operation::Acquire).with_lock(key))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let inner = &self.inner;
        let outcome = async {
            inner.require_conditional()?;
            if lease.is_expired() {
                return Err(inner.lease_lost(lease, None, Operation::Renew, "the lease expired"));
            }
            let issued = Instant::now();
            let token = inner.token(lease, Operation::Renew)?;
            let body = LeaseBody::held(lease.owner(), lease.fence().get(), ttl, lease.since());
            let path = inner.lease_path(lease.key());
            match inner
                .write_lease(&path, &body, Inner::if_match(token), issued)
                .await?
            {
                Some(etag) => Ok(lease.renewed(ttl, issued).with_token(etag)),
                None => Err(inner.lease_lost(
                    lease,
                    inner.live_holder(lease.key()).await?,
                    Operation::Renew,
                    "the lease was taken over, released or broken",
                )),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::Renew).with_lock(lease.key()))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let outcome = self
            .inner
            .release(lease)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()));
        self.inner.signals.released(lease.key());
        outcome
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.require_conditional()?;
        self.inner
            .live_holder(key)
            .await
            .map_err(|e| e.with_operation(Operation::Inspect).with_lock(key))
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let inner = &self.inner;
        let outcome = async {
            inner.require_conditional()?;
            let path = inner.lease_path(key);
            let Some((etag, body, first)) = inner.read_lease(&path).await? else {
                return Ok(None);
            };
            if !body.held || only_fence.is_some_and(|f| f.get() != body.fence) {
                return Ok(None);
            }
            let broken = info(key, &body, inner.sightings.remaining(body.ttl(), first));
            if inner
                .write_lease(
                    &path,
                    &LeaseBody::free(body.fence),
                    Inner::if_match(&etag),
                    Instant::now(),
                )
                .await?
                .is_none()
            {
                return Ok(None);
            }
            if let Some(b) = &broken {
                tracing::warn!(
                    lock = %key,
                    holder = %b.owner,
                    fence = %b.fence,
                    by = %format!("{}:{}", runstate_core::process::hostname(), std::process::id()),
                    "lease broken"
                );
            }
            Ok(broken)
        };
        let outcome = outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::BreakLock).with_lock(key));
        inner.signals.released(key);
        outcome
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let inner = &self.inner;
        let outcome = async {
            inner.require_conditional()?;
            let paths: Vec<Path> = inner
                .bounded(
                    inner
                        .store
                        .list(Some(&inner.locks_path(run)))
                        .map_ok(|m| m.location)
                        .try_collect(),
                )
                .await?;
            let mut locks = Vec::new();
            for path in paths {
                let Some(key) = inner.lock_of(&path) else {
                    continue;
                };
                if let Some(found) = inner.live_holder(&key).await? {
                    locks.push(found);
                }
            }
            locks.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(locks)
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::ListLocks))
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.inner.signals.wait(key, max).await;
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let op = Operation::AcquireAndLoad;
        key.check_covers(key.run(), doc)
            .map_err(|e| e.with_backend(BACKEND).with_operation(op))?;
        let lease = self
            .try_acquire(key, owner, ttl)
            .await
            .map_err(|e| e.with_operation(op))?;
        match self.get(key.run(), doc, options).await {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                let _ = self.release(&lease).await;
                Err(error.with_operation(op))
            }
        }
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run();
        let saved = self
            .inner
            .fenced_put(lease, doc, bytes, &mode)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc));
        if !matches!(&saved, Err(e) if e.kind() == ErrorKind::Fenced)
            && let Err(error) = self.inner.release(lease).await
        {
            tracing::debug!(%error, "release after a save");
        }
        self.inner.signals.released(lease.key());
        saved
    }
}
