//! # runstate-file
//!
//! The embedded default backend of runstate: a folder per run, a file per
//! document, nothing to install.
//!
//! ```text
//! <root>/<run>/<name>.<ext>     exactly the saved bytes (ext: json by default)
//! <root>/<run>/.runstate/       runstate's bookkeeping: lease records and fence counters
//! ```
//!
//! The layout is meant for people: a run folder can be read, copied and
//! zipped with ordinary tools, and with `ext = "nodb"` an existing WEPPcloud
//! run folder opens in place. A document dropped in by another program is
//! readable, gets a version, and is never rewritten by a read.
//!
//! ## Guarantees
//!
//! - **Durable, atomic saves.** Bytes go to a temporary file in the run
//!   folder, which is `fsync`ed and renamed over the document; then the
//!   folder is `fsync`ed (and the root, when the run folder is new). Readers
//!   see the old or the new document, never a torn one, even if the writer
//!   is killed at any instant. On any failure the temporary file is removed,
//!   the previous document stays, and the error is returned; a failed
//!   `fsync` is never retried into success. Temporary files of writers that
//!   died are swept when a store is opened.
//! - **Conditional and fenced writes across processes.** The check of a
//!   `Create`, an `Update(version)` or a lease, and the rename that follows,
//!   happen under an exclusive `flock` on the lock's record file, so they are
//!   atomic across every process on this host.
//! - **Versions** are 128-bit hashes of the content: they survive restarts,
//!   need no side file that a crash could leave out of step, and equal
//!   contents share a version.
//! - **Leases** are judged by this host's clock (`CLOCK_BOOTTIME`, immune to
//!   wall-clock steps). A lease whose holder process died on this host
//!   (same boot, same pid namespace, pid gone or reused) is taken over at
//!   once, without waiting for the TTL. Fence counters live in the record
//!   files and survive restarts.
//! - **No path escapes the root.** Ids are validated by
//!   [`runstate_core`]; a run folder that is a symlink leading outside the
//!   root is refused with `Denied`, and a document that is a symlink is
//!   never followed.
//!
//! ## Shared file systems
//!
//! The store is meant for the processes of one host. If several hosts share
//! it (NFS and the like), `flock` must be coherent across them, and leases
//! written by another host can only be judged by wall clocks: their clocks
//! must agree to well within the lease TTL. [`Capabilities::multi_host`] is
//! `false` for this reason.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use runstate_core::{Client, Document, RunId};
//! use runstate_file::FileStore;
//!
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! struct Wepp { runs: u32 }
//! impl Document for Wepp { const NAME: &'static str = "wepp"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate_core::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("runstate-doc-{}", std::process::id()));
//! let store = FileStore::open_path(&dir).await?;
//! let run = Client::new(Arc::new(store)).run(RunId::new("Mica_flume1")?);
//! run.update_or_default(|w: &mut Wepp| w.runs += 1).await?;
//! assert_eq!(run.load::<Wepp>().await?.runs, 1);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod config;
mod durable;
mod engine;
mod layout;
mod leases;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Error, ErrorKind, Fence, GetOptions, Lease, ListPage,
    Lock, LockInfo, LockKey, Operation, Owner, PutMode, PutOptions, ReleaseSignals, Result, RunId,
    Store, StoredDoc, Version, async_trait,
};

#[cfg(feature = "fault-injection")]
pub use config::{FaultHook, SaveStep};
pub use config::{FileConfig, MAX_EXT_LEN};

use crate::durable::Faults;
use crate::engine::Engine;
use crate::layout::{Layout, io_error, sync_dir};

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "file";

/// The file backend. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct FileStore {
    engine: Arc<Engine>,
    config: Arc<FileConfig>,
    capabilities: Arc<Capabilities>,
    signals: Arc<ReleaseSignals>,
}

impl FileStore {
    /// Opens (and, unless configured otherwise, creates) a store, then
    /// sweeps temporary files left by writers that died.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the root is missing and may not be
    /// created, or is not a folder; I/O errors as
    /// [`ErrorKind::Backend`]/[`ErrorKind::Denied`].
    pub async fn open(config: FileConfig) -> Result<FileStore> {
        let config = Arc::new(config);
        let opening = Arc::clone(&config);
        let engine = tokio::task::spawn_blocking(move || open_engine(&opening))
            .await
            .map_err(join_error)?
            .map_err(|e| e.with_operation(Operation::Open))?;
        Ok(FileStore {
            engine: Arc::new(engine),
            config,
            capabilities: Arc::new(Capabilities::full(BACKEND).with_multi_host(false)),
            signals: Arc::new(ReleaseSignals::new()),
        })
    }

    /// Opens a store at `root` with the default settings.
    ///
    /// # Errors
    /// As [`open`](FileStore::open).
    pub async fn open_path(root: impl AsRef<Path>) -> Result<FileStore> {
        Self::open(FileConfig::new(root.as_ref())).await
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &FileConfig {
        &self.config
    }

    /// Removes temporary files left by writers that died; returns how many.
    ///
    /// # Errors
    /// I/O errors while listing or removing.
    pub async fn sweep(&self) -> Result<usize> {
        self.blocking(Operation::Open, |engine| engine.sweep())
            .await
    }

    async fn blocking<T, F>(&self, op: Operation, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> Result<T> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(join_error)?
            .map_err(|e| e.with_backend(BACKEND).with_operation(op))
    }
}

fn open_engine(config: &FileConfig) -> Result<Engine> {
    let root = config.root.clone();
    match std::fs::metadata(&root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!("store root {} is not a folder", root.display()),
            )
            .with_backend(BACKEND));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create_root => {
            std::fs::create_dir_all(&root)
                .map_err(|e| io_error("creating the store root", &root, e))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(|e| io_error("fsync of the root's parent", parent, e))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::new(
                ErrorKind::Config,
                format!("store root {} does not exist", root.display()),
            )
            .with_backend(BACKEND)
            .with_source(e));
        }
        Err(e) => return Err(io_error("stat of the store root", &root, e)),
    }
    let canonical =
        std::fs::canonicalize(&root).map_err(|e| io_error("resolving the store root", &root, e))?;
    let engine = Engine {
        layout: Layout::new(root, canonical, &config.ext),
        faults: Faults {
            #[cfg(feature = "fault-injection")]
            hook: config.fault_hook.clone(),
        },
    };
    if config.sweep_on_open {
        let removed = engine.sweep()?;
        if removed > 0 {
            tracing::info!(removed, "swept temporary files of dead writers");
        }
    }
    Ok(engine)
}

fn join_error(error: tokio::task::JoinError) -> Error {
    Error::new(
        ErrorKind::Backend,
        "a blocking file operation did not complete",
    )
    .with_backend(BACKEND)
    .with_source(error)
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("root", &self.config.root)
            .field("ext", &self.config.ext)
            .finish()
    }
}

#[async_trait]
impl Store for FileStore {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let (r, d) = (run.clone(), doc.clone());
        self.blocking(Operation::Get, move |e| e.get(&r, &d, options.limit))
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let (r, d) = (run.clone(), doc.clone());
        let mode = options.mode;
        let lease = options.lease.cloned();
        self.blocking(Operation::Put, move |e| {
            e.put(&r, &d, &bytes, &mode, lease.as_ref(), false)
        })
        .await
        .map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let (r, d, v) = (run.clone(), doc.clone(), if_version.cloned());
        self.blocking(Operation::Delete, move |e| e.delete(&r, &d, v.as_ref()))
            .await
            .map_err(|e| e.at_doc(Operation::Delete, run, doc))
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let (r, a) = (run.clone(), after.cloned());
        self.blocking(Operation::ListDocs, move |e| {
            e.list_docs(&r, a.as_ref(), limit)
        })
        .await
        .map_err(|e| e.with_run(run))
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let a = after.cloned();
        self.blocking(Operation::ListRuns, move |e| e.list_runs(a.as_ref(), limit))
            .await
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let r = run.clone();
        self.blocking(Operation::DeleteRun, move |e| e.delete_run(&r))
            .await
            .map_err(|e| e.with_run(run))
    }
}

#[async_trait]
impl Lock for FileStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let (k, o) = (key.clone(), owner.clone());
        self.blocking(Operation::Acquire, move |e| {
            e.try_acquire(&k, &o, ttl, issued)
        })
        .await
        .map_err(|e| e.with_lock(key))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let l = lease.clone();
        self.blocking(Operation::Renew, move |e| e.renew(&l, ttl, issued))
            .await
            .map_err(|e| e.with_lock(lease.key()))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let l = lease.clone();
        let released = self
            .blocking(Operation::Release, move |e| e.release(&l))
            .await
            .map_err(|e| e.with_lock(lease.key()));
        self.signals.released(lease.key());
        released
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let k = key.clone();
        self.blocking(Operation::Inspect, move |e| e.inspect(&k))
            .await
            .map_err(|e| e.with_lock(key))
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let k = key.clone();
        let broken = self
            .blocking(Operation::BreakLock, move |e| e.break_lock(&k, only_fence))
            .await
            .map_err(|e| e.with_lock(key));
        self.signals.released(key);
        broken
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let r = run.cloned();
        self.blocking(Operation::ListLocks, move |e| e.list_locks(r.as_ref()))
            .await
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.signals.wait(key, max).await;
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let issued = Instant::now();
        let (k, d, o) = (key.clone(), doc.clone(), owner.clone());
        self.blocking(Operation::AcquireAndLoad, move |e| {
            e.acquire_and_load(&k, &d, &o, ttl, options.limit, issued)
        })
        .await
        .map_err(|e| e.with_lock(key).with_doc(doc))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let (l, d) = (lease.clone(), doc.clone());
        let saved = self
            .blocking(Operation::SaveAndRelease, move |e| {
                e.put(l.key().run(), &d, &bytes, &mode, Some(&l), true)
            })
            .await
            .map_err(|e| e.with_lock(lease.key()).with_doc(doc));
        self.signals.released(lease.key());
        saved
    }
}
