//! The blocking implementation of every operation. The async `FileStore`
//! runs each call on Tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use runstate_core::process::{Liveness, ProcessStamp, current_stamp, liveness};
use runstate_core::{
    Bytes, DocMeta, DocName, Error, ErrorKind, Fence, Lease, ListPage, LockInfo, LockKey,
    Operation, Owner, PutMode, RunId, StoredDoc, Version,
};

use crate::BACKEND;
use crate::durable::{Faults, Staged};
use crate::layout::{
    BOOK_DIR, Layout, host_tag, io_error, lock_key_of_file, parse_temp_name, sync_dir, version_of,
};
use crate::leases::{self, LeaseFile, Now, book_dir};

/// Temporary files from another boot or pid namespace are removed once this
/// old, since their writer cannot be checked from here.
const FOREIGN_TEMP_AGE: Duration = Duration::from_secs(3600);

/// The blocking store.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) layout: Layout,
    pub(crate) faults: Faults,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

/// Opens a document for reading without following a symlink in its place.
fn open_doc(path: &Path) -> Result<Option<File>, Error> {
    let flags = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::LOOP) => {
            Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "{} is a symlink; documents must be regular files",
                    path.display()
                ),
            )
            .with_backend(BACKEND))
        }
        Err(e) => Err(io_error("opening the document", path, e)),
    }
}

/// Reads an open document, refusing it before reading when it is larger
/// than `limit`.
fn read_doc(file: &File, path: &Path, limit: Option<u64>) -> Result<Vec<u8>, Error> {
    let meta = file
        .metadata()
        .map_err(|e| io_error("stat of the document", path, e))?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::Backend,
            format!("{} is not a regular file", path.display()),
        )
        .with_backend(BACKEND));
    }
    let size = meta.len();
    let too_large = |size: u64, limit: u64| {
        Error::new(
            ErrorKind::TooLarge,
            format!("document is {size} bytes, over the limit of {limit}"),
        )
        .with_backend(BACKEND)
    };
    if let Some(limit) = limit
        && size > limit
    {
        return Err(too_large(size, limit));
    }
    // The file may grow under a foreign writer; never read past the limit.
    let cap = limit.map_or(u64::MAX, |l| l.saturating_add(1));
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(cap)).unwrap_or(0));
    file.take(cap)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("reading the document", path, e))?;
    if let Some(limit) = limit
        && bytes.len() as u64 > limit
    {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

fn precondition(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Precondition, message.into()).with_backend(BACKEND)
}

fn fenced(lease: &Lease, record: &leases::Record, now: &Now) -> Error {
    let mut error = Error::new(
        ErrorKind::Fenced,
        format!(
            "lease with fence {} is no longer the current grant of its lock; nothing was written",
            lease.fence()
        ),
    )
    .with_backend(BACKEND)
    .with_lock(lease.key());
    if let Some(info) = record.live_info(lease.key(), now) {
        error = error.with_holder(info);
    }
    error
}

fn missing_record() -> Error {
    Error::new(ErrorKind::Backend, "a created lease record was not there").with_backend(BACKEND)
}

impl Engine {
    fn lease_file(
        &self,
        dir: &Path,
        key: &LockKey,
        exclusive: bool,
        create: bool,
    ) -> Result<Option<LeaseFile>, Error> {
        LeaseFile::open(self.layout.lease_path(dir, key), exclusive, create)
    }

    fn lease_file_created(&self, dir: &Path, key: &LockKey) -> Result<LeaseFile, Error> {
        self.lease_file(dir, key, true, true)?
            .ok_or_else(missing_record)
    }

    pub(crate) fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        limit: Option<u64>,
    ) -> Result<Option<StoredDoc>, Error> {
        let Some(dir) = self.layout.run_dir(run)? else {
            return Ok(None);
        };
        let path = dir.join(self.layout.file_name(doc));
        let Some(file) = open_doc(&path)? else {
            return Ok(None);
        };
        let bytes = read_doc(&file, &path, limit)?;
        let version = version_of(&bytes);
        Ok(Some(StoredDoc {
            bytes: Bytes::from(bytes),
            version,
        }))
    }

    /// Saves `bytes`; with `release_after`, also frees `lease` under the
    /// same record lock (the combined save-and-release).
    pub(crate) fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        lease: Option<&Lease>,
        release_after: bool,
    ) -> Result<Version, Error> {
        if let Some(lease) = lease {
            lease.key().check_covers(run, doc)?;
        }
        let dir = self.layout.ensure_run_dir(run)?;
        let file_name = self.layout.file_name(doc);
        let target = dir.join(&file_name);
        // Written and synced before taking any lock, so the lock is held
        // only for the check, the rename and the folder sync.
        let staged = Staged::write(&dir, &file_name, bytes, &self.faults)?;

        // Lock order: the run's record before any document's record.
        let mut run_record = match lease.map(Lease::key) {
            Some(key @ LockKey::Run(_)) => Some(self.lease_file_created(&dir, key)?),
            _ => None,
        };
        let mut doc_record =
            self.lease_file_created(&dir, &LockKey::Doc(run.clone(), doc.clone()))?;
        let record = match &mut run_record {
            Some(run_record) => run_record,
            None => &mut doc_record,
        };

        let now = Now::take();
        if let Some(lease) = lease
            && !record.record.is_current(lease, &now)
        {
            return Err(fenced(lease, &record.record, &now));
        }
        let outcome = (|| {
            let previous = open_doc(&target)?;
            match (mode, &previous) {
                (PutMode::Overwrite, _) => {}
                (PutMode::Create, Some(_)) => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        "the document already exists",
                    )
                    .with_backend(BACKEND));
                }
                (PutMode::Create, None) => {}
                (PutMode::Update(_), None) => {
                    return Err(precondition("the document does not exist"));
                }
                (PutMode::Update(expected), Some(file)) => {
                    let current = version_of(&read_doc(file, &target, None)?);
                    if current != *expected {
                        return Err(precondition(format!(
                            "stored version {current} is not the expected {expected}"
                        )));
                    }
                }
            }
            staged.place(&dir, &target, previous.as_ref(), &self.faults)?;
            Ok(version_of(bytes))
        })();
        if release_after
            && let Some(lease) = lease
            && let Err(error) = leases::release(record, lease)
        {
            tracing::debug!(%error, "release after save");
        }
        outcome
    }

    pub(crate) fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool, Error> {
        let Some(dir) = self.layout.run_dir(run)? else {
            return Ok(false);
        };
        let target = dir.join(self.layout.file_name(doc));
        if open_doc(&target)?.is_none() {
            return Ok(false);
        }
        let _record = self.lease_file_created(&dir, &LockKey::Doc(run.clone(), doc.clone()))?;
        let Some(file) = open_doc(&target)? else {
            return Ok(false);
        };
        if let Some(expected) = if_version {
            let current = version_of(&read_doc(&file, &target, None)?);
            if current != *expected {
                return Err(precondition(format!(
                    "stored version {current} is not the expected {expected}; nothing was deleted"
                )));
            }
        }
        match fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("removing the document", &target, e)),
        }
        sync_dir(&dir).map_err(|e| io_error("fsync of the run folder", &dir, e))?;
        Ok(true)
    }

    /// The sorted document names in a run folder.
    fn doc_names(&self, dir: &Path) -> Result<Vec<DocName>, Error> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("listing the run folder", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing the run folder", dir, e))?;
            let Some(name) = self.layout.doc_of_file(&entry.file_name()) else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                names.push(name);
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    fn has_docs(&self, dir: &Path) -> Result<bool, Error> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("listing the run folder", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing the run folder", dir, e))?;
            if self.layout.doc_of_file(&entry.file_name()).is_some()
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(crate) fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>, Error> {
        let Some(dir) = self.layout.run_dir(run)? else {
            return Ok(ListPage {
                items: Vec::new(),
                more: false,
            });
        };
        let limit = limit.max(1);
        let mut names = self.doc_names(&dir)?;
        if let Some(after) = after {
            names.retain(|n| n > after);
        }
        let more = names.len() > limit;
        names.truncate(limit);
        let mut items = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(self.layout.file_name(&name));
            // A document deleted since the folder was read is skipped.
            let Some(file) = open_doc(&path)? else {
                continue;
            };
            let bytes = read_doc(&file, &path, None)?;
            items.push(DocMeta {
                name,
                version: version_of(&bytes),
                size: bytes.len() as u64,
            });
        }
        Ok(ListPage { items, more })
    }

    /// Sorted ids of the run folders under the root (with or without
    /// documents).
    fn run_ids(&self) -> Result<Vec<RunId>, Error> {
        let root = &self.layout.root;
        let entries =
            fs::read_dir(root).map_err(|e| io_error("listing the store root", root, e))?;
        let mut runs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing the store root", root, e))?;
            let Some(run) = entry.file_name().to_str().and_then(|n| RunId::new(n).ok()) else {
                continue;
            };
            match entry.file_type() {
                Ok(t) if t.is_dir() || t.is_symlink() => runs.push(run),
                _ => {}
            }
        }
        runs.sort_unstable();
        Ok(runs)
    }

    pub(crate) fn list_runs(
        &self,
        after: Option<&RunId>,
        limit: usize,
    ) -> Result<ListPage<RunId>, Error> {
        let limit = limit.max(1);
        let mut items = Vec::new();
        for run in self.run_ids()? {
            if after.is_some_and(|after| run <= *after) {
                continue;
            }
            let dir = match self.layout.run_dir(&run) {
                Ok(Some(dir)) => dir,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "skipping a run folder while listing");
                    continue;
                }
            };
            if !self.has_docs(&dir)? {
                continue;
            }
            if items.len() == limit {
                return Ok(ListPage { items, more: true });
            }
            items.push(run);
        }
        Ok(ListPage { items, more: false })
    }

    pub(crate) fn delete_run(&self, run: &RunId) -> Result<u64, Error> {
        let Some(dir) = self.layout.run_dir(run)? else {
            return Ok(0);
        };
        let mut deleted = 0;
        for doc in self.doc_names(&dir)? {
            let target = dir.join(self.layout.file_name(&doc));
            let _record = self.lease_file_created(&dir, &LockKey::Doc(run.clone(), doc))?;
            match fs::remove_file(&target) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing the document", &target, e)),
            }
        }
        self.sweep_dir(&dir)?;
        sync_dir(&dir).map_err(|e| io_error("fsync of the run folder", &dir, e))?;
        Ok(deleted)
    }

    pub(crate) fn try_acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease, Error> {
        let dir = self.layout.ensure_run_dir(key.run())?;
        let mut record = self.lease_file_created(&dir, key)?;
        leases::try_acquire(&mut record, key, owner, ttl, issued)
    }

    /// Opens the record of a lease that should exist; a missing run folder
    /// or record means the lease is lost.
    fn held_record(&self, lease: &Lease, op: Operation) -> Result<LeaseFile, Error> {
        let key = lease.key();
        let record = match self.layout.run_dir(key.run())? {
            Some(dir) => self.lease_file(&dir, key, true, false)?,
            None => None,
        };
        record.ok_or_else(|| {
            Error::new(ErrorKind::LeaseLost, "the lock's record no longer exists")
                .with_backend(BACKEND)
                .with_operation(op)
                .with_lock(key)
        })
    }

    pub(crate) fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease, Error> {
        let mut record = self.held_record(lease, Operation::Renew)?;
        leases::renew(&mut record, lease, ttl, issued)
    }

    pub(crate) fn release(&self, lease: &Lease) -> Result<(), Error> {
        let mut record = self.held_record(lease, Operation::Release)?;
        leases::release(&mut record, lease)
    }

    pub(crate) fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, Error> {
        let Some(dir) = self.layout.run_dir(key.run())? else {
            return Ok(None);
        };
        Ok(self
            .lease_file(&dir, key, false, false)?
            .and_then(|record| leases::inspect(&record, key)))
    }

    pub(crate) fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>, Error> {
        let Some(dir) = self.layout.run_dir(key.run())? else {
            return Ok(None);
        };
        match self.lease_file(&dir, key, true, false)? {
            Some(mut record) => leases::break_lock(&mut record, key, only_fence),
            None => Ok(None),
        }
    }

    pub(crate) fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>, Error> {
        let one_run = run.is_some();
        let runs = match run {
            Some(run) => vec![run.clone()],
            None => self.run_ids()?,
        };
        let mut locks = Vec::new();
        for run in runs {
            let dir = match self.layout.run_dir(&run) {
                Ok(Some(dir)) => dir,
                Ok(None) => continue,
                Err(error) if one_run => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "skipping a run folder while listing locks");
                    continue;
                }
            };
            let book = book_dir(&dir);
            let entries = match fs::read_dir(&book) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("listing the bookkeeping folder", &book, e)),
            };
            let mut keys: Vec<LockKey> = Vec::new();
            for entry in entries {
                let entry =
                    entry.map_err(|e| io_error("listing the bookkeeping folder", &book, e))?;
                if let Some(key) = lock_key_of_file(&run, &entry.file_name()) {
                    keys.push(key);
                }
            }
            keys.sort_unstable();
            for key in keys {
                if let Some(info) = self
                    .lease_file(&dir, &key, false, false)?
                    .and_then(|r| leases::inspect(&r, &key))
                {
                    locks.push(info);
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
    /// how many.
    pub(crate) fn sweep(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for run in self.run_ids()? {
            if let Ok(Some(dir)) = self.layout.run_dir(&run) {
                removed += self.sweep_dir(&dir)?;
            }
        }
        Ok(removed)
    }

    fn sweep_dir(&self, dir: &Path) -> Result<usize, Error> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("listing the run folder", dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing the run folder", dir, e))?;
            let name = entry.file_name();
            let Some((tag, pid, start)) = name.to_str().and_then(parse_temp_name) else {
                continue;
            };
            if name.to_str() == Some(BOOK_DIR) {
                continue;
            }
            if writer_is_gone(tag, pid, start, &entry.path()) {
                let path: PathBuf = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(path = %path.display(), "removed a temporary file left by a dead writer");
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("removing a stale temporary file", &path, e)),
                }
            }
        }
        Ok(removed)
    }
}

/// Whether the process that wrote a temporary file is gone.
fn writer_is_gone(tag: &str, pid: u32, start: u64, path: &Path) -> bool {
    if tag == host_tag()
        && let Some(ours) = current_stamp()
    {
        let stamp = ProcessStamp {
            start_ticks: start,
            ..ours.clone()
        };
        return liveness(pid, &stamp) == Liveness::Dead;
    }
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > FOREIGN_TEMP_AGE)
}
