//! Wake-ups for waiters in this process when a lock is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::lease::{Fence, Lease, LockKey, Owner};

/// A table of release signals, one per lock, for backends to embed and
/// implement [`Lock::wait_for_release`](crate::Lock::wait_for_release)
/// and [`Lock::wait_for_local_release`](crate::Lock::wait_for_local_release)
/// with: call [`granted`](ReleaseSignals::granted) with every lease the
/// backend instance grants or renews,
/// [`released`](ReleaseSignals::released) whenever a lease is given up
/// through it (released, saved and released, broken),
/// [`announced`](ReleaseSignals::announced) for a release it hears of
/// otherwise (another process's, announced by the server), and
/// [`wait`](ReleaseSignals::wait) and
/// [`wait_while_held`](ReleaseSignals::wait_while_held) from the two waits.
///
/// Each release wakes one [`wait`](ReleaseSignals::wait)er (first come,
/// first served), so a released lock is handed to the next local waiter at
/// once instead of after its backoff, without a thundering herd. Waiters in
/// other processes still poll with backoff.
///
/// A lock held by a grant made through this instance is released through
/// it too (only its owner releases it), so a waiter of this process need
/// not ask the server while such a grant is live: it waits for that
/// release ([`wait_while_held`](ReleaseSignals::wait_while_held)), and
/// asks when it came (or the grant expired), instead of asking while the
/// holder is still at work, which costs a round trip that fails and, on
/// most servers, slows the holder's own save down.
#[derive(Debug, Default)]
pub struct ReleaseSignals {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<LockKey, Arc<Entry>>,
    /// The size at which entries that serve nobody are forgotten next.
    prune_at: usize,
}

/// Entries kept before those that serve nobody are forgotten.
const KEEP: usize = 1024;

/// One lock's signals and its grant made through this instance.
#[derive(Debug, Default)]
struct Entry {
    /// Woken once per release: the waiters of [`ReleaseSignals::wait`]. A
    /// release nobody waits for leaves a permit for the next one.
    next: Notify,
    /// Woken at every release through this instance: the waiters of
    /// [`ReleaseSignals::wait_while_held`], which look at `grant` again.
    local: Notify,
    /// How many wait in [`ReleaseSignals::wait_while_held`]: a release
    /// that wakes one of them leaves no permit in `next` (the woken waiter
    /// asks the backend in any case; a permit would end the next `wait`
    /// of this lock at once, for nothing). Counted and read under `grant`,
    /// so a release either finds a waiter counted, which then sees the
    /// grant held and is woken through `local`, or leaves the permit for
    /// it.
    local_waiters: AtomicUsize,
    grant: Mutex<Grants>,
}

/// What this instance knows of the grants of one lock.
#[derive(Debug, Default)]
struct Grants {
    /// The live grant made through this instance, as far as it knows.
    current: Option<Grant>,
    /// The highest fence given up through this instance: a renewal of such
    /// a grant that lands after its release brings nothing back.
    given_up: Option<Fence>,
}

/// A live grant made through this instance, as far as it knows.
#[derive(Debug, Clone)]
struct Grant {
    owner_id: String,
    fence: Fence,
    /// The lease's local deadline: no later than the backend's expiry.
    expires_at: Instant,
}

impl Entry {
    fn grant(&self) -> MutexGuard<'_, Grants> {
        self.grant.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Time left on the grant made through this instance to another owner
    /// than `owner`, if there is one and it has not expired; when there is,
    /// `waiter` is counted among the local waiters (once), under the same
    /// lock as the release that reads the count.
    fn held_by_other<'a>(
        &'a self,
        owner: &Owner,
        waiter: &mut Option<LocalWaiter<'a>>,
    ) -> Option<Duration> {
        let grants = self.grant();
        let grant = grants.current.as_ref()?;
        if grant.owner_id == owner.id() {
            return None;
        }
        let left = grant.expires_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if waiter.is_none() {
            *waiter = Some(LocalWaiter::count(&self.local_waiters));
        }
        Some(left)
    }
}

impl ReleaseSignals {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn existing(&self, key: &LockKey) -> Option<Arc<Entry>> {
        self.table().entries.get(key).cloned()
    }

    fn entry(&self, key: &LockKey) -> Arc<Entry> {
        let mut table = self.table();
        if let Some(existing) = table.entries.get(key) {
            return Arc::clone(existing);
        }
        // Keep the table small: forget locks nobody waits on and no live
        // grant of this instance holds; when most are still in use, not
        // again before the table doubled.
        if table.entries.len() >= table.prune_at.max(KEEP) {
            let now = Instant::now();
            table.entries.retain(|_, entry| {
                Arc::strong_count(entry) > 1
                    || entry
                        .grant()
                        .current
                        .as_ref()
                        .is_some_and(|grant| grant.expires_at > now)
            });
            table.prune_at = table.entries.len().saturating_mul(2);
        }
        let entry = Arc::new(Entry::default());
        table.entries.insert(key.clone(), Arc::clone(&entry));
        entry
    }

    /// `lease` was granted, granted again or renewed through this
    /// instance: until it is [`released`](Self::released) or expires, the
    /// waiters of [`wait_while_held`](Self::wait_while_held) wait for it.
    /// Ignored when it is older than the grant recorded, or was already
    /// given up (a renewal finishing after the release of its grant).
    pub fn granted(&self, lease: &Lease) {
        let entry = self.entry(lease.key());
        let mut grants = entry.grant();
        let fence = lease.fence();
        let stale = grants.given_up.is_some_and(|up| fence <= up)
            || grants.current.as_ref().is_some_and(|g| fence < g.fence);
        if !stale {
            grants.current = Some(Grant {
                owner_id: lease.owner().id().to_owned(),
                fence,
                expires_at: lease.expires_at(),
            });
        }
    }

    /// The grant of `key` with fence `fence` was given up through this
    /// instance (released, saved and released, or broken; whether or not
    /// the backend still counted it as held): forgets it (never a newer
    /// grant) and wakes the next waiter, unless a newer live grant of this
    /// instance holds the lock (a late release of an older grant frees
    /// nothing).
    pub fn released(&self, key: &LockKey, fence: Fence) {
        let Some(entry) = self.existing(key) else {
            return;
        };
        let wake_next = {
            let mut grants = entry.grant();
            grants.given_up = grants.given_up.max(Some(fence));
            match &grants.current {
                Some(newer) if newer.fence > fence && newer.expires_at > Instant::now() => {
                    return;
                }
                Some(g) if g.fence <= fence => grants.current = None,
                _ => {}
            }
            // Read under `grant`: see `Entry::local_waiters`.
            entry.local_waiters.load(Ordering::SeqCst) == 0
        };
        entry.local.notify_waiters();
        if wake_next {
            entry.next.notify_one();
        }
    }

    /// A guard that calls [`released`](Self::released) for `key` and
    /// `fence` when dropped: made before a release is sent, it tells this
    /// process's waiters of the release however the call ends, also when
    /// its caller stops waiting for it (a timeout or `select!` around the
    /// call) while the backend still carries it out.
    pub fn releasing<'a>(&'a self, key: &'a LockKey, fence: Fence) -> Releasing<'a> {
        Releasing {
            signals: self,
            key,
            fence,
        }
    }

    /// A release of `key` learnt of otherwise (announced by the server,
    /// made by any process): wakes the next waiter of
    /// [`wait`](Self::wait). This instance's own grant of `key`, if any, is
    /// kept: the announcement may be the late echo of an earlier release,
    /// and a grant of this instance is given up through it.
    pub fn announced(&self, key: &LockKey) {
        if let Some(entry) = self.existing(key) {
            entry.next.notify_one();
        }
    }

    /// Waits for a release of `key` through this table, or `max`.
    pub async fn wait(&self, key: &LockKey, max: Duration) {
        let entry = self.entry(key);
        let _ = tokio::time::timeout(max, entry.next.notified()).await;
    }

    /// While `key` is held by a live grant made through this instance to
    /// another owner than `owner`, waits until it is released through this
    /// instance, expires, or `max` has passed, and returns `true`; returns
    /// `false` at once when there is no such grant (or `max` is zero: then
    /// nothing was waited for).
    pub async fn wait_while_held(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        // A grant is recorded in its entry: without one, nothing to wait for.
        let Some(entry) = self.existing(key) else {
            return false;
        };
        let deadline = Instant::now().checked_add(max);
        let mut waited = false;
        // Counted only once a grant was seen held (see `local_waiters`): a
        // waiter that returns `false` falls back to `wait`, whose permit a
        // release must then not have withheld.
        let mut counted = None;
        loop {
            let notified = entry.local.notified();
            tokio::pin!(notified);
            // Enabled before the grant is looked at, so a release made in
            // between still wakes this waiter.
            notified.as_mut().enable();
            #[cfg(test)]
            tests::before_the_check();
            let Some(held) = entry.held_by_other(owner, &mut counted) else {
                return waited;
            };
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return waited;
            }
            waited = true;
            // Until the grant's deadline, after which it is expired (the
            // backend's clock may lag a little: the caller asks the server,
            // which says how long is left).
            if tokio::time::timeout(held.min(left), notified)
                .await
                .is_err()
            {
                return true;
            }
        }
    }
}

/// Returned by [`ReleaseSignals::releasing`]: signals the release of its
/// grant when dropped.
#[derive(Debug)]
#[must_use = "the release is signalled when this guard is dropped"]
pub struct Releasing<'a> {
    signals: &'a ReleaseSignals,
    key: &'a LockKey,
    fence: Fence,
}

impl Drop for Releasing<'_> {
    fn drop(&mut self) {
        self.signals.released(self.key, self.fence);
    }
}

/// One waiter of [`ReleaseSignals::wait_while_held`], counted while it
/// lives.
struct LocalWaiter<'a>(&'a AtomicUsize);

impl<'a> LocalWaiter<'a> {
    fn count(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::SeqCst);
        LocalWaiter(waiters)
    }
}

impl Drop for LocalWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::RunId;

    fn key() -> LockKey {
        LockKey::Run(RunId::new("r").unwrap())
    }

    thread_local! {
        /// Run by `wait_while_held` on this thread just before it looks at
        /// the grant: where a release can race the check.
        static BEFORE_THE_CHECK: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn before_the_check() {
        if let Some(hook) = BEFORE_THE_CHECK.with(|hook| hook.borrow_mut().take()) {
            hook();
        }
    }

    fn lease(owner: &Owner, fence: u64, ttl: Duration) -> Lease {
        lease_of(key(), owner, fence, ttl)
    }

    fn lease_of(key: LockKey, owner: &Owner, fence: u64, ttl: Duration) -> Lease {
        Lease::new(
            key,
            owner.clone(),
            Fence(fence),
            ttl,
            Instant::now(),
            std::time::SystemTime::now(),
        )
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter_early() {
        let signals = Arc::new(ReleaseSignals::new());
        let key = key();
        let waiter = {
            let (signals, key) = (Arc::clone(&signals), key.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                signals.wait(&key, Duration::from_secs(10)).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        signals.released(&key, Fence(1));
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn without_a_release_it_times_out() {
        let signals = ReleaseSignals::new();
        let key = key();
        let start = Instant::now();
        signals.wait(&key, Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn only_entries_that_serve_nobody_are_forgotten() {
        let signals = ReleaseSignals::new();
        let owner = Owner::for_this_process();
        signals.granted(&lease(&owner, 1, Duration::from_secs(600)));
        for i in 0..5000 {
            let other = LockKey::Run(RunId::new(format!("r{i}")).unwrap());
            signals.granted(&lease_of(
                other.clone(),
                &owner,
                1,
                Duration::from_secs(600),
            ));
            signals.released(&other, Fence(1));
        }
        let table = signals.table();
        assert!(table.entries.len() <= 2 * KEEP, "{}", table.entries.len());
        assert!(
            table
                .entries
                .get(&key())
                .is_some_and(|entry| entry.grant().current.is_some()),
            "the live grant is kept"
        );
    }

    #[tokio::test]
    async fn a_local_grant_is_waited_for_until_its_release() {
        let signals = Arc::new(ReleaseSignals::new());
        let (holder, waiter) = (Owner::for_this_process(), Owner::for_this_process());
        // Nothing granted here, or granted to the waiter itself: no wait.
        assert!(
            !signals
                .wait_while_held(&key(), &waiter, Duration::MAX)
                .await
        );
        signals.granted(&lease(&waiter, 1, Duration::from_secs(600)));
        assert!(
            !signals
                .wait_while_held(&key(), &waiter, Duration::MAX)
                .await
        );
        signals.released(&key(), Fence(1));
        // Held by another owner: waits, through announcements of other
        // releases (which may be echoes), until the release.
        signals.granted(&lease(&holder, 2, Duration::from_secs(600)));
        let waiting = {
            let (signals, waiter) = (Arc::clone(&signals), waiter.clone());
            tokio::spawn(async move {
                signals
                    .wait_while_held(&key(), &waiter, Duration::from_secs(600))
                    .await
            })
        };
        signals.announced(&key());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "an announcement does not end it");
        signals.released(&key(), Fence(2));
        assert!(waiting.await.unwrap(), "it waited");
        // Bounded by `max` (a zero one waits for nothing, so a caller
        // falls back to its backoff), and by the grant's deadline.
        signals.granted(&lease(&holder, 3, Duration::from_secs(600)));
        assert!(
            signals
                .wait_while_held(&key(), &waiter, Duration::from_millis(10))
                .await
        );
        assert!(
            !signals
                .wait_while_held(&key(), &waiter, Duration::ZERO)
                .await
        );
        signals.granted(&lease(&holder, 4, Duration::from_millis(10)));
        assert!(
            signals
                .wait_while_held(&key(), &waiter, Duration::MAX)
                .await
        );
        assert!(
            !signals
                .wait_while_held(&key(), &waiter, Duration::MAX)
                .await
        );
    }

    /// A grant is known by its fence: a renewal that lands after the
    /// release of its grant, or a late release of an older grant, leaves
    /// the waiters of the current holder as they should be.
    #[tokio::test]
    async fn grants_are_told_apart_by_fence() {
        let signals = ReleaseSignals::new();
        let (holder, waiter) = (Owner::for_this_process(), Owner::for_this_process());
        let held = |signals: &ReleaseSignals| {
            signals
                .existing(&key())
                .and_then(|entry| entry.grant().current.as_ref().map(|g| g.fence))
        };
        signals.granted(&lease(&holder, 5, Duration::from_secs(600)));
        signals.released(&key(), Fence(5));
        // A renewal of fence 5 finishing after its release.
        signals.granted(&lease(&holder, 5, Duration::from_secs(600)));
        assert_eq!(held(&signals), None, "a released grant came back");
        // A newer grant is not forgotten by the release of an older one,
        // nor replaced by the late renewal of an older one.
        signals.granted(&lease(&holder, 7, Duration::from_secs(600)));
        signals.released(&key(), Fence(6));
        signals.granted(&lease(&holder, 6, Duration::from_secs(600)));
        assert_eq!(held(&signals), Some(Fence(7)));
        assert!(
            signals
                .wait_while_held(&key(), &waiter, Duration::from_millis(10))
                .await,
            "the holder of fence 7 is still waited for"
        );
        signals.released(&key(), Fence(7));
        assert_eq!(held(&signals), None);
    }

    /// A release that wakes a waiter of `wait_while_held` leaves no permit
    /// behind: the next `wait` of the lock (behind a holder elsewhere)
    /// waits for a release instead of ending at once.
    #[tokio::test]
    async fn a_release_woken_locally_leaves_no_spare_wake_up() {
        let signals = Arc::new(ReleaseSignals::new());
        let (holder, waiter) = (Owner::for_this_process(), Owner::for_this_process());
        signals.granted(&lease(&holder, 1, Duration::from_secs(600)));
        let waiting = {
            let (signals, waiter) = (Arc::clone(&signals), waiter.clone());
            tokio::spawn(async move {
                signals
                    .wait_while_held(&key(), &waiter, Duration::from_secs(600))
                    .await
            })
        };
        while signals
            .existing(&key())
            .is_none_or(|entry| entry.local_waiters.load(Ordering::SeqCst) == 0)
        {
            tokio::task::yield_now().await;
        }
        signals.released(&key(), Fence(1));
        assert!(waiting.await.unwrap());
        let start = Instant::now();
        signals.wait(&key(), Duration::from_millis(50)).await;
        assert!(
            start.elapsed() >= Duration::from_millis(50),
            "a spare permit ended the wait at once"
        );
        // Without a local waiter, a release still leaves its permit for
        // the next waiter of `wait`, who may not be waiting yet.
        signals.released(&key(), Fence(2));
        let start = Instant::now();
        signals.wait(&key(), Duration::from_secs(600)).await;
        assert!(start.elapsed() < Duration::from_secs(300));
    }

    /// A release that lands while a waiter of `wait_while_held` is about
    /// to look at the grant: the waiter finds it gone and falls back to
    /// `wait`, which the release's permit ends at once. (The waiter used to
    /// be counted on entry, so the release withheld the permit and the
    /// fallback slept its whole backoff behind a free lock.)
    #[tokio::test]
    async fn a_release_racing_the_check_still_wakes_the_fallback() {
        let signals = Arc::new(ReleaseSignals::new());
        let (holder, waiter) = (Owner::for_this_process(), Owner::for_this_process());
        signals.granted(&lease(&holder, 1, Duration::from_secs(600)));
        let releaser = Arc::clone(&signals);
        BEFORE_THE_CHECK.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move || releaser.released(&key(), Fence(1))));
        });
        let held = signals
            .wait_while_held(&key(), &waiter, Duration::from_secs(600))
            .await;
        assert!(!held, "released before the check: nothing to wait for");
        let start = Instant::now();
        signals.wait(&key(), Duration::from_secs(5)).await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the fallback slept {:?} behind a free lock",
            start.elapsed()
        );
    }

    /// A late release of an older grant, while a newer grant of this
    /// instance holds the lock, frees nothing: it wakes nobody (a waiter
    /// woken would only be refused again).
    #[tokio::test]
    async fn a_release_that_frees_nothing_wakes_nobody() {
        let signals = Arc::new(ReleaseSignals::new());
        let (holder, waiter) = (Owner::for_this_process(), Owner::for_this_process());
        signals.granted(&lease(&holder, 1, Duration::from_secs(600)));
        signals.granted(&lease(&holder, 2, Duration::from_secs(600)));
        signals.released(&key(), Fence(1));
        let start = Instant::now();
        signals.wait(&key(), Duration::from_millis(50)).await;
        assert!(
            start.elapsed() >= Duration::from_millis(50),
            "a release that freed nothing left a wake-up"
        );
        assert!(
            signals
                .wait_while_held(&key(), &waiter, Duration::from_millis(10))
                .await,
            "fence 2 is still held"
        );
    }
}
