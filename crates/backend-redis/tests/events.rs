//! The wave-2 contract on Redis, beyond the conformance suite: what the
//! write scripts announce, waiters woken by releases made elsewhere, fence
//! watermarks, conditional reads and the locked update's round trips,
//! status streams and WEPPcloud-shaped milestones. Each test works under a
//! prefix of its own on the shared server (`RUNSTATE_REDIS_URL`), or on a
//! private server when it restarts one.

mod support;

use std::time::{Duration, Instant, SystemTime};

use runstate_conformance::proxy::Proxy;
use runstate_core::{
    Bytes, DocName, ErrorKind, Fence, Fetched, GetOptions, Lease, Lock, LockExt, LockKey, Owner,
    PutMode, PutOptions, Replay, RunId, StatusEvent, Store, StoreExt, WaitPolicy, WatchEvent,
    Watcher, display_chain,
};
use runstate_redis::{Address, RedisConfig, RedisStore};
use support::OwnRedis;

const URL_VAR: &str = "RUNSTATE_REDIS_URL";

fn shared_url() -> Option<String> {
    runstate_conformance::server_url("redis", URL_VAR, "a Redis events test")
}

fn prefix() -> String {
    format!("rsevents:{:012x}", fastrand::u64(..) >> 16)
}

async fn open(url: &str, prefix: &str) -> RedisStore {
    RedisStore::open(
        RedisConfig::from_url(url)
            .expect("url")
            .with_prefix(prefix)
            .expect("prefix"),
    )
    .await
    .expect("open")
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw connection")
}

fn ids(run: &str, doc: &str) -> (RunId, DocName) {
    (
        RunId::new(run).expect("valid"),
        DocName::new(doc).expect("valid"),
    )
}

/// The next event within 5 s.
async fn next(watch: &mut Watcher) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event within 5 s")
        .expect("the watch stays open")
        .expect("no watch error")
}

fn changed(doc: &DocName, version: &runstate_core::Version) -> WatchEvent {
    WatchEvent::Changed {
        doc: doc.clone(),
        version: version.clone(),
    }
}

fn deleted(doc: &DocName) -> WatchEvent {
    WatchEvent::Deleted { doc: doc.clone() }
}

/// Issue 13 §1: every kind of write, made through ANOTHER store (another
/// connection, as another process), is announced by its own script and
/// seen by the watcher in order: create, conditional update, overwrite,
/// fenced put, save-and-release, a refused write (nothing), delete,
/// delete_run (each document).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_is_announced_in_order() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let (writer, watcher) = (open(&url, &p).await, open(&url, &p).await);
    let (run, ron) = ids("Mica_flume1", "ron");
    let climate = DocName::new("climate").expect("valid");
    let mut watch = watcher.watch(&run).await.expect("watch");

    let v1 = writer
        .put(&run, &ron, Bytes::from_static(b"1"), PutOptions::create())
        .await
        .expect("create");
    let v2 = writer
        .put(
            &run,
            &ron,
            Bytes::from_static(b"2"),
            PutOptions::update(v1.clone()),
        )
        .await
        .expect("update");
    let v3 = writer
        .put_bytes(&run, &ron, Bytes::from_static(b"3"))
        .await
        .expect("overwrite");
    let key = LockKey::Doc(run.clone(), ron.clone());
    let lease = writer
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    let v4 = writer
        .put(
            &run,
            &ron,
            Bytes::from_static(b"4"),
            PutOptions::update(v3.clone()).with_lease(&lease),
        )
        .await
        .expect("fenced put");
    let v5 = writer
        .save_and_release(
            &lease,
            &ron,
            Bytes::from_static(b"5"),
            PutMode::Update(v4.clone()),
        )
        .await
        .expect("save and release");
    let refused = writer
        .put(
            &run,
            &ron,
            Bytes::from_static(b"x"),
            PutOptions::update(v1.clone()),
        )
        .await
        .expect_err("stale version");
    assert_eq!(refused.kind(), ErrorKind::Precondition);
    let c1 = writer
        .put_bytes(&run, &climate, Bytes::from_static(b"c"))
        .await
        .expect("climate");
    assert!(writer.delete(&run, &climate, None).await.expect("delete"));
    let c2 = writer
        .put_bytes(&run, &climate, Bytes::from_static(b"c2"))
        .await
        .expect("climate again");
    assert_eq!(writer.delete_run(&run).await.expect("delete_run"), 2);

    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(next(&mut watch).await);
    }
    let expected = vec![
        changed(&ron, &v1),
        changed(&ron, &v2),
        changed(&ron, &v3),
        changed(&ron, &v4),
        changed(&ron, &v5),
        changed(&climate, &c1),
        deleted(&climate),
        changed(&climate, &c2),
        // delete_run deletes in name order.
        deleted(&climate),
        deleted(&ron),
    ];
    assert_eq!(seen, expected);
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(quiet.is_err(), "nothing else announced: {quiet:?}");
    writer.purge_prefix().await.expect("cleanup");
}

/// Issue 13 §1 (waiters wake on release): a waiter whose backoff is far
/// longer than the test is woken by a release made through ANOTHER store
/// instance (its own connections, its own process-local wake-ups: exactly
/// what another process has), for each way a lease ends: release,
/// save-and-release, break. Before the change, only releases through the
/// same instance woke a waiter, and this one slept out its 20 s backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_by_another_process_wakes_a_waiter() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let (holder, waiter) = (open(&url, &p).await, open(&url, &p).await);
    let (run, doc) = ids("r", "ron");
    let key = LockKey::Doc(run.clone(), doc.clone());
    holder
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("seed");
    // Sleeps of 10 to 20 s between attempts, unless woken.
    let patient = WaitPolicy::with_timeout(Duration::from_secs(60)).with_backoff(
        Duration::from_secs(20),
        Duration::from_secs(20),
        1.0,
    );
    for ending in ["release", "save_and_release", "break_lock"] {
        let lease = holder
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
            .await
            .expect("holder acquires");
        let waiting = {
            let (waiter, key, patient) = (waiter.clone(), key.clone(), patient.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let lease = waiter
                    .acquire(
                        &key,
                        &Owner::for_this_process(),
                        Duration::from_secs(60),
                        &patient,
                    )
                    .await
                    .expect("the waiter gets the lock");
                (lease, started.elapsed())
            })
        };
        // Let the waiter be refused, subscribe and go to sleep.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match ending {
            "release" => holder.release(&lease).await.expect("release"),
            "save_and_release" => {
                holder
                    .save_and_release(&lease, &doc, Bytes::from_static(b"1"), PutMode::Overwrite)
                    .await
                    .expect("save and release");
            }
            _ => {
                holder
                    .break_lock(&key, Some(lease.fence()))
                    .await
                    .expect("break")
                    .expect("broken");
            }
        }
        let (got, waited) = tokio::time::timeout(Duration::from_secs(8), waiting)
            .await
            .unwrap_or_else(|_| panic!("{ending}: the waiter slept through the release"))
            .expect("joined");
        assert!(got.fence() > lease.fence());
        eprintln!("{ending}: the waiter got the lock after {waited:?}");
        waiter.release(&got).await.expect("release");
    }
    holder.purge_prefix().await.expect("cleanup");
}

/// Issue 12 §1 on Redis: the watermark check is in the write's own script
/// (no other round trip), watermarks are per lock and independent of the
/// store's own fence counters, and they are kept by `delete_run` and
/// across a server restart (an append-only file synced on every write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_survive_delete_run_and_restarts() {
    let mut server = OwnRedis::start(true, &[]);
    let proxy = Proxy::start(server.addr()).await;
    let store = RedisStore::open(
        RedisConfig::tcp("127.0.0.1", proxy.addr().port())
            .with_timeout(Duration::from_millis(800))
            .with_connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect("open");
    let (run, doc) = ids("split", "climate");
    let key = LockKey::Doc(run.clone(), doc.clone());
    let foreign = |fence| {
        Lease::new(
            key.clone(),
            Owner::for_this_process(),
            Fence(fence),
            Duration::from_secs(30),
            Instant::now(),
            SystemTime::now(),
        )
    };
    let v0 = store
        .put_bytes(&run, &doc, Bytes::from_static(b"v0"))
        .await
        .expect("seed");
    let turns = proxy.turns();
    let claimed = store
        .claim(&key, Fence(9), Some(&doc), GetOptions::new())
        .await
        .expect("claim")
        .expect("the document");
    assert_eq!(claimed.version, v0);
    assert_eq!(proxy.turns() - turns, 1, "claim and read: one round trip");
    let turns = proxy.turns();
    let error = store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"stale"),
            PutOptions::overwrite().with_foreign_lease(&foreign(5)),
        )
        .await
        .expect_err("below the watermark");
    assert_eq!(error.kind(), ErrorKind::Fenced, "{}", display_chain(&error));
    assert_eq!(
        proxy.turns() - turns,
        1,
        "checked in the write's own script"
    );
    // This store's own grants of the same lock are another matter: their
    // fences are neither raised nor checked by the watermark.
    let own = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(5))
        .await
        .expect("own lease");
    store.release(&own).await.expect("release");

    assert_eq!(store.delete_run(&run).await.expect("delete_run"), 1);
    server.kill();
    server.start_again();
    let mut attempts = 0;
    let error = loop {
        match store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"stale"),
                PutOptions::create().with_foreign_lease(&foreign(8)),
            )
            .await
        {
            Err(e) if e.is_retryable() && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.expect_err("still below the watermark"),
        }
    };
    assert_eq!(error.kind(), ErrorKind::Fenced, "{}", display_chain(&error));
    assert!(store.get_bytes(&run, &doc).await.expect("get").is_none());
    store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"new"),
            PutOptions::create().with_foreign_lease(&foreign(9)),
        )
        .await
        .expect("the current grant writes");
}

/// Issue 12 §2 and the hot path: with a watcher following the run on the
/// same (proxied) store, a locked update is still two round trips (the
/// announcements ride inside the scripts), and a conditional read of an
/// unchanged 512 KiB document is one round trip that sends no bytes of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_cost_no_round_trip_and_unchanged_reads_send_nothing() {
    let Some(url) = shared_url() else { return };
    let Address::Tcp { host, port } = RedisConfig::from_url(&url).expect("url").address().clone()
    else {
        panic!("this test needs a TCP server URL");
    };
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    let proxy = Proxy::start(
        format!("{host}:{port}")
            .parse()
            .expect("a loopback address"),
    )
    .await;
    let p = prefix();
    let store = RedisStore::open(
        RedisConfig::tcp("127.0.0.1", proxy.addr().port())
            .with_db(RedisConfig::from_url(&url).expect("url").db())
            .with_prefix(&p)
            .expect("prefix"),
    )
    .await
    .expect("open");
    let (run, doc) = ids("r", "wepp");
    let big = Bytes::from(vec![b'w'; 512 * 1024]);
    let v1 = store.put_bytes(&run, &doc, big.clone()).await.expect("put");
    let mut watch = store.watch(&run).await.expect("watch");

    let key = LockKey::Doc(run.clone(), doc.clone());
    let turns = proxy.turns();
    let (lease, loaded) = store
        .acquire_and_load(
            &key,
            &doc,
            &Owner::for_this_process(),
            Duration::from_secs(30),
            GetOptions::new(),
        )
        .await
        .expect("acquire and load");
    let loaded = loaded.expect("present");
    let v2 = store
        .save_and_release(&lease, &doc, big.clone(), PutMode::Update(loaded.version))
        .await
        .expect("save and release");
    assert_eq!(
        proxy.turns() - turns,
        2,
        "a locked update is two round trips"
    );
    assert_eq!(next(&mut watch).await, changed(&doc, &v2));

    let (turns, sent) = (proxy.turns(), proxy.bytes_to_client());
    let fetched = store
        .get_if_changed(&run, &doc, &v2, GetOptions::new().with_limit(10))
        .await
        .expect("conditional read");
    assert_eq!(fetched, Fetched::Unchanged);
    assert_eq!(proxy.turns() - turns, 1);
    let reply = proxy.bytes_to_client() - sent;
    assert!(
        reply < 100,
        "an unchanged document is not sent: {reply} bytes"
    );
    match store
        .get_if_changed(&run, &doc, &v1, GetOptions::new())
        .await
        .expect("conditional read")
    {
        Fetched::Changed(stored) => assert_eq!((stored.version, stored.bytes), (v2, big)),
        other => panic!("expected the new version, got {other:?}"),
    }
    store.purge_prefix().await.expect("cleanup");
}

/// Issue 13 §2 on Redis: the history is a capped stream (about
/// `status_history` messages), replayed in order with stream ids as
/// message ids; `Replay::Last(n)` gives the newest `n`; a maximum age drops
/// older messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_history_is_a_capped_stream() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = RedisStore::open(
        RedisConfig::from_url(&format!(
            "{url}{}status_history=10",
            if url.contains('?') { "&" } else { "?" }
        ))
        .expect("url")
        .with_prefix(&p)
        .expect("prefix"),
    )
    .await
    .expect("open");
    let run = RunId::new("chatty").expect("valid");
    for i in 0..500 {
        store
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    let mut con = raw(&url).await;
    let kept: usize = redis::cmd("XLEN")
        .arg(format!("{p}:{{chatty}}:status"))
        .query_async(&mut con)
        .await
        .expect("XLEN");
    // MAXLEN ~ trims whole stream nodes (100 entries by default).
    assert!((10..=110).contains(&kept), "kept {kept}");
    let mut all = store.subscribe(&run, Replay::All).await.expect("subscribe");
    let mut replayed = Vec::new();
    while replayed.len() < kept {
        match tokio::time::timeout(Duration::from_secs(3), all.next()).await {
            Ok(Some(Ok(StatusEvent::Message(m)))) => replayed.push(m),
            other => panic!("replay stopped: {other:?}"),
        }
    }
    let texts: Vec<String> = replayed.iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (500 - kept..500).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "the newest, in order");
    let raw_ids: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{p}:{{chatty}}:status"))
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    assert_eq!(
        replayed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        raw_ids.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        "message ids are stream ids"
    );
    assert_eq!(raw_ids[0].1["topic"], "wepp");

    // A maximum age, exact: older messages go when the next is published.
    let aging = RedisStore::open(
        RedisConfig::from_url(&url)
            .expect("url")
            .with_prefix(&p)
            .expect("prefix")
            .with_status_history(1000, Some(Duration::from_millis(300)))
            .expect("history"),
    )
    .await
    .expect("open");
    let run = RunId::new("aging").expect("valid");
    aging.publish(&run, "wepp", "old").await.expect("publish");
    tokio::time::sleep(Duration::from_millis(600)).await;
    aging.publish(&run, "wepp", "new").await.expect("publish");
    let mut last = aging
        .subscribe(&run, Replay::Last(5))
        .await
        .expect("subscribe");
    match tokio::time::timeout(Duration::from_secs(3), last.next()).await {
        Ok(Some(Ok(StatusEvent::Message(m)))) => assert_eq!(m.text, "new"),
        other => panic!("expected the new message only: {other:?}"),
    }
    let more = tokio::time::timeout(Duration::from_millis(300), last.next()).await;
    assert!(more.is_err(), "the old message was trimmed: {more:?}");
    store.purge_prefix().await.expect("cleanup");
}

/// A subscription replays the whole history the stream keeps. With the
/// default settings it keeps up to 1,099 messages (`MAXLEN ~ 1000` trims
/// whole nodes of 100), more than a feed's buffer of 1,024: the replay was
/// pushed into that buffer at once, so its newest messages were dropped for
/// a `Resync`. A replay of more messages than a stream can hold
/// (`usize::MAX`) is all of them, not a refused count.
#[tokio::test]
async fn a_whole_default_history_is_replayed() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open(&url, &p).await;
    let run = RunId::new("long").expect("valid");
    for i in 0..1090 {
        store
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    for replay in [Replay::All, Replay::Last(usize::MAX)] {
        let mut all = store.subscribe(&run, replay).await.expect("subscribe");
        for i in 0..1090 {
            match tokio::time::timeout(Duration::from_secs(3), all.next()).await {
                Ok(Some(Ok(StatusEvent::Message(m)))) => assert_eq!(m.text, format!("m{i}")),
                other => panic!("{replay:?}, message {i}: {other:?}"),
            }
        }
    }
    let error = store
        .set_attr(&run, "bad name", "v")
        .await
        .expect_err("a bad attribute name");
    assert_eq!(error.operation(), Some(runstate_core::Operation::SetAttr));
    store.purge_prefix().await.expect("cleanup");
}

/// Issue 13 §3 on Redis: milestones are WEPPcloud's per-run hash fields
/// (`timestamps:<task>` in epoch seconds, `attrs:<name>`), so fields written
/// by WEPPcloud read back and ours read in WEPPcloud; other fields of the
/// hash are left alone; `delete_run` deletes the hash with the documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milestones_are_weppclouds_hash_fields() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open(&url, &p).await;
    let (run, doc) = ids("Mica_flume1", "ron");
    let hash = format!("{p}:{{Mica_flume1}}:milestones");
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_250);
    store.mark(&run, "build_climate", at).await.expect("mark");
    store
        .set_attr(&run, "has_sbs", "false")
        .await
        .expect("attr");
    let mut con = raw(&url).await;
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&hash)
        .query_async(&mut con)
        .await
        .expect("HGETALL");
    assert_eq!(fields["timestamps:build_climate"], "1795000000.25");
    assert_eq!(fields["attrs:has_sbs"], "false");
    // As WEPPcloud writes them (Python's time.time()), and a field of its
    // own that is not a milestone.
    let _: i64 = redis::cmd("HSET")
        .arg(&hash)
        .arg("timestamps:run_wepp")
        .arg("1795000100.5")
        .arg("locked:climate.nodb")
        .arg("true")
        .query_async(&mut con)
        .await
        .expect("HSET");
    let got = store.milestones(&run).await.expect("milestones");
    assert_eq!(got.timestamps.len(), 2);
    assert_eq!(got.timestamps["build_climate"], at);
    assert_eq!(
        got.timestamps["run_wepp"],
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_100_500)
    );
    assert_eq!(got.attrs.len(), 1);
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"{}"))
        .await
        .expect("put");
    store.publish(&run, "wepp", "done").await.expect("publish");
    store.delete_run(&run).await.expect("delete_run");
    assert_eq!(
        store.milestones(&run).await.expect("milestones"),
        runstate_core::Milestones::default(),
        "deleted with the run"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&hash)
        .arg(format!("{p}:{{Mica_flume1}}:status"))
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "milestones and status history go with the run");
    store.purge_prefix().await.expect("cleanup");
}

/// A dropped watcher or subscription stops following: its channel is
/// unsubscribed (after the listener's linger), and dropping the store with
/// it closes the listener's connection (a private server, so the pub/sub
/// clients counted are this store's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_feeds_and_stores_leave_no_listener_behind() {
    let server = OwnRedis::start(false, &[]);
    let store = RedisStore::connect(&server.url()).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let watch = store.watch(&run).await.expect("watch");
    let sub = store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    let numsub = |channel: &str| {
        let reply = server.command(&["PUBSUB", "NUMSUB", channel]);
        // *2 $<n> <channel> :<count>
        reply
            .rsplit(':')
            .next()
            .and_then(|n| n.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let pubsub_clients = || {
        server
            .command(&["CLIENT", "LIST", "TYPE", "pubsub"])
            .matches("id=")
            .count()
    };
    assert_eq!(numsub("runstate:{r}:events"), 1);
    assert_eq!(numsub("runstate:{r}:status:live"), 1);
    assert_eq!(pubsub_clients(), 1, "one listener connection for both");
    drop(watch);
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(20);
    while numsub("runstate:{r}:events") + numsub("runstate:{r}:status:live") > 0 {
        assert!(
            Instant::now() < deadline,
            "still subscribed after the linger"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let watch = store.watch(&run).await.expect("watch again");
    drop(store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pubsub_clients(), 1, "a live watcher keeps the listener");
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pubsub_clients() > 0 {
        assert!(
            Instant::now() < deadline,
            "the listener outlived its store and feeds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
