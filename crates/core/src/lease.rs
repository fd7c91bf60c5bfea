//! Locks, owners, leases and fences.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::id::{DocName, RunId};
use crate::process::{self, Liveness, ProcessStamp};
use crate::time::{Short, Utc};

/// What a lock protects: a whole run, or one document of a run.
///
/// Locks on different keys are independent: a run lock does not exclude a
/// lock on one of the run's documents. Pick one granularity per document
/// (the typed API uses document locks unless told otherwise); saves stay
/// safe either way because locked saves also check the document version.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LockKey {
    /// Every document of a run.
    Run(RunId),
    /// One document.
    Doc(RunId, DocName),
}

impl LockKey {
    /// A lock on the whole run.
    pub fn run(&self) -> &RunId {
        match self {
            LockKey::Run(run) | LockKey::Doc(run, _) => run,
        }
    }

    /// The document, for a document lock.
    pub fn doc(&self) -> Option<&DocName> {
        match self {
            LockKey::Run(_) => None,
            LockKey::Doc(_, doc) => Some(doc),
        }
    }

    /// Whether a lease on this lock may fence a save of `doc` in `run`.
    pub fn covers(&self, run: &RunId, doc: &DocName) -> bool {
        match self {
            LockKey::Run(r) => r == run,
            LockKey::Doc(r, d) => r == run && d == doc,
        }
    }

    /// Fails with [`ErrorKind::InvalidArgument`] unless this lock covers
    /// `doc` in `run`. Backends call it before a fenced save.
    pub fn check_covers(&self, run: &RunId, doc: &DocName) -> Result<(), Error> {
        if self.covers(run, doc) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("a lease on {self} cannot fence a save of {run}/{doc}"),
            ))
        }
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKey::Run(run) => write!(f, "{run}"),
            LockKey::Doc(run, doc) => write!(f, "{run}/{doc}"),
        }
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKey::Run(run) => write!(f, "LockKey::Run({run})"),
            LockKey::Doc(run, doc) => write!(f, "LockKey::Doc({run}/{doc})"),
        }
    }
}

/// A fencing token: strictly increasing across every grant of one lock,
/// across processes and restarts. Renewing keeps it; every new grant gets a
/// larger one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fence(pub u64);

impl Fence {
    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fence({})", self.0)
    }
}

/// Who holds (or asks for) a lease: a host, a pid and a unique id.
///
/// Two owners are the same owner exactly when their ids are equal. Only the
/// owner that was granted a lease may renew or release it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OwnerRecord")]
pub struct Owner {
    host: String,
    pid: u32,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<ProcessStamp>,
}

/// An owner as stored, checked by [`Owner::new`]'s rules when read back
/// (a planted or corrupt record must not put control characters in logs).
#[derive(Deserialize)]
struct OwnerRecord {
    host: String,
    pid: u32,
    id: String,
    #[serde(default)]
    process: Option<ProcessStamp>,
}

impl TryFrom<OwnerRecord> for Owner {
    type Error = Error;

    fn try_from(record: OwnerRecord) -> Result<Self, Error> {
        Ok(Owner::new(record.host, record.pid, record.id)?.with_process(record.process))
    }
}

/// Longest lease TTL any backend grants: 24 hours. A lease is meant to be
/// renewed while its holder lives (guards renew theirs in the background),
/// so a TTL only needs to outlast the longest stall a live holder may have.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Checks a lease TTL, once for every backend: at least 1 ms and at most
/// [`MAX_TTL`]. Backends call it before they send anything, so an absurd
/// TTL (`Duration::MAX`, say) never reaches a server that could half-apply
/// it.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] otherwise.
pub fn check_ttl(ttl: Duration) -> Result<(), Error> {
    if ttl < Duration::from_millis(1) || ttl > MAX_TTL {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "a lease TTL must be from 1 ms to {} (got {})",
                Short(MAX_TTL),
                Short(ttl)
            ),
        ));
    }
    Ok(())
}

/// Longest accepted host name in an [`Owner`], in bytes.
pub const MAX_HOST_LEN: usize = 255;
/// Longest accepted owner id, in bytes.
pub const MAX_OWNER_ID_LEN: usize = 64;

impl Owner {
    /// A new owner for the current process: this host's name, this pid, this
    /// process's [`ProcessStamp`] (so a same-host waiter can tell when it
    /// dies) and a fresh random 128-bit id. Each call returns a distinct
    /// owner.
    pub fn for_this_process() -> Owner {
        Owner {
            host: process::hostname().chars().take(MAX_HOST_LEN).collect(),
            pid: std::process::id(),
            id: random_id(),
            process: process::current_stamp().cloned(),
        }
    }

    /// An owner with explicit parts, for backends decoding stored records and
    /// for callers that name owners themselves.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when `host` is empty or longer than 255
    /// bytes, or `id` is empty, longer than 64 bytes or not made of
    /// `[A-Za-z0-9._:-]`.
    pub fn new(host: impl Into<String>, pid: u32, id: impl Into<String>) -> Result<Owner, Error> {
        let host = host.into();
        let id = id.into();
        if host.is_empty() || host.len() > MAX_HOST_LEN || host.chars().any(char::is_control) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("owner host {host:?} must be 1 to {MAX_HOST_LEN} printable bytes"),
            ));
        }
        if id.is_empty()
            || id.len() > MAX_OWNER_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("owner id {id:?} must be 1 to {MAX_OWNER_ID_LEN} bytes of [A-Za-z0-9._:-]"),
            ));
        }
        Ok(Owner {
            host,
            pid,
            id,
            process: None,
        })
    }

    /// Attaches the holder's process stamp.
    pub fn with_process(mut self, stamp: Option<ProcessStamp>) -> Owner {
        self.process = stamp;
        self
    }

    /// The same host, pid and stamp with a fresh id: another owner in this
    /// process.
    pub fn sibling(&self) -> Owner {
        Owner {
            id: random_id(),
            ..self.clone()
        }
    }

    /// The host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The process id on that host.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The unique id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The process stamp, when the owner's host provided one.
    pub fn process(&self) -> Option<&ProcessStamp> {
        self.process.as_ref()
    }

    /// Whether this owner's process is known to be dead, judged from this
    /// host: `Some(true)` only when it ran on this very boot and pid
    /// namespace and its process is gone; `None` when this host cannot tell.
    pub fn is_dead_here(&self) -> Option<bool> {
        match process::liveness(self.pid, self.process.as_ref()?) {
            Liveness::Alive => Some(false),
            Liveness::Dead => Some(true),
            Liveness::Unknown => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.host, self.pid, self.id)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({self})")
    }
}

/// A random 128-bit id in hex, mixed with the pid and the clock so two
/// processes seeded alike still differ.
fn random_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mix = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    format!("{:016x}{:016x}", fastrand::u64(..) ^ mix, fastrand::u64(..))
}

/// What anyone can see about a held lock.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock.
    pub key: LockKey,
    /// Who holds it.
    pub owner: Owner,
    /// The fence of the current grant.
    pub fence: Fence,
    /// When it was granted, by the clock that judges it (informational).
    pub since: SystemTime,
    /// How long until it expires unless renewed.
    pub expires_in: Duration,
}

impl LockInfo {
    /// A held lock as seen by anyone; for backends and layers.
    pub fn new(
        key: LockKey,
        owner: Owner,
        fence: Fence,
        since: SystemTime,
        expires_in: Duration,
    ) -> Self {
        LockInfo {
            key,
            owner,
            fence,
            since,
            expires_in,
        }
    }
}

impl fmt::Display for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} with fence {} since {}, expires in {}",
            self.owner,
            self.fence,
            Utc(self.since),
            Short(self.expires_in)
        )
    }
}

impl fmt::Debug for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockInfo")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("fence", &self.fence)
            .field("since", &Utc(self.since))
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// A granted lease: proof of holding a lock until it expires.
///
/// Its local deadline, [`expires_at`](Lease::expires_at), is measured on
/// this process's monotonic clock from the moment the request was sent, so
/// it is never later than the server's own expiry: when it says the lease is
/// still valid, it is. Saves made with it are checked by the backend, so a
/// stale lease can never overwrite newer data even if the local deadline was
/// not consulted.
#[derive(Clone)]
pub struct Lease {
    key: LockKey,
    owner: Owner,
    fence: Fence,
    ttl: Duration,
    issued: Instant,
    since: SystemTime,
    token: Option<Arc<str>>,
}

impl Lease {
    /// Builds a lease; for backends. `issued` must be taken before the
    /// request that granted it was sent.
    pub fn new(
        key: LockKey,
        owner: Owner,
        fence: Fence,
        ttl: Duration,
        issued: Instant,
        since: SystemTime,
    ) -> Lease {
        Lease {
            key,
            owner,
            fence,
            ttl,
            issued,
            since,
            token: None,
        }
    }

    /// Attaches a backend-private token (for example the ETag of a lease
    /// object) needed to renew or release it.
    pub fn with_token(mut self, token: impl AsRef<str>) -> Lease {
        self.token = Some(Arc::from(token.as_ref()));
        self
    }

    /// The same grant with a new TTL counted from `issued`; for backends
    /// implementing renew.
    pub fn renewed(&self, ttl: Duration, issued: Instant) -> Lease {
        Lease {
            ttl,
            issued,
            ..self.clone()
        }
    }

    /// The lock this lease holds.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// Who holds it.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The fencing token of this grant.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// The TTL it was granted or last renewed for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When it was granted (informational): by the backend's clock where
    /// the grant reports it, else by this process's. [`Lock::inspect`]
    /// always reports the backend's view.
    ///
    /// [`Lock::inspect`]: crate::Lock::inspect
    pub fn since(&self) -> SystemTime {
        self.since
    }

    /// The backend-private token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The local deadline: no later than the backend's own expiry. Never
    /// panics, whatever the TTL.
    pub fn expires_at(&self) -> Instant {
        crate::time::saturating_add(self.issued, self.ttl)
    }

    /// Time left before the local deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.expires_at().saturating_duration_since(Instant::now())
    }

    /// Whether the local deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at()
    }

    /// How long until this lease is due for renewal: a third of its TTL
    /// after it was issued, so that a renewal has two thirds of the TTL to
    /// come back, counted on the lease's own clock (a lease handed over
    /// late, or renewed by a slow round trip, is due sooner); zero once
    /// due.
    pub fn renewal_due_in(&self) -> Duration {
        self.remaining()
            .saturating_sub(self.ttl.saturating_sub(self.ttl / 3))
    }

    /// Whether a third of its TTL has passed since it was issued (see
    /// [`renewal_due_in`](Self::renewal_due_in)).
    pub fn is_renewal_due(&self) -> bool {
        self.remaining() <= self.ttl.saturating_sub(self.ttl / 3)
    }

    /// What others see of this lease.
    pub fn info(&self) -> LockInfo {
        LockInfo {
            key: self.key.clone(),
            owner: self.owner.clone(),
            fence: self.fence,
            since: self.since,
            expires_in: self.remaining(),
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("fence", &self.fence)
            .field("ttl", &self.ttl)
            .field("since", &Utc(self.since))
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_distinct_and_alive() {
        let a = Owner::for_this_process();
        let b = Owner::for_this_process();
        assert_ne!(a, b);
        assert_eq!(a.pid(), b.pid());
        assert_eq!(a.id().len(), 32);
        #[cfg(target_os = "linux")]
        assert_eq!(a.is_dead_here(), Some(false));
    }

    #[test]
    fn stored_owners_are_checked_like_new_ones() {
        let good = Owner::for_this_process();
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<Owner>(&json).unwrap(), good);
        for bad in [
            r#"{"host":"a\nb","pid":1,"id":"x"}"#,
            r#"{"host":"h","pid":1,"id":"x y"}"#,
            r#"{"host":"","pid":1,"id":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Owner>(bad).is_err(), "{bad}");
        }
    }

    /// A renewal is due a third of the TTL after the lease was issued, on
    /// the lease's own clock, for the smallest and the largest TTL too.
    #[test]
    fn a_renewal_is_due_a_third_of_the_ttl_after_issue() {
        let lease = |ttl: Duration, age: Duration| {
            Lease::new(
                LockKey::Run(RunId::new("r").unwrap()),
                Owner::for_this_process(),
                Fence(1),
                ttl,
                Instant::now().checked_sub(age).unwrap(),
                SystemTime::now(),
            )
        };
        let fresh = lease(Duration::from_secs(30), Duration::ZERO);
        assert!(!fresh.is_renewal_due());
        let due = fresh.renewal_due_in();
        assert!(
            due > Duration::from_secs(9) && due <= Duration::from_secs(10),
            "{due:?}"
        );
        let late = lease(Duration::from_secs(30), Duration::from_secs(12));
        assert!(late.is_renewal_due());
        assert_eq!(late.renewal_due_in(), Duration::ZERO);
        let expired = lease(Duration::from_millis(1), Duration::from_millis(5));
        assert!(expired.is_renewal_due());
        assert_eq!(expired.renewal_due_in(), Duration::ZERO);
        let longest = lease(MAX_TTL, Duration::ZERO);
        assert!(!longest.is_renewal_due());
        assert!(longest.renewal_due_in() > MAX_TTL / 3 - Duration::from_secs(1));
    }

    #[test]
    fn owner_new_validates() {
        assert!(Owner::new("h", 1, "abc-1").is_ok());
        assert!(Owner::new("", 1, "abc").is_err());
        assert!(Owner::new("h", 1, "a b").is_err());
        assert!(Owner::new("h", 1, "x".repeat(65)).is_err());
    }

    #[test]
    fn run_lock_covers_its_documents() {
        let run = RunId::new("r").unwrap();
        let other = RunId::new("s").unwrap();
        let ron = DocName::new("ron").unwrap();
        let climate = DocName::new("climate").unwrap();
        assert!(LockKey::Run(run.clone()).covers(&run, &ron));
        assert!(!LockKey::Run(run.clone()).covers(&other, &ron));
        assert!(LockKey::Doc(run.clone(), ron.clone()).covers(&run, &ron));
        assert!(!LockKey::Doc(run.clone(), ron).covers(&run, &climate));
    }

    #[test]
    fn ttls_are_checked_once_for_everyone() {
        assert!(check_ttl(Duration::from_millis(1)).is_ok());
        assert!(check_ttl(MAX_TTL).is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_micros(999),
            MAX_TTL + Duration::from_millis(1),
            Duration::MAX,
        ] {
            let error = check_ttl(bad).expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        }
    }

    #[test]
    fn an_absurd_ttl_never_panics() {
        let key = LockKey::Run(RunId::new("r").unwrap());
        let lease = Lease::new(
            key,
            Owner::for_this_process(),
            Fence(1),
            Duration::MAX,
            Instant::now(),
            SystemTime::now(),
        );
        assert!(!lease.is_expired());
        assert!(lease.remaining() > Duration::from_secs(1_000_000));
        let _ = format!("{lease:?} {}", lease.info());
        let renewed = lease.renewed(Duration::MAX, Instant::now());
        assert!(!renewed.is_expired());
    }

    #[test]
    fn local_deadline_counts_from_issue() {
        let key = LockKey::Run(RunId::new("r").unwrap());
        let issued = Instant::now() - Duration::from_secs(2);
        let lease = Lease::new(
            key,
            Owner::for_this_process(),
            Fence(1),
            Duration::from_secs(1),
            issued,
            SystemTime::now(),
        );
        assert!(lease.is_expired());
        assert_eq!(lease.remaining(), Duration::ZERO);
    }
}
