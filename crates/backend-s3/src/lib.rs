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
//! | object | what it holds |
//! |---|---|
//! | `prefix/<run>/<name>.<ext>` | a document: exactly the saved bytes |
//! | `prefix/.runstate/locks/<run>/run.lease` | the lease of the run lock (JSON) |
//! | `prefix/.runstate/locks/<run>/doc.<name>.lease` | the lease of a document lock (JSON) |
//! | `prefix/.runstate/milestones/<run>.json` | the run's milestones and attributes (JSON) |
//! | `prefix/.runstate/probe/…` | scratch keys of the conditional-write probe |
//!
//! URL options are listed in [`S3Config`]'s module documentation
//! (`s3://bucket/prefix?endpoint=…&watch_ms=…`).
//!
//! Only objects named `<name>.<ext>` directly in a run's folder, with a
//! valid document name, are documents. Anything else under the prefix
//! (model outputs, other extensions, nested folders) is left alone by every
//! operation except [`S3Store::purge_prefix`].
//!
//! ## Any object store
//!
//! [`S3Store::open`] builds the S3 client from an [`S3Config`];
//! [`S3Store::from_object_store`] opens the store on any
//! [`ObjectStore`] instead: an S3 client the caller built or wrapped (a
//! limit, tracing, fault injection), or object_store's
//! [`InMemory`](object_store::memory::InMemory), which honours conditional
//! puts and conditional reads and passes the whole conformance suite but
//! the multi-process cases (it lives in one process). The probe runs the same
//! way on either.
//!
//! ## Google Cloud Storage and Azure Blob Storage
//!
//! With the features `gcs` and `azure` (object_store's `gcp` and `azure`
//! clients, nothing else), `gs://bucket/prefix?…` and
//! `az://container/prefix?account=…` open the same store on those clouds
//! (options and credentials: [`S3Config`]'s module documentation). The
//! layout, the leases, the nonces, the probe and every guarantee below are
//! the same; what differs:
//!
//! - **GCS** makes writes conditional on an object's *generation*, not its
//!   ETag, and its listings carry no generation. Versions stay ETags, and
//!   an `Update(version)` (and every lease compare-and-swap) is a `HEAD`
//!   reading the object's ETag and generation, refused when the ETag is
//!   not the version, then a `PUT` conditional on that generation: an
//!   `If-Match` by ETag, one request dearer. A client built by the caller
//!   gets the same treatment when the configuration says
//!   [`Provider::Gcs`] ([`S3Config::with_provider`]). Tested against a
//!   stand-in enforcing GCS's rules on `InMemory` (the conformance suite,
//!   `tests/conformance_gcs.rs`); no GCS server or emulator was reachable.
//! - **Azure** honours `If-Match` / `If-None-Match: *` as S3 does; its
//!   metadata names allow no `-`, so the nonce is `x-ms-meta-runstatenonce`;
//!   its listings give ETags unquoted, which this store quotes, so a
//!   version reads the same everywhere; deleting an absent blob is `404`
//!   there, which deletes treat as done. The conformance suite runs on
//!   Azurite (`tests/conformance_azure.rs`).
//!
//! ## What is guaranteed, exactly
//!
//! - `Create` is `If-None-Match: *`, `Update(version)` is `If-Match`
//!   with the version's ETag: both atomic on the server.
//! - **A write reported as failed is recognised when it happened.** Every
//!   document write carries a random nonce in the object's user metadata
//!   (`x-amz-meta-runstate-nonce` on S3, `x-goog-meta-runstate-nonce` on
//!   GCS, `x-ms-meta-runstatenonce` on Azure, whose metadata names allow no
//!   `-`). When a conditional write is refused
//!   (`412`), or its outcome is unknown (a transport error, a timeout), the
//!   store reads the document's metadata back (one `HEAD`): if it carries
//!   this write's nonce, the write was applied (S3 answered 5xx to a PUT it
//!   applied and object_store's retry got `412`, or a reply was lost) and
//!   the call succeeds with its version; a typed update therefore never
//!   applies its closure twice. The same bytes written by anyone else
//!   carry another nonce and are not taken for this write. When the
//!   metadata cannot be read back after a refusal, the error is a
//!   retryable `Backend` error (outcome unknown), never `Precondition`.
//!   What it cannot recognise is an applied try overwritten by another
//!   writer before the read back. A writer that does not take the lock can
//!   do that at any time (then the write is reported refused although it
//!   happened once). A fenced writer of the same lock can only once this
//!   lease is no longer this grant (lapsed, or broken by an operator with
//!   its deadline still ahead, and taken), so a fenced `Update` or
//!   `Create` refused then (the lease is read again after the refusal) is
//!   reported as a `Backend` error saying the outcome is unknown (not
//!   retryable), never `Precondition`: a typed update would otherwise run
//!   its closure again on data that may hold its first run. (A fenced
//!   `Overwrite` is then `Fenced`: the successor's write came after any
//!   try of it, so the store is as if it was never written.) A refused
//!   `Update` is `Precondition` and a refused `Create` `AlreadyExists`,
//!   whatever the server answered (`412`, or `409` for a conditional PUT
//!   that raced another).
//! - **An `Update(version)` whose version is no ETag** of this store
//!   (empty, blank, `*`, weak, a list, anything but a quoted tag) is
//!   refused with `Precondition` before the document is written (after
//!   the lease check, for a fenced one): servers ignore or widen such
//!   `If-Match` headers, which would make it unconditional.
//! - A document over 5 GiB (the largest single PUT, declared as
//!   [`Capabilities::max_document_size`]) is refused with `TooLarge`
//!   before anything is sent.
//! - The `endpoint` option must be a plain `http`/`https` URL: one
//!   holding credentials or a query is refused (`Config`) when the store
//!   opens, since every request's URL, which object_store's errors print,
//!   starts with it.
//! - Conditional deletes are not offered ([`Capabilities::conditional_delete`]
//!   is `false`; they fail with `Unsupported` when the document exists,
//!   and answer `false` when it does not).
//! - Leases are compare-and-swap writes of lease objects; expiry follows the
//!   waiter's monotonic clock (see [`leases`](crate#lease-expiry)). TTLs
//!   outside 1 ms ..= [`MAX_TTL`](runstate_core::MAX_TTL) are refused with
//!   `InvalidArgument` before anything is sent.
//! - **Acquire is idempotent by owner**: the owner id that holds a live
//!   grant gets that grant back from `try_acquire` / `acquire_and_load`
//!   (same fence, same `since`), its TTL restarted by a conditional write of
//!   the lease object. A retry after a lost grant reply thus gets its grant
//!   instead of waiting a TTL behind itself. A renewal or release whose
//!   reply was lost is recognised the same way (the lease object holds
//!   exactly the body it wrote). A renewal the server applied whose reply
//!   was lost altogether leaves the caller with the token it replaced: a
//!   later renewal, release or fenced save with that token finds the lease
//!   object still holding this grant (held, same owner id, fence and
//!   `since`; a successor's grant has a higher fence) and goes on from the
//!   version there, instead of reporting the lease lost. A release names
//!   the grant it ended in the lease object it leaves (free, with the
//!   grant's owner id, fence and `since`), so a release sent again after
//!   its reply was lost altogether succeeds; a break leaves one naming
//!   nobody, so a release after it is `LeaseLost`. A break whose reply was
//!   lost is recognised by its body and reported as the break it was.
//! - **Fencing is [`Fencing::VersionOnly`]**: S3 cannot make a write
//!   conditional on another object. A save under a lease is made in this
//!   order: (1) the version the write will be conditional on is fixed: the
//!   version loaded under the lease for `Update`, "absent" for `Create`,
//!   and for `Overwrite` the document's version read now (one `HEAD`);
//!   (2) the lease is checked: refused with `Fenced` when its own local
//!   deadline has passed or the lease object is no longer the version this
//!   grant wrote (one `HEAD`); (3) the write is conditional on the version
//!   of (1) (`If-Match`, or `If-None-Match: *` when absent). A successor
//!   can only save after taking the lease, which comes after (2) succeeded
//!   for a stalled holder, so the successor's save changes the version and
//!   the stalled write is refused; an overwrite refused that way starts
//!   again from (1), so no write is ever conditional on a version read after
//!   the last lease check. No update is ever lost. What it cannot promise:
//!   a holder whose lease expires between (2) and (3) still writes if
//!   nobody changed the document meanwhile. A fenced `Update` or `Create`
//!   costs two requests (the lease `HEAD` and the PUT), an `Overwrite`
//!   three; `save_and_release` adds the release's PUT.
//! - **A locked update is four round trips**: `acquire_and_load` sends
//!   the document `GET` together with the lease `PUT` that grants the
//!   lock (one round trip; a lock seen for the first time reads its lease
//!   object first), and `save_and_release` is the lease `HEAD`, the
//!   document `PUT` and the release `PUT`, which must follow one another:
//!   five requests in four round trips (a server that serves requests one
//!   at a time, such as moto, takes as long for five requests however
//!   they are sent). The read sent with the grant is kept only when that
//!   grant succeeds,
//!   and it sees what a read after the grant would: the grant is
//!   conditional on the lease object being the version seen before the
//!   read was sent (free, lapsed, this owner's, or this store's own
//!   release), so no grant, hence no locked save, came in between.
//! - **Batches are concurrent requests**: [`Store::get_many`] and
//!   [`Store::put_many`] send up to [`BATCH_REQUESTS`] requests at once
//!   (across every batch of the store),
//!   each exactly the single `get` or `put` (a `put` with its own
//!   condition and nonce); writes of one document in a batch keep their
//!   order.
//! - **A version proves its bytes when it is their MD5**: a document's
//!   version is the ETag the server returned, which for a single-part
//!   `PUT` without SSE-KMS or SSE-C is the MD5 of the bytes it stored.
//!   [`version_is_md5_of`] tells whether a version is the MD5 of given
//!   bytes, so a copy (a migration) can be verified without reading it
//!   back; a version that is not says nothing, and the copy must be read
//!   back.
//! - `save_and_release` releases the lease whatever the save's outcome,
//!   except when the save found the lease already lost (`Fenced`,
//!   `LeaseLost`).
//! - `delete_run` deletes only the run's documents; other objects in the
//!   run's folder and the run's lease objects stay (fences keep
//!   increasing). `list_runs` lists every folder under the prefix whose
//!   name is a valid run id, including one left with no document; its
//!   later pages come from the listing made for the first page (see
//!   [`S3Store`]'s `list_runs`), so listing every run costs one listing.
//!   Likewise the later pages of a run's documents (`list_docs`), so
//!   listing every document of a run larger than a page costs one
//!   listing of the run, not one per page.
//! - A conditional-write probe runs on open (and on demand with
//!   [`S3Store::doctor`]): a second create-only write of a key, an update
//!   conditional on the version the key had before its last change (on GCS
//!   naming its generation, so the server decides, not the wrapper's own
//!   comparison) and eight racing creates. On a server that ignores the
//!   conditions the store refuses `Create`, `Update`, every lease operation
//!   and milestones with `Unsupported` instead of pretending.
//!
//! ## Split stores, cached reads, watching, status, milestones
//!
//! | capability | on S3 |
//! |---|---|
//! | `foreign_fencing` | `false` |
//! | `native_conditional_get` | `true` |
//! | `modified_times` | `true`: listings and [`Store::head`] carry each object's `Last-Modified` |
//! | `watch` | `Polling(watch_ms)`, 1 s by default |
//! | `status` | `false` |
//! | `milestones` | `true` (when the probe found conditional writes honoured) |
//!
//! - **No fence watermarks.** S3 cannot make a write conditional on
//!   another object, so this store cannot keep a per-lock watermark
//!   checked atomically with a document write. [`Store::claim`] and a put
//!   with [`PutOptions::foreign_lease`] fail with `Unsupported` (the put
//!   before anything is sent: never written unfenced). As the document
//!   store of a split store it is therefore `VersionOnly`: a save is
//!   conditional on the version loaded under the lease.
//! - **Conditional reads are native**: [`Store::get_if_changed`] is one
//!   `GET` with `If-None-Match: <ETag>`; an unchanged document is answered
//!   `304 Not Modified`, without its bytes.
//! - **Watching polls**: S3 has no change channel. [`Store::watch`] lists
//!   the run every `watch_ms` and reports the differences
//!   ([`poll_watch`]); writes superseded within one interval are reported
//!   once, with the latest version. The first listing is made before
//!   `watch` returns, so nothing written after it is missed.
//! - **Waiting for a release** ([`Lock::wait_for_release`]) is woken by
//!   releases made through the same store instance; S3 offers no
//!   notification, so waiters in other processes (or other store
//!   instances) poll, with their wait policy's backoff.
//! - **No status messages** (`publish`, `subscribe` fail with
//!   `Unsupported`). A replayable, ordered history needs an append; S3
//!   objects can only be replaced. The designs that remain cost too much
//!   for progress messages or are unsound: one object rewritten by
//!   compare-and-swap serialises every publisher of a run on one object
//!   and rewrites the whole history per message; one object per message
//!   needs a sequence number that publishers race for (a conditional
//!   create per try) and a `LIST` per subscriber per poll, and trimming it
//!   needs deletes that race with readers. Use a split store whose status
//!   service has a log (Redis streams, SQL), as WEPPcloud does.
//! - **Milestones** ([`Store::mark`], [`Store::set_attr`],
//!   [`Store::milestones`]): one JSON object per run,
//!   `prefix/.runstate/milestones/<run>.json`,
//!   `{"v":1,"timestamps":{"build_climate":"1795000000.25"},"attrs":{"has_sbs":"false"}}`
//!   (timestamps are epoch seconds with up to nine decimals, as text, so
//!   they come back exactly). It is changed only by compare-and-swap: read
//!   it with its ETag, set the one field, write it with `If-Match` (or
//!   `If-None-Match: *` when there is none), and on a refusal (someone set
//!   another field meanwhile) read again and retry, with a jittered
//!   backoff, up to 64 tries. Concurrent marks of different fields
//!   therefore never lose one, without a document lock; a mark costs a
//!   `GET` and a `PUT` when nobody else marks the same run at once.
//!   [`Store::delete_run`] deletes it with the run's documents: it is run
//!   metadata.
//!
//! ## Lease expiry
//!
//! A waiter never compares its wall clock with object timestamps: a held
//! lease version (ETag) is expired `ttl × (1 + skew_pct / 100)` after this
//! store first saw it (or wrote it). "Saw" is when the response carrying
//! that version arrived, not when the request was sent (object_store may
//! retry a read for a long time, and the lease may have been written
//! meanwhile). A store seeing a lease for the first time therefore waits a
//! full TTL plus the margin before taking it over.

#![forbid(unsafe_code)]

mod config;
mod engine;
mod errors;
mod generation;
mod leases;
mod milestones;
mod probe;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions as OsGetOptions, ObjectStore, ObjectStoreExt, PutMode as OsPutMode};
use runstate_core::batch::waves;
use runstate_core::events::{check_label, check_text, poll_watch};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fencing, Fetched,
    GetOptions, Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode,
    PutOptions, PutRequest, ReleaseSignals, Result, RunId, Store, StoredDoc, Version, WatchMode,
    Watcher, async_trait, check_ttl,
};
use tokio::sync::Semaphore;

pub use config::{Provider, S3Config};
/// The object_store crate this backend is built on, so a caller wrapping
/// or building an [`ObjectStore`] for [`S3Store::from_object_store`] uses
/// the same version.
pub use object_store;
pub use probe::ProbeReport;

use crate::engine::{
    DocListing, RunListing, WriteError, check_limit, is_plain_etag, refusal, version_of,
};
use crate::errors::{map_error, timed_out};
use crate::leases::{LeaseBody, Sightings, info};
use crate::milestones::format_time;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "s3";

/// The largest object a single PUT may write.
pub(crate) const MAX_OBJECT: u64 = 5 * 1024 * 1024 * 1024;

/// The user-metadata key (`x-amz-meta-runstate-nonce` on S3) of the random
/// nonce every document write carries, so a write reported as failed can be
/// recognised as applied (see [`Inner::write_doc`]).
const NONCE_KEY: &str = "runstate-nonce";

/// [`NONCE_KEY`] on Azure, whose metadata names must be C# identifiers
/// (no `-`): `x-ms-meta-runstatenonce`.
const AZURE_NONCE_KEY: &str = "runstatenonce";

/// Requests of [`Store::get_many`] and [`Store::put_many`] in flight at
/// once, across every batch of one store: S3 gains little from more, and a
/// server that does all its work in one process (moto) loses.
pub const BATCH_REQUESTS: usize = 32;

/// How long a listing of the runs serves later pages of a paging pass.
const LISTING_FRESH: Duration = Duration::from_secs(30);

/// Compare-and-swap tries of one milestone change before giving up (each
/// lost try means another field of the run was changed meanwhile).
const MILESTONE_TRIES: u32 = 64;

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
    /// The last full listing of the runs, which serves the later pages of
    /// a paging pass (see [`Store::list_runs`] on [`S3Store`]).
    runs: Mutex<Option<RunListing>>,
    /// The last full listing of one run's documents that did not fit in
    /// the page asked for, which serves the later pages of that paging
    /// pass (see [`Store::list_docs`] on [`S3Store`]).
    docs: Mutex<Option<DocListing>>,
    signals: ReleaseSignals,
    bound: Duration,
    /// The user-metadata name of a document write's nonce.
    nonce_key: &'static str,
    /// [`BATCH_REQUESTS`] permits, one per request of a batch in flight.
    batch_requests: Semaphore,
}

impl S3Store {
    /// Builds the S3 client [`S3Config::object_store`] describes and opens
    /// the store on it (see [`from_object_store`](Self::from_object_store)).
    ///
    /// # Errors
    /// `Config` for bad settings; backend errors when the bucket cannot be
    /// reached during the probe.
    pub async fn open(config: S3Config) -> Result<S3Store> {
        let store = config
            .object_store()
            .map_err(|e| e.with_operation(Operation::Open))?;
        Self::from_object_store(store, config).await
    }

    /// Opens the store on any [`ObjectStore`]: an S3 client built by the
    /// caller (or by [`S3Config::object_store`]) and wrapped as it likes,
    /// or another store with conditional puts, such as
    /// [`InMemory`](object_store::memory::InMemory) for tests.
    ///
    /// From `config` it uses the key prefix, the document extension, the
    /// probe setting, the skew margin and the timeout and retries (which
    /// bound each call: `timeout × (retries + 2)`); the bucket only names
    /// the store in logs. The endpoint, region, credentials and the
    /// client's own timeouts and retries are `store`'s. Unless disabled,
    /// the conditional-write probe runs on `store` as in
    /// [`open`](Self::open).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use runstate_core::Store;
    /// use runstate_s3::object_store::memory::InMemory;
    /// use runstate_s3::{S3Config, S3Store};
    ///
    /// # async fn example() -> runstate_core::Result<()> {
    /// let config = S3Config::new("memory").with_prefix("lab")?;
    /// let store = S3Store::from_object_store(Arc::new(InMemory::new()), config).await?;
    /// assert!(store.capabilities().leases);
    /// # Ok(()) }
    /// # let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    /// # runtime.expect("a runtime").block_on(example()).expect("opens");
    /// ```
    ///
    /// # Errors
    /// Backend errors when the probe cannot run.
    pub async fn from_object_store(
        store: Arc<dyn ObjectStore>,
        config: S3Config,
    ) -> Result<S3Store> {
        let context = |e: Error| e.with_operation(Operation::Open);
        let provider = config.provider;
        // GCS makes updates conditional on generations, not ETags.
        let store = match provider {
            Provider::Gcs => generation::GenerationMatch::wrap(store),
            _ => store,
        };
        let root = if config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", config.prefix)
        };
        let bound = config.bound();
        let probe = if config.probe {
            let scratch = Path::from(format!("{root}.runstate/probe"));
            let limit = bound.saturating_mul(4);
            let report = match tokio::time::timeout(limit, probe::probe(&store, &scratch)).await {
                Ok(Ok(report)) => report,
                Ok(Err(e)) => return Err(context(map_error(e))),
                Err(_) => return Err(context(timed_out(limit))),
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
            // S3 cannot make a write conditional on another object, so no
            // fence watermarks: a split store treats this one as
            // VersionOnly (see the crate documentation).
            .with_foreign_fencing(false)
            .with_native_conditional_get(true)
            // Listings and `head` carry each object's `Last-Modified`.
            .with_modified_times(true)
            .with_watch(WatchMode::Polling(config.watch_interval))
            // No append: see the crate documentation.
            .with_status(false)
            .with_milestones(conditional)
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
                runs: Mutex::new(None),
                docs: Mutex::new(None),
                signals: ReleaseSignals::new(),
                bound,
                nonce_key: match provider {
                    Provider::Azure => AZURE_NONCE_KEY,
                    _ => NONCE_KEY,
                },
                batch_requests: Semaphore::new(BATCH_REQUESTS),
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

    /// Deletes every object under this store's prefix, documents or not,
    /// and returns how many. For tests and for decommissioning a prefix.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn purge_prefix(&self) -> Result<u64> {
        let prefix =
            (!self.inner.root.is_empty()).then(|| Path::from(self.inner.config.prefix.as_str()));
        *self.inner.runs.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.inner.docs.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.inner.delete_under(prefix.as_ref()).await
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
        inner
            .get_doc(&inner.doc_path(run, doc), options)
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    /// One `HEAD` request: the document's version, size and modification
    /// time (the object's `Last-Modified`, as the server dates it), without
    /// its body; `None` when absent.
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let inner = &self.inner;
        let outcome = async {
            let Some(meta) = inner
                .found(inner.store.head(&inner.doc_path(run, doc)))
                .await?
            else {
                return Ok(None);
            };
            Ok(Some(DocStat::new(
                version_of(meta.e_tag)?,
                meta.size,
                Some(meta.last_modified.into()),
            )))
        };
        outcome
            .await
            .map_err(|e: Error| e.at_doc(Operation::Head, run, doc))
    }

    /// Concurrent `GET`s, at most [`BATCH_REQUESTS`] in flight (across
    /// every batch of this store), each
    /// exactly [`get`](Store::get); the results come back in the order of
    /// `docs`. Nothing fails the whole batch: each document has its own
    /// result.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        // A loop rather than stream combinators with closures, which would
        // make the future lose `Send` (async_trait needs it).
        let mut out = Vec::with_capacity(docs.len());
        let mut docs = docs.iter();
        let mut running = FuturesOrdered::new();
        loop {
            while running.len() < BATCH_REQUESTS {
                let Some(doc) = docs.next() else { break };
                running.push_back(async move {
                    let _permit = self.inner.batch_permit().await?;
                    self.get(run, doc, options).await
                });
            }
            match running.next().await {
                Some(outcome) => out.push(outcome),
                None => return Ok(out),
            }
        }
    }

    /// Concurrent `PUT`s, at most [`BATCH_REQUESTS`] in flight (across
    /// every batch of this store), each
    /// exactly [`put`](Store::put) (its own condition, its own nonce, its
    /// own recognition of an applied write answered as failed); the
    /// results come back in the order of `puts`. Writes of one document
    /// keep their order: the batch goes in waves, the `n`-th write of
    /// each document in wave `n`, each wave after the previous one
    /// finished, so a later write of a document sees the earlier one's
    /// outcome exactly as one-at-a-time writes would. Nothing fails the
    /// whole batch: each write has its own result.
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        let mut done: Vec<(usize, Result<Version>)> = Vec::with_capacity(puts.len());
        for wave in waves(&puts, 0..puts.len()) {
            let mut wave = wave.into_iter();
            let mut running = FuturesUnordered::new();
            loop {
                while running.len() < BATCH_REQUESTS {
                    let Some(i) = wave.next() else { break };
                    let put = &puts[i];
                    running.push(async move {
                        let _permit = match self.inner.batch_permit().await {
                            Ok(permit) => permit,
                            Err(error) => return (i, Err(error)),
                        };
                        let outcome = self
                            .put(
                                run,
                                &put.doc,
                                put.bytes.clone(),
                                PutOptions::mode(put.mode.clone()),
                            )
                            .await;
                        (i, outcome)
                    });
                }
                match running.next().await {
                    Some(outcome) => done.push(outcome),
                    None => break,
                }
            }
        }
        done.sort_unstable_by_key(|(i, _)| *i);
        Ok(done.into_iter().map(|(_, outcome)| outcome).collect())
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
            if let Some(foreign) = options.foreign_lease {
                // Never written unfenced: refused before anything is sent.
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "S3 cannot make a write conditional on another object, so this store keeps \
                     no fence watermarks and cannot fence a save under a lease granted by another \
                     lock service (capability foreign_fencing is false); nothing was written",
                )
                .with_backend(BACKEND)
                .with_lock(foreign.key()));
            }
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
                    Inner::if_version(v)?
                }
            };
            match inner
                .write_doc(&inner.doc_path(run, doc), bytes, mode)
                .await
            {
                Ok(version) => Ok(version),
                Err(WriteError::Refused { error, .. }) => Err(refusal(&options.mode, error)),
                Err(WriteError::Failed(error)) => Err(error),
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

    /// Lists the documents of a run: one delimited listing of its folder
    /// (paged by the server, 1,000 objects a request on S3), sorted by
    /// name, since object keys sort with their extension.
    ///
    /// As for [`list_runs`](Store::list_runs), a first page (`after` =
    /// `None`) lists the run anew, and when the run holds more documents
    /// than that page, the sorted listing is kept: later pages (`after` =
    /// `Some`) of the same run are served from it while it is under 30 s
    /// old, so listing every document of a run costs one listing of it,
    /// not one per page (before, each page listed the whole run again). A
    /// paging pass therefore sees the run as it was at its first page (or
    /// at a later first page of the same run through this store): a
    /// document written after it may be missing from the later pages, or
    /// listed with its earlier version, until the next first page. This
    /// store's own [`delete_run`](Store::delete_run) drops the kept
    /// listing, and so does the page that ends it.
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let limit = limit.max(1);
        let all = self
            .inner
            .doc_listing(run, after.is_some(), limit)
            .await
            .map_err(|e| e.at_run(Operation::ListDocs, run))?;
        let start = after.map_or(0, |a| all.partition_point(|m| m.name <= *a));
        let end = start.saturating_add(limit).min(all.len());
        if end == all.len() {
            // The pass is over: the listing is not held any longer (a
            // newer one, kept by another pass meanwhile, stays).
            let mut kept = self.inner.docs.lock().unwrap_or_else(|p| p.into_inner());
            if kept.as_ref().is_some_and(|l| Arc::ptr_eq(&l.docs, &all)) {
                *kept = None;
            }
        }
        Ok(ListPage::new(all[start..end].to_vec(), end < all.len()))
    }

    /// Lists the runs: the folders under the store's prefix whose names
    /// are valid run ids.
    ///
    /// A first page (`after` = `None`) lists the prefix anew (one
    /// delimited listing, paged by the server, 1,000 runs a request on
    /// S3) and keeps the sorted result; later pages (`after` = `Some`) are
    /// served from the kept listing while it is under 30 s old, so listing
    /// every run page by page costs one listing, not one per page. A
    /// paging pass therefore sees the runs as they were at its first page
    /// (or at a later first page of another pass through this store):
    /// runs created after it may be missing and runs deleted after it may
    /// still be listed, until the next first page or the listing's age
    /// runs out. This store's own [`delete_run`](Store::delete_run) drops
    /// the kept listing.
    ///
    /// A folder that holds no document (only other objects, such as model
    /// outputs left by [`delete_run`](Store::delete_run)) still lists:
    /// telling it apart would cost a listing of every folder.
    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let runs = self
            .inner
            .run_listing(after.is_some())
            .await
            .map_err(|e| e.with_operation(Operation::ListRuns))?;
        let start = after.map_or(0, |a| runs.partition_point(|x| x <= a));
        let end = start.saturating_add(limit.max(1)).min(runs.len());
        Ok(ListPage::new(runs[start..end].to_vec(), end < runs.len()))
    }

    /// Deletes the run's documents: the objects directly in its folder
    /// named `<name>.<ext>` with a valid document name, and the run's
    /// milestones object (run metadata, gone with the run). Every other
    /// object in the folder (model outputs, other extensions, nested
    /// folders) stays, and so do the run's leases (fences keep increasing).
    /// Returns how many documents were deleted.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner;
        let outcome = async {
            let listing = inner
                .bounded(inner.store.list_with_delimiter(Some(&inner.run_path(run))))
                .await?;
            let mut paths: Vec<Path> = listing
                .objects
                .into_iter()
                .map(|meta| meta.location)
                .filter(|path| inner.doc_of(path).is_some())
                .collect();
            let docs = paths.len() as u64;
            // Deleting an absent object succeeds on S3: no HEAD first.
            paths.push(inner.milestones_path(run));
            let deleted = inner.delete_paths(paths).await.map(|_| docs);
            *inner.runs.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let mut kept = inner.docs.lock().unwrap_or_else(|p| p.into_inner());
            if kept.as_ref().is_some_and(|l| l.run == *run) {
                *kept = None;
            }
            deleted
        };
        outcome
            .await
            .map_err(|e: Error| e.at_run(Operation::DeleteRun, run))
    }

    /// One `GET` with `If-None-Match: <known>`: S3 answers `304 Not
    /// Modified` without the body when the document is still at `known`,
    /// so an unchanged document costs one small round trip whatever its
    /// size (and is `Unchanged` whatever `options.limit` says). A changed
    /// one comes back in the same response, its size checked against the
    /// limit before the body is read. A `known` that is not a plain ETag
    /// (`"…"`, as this store's versions are) is not sent: the document is
    /// read and its version compared. A server that ignores the header
    /// answers `200`; the version is compared then too, so the result is
    /// right, only the bytes travelled.
    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let inner = &self.inner;
        let path = inner.doc_path(run, doc);
        let outcome = async {
            let mut request = OsGetOptions::new();
            if is_plain_etag(known.as_str()) {
                request = request.with_if_none_match(Some(known.as_str()));
            }
            let got = match inner
                .bounded_raw(inner.store.get_opts(&path, request))
                .await?
            {
                Ok(got) => got,
                Err(object_store::Error::NotModified { .. }) => return Ok(Fetched::Unchanged),
                Err(object_store::Error::NotFound { .. }) => return Ok(Fetched::Absent),
                Err(e) => return Err(map_error(e)),
            };
            let version = version_of(got.meta.e_tag.clone())?;
            if version == *known {
                return Ok(Fetched::Unchanged);
            }
            check_limit(got.meta.size, options.limit)?;
            let bytes = inner.bounded(got.bytes()).await?;
            Ok(Fetched::Changed(StoredDoc::new(bytes, version)))
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::GetIfChanged, run, doc))
    }

    /// Polls: S3 has no change channel. The run is listed every
    /// `watch_ms` ([`S3Config::with_watch_interval`], default 1 s) by
    /// [`poll_watch`], which reports the differences; writes superseded
    /// within one interval are reported once, with the latest version
    /// (`WatchMode::Polling`). The first listing is made here, before the
    /// watcher is returned, so a write acknowledged after `watch` returns
    /// is always reported. Each watcher costs one
    /// listing of the run per interval; dropping it stops the polling.
    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        poll_watch(
            Arc::new(self.clone()),
            run.clone(),
            self.inner.config.watch_interval,
        )
        .await
        .map_err(|e| e.at_run(Operation::Watch, run))
    }

    /// Sets `timestamps.<task>` in the run's milestones object by
    /// compare-and-swap (see the crate documentation): one `GET` and one
    /// conditional `PUT` uncontended, again per concurrent change of
    /// another field. Times before 1970 are refused (`InvalidArgument`).
    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        let text = format_time(at).ok_or_else(|| {
            context(Error::new(
                ErrorKind::InvalidArgument,
                "a milestone time before 1970 cannot be stored",
            ))
        })?;
        self.inner
            .change_milestones(run, |body| {
                body.timestamps.insert(task.to_owned(), text.clone()) != Some(text.clone())
            })
            .await
            .map_err(context)
    }

    /// Sets `attrs.<name>` in the run's milestones object, as
    /// [`mark`](Store::mark) sets a timestamp.
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::SetAttr, run);
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        self.inner
            .change_milestones(run, |body| {
                body.attrs
                    .insert(name.to_owned(), value.to_owned())
                    .as_deref()
                    != Some(value)
            })
            .await
            .map_err(context)
    }

    /// Reads the run's milestones object (one `GET`); empty when it has
    /// none.
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let inner = &self.inner;
        let outcome = async {
            inner.require_conditional()?;
            match inner.read_milestones(run).await? {
                None => Ok(Milestones::default()),
                Some((_, body)) => body.to_milestones(inner.milestones_path(run).as_ref()),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.at_run(Operation::Milestones, run))
    }
}

/// Whether `version`, as this backend returned it for a write of `bytes`
/// (from [`Store::put`] or [`Store::put_many`] of an [`S3Store`]), proves
/// that the server received exactly `bytes`: it is an ETag that is the
/// MD5 of `bytes`.
///
/// A version of this backend is the ETag the server computed and returned
/// for the object it stored. For a single-part `PUT` without SSE-KMS or
/// SSE-C encryption, S3 (and the servers that follow it: MinIO, Ceph,
/// moto) make the ETag the MD5 of the object's bytes; with those
/// encryptions it is not (and a multipart upload's ETag carries a `-n`
/// suffix), and other stores behind [`S3Store::from_object_store`] make
/// their own (object_store's `InMemory` counts). An ETag equal to the MD5
/// of `bytes` can therefore only come from a server that hashed these very
/// bytes (short of an MD5 collision, which accidental corruption does not
/// produce): a copy whose version passes this check needs no read-back to
/// be verified. Anything else (`false`) says nothing either way: read the
/// object back to verify it. Versions of other backends must not be given
/// to it; a caller tells them apart by [`Capabilities::backend`]
/// ([`BACKEND`]).
pub fn version_is_md5_of(version: &Version, bytes: &[u8]) -> bool {
    use md5::{Digest, Md5};
    let Some(hex) = version
        .as_str()
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
    else {
        return false;
    };
    let expected: String = Md5::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    hex.eq_ignore_ascii_case(&expected)
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
        self.inner
            .renew(lease, ttl)
            .await
            .map_err(|e: Error| e.with_operation(Operation::Renew).with_lock(lease.key()))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        // Signalled however this call ends, also when its caller stops
        // waiting for it after the request was sent.
        let _signal = self.inner.signals.releasing(lease.key(), lease.fence());
        self.inner
            .release(lease)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()))
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
            // A swap, which reads back a refused write: a break S3 applied
            // whose reply was lost is found by its body (its nonce) and
            // reported as the break it was.
            if inner
                .swap_lease(&path, &LeaseBody::free(body.fence), &etag, Instant::now())
                .await?
                .is_err()
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
        if let Ok(Some(broken)) = &outcome {
            inner.signals.released(key, broken.fence);
        }
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

    /// Wakes on releases made through this store instance
    /// ([`ReleaseSignals`]). S3 has no channel to learn of a release made
    /// by another process or host, so waiters there are not woken: they
    /// find the lock free at their next try, after their wait policy's
    /// backoff (or `max`, whichever comes first).
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
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND).with_operation(op).with_lock(key))?;
        key.check_covers(key.run(), doc)
            .map_err(|e| e.with_backend(BACKEND).with_operation(op))?;
        let run = key.run();
        let path = self.inner.doc_path(run, doc);
        // The document is read with the grant's write, not after it (see
        // `try_acquire_loading`): one round trip less.
        let (lease, loaded) = self
            .inner
            .try_acquire_loading(key, owner, ttl, Some((&path, options)))
            .await
            .map_err(|e| e.with_operation(op).with_lock(key))?;
        let loaded = match loaded {
            Some(loaded) => loaded.map_err(|e| e.at_doc(Operation::Get, run, doc)),
            None => self.get(run, doc, options).await,
        };
        match loaded {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                if let Err(release) = self.release(&lease).await {
                    tracing::debug!(%release, "release after a failed load");
                }
                Err(error.with_operation(op))
            }
        }
    }

    /// Saves, then releases. The lease is released whatever the save's
    /// outcome, except when the save found it already lost (`Fenced`,
    /// `LeaseLost`): a failed save never leaves its lock held.
    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        // Signalled however this call ends (see `release`).
        let _signal = self.inner.signals.releasing(lease.key(), lease.fence());
        let run = lease.key().run();
        let saved = self
            .inner
            .fenced_put(lease, doc, bytes, &mode)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc));
        let lost = saved.as_ref().is_err_and(Error::is_lease_lost);
        if !lost && let Err(error) = self.inner.release(lease).await {
            tracing::debug!(%error, "release after a save");
        }
        saved
    }
}
