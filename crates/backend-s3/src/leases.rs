//! Lease objects, and the rule that judges their expiry.
//!
//! A lock is one small JSON object, `<prefix>/.runstate/locks/<run>/run.lease`
//! or `…/doc.<name>.lease`:
//!
//! ```json
//! {"v":1,"held":true,"fence":7,"ttl_ms":30000,"since_ms":1795549502123,"nonce":"…","owner":{…}}
//! ```
//!
//! The random nonce makes every written version distinct: S3 ETags are
//! content hashes, so a renewal that rewrote identical bytes would keep
//! its ETag, waiters would not see it, and `If-Match` on an old version
//! could match a new one with the same content.
//!
//! It is created with `If-None-Match: *` and changed only with
//! `If-Match: <its ETag>`, so each grant, renewal, release and takeover is
//! a compare-and-swap; fences increase by one per grant and a released lease
//! keeps its fence.
//!
//! **Idempotent by owner.** An acquire that finds a live grant of its own
//! owner id returns that grant (same fence, same `since`) after renewing it
//! with a conditional write, so a retry after a lost grant reply does not
//! wait a TTL behind itself. Since every body is distinct (the nonce), a
//! conditional write refused after object_store retried it (5xx, then
//! `412`) is recognised as applied when the object holds exactly the body
//! it wrote: for grants, renewals and releases alike.
//!
//! **Expiry rule.** S3 offers no server clock to compare with, and object
//! timestamps must not be compared with a client's wall clock. A waiter
//! therefore judges a held lease by its own monotonic clock: the lease
//! version (ETag) it sees expires `ttl × (1 + skew)` after the moment this
//! store first saw that version (or wrote it). A version is seen when the
//! response carrying it has arrived, never when the request was sent: a
//! read held up in the network or retried by object_store may return a
//! lease granted long after it was asked for. A renewal writes a new
//! version, which restarts the wait. A waiter that sees a lease for the
//! first time thus waits a full TTL (plus the skew margin) before taking it
//! over, however old the lease is; the holder's own deadline, counted from
//! before its request was sent, always ends first. This is the approach of
//! object_store's `DynamoCommit`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{Fence, LockInfo, LockKey, Owner};
use serde::{Deserialize, Serialize};

/// The body of a lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseBody {
    pub(crate) v: u32,
    pub(crate) held: bool,
    pub(crate) fence: u64,
    #[serde(default)]
    pub(crate) ttl_ms: u64,
    #[serde(default)]
    pub(crate) since_ms: u64,
    #[serde(default)]
    pub(crate) nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<Owner>,
}

fn nonce() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The nonce of one document write: 128 random bits, so no two writes
/// anywhere share one.
pub(crate) fn write_nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl LeaseBody {
    pub(crate) fn held(owner: &Owner, fence: u64, ttl: Duration, since: SystemTime) -> Self {
        LeaseBody {
            v: 1,
            held: true,
            fence,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            since_ms: unix_millis(since),
            nonce: nonce(),
            owner: Some(owner.clone()),
        }
    }

    pub(crate) fn free(fence: u64) -> Self {
        LeaseBody {
            v: 1,
            held: false,
            fence,
            ttl_ms: 0,
            since_ms: 0,
            nonce: nonce(),
            owner: None,
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// When this store first saw each lease version.
#[derive(Debug, Default)]
pub(crate) struct Sightings {
    seen: Mutex<HashMap<String, (String, Instant)>>,
    skew_pct: u32,
}

impl Sightings {
    pub(crate) fn new(skew_pct: u32) -> Self {
        Sightings {
            seen: Mutex::new(HashMap::new()),
            skew_pct,
        }
    }

    /// Records that version `etag` of `path` was seen (or written) at
    /// `at`, keeping the earlier moment for a version seen before.
    pub(crate) fn saw(&self, path: &str, etag: &str, at: Instant) -> Instant {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.clear();
        }
        match seen.get(path) {
            Some((known, first)) if known == etag => *first,
            _ => {
                seen.insert(path.to_owned(), (etag.to_owned(), at));
                at
            }
        }
    }

    /// How long a held lease with this TTL, first seen at `first`, has left
    /// by this process's clock, skew margin included (zero once expired).
    pub(crate) fn remaining(&self, ttl: Duration, first: Instant) -> Duration {
        let margin = ttl.mul_f64(f64::from(self.skew_pct) / 100.0);
        (first + ttl + margin).saturating_duration_since(Instant::now())
    }
}

/// What others see of a held lease. `expires_in` is this store's
/// estimate, reported as at most the TTL even while the skew margin runs.
pub(crate) fn info(key: &LockKey, body: &LeaseBody, expires_in: Duration) -> Option<LockInfo> {
    Some(LockInfo::new(
        key.clone(),
        body.owner.clone()?,
        Fence(body.fence),
        from_unix_millis(body.since_ms),
        expires_in.min(body.ttl()),
    ))
}
