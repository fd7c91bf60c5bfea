//! Documents in one store, leases in another: [`SplitStore`].
//!
//! WEPPcloud keeps its controllers as files on a folder shared by several
//! worker hosts and locks them with Redis keys. A split store is that
//! shape done safely: any backend holds the documents, any backend grants
//! the leases, and **fencing stays with the store that holds the bytes**.
//! The lock service's fences mean nothing to the document store unless it
//! checks them, so the document store keeps, per lock, the highest fence it
//! has seen (its watermark) and refuses, atomically with the write, a save
//! whose lease's fence is below it ([`PutOptions::foreign_lease`]). Every
//! grant is claimed in the document store ([`Store::claim`]: the watermark
//! is raised to the new fence) *before* the new holder reads, so a stalled
//! previous holder is refused even if the new one never writes.
//!
//! ```text
//! acquire_and_load = locks.try_acquire → docs.claim(fence) + read
//! save_and_release = docs.put(fenced by the watermark, conditional on the version)
//!                    → locks.release ∥ docs.claim(fence + 1)
//! release          = locks.release → docs.claim(fence + 1), unless refused while the grant lives
//! ```
//!
//! A released (or broken) grant is closed in the document store too: the
//! watermark moves past its fence, so a save that comes late under it is
//! refused even if nobody has taken the lock since. A release the lock
//! service refused (another owner's) closes nothing while a live grant
//! holds that fence.
//!
//! **The lock service must never grant a fence again.** Watermarks outlive
//! it: a lock service that lost its fences (a SQL lock table or a lock
//! folder made again, or another lock service in its place) grants fences
//! the document store has already seen, and its claims are refused
//! (`Fenced`) until its counter passes them; a fence equal to an old
//! holder's would pass beside it. Redis and the in-process store start
//! their fences from the clock (microseconds since 1970), so a server or
//! process started again grants above every fence before it; move a SQL or
//! file lock service with its data. A lease whose local
//! deadline has passed is refused before anything is sent. (In the
//! remaining case, a holder paused between that check and its write for
//! longer than its TTL while nobody took the lock, the late write lands
//! where no other holder wrote: no update is lost.)
//!
//! A document store without watermarks (S3, whose writes cannot be made
//! conditional on another object) makes a [`Fencing::VersionOnly`] split
//! store: before each save under a lease the lock service is asked whether
//! the lease is still the lock's grant, and the write is conditional on the
//! document's version (for an `Overwrite`, the version read just before the
//! check), so no update is lost; a holder whose lease lapses in the instant
//! between that check and its write still writes if nobody changed the
//! document meanwhile.
//!
//! **Locks the document store holds itself.** A document store may know of
//! locks taken outside runstate: a file store beside a running WEPPcloud
//! treats WEPPcloud's legacy `<name>.nodb.lock` files as held locks. Its
//! claims refuse such a lock (`Locked`, with the holder), so an acquire
//! through the split store gives its fresh grant back and reports them;
//! with [`SplitStore::with_document_locks`] the split store also lists
//! them (`list_locks`), shows them (`inspect`), breaks them (`break_lock`,
//! an operator's forced unlock) and waits for them without polling.
//!
//! Open one by URL with the `locks` option (`file:///runs?ext=nodb&locks=redis%3A%2F%2Fcache%3A6379%2F0`)
//! or build it with [`SplitStore::new`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fencing, Fetched,
    GetOptions, Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode,
    PutOptions, PutRequest, Replay, Result, RunId, Store, StoredDoc, Subscription, Version,
    Watcher, async_trait,
};

/// A store whose documents live in one backend and whose leases are
/// granted by another (or the same), fenced by the document store.
#[derive(Clone)]
pub struct SplitStore {
    docs: Arc<dyn Store>,
    locks: Arc<dyn Lock>,
    /// The document store as a lock, for the locks it holds itself.
    doc_locks: Option<Arc<dyn Lock>>,
    capabilities: Capabilities,
}

impl SplitStore {
    /// Documents in `docs`, leases from `locks`.
    ///
    /// The split store fences atomically ([`Fencing::Atomic`]) when `docs`
    /// keeps fence watermarks ([`Capabilities::foreign_fencing`]), by
    /// version only otherwise; it may be shared by processes on several
    /// hosts when `locks` may be and `docs` is shared itself (a server) or
    /// is the file store (a folder hosts share); in-process and SQLite
    /// documents are not.
    ///
    /// # Errors
    /// `Config` when `locks` grants no leases or `docs` has no conditional
    /// writes (a split store's saves must be conditional on the version).
    pub fn new(docs: Arc<dyn Store>, locks: Arc<dyn Lock>) -> Result<SplitStore> {
        let d = docs.capabilities();
        let l = locks.capabilities();
        let refuse =
            |why: String| Err(Error::new(ErrorKind::Config, why).with_operation(Operation::Open));
        if !l.leases {
            return refuse(format!("the lock service ({}) grants no leases", l.backend));
        }
        if !d.conditional_put {
            return refuse(format!(
                "the document store ({}) has no conditional writes",
                d.backend
            ));
        }
        let backend = combined_name(d.backend, l.backend);
        let capabilities = Capabilities::full(backend)
            .with_conditional_put(true)
            .with_conditional_delete(d.conditional_delete)
            .with_leases(true)
            .with_fencing(if d.foreign_fencing {
                Fencing::Atomic
            } else {
                Fencing::VersionOnly
            })
            .with_max_document_size(d.max_document_size)
            // Hosts share the documents where the document store is
            // shared itself, or is a folder shared by hosts whose leases
            // come from the lock service (the file store's documented
            // split mode); an in-process store or a SQLite file is not.
            .with_multi_host(
                l.multi_host && (d.multi_host || (d.foreign_fencing && d.backend == FILE_BACKEND)),
            )
            .with_native_conditional_get(d.native_conditional_get)
            .with_watch(d.watch)
            .with_status(l.status || d.status)
            .with_milestones(l.milestones || d.milestones)
            // Listings and heads are the document store's.
            .with_modified_times(d.modified_times);
        Ok(SplitStore {
            docs,
            locks,
            doc_locks: None,
            capabilities,
        })
    }

    /// Also reports the locks the document store holds itself (`docs`
    /// must be the document store, as a [`Lock`]): `list_locks` lists
    /// them after the lock service's, `inspect` shows one when the lock
    /// service has no holder, `break_lock` breaks it too, and
    /// `wait_for_release` waits on the document store while it holds the
    /// lock (a lock service's waiter would wake at once, since its own
    /// grant was given back). For a file store beside a running WEPPcloud,
    /// these are WEPPcloud's legacy lock files. The document store's own
    /// leases, which a split store never takes, would show too.
    pub fn with_document_locks(mut self, docs: Arc<dyn Lock>) -> SplitStore {
        self.doc_locks = Some(docs);
        self
    }

    /// The document store.
    pub fn docs(&self) -> &Arc<dyn Store> {
        &self.docs
    }

    /// The lock service.
    pub fn locks(&self) -> &Arc<dyn Lock> {
        &self.locks
    }

    /// Where status messages go: the lock service when it carries them
    /// (a shared Redis or PostgreSQL, which every worker reaches), else the
    /// document store.
    fn events(&self) -> &dyn Store {
        if self.locks.capabilities().status {
            &*self.locks
        } else {
            &*self.docs
        }
    }

    /// Where milestones and attributes go, by the same rule.
    fn run_facts(&self) -> &dyn Store {
        if self.locks.capabilities().milestones {
            &*self.locks
        } else {
            &*self.docs
        }
    }

    fn watermarks(&self) -> bool {
        self.docs.capabilities().foreign_fencing
    }

    /// Claims a fresh grant in the document store (raising its watermark)
    /// and reads `doc`; on failure the grant is given back.
    async fn claim(
        &self,
        lease: Lease,
        doc: Option<&DocName>,
        options: GetOptions,
        op: Operation,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let key = lease.key();
        let claimed = if self.watermarks() {
            self.docs.claim(key, lease.fence(), doc, options).await
        } else {
            match doc {
                Some(doc) => self.docs.get(key.run(), doc, options).await,
                None => Ok(None),
            }
        };
        match claimed {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                if let Err(release) = self.locks.release(&lease).await {
                    tracing::debug!(%release, "release after a failed claim");
                }
                Err(error.with_operation(op).with_lock(key))
            }
        }
    }

    /// A save under `lease`, fenced by the document store.
    async fn fenced_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
        op: Operation,
    ) -> Result<Version> {
        let run = lease.key().run();
        lease
            .key()
            .check_covers(run, doc)
            .map_err(|e| e.at_doc(op, run, doc))?;
        let fenced = |why: &str| Error::fenced_because(lease, why, None).at_doc(op, run, doc);
        if lease.is_expired() {
            return Err(fenced("it expired before the save"));
        }
        if self.watermarks() {
            let options = PutOptions::mode(mode).with_foreign_lease(lease);
            return self.docs.put(run, doc, bytes, options).await;
        }
        // Version only: read the version an overwrite is conditional on,
        // then check the lease, then write; every retry starts over.
        let overwrite = mode == PutMode::Overwrite;
        for _ in 0..3 {
            let mode = match &mode {
                // Metadata only: the bytes are not needed, and on S3
                // (the store without watermarks) a head sends none.
                PutMode::Overwrite => match self.docs.head(run, doc).await? {
                    Some(stat) => PutMode::Update(stat.version),
                    None => PutMode::Create,
                },
                other => other.clone(),
            };
            match self.locks.inspect(lease.key()).await? {
                Some(holder)
                    if holder.fence == lease.fence() && holder.owner.id() == lease.owner().id() => {
                }
                holder => {
                    return Err(Error::fenced(lease, holder).at_doc(op, run, doc));
                }
            }
            match self
                .docs
                .put(run, doc, bytes.clone(), PutOptions::mode(mode))
                .await
            {
                // An overwrite lost a race with another writer: read the
                // new version and check the lease again.
                Err(e)
                    if overwrite
                        && matches!(
                            e.kind(),
                            ErrorKind::Precondition | ErrorKind::AlreadyExists
                        ) =>
                {
                    continue;
                }
                outcome => return outcome,
            }
        }
        Err(Error::new(
            ErrorKind::Precondition,
            "the document kept changing during the save",
        )
        .at_doc(op, run, doc))
    }

    /// Whether `lease`'s grant is over once its release answered
    /// `released`. A release the lock service took ended it. A refused one
    /// (`LeaseLost`: another owner's release, an older copy of a renewed
    /// lease, or a grant that expired) ended it only when no live grant
    /// holds its fence: closing it regardless would fence the live holder
    /// out of the document store while the lock service still shows it
    /// holding. After any other failure the grant may still be live, and
    /// the next grant's claim raises the watermark anyway.
    async fn has_ended(&self, lease: &Lease, released: &Result<()>) -> bool {
        if !self.watermarks() {
            // Nothing to close: not worth a round trip.
            return false;
        }
        match released {
            Ok(()) => true,
            Err(error) if error.kind() == ErrorKind::LeaseLost => {
                match self.locks.inspect(lease.key()).await {
                    Ok(holder) => holder.is_none_or(|holder| holder.fence != lease.fence()),
                    Err(error) => {
                        tracing::debug!(%error, lock = %lease.key(), "inspect after a refused release");
                        false
                    }
                }
            }
            Err(_) => false,
        }
    }

    /// Moves the document store's watermark past a grant that ended, so a
    /// save that comes late under it is refused. Best effort: the grant's
    /// end is the lock service's; a failure here only leaves the watermark
    /// where the next grant's claim will raise it.
    async fn close(&self, key: &LockKey, fence: Fence) {
        if !self.watermarks() {
            return;
        }
        if let Err(error) = self
            .docs
            .claim(
                key,
                Fence(fence.get().saturating_add(1)),
                None,
                GetOptions::new(),
            )
            .await
        {
            tracing::debug!(%error, lock = %key, "closing an ended grant in the document store");
        }
    }
}

/// The file store's backend name (`runstate_file::BACKEND`, not a
/// dependency of every build).
const FILE_BACKEND: &str = "file";

/// The name of a split store of `docs` and `locks` (`file+redis`): made
/// once per combination in the process, since capabilities hold a
/// `&'static str` (one leaked per store opened grew without bound).
fn combined_name(docs: &str, locks: &str) -> &'static str {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let name = format!("{docs}+{locks}");
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let made: &'static str = Box::leak(name.into_boxed_str());
    names.insert(made);
    made
}

impl fmt::Debug for SplitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitStore")
            .field("docs", &self.docs)
            .field("locks", &self.locks)
            .field("document_locks", &self.doc_locks.is_some())
            .finish()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Store for SplitStore {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.docs.get(run, doc, options).await
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        match (options.lease, options.foreign_lease) {
            (None, None) => self.docs.put(run, doc, bytes, options).await,
            (Some(lease), _) | (None, Some(lease)) => {
                lease
                    .key()
                    .check_covers(run, doc)
                    .map_err(|e| e.at_doc(Operation::Put, run, doc))?;
                self.fenced_put(lease, doc, bytes, options.mode, Operation::Put)
                    .await
            }
        }
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        self.docs.delete(run, doc, if_version).await
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.docs.list_docs(run, after, limit).await
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.docs.list_runs(after, limit).await
    }

    /// Deletes the run's documents, then, where the lock service keeps the
    /// run's milestones or status (it declares them), the run there too,
    /// as one store deletes them with its documents (a run created again
    /// must not show the old run's tasks as done). A failure there is
    /// returned: the documents are gone, and a call made again deletes
    /// what is left.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let (deleted, facts) = self.delete_run_parts(run, true).await?;
        facts.map(|()| deleted)
    }

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        self.docs.get_if_changed(run, doc, known, options).await
    }

    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        self.docs.head(run, doc).await
    }

    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        self.docs.get_many(run, docs, options).await
    }

    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        self.docs.put_many(run, puts).await
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        // A split store's watermarks are its document store's; nesting a
        // split store as another's document store is not supported.
        let _ = (fence, doc, options);
        Err(Error::new(
            ErrorKind::Unsupported,
            "a split store cannot be the document store of another split store",
        )
        .with_operation(Operation::Claim)
        .with_lock(key))
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        self.docs.watch(run).await
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        self.events().publish(run, topic, text).await
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        self.events().subscribe(run, replay).await
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        self.run_facts().mark(run, task, at).await
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.run_facts().set_attr(run, name, value).await
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.run_facts().milestones(run).await
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Lock for SplitStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let lease = self.locks.try_acquire(key, owner, ttl).await?;
        self.claim(lease, None, GetOptions::new(), Operation::Acquire)
            .await
            .map(|(lease, _)| lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.locks.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let released = self.locks.release(lease).await;
        if self.has_ended(lease, &released).await {
            self.close(lease.key(), lease.fence()).await;
        }
        released
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        match (self.locks.inspect(key).await?, &self.doc_locks) {
            (Some(holder), _) => Ok(Some(holder)),
            (None, Some(docs)) => docs.inspect(key).await,
            (None, None) => Ok(None),
        }
    }

    /// Breaks the lock service's grant (closing it in the document store)
    /// and, with [`with_document_locks`](SplitStore::with_document_locks),
    /// the document store's own lock of `key` as well; returns the grant
    /// broken, else the document store's.
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let broken = self.locks.break_lock(key, only_fence).await?;
        if let Some(broken) = &broken {
            self.close(key, broken.fence).await;
        }
        let held_there = match &self.doc_locks {
            Some(docs) => docs.break_lock(key, only_fence).await?,
            None => None,
        };
        Ok(broken.or(held_there))
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let mut locks = self.locks.list_locks(run).await?;
        if let Some(docs) = &self.doc_locks {
            locks.extend(docs.list_locks(run).await?);
            locks.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Ok(locks)
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        if let Some(docs) = &self.doc_locks
            && matches!(docs.inspect(key).await, Ok(Some(_)))
        {
            // Held in the document store: the lock service's grant was
            // given back, so its waiter would return at once.
            docs.wait_for_release(key, max).await;
            return;
        }
        self.locks.wait_for_release(key, max).await;
    }

    /// The lock service's grants are this store's: a grant made through
    /// it (and given back through it) is waited for there. A holder in the
    /// document store is not one of them, so it is polled for.
    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.locks.wait_for_local_release(key, owner, max).await
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        key.check_covers(key.run(), doc)
            .map_err(|e| e.with_operation(Operation::AcquireAndLoad))?;
        let lease = self.locks.try_acquire(key, owner, ttl).await?;
        self.claim(lease, Some(doc), options, Operation::AcquireAndLoad)
            .await
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let (saved, released) = self.save_then_release(lease, doc, bytes, mode).await;
        if let Some(Err(release)) = released {
            tracing::debug!(%release, "release after a split save");
        }
        saved
    }
}

impl SplitStore {
    /// [`Store::delete_run`] in two parts: the documents (their count, or
    /// the error that left them), then, with `facts`, the run in the lock
    /// service where it keeps milestones or status (`Unsupported` counts as
    /// done): for a caller with work to do between the two outcomes (the
    /// WEPPcloud store invalidates WEPPcloud's cache of the documents
    /// deleted), or that must not touch the lock service's run (a WEPPcloud
    /// store asked for a run it has no documents of: the run may live in
    /// another of WEPPcloud's roots).
    pub(crate) async fn delete_run_parts(
        &self,
        run: &RunId,
        facts: bool,
    ) -> Result<(u64, Result<()>)> {
        let deleted = self.docs.delete_run(run).await?;
        let kept_there = self.locks.capabilities();
        if !facts || !(kept_there.milestones || kept_there.status) {
            return Ok((deleted, Ok(())));
        }
        let outcome = match self.locks.delete_run(run).await {
            Err(error) if error.kind() != ErrorKind::Unsupported => Err(error),
            _ => Ok(()),
        };
        Ok((deleted, outcome))
    }

    /// [`Lock::save_and_release`], also telling how the release went
    /// (`None`: the save found the lease lost, so nothing was released),
    /// for a caller that must act when the lock service did not take the
    /// lock back (the WEPPcloud store, whose release also deletes
    /// WEPPcloud's cached copy).
    pub(crate) async fn save_then_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> (Result<Version>, Option<Result<()>>) {
        let saved = self
            .fenced_put(lease, doc, bytes, mode, Operation::SaveAndRelease)
            .await;
        let lost = saved.as_ref().is_err_and(Error::is_lease_lost);
        if lost {
            return (saved, None);
        }
        // Both at once: the release in the lock service, the closing of
        // the grant in the document store.
        let (released, ()) = tokio::join!(
            self.locks.release(lease),
            self.close(lease.key(), lease.fence())
        );
        (saved, Some(released))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runstate_core::memory::MemoryStore;

    /// `delete_run` deletes the run's milestones where the lock service
    /// keeps them, also for a run without documents (marked, never saved),
    /// as one store does.
    #[tokio::test]
    async fn delete_run_forgets_milestones_kept_by_the_lock_service() {
        let run = RunId::new("marked").expect("run");
        let split = SplitStore::new(Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()))
            .expect("a split store");
        split
            .mark(&run, "built", SystemTime::now())
            .await
            .expect("mark");
        assert_eq!(split.delete_run(&run).await.expect("delete_run"), 0);
        let left = split.milestones(&run).await.expect("milestones");
        assert!(left.timestamps.is_empty(), "{left:?}");
    }

    /// A split store's name is made once per combination: one was leaked
    /// for every store opened.
    #[test]
    fn a_combination_is_named_once() {
        let docs: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let split = SplitStore::new(Arc::clone(&docs), Arc::new(MemoryStore::new())).expect("one");
        let again = SplitStore::new(docs, Arc::new(MemoryStore::new())).expect("another");
        assert_eq!(split.capabilities().backend, "memory+memory");
        assert!(std::ptr::eq(
            split.capabilities().backend,
            again.capabilities().backend
        ));
    }

    /// A document store without fence watermarks (as S3 is), counting the
    /// reads that carry bytes.
    #[derive(Debug)]
    struct NoWatermarks {
        inner: MemoryStore,
        capabilities: Capabilities,
        gets: std::sync::atomic::AtomicU64,
    }

    #[async_trait]
    impl Store for NoWatermarks {
        fn capabilities(&self) -> &Capabilities {
            &self.capabilities
        }
        async fn get(
            &self,
            run: &RunId,
            doc: &DocName,
            options: GetOptions,
        ) -> Result<Option<StoredDoc>> {
            self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.get(run, doc, options).await
        }
        async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
            self.inner.head(run, doc).await
        }
        async fn put(
            &self,
            run: &RunId,
            doc: &DocName,
            bytes: Bytes,
            options: PutOptions<'_>,
        ) -> Result<Version> {
            self.inner.put(run, doc, bytes, options).await
        }
        async fn delete(
            &self,
            run: &RunId,
            doc: &DocName,
            if_version: Option<&Version>,
        ) -> Result<bool> {
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
            self.inner.delete_run(run).await
        }
    }

    /// A fenced overwrite on a store without watermarks reads the version
    /// it is made conditional on from metadata, not by downloading the
    /// document (a whole object's bytes on S3).
    #[tokio::test]
    async fn a_version_only_overwrite_reads_no_bytes() {
        use runstate_core::StoreExt;
        let inner = MemoryStore::new();
        let capabilities = inner.capabilities().clone().with_foreign_fencing(false);
        let docs = Arc::new(NoWatermarks {
            inner,
            capabilities,
            gets: Default::default(),
        });
        let split = SplitStore::new(Arc::clone(&docs) as _, Arc::new(MemoryStore::new())).unwrap();
        assert_eq!(split.capabilities().fencing, Fencing::VersionOnly);
        let run = RunId::new("r").unwrap();
        let doc = DocName::new("d").unwrap();
        split
            .put_bytes(&run, &doc, Bytes::from(vec![7u8; 4096]))
            .await
            .unwrap();
        let key = LockKey::Doc(run.clone(), doc.clone());
        let lease = split
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .unwrap();
        let before = docs.gets.load(std::sync::atomic::Ordering::Relaxed);
        split
            .put(
                &run,
                &doc,
                Bytes::from_static(b"new"),
                PutOptions::overwrite().with_lease(&lease),
            )
            .await
            .unwrap();
        let gets = docs.gets.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert_eq!(
            gets, 0,
            "the overwrite downloaded the document {gets} time(s)"
        );
        assert_eq!(
            &split.get_bytes(&run, &doc).await.unwrap().unwrap().bytes[..],
            b"new"
        );
    }

    #[test]
    fn capabilities_carry_the_document_stores_modified_times() {
        let docs: Arc<dyn Store> = Arc::new(MemoryStore::new());
        assert!(
            docs.capabilities().modified_times,
            "the memory store records them"
        );
        let split = SplitStore::new(Arc::clone(&docs), Arc::new(MemoryStore::new())).unwrap();
        assert!(
            split.capabilities().modified_times,
            "listings and heads come from the document store, so do their times"
        );
    }
}
