//! In-process queueing for lease records, ahead of their `flock`.
//!
//! A record's `flock` is taken without blocking and retried with growing
//! sleeps (see [`crate::leases::lock_bounded`]), so that a stopped process
//! cannot hold up a waiter for longer than the store's lock timeout. Between
//! the threads of *one* process those sleeps are pure loss: a lock waiter
//! that probes the record while the holder saves makes the holder sleep
//! (and the other way round) for up to the next pause, long after the
//! record was let go, which is where most of the tail of many updaters on
//! one document came from. So threads of this process first pass the
//! record's *gate*, a mutex with a bounded wait whose release wakes the
//! next thread at once, and only then take the `flock`, which they then
//! contend for with other processes only.
//!
//! Gates are keyed by the record file's device and inode, process-wide (two
//! stores on one root share them), and forgotten once nobody holds or waits
//! for them. A gate is held exactly as long as its record's `flock`: the
//! guard is dropped after the file is closed.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// One record's gate: whether a thread of this process is through it.
#[derive(Debug, Default)]
struct Gate {
    busy: Mutex<bool>,
    free: Condvar,
}

/// A record, by device and inode.
type Key = (u64, u64);

fn gates() -> &'static Mutex<HashMap<Key, Weak<Gate>>> {
    static GATES: OnceLock<Mutex<HashMap<Key, Weak<Gate>>>> = OnceLock::new();
    GATES.get_or_init(Default::default)
}

fn gate(key: Key) -> Arc<Gate> {
    let mut table = gates().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(gate) = table.get(&key).and_then(Weak::upgrade) {
        return gate;
    }
    // Keep the table small: forget the gates nobody holds any more.
    if table.len() >= 1024 {
        table.retain(|_, gate| gate.strong_count() > 0);
    }
    let gate = Arc::new(Gate::default());
    table.insert(key, Arc::downgrade(&gate));
    gate
}

/// Passage through a record's gate; dropping it lets the next thread of
/// this process through.
#[derive(Debug)]
pub(crate) struct Passage(Arc<Gate>);

impl Drop for Passage {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.0.free.notify_one();
    }
}

/// Passes the gate of the record on device `dev`, inode `ino`, waiting at
/// most `wait` for the thread of this process that is through it. `None`
/// when `wait` ran out.
#[must_use = "the gate is held as long as its passage"]
pub(crate) fn pass(dev: u64, ino: u64, wait: Duration) -> Option<Passage> {
    let gate = gate((dev, ino));
    let deadline = Instant::now().checked_add(wait);
    let mut busy = gate.busy.lock().unwrap_or_else(PoisonError::into_inner);
    while *busy {
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return None;
        }
        busy = gate
            .free
            .wait_timeout(busy, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *busy = true;
    drop(busy);
    Some(Passage(gate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passage_is_exclusive_and_its_drop_lets_the_next_through() {
        let first = pass(1, 1, Duration::ZERO).expect("free");
        assert!(pass(1, 1, Duration::from_millis(20)).is_none(), "held");
        assert!(pass(1, 2, Duration::ZERO).is_some(), "another record");
        let waiter = std::thread::spawn(|| pass(1, 1, Duration::from_secs(60)).is_some());
        std::thread::sleep(Duration::from_millis(20));
        drop(first);
        assert!(waiter.join().expect("join"), "woken by the drop");
    }

    #[test]
    fn an_endless_wait_does_not_overflow() {
        let first = pass(2, 1, Duration::MAX).expect("free");
        drop(first);
        assert!(pass(2, 1, Duration::MAX).is_some());
    }
}
