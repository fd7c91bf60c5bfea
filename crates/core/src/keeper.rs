//! Keeping a held lease alive while its holder works.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Operation, Result};
use crate::lease::Lease;
use crate::lock::Lock;

/// Renews a lease in the background, every third of its TTL, while the
/// keeper lives: a holder that is alive keeps its lock through a step
/// longer than the TTL, and a holder that stops (SIGSTOP, a dead process, a
/// hung runtime) stops renewing, so its lease lapses and fencing refuses
/// its late saves.
///
/// A renewal the backend refuses (`LeaseLost`, `Fenced`) marks the lease
/// lost at once; a renewal that fails for another reason (a dropped
/// connection) is retried sooner, and the lease is marked lost once its
/// local deadline passes without a successful renewal. A lost lease is
/// visible ([`is_lost`](LeaseKeeper::is_lost)), and
/// [`stop`](LeaseKeeper::stop) then fails with `LeaseLost`, so the holder
/// never saves believing it still holds the lock.
///
/// Outside a Tokio runtime nothing renews: the lease simply lapses by its
/// TTL.
#[must_use = "dropping a LeaseKeeper stops renewing the lease at once"]
pub struct LeaseKeeper {
    shared: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
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
    /// Starts renewing `lease` on `lock` for `ttl` at a time, every third
    /// of `ttl`.
    pub fn start(lock: Arc<dyn Lock>, lease: Lease, ttl: Duration) -> LeaseKeeper {
        let shared = Arc::new(Mutex::new(State::Held(lease)));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return LeaseKeeper {
                shared,
                stop: None,
                task: None,
            };
        };
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(renew_loop(lock, Arc::clone(&shared), ttl, stopped));
        LeaseKeeper {
            shared,
            stop: Some(stop),
            task: Some(task),
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
    /// The renewal's error; `LeaseLost` and `Fenced` also mark the lease
    /// lost.
    pub async fn renew_now(&self, store: &dyn Lock, ttl: Duration) -> Result<Lease> {
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
    pub async fn stop(mut self) -> Result<Lease> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(join) = task.await
            && join.is_panic()
        {
            tracing::error!("the lease renewal task panicked");
        }
        self.check()
    }
}

fn current(state: State) -> Result<Lease> {
    match state {
        State::Held(lease) if !lease.is_expired() => Ok(lease),
        State::Held(lease) => Err(lost_error(
            &lease,
            "its TTL ran out before it could be renewed",
        )),
        State::Lost(lease, why) => Err(lost_error(&lease, &why)),
    }
}

fn lost_error(lease: &Lease, why: &str) -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        format!("the lease with fence {} was lost: {why}", lease.fence()),
    )
    .with_operation(Operation::Renew)
    .with_lock(lease.key())
}

/// Records the outcome of renewing `lease`; returns the renewed lease or
/// the error.
fn record(shared: &Mutex<State>, lease: &Lease, outcome: Result<Lease>) -> Result<Lease> {
    match outcome {
        Ok(renewed) => {
            let mut state = lock(shared);
            // A stop or a loss recorded meanwhile wins.
            if matches!(&*state, State::Held(_)) {
                *state = State::Held(renewed.clone());
            }
            Ok(renewed)
        }
        Err(error) => {
            let refused = matches!(
                error.kind(),
                ErrorKind::LeaseLost | ErrorKind::Fenced | ErrorKind::InvalidArgument
            );
            if refused || lease.is_expired() {
                tracing::warn!(
                    lock = %lease.key(),
                    fence = %lease.fence(),
                    %error,
                    "lease lost: a renewal was refused or came too late"
                );
                *lock(shared) = State::Lost(lease.clone(), error.to_string());
            } else {
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
    ttl: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut failed = false;
    loop {
        // After a failure, retry sooner: the lease still has two thirds of
        // its TTL at most.
        let wait = if failed { period / 4 } else { period };
        // Stopped (or the keeper dropped) before the wait ended.
        if tokio::time::timeout(wait, &mut stopped).await.is_ok() {
            return;
        }
        let lease = match lock(&shared).clone() {
            State::Held(lease) => lease,
            State::Lost(..) => return,
        };
        if lease.is_expired() {
            *lock(&shared) = State::Lost(
                lease,
                "its TTL ran out before it could be renewed".to_owned(),
            );
            return;
        }
        let outcome = store.renew(&lease, ttl).await;
        failed = outcome.is_err();
        if record(&shared, &lease, outcome).is_err() && matches!(&*lock(&shared), State::Lost(..)) {
            return;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
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
