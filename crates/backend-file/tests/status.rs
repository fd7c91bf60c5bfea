//! Status messages (an append-only JSON-lines log per run, rotated by
//! size) and milestones (one JSON file per run, changed under a `flock`):
//! what the file backend adds to the conformance cases, with several
//! processes writing at once.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, DocName, ErrorKind, Replay, RunId, StatusEvent, Store, StoreExt, Subscription,
};
use runstate_file::{FileConfig, FileStore};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-status-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

fn run() -> RunId {
    RunId::new("r").expect("valid")
}

const CHILD_VAR: &str = "RUNSTATE_STATUS_CHILD";
const PROCESSES: usize = 4;
const MESSAGES: usize = 150;
const MARKS: usize = 20;

/// One writer process: publishes `MESSAGES` messages (some longer than a
/// pipe buffer) and marks `MARKS` milestones and attributes of its own.
#[test]
#[ignore = "child process of several_processes_publish_and_mark_at_once"]
fn status_writer_child() {
    let Ok(job) = std::env::var(CHILD_VAR) else {
        return;
    };
    let (root, index) = job.split_once('|').expect("root|index");
    let index: usize = index.parse().expect("index");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = FileStore::open(
            FileConfig::new(root)
                .with_sweep_on_open(false)
                .with_status_history(100_000, 1 << 30),
        )
        .await
        .expect("open");
        for i in 0..MESSAGES {
            let pad = if i % 10 == 0 {
                "x".repeat(6000)
            } else {
                String::new()
            };
            store
                .publish(&run(), &format!("p{index}"), &format!("{index}:{i}:{pad}"))
                .await
                .expect("publish");
            if i < MARKS {
                store
                    .mark(
                        &run(),
                        &format!("task_{index}_{i}"),
                        SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000 + i as u64, 250),
                    )
                    .await
                    .expect("mark");
                store
                    .set_attr(&run(), &format!("attr_{index}_{i}"), &format!("{i}"))
                    .await
                    .expect("set_attr");
            }
        }
    });
    println!("status-writer-done");
}

/// Several processes publish and mark at once: every line of the log is
/// one whole JSON message with an id, ids count up by one in file order,
/// each process's messages keep their order, and every milestone and
/// attribute is there.
#[test]
fn several_processes_publish_and_mark_at_once() {
    let root = temp_root("processes");
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<Child> = (0..PROCESSES)
        .map(|index| {
            Command::new(&exe)
                .args(["status_writer_child", "--exact", "--ignored", "--nocapture"])
                .env(CHILD_VAR, format!("{}|{index}", root.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a writer")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success()
                && String::from_utf8_lossy(&output.stdout).contains("status-writer-done"),
            "a writer failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = fs::read_to_string(root.join("r/.runstate/status.log")).expect("the log");
    assert!(
        !root.join("r/.runstate/status.log.1").exists(),
        "no rotation"
    );
    let mut ids = Vec::new();
    let mut per_process: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for line in text.lines() {
        let message: serde_json::Value = serde_json::from_str(line).expect("a whole JSON line");
        let keys: Vec<&str> = message
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
        for key in ["id", "topic", "text", "at"] {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
        ids.push(message["id"].as_u64().expect("a numeric id"));
        let text = message["text"].as_str().expect("text");
        let mut parts = text.splitn(3, ':');
        let (who, i) = (parts.next().expect("who"), parts.next().expect("i"));
        assert_eq!(message["topic"].as_str(), Some(format!("p{who}").as_str()));
        per_process
            .entry(who.to_owned())
            .or_default()
            .push(i.parse().expect("i"));
    }
    let expected: Vec<u64> = (1..=(PROCESSES * MESSAGES) as u64).collect();
    assert_eq!(ids, expected, "ids count up by one in file order");
    for (who, order) in &per_process {
        assert_eq!(order, &(0..MESSAGES).collect::<Vec<_>>(), "process {who}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = FileStore::open_path(&root).await.expect("open");
        let milestones = store.milestones(&run()).await.expect("milestones");
        assert_eq!(milestones.timestamps.len(), PROCESSES * MARKS);
        assert_eq!(milestones.attrs.len(), PROCESSES * MARKS);
        assert_eq!(
            milestones.timestamps["task_3_7"],
            SystemTime::UNIX_EPOCH + Duration::new(1_795_000_007, 250),
            "exact to the nanosecond"
        );
        let sub = store
            .subscribe(&run(), Replay::Last(2))
            .await
            .expect("subscribe");
        let texts = take(sub, 2).await;
        assert_eq!(texts.len(), 2);
    });
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The texts of the next `n` messages (a `Resync` is shown as "RESYNC").
async fn take(mut sub: Subscription, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(StatusEvent::Message(m)))) => out.push(m.text),
            Ok(Some(Ok(_))) => out.push("RESYNC".to_owned()),
            other => panic!("after {out:?}: {other:?}"),
        }
    }
    out
}

/// Everything that arrives within `quiet` of the previous event.
async fn drain(sub: &mut Subscription, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(quiet, sub.next()).await {
        match event.expect("no error") {
            StatusEvent::Message(m) => out.push(m.text),
            _ => out.push("RESYNC".to_owned()),
        }
    }
    out
}

fn texts(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_rotated_by_count_and_by_size_keeping_the_previous_one() {
    let root = temp_root("rotation");
    let store = FileStore::open(FileConfig::new(&root).with_status_history(10, 1 << 20))
        .await
        .expect("open");
    for i in 1..=25 {
        store
            .publish(&run(), "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    let book = root.join("r/.runstate");
    let lines = |name: &str| {
        fs::read_to_string(book.join(name))
            .expect("log")
            .lines()
            .count()
    };
    assert_eq!((lines("status.log.1"), lines("status.log")), (10, 5));
    let all = store
        .subscribe(&run(), Replay::All)
        .await
        .expect("subscribe");
    assert_eq!(
        take(all, 15).await,
        texts(11..=25),
        "the history: previous and current log"
    );
    let last = store
        .subscribe(&run(), Replay::Last(3))
        .await
        .expect("subscribe");
    assert_eq!(take(last, 3).await, texts(23..=25));

    // By size: lines of about 100 bytes, 1000 bytes a log.
    let sized = run_named("sized");
    let store = FileStore::open(FileConfig::new(&root).with_status_history(1000, 1000))
        .await
        .expect("open");
    for i in 0..40 {
        store
            .publish(&sized, "wepp", &format!("{i:03}{}", "y".repeat(40)))
            .await
            .expect("publish");
    }
    let book = root.join("sized/.runstate");
    for name in ["status.log", "status.log.1"] {
        let size = fs::metadata(book.join(name)).expect("log").len();
        assert!(size <= 1000, "{name} is {size} bytes");
    }
    fs::remove_dir_all(&root).expect("cleanup");
}

fn run_named(id: &str) -> RunId {
    RunId::new(id).expect("valid")
}

/// A subscriber kept from reading (its inotify events held, no polling)
/// while the log rotates: one rotation behind, or two (the previous log is
/// then a generation it never read), it misses nothing; three behind, it
/// gets `Resync`, then the messages still held, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_rotations_misses_nothing_or_gets_resync() {
    let root = temp_root("behind");
    let store = FileStore::open(
        FileConfig::new(&root)
            .with_status_history(5, 1 << 20)
            .with_poll_interval(Duration::from_secs(3600)),
    )
    .await
    .expect("open");
    // The bookkeeping folder exists before the subscription (a missing
    // one would only be looked for every poll interval).
    store
        .publish(&run(), "wepp", "seed")
        .await
        .expect("publish");
    let mut sub = store
        .subscribe(&run(), Replay::None)
        .await
        .expect("subscribe");
    // Ids: seed is 1, mN is N + 2; a log holds 5 ids (1-5, 6-10, …).
    store.publish(&run(), "wepp", "m0").await.expect("publish");
    assert_eq!(take_one(&mut sub).await, "m0");
    let mut published = 1;
    for (behind, upto) in [(1, 8), (2, 18), (3, 33)] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        {
            let _paused = store.pause_watch_events();
            while published <= upto {
                store
                    .publish(&run(), "wepp", &format!("m{published}"))
                    .await
                    .expect("publish");
                published += 1;
            }
        }
        let got = drain(&mut sub, Duration::from_secs(2)).await;
        match behind {
            // Held: ids 1-5; the log is now 6-10.
            1 => assert_eq!(got, texts(1..=8), "one rotation behind"),
            // Held: 6-10; the previous log 11-15 was never read; now 16-20.
            2 => assert_eq!(got, texts(9..=18), "two rotations behind"),
            _ => {
                // Held: 16-20; 21-25 (m19-m23) were rotated away unread;
                // 26-30 and 31-35 (m24-m33) are still there.
                assert_eq!(got.first().map(String::as_str), Some("RESYNC"), "{got:?}");
                assert_eq!(got[1..].to_vec(), texts(24..=33), "three rotations behind");
            }
        }
    }
    // And it follows on.
    store
        .publish(&run(), "wepp", "after")
        .await
        .expect("publish");
    assert_eq!(take_one(&mut sub).await, "after");
    fs::remove_dir_all(&root).expect("cleanup");
}

async fn take_one(sub: &mut Subscription) -> String {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok(StatusEvent::Message(m)))) => m.text,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn milestones_are_a_json_file_that_delete_run_removes() {
    let root = temp_root("milestones");
    let store = FileStore::open_path(&root).await.expect("open");
    let at = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_007, 250_000_000);
    store.mark(&run(), "build_climate", at).await.expect("mark");
    store
        .set_attr(&run(), "has_sbs", "false")
        .await
        .expect("set");
    let file = root.join("r/.runstate/milestones.json");
    let stored: serde_json::Value =
        serde_json::from_slice(&fs::read(&file).expect("the file")).expect("JSON");
    assert_eq!(stored["timestamps"]["build_climate"], "1795000007.25");
    assert_eq!(stored["attrs"]["has_sbs"], "false");
    let error = store
        .mark(
            &run(),
            "before",
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
        )
        .await
        .expect_err("before 1970");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    store
        .put_bytes(
            &run(),
            &DocName::new("ron").expect("valid"),
            Bytes::from_static(b"{}"),
        )
        .await
        .expect("a document");
    store.publish(&run(), "ron", "kept").await.expect("publish");
    assert_eq!(store.delete_run(&run()).await.expect("delete_run"), 1);
    assert!(!file.exists(), "deleted with the run's documents");
    assert_eq!(
        store.milestones(&run()).await.expect("milestones"),
        runstate_core::Milestones::default()
    );
    // The status history stays, and its ids go on.
    store.publish(&run(), "ron", "next").await.expect("publish");
    let sub = store
        .subscribe(&run(), Replay::All)
        .await
        .expect("subscribe");
    assert_eq!(take(sub, 2).await, ["kept", "next"]);
    let log = fs::read_to_string(root.join("r/.runstate/status.log")).expect("log");
    assert!(
        log.lines().last().is_some_and(|l| l.contains("\"id\":2")),
        "{log}"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

const HOLD_VAR: &str = "RUNSTATE_STATUS_HOLD_FLOCK";

/// Kills the child (by its pid) when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "child process of changes_wait_boundedly_for_a_stuck_lock"]
fn hold_flock_child() {
    let Some(path) = std::env::var_os(HOLD_VAR) else {
        return;
    };
    let file = fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    file.lock().expect("flock");
    println!("locked");
    loop {
        std::thread::sleep(Duration::from_secs(600));
    }
}

fn hold(path: &Path) -> Holder {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["hold_flock_child", "--exact", "--ignored", "--nocapture"])
        .env(HOLD_VAR, path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let stdout = child.stdout.take().expect("piped");
    let holder = Holder(child);
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "the holder exited"
        );
    }
    holder
}

/// A process that keeps the milestones' or the status counter's `flock`
/// (stopped, hung) makes changes fail with a retryable `Timeout` naming
/// the file after the configured wait; readers are not held up.
#[test]
fn changes_wait_boundedly_for_a_stuck_lock() {
    let root = temp_root("flock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = runtime.block_on(async {
        let store =
            FileStore::open(FileConfig::new(&root).with_lock_timeout(Duration::from_millis(300)))
                .await
                .expect("open");
        store.set_attr(&run(), "a", "1").await.expect("set");
        store.publish(&run(), "t", "1").await.expect("publish");
        store
    });
    for (file, what) in [("milestones.lock", "milestones"), ("status.seq", "status")] {
        let holder = hold(&root.join("r/.runstate").join(file));
        let outcome = runtime.block_on(async {
            let changed = if what == "milestones" {
                store.mark(&run(), "b", SystemTime::now()).await
            } else {
                store.publish(&run(), "t", "2").await
            };
            let read = store.milestones(&run()).await.map(|m| m.attrs.len());
            (changed, read)
        });
        let error = outcome.0.expect_err(what);
        assert_eq!(error.kind(), ErrorKind::Timeout, "{what}: {error}");
        assert!(error.is_retryable(), "{what}");
        assert!(error.to_string().contains(file), "{what}: {error}");
        assert_eq!(outcome.1.expect("a read is not held up"), 1);
        drop(holder);
    }
    runtime
        .block_on(store.mark(&run(), "b", SystemTime::now()))
        .expect("a change once the holder is gone");
    runtime.shutdown_background();
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Review finding: a late subscriber asking for the whole history gets all
/// of it, in order, even when it holds more messages than a feed buffers
/// (`FEED_CAPACITY`), with no `Resync` and nothing cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_replays_a_history_longer_than_the_feed_buffer() {
    let root = temp_root("longreplay");
    let messages = runstate_core::events::FEED_CAPACITY + 476;
    // One log holds them all (no rotation), so the history is all of them.
    let store = FileStore::open(FileConfig::new(&root).with_status_history(10_000, 16 << 20))
        .await
        .expect("open");
    for i in 1..=messages {
        store
            .publish(&run(), "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    let mut sub = store
        .subscribe(&run(), Replay::All)
        .await
        .expect("subscribe");
    let got = drain(&mut sub, Duration::from_secs(2)).await;
    assert_eq!(got, texts(1..=messages), "the whole history, nothing else");
    // And it follows on.
    store
        .publish(&run(), "wepp", "after")
        .await
        .expect("publish");
    assert_eq!(take_one(&mut sub).await, "after");
    let last = store
        .subscribe(&run(), Replay::Last(messages))
        .await
        .expect("subscribe");
    assert_eq!(take(last, messages).await[messages - 1], "after");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Wave-2 review: a publisher killed in the middle of its write (a line of
/// several pages) leaves a partial line; the next message must still be a
/// line of its own, not glued to it and skipped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_line_left_by_a_killed_publisher_loses_no_later_message() {
    let root = temp_root("partial");
    let store = FileStore::open(FileConfig::new(&root)).await.expect("open");
    store.publish(&run(), "wepp", "m1").await.expect("publish");
    let log = root.join("r/.runstate/status.log");
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("the log");
    std::io::Write::write_all(&mut file, br#"{"id":2,"topic":"wepp","text":"cut sh"#)
        .expect("a partial line");
    store.publish(&run(), "wepp", "m3").await.expect("publish");
    let sub = store
        .subscribe(&run(), Replay::All)
        .await
        .expect("subscribe");
    assert_eq!(take(sub, 2).await, ["m1", "m3"]);
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Wave-2 review: a status log that is a sparse giant (1 TiB of nothing,
/// planted) is read from its tail only: a subscriber gets the messages
/// published after it at once instead of reading every byte before them.
/// And a message counter planted at its end refuses to publish
/// (`Corrupt`) instead of overflowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_giant_status_log_or_counter_at_its_end_is_handled() {
    let root = temp_root("giant");
    let store = FileStore::open(FileConfig::new(&root)).await.expect("open");
    store.publish(&run(), "wepp", "m1").await.expect("publish");
    let log = root.join("r/.runstate/status.log");
    fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("the log")
        .set_len(1 << 40)
        .expect("a sparse giant");
    store
        .publish(&run(), "wepp", "after")
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let sub = store
            .subscribe(&run(), Replay::All)
            .await
            .expect("subscribe");
        take(sub, 1).await
    })
    .await
    .expect("the tail is read, not the whole log");
    assert!(
        got == ["after"] || got == ["RESYNC"],
        "the message after the giant, or a Resync before it: {got:?}"
    );
    fs::remove_file(&log).expect("remove the giant");
    fs::write(
        root.join("r/.runstate/status.seq"),
        format!(r#"{{"next":{},"first":1}}"#, u64::MAX),
    )
    .expect("a counter at its end");
    let error = store
        .publish(&run(), "wepp", "one too many")
        .await
        .expect_err("the counter is at its end");
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    fs::remove_dir_all(&root).expect("cleanup");
}
