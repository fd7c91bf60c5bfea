//! The byte-level document store contract.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::id::{DocName, RunId};
use crate::lease::Lease;
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
}

impl GetOptions {
    /// No options: any size.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the size limit.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
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
        PutOptions { mode, lease: None }
    }

    /// Makes it a fenced save under `lease`.
    pub fn with_lease(mut self, lease: &'a Lease) -> Self {
        self.lease = Some(lease);
        self
    }
}

/// A document as read: its exact bytes and its version.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// The bytes exactly as saved.
    pub bytes: Bytes,
    /// The version of these bytes.
    pub version: Version,
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
pub struct DocMeta {
    /// Its name.
    pub name: DocName,
    /// Its current version.
    pub version: Version,
    /// Its size in bytes.
    pub size: u64,
}

/// One page of a listing, in ascending byte order of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage<T> {
    /// The entries of this page.
    pub items: Vec<T>,
    /// Whether entries remain after the last one of this page. A page may
    /// be shorter than asked for and still have more after it.
    pub more: bool,
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
        }
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
    async fn list_all_docs(&self, run: &RunId) -> Result<Vec<DocMeta>> {
        let mut all: Vec<DocMeta> = Vec::new();
        loop {
            let after = all.last().map(|m| m.name.clone());
            let page = self.list_docs(run, after.as_ref(), LIST_PAGE).await?;
            all.extend(page.items);
            if !page.more {
                return Ok(all);
            }
        }
    }

    /// Every run, paging through [`Store::list_runs`].
    async fn list_all_runs(&self) -> Result<Vec<RunId>> {
        let mut all: Vec<RunId> = Vec::new();
        loop {
            let after = all.last().cloned();
            let page = self.list_runs(after.as_ref(), LIST_PAGE).await?;
            all.extend(page.items);
            if !page.more {
                return Ok(all);
            }
        }
    }
}

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
        }
    };
}

forward_store!(Arc);
forward_store!(Box);
