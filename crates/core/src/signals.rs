//! Wake-ups for waiters in this process when a lock is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::lease::LockKey;

/// A table of release signals, one per lock, for backends to embed and
/// implement [`Lock::wait_for_release`](crate::Lock::wait_for_release)
/// with: call [`released`](ReleaseSignals::released) whenever a lease is
/// given up through this backend instance, and
/// [`wait`](ReleaseSignals::wait) from `wait_for_release`.
///
/// Each release wakes one waiter (first come, first served), so a released
/// lock is handed to the next local waiter at once instead of after its
/// backoff, without a thundering herd. Waiters in other processes still
/// poll with backoff.
#[derive(Debug, Default)]
pub struct ReleaseSignals {
    table: Mutex<HashMap<LockKey, Arc<Notify>>>,
}

impl ReleaseSignals {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn signal(&self, key: &LockKey) -> Arc<Notify> {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = table.get(key) {
            return Arc::clone(existing);
        }
        // Keep the table small: forget signals nobody waits on.
        if table.len() >= 1024 {
            table.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        let notify = Arc::new(Notify::new());
        table.insert(key.clone(), Arc::clone(&notify));
        notify
    }

    /// Wakes the next waiter on `key`, if any.
    pub fn released(&self, key: &LockKey) {
        let table = self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(notify) = table.get(key) {
            notify.notify_one();
        }
    }

    /// Waits for a release of `key` through this table, or `max`.
    pub async fn wait(&self, key: &LockKey, max: Duration) {
        let notify = self.signal(key);
        let _ = tokio::time::timeout(max, notify.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::RunId;

    #[tokio::test]
    async fn a_release_wakes_a_waiter_early() {
        let signals = Arc::new(ReleaseSignals::new());
        let key = LockKey::Run(RunId::new("r").unwrap());
        let waiter = {
            let (signals, key) = (Arc::clone(&signals), key.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                signals.wait(&key, Duration::from_secs(10)).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        signals.released(&key);
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn without_a_release_it_times_out() {
        let signals = ReleaseSignals::new();
        let key = LockKey::Run(RunId::new("r").unwrap());
        let start = Instant::now();
        signals.wait(&key, Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
