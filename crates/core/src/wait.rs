//! Waiting for busy locks: the wait policy, jittered exponential backoff,
//! and the blocking acquire every backend shares.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Operation, Result};
use crate::id::DocName;
use crate::lease::{Fence, Lease, LockKey, Owner};
use crate::lock::Lock;
use crate::store::{GetOptions, StoredDoc};
use crate::time::Short;

/// How long and how to wait for a busy lock (and retry transient failures).
///
/// Sleeps grow from `initial_backoff` by `multiplier` up to `max_backoff`;
/// each sleep is jittered between half and all of its nominal length so
/// waiters that collided once do not collide again, and never outlasts the
/// holder's remaining lease by more than a millisecond. A holder in this
/// process is waited for until its release instead, for at most
/// `max_backoff` at a time (see [`LockExt::acquire`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WaitPolicy {
    /// Give up after this long. Zero means a single attempt.
    pub timeout: Duration,
    /// The first sleep.
    pub initial_backoff: Duration,
    /// The longest sleep, and the longest wait for a holder in this
    /// process before the backend is asked again.
    pub max_backoff: Duration,
    /// Growth factor between sleeps (at least 1).
    pub multiplier: f64,
}

impl Default for WaitPolicy {
    /// Up to 30 s, sleeping 2 ms, 4 ms, … up to 200 ms.
    fn default() -> Self {
        WaitPolicy {
            timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(200),
            multiplier: 2.0,
        }
    }
}

impl WaitPolicy {
    /// A single attempt: fail at once when the lock is busy.
    pub fn no_wait() -> Self {
        WaitPolicy {
            timeout: Duration::ZERO,
            ..WaitPolicy::default()
        }
    }

    /// The default policy with another overall timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        WaitPolicy {
            timeout,
            ..WaitPolicy::default()
        }
    }

    /// This policy with other sleeps: the first `initial`, growing by
    /// `multiplier` (at least 1) up to `max`.
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration, multiplier: f64) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self.multiplier = multiplier;
        self
    }
}

/// Jittered exponential backoff under a deadline.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: WaitPolicy,
    deadline: Instant,
    nominal: Duration,
}

impl Backoff {
    /// Starts the clock for `policy`.
    pub fn new(policy: &WaitPolicy) -> Self {
        Backoff {
            deadline: crate::time::saturating_add(Instant::now(), policy.timeout),
            nominal: policy.initial_backoff.max(Duration::from_micros(100)),
            policy: policy.clone(),
        }
    }

    /// When waiting ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next sleep, or `None` once the deadline has passed. `hint` caps
    /// the sleep (for example the time until a holder's lease expires).
    pub fn next_delay(&mut self, hint: Option<Duration>) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let nominal = self.nominal;
        // `mul_f64` panics on overflow or an infinite factor; this saturates.
        let grown =
            Duration::try_from_secs_f64(nominal.as_secs_f64() * self.policy.multiplier.max(1.0))
                .unwrap_or(Duration::MAX);
        self.nominal = grown.min(self.policy.max_backoff.max(nominal));
        let half = nominal / 2;
        let jitter = Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64));
        let mut delay = half + jitter;
        if let Some(hint) = hint {
            delay = delay.min(hint.saturating_add(Duration::from_millis(1)));
        }
        Some(delay.min(left))
    }
}

/// Runs `attempt` until it succeeds, waiting per `policy` while it fails
/// with [`ErrorKind::Locked`] or a retryable error.
///
/// When the holder in a `Locked` error is known dead on this host (same
/// boot, same pid namespace, process gone), its grant is broken at once with
/// [`Lock::break_lock`] pinned to that grant's fence, so only that dead grant
/// is broken, and the attempt is retried without sleeping.
///
/// The attempt's owner is not known here, so a holder in this process is
/// polled for like any other; [`LockExt`]'s acquisitions wait for its
/// release instead (see [`LockExt::acquire`]).
///
/// # Errors
/// The attempt's first permanent error; or, when the policy's timeout runs
/// out, an error of the last failure's kind (`Locked` naming the holder
/// when the lock stayed busy; `Timeout` or `Backend` when the store kept
/// failing), retryable, whose source is that failure.
pub async fn retry_while_locked<L, T, F, Fut>(
    lock: &L,
    key: &LockKey,
    policy: &WaitPolicy,
    attempt: F,
) -> Result<T>
where
    L: Lock + ?Sized,
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<T>> + Send,
    T: Send,
{
    wait_in_line(lock, key, None, policy, attempt).await
}

/// [`retry_while_locked`], for attempts by `owner` when it is known: while
/// a grant the store made in this process to another owner holds the
/// lock, its release is waited for ([`Lock::wait_for_local_release`]), for
/// at most `max_backoff` at a time, instead of asking the store.
async fn wait_in_line<L, T, F, Fut>(
    lock: &L,
    key: &LockKey,
    owner: Option<&Owner>,
    policy: &WaitPolicy,
    mut attempt: F,
) -> Result<T>
where
    L: Lock + ?Sized,
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<T>> + Send,
    T: Send,
{
    let mut backoff = Backoff::new(policy);
    // Waiters of this process line up for the key, first come first
    // served: one that has just released cannot barge ahead of one that
    // has been waiting. Only the head of the line asks the backend.
    let line = local_line(lock, key);
    // When our turn does not come in time, one last try reports the
    // current holder.
    let _turn = tokio::time::timeout(policy.timeout, line.lock()).await.ok();
    // The head of the line most often finds the waiter that was ahead of
    // it still at work: asking now would only be refused, and would slow
    // that holder's save down. Its release wakes us instead.
    if let Some(owner) = owner {
        wait_for_local_holder(lock, key, owner, policy, &backoff).await;
    }
    let mut broken: Option<Fence> = None;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let hint = match error.kind() {
            ErrorKind::Locked => {
                if let Some(holder) = error.holder()
                    && broken != Some(holder.fence)
                    && holder.owner.is_dead_here() == Some(true)
                {
                    tracing::warn!(
                        lock = %key,
                        holder = %holder.owner,
                        fence = %holder.fence,
                        "breaking the lease of a holder that died on this host"
                    );
                    match lock.break_lock(key, Some(holder.fence)).await {
                        Ok(_) => {
                            broken = Some(holder.fence);
                            continue;
                        }
                        // A break that failed for a moment is tried again
                        // after the backoff, instead of ending the wait.
                        Err(failed) if failed.is_retryable() => {
                            tracing::debug!(%failed, "breaking a dead holder's lease failed");
                            None
                        }
                        Err(failed) => return Err(failed),
                    }
                } else {
                    error.expires_in()
                }
            }
            _ if error.is_retryable() => None,
            _ => return Err(error),
        };
        match backoff.next_delay(hint) {
            Some(delay) => {
                // A holder in this process (the lock changed hands between
                // the wait above and the attempt, say) is waited for as
                // above; any other is polled for with backoff.
                let waited = match owner {
                    Some(owner) => wait_for_local_holder(lock, key, owner, policy, &backoff).await,
                    None => false,
                };
                if !waited {
                    lock.wait_for_release(key, delay).await;
                }
            }
            None if policy.timeout.is_zero() => return Err(error),
            None => return Err(gave_up(key, policy, error)),
        }
    }
}

/// Waits for the release of a grant that the store made in this process
/// to another owner than `owner` ([`Lock::wait_for_local_release`]): at most
/// the policy's `max_backoff`, so that a grant broken or taken over behind
/// this process's back is noticed as soon as backoff would notice it, and
/// not past the policy's deadline. Whether there was such a grant.
async fn wait_for_local_holder<L: Lock + ?Sized>(
    lock: &L,
    key: &LockKey,
    owner: &Owner,
    policy: &WaitPolicy,
    backoff: &Backoff,
) -> bool {
    let left = backoff.deadline().saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    lock.wait_for_local_release(key, owner, policy.max_backoff.min(left))
        .await
}

/// The line of this process's waiters for `key` on the store `lock` is.
/// Stores are told apart by where their capabilities live: every handle
/// on one store (an `Arc` clone, a `Client`'s copy, a layer forwarding to
/// it) answers with the same reference, and two stores never do.
fn local_line<L: Lock + ?Sized>(lock: &L, key: &LockKey) -> Arc<tokio::sync::Mutex<()>> {
    type Lines = HashMap<(usize, LockKey), Weak<tokio::sync::Mutex<()>>>;
    static LINES: OnceLock<std::sync::Mutex<Lines>> = OnceLock::new();
    let store = std::ptr::from_ref(lock.capabilities()).cast::<()>() as usize;
    let mut lines = LINES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(line) = lines.get(&(store, key.clone())).and_then(Weak::upgrade) {
        return line;
    }
    // Forget lines nobody stands in, now and then.
    if lines.len() >= 1024 {
        lines.retain(|_, line| line.strong_count() > 0);
    }
    let line = Arc::new(tokio::sync::Mutex::new(()));
    lines.insert((store, key.clone()), Arc::downgrade(&line));
    line
}

fn gave_up(key: &LockKey, policy: &WaitPolicy, last: Error) -> Error {
    let kind = last.kind();
    let holder = last.holder().cloned();
    let mut error = Error::new(
        kind,
        format!("gave up after waiting {}", Short(policy.timeout)),
    )
    .with_lock(key)
    .with_operation(Operation::Acquire)
    .set_retryable(true);
    if let Some(backend) = last.backend() {
        error = error.with_backend(backend);
    }
    if let Some(holder) = holder {
        error = error.with_holder(holder);
    }
    error.with_source(last)
}

/// Blocking acquisition, for every [`Lock`].
#[async_trait]
pub trait LockExt: Lock {
    /// Takes the lock, waiting per `policy` while it is busy.
    ///
    /// Waiters of this process queue for the lock first come, first
    /// served, and only the first asks the backend. While the lock is held
    /// by a grant this store made in this process (to another owner),
    /// that waiter does not ask: it waits for the grant's release through
    /// this store ([`Lock::wait_for_local_release`]), its expiry, or the
    /// policy's `max_backoff`, whichever comes first, then asks. Any other
    /// holder is polled for with backoff, woken early by releases the
    /// backend hears of ([`Lock::wait_for_release`]).
    ///
    /// # Errors
    /// See [`retry_while_locked`].
    async fn acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        policy: &WaitPolicy,
    ) -> Result<Lease> {
        wait_in_line(self, key, Some(owner), policy, || {
            self.try_acquire(key, owner, ttl)
        })
        .await
    }

    /// [`Lock::acquire_and_load`], waiting per `policy` while the lock is
    /// busy, as [`acquire`](LockExt::acquire) does.
    ///
    /// # Errors
    /// See [`retry_while_locked`].
    async fn acquire_and_load_waiting(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
        policy: &WaitPolicy,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        wait_in_line(self, key, Some(owner), policy, || {
            self.acquire_and_load(key, doc, owner, ttl, options)
        })
        .await
    }
}

impl<T: Lock + ?Sized> LockExt for T {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let policy = WaitPolicy {
            timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            multiplier: 2.0,
        };
        let mut backoff = Backoff::new(&policy);
        let expect = [10u64, 20, 40, 40, 40];
        for nominal in expect {
            let d = backoff.next_delay(None).unwrap();
            let nominal = Duration::from_millis(nominal);
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
        }
        let d = backoff.next_delay(Some(Duration::from_millis(3))).unwrap();
        assert!(d <= Duration::from_millis(4));
    }

    #[test]
    fn absurd_policies_never_panic() {
        let policy = WaitPolicy {
            timeout: Duration::MAX,
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            multiplier: f64::INFINITY,
        };
        let mut backoff = Backoff::new(&policy);
        assert!(backoff.deadline() > Instant::now());
        for _ in 0..3 {
            assert!(backoff.next_delay(Some(Duration::MAX)).is_some());
        }
        let _ = format!("{policy:?} {backoff:?}");
    }

    #[test]
    fn every_handle_on_one_store_shares_its_line() {
        let store: Arc<dyn Lock> = Arc::new(crate::memory::MemoryStore::new());
        let (a, b) = (Arc::clone(&store), Arc::clone(&store));
        let key = LockKey::Run(crate::RunId::new("r").unwrap());
        let line = local_line(&a, &key);
        assert!(Arc::ptr_eq(&line, &local_line(&b, &key)));
        assert!(Arc::ptr_eq(&line, &local_line(&*store, &key)));
        let other: Arc<dyn Lock> = Arc::new(crate::memory::MemoryStore::new());
        assert!(!Arc::ptr_eq(&line, &local_line(&other, &key)));
    }

    /// Attempts of a waiter, counted, each a `try_acquire` on `store`.
    async fn counted_wait(
        store: crate::memory::MemoryStore,
        key: LockKey,
        owner: Owner,
        policy: WaitPolicy,
        attempts: Arc<AtomicU32>,
    ) -> Result<Lease> {
        wait_in_line(&store, &key, Some(&owner), &policy, || {
            attempts.fetch_add(1, Ordering::SeqCst);
            store.try_acquire(&key, &owner, Duration::from_secs(600))
        })
        .await
    }

    /// A policy whose backoff alone would ask the store many times a
    /// second, and whose waits for a holder of this process end only with
    /// its release (or expiry).
    fn eager_policy() -> WaitPolicy {
        WaitPolicy::with_timeout(Duration::from_secs(600)).with_backoff(
            Duration::from_millis(1),
            Duration::from_secs(600),
            2.0,
        )
    }

    #[tokio::test]
    async fn the_head_of_the_line_waits_for_a_local_holder_without_asking() {
        let store = crate::memory::MemoryStore::new();
        let key = LockKey::Run(crate::RunId::new("r").unwrap());
        let holder = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(600))
            .await
            .unwrap();
        let attempts = Arc::new(AtomicU32::new(0));
        let waiter = tokio::spawn(counted_wait(
            store.clone(),
            key.clone(),
            Owner::for_this_process(),
            eager_policy(),
            Arc::clone(&attempts),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            0,
            "asked the store while the holder of this process was at work"
        );
        store.release(&holder).await.unwrap();
        let lease = waiter.await.unwrap().unwrap();
        assert!(lease.fence() > holder.fence());
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "one ask, after the release"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_not_held_back_by_its_own_owners_grant() {
        let store = crate::memory::MemoryStore::new();
        let key = LockKey::Run(crate::RunId::new("r").unwrap());
        let owner = Owner::for_this_process();
        let held = store
            .try_acquire(&key, &owner, Duration::from_secs(600))
            .await
            .unwrap();
        let attempts = Arc::new(AtomicU32::new(0));
        let again = tokio::time::timeout(
            Duration::from_secs(60),
            counted_wait(store, key, owner, eager_policy(), Arc::clone(&attempts)),
        )
        .await
        .expect("the owner's own grant is not waited for")
        .unwrap();
        assert_eq!(again.fence(), held.fence(), "its grant, again");
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_local_holder_that_never_releases_is_waited_for_until_it_expires() {
        let store = crate::memory::MemoryStore::new();
        let key = LockKey::Run(crate::RunId::new("r").unwrap());
        let holder = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_millis(200))
            .await
            .unwrap();
        let lease = tokio::time::timeout(
            Duration::from_secs(60),
            counted_wait(
                store,
                key,
                Owner::for_this_process(),
                eager_policy(),
                Arc::new(AtomicU32::new(0)),
            ),
        )
        .await
        .expect("taken over once the holder's lease expired")
        .unwrap();
        assert!(lease.fence() > holder.fence());
    }

    #[test]
    fn no_wait_gives_no_delay() {
        let mut backoff = Backoff::new(&WaitPolicy::no_wait());
        assert_eq!(backoff.next_delay(None), None);
    }
}
