//! Lease records and the lease operations.
//!
//! Each lock has one small record file, `.runstate/run.lease` or
//! `.runstate/doc.<name>.lease`, holding its fence counter and current
//! holder. Every read-modify-write of a record happens under an exclusive
//! `flock` on that file, which is what makes acquire, renew, release and
//! fenced saves atomic across processes on this host.
//!
//! **Clocks.** Expiry is judged by this host's clock: `CLOCK_BOOTTIME` for
//! leases granted during this boot (immune to wall-clock steps), and the
//! holder is considered gone for leases granted on this host during an
//! earlier boot. A record written by *another* host (a shared file system)
//! can only be judged by wall clocks, so hosts sharing a store must keep
//! their clocks within a small fraction of the TTL of each other; see the
//! crate documentation.
//!
//! **Durability.** Records are rewritten in place with one `pwrite` of at
//! most 4 KiB and no `fsync`: a killed process never leaves half a record,
//! and a lease is worthless after an OS crash anyway (every holder died with
//! it). Fence counters therefore survive process restarts but may step back
//! after an OS crash; since no holder survives that crash, no stale holder
//! can use an old fence.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use runstate_core::process::{current_stamp, hostname};
use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{Error, ErrorKind, Fence, Lease, LockInfo, LockKey, Operation, Owner};
use serde::{Deserialize, Serialize};

use crate::BACKEND;
use crate::layout::{BOOK_DIR, io_error};

/// Largest record that is still written with a single atomic `pwrite`.
const MAX_RECORD: usize = 4096;

/// A reading of this host's clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    boot_id: Option<&'static str>,
    boot_ns: u64,
    unix_ms: u64,
}

impl Now {
    pub(crate) fn take() -> Now {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Now {
            boot_id: current_stamp().map(|s| s.boot_id.as_str()),
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
}

/// A grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Held {
    owner: Owner,
    since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
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
            expires_boot_ns: now.boot_ns.saturating_add(ttl_ns),
            expires_unix_ms: now
                .unix_ms
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Time left on this grant by this host's clock (zero once expired).
    fn remaining(&self, now: &Now) -> Duration {
        match (now.boot_id, self.boot_id.as_deref()) {
            (Some(ours), Some(theirs)) if ours == theirs => {
                Duration::from_nanos(self.expires_boot_ns.saturating_sub(now.boot_ns))
            }
            // Granted here before a reboot: its holder died with that boot.
            (Some(_), Some(_)) if self.owner.host() == hostname() => Duration::ZERO,
            _ => Duration::from_millis(self.expires_unix_ms.saturating_sub(now.unix_ms)),
        }
    }

    fn info(&self, key: &LockKey, fence: u64, now: &Now) -> LockInfo {
        LockInfo {
            key: key.clone(),
            owner: self.owner.clone(),
            fence: Fence(fence),
            since: from_unix_millis(self.since_ms),
            expires_in: self.remaining(now),
        }
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
    pub(crate) record: Record,
}

impl LeaseFile {
    /// Opens and locks the record at `path` (exclusively or shared),
    /// creating it (and the bookkeeping folder) when `create` is set.
    /// `Ok(None)` when it does not exist and `create` is not set.
    pub(crate) fn open(
        path: PathBuf,
        exclusive: bool,
        create: bool,
    ) -> Result<Option<Self>, Error> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(exclusive)
                .create(create)
                .open(&path)
        };
        let file = match open() {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                if let Some(book) = path.parent() {
                    fs::create_dir_all(book)
                        .map_err(|e| io_error("creating the bookkeeping folder", book, e))?;
                }
                open().map_err(|e| io_error("opening the lease record", &path, e))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("opening the lease record", &path, e)),
        };
        let locked = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        locked.map_err(|e| io_error("locking the lease record", &path, e))?;
        let mut text = Vec::new();
        (&file)
            .read_to_end(&mut text)
            .map_err(|e| io_error("reading the lease record", &path, e))?;
        let record = parse_record(&text, &path);
        Ok(Some(LeaseFile {
            file,
            len: text.len(),
            path,
            record,
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
        self.len = text.len();
        Ok(())
    }
}

fn parse_record(text: &[u8], path: &Path) -> Record {
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        return Record::default();
    }
    match serde_json::from_slice::<Record>(trimmed) {
        Ok(record) => record,
        Err(error) => {
            // Only an OS crash in the middle of a write can get here. Keep
            // fences increasing past anything this clock could have counted.
            let floor = unix_millis(SystemTime::now()).saturating_mul(1000);
            tracing::error!(
                path = %path.display(),
                %error,
                fence = floor,
                "unreadable lease record; treating the lock as free"
            );
            Record {
                v: 1,
                fence: floor,
                held: None,
            }
        }
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
    let mut error = Error::new(ErrorKind::LeaseLost, why)
        .with_backend(BACKEND)
        .with_operation(op)
        .with_lock(key);
    if let Some(info) = record.live_info(key, now) {
        error = error.with_holder(info);
    }
    error
}

fn check_ttl(ttl: Duration, key: &LockKey, op: Operation) -> Result<(), Error> {
    if ttl.is_zero() {
        return Err(
            Error::new(ErrorKind::InvalidArgument, "a lease TTL must be positive")
                .with_backend(BACKEND)
                .with_operation(op)
                .with_lock(key),
        );
    }
    Ok(())
}

/// Grants `key` to `owner` if it is free, lapsed, or held by a dead process.
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
    let fence = file.record.fence.saturating_add(1);
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

/// The bookkeeping folder of a run folder.
pub(crate) fn book_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(BOOK_DIR)
}
