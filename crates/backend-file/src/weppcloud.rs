//! Beside a running WEPPcloud, in its own run folders.
//!
//! What a store does when it is a WEPPcloud neighbour
//! ([`FileConfig::weppcloud_neighbour`](crate::FileConfig::weppcloud_neighbour),
//! on by default for `ext=nodb`), each from WEPPcloud's public source
//! (`wepppy/nodb/base.py` and `wepppy/nodb/version.py`):
//!
//! - **Legacy lock files.** WEPPcloud once locked a controller by writing
//!   `<wd>/<name>.nodb.lock` (the epoch time, a Python float) and removing
//!   it on unlock; present means locked, with no expiry. Such a file makes
//!   its document locked by the holder `weppcloud (lock file)` (pid 0,
//!   fence 0, `since` the time written in it, else the file's modification
//!   time, `expires_in` [`MAX_TTL`]: it never expires, and the longest
//!   lease runstate knows keeps waiters backing off normally instead of
//!   polling). Acquires, claims, saves and deletes of the document (and
//!   acquires, claims and `delete_run` of the run lock, which covers every
//!   document) are refused with `Locked` while it is there; `list_locks`
//!   lists it; only `break_lock` (an operator's forced unlock) removes it,
//!   with a warning in the log. runstate never creates one and never
//!   removes one otherwise.
//! - **`READONLY`.** WEPPcloud refuses to lock a run whose folder holds a
//!   `READONLY` file; runstate refuses every write (save, delete,
//!   `delete_run`) in it with `Denied`. Reads and leases still work, so a
//!   read-only run can be read and migrated out.
//! - **(mtime, size) signatures.** WEPPcloud trusts a cached controller
//!   (its in-process singleton, its Redis cache) while the file's
//!   `(st_mtime, st_size)` is unchanged. A save that keeps the size gets a
//!   modification time at least 1 ms past the previous file's (else
//!   `max(now, previous + 1 s)`, WEPPcloud's own rule), set on the
//!   temporary file before the rename, so no reader ever sees the new
//!   bytes under the old signature.
//! - **`nodb.version`.** WEPPcloud marks a run's schema version in
//!   `<wd>/nodb.version` and treats a folder holding `*.nodb` files but no
//!   marker as a legacy run (version 0). A save that creates the first
//!   `.nodb` document of a folder without a marker first writes
//!   `1000\n` (WEPPcloud's current version) with a rename that never
//!   replaces an existing marker; an existing marker is never touched, and
//!   a legacy run (controllers, no marker) is left as it is.

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use runstate_core::{DocName, Error, ErrorKind, Fence, LockInfo, LockKey, MAX_TTL, Owner, RunId};

use crate::BACKEND;
use crate::folder::{Access, Folder, Kind, is_not_found};
use crate::layout::{Layout, io_error, temp_name};

/// The marker file of a read-only run.
pub(crate) const READONLY: &str = "READONLY";
/// WEPPcloud's schema version marker.
pub(crate) const VERSION_FILE: &str = "nodb.version";
/// What WEPPcloud writes into a new run's marker (`CURRENT_VERSION`).
const CURRENT_VERSION: &[u8] = b"1000\n";
/// The host shown as the holder of a lock file.
pub const LOCK_FILE_HOLDER: &str = "weppcloud (lock file)";
/// The owner id shown for a lock file.
const LOCK_FILE_ID: &str = "lock-file";
/// Most bytes read from a lock file (it holds a float).
const MAX_LOCK_FILE: u64 = 256;
/// A rewrite whose new modification time is not this far past the old one
/// gets its time moved forward: WEPPcloud compares signatures as floats
/// (about 0.2 µs apart at today's epoch) and trusts a cached copy within
/// 1 µs.
const MIN_MTIME_STEP: Duration = Duration::from_millis(1);

/// The lock file of a document file: `<name>.<ext>.lock`.
pub(crate) fn lock_file_name(doc_file: &str) -> String {
    format!("{doc_file}.lock")
}

/// What a lock file's holder looks like.
fn holder(key: LockKey, since: SystemTime) -> LockInfo {
    LockInfo::new(key, lock_file_owner(), Fence(0), since, MAX_TTL)
}

/// The owner shown for every lock file.
pub(crate) fn lock_file_owner() -> Owner {
    // Both parts are valid by construction; the fallback is never taken.
    Owner::new(LOCK_FILE_HOLDER, 0, LOCK_FILE_ID).unwrap_or_else(|_| Owner::for_this_process())
}

/// The time a lock file says it was taken: the epoch seconds WEPPcloud
/// wrote in it, else its modification time.
fn taken_at(dir: &Folder, name: &str) -> Result<SystemTime, Error> {
    let path = dir.child(name);
    let written = match dir.open_file(name, Access::Read) {
        Ok(Some(file)) => read_time(&file),
        // Gone meanwhile, or not a regular file: the time of the entry.
        Ok(None) | Err(_) => None,
    };
    if let Some(at) = written {
        return Ok(at);
    }
    Ok(dir
        .modified_nofollow(name)
        .map_err(|e| io_error("stat of the lock file", &path, e))?
        .unwrap_or_else(SystemTime::now))
}

fn read_time(file: &File) -> Option<SystemTime> {
    let mut text = String::new();
    file.take(MAX_LOCK_FILE).read_to_string(&mut text).ok()?;
    let secs: f64 = text.trim().parse().ok()?;
    // Between 2000 and 2200: anything else is not a time WEPPcloud wrote.
    if !(946_684_800.0..7_258_118_400.0).contains(&secs) {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::try_from_secs_f64(secs).ok()?)
}

/// The holder of `doc`'s lock file in the run folder `dir`, if there is
/// one (a regular file, or anything else by that name: present means
/// locked, as for WEPPcloud).
pub(crate) fn doc_holder(
    dir: &Folder,
    layout: &Layout,
    run: &RunId,
    doc: &DocName,
) -> Result<Option<LockInfo>, Error> {
    let name = lock_file_name(&layout.file_name(doc));
    let present = dir
        .kind_of(&name)
        .map_err(|e| io_error("stat of the lock file", &dir.child(&name), e))?;
    if present.is_none() {
        return Ok(None);
    }
    let since = taken_at(dir, &name)?;
    Ok(Some(holder(LockKey::Doc(run.clone(), doc.clone()), since)))
}

/// Every lock file of the run folder `dir`, as document locks, sorted by
/// document.
pub(crate) fn run_holders(
    dir: &Folder,
    layout: &Layout,
    run: &RunId,
) -> Result<Vec<LockInfo>, Error> {
    let entries = dir
        .entries()
        .map_err(|e| io_error("listing the run folder", dir.path(), e))?;
    // Any kind of entry, a folder too: present means locked, as for
    // WEPPcloud (and for `doc_holder`).
    let mut docs: Vec<DocName> = entries
        .iter()
        .filter_map(|e| layout.doc_of_file(e.name.strip_suffix(".lock")?))
        .collect();
    docs.sort_unstable();
    docs.dedup();
    let mut found = Vec::with_capacity(docs.len());
    for doc in docs {
        // Removed since the folder was read: not held any more.
        if let Some(info) = doc_holder(dir, layout, run, &doc)? {
            found.push(info);
        }
    }
    Ok(found)
}

/// The holder that refuses `key`: the document's lock file, or for the
/// run lock the first lock file of the run.
pub(crate) fn key_holder(
    dir: &Folder,
    layout: &Layout,
    key: &LockKey,
) -> Result<Option<LockInfo>, Error> {
    match key {
        LockKey::Doc(run, doc) => doc_holder(dir, layout, run, doc),
        LockKey::Run(run) => Ok(run_holders(dir, layout, run)?.into_iter().next()),
    }
}

/// The refusal of an operation on a lock held by a lock file.
pub(crate) fn locked(dir: &Folder, layout: &Layout, holder: LockInfo) -> Error {
    let message = match &holder.key {
        LockKey::Doc(run, doc) => format!(
            "document {doc} is locked by WEPPcloud: its lock file {} exists (a worker holds it, \
             or died holding it; an operator removes it with `runstate unlock {run} {doc} \
             --force`); nothing was written",
            dir.child(&lock_file_name(&layout.file_name(doc))).display()
        ),
        // Lock file holders are document locks; kept total all the same.
        LockKey::Run(run) => format!("run {run} holds a WEPPcloud lock file; nothing was written"),
    };
    Error::new(ErrorKind::Locked, message)
        .with_backend(BACKEND)
        .with_holder(holder)
}

/// Fails with [`Locked`](ErrorKind::Locked) when a lock file holds `key`.
pub(crate) fn check_unlocked(dir: &Folder, layout: &Layout, key: &LockKey) -> Result<(), Error> {
    match key_holder(dir, layout, key)? {
        Some(holder) => Err(locked(dir, layout, holder).with_lock(key)),
        None => Ok(()),
    }
}

/// Removes `doc`'s lock file (an operator's forced unlock), logging it;
/// returns what it held.
pub(crate) fn break_lock_file(
    dir: &Folder,
    layout: &Layout,
    run: &RunId,
    doc: &DocName,
) -> Result<Option<LockInfo>, Error> {
    let Some(info) = doc_holder(dir, layout, run, doc)? else {
        return Ok(None);
    };
    let name = lock_file_name(&layout.file_name(doc));
    let path = dir.child(&name);
    // WEPPcloud writes files; a folder by that name is somebody else's,
    // with who knows what inside: left for a person to remove.
    if dir
        .kind_of(&name)
        .map_err(|e| io_error("stat of the lock file", &path, e))?
        == Some(Kind::Folder)
    {
        return Err(dir.refused(&name, "lock file runstate may remove"));
    }
    match dir.unlink(&name) {
        Ok(()) => {}
        // Removed by someone else meanwhile: nothing left to break.
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(io_error("removing the WEPPcloud lock file", &path, e)),
    }
    dir.sync()
        .map_err(|e| io_error("fsync of the run folder", dir.path(), e))?;
    tracing::warn!(
        lock = %info.key,
        path = %path.display(),
        by = %format!("{}:{}", runstate_core::process::hostname(), std::process::id()),
        "WEPPcloud lock file removed (forced unlock)"
    );
    Ok(Some(info))
}

/// Fails with [`Denied`](ErrorKind::Denied) when the run folder holds
/// WEPPcloud's `READONLY` marker.
pub(crate) fn check_writable(dir: &Folder, run: &RunId) -> Result<(), Error> {
    let marker = dir
        .kind_of(READONLY)
        .map_err(|e| io_error("stat of the READONLY marker", &dir.child(READONLY), e))?;
    if marker.is_none() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Denied,
        format!(
            "run {run} is read-only for WEPPcloud ({} exists); nothing was written",
            dir.child(READONLY).display()
        ),
    )
    .with_backend(BACKEND)
    .with_run(run))
}

/// Makes sure a save moves the document's modification time forward:
/// the staged file `staged` (at `path`), about to replace a file with
/// metadata `previous`, keeps its own time when that is at least
/// [`MIN_MTIME_STEP`] past the previous one, else gets the later of now
/// and the previous time plus [`MIN_MTIME_STEP`], else (a file system
/// with coarse timestamps) the later of now and the previous time plus
/// 1 s. Checked after setting it. Whatever the sizes: WEPPcloud's cache
/// checks compare `(mtime, size)`, but some of its versions refresh their
/// in-process copy on the modification time alone, which a file system
/// with coarse timestamps leaves equal for two saves within one tick.
pub(crate) fn advance_signature(
    staged: &File,
    path: &std::path::Path,
    previous: &std::fs::Metadata,
) -> Result<(), Error> {
    let stat = |file: &File| -> Result<SystemTime, Error> {
        file.metadata()
            .and_then(|m| m.modified())
            .map_err(|e| io_error("stat of the temporary file", path, e))
    };
    let before = previous
        .modified()
        .map_err(|e| io_error("stat of the document", path, e))?;
    let now = stat(staged)?;
    if now >= before + MIN_MTIME_STEP {
        return Ok(());
    }
    // The smallest step first, so the time drifts ahead of the clock by no
    // more than it must; a file system with coarse timestamps truncates
    // that, and gets a whole second.
    let set = |wanted: SystemTime| {
        staged
            .set_times(std::fs::FileTimes::new().set_modified(wanted))
            .and_then(|()| staged.sync_all())
            .map_err(|e| io_error("moving the temporary file's modification time", path, e))
    };
    set(SystemTime::now().max(before + MIN_MTIME_STEP))?;
    if stat(staged)? <= before {
        set(SystemTime::now().max(before + Duration::from_secs(1)))?;
    }
    if stat(staged)? <= before {
        return Err(Error::new(
            ErrorKind::Backend,
            format!(
                "the file system kept the modification time of {} from advancing; nothing was \
                 written (WEPPcloud could not tell the new document from the old)",
                path.display()
            ),
        )
        .with_backend(BACKEND));
    }
    Ok(())
}

/// Before the first `.nodb` document is placed in a run folder without a
/// `nodb.version` marker, writes the marker (`1000\n`), never replacing
/// one. A folder that already holds `*.nodb` files without a marker is a
/// legacy run and stays unmarked. Only for stores of `.nodb` documents.
pub(crate) fn mark_new_run(dir: &Folder, layout: &Layout) -> Result<(), Error> {
    if layout.ext() != "nodb" {
        return Ok(());
    }
    let present = dir
        .kind_of(VERSION_FILE)
        .map_err(|e| io_error("stat of nodb.version", &dir.child(VERSION_FILE), e))?;
    if present.is_some() {
        return Ok(());
    }
    let entries = dir
        .entries()
        .map_err(|e| io_error("listing the run folder", dir.path(), e))?;
    // WEPPcloud's own test: `glob("*.nodb")` (hidden names excluded).
    if entries
        .iter()
        .any(|e| !e.name.starts_with('.') && e.name.ends_with(".nodb"))
    {
        return Ok(());
    }
    let name = temp_name(VERSION_FILE, false);
    let written = (|| {
        let mut file = dir.create_temp(&name, 0o644)?;
        file.write_all(CURRENT_VERSION)?;
        file.sync_all()?;
        dir.rename_noreplace(&name, VERSION_FILE)
    })();
    if !matches!(written, Ok(true)) {
        let _ = dir.unlink(&name);
    }
    written
        .map(drop)
        .map_err(|e| io_error("writing nodb.version", &dir.child(VERSION_FILE), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_times_are_read_as_weppcloud_wrote_them() {
        let dir = std::env::temp_dir().join(format!(
            "runstate-lockfile-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ron.nodb.lock");
        std::fs::write(&path, "1712345678.123456").expect("write");
        let at = read_time(&File::open(&path).expect("open")).expect("a time");
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs_f64();
        assert!((secs - 1_712_345_678.123_456).abs() < 1e-5, "{secs}");
        for junk in ["", "soon", "-5", "1e300", "12"] {
            std::fs::write(&path, junk).expect("write");
            assert_eq!(
                read_time(&File::open(&path).expect("open")),
                None,
                "{junk:?}"
            );
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(lock_file_name("ron.nodb"), "ron.nodb.lock");
        let owner = lock_file_owner();
        assert_eq!((owner.host(), owner.pid()), (LOCK_FILE_HOLDER, 0));
    }
}
