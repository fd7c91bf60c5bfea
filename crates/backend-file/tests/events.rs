//! Watching runs with inotify, and lock waiters woken by releases made in
//! other processes (and, without asking, by those of the same store): what
//! the file backend adds to the conformance cases.
//! Reads, watches and subscriptions create nothing in the store.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_core::{
    Bytes, DocName, Fetched, GetOptions, Lock, LockExt, LockKey, Owner, Replay, RunId, Store,
    StoreExt, Version, WaitPolicy, WatchEvent, WatchMode, Watcher,
};
use runstate_file::{FileConfig, FileStore, WatchBy};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-events-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

fn run(id: &str) -> RunId {
    RunId::new(id).expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

async fn open(root: &Path) -> FileStore {
    FileStore::open(FileConfig::new(root).with_poll_interval(Duration::from_millis(50)))
        .await
        .expect("open")
}

/// The next event within `limit`, if any.
async fn next(watch: &mut Watcher, limit: Duration) -> Option<WatchEvent> {
    match tokio::time::timeout(limit, watch.next()).await {
        Ok(Some(event)) => Some(event.expect("no watch error")),
        Ok(None) => panic!("the watch ended"),
        Err(_) => None,
    }
}

/// Events until `want` is seen (which is returned with those before it),
/// failing after 10 s.
async fn until(watch: &mut Watcher, want: impl Fn(&WatchEvent) -> bool) -> Vec<WatchEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some(event) = next(watch, Duration::from_millis(200)).await {
            let done = want(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
    panic!("not seen within 10 s; saw {seen:?}");
}

/// Everything under `dir` that exists: paths, sizes and times.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).expect("read folder") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.insert(path, (meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_folder_that_does_not_exist_is_watched_without_creating_it() {
    let root = temp_root("missing");
    let store = open(&root).await;
    assert_eq!(
        store.capabilities().watch,
        WatchMode::Native { every_write: false }
    );
    let later = run("later");
    let mut watch = store.watch(&later).await.expect("watch");
    let mut status = store
        .subscribe(&later, Replay::All)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !root.join("later").exists(),
        "nothing is created to watch a run"
    );
    assert!(next(&mut watch, Duration::from_millis(100)).await.is_none());
    let v = store
        .put_bytes(&later, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("ron"),
            version: v.clone(),
        }
    })
    .await;
    store
        .publish(&later, "ron", "built")
        .await
        .expect("publish");
    let event = tokio::time::timeout(Duration::from_secs(10), status.next())
        .await
        .expect("a message within 10 s")
        .expect("open")
        .expect("no error");
    match event {
        runstate_core::StatusEvent::Message(m) => assert_eq!(m.text, "built"),
        other => panic!("{other:?}"),
    }
    // Later writes follow as usual.
    let v2 = store
        .put_bytes(&later, &doc("ron"), Bytes::from_static(b"[]"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("ron"),
            version: v2.clone(),
        }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_other_programs_writes_and_deletes_and_ignores_the_rest() {
    let root = temp_root("foreign");
    let store = open(&root).await;
    let r = run("r");
    store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("seed");
    let mut watch = store.watch(&r).await.expect("watch");

    // Bookkeeping, temporary files, other files and folders: no event.
    let lease = store
        .try_acquire(
            &LockKey::Run(r.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(30),
        )
        .await
        .expect("acquire");
    store.release(&lease).await.expect("release");
    store
        .mark(&r, "build", std::time::SystemTime::now())
        .await
        .expect("mark");
    store.publish(&r, "ron", "hello").await.expect("publish");
    fs::write(root.join("r/.ron.json.rstmp.x"), b"partial").expect("temp file");
    fs::write(root.join("r/notes.txt"), b"not a document").expect("other file");
    fs::create_dir(root.join("r/sub")).expect("a folder");
    store.get_bytes(&r, &doc("ron")).await.expect("a read");
    store.list_all_docs(&r).await.expect("a listing");
    let quiet = next(&mut watch, Duration::from_millis(700)).await;
    assert_eq!(quiet, None, "nothing but documents is reported");

    // Another program writes a document in place, then removes it.
    let content = b"{\"written\":\"by hand\"}";
    fs::write(root.join("r/climate.json"), content).expect("write by hand");
    let expected = store
        .get_bytes(&r, &doc("climate"))
        .await
        .expect("get")
        .expect("present")
        .version;
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("climate"),
            version: expected.clone(),
        }
    })
    .await;
    fs::remove_file(root.join("r/climate.json")).expect("remove by hand");
    until(&mut watch, |e| {
        *e == WatchEvent::Deleted {
            doc: doc("climate"),
        }
    })
    .await;
    assert!(store.delete(&r, &doc("ron"), None).await.expect("delete"));
    until(&mut watch, |e| {
        *e == WatchEvent::Deleted { doc: doc("ron") }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The run folder removed (by hand) takes its watch with it: `Resync`,
/// and the folder made again is watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_run_folder_gives_resync_and_is_watched_again() {
    let root = temp_root("removed");
    let store = open(&root).await;
    let r = run("r");
    store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("seed");
    let mut watch = store.watch(&r).await.expect("watch");
    fs::remove_dir_all(root.join("r")).expect("remove the run folder");
    until(&mut watch, |e| *e == WatchEvent::Resync).await;
    let v = store
        .put_bytes(&r, &doc("wepp"), Bytes::from_static(b"again"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("wepp"),
            version: v.clone(),
        }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

fn max_queued_events() -> usize {
    fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(16384)
}

/// The kernel's inotify queue overflows while the event thread is held:
/// the `notify` crate's rescan flag reaches the consumer as `Resync` (not
/// a feed overflow: only a few documents change), a re-list equals the
/// store, and the watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inotify_queue_overflow_gives_resync_and_the_watch_goes_on() {
    let root = temp_root("overflow");
    let store = open(&root).await;
    let r = run("r");
    store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("seed");
    let mut watch = store.watch(&r).await.expect("watch");
    let writes = max_queued_events();
    {
        let _paused = store.pause_watch_events();
        let dir = root.join("r");
        tokio::task::spawn_blocking(move || {
            for i in 0..writes {
                fs::write(dir.join(format!("d{}.json", i % 8)), format!("{i}")).expect("write");
            }
        })
        .await
        .expect("join");
    }
    let mut events = Vec::new();
    let mut resynced = false;
    while let Some(event) = next(&mut watch, Duration::from_millis(1500)).await {
        resynced |= event == WatchEvent::Resync;
        events.push(event);
    }
    assert!(resynced, "an overflow of the kernel's queue gives Resync");
    assert!(
        events.len() < runstate_core::events::FEED_CAPACITY,
        "the feed itself did not overflow: {} events",
        events.len()
    );
    let listed: BTreeMap<DocName, Version> = store
        .list_all_docs(&r)
        .await
        .expect("list")
        .into_iter()
        .map(|m| (m.name, m.version))
        .collect();
    assert_eq!(listed.len(), 9);
    let v = store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"after"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("ron"),
            version: v.clone(),
        }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The inotify watches of this process on the inode `ino` (read from
/// `/proc/self/fdinfo` of its inotify descriptors).
fn watches_on(ino: u64) -> usize {
    let mut count = 0;
    for entry in fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        let is_inotify = fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().contains("inotify"));
        if !is_inotify {
            continue;
        }
        let info = fs::read_to_string(Path::new("/proc/self/fdinfo").join(entry.file_name()))
            .unwrap_or_default();
        count += info
            .lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .filter(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("ino:"))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    == Some(ino)
            })
            .count();
    }
    count
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dropping a watch or a subscription stops its listener and removes its
/// inotify watch; a lock waiter's watch goes when its wait ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watchers_leave_no_inotify_watch_behind() {
    let root = temp_root("dropped");
    let store = open(&root).await;
    let r = run("r");
    store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("seed");
    store.publish(&r, "ron", "x").await.expect("publish");
    let key = LockKey::Run(r.clone());
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    let folder = fs::metadata(root.join("r")).expect("stat").ino();
    let book = fs::metadata(root.join("r/.runstate")).expect("stat").ino();
    let record = fs::metadata(root.join("r/.runstate/run.lease"))
        .expect("stat")
        .ino();
    let a = store.watch(&r).await.expect("watch");
    let b = store.watch(&r).await.expect("watch");
    let s = store.subscribe(&r, Replay::None).await.expect("subscribe");
    assert!(watches_on(folder) >= 1 && watches_on(book) >= 1);
    let waiting = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { store.wait_for_release(&key, Duration::from_secs(30)).await })
    };
    eventually("the waiter watches the record", || watches_on(record) >= 1).await;
    store.release(&lease).await.expect("release");
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter woke")
        .expect("join");
    drop(a);
    assert!(watches_on(folder) >= 1, "the other watch keeps it");
    drop((b, s));
    eventually("every watch is removed", || {
        watches_on(folder) + watches_on(book) + watches_on(record) == 0
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

const HOLDER_VAR: &str = "RUNSTATE_EVENTS_HOLDER_ROOT";

/// Holds the run lock of `r` until a line arrives on stdin, then releases
/// it; prints `held` and `released`.
#[test]
#[ignore = "child process of a_waiter_wakes_when_another_process_releases"]
fn lock_holder_child() {
    let Some(root) = std::env::var_os(HOLDER_VAR) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = FileStore::open(FileConfig::new(PathBuf::from(root)).with_sweep_on_open(false))
            .await
            .expect("open");
        let lease = store
            .try_acquire(
                &LockKey::Run(run("r")),
                &Owner::for_this_process(),
                Duration::from_secs(600),
            )
            .await
            .expect("acquire");
        println!("held");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("a line");
        store.release(&lease).await.expect("release");
        println!("released");
    });
}

/// Kills the child (by its pid) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A waiter whose backoff is far longer than the test wakes when a lock
/// held by another process (with a long TTL) is released: it does not
/// sleep through its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_wakes_when_another_process_releases() {
    let root = temp_root("waiter");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["lock_holder_child", "--exact", "--ignored", "--nocapture"])
        .env(HOLDER_VAR, &root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let holder = Reaped(child);
    let mut line = String::new();
    while !line.contains("held") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("read") > 0,
            "the holder exited"
        );
    }
    let store = open(&root).await;
    let key = LockKey::Run(run("r"));
    let slow = WaitPolicy::with_timeout(Duration::from_secs(600)).with_backoff(
        Duration::from_secs(120),
        Duration::from_secs(120),
        1.0,
    );
    let waiter = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            store
                .acquire(
                    &key,
                    &Owner::for_this_process(),
                    Duration::from_secs(30),
                    &slow,
                )
                .await
        })
    };
    // Let the waiter fail once and start waiting (60 s or more).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the lock is held");
    writeln!(stdin, "release").expect("tell the holder");
    let lease = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter woke on the release instead of sleeping its backoff")
        .expect("join")
        .expect("acquired");
    store.release(&lease).await.expect("release");
    drop(holder);
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Issue 13 (waiters wake on release): a waiter whose lock is held
/// through the same store waits for that holder's release without asking
/// (no record read, no `flock` beside the holder's save): one acquire for
/// the holder, one for the waiter, however long the holder works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_a_holder_of_this_store_asks_once() {
    let root = temp_root("local");
    let (d, key) = (doc("ron"), LockKey::Doc(run("r"), doc("ron")));
    runstate_conformance::check_a_local_waiter_asks_once(
        Arc::new(open(&root).await),
        &key,
        &d,
        Duration::from_secs(600),
    )
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// A release (or save-and-release) whose caller stopped waiting for it
/// (a timeout or `select!` around the call, dropped after its first poll)
/// is still carried out by the blocking pool, and still wakes the waiter
/// of this store that waits for that holder: it gets the lock at once
/// instead of sleeping its backoff (as long as the lease's TTL here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_its_caller_dropped_still_wakes_the_waiter() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use runstate_core::PutMode;
    let root = temp_root("dropped");
    let store = Arc::new(open(&root).await);
    let (d, key) = (doc("ron"), LockKey::Doc(run("r"), doc("ron")));
    let ttl = Duration::from_secs(600);
    let policy = WaitPolicy::with_timeout(ttl).with_backoff(Duration::from_millis(1), ttl, 2.0);
    for how in ["release", "save_and_release"] {
        // The blocking pool may finish the call before its first poll
        // returns: then nothing was dropped mid-way; try again.
        let mut dropped = false;
        for _ in 0..20 {
            let lease = store
                .try_acquire(&key, &Owner::for_this_process(), ttl)
                .await
                .expect("holder");
            let waiting = {
                let (store, key, policy) = (Arc::clone(&store), key.clone(), policy.clone());
                tokio::spawn(async move {
                    LockExt::acquire(&*store, &key, &Owner::for_this_process(), ttl, &policy).await
                })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!waiting.is_finished(), "{how}: the lock is held");
            {
                let mut call: Pin<Box<dyn Future<Output = ()> + Send + '_>> = if how == "release" {
                    Box::pin(async {
                        let _ = store.release(&lease).await;
                    })
                } else {
                    Box::pin(async {
                        let _ = store
                            .save_and_release(
                                &lease,
                                &d,
                                Bytes::from_static(b"{}"),
                                PutMode::Overwrite,
                            )
                            .await;
                    })
                };
                // One poll hands the work to the blocking pool; then the
                // caller gives up on it.
                dropped = call
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending();
            }
            let next = tokio::time::timeout(Duration::from_secs(20), waiting)
                .await
                .unwrap_or_else(|_| {
                    panic!("{how}: the waiter slept behind a release it was not told of")
                })
                .expect("join")
                .expect("acquired");
            assert!(next.fence() > lease.fence());
            store.release(&next).await.expect("release");
            if dropped {
                break;
            }
        }
        assert!(dropped, "{how}: never still at work after one poll");
    }
    fs::remove_dir_all(&root).expect("cleanup");
}

/// A wait on a lock that is free (released before the wait began) ends at
/// once; one on a held lock ends after `max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_end_at_once_when_free_and_after_max_when_held() {
    let root = temp_root("wait");
    let store = open(&root).await;
    let key = LockKey::Doc(run("r"), doc("ron"));
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
        .await
        .expect("acquire");
    let start = Instant::now();
    store
        .wait_for_release(&key, Duration::from_millis(300))
        .await;
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "held: waited"
    );
    // Released by another store instance: no local signal reaches us.
    let other = open(&root).await;
    other.release(&lease).await.expect("release");
    tokio::time::timeout(
        Duration::from_secs(20),
        store.wait_for_release(&key, Duration::from_secs(120)),
    )
    .await
    .expect("a free lock is not waited for");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// A WEPPcloud-like run folder nobody wrote to through runstate: reads,
/// conditional reads, watches, subscriptions, milestones and waits leave
/// it exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_watches_and_subscriptions_create_nothing() {
    let root = temp_root("untouched");
    fs::create_dir(root.join("Mica_flume1")).expect("run folder");
    fs::write(root.join("Mica_flume1/ron.json"), b"{\"name\":\"Mica\"}").expect("doc");
    let store = open(&root).await;
    let before = snapshot(&root);
    let r = run("Mica_flume1");
    let stored = store
        .get_bytes(&r, &doc("ron"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        store
            .get_if_changed(&r, &doc("ron"), &stored.version, GetOptions::new())
            .await
            .expect("check"),
        Fetched::Unchanged
    );
    let watch = store.watch(&r).await.expect("watch");
    let sub = store.subscribe(&r, Replay::All).await.expect("subscribe");
    let absent = store
        .watch(&run("absent"))
        .await
        .expect("watch an absent run");
    let absent_sub = store
        .subscribe(&run("absent"), Replay::All)
        .await
        .expect("subscribe to an absent run");
    assert_eq!(
        store.milestones(&r).await.expect("milestones"),
        runstate_core::Milestones::default()
    );
    store
        .wait_for_release(&LockKey::Run(r.clone()), Duration::from_millis(50))
        .await;
    store
        .wait_for_release(&LockKey::Run(run("absent")), Duration::from_millis(50))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop((watch, sub, absent, absent_sub));
    assert_eq!(snapshot(&root), before, "nothing was created or changed");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// `watch=poll` lists the run at the poll interval instead (for shared
/// file systems written from several hosts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_by_polling_is_a_setting() {
    let root = temp_root("poll");
    let url = format!("file://{}?watch=poll&poll_ms=50", root.display());
    let store = FileStore::open(FileConfig::from_url(&url).expect("url"))
        .await
        .expect("open");
    assert_eq!(store.config().watch(), WatchBy::Polling);
    assert_eq!(
        store.capabilities().watch,
        WatchMode::Polling(Duration::from_millis(50))
    );
    let r = run("r");
    let mut watch = store.watch(&r).await.expect("watch");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("ron"),
            version: v.clone(),
        }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Review finding: after the feed overflowed (the consumer fell more than
/// its buffer behind), the listener must not skip a report as "the same as
/// the last one": the consumer's view is now its re-list. Here the
/// consumer's re-list shows `a` at `y`; `a` then goes back to `x`, the
/// version last reported before the overflow, and the consumer must hear
/// of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_feed_overflow_a_change_back_to_an_earlier_version_is_reported() {
    let root = temp_root("feedgap");
    let store = open(&root).await;
    let r = run("r");
    let a = doc("a");
    store
        .put_bytes(&r, &a, Bytes::from_static(b"w"))
        .await
        .expect("seed");
    let mut watch = store.watch(&r).await.expect("watch");
    let x = store
        .put_bytes(&r, &a, Bytes::from_static(b"x"))
        .await
        .expect("put x");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: a.clone(),
            version: x.clone(),
        }
    })
    .await;
    // More changes than the feed buffers, unread.
    let dir = root.join("r");
    let more = runstate_core::events::FEED_CAPACITY + 300;
    tokio::task::spawn_blocking(move || {
        for i in 0..more {
            fs::write(dir.join(format!("b{i:05}.json")), format!("{i}")).expect("write");
        }
    })
    .await
    .expect("join");
    // Time for the listener to read them all (it must overflow the feed;
    // the Resync below proves it did).
    tokio::time::sleep(Duration::from_secs(2)).await;
    until(&mut watch, |e| *e == WatchEvent::Resync).await;
    {
        // The consumer re-lists while `a` is at `y`; `a` is back at `x`
        // before the listener hears of either write.
        let _paused = store.pause_watch_events();
        let y = store
            .put_bytes(&r, &a, Bytes::from_static(b"y"))
            .await
            .expect("put y");
        let listed = store.list_all_docs(&r).await.expect("re-list");
        assert_eq!(
            listed.iter().find(|m| m.name == a).map(|m| &m.version),
            Some(&y)
        );
        store
            .put_bytes(&r, &a, Bytes::from_static(b"x"))
            .await
            .expect("put x again");
    }
    let z = store
        .put_bytes(&r, &doc("zz"), Bytes::from_static(b"z"))
        .await
        .expect("put zz");
    let seen = until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("zz"),
            version: z.clone(),
        }
    })
    .await;
    assert!(
        seen.contains(&WatchEvent::Changed {
            doc: a.clone(),
            version: x.clone(),
        }),
        "the change of `a` back to x after the re-list was reported"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Review finding: a changed document that cannot be read (here a link
/// put in its place, which the store refuses to follow) gives `Resync`,
/// never silence; the watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_document_that_cannot_be_read_gives_resync() {
    let root = temp_root("unreadable");
    let store = open(&root).await;
    let r = run("r");
    store
        .put_bytes(&r, &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("seed");
    fs::write(root.join("elsewhere.json"), b"{}").expect("target");
    let mut watch = store.watch(&r).await.expect("watch");
    // Put in place by one rename, so only `ron.json` is seen to change
    // (names starting with a dot are not documents).
    std::os::unix::fs::symlink(root.join("elsewhere.json"), root.join("r/.link")).expect("symlink");
    fs::rename(root.join("r/.link"), root.join("r/ron.json")).expect("rename");
    until(&mut watch, |e| *e == WatchEvent::Resync).await;
    let v = store
        .put_bytes(&r, &doc("wepp"), Bytes::from_static(b"after"))
        .await
        .expect("put");
    until(&mut watch, |e| {
        *e == WatchEvent::Changed {
            doc: doc("wepp"),
            version: v.clone(),
        }
    })
    .await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Review finding: a wait without a deadline (`Duration::MAX`) waits for
/// the release instead of panicking on `now + max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_without_a_deadline_waits_for_the_release() {
    let root = temp_root("forever");
    let store = open(&root).await;
    let key = LockKey::Doc(run("r"), doc("ron"));
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
        .await
        .expect("acquire");
    let waiter = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { store.wait_for_release(&key, Duration::MAX).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "held: still waiting");
    store.release(&lease).await.expect("release");
    tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("woken by the release")
        .expect("the wait did not panic");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// A release made while nobody waited leaves a wake-up behind in the
/// store's release signals; a later wait on the lock, held again by then,
/// must not take that wake-up for a release and end at once (its caller
/// would retry, find the lock held, and probe the record while the holder
/// saves): only a record that shows the lock free, or `max`, ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_left_by_an_earlier_release_does_not_end_a_wait() {
    let root = temp_root("stale");
    let store = open(&root).await;
    let key = LockKey::Doc(run("r"), doc("ron"));
    let owner = Owner::for_this_process();
    let first = store
        .try_acquire(&key, &owner, Duration::from_secs(60))
        .await
        .expect("acquire");
    // A wait that ends by its bound makes the store keep the lock's signal.
    store
        .wait_for_release(&key, Duration::from_millis(50))
        .await;
    // Released with nobody waiting, then taken again.
    store.release(&first).await.expect("release");
    let second = store
        .try_acquire(&key, &owner, Duration::from_secs(60))
        .await
        .expect("acquire again");
    let start = Instant::now();
    store
        .wait_for_release(&key, Duration::from_millis(800))
        .await;
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "held all along: the wait ran to its bound, not {:?}",
        start.elapsed()
    );
    store.release(&second).await.expect("release");
    fs::remove_dir_all(&root).expect("cleanup");
}
