//! The store's listener: ONE pub/sub connection per store, shared by every
//! watcher, status subscription and lock waiter of that store, opened on
//! first use and closed when the store and everything it fed are dropped.
//!
//! What it hears comes from the write scripts themselves (see
//! [`scripts`]): each run has an events channel (documents
//! written and deleted, locks released) and a status channel. The listener
//! subscribes to a run's channel while somebody in this process follows it
//! (and [`LINGER`] longer, so a busy lock's waiters do not resubscribe for
//! every wait), and hands each message to the feed tasks that follow the
//! run and to the [`Waits`] table.
//!
//! It reconnects by itself (backoff from 50 ms to 2 s), and a connection
//! that stopped answering is found by a `PING` every [`PING_EVERY`]. After
//! a reconnect everything that was subscribed is subscribed again, every
//! feed that was following gets [`Note::Reconnected`] (watchers turn it
//! into `Resync`; status subscriptions re-read the stream from their last
//! message) and every lock waiter is woken, since announcements made while
//! the connection was down are lost.
//!
//! A channel the server refuses to subscribe (an ACL whose channel patterns
//! leave it out) is given up, not retried by the listener: whoever was
//! joining it gets the refusal (`Denied` for an ACL's), feeds that followed
//! it end with it ([`Note::Refused`]), and the channels subscribed beside it
//! are served as usual. The next follower of that channel asks the server
//! again.
//!
//! The task never ends by itself; should it end anyway (a panic), its feeds
//! end with an error saying the listener stopped, joins fail at once and
//! lock waiters fall back to polling ([`EndFeeds`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_core::Stream;
use runstate_core::events::AbortOnDrop;
use runstate_core::time::from_unix_millis;
use runstate_core::{
    DocName, Error, ErrorKind, Fence, LockKey, RunId, StatusMessage, Version, WatchEvent,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::errors::{map_redis_error, refused_by_server, timed_out};
use crate::keys::Keys;

/// The key layout of one store ([`Keys`], which it dereferences to), with
/// its pub/sub channels named for its database. Channels are shared by
/// every database of a server while keys are not, so two stores with one
/// prefix on databases 0 and 1 would otherwise hear each other's writes,
/// releases and status messages. Database 0 keeps the names channels have
/// always had (`<p>:{<run>}:events`, `<p>:{<run>}:status:live`), so
/// processes of earlier versions on it still hear and wake each other;
/// database `N` appends `:db<N>`. No name of one form is a name of the
/// other: the first ends in `:events` or `:live`, the second in a number.
#[derive(Debug, Clone)]
pub(crate) struct StoreKeys {
    keys: Keys,
    db: i64,
}

impl StoreKeys {
    pub(crate) fn new(keys: Keys, db: i64) -> Self {
        StoreKeys { keys, db }
    }

    fn for_db(&self, channel: String) -> String {
        match self.db {
            0 => channel,
            db => format!("{channel}:db{db}"),
        }
    }

    /// The channel the write scripts announce a run's changes on.
    pub(crate) fn events(&self, run: &RunId) -> String {
        self.for_db(self.keys.events(run))
    }

    /// The channel a run's status messages are announced on.
    pub(crate) fn status_channel(&self, run: &RunId) -> String {
        self.for_db(self.keys.status_channel(run))
    }
}

impl std::ops::Deref for StoreKeys {
    type Target = Keys;

    /// Every key name is the layout's own; only the channels above differ.
    fn deref(&self) -> &Keys {
        &self.keys
    }
}

/// How long a channel nobody follows any more stays subscribed.
pub(crate) const LINGER: Duration = Duration::from_secs(10);

/// How often an idle listener checks its connection still answers.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(15);

/// What the listener hands to a feed task.
#[derive(Debug, Clone)]
pub(crate) enum Note {
    /// A document changed or was deleted (events channels).
    Event(WatchEvent),
    /// A status message as published (status channels).
    Status(StatusMessage),
    /// The connection was re-established: whatever was published while it
    /// was down was not heard.
    Reconnected,
    /// The server refused to subscribe the channel (an ACL that does not
    /// cover it): nothing more will be heard on it; the last note.
    Refused(redis::RedisError),
}

/// Which of a run's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `<prefix>:{run}:events` (see [`StoreKeys`]).
    Events,
    /// `<prefix>:{run}:status:live` (see [`StoreKeys`]).
    Status,
}

/// The listener of one store. Dropping the last handle (the store holds
/// one, each [`Membership`] another) stops its task and closes its
/// connection.
pub(crate) struct Listener {
    shared: Arc<Shared>,
    _task: AbortOnDrop,
}

struct Shared {
    /// Where to connect: one server, or the seed nodes of a cluster, tried
    /// in turn after each failure (any node of a cluster hears every
    /// `PUBLISH`, so one that went down is replaced by the next).
    clients: Vec<redis::Client>,
    connect_timeout: Duration,
    timeout: Duration,
    state: Mutex<State>,
    /// Tells the task that the set of wanted channels changed.
    changed: Notify,
    waits: Arc<Waits>,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    /// Counts connections; the current one's number while connected.
    generation: u64,
    connected: bool,
    /// The task ended ([`EndFeeds`]): nothing will be heard any more.
    stopped: bool,
    /// Numbers sinks and channel entries.
    next_id: u64,
}

struct Channel {
    /// Tells this entry from a later one of the same name (an entry is
    /// removed when the server refuses its subscription).
    id: u64,
    run: RunId,
    kind: Kind,
    sinks: Vec<Sink>,
    /// Lock waiters following the channel.
    waiters: usize,
    /// The connection whose `SUBSCRIBE` covers it, if any.
    subscribed: Option<u64>,
    /// Since when nobody follows it.
    idle_since: Option<Instant>,
    /// Joiners waiting for the subscription, answered with the server's
    /// refusal when it will not subscribe the channel.
    pending: Vec<oneshot::Sender<Result<(), redis::RedisError>>>,
}

impl Channel {
    fn wanted(&self) -> bool {
        !self.sinks.is_empty() || self.waiters > 0 || !self.pending.is_empty()
    }
}

struct Sink {
    id: u64,
    tx: mpsc::UnboundedSender<Note>,
    /// The connection it was first heard on (0: not yet subscribed).
    since: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every change to the table is made whole under the lock.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Listener {
    /// Starts the listener's task (it connects at once, in the
    /// background). Must be called inside a tokio runtime.
    pub(crate) fn start(
        clients: Vec<redis::Client>,
        connect_timeout: Duration,
        timeout: Duration,
        waits: Arc<Waits>,
    ) -> Listener {
        let shared = Arc::new(Shared {
            clients,
            connect_timeout,
            timeout,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            waits,
        });
        let task = tokio::spawn(run(Arc::clone(&shared)));
        Listener {
            shared,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    /// Follows `channel` (of `run`): as a feed (`sink`: every note for it)
    /// or, without a sink, as a lock waiter (its release announcements go
    /// to the [`Waits`] table). Returns once the server confirmed the
    /// subscription, with whether it was already in place before this call
    /// (if not, announcements made just before it may have been missed).
    ///
    /// # Errors
    /// `Timeout` when the subscription is not confirmed within `bound`
    /// (the listener cannot reach the server); the server's refusal of the
    /// channel (`Denied` for an ACL's, `Backend` for another); `Backend`
    /// ("the redis listener stopped") once the listener's task has ended.
    pub(crate) async fn join(
        self: &Arc<Self>,
        channel: String,
        run: &RunId,
        kind: Kind,
        sink: Option<mpsc::UnboundedSender<Note>>,
        bound: Duration,
    ) -> Result<(Membership, bool), Error> {
        let (membership, confirmed) = {
            let mut state = lock(&self.shared.state);
            if state.stopped {
                return Err(stopped());
            }
            let live_generation = state.connected.then_some(state.generation);
            state.next_id += 1;
            let id = state.next_id;
            let entry = state
                .channels
                .entry(channel.clone())
                .or_insert_with(|| Channel {
                    id,
                    run: run.clone(),
                    kind,
                    sinks: Vec::new(),
                    waiters: 0,
                    subscribed: None,
                    idle_since: None,
                    pending: Vec::new(),
                });
            entry.idle_since = None;
            let live = live_generation.is_some() && entry.subscribed == live_generation;
            let sink = sink.map(|tx| {
                entry.sinks.push(Sink {
                    id,
                    tx,
                    since: if live {
                        live_generation.unwrap_or(0)
                    } else {
                        0
                    },
                });
                id
            });
            if sink.is_none() {
                entry.waiters += 1;
            }
            let membership = Membership {
                listener: Arc::clone(self),
                channel,
                entry: entry.id,
                sink,
            };
            if live {
                return Ok((membership, true));
            }
            let (tx, rx) = oneshot::channel();
            entry.pending.push(tx);
            (membership, rx)
        };
        self.shared.changed.notify_one();
        match tokio::time::timeout(bound, confirmed).await {
            Ok(Ok(Ok(()))) => Ok((membership, false)),
            // The entry is gone with the refusal: nothing to undo.
            Ok(Ok(Err(refusal))) => Err(map_redis_error(refusal)),
            // Dropped unanswered: only when the task ended.
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(timed_out(bound)),
        }
    }
}

/// One follower of a channel; dropping it stops following (the channel is
/// unsubscribed after [`LINGER`] if nobody else follows it).
pub(crate) struct Membership {
    listener: Arc<Listener>,
    channel: String,
    /// The channel entry it joined (a later one of the same name is not
    /// its own).
    entry: u64,
    /// The feed's sink, or `None` for a lock waiter.
    sink: Option<u64>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = lock(&self.listener.shared.state);
        if let Some(entry) = state
            .channels
            .get_mut(&self.channel)
            .filter(|entry| entry.id == self.entry)
        {
            match self.sink {
                Some(id) => entry.sinks.retain(|s| s.id != id),
                None => entry.waiters = entry.waiters.saturating_sub(1),
            }
            // A joiner that gave up before the subscription was confirmed
            // (a waiter with a short bound, say) wants it no more, but the
            // channel lingers, subscribed, for the next one.
            entry.pending.retain(|joiner| !joiner.is_closed());
            if !entry.wanted() {
                entry.idle_since = Some(Instant::now());
            }
        }
    }
}

/// The listener's task: connect, subscribe, dispatch; again after any
/// failure.
async fn run(shared: Arc<Shared>) {
    let _ended = EndFeeds(Arc::clone(&shared));
    let mut backoff = Duration::from_millis(50);
    let mut next = 0usize;
    loop {
        let Some(client) = shared.clients.get(next % shared.clients.len().max(1)) else {
            return;
        };
        // The next node after any failure (the same one for one server).
        next = next.wrapping_add(1);
        let connected =
            tokio::time::timeout(shared.connect_timeout, client.get_async_pubsub()).await;
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(50);
                serve(&shared, pubsub).await;
            }
            Ok(Err(error)) => {
                tracing::debug!(error = %map_redis_error(error), "redis listener cannot connect; retrying");
            }
            Err(_) => tracing::debug!("redis listener connect timed out; retrying"),
        }
        {
            let mut state = lock(&shared.state);
            state.connected = false;
            for entry in state.channels.values_mut() {
                entry.subscribed = None;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Ends every feed and join of the listener when its task ends, however
/// (a panic in it; an abort comes only once nobody follows anything), and
/// refuses later joins, instead of leaving them all waiting on a task that
/// is gone: feeds see their notes end (the listener stopped), joiners fail
/// at once, and lock waiters are woken to poll.
struct EndFeeds(Arc<Shared>);

impl Drop for EndFeeds {
    fn drop(&mut self) {
        let channels = {
            let mut state = lock(&self.0.state);
            state.stopped = true;
            state.connected = false;
            std::mem::take(&mut state.channels)
        };
        drop(channels);
        self.0.waits.wake_all();
    }
}

/// The error of a join on a listener whose task ended, and of the feeds it
/// served.
pub(crate) fn stopped() -> Error {
    Error::new(ErrorKind::Backend, "the redis listener stopped").with_backend(crate::BACKEND)
}

/// Serves one connection until it fails.
async fn serve(shared: &Shared, pubsub: redis::aio::PubSub) {
    let (mut sink, mut stream) = pubsub.split();
    let generation = {
        let mut state = lock(&shared.state);
        state.generation += 1;
        state.connected = true;
        state.generation
    };
    if !sync(shared, &mut sink, generation).await {
        return;
    }
    if generation > 1 {
        // Releases announced while the connection was down were lost:
        // every waiter retries at once.
        shared.waits.wake_all();
    }
    tracing::debug!(generation, "redis listener connected");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pinged = Instant::now();
    loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)) => {
                match message {
                    Some(message) => dispatch(shared, &message),
                    None => {
                        tracing::debug!(generation, "redis listener connection lost; reconnecting");
                        return;
                    }
                }
            }
            () = shared.changed.notified() => {
                if !sync(shared, &mut sink, generation).await {
                    return;
                }
            }
            _ = tick.tick() => {
                if !sync(shared, &mut sink, generation).await {
                    return;
                }
                if pinged.elapsed() >= PING_EVERY {
                    pinged = Instant::now();
                    let answered = tokio::time::timeout(
                        shared.timeout,
                        sink.ping::<redis::Value>(),
                    )
                    .await;
                    if !matches!(answered, Ok(Ok(_))) {
                        tracing::debug!(generation, "redis listener connection does not answer; reconnecting");
                        return;
                    }
                }
            }
        }
    }
}

/// Subscribes what is wanted, or was within [`LINGER`], and is not yet
/// subscribed on this connection; unsubscribes what nobody followed for
/// [`LINGER`]. Returns `false` when the connection failed.
async fn sync(shared: &Shared, sink: &mut redis::aio::PubSubSink, generation: u64) -> bool {
    let (subscribe, unsubscribe) = {
        let mut state = lock(&shared.state);
        let now = Instant::now();
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        state.channels.retain(|name, entry| {
            // Joiners that gave up waiting want nothing any more.
            entry.pending.retain(|joiner| !joiner.is_closed());
            let lingering = entry
                .idle_since
                .is_some_and(|since| now.duration_since(since) < LINGER);
            if entry.wanted() || lingering {
                if entry.subscribed != Some(generation) {
                    subscribe.push(name.clone());
                }
                return true;
            }
            if entry.subscribed == Some(generation) {
                unsubscribe.push(name.clone());
            }
            false
        });
        (subscribe, unsubscribe)
    };
    if !subscribe.is_empty() {
        let refused = match tokio::time::timeout(shared.timeout, sink.subscribe(&subscribe)).await {
            Ok(Ok(())) => Vec::new(),
            // One channel the server will not subscribe for this user (an
            // ACL's channel patterns) makes it refuse the whole command,
            // and it would refuse it again after every reconnect, holding
            // up every other subscription for good. The connection is still
            // usable: the refused ones are found by halves and given up,
            // their followers told why.
            Ok(Err(error)) if refused_by_server(&error) => {
                match subscribe_apart(shared, sink, &subscribe, error).await {
                    Some(refused) => refused,
                    None => return false,
                }
            }
            _ => return false,
        };
        let mut state = lock(&shared.state);
        for (name, error) in refused {
            let Some(entry) = state.channels.remove(name) else {
                continue;
            };
            // The caller of the subscription gets the refusal; a log line
            // at each try would be noise.
            tracing::debug!(
                channel = %name,
                error = %map_redis_error(error.clone()),
                "redis refused to subscribe a channel; its followers are told"
            );
            for joiner in entry.pending {
                let _ = joiner.send(Err(error.clone()));
            }
            for sink in entry.sinks {
                let _ = sink.tx.send(Note::Refused(error.clone()));
            }
        }
        for name in &subscribe {
            let Some(entry) = state.channels.get_mut(name) else {
                continue;
            };
            entry.subscribed = Some(generation);
            for joiner in entry.pending.drain(..) {
                let _ = joiner.send(Ok(()));
            }
            entry.sinks.retain_mut(|s| {
                let heard_before = s.since != 0 && s.since != generation;
                s.since = generation;
                !heard_before || s.tx.send(Note::Reconnected).is_ok()
            });
        }
    }
    if !unsubscribe.is_empty() {
        match tokio::time::timeout(shared.timeout, sink.unsubscribe(&unsubscribe)).await {
            Ok(Ok(())) => {}
            // Refused (an ACL without the command): the channels are
            // already out of the table, and what is still heard on them is
            // dropped by `dispatch`, so the connection is kept.
            Ok(Err(error)) if refused_by_server(&error) => {
                tracing::debug!(error = %map_redis_error(error), "redis refused an UNSUBSCRIBE");
            }
            _ => return false,
        }
    }
    true
}

/// Subscribes `names`, which the server refused as one command with
/// `refusal`, in halves: a half it takes is subscribed, a half it refuses
/// is halved again, so `k` refused channels among `n` cost at most about
/// `2k·log2(n)` round trips (`2n - 2` when every one is refused) where one
/// by one would cost `n`. Returns the channels refused alone, each with its
/// refusal, or `None` when the connection failed.
async fn subscribe_apart<'a>(
    shared: &Shared,
    sink: &mut redis::aio::PubSubSink,
    names: &'a [String],
    refusal: redis::RedisError,
) -> Option<Vec<(&'a String, redis::RedisError)>> {
    let mut refused = Vec::new();
    let mut work = vec![(names, refusal)];
    while let Some((batch, refusal)) = work.pop() {
        if let [name] = batch {
            refused.push((name, refusal));
            continue;
        }
        let (left, right) = batch.split_at(batch.len() / 2);
        for half in [left, right] {
            match tokio::time::timeout(shared.timeout, sink.subscribe(half)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) if refused_by_server(&error) => work.push((half, error)),
                _ => return None,
            }
        }
    }
    Some(refused)
}

/// Hands one message to whoever follows its channel.
fn dispatch(shared: &Shared, message: &redis::Msg) {
    let channel = message.get_channel_name();
    let payload = message.get_payload_bytes();
    let mut release = None;
    {
        let mut state = lock(&shared.state);
        let Some(entry) = state.channels.get_mut(channel) else {
            return;
        };
        let note = match entry.kind {
            Kind::Events => match parse_event(&entry.run, payload) {
                Some(Announced::Event(event)) => Some(Note::Event(event)),
                Some(Announced::Released(key, fence)) => {
                    release = Some((key, fence));
                    None
                }
                None => {
                    tracing::debug!(channel, "unreadable change announcement ignored");
                    None
                }
            },
            Kind::Status => match parse_status(payload) {
                Some(message) => Some(Note::Status(message)),
                None => {
                    tracing::debug!(channel, "unreadable status announcement ignored");
                    None
                }
            },
        };
        if let Some(note) = note {
            entry.sinks.retain(|s| s.tx.send(note.clone()).is_ok());
        }
    }
    if let Some((key, fence)) = release {
        shared.waits.announced(&key, fence);
    }
}

/// What a write script announced on a run's events channel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Announced {
    Event(WatchEvent),
    Released(LockKey, Fence),
}

/// Reads an events-channel message: `c <version> <doc>`, `d <doc>`,
/// `r <fence>` (the run lock) or `r <fence> <doc>`.
pub(crate) fn parse_event(run: &RunId, payload: &[u8]) -> Option<Announced> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let kind = parts.next()?;
    let announced = match kind {
        "c" => {
            let version = parts.next()?;
            let doc = DocName::new(parts.next()?).ok()?;
            Announced::Event(WatchEvent::Changed {
                doc,
                version: Version::new(version),
            })
        }
        "d" => Announced::Event(WatchEvent::Deleted {
            doc: DocName::new(parts.next()?).ok()?,
        }),
        "r" => {
            let fence = Fence(parts.next()?.parse().ok()?);
            let key = match parts.next() {
                None => LockKey::Run(run.clone()),
                Some(doc) => LockKey::Doc(run.clone(), DocName::new(doc).ok()?),
            };
            Announced::Released(key, fence)
        }
        _ => return None,
    };
    parts.next().is_none().then_some(announced)
}

/// Reads a status-channel message: `<id> <at ms> <topic> <text>` (the text
/// may hold spaces).
pub(crate) fn parse_status(payload: &[u8]) -> Option<StatusMessage> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(4, ' ');
    let id = parts.next()?;
    let at: u64 = parts.next()?.parse().ok()?;
    let topic = parts.next()?;
    let message = parts.next()?;
    Some(StatusMessage::new(id, topic, message, from_unix_millis(at)))
}

/// What this process knows of the locks it waits for: per lock, the fence
/// of the grant a waiter was last refused by, and the highest fence it
/// heard released (announced by any process, or released through this
/// store). A waiter whose blocking grant is known released returns at once;
/// otherwise it sleeps until a release wakes it or its bound passes.
#[derive(Debug, Default)]
pub(crate) struct Waits {
    table: Mutex<HashMap<LockKey, Arc<Slot>>>,
}

/// One lock's marks and its waiters.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    marks: Mutex<Marks>,
    pub(crate) notify: Notify,
}

#[derive(Debug, Default)]
struct Marks {
    /// The fence of the grant a waiter was last refused by (0: none known,
    /// or a WEPPcloud lock, which announces nothing).
    blocked_by: u64,
    /// The highest fence heard released.
    released: u64,
    /// The highest fence this process is releasing or released itself:
    /// its announcement wakes nobody, the local release does (after its
    /// reply). Otherwise the announcement, which often arrives first,
    /// would wake a waiter while the releasing task, about to ask again,
    /// is still reading its reply: two retries per release instead of one.
    local: u64,
}

impl Slot {
    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the grant a waiter was last refused by is known released.
    pub(crate) fn free(&self) -> bool {
        let marks = self.marks();
        marks.blocked_by > 0 && marks.released >= marks.blocked_by
    }
}

/// Slots kept before the ones nobody waits on are forgotten.
const SLOTS: usize = 1024;

impl Waits {
    fn table(&self) -> MutexGuard<'_, HashMap<LockKey, Arc<Slot>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of `key`, made if needed.
    pub(crate) fn slot(&self, key: &LockKey) -> Arc<Slot> {
        let mut table = self.table();
        if let Some(slot) = table.get(key) {
            return Arc::clone(slot);
        }
        if table.len() >= SLOTS {
            table.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        let slot = Arc::new(Slot::default());
        table.insert(key.clone(), Arc::clone(&slot));
        slot
    }

    /// An acquire of `key` was refused by the grant with `fence`.
    pub(crate) fn blocked(&self, key: &LockKey, fence: Fence) {
        self.slot(key).marks().blocked_by = fence.get();
    }

    /// This process is about to release the grant of `key` with `fence`
    /// (and will call [`released`](Self::released) once it has).
    pub(crate) fn releasing(&self, key: &LockKey, fence: Fence) {
        let slot = self.slot(key);
        let mut marks = slot.marks();
        marks.local = marks.local.max(fence.get());
    }

    /// Another process (or this one) announced the release of the grant of
    /// `key` with `fence`: as [`released`](Self::released), unless this
    /// process released it itself.
    pub(crate) fn announced(&self, key: &LockKey, fence: Fence) {
        let slot = self.slot(key);
        if fence.get() > slot.marks().local {
            self.released(key, fence);
        }
    }

    /// The grant of `key` with `fence` was released: the next waiter
    /// retries (one per release, so a released lock is handed on without a
    /// thundering herd in this process).
    pub(crate) fn released(&self, key: &LockKey, fence: Fence) {
        let slot = self.slot(key);
        let mut marks = slot.marks();
        if fence.get() > marks.released {
            marks.released = fence.get();
            drop(marks);
            slot.notify.notify_one();
        }
    }

    /// This process's release of the grant of `key` with `fence` (a
    /// release or a save-and-release, which said [`releasing`](Self::releasing)
    /// first) ended with `outcome`. Taken for [`released`](Self::released)
    /// when the server answered (the grant is gone, or was never current);
    /// after a timeout or a lost connection the grant may still be held,
    /// and taking it for released would send this process's waiters back to
    /// the server after every refusal without a pause, until it expires.
    /// Then the release's own announcement, if it ran after all, is what
    /// wakes them (or their backoff).
    pub(crate) fn settled<T>(&self, key: &LockKey, fence: Fence, outcome: &Result<T, Error>) {
        if outcome
            .as_ref()
            .map_or_else(|e| !e.is_retryable(), |_| true)
        {
            self.released(key, fence);
        } else {
            let slot = self.slot(key);
            let mut marks = slot.marks();
            marks.local = marks.local.min(fence.get().saturating_sub(1));
        }
    }

    /// Wakes every waiter (announcements may have been lost).
    pub(crate) fn wake_all(&self) {
        for slot in self.table().values() {
            slot.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunId {
        RunId::new("Mica_flume1").unwrap()
    }

    /// Review finding: a listener whose task ended (a panic in it; no
    /// known trigger) left its feeds and joiners waiting for ever. Now the
    /// feeds' notes end, the joiner fails at once, and so does a later
    /// join.
    #[tokio::test]
    async fn feeds_and_joiners_end_with_the_listener_task() {
        // Nothing listens on port 1: the task keeps trying to connect, so
        // the join below stays pending until the task ends.
        let client = redis::Client::open("redis://127.0.0.1:1/0").unwrap();
        let bound = Duration::from_millis(100);
        let listener = Arc::new(Listener::start(
            vec![client],
            bound,
            bound,
            Arc::new(Waits::default()),
        ));
        let (tx, mut notes) = mpsc::unbounded_channel();
        let joining = tokio::spawn({
            let listener = Arc::clone(&listener);
            async move {
                listener
                    .join(
                        "ch".into(),
                        &run(),
                        Kind::Status,
                        Some(tx),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(drop)
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // What a panic does to the task: its future is dropped.
        listener._task.0.abort();
        let joined = tokio::time::timeout(Duration::from_secs(5), joining)
            .await
            .expect("the joiner is answered at once")
            .unwrap();
        let error = joined.expect_err("no subscription");
        assert!(error.to_string().contains("listener stopped"), "{error}");
        assert!(notes.recv().await.is_none(), "the feed's notes end");
        let again = listener
            .join(
                "ch2".into(),
                &run(),
                Kind::Events,
                None,
                Duration::from_secs(30),
            )
            .await
            .map(drop)
            .expect_err("a later join fails at once");
        assert!(again.to_string().contains("listener stopped"), "{again}");
    }

    #[test]
    fn channels_are_named_for_their_database() {
        let zero = StoreKeys::new(Keys::new("rs"), 0);
        let one = StoreKeys::new(Keys::new("rs"), 1);
        assert_eq!(zero.events(&run()), "rs:{Mica_flume1}:events");
        assert_eq!(zero.status_channel(&run()), "rs:{Mica_flume1}:status:live");
        assert_eq!(one.events(&run()), "rs:{Mica_flume1}:events:db1");
        assert_eq!(
            one.status_channel(&run()),
            "rs:{Mica_flume1}:status:live:db1"
        );
        // Keys are the layout's own, whatever the database.
        assert_eq!(one.status(&run()), zero.status(&run()));
    }

    #[test]
    fn reads_what_the_scripts_announce() {
        let doc = DocName::new("climate").unwrap();
        assert_eq!(
            parse_event(&run(), b"c 0f3a climate"),
            Some(Announced::Event(WatchEvent::Changed {
                doc: doc.clone(),
                version: Version::new("0f3a"),
            }))
        );
        assert_eq!(
            parse_event(&run(), b"d climate"),
            Some(Announced::Event(WatchEvent::Deleted { doc: doc.clone() }))
        );
        assert_eq!(
            parse_event(&run(), b"r 1795000000000001"),
            Some(Announced::Released(
                LockKey::Run(run()),
                Fence(1_795_000_000_000_001)
            ))
        );
        assert_eq!(
            parse_event(&run(), b"r 7 climate"),
            Some(Announced::Released(LockKey::Doc(run(), doc), Fence(7)))
        );
        for bad in [
            &b""[..],
            b"c",
            b"c v",
            b"c v bad/name",
            b"x y",
            b"r nan",
            b"d a b",
            b"\xff",
        ] {
            assert_eq!(parse_event(&run(), bad), None, "{bad:?}");
        }
        let message = parse_status(b"1795000000000-3 1795000000123 climate step 1 of 3").unwrap();
        assert_eq!(
            (
                message.id.as_str(),
                message.topic.as_str(),
                message.text.as_str()
            ),
            ("1795000000000-3", "climate", "step 1 of 3")
        );
        assert_eq!(message.at, from_unix_millis(1_795_000_000_123));
        assert_eq!(
            parse_status(b"1-0 5 wepp ").map(|m| m.text),
            Some(String::new())
        );
        assert!(parse_status(b"1-0 x wepp text").is_none());
        assert!(parse_status(b"1-0 5 wepp").is_none());
    }

    #[tokio::test]
    async fn a_waiter_returns_at_once_when_its_blocker_is_known_released() {
        let waits = Waits::default();
        let key = LockKey::Run(run());
        assert!(!waits.slot(&key).free(), "nothing known: wait");
        waits.blocked(&key, Fence(5));
        assert!(!waits.slot(&key).free());
        waits.released(&key, Fence(4));
        assert!(!waits.slot(&key).free(), "an older release says nothing");
        waits.released(&key, Fence(5));
        assert!(waits.slot(&key).free());
        // A refusal by a newer grant makes it busy again; a WEPPcloud lock
        // (fence 0) is never taken for free.
        waits.blocked(&key, Fence(9));
        assert!(!waits.slot(&key).free());
        waits.blocked(&key, Fence(0));
        waits.released(&key, Fence(20));
        assert!(!waits.slot(&key).free());
        // A release this process makes itself is taken from the local
        // call, not from its announcement (which may come first).
        waits.blocked(&key, Fence(30));
        waits.releasing(&key, Fence(30));
        waits.announced(&key, Fence(30));
        assert!(!waits.slot(&key).free());
        waits.released(&key, Fence(30));
        assert!(waits.slot(&key).free());
        waits.blocked(&key, Fence(31));
        waits.announced(&key, Fence(31));
        assert!(waits.slot(&key).free(), "another process's release");
        // A release of this process that timed out proves nothing; its
        // announcement, should it have run after all, does.
        waits.blocked(&key, Fence(40));
        waits.releasing(&key, Fence(40));
        waits.settled::<()>(
            &key,
            Fence(40),
            &Err(crate::errors::timed_out(Duration::from_secs(1))),
        );
        assert!(!waits.slot(&key).free());
        waits.announced(&key, Fence(40));
        assert!(waits.slot(&key).free());
    }

    #[tokio::test]
    async fn a_release_wakes_one_waiter() {
        let waits = Arc::new(Waits::default());
        let key = LockKey::Run(run());
        waits.blocked(&key, Fence(3));
        let slot = waits.slot(&key);
        let woken = {
            let slot = Arc::clone(&slot);
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), slot.notify.notified())
                    .await
                    .is_ok()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        waits.released(&key, Fence(3));
        assert!(woken.await.unwrap());
        // The same release heard again (announced after a local release)
        // wakes nobody else.
        let slot2 = Arc::clone(&slot);
        let again = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(100), slot2.notify.notified())
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waits.released(&key, Fence(3));
        assert!(!again.await.unwrap());
    }
}
