//! Typed documents on a run handle: load, save, locked update and guards.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::id::{DocName, RunId};
use crate::keeper::LeaseKeeper;
use crate::lease::{Lease, LockKey, Owner};
use crate::lock::Lock;
use crate::store::{GetOptions, PutMode, PutOptions, StoredDoc};
use crate::version::Version;
use crate::wait::{Backoff, LockExt, WaitPolicy};

/// Default size limit of a typed document: 16 MiB.
pub const DEFAULT_LIMIT: u64 = 16 * 1024 * 1024;

/// Default lease TTL for locked updates: 30 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// A serde type stored as one named document of a run.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use runstate_core::Document;
///
/// #[derive(Serialize, Deserialize, Default)]
/// struct Climate {
///     station: String,
///     years: u32,
/// }
///
/// impl Document for Climate {
///     const NAME: &'static str = "climate";
/// }
/// ```
pub trait Document: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The document's name in its run; must be a valid
    /// [`DocName`](crate::DocName), or every call fails with `InvalidKey`.
    const NAME: &'static str;
    /// The codec; JSON unless overridden.
    const CODEC: Codec = Codec::Json;
}

/// Which lock a locked update takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockScope {
    /// The document's own lock (the default): updates of different
    /// documents of one run proceed in parallel.
    #[default]
    Document,
    /// The run's lock: one locked update at a time per run.
    Run,
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Who takes the leases.
    pub owner: Owner,
    /// Lease TTL of locked updates and guards.
    pub ttl: Duration,
    /// How long and how to wait for busy locks and retry lost races.
    pub wait: WaitPolicy,
    /// Size limit of every document, on save and on load.
    pub limit: u64,
    /// Which lock locked updates take.
    pub scope: LockScope,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            owner: Owner::for_this_process(),
            ttl: DEFAULT_TTL,
            wait: WaitPolicy::default(),
            limit: DEFAULT_LIMIT,
            scope: LockScope::Document,
        }
    }
}

/// Typed access to a backend: hands out [`Run`] handles.
///
/// Cheap to clone; clones share the backend and the owner.
///
/// ```
/// # use std::sync::Arc;
/// # use runstate_core::{Client, Document, Lock, RunId};
/// # #[derive(serde::Serialize, serde::Deserialize, Default)]
/// # struct Climate { years: u32 }
/// # impl Document for Climate { const NAME: &'static str = "climate"; }
/// async fn bump(backend: Arc<dyn Lock>) -> runstate_core::Result<u32> {
///     let client = Client::new(backend);
///     let run = client.run(RunId::new("Test_Watershed_15")?);
///     // acquire → load → mutate → fenced save → release, retried on contention
///     run.update(|c: &mut Climate| {
///         c.years += 1;
///         c.years
///     })
///     .await
/// }
/// ```
#[derive(Clone)]
pub struct Client {
    backend: Arc<dyn Lock>,
    config: Arc<ClientConfig>,
}

impl Client {
    /// A client with the default settings and a new owner for this process.
    pub fn new(backend: Arc<dyn Lock>) -> Self {
        Self::with_config(backend, ClientConfig::default())
    }

    /// A client with explicit settings.
    pub fn with_config(backend: Arc<dyn Lock>, config: ClientConfig) -> Self {
        Client {
            backend,
            config: Arc::new(config),
        }
    }

    fn map_config(self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        let mut config = (*self.config).clone();
        f(&mut config);
        Client {
            backend: self.backend,
            config: Arc::new(config),
        }
    }

    /// Uses `owner` for leases.
    pub fn with_owner(self, owner: Owner) -> Self {
        self.map_config(|c| c.owner = owner)
    }

    /// Sets the lease TTL.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.map_config(|c| c.ttl = ttl)
    }

    /// Sets the wait policy.
    pub fn with_wait(self, wait: WaitPolicy) -> Self {
        self.map_config(|c| c.wait = wait)
    }

    /// Sets the document size limit.
    pub fn with_limit(self, limit: u64) -> Self {
        self.map_config(|c| c.limit = limit)
    }

    /// Sets which lock locked updates take.
    pub fn with_scope(self, scope: LockScope) -> Self {
        self.map_config(|c| c.scope = scope)
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Lock> {
        &self.backend
    }

    /// A handle on one run. Creating it touches nothing.
    pub fn run(&self, id: RunId) -> Run {
        Run {
            client: self.clone(),
            id,
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .finish()
    }
}

/// Typed access to the documents of one run.
#[derive(Clone, Debug)]
pub struct Run {
    client: Client,
    id: RunId,
}

fn doc_name<T: Document>(run: &RunId, operation: Operation) -> Result<DocName> {
    DocName::new(T::NAME).map_err(|e| e.with_run(run).with_operation(operation))
}

impl Run {
    /// The run's id.
    pub fn id(&self) -> &RunId {
        &self.id
    }

    /// The client this handle came from.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn context(&self, error: Error, name: &DocName, operation: Operation) -> Error {
        error
            .with_run(&self.id)
            .with_doc(name)
            .with_operation(operation)
    }

    fn get_options(&self) -> GetOptions {
        GetOptions::new().with_limit(self.client.config.limit)
    }

    fn lock_key(&self, name: &DocName) -> LockKey {
        match self.client.config.scope {
            LockScope::Document => LockKey::Doc(self.id.clone(), name.clone()),
            LockScope::Run => LockKey::Run(self.id.clone()),
        }
    }

    fn decode<T: Document>(&self, name: &DocName, bytes: &[u8], op: Operation) -> Result<T> {
        T::CODEC
            .decode(bytes)
            .map_err(|e| self.context(e, name, op))
    }

    fn encode<T: Document>(&self, name: &DocName, doc: &T, op: Operation) -> Result<Bytes> {
        T::CODEC
            .encode(doc, self.client.config.limit)
            .map(Bytes::from)
            .map_err(|e| self.context(e, name, op))
    }

    /// Loads the document with its version, or `None` when absent.
    ///
    /// # Errors
    /// `TooLarge` over the size limit (checked before reading), `Corrupt`
    /// naming the run, document and codec when the bytes do not decode,
    /// `InvalidKey` when `T::NAME` is not a valid name, and backend errors.
    pub async fn load_versioned<T: Document>(&self) -> Result<Option<(T, Version)>> {
        let name = doc_name::<T>(&self.id, Operation::Load)?;
        let stored = self
            .client
            .backend
            .get(&self.id, &name, self.get_options())
            .await
            .map_err(|e| self.context(e, &name, Operation::Load))?;
        match stored {
            None => Ok(None),
            Some(StoredDoc { bytes, version }) => Ok(Some((
                self.decode(&name, &bytes, Operation::Load)?,
                version,
            ))),
        }
    }

    /// Loads the document, or `None` when absent.
    ///
    /// # Errors
    /// As [`load_versioned`](Run::load_versioned).
    pub async fn load_opt<T: Document>(&self) -> Result<Option<T>> {
        Ok(self.load_versioned::<T>().await?.map(|(doc, _)| doc))
    }

    /// Loads the document.
    ///
    /// # Errors
    /// `NotFound` when absent; otherwise as
    /// [`load_versioned`](Run::load_versioned).
    pub async fn load<T: Document>(&self) -> Result<T> {
        match self.load_opt::<T>().await? {
            Some(doc) => Ok(doc),
            None => Err(self.not_found::<T>(Operation::Load)),
        }
    }

    fn not_found<T: Document>(&self, operation: Operation) -> Error {
        let error = Error::new(ErrorKind::NotFound, "document does not exist")
            .with_run(&self.id)
            .with_operation(operation);
        match DocName::new(T::NAME) {
            Ok(name) => error.with_doc(&name),
            Err(_) => error,
        }
    }

    /// Saves the document unconditionally (no lock).
    ///
    /// # Errors
    /// `TooLarge` over the size limit (nothing written); backend errors.
    pub async fn save<T: Document>(&self, doc: &T) -> Result<Version> {
        self.save_with(doc, PutMode::Overwrite).await
    }

    /// Saves the document with an explicit [`PutMode`] (create-only or
    /// update-if-version).
    ///
    /// # Errors
    /// As [`save`](Run::save), plus `AlreadyExists` and `Precondition`.
    pub async fn save_with<T: Document>(&self, doc: &T, mode: PutMode) -> Result<Version> {
        let name = doc_name::<T>(&self.id, Operation::Save)?;
        let bytes = self.encode(&name, doc, Operation::Save)?;
        self.client
            .backend
            .put(&self.id, &name, bytes, PutOptions::mode(mode))
            .await
            .map_err(|e| self.context(e, &name, Operation::Save))
    }

    /// Deletes the document; returns whether it existed.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn delete<T: Document>(&self) -> Result<bool> {
        let name = doc_name::<T>(&self.id, Operation::Delete)?;
        self.client
            .backend
            .delete(&self.id, &name, None)
            .await
            .map_err(|e| self.context(e, &name, Operation::Delete))
    }

    /// Locked read-modify-write: acquire → load → `f` → fenced save →
    /// release, in two backend calls when the backend supports it.
    ///
    /// When the encoded bytes did not change, nothing is written and the
    /// version stays. When the save is refused because the lease lapsed or
    /// the document changed underneath (`Fenced`, `Precondition`), nothing
    /// was written and the whole update is retried on fresh data, so `f` may
    /// run more than once; waits and retries stop at the wait policy's
    /// timeout.
    ///
    /// # Errors
    /// `NotFound` when the document does not exist (see
    /// [`update_or_default`](Run::update_or_default)); `Locked` when the
    /// lock stayed busy for the whole wait; `Corrupt`, `TooLarge` and
    /// backend errors. An ambiguous failure of the save itself (a dropped
    /// connection) is returned, not retried, since the save may have
    /// happened.
    pub async fn update<T, R, F>(&self, f: F) -> Result<R>
    where
        T: Document,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.update_inner(None, f).await
    }

    /// Like [`update`](Run::update), starting from `T::default()` when the
    /// document does not exist (it is then created, create-only).
    ///
    /// # Errors
    /// As [`update`](Run::update), without `NotFound`.
    pub async fn update_or_default<T, R, F>(&self, f: F) -> Result<R>
    where
        T: Document + Default,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.update_inner(Some(T::default), f).await
    }

    async fn update_inner<T, R, F>(&self, init: Option<fn() -> T>, mut f: F) -> Result<R>
    where
        T: Document,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        const OP: Operation = Operation::Update;
        let name = doc_name::<T>(&self.id, OP)?;
        let backend = &self.client.backend;
        // One owner per update: a retry after a lost reply gets its own
        // grant back, and no other task of this client shares it.
        let owner = self.client.config.owner.sibling();
        let mut backoff = Backoff::new(&self.client.config.wait);
        loop {
            let (lease, stored) = self
                .acquire_and_load(&name, &owner, backoff.deadline())
                .await
                .map_err(|e| self.context(e, &name, OP))?;
            let keeper = self.keep(lease).await;
            let (mut doc, original) = match self.open_loaded(&name, stored, init, OP) {
                Ok(loaded) => loaded,
                Err(error) => {
                    self.release_kept(keeper).await;
                    return Err(error);
                }
            };
            let out = f(&mut doc);
            let bytes = match self.encode(&name, &doc, OP) {
                Ok(bytes) => bytes,
                Err(error) => {
                    self.release_kept(keeper).await;
                    return Err(error);
                }
            };
            let mode = match original {
                Some((ref old, ref version)) => {
                    if *old == bytes {
                        self.release_kept(keeper).await;
                        return Ok(out);
                    }
                    PutMode::Update(version.clone())
                }
                None => PutMode::Create,
            };
            let saved = match keeper.stop().await {
                Ok(lease) => backend.save_and_release(&lease, &name, bytes, mode).await,
                // Lost while `f` ran: nothing was written; start over.
                Err(lost) => Err(lost),
            };
            match saved {
                Ok(_) => return Ok(out),
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::Fenced
                            | ErrorKind::LeaseLost
                            | ErrorKind::Precondition
                            | ErrorKind::AlreadyExists
                    ) =>
                {
                    tracing::debug!(%error, "locked update refused, retrying on fresh data");
                    match backoff.next_delay(None) {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => return Err(self.context(error, &name, OP)),
                    }
                }
                Err(error) => return Err(self.context(error, &name, OP)),
            }
        }
    }

    async fn acquire_and_load(
        &self,
        name: &DocName,
        owner: &Owner,
        deadline: Instant,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let config = &self.client.config;
        let policy = WaitPolicy {
            timeout: deadline.saturating_duration_since(Instant::now()),
            ..config.wait.clone()
        };
        self.client
            .backend
            .acquire_and_load_waiting(
                &self.lock_key(name),
                name,
                owner,
                config.ttl,
                self.get_options(),
                &policy,
            )
            .await
    }

    /// Starts renewing `lease` in the background.
    async fn keep(&self, lease: Lease) -> LeaseKeeper {
        let keeper = LeaseKeeper::start(
            Arc::clone(&self.client.backend),
            lease,
            self.client.config.ttl,
        );
        // Tokio runs a task spawned by a worker from a slot no other worker
        // can steal; yielding once lets the renewal task start (and arm its
        // timer) here, so a caller that then blocks this thread (a long
        // computation inside `update`) cannot starve it.
        tokio::task::yield_now().await;
        keeper
    }

    /// Decodes what `acquire_and_load` returned. Returns the document and,
    /// when it existed, its bytes and version.
    fn open_loaded<T: Document>(
        &self,
        name: &DocName,
        stored: Option<StoredDoc>,
        init: Option<fn() -> T>,
        op: Operation,
    ) -> Result<(T, Option<(Bytes, Version)>)> {
        match (stored, init) {
            (Some(StoredDoc { bytes, version }), _) => self
                .decode::<T>(name, &bytes, op)
                .map(|doc| (doc, Some((bytes, version)))),
            (None, Some(init)) => Ok((init(), None)),
            (None, None) => Err(self.not_found::<T>(op)),
        }
    }

    /// Stops renewing and releases, without a write.
    async fn release_kept(&self, keeper: LeaseKeeper) {
        match keeper.stop().await {
            Ok(lease) => self.release_quietly(&lease).await,
            Err(error) => tracing::debug!(%error, "lease lost before its release"),
        }
    }

    async fn release_quietly(&self, lease: &Lease) {
        if let Err(error) = self.client.backend.release(lease).await {
            tracing::debug!(%error, "release without a write");
        }
    }

    /// Takes the document's lock and loads it into a [`Guard`]; change it
    /// through the guard and [`commit`](Guard::commit). Waits per the wait
    /// policy while the lock is busy.
    ///
    /// # Errors
    /// `NotFound` when the document does not exist (see
    /// [`lock_or_default`](Run::lock_or_default)); otherwise as
    /// [`update`](Run::update).
    pub async fn lock<T: Document>(&self) -> Result<Guard<T>> {
        self.lock_inner(None).await
    }

    /// Like [`lock`](Run::lock), starting from `T::default()` when the
    /// document does not exist; the commit then creates it.
    ///
    /// # Errors
    /// As [`lock`](Run::lock), without `NotFound`.
    pub async fn lock_or_default<T: Document + Default>(&self) -> Result<Guard<T>> {
        self.lock_inner(Some(T::default)).await
    }

    async fn lock_inner<T: Document>(&self, init: Option<fn() -> T>) -> Result<Guard<T>> {
        const OP: Operation = Operation::Acquire;
        let name = doc_name::<T>(&self.id, OP)?;
        let deadline = crate::time::saturating_add(Instant::now(), self.client.config.wait.timeout);
        let owner = self.client.config.owner.sibling();
        let (lease, stored) = self
            .acquire_and_load(&name, &owner, deadline)
            .await
            .map_err(|e| self.context(e, &name, OP))?;
        let keeper = self.keep(lease).await;
        match self.open_loaded(&name, stored, init, OP) {
            Ok((doc, original)) => Ok(Guard {
                run: self.clone(),
                name,
                keeper: Some(keeper),
                doc,
                original,
            }),
            Err(error) => {
                self.release_kept(keeper).await;
                Err(error)
            }
        }
    }
}

/// A locked, loaded document. Read and change it through `Deref`; then
/// [`commit`](Guard::commit) to save it (fenced) and release the lock.
///
/// Dropping a guard without committing releases the lease without saving
/// (in a background task on the current Tokio runtime; outside a runtime
/// the lease simply expires after its TTL).
///
/// ```
/// # use std::sync::Arc;
/// # use runstate_core::{Client, Document, RunId};
/// # #[derive(serde::Serialize, serde::Deserialize, Default)]
/// # struct Ron { name: String }
/// # impl Document for Ron { const NAME: &'static str = "ron"; }
/// # async fn rename(client: Client) -> runstate_core::Result<()> {
/// let run = client.run(RunId::new("Test_Watershed_15")?);
/// let mut ron = run.lock::<Ron>().await?;
/// ron.name = "Mica flume".into();
/// ron.commit().await?;
/// # Ok(()) }
/// ```
#[must_use = "a guard holds a lock until it is committed, released or dropped"]
pub struct Guard<T: Document> {
    run: Run,
    name: DocName,
    /// Keeps the lease alive; `None` once committed or released.
    keeper: Option<LeaseKeeper>,
    doc: T,
    original: Option<(Bytes, Version)>,
}

impl<T: Document> Guard<T> {
    fn keeper(&self) -> &LeaseKeeper {
        // Only `commit` and `release` take it, and they consume the guard.
        self.keeper
            .as_ref()
            .unwrap_or_else(|| unreachable!("a live guard has its keeper"))
    }

    /// The lease held now (renewals replace it).
    pub fn lease(&self) -> Lease {
        self.keeper().lease()
    }

    /// Whether the lease was lost: a background renewal was refused (the
    /// lock was broken or taken over) or could not be made before the TTL
    /// ran out. [`commit`](Guard::commit) then fails with `LeaseLost`
    /// without writing.
    #[must_use]
    pub fn lease_lost(&self) -> bool {
        self.keeper().is_lost()
    }

    /// The version loaded, or `None` when the document did not exist.
    pub fn version(&self) -> Option<&Version> {
        self.original.as_ref().map(|(_, v)| v)
    }

    /// Extends the lease by the client's TTL now. The guard also renews it
    /// in the background every third of the TTL while it lives, so this is
    /// only needed to extend it at a moment of the caller's choosing.
    ///
    /// # Errors
    /// `LeaseLost` when it already expired or was taken over.
    pub async fn renew(&mut self) -> Result<()> {
        let ttl = self.run.client.config.ttl;
        self.keeper()
            .renew_now(&*self.run.client.backend, ttl)
            .await
            .map(drop)
            .map_err(|e| self.run.context(e, &self.name, Operation::Renew))
    }

    /// Saves the document (fenced by the lease, conditional on the version
    /// loaded) and releases the lock. When the encoded bytes are unchanged,
    /// nothing is written and the loaded version is returned.
    ///
    /// # Errors
    /// `LeaseLost` when the lease was lost while the guard was held (see
    /// [`lease_lost`](Guard::lease_lost)); `Fenced` when the lease lapsed
    /// and another holder took the lock; `Precondition` when the document
    /// changed underneath; `TooLarge`; backend errors. Nothing is written
    /// in any of these cases, and the lease is released in every case.
    pub async fn commit(mut self) -> Result<Version> {
        const OP: Operation = Operation::Commit;
        let keeper = self
            .keeper
            .take()
            .unwrap_or_else(|| unreachable!("live guard"));
        let run = &self.run;
        let bytes = match run.encode(&self.name, &self.doc, OP) {
            Ok(bytes) => bytes,
            Err(error) => {
                run.release_kept(keeper).await;
                return Err(error);
            }
        };
        let mode = match &self.original {
            Some((old, version)) if *old == bytes => {
                run.release_kept(keeper).await;
                return Ok(version.clone());
            }
            Some((_, version)) => PutMode::Update(version.clone()),
            None => PutMode::Create,
        };
        let lease = keeper
            .stop()
            .await
            .map_err(|e| run.context(e, &self.name, OP))?;
        run.client
            .backend
            .save_and_release(&lease, &self.name, bytes, mode)
            .await
            .map_err(|e| run.context(e, &self.name, OP))
    }

    /// Releases the lock without saving.
    ///
    /// # Errors
    /// `LeaseLost` when the lease had already lapsed.
    pub async fn release(mut self) -> Result<()> {
        let keeper = self
            .keeper
            .take()
            .unwrap_or_else(|| unreachable!("live guard"));
        let lease = keeper
            .stop()
            .await
            .map_err(|e| self.run.context(e, &self.name, Operation::Release))?;
        self.run
            .client
            .backend
            .release(&lease)
            .await
            .map_err(|e| self.run.context(e, &self.name, Operation::Release))
    }
}

impl<T: Document> Deref for Guard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.doc
    }
}

impl<T: Document> DerefMut for Guard<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.doc
    }
}

impl<T: Document> Drop for Guard<T> {
    fn drop(&mut self) {
        let Some(keeper) = self.keeper.take() else {
            return;
        };
        let backend = Arc::clone(&self.run.client.backend);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match keeper.stop().await {
                        Ok(lease) => {
                            if let Err(error) = backend.release(&lease).await {
                                tracing::debug!(%error, "release of a dropped guard");
                            }
                        }
                        Err(error) => tracing::debug!(%error, "a dropped guard's lease was lost"),
                    }
                });
            }
            Err(_) => tracing::debug!(
                lock = %keeper.lease().key(),
                "guard dropped outside a Tokio runtime; the lease will expire by its TTL"
            ),
        }
    }
}

impl<T: Document + fmt::Debug> fmt::Debug for Guard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("run", &self.run.id)
            .field("doc", &self.name)
            .field("lease", &self.keeper.as_ref().map(LeaseKeeper::lease))
            .field("value", &self.doc)
            .finish()
    }
}
