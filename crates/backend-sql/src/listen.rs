//! PostgreSQL's change channel: one `LISTEN` connection per store, shared
//! by its watches, status subscriptions and lock waiters, opened when the
//! first of them arrives and closed [`LINGER`] after the last one left.
//!
//! The writing statements announce their changes with `pg_notify` on the
//! store's channel (see [`crate::statements`]), so a notification is sent
//! exactly when its change commits. The listener dispatches each one:
//! document changes to the watches of its run, status messages to the
//! subscriptions of its run (which then read the new rows), releases to
//! the store's [`ReleaseSignals`].
//!
//! A lost connection (a killed session, a restarted server, a ping that
//! gets no answer within the call bound) is replaced by a new one; once it
//! listens again, every watch that was listening gets a `Resync` (changes
//! made in between were announced to nobody) and every subscription reads
//! the history again from where it was (nothing is lost: the messages are
//! rows). Nothing here logs the URL or the password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use runstate_core::events::FEED_CAPACITY;
use runstate_core::{
    DocName, Error, ErrorKind, FeedSender, LockKey, ReleaseSignals, Result, RunId, Version,
    WatchEvent, Watcher,
};
use sqlx::Executor;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{Notify, watch};

use crate::config::Dialect;
use crate::errors::map_error;

/// How long the listener stays connected after its last user left, so
/// that waiters coming and going do not reconnect each time.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// How often the listener checks whether it is still needed.
const TICK: Duration = Duration::from_millis(500);
/// How often an idle listener connection is pinged, so a connection that
/// died silently is found and replaced.
const PING_EVERY: Duration = Duration::from_secs(30);
/// The longest pause between failed connection attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The shared listener of one store.
pub(crate) struct Hub {
    /// Holds the password: never printed.
    options: PgConnectOptions,
    channel: String,
    /// Bound on connecting (and on a ping).
    bound: Duration,
    signals: Arc<ReleaseSignals>,
    state: Mutex<State>,
    connected: watch::Sender<bool>,
}

struct State {
    /// The listener task (connected or trying to), while it runs.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Whether it listens now.
    connected: bool,
    /// Why the last connection attempt failed, for callers waiting on it.
    last_error: Option<Error>,
    next_id: u64,
    watchers: HashMap<u64, Watching>,
    followers: HashMap<u64, (RunId, Arc<Notify>)>,
    waiters: usize,
    /// Since when nobody has used the listener.
    idle_since: Instant,
}

struct Watching {
    run: RunId,
    sender: FeedSender<WatchEvent>,
    /// Whether it was listening through a connection: only those need a
    /// `Resync` when the connection is replaced.
    armed: bool,
}

impl State {
    fn unused(&self) -> bool {
        self.watchers.is_empty() && self.followers.is_empty() && self.waiters == 0
    }
}

/// What a registration is for.
enum Kind {
    Watch,
    Follow,
    Wait,
}

/// A user of the listener; dropping it unregisters (a watch's or a
/// subscription's feed keeps it, so dropping the feed stops its share of
/// the listener).
pub(crate) struct Registration {
    hub: Arc<Hub>,
    id: u64,
    kind: Kind,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.hub.state();
        match self.kind {
            Kind::Watch => drop(state.watchers.remove(&self.id)),
            Kind::Follow => drop(state.followers.remove(&self.id)),
            Kind::Wait => state.waiters = state.waiters.saturating_sub(1),
        }
        state.idle_since = Instant::now();
    }
}

enum Ended {
    /// The connection was lost: connect again.
    Lost,
    /// Nobody needs the listener any more: the task ends.
    Stopped,
}

impl Hub {
    /// A hub for the store with `prefix` at `url` (not connected yet).
    ///
    /// # Errors
    /// `Config` when the URL is not a PostgreSQL one sqlx accepts.
    pub(crate) fn new(
        url: &str,
        channel: String,
        bound: Duration,
        signals: Arc<ReleaseSignals>,
    ) -> Result<Hub> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| map_error(Dialect::Postgres, e).with_backend(Dialect::Postgres.name()))?;
        Ok(Hub {
            options,
            channel,
            bound,
            signals,
            state: Mutex::new(State {
                task: None,
                connected: false,
                last_error: None,
                next_id: 0,
                watchers: HashMap::new(),
                followers: HashMap::new(),
                waiters: 0,
                idle_since: Instant::now(),
            }),
            connected: watch::Sender::new(false),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change to the state is complete under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a user (the state is locked) and makes sure the listener
    /// task runs.
    fn register(self: &Arc<Self>, state: &mut State, kind: Kind) -> Registration {
        let id = state.next_id;
        state.next_id += 1;
        // A task that ended without saying so (its runtime shut down, say)
        // is replaced too.
        if state.task.as_ref().is_none_or(|task| task.is_finished()) {
            state.connected = false;
            self.connected.send_replace(false);
            state.task = Some(tokio::spawn(Arc::clone(self).run()));
        }
        Registration {
            hub: Arc::clone(self),
            id,
            kind,
        }
    }

    /// A watch of `run`, returned once the listener listens, so that every
    /// change committed after this returns is reported.
    ///
    /// # Errors
    /// `Timeout` (retryable) when the listener could not connect within
    /// the bound, saying why.
    pub(crate) async fn watch(self: &Arc<Self>, run: RunId) -> Result<Watcher> {
        let (sender, feed) = Watcher::channel(FEED_CAPACITY);
        let registration = {
            let mut state = self.state();
            let registration = self.register(&mut state, Kind::Watch);
            let armed = state.connected;
            state
                .watchers
                .insert(registration.id, Watching { run, sender, armed });
            registration
        };
        self.ready().await?;
        Ok(feed.keep(Arc::new(registration)))
    }

    /// A subscription's wake-up for `run`'s status messages: notified on
    /// each message published and on each reconnect. Returned once the
    /// listener listens.
    ///
    /// # Errors
    /// As [`Hub::watch`].
    pub(crate) async fn follow(
        self: &Arc<Self>,
        run: RunId,
    ) -> Result<(Arc<Notify>, Registration)> {
        let wake = Arc::new(Notify::new());
        let registration = {
            let mut state = self.state();
            let registration = self.register(&mut state, Kind::Follow);
            state
                .followers
                .insert(registration.id, (run, Arc::clone(&wake)));
            registration
        };
        self.ready().await?;
        Ok((wake, registration))
    }

    /// Keeps the listener up while a lock waiter waits (its releases then
    /// wake the store's [`ReleaseSignals`]); does not wait for it to
    /// connect: until it does, the waiter's own bound applies.
    pub(crate) fn hold(self: &Arc<Self>) -> Registration {
        let mut state = self.state();
        state.waiters += 1;
        self.register(&mut state, Kind::Wait)
    }

    /// Waits until the listener listens.
    async fn ready(&self) -> Result<()> {
        let mut connected = self.connected.subscribe();
        if tokio::time::timeout(self.bound, connected.wait_for(|c| *c))
            .await
            .is_ok_and(|outcome| outcome.is_ok())
        {
            return Ok(());
        }
        let why = self
            .state()
            .last_error
            .as_ref()
            .map_or_else(|| "no answer".to_owned(), |e| e.message().to_owned());
        Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "the listening connection to PostgreSQL was not established within {}: {why}",
                runstate_core::time::Short(self.bound)
            ),
        )
        .with_backend(Dialect::Postgres.name())
        .set_retryable(true))
    }

    /// The listener task: connects, listens, dispatches, reconnects, until
    /// nobody needs it.
    async fn run(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            if self.stop_if_idle() {
                return;
            }
            let connected = tokio::time::timeout(self.bound, self.connect()).await;
            let (pool, mut listener) = match connected {
                Ok(Ok(pair)) => pair,
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => map_error(Dialect::Postgres, e),
                        _ => Error::new(ErrorKind::Timeout, "connecting timed out")
                            .with_backend(Dialect::Postgres.name()),
                    };
                    tracing::debug!(%error, "the PostgreSQL listener could not connect; retrying");
                    self.state().last_error = Some(error);
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(50)
                        .saturating_mul(1 << failures.min(7))
                        .min(MAX_RETRY);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            failures = 0;
            self.connected_again();
            let ended = self.listen(&mut listener).await;
            // Dropping the listener unlistens and hands its connection
            // back; closing the pool then closes it politely.
            drop(listener);
            let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
            match ended {
                Ended::Stopped => return,
                Ended::Lost => {
                    let mut state = self.state();
                    state.connected = false;
                    self.connected.send_replace(false);
                }
            }
        }
    }

    async fn connect(&self) -> std::result::Result<(PgPool, PgListener), sqlx::Error> {
        // A pool of one, only because sqlx's listener needs one; it pings
        // nothing and never expires the connection.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .acquire_timeout(self.bound)
            .connect_with(self.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        // A lost connection ends `listen`, which replaces it (and marks
        // the gap); sqlx must not reconnect behind its back.
        listener.eager_reconnect(false);
        listener.listen(&self.channel).await?;
        Ok((pool, listener))
    }

    /// The listener listens (again): watches that were listening get a
    /// `Resync`, subscriptions read what they may have missed, callers
    /// waiting for the connection go on.
    fn connected_again(&self) {
        let mut state = self.state();
        for watching in state.watchers.values_mut() {
            if watching.armed {
                watching.sender.resync();
            }
            watching.armed = true;
        }
        for (_, wake) in state.followers.values() {
            wake.notify_one();
        }
        state.connected = true;
        state.last_error = None;
        self.connected.send_replace(true);
    }

    /// Stops the task when nobody has needed it for [`LINGER`].
    fn stop_if_idle(&self) -> bool {
        let mut state = self.state();
        if state.unused() && state.idle_since.elapsed() >= LINGER {
            // Detaches this very task, which ends now.
            state.task = None;
            state.connected = false;
            self.connected.send_replace(false);
            return true;
        }
        false
    }

    async fn listen(&self, listener: &mut PgListener) -> Ended {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pinged = Instant::now();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => self.dispatch(notification.payload()),
                    Ok(None) => return Ended::Lost,
                    Err(e) => {
                        let error = map_error(Dialect::Postgres, e);
                        tracing::debug!(%error, "the PostgreSQL listener lost its connection");
                        return Ended::Lost;
                    }
                },
                _ = tick.tick() => {
                    if self.stop_if_idle() {
                        return Ended::Stopped;
                    }
                    if pinged.elapsed() >= PING_EVERY {
                        // Notifications arriving meanwhile are buffered by
                        // sqlx and returned by the next `try_recv`.
                        let ping = tokio::time::timeout(
                            self.bound,
                            (&mut *listener).execute("SELECT 1"),
                        )
                        .await;
                        if !matches!(ping, Ok(Ok(_))) {
                            tracing::debug!("the PostgreSQL listener's ping failed");
                            return Ended::Lost;
                        }
                        pinged = Instant::now();
                    }
                }
            }
        }
    }

    /// Delivers one notification (see the payloads in
    /// [`crate::statements`]); malformed ones are ignored.
    fn dispatch(&self, payload: &str) {
        let mut parts = payload.split(' ');
        let (Some(kind), Some(run)) = (parts.next(), parts.next()) else {
            return;
        };
        let Ok(run) = RunId::new(run) else { return };
        let doc = parts.next();
        let event = match (kind, doc) {
            ("c", Some(doc)) => match (DocName::new(doc), parts.next()) {
                (Ok(doc), Some(version)) => WatchEvent::Changed {
                    doc,
                    version: Version::new(version),
                },
                _ => return,
            },
            ("d", Some(doc)) => match DocName::new(doc) {
                Ok(doc) => WatchEvent::Deleted { doc },
                Err(_) => return,
            },
            ("r", doc) => {
                let key = match doc {
                    None | Some("") => LockKey::Run(run),
                    Some(doc) => match DocName::new(doc) {
                        Ok(doc) => LockKey::Doc(run, doc),
                        Err(_) => return,
                    },
                };
                self.signals.announced(&key);
                return;
            }
            ("s", _) => {
                for (followed, wake) in self.state().followers.values() {
                    if *followed == run {
                        wake.notify_one();
                    }
                }
                return;
            }
            _ => return,
        };
        // A feed whose consumer is gone stops here; its registration
        // removes the entry (again) when the feed is dropped.
        self.state()
            .watchers
            .retain(|_, w| w.run != run || w.sender.send(event.clone()));
    }
}
