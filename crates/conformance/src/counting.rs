//! A decorator that counts writes (to prove that something did not write)
//! and acquisitions (to prove that a waiter did not ask).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Fence, Fetched, GetOptions, Lease, ListPage,
    Lock, LockInfo, LockKey, Milestones, Owner, PutMode, PutOptions, PutRequest, Replay, Result,
    RunId, Store, StoredDoc, Subscription, Version, Watcher, async_trait,
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
    /// Calls of `wait_for_release` and `wait_for_local_release` that have
    /// begun (a waiter is waiting).
    pub waits: AtomicU64,
    /// Calls of `try_acquire` and `acquire_and_load`: what a waiter asked
    /// the backend.
    pub acquires: AtomicU64,
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

/// Checks that a waiter whose lock is held through the same store waits
/// for that holder's release without asking the backend: one acquire for
/// the holder and one for the waiter, however long the holder works, after
/// a `release` and after a `save_and_release` of `doc`. For backends that
/// implement [`Lock::wait_for_local_release`] (their own tests call it;
/// the suite does not, since others rightly keep polling).
///
/// # Panics
/// When the waiter asks while the holder works, asks more than once after
/// the release, or any call fails.
pub async fn check_a_local_waiter_asks_once(
    store: Arc<dyn Lock>,
    key: &LockKey,
    doc: &DocName,
    ttl: Duration,
) {
    use runstate_core::{LockExt, WaitPolicy};
    let counting = Arc::new(CountingLock::new(store));
    // Backoff alone would ask many times while the holder works; only the
    // holder's release may end this wait.
    let policy = WaitPolicy::with_timeout(ttl).with_backoff(Duration::from_millis(1), ttl, 2.0);
    for how in ["release", "save_and_release"] {
        let asked = counting.counts.acquires.load(Ordering::SeqCst);
        let lease = counting
            .try_acquire(key, &Owner::for_this_process(), ttl)
            .await
            .expect("holder");
        let waiting = {
            let (counting, key, doc, policy) = (
                Arc::clone(&counting),
                key.clone(),
                doc.clone(),
                policy.clone(),
            );
            tokio::spawn(async move {
                counting
                    .acquire_and_load_waiting(
                        &key,
                        &doc,
                        &Owner::for_this_process(),
                        ttl,
                        GetOptions::new(),
                        &policy,
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            counting.counts.acquires.load(Ordering::SeqCst) - asked,
            1,
            "the waiter asked while the holder of this store worked"
        );
        match how {
            "release" => counting.release(&lease).await.expect("release"),
            _ => drop(
                counting
                    .save_and_release(&lease, doc, Bytes::from_static(b"x"), PutMode::Overwrite)
                    .await
                    .expect("save"),
            ),
        }
        let (next, _) = waiting.await.expect("joined").expect("the waiter's turn");
        assert!(next.fence() > lease.fence());
        assert_eq!(
            counting.counts.acquires.load(Ordering::SeqCst) - asked,
            2,
            "one ask after the {how}"
        );
        counting.release(&next).await.expect("release");
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
#[deny(clippy::missing_trait_methods)]
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
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        self.inner.head(run, doc).await
    }
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        self.inner.get_many(run, docs, options).await
    }
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        self.counts
            .puts
            .fetch_add(puts.len() as u64, Ordering::SeqCst);
        self.inner.put_many(run, puts).await
    }
    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        self.inner.get_if_changed(run, doc, known, options).await
    }
    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.inner.claim(key, fence, doc, options).await
    }
    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        self.inner.watch(run).await
    }
    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        self.inner.publish(run, topic, text).await
    }
    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        self.inner.subscribe(run, replay).await
    }
    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        self.inner.mark(run, task, at).await
    }
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.inner.set_attr(run, name, value).await
    }
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.inner.milestones(run).await
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Lock for CountingLock {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.counts.acquires.fetch_add(1, Ordering::SeqCst);
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
        self.counts.waits.fetch_add(1, Ordering::SeqCst);
        self.inner.wait_for_release(key, max).await
    }
    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.counts.waits.fetch_add(1, Ordering::SeqCst);
        self.inner.wait_for_local_release(key, owner, max).await
    }
    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        self.counts.acquires.fetch_add(1, Ordering::SeqCst);
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
