//! # runstate-file
//!
//! The embedded default backend of runstate: a folder per run, a file per
//! document, nothing to install.
//!
//! ```text
//! <root>/<run>/<name>.<ext>                exactly the saved bytes (ext: json by default)
//! <root>/<run>/.runstate/                  runstate's bookkeeping:
//! <root>/<run>/.runstate/run.lease           the run lock's record: fence counter, holder, watermark
//! <root>/<run>/.runstate/doc.<name>.lease    a document lock's record (the same)
//! <root>/<run>/.runstate/records.lock        the lock under which document records are created
//! <root>/<run>/.runstate/docs.index          remembered document versions (a cache)
//! <root>/<run>/.runstate/status.log          status messages, one JSON object per line
//! <root>/<run>/.runstate/status.log.1        the previous status log, kept for replay
//! <root>/<run>/.runstate/status.seq          the status message id counter (and its lock)
//! <root>/<run>/.runstate/milestones.json     milestones and attributes
//! <root>/<run>/.runstate/milestones.lock     the lock serializing milestone changes
//! ```
//!
//! With `state_dir=/path` ([`FileConfig::with_state_dir`]) the
//! bookkeeping folder of a run is `/path/<run>/` (the same files) instead
//! of `<root>/<run>/.runstate/`: run folders then hold nothing but the
//! documents, and saves leave nothing behind but the document (their
//! temporary files live beside it for the atomic rename, and are removed).
//!
//! The layout is meant for people: a run folder can be read, copied and
//! zipped with ordinary tools, and with `ext = "nodb"` an existing WEPPcloud
//! run folder opens in place. A document dropped in by another program is
//! readable, gets a version, and is never rewritten by a read; a read never
//! creates the bookkeeping folder either.
//!
//! ## Guarantees
//!
//! - **Durable, atomic saves.** Bytes go to a temporary file in the run
//!   folder, which is `fsync`ed and renamed over the document; then the
//!   folder is `fsync`ed. Before the first save a store makes into a run
//!   folder, it `fsync`s the root once (remembered per folder), whoever
//!   created the folder: a save is durable even into a folder whose
//!   creator was killed or whose own `fsync` failed, and a failed root
//!   `fsync` fails the save and is tried again by the next. Readers see the
//!   old or the new document, never a torn one, even if the writer is
//!   killed at any instant. On any failure the temporary file is removed,
//!   the previous document stays, and the error is returned; a failed
//!   `fsync` of a document is never retried into success. A replaced
//!   document keeps its permission bits (a new one gets 0644 less the
//!   umask), and its temporary file has them from its creation. Temporary
//!   files of writers that died are swept when a store is opened; a live
//!   writer's never are, when it runs on this boot and in this pid
//!   namespace. A writer elsewhere (another host on a shared folder,
//!   another container) cannot be checked: its temporary files are swept
//!   once an hour old, and a writer paused that long then fails its save
//!   (nothing is torn).
//! - **Conditional and fenced writes across processes.** The check of a
//!   `Create`, an `Update(version)` or a lease, and the rename that follows,
//!   happen under an exclusive `flock` on the lock's record file, so they are
//!   atomic across every process on this host. A batch (`put_many`, which
//!   migrations use) or a delete of a document that has no record creates
//!   none: it holds the run's `records.lock` instead, under which every
//!   document record is created, so a document written only by batches
//!   costs one file, not two. Every process writing a store must
//!   therefore run a runstate that knows this rule (one from before it
//!   creates records without the lock). Those locks are held for a few
//!   system calls (a conditional delete also hashes the document under
//!   its lock); a wait for one is bounded ([`FileConfig::with_lock_timeout`],
//!   10 s by default), after which the call fails with a retryable
//!   `Timeout`: a stopped or hung process cannot block every writer of a
//!   document for longer (one stopped while it holds `records.lock` holds
//!   up, for that long, the first writes and the deletes of the run's
//!   documents that have no record).
//! - **`save_and_release` releases the lease whenever the save fails**
//!   (a lease that does not cover the document, a refused condition, a
//!   full disk, any step of the save), unless the lease was already lost.
//! - **Versions** are 128-bit hashes of the content: they survive restarts,
//!   and equal contents share a version. Each run remembers the versions it
//!   computed in `.runstate/docs.index`, keyed by each file's inode, size
//!   and modification and status-change times, so a listing reads metadata,
//!   not contents; any change to a file (even in place, with its
//!   modification time put back) makes it hashed again. Only files whose
//!   times are settled (older than about two seconds when hashed) are
//!   remembered, since a change within one timestamp tick may not show; a
//!   fresh save is hashed once more by the first listing after that. The
//!   index is a cache: losing it costs only hashing.
//! - **Bounded reads.** No document larger than
//!   [`FileConfig::with_max_document_size`] (1 GiB by default, reported as
//!   [`Capabilities::max_document_size`]) is saved or read: its size is
//!   checked with `fstat` before anything is read, and versions are hashed
//!   in chunks. A larger file found in a run folder (put there by another
//!   program) is **listed** with its true size and a version
//!   `over-limit-<inode>-<size>-<mtime>-<ctime>` made from its metadata,
//!   without being read; `get` refuses it with `TooLarge`, and so do an
//!   `Update(version)` save over it and a conditional delete of it (its
//!   version cannot be checked); an overwrite replaces it and a plain
//!   delete removes it.
//! - **Listing every run is linear.** The sorted listing of the root is
//!   remembered while the root's times are unchanged (and settled), so
//!   paging through 100,000 runs reads the root once, not once per page.
//!   A run folder that cannot be read (its permissions, say) is skipped
//!   with a warning by `open` (the sweep), `list_runs` and
//!   `list_locks(None)`, instead of failing them for every run.
//! - **Leases** are judged by this host's clock (`CLOCK_BOOTTIME`, immune to
//!   wall-clock steps). A lease whose holder process died on this host
//!   (same boot, same pid namespace, pid gone or reused) is taken over at
//!   once, without waiting for the TTL; so is one granted on this machine
//!   (same machine id) during an earlier boot. A lease granted by another
//!   machine, even one with the same host name, is judged by its wall-clock
//!   expiry. Fence counters live in the record files and survive restarts.
//!   Acquiring a lock its owner already holds returns the same grant with
//!   its TTL restarted. A TTL outside 1 ms ..= [`runstate_core::MAX_TTL`]
//!   is refused before anything is written. An acquire whose caller stopped
//!   waiting (its future was dropped) releases the lease it was granted.
//! - **No path escapes the root.** Ids are validated by
//!   [`runstate_core`]. Every file and folder under the root is opened
//!   relative to its already-open folder without following links
//!   (`O_NOFOLLOW`, `O_DIRECTORY` for folders) and checked with `fstat`;
//!   files are opened with `O_NONBLOCK`. A link, FIFO, device or socket
//!   where a document, a lease record or the bookkeeping folder belongs is
//!   refused with `Denied` naming its path, without blocking and without
//!   reading or writing anything it points to. A run folder may be a
//!   symlink to a folder inside the root (judged by where the opened
//!   folder really is); one leading outside the root is refused with
//!   `Denied`.
//! - **Names that differ only by case are refused where case is ignored.**
//!   On a root whose file system ignores the case of names (a casefolded
//!   ext4 folder, a CIFS/SMB share, vfat), `Ron` and `ron` would be one
//!   folder or one file, and two runs or two documents would silently
//!   share it. [`FileStore::open`] finds out whether the root ignores
//!   case: it looks up an existing entry of the root with the case of its
//!   letters swapped, and, in a root without one, a hidden probe file it
//!   creates and removes; an empty root that cannot be written is taken to
//!   be case-sensitive (a debug message says so). The answer can be given
//!   instead with [`FileConfig::with_case_sensitivity`] (`case_insensitive`
//!   in a URL); [`FileStore::ignores_case`] tells it. On such a store, a
//!   run id that differs only by case from an existing run folder, or a
//!   document name that differs only by case from an existing document
//!   file or document lease record of its run, is refused with
//!   `InvalidKey`, naming both spellings, before anything is written: by
//!   `get`, `put`, `delete`, `list_docs` and `delete_run` of that run,
//!   and by every lease operation on it (renewing or releasing a grant
//!   looks only at lease records, so a lease is always let go). The exact
//!   spelling that exists keeps working, and so do new names. Run folders
//!   are looked up in the remembered listing of the root; a document
//!   check reads its run folder and bookkeeping folder. A save or acquire
//!   checks again under the record lock, which on such a file system is
//!   shared by every spelling, so two spellings saved at once cannot both
//!   succeed.
//!
//! - **Fence watermarks for split stores** (documents here, leases from
//!   Redis or PostgreSQL). Each lock's record also keeps its *watermark*:
//!   the highest fence of a lease granted by the other lock service that
//!   this store has seen for that lock (the run lock and each document
//!   lock separately, independent of the fence counter of the store's own
//!   leases). [`Store::claim`] raises it under the record's exclusive
//!   `flock` and, still under it, reads the document; a save with
//!   [`PutOptions::foreign_lease`] checks it under the same `flock` as its
//!   rename, **before** its mode (a stale holder hears `Fenced`, not
//!   `Precondition`), and raises it to the lease's fence before the rename.
//!   A save under a run lease takes the run's record and then the
//!   document's. Watermarks survive restarts and `delete_run`, like fence
//!   counters. Records are rewritten without `fsync`, so an OS crash of
//!   the machine holding the files can step a watermark back; every locked
//!   save is still conditional on the version its holder loaded, so a
//!   stale holder can then write only if the document is unchanged since
//!   it loaded it (no update is lost).
//! - **Conditional reads** ([`Store::get_if_changed`]) are answered from
//!   the version index: when it remembers the file's stamp (inode, size,
//!   times), `Unchanged` costs an `fstat` and no content is read, whatever
//!   the document's size. A document whose times are too fresh to prove
//!   anything (written in the last two seconds or so) or not remembered
//!   yet is read once to decide (hashed in chunks when it is over the
//!   caller's limit), and remembered once settled.
//! - **Stat without reading** ([`Store::head`]) and listings give each
//!   document's size and modification time (the file's mtime;
//!   [`Capabilities::modified_times`]) and its version through the same
//!   index: `head` reads the bytes only when the index does not remember
//!   the file, and never for a document over the size limit.
//! - **Watching a run** ([`Store::watch`]) uses inotify on the run folder
//!   ([`WatchMode::Native`] without `every_write`): for each changed
//!   document it reports the version the file has when it is read (through
//!   the version index), or `Deleted`; temporary files and the bookkeeping
//!   folder are ignored. The kernel queue's overflow (the `notify` crate's
//!   rescan flag), an inotify error, the removal of the run folder, and a
//!   changed document that cannot be read (its permissions, a link or FIFO
//!   put in its place) give `Resync`. A report equal to the previous one
//!   for that document is skipped, but never across a `Resync` (the
//!   consumer's re-list is what it knows then): after one, and after the
//!   feed dropped events, every document is reported afresh. A run folder
//!   that does not exist yet is not created to be watched: it is looked
//!   for every poll interval (`poll_ms`, 250 ms), and
//!   once it appears every document in it is reported. inotify sees the
//!   writes of this host only; `watch=poll` lists the run every `poll_ms`
//!   instead (see [`WatchBy`]), as does a watch made when inotify cannot
//!   be started (the per-user limit of inotify instances is reached: a
//!   store opens one instance for all its watches, subscriptions and
//!   waiters).
//! - **Waiters wake on release.** [`Lock::wait_for_release`] watches the
//!   lock's record with inotify (a release rewrites it), so a waiter in any
//!   process of this host retries as soon as the lock is released; the
//!   record is watched first and the lock checked after, so a release made
//!   meanwhile is not missed. Releases through the same store instance
//!   also wake one local waiter directly ([`ReleaseSignals`]); either
//!   wake-up ends the wait only if the record then shows the lock free, so
//!   a wake-up left by an earlier release nobody waited for does not send
//!   a waiter to probe a lock that is held again. While a grant made
//!   through the same store holds the lock, a waiter of
//!   [`LockExt::acquire`](runstate_core::LockExt::acquire) waits for its
//!   release, reading the record only once per
//!   [`WaitPolicy::max_backoff`](runstate_core::WaitPolicy::max_backoff)
//!   meanwhile ([`Lock::wait_for_local_release`]). Threads of one process
//!   queue for a lease record's `flock` at an in-process gate that wakes
//!   the next at once, instead of polling it with sleeps.
//! - **Status messages** ([`Store::publish`], [`Store::subscribe`]): an
//!   append-only JSON-lines log per run (`id`, `topic`, `text`, `at`), one
//!   `write` with `O_APPEND` per message under the `flock` of the id
//!   counter, rotated by count and size (`status_messages`, 1000;
//!   `status_bytes`, 1 MiB) with the previous log kept for replay, ids
//!   increasing per run. Subscribers follow with inotify and every poll
//!   interval, and get `Resync` when they missed messages (they fell more
//!   than a whole log behind, or their feed overflowed). A late subscriber
//!   replays the whole history it asked for, however long (the history is
//!   bounded by those settings), then follows. Status history is
//!   kept by `delete_run`, and its ids keep increasing.
//! - **Milestones and attributes** ([`Store::mark`], [`Store::set_attr`],
//!   [`Store::milestones`]): one small JSON file per run, changed field by
//!   field under an exclusive `flock` (with the bounded wait of lease
//!   records) and replaced whole by a rename, so readers need no lock.
//!   `delete_run` deletes them with the run's documents.
//! - **Reads create nothing.** `get`, `get_if_changed`, listings,
//!   `inspect`, `watch`, `subscribe`, `milestones` and `wait_for_release`
//!   never create a run folder or its bookkeeping folder, so a WEPPcloud
//!   run folder opened read-only stays untouched; `publish`, `mark`,
//!   `set_attr`, `claim` and saves create them.
//!
//! ## Beside a running WEPPcloud
//!
//! A store whose documents are WEPPcloud controllers (`ext=nodb`, or
//! `weppcloud=true`; see [`WeppcloudFiles`]) behaves as a safe neighbour of
//! the WEPPcloud workers that share its run folders:
//!
//! - a legacy lock file `<name>.nodb.lock` makes that document locked by
//!   the holder [`LOCK_FILE_HOLDER`] (fence 0, `since` the time in the
//!   file, `expires_in` [`runstate_core::MAX_TTL`], since it never
//!   expires): acquires, claims, saves and deletes of it (and acquires,
//!   claims and `delete_run` of the run lock) are refused with `Locked`,
//!   nothing written; `list_locks` lists it (so `runstate locks` shows it
//!   with its age); `break_lock` (an operator's `runstate unlock --force`)
//!   removes it, with a warning in the log. runstate never creates one and
//!   never removes one otherwise;
//! - a `READONLY` marker in a run folder refuses every write to the run
//!   with `Denied` (reads and leases still work);
//! - every save that keeps a document's size moves its modification time
//!   forward (before the rename), so WEPPcloud's `(mtime, size)` checks of
//!   its cached copies always see the change;
//! - the first `.nodb` document saved into a folder without a
//!   `nodb.version` marker writes the marker first (`1000\n`), so
//!   WEPPcloud never takes a new run for a legacy one; an existing marker
//!   is never changed.
//!
//! WEPPcloud's Redis locks and its Redis cache are the lock service's
//! part: see the `runstate` crate (split stores in WEPPcloud mode).
//!
//! ## Shared file systems
//!
//! On its own, the store is meant for the processes of one host: its
//! leases are judged by this host's clock and process ids, and leases
//! written by another host could only be judged by wall clocks.
//! [`Capabilities::multi_host`] is `false` for this reason.
//!
//! As the **document store of a split store** whose leases come from Redis
//! or PostgreSQL, workers on several hosts may share the root (NFS and the
//! like): leases, expiry and fences are then the lock service's, and this
//! store checks each save's fence against the lock's watermark. The shared
//! file system must provide:
//!
//! - **atomic rename** within a folder (a save is a rename over the
//!   document; NFS renames are atomic on the server);
//! - **close-to-open consistency**: a file opened after another host
//!   closed it shows what that host wrote. Every operation opens the files
//!   it needs afresh and closes them when it ends (records and counters are
//!   rewritten in place and closed; documents are written to a temporary
//!   file, `fsync`ed and renamed), so each operation sees what any earlier
//!   operation on any host wrote. NFS provides this by default (not when
//!   mounted `nocto`);
//! - an `fsync` that reaches stable storage, for saves to be durable.
//!
//! It need **not** provide `flock` coherent across hosts. What then holds,
//! precisely, when `flock` is host-local (NFS mounted `local_lock=flock`
//! or `local_lock=all`, or any file system whose locks other hosts do not
//! see):
//!
//! - *Guaranteed:* a claim writes the raised watermark to the record on
//!   the shared file system before the new holder reads; any save whose
//!   watermark check runs after that write was closed, on any host, is
//!   refused with `Fenced`. A stale holder stopped anywhere *before* its
//!   check (the usual case: a long step, a pause past its TTL) is therefore
//!   refused. Every save also checks its expected version right before its
//!   rename, and renames are atomic, so readers never see a torn document.
//! - *Not guaranteed:* the check and the rename are atomic only against
//!   processes of the same host. A holder on host A paused *exactly
//!   between* its watermark check and its rename (a window of a few system
//!   calls), while host B's newer holder claims, reads and saves, renames
//!   when it resumes: its bytes, made from what it loaded before B's save,
//!   replace B's, and B's update is lost. Likewise two hosts raising one
//!   lock's watermark at the same instant may leave the lower fence
//!   written (the raise is a read-modify-write); the version check then
//!   still refuses whichever of the two holders saves second, if the first
//!   changed the document. Milestone changes made on two hosts at the same
//!   instant may lose one of them, and status messages published from
//!   several hosts may repeat ids (`O_APPEND` is not atomic across NFS
//!   clients either); publish a run's messages from one host.
//!
//! With `flock` coherent across hosts (NFSv4, or NFSv3 with its lock
//! manager, which Linux uses for `flock` by default: `local_lock=none`),
//! the check and the rename are atomic across hosts exactly as on one
//! host, and the window above does not exist.
//!
//! inotify reports the changes made through this host's kernel only: on a
//! shared file system `watch` sees other hosts' writes only with
//! `watch=poll`, status subscriptions see them at their poll interval, and
//! lock waiters see only this host's releases (a split store's waiters use
//! the lock service instead).
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

// Denied, not forbidden, so that `writeback` alone can allow its one system
// call (no safe wrapper exists for it); nothing else here may use `unsafe`.
#![deny(unsafe_code)]

mod case;
mod config;
mod durable;
mod engine;
mod feeds;
mod folder;
mod gate;
mod hub;
mod index;
mod layout;
mod leases;
mod milestones;
mod status;
mod weppcloud;
mod writeback;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::events::{check_label, check_text, poll_watch};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode, PutOptions,
    PutRequest, ReleaseSignals, Replay, Result, RunId, Store, StoredDoc, Subscription, Version,
    WatchMode, Watcher, async_trait,
};

pub use config::{
    CaseSensitivity, DEFAULT_LOCK_TIMEOUT, DEFAULT_MAX_DOCUMENT_SIZE, DEFAULT_POLL_INTERVAL,
    DEFAULT_STATUS_BYTES, DEFAULT_STATUS_MESSAGES, FileConfig, MAX_EXT_LEN, WatchBy,
    WeppcloudFiles,
};
#[cfg(feature = "fault-injection")]
pub use config::{FaultHook, SaveStep};
pub use weppcloud::LOCK_FILE_HOLDER;

use crate::case::CaseRule;
use crate::durable::Faults;
use crate::engine::{Engine, Fences};
use crate::folder::Folder;
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
    /// Opens (and, unless configured otherwise, creates) a store, finds
    /// out whether its root ignores the case of names (unless configured;
    /// see [`CaseSensitivity`]), then sweeps temporary files left by
    /// writers that died (skipping, with a warning, run folders it cannot
    /// read).
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
        let watch = match config.watch {
            WatchBy::Inotify => WatchMode::Native { every_write: false },
            WatchBy::Polling => WatchMode::Polling(config.poll),
        };
        let capabilities = Capabilities::full(BACKEND)
            .with_multi_host(false)
            .with_max_document_size(Some(config.max_document_size))
            .with_foreign_fencing(true)
            .with_native_conditional_get(true)
            .with_watch(watch)
            .with_status(true)
            .with_milestones(true)
            .with_modified_times(true);
        Ok(FileStore {
            engine: Arc::new(engine),
            config,
            capabilities: Arc::new(capabilities),
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
    /// A run folder that cannot be read is skipped with a warning.
    ///
    /// # Errors
    /// I/O errors while listing the root or removing a file.
    pub async fn sweep(&self) -> Result<usize> {
        self.blocking(Operation::Open, |engine| engine.sweep())
            .await
    }

    /// How many times this store has read its root folder to list runs.
    /// For tests: paging through every run must not re-read the root for
    /// every page.
    #[doc(hidden)]
    pub fn root_scans(&self) -> u64 {
        self.engine.root_scans()
    }

    /// Whether this store refuses run ids and document names that differ
    /// only by case from existing ones, because its root ignores case (as
    /// detected when it was opened, or as configured with
    /// [`FileConfig::with_case_sensitivity`]).
    pub fn ignores_case(&self) -> bool {
        self.engine.ignores_case()
    }

    /// Holds the store's inotify event thread until the returned guard is
    /// dropped, so that a test can make the kernel's event queue overflow
    /// (and check that watchers get `Resync`).
    #[cfg(feature = "fault-injection")]
    pub fn pause_watch_events(&self) -> WatchPause {
        self.engine
            .pause
            .store(true, std::sync::atomic::Ordering::SeqCst);
        WatchPause(Arc::clone(&self.engine.pause))
    }

    async fn blocking<T, F>(&self, op: Operation, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Engine>) -> Result<T> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(join_error)?
            .map_err(|e| e.with_backend(BACKEND).with_operation(op))
    }
}

/// Returned by [`FileStore::pause_watch_events`]: the event thread resumes
/// when it is dropped.
#[cfg(feature = "fault-injection")]
#[derive(Debug)]
pub struct WatchPause(hub::Pause);

#[cfg(feature = "fault-injection")]
impl Drop for WatchPause {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Refuses a state folder that tells names apart by case beside a root
/// that does not: a document's lock record there is named after the
/// spelling used (`doc.Ron.lease`, `doc.ron.lease`), so two spellings of
/// one file would be locked by two records, and two writers could create
/// "both" at once. Created when missing, as its first use would.
fn check_state_dir_case(state: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(state).map_err(|e| io_error("creating the state folder", state, e))?;
    let folder =
        Folder::open_path(state).map_err(|e| io_error("opening the state folder", state, e))?;
    // Refused only when found out: a state folder whose case rule cannot be
    // told (no entry to look up, no probe file) is left to the caller.
    let rule = CaseRule::decide(config::CaseSensitivity::Detect, &folder);
    if rule.insensitive || rule.how != case::Decided::Detected {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "the store root ignores the case of names, but its state folder {} does not: the \
             lock records of two spellings of one document would be two files; put state_dir \
             on a file system that ignores case too, or leave it out",
            state.display()
        ),
    )
    .with_backend(BACKEND))
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
    let case = CaseRule::decide(
        config.case,
        &Folder::open_path(&root).map_err(|e| io_error("opening the store root", &root, e))?,
    );
    // A root found to ignore case (one configured so is the caller's word,
    // as for tests on any file system).
    if case.insensitive
        && case.how == case::Decided::Detected
        && let Some(state) = &config.state_dir
    {
        check_state_dir_case(state)?;
    }
    let engine = Engine::new(
        Layout::new(root, &config.ext, config.state_dir.clone()),
        Faults {
            #[cfg(feature = "fault-injection")]
            hook: config.fault_hook.clone(),
        },
        config.max_document_size,
        config.lock_timeout,
        case,
        config.weppcloud_neighbour(),
    );
    if config.sweep_on_open {
        let removed = engine.sweep()?;
        if removed > 0 {
            tracing::info!(removed, "swept temporary files of dead writers");
        }
    }
    Ok(engine)
}

/// A lease granted on the blocking pool, on its way to the caller. If the
/// caller stopped waiting (its future was dropped, by a timeout or a
/// `select!`), nobody claims it and dropping it releases the lease, so a
/// cancelled acquire never leaves a lock held until its TTL runs out.
struct Granted {
    lease: Lease,
    engine: Arc<Engine>,
    claimed: bool,
}

impl Granted {
    fn new(engine: &Arc<Engine>, lease: Lease) -> Granted {
        Granted {
            lease,
            engine: Arc::clone(engine),
            claimed: false,
        }
    }

    fn claim(mut self) -> Lease {
        self.claimed = true;
        self.lease.clone()
    }
}

impl Drop for Granted {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        let (engine, lease) = (Arc::clone(&self.engine), self.lease.clone());
        tracing::debug!(lock = %lease.key(), "releasing a lease its caller stopped waiting for");
        let release = move || {
            if let Err(error) = engine.release(&lease) {
                tracing::debug!(%error, "release of an unclaimed lease");
            }
        };
        // Dropped on the blocking pool (the caller left before the grant)
        // or in the caller's task (it left after): either way, never block
        // an async worker on the record lock.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(release)),
            Err(_) => release(),
        }
    }
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
            .field("ignores_case", &self.ignores_case())
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
        let foreign = options.foreign_lease.cloned();
        self.blocking(Operation::Put, move |e| {
            let fences = Fences {
                lease: lease.as_ref(),
                foreign: foreign.as_ref(),
            };
            e.put(&r, &d, &bytes, &mode, fences, false)
        })
        .await
        .map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    /// One group commit per group of writes: every document staged and
    /// synced, then all renamed under their records (or, for documents that
    /// have none, under the run's `records.lock`), then one `fsync` of the
    /// run folder (instead of one per document), see `Engine::put_many`.
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let r = run.clone();
        self.blocking(Operation::PutMany, move |e| e.put_many(&r, &puts))
            .await
            .map_err(|e| e.with_run(run))
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

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let (r, d, k) = (run.clone(), doc.clone(), known.clone());
        self.blocking(Operation::GetIfChanged, move |e| {
            e.get_if_changed(&r, &d, &k, options.limit)
        })
        .await
        .map_err(|e| e.at_doc(Operation::GetIfChanged, run, doc))
    }

    /// From the file's metadata and the run's version index: the bytes
    /// are read only when the index does not remember the file (new,
    /// changed, or written in the last two seconds or so), and never for a
    /// document over the size limit (its `over-limit-…` version, as
    /// listed). `modified` is the file's modification time.
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let (r, d) = (run.clone(), doc.clone());
        self.blocking(Operation::Head, move |e| e.head(&r, &d))
            .await
            .map_err(|e| e.at_doc(Operation::Head, run, doc))
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let (k, d) = (key.clone(), doc.cloned());
        self.blocking(Operation::Claim, move |e| {
            e.claim(&k, fence, d.as_ref(), options.limit)
        })
        .await
        .map_err(|e| e.with_lock(key))
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        let at = |e: Error| e.with_backend(BACKEND).at_run(Operation::Watch, run);
        let polling = self.config.watch == WatchBy::Polling
            || match self.engine.hub() {
                Ok(_) => false,
                Err(error) => {
                    // The per-user limit of inotify instances, say: a
                    // watch that polls beats no watch.
                    tracing::warn!(%error, run = %run, "inotify is unavailable; watching by polling");
                    true
                }
            };
        if polling {
            // Fails now, not in the poller, for a run this store refuses.
            let r = run.clone();
            self.blocking(Operation::Watch, move |e| e.existing_run_dir(&r).map(drop))
                .await
                .map_err(at)?;
            let store: Arc<dyn Store> = Arc::new(self.clone());
            return poll_watch(store, run.clone(), self.config.poll)
                .await
                .map_err(at);
        }
        feeds::watch(Arc::clone(&self.engine), run.clone(), self.config.poll)
            .await
            .map_err(at)
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let at = |e: Error| e.with_backend(BACKEND).at_run(Operation::Publish, run);
        check_label("topic", topic).map_err(at)?;
        check_text("status message", text).map_err(at)?;
        let (r, topic, text) = (run.clone(), topic.to_owned(), text.to_owned());
        let history = status::History {
            messages: self.config.status_messages,
            bytes: self.config.status_bytes,
        };
        let now = SystemTime::now();
        self.blocking(Operation::Publish, move |e| {
            let book = e.writable_book(&r)?;
            status::publish(&book, &topic, &text, now, history, e.lock_timeout())
        })
        .await
        .map_err(at)
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        feeds::subscribe(
            Arc::clone(&self.engine),
            run.clone(),
            replay,
            self.config.poll,
        )
        .await
        .map_err(|e| e.with_backend(BACKEND).at_run(Operation::Subscribe, run))
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        let (r, task) = (run.clone(), task.to_owned());
        self.blocking(Operation::Mark, move |e| {
            milestones::change(e, &r, &milestones::Change::Mark(&task, at))
        })
        .await
        .map_err(context)
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::SetAttr, run);
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        let (r, name, value) = (run.clone(), name.to_owned(), value.to_owned());
        self.blocking(Operation::SetAttr, move |e| {
            milestones::change(e, &r, &milestones::Change::Attr(&name, &value))
        })
        .await
        .map_err(context)
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let r = run.clone();
        self.blocking(Operation::Milestones, move |e| milestones::read_all(e, &r))
            .await
            .map_err(|e| e.with_run(run))
    }
}

#[async_trait]
impl Lock for FileStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let (k, o) = (key.clone(), owner.clone());
        let lease = self
            .blocking(Operation::Acquire, move |e| {
                e.try_acquire(&k, &o, ttl, issued)
                    .map(|lease| Granted::new(e, lease))
            })
            .await
            .map(Granted::claim)
            .map_err(|e| e.with_lock(key))?;
        self.signals.granted(&lease);
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let l = lease.clone();
        let renewed = self
            .blocking(Operation::Renew, move |e| e.renew(&l, ttl, issued))
            .await
            .map_err(|e| e.with_lock(lease.key()))?;
        self.signals.granted(&renewed);
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        // Signalled however this call ends: the blocking pool carries the
        // release out even when the caller stops waiting for it.
        let _signal = self.signals.releasing(lease.key(), lease.fence());
        let l = lease.clone();
        self.blocking(Operation::Release, move |e| e.release(&l))
            .await
            .map_err(|e| e.with_lock(lease.key()))
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
        if let Ok(Some(broken)) = &broken {
            self.signals.released(key, broken.fence);
        }
        broken
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let r = run.cloned();
        self.blocking(Operation::ListLocks, move |e| e.list_locks(r.as_ref()))
            .await
    }

    /// Returns when a process of this host releases the lock (inotify on
    /// its record: each write of the record is looked at, and a write that
    /// leaves it free ends the wait; one that leaves it held, an acquire or
    /// a renewal, does not), when this store releases it, or after `max`.
    /// The record is watched first and looked at after, so a release made
    /// in between is not missed. A release signalled through this store is
    /// checked against the record the same way (a signal may be left over
    /// from a release nobody was waiting for). The record is read without
    /// its `flock`, so waiters never hold up the holder; a record caught
    /// mid-write counts as free (an early return, which is allowed).
    /// Without a record, a bookkeeping folder or inotify, only releases
    /// through this store and `max` end the wait. A `max` too long to be a point in time
    /// (`Duration::MAX`) means no deadline.
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        // A `max` too long to be a point in time (`Duration::MAX`, say) is
        // no deadline at all.
        let deadline = tokio::time::Instant::now().checked_add(max);
        let left = move || {
            deadline.map_or(Duration::MAX, |deadline| {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            })
        };
        let (engine, k) = (Arc::clone(&self.engine), key.clone());
        let armed = tokio::time::timeout(
            max,
            tokio::task::spawn_blocking(move || feeds::arm_release(&engine, &k)),
        )
        .await;
        match armed {
            Ok(Ok(Ok(Some(feeds::Armed::Free)))) => {}
            Ok(Ok(Ok(Some(feeds::Armed::Held((route, pending), book))))) => {
                loop {
                    let left = left();
                    if left.is_zero() {
                        break;
                    }
                    // Woken by a write of the record (a release, or an
                    // acquire, renewal or claim by someone else), or by a
                    // release through this store, which may also be one
                    // that nobody was waiting for when it was made (its
                    // wake-up is kept for the next waiter): either way, only
                    // a record that shows the lock free ends the wait, so a
                    // waiter never gets up to find it still held, and
                    // probe the record while its holder saves.
                    tokio::select! {
                        () = self.signals.wait(key, left) => {}
                        () = pending.changed() => {}
                    }
                    let (book, k) = (Arc::clone(&book), key.clone());
                    match tokio::task::spawn_blocking(move || feeds::is_held(&book, &k)).await {
                        Ok(true) => {}
                        _ => break,
                    }
                }
                drop(route);
            }
            Ok(Ok(Err(error))) => {
                tracing::debug!(%error, lock = %key, "waiting without watching the lease record");
                self.signals.wait(key, left()).await;
            }
            _ => self.signals.wait(key, left()).await,
        }
    }

    /// Waits while a grant made through this store holds `key` (see
    /// [`ReleaseSignals::wait_while_held`]): its release through this store
    /// wakes the waiter, without the record being looked at.
    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.signals.wait_while_held(key, owner, max).await
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
        let (lease, stored) = self
            .blocking(Operation::AcquireAndLoad, move |e| {
                e.acquire_and_load(&k, &d, &o, ttl, options.limit, issued)
                    .map(|(lease, stored)| (Granted::new(e, lease), stored))
            })
            .await
            .map(|(granted, stored)| (granted.claim(), stored))
            .map_err(|e| e.with_lock(key).with_doc(doc))?;
        self.signals.granted(&lease);
        Ok((lease, stored))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        // Signalled however this call ends (see `release`).
        let _signal = self.signals.releasing(lease.key(), lease.fence());
        let (l, d) = (lease.clone(), doc.clone());
        self.blocking(Operation::SaveAndRelease, move |e| {
            let fences = Fences {
                lease: Some(&l),
                foreign: None,
            };
            e.put(l.key().run(), &d, &bytes, &mode, fences, true)
        })
        .await
        .map_err(|e| e.with_lock(lease.key()).with_doc(doc))
    }
}
