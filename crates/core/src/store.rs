//! The byte-level document store contract.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::events::{Milestones, Replay, Subscription, Watcher};
use crate::id::{DocName, RunId};
use crate::lease::{Fence, Lease, LockKey};
use crate::version::Version;

/// How a [`Store::put`] treats an existing document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PutMode {
    /// Write whatever is there.
    #[default]
    Overwrite,
    /// Write only if the document does not exist; otherwise fail with
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists).
    Create,
    /// Write only if the stored version is this one; otherwise (another
    /// version, or no document) fail with
    /// [`ErrorKind::Precondition`](crate::ErrorKind::Precondition).
    Update(Version),
}

/// Options of [`Store::get`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GetOptions {
    /// Refuse documents larger than this many bytes with
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge), checked before
    /// the document is read into memory.
    pub limit: Option<u64>,
    /// How stale a cached copy may be served without asking the store
    /// whether it changed. `None` (the default) always validates. Only
    /// caching stores read it; every other store is always fresh. For
    /// read-mostly callers (a UI) and optimistic updates, whose conditional
    /// save catches a stale read anyway.
    pub max_staleness: Option<std::time::Duration>,
}

impl GetOptions {
    /// No options: any size, always fresh.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the size limit.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Lets a caching store serve a copy up to `max_staleness` old without
    /// validating it.
    pub fn with_max_staleness(mut self, max_staleness: std::time::Duration) -> Self {
        self.max_staleness = Some(max_staleness);
        self
    }
}

/// Options of [`Store::put`]: the mode and, for a fenced save, the lease.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PutOptions<'a> {
    /// Overwrite, create-only or update-if-version.
    pub mode: PutMode,
    /// When set, the backend checks atomically with the write that this
    /// lease is still the current, unexpired grant of its lock, and fails
    /// with [`ErrorKind::Fenced`](crate::ErrorKind::Fenced) (writing
    /// nothing) otherwise. The lease must cover the document.
    pub lease: Option<&'a Lease>,
    /// A lease granted by *another* lock service (a split store: documents
    /// here, leases there). The store cannot ask that service, so it keeps,
    /// per lock, the highest fence it has seen (its watermark, raised by
    /// [`Store::claim`] and by these writes) and, atomically with the
    /// write, refuses with `Fenced` a lease whose fence is below it.
    /// Needs [`Capabilities::foreign_fencing`]; otherwise the write fails
    /// with `Unsupported`. The lease must cover the document.
    pub foreign_lease: Option<&'a Lease>,
}

impl<'a> PutOptions<'a> {
    /// An unconditional write.
    pub fn overwrite() -> Self {
        Self::default()
    }

    /// A create-only write.
    pub fn create() -> Self {
        Self::mode(PutMode::Create)
    }

    /// A write conditional on the stored version.
    pub fn update(version: Version) -> Self {
        Self::mode(PutMode::Update(version))
    }

    /// A write with `mode`.
    pub fn mode(mode: PutMode) -> Self {
        PutOptions {
            mode,
            lease: None,
            foreign_lease: None,
        }
    }

    /// Makes it a fenced save under `lease`.
    pub fn with_lease(mut self, lease: &'a Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Makes it a save fenced by the store's watermark under a lease
    /// granted by another lock service (see
    /// [`foreign_lease`](Self::foreign_lease)).
    pub fn with_foreign_lease(mut self, lease: &'a Lease) -> Self {
        self.foreign_lease = Some(lease);
        self
    }
}

/// What [`Store::head`] knows of a document without reading its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DocStat {
    /// Its current version.
    pub version: Version,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, where the backend records it.
    pub modified: Option<SystemTime>,
}

impl DocStat {
    /// A stat; for backends.
    pub fn new(version: Version, size: u64, modified: Option<SystemTime>) -> Self {
        DocStat {
            version,
            size,
            modified,
        }
    }
}

/// One write of a batch ([`Store::put_many`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PutRequest {
    /// The document.
    pub doc: DocName,
    /// Its bytes.
    pub bytes: Bytes,
    /// Overwrite, create-only or update-if-version, for this document.
    pub mode: PutMode,
}

impl PutRequest {
    /// A write of `bytes` to `doc` with `mode`.
    pub fn new(doc: DocName, bytes: Bytes, mode: PutMode) -> Self {
        PutRequest { doc, bytes, mode }
    }
}

/// What a conditional read ([`Store::get_if_changed`]) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The stored version is the one the caller holds; no bytes were read.
    Unchanged,
    /// Another version: its bytes and version.
    Changed(StoredDoc),
    /// There is no such document.
    Absent,
}

/// A document as read: its exact bytes and its version.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredDoc {
    /// The bytes exactly as saved.
    pub bytes: Bytes,
    /// The version of these bytes.
    pub version: Version,
}

impl StoredDoc {
    /// A document as read; for backends and layers.
    pub fn new(bytes: impl Into<Bytes>, version: Version) -> Self {
        StoredDoc {
            bytes: bytes.into(),
            version,
        }
    }
}

impl fmt::Debug for StoredDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredDoc")
            .field("len", &self.bytes.len())
            .field("version", &self.version)
            .finish()
    }
}

/// A listed document.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DocMeta {
    /// Its name.
    pub name: DocName,
    /// Its current version.
    pub version: Version,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, where the backend records it
    /// ([`Capabilities::modified_times`]); `None` where it does not.
    pub modified: Option<SystemTime>,
}

impl DocMeta {
    /// A listing entry; for backends and layers.
    pub fn new(name: DocName, version: Version, size: u64, modified: Option<SystemTime>) -> Self {
        DocMeta {
            name,
            version,
            size,
            modified,
        }
    }
}

/// One page of a listing, in ascending byte order of names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListPage<T> {
    /// The entries of this page.
    pub items: Vec<T>,
    /// Whether entries remain after the last one of this page. A page may
    /// be shorter than asked for and still have more after it.
    pub more: bool,
}

impl<T> ListPage<T> {
    /// A page; for backends and layers.
    pub fn new(items: Vec<T>, more: bool) -> Self {
        ListPage { items, more }
    }
}

/// How strongly a backend enforces fenced saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fencing {
    /// The lease check is atomic with the write: a stale holder's save is
    /// always refused with `Fenced`.
    Atomic,
    /// Only the version check is atomic with the write; a stale holder's
    /// save is refused unless the document is unchanged since it loaded it.
    VersionOnly,
}

/// What a backend supports. Code that needs a capability checks it instead
/// of finding out from an `Unsupported` error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name (`"file"`, `"redis"`, …).
    pub backend: &'static str,
    /// `Create` and `Update(version)` writes, atomic with the check.
    pub conditional_put: bool,
    /// Deletes conditional on the version.
    pub conditional_delete: bool,
    /// Leases ([`Lock`](crate::Lock)).
    pub leases: bool,
    /// How fenced saves are enforced.
    pub fencing: Fencing,
    /// Largest document the backend can hold, if it has a limit.
    pub max_document_size: Option<u64>,
    /// Whether processes on different hosts may share the store safely.
    pub multi_host: bool,
    /// Whether the store keeps fence watermarks, so that saves under
    /// leases granted by another lock service are fenced atomically with
    /// the write ([`Store::claim`], [`PutOptions::foreign_lease`]): what
    /// makes it usable as the document store of a split store.
    pub foreign_fencing: bool,
    /// Whether [`Store::get_if_changed`] is answered without sending the
    /// document when it is unchanged (a version check on the server or in
    /// metadata), which is what makes a validated cache hit cheap.
    pub native_conditional_get: bool,
    /// How [`Store::watch`] learns of changes, if it can.
    pub watch: WatchMode,
    /// Whether status messages ([`Store::publish`], [`Store::subscribe`])
    /// are supported.
    pub status: bool,
    /// Whether milestones and attributes ([`Store::mark`],
    /// [`Store::set_attr`], [`Store::milestones`]) are supported.
    pub milestones: bool,
    /// Whether listings ([`DocMeta::modified`]) and [`Store::head`]
    /// ([`DocStat::modified`]) carry each document's modification time.
    pub modified_times: bool,
}

/// How a store's [`watch`](Store::watch) learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchMode {
    /// Not supported.
    None,
    /// From a change channel of the backend (Redis pub/sub, PostgreSQL
    /// `NOTIFY`, inotify). With `every_write`, each write is its own event;
    /// otherwise writes superseded before they were seen may be reported
    /// once, with the latest version.
    Native {
        /// Whether every write is reported on its own.
        every_write: bool,
    },
    /// By listing the run at this interval: writes superseded within one
    /// interval are reported once, with the latest version.
    Polling(std::time::Duration),
}

impl Capabilities {
    /// Everything supported, atomic fencing, no size limit, single host;
    /// adjust the fields that differ.
    pub fn full(backend: &'static str) -> Self {
        Capabilities {
            backend,
            conditional_put: true,
            conditional_delete: true,
            leases: true,
            fencing: Fencing::Atomic,
            max_document_size: None,
            multi_host: false,
            foreign_fencing: false,
            native_conditional_get: false,
            watch: WatchMode::None,
            status: false,
            milestones: false,
            modified_times: false,
        }
    }

    /// Sets how the store watches runs.
    pub fn with_watch(mut self, watch: WatchMode) -> Self {
        self.watch = watch;
        self
    }

    /// Sets whether status messages are supported.
    pub fn with_status(mut self, supported: bool) -> Self {
        self.status = supported;
        self
    }

    /// Sets whether milestones and attributes are supported.
    pub fn with_milestones(mut self, supported: bool) -> Self {
        self.milestones = supported;
        self
    }

    /// Sets whether listings and [`Store::head`] carry modification times.
    pub fn with_modified_times(mut self, supported: bool) -> Self {
        self.modified_times = supported;
        self
    }

    /// Sets whether the store keeps fence watermarks.
    pub fn with_foreign_fencing(mut self, supported: bool) -> Self {
        self.foreign_fencing = supported;
        self
    }

    /// Sets whether conditional reads skip unchanged bytes.
    pub fn with_native_conditional_get(mut self, native: bool) -> Self {
        self.native_conditional_get = native;
        self
    }

    /// Sets whether the store may be shared between hosts.
    pub fn with_multi_host(mut self, multi_host: bool) -> Self {
        self.multi_host = multi_host;
        self
    }

    /// Sets the largest document size.
    pub fn with_max_document_size(mut self, max: Option<u64>) -> Self {
        self.max_document_size = max;
        self
    }

    /// Sets the fencing strength.
    pub fn with_fencing(mut self, fencing: Fencing) -> Self {
        self.fencing = fencing;
        self
    }

    /// Sets whether conditional deletes are supported.
    pub fn with_conditional_delete(mut self, supported: bool) -> Self {
        self.conditional_delete = supported;
        self
    }

    /// Sets whether conditional puts are supported.
    pub fn with_conditional_put(mut self, supported: bool) -> Self {
        self.conditional_put = supported;
        self
    }

    /// Sets whether leases are supported.
    pub fn with_leases(mut self, supported: bool) -> Self {
        self.leases = supported;
        self
    }
}

/// A store of runs, each a set of named documents, at the byte level.
///
/// Object safe: hold it as `Arc<dyn Store>` or use it generically. Every
/// write is all or nothing: a reader sees the old or the new bytes, never a
/// mix or an empty document, even if the writer is killed midway.
///
/// A run exists while it has at least one document.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> &Capabilities;

    /// Reads a document: its bytes and version, or `None` when absent.
    ///
    /// # Errors
    /// [`TooLarge`](crate::ErrorKind::TooLarge) when it exceeds
    /// `options.limit` (nothing is read into memory);
    /// [`Backend`](crate::ErrorKind::Backend) or
    /// [`Timeout`](crate::ErrorKind::Timeout) when the backend fails.
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>>;

    /// Writes a document and returns its new version.
    ///
    /// # Errors
    /// [`AlreadyExists`](crate::ErrorKind::AlreadyExists) for a `Create` of
    /// an existing document; [`Precondition`](crate::ErrorKind::Precondition)
    /// for an `Update` whose version is not the stored one (or of an absent
    /// document); [`Fenced`](crate::ErrorKind::Fenced) when `options.lease`
    /// is no longer the current grant of its lock;
    /// [`InvalidArgument`](crate::ErrorKind::InvalidArgument) when the lease
    /// does not cover the document; [`TooLarge`](crate::ErrorKind::TooLarge)
    /// over the backend's size limit. In all these cases nothing is written.
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version>;

    /// Deletes a document; with `if_version`, only if that is the stored
    /// version. Returns whether a document was removed: deleting an absent
    /// document is not an error.
    ///
    /// # Errors
    /// [`Precondition`](crate::ErrorKind::Precondition) when `if_version` is
    /// set and the document exists with another version (nothing is
    /// deleted); [`Unsupported`](crate::ErrorKind::Unsupported) when the
    /// backend cannot delete conditionally.
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool>;

    /// Lists up to `limit` documents of `run` whose names sort after
    /// `after`, in ascending byte order. A run without documents lists empty.
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>>;

    /// Lists up to `limit` runs (those with at least one document) whose ids
    /// sort after `after`, in ascending byte order.
    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>>;

    /// Deletes every document of a run and returns how many there were.
    /// Lock bookkeeping (fence counters, held leases) is kept, so fences
    /// keep increasing if the run is created again.
    async fn delete_run(&self, run: &RunId) -> Result<u64>;

    /// Reads a document unless its stored version is `known`: what a cache
    /// validates a hit with. Backends with
    /// [`Capabilities::native_conditional_get`] answer `Unchanged` without
    /// reading or sending the bytes; the default reads the document and
    /// compares versions.
    ///
    /// # Errors
    /// As [`get`](Store::get).
    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        Ok(match self.get(run, doc, options).await? {
            None => Fetched::Absent,
            Some(stored) if stored.version == *known => Fetched::Unchanged,
            Some(stored) => Fetched::Changed(stored),
        })
    }

    /// A document's version, size and modification time, or `None` when
    /// absent. Backends answer from metadata; the default reads the
    /// document (and knows no modification time).
    ///
    /// # Errors
    /// As [`get`](Store::get).
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        Ok(self
            .get(run, doc, GetOptions::new())
            .await?
            .map(|stored| DocStat::new(stored.version, stored.bytes.len() as u64, None)))
    }

    /// Reads several documents of `run`: one result per name, in order,
    /// each as [`get`](Store::get) would give it. The outer error is a
    /// failure of the whole batch (nothing can be said of any document).
    /// Backends batch natively (one statement, one pipeline, concurrent
    /// requests); the default reads one after the other.
    ///
    /// # Errors
    /// Backend errors that fail the whole batch.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            out.push(self.get(run, doc, options).await);
        }
        Ok(out)
    }

    /// Writes several documents of `run`: one result per request, in
    /// order, each as [`put`](Store::put) would give it (each document all
    /// or nothing and conditional on its own mode; the batch as a whole is
    /// not atomic). Backends batch natively; the default writes one after
    /// the other.
    ///
    /// # Errors
    /// Backend errors that fail the whole batch (then nothing is known of
    /// which documents were written: read them back).
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        let mut out = Vec::with_capacity(puts.len());
        for put in puts {
            out.push(
                self.put(run, &put.doc, put.bytes, PutOptions::mode(put.mode))
                    .await,
            );
        }
        Ok(out)
    }

    /// Raises the fence watermark of `key` to `fence` (never lowers it)
    /// and then reads `doc`, atomically: after it returns, any save fenced
    /// by a lease of `key` with a lower fence is refused. A split store
    /// calls it right after its lock service granted `fence`, before the
    /// new holder reads, so a stalled previous holder is refused even if
    /// the new one never writes.
    ///
    /// # Errors
    /// `Fenced` when the watermark is already above `fence` (a newer grant
    /// claimed the lock here); `Unsupported` without
    /// [`Capabilities::foreign_fencing`] (the default); otherwise as
    /// [`get`](Store::get).
    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let _ = (fence, doc, options);
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "this store keeps no fence watermarks, so it cannot fence saves under leases \
             granted by another lock service",
        )
        .with_operation(crate::Operation::Claim)
        .with_lock(key))
    }

    /// Follows the changes of `run`'s documents: see
    /// [`events`](crate::events) for the protocol that never misses one
    /// silently (subscribe, then snapshot, then apply; re-list on
    /// `Resync`). How changes are learnt is [`Capabilities::watch`].
    ///
    /// # Errors
    /// `Unsupported` when the backend cannot watch (the default); backend
    /// errors setting the watch up.
    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        Err(unsupported("watching runs", crate::Operation::Watch).with_run(run))
    }

    /// Publishes a status message on `topic` of `run`: appended to the
    /// run's bounded history and delivered to live subscribers.
    ///
    /// # Errors
    /// `InvalidKey` for a bad topic ([`check_label`](crate::events::check_label)),
    /// `TooLarge`/`InvalidArgument` for a bad message
    /// ([`check_text`](crate::events::check_text)); `Unsupported` without
    /// [`Capabilities::status`] (the default).
    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let _ = (topic, text);
        Err(unsupported("status messages", crate::Operation::Publish).with_run(run))
    }

    /// Subscribes to `run`'s status messages: first the history `replay`
    /// asks for, then live messages, with `Resync` where some may have been
    /// missed.
    ///
    /// # Errors
    /// `Unsupported` without [`Capabilities::status`] (the default).
    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        let _ = replay;
        Err(unsupported("status messages", crate::Operation::Subscribe).with_run(run))
    }

    /// Records that `task` of `run` finished at `at` (WEPPcloud's
    /// `timestamps:<task>`), replacing an earlier mark of that task; marks
    /// of different tasks never interfere, and no lock is needed.
    ///
    /// # Errors
    /// `InvalidKey` for a bad task name; `Unsupported` without
    /// [`Capabilities::milestones`] (the default).
    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let _ = (task, at);
        Err(unsupported("milestones", crate::Operation::Mark).with_run(run))
    }

    /// Sets attribute `name` of `run` to `value` (WEPPcloud's
    /// `attrs:<name>`), atomically per attribute, no lock needed.
    ///
    /// # Errors
    /// `InvalidKey` for a bad name, `TooLarge`/`InvalidArgument` for a bad
    /// value; `Unsupported` without [`Capabilities::milestones`].
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let _ = (name, value);
        Err(unsupported("attributes", crate::Operation::SetAttr).with_run(run))
    }

    /// Every milestone and attribute of `run` (empty for a run without).
    ///
    /// # Errors
    /// `Unsupported` without [`Capabilities::milestones`] (the default).
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        Err(unsupported("milestones", crate::Operation::Milestones).with_run(run))
    }
}

fn unsupported(what: &str, op: crate::Operation) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Unsupported,
        format!("this backend does not support {what} (see its capabilities)"),
    )
    .with_operation(op)
}

/// Page size used by the `list_all_*` conveniences.
pub const LIST_PAGE: usize = 1000;

/// Conveniences built on [`Store`], for every store.
#[async_trait]
pub trait StoreExt: Store {
    /// Reads a document with no size limit.
    async fn get_bytes(&self, run: &RunId, doc: &DocName) -> Result<Option<StoredDoc>> {
        self.get(run, doc, GetOptions::default()).await
    }

    /// Writes a document unconditionally.
    async fn put_bytes(&self, run: &RunId, doc: &DocName, bytes: Bytes) -> Result<Version> {
        self.put(run, doc, bytes, PutOptions::overwrite()).await
    }

    /// Every document of a run, paging through [`Store::list_docs`].
    ///
    /// # Errors
    /// As `list_docs`; `Backend` (retryable) for pages that kept coming
    /// back empty yet said more follow (asking again would never end).
    async fn list_all_docs(&self, run: &RunId) -> Result<Vec<DocMeta>> {
        let mut all: Vec<DocMeta> = Vec::new();
        let mut empty = 0;
        loop {
            let after = all.last().map(|m| m.name.clone());
            let page = self.list_docs(run, after.as_ref(), LIST_PAGE).await?;
            if !add_page(&mut all, page, &mut empty)? {
                return Ok(all);
            }
        }
    }

    /// Every run, paging through [`Store::list_runs`].
    ///
    /// # Errors
    /// As `list_runs`; `Backend` (retryable) for pages that kept coming
    /// back empty yet said more follow.
    async fn list_all_runs(&self) -> Result<Vec<RunId>> {
        let mut all: Vec<RunId> = Vec::new();
        let mut empty = 0;
        loop {
            let after = all.last().cloned();
            let page = self.list_runs(after.as_ref(), LIST_PAGE).await?;
            if !add_page(&mut all, page, &mut empty)? {
                return Ok(all);
            }
        }
    }
}

/// Adds `page` to `all`; returns whether more follow. An empty page that
/// says more follow is asked for again (its entries may have been deleted
/// while it was read, and the next read moves on), [`EMPTY_PAGES`] times in
/// a row at most: one that keeps coming back empty (a backend skipping
/// entries it cannot show, resuming after the last one it returned) would
/// be asked for forever.
fn add_page<T>(all: &mut Vec<T>, page: ListPage<T>, empty: &mut u32) -> Result<bool> {
    if page.more && page.items.is_empty() {
        *empty += 1;
        if *empty > EMPTY_PAGES {
            return Err(Error::new(
                ErrorKind::Backend,
                "a listing page kept coming back empty while saying more follow",
            )
            .set_retryable(true));
        }
        return Ok(true);
    }
    *empty = 0;
    all.extend(page.items);
    Ok(page.more)
}

/// How many empty pages in a row that say more follow paging asks again.
const EMPTY_PAGES: u32 = 3;

impl<T: Store + ?Sized> StoreExt for T {}

macro_rules! forward_store {
    ($ptr:ident) => {
        #[async_trait]
        impl<T: Store + ?Sized> Store for $ptr<T> {
            fn capabilities(&self) -> &Capabilities {
                (**self).capabilities()
            }
            async fn get(
                &self,
                run: &RunId,
                doc: &DocName,
                options: GetOptions,
            ) -> Result<Option<StoredDoc>> {
                (**self).get(run, doc, options).await
            }
            async fn put(
                &self,
                run: &RunId,
                doc: &DocName,
                bytes: Bytes,
                options: PutOptions<'_>,
            ) -> Result<Version> {
                (**self).put(run, doc, bytes, options).await
            }
            async fn delete(
                &self,
                run: &RunId,
                doc: &DocName,
                if_version: Option<&Version>,
            ) -> Result<bool> {
                (**self).delete(run, doc, if_version).await
            }
            async fn list_docs(
                &self,
                run: &RunId,
                after: Option<&DocName>,
                limit: usize,
            ) -> Result<ListPage<DocMeta>> {
                (**self).list_docs(run, after, limit).await
            }
            async fn list_runs(
                &self,
                after: Option<&RunId>,
                limit: usize,
            ) -> Result<ListPage<RunId>> {
                (**self).list_runs(after, limit).await
            }
            async fn delete_run(&self, run: &RunId) -> Result<u64> {
                (**self).delete_run(run).await
            }
            async fn get_if_changed(
                &self,
                run: &RunId,
                doc: &DocName,
                known: &Version,
                options: GetOptions,
            ) -> Result<Fetched> {
                (**self).get_if_changed(run, doc, known, options).await
            }
            async fn claim(
                &self,
                key: &LockKey,
                fence: Fence,
                doc: Option<&DocName>,
                options: GetOptions,
            ) -> Result<Option<StoredDoc>> {
                (**self).claim(key, fence, doc, options).await
            }
            async fn watch(&self, run: &RunId) -> Result<Watcher> {
                (**self).watch(run).await
            }
            async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
                (**self).head(run, doc).await
            }
            async fn get_many(
                &self,
                run: &RunId,
                docs: &[DocName],
                options: GetOptions,
            ) -> Result<Vec<Result<Option<StoredDoc>>>> {
                (**self).get_many(run, docs, options).await
            }
            async fn put_many(
                &self,
                run: &RunId,
                puts: Vec<PutRequest>,
            ) -> Result<Vec<Result<Version>>> {
                (**self).put_many(run, puts).await
            }
            async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
                (**self).publish(run, topic, text).await
            }
            async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
                (**self).subscribe(run, replay).await
            }
            async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
                (**self).mark(run, task, at).await
            }
            async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
                (**self).set_attr(run, name, value).await
            }
            async fn milestones(&self, run: &RunId) -> Result<Milestones> {
                (**self).milestones(run).await
            }
        }
    };
}

forward_store!(Arc);
forward_store!(Box);

#[cfg(test)]
mod paging_tests {
    use super::*;

    /// Pages that keep coming back empty while saying more follow end the
    /// paging with an error (it asked for the same page forever); a few in
    /// a row are asked again, and one that brings something resets that.
    #[test]
    fn empty_pages_that_say_more_end_the_paging() {
        let mut all: Vec<u32> = Vec::new();
        let mut empty = 0;
        for _ in 0..EMPTY_PAGES {
            assert!(add_page(&mut all, ListPage::new(vec![], true), &mut empty).unwrap());
        }
        assert!(add_page(&mut all, ListPage::new(vec![1], true), &mut empty).unwrap());
        assert_eq!(empty, 0);
        for _ in 0..EMPTY_PAGES {
            assert!(add_page(&mut all, ListPage::new(vec![], true), &mut empty).unwrap());
        }
        let error = add_page(&mut all, ListPage::new(vec![], true), &mut empty).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Backend);
        assert!(error.is_retryable());
        assert!(!add_page(&mut all, ListPage::new(vec![2], false), &mut 0).unwrap());
        assert_eq!(all, [1, 2]);
    }
}
