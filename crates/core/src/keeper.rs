//! Keeping a held lease alive while its holder works.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Operation, Result};
use crate::lease::Lease;
use crate::lock::Lock;

/// Renews a lease in the background, a third of its TTL after each grant
/// or renewal was issued ([`Lease::renewal_due_in`]), while the keeper
/// lives: a holder that is alive keeps its lock through a step longer than
/// the TTL, and a holder that stops (SIGSTOP, a dead process, a hung
/// runtime) stops renewing, so its lease lapses and fencing refuses its
/// late saves.
///
/// A renewal the backend refuses ([`Error::is_lease_refusal`]) marks the
/// lease lost at once; a renewal that fails for another reason (a dropped
/// connection) is retried sooner, and the lease is marked lost once its
/// local deadline passes without a successful renewal. A lost lease is
/// visible ([`is_lost`](LeaseKeeper::is_lost)), and
/// [`stop`](LeaseKeeper::stop) then fails with `LeaseLost`, so the holder
/// never saves believing it still holds the lock.
///
/// Outside a Tokio runtime nothing renews: the lease simply lapses by its
/// TTL.
///
/// Dropped without [`stop`](LeaseKeeper::stop) (a cancelled update, a
/// guard dropped without commit), a keeper stops renewing and releases the
/// lease in the background, so nobody waits a whole TTL behind a holder
/// that went away.
#[must_use = "dropping a LeaseKeeper stops renewing and releases the lease"]
pub struct LeaseKeeper {
    shared: Arc<Mutex<State>>,
    /// Where the lease was granted, for the release on drop.
    store: Arc<dyn Lock>,
    /// Held across every renewal, so two never race: on backends whose
    /// renewal swaps a token (S3), the loser of such a race would be
    /// refused and the lease wrongly marked lost.
    renewing: Arc<tokio::sync::Mutex<()>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Set once [`stop`](LeaseKeeper::stop) handed the lease back to its
    /// caller; until then a drop (also one in the middle of `stop`, a
    /// cancelled update) releases it.
    handed_back: bool,
}

#[derive(Clone)]
enum State {
    Held(Lease),
    /// Lost, with why, and the last lease held.
    Lost(Lease, String),
}

fn lock(shared: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Every update is one assignment, so a panic elsewhere cannot leave the
    // state half-written.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeaseKeeper {
    /// Starts renewing `lease` on `lock` for `ttl` at a time, each renewal
    /// due a third of its TTL after the current lease was issued (a lease
    /// already older than that is renewed at once).
    pub fn start(lock: Arc<dyn Lock>, lease: Lease, ttl: Duration) -> LeaseKeeper {
        let shared = Arc::new(Mutex::new(State::Held(lease)));
        let renewing = Arc::new(tokio::sync::Mutex::new(()));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return LeaseKeeper {
                shared,
                store: lock,
                renewing,
                stop: None,
                task: None,
                handed_back: false,
            };
        };
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(renew_loop(
            Arc::clone(&lock),
            Arc::clone(&shared),
            Arc::clone(&renewing),
            ttl,
            stopped,
        ));
        LeaseKeeper {
            shared,
            store: lock,
            renewing,
            stop: Some(stop),
            task: Some(task),
            handed_back: false,
        }
    }

    /// The current lease (renewals replace it: on some backends a renewed
    /// lease carries a new token).
    pub fn lease(&self) -> Lease {
        match &*lock(&self.shared) {
            State::Held(lease) | State::Lost(lease, _) => lease.clone(),
        }
    }

    /// Whether the lease is known lost: a renewal was refused, or its local
    /// deadline passed without a successful renewal.
    pub fn is_lost(&self) -> bool {
        match &*lock(&self.shared) {
            State::Held(lease) => lease.is_expired(),
            State::Lost(..) => true,
        }
    }

    /// The current lease, or `LeaseLost` when [`is_lost`](Self::is_lost).
    ///
    /// # Errors
    /// `LeaseLost` saying why.
    pub fn check(&self) -> Result<Lease> {
        let state = lock(&self.shared).clone();
        current(state)
    }

    /// Renews now (as the background task would), replacing the lease.
    ///
    /// # Errors
    /// The renewal's error; a refusal ([`Error::is_lease_refusal`]) also
    /// marks the lease lost.
    pub async fn renew_now(&self, store: &dyn Lock, ttl: Duration) -> Result<Lease> {
        let _turn = self.renewing.lock().await;
        // Whatever lease is current once no other renewal runs.
        let lease = self.check()?;
        let outcome = store.renew(&lease, ttl).await;
        record(&self.shared, &lease, outcome)
    }

    /// Stops renewing, after any renewal in flight has finished (so no
    /// renewal races the caller's next step), and returns the current
    /// lease.
    ///
    /// # Errors
    /// `LeaseLost` when the lease was lost.
    ///
    /// Cancelled before it returns (dropped while it waits for the renewal
    /// task), the keeper releases the lease in the background as a dropped
    /// keeper does.
    pub async fn stop(mut self) -> Result<Lease> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Awaited in place, not taken: a drop while this waits still finds
        // the task, lets it finish and releases (see `Drop`).
        if let Some(task) = self.task.as_mut() {
            let joined = task.await;
            self.task = None;
            if let Err(join) = joined
                && join.is_panic()
            {
                tracing::error!("the lease renewal task panicked");
            }
        }
        self.handed_back = true;
        self.check()
    }
}

/// Why a lease no renewal reached in time was lost.
const TTL_RAN_OUT: &str = "its TTL ran out before it could be renewed";

fn current(state: State) -> Result<Lease> {
    match state {
        State::Held(lease) if !lease.is_expired() => Ok(lease),
        State::Held(lease) => Err(lost_error(&lease, TTL_RAN_OUT)),
        State::Lost(lease, why) => Err(lost_error(&lease, &why)),
    }
}

fn lost_error(lease: &Lease, why: &str) -> Error {
    let why = format!("the lease with fence {} was lost: {why}", lease.fence());
    Error::lease_lost_because(lease.key(), why, None).with_operation(Operation::Renew)
}

/// Whether two leases are the same grant in the same state (a renewal
/// that swaps a token makes another state).
fn same(a: &Lease, b: &Lease) -> bool {
    a.fence() == b.fence() && a.token() == b.token() && a.owner().id() == b.owner().id()
}

/// Records the outcome of renewing `lease`; returns the renewed lease or
/// the error. Only an outcome about the lease that is still current
/// changes anything: a loss or a newer lease recorded meanwhile wins.
fn record(shared: &Mutex<State>, lease: &Lease, outcome: Result<Lease>) -> Result<Lease> {
    match outcome {
        Ok(renewed) => {
            let mut state = lock(shared);
            if matches!(&*state, State::Held(current) if same(current, lease)) {
                *state = State::Held(renewed.clone());
            }
            Ok(renewed)
        }
        Err(error) => {
            let refused = error.is_lease_refusal();
            let current = matches!(&*lock(shared), State::Held(current) if same(current, lease));
            if current && (refused || lease.is_expired()) {
                tracing::warn!(
                    lock = %lease.key(),
                    fence = %lease.fence(),
                    %error,
                    "lease lost: a renewal was refused or came too late"
                );
                *lock(shared) = State::Lost(lease.clone(), error.to_string());
            } else if current {
                tracing::warn!(
                    lock = %lease.key(),
                    fence = %lease.fence(),
                    remaining_ms = lease.remaining().as_millis() as u64,
                    %error,
                    "lease renewal failed; retrying"
                );
            }
            Err(error)
        }
    }
}

async fn renew_loop(
    store: Arc<dyn Lock>,
    shared: Arc<Mutex<State>>,
    renewing: Arc<tokio::sync::Mutex<()>>,
    ttl: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut failed = false;
    loop {
        // Due a third of its TTL after the current lease was issued, not
        // after this loop last woke: a lease handed over late (its grant
        // was slow, or its holder started a keeper after working a while)
        // and a renewal whose reply came back slowly are renewed while they
        // still have two thirds of their TTL (`Lease::renewal_due_in`).
        // After a failure, retry sooner.
        let wait = match &*lock(&shared) {
            State::Lost(..) => return,
            State::Held(_) if failed => period / 4,
            State::Held(lease) => lease.renewal_due_in(),
        };
        let slept = std::time::Instant::now();
        // Stopped (or the keeper dropped) before the wait ended.
        if tokio::time::timeout(wait, &mut stopped).await.is_ok() {
            return;
        }
        let late = slept.elapsed().saturating_sub(wait);
        if late > period / 2 {
            // The runtime did not run this task in time (its threads
            // blocked, or starved of CPU): said, so a lapse that follows
            // is explained.
            tracing::debug!(
                late_ms = late.as_millis() as u64,
                "a lease renewal woke late"
            );
        }
        let _turn = renewing.lock().await;
        let lease = match lock(&shared).clone() {
            State::Held(lease) => lease,
            State::Lost(..) => return,
        };
        if lease.is_expired() {
            tracing::warn!(
                lock = %lease.key(),
                fence = %lease.fence(),
                "lease lost: {TTL_RAN_OUT}"
            );
            *lock(&shared) = State::Lost(lease, TTL_RAN_OUT.to_owned());
            return;
        }
        // Renewed meanwhile (`renew_now`): not due yet.
        if !failed && !lease.is_renewal_due() {
            continue;
        }
        let asked = std::time::Instant::now();
        let outcome = store.renew(&lease, ttl).await;
        let took = asked.elapsed();
        if took > period {
            tracing::debug!(
                took_ms = took.as_millis() as u64,
                ok = outcome.is_ok(),
                "a lease renewal took more than a third of the TTL"
            );
        }
        failed = outcome.is_err();
        if record(&shared, &lease, outcome).is_err() && matches!(&*lock(&shared), State::Lost(..)) {
            return;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        // Dropped without `stop` handing the lease back (never called, or
        // cancelled while it waited): stop renewing, then give the lease
        // back.
        if self.handed_back {
            return;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take();
        let (store, shared) = (Arc::clone(&self.store), Arc::clone(&self.shared));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Some(task) = task {
                // Let a renewal in flight finish, so the release carries
                // the current lease.
                let _ = task.await;
            }
            let state = lock(&shared).clone();
            if let Ok(lease) = current(state)
                && let Err(error) = store.release(&lease).await
            {
                tracing::debug!(%error, "release of a dropped lease keeper");
            }
        });
    }
}

impl fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("lease", &self.lease())
            .field("lost", &self.is_lost())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime};

    use super::*;
    use crate::{ErrorKind, Fence, LockKey, Owner, RunId};

    fn lease(token: &str) -> Lease {
        Lease::new(
            LockKey::Run(RunId::new("r").unwrap()),
            Owner::for_this_process(),
            Fence(7),
            Duration::from_secs(30),
            Instant::now(),
            SystemTime::now(),
        )
        .with_token(token)
    }

    /// A lease handed to a keeper late (issued 2.4 s before, with a 3 s
    /// TTL) is renewed at once: before, the first renewal came a third of
    /// the TTL after the keeper started, when the lease had already
    /// lapsed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_handed_over_late_is_renewed_at_once() {
        let store: Arc<dyn Lock> = Arc::new(crate::memory::MemoryStore::new());
        let key = LockKey::Run(RunId::new("r").unwrap());
        let ttl = Duration::from_secs(3);
        let granted = store
            .try_acquire(&key, &Owner::for_this_process(), ttl)
            .await
            .unwrap();
        let issued = Instant::now()
            .checked_sub(Duration::from_millis(2400))
            .unwrap();
        let keeper = LeaseKeeper::start(Arc::clone(&store), granted.renewed(ttl, issued), ttl);
        // The old schedule renewed 1 s after the start, 400 ms too late.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !keeper.is_lost(),
            "the late lease lapsed before its renewal"
        );
        assert!(keeper.lease().remaining() > Duration::from_millis(1500));
        keeper.stop().await.unwrap();
    }

    /// A keeper whose `stop` is cancelled while it waits for the renewal
    /// task (an update under a `timeout`) still gives the lease back; it
    /// used to stay held for its whole TTL.
    #[tokio::test]
    async fn a_cancelled_stop_still_releases() {
        let store: Arc<dyn Lock> = Arc::new(crate::memory::MemoryStore::new());
        let key = LockKey::Run(RunId::new("r").unwrap());
        let ttl = Duration::from_secs(30);
        let granted = store
            .try_acquire(&key, &Owner::for_this_process(), ttl)
            .await
            .unwrap();
        let keeper = LeaseKeeper::start(Arc::clone(&store), granted, ttl);
        // Polled once, as a `select!` or a `timeout` would, then dropped
        // while it waits for the renewal task.
        let mut stopping = Box::pin(keeper.stop());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            std::future::Future::poll(stopping.as_mut(), &mut cx).is_pending(),
            "stop did not wait for its task"
        );
        drop(stopping);
        for _ in 0..200 {
            if store.inspect(&key).await.unwrap().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the lease of a cancelled stop is still held");
    }

    /// Two renewals of one lease raced (S3 swaps a token per renewal): the
    /// loser's refusal, or a late success, must not undo the winner's.
    #[test]
    fn a_stale_renewal_outcome_changes_nothing() {
        let first = lease("t1");
        let shared = Mutex::new(State::Held(first.clone()));
        let renewed = first
            .renewed(Duration::from_secs(30), Instant::now())
            .with_token("t2");
        assert!(record(&shared, &first, Ok(renewed.clone())).is_ok());
        // The loser, sent with t1, is refused: the lease is still held.
        let refused = Error::new(ErrorKind::LeaseLost, "412");
        assert!(record(&shared, &first, Err(refused)).is_err());
        match &*lock(&shared) {
            State::Held(current) => assert_eq!(current.token(), Some("t2")),
            State::Lost(..) => panic!("a stale refusal marked a live lease lost"),
        }
        // A late success of an older state does not replace the newer one.
        let older = first
            .renewed(Duration::from_secs(30), Instant::now())
            .with_token("t0");
        assert!(record(&shared, &first, Ok(older)).is_ok());
        match &*lock(&shared) {
            State::Held(current) => assert_eq!(current.token(), Some("t2")),
            State::Lost(..) => panic!("lost"),
        }
        // A refusal of the current lease does mark it lost.
        let refused = Error::new(ErrorKind::LeaseLost, "broken");
        assert!(record(&shared, &renewed, Err(refused)).is_err());
        assert!(matches!(&*lock(&shared), State::Lost(..)));
    }
}
