//! [`MemoryStore`]: the whole contract in this process's memory, no server
//! and no files, for tests and for trying runstate out. It passes the
//! conformance suite (all but the cases that need several processes).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Operation, Result};
use crate::events::{
    FEED_CAPACITY, FeedSender, Milestones, Replay, StatusEvent, StatusMessage, Subscription,
    WatchEvent, Watcher, check_label, check_text,
};
use crate::id::{DocName, RunId};
use crate::lease::{Fence, Lease, LockInfo, LockKey, Owner, check_ttl};
use crate::lock::Lock;
use crate::signals::ReleaseSignals;
use crate::store::{
    Capabilities, DocMeta, DocStat, Fetched, GetOptions, ListPage, PutMode, PutOptions, PutRequest,
    Store, StoredDoc, WatchMode,
};
use crate::version::Version;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "memory";

/// Status messages kept per run by default.
pub const DEFAULT_HISTORY: usize = 1000;

/// A store in memory. Cheap to clone; clones share everything. Stores
/// opened by the same name with [`MemoryStore::named`] share their data
/// while any of them lives.
///
/// ```
/// use std::sync::Arc;
/// use runstate_core::memory::MemoryStore;
/// use runstate_core::{Client, Document, RunId};
///
/// #[derive(serde::Serialize, serde::Deserialize, Default)]
/// struct Wepp { runs: u32 }
/// impl Document for Wepp { const NAME: &'static str = "wepp"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> runstate_core::Result<()> {
/// let run = Client::new(Arc::new(MemoryStore::new())).run(RunId::new("Mica_flume1")?);
/// run.update_or_default(|w: &mut Wepp| w.runs += 1).await?;
/// assert_eq!(run.load::<Wepp>().await?.runs, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    name: Option<String>,
    state: Mutex<State>,
    capabilities: Capabilities,
    signals: ReleaseSignals,
    history: usize,
}

/// A document as kept: its bytes and version, and when it was written.
struct Kept {
    doc: StoredDoc,
    modified: SystemTime,
}

impl std::ops::Deref for Kept {
    type Target = StoredDoc;

    fn deref(&self) -> &StoredDoc {
        &self.doc
    }
}

#[derive(Default)]
struct State {
    runs: BTreeMap<RunId, BTreeMap<DocName, Kept>>,
    locks: HashMap<LockKey, LockState>,
    watermarks: HashMap<LockKey, u64>,
    /// Drawn at random for each store, so that two stores never hand out
    /// the same version (a cache shared by two of them would otherwise
    /// take one's copy for the other's current document).
    version_tag: u64,
    next_version: u64,
    watchers: HashMap<RunId, Vec<FeedSender<WatchEvent>>>,
    status: HashMap<RunId, VecDeque<StatusMessage>>,
    next_message: u64,
    subscribers: HashMap<RunId, Vec<FeedSender<StatusEvent>>>,
    milestones: HashMap<RunId, Milestones>,
}

#[derive(Default)]
struct LockState {
    fence: u64,
    held: Option<Held>,
}

#[derive(Clone)]
struct Held {
    owner: Owner,
    since: SystemTime,
    expires: Instant,
}

impl Held {
    fn live(&self) -> bool {
        Instant::now() < self.expires
    }

    fn info(&self, key: &LockKey, fence: u64) -> LockInfo {
        LockInfo {
            key: key.clone(),
            owner: self.owner.clone(),
            fence: Fence(fence),
            since: self.since,
            expires_in: self.expires.saturating_duration_since(Instant::now()),
        }
    }
}

impl LockState {
    fn live(&self) -> Option<&Held> {
        self.held.as_ref().filter(|h| h.live())
    }

    /// The live holder of this lock (`key`) as anyone sees it.
    fn holder(&self, key: &LockKey) -> Option<LockInfo> {
        self.live().map(|held| held.info(key, self.fence))
    }

    fn is_current(&self, lease: &Lease) -> bool {
        self.fence == lease.fence().get()
            && self
                .live()
                .is_some_and(|h| h.owner.id() == lease.owner().id())
    }
}

impl State {
    /// An empty state with a version tag of its own.
    fn fresh() -> State {
        State {
            version_tag: fastrand::u64(..),
            ..State::default()
        }
    }

    fn version(&mut self) -> Version {
        self.next_version += 1;
        Version::new(format!(
            "m{:016x}{:016x}",
            self.version_tag, self.next_version
        ))
    }

    /// Tells the run's watchers, dropping those whose feed is gone.
    fn notify(&mut self, run: &RunId, event: &WatchEvent) {
        if let Some(watchers) = self.watchers.get_mut(run) {
            watchers.retain_mut(|w| w.send(event.clone()));
        }
    }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Error {
    Error::new(kind, message.into()).with_backend(BACKEND)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// The stores made by [`MemoryStore::named`], by name, while one lives.
fn registry() -> MutexGuard<'static, HashMap<String, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Inner>>>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

impl MemoryStore {
    /// A new, empty store of its own.
    pub fn new() -> Self {
        Self::build(None, DEFAULT_HISTORY)
    }

    /// The store named `name` in this process: created empty on first use,
    /// shared by every later call while any handle to it lives (the
    /// `memory://name` URL).
    pub fn named(name: &str) -> Self {
        let mut registry = registry();
        registry.retain(|_, weak| weak.strong_count() > 0);
        if let Some(inner) = registry.get(name).and_then(Weak::upgrade) {
            return MemoryStore { inner };
        }
        let store = Self::build(Some(name.to_owned()), DEFAULT_HISTORY);
        registry.insert(name.to_owned(), Arc::downgrade(&store.inner));
        store
    }

    fn build(name: Option<String>, history: usize) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                name,
                state: Mutex::new(State::fresh()),
                capabilities: Capabilities::full(BACKEND)
                    .with_multi_host(false)
                    .with_foreign_fencing(true)
                    .with_native_conditional_get(true)
                    .with_watch(WatchMode::Native { every_write: true })
                    .with_status(true)
                    .with_milestones(true)
                    .with_modified_times(true),
                signals: ReleaseSignals::new(),
                history: history.max(1),
            }),
        }
    }

    /// The same store keeping at most `history` status messages per run.
    pub fn with_history(self, history: usize) -> Self {
        // Held while a named store is rebuilt, so that a `named` call in
        // between cannot make a second store of that name.
        let mut registry = self.inner.name.is_some().then(registry);
        let mut inner = Inner {
            name: self.inner.name.clone(),
            state: Mutex::new(State::fresh()),
            capabilities: self.inner.capabilities.clone(),
            signals: ReleaseSignals::new(),
            history: history.max(1),
        };
        // Only a fresh store can change its settings; a shared one keeps
        // its data and the history it was made with.
        match Arc::try_unwrap(self.inner) {
            Ok(old) => {
                inner.state = old.state;
                let store = MemoryStore {
                    inner: Arc::new(inner),
                };
                // The rebuilt store is the one its name stands for now (the
                // registry's entry pointed to the one consumed).
                if let (Some(registry), Some(name)) = (registry.as_mut(), &store.inner.name) {
                    registry.insert(name.clone(), Arc::downgrade(&store.inner));
                }
                store
            }
            Err(shared) => MemoryStore { inner: shared },
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change is made whole under the lock; a panic in a caller
        // cannot leave half of one.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check_lease(state: &State, lease: &Lease) -> Result<()> {
        let lock = state.locks.get(lease.key());
        if lock.is_some_and(|l| l.is_current(lease)) {
            return Ok(());
        }
        let holder = lock.and_then(|l| l.holder(lease.key()));
        Err(Error::fenced(lease, holder).with_backend(BACKEND))
    }

    /// Refuses a foreign lease below the watermark (checked before the
    /// write's mode: a stale holder learns it is stale, not that the
    /// document changed).
    fn check_foreign(state: &State, lease: &Lease) -> Result<()> {
        let mark = state.watermarks.get(lease.key()).copied().unwrap_or(0);
        if lease.fence().get() < mark {
            return Err(
                Error::below_watermark(lease.key(), lease.fence(), Some(Fence(mark)))
                    .with_backend(BACKEND),
            );
        }
        Ok(())
    }

    fn check_mode(
        docs: Option<&BTreeMap<DocName, Kept>>,
        doc: &DocName,
        mode: &PutMode,
    ) -> Result<()> {
        let current = docs.and_then(|d| d.get(doc));
        match (mode, current) {
            (PutMode::Overwrite, _) | (PutMode::Create, None) => Ok(()),
            (PutMode::Create, Some(_)) => Err(error(
                ErrorKind::AlreadyExists,
                "the document already exists",
            )),
            (PutMode::Update(_), None) => Err(error(
                ErrorKind::Precondition,
                "the document does not exist",
            )),
            (PutMode::Update(expected), Some(stored)) if stored.version == *expected => Ok(()),
            (PutMode::Update(expected), Some(stored)) => Err(error(
                ErrorKind::Precondition,
                format!(
                    "stored version {} is not the expected {expected}",
                    stored.version
                ),
            )),
        }
    }

    fn too_large(size: usize, limit: u64) -> Error {
        error(
            ErrorKind::TooLarge,
            format!("document is {size} bytes, over the limit of {limit}"),
        )
    }

    fn read(
        state: &State,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        match state.runs.get(run).and_then(|d| d.get(doc)) {
            None => Ok(None),
            Some(stored) => {
                if let Some(limit) = options.limit
                    && stored.bytes.len() as u64 > limit
                {
                    return Err(Self::too_large(stored.bytes.len(), limit));
                }
                Ok(Some(stored.doc.clone()))
            }
        }
    }

    fn write(
        &self,
        state: &mut State,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: &PutOptions<'_>,
    ) -> Result<Version> {
        for lease in options.lease.iter().chain(options.foreign_lease.iter()) {
            lease.key().check_covers(run, doc)?;
        }
        if let Some(lease) = options.lease {
            Self::check_lease(state, lease)?;
        }
        if let Some(lease) = options.foreign_lease {
            Self::check_foreign(state, lease)?;
        }
        Self::check_mode(state.runs.get(run), doc, &options.mode)?;
        if let Some(lease) = options.foreign_lease {
            let mark = state.watermarks.entry(lease.key().clone()).or_default();
            *mark = (*mark).max(lease.fence().get());
        }
        let version = state.version();
        state.runs.entry(run.clone()).or_default().insert(
            doc.clone(),
            Kept {
                doc: StoredDoc::new(bytes, version.clone()),
                modified: SystemTime::now(),
            },
        );
        state.notify(
            run,
            &WatchEvent::Changed {
                doc: doc.clone(),
                version: version.clone(),
            },
        );
        Ok(version)
    }

    fn grant(
        state: &mut State,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease> {
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND).with_lock(key))?;
        let lock = state.locks.entry(key.clone()).or_default();
        let expires = crate::time::saturating_add(issued, ttl);
        if let Some(held) = lock.live() {
            if held.owner.id() != owner.id() {
                return Err(error(ErrorKind::Locked, "the lock is held")
                    .with_operation(Operation::Acquire)
                    .with_lock(key)
                    .with_holder(held.info(key, lock.fence)));
            }
            // The same owner again: its own grant, with the TTL restarted.
            let since = held.since;
            lock.held = Some(Held {
                owner: owner.clone(),
                since,
                expires,
            });
            return Ok(Lease::new(
                key.clone(),
                owner.clone(),
                Fence(lock.fence),
                ttl,
                issued,
                since,
            ));
        }
        let since = SystemTime::now();
        // At least the microseconds since 1970 (as Redis grants them): a
        // store made again, in a process started again, must not grant
        // fences a split store's document store has already seen (its
        // watermarks outlive this store, and a fence below one is refused
        // until the counter catches up; one equal to an old holder's would
        // pass with it).
        let clock = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX));
        lock.fence = lock.fence.saturating_add(1).max(clock);
        lock.held = Some(Held {
            owner: owner.clone(),
            since,
            expires,
        });
        Ok(Lease::new(
            key.clone(),
            owner.clone(),
            Fence(lock.fence),
            ttl,
            issued,
            since,
        ))
    }

    fn lease_lost(lease: &Lease, state: &State, op: Operation) -> Error {
        let holder = state
            .locks
            .get(lease.key())
            .and_then(|lock| lock.holder(lease.key()));
        Error::lease_lost(lease, holder)
            .with_backend(BACKEND)
            .with_operation(op)
    }

    fn release_in(state: &mut State, lease: &Lease) -> Result<()> {
        let current = state
            .locks
            .get(lease.key())
            .is_some_and(|l| l.is_current(lease));
        if !current {
            return Err(Self::lease_lost(lease, state, Operation::Release));
        }
        if let Some(lock) = state.locks.get_mut(lease.key()) {
            lock.held = None;
        }
        Ok(())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

fn page<T: Clone>(items: impl Iterator<Item = T>, limit: usize) -> ListPage<T> {
    let limit = limit.max(1);
    let mut items: Vec<T> = items.take(limit + 1).collect();
    let more = items.len() > limit;
    items.truncate(limit);
    ListPage { items, more }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Store for MemoryStore {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        Self::read(&self.state(), run, doc, options).map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let mut state = self.state();
        self.write(&mut state, run, doc, bytes, &options)
            .map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let mut state = self.state();
        let Some(docs) = state.runs.get_mut(run) else {
            return Ok(false);
        };
        match (docs.get(doc), if_version) {
            (None, _) => return Ok(false),
            (Some(stored), Some(expected)) if stored.version != *expected => {
                return Err(error(
                    ErrorKind::Precondition,
                    "the stored version is not the expected one; nothing was deleted",
                )
                .at_doc(Operation::Delete, run, doc));
            }
            _ => {}
        }
        docs.remove(doc);
        if docs.is_empty() {
            state.runs.remove(run);
        }
        state.notify(run, &WatchEvent::Deleted { doc: doc.clone() });
        Ok(true)
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let state = self.state();
        let Some(docs) = state.runs.get(run) else {
            return Ok(ListPage {
                items: Vec::new(),
                more: false,
            });
        };
        let range = match after {
            Some(after) => docs.range::<DocName, _>((
                std::ops::Bound::Excluded(after),
                std::ops::Bound::Unbounded,
            )),
            None => docs.range::<DocName, _>(..),
        };
        Ok(page(
            range.map(|(name, stored)| {
                DocMeta::new(
                    name.clone(),
                    stored.version.clone(),
                    stored.bytes.len() as u64,
                    Some(stored.modified),
                )
            }),
            limit,
        ))
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let state = self.state();
        let range = match after {
            Some(after) => state
                .runs
                .range::<RunId, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => state.runs.range::<RunId, _>(..),
        };
        Ok(page(range.map(|(run, _)| run.clone()), limit))
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let mut state = self.state();
        let Some(docs) = state.runs.remove(run) else {
            state.milestones.remove(run);
            return Ok(0);
        };
        for doc in docs.keys() {
            state.notify(run, &WatchEvent::Deleted { doc: doc.clone() });
        }
        state.milestones.remove(run);
        Ok(docs.len() as u64)
    }

    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let state = self.state();
        Ok(state.runs.get(run).and_then(|d| d.get(doc)).map(|stored| {
            DocStat::new(
                stored.version.clone(),
                stored.bytes.len() as u64,
                Some(stored.modified),
            )
        }))
    }

    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let state = self.state();
        Ok(docs
            .iter()
            .map(|doc| {
                Self::read(&state, run, doc, options)
                    .map_err(|e| e.at_doc(Operation::Get, run, doc))
            })
            .collect())
    }

    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        let mut state = self.state();
        Ok(puts
            .into_iter()
            .map(|put| {
                self.write(
                    &mut state,
                    run,
                    &put.doc,
                    put.bytes,
                    &PutOptions::mode(put.mode),
                )
                .map_err(|e| e.at_doc(Operation::Put, run, &put.doc))
            })
            .collect())
    }

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let state = self.state();
        match state.runs.get(run).and_then(|d| d.get(doc)) {
            None => Ok(Fetched::Absent),
            Some(stored) if stored.version == *known => Ok(Fetched::Unchanged),
            Some(_) => Self::read(&state, run, doc, options)
                .map(|s| s.map_or(Fetched::Absent, Fetched::Changed))
                .map_err(|e| e.at_doc(Operation::GetIfChanged, run, doc)),
        }
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        if let Some(doc) = doc {
            key.check_covers(key.run(), doc)
                .map_err(|e| e.with_backend(BACKEND).with_operation(Operation::Claim))?;
        }
        let mut state = self.state();
        let mark = state.watermarks.entry(key.clone()).or_default();
        if fence.get() < *mark {
            return Err(Error::below_watermark(key, fence, Some(Fence(*mark)))
                .with_backend(BACKEND)
                .with_operation(Operation::Claim));
        }
        *mark = fence.get();
        match doc {
            None => Ok(None),
            Some(doc) => {
                key.check_covers(key.run(), doc)?;
                Self::read(&state, key.run(), doc, options)
                    .map_err(|e| e.at_doc(Operation::Claim, key.run(), doc))
            }
        }
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        let (sender, feed) = Watcher::channel(FEED_CAPACITY);
        self.state()
            .watchers
            .entry(run.clone())
            .or_default()
            .push(sender);
        Ok(feed)
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        check_label("topic", topic).map_err(|e| e.with_backend(BACKEND).with_run(run))?;
        check_text("status message", text).map_err(|e| e.with_backend(BACKEND).with_run(run))?;
        let mut state = self.state();
        state.next_message += 1;
        let message = StatusMessage::new(
            format!("{:016x}", state.next_message),
            topic,
            text,
            SystemTime::now(),
        );
        let history = state.status.entry(run.clone()).or_default();
        history.push_back(message.clone());
        while history.len() > self.inner.history {
            history.pop_front();
        }
        if let Some(subscribers) = state.subscribers.get_mut(run) {
            subscribers.retain_mut(|s| s.send(StatusEvent::Message(message.clone())));
        }
        Ok(())
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        let mut state = self.state();
        let history: Vec<StatusMessage> = state
            .status
            .get(run)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        let skip = match replay {
            Replay::None => history.len(),
            Replay::Last(n) => history.len().saturating_sub(n),
            _ => 0,
        };
        // Room for the whole replay and a buffer's worth after it: a
        // history longer than the buffer (`with_history`) lost its newest
        // messages.
        let (mut sender, feed) =
            Subscription::channel(FEED_CAPACITY.saturating_add(history.len() - skip));
        for message in history.into_iter().skip(skip) {
            sender.send(StatusEvent::Message(message));
        }
        state
            .subscribers
            .entry(run.clone())
            .or_default()
            .push(sender);
        Ok(feed)
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        self.state()
            .milestones
            .entry(run.clone())
            .or_default()
            .timestamps
            .insert(task.to_owned(), at);
        Ok(())
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::SetAttr, run);
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        self.state()
            .milestones
            .entry(run.clone())
            .or_default()
            .attrs
            .insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        Ok(self
            .state()
            .milestones
            .get(run)
            .cloned()
            .unwrap_or_default())
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Lock for MemoryStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let lease = Self::grant(&mut self.state(), key, owner, ttl, issued)
            .map_err(|e| e.with_operation(Operation::Acquire))?;
        self.inner.signals.granted(&lease);
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_ttl(ttl).map_err(|e| {
            e.with_backend(BACKEND)
                .with_operation(Operation::Renew)
                .with_lock(lease.key())
        })?;
        let issued = Instant::now();
        let mut state = self.state();
        let current = state
            .locks
            .get(lease.key())
            .is_some_and(|l| l.is_current(lease));
        if !current {
            return Err(Self::lease_lost(lease, &state, Operation::Renew));
        }
        if let Some(held) = state
            .locks
            .get_mut(lease.key())
            .and_then(|l| l.held.as_mut())
        {
            held.expires = crate::time::saturating_add(issued, ttl);
        }
        drop(state);
        let renewed = lease.renewed(ttl, issued);
        self.inner.signals.granted(&renewed);
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let outcome = Self::release_in(&mut self.state(), lease);
        self.inner.signals.released(lease.key(), lease.fence());
        outcome
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let state = self.state();
        Ok(state.locks.get(key).and_then(|l| l.holder(key)))
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let broken = {
            let mut state = self.state();
            let Some(lock) = state.locks.get_mut(key) else {
                return Ok(None);
            };
            let Some(held) = lock.live().cloned() else {
                return Ok(None);
            };
            if only_fence.is_some_and(|f| f.get() != lock.fence) {
                return Ok(None);
            }
            lock.held = None;
            held.info(key, lock.fence)
        };
        tracing::warn!(lock = %key, holder = %broken.owner, fence = %broken.fence, "lease broken");
        self.inner.signals.released(key, broken.fence);
        Ok(Some(broken))
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let state = self.state();
        let mut locks: Vec<LockInfo> = state
            .locks
            .iter()
            .filter(|(key, _)| run.is_none_or(|r| key.run() == r))
            .filter_map(|(key, lock)| lock.holder(key))
            .collect();
        locks.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(locks)
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.inner.signals.wait(key, max).await;
    }

    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.inner.signals.wait_while_held(key, owner, max).await
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
        let issued = Instant::now();
        let mut state = self.state();
        // Check the size before granting, so a refusal leaves no lock.
        let stored = Self::read(&state, key.run(), doc, options)
            .map_err(|e| e.at_doc(op, key.run(), doc))?;
        let lease =
            Self::grant(&mut state, key, owner, ttl, issued).map_err(|e| e.with_operation(op))?;
        drop(state);
        self.inner.signals.granted(&lease);
        Ok((lease, stored))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run().clone();
        let saved = {
            let mut state = self.state();
            let options = PutOptions::mode(mode).with_lease(lease);
            let saved = self
                .write(&mut state, &run, doc, bytes, &options)
                .map_err(|e| e.at_doc(Operation::SaveAndRelease, &run, doc));
            let lost = saved.as_ref().is_err_and(Error::is_lease_lost);
            if !lost {
                let _ = Self::release_in(&mut state, lease);
            }
            saved
        };
        self.inner.signals.released(lease.key(), lease.fence());
        saved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stores never hand out the same version: a cache shared by both
    /// (a Redis cache named by two `memory://` URLs) took one store's copy
    /// for the other's current document when both counted from 1.
    #[tokio::test]
    async fn two_stores_never_hand_out_the_same_version() {
        let run = RunId::new("r").expect("run");
        let doc = DocName::new("d").expect("doc");
        let (a, b) = (MemoryStore::new(), MemoryStore::new().with_history(10));
        let put = PutOptions::overwrite;
        let va = a.put(&run, &doc, Bytes::from_static(b"A"), put()).await;
        let vb = b.put(&run, &doc, Bytes::from_static(b"B"), put()).await;
        assert_ne!(va.expect("put A"), vb.expect("put B"));
    }

    /// A named store given its history size is still the store its name
    /// stands for: `memory://x?…` with a history size used to make a
    /// store nobody else opening `x` shared.
    #[tokio::test]
    async fn a_named_store_with_a_history_is_still_shared() {
        let name = format!("shared-{:x}", fastrand::u64(..));
        let a = MemoryStore::named(&name).with_history(5);
        let b = MemoryStore::named(&name);
        let run = RunId::new("r").expect("run");
        let doc = DocName::new("d").expect("doc");
        a.put(
            &run,
            &doc,
            Bytes::from_static(b"A"),
            PutOptions::overwrite(),
        )
        .await
        .expect("put");
        assert!(
            b.get(&run, &doc, GetOptions::default())
                .await
                .expect("get")
                .is_some(),
            "b sees a"
        );
    }

    /// A store made again (a process started again) grants fences above
    /// every one the store before it granted: they start from the clock.
    #[tokio::test]
    async fn fences_of_a_new_store_start_above_the_old_ones() {
        let key = LockKey::Run(RunId::new("r").expect("run"));
        let owner = Owner::for_this_process();
        let ttl = Duration::from_secs(30);
        let old = MemoryStore::new();
        let first = old.try_acquire(&key, &owner, ttl).await.expect("acquire");
        old.release(&first).await.expect("release");
        let second = old.try_acquire(&key, &owner, ttl).await.expect("acquire");
        assert!(second.fence() > first.fence());
        // The clock past the old store's last grant, however fine its tick.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let again = MemoryStore::new()
            .try_acquire(&key, &owner, ttl)
            .await
            .expect("acquire");
        assert!(again.fence() > second.fence(), "{again:?} after {second:?}");
    }

    /// A replay longer than a feed's buffer (a history set past 1,024) is
    /// delivered whole: it was pushed into the buffer at once, and its
    /// newest messages were dropped for a `Resync`.
    #[tokio::test]
    async fn a_history_longer_than_the_buffer_is_replayed_whole() {
        let store = MemoryStore::new().with_history(1500);
        let run = RunId::new("r").expect("run");
        for i in 0..1200 {
            store
                .publish(&run, "wepp", &format!("m{i}"))
                .await
                .expect("publish");
        }
        let mut feed = store.subscribe(&run, Replay::All).await.expect("subscribe");
        for i in 0..1200 {
            match feed.next().await {
                Some(Ok(StatusEvent::Message(m))) => assert_eq!(m.text, format!("m{i}")),
                other => panic!("message {i}: {other:?}"),
            }
        }
    }
}
