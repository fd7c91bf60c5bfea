//! The lease contract: try-acquire, renew, release, inspect, break, and the
//! combined operations a locked update is built from.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Operation, Result};
use crate::id::{DocName, RunId};
use crate::lease::{Fence, Lease, LockInfo, LockKey, Owner};
use crate::store::{GetOptions, PutMode, PutOptions, Store, StoredDoc};
use crate::version::Version;

/// Leases on runs and documents, with fencing, on top of a [`Store`].
///
/// Expiry is judged by the backend's clock (or the waiter's monotonic
/// clock), never by comparing wall clocks across machines. Only the owner
/// renews or releases. Object safe: hold it as `Arc<dyn Lock>`, which also
/// coerces to `Arc<dyn Store>`.
///
/// To wait for a busy lock, use [`LockExt::acquire`](crate::LockExt), which
/// implements the wait policy once for every backend.
#[async_trait]
pub trait Lock: Store {
    /// Takes the lock for `owner` for `ttl`, or fails at once.
    ///
    /// The new grant's fence is larger than every fence this lock granted
    /// before. A lock whose lease expired is taken over; so is one whose
    /// holder is known dead on this host, when the backend can tell.
    ///
    /// **Idempotent by owner.** When `owner` (the same owner id) already
    /// holds the lock with a live grant, that grant is returned again: same
    /// fence, its TTL restarted from now. A retry of an acquire whose reply
    /// was lost (the grant was made, the answer never arrived) thus gets
    /// its grant back instead of waiting a whole TTL behind itself. An
    /// [`Owner`] therefore names one holder: tasks that must exclude each
    /// other take the lock under distinct owners ([`Owner::sibling`]), as
    /// the typed API does for every update and guard.
    ///
    /// # Errors
    /// [`Locked`](crate::ErrorKind::Locked) with [`Error::holder`](crate::Error::holder)
    /// set when another owner holds it; [`InvalidArgument`](crate::ErrorKind::InvalidArgument)
    /// for a TTL outside 1 ms ..= [`MAX_TTL`](crate::MAX_TTL) (see
    /// [`check_ttl`](crate::check_ttl)), before anything is sent.
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease>;

    /// Extends a held lease to `ttl` from now; the fence stays.
    ///
    /// # Errors
    /// [`LeaseLost`](crate::ErrorKind::LeaseLost) when it already expired, was
    /// broken or was taken over; [`InvalidArgument`](crate::ErrorKind::InvalidArgument)
    /// for a TTL [`check_ttl`](crate::check_ttl) refuses (the lease is left
    /// as it was).
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Gives the lease back.
    ///
    /// # Errors
    /// [`LeaseLost`](crate::ErrorKind::LeaseLost) when it is no longer held by this
    /// grant (expired, broken, taken over): a lost lease is reported, never
    /// silently ignored.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Who holds the lock now, if anyone (an expired lease counts as free).
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>>;

    /// An operator's forced release. With `only_fence`, breaks only that
    /// grant (so a waiter that saw a dead holder cannot break the next,
    /// live one). Returns what was broken, if anything. The fence counter is
    /// kept, so the next grant still gets a larger fence.
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>>;

    /// The held locks of one run, or of the whole store.
    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>>;

    /// Waits until `key` may have been released, or `max` has passed,
    /// whichever comes first. The wait loop of
    /// [`LockExt::acquire`](crate::LockExt::acquire) calls it between
    /// attempts. The default sleeps `max`; a backend that learns of releases
    /// (made through it in this process, or announced by its server)
    /// returns early so the next waiter retries at once. Returning early
    /// spuriously is allowed.
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        let _ = key;
        tokio::time::sleep(max).await;
    }

    /// While `key` is held by a live grant that this handle made (or
    /// renewed) for another owner than `owner`, and that it has not seen
    /// given back, waits until that grant is given back through this
    /// handle, reaches its local deadline ([`Lease::expires_at`]), or `max`
    /// has passed, and returns `true`; returns `false` at once when this
    /// handle knows of no such grant.
    ///
    /// The wait loop of [`LockExt::acquire`](crate::LockExt::acquire) calls
    /// it before it asks the backend, so that a waiter whose holder is in
    /// this process (the common case of tasks taking turns) waits for that
    /// holder's release instead of asking while the holder is still at
    /// work: such an attempt can only be refused, and it contends with the
    /// holder's own save. It is a hint, never a verdict: the caller asks
    /// the backend afterwards in any case (the grant may have been broken
    /// or taken over meanwhile, which this handle does not see). Backends
    /// implement it with [`ReleaseSignals`](crate::ReleaseSignals); the
    /// default knows of no grants and returns `false` at once.
    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        let _ = (key, owner, max);
        false
    }

    /// Takes the lock and reads `doc` (which the lock must cover) in one
    /// call. The default makes two calls; backends that can do both in one
    /// round trip override it.
    ///
    /// # Errors
    /// Those of [`try_acquire`](Lock::try_acquire) and
    /// [`Store::get`]; if the read fails the lease is released before the
    /// error is returned.
    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        key.check_covers(key.run(), doc)
            .map_err(|e| e.with_operation(Operation::AcquireAndLoad))?;
        let lease = self.try_acquire(key, owner, ttl).await?;
        match self.get(key.run(), doc, options).await {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                if let Err(release) = self.release(&lease).await {
                    tracing::debug!(%release, "release after a failed load");
                }
                Err(error)
            }
        }
    }

    /// Saves `doc` fenced by `lease` with `mode`, then releases the lease,
    /// in one call. The default makes two calls; backends that can do both
    /// in one round trip override it.
    ///
    /// Once the save succeeded the call succeeds: a release that fails
    /// afterwards only means the lease expires by its TTL. When the save
    /// fails, for whatever reason (a lease that does not cover `doc`, a
    /// refused condition, a document that cannot be written, a full disk),
    /// the lease is released (unless it was already lost) and the save's
    /// error returned: a failed save never leaves its lock held.
    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run();
        match self
            .put(run, doc, bytes, PutOptions::mode(mode).with_lease(lease))
            .await
        {
            Ok(version) => {
                if let Err(release) = self.release(lease).await {
                    tracing::debug!(%release, "release after a successful save");
                }
                Ok(version)
            }
            Err(error) => {
                if !error.is_lease_lost()
                    && let Err(release) = self.release(lease).await
                {
                    tracing::debug!(%release, "release after a failed save");
                }
                Err(error)
            }
        }
    }
}

macro_rules! forward_lock {
    ($ptr:ident) => {
        #[async_trait]
        impl<T: Lock + ?Sized> Lock for $ptr<T> {
            async fn try_acquire(
                &self,
                key: &LockKey,
                owner: &Owner,
                ttl: Duration,
            ) -> Result<Lease> {
                (**self).try_acquire(key, owner, ttl).await
            }
            async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
                (**self).renew(lease, ttl).await
            }
            async fn release(&self, lease: &Lease) -> Result<()> {
                (**self).release(lease).await
            }
            async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
                (**self).inspect(key).await
            }
            async fn break_lock(
                &self,
                key: &LockKey,
                only_fence: Option<Fence>,
            ) -> Result<Option<LockInfo>> {
                (**self).break_lock(key, only_fence).await
            }
            async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
                (**self).list_locks(run).await
            }
            async fn wait_for_release(&self, key: &LockKey, max: Duration) {
                (**self).wait_for_release(key, max).await
            }
            async fn wait_for_local_release(
                &self,
                key: &LockKey,
                owner: &Owner,
                max: Duration,
            ) -> bool {
                (**self).wait_for_local_release(key, owner, max).await
            }
            async fn acquire_and_load(
                &self,
                key: &LockKey,
                doc: &DocName,
                owner: &Owner,
                ttl: Duration,
                options: GetOptions,
            ) -> Result<(Lease, Option<StoredDoc>)> {
                (**self)
                    .acquire_and_load(key, doc, owner, ttl, options)
                    .await
            }
            async fn save_and_release(
                &self,
                lease: &Lease,
                doc: &DocName,
                bytes: Bytes,
                mode: PutMode,
            ) -> Result<Version> {
                (**self).save_and_release(lease, doc, bytes, mode).await
            }
        }
    };
}

forward_lock!(Arc);
forward_lock!(Box);
