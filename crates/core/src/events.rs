//! What happens to a run while it lives: change notification
//! ([`Store::watch`]), status messages with a replayable
//! history ([`Store::publish`],
//! [`Store::subscribe`]) and milestones
//! ([`Store::mark`],
//! [`Store::set_attr`],
//! [`Store::milestones`]).
//!
//! ## Never missing a change silently
//!
//! A [`Feed`] delivers events in order. Whenever events may have been lost
//! (the consumer fell behind and the feed's buffer overflowed, the
//! backend's connection dropped and was re-established, a file system
//! watch overflowed), the feed yields a `Resync` marker instead of going
//! quiet: the consumer re-reads the state it follows and carries on.
//!
//! The protocol for following a run's documents:
//!
//! 1. **subscribe first**: `let mut watch = store.watch(&run).await?;`
//! 2. **then snapshot**: `let mut known = store.list_all_docs(&run).await?;`
//! 3. **apply events**: for `Changed { doc, version }` take the document
//!    (or note the version) unless `known` already has that version; for
//!    `Deleted { doc }` forget it; on `Resync`, list again (step 2).
//!
//! Because the watch starts before the snapshot, a write that lands between
//! the two shows in the snapshot, as an event, or both: never in neither.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::id::{DocName, RunId};
use crate::store::{DocMeta, Store, StoreExt};
use crate::version::Version;

/// A change to a run's documents.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A document was written; this is its version now (or was, an instant
    /// ago: a later event follows any later write).
    Changed {
        /// The document.
        doc: DocName,
        /// Its new version.
        version: Version,
    },
    /// A document was deleted.
    Deleted {
        /// The document.
        doc: DocName,
    },
    /// Events may have been missed: list the run again.
    Resync,
}

/// One status message of a run: progress text published on a topic (in
/// WEPPcloud, a controller's name).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusMessage {
    /// Its id in the run's history, increasing in publication order (an
    /// opaque string: compare ids of one backend for equality only).
    pub id: String,
    /// The topic it was published on.
    pub topic: String,
    /// The message itself.
    pub text: String,
    /// When it was published, by the publisher's clock (informational).
    pub at: SystemTime,
}

impl StatusMessage {
    /// A message; for backends decoding their history.
    pub fn new(
        id: impl Into<String>,
        topic: impl Into<String>,
        text: impl Into<String>,
        at: SystemTime,
    ) -> Self {
        StatusMessage {
            id: id.into(),
            topic: topic.into(),
            text: text.into(),
            at,
        }
    }
}

/// What a status subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusEvent {
    /// A message, from the history or live.
    Message(StatusMessage),
    /// Messages may have been missed (the subscriber fell behind, the
    /// connection was re-established): read the history again if it
    /// matters.
    Resync,
}

/// How much of a run's history a new subscription replays before it
/// follows live messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Replay {
    /// None: live messages only.
    None,
    /// The last `n` messages.
    Last(usize),
    /// Everything the history still holds (the default).
    #[default]
    All,
}

/// The milestones and attributes of a run: timestamps of finished tasks
/// (`build_climate`, …) and short named values (`has_sbs`, …), each set on
/// its own, atomically, without a document lock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Milestones {
    /// When each task was marked done.
    pub timestamps: BTreeMap<String, SystemTime>,
    /// The attributes.
    pub attrs: BTreeMap<String, String>,
}

/// Longest status message or attribute value accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Checks a topic, task or attribute name: the rules of a [`DocName`]
/// (1 to 128 bytes of `[A-Za-z0-9._-]`, not starting with a dot).
///
/// # Errors
/// [`ErrorKind::InvalidKey`] naming the offending byte.
pub fn check_label(what: &str, name: &str) -> Result<()> {
    DocName::new(name).map(drop).map_err(|e| {
        Error::new(
            ErrorKind::InvalidKey,
            format!("{what} {name:?}: {}", e.message()),
        )
    })
}

/// Checks a status message or attribute value: at most
/// [`MAX_MESSAGE_LEN`] bytes and no NUL.
///
/// # Errors
/// [`ErrorKind::TooLarge`] or [`ErrorKind::InvalidArgument`].
pub fn check_text(what: &str, text: &str) -> Result<()> {
    if text.len() > MAX_MESSAGE_LEN {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("{what} of {} bytes exceeds {MAX_MESSAGE_LEN}", text.len()),
        ));
    }
    if text.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{what} must not contain NUL"),
        ));
    }
    Ok(())
}

/// Events that mark a possible gap.
pub trait Resyncable: Send + 'static {
    /// The marker.
    fn resync() -> Self;
}

impl Resyncable for WatchEvent {
    fn resync() -> Self {
        WatchEvent::Resync
    }
}

impl Resyncable for StatusEvent {
    fn resync() -> Self {
        StatusEvent::Resync
    }
}

/// A stream of events, in order, with a `Resync` marker wherever some may
/// have been lost. Read it with [`next`](Feed::next), or as a
/// `futures_core::Stream`. Dropping it stops whatever feeds it.
pub struct Feed<T> {
    rx: mpsc::Receiver<Result<T>>,
    /// Set by the sender when an event did not fit: once the buffer is
    /// drained, the consumer gets a `Resync` even if nothing else comes.
    gap: Arc<AtomicBool>,
    /// The error the producer failed with, when it did not fit in the
    /// buffer: delivered once the buffer is drained.
    failure: Arc<Mutex<Option<Error>>>,
    /// Kept alive with the feed (a listener task's abort handle, say).
    _keep: Option<Arc<dyn Send + Sync>>,
}

/// A feed of [`WatchEvent`]s.
pub type Watcher = Feed<WatchEvent>;
/// A feed of [`StatusEvent`]s.
pub type Subscription = Feed<StatusEvent>;

/// The producing end of a [`Feed`], for backends.
pub struct FeedSender<T> {
    tx: mpsc::Sender<Result<T>>,
    /// Something was dropped since the last delivered event (shared with
    /// the feed, which reports it once its buffer is drained).
    gap: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<Error>>>,
}

/// Events a feed buffers before a slow consumer gets a `Resync` instead.
pub const FEED_CAPACITY: usize = 1024;

/// The most events a feed buffers, whatever [`Feed::channel`] is asked for
/// (a replay sized from a run's whole numbering, say): past it, a `Resync`.
/// Tokio's channel refuses a capacity past `usize::MAX >> 3` by panicking;
/// the room is taken only as events arrive.
pub const MAX_FEED_CAPACITY: usize = 1 << 24;

impl<T: Resyncable> Feed<T> {
    /// A connected pair with room for `capacity` events (at least 2, at
    /// most [`MAX_FEED_CAPACITY`]).
    pub fn channel(capacity: usize) -> (FeedSender<T>, Feed<T>) {
        let (tx, rx) = mpsc::channel(capacity.clamp(2, MAX_FEED_CAPACITY));
        let gap = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        (
            FeedSender {
                tx,
                gap: Arc::clone(&gap),
                failure: Arc::clone(&failure),
            },
            Feed {
                rx,
                gap,
                failure,
                _keep: None,
            },
        )
    }

    /// Keeps `value` alive as long as the feed (dropped with it).
    pub fn keep(mut self, value: Arc<dyn Send + Sync>) -> Self {
        self._keep = Some(value);
        self
    }

    /// The next event; `None` once the producer is gone for good; an
    /// `Err` when the producer failed and stopped.
    pub async fn next(&mut self) -> Option<Result<T>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

impl<T: Resyncable> Feed<T> {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(event)),
            // Drained (or the producer is gone) while events were lost:
            // say so before anything else.
            other if self.gap.swap(false, Ordering::SeqCst) => {
                drop(other);
                Poll::Ready(Some(Ok(T::resync())))
            }
            // The producer is gone: with the error it failed with, if that
            // did not fit in the buffer.
            Poll::Ready(None) => Poll::Ready(
                self.failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .map(Err),
            ),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Resyncable> futures_core::Stream for Feed<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_event(cx)
    }
}

impl<T> fmt::Debug for Feed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl<T: Resyncable> FeedSender<T> {
    /// Delivers `event`, or records a gap when the consumer is behind (the
    /// next delivery is then preceded by a `Resync`). Returns `false` once
    /// the consumer dropped its feed: stop producing.
    pub fn send(&mut self, event: T) -> bool {
        if self.gap.load(Ordering::SeqCst) {
            // The marker goes in order, before this event; the feed may
            // report the same gap too (a spurious Resync is harmless).
            match self.tx.try_send(Ok(T::resync())) {
                Ok(()) => self.gap.store(false, Ordering::SeqCst),
                Err(mpsc::error::TrySendError::Full(_)) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(Ok(event)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => self.mark_gap(),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Records that an event was dropped. The consumer may have drained the
    /// whole buffer between the refused send and now, and gone to sleep
    /// without seeing the flag: try once more to put the marker itself in
    /// the buffer, which wakes it.
    fn mark_gap(&mut self) -> bool {
        self.gap.store(true, Ordering::SeqCst);
        match self.tx.try_send(Ok(T::resync())) {
            Ok(()) => {
                self.gap.store(false, Ordering::SeqCst);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Marks a gap: the consumer gets a `Resync` (after what it has
    /// buffered). Call it after a reconnect. Returns `false` once the
    /// consumer is gone.
    pub fn resync(&mut self) -> bool {
        match self.tx.try_send(Ok(T::resync())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => self.mark_gap(),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ends the feed with an error, delivered after what is buffered (kept
    /// aside when the buffer is full, so it is never lost).
    pub fn fail(self, error: Error) {
        if let Err(mpsc::error::TrySendError::Full(Err(error))) = self.tx.try_send(Err(error)) {
            *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        }
    }

    /// Whether events were dropped since the consumer last read past a
    /// `Resync`: a producer that skips what it believes the consumer
    /// already knows must not trust that belief now.
    pub fn has_gap(&self) -> bool {
        self.gap.load(Ordering::SeqCst)
    }

    /// Whether the consumer dropped its feed.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the consumer drops its feed.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// A watch built by polling, for backends without a change channel: lists
/// the run every `every` and reports the differences (writes superseded
/// within one interval are reported once, with the latest version). The
/// first listing is taken before this returns, so a write acknowledged
/// after it returns is always reported: what the subscribe-then-snapshot
/// protocol relies on. A failed poll reports nothing; the next one reports
/// whatever changed meanwhile.
///
/// # Errors
/// Those of the first listing.
pub async fn poll_watch(store: Arc<dyn Store>, run: RunId, every: Duration) -> Result<Watcher> {
    async fn listing(store: &dyn Store, run: &RunId) -> Result<BTreeMap<DocName, Version>> {
        Ok(store
            .list_all_docs(run)
            .await?
            .into_iter()
            .map(|DocMeta { name, version, .. }| (name, version))
            .collect())
    }
    let first = listing(&*store, &run).await?;
    let (mut sender, feed) = Watcher::channel(FEED_CAPACITY);
    let task = tokio::spawn(async move {
        let mut known = first;
        let mut resend = false;
        loop {
            tokio::select! {
                () = sender.closed() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = match listing(&*store, &run).await {
                Ok(now) => now,
                Err(error) => {
                    tracing::debug!(%error, run = %run, "a watch poll failed; retrying");
                    continue;
                }
            };
            for (doc, version) in &now {
                if (resend || known.get(doc) != Some(version))
                    && !sender.send(WatchEvent::Changed {
                        doc: doc.clone(),
                        version: version.clone(),
                    })
                {
                    return;
                }
            }
            for doc in known.keys().filter(|d| !now.contains_key(*d)) {
                if !sender.send(WatchEvent::Deleted { doc: doc.clone() }) {
                    return;
                }
            }
            // Events were dropped: the consumer will re-list at some later
            // moment, and a document may be back at a version `now` holds
            // by then. The next poll reports every document again
            // (repeats are harmless).
            resend = sender.has_gap();
            known = now;
        }
    });
    Ok(feed.keep(Arc::new(AbortOnDrop(task.abort_handle()))))
}

/// Aborts a task when dropped: what keeps a listener alive exactly as long
/// as its feed.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_that_did_not_fit_is_delivered_after_the_buffer() {
        let (mut sender, mut feed) = Watcher::channel(2);
        assert!(sender.send(WatchEvent::Resync));
        assert!(sender.send(WatchEvent::Resync));
        sender.fail(Error::new(ErrorKind::Backend, "listener gone"));
        assert!(matches!(feed.next().await, Some(Ok(_))));
        assert!(matches!(feed.next().await, Some(Ok(_))));
        let last = feed
            .next()
            .await
            .expect("the failure")
            .expect_err("an error");
        assert_eq!(last.kind(), ErrorKind::Backend);
        assert!(feed.next().await.is_none());
    }

    #[tokio::test]
    async fn an_overflow_is_reported_even_if_nothing_follows() {
        let (mut sender, mut feed) = Watcher::channel(2);
        let doc = DocName::new("d").unwrap();
        for _ in 0..5 {
            assert!(sender.send(WatchEvent::Deleted { doc: doc.clone() }));
        }
        let mut resyncs = 0;
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(50), feed.next()).await
        {
            if event.expect("ok") == WatchEvent::Resync {
                resyncs += 1;
            }
        }
        assert!(resyncs >= 1);
        drop(sender);
    }

    /// Review finding: a feed sized from a run's whole numbering (a SQL
    /// replay of everything) can ask for more room than Tokio's channel
    /// takes, which panicked inside `subscribe`.
    #[tokio::test]
    async fn any_capacity_makes_a_feed() {
        let (mut sender, mut feed) = Subscription::channel(usize::MAX);
        assert!(sender.send(StatusEvent::Resync));
        assert_eq!(
            feed.next().await.map(|e| e.expect("ok")),
            Some(StatusEvent::Resync)
        );
    }
}
