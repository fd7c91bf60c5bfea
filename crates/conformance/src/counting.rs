//! A decorator that counts writes, to prove that something did not write.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Fence, GetOptions, Lease, ListPage, Lock, LockInfo,
    LockKey, Owner, PutMode, PutOptions, Result, RunId, Store, StoredDoc, Version, async_trait,
};

/// Write counts seen by a [`CountingLock`].
#[derive(Debug, Default)]
pub struct Counts {
    /// Calls of `put`.
    pub puts: AtomicU64,
    /// Calls of `save_and_release`.
    pub saves_and_releases: AtomicU64,
    /// Calls of `delete` and `delete_run`.
    pub deletes: AtomicU64,
}

impl Counts {
    /// Every write so far.
    pub fn writes(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
            + self.saves_and_releases.load(Ordering::SeqCst)
            + self.deletes.load(Ordering::SeqCst)
    }
}

/// Forwards everything to the inner backend and counts the writes. It is
/// itself a full `Lock`, like any decorator should be.
pub struct CountingLock {
    inner: Arc<dyn Lock>,
    /// The counts.
    pub counts: Arc<Counts>,
}

impl CountingLock {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Lock>) -> Self {
        CountingLock {
            inner,
            counts: Arc::new(Counts::default()),
        }
    }
}

impl fmt::Debug for CountingLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingLock")
            .field("inner", &self.inner)
            .field("counts", &self.counts)
            .finish()
    }
}

#[async_trait]
impl Store for CountingLock {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.inner.get(run, doc, options).await
    }
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(run, doc, bytes, options).await
    }
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        self.counts.deletes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(run, doc, if_version).await
    }
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.inner.list_docs(run, after, limit).await
    }
    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.inner.list_runs(after, limit).await
    }
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        self.counts.deletes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete_run(run).await
    }
}

#[async_trait]
impl Lock for CountingLock {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.inner.try_acquire(key, owner, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        self.inner.break_lock(key, only_fence).await
    }
    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        self.inner.list_locks(run).await
    }
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.inner.wait_for_release(key, max).await
    }
    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        self.inner
            .acquire_and_load(key, doc, owner, ttl, options)
            .await
    }
    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        self.counts
            .saves_and_releases
            .fetch_add(1, Ordering::SeqCst);
        self.inner.save_and_release(lease, doc, bytes, mode).await
    }
}
