//! The blocking implementation of every operation. The async `FileStore`
//! runs each call on Tokio's blocking pool.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use runstate_core::batch::{groups, settle, waves};
use runstate_core::process::{Liveness, ProcessStamp, current_stamp, liveness};
use runstate_core::{
    Bytes, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, Lease, ListPage, LockInfo,
    LockKey, Operation, Owner, PutMode, PutRequest, RunId, StoredDoc, Version,
};

use crate::BACKEND;
use crate::case::{self, CaseRule};
use crate::durable::{Faults, SaveStep, Staged, permission_bits, sync_placed};
use crate::folder::{
    Access, Folder, FolderId, Kind, Stamp, hash_bounded, is_not_found, now_ns, read_bounded_sized,
    too_large,
};
use crate::hub::{Hub, Pause};
use crate::index::{Indexes, RunIndex};
use crate::layout::{
    Layout, RECORDS_LOCK, host_tag, io_error, lease_file_name, lock_key_of_file, parse_temp_name,
    version_of,
};
use crate::leases::{self, BookLock, LeaseFile, Now};
use crate::weppcloud;

/// Writes of one group of a batch at most ([`Engine::put_many`]): each
/// holds an open staged file and, until the folder `fsync`, its record and
/// the document it replaces, three descriptors; 16 keep a group near 50
/// descriptors and a migration's batches of 8 in one group each.
const BATCH_ITEMS: usize = 16;
/// Bytes of one group at most (a larger document goes alone).
const BATCH_BYTES: u64 = 32 * 1024 * 1024;

/// What makes a delete of a document exclusive (see `Engine::doc_access`):
/// the document's record, locked, or the run's records lock, the document
/// having no record. Held, never read.
struct DocAccess {
    _record: Option<LeaseFile>,
    _records: Option<BookLock>,
}

impl DocAccess {
    fn record(record: LeaseFile) -> DocAccess {
        DocAccess {
            _record: Some(record),
            _records: None,
        }
    }
}

/// A staged write of a batch: its index in the requests, its lock, the
/// document's file name and the synced temporary file.
type Staging<'d> = (usize, LockKey, String, Staged<'d>);
/// A staged write ready to be placed: with its record held, or with none
/// under the run's records lock.
type Placing<'d> = (usize, LockKey, String, Staged<'d>, Option<LeaseFile>);

/// Temporary files from another boot or pid namespace are removed once this
/// old, since their writer cannot be checked from here.
const FOREIGN_TEMP_AGE: Duration = Duration::from_secs(3600);

/// The blocking store.
#[derive(Debug)]
pub(crate) struct Engine {
    layout: Layout,
    faults: Faults,
    max_document_size: u64,
    lock_timeout: Duration,
    /// Whether names that differ only by case are refused.
    case: CaseRule,
    /// Whether the store is a neighbour of a running WEPPcloud (lock
    /// files, `READONLY`, signatures, `nodb.version`: see
    /// [`crate::weppcloud`]).
    weppcloud: bool,
    /// Run folders whose entry in the root this store has made durable.
    synced: Mutex<HashSet<FolderId>>,
    /// Remembered document versions, per run folder.
    indexes: Indexes,
    /// The sorted run ids of the root, while the root is unchanged.
    root_listing: Mutex<Option<RootListing>>,
    /// How many times the root was read (for tests of listing cost).
    root_scans: AtomicU64,
    /// The store's inotify instance, opened the first time something is
    /// watched.
    hub: Mutex<Option<Arc<Hub>>>,
    /// Holds the inotify event thread while set (fault-injection tests).
    pub(crate) pause: Pause,
}

#[derive(Debug)]
struct RootListing {
    dev: u64,
    stamp: Stamp,
    runs: Arc<RunListing>,
}

/// The run folders of the root.
#[derive(Debug, Default)]
pub(crate) struct RunListing {
    /// Their ids, sorted.
    runs: Vec<RunId>,
    /// On a store that ignores case: each id in lowercase → the index in
    /// `runs` of one id spelled so.
    folded: HashMap<String, usize>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

fn precondition(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Precondition, message.into()).with_backend(BACKEND)
}

fn fenced(lease: &Lease, record: &leases::Record, now: &Now) -> Error {
    Error::fenced(lease, record.live_info(lease.key(), now)).with_backend(BACKEND)
}

fn missing_record() -> Error {
    Error::new(ErrorKind::Backend, "a created lease record was not there").with_backend(BACKEND)
}

/// A run folder's version index and where it lives.
struct Remembered {
    id: FolderId,
    book: Option<Folder>,
    index: Arc<RunIndex>,
}

/// The leases a save is fenced by.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Fences<'a> {
    /// A lease of this store's own: it must be the current grant.
    pub(crate) lease: Option<&'a Lease>,
    /// A lease granted by another lock service: its fence must not be
    /// below the lock's watermark, which the save raises to it.
    pub(crate) foreign: Option<&'a Lease>,
}

/// What [`Engine::versions_now`] found.
#[derive(Debug, Default)]
pub(crate) struct VersionsNow {
    /// The documents that could be read: their version, or `None` when
    /// absent.
    pub(crate) found: Vec<(DocName, Option<Version>)>,
    /// Some document could not be read (left out of `found`).
    pub(crate) unreadable: bool,
}

/// The record of `lease`'s lock among the two a save holds: the run's when
/// it is a run lease (then taken), else the document's.
fn pick<'r>(
    run_record: &'r mut Option<LeaseFile>,
    doc_record: &'r mut LeaseFile,
    lease: &Lease,
) -> &'r mut LeaseFile {
    match (lease.key(), run_record) {
        (LockKey::Run(_), Some(record)) => record,
        _ => doc_record,
    }
}

/// The version listed for a document over the size limit, which is not
/// read: made from its stamp, so it changes whenever the file does, and
/// marked so it can never equal a content version.
fn over_limit_version(stamp: &Stamp) -> Version {
    Version::new(format!(
        "over-limit-{}-{}-{}-{}",
        stamp.ino, stamp.size, stamp.mtime_ns, stamp.ctime_ns
    ))
}

impl Engine {
    pub(crate) fn new(
        layout: Layout,
        faults: Faults,
        max_document_size: u64,
        lock_timeout: Duration,
        case: CaseRule,
        weppcloud: bool,
    ) -> Engine {
        Engine {
            layout,
            faults,
            max_document_size,
            lock_timeout,
            case,
            weppcloud,
            synced: Mutex::new(HashSet::new()),
            indexes: Indexes::default(),
            root_listing: Mutex::new(None),
            root_scans: AtomicU64::new(0),
            hub: Mutex::new(None),
            pause: Pause::default(),
        }
    }

    /// The store's inotify instance, opened on first use.
    ///
    /// # Errors
    /// `Backend` when inotify cannot be started (the per-user limit of
    /// instances is reached, say); tried again by the next call.
    pub(crate) fn hub(&self) -> Result<Arc<Hub>, Error> {
        let mut hub = self.hub.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hub) = &*hub {
            return Ok(Arc::clone(hub));
        }
        let made = Hub::new(Arc::clone(&self.pause))?;
        *hub = Some(Arc::clone(&made));
        Ok(made)
    }

    /// The layout of the store.
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The longest wait for a bookkeeping file's `flock`.
    pub(crate) fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// The run folder when it exists, never created; refused on a store
    /// that ignores case when it exists only under another spelling.
    pub(crate) fn existing_run_dir(&self, run: &RunId) -> Result<Option<Folder>, Error> {
        let root = self.layout.open_root()?;
        self.run_dir(&root, run)
    }

    /// The bookkeeping folder of `run`, created when missing: where status
    /// messages and milestones are written. Inside the run folder, which
    /// is then created when missing and made durable (as by a save); in
    /// the state folder, when there is one, without touching the run
    /// folder.
    pub(crate) fn writable_book(&self, run: &RunId) -> Result<Folder, Error> {
        let root = self.layout.open_root()?;
        if self.layout.has_state_dir() {
            self.check_run_case(&root, run)?;
            return self.layout.ensure_book(None, run);
        }
        let dir = self.ensure_run_dir(&root, run)?;
        self.make_durable(&root, &dir)
            .map_err(|e| e.with_run(run))?;
        self.layout.ensure_book(Some(&dir), run)
    }

    /// The bookkeeping folder of `run` when it exists (never created).
    pub(crate) fn existing_book(&self, run: &RunId) -> Result<Option<Folder>, Error> {
        let root = self.layout.open_root()?;
        let dir = self.run_dir(&root, run)?;
        self.layout.book(dir.as_ref(), run)
    }

    /// Where a lease of `key` is recorded, created when missing, and the
    /// run folder when it exists. Inside the run folder, which is then
    /// created (as acquiring always did); in the state folder without
    /// creating the run folder. On a store that ignores case, the document
    /// of `key` is checked against the run folder's files and the records.
    fn lease_book(&self, root: &Folder, key: &LockKey) -> Result<(Option<Folder>, Folder), Error> {
        let dir = if self.layout.has_state_dir() {
            self.run_dir(root, key.run())?
        } else {
            Some(self.ensure_run_dir(root, key.run())?)
        };
        if let (LockKey::Doc(run, doc), Some(dir)) = (key, &dir) {
            self.check_doc_case(dir, run, doc)?;
        }
        let book = self.layout.ensure_book(dir.as_ref(), key.run())?;
        Ok((dir, book))
    }

    /// Refuses `key` while a WEPPcloud lock file holds it (for a store
    /// that is a WEPPcloud neighbour).
    fn check_lock_files(&self, dir: Option<&Folder>, key: &LockKey) -> Result<(), Error> {
        match dir {
            Some(dir) if self.weppcloud => weppcloud::check_unlocked(dir, &self.layout, key),
            _ => Ok(()),
        }
    }

    /// Refuses writes in a run folder holding WEPPcloud's `READONLY`
    /// marker (for a store that is a WEPPcloud neighbour).
    fn check_writable(&self, dir: &Folder, run: &RunId) -> Result<(), Error> {
        if self.weppcloud {
            weppcloud::check_writable(dir, run)
        } else {
            Ok(())
        }
    }

    /// The WEPPcloud lock file holding `key`, if any (for a store that is
    /// a WEPPcloud neighbour).
    pub(crate) fn lock_file_holder(&self, key: &LockKey) -> Result<Option<LockInfo>, Error> {
        if !self.weppcloud {
            return Ok(None);
        }
        match self.existing_run_dir(key.run())? {
            Some(dir) => weppcloud::key_holder(&dir, &self.layout, key),
            None => Ok(None),
        }
    }

    /// How many times the root folder was read to list runs.
    pub(crate) fn root_scans(&self) -> u64 {
        self.root_scans.load(Ordering::Relaxed)
    }

    /// Whether names that differ only by case are refused.
    pub(crate) fn ignores_case(&self) -> bool {
        self.case.insensitive
    }

    /// On a store that ignores case, refuses `run` when a run folder exists
    /// under another spelling and none under its own. Looked up in the
    /// remembered listing of the root, not by reading it per call.
    fn check_run_case(&self, root: &Folder, run: &RunId) -> Result<(), Error> {
        if !self.case.insensitive {
            return Ok(());
        }
        let listing = self.run_ids(root)?;
        if listing.runs.binary_search(run).is_ok() {
            return Ok(());
        }
        match listing.folded.get(&run.as_str().to_ascii_lowercase()) {
            Some(&i) => Err(case::conflict(
                &self.case,
                "run id",
                run.as_str(),
                "run folder",
                listing.runs[i].as_str(),
                root,
            )
            .with_run(run)),
            None => Ok(()),
        }
    }

    /// The run folder, opened (see [`Layout::run_dir`]); refused on a store
    /// that ignores case when it exists only under another spelling.
    /// Checked after the open, so a folder made under another spelling
    /// just before is seen.
    fn run_dir(&self, root: &Folder, run: &RunId) -> Result<Option<Folder>, Error> {
        let dir = self.layout.run_dir(root, run)?;
        self.check_run_case(root, run)?;
        Ok(dir)
    }

    /// The run folder, created when missing. On a store that ignores case,
    /// a run id that differs only by case from an existing run folder is
    /// refused before anything is created, and again after the folder was
    /// found (not made by this call), in case another spelling was made
    /// meanwhile.
    fn ensure_run_dir(&self, root: &Folder, run: &RunId) -> Result<Folder, Error> {
        self.check_run_case(root, run)?;
        let (dir, created) = self.layout.ensure_run_dir(root, run)?;
        if !created {
            self.check_run_case(root, run)?;
        }
        Ok(dir)
    }

    /// On a store that ignores case, refuses `doc` when a document file or
    /// the lease record of a document exists in the run folder `dir` under
    /// another spelling and not under its own. Reads the run folder and its
    /// bookkeeping folder (both small); writes nothing.
    fn check_doc_case(&self, dir: &Folder, run: &RunId, doc: &DocName) -> Result<(), Error> {
        self.check_doc_spelling(dir, run, doc, true)
    }

    /// [`check_doc_case`](Self::check_doc_case), looking at document files
    /// only when `files` is set (lease records always).
    fn check_doc_spelling(
        &self,
        dir: &Folder,
        run: &RunId,
        doc: &DocName,
        files: bool,
    ) -> Result<(), Error> {
        if !self.case.insensitive {
            return Ok(());
        }
        let refuse = |existing_what: &str, existing: &str| {
            case::conflict(
                &self.case,
                "document",
                doc.as_str(),
                existing_what,
                existing,
                dir,
            )
            .with_run(run)
        };
        if files {
            let file_name = self.layout.file_name(doc);
            let entries = dir
                .entries()
                .map_err(|e| io_error("listing the run folder", dir.path(), e))?;
            if let Some(other) = case::twin(entries.iter().map(|e| e.name.as_str()), &file_name) {
                return Err(match self.layout.doc_of_file(other) {
                    Some(name) => refuse("document", name.as_str()),
                    None => refuse("file", other),
                });
            }
        }
        // A missing or unusable bookkeeping folder holds no record to clash
        // with; the operation that needs it reports it.
        let Ok(Some(book)) = self.layout.book(Some(dir), run) else {
            return Ok(());
        };
        let records = book
            .entries()
            .map_err(|e| io_error("listing the bookkeeping folder", book.path(), e))?;
        let record = lease_file_name(&LockKey::Doc(run.clone(), doc.clone()));
        if let Some(other) = case::twin(records.iter().map(|e| e.name.as_str()), &record) {
            return Err(match lock_key_of_file(run, other) {
                Some(LockKey::Doc(_, name)) => {
                    refuse("lease record of the document", name.as_str())
                }
                _ => refuse("lease record", other),
            });
        }
        Ok(())
    }

    fn record(
        &self,
        book: &Folder,
        key: &LockKey,
        exclusive: bool,
        create: bool,
    ) -> Result<Option<LeaseFile>, Error> {
        LeaseFile::open(
            book,
            &lease_file_name(key),
            exclusive,
            create,
            self.lock_timeout,
        )
    }

    fn record_created(&self, book: &Folder, key: &LockKey) -> Result<LeaseFile, Error> {
        self.record_created_within(book, key, self.lock_timeout)
    }

    /// [`record_created`](Self::record_created), waiting at most `wait` for
    /// its lock. A document's record is created under the run's records
    /// lock, let go before the record is locked (see [`crate::layout`]): a
    /// batch holding it may be writing the document without a record.
    fn record_created_within(
        &self,
        book: &Folder,
        key: &LockKey,
        wait: Duration,
    ) -> Result<LeaseFile, Error> {
        let name = lease_file_name(key);
        if matches!(key, LockKey::Run(_)) {
            // No write relies on a run record's absence: it is created as
            // it is locked.
            return LeaseFile::open(book, &name, true, true, wait)?.ok_or_else(missing_record);
        }
        let start = Instant::now();
        if let Some(record) = LeaseFile::open(book, &name, true, false, wait)? {
            return Ok(record);
        }
        {
            // Let go before the record is locked: whoever holds the
            // records lock never waits for a record, so the two locks
            // cannot wait for each other in a circle.
            let left = wait.saturating_sub(start.elapsed());
            let _records = BookLock::take(book, RECORDS_LOCK, left)?;
            book.open_file(&name, Access::Create)?;
        }
        LeaseFile::open(
            book,
            &name,
            true,
            false,
            wait.saturating_sub(start.elapsed()),
        )?
        .ok_or_else(missing_record)
    }

    /// The right to change the document of `key` without creating its
    /// record, for a delete: its record, locked, or, when it has none, the
    /// run's records lock with the record found absent under it, as a
    /// batch writes (see [`crate::layout`]). A record that appears while
    /// the records lock is taken, and is busy, is waited for without that
    /// lock; all within the store's lock timeout.
    fn doc_access(&self, book: &Folder, key: &LockKey) -> Result<DocAccess, Error> {
        let name = lease_file_name(key);
        let start = Instant::now();
        let left = || self.lock_timeout.saturating_sub(start.elapsed());
        loop {
            if let Some(record) = LeaseFile::open(book, &name, true, false, left())? {
                return Ok(DocAccess::record(record));
            }
            let records = BookLock::take(book, RECORDS_LOCK, left())?;
            match LeaseFile::open(book, &name, true, false, Duration::ZERO) {
                Ok(None) => {
                    return Ok(DocAccess {
                        _record: None,
                        _records: Some(records),
                    });
                }
                Ok(Some(record)) => return Ok(DocAccess::record(record)),
                // Created and held since: waited for, but never while the
                // records lock is held, and never past the timeout.
                Err(error) if error.kind() == ErrorKind::Timeout && !left().is_zero() => {
                    drop(records);
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The bound of a read: the caller's limit, never above the store's.
    fn read_limit(&self, asked: Option<u64>) -> u64 {
        asked.map_or(self.max_document_size, |l| l.min(self.max_document_size))
    }

    /// The version of a stored document, hashed in chunks; `TooLarge` when
    /// it is over the store's limit (it is then not read).
    fn current_version(&self, file: &File, path: &Path) -> Result<Version, Error> {
        let over = |size: u64| {
            Error::new(
                ErrorKind::TooLarge,
                format!(
                    "the stored document is {size} bytes, over the store's limit of {}: \
                     its version cannot be checked",
                    self.max_document_size
                ),
            )
            .with_backend(BACKEND)
        };
        let size = file
            .metadata()
            .map_err(|e| io_error("stat of the document", path, e))?
            .len();
        if size > self.max_document_size {
            return Err(over(size));
        }
        hash_bounded(file, path, self.max_document_size)?
            .ok_or_else(|| over(self.max_document_size.saturating_add(1)))
    }

    /// Makes the run folder's entry durable before the first save this
    /// store makes into it, whoever created the folder (another process
    /// that was killed, or whose own `fsync` failed): an `fsync` of the
    /// root, and of the folder's real parent when a link led there. Done
    /// once per folder (by device, inode and birth time); a failure fails
    /// the save and is retried by the next one.
    fn make_durable(&self, root: &Folder, dir: &Folder) -> Result<(), Error> {
        let id = dir
            .id()
            .map_err(|e| io_error("stat of the run folder", dir.path(), e))?;
        if self
            .synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&id)
        {
            return Ok(());
        }
        self.faults
            .check(SaveStep::RootFsync, root.path())
            .and_then(|()| root.sync())
            .map_err(|e| io_error("fsync of the store root", root.path(), e))?;
        let parent = dir
            .try_open_dir("..")
            .map_err(|e| io_error("opening the run folder's parent", dir.path(), e))?;
        let parent_id = parent
            .id()
            .map_err(|e| io_error("stat of the run folder's parent", dir.path(), e))?;
        let root_id = root
            .id()
            .map_err(|e| io_error("stat of the store root", root.path(), e))?;
        if parent_id != root_id {
            parent
                .sync()
                .map_err(|e| io_error("fsync of the run folder's parent", parent.path(), e))?;
        }
        self.synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
        Ok(())
    }

    /// Opens `doc` of `run` for reading: its run folder, its file name
    /// and the open file, or `None` when either is absent. The spelling is
    /// checked after the open: a document made under another spelling just
    /// before would be what was opened.
    fn open_doc(
        &self,
        run: &RunId,
        doc: &DocName,
    ) -> Result<Option<(Folder, String, File, std::fs::Metadata)>, Error> {
        // On a store that keeps case, a run folder that is a real folder is
        // opened by its path, which spares every read the open and close of
        // the root; anything else (absent, a link, not a folder, a store that
        // ignores case) goes through the root and gets its own answer there.
        let direct = (!self.case.insensitive)
            .then(|| self.layout.open_run_dir_direct(run))
            .flatten();
        let dir = match direct {
            Some(dir) => dir,
            None => {
                let root = self.layout.open_root()?;
                let Some(dir) = self.run_dir(&root, run)? else {
                    return Ok(None);
                };
                dir
            }
        };
        let name = self.layout.file_name(doc);
        let file = dir.open_file_meta(&name, Access::Read)?;
        self.check_doc_case(&dir, run, doc)?;
        Ok(file.map(|(file, meta)| (dir, name, file, meta)))
    }

    pub(crate) fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        limit: Option<u64>,
    ) -> Result<Option<StoredDoc>, Error> {
        let Some((dir, name, file, meta)) = self.open_doc(run, doc)? else {
            return Ok(None);
        };
        let bytes =
            read_bounded_sized(&file, &dir.child(&name), self.read_limit(limit), meta.len())?;
        let version = version_of(&bytes);
        Ok(Some(StoredDoc::new(Bytes::from(bytes), version)))
    }

    /// A document's version, size and modification time, from its
    /// metadata and the run's version index: its bytes are read (hashed in
    /// chunks) only when the index does not remember the file's stamp, and
    /// never for a document over the size limit, which gets the
    /// `over-limit-…` version listings give it. `None` when absent.
    pub(crate) fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>, Error> {
        let Some((dir, name, file, meta)) = self.open_doc(run, doc)? else {
            return Ok(None);
        };
        // One stat for all three: the size and time describe the version.
        let version = self.version_by_meta(&dir, run, &name, &file, &meta)?;
        Ok(Some(DocStat::new(
            version,
            meta.len(),
            meta.modified().ok(),
        )))
    }

    /// Raises the watermark of `key` to `fence` (never lowering it) under
    /// the exclusive `flock` of its record, then, still under it, reads
    /// `doc`. Creates the run folder and the record as a save would.
    pub(crate) fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        limit: Option<u64>,
    ) -> Result<Option<StoredDoc>, Error> {
        if let Some(doc) = doc {
            key.check_covers(key.run(), doc)?;
        }
        let root = self.layout.open_root()?;
        let (dir, book) = self.lease_book(&root, key)?;
        let mut record = self.record_created(&book, key)?;
        if let (LockKey::Doc(run, name), Some(dir)) = (key, &dir) {
            // Under the record lock, shared by every spelling where case
            // is ignored.
            self.check_doc_case(dir, run, name)?;
        }
        // A grant of the other lock service is no good while WEPPcloud
        // holds the lock by a lock file: refused before the watermark moves.
        self.check_lock_files(dir.as_ref(), key)?;
        leases::raise_watermark(&mut record, key, fence, Operation::Claim)?;
        let loaded = match doc {
            Some(doc) => self.get(key.run(), doc, limit),
            None => Ok(None),
        };
        drop(record);
        loaded
    }

    /// Reads a document unless its version is `known`. Whether it is
    /// `known` is answered from the run's version index when it remembers
    /// the file's stamp (no content is read); otherwise the content decides
    /// (hashed in chunks when it is over the read limit).
    pub(crate) fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        limit: Option<u64>,
    ) -> Result<Fetched, Error> {
        let Some((dir, name, file, meta)) = self.open_doc(run, doc)? else {
            return Ok(Fetched::Absent);
        };
        let path = dir.child(&name);
        let stamp = Stamp::of(&meta);
        let limit = self.read_limit(limit);
        if meta.len() > self.max_document_size {
            // Never read: its version is made from its metadata.
            if over_limit_version(&stamp) == *known {
                return Ok(Fetched::Unchanged);
            }
            return Err(too_large(meta.len(), limit));
        }
        let read = |file: &File| -> Result<Fetched, Error> {
            let bytes = read_bounded_sized(file, &path, limit, meta.len())?;
            let version = version_of(&bytes);
            Ok(Fetched::Changed(StoredDoc::new(
                Bytes::from(bytes),
                version,
            )))
        };
        let remembered = self.run_index(&dir, run)?;
        if let Some(version) = remembered.index.version(&name, &stamp) {
            if version == known.as_str() {
                return Ok(Fetched::Unchanged);
            }
            return read(&file);
        }
        // Not remembered (new, changed, or too fresh for its times to prove
        // anything): the content decides, read once.
        let before = now_ns();
        if meta.len() <= limit {
            let bytes = read_bounded_sized(&file, &path, limit, meta.len())?;
            let version = version_of(&bytes);
            self.remember(remembered, &name, &file, stamp, before, &version);
            return Ok(if version == *known {
                Fetched::Unchanged
            } else {
                Fetched::Changed(StoredDoc::new(Bytes::from(bytes), version))
            });
        }
        // Over the caller's limit: hashed in chunks, never held.
        let Some(version) = hash_bounded(&file, &path, self.max_document_size)? else {
            return Err(too_large(meta.len(), limit));
        };
        self.remember(remembered, &name, &file, stamp, before, &version);
        if version == *known {
            Ok(Fetched::Unchanged)
        } else {
            Err(too_large(meta.len(), limit))
        }
    }

    /// The version index of a run folder (from memory, else from its
    /// bookkeeping folder, never created), with what is needed to update
    /// it.
    fn run_index(&self, dir: &Folder, run: &RunId) -> Result<Remembered, Error> {
        let id = dir
            .id()
            .map_err(|e| io_error("stat of the run folder", dir.path(), e))?;
        let book = self.layout.book(Some(dir), run).unwrap_or_else(|error| {
            tracing::warn!(%error, "reading without the document version index");
            None
        });
        let index = match self.indexes.get(&id) {
            Some(index) => index,
            None => {
                let index = Arc::new(book.as_ref().map(RunIndex::load).unwrap_or_default());
                self.indexes.put(id, Arc::clone(&index));
                index
            }
        };
        Ok(Remembered { id, book, index })
    }

    /// Remembers the version of `file` (whose stamp was `stamp` when it
    /// was hashed, starting at `before`) when its times are settled and
    /// unchanged since: in memory, and in the bookkeeping folder if there
    /// is one (never created by a read).
    fn remember(
        &self,
        mut remembered: Remembered,
        file_name: &str,
        file: &File,
        stamp: Stamp,
        before: i128,
        version: &Version,
    ) {
        let unchanged = file.metadata().is_ok_and(|m| Stamp::of(&m) == stamp);
        if !unchanged || !stamp.is_settled(before) {
            return;
        }
        if Arc::make_mut(&mut remembered.index).record(file_name, stamp, version.as_str()) {
            if let Some(book) = &remembered.book {
                remembered.index.save(book);
            }
            self.indexes.put(remembered.id, remembered.index);
        }
    }

    /// The version of the open document `file`, named `file_name` in the
    /// run folder `dir`: from the run's version index while it remembers
    /// the file's stamp, else hashed in chunks (and remembered once its
    /// times are settled); an `over-limit-…` version made from its
    /// metadata for a document over the size limit, which is not read.
    pub(crate) fn file_version(
        &self,
        dir: &Folder,
        run: &RunId,
        file_name: &str,
        file: &File,
    ) -> Result<Version, Error> {
        let path = dir.child(file_name);
        let meta = file
            .metadata()
            .map_err(|e| io_error("stat of the document", &path, e))?;
        self.version_by_meta(dir, run, file_name, file, &meta)
    }

    /// [`file_version`](Self::file_version) with the file's metadata
    /// already taken.
    fn version_by_meta(
        &self,
        dir: &Folder,
        run: &RunId,
        file_name: &str,
        file: &File,
        meta: &std::fs::Metadata,
    ) -> Result<Version, Error> {
        let path = dir.child(file_name);
        let stamp = Stamp::of(meta);
        if meta.len() > self.max_document_size {
            return Ok(over_limit_version(&stamp));
        }
        let remembered = self.run_index(dir, run)?;
        if let Some(version) = remembered.index.version(file_name, &stamp) {
            return Ok(Version::new(version));
        }
        let before = now_ns();
        let Some(version) = hash_bounded(file, &path, self.max_document_size)? else {
            return Ok(over_limit_version(&stamp));
        };
        self.remember(remembered, file_name, file, stamp, before, &version);
        Ok(version)
    }

    /// The versions of `docs` of `run` now (`None` for one that does not
    /// exist), read through the version index; a document that cannot be
    /// read (its permissions, a link or FIFO planted in its place) is left
    /// out of them and marks the answer [`VersionsNow::unreadable`].
    /// Creates nothing.
    pub(crate) fn versions_now(&self, run: &RunId, docs: &[DocName]) -> Result<VersionsNow, Error> {
        let root = self.layout.open_root()?;
        let Some(dir) = self.layout.run_dir(&root, run)? else {
            return Ok(VersionsNow {
                found: docs.iter().map(|d| (d.clone(), None)).collect(),
                unreadable: false,
            });
        };
        let mut now = VersionsNow {
            found: Vec::with_capacity(docs.len()),
            unreadable: false,
        };
        for doc in docs {
            let name = self.layout.file_name(doc);
            let version = dir.open_file(&name, Access::Read).and_then(|file| {
                file.map(|f| self.file_version(&dir, run, &name, &f))
                    .transpose()
            });
            match version {
                Ok(version) => now.found.push((doc.clone(), version)),
                Err(error) => {
                    tracing::debug!(%error, %run, %doc, "a watched document cannot be read");
                    now.unreadable = true;
                }
            }
        }
        Ok(now)
    }

    /// Saves `bytes`; with `release_after`, also frees `lease` (the
    /// combined save-and-release): under the same record lock after the
    /// save, or, when the save fails for any reason but a lost lease,
    /// whatever the step it failed at.
    pub(crate) fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        fences: Fences<'_>,
        release_after: bool,
    ) -> Result<Version, Error> {
        let mut released = false;
        let outcome = self.save(run, doc, bytes, mode, fences, release_after, &mut released);
        if release_after
            && !released
            && let (Err(error), Some(lease)) = (&outcome, fences.lease)
            && !error.is_lease_lost()
            && let Err(release) = self.release(lease)
        {
            tracing::debug!(%release, "release after a failed save");
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn save(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        fences: Fences<'_>,
        release_after: bool,
        released: &mut bool,
    ) -> Result<Version, Error> {
        for lease in fences.lease.iter().chain(fences.foreign.iter()) {
            lease.key().check_covers(run, doc)?;
        }
        if bytes.len() as u64 > self.max_document_size {
            return Err(too_large(bytes.len() as u64, self.max_document_size));
        }
        let root = self.layout.open_root()?;
        let dir = self.ensure_run_dir(&root, run)?;
        // Before anything is written; checked again under the record lock.
        let doc_key = LockKey::Doc(run.clone(), doc.clone());
        self.check_doc_writable(&dir, run, doc, &doc_key)?;
        self.make_durable(&root, &dir)
            .map_err(|e| e.with_run(run))?;
        let file_name = self.layout.file_name(doc);
        // Written and synced before taking any lock, so the lock is held
        // only for the check, the rename and the folder sync.
        let staged = self.stage(&dir, &file_name, bytes)?;
        let book = self.layout.ensure_book(Some(&dir), run)?;

        // Lock order: the run's record before any document's record.
        let run_key = LockKey::Run(run.clone());
        let by_run = |lease: Option<&Lease>| lease.is_some_and(|l| l.key() == &run_key);
        let mut run_record = if by_run(fences.lease) || by_run(fences.foreign) {
            Some(self.record_created(&book, &run_key)?)
        } else {
            None
        };
        let mut doc_record = self.record_created(&book, &doc_key)?;

        // The fences first, before the mode: a stale holder learns that it
        // is stale, not that the document changed.
        let now = Now::take();
        if let Some(lease) = fences.lease {
            let record = pick(&mut run_record, &mut doc_record, lease);
            if !record.record.is_current(lease, &now) {
                return Err(fenced(lease, &record.record, &now));
            }
        }
        if let Some(foreign) = fences.foreign {
            let record = pick(&mut run_record, &mut doc_record, foreign);
            leases::check_watermark(record, foreign.key(), foreign.fence(), Operation::Put)?;
        }
        let outcome = (|| {
            // Under the record lock, which on a file system that ignores
            // case is the lock of every spelling of the document: a save
            // of another spelling cannot slip in between. WEPPcloud's
            // markers, again right before the rename.
            self.check_doc_writable(&dir, run, doc, &doc_key)?;
            let previous = dir.open_file(&file_name, Access::Read)?;
            self.check_mode(mode, previous.as_ref(), &dir, &file_name)?;
            // Raised before the rename, under the same lock: once the save
            // is visible, no lease below its fence can save any more, and
            // a watermark that cannot be written stops the save.
            if let Some(foreign) = fences.foreign {
                let record = pick(&mut run_record, &mut doc_record, foreign);
                leases::raise_watermark(record, foreign.key(), foreign.fence(), Operation::Put)?;
            }
            self.weppcloud_marks(&dir, &file_name, &staged, previous.as_ref())?;
            let conditional = *mode != PutMode::Overwrite;
            staged.place(&file_name, previous.as_ref(), conditional, &self.faults)?;
            Ok(version_of(bytes))
        })();
        if release_after && let Some(lease) = fences.lease {
            let record = pick(&mut run_record, &mut doc_record, lease);
            match leases::release(record, lease) {
                Ok(()) => *released = true,
                Err(error) => tracing::debug!(%error, "release after save"),
            }
        }
        outcome
    }

    /// The checks of a write of `doc` that do not depend on its mode, made
    /// before it is staged and again under its record: the spelling (where
    /// case is ignored), then WEPPcloud's `READONLY` marker and lock files.
    fn check_doc_writable(
        &self,
        dir: &Folder,
        run: &RunId,
        doc: &DocName,
        key: &LockKey,
    ) -> Result<(), Error> {
        self.check_doc_case(dir, run, doc)?;
        self.check_writable(dir, run)?;
        self.check_lock_files(Some(dir), key)
    }

    /// `bytes` written and synced to a temporary file beside `file_name`,
    /// with the permission bits of the document it replaces (checked again
    /// under the record when renamed).
    fn stage<'d>(
        &self,
        dir: &'d Folder,
        file_name: &str,
        bytes: &[u8],
    ) -> Result<Staged<'d>, Error> {
        let keep_mode = self.mode_to_keep(dir, file_name);
        Staged::write(dir, file_name, bytes, keep_mode, &self.faults)
    }

    /// The permission bits of the document `file_name` in `dir`, which a
    /// new version keeps (`None` when there is none, or it cannot be read).
    fn mode_to_keep(&self, dir: &Folder, file_name: &str) -> Option<u32> {
        match dir.open_file(file_name, Access::Read) {
            Ok(Some(file)) => permission_bits(&file).ok(),
            _ => None,
        }
    }

    /// Whether a write in `mode` may replace `previous`, the document as
    /// opened under its record (`None`: there is none).
    fn check_mode(
        &self,
        mode: &PutMode,
        previous: Option<&File>,
        dir: &Folder,
        file_name: &str,
    ) -> Result<(), Error> {
        match (mode, previous) {
            (PutMode::Overwrite, _) | (PutMode::Create, None) => Ok(()),
            (PutMode::Create, Some(_)) => Err(Error::new(
                ErrorKind::AlreadyExists,
                "the document already exists",
            )
            .with_backend(BACKEND)),
            (PutMode::Update(_), None) => Err(precondition("the document does not exist")),
            (PutMode::Update(expected), Some(file)) => {
                let current = self.current_version(file, &dir.child(file_name))?;
                if current == *expected {
                    Ok(())
                } else {
                    Err(precondition(format!(
                        "stored version {current} is not the expected {expected}"
                    )))
                }
            }
        }
    }

    /// In WEPPcloud mode, right before the rename: the new bytes never show
    /// under the old modification time, and a new run is never taken for
    /// a legacy one.
    fn weppcloud_marks(
        &self,
        dir: &Folder,
        file_name: &str,
        staged: &Staged<'_>,
        previous: Option<&File>,
    ) -> Result<(), Error> {
        if !self.weppcloud {
            return Ok(());
        }
        match previous {
            Some(file) => {
                let meta = file
                    .metadata()
                    .map_err(|e| io_error("stat of the document", &dir.child(file_name), e))?;
                weppcloud::advance_signature(staged.file(), &staged.path(), &meta)
            }
            None => weppcloud::mark_new_run(dir, &self.layout),
        }
    }

    /// Writes `puts` into `run`, each document all or nothing and on its own
    /// mode, as [`put`](Self::put) would one by one (unfenced), with one
    /// `fsync` of the run folder per group of writes instead of one per
    /// document (see [`put_group`](Self::put_group)). Writes of one
    /// document go in order, one per group (`batch::waves`), so each sees
    /// the outcome of the one before.
    ///
    /// # Errors
    /// Each write's own error in its slot. The whole call fails when the
    /// store's root, the run's folder or its bookkeeping folder cannot be
    /// opened, made or made durable (a write into that run could not
    /// succeed either); the results of groups written before are then not
    /// reported, as with the SQL backend's batches.
    pub(crate) fn put_many(
        &self,
        run: &RunId,
        puts: &[PutRequest],
    ) -> Result<Vec<Result<Version, Error>>, Error> {
        let mut results: Vec<Option<Result<Version, Error>>> = puts.iter().map(|_| None).collect();
        for wave in waves(puts, 0..puts.len()) {
            for group in groups(puts, &wave, BATCH_ITEMS, BATCH_BYTES) {
                self.put_group(run, puts, group, &mut results)?;
            }
        }
        Ok(settle(
            results,
            puts.iter().map(|put| &put.doc),
            Operation::Put,
            run,
            || Error::new(ErrorKind::Backend, "a batched write was not made").with_backend(BACKEND),
        ))
    }

    /// Writes one group of distinct documents of `run` (`group`, indices
    /// into `puts`), setting `results` for each. Every document is first
    /// checked, staged and synced, as [`save`](Self::save) does, before any
    /// record is taken. Then the records of all of them are tried once, in
    /// the order of their file names (folded where the store ignores case,
    /// so two groups never wait for each other in a circle). A document
    /// that has no record gets none: it is written under the run's records
    /// lock instead, held as records are (see [`crate::layout`]; a
    /// migration into this store then creates one file per document, not
    /// two). That lock is only tried while the group holds records; when
    /// busy, it is waited for after them, holding none. Under the records
    /// (or that lock) each document is checked as `save` checks it and
    /// renamed into place (a refused one lets go of its record at once),
    /// and one `fsync` of the folder makes every rename durable. Should it
    /// fail, every renamed document is put back and each of those writes
    /// fails. The records of renamed documents (or the records lock) are
    /// held until then, so no other writer replaces a document that may
    /// still be put back. Only then, holding no other record, does the
    /// group wait for the records that were busy, one at a time and in the
    /// same order, each written the same way on its own, all within one
    /// lock timeout from the first try: a record still busy then fails its
    /// write only. (Waiting while holding the others kept up to fifteen
    /// idle documents locked, their leases' renewals included, behind one
    /// stuck holder.)
    ///
    /// Renames happen in the records' order (documents with a free record,
    /// then those without one, then those that were busy), not the
    /// requests': a reader may see a later write of the group before an
    /// earlier one.
    fn put_group(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
        results: &mut [Option<Result<Version, Error>>],
    ) -> Result<(), Error> {
        let mut pending = Vec::with_capacity(group.len());
        for &i in group {
            let len = puts[i].bytes.len() as u64;
            if len > self.max_document_size {
                results[i] = Some(Err(too_large(len, self.max_document_size)));
            } else {
                pending.push(i);
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let root = self.layout.open_root()?;
        let dir = self.ensure_run_dir(&root, run)?;
        if self.case.insensitive {
            // Two spellings of one name are one file (and one record) on
            // this file system: the later write is refused, as a save of it
            // after the first one would be, and no record is taken twice.
            let mut first: HashMap<String, usize> = HashMap::new();
            pending.retain(|&i| {
                let doc = puts[i].doc.as_str();
                match first.entry(doc.to_ascii_lowercase()) {
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                        true
                    }
                    Entry::Occupied(twin) => {
                        let existing = puts[*twin.get()].doc.as_str();
                        results[i] = Some(Err(case::conflict(
                            &self.case, "document", doc, "document", existing, &dir,
                        )));
                        false
                    }
                }
            });
        }
        // Written and synced before taking any record, as in `save`: all
        // written first, each file's writeback started as it is, then each
        // synced (see `writeback`: the `fsync`s then overlap on the disk).
        let mut written = Vec::with_capacity(pending.len());
        for i in pending {
            let doc = &puts[i].doc;
            let key = LockKey::Doc(run.clone(), doc.clone());
            let file_name = self.layout.file_name(doc);
            let outcome = self
                .check_doc_writable(&dir, run, doc, &key)
                .and_then(|()| {
                    Staged::write_unsynced(
                        &dir,
                        &file_name,
                        &puts[i].bytes,
                        self.mode_to_keep(&dir, &file_name),
                        &self.faults,
                    )
                });
            match outcome {
                Ok(file) => written.push((i, key, file_name, file)),
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        let mut staged = Vec::with_capacity(written.len());
        for (i, key, file_name, file) in written {
            match file.sync(&self.faults) {
                Ok(file) => staged.push((i, key, file_name, file)),
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        if staged.is_empty() {
            return Ok(());
        }
        self.make_durable(&root, &dir)
            .map_err(|e| e.with_run(run))?;
        let book = self.layout.ensure_book(Some(&dir), run)?;
        staged.sort_by_cached_key(|(_, key, _, _)| {
            let name = lease_file_name(key);
            (name.to_ascii_lowercase(), name)
        });
        // No deadline when the timeout is too long to add to the clock (an
        // endless wait, as every other call of this store takes it).
        let deadline = Instant::now().checked_add(self.lock_timeout);
        let left = || {
            deadline.map_or(self.lock_timeout, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            })
        };
        let mut locked = Vec::with_capacity(staged.len());
        let mut busy = Vec::new();
        let mut unrecorded = Vec::new();
        self.try_records(
            &book,
            staged,
            &mut locked,
            &mut busy,
            Some(&mut unrecorded),
            results,
        );
        // Documents without a record are written under the records lock
        // (see `crate::layout`), once it is sure, under it, that theirs
        // still does not exist (one created since is tried as the others
        // were). While the group holds records the lock is only tried: the
        // group's other documents must not wait for it (their leases are
        // renewed under those records). When it is busy, it is waited for
        // once they are written and their records let go.
        let mut records = None;
        if !unrecorded.is_empty()
            && !locked.is_empty()
            && let Ok(lock) = BookLock::take(&book, RECORDS_LOCK, Duration::ZERO)
        {
            let pending = std::mem::take(&mut unrecorded);
            self.try_records(&book, pending, &mut locked, &mut busy, None, results);
            records = Some(lock);
        }
        self.place_group(run, puts, &dir, locked, results);
        drop(records);
        if !unrecorded.is_empty() {
            match BookLock::take(&book, RECORDS_LOCK, left()) {
                Ok(lock) => {
                    let mut locked = Vec::with_capacity(unrecorded.len());
                    self.try_records(&book, unrecorded, &mut locked, &mut busy, None, results);
                    self.place_group(run, puts, &dir, locked, results);
                    drop(lock);
                }
                Err(error) => {
                    // One refusal for all of them: an `Error` is not
                    // `Clone` (its source may not be), so the others get
                    // its kind, message and retryability.
                    for (i, ..) in unrecorded.iter().skip(1) {
                        results[*i] =
                            Some(Err(Error::new(error.kind(), error.message().to_owned())
                                .with_backend(BACKEND)
                                .set_retryable(error.is_retryable())));
                    }
                    results[unrecorded[0].0] = Some(Err(error));
                }
            }
        }
        for (i, key, file_name, written) in busy {
            // A record still busy at the deadline fails its write only;
            // the staged file goes with it.
            match self.record_created_within(&book, &key, left()) {
                Ok(record) => {
                    self.place_group(
                        run,
                        puts,
                        &dir,
                        vec![(i, key, file_name, written, Some(record))],
                        results,
                    );
                }
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        Ok(())
    }

    /// Tries the record of each document of `staged` without waiting: one
    /// free is taken (into `locked`), one busy is waited for later
    /// (`busy`), one missing goes to `missing`, or, when that is `None` (the
    /// records lock is held), into `locked` without a record; an error is
    /// the write's result.
    fn try_records<'d>(
        &self,
        book: &Folder,
        staged: Vec<Staging<'d>>,
        locked: &mut Vec<Placing<'d>>,
        busy: &mut Vec<Staging<'d>>,
        mut missing: Option<&mut Vec<Staging<'d>>>,
        results: &mut [Option<Result<Version, Error>>],
    ) {
        for (i, key, file_name, written) in staged {
            let tried = LeaseFile::open(book, &lease_file_name(&key), true, false, Duration::ZERO);
            match (tried, missing.as_deref_mut()) {
                (Ok(None), Some(missing)) => missing.push((i, key, file_name, written)),
                (Ok(record), _) => locked.push((i, key, file_name, written, record)),
                (Err(error), _) if error.kind() == ErrorKind::Timeout => {
                    busy.push((i, key, file_name, written));
                }
                (Err(error), _) => results[i] = Some(Err(error)),
            }
        }
    }

    /// Checks and renames into place the staged documents of `locked`
    /// (indices into `puts`, each with its record held), then makes the
    /// renames durable with one `fsync` of `dir`, putting every one back
    /// if it fails, and sets each write's result; the records are let go
    /// last (see [`put_group`](Self::put_group)).
    fn place_group(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        dir: &Folder,
        locked: Vec<Placing<'_>>,
        results: &mut [Option<Result<Version, Error>>],
    ) {
        let mut placed = Vec::with_capacity(locked.len());
        for (i, key, file_name, written, record) in locked {
            let put = &puts[i];
            let renamed = (|| {
                // Again under the record, as in `save`.
                self.check_doc_writable(dir, run, &put.doc, &key)?;
                let previous = dir.open_file(&file_name, Access::Read)?;
                self.check_mode(&put.mode, previous.as_ref(), dir, &file_name)?;
                self.weppcloud_marks(dir, &file_name, &written, previous.as_ref())?;
                let conditional = put.mode != PutMode::Overwrite;
                written.rename_over(&file_name, previous.as_ref(), conditional, &self.faults)?;
                Ok(previous)
            })();
            match renamed {
                Ok(previous) => placed.push((i, file_name, previous, record)),
                // Its record is let go here, at once.
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        if placed.is_empty() {
            return;
        }
        let targets: Vec<(&str, Option<&File>)> = placed
            .iter()
            .map(|(_, name, previous, _)| (name.as_str(), previous.as_ref()))
            .collect();
        let synced = sync_placed(dir, &targets, &self.faults);
        for (i, _, _, _) in &placed {
            results[*i] = Some(match &synced {
                Ok(()) => Ok(version_of(&puts[*i].bytes)),
                Err(e) => Err(io_error(
                    "fsync of the run folder",
                    dir.path(),
                    e.raw_os_error().map_or_else(
                        || std::io::Error::new(e.kind(), e.to_string()),
                        std::io::Error::from_raw_os_error,
                    ),
                )),
            });
        }
        // Only now, with every document durable or put back, are their
        // records let go.
        drop(placed);
    }

    pub(crate) fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool, Error> {
        let root = self.layout.open_root()?;
        let Some(dir) = self.run_dir(&root, run)? else {
            return Ok(false);
        };
        let name = self.layout.file_name(doc);
        let found = dir.open_file(&name, Access::Read)?.is_some();
        self.check_doc_case(&dir, run, doc)?;
        if !found {
            return Ok(false);
        }
        let doc_key = LockKey::Doc(run.clone(), doc.clone());
        let book = self.layout.ensure_book(Some(&dir), run)?;
        let _access = self.doc_access(&book, &doc_key)?;
        self.check_doc_case(&dir, run, doc)?;
        self.check_writable(&dir, run)?;
        self.check_lock_files(Some(&dir), &doc_key)?;
        let Some(file) = dir.open_file(&name, Access::Read)? else {
            return Ok(false);
        };
        if let Some(expected) = if_version {
            let current = self.current_version(&file, &dir.child(&name))?;
            if current != *expected {
                return Err(precondition(format!(
                    "stored version {current} is not the expected {expected}; nothing was deleted"
                )));
            }
        }
        match dir.unlink(&name) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(io_error("removing the document", &dir.child(&name), e)),
        }
        dir.sync()
            .map_err(|e| io_error("fsync of the run folder", dir.path(), e))?;
        Ok(true)
    }

    /// The documents in a run folder (regular files named `<doc>.<ext>`),
    /// with their file names, sorted.
    fn doc_names(&self, dir: &Folder) -> Result<Vec<(DocName, String)>, Error> {
        let entries = dir
            .entries()
            .map_err(|e| io_error("listing the run folder", dir.path(), e))?;
        let mut names: Vec<(DocName, String)> = entries
            .into_iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| Some((self.layout.doc_of_file(&e.name)?, e.name)))
            .collect();
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(names)
    }

    fn has_docs(&self, dir: &Folder) -> Result<bool, Error> {
        let entries = dir
            .entries()
            .map_err(|e| io_error("listing the run folder", dir.path(), e))?;
        Ok(entries
            .iter()
            .any(|e| e.kind == Kind::File && self.layout.doc_of_file(&e.name).is_some()))
    }

    /// Lists documents with their versions, from the run's version index
    /// where it still describes the file (see [`crate::index`]), else by
    /// hashing the file in chunks. A document over the size limit is
    /// listed with its size and an `over-limit-…` version made from its
    /// metadata, without being read.
    pub(crate) fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>, Error> {
        let root = self.layout.open_root()?;
        let Some(dir) = self.run_dir(&root, run)? else {
            return Ok(ListPage::new(Vec::new(), false));
        };
        let limit = limit.max(1);
        let names = self.doc_names(&dir)?;
        let present: HashSet<&str> = names.iter().map(|(_, file)| file.as_str()).collect();
        let mut page: Vec<&(DocName, String)> = names
            .iter()
            .filter(|(name, _)| after.is_none_or(|after| name > after))
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);

        let id = dir
            .id()
            .map_err(|e| io_error("stat of the run folder", dir.path(), e))?;
        // Never created by a read: without it, versions stay in memory. A
        // listing does not need it otherwise, so one that cannot be opened
        // (a planted link, say) only costs the remembered versions.
        let book = self.layout.book(Some(&dir), run).unwrap_or_else(|error| {
            tracing::warn!(%error, "listing without the document version index");
            None
        });
        let mut index = self
            .indexes
            .get(&id)
            .unwrap_or_else(|| Arc::new(book.as_ref().map(RunIndex::load).unwrap_or_default()));
        let mut changed = false;
        let mut items = Vec::with_capacity(page.len());
        for (name, file_name) in page {
            let path = dir.child(file_name);
            // A document deleted since the folder was read is skipped.
            let Some(file) = dir.open_file(file_name, Access::Read)? else {
                continue;
            };
            let meta = file
                .metadata()
                .map_err(|e| io_error("stat of the document", &path, e))?;
            let stamp = Stamp::of(&meta);
            let version = if meta.len() > self.max_document_size {
                over_limit_version(&stamp)
            } else if let Some(version) = index.version(file_name, &stamp) {
                Version::new(version)
            } else {
                let before = now_ns();
                match hash_bounded(&file, &path, self.max_document_size)? {
                    // It grew past the limit while being read.
                    None => over_limit_version(&stamp),
                    Some(version) => {
                        let after = file
                            .metadata()
                            .map_err(|e| io_error("stat of the document", &path, e))?;
                        if Stamp::of(&after) == stamp && stamp.is_settled(before) {
                            changed |= Arc::make_mut(&mut index).record(
                                file_name,
                                stamp,
                                version.as_str(),
                            );
                        }
                        version
                    }
                }
            };
            items.push(DocMeta::new(
                name.clone(),
                version,
                meta.len(),
                meta.modified().ok(),
            ));
        }
        if index.has_others(|file| present.contains(file)) {
            changed |= Arc::make_mut(&mut index).retain(|file| present.contains(file));
        }
        if changed && let Some(book) = &book {
            index.save(book);
        }
        self.indexes.put(id, index);
        Ok(ListPage::new(items, more))
    }

    /// Sorted ids of the folders and links under the root (run folders
    /// with or without documents), read again only when the root changed:
    /// paging through every run is then linear, not quadratic. The listing
    /// is remembered only when the root's times are settled (see
    /// [`Stamp::is_settled`]), so a run folder created within a timestamp
    /// tick of the read is never missed.
    fn run_ids(&self, root: &Folder) -> Result<Arc<RunListing>, Error> {
        use std::os::unix::fs::MetadataExt;
        let meta = root
            .metadata()
            .map_err(|e| io_error("stat of the store root", root.path(), e))?;
        let (dev, stamp) = (meta.dev(), Stamp::of(&meta));
        if let Some(cached) = &*self
            .root_listing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            && cached.dev == dev
            && cached.stamp == stamp
        {
            return Ok(Arc::clone(&cached.runs));
        }
        let before = now_ns();
        self.root_scans.fetch_add(1, Ordering::Relaxed);
        let entries = root
            .entries()
            .map_err(|e| io_error("listing the store root", root.path(), e))?;
        let mut runs: Vec<RunId> = entries
            .into_iter()
            .filter(|e| matches!(e.kind, Kind::Folder | Kind::Link))
            .filter_map(|e| RunId::new(e.name).ok())
            .collect();
        runs.sort_unstable();
        let folded = if self.case.insensitive {
            runs.iter()
                .enumerate()
                .map(|(i, run)| (run.as_str().to_ascii_lowercase(), i))
                .collect()
        } else {
            HashMap::new()
        };
        let runs = Arc::new(RunListing { runs, folded });
        if stamp.is_settled(before) {
            *self
                .root_listing
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(RootListing {
                dev,
                stamp,
                runs: Arc::clone(&runs),
            });
        }
        Ok(runs)
    }

    pub(crate) fn list_runs(
        &self,
        after: Option<&RunId>,
        limit: usize,
    ) -> Result<ListPage<RunId>, Error> {
        let limit = limit.max(1);
        let root = self.layout.open_root()?;
        let listing = self.run_ids(&root)?;
        let runs = &listing.runs;
        let start = after.map_or(0, |after| runs.partition_point(|run| run <= after));
        let mut items = Vec::new();
        for run in &runs[start..] {
            // One run folder that cannot be read must not hide the others.
            let dir = match self.layout.run_dir(&root, run) {
                Ok(Some(dir)) => dir,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%run, %error, "skipping a run folder while listing runs");
                    continue;
                }
            };
            match self.has_docs(&dir) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(%run, %error, "skipping an unreadable run folder while listing runs");
                    continue;
                }
            }
            if items.len() == limit {
                return Ok(ListPage::new(items, true));
            }
            items.push(run.clone());
        }
        Ok(ListPage::new(items, false))
    }

    pub(crate) fn delete_run(&self, run: &RunId) -> Result<u64, Error> {
        let root = self.layout.open_root()?;
        let Some(dir) = self.run_dir(&root, run)? else {
            return Ok(0);
        };
        let docs = self.doc_names(&dir)?;
        let mut deleted = 0;
        if !docs.is_empty() {
            // Nothing is deleted from a read-only run or while WEPPcloud
            // holds any document of it by a lock file.
            self.check_writable(&dir, run)?;
            self.check_lock_files(Some(&dir), &LockKey::Run(run.clone()))?;
            let book = self.layout.ensure_book(Some(&dir), run)?;
            for (doc, file_name) in docs {
                let key = LockKey::Doc(run.clone(), doc);
                let _access = self.doc_access(&book, &key)?;
                self.check_lock_files(Some(&dir), &key)?;
                match dir.unlink(&file_name) {
                    Ok(()) => deleted += 1,
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        return Err(io_error("removing the document", &dir.child(&file_name), e));
                    }
                }
            }
        }
        // Milestones are the run's metadata: they go with its documents.
        // Status history and lock bookkeeping stay (ids and fences keep
        // increasing).
        if let Some(book) = self.layout.book(Some(&dir), run)? {
            crate::milestones::remove(&book, self.lock_timeout)?;
        }
        self.sweep_dir(&dir, run)?;
        dir.sync()
            .map_err(|e| io_error("fsync of the run folder", dir.path(), e))?;
        Ok(deleted)
    }

    pub(crate) fn try_acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease, Error> {
        leases::check_ttl(ttl, key, Operation::Acquire)?;
        let root = self.layout.open_root()?;
        let (dir, book) = self.lease_book(&root, key)?;
        let mut record = self.record_created(&book, key)?;
        if let (LockKey::Doc(run, doc), Some(dir)) = (key, &dir) {
            // Under the record lock (shared by every spelling where case
            // is ignored), before anything is granted.
            self.check_doc_case(dir, run, doc)?;
        }
        // WEPPcloud's lock file, under the record lock too: nothing is
        // granted while it is there.
        self.check_lock_files(dir.as_ref(), key)?;
        leases::try_acquire(&mut record, key, owner, ttl, issued)
    }

    /// The run folder of `key`'s run and its bookkeeping folder, each if it
    /// exists; on a store that ignores case, refused when the run or the
    /// document of `key` exists only under another spelling. With `held`
    /// (the renewal or release of a grant, whose record exists under its
    /// own spelling), a document file spelled otherwise does not matter: a
    /// lease is always let go.
    fn book(&self, key: &LockKey, held: bool) -> Result<(Option<Folder>, Option<Folder>), Error> {
        let root = self.layout.open_root()?;
        let dir = self.run_dir(&root, key.run())?;
        if let (LockKey::Doc(run, doc), Some(dir)) = (key, &dir) {
            self.check_doc_spelling(dir, run, doc, !held)?;
        }
        let book = self.layout.book(dir.as_ref(), key.run())?;
        Ok((dir, book))
    }

    /// Opens the record of a lease that should exist; a missing run folder
    /// or record means the lease is lost.
    fn held_record(&self, lease: &Lease, op: Operation) -> Result<LeaseFile, Error> {
        let key = lease.key();
        let record = match self.book(key, true)?.1 {
            Some(book) => self.record(&book, key, true, false)?,
            None => None,
        };
        record.ok_or_else(|| {
            Error::lease_lost_because(key, "the lock's record no longer exists", None)
                .with_backend(BACKEND)
                .with_operation(op)
        })
    }

    pub(crate) fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease, Error> {
        leases::check_ttl(ttl, lease.key(), Operation::Renew)?;
        let mut record = self.held_record(lease, Operation::Renew)?;
        leases::renew(&mut record, lease, ttl, issued)
    }

    pub(crate) fn release(&self, lease: &Lease) -> Result<(), Error> {
        let mut record = self.held_record(lease, Operation::Release)?;
        leases::release(&mut record, lease)
    }

    /// The live holder of `key`: its lease, else (on a WEPPcloud
    /// neighbour) the lock file that would refuse an acquire.
    pub(crate) fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, Error> {
        let (dir, book) = self.book(key, false)?;
        let leased = match &book {
            Some(book) => self
                .record(book, key, false, false)?
                .and_then(|record| leases::inspect(&record, key)),
            None => None,
        };
        match (leased, &dir) {
            (Some(info), _) => Ok(Some(info)),
            (None, Some(dir)) if self.weppcloud => weppcloud::key_holder(dir, &self.layout, key),
            (None, _) => Ok(None),
        }
    }

    /// Breaks the lease of `key` and, on a WEPPcloud neighbour, removes the
    /// document's lock file (unless `only_fence` names a grant of runstate's:
    /// a lock file's fence is 0). Returns what was broken: the lease if
    /// there was one, else the lock file.
    pub(crate) fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>, Error> {
        let (dir, book) = self.book(key, false)?;
        let leased = match &book {
            Some(book) => match self.record(book, key, true, false)? {
                Some(mut record) => leases::break_lock(&mut record, key, only_fence)?,
                None => None,
            },
            None => None,
        };
        let lock_file = match (key, &dir) {
            (LockKey::Doc(run, doc), Some(dir))
                if self.weppcloud && only_fence.is_none_or(|f| f.get() == 0) =>
            {
                weppcloud::break_lock_file(dir, &self.layout, run, doc)?
            }
            _ => None,
        };
        Ok(leased.or(lock_file))
    }

    /// The held locks of one run: its leases and (on a WEPPcloud
    /// neighbour) its lock files, sorted by lock.
    fn locks_of(&self, root: &Folder, run: &RunId) -> Result<Vec<LockInfo>, Error> {
        let dir = self.layout.run_dir(root, run)?;
        let mut locks = Vec::new();
        if let Some(book) = self.layout.book(dir.as_ref(), run)? {
            let entries = book
                .entries()
                .map_err(|e| io_error("listing the bookkeeping folder", book.path(), e))?;
            let mut keys: Vec<LockKey> = entries
                .iter()
                .filter(|e| e.kind == Kind::File)
                .filter_map(|e| lock_key_of_file(run, &e.name))
                .collect();
            keys.sort_unstable();
            for key in keys {
                if let Some(info) = self
                    .record(&book, &key, false, false)?
                    .and_then(|r| leases::inspect(&r, &key))
                {
                    locks.push(info);
                }
            }
        }
        if let Some(dir) = &dir
            && self.weppcloud
        {
            locks.extend(weppcloud::run_holders(dir, &self.layout, run)?);
            locks.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Ok(locks)
    }

    pub(crate) fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>, Error> {
        let root = self.layout.open_root()?;
        if let Some(run) = run {
            self.check_run_case(&root, run)?;
            return self.locks_of(&root, run);
        }
        // With a state folder, a run may have leases and no folder yet.
        let mut runs = self.run_ids(&root)?.runs.clone();
        if self.layout.has_state_dir() {
            runs.extend(self.layout.state_runs()?);
            runs.sort_unstable();
            runs.dedup();
        }
        let mut locks = Vec::new();
        for run in &runs {
            // One run folder that cannot be read must not hide the others.
            match self.locks_of(&root, run) {
                Ok(mut found) => locks.append(&mut found),
                Err(error) => {
                    tracing::warn!(%run, %error, "skipping a run folder while listing locks");
                }
            }
        }
        Ok(locks)
    }

    pub(crate) fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        limit: Option<u64>,
        issued: Instant,
    ) -> Result<(Lease, Option<StoredDoc>), Error> {
        leases::check_ttl(ttl, key, Operation::AcquireAndLoad)?;
        key.check_covers(key.run(), doc)?;
        let lease = self.try_acquire(key, owner, ttl, issued)?;
        match self.get(key.run(), doc, limit) {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                if let Err(release) = self.release(&lease) {
                    tracing::debug!(%release, "release after a failed load");
                }
                Err(error)
            }
        }
    }

    /// Removes temporary files of dead writers in every run folder; returns
    /// how many. A run folder that cannot be read is skipped with a
    /// warning.
    pub(crate) fn sweep(&self) -> Result<usize, Error> {
        let root = self.layout.open_root()?;
        // Case probes (see `crate::case`) of processes killed while probing.
        let mut removed = sweep_temps(&root)?;
        for run in &self.run_ids(&root)?.runs {
            let swept = self
                .layout
                .run_dir(&root, run)
                .and_then(|dir| dir.map_or(Ok(0), |dir| self.sweep_dir(&dir, run)));
            match swept {
                Ok(n) => removed += n,
                Err(error) => {
                    tracing::warn!(%run, %error, "skipping a run folder while sweeping");
                }
            }
        }
        // Bookkeeping of runs that have none of their own folder yet.
        for run in self.layout.state_runs()? {
            match self
                .layout
                .book(None, &run)
                .and_then(|book| book.map_or(Ok(0), |book| sweep_temps(&book)))
            {
                Ok(n) => removed += n,
                Err(error) => {
                    tracing::warn!(%run, %error, "skipping a state folder while sweeping");
                }
            }
        }
        Ok(removed)
    }

    /// Removes the temporary files of dead writers in a run folder and its
    /// bookkeeping folder.
    fn sweep_dir(&self, dir: &Folder, run: &RunId) -> Result<usize, Error> {
        let mut removed = sweep_temps(dir)?;
        if let Some(book) = self.layout.book(Some(dir), run)? {
            removed += sweep_temps(&book)?;
        }
        Ok(removed)
    }
}

fn sweep_temps(dir: &Folder) -> Result<usize, Error> {
    let entries = dir
        .entries()
        .map_err(|e| io_error("listing the folder", dir.path(), e))?;
    let mut removed = 0;
    for entry in entries {
        if entry.kind != Kind::File {
            continue;
        }
        let Some((tag, pid, start)) = parse_temp_name(&entry.name) else {
            continue;
        };
        let modified = dir
            .open_file(&entry.name, Access::Read)
            .ok()
            .flatten()
            .and_then(|f| f.metadata().ok())
            .and_then(|m| m.modified().ok());
        if writer_is_gone(tag, pid, start, modified) {
            let path = dir.child(&entry.name);
            match dir.unlink(&entry.name) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %path.display(), "removed a temporary file left by a dead writer");
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(io_error("removing a stale temporary file", &path, e)),
            }
        }
    }
    Ok(removed)
}

/// Whether the process that wrote a temporary file is gone: judged by its
/// pid when it was written in this boot and pid namespace (a live writer,
/// or one this host cannot see, is never gone), else by the file's age.
fn writer_is_gone(tag: &str, pid: u32, start: u64, modified: Option<SystemTime>) -> bool {
    if tag == host_tag()
        && let Some(ours) = current_stamp()
    {
        let stamp = ProcessStamp {
            start_ticks: start,
            ..ours.clone()
        };
        return liveness(pid, &stamp) == Liveness::Dead;
    }
    modified
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > FOREIGN_TEMP_AGE)
}
