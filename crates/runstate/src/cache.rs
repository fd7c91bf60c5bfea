//! A cache in front of any store that can never cause a lost update:
//! [`CachedStore`], with an in-process [`MemoryCache`] (or any
//! [`Cache`], such as a Redis cache shared by
//! workers).
//!
//! WEPPcloud's recorded incident: a worker hydrated a stale cached copy of a
//! controller and wrote it back over newer fields. Here that cannot happen:
//!
//! - a cache hit is **validated** with a conditional read
//!   ([`Store::get_if_changed`]: a version check that sends no bytes when
//!   the copy is current), so reads are as fresh as the store's, unless the
//!   caller opts into serving copies up to
//!   [`GetOptions::max_staleness`] old without asking (a UI, an
//!   optimistic update);
//! - writes through the cache update it (with the version the store
//!   returned) or forget the entry; writes by others are caught by the
//!   validation;
//! - a locked update loads from the store under its lease
//!   ([`Lock::acquire_and_load`] is never served from the cache) and saves
//!   conditional on that version; an optimistic update
//!   ([`Run::update_optimistic`](runstate_core::Run::update_optimistic))
//!   saves conditional on the cached version. A stale copy thus costs a
//!   retry, never an update.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate::Result<()> {
//! use std::sync::Arc;
//! use runstate::cache::{CachedStore, MemoryCache};
//! use runstate::memory::MemoryStore;
//! let store = CachedStore::new(Arc::new(MemoryStore::new()), Arc::new(MemoryCache::new(64 << 20)));
//! # let _ = store; Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Cache, Cached, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence,
    Fetched, GetOptions, Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Owner, PutMode,
    PutOptions, PutRequest, Replay, Result, RunId, Store, StoredDoc, Subscription, Version,
    Watcher, async_trait,
};

/// Any store with a cache in front: itself a store, with the same
/// capabilities (see the [module documentation](self)).
#[derive(Clone)]
pub struct CachedStore {
    store: Arc<dyn Lock>,
    cache: Arc<dyn Cache>,
}

impl CachedStore {
    /// `store` with `cache` in front of its reads.
    pub fn new(store: Arc<dyn Lock>, cache: Arc<dyn Cache>) -> Self {
        CachedStore { store, cache }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn Lock> {
        &self.store
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.cache
    }

    fn too_large(size: usize, limit: u64) -> Error {
        Error::new(
            ErrorKind::TooLarge,
            format!("document is {size} bytes, over the limit of {limit}"),
        )
    }

    /// A cached copy as the caller asked for it: within its size limit.
    fn serve(
        copy: StoredDoc,
        options: GetOptions,
        run: &RunId,
        doc: &DocName,
    ) -> Result<StoredDoc> {
        match options.limit {
            Some(limit) if copy.bytes.len() as u64 > limit => Err(Self::too_large(
                copy.bytes.len(),
                limit,
            )
            .at_doc(runstate_core::Operation::Get, run, doc)),
            _ => Ok(copy),
        }
    }

    async fn remember(&self, run: &RunId, doc: &DocName, stored: &StoredDoc, known_at: SystemTime) {
        self.cache
            .put(run, doc, Cached::new(stored.clone(), known_at))
            .await;
    }
}

impl fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("store", &self.store)
            .field("cache", &self.cache)
            .finish()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Store for CachedStore {
    fn capabilities(&self) -> &Capabilities {
        self.store.capabilities()
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let asked = SystemTime::now();
        if let Some((version, known_at)) = self.cache.version(run, doc).await {
            // A copy known current after this read was asked for (another
            // host's clock ahead of ours, or ours stepped back) has no age
            // we can trust: it is validated, never served as new.
            let fresh = |known_at: SystemTime, max: Duration| {
                asked.duration_since(known_at).is_ok_and(|age| age <= max)
            };
            if let Some(max) = options.max_staleness
                && fresh(known_at, max)
                && let Some(hit) = self.cache.get(run, doc).await
                // The copy may have been replaced since its version was
                // read (by an older read remembered late): the bound is
                // judged on the copy served.
                && fresh(hit.known_at, max)
                // A copy over the caller's limit may be stale: the store
                // says whether the document is still that large.
                && options
                    .limit
                    .is_none_or(|limit| hit.doc.bytes.len() as u64 <= limit)
            {
                return Self::serve(hit.doc, options, run, doc).map(Some);
            }
            // Ask the store whether the cached version is current while
            // the bytes come from the cache: the hit costs the slower of
            // the two, not their sum.
            let (fetched, hit) = tokio::join!(
                self.store.get_if_changed(run, doc, &version, options),
                self.cache.get(run, doc)
            );
            match fetched? {
                Fetched::Unchanged => match hit {
                    Some(hit) if hit.doc.version == version => {
                        // Off the read's path: only stale-tolerant reads
                        // gain from it.
                        let (cache, run2, doc2) =
                            (Arc::clone(&self.cache), run.clone(), doc.clone());
                        let touch = async move { cache.touch(&run2, &doc2, &version, asked).await };
                        match tokio::runtime::Handle::try_current() {
                            Ok(runtime) => drop(runtime.spawn(touch)),
                            // Outside a Tokio runtime (another executor),
                            // where spawning would panic: made in line.
                            Err(_) => touch.await,
                        }
                        return Self::serve(hit.doc, options, run, doc).map(Some);
                    }
                    // The cache changed meanwhile: ask the store below.
                    _ => {}
                },
                Fetched::Changed(stored) => {
                    self.remember(run, doc, &stored, asked).await;
                    return Ok(Some(stored));
                }
                Fetched::Absent => {
                    self.cache.remove(run, doc).await;
                    return Ok(None);
                }
            }
        }
        let stored = self.store.get(run, doc, options).await?;
        match &stored {
            Some(stored) => self.remember(run, doc, stored, asked).await,
            None => self.cache.remove(run, doc).await,
        }
        Ok(stored)
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let sent = SystemTime::now();
        match self.store.put(run, doc, bytes.clone(), options).await {
            Ok(version) => {
                let stored = StoredDoc::new(bytes, version.clone());
                self.remember(run, doc, &stored, sent).await;
                Ok(version)
            }
            Err(error) => {
                // Refused or unknown: whatever the cache holds may be stale.
                self.cache.remove(run, doc).await;
                Err(error)
            }
        }
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let deleted = self.store.delete(run, doc, if_version).await;
        self.cache.remove(run, doc).await;
        deleted
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.store.list_docs(run, after, limit).await
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.store.list_runs(after, limit).await
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let deleted = self.store.delete_run(run).await;
        self.cache.remove_run(run).await;
        deleted
    }

    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        self.store.head(run, doc).await
    }

    /// From the store (one batch), remembering what it read: a batch is
    /// for bulk work (a migration), where validating each hit one by one
    /// would cost more than the batch.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let asked = SystemTime::now();
        let got = self.store.get_many(run, docs, options).await?;
        for (doc, result) in docs.iter().zip(&got) {
            match result {
                Ok(Some(stored)) => self.remember(run, doc, stored, asked).await,
                Ok(None) => self.cache.remove(run, doc).await,
                Err(_) => {}
            }
        }
        Ok(got)
    }

    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        let sent = SystemTime::now();
        let written: Vec<(DocName, Bytes)> = puts
            .iter()
            .map(|p| (p.doc.clone(), p.bytes.clone()))
            .collect();
        let outcome = self.store.put_many(run, puts).await;
        match &outcome {
            Ok(results) => {
                for ((doc, bytes), result) in written.into_iter().zip(results) {
                    match result {
                        Ok(version) => {
                            let stored = StoredDoc::new(bytes, version.clone());
                            self.remember(run, &doc, &stored, sent).await;
                        }
                        Err(_) => self.cache.remove(run, &doc).await,
                    }
                }
            }
            Err(_) => {
                for (doc, _) in written {
                    self.cache.remove(run, &doc).await;
                }
            }
        }
        outcome
    }

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let asked = SystemTime::now();
        let fetched = self.store.get_if_changed(run, doc, known, options).await?;
        match &fetched {
            Fetched::Changed(stored) => self.remember(run, doc, stored, asked).await,
            Fetched::Absent => self.cache.remove(run, doc).await,
            Fetched::Unchanged => {}
        }
        Ok(fetched)
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.store.claim(key, fence, doc, options).await
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        self.store.watch(run).await
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        self.store.publish(run, topic, text).await
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        self.store.subscribe(run, replay).await
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        self.store.mark(run, task, at).await
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.store.set_attr(run, name, value).await
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.store.milestones(run).await
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Lock for CachedStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.store.try_acquire(key, owner, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.store.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.store.release(lease).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.store.inspect(key).await
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        self.store.break_lock(key, only_fence).await
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        self.store.list_locks(run).await
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.store.wait_for_release(key, max).await;
    }

    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.store.wait_for_local_release(key, owner, max).await
    }

    /// Always from the store, under the lease: a locked update never
    /// starts from a cached copy.
    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let asked = SystemTime::now();
        let (lease, stored) = self
            .store
            .acquire_and_load(key, doc, owner, ttl, options)
            .await?;
        match &stored {
            Some(stored) => self.remember(key.run(), doc, stored, asked).await,
            None => self.cache.remove(key.run(), doc).await,
        }
        Ok((lease, stored))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run();
        let sent = SystemTime::now();
        match self
            .store
            .save_and_release(lease, doc, bytes.clone(), mode)
            .await
        {
            Ok(version) => {
                let stored = StoredDoc::new(bytes, version.clone());
                self.remember(run, doc, &stored, sent).await;
                Ok(version)
            }
            Err(error) => {
                self.cache.remove(run, doc).await;
                Err(error)
            }
        }
    }
}

/// An in-process cache: least recently used copies go first once their
/// bytes exceed the budget.
pub struct MemoryCache {
    budget: u64,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<(RunId, DocName), (Cached, u64)>,
    /// Use order: tick → key.
    order: BTreeMap<u64, (RunId, DocName)>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, key: &(RunId, DocName)) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, used)) = self.entries.get_mut(key) {
            self.order.remove(used);
            *used = tick;
            self.order.insert(tick, key.clone());
        }
    }

    fn remove(&mut self, key: &(RunId, DocName)) {
        if let Some((copy, used)) = self.entries.remove(key) {
            self.order.remove(&used);
            self.bytes -= cost(key, &copy);
        }
    }
}

/// What an entry is charged beyond its bytes, names and version: the
/// copy's and the use order's bookkeeping (two map entries, their keys'
/// headers, the times).
const ENTRY_OVERHEAD: u64 = 128;

/// The bytes an entry is charged against the budget: its document, its
/// names, its version and [`ENTRY_OVERHEAD`]. Charging the document alone
/// let empty or small documents fill memory past any budget.
fn cost((run, doc): &(RunId, DocName), copy: &Cached) -> u64 {
    let sizes = [
        copy.doc.bytes.len(),
        run.as_str().len(),
        doc.as_str().len(),
        copy.doc.version.as_str().len(),
    ];
    sizes
        .iter()
        .fold(ENTRY_OVERHEAD, |sum, size| sum.saturating_add(*size as u64))
}

impl MemoryCache {
    /// A cache keeping at most `budget` bytes, each copy charged its
    /// document's bytes, its run and document names, its version and 128
    /// bytes of bookkeeping (a copy charged more than the budget is not
    /// kept).
    pub fn new(budget: u64) -> Self {
        MemoryCache {
            budget,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // Every change is made whole under the lock.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes held, as charged against the budget (see
    /// [`new`](Self::new)).
    pub fn bytes(&self) -> u64 {
        self.lru().bytes
    }

    /// Documents held.
    pub fn len(&self) -> usize {
        self.lru().entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lru = self.lru();
        f.debug_struct("MemoryCache")
            .field("budget", &self.budget)
            .field("bytes", &lru.bytes)
            .field("documents", &lru.entries.len())
            .finish()
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, run: &RunId, doc: &DocName) -> Option<Cached> {
        let key = (run.clone(), doc.clone());
        let mut lru = self.lru();
        let copy = lru.entries.get(&key).map(|(copy, _)| copy.clone())?;
        lru.touch(&key);
        Some(copy)
    }

    async fn put(&self, run: &RunId, doc: &DocName, copy: Cached) {
        let key = (run.clone(), doc.clone());
        let size = cost(&key, &copy);
        let mut lru = self.lru();
        lru.remove(&key);
        if size > self.budget {
            return;
        }
        while lru.bytes + size > self.budget {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = lru.entries.remove(&oldest) {
                lru.bytes -= cost(&oldest, &evicted);
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.insert(tick, key.clone());
        lru.entries.insert(key, (copy, tick));
        lru.bytes += size;
    }

    async fn touch(&self, run: &RunId, doc: &DocName, version: &Version, known_at: SystemTime) {
        let key = (run.clone(), doc.clone());
        if let Some((copy, _)) = self.lru().entries.get_mut(&key)
            && copy.doc.version == *version
        {
            copy.known_at = copy.known_at.max(known_at);
        }
    }

    async fn remove(&self, run: &RunId, doc: &DocName) {
        self.lru().remove(&(run.clone(), doc.clone()));
    }

    async fn remove_run(&self, run: &RunId) {
        let mut lru = self.lru();
        let keys: Vec<(RunId, DocName)> = lru
            .entries
            .keys()
            .filter(|(r, _)| r == run)
            .cloned()
            .collect();
        for key in keys {
            lru.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(bytes: &'static [u8], version: &str) -> Cached {
        Cached::new(
            StoredDoc::new(Bytes::from_static(bytes), Version::new(version)),
            SystemTime::now(),
        )
    }

    /// A cache whose copy was replaced between the version asked for and
    /// the bytes read: `version` says fresh, `get` hands out an old copy
    /// known current an hour ago.
    #[derive(Debug)]
    struct Replaced {
        fresh: Version,
    }

    #[async_trait]
    impl Cache for Replaced {
        async fn get(&self, _run: &RunId, _doc: &DocName) -> Option<Cached> {
            Some(Cached::new(
                StoredDoc::new(Bytes::from_static(b"old"), Version::new("old-version")),
                SystemTime::now() - Duration::from_secs(3600),
            ))
        }

        async fn version(&self, _run: &RunId, _doc: &DocName) -> Option<(Version, SystemTime)> {
            Some((self.fresh.clone(), SystemTime::now()))
        }

        async fn put(&self, _run: &RunId, _doc: &DocName, _copy: Cached) {}

        async fn remove(&self, _run: &RunId, _doc: &DocName) {}

        async fn remove_run(&self, _run: &RunId) {}
    }

    #[tokio::test]
    async fn a_stale_tolerant_read_never_serves_a_copy_older_than_allowed() {
        use runstate_core::StoreExt;
        let store = Arc::new(runstate_core::memory::MemoryStore::new());
        let run = RunId::new("r").unwrap();
        let doc = DocName::new("d").unwrap();
        let fresh = store
            .put_bytes(&run, &doc, Bytes::from_static(b"new"))
            .await
            .unwrap();
        let cached = CachedStore::new(store, Arc::new(Replaced { fresh }));
        let got = cached
            .get(
                &run,
                &doc,
                GetOptions::new().with_max_staleness(Duration::from_secs(60)),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &got.bytes[..],
            b"new",
            "an hour-old copy was served as fresh"
        );
    }

    #[tokio::test]
    async fn the_least_recently_used_go_first_within_the_budget() {
        let cache = MemoryCache::new(2 * (4 + 1 + 1 + 1 + ENTRY_OVERHEAD) + 10);
        let run = RunId::new("r").unwrap();
        let (a, b, c) = (
            DocName::new("a").unwrap(),
            DocName::new("b").unwrap(),
            DocName::new("c").unwrap(),
        );
        cache.put(&run, &a, copy(b"aaaa", "1")).await;
        cache.put(&run, &b, copy(b"bbbb", "1")).await;
        assert!(cache.get(&run, &a).await.is_some()); // a is now the most recent
        cache.put(&run, &c, copy(b"cccc", "1")).await; // evicts b
        assert!(cache.get(&run, &b).await.is_none());
        assert!(cache.get(&run, &a).await.is_some());
        assert!(cache.get(&run, &c).await.is_some());
        // Each: 4 bytes, names of 1 byte, a version of 1, and bookkeeping.
        assert_eq!(cache.bytes(), 2 * (4 + 1 + 1 + 1 + ENTRY_OVERHEAD));
        cache.put(&run, &a, copy(&[b'x'; 200], "2")).await;
        assert!(
            cache.get(&run, &a).await.is_none(),
            "over the budget: not kept, old copy gone"
        );
        cache.remove_run(&run).await;
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
    }

    /// Empty documents are charged their bookkeeping: before, a cache with
    /// no budget at all kept every empty copy, and small copies filled
    /// memory past any budget.
    #[tokio::test]
    async fn every_copy_is_charged_its_bookkeeping() {
        let run = RunId::new("r").unwrap();
        let none = MemoryCache::new(0);
        none.put(&run, &DocName::new("d").unwrap(), copy(b"", "1"))
            .await;
        assert!(none.is_empty(), "a cache of no budget keeps nothing");
        let small = MemoryCache::new(10 * 1024);
        for i in 0..1000 {
            let doc = DocName::new(format!("d{i}")).unwrap();
            small.put(&run, &doc, copy(b"", "1")).await;
        }
        assert!(small.bytes() <= 10 * 1024, "{} bytes", small.bytes());
        assert!(small.len() < 80, "{} copies", small.len());
    }

    fn ids() -> (RunId, DocName) {
        (RunId::new("r").unwrap(), DocName::new("d").unwrap())
    }

    /// Two stores sharing one cache never serve each other's copies: two
    /// memory stores both counted their versions from 1, so a validated
    /// read of one found its version "unchanged" and served the other's
    /// bytes (and an optimistic update saved over it).
    #[tokio::test]
    async fn stores_sharing_a_cache_never_serve_each_others_copies() {
        use runstate_core::StoreExt;
        use runstate_core::memory::MemoryStore;
        let (run, doc) = ids();
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new(1 << 20));
        let a = CachedStore::new(Arc::new(MemoryStore::new()), Arc::clone(&cache));
        let b = CachedStore::new(Arc::new(MemoryStore::new()), cache);
        a.put_bytes(&run, &doc, Bytes::from_static(b"A"))
            .await
            .unwrap();
        b.put_bytes(&run, &doc, Bytes::from_static(b"B"))
            .await
            .unwrap();
        let got = a.get(&run, &doc, GetOptions::new()).await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"A", "store a served store b's copy");
    }

    /// A copy stamped known current after the read was asked for (another
    /// host's clock ahead) is validated, not served as new: its age was
    /// taken as zero, so a stale copy passed any staleness bound.
    #[tokio::test]
    async fn a_copy_known_in_the_future_is_validated() {
        use runstate_core::StoreExt;
        use runstate_core::memory::MemoryStore;
        let (run, doc) = ids();
        let store = Arc::new(MemoryStore::new());
        let old = store
            .put_bytes(&run, &doc, Bytes::from_static(b"old"))
            .await
            .unwrap();
        let cache = Arc::new(MemoryCache::new(1 << 20));
        cache
            .put(
                &run,
                &doc,
                Cached::new(
                    StoredDoc::new(Bytes::from_static(b"old"), old),
                    SystemTime::now() + Duration::from_secs(3600),
                ),
            )
            .await;
        store
            .put_bytes(&run, &doc, Bytes::from_static(b"new"))
            .await
            .unwrap();
        let cached = CachedStore::new(store, cache);
        let options = GetOptions::new().with_max_staleness(Duration::from_secs(1));
        let got = cached.get(&run, &doc, options).await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"new", "a copy from the future was served");
    }

    /// A stale-tolerant read whose cached copy is over the caller's limit
    /// asks the store: the document stored now may be small. Before, it
    /// failed with `TooLarge` about a document no longer stored.
    #[tokio::test]
    async fn a_cached_copy_over_the_limit_is_checked_with_the_store() {
        use runstate_core::StoreExt;
        use runstate_core::memory::MemoryStore;
        let (run, doc) = ids();
        let store = Arc::new(MemoryStore::new());
        let cached = CachedStore::new(
            Arc::clone(&store) as Arc<dyn Lock>,
            Arc::new(MemoryCache::new(1 << 20)),
        );
        cached
            .put_bytes(&run, &doc, Bytes::from(vec![b'x'; 100]))
            .await
            .unwrap();
        store
            .put_bytes(&run, &doc, Bytes::from_static(b"small"))
            .await
            .unwrap();
        let options = GetOptions::new()
            .with_max_staleness(Duration::from_secs(3600))
            .with_limit(50);
        let got = cached.get(&run, &doc, options).await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"small");
    }

    /// A validated hit outside a Tokio runtime (another executor): its
    /// touch of the cache was spawned on Tokio, which panicked.
    #[test]
    fn a_validated_hit_needs_no_tokio_runtime() {
        use runstate_core::StoreExt;
        use runstate_core::memory::MemoryStore;
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        fn block_on<F: std::future::Future>(future: F) -> F::Output {
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            let mut future = std::pin::pin!(future);
            loop {
                if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                    return out;
                }
                std::thread::park();
            }
        }
        let (run, doc) = ids();
        let cached = CachedStore::new(
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryCache::new(1 << 20)),
        );
        block_on(async {
            cached
                .put_bytes(&run, &doc, Bytes::from_static(b"x"))
                .await
                .unwrap();
            let got = cached.get(&run, &doc, GetOptions::new()).await.unwrap();
            assert_eq!(got.map(|d| d.bytes), Some(Bytes::from_static(b"x")));
        });
    }
}
