//! Typed documents on a run handle: load, save, locked update and guards.

use std::fmt;
use std::marker::PhantomData;
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
    /// [`DocName`], or every call fails with `InvalidKey`.
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
#[non_exhaustive]
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

/// Any type that can be a typed document: serde both ways, shareable.
/// [`Run::doc`] stores one under any name; [`Document`] types carry their
/// name and codec with them.
pub trait Data: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Data for T {}

impl Run {
    /// The run's id.
    pub fn id(&self) -> &RunId {
        &self.id
    }

    /// The client this handle came from.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A typed handle on the document `name` of this run, holding a `T`
    /// (JSON; see [`Doc::with_codec`]): one type may be stored under many
    /// names.
    ///
    /// ```
    /// # use runstate_core::{Client, RunId};
    /// #[derive(serde::Serialize, serde::Deserialize, Default)]
    /// struct Counter { n: u64 }
    /// # async fn demo(client: Client) -> runstate_core::Result<()> {
    /// let run = client.run(RunId::new("Mica_flume1")?);
    /// for name in ["ron", "climate", "wepp"] {
    ///     run.doc::<Counter>(name)?.update_or_default(|c| c.n += 1).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `InvalidKey` when `name` is not a valid [`DocName`].
    pub fn doc<T: Data>(&self, name: &str) -> Result<Doc<T>> {
        let name = DocName::new(name).map_err(|e| e.with_run(&self.id))?;
        Ok(self.doc_named(name))
    }

    /// Watches this run's documents: see [`Store::watch`](crate::Store::watch)
    /// for the protocol (subscribe, then list, then apply newer events;
    /// re-list on [`Resync`](crate::WatchEvent::Resync)).
    ///
    /// # Errors
    /// `Unsupported` on a store without watches; backend errors.
    pub async fn watch(&self) -> Result<crate::events::Watcher> {
        self.client.backend.watch(&self.id).await
    }

    /// Publishes a status message on `topic` (for example a controller's
    /// name) of this run: see [`Store::publish`](crate::Store::publish).
    ///
    /// # Errors
    /// `Unsupported` on a store without status messages; backend errors.
    pub async fn publish(&self, topic: &str, message: &str) -> Result<()> {
        self.client.backend.publish(&self.id, topic, message).await
    }

    /// Follows this run's status messages, replaying the kept history as
    /// `replay` asks first: see [`Store::subscribe`](crate::Store::subscribe).
    ///
    /// # Errors
    /// `Unsupported` on a store without status messages; backend errors.
    pub async fn subscribe(
        &self,
        replay: crate::events::Replay,
    ) -> Result<crate::events::Subscription> {
        self.client.backend.subscribe(&self.id, replay).await
    }

    /// Records that `task` finished now (a milestone): field-level and
    /// atomic per field, no lock needed, so many workers may mark
    /// different milestones of one run at once.
    ///
    /// ```
    /// # async fn demo(run: runstate_core::Run) -> runstate_core::Result<()> {
    /// run.mark("build_climate").await?;
    /// run.set_attr("has_sbs", "false").await?;
    /// let milestones = run.milestones().await?;
    /// # let _ = milestones; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `InvalidKey` for an empty or oversize task name, `Unsupported` on a
    /// store without milestones, backend errors.
    pub async fn mark(&self, task: &str) -> Result<()> {
        self.mark_at(task, std::time::SystemTime::now()).await
    }

    /// Records that `task` finished at `at`: see [`mark`](Run::mark).
    ///
    /// # Errors
    /// As [`mark`](Run::mark).
    pub async fn mark_at(&self, task: &str, at: std::time::SystemTime) -> Result<()> {
        self.client.backend.mark(&self.id, task, at).await
    }

    /// Sets the attribute `name` of this run to `value` (field-level,
    /// atomic per field, no lock needed).
    ///
    /// # Errors
    /// As [`mark`](Run::mark).
    pub async fn set_attr(&self, name: &str, value: &str) -> Result<()> {
        self.client.backend.set_attr(&self.id, name, value).await
    }

    /// This run's milestones and attributes.
    ///
    /// # Errors
    /// `Unsupported` on a store without milestones; backend errors.
    pub async fn milestones(&self) -> Result<crate::events::Milestones> {
        self.client.backend.milestones(&self.id).await
    }

    /// [`doc`](Run::doc) with an already validated name.
    pub fn doc_named<T: Data>(&self, name: DocName) -> Doc<T> {
        Doc {
            run: self.clone(),
            name,
            codec: Codec::Json,
            _t: PhantomData,
        }
    }

    /// The handle of a [`Document`] type: its name and codec.
    fn typed<T: Document>(&self, operation: Operation) -> Result<Doc<T>> {
        let name = DocName::new(T::NAME).map_err(|e| e.at_run(operation, &self.id))?;
        Ok(self.doc_named::<T>(name).with_codec(T::CODEC))
    }

    /// Loads the document with its version, or `None` when absent.
    ///
    /// # Errors
    /// `TooLarge` over the size limit (checked before reading), `Corrupt`
    /// naming the run, document and codec when the bytes do not decode,
    /// `InvalidKey` when `T::NAME` is not a valid name, and backend errors.
    pub async fn load_versioned<T: Document>(&self) -> Result<Option<(T, Version)>> {
        self.typed::<T>(Operation::Load)?.load_versioned().await
    }

    /// Loads the document, or `None` when absent.
    ///
    /// # Errors
    /// As [`load_versioned`](Run::load_versioned).
    pub async fn load_opt<T: Document>(&self) -> Result<Option<T>> {
        self.typed::<T>(Operation::Load)?.load_opt().await
    }

    /// Loads the document.
    ///
    /// # Errors
    /// `NotFound` when absent; otherwise as
    /// [`load_versioned`](Run::load_versioned).
    pub async fn load<T: Document>(&self) -> Result<T> {
        self.typed::<T>(Operation::Load)?.load().await
    }

    /// Saves the document unconditionally (no lock).
    ///
    /// # Errors
    /// `TooLarge` over the size limit (nothing written); backend errors.
    pub async fn save<T: Document>(&self, doc: &T) -> Result<Version> {
        self.typed::<T>(Operation::Save)?.save(doc).await
    }

    /// Saves the document with an explicit [`PutMode`] (create-only or
    /// update-if-version).
    ///
    /// # Errors
    /// As [`save`](Run::save), plus `AlreadyExists` and `Precondition`.
    pub async fn save_with<T: Document>(&self, doc: &T, mode: PutMode) -> Result<Version> {
        self.typed::<T>(Operation::Save)?.save_with(doc, mode).await
    }

    /// Deletes the document; returns whether it existed.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn delete<T: Document>(&self) -> Result<bool> {
        self.typed::<T>(Operation::Delete)?.delete().await
    }

    /// Locked read-modify-write: see [`Doc::update`].
    ///
    /// # Errors
    /// As [`Doc::update`].
    pub async fn update<T, R, F>(&self, f: F) -> Result<R>
    where
        T: Document,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.typed::<T>(Operation::Update)?.update(f).await
    }

    /// Like [`update`](Run::update), starting from `T::default()` when the
    /// document does not exist (it is then created, create-only).
    ///
    /// # Errors
    /// As [`Doc::update`], without `NotFound`.
    pub async fn update_or_default<T, R, F>(&self, f: F) -> Result<R>
    where
        T: Document + Default,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.typed::<T>(Operation::Update)?
            .update_or_default(f)
            .await
    }

    /// A locked update whose closure may refuse: see [`Doc::try_update`].
    ///
    /// # Errors
    /// The closure's error (nothing written), or as [`Doc::update`].
    pub async fn try_update<T, R, E, F>(&self, f: F) -> std::result::Result<R, E>
    where
        T: Document,
        F: FnMut(&mut T) -> std::result::Result<R, E> + Send,
        R: Send,
        E: From<Error> + Send,
    {
        self.typed::<T>(Operation::Update)?.try_update(f).await
    }

    /// Optimistic update without a lock: see [`Doc::update_optimistic`].
    ///
    /// # Errors
    /// As [`Doc::update_optimistic`].
    pub async fn update_optimistic<T, R, F>(&self, f: F) -> Result<R>
    where
        T: Document,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.typed::<T>(Operation::Update)?
            .update_optimistic(f)
            .await
    }

    /// Takes the document's lock and loads it into a [`Guard`]: see
    /// [`Doc::lock`].
    ///
    /// # Errors
    /// As [`Doc::lock`].
    pub async fn lock<T: Document>(&self) -> Result<Guard<T>> {
        self.typed::<T>(Operation::Acquire)?.lock().await
    }

    /// Like [`lock`](Run::lock), starting from `T::default()` when the
    /// document does not exist; the commit then creates it.
    ///
    /// # Errors
    /// As [`lock`](Run::lock), without `NotFound`.
    pub async fn lock_or_default<T: Document + Default>(&self) -> Result<Guard<T>> {
        self.typed::<T>(Operation::Acquire)?.lock_or_default().await
    }
}

/// A typed handle on one named document of a run ([`Run::doc`]): load,
/// save, locked and optimistic updates, guards. Cheap to clone; creating
/// it touches nothing.
pub struct Doc<T> {
    run: Run,
    name: DocName,
    codec: Codec,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Doc<T> {
    fn clone(&self) -> Self {
        Doc {
            run: self.run.clone(),
            name: self.name.clone(),
            codec: self.codec,
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Doc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Doc")
            .field("run", &self.run.id)
            .field("name", &self.name)
            .field("codec", &self.codec)
            .finish()
    }
}

impl<T: Data> Doc<T> {
    /// The same document, encoded with `codec`.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The document's name.
    pub fn name(&self) -> &DocName {
        &self.name
    }

    /// The run it belongs to.
    pub fn run(&self) -> &Run {
        &self.run
    }

    fn client(&self) -> &Client {
        &self.run.client
    }

    fn context(&self, error: Error, operation: Operation) -> Error {
        error
            .with_run(&self.run.id)
            .with_doc(&self.name)
            .with_operation(operation)
    }

    fn get_options(&self) -> GetOptions {
        GetOptions::new().with_limit(self.client().config.limit)
    }

    fn lock_key(&self) -> LockKey {
        match self.client().config.scope {
            LockScope::Document => LockKey::Doc(self.run.id.clone(), self.name.clone()),
            LockScope::Run => LockKey::Run(self.run.id.clone()),
        }
    }

    fn decode(&self, bytes: &[u8], op: Operation) -> Result<T> {
        self.codec.decode(bytes).map_err(|e| self.context(e, op))
    }

    fn encode(&self, doc: &T, op: Operation) -> Result<Bytes> {
        self.codec
            .encode(doc, self.client().config.limit)
            .map(Bytes::from)
            .map_err(|e| self.context(e, op))
    }

    fn not_found(&self, operation: Operation) -> Error {
        self.context(
            Error::new(ErrorKind::NotFound, "document does not exist"),
            operation,
        )
    }

    /// Loads the document with its version, or `None` when absent.
    ///
    /// # Errors
    /// `TooLarge` over the size limit (checked before reading), `Corrupt`
    /// naming the run, document and codec when the bytes do not decode,
    /// and backend errors.
    pub async fn load_versioned(&self) -> Result<Option<(T, Version)>> {
        let stored = self
            .client()
            .backend
            .get(&self.run.id, &self.name, self.get_options())
            .await
            .map_err(|e| self.context(e, Operation::Load))?;
        match stored {
            None => Ok(None),
            Some(StoredDoc { bytes, version }) => {
                Ok(Some((self.decode(&bytes, Operation::Load)?, version)))
            }
        }
    }

    /// Loads the document, or `None` when absent.
    ///
    /// # Errors
    /// As [`load_versioned`](Doc::load_versioned).
    pub async fn load_opt(&self) -> Result<Option<T>> {
        Ok(self.load_versioned().await?.map(|(doc, _)| doc))
    }

    /// Loads the document.
    ///
    /// # Errors
    /// `NotFound` when absent; otherwise as
    /// [`load_versioned`](Doc::load_versioned).
    pub async fn load(&self) -> Result<T> {
        match self.load_opt().await? {
            Some(doc) => Ok(doc),
            None => Err(self.not_found(Operation::Load)),
        }
    }

    /// Saves the document unconditionally (no lock).
    ///
    /// # Errors
    /// `TooLarge` over the size limit (nothing written); backend errors.
    pub async fn save(&self, doc: &T) -> Result<Version> {
        self.save_with(doc, PutMode::Overwrite).await
    }

    /// Saves the document with an explicit [`PutMode`] (create-only or
    /// update-if-version).
    ///
    /// # Errors
    /// As [`save`](Doc::save), plus `AlreadyExists` and `Precondition`.
    pub async fn save_with(&self, doc: &T, mode: PutMode) -> Result<Version> {
        let bytes = self.encode(doc, Operation::Save)?;
        self.client()
            .backend
            .put(&self.run.id, &self.name, bytes, PutOptions::mode(mode))
            .await
            .map_err(|e| self.context(e, Operation::Save))
    }

    /// Deletes the document; returns whether it existed.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn delete(&self) -> Result<bool> {
        self.client()
            .backend
            .delete(&self.run.id, &self.name, None)
            .await
            .map_err(|e| self.context(e, Operation::Delete))
    }

    /// Locked read-modify-write: acquire → load → `f` → fenced save →
    /// release, in two backend calls when the backend supports it. The
    /// lease is renewed in the background while `f` runs, however long —
    /// on a multi-thread Tokio runtime: `f` is synchronous, and on a
    /// current-thread runtime a long `f` blocks the renewal too (the lease
    /// then lapses and the update is redone). Run long computations in
    /// `spawn_blocking`, or keep `f` short and hold a [`Guard`] instead.
    ///
    /// When the encoded bytes did not change, nothing is written and the
    /// version stays. When the save is refused because the lease lapsed or
    /// the document changed underneath (`Fenced`, `LeaseLost`,
    /// `Precondition`), or the lease was lost while `f` ran (whether it
    /// changed anything or not), nothing was written and the whole update is
    /// retried on fresh data, so `f` may run more than once; waits and
    /// retries stop at the wait policy's timeout.
    ///
    /// # Errors
    /// `NotFound` when the document does not exist (see
    /// [`update_or_default`](Doc::update_or_default)); `Locked` when the
    /// lock stayed busy for the whole wait; `Corrupt`, `TooLarge` and
    /// backend errors. An ambiguous failure of the save itself (a dropped
    /// connection) is returned, not retried, since the save may have
    /// happened.
    pub async fn update<R, F>(&self, mut f: F) -> Result<R>
    where
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.locked(None, |doc| Ok::<R, Error>(f(doc))).await
    }

    /// Like [`update`](Doc::update), starting from `T::default()` when the
    /// document does not exist (it is then created, create-only).
    ///
    /// # Errors
    /// As [`update`](Doc::update), without `NotFound`.
    pub async fn update_or_default<R, F>(&self, mut f: F) -> Result<R>
    where
        T: Default,
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        self.locked(Some(T::default), |doc| Ok::<R, Error>(f(doc)))
            .await
    }

    /// A locked update whose closure may refuse: when `f` returns an error,
    /// nothing is written, the lock is released and that error returned
    /// (runstate's own errors reach the caller through `E: From<Error>`).
    ///
    /// ```
    /// # use runstate_core::{Client, RunId};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Account { balance: i64 }
    /// # #[derive(Debug)]
    /// # enum MyError { Insufficient, Store(runstate_core::Error) }
    /// # impl From<runstate_core::Error> for MyError { fn from(e: runstate_core::Error) -> Self { MyError::Store(e) } }
    /// # async fn demo(client: Client) -> Result<(), MyError> {
    /// let account = client.run(RunId::new("r1")?).doc::<Account>("account")?;
    /// account
    ///     .try_update(|a| {
    ///         if a.balance < 10 {
    ///             return Err(MyError::Insufficient);
    ///         }
    ///         a.balance -= 10;
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The closure's error; otherwise as [`update`](Doc::update).
    pub async fn try_update<R, E, F>(&self, f: F) -> std::result::Result<R, E>
    where
        F: FnMut(&mut T) -> std::result::Result<R, E> + Send,
        R: Send,
        E: From<Error> + Send,
    {
        self.locked(None, f).await
    }

    async fn locked<R, E, F>(&self, init: Option<fn() -> T>, mut f: F) -> std::result::Result<R, E>
    where
        F: FnMut(&mut T) -> std::result::Result<R, E> + Send,
        R: Send,
        E: From<Error> + Send,
    {
        const OP: Operation = Operation::Update;
        let backend = &self.client().backend;
        // One owner per update: a retry after a lost reply gets its own
        // grant back, and no other task of this client shares it.
        let owner = self.client().config.owner.sibling();
        let mut backoff = Backoff::new(&self.client().config.wait);
        loop {
            let (lease, stored) = self
                .acquire_and_load(&owner, backoff.deadline())
                .await
                .map_err(|e| self.context(e, OP))?;
            let keeper = self.keep(lease).await;
            let (mut doc, original) = match self.open_loaded(stored, init, OP) {
                Ok(loaded) => loaded,
                Err(error) => {
                    self.release_kept(keeper).await;
                    return Err(error.into());
                }
            };
            let out = match f(&mut doc) {
                Ok(out) => out,
                Err(refused) => {
                    self.release_kept(keeper).await;
                    return Err(refused);
                }
            };
            let bytes = match self.encode(&doc, OP) {
                Ok(bytes) => bytes,
                Err(error) => {
                    self.release_kept(keeper).await;
                    return Err(error.into());
                }
            };
            // `None`: unchanged, nothing to write.
            let mode = match original {
                Some((ref old, _)) if *old == bytes => None,
                Some((_, ref version)) => Some(PutMode::Update(version.clone())),
                None => Some(PutMode::Create),
            };
            let saved = match (keeper.stop().await, mode) {
                (Ok(lease), None) => {
                    self.release_unwritten(&lease).await;
                    return Ok(out);
                }
                (Ok(lease), Some(mode)) => {
                    backend
                        .save_and_release(&lease, &self.name, bytes, mode)
                        .await
                }
                // Lost while `f` ran, whether it changed anything or not
                // (it ran without the lock for a while): nothing was
                // written; start over.
                (Err(lost), _) => Err(lost),
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
                        None => return Err(self.context(error, OP).into()),
                    }
                }
                Err(error) => return Err(self.context(error, OP).into()),
            }
        }
    }

    /// Optimistic read-modify-write, without a lock: load (from a cache in
    /// front of the store, when there is one, without validating it first),
    /// `f`, then save conditional on the version loaded; when another
    /// writer got there first (`Precondition`), reload from the store and
    /// try again. With a warm cache and nobody else writing, that is one
    /// round trip — half a locked update's.
    ///
    /// For short changes of small documents (metadata, counters). It never
    /// loses an update (every save is conditional on the version it was
    /// computed from), but it excludes nobody: under contention it retries
    /// and `f` may run several times (also when `f` changed nothing in a
    /// cached copy that turned out stale). A long step, or one that must not
    /// run twice, takes the lock instead ([`update`](Doc::update),
    /// [`lock`](Doc::lock)).
    ///
    /// # Errors
    /// `NotFound` when the document does not exist; `Precondition` when
    /// other writers kept winning for the whole wait policy's timeout;
    /// `Corrupt`, `TooLarge` and backend errors.
    pub async fn update_optimistic<R, F>(&self, mut f: F) -> Result<R>
    where
        F: FnMut(&mut T) -> R + Send,
        R: Send,
    {
        const OP: Operation = Operation::Update;
        let backend = &self.client().backend;
        let mut backoff = Backoff::new(&self.client().config.wait);
        // The first read may be a cached copy; after a conflict, fresh.
        let mut options = self.get_options().with_max_staleness(Duration::MAX);
        loop {
            let stored = backend
                .get(&self.run.id, &self.name, options)
                .await
                .map_err(|e| self.context(e, OP))?;
            let Some(StoredDoc {
                bytes: old,
                version,
            }) = stored
            else {
                return Err(self.not_found(OP));
            };
            let mut doc = self.decode(&old, OP)?;
            let out = f(&mut doc);
            let bytes = self.encode(&doc, OP)?;
            if bytes == old {
                if options.max_staleness.is_none() {
                    // Unchanged from what the store holds: nothing to write.
                    return Ok(out);
                }
                // Unchanged from a copy that may be stale: when the store
                // still holds that version (one metadata round trip),
                // nothing is due and `f` does not run again.
                let current = backend
                    .head(&self.run.id, &self.name)
                    .await
                    .map_err(|e| self.context(e, OP))?;
                if current.is_some_and(|stat| stat.version == version) {
                    return Ok(out);
                }
                options = self.get_options();
                continue;
            }
            match backend
                .put(&self.run.id, &self.name, bytes, PutOptions::update(version))
                .await
            {
                Ok(_) => return Ok(out),
                Err(error) if error.kind() == ErrorKind::Precondition => {
                    tracing::debug!(%error, "optimistic update lost a race, retrying on fresh data");
                    options = self.get_options();
                    match backoff.next_delay(None) {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => return Err(self.context(error, OP)),
                    }
                }
                Err(error) => return Err(self.context(error, OP)),
            }
        }
    }

    async fn acquire_and_load(
        &self,
        owner: &Owner,
        deadline: Instant,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let config = &self.client().config;
        let policy = WaitPolicy {
            timeout: deadline.saturating_duration_since(Instant::now()),
            ..config.wait.clone()
        };
        self.client()
            .backend
            .acquire_and_load_waiting(
                &self.lock_key(),
                &self.name,
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
            Arc::clone(&self.client().backend),
            lease,
            self.client().config.ttl,
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
    fn open_loaded(
        &self,
        stored: Option<StoredDoc>,
        init: Option<fn() -> T>,
        op: Operation,
    ) -> Result<(T, Option<(Bytes, Version)>)> {
        match (stored, init) {
            (Some(StoredDoc { bytes, version }), _) => self
                .decode(&bytes, op)
                .map(|doc| (doc, Some((bytes, version)))),
            (None, Some(init)) => Ok((init(), None)),
            (None, None) => Err(self.not_found(op)),
        }
    }

    /// Stops renewing and releases, without a write.
    async fn release_kept(&self, keeper: LeaseKeeper) {
        match keeper.stop().await {
            Ok(lease) => self.release_unwritten(&lease).await,
            Err(error) => tracing::debug!(%error, "lease lost before its release"),
        }
    }

    /// Gives back `lease`, under which nothing was written; a release that
    /// fails only leaves it to expire by its TTL.
    async fn release_unwritten(&self, lease: &Lease) {
        if let Err(error) = self.client().backend.release(lease).await {
            tracing::debug!(%error, "release without a write");
        }
    }

    /// Takes the document's lock and loads it into a [`Guard`]; change it
    /// through the guard and [`commit`](Guard::commit). Waits per the wait
    /// policy while the lock is busy; the guard renews its lease in the
    /// background while it lives.
    ///
    /// # Errors
    /// `NotFound` when the document does not exist (see
    /// [`lock_or_default`](Doc::lock_or_default)); otherwise as
    /// [`update`](Doc::update).
    pub async fn lock(&self) -> Result<Guard<T>> {
        self.lock_inner(None).await
    }

    /// Like [`lock`](Doc::lock), starting from `T::default()` when the
    /// document does not exist; the commit then creates it.
    ///
    /// # Errors
    /// As [`lock`](Doc::lock), without `NotFound`.
    pub async fn lock_or_default(&self) -> Result<Guard<T>>
    where
        T: Default,
    {
        self.lock_inner(Some(T::default)).await
    }

    async fn lock_inner(&self, init: Option<fn() -> T>) -> Result<Guard<T>> {
        const OP: Operation = Operation::Acquire;
        let deadline =
            crate::time::saturating_add(Instant::now(), self.client().config.wait.timeout);
        let owner = self.client().config.owner.sibling();
        let (lease, stored) = self
            .acquire_and_load(&owner, deadline)
            .await
            .map_err(|e| self.context(e, OP))?;
        let keeper = self.keep(lease).await;
        match self.open_loaded(stored, init, OP) {
            Ok((value, original)) => Ok(Guard {
                doc: self.clone(),
                keeper: Some(keeper),
                value,
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
pub struct Guard<T: Data> {
    doc: Doc<T>,
    /// Keeps the lease alive; `None` once committed or released.
    keeper: Option<LeaseKeeper>,
    value: T,
    original: Option<(Bytes, Version)>,
}

impl<T: Data> Guard<T> {
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
        let ttl = self.doc.client().config.ttl;
        self.keeper()
            .renew_now(&*self.doc.client().backend, ttl)
            .await
            .map(drop)
            .map_err(|e| self.doc.context(e, Operation::Renew))
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
        let doc = &self.doc;
        let bytes = match doc.encode(&self.value, OP) {
            Ok(bytes) => bytes,
            Err(error) => {
                doc.release_kept(keeper).await;
                return Err(error);
            }
        };
        let mode = match &self.original {
            Some((old, version)) if *old == bytes => {
                // Nothing to write; a lease lost meanwhile is still
                // reported, as `lease_lost` says (the caller may have acted
                // on holding it).
                let lease = keeper.stop().await.map_err(|e| doc.context(e, OP))?;
                doc.release_unwritten(&lease).await;
                return Ok(version.clone());
            }
            Some((_, version)) => PutMode::Update(version.clone()),
            None => PutMode::Create,
        };
        let lease = keeper.stop().await.map_err(|e| doc.context(e, OP))?;
        doc.client()
            .backend
            .save_and_release(&lease, &doc.name, bytes, mode)
            .await
            .map_err(|e| doc.context(e, OP))
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
            .map_err(|e| self.doc.context(e, Operation::Release))?;
        self.doc
            .client()
            .backend
            .release(&lease)
            .await
            .map_err(|e| self.doc.context(e, Operation::Release))
    }
}

impl<T: Data> Deref for Guard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Data> DerefMut for Guard<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: Data> Drop for Guard<T> {
    fn drop(&mut self) {
        // Dropped without commit or release: the keeper, dropped with it,
        // stops renewing and releases the lease in the background (outside
        // a Tokio runtime the lease expires by its TTL).
        if let Some(keeper) = self.keeper.take()
            && tokio::runtime::Handle::try_current().is_err()
        {
            tracing::debug!(
                lock = %keeper.lease().key(),
                "guard dropped outside a Tokio runtime; the lease will expire by its TTL"
            );
        }
    }
}

impl<T: Data + fmt::Debug> fmt::Debug for Guard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("run", &self.doc.run.id)
            .field("doc", &self.doc.name)
            .field("lease", &self.keeper.as_ref().map(LeaseKeeper::lease))
            .field("value", &self.value)
            .finish()
    }
}
