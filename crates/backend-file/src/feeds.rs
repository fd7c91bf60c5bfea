//! The listeners behind `watch`, `subscribe` and `wait_for_release`: async
//! tasks fed by the store's inotify [`Hub`](crate::hub::Hub), doing their
//! file system work on the blocking pool.
//!
//! **Watch.** A run folder is watched with inotify (non-recursive). The
//! names of changed entries are coalesced; for each document among them
//! (temporary files, the bookkeeping folder and other files are ignored)
//! the listener reads the version the file has *now* through the run's
//! version index, and reports `Changed` with it, or `Deleted` when the
//! file is gone, skipping a report equal to the last one it made for that
//! document. Writes superseded before they were read are thus reported
//! once, with the latest version ([`WatchMode::Native`] with `every_write:
//! false`), and per document the versions reported follow the versions
//! written, in order. The kernel's overflow flag and inotify errors give
//! `Resync` (and the listener forgets what it reported); so does the run
//! folder's removal, after which the listener looks for the folder again.
//!
//! **A run folder that does not exist yet** is not created to be watched
//! (a read-only WEPPcloud store stays untouched): the listener looks for
//! it every poll interval, and once it exists, watches it and reports
//! every document it then holds as `Changed` (all news to a consumer whose
//! snapshot found no folder), then follows events. The same holds for a
//! status subscription whose bookkeeping folder does not exist yet.
//!
//! [`WatchMode::Native`]: runstate_core::WatchMode::Native

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use runstate_core::events::{AbortOnDrop, FEED_CAPACITY};
use runstate_core::{
    DocName, Error, ErrorKind, LIST_PAGE, LockKey, Replay, RunId, StatusEvent, Subscription,
    Version, WatchEvent, Watcher,
};

use crate::BACKEND;
use crate::engine::Engine;
use crate::folder::{Access, Folder};
use crate::hub::{Pending, RouteGuard, Want};
use crate::layout::{io_error, lease_file_name};
use crate::status::{Follower, Item, existing_book, is_status_file};

/// A registered route and its batch.
type Route = (RouteGuard, Arc<Pending>);

/// Runs `f` on the blocking pool.
async fn blocking<T, F>(engine: &Arc<Engine>, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&Engine) -> Result<T, Error> + Send + 'static,
{
    let engine = Arc::clone(engine);
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                "a blocking file operation did not complete",
            )
            .with_backend(BACKEND)
            .with_source(e)
        })?
}

/// Whether an entry of a run folder may be a document (not a temporary
/// file, nor the bookkeeping folder).
fn is_visible(name: &str) -> bool {
    !name.starts_with('.')
}

/// Watches the run folder of `run` if it exists: `None` when it does not.
fn arm_run(engine: &Engine, run: &RunId) -> Result<Option<Route>, Error> {
    let Some(dir) = engine.existing_run_dir(run)? else {
        return Ok(None);
    };
    let path = dir
        .real_path()
        .map_err(|e| io_error("resolving the run folder", dir.path(), e))?;
    engine
        .hub()?
        .add(&path, Want::Children(is_visible))
        .map(Some)
}

/// Starts watching `run`: the route is registered before this returns, so
/// every write after it is seen.
pub(crate) async fn watch(
    engine: Arc<Engine>,
    run: RunId,
    poll: Duration,
) -> Result<Watcher, Error> {
    let r = run.clone();
    let route = blocking(&engine, move |e| arm_run(e, &r)).await?;
    let (sender, feed) = Watcher::channel(FEED_CAPACITY);
    let task = tokio::spawn(follow_run(engine, run, sender, route, poll));
    Ok(feed.keep(Arc::new(AbortOnDrop(task.abort_handle()))))
}

/// What the watch listener last reported per document (`None`: deleted),
/// since the last `Resync` the consumer will see.
///
/// A report equal to the last one is skipped, which is only right while
/// the consumer's view of the document is that last report. After a
/// `Resync` the consumer's view is its re-list, made at a moment the
/// listener does not know, so what was reported before it proves nothing:
/// the table is emptied whenever a `Resync` is sent, and whenever the feed
/// dropped an event (the feed then delivers a `Resync` of its own). A drop
/// is seen by the feed's gap flag right after each send; the consumer
/// clears that flag only once it has drained the whole buffer, which it
/// cannot do between a refused send and the check that follows it unless
/// the listener is descheduled for that long (the feed's `send` does not
/// say whether it dropped the event).
#[derive(Default)]
struct Reported(HashMap<DocName, Option<Version>>);

impl Reported {
    /// Reports `version` of `doc` unless it is what was last reported;
    /// `false` once the consumer is gone.
    fn report(
        &mut self,
        sender: &mut runstate_core::FeedSender<WatchEvent>,
        doc: DocName,
        version: Option<Version>,
    ) -> bool {
        if sender.has_gap() {
            // Events were dropped and the consumer will re-list: nothing
            // reported so far is what it will know.
            self.0.clear();
        }
        if self.0.get(&doc) == Some(&version) {
            return true;
        }
        let event = match &version {
            Some(version) => WatchEvent::Changed {
                doc: doc.clone(),
                version: version.clone(),
            },
            None => WatchEvent::Deleted { doc: doc.clone() },
        };
        let open = sender.send(event);
        if sender.has_gap() {
            // This event (at least) was dropped: not reported.
            self.0.clear();
        } else {
            self.0.insert(doc, version);
        }
        open
    }

    /// Tells the consumer to re-list, forgetting what was reported;
    /// `false` once the consumer is gone.
    fn resync(&mut self, sender: &mut runstate_core::FeedSender<WatchEvent>) -> bool {
        self.0.clear();
        sender.resync()
    }
}

async fn follow_run(
    engine: Arc<Engine>,
    run: RunId,
    mut sender: runstate_core::FeedSender<WatchEvent>,
    mut route: Option<Route>,
    poll: Duration,
) {
    let mut reported = Reported::default();
    loop {
        let Some((_, pending)) = &route else {
            // No run folder yet (or any more): look for it.
            tokio::select! {
                () = sender.closed() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let r = run.clone();
            match blocking(&engine, move |e| arm_run(e, &r)).await {
                Ok(Some(armed)) => route = Some(armed),
                Ok(None) => continue,
                Err(error) => {
                    tracing::debug!(%error, %run, "cannot watch the run folder yet");
                    continue;
                }
            }
            // Watched from now on; everything there now is news.
            let r = run.clone();
            let listed = blocking(&engine, move |e| {
                let mut all = Vec::new();
                loop {
                    let page = e.list_docs(&r, all.last().map(|(d, _)| d), LIST_PAGE)?;
                    all.extend(page.items.into_iter().map(|m| (m.name, m.version)));
                    if !page.more {
                        return Ok(all);
                    }
                }
            })
            .await;
            match listed {
                Ok(listed) => {
                    for (doc, version) in listed {
                        if !reported.report(&mut sender, doc, Some(version)) {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, %run, "listing a watched run failed");
                    if !reported.resync(&mut sender) {
                        return;
                    }
                }
            }
            continue;
        };
        tokio::select! {
            () = sender.closed() => return,
            () = pending.changed() => {}
        }
        let batch = pending.take();
        if batch.gone {
            // The run folder was removed or renamed: its watch went with
            // it. The consumer lists again; the folder is looked for anew.
            route = None;
            if !reported.resync(&mut sender) {
                return;
            }
            continue;
        }
        if batch.rescan && !reported.resync(&mut sender) {
            return;
        }
        let docs: Vec<DocName> = batch
            .names
            .iter()
            .filter_map(|name| engine.layout().doc_of_file(name))
            .collect();
        if docs.is_empty() {
            continue;
        }
        let r = run.clone();
        match blocking(&engine, move |e| e.versions_now(&r, &docs)).await {
            Ok(now) => {
                // A changed document that cannot be read (its permissions,
                // a link or FIFO put in its place) cannot be reported with
                // a version, and must not be skipped in silence: the
                // consumer re-lists, and learns what is wrong from that.
                if now.unreadable && !reported.resync(&mut sender) {
                    return;
                }
                for (doc, version) in now.found {
                    if !reported.report(&mut sender, doc, version) {
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, %run, "reading watched documents failed");
                if !reported.resync(&mut sender) {
                    return;
                }
            }
        }
    }
}

/// Watches the bookkeeping folder of `run` for the status log, if it
/// exists; a store whose inotify cannot be started follows by polling.
fn arm_book(engine: &Engine, book: &Folder) -> Option<Route> {
    let armed = book
        .real_path()
        .map_err(|e| io_error("resolving the bookkeeping folder", book.path(), e))
        .and_then(|path| engine.hub()?.add(&path, Want::Children(is_status_file)));
    match armed {
        Ok(route) => Some(route),
        Err(error) => {
            tracing::debug!(%error, "following the status log by polling only");
            None
        }
    }
}

/// Subscribes to `run`'s status messages: the history it holds is read
/// (and the log watched) before this returns, so every message published
/// after it is delivered.
pub(crate) async fn subscribe(
    engine: Arc<Engine>,
    run: RunId,
    replay: Replay,
    poll: Duration,
) -> Result<Subscription, Error> {
    let r = run.clone();
    let (follower, history, route) = blocking(&engine, move |e| {
        let book = existing_book(e, &r)?;
        let route = book.as_ref().and_then(|book| arm_book(e, book));
        let (follower, history) = Follower::start(book.as_ref(), e.lock_timeout())?;
        Ok((follower, history, route))
    })
    .await?;
    let skip = match replay {
        Replay::None => history.len(),
        Replay::Last(n) => history.len().saturating_sub(n),
        _ => 0,
    };
    // Room for the whole replay (bounded by the configured history) and
    // for live messages after it: a replay longer than the feed's usual
    // buffer is delivered whole, not cut off at the buffer.
    let replayed = history.len() - skip;
    let (mut sender, feed) = Subscription::channel(FEED_CAPACITY.saturating_add(replayed));
    for message in history.into_iter().skip(skip) {
        sender.send(StatusEvent::Message(message));
    }
    let task = tokio::spawn(follow_status(engine, run, sender, follower, route, poll));
    Ok(feed.keep(Arc::new(AbortOnDrop(task.abort_handle()))))
}

/// Waits for a route's batch, or forever without a route.
async fn changed(route: &Option<Route>) {
    match route {
        Some((_, pending)) => pending.changed().await,
        None => std::future::pending().await,
    }
}

async fn follow_status(
    engine: Arc<Engine>,
    run: RunId,
    mut sender: runstate_core::FeedSender<StatusEvent>,
    mut follower: Follower,
    mut route: Option<Route>,
    poll: Duration,
) {
    loop {
        // Read at once (what came between the start and the watch), then
        // on every event, and every poll interval regardless (appends
        // made on another host, which inotify does not see).
        let r = run.clone();
        let watched = route.is_some();
        let polled = blocking(&engine, move |e| {
            let outcome: Result<(Vec<Item>, Option<Route>), Error> = (|| {
                let Some(book) = existing_book(e, &r)? else {
                    return Ok((Vec::new(), None));
                };
                let route = if watched { None } else { arm_book(e, &book) };
                Ok((follower.poll(&book, e.lock_timeout())?, route))
            })();
            Ok((follower, outcome))
        })
        .await;
        let outcome = match polled {
            Ok((back, outcome)) => {
                follower = back;
                outcome
            }
            Err(error) => {
                // Only a panic gets here, and the follower went with it.
                sender.fail(error.with_operation(runstate_core::Operation::Subscribe));
                return;
            }
        };
        match outcome {
            Ok((items, armed)) => {
                if armed.is_some() {
                    route = armed;
                }
                for item in items {
                    let delivered = match item {
                        Item::Message(message) => sender.send(StatusEvent::Message(message)),
                        Item::Gap => sender.resync(),
                    };
                    if !delivered {
                        return;
                    }
                }
            }
            Err(error) => {
                // Tried again at the next event or interval; the position
                // is kept, so nothing is lost meanwhile.
                tracing::debug!(%error, %run, "reading the status log failed");
            }
        }
        tokio::select! {
            () = sender.closed() => return,
            () = changed(&route) => {}
            () = tokio::time::sleep(poll) => {}
        }
        if let Some((_, pending)) = &route
            && pending.take().gone
        {
            // The bookkeeping folder (or the run folder) went away.
            route = None;
        }
    }
}

/// What a lock waiter found once its watch was in place.
pub(crate) enum Armed {
    /// The lock is free (or has no record): retry at once.
    Free,
    /// Held: the route is poked when the record is written; the
    /// bookkeeping folder is where to look at it again.
    Held(Route, Arc<Folder>),
}

/// Whether the record of `key` in `book` shows a live holder, read without
/// its `flock` (see [`crate::leases::peek_held`]).
pub(crate) fn is_held(book: &Folder, key: &LockKey) -> bool {
    match book.open_file(&lease_file_name(key), Access::Read) {
        Ok(Some(file)) => crate::leases::peek_held(&file),
        _ => false,
    }
}

/// Watches the record of `key` for writes, then checks whether the lock
/// is still held (a release made before the watch is seen here). `None`
/// when there is nothing to watch (no run folder or bookkeeping folder:
/// nothing is created for a waiter), inotify is unavailable, or a
/// WEPPcloud lock file holds the lock (it announces nothing: the waiter
/// sleeps its whole bound, or until this store breaks the lock).
pub(crate) fn arm_release(engine: &Engine, key: &LockKey) -> Result<Option<Armed>, Error> {
    if engine.lock_file_holder(key)?.is_some() {
        return Ok(None);
    }
    let Some(book) = engine.existing_book(key.run())? else {
        return Ok(None);
    };
    let name = lease_file_name(key);
    if book
        .kind_of(&name)
        .map_err(|e| io_error("stat of the lease record", &book.child(&name), e))?
        .is_none()
    {
        return Ok(Some(Armed::Free));
    }
    let path = book
        .real_path()
        .map_err(|e| io_error("resolving the bookkeeping folder", book.path(), e))?
        .join(&name);
    let route = engine.hub()?.add(&path, Want::Writes)?;
    if !is_held(&book, key) {
        return Ok(Some(Armed::Free));
    }
    Ok(Some(Armed::Held(route, Arc::new(book))))
}
