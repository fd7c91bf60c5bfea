//! Beside a running WEPPcloud: [`WeppcloudStore`], a split store whose
//! documents are WEPPcloud's run folders (the file backend) and whose
//! leases are WEPPcloud's own NoDb locks in its Redis
//! ([`WeppcloudService`]).
//!
//! ```text
//! file:///wc1/runs/ab?ext=nodb&state_dir=/var/lib/runstate/ab&locks=redis%3A%2F%2Fwepp-redis%3A6379%2F0%3Fweppcloud%3Dtrue
//! ```
//!
//! What it adds to the generic [`SplitStore`] (see also the WEPPcloud
//! sections of the file and Redis backends):
//!
//! - **Every write keeps WEPPcloud's cache coherent.** A save or delete of
//!   a controller deletes WEPPcloud's cached copy (Redis database 13, key
//!   `<weppcloud_root>/<run>/<name>.nodb`) right after the file changed,
//!   while the writer still holds the lock; a locked update's release
//!   deletes it again, in the same script that gives the lock back, so the
//!   next worker to take the lock reads the file. If the deletion fails
//!   after the file was written, the write still succeeded: the error is
//!   logged (WEPPcloud ignores a cached copy whose `(mtime, size)` differs
//!   from the file's, and the file store moves every rewrite's modification
//!   time forward). The same check is what guards against WEPPcloud's own
//!   race: a reader that loaded the file before the save and fills the
//!   cache after the release puts the older copy back; WEPPcloud versions
//!   that take a cached copy without comparing its signature would hand it
//!   out, to their own workers' saves as much as to runstate's.
//! - **Saves under a controller's lease check it first**, as WEPPcloud
//!   checks its own before every dump: the lock key must still hold the
//!   lease's token, or the save fails with `Fenced`, nothing written
//!   (an operator's `clear_locks`, or the key's expiry, may end a lease
//!   before its holder's local deadline, and a worker may hold the lock
//!   since). The file store's fences cannot see WEPPcloud's grants, so
//!   this check is what keeps a runstate holder that lost its lock to a
//!   worker from writing. A worker that takes the lock between it and the
//!   rename (after an operator's `clear_locks`, or the key's expiry) and
//!   dumps first makes the save fail: every write of a controller is
//!   conditional on its version, an overwrite on the version read before
//!   the checks, so the save is `Fenced`, nothing written. A locked update
//!   costs one Redis round trip more for the check (three, with the
//!   acquire and the release).
//! - **Writes without the controller's lease check WEPPcloud first.** A
//!   save or delete made without a lease on that document (an unlocked
//!   put, a save under the run lease) is refused with `Locked`,
//!   WEPPcloud's worker as the holder, while a WEPPcloud worker holds the
//!   controller's NoDb lock or WEPPcloud is replacing the run. (A runstate
//!   holder's lease does not count: its saves are fenced and
//!   version-checked.) The check is made just before the write, and the
//!   write (or delete) is conditional on the controller's version read
//!   before the check (an overwrite included): a worker that takes the lock after the
//!   check and dumps before the rename (the staged file's `fsync` lies
//!   between) makes the write fail and be checked again, so while it holds
//!   the lock the write is refused with `Locked`; a save-and-release under
//!   the run lease, whose lease is then given back, fails with `Locked`
//!   (worth trying again). A dump after the version was checked (while
//!   the old file is hashed or a time synced) is caught right before the
//!   rename: the entry is no longer the file checked (its inode), and the
//!   write is refused and checked again. What remains is a dump between
//!   that look and the rename, two system calls apart. After three tries
//!   that each found the controller changed, the write fails with a
//!   retryable `Precondition`. Locked updates have no such window: their
//!   lease is WEPPcloud's lock.
//!   Nor has `delete_run`: it takes WEPPcloud's lock of every controller
//!   it lists for the deletion (refused with `Locked` while anyone holds
//!   one), so no worker starts on one of them while the run is deleted. A
//!   controller created after the listing is deleted without its lock
//!   (WEPPcloud creates a run's controllers when it builds the run).
//! - **Runs WEPPcloud names otherwise are refused.** WEPPcloud locks a
//!   batch run under `batch;;<batch>;;<run>` and a child run
//!   (`<parent>/_pups/…`) under its parent's id with a `_pups/…` path, so
//!   runstate's keys for them would not be WEPPcloud's: a store whose root
//!   lies inside a `_pups` folder or is a batch's or culvert set's `runs`
//!   folder cannot be opened in this mode, and a controller that says it
//!   belongs to a run group (`_run_group`) or to a parent run
//!   (`_parent_wd`), at its top or under jsonpickle's `py/state` (where
//!   current WEPPcloud versions keep their fields), is neither loaded under
//!   a lease, locked, written nor deleted (`Unsupported`): both the stored
//!   controller and the bytes a write brings are checked, so every write
//!   and delete reads the controller first (its version makes the write
//!   conditional, see above), and `delete_run` reads all of them.
//!
//! Everything else is the split store's: fences are checked against the
//! file store's watermarks, WEPPcloud's legacy lock files are held locks
//! (the file store reports them; the split store lists and breaks them),
//! status messages and milestones go to WEPPcloud's channels and run hash
//! through the lock service.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, LeaseKeeper, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode,
    PutOptions, PutRequest, Replay, Result, RunId, Store, StoreExt, StoredDoc, Subscription,
    Version, Watcher, async_trait,
};
use runstate_redis::WeppcloudService;

use crate::split::SplitStore;

/// The TTL of the controllers' locks [`WeppcloudStore::delete_run`] holds
/// (renewed every third of it while the deletion runs).
const DELETE_RUN_TTL: Duration = Duration::from_secs(30);

/// How many times an overwrite of a controller is tried, each made
/// conditional on the version read before WEPPcloud's checks (see
/// [`WeppcloudStore::pinned`]).
const PINNED_TRIES: usize = 3;

/// A split store of WEPPcloud run folders and WEPPcloud's NoDb locks (see
/// the [module documentation](self)).
#[derive(Clone)]
pub struct WeppcloudStore {
    split: SplitStore,
    service: WeppcloudService,
    /// The controllers found plain (no run group's, no child run's), by
    /// version: a controller is read for that check once per version, not
    /// on every write, delete or lock.
    plain: Arc<std::sync::Mutex<HashMap<(RunId, DocName), Version>>>,
}

/// Controllers remembered plain at most; the memo starts over past it.
const PLAIN_MEMO: usize = 10_000;

/// What [`WeppcloudStore::check_stored`] found stored.
enum Stored {
    Absent,
    /// Present, at this version, and plain.
    At(Version),
    /// Present, but too large to read: neither checked nor pinned.
    Unread,
}

impl WeppcloudStore {
    /// Wraps `split`, whose lock service is `service`.
    pub fn new(split: SplitStore, service: WeppcloudService) -> WeppcloudStore {
        WeppcloudStore {
            split,
            service,
            plain: Arc::default(),
        }
    }

    /// Remembers `doc` of `run` plain at `version` (its bytes checked).
    fn remember_plain(&self, run: &RunId, doc: &DocName, version: Version) {
        let mut plain = self.plain.lock().unwrap_or_else(|p| p.into_inner());
        if plain.len() >= PLAIN_MEMO {
            plain.clear();
        }
        plain.insert((run.clone(), doc.clone()), version);
    }

    fn known_plain(&self, run: &RunId, doc: &DocName, version: &Version) -> bool {
        self.plain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(run.clone(), doc.clone()))
            .is_some_and(|known| known == version)
    }

    /// The split store underneath.
    pub fn split(&self) -> &SplitStore {
        &self.split
    }

    /// The WEPPcloud lock service.
    pub fn service(&self) -> &WeppcloudService {
        &self.service
    }

    /// Deletes WEPPcloud's cached copies of `docs` after they changed; a
    /// failure is logged, not returned (the write it follows succeeded).
    async fn invalidate(&self, run: &RunId, docs: &[DocName]) {
        if let Err(error) = self.service.invalidate(run, docs).await {
            tracing::error!(
                %error,
                %run,
                docs = ?docs,
                "WEPPcloud's cached copies could not be deleted after a write; workers with \
                 (mtime, size) checks still ignore them"
            );
        }
    }

    /// `mode`, with an overwrite made conditional on the controller's
    /// version read now, before WEPPcloud's checks: nothing stops a worker
    /// from taking the controller's lock after the check and dumping
    /// before runstate's rename (the staged file's `fsync` lies between,
    /// tens of milliseconds on a network file system), and an overwrite
    /// would replace that dump while the worker holds its lock. Made
    /// conditional, the write is refused instead, and checked again.
    /// Also refuses a controller whose stored bytes belong to a run group
    /// or child run ([`WeppcloudStore::check_stored`]).
    async fn pinned(
        &self,
        run: &RunId,
        doc: &DocName,
        mode: &PutMode,
        op: Operation,
    ) -> Result<PutMode> {
        let stored = self.check_stored(run, doc, op).await?;
        Ok(match (mode, stored) {
            (PutMode::Overwrite, Stored::Absent) => PutMode::Create,
            (PutMode::Overwrite, Stored::At(version)) => PutMode::Update(version),
            (other, _) => other.clone(),
        })
    }

    /// Refuses `doc` when the controller stored says it belongs to a run
    /// group or a child run ([`check_controller`]): WEPPcloud locks it
    /// under another key than the one runstate would check or take, and
    /// the bytes a write brings need not say so (deletes and acquires
    /// bring none). Returns what is stored. Its version comes from its
    /// metadata (`head`); its bytes are read only for a version not known
    /// plain already (a worker's dump, say: runstate's own writes are
    /// remembered). A controller too large to read is neither checked nor
    /// pinned (`Stored::Unread`).
    async fn check_stored(&self, run: &RunId, doc: &DocName, op: Operation) -> Result<Stored> {
        let Some(stat) = self.split.head(run, doc).await? else {
            return Ok(Stored::Absent);
        };
        if self.known_plain(run, doc, &stat.version) {
            return Ok(Stored::At(stat.version));
        }
        match self.split.get(run, doc, GetOptions::new()).await {
            Ok(Some(stored)) => {
                check_controller(run, doc, &stored.bytes, op)?;
                self.remember_plain(run, doc, stored.version.clone());
                Ok(Stored::At(stored.version))
            }
            Ok(None) => Ok(Stored::Absent),
            Err(error) if error.kind() == ErrorKind::TooLarge => Ok(Stored::Unread),
            Err(error) => Err(error),
        }
    }

    /// Refuses a write of `doc` not covered by a lease on that document
    /// while WEPPcloud holds it.
    async fn check_foreign(
        &self,
        run: &RunId,
        doc: &DocName,
        lease: Option<&Lease>,
        op: Operation,
    ) -> Result<()> {
        if lease.is_some_and(|l| matches!(l.key(), LockKey::Doc(..))) {
            // The lease is WEPPcloud's lock of this controller.
            return Ok(());
        }
        self.service
            .check_not_held_by_weppcloud(run, doc, op)
            .await
            .map_err(|e| e.at_doc(op, run, doc))
    }
}

/// Refuses a root WEPPcloud would name its runs under other ids: a folder
/// inside `_pups` (child runs), or the `runs` folder of a batch or culvert
/// set (`…/batch/<name>/runs`, `…/culverts/<name>/runs`).
///
/// # Errors
/// [`ErrorKind::Config`], naming the folder.
pub fn check_root(root: &Path) -> Result<()> {
    let parts: Vec<&str> = root
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    let refuse = |why: &str| {
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "{} holds {why}, which WEPPcloud locks under ids runstate cannot express \
                 (`batch;;<batch>;;<run>`, or the parent's id with a `_pups/…` path): open the \
                 parent run's root instead, or leave these runs to WEPPcloud",
                root.display()
            ),
        )
        .with_operation(Operation::Open))
    };
    if parts.contains(&"_pups") {
        return refuse("child runs (a `_pups` folder)");
    }
    if let [.., set, _, "runs"] = parts.as_slice()
        && matches!(*set, "batch" | "culverts")
    {
        return refuse("the runs of a batch or culvert set");
    }
    Ok(())
}

/// Refuses a controller that belongs to a run group or a parent run (its
/// lock key would not be `nodb-lock:<run>:<name>.nodb`).
fn check_controller(run: &RunId, doc: &DocName, bytes: &[u8], op: Operation) -> Result<()> {
    // Cheap first: only a controller naming one of the fields is parsed.
    let names = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if !names(b"\"_run_group\"") && !names(b"\"_parent_wd\"") {
        return Ok(());
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(bytes) else {
        return Ok(());
    };
    // WEPPcloud's controllers since its `__getstate__` (2025) keep their
    // fields under jsonpickle's `py/state`; older ones at the top.
    let state = fields
        .get("py/state")
        .and_then(serde_json::Value::as_object);
    let set = |name: &str| {
        let set = |v: &serde_json::Value| !v.is_null();
        fields.get(name).is_some_and(set)
            || state.and_then(|state| state.get(name)).is_some_and(set)
    };
    let why = if set("_run_group") {
        "belongs to a run group (WEPPcloud locks it as `<group>;;<name>;;<run>`)"
    } else if set("_parent_wd") {
        "is a child run's (WEPPcloud locks it under its parent's id, with a `_pups/…` path)"
    } else {
        return Ok(());
    };
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "controller {run}/{doc} {why}: runstate cannot take WEPPcloud's lock of it, so it is \
             left to WEPPcloud"
        ),
    )
    .at_doc(op, run, doc))
}

/// The error of a write or delete of a controller that found it changed
/// at each of its [`PINNED_TRIES`] tries: retryable.
fn kept_changing(doing: &str, done: &str) -> Error {
    Error::new(
        ErrorKind::Precondition,
        format!("the controller kept changing during the {doing}; nothing was {done}"),
    )
    .set_retryable(true)
}

/// A save's lease found no longer WEPPcloud's grant of the lock: to the
/// saver that is `Fenced` (the contract's word for a save under a lease
/// that is not the lock's current grant, nothing written), whatever the
/// lock service calls it; the holder and the service's message are kept.
fn fenced_if_lost(error: Error, op: Operation, run: &RunId, doc: &DocName) -> Error {
    if error.kind() != ErrorKind::LeaseLost {
        return error.at_doc(op, run, doc);
    }
    let message = format!("{}; nothing was written", error.message());
    restated(error, ErrorKind::Fenced, message).at_doc(op, run, doc)
}

/// `error` told again as `kind` with `message`, keeping its backend, lock
/// and holder, and with `error` as its source. Its operation, run and
/// document are left for the caller to name (an error keeps the first
/// operation it is given).
fn restated(error: Error, kind: ErrorKind, message: String) -> Error {
    let mut out = Error::new(kind, message);
    if let Some(backend) = error.backend() {
        out = out.with_backend(backend);
    }
    if let Some(lock) = error.lock() {
        out = out.with_lock(lock);
    }
    if let Some(holder) = error.holder() {
        out = out.with_holder(holder.clone());
    }
    out.with_source(error)
}

impl fmt::Debug for WeppcloudStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeppcloudStore")
            .field("split", &self.split)
            .finish()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Store for WeppcloudStore {
    fn capabilities(&self) -> &Capabilities {
        self.split.capabilities()
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.split.get(run, doc, options).await
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let op = Operation::Put;
        check_controller(run, doc, &bytes, op)?;
        let lease = options.lease.or(options.foreign_lease);
        let overwrite = options.mode == PutMode::Overwrite;
        for _ in 0..PINNED_TRIES {
            let mut attempt = options.clone();
            attempt.mode = self.pinned(run, doc, &options.mode, op).await?;
            self.check_foreign(run, doc, lease, op).await?;
            if let Some(lease) = lease {
                self.service
                    .check_held(lease, op)
                    .await
                    .map_err(|e| fenced_if_lost(e, op, run, doc))?;
            }
            match self.split.put(run, doc, bytes.clone(), attempt).await {
                // Written by someone else since its version was read (a
                // worker that took the lock after the check): checked
                // again, so a worker still holding it refuses the write.
                Err(error)
                    if overwrite
                        && matches!(
                            error.kind(),
                            ErrorKind::Precondition | ErrorKind::AlreadyExists
                        ) =>
                {
                    tracing::debug!(%error, %run, %doc, "a controller changed during an overwrite");
                }
                Err(error) => return Err(error),
                Ok(saved) => {
                    // Its bytes passed `check_controller` above.
                    self.remember_plain(run, doc, saved.clone());
                    self.invalidate(run, std::slice::from_ref(doc)).await;
                    return Ok(saved);
                }
            }
        }
        Err(kept_changing("save", "written").at_doc(op, run, doc))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let op = Operation::Delete;
        for _ in 0..PINNED_TRIES {
            // Conditional on the version read before the check, as a write
            // (see `pinned`): a worker that dumps in between keeps its dump.
            let stored = match self.check_stored(run, doc, op).await? {
                Stored::At(version) => Some(version),
                Stored::Absent | Stored::Unread => None,
            };
            self.check_foreign(run, doc, None, op).await?;
            let pinned = if_version.or(stored.as_ref());
            match self.split.delete(run, doc, pinned).await {
                Err(error) if if_version.is_none() && error.kind() == ErrorKind::Precondition => {
                    tracing::debug!(%error, %run, %doc, "a controller changed during a delete");
                }
                Err(error) => return Err(error),
                Ok(deleted) => {
                    self.invalidate(run, std::slice::from_ref(doc)).await;
                    return Ok(deleted);
                }
            }
        }
        Err(kept_changing("delete", "deleted").at_doc(op, run, doc))
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.split.list_docs(run, after, limit).await
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.split.list_runs(after, limit).await
    }

    /// Refused with `Locked` while WEPPcloud (or another holder) holds any
    /// controller of the run: nothing is deleted. Otherwise WEPPcloud's
    /// lock of every controller is taken and kept alive for the deletion,
    /// so no worker can take one and write into the run while it goes
    /// (checking WEPPcloud's locks first and deleting after left a worker
    /// that locked a controller in between working in a run being
    /// deleted); the locks are given back after, and every cached copy is
    /// deleted. Each controller's lock then has a fence counter in
    /// WEPPcloud's Redis, as after any lease of it.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let op = Operation::DeleteRun;
        let docs: Vec<DocName> = self
            .split
            .list_all_docs(run)
            .await?
            .into_iter()
            .map(|meta| meta.name)
            .collect();
        // First without taking anything: the usual refusal (a worker on a
        // controller) disturbs no other controller. A run group's or child
        // run's controllers are WEPPcloud's to delete (their locks are not
        // the ones taken below).
        for doc in &docs {
            self.check_stored(run, doc, op).await?;
            self.check_foreign(run, doc, None, op).await?;
        }
        // A refusal from here names the deletion, not the lock call.
        let refused = |error: Error, doc: &DocName| {
            let retryable = error.is_retryable();
            let (kind, message) = match error.kind() {
                ErrorKind::LeaseLost => (
                    ErrorKind::Locked,
                    format!(
                        "a controller's lock taken for the deletion was lost: {}; nothing \
                         was deleted",
                        error.message()
                    ),
                ),
                kind => (kind, format!("{}; nothing was deleted", error.message())),
            };
            restated(error, kind, message)
                .set_retryable(retryable)
                .at_doc(op, run, doc)
        };
        // A fresh owner: a lease this process holds on a controller is
        // not handed back to this deletion (and released by it).
        let owner = Owner::for_this_process();
        let lock: Arc<dyn Lock> = Arc::new(self.clone());
        let mut keepers = Vec::with_capacity(docs.len());
        let outcome = async {
            for doc in &docs {
                let key = LockKey::Doc(run.clone(), doc.clone());
                let lease = self
                    .split
                    .try_acquire(&key, &owner, DELETE_RUN_TTL)
                    .await
                    .map_err(|e| refused(e, doc))?;
                keepers.push((
                    doc,
                    LeaseKeeper::start(Arc::clone(&lock), lease, DELETE_RUN_TTL),
                ));
            }
            for (doc, keeper) in &keepers {
                keeper.check().map_err(|e| refused(e, doc))?;
            }
            // WEPPcloud's run hash and runstate's status stream only for
            // a run with documents here: a run this root has none of may
            // live in another of WEPPcloud's roots.
            let (deleted, facts) = self.split.delete_run_parts(run, !docs.is_empty()).await?;
            self.invalidate(run, &docs).await;
            facts.map(|()| deleted)
        }
        .await;
        for (_, keeper) in keepers {
            // Given back even when the keeper counts it lost (its local
            // deadline passed): a release only deletes the lock while it
            // still holds this lease's token.
            let lease = keeper.lease();
            let _ = keeper.stop().await;
            if let Err(error) = self.split.release(&lease).await {
                tracing::warn!(
                    %error,
                    %run,
                    "a controller's lock taken to delete the run was not given back; it \
                     expires within {}s unless renewed",
                    DELETE_RUN_TTL.as_secs()
                );
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
        self.split.get_if_changed(run, doc, known, options).await
    }

    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        self.split.head(run, doc).await
    }

    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        self.split.get_many(run, docs, options).await
    }

    /// One write after the other, each checked and followed by its cache
    /// deletion as [`put`](Store::put).
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

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.split.claim(key, fence, doc, options).await
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        self.split.watch(run).await
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        self.split.publish(run, topic, text).await
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        self.split.subscribe(run, replay).await
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        self.split.mark(run, task, at).await
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.split.set_attr(run, name, value).await
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.split.milestones(run).await
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl Lock for WeppcloudStore {
    /// As the split store's; a controller's lock is refused for a run
    /// group's or child run's controller (WEPPcloud's lock of it has
    /// another key).
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        if let LockKey::Doc(run, doc) = key {
            self.check_stored(run, doc, Operation::Acquire)
                .await
                .map_err(|e| e.with_lock(key))?;
        }
        self.split.try_acquire(key, owner, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.split.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.split.release(lease).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.split.inspect(key).await
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        self.split.break_lock(key, only_fence).await
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        self.split.list_locks(run).await
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.split.wait_for_release(key, max).await;
    }

    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.split.wait_for_local_release(key, owner, max).await
    }

    /// As the split store's, refusing (and giving back the grant for) a
    /// controller of a run group or a child run.
    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let (lease, stored) = self
            .split
            .acquire_and_load(key, doc, owner, ttl, options)
            .await?;
        if let Some(stored) = &stored
            && let Err(error) =
                check_controller(key.run(), doc, &stored.bytes, Operation::AcquireAndLoad)
        {
            if let Err(release) = self.split.release(&lease).await {
                tracing::debug!(%release, "release after refusing a controller");
            }
            return Err(error.with_lock(key));
        }
        Ok((lease, stored))
    }

    /// The split store's save-and-release: the fenced save, then the
    /// release, whose script deletes WEPPcloud's cached copy before the
    /// lock key (when the release fails, the copy is deleted on its own
    /// after the save). A save under a run lease is checked against
    /// WEPPcloud's lock of the controller first, and its cached copy
    /// deleted after.
    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let op = Operation::SaveAndRelease;
        let run = lease.key().run();
        if mode == PutMode::Overwrite {
            // Made as `put` makes it under the lease (conditional on the
            // version read before the checks, and tried again while the
            // controller changes), then the lease given back, unless the
            // save found it lost (it is not ours any more).
            let saved = self
                .put(run, doc, bytes, PutOptions::overwrite().with_lease(lease))
                .await
                .map_err(|e| e.with_operation(op));
            if !saved.as_ref().is_err_and(Error::is_lease_lost) {
                // A document lease's release also deletes the cached copy;
                // `put` deleted it after its write already.
                if let Err(release) = self.split.release(lease).await {
                    tracing::debug!(%release, "release after a WEPPcloud save");
                }
            }
            return saved.map_err(|e| e.with_lock(lease.key()));
        }
        let checked = match check_controller(run, doc, &bytes, op) {
            Ok(()) => match self.check_stored(run, doc, op).await {
                Ok(_) => self.check_foreign(run, doc, Some(lease), op).await,
                Err(error) => Err(error.at_doc(op, run, doc)),
            },
            Err(error) => Err(error),
        };
        if let Err(error) = checked {
            if let Err(release) = self.split.release(lease).await {
                tracing::debug!(%release, "release after a refused save");
            }
            return Err(error.with_lock(lease.key()));
        }
        // WEPPcloud's own check before a dump: the key still holds this
        // lease's token (an operator's clear_locks may have ended it). A
        // lost lease is not released: it is not ours any more.
        self.service
            .check_held(lease, op)
            .await
            .map_err(|e| fenced_if_lost(e, op, run, doc))?;
        let (saved, released) = self.split.save_then_release(lease, doc, bytes, mode).await;
        let saved = saved?;
        // Its bytes passed `check_controller` above.
        self.remember_plain(run, doc, saved.clone());
        // A document lease's release deletes the cached copy in its own
        // script; a run lease's does not, and a release that failed (the
        // lock comes back to WEPPcloud only when it expires) did not: the
        // file changed, so the copy goes now.
        let release_failed = matches!(released, Some(Err(_)));
        if let Some(Err(release)) = &released {
            tracing::debug!(%release, "release after a WEPPcloud save");
        }
        if release_failed || matches!(lease.key(), LockKey::Run(_)) {
            self.invalidate(run, std::slice::from_ref(doc)).await;
        }
        Ok(saved)
    }
}

/// Opens the WEPPcloud composition for [`crate::open`]: the file store
/// (already opened from `file_url`) and the lock service `locks_url`.
pub(crate) async fn compose(
    file_url: &str,
    file_store: Arc<dyn Lock>,
    locks_url: &str,
) -> Result<Arc<dyn Lock>> {
    let file = runstate_file::FileConfig::from_url(file_url)?;
    let absolute = std::path::absolute(file.root()).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!(
                "the store root {} has no absolute path",
                file.root().display()
            ),
        )
        .with_source(e)
        .with_operation(Operation::Open)
    })?;
    check_root(&absolute)?;
    let mut config = runstate_redis::WeppcloudConfig::from_url(locks_url)?;
    if config.root().is_none() {
        config = config.with_root(&absolute)?;
    }
    // The controllers' extension is the file store's unless the lock
    // service's URL says otherwise.
    let query = locks_url.split_once('?').map(|(_, query)| query);
    let explicit_ext = runstate_core::options::UrlOptions::parse("redis", query)
        .map_err(|e| e.with_operation(Operation::Open))?
        .contains("weppcloud_ext");
    if !explicit_ext {
        config = config.with_ext(file.ext())?;
    }
    let service = WeppcloudService::open(config).await?;
    let docs: Arc<dyn Store> = Arc::clone(&file_store) as _;
    let split = SplitStore::new(docs, Arc::new(service.clone()))?.with_document_locks(file_store);
    Ok(Arc::new(WeppcloudStore::new(split, service)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_of_runs_weppcloud_names_otherwise_are_refused() {
        for ok in ["/wc1/runs/ab", "/geodata/weppcloud_runs", "/tmp/x/runs"] {
            assert!(check_root(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "/wc1/runs/ab/ab-run/_pups/omni/scenarios",
            "/wc1/batch/spring/runs",
            "/wc1/culverts/set1/runs",
        ] {
            let error = check_root(Path::new(bad)).expect_err(bad);
            assert_eq!(error.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn controllers_of_groups_and_children_are_refused() {
        let run = RunId::new("r").expect("valid");
        let doc = DocName::new("ron").expect("valid");
        for ok in [
            &br#"{"py/object": "wepppy.nodb.ron.Ron", "_run_group": null}"#[..],
            br#"{"_parent_wd": null, "wd": "r"}"#,
            br#"not json at all "_run_group""#,
            br#"{"py/object": "wepppy.nodb.core.ron.Ron", "py/state": {"_run_group": null}}"#,
        ] {
            assert!(check_controller(&run, &doc, ok, Operation::Put).is_ok());
        }
        // The flat layout of older controllers and jsonpickle's `py/state`
        // of current ones (which was not looked into: a current batch
        // run's controller was written under the wrong lock key).
        for bad in [
            &br#"{"_run_group": "batch", "_group_name": "spring"}"#[..],
            br#"{"_parent_wd": "/wc1/runs/ab/ab-run"}"#,
            br#"{"py/object": "wepppy.nodb.core.ron.Ron", "py/state": {"_run_group": "batch", "_group_name": "spring"}}"#,
            br#"{"py/object": "wepppy.nodb.core.ron.Ron", "py/state": {"_parent_wd": "/wc1/runs/ab/ab-run"}}"#,
        ] {
            let error = check_controller(&run, &doc, bad, Operation::Put).expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::Unsupported);
        }
    }
}
