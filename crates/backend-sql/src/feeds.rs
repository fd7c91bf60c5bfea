//! What feeds status subscriptions: the status follower every dialect
//! uses, woken by `NOTIFY` in PostgreSQL and by a timer elsewhere. (MySQL
//! and SQLite watch runs with `runstate_core::events::poll_watch`;
//! PostgreSQL's watch is in `listen`.)

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runstate_core::{FeedSender, RunId, StatusEvent, StatusMessage};
use tokio::sync::Notify;

use crate::SqlStore;

/// Messages read per query while catching up.
pub(crate) const STATUS_BATCH: usize = 500;
/// The pause before reading again after a failed read.
const RETRY: Duration = Duration::from_secs(1);

/// What wakes a status follower to read new messages.
pub(crate) enum Wake {
    /// PostgreSQL: the listener, on each message of the run and on each
    /// reconnect.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Notified(Arc<Notify>),
    /// MySQL and SQLite: a timer.
    Every(Duration),
}

/// Where a status follower starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    /// Messages numbered after this one are delivered.
    pub(crate) after: u64,
    /// The run's last number when the subscription began: a message
    /// missing after it (trimmed before the follower read it) is a gap,
    /// reported with `Resync`; missing history before it is not.
    pub(crate) live_from: u64,
}

/// Delivers `run`'s status messages from `start` on, in order, until the
/// subscription is dropped. Messages are rows numbered without gaps, so
/// the follower reads "everything after the last one delivered" whenever
/// it is woken: a wake-up that comes late (or twice) loses nothing. A
/// consumer that falls behind overflows its feed, which then reports a
/// `Resync`.
pub(crate) async fn follow_status(
    store: SqlStore,
    run: RunId,
    start: Start,
    wake: Wake,
    mut sender: FeedSender<StatusEvent>,
) {
    let mut last = start.after;
    loop {
        let mut failed = false;
        loop {
            let batch = match store.inner.status_since(&run, last, STATUS_BATCH).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::debug!(%error, run = %run, "reading status messages failed; retrying");
                    failed = true;
                    break;
                }
            };
            let full = batch.len() >= STATUS_BATCH;
            for (seq, message) in batch {
                if seq > last + 1 && seq > start.live_from + 1 && !sender.resync() {
                    return;
                }
                if !sender.send(StatusEvent::Message(message)) {
                    return;
                }
                last = seq;
            }
            if !full {
                break;
            }
        }
        let pause = match &wake {
            Wake::Every(every) => *every,
            Wake::Notified(_) if failed => RETRY,
            Wake::Notified(_) => Duration::MAX,
        };
        tokio::select! {
            () = sender.closed() => return,
            () = tokio::time::sleep(pause.min(Duration::from_secs(86_400))) => {}
            () = notified(&wake) => {}
        }
    }
}

async fn notified(wake: &Wake) {
    match wake {
        Wake::Notified(notify) => notify.notified().await,
        Wake::Every(_) => std::future::pending().await,
    }
}

/// A status message read from the table.
pub(crate) fn message(seq: u64, topic: String, text: String, at_ms: i64) -> StatusMessage {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    StatusMessage::new(format!("{seq:016x}"), topic, text, at)
}
