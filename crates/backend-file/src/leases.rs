//! Lease records and the lease operations.
//!
//! Each lock has one small record file, `.runstate/run.lease` or
//! `.runstate/doc.<name>.lease`, holding its fence counter, its current
//! holder and its fence watermark, created when first needed (a document's
//! under the run's records lock, see [`crate::layout`]) and never removed.
//! Every read-modify-write of a record happens under an exclusive `flock`
//! on that file, which is what makes acquire, renew, release, claims and
//! fenced saves atomic across processes on this host.
//!
//! **Watermarks.** For leases granted by *another* lock service (a split
//! store: documents here, leases in Redis or PostgreSQL), the record keeps
//! the highest fence this store has seen for the lock (`watermark`), raised
//! by [`Store::claim`](runstate_core::Store::claim) and by saves under a
//! foreign lease, never lowered. It is independent of the fence counter of
//! the store's own leases, and, like it, survives restarts and
//! `delete_run`.
//!
//! **Clocks.** Expiry is judged by this host's clock: `CLOCK_BOOTTIME` for
//! leases granted during this boot (immune to wall-clock steps), and the
//! holder is considered gone for leases granted on this very machine
//! during an earlier boot. "This machine" means the same machine id
//! (`/etc/machine-id`), recorded with each grant: two machines may share a
//! host name, never a machine id. A record written by *another* machine (a
//! shared file system), or by one whose machine id is unknown, can only be
//! judged by wall clocks, so hosts sharing a store must keep their clocks
//! within a small fraction of the TTL of each other; see the crate
//! documentation.
//!
//! **Waiting.** The `flock` on a record is taken without blocking and
//! retried with short sleeps up to the store's lock timeout; a holder that
//! keeps it longer (a stopped or hung process) makes the call fail with a
//! retryable `Timeout` instead of blocking a thread forever. Threads of one
//! process queue for a record at its in-process gate first
//! ([`crate::gate`]), with the same bound, and are woken as soon as it is
//! let go: they never sleep past each other's release.
//!
//! **Hostile records.** Records and the bookkeeping folder are opened
//! without following links and must be a regular file and a folder; a
//! record larger than any runstate writes is read no further than its
//! first bytes and treated as unreadable.
//!
//! **Durability.** Records are rewritten in place with one `pwrite` of at
//! most 4 KiB and no `fsync`: a killed process never leaves half a record,
//! and a lease is worthless after an OS crash anyway (every holder died with
//! it). Fence counters therefore survive process restarts but may step back
//! after an OS crash; since no holder survives that crash, no stale holder
//! can use an old fence.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use runstate_core::process::{current_stamp, hostname, machine_id};
use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{Error, ErrorKind, Fence, Lease, LockInfo, LockKey, Operation, Owner};
use rustix::fs::FlockOperation;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::BACKEND;
use crate::folder::{Access, Folder};
use crate::gate::{self, Passage};
use crate::layout::io_error;

/// Largest record that is still written with a single atomic `pwrite`.
const MAX_RECORD: usize = 4096;

/// A reading of this host's clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    boot_id: Option<&'static str>,
    machine_id: Option<&'static str>,
    boot_ns: u64,
    unix_ms: u64,
}

impl Now {
    pub(crate) fn take() -> Now {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Now {
            boot_id: current_stamp().map(|s| s.boot_id.as_str()),
            machine_id: machine_id(),
            boot_ns: u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec).unwrap_or(0),
            unix_ms: unix_millis(SystemTime::now()),
        }
    }
}

/// One lock's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Format version.
    #[serde(default)]
    v: u32,
    /// The fence of the latest grant; the next grant gets one more.
    fence: u64,
    /// The current grant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<Held>,
    /// The highest fence of a lease granted by another lock service that
    /// was claimed or saved under here: such leases with a lower fence are
    /// refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    watermark: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Held {
    owner: Owner,
    since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    /// The machine id of the host that granted it, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    machine_id: Option<String>,
    expires_boot_ns: u64,
    expires_unix_ms: u64,
}

impl Held {
    fn new(owner: &Owner, ttl: Duration, now: &Now) -> Held {
        let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        Held {
            owner: owner.clone(),
            since_ms: now.unix_ms,
            boot_id: now.boot_id.map(str::to_owned),
            machine_id: now.machine_id.map(str::to_owned),
            expires_boot_ns: now.boot_ns.saturating_add(ttl_ns),
            expires_unix_ms: now
                .unix_ms
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Time left on this grant by this host's clock (zero once expired).
    fn remaining(&self, now: &Now) -> Duration {
        let same_machine = matches!(
            (now.machine_id, self.machine_id.as_deref()),
            (Some(ours), Some(theirs)) if ours == theirs
        );
        match (now.boot_id, self.boot_id.as_deref()) {
            (Some(ours), Some(theirs)) if ours == theirs => {
                Duration::from_nanos(self.expires_boot_ns.saturating_sub(now.boot_ns))
            }
            // Granted on this very machine before a reboot: its holder died
            // with that boot. A host name proves nothing (two machines may
            // share one); only equal, known machine ids do.
            (Some(_), Some(_)) if same_machine => Duration::ZERO,
            _ => Duration::from_millis(self.expires_unix_ms.saturating_sub(now.unix_ms)),
        }
        // No grant runstate makes lasts longer than `MAX_TTL`: a record
        // that says otherwise (planted, or from a clock far behind) is
        // taken at that.
        .min(runstate_core::MAX_TTL)
    }

    fn info(&self, key: &LockKey, fence: u64, now: &Now) -> LockInfo {
        LockInfo::new(
            key.clone(),
            self.owner.clone(),
            Fence(fence),
            from_unix_millis(self.since_ms),
            self.remaining(now),
        )
    }
}

/// What a record says about its lock right now.
pub(crate) enum State<'a> {
    /// Nobody holds it.
    Free,
    /// Held, but the grant expired or its holder is dead on this host.
    Lapsed(&'a Held),
    /// Held and valid.
    Live(&'a Held),
}

impl Record {
    pub(crate) fn state(&self, now: &Now) -> State<'_> {
        match &self.held {
            None => State::Free,
            Some(held) if held.remaining(now).is_zero() => State::Lapsed(held),
            Some(held) if held.owner.is_dead_here() == Some(true) => State::Lapsed(held),
            Some(held) => State::Live(held),
        }
    }

    /// Whether `lease` is the current, unexpired grant.
    pub(crate) fn is_current(&self, lease: &Lease, now: &Now) -> bool {
        match &self.held {
            Some(held) => {
                self.fence == lease.fence().get()
                    && held.owner.id() == lease.owner().id()
                    && !held.remaining(now).is_zero()
            }
            None => false,
        }
    }

    /// The live holder, for error messages.
    pub(crate) fn live_info(&self, key: &LockKey, now: &Now) -> Option<LockInfo> {
        match self.state(now) {
            State::Live(held) => Some(held.info(key, self.fence, now)),
            _ => None,
        }
    }
}

/// A lease record file, locked.
pub(crate) struct LeaseFile {
    file: File,
    path: PathBuf,
    len: usize,
    /// The file held more than any record runstate writes: the next write
    /// truncates it.
    oversized: bool,
    pub(crate) record: Record,
    /// The record's gate in this process. Declared after `file`, so it is
    /// let go after the file is closed (and its `flock` with it): the next
    /// thread through finds the `flock` free.
    _passage: Passage,
}

/// Largest record file read: any runstate wrote is at most [`MAX_RECORD`].
const READ_LIMIT: u64 = MAX_RECORD as u64;

impl LeaseFile {
    /// Opens and locks the record `name` in the bookkeeping folder `book`
    /// (exclusively or shared), creating it when `create` is set, waiting
    /// at most `wait` for another process's lock. `Ok(None)` when it does
    /// not exist and `create` is not set.
    ///
    /// # Errors
    /// `Denied` when the record is a link, a FIFO or anything but a regular
    /// file; a retryable `Timeout` when another process keeps it locked
    /// longer than `wait`; I/O errors.
    pub(crate) fn open(
        book: &Folder,
        name: &str,
        exclusive: bool,
        create: bool,
        wait: Duration,
    ) -> Result<Option<Self>, Error> {
        let access = match (exclusive, create) {
            (_, true) => Access::Create,
            (true, false) => Access::ReadWrite,
            (false, false) => Access::Read,
        };
        let Some((file, path, passage)) = open_locked(book, name, access, exclusive, wait)? else {
            return Ok(None);
        };
        let size = file
            .metadata()
            .map_err(|e| io_error("stat of the lease record", &path, e))?
            .len();
        let mut text = Vec::new();
        (&file)
            .take(READ_LIMIT)
            .read_to_end(&mut text)
            .map_err(|e| io_error("reading the lease record", &path, e))?;
        let oversized = size > READ_LIMIT;
        let record = if oversized {
            unreadable(&path, &format!("{size} bytes, more than any lease record"))
        } else {
            parse_record(&text, &path)
        };
        Ok(Some(LeaseFile {
            file,
            len: text.len(),
            oversized,
            path,
            record,
            _passage: passage,
        }))
    }

    /// Writes the record back in place with one `pwrite`, padding with
    /// spaces over any longer previous record.
    pub(crate) fn write(&mut self) -> Result<(), Error> {
        let mut text = serde_json::to_vec(&self.record).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding a lease record failed")
                .with_backend(BACKEND)
                .with_source(e)
        })?;
        text.push(b'\n');
        if text.len() > MAX_RECORD {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "lease record of {} bytes exceeds {MAX_RECORD}; the owner's host name is too long",
                    text.len()
                ),
            )
            .with_backend(BACKEND));
        }
        let written = text.len();
        text.resize(written.max(self.len), b' ');
        self.file
            .write_all_at(&text, 0)
            .map_err(|e| io_error("writing the lease record", &self.path, e))?;
        if self.oversized {
            // Cut off what the oversized file held past the record.
            self.file
                .set_len(text.len() as u64)
                .map_err(|e| io_error("truncating the lease record", &self.path, e))?;
            self.oversized = false;
        }
        self.len = text.len();
        Ok(())
    }
}

/// Opens `name` in `book` with `access` and locks it (exclusively or
/// shared): first at its gate in this process, then by `flock` against
/// other processes, both within `wait`. `Ok(None)` when it does not exist
/// (and `access` does not create it).
fn open_locked(
    book: &Folder,
    name: &str,
    access: Access,
    exclusive: bool,
    wait: Duration,
) -> Result<Option<(File, PathBuf, Passage)>, Error> {
    let path = book.child(name);
    let Some(file) = book.open_file(name, access)? else {
        return Ok(None);
    };
    let meta = file
        .metadata()
        .map_err(|e| io_error("stat of the lock file", &path, e))?;
    // Threads of this process queue at the file's gate (woken as soon as
    // it is let go), then take the `flock` against other processes; the
    // bound covers both.
    let start = Instant::now();
    let passage = gate::pass(meta.dev(), meta.ino(), wait)
        .ok_or_else(|| lock_timeout(start.elapsed(), &path, "another thread of this process"))?;
    lock_bounded(
        &file,
        exclusive,
        wait.saturating_sub(start.elapsed()),
        &path,
    )?;
    Ok(Some((file, path, passage)))
}

/// The exclusive lock of a bookkeeping file that holds no record, such as
/// the records lock ([`RECORDS_LOCK`](crate::layout::RECORDS_LOCK)) or the
/// milestones' lock: the file is created when missing and locked as a
/// record is ([`open_locked`]); the lock is let go on drop.
#[must_use = "the lock is let go when this is dropped"]
pub(crate) struct BookLock {
    _file: File,
    /// Declared after the file, so it is let go after the file is closed
    /// (and its `flock` with it), as a record's.
    _passage: Passage,
}

impl BookLock {
    /// Takes the lock of `name` in `book`, waiting at most `wait`.
    ///
    /// # Errors
    /// `Denied` when the file is a link, a FIFO or anything but a regular
    /// file; a retryable `Timeout` when it stays locked longer than
    /// `wait`; I/O errors.
    pub(crate) fn take(book: &Folder, name: &str, wait: Duration) -> Result<Self, Error> {
        let (file, _, passage) =
            open_locked(book, name, Access::Create, true, wait)?.ok_or_else(|| {
                Error::new(ErrorKind::Backend, "a created lock file was not there")
                    .with_backend(BACKEND)
            })?;
        Ok(Self {
            _file: file,
            _passage: passage,
        })
    }
}

/// The retryable `Timeout` of a lock wait that ran out: `who` holds it.
fn lock_timeout(waited: Duration, path: &Path, who: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "waited {} ms for the lock on {}: {who} holds it (stopped or hung?)",
            waited.as_millis(),
            path.display()
        ),
    )
    .with_backend(BACKEND)
}

/// Takes the `flock` on a record (or any bookkeeping file) without
/// blocking, retrying with short sleeps for at most `wait`.
pub(crate) fn lock_bounded(
    file: &File,
    exclusive: bool,
    wait: Duration,
    path: &Path,
) -> Result<(), Error> {
    let operation = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    let start = Instant::now();
    let mut pause = Duration::from_micros(500);
    loop {
        match rustix::fs::flock(file, operation) {
            Ok(()) => return Ok(()),
            Err(Errno::WOULDBLOCK) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(io_error("locking the lease record", path, e.into())),
        }
        let waited = start.elapsed();
        if waited >= wait {
            return Err(lock_timeout(waited, path, "another process"));
        }
        std::thread::sleep(pause.min(wait - waited));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether the record in `file` (opened, not locked) shows a live holder:
/// a hint for lock waiters, read without the `flock` so that waiters never
/// slow the holder down. A record read while it is being rewritten may not
/// parse: it then counts as not held, which costs a waiter one early retry
/// (allowed), never a missed release.
pub(crate) fn peek_held(file: &File) -> bool {
    let mut text = Vec::new();
    if file.take(READ_LIMIT).read_to_end(&mut text).is_err() {
        return false;
    }
    serde_json::from_slice::<Record>(text.trim_ascii())
        .is_ok_and(|record| matches!(record.state(&Now::take()), State::Live(_)))
}

fn parse_record(text: &[u8], path: &Path) -> Record {
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        return Record::default();
    }
    match serde_json::from_slice::<Record>(trimmed) {
        Ok(record) => record,
        // Only an OS crash in the middle of a write can get here.
        Err(error) => unreadable(path, &error.to_string()),
    }
}

/// The record that replaces an unreadable one: free, with a fence past
/// anything this clock could have counted, so fences keep increasing.
fn unreadable(path: &Path, why: &str) -> Record {
    let floor = unix_millis(SystemTime::now()).saturating_mul(1000);
    tracing::error!(
        path = %path.display(),
        error = why,
        fence = floor,
        "unreadable lease record; treating the lock as free"
    );
    // The watermark is lost with the record: a save under a foreign lease
    // is then still checked against the document's version (see the crate
    // documentation); a floor here would refuse every foreign grant.
    Record {
        v: 1,
        fence: floor,
        held: None,
        watermark: 0,
    }
}

fn locked(key: &LockKey, info: LockInfo) -> Error {
    Error::new(ErrorKind::Locked, "the lock is held")
        .with_backend(BACKEND)
        .with_operation(Operation::Acquire)
        .with_lock(key)
        .with_holder(info)
}

pub(crate) fn lease_lost(lease: &Lease, record: &Record, now: &Now, op: Operation) -> Error {
    let key = lease.key();
    let why = if record.fence != lease.fence().get() {
        "the lock was taken over by a newer grant"
    } else if record.held.is_none() {
        "the lease was released or broken"
    } else {
        "the lease expired"
    };
    Error::lease_lost_because(key, why, record.live_info(key, now))
        .with_backend(BACKEND)
        .with_operation(op)
}

/// Checks a TTL with [`runstate_core::check_ttl`], before anything is
/// opened or written.
pub(crate) fn check_ttl(ttl: Duration, key: &LockKey, op: Operation) -> Result<(), Error> {
    runstate_core::check_ttl(ttl)
        .map_err(|e| e.with_backend(BACKEND).with_operation(op).with_lock(key))
}

/// Grants `key` to `owner` if it is free, lapsed, or held by a dead process.
/// When `owner` (the same owner id) holds a live grant already, that grant
/// is returned again with its TTL restarted: same fence, same `since`.
pub(crate) fn try_acquire(
    file: &mut LeaseFile,
    key: &LockKey,
    owner: &Owner,
    ttl: Duration,
    issued: Instant,
) -> Result<Lease, Error> {
    check_ttl(ttl, key, Operation::Acquire)?;
    let now = Now::take();
    match file.record.state(&now) {
        State::Live(held) if held.owner.id() == owner.id() => {
            let fence = file.record.fence;
            let mut renewed = Held::new(owner, ttl, &now);
            renewed.since_ms = held.since_ms;
            let since = from_unix_millis(renewed.since_ms);
            file.record.held = Some(renewed);
            file.write()?;
            return Ok(Lease::new(
                key.clone(),
                owner.clone(),
                Fence(fence),
                ttl,
                issued,
                since,
            ));
        }
        State::Live(held) => return Err(locked(key, held.info(key, file.record.fence, &now))),
        State::Lapsed(held) => {
            if held.owner.is_dead_here() == Some(true) {
                tracing::info!(
                    lock = %key,
                    holder = %held.owner,
                    fence = file.record.fence,
                    "taking over the lease of a holder that died on this host"
                );
            }
        }
        State::Free => {}
    }
    // A counter at its end was not written by runstate (it starts below
    // 2^64 by far and counts one a grant): granting its last fence again
    // would hand two holders one fence.
    let Some(fence) = file.record.fence.checked_add(1) else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "the lease record of {key} holds a fence counter at its end ({}); nothing was \
                 granted (remove the record to start it again)",
                file.record.fence
            ),
        )
        .with_backend(BACKEND)
        .with_operation(Operation::Acquire)
        .with_lock(key));
    };
    let held = Held::new(owner, ttl, &now);
    let since = from_unix_millis(held.since_ms);
    file.record.v = 1;
    file.record.fence = fence;
    file.record.held = Some(held);
    file.write()?;
    Ok(Lease::new(
        key.clone(),
        owner.clone(),
        Fence(fence),
        ttl,
        issued,
        since,
    ))
}

pub(crate) fn renew(
    file: &mut LeaseFile,
    lease: &Lease,
    ttl: Duration,
    issued: Instant,
) -> Result<Lease, Error> {
    check_ttl(ttl, lease.key(), Operation::Renew)?;
    let now = Now::take();
    if !file.record.is_current(lease, &now) {
        return Err(lease_lost(lease, &file.record, &now, Operation::Renew));
    }
    let mut held = Held::new(lease.owner(), ttl, &now);
    if let Some(old) = &file.record.held {
        held.since_ms = old.since_ms;
    }
    file.record.held = Some(held);
    file.write()?;
    Ok(lease.renewed(ttl, issued))
}

/// Frees the lock if `lease` is its grant. A grant that already expired is
/// cleared too, but reported as lost.
pub(crate) fn release(file: &mut LeaseFile, lease: &Lease) -> Result<(), Error> {
    let now = Now::take();
    let ours = file.record.fence == lease.fence().get()
        && file
            .record
            .held
            .as_ref()
            .is_some_and(|h| h.owner.id() == lease.owner().id());
    if !ours {
        return Err(lease_lost(lease, &file.record, &now, Operation::Release));
    }
    let current = file.record.is_current(lease, &now);
    let error = (!current).then(|| lease_lost(lease, &file.record, &now, Operation::Release));
    file.record.held = None;
    file.write()?;
    match error {
        None => Ok(()),
        Some(error) => Err(error),
    }
}

pub(crate) fn inspect(file: &LeaseFile, key: &LockKey) -> Option<LockInfo> {
    file.record.live_info(key, &Now::take())
}

pub(crate) fn break_lock(
    file: &mut LeaseFile,
    key: &LockKey,
    only_fence: Option<Fence>,
) -> Result<Option<LockInfo>, Error> {
    let now = Now::take();
    let Some(held) = &file.record.held else {
        return Ok(None);
    };
    if only_fence.is_some_and(|f| f.get() != file.record.fence) {
        return Ok(None);
    }
    let info = held.info(key, file.record.fence, &now);
    file.record.held = None;
    file.write()?;
    tracing::warn!(
        lock = %key,
        holder = %info.owner,
        fence = %info.fence,
        by = %format!("{}:{}", hostname(), std::process::id()),
        "lease broken"
    );
    Ok(Some(info))
}

/// Refuses a lease granted by another lock service (`fence` of `key`) with
/// `Fenced` when its fence is below the record's watermark.
pub(crate) fn check_watermark(
    file: &LeaseFile,
    key: &LockKey,
    fence: Fence,
    op: Operation,
) -> Result<(), Error> {
    if fence.get() < file.record.watermark {
        let claimed = Some(Fence(file.record.watermark));
        return Err(Error::below_watermark(key, fence, claimed)
            .with_backend(BACKEND)
            .with_operation(op));
    }
    Ok(())
}

/// Raises the record's watermark to `fence` (never lowers it), writing the
/// record only when it changes; `Fenced` when `fence` is below it.
pub(crate) fn raise_watermark(
    file: &mut LeaseFile,
    key: &LockKey,
    fence: Fence,
    op: Operation,
) -> Result<(), Error> {
    check_watermark(file, key, fence, op)?;
    if fence.get() > file.record.watermark {
        file.record.v = 1;
        file.record.watermark = fence.get();
        file.write()?;
    }
    Ok(())
}
