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
/// holder's remaining lease by more than a millisecond.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WaitPolicy {
    /// Give up after this long. Zero means a single attempt.
    pub timeout: Duration,
    /// The first sleep.
    pub initial_backoff: Duration,
    /// The longest sleep.
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
/// # Errors
/// The attempt's first permanent error; or, when the policy's timeout runs
/// out, a `Locked` error naming the holder whose source is the last
/// failure.
pub async fn retry_while_locked<L, T, F, Fut>(
    lock: &L,
    key: &LockKey,
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
                    broken = Some(holder.fence);
                    lock.break_lock(key, Some(holder.fence)).await?;
                    continue;
                }
                error.expires_in()
            }
            _ if error.is_retryable() => None,
            _ => return Err(error),
        };
        match backoff.next_delay(hint) {
            Some(delay) => lock.wait_for_release(key, delay).await,
            None if policy.timeout.is_zero() => return Err(error),
            None => return Err(gave_up(key, policy, error)),
        }
    }
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
    /// # Errors
    /// See [`retry_while_locked`].
    async fn acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        policy: &WaitPolicy,
    ) -> Result<Lease> {
        retry_while_locked(self, key, policy, || self.try_acquire(key, owner, ttl)).await
    }

    /// [`Lock::acquire_and_load`], waiting per `policy` while the lock is
    /// busy.
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
        retry_while_locked(self, key, policy, || {
            self.acquire_and_load(key, doc, owner, ttl, options)
        })
        .await
    }
}

impl<T: Lock + ?Sized> LockExt for T {}

#[cfg(test)]
mod tests {
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

    #[test]
    fn no_wait_gives_no_delay() {
        let mut backoff = Backoff::new(&WaitPolicy::no_wait());
        assert_eq!(backoff.next_delay(None), None);
    }
}
