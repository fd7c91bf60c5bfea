//! Lease objects, the rule that judges their expiry, and the lease
//! protocol on them: grants (an acquire-and-load reads the document
//! with the grant), renewals, releases and breaks, each a conditional
//! write; and the fenced document write, checked against its lease.
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

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode as OsPutMode};
use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{
    Bytes, DocName, Error, ErrorKind, Fence, GetOptions, Lease, LockInfo, LockKey, Operation,
    Owner, PutMode, Result, StoredDoc, Version, check_ttl,
};
use serde::{Deserialize, Serialize};

use crate::engine::{DocHead, WriteError, check_limit, refusal};
use crate::{BACKEND, Inner};

/// A document read with a grant: `None` when it was not (the caller reads
/// after the grant), else what [`Inner::get_doc`] said.
type Loaded = Option<Result<Option<StoredDoc>>>;

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
            // Rounded up: a waiter dates the lease by this, and must never
            // find it lapsed while its holder's own deadline (the exact
            // TTL) is still ahead.
            ttl_ms: u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
            since_ms: unix_millis(since),
            nonce: nonce(),
            owner: Some(owner.clone()),
        }
    }

    /// The lock freed by `lease`'s own release: free, and naming the grant
    /// it ended (owner and `since`), so a release sent again after its
    /// reply was lost finds its own work done (see [`is_release_of`]). A
    /// break writes [`free`](Self::free), naming nobody.
    pub(crate) fn released(lease: &Lease) -> Self {
        LeaseBody {
            owner: Some(lease.owner().clone()),
            since_ms: unix_millis(lease.since()),
            ..Self::free(lease.fence().get())
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

impl Inner {
    /// The lease object at `path`: its ETag, body and when this store first
    /// saw that version. A version is first seen when the response carrying
    /// it arrived, never earlier: the request may have waited (or been
    /// retried) for a long time while the lease was written.
    pub(crate) async fn read_lease(
        &self,
        path: &Path,
    ) -> Result<Option<(String, LeaseBody, Instant)>> {
        let Some(got) = self.found(self.store.get(path)).await? else {
            return Ok(None);
        };
        let etag = got.meta.e_tag.clone().unwrap_or_default();
        let bytes = self.bounded(got.bytes()).await?;
        let seen_at = Instant::now();
        let body: LeaseBody = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("lease object {path} is not valid JSON"),
            )
            .with_backend(BACKEND)
            .with_source(e)
        })?;
        let first = self.sightings.saw(path.as_ref(), &etag, seen_at);
        Ok(Some((etag, body, first)))
    }

    /// Records a lease version this store wrote (or found it had written).
    fn remember(&self, path: &Path, etag: &str, body: &LeaseBody, at: Instant) {
        self.sightings.saw(path.as_ref(), etag, at);
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.as_ref().to_owned(), (etag.to_owned(), body.clone()));
    }

    /// Whether version `etag` of `path` is one this store wrote and was
    /// told it wrote.
    fn known_written(&self, path: &Path, etag: &str) -> bool {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path.as_ref())
            .is_some_and(|(known, _)| known == etag)
    }

    /// Writes a lease body; `None` when the condition failed.
    pub(crate) async fn write_lease(
        &self,
        path: &Path,
        body: &LeaseBody,
        mode: OsPutMode,
        at: Instant,
    ) -> Result<Option<String>> {
        let json = serde_json::to_vec(body).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding a lease")
                .with_backend(BACKEND)
                .with_source(e)
        })?;
        match self.put_object(path, Bytes::from(json), mode).await {
            Ok(Some(etag)) => {
                self.remember(path, &etag, body, at);
                Ok(Some(etag))
            }
            Ok(None) => Err(
                Error::new(ErrorKind::Backend, "the server returned no ETag").with_backend(BACKEND),
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::AlreadyExists | ErrorKind::Precondition | ErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes a lease body conditional on `etag`; when the condition fails,
    /// reads the lease back: if it holds exactly `body` (its nonce makes
    /// every body distinct), an earlier try of this write was applied and
    /// its reply lost, and the write counts. Otherwise `Err` with what is
    /// there now.
    pub(crate) async fn swap_lease(
        &self,
        path: &Path,
        body: &LeaseBody,
        etag: &str,
        at: Instant,
    ) -> Result<std::result::Result<String, Option<(String, LeaseBody, Instant)>>> {
        if let Some(new) = self
            .write_lease(path, body, Self::if_match(etag), at)
            .await?
        {
            return Ok(Ok(new));
        }
        match self.read_lease(path).await? {
            Some((etag, found, _)) if found == *body => {
                self.remember(path, &etag, body, at);
                Ok(Ok(etag))
            }
            other => Ok(Err(other)),
        }
    }

    /// [`swap_lease`](Self::swap_lease) of `lease`'s lease object from
    /// `token`, recognising the grant as still this one when the object
    /// changed but holds this grant (see [`is_grant_of`]): a renewal whose
    /// reply was lost (a timeout, a 5xx after retries) rewrote it, and the
    /// caller still has the token that renewal replaced. The swap is then
    /// made from what is there, as a compare-and-swap again: a takeover
    /// racing it wins or loses cleanly.
    async fn swap_own(
        &self,
        path: &Path,
        body: &LeaseBody,
        lease: &Lease,
        token: &str,
        at: Instant,
    ) -> Result<std::result::Result<String, Option<(String, LeaseBody, Instant)>>> {
        let mut from = token.to_owned();
        let mut last = None;
        for _ in 0..3 {
            match self.swap_lease(path, body, &from, at).await? {
                Ok(etag) => return Ok(Ok(etag)),
                Err(Some((etag, found, first))) if is_grant_of(&found, lease) => {
                    tracing::debug!(%path, "a lease write whose reply was lost was applied");
                    from.clone_from(&etag);
                    last = Some((etag, found, first));
                }
                Err(other) => return Ok(Err(other)),
            }
        }
        Ok(Err(last))
    }

    fn locked(&self, key: &LockKey, holder: Option<LockInfo>) -> Error {
        let mut error = Error::new(ErrorKind::Locked, "the lock is held")
            .with_backend(BACKEND)
            .with_operation(Operation::Acquire)
            .with_lock(key);
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    /// Who holds a lease object as read, if its grant is live.
    fn holder_of(
        &self,
        key: &LockKey,
        read: Option<&(String, LeaseBody, Instant)>,
    ) -> Option<LockInfo> {
        match read {
            Some((_, body, first)) if body.held => {
                let left = self.sightings.remaining(body.ttl(), *first);
                if left.is_zero() {
                    None
                } else {
                    info(key, body, left)
                }
            }
            _ => None,
        }
    }

    pub(crate) async fn live_holder(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let read = self.read_lease(&self.lease_path(key)).await?;
        Ok(self.holder_of(key, read.as_ref()))
    }

    pub(crate) async fn try_acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Lease> {
        self.try_acquire_loading(key, owner, ttl, None)
            .await
            .map(|(lease, _)| lease)
    }

    /// Takes the lock (see [`Lock::try_acquire`](runstate_core::Lock::try_acquire)) and, with `load`, reads
    /// that document in the same round trip as the grant's write: the
    /// document `GET` is sent together with the lease `PUT`, and its
    /// result is kept only when that `PUT` granted the lock (`Some`);
    /// otherwise, or when the grant came another way (a lost reply
    /// recognised), it is `None` and the caller reads after the grant.
    ///
    /// A read sent with the grant sees what a read after it would, for the
    /// writers the lock keeps out: the grant is a write conditional on the
    /// lease object being the version read before (a free or lapsed
    /// lease, or this owner's), or the release this store wrote. The
    /// `GET` is sent after that version was seen, so every save made under
    /// an earlier grant, which comes before that grant's release, is
    /// visible to it; and a grant that succeeds proves that nobody was
    /// granted the lock between that version and this grant, so nobody
    /// could save under it meanwhile. (A holder whose lease lapsed while
    /// its write was in flight can land it afterwards, with or without
    /// the overlap: the save of this grant, conditional on the version
    /// read, is then refused rather than losing that write.)
    pub(crate) async fn try_acquire_loading(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        load: Option<(&Path, GetOptions)>,
    ) -> Result<(Lease, Loaded)> {
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND))?;
        self.require_conditional()?;
        let path = self.lease_path(key);
        let issued = Instant::now();
        let now = SystemTime::now();
        let grant = |fence: u64, since: SystemTime, etag: String| {
            Lease::new(key.clone(), owner.clone(), Fence(fence), ttl, issued, since)
                .with_token(etag)
        };
        // A lock this store released can be retaken without reading it.
        let cached = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path.as_ref())
            .cloned();
        if let Some((etag, body)) = cached
            && !body.held
        {
            let new = LeaseBody::held(owner, body.fence + 1, ttl, now);
            if let (Some(etag), loaded) = self
                .write_grant(&path, &new, Self::if_match(&etag), issued, load)
                .await?
            {
                return Ok((grant(new.fence, now, etag), loaded));
            }
        }
        let mut attempted: Option<LeaseBody> = None;
        for _ in 0..3 {
            let (new, since, mode) = match self.read_lease(&path).await? {
                None => (LeaseBody::held(owner, 1, ttl, now), now, OsPutMode::Create),
                Some((etag, body, first)) => {
                    // The very body this call wrote, whose reply was lost
                    // and retried into a conflict, is ours.
                    if attempted.as_ref() == Some(&body) {
                        let since = from_unix_millis(body.since_ms);
                        self.remember(&path, &etag, &body, issued);
                        return Ok((grant(body.fence, since, etag), None));
                    }
                    let left = self.sightings.remaining(body.ttl(), first);
                    let live = body.held && !left.is_zero();
                    let mine = body.owner.as_ref().is_some_and(|o| o.id() == owner.id());
                    if live && mine {
                        // Idempotent by owner: this owner's live grant is
                        // returned again, same fence and `since`, its TTL
                        // restarted by a conditional write.
                        let since = from_unix_millis(body.since_ms);
                        (
                            LeaseBody::held(owner, body.fence, ttl, since),
                            since,
                            Self::if_match(&etag),
                        )
                    } else if live {
                        return Err(self.locked(key, info(key, &body, left)));
                    } else {
                        (
                            LeaseBody::held(owner, body.fence + 1, ttl, now),
                            now,
                            Self::if_match(&etag),
                        )
                    }
                }
            };
            if let (Some(etag), loaded) = self.write_grant(&path, &new, mode, issued, load).await? {
                return Ok((grant(new.fence, since, etag), loaded));
            }
            attempted = Some(new);
        }
        Err(self.locked(key, self.live_holder(key).await?))
    }

    /// Writes a grant ([`write_lease`](Self::write_lease)) and, with
    /// `load`, reads that document at the same time; the read is returned
    /// only when the write granted the lock.
    async fn write_grant(
        &self,
        path: &Path,
        body: &LeaseBody,
        mode: OsPutMode,
        at: Instant,
        load: Option<(&Path, GetOptions)>,
    ) -> Result<(Option<String>, Loaded)> {
        let Some((doc, options)) = load else {
            return Ok((self.write_lease(path, body, mode, at).await?, None));
        };
        let (written, loaded) = tokio::join!(
            self.write_lease(path, body, mode, at),
            self.get_doc(doc, options)
        );
        let written = written?;
        let loaded = written.is_some().then_some(loaded);
        Ok((written, loaded))
    }

    fn lease_lost(
        &self,
        lease: &Lease,
        holder: Option<LockInfo>,
        op: Operation,
        why: &'static str,
    ) -> Error {
        Error::lease_lost_because(lease.key(), why, holder)
            .with_backend(BACKEND)
            .with_operation(op)
    }

    /// The ETag of the lease object this grant wrote: a lease without one
    /// was not granted by this backend and can be nobody's.
    fn token<'a>(&self, lease: &'a Lease, op: Operation) -> Result<&'a str> {
        match lease.token() {
            Some(token) if !token.is_empty() => Ok(token),
            _ => Err(self.lease_lost(
                lease,
                None,
                op,
                "this lease was not granted by the S3 backend",
            )),
        }
    }

    pub(crate) async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND))?;
        self.require_conditional()?;
        if lease.is_expired() {
            return Err(self.lease_lost(lease, None, Operation::Renew, "the lease expired"));
        }
        let issued = Instant::now();
        let token = self.token(lease, Operation::Renew)?;
        let body = LeaseBody::held(lease.owner(), lease.fence().get(), ttl, lease.since());
        let path = self.lease_path(lease.key());
        match self.swap_own(&path, &body, lease, token, issued).await? {
            Ok(etag) => Ok(lease.renewed(ttl, issued).with_token(etag)),
            Err(now) => Err(self.lease_lost(
                lease,
                self.holder_of(lease.key(), now.as_ref()),
                Operation::Renew,
                "the lease was taken over, released or broken",
            )),
        }
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<()> {
        self.require_conditional()?;
        let path = self.lease_path(lease.key());
        let token = self.token(lease, Operation::Release)?;
        let lapsed = lease.is_expired();
        let free = LeaseBody::released(lease);
        match (
            self.swap_own(&path, &free, lease, token, Instant::now())
                .await?,
            lapsed,
        ) {
            (Ok(_), false) => Ok(()),
            (Ok(_), true) => Err(self.lease_lost(
                lease,
                None,
                Operation::Release,
                "the lease expired before it was released",
            )),
            // Released by an earlier try of this release whose reply was
            // lost (the call failed with its outcome unknown): done. A
            // release this store was told it made is not sent again by
            // anyone who knew: a second release is `LeaseLost`, as on every
            // backend.
            (Err(Some((etag, found, _))), false)
                if is_release_of(&found, lease) && !self.known_written(&path, &etag) =>
            {
                Ok(())
            }
            (Err(now), _) => Err(self.lease_lost(
                lease,
                self.holder_of(lease.key(), now.as_ref()),
                Operation::Release,
                "the lease was taken over, released or broken",
            )),
        }
    }

    fn fenced(&self, lease: &Lease, holder: Option<LockInfo>, why: &str) -> Error {
        Error::fenced_because(lease, why, holder).with_backend(BACKEND)
    }

    /// Checks that `lease` is still the current grant of its lock: its
    /// local deadline has not passed and its lease object is still the
    /// version this grant wrote (one `HEAD`).
    async fn check_lease(&self, lease: &Lease) -> Result<()> {
        if lease.is_expired() {
            return Err(self.fenced(lease, None, "its deadline has passed"));
        }
        let path = self.lease_path(lease.key());
        let current = self
            .found(self.store.head(&path))
            .await?
            .and_then(|meta| meta.e_tag);
        if current.is_none() || current.as_deref() != lease.token() {
            // Another version may still be this grant: a renewal whose
            // reply was lost rewrote it (the caller has the token it
            // replaced). A successor's grant has a higher fence, a release
            // or a break is not held: both are refused.
            let read = self.read_lease(&path).await?;
            if !read
                .as_ref()
                .is_some_and(|(_, body, _)| is_grant_of(body, lease))
            {
                return Err(self.fenced(
                    lease,
                    self.holder_of(lease.key(), read.as_ref()),
                    "the lease object changed",
                ));
            }
        }
        // The HEAD may have taken a while.
        if lease.is_expired() {
            return Err(self.fenced(lease, None, "its deadline has passed"));
        }
        Ok(())
    }

    /// A write fenced by `lease` (see the crate documentation for exactly
    /// what is checked).
    ///
    /// The order is what makes it safe: the version the write will be
    /// conditional on is fixed first (the caller's for `Create` and
    /// `Update`; for `Overwrite`, the document's version read now), the
    /// lease is checked after that, and the write is conditional on that
    /// version. A holder that stalls after its check, and whose lease a
    /// successor takes over and saves under meanwhile, finds the version
    /// changed and is refused. A retry of an overwrite after a conflict
    /// starts again from reading the version, then the lease: no write is
    /// ever made on a version read after the last lease check.
    pub(crate) async fn fenced_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: &PutMode,
    ) -> Result<Version> {
        self.require_conditional()?;
        let run = lease.key().run();
        lease.key().check_covers(run, doc)?;
        // Before anything is sent (`write_doc` checks it again).
        check_limit(bytes.len() as u64, Some(crate::MAX_OBJECT))?;
        let path = self.doc_path(run, doc);
        // For an overwrite: the document as read back after a refused
        // write, which serves as the next try's first read.
        let mut reread: Option<Option<DocHead>> = None;
        for _ in 0..3 {
            let os_mode = match mode {
                PutMode::Create => OsPutMode::Create,
                // A version that is no ETag of this store is refused after
                // the lease check: a stale holder hears `Fenced` first.
                PutMode::Update(v) => match Self::if_version(v) {
                    Ok(os_mode) => os_mode,
                    Err(error) => {
                        self.check_lease(lease).await?;
                        return Err(error);
                    }
                },
                PutMode::Overwrite => {
                    if lease.is_expired() {
                        return Err(self.fenced(lease, None, "its deadline has passed"));
                    }
                    let current = match reread.take() {
                        Some(current) => current,
                        None => self.doc_head(&path).await?,
                    };
                    match current {
                        Some(head) => Self::if_match(head.version.as_str()),
                        None => OsPutMode::Create,
                    }
                }
            };
            self.check_lease(lease).await?;
            match self.write_doc(&path, bytes.clone(), os_mode).await {
                Ok(version) => return Ok(version),
                // An overwrite keeps its answer (the lease is checked again
                // on the next try: `Fenced`): its bytes do not depend on
                // what it replaced, and a try of it that landed was replaced
                // by a later write, so the store is as if it had never been
                // written, and redoing it writes the same bytes.
                Err(WriteError::Refused { now, .. }) if *mode == PutMode::Overwrite => {
                    reread = Some(now);
                }
                // Refused, and the document holds another write's nonce.
                // While the lease is still this grant, that other write
                // came after a refusal of every try of ours (no fenced
                // writer can have replaced an applied try of ours). Once
                // it has lapsed, or was broken or taken over (an
                // operator's break frees it with the holder's deadline
                // still ahead), a successor may have written over a try of
                // ours that object_store retried into this 412: whether
                // this save was applied cannot be told, and `Precondition`
                // would make a typed update run its closure again on data
                // that may hold its first run. The outcome is reported
                // unknown instead (also when the lease cannot be read).
                Err(WriteError::Refused { error, .. }) => {
                    // (`check_lease` looks at the lease's deadline first.)
                    if self.check_lease(lease).await.is_err() {
                        return Err(Error::new(
                            ErrorKind::Backend,
                            format!(
                                "the save under the lease with fence {} was refused, the lease \
                                 is no longer this grant, and the document was written by \
                                 someone else since: whether an earlier try of this save was \
                                 applied cannot be told (do not redo it blindly)",
                                lease.fence()
                            ),
                        )
                        .with_backend(BACKEND)
                        .with_lock(lease.key())
                        .with_source(error));
                    }
                    return Err(refusal(mode, error));
                }
                Err(WriteError::Failed(error)) => return Err(error),
            }
        }
        Err(Error::new(
            ErrorKind::Precondition,
            "the document kept changing during the save",
        )
        .with_backend(BACKEND))
    }
}

/// Whether a lease object as read is the lock freed by `lease`'s own
/// release ([`LeaseBody::released`]): free, naming its grant. Nothing else
/// writes a free object naming a grant.
fn is_release_of(body: &LeaseBody, lease: &Lease) -> bool {
    !body.held && names_grant(body, lease)
}

/// Whether a lease object names `lease`'s grant: its fence, `since` and
/// owner id.
fn names_grant(body: &LeaseBody, lease: &Lease) -> bool {
    body.fence == lease.fence().get()
        && body.since_ms == runstate_core::time::unix_millis(lease.since())
        && body
            .owner
            .as_ref()
            .is_some_and(|owner| owner.id() == lease.owner().id())
}

/// Whether a lease object as read is still `lease`'s grant: held, by its
/// owner id, with its fence and its `since`. Every grant raises the fence
/// or (re-granted to the same owner id while live, see
/// [`Inner::try_acquire_loading`]) keeps both; releases and breaks are not
/// held. So such an object was written by a renewal of this very grant.
fn is_grant_of(body: &LeaseBody, lease: &Lease) -> bool {
    body.held && names_grant(body, lease)
}
