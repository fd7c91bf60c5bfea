//! Split-store fencing, conditional reads, watches, status messages and
//! milestones on each database, beyond the conformance cases: atomicity of
//! a claim with saves under foreign leases, round trips and bytes on the
//! wire, PostgreSQL's `NOTIFY` (every write reported, nothing for refused
//! writes, waiters woken by other processes' releases, the listener closed
//! with its last feed), the status history's trim and gaps, upgrades of
//! stores made before these tables, and what `delete_run` keeps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use runstate_conformance::proxy::Proxy;
use runstate_core::{
    Bytes, DocName, ErrorKind, Fence, Fetched, GetOptions, Lease, Lock, LockExt, LockKey, Owner,
    PutMode, PutOptions, Replay, RunId, StatusEvent, Store, StoreExt, Version, WaitPolicy,
    WatchEvent, WatchMode, display_chain,
};
use runstate_sql::{Dialect, SqlConfig, SqlStore};
use sqlx::{AnyConnection, Connection, Executor, Row};

const TTL: Duration = Duration::from_secs(60);

fn prefix() -> String {
    format!("ev{:x}_", fastrand::u32(..))
}

/// The URL of a server of `dialect`, or a fresh SQLite file; `None` when
/// the server is not configured (and not required).
fn url(dialect: Dialect) -> Option<String> {
    match dialect {
        Dialect::Postgres => {
            runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "an events test")
        }
        Dialect::MySql => {
            runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "an events test")
        }
        _ => Some(format!(
            "sqlite://{}",
            std::env::temp_dir()
                .join(format!(
                    "runstate-events-{}-{:x}.db",
                    std::process::id(),
                    fastrand::u64(..)
                ))
                .display()
        )),
    }
}

async fn open_config(config: SqlConfig) -> SqlStore {
    SqlStore::open(config)
        .await
        .unwrap_or_else(|e| panic!("open: {}", display_chain(&e)))
}

fn config(url: &str, prefix: &str) -> SqlConfig {
    SqlConfig::from_url(url)
        .expect("url")
        .with_prefix(prefix)
        .expect("prefix")
}

async fn open(url: &str, prefix: &str) -> SqlStore {
    open_config(config(url, prefix)).await
}

async fn cleanup(store: &SqlStore, url: &str) {
    store.uninstall().await.expect("drop");
    store.close().await;
    if let Some(path) = url.strip_prefix("sqlite://") {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}

/// A store whose every connection goes through a proxy in front of the
/// server of `url`.
async fn through_proxy(url: &str, prefix: &str) -> (Proxy, SqlStore) {
    let mut parsed = url::Url::parse(url).expect("url");
    let host = parsed.host_str().expect("a host").to_owned();
    let port = parsed.port().expect("a port");
    let upstream: SocketAddr = format!("{host}:{port}")
        .parse()
        .expect("a loopback address");
    let proxy = Proxy::start(upstream).await;
    parsed.set_port(Some(proxy.addr().port())).expect("port");
    let store = open(parsed.as_str(), prefix).await;
    (proxy, store)
}

async fn raw(url: &str) -> AnyConnection {
    sqlx::any::install_default_drivers();
    AnyConnection::connect(url).await.expect("a raw connection")
}

async fn raw_run(conn: &mut AnyConnection, sql: String) {
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn raw_count(conn: &mut AnyConnection, sql: String) -> i64 {
    let row = conn
        .fetch_one(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.try_get::<i64, _>(0).expect("a number")
}

fn ids() -> (RunId, DocName, LockKey) {
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("d").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    (run, doc, key)
}

/// A lease as another lock service would grant it.
fn foreign(key: &LockKey, fence: u64) -> Lease {
    Lease::new(
        key.clone(),
        Owner::for_this_process(),
        Fence(fence),
        TTL,
        Instant::now(),
        SystemTime::now(),
    )
}

macro_rules! each_dialect {
    ($body:ident: $($name:ident => $dialect:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $body($dialect).await;
            }
        )*
    };
}

/// Issue 12 §1: a claim raises the watermark and then reads, atomically
/// with saves under foreign leases. A save with fence `f` races a claim
/// of `f + 1`: if the save succeeded, it came before the claim's raise,
/// so the claim read what it wrote; a save after the raise is `Fenced`.
async fn claim_is_atomic_with_foreign_saves(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let store = open(&url, &prefix()).await;
    let (run, doc, key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("seed");
    let (mut saved, mut fenced) = (0, 0);
    for f in 1..=60u64 {
        let save = {
            let (store, run, doc, lease) =
                (store.clone(), run.clone(), doc.clone(), foreign(&key, f));
            tokio::spawn(async move {
                store
                    .put(
                        &run,
                        &doc,
                        Bytes::from(f.to_string()),
                        PutOptions::overwrite().with_foreign_lease(&lease),
                    )
                    .await
            })
        };
        let claim = {
            let (store, key, doc) = (store.clone(), key.clone(), doc.clone());
            tokio::spawn(async move {
                store
                    .claim(&key, Fence(f + 1), Some(&doc), GetOptions::new())
                    .await
            })
        };
        let claimed = claim
            .await
            .expect("joined")
            .unwrap_or_else(|e| panic!("claim {}: {}", f + 1, display_chain(&e)))
            .expect("the document");
        match save.await.expect("joined") {
            Ok(version) => {
                saved += 1;
                assert_eq!(
                    claimed.version,
                    version,
                    "fence {f}: a save that succeeded must precede the claim of {}",
                    f + 1
                );
            }
            Err(e) if e.kind() == ErrorKind::Fenced => fenced += 1,
            Err(e) => panic!("fence {f}: {}", display_chain(&e)),
        }
    }
    eprintln!("{dialect}: saved before the claim {saved}, fenced after it {fenced}");
    cleanup(&store, &url).await;
}

each_dialect!(claim_is_atomic_with_foreign_saves:
    postgres_claim_is_atomic_with_foreign_saves => Dialect::Postgres,
    mysql_claim_is_atomic_with_foreign_saves => Dialect::MySql,
    sqlite_claim_is_atomic_with_foreign_saves => Dialect::Sqlite,
);

/// Issue 12: a claim (raise and read), a save under a foreign lease, a
/// conditional read, a status message, a mark are each one round trip on
/// the server databases; a conditional read of an unchanged 1 MiB
/// document does not move it, and a claim refused moves no document.
async fn one_round_trip_each(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let (proxy, store) = through_proxy(&url, &prefix()).await;
    let (run, doc, key) = ids();
    const MIB: usize = 1 << 20;
    let v0 = store
        .put_bytes(&run, &doc, Bytes::from(vec![3u8; MIB]))
        .await
        .expect("seed");
    // Warm the pool: the statements are prepared on its connection.
    store
        .claim(&key, Fence(1), Some(&doc), GetOptions::new())
        .await
        .expect("warm claim");
    store
        .get_if_changed(&run, &doc, &v0, GetOptions::new())
        .await
        .expect("warm check");
    store.publish(&run, "warm", "up").await.expect("warm");
    store
        .mark(&run, "warm", SystemTime::now())
        .await
        .expect("warm");
    let lease = foreign(&key, 2);
    let v1 = store
        .put(
            &run,
            &doc,
            Bytes::from(vec![4u8; MIB]),
            PutOptions::update(v0).with_foreign_lease(&lease),
        )
        .await
        .expect("warm save");

    let turns = |label: &str, before: u64| {
        let spent = proxy.turns() - before;
        assert_eq!(spent, 1, "{label} is one round trip on {dialect}");
    };
    let before = proxy.turns();
    let claimed = store
        .claim(&key, Fence(3), Some(&doc), GetOptions::new())
        .await
        .expect("claim")
        .expect("present");
    assert_eq!(claimed.version, v1);
    turns("a claim that reads", before);

    let before = proxy.turns();
    let v2 = store
        .put(
            &run,
            &doc,
            Bytes::from(vec![5u8; MIB]),
            PutOptions::update(v1).with_foreign_lease(&foreign(&key, 3)),
        )
        .await
        .expect("save");
    turns("a save under a foreign lease", before);

    let (before, moved) = (proxy.turns(), proxy.bytes_to_client());
    assert_eq!(
        store
            .get_if_changed(&run, &doc, &v2, GetOptions::new())
            .await
            .expect("check"),
        Fetched::Unchanged
    );
    turns("a conditional read", before);
    let moved = proxy.bytes_to_client() - moved;
    assert!(
        moved < 4096,
        "an unchanged document is not sent: {moved} bytes"
    );

    let (before, moved) = (proxy.turns(), proxy.bytes_to_client());
    let error = store
        .claim(&key, Fence(2), Some(&doc), GetOptions::new())
        .await
        .expect_err("below the watermark");
    assert_eq!(error.kind(), ErrorKind::Fenced);
    turns("a refused claim", before);
    let moved = proxy.bytes_to_client() - moved;
    assert!(
        moved < 4096,
        "a refused claim sends no document: {moved} bytes"
    );

    let before = proxy.turns();
    store
        .publish(&run, "wepp", "step 1")
        .await
        .expect("publish");
    turns("a status message", before);
    let before = proxy.turns();
    store
        .mark(&run, "build_climate", SystemTime::now())
        .await
        .expect("mark");
    turns("a milestone", before);
    let before = proxy.turns();
    store
        .set_attr(&run, "has_sbs", "false")
        .await
        .expect("attr");
    turns("an attribute", before);
    store.uninstall().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_round_trip_each() {
    one_round_trip_each(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_one_round_trip_each() {
    one_round_trip_each(Dialect::MySql).await;
}

/// Issue 13 §1: `NOTIFY` is sent by the writing statement itself and only
/// when it commits: every acknowledged write is reported, in order, with
/// its version, without a `Resync`; refused writes (a stale version, an
/// existing document, a stale lease, a lease below the watermark) report
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_watch_reports_exactly_the_committed_writes() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let store = open(&url, &prefix()).await;
    assert_eq!(
        store.capabilities().watch,
        WatchMode::Native { every_write: true }
    );
    let (run, doc, key) = ids();
    let other_run = RunId::new("other").expect("valid");
    let mut watch = store.watch(&run).await.expect("watch");
    let mut written = Vec::new();
    let v0 = store
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("put");
    written.push(WatchEvent::Changed {
        doc: doc.clone(),
        version: v0.clone(),
    });
    // Refused: nothing to report.
    let stale = Version::new("1");
    assert!(
        store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"x"),
                PutOptions::update(stale.clone())
            )
            .await
            .is_err()
    );
    assert!(
        store
            .put(&run, &doc, Bytes::from_static(b"x"), PutOptions::create())
            .await
            .is_err()
    );
    assert!(store.delete(&run, &doc, Some(&stale)).await.is_err());
    store
        .claim(&key, Fence(10), None, GetOptions::new())
        .await
        .expect("claim");
    assert!(
        store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"x"),
                PutOptions::overwrite().with_foreign_lease(&foreign(&key, 9)),
            )
            .await
            .is_err()
    );
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("acquire");
    store.break_lock(&key, None).await.expect("break");
    assert!(
        store
            .save_and_release(&lease, &doc, Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
            .is_err()
    );
    // Another run's writes are not this run's.
    store
        .put_bytes(&other_run, &doc, Bytes::from_static(b"theirs"))
        .await
        .expect("put");
    // Accepted, by every path that writes.
    let mut version = v0;
    for i in 0..5 {
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), TTL)
            .await
            .expect("acquire");
        version = store
            .save_and_release(
                &lease,
                &doc,
                Bytes::from(format!("locked {i}")),
                PutMode::Update(version),
            )
            .await
            .expect("save");
        written.push(WatchEvent::Changed {
            doc: doc.clone(),
            version: version.clone(),
        });
        version = store
            .put(
                &run,
                &doc,
                Bytes::from(format!("foreign {i}")),
                PutOptions::update(version).with_foreign_lease(&foreign(&key, 10 + i)),
            )
            .await
            .expect("foreign save");
        written.push(WatchEvent::Changed {
            doc: doc.clone(),
            version: version.clone(),
        });
    }
    let second = DocName::new("e").expect("valid");
    let v = store
        .put(
            &run,
            &second,
            Bytes::from_static(b"e"),
            PutOptions::create(),
        )
        .await
        .expect("create");
    written.push(WatchEvent::Changed {
        doc: second.clone(),
        version: v,
    });
    assert!(store.delete(&run, &doc, None).await.expect("delete"));
    written.push(WatchEvent::Deleted { doc: doc.clone() });
    assert_eq!(store.delete_run(&run).await.expect("delete run"), 1);
    written.push(WatchEvent::Deleted { doc: second });

    let mut seen = Vec::new();
    while seen.len() < written.len() {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(Ok(event))) => seen.push(event),
            other => panic!("after {seen:?}: {other:?}"),
        }
    }
    assert_eq!(
        seen, written,
        "every committed write, in order, nothing else"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err(),
        "nothing more"
    );
    cleanup(&store, &url).await;
}

/// Issue 13 §1 (waiters wake on release): a waiter in one store (another
/// process, as far as this store's local signals go) is woken by a
/// release, a save-and-release or a break made through another, long
/// before its `max`; before `NOTIFY` it slept all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiter_is_woken_by_another_stores_release() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let prefix = prefix();
    let holder = open(&url, &prefix).await;
    let waiter = open(&url, &prefix).await;
    let (_run, doc, key) = ids();
    const MAX: Duration = Duration::from_secs(30);
    for how in ["release", "save_and_release", "break_lock"] {
        let lease = holder
            .try_acquire(&key, &Owner::for_this_process(), TTL)
            .await
            .expect("acquire");
        // Once the waiter's listener listens, its wait is sure to hear.
        drop(
            waiter
                .watch(&RunId::new("warm").expect("valid"))
                .await
                .expect("watch"),
        );
        let waiting = {
            let (waiter, key) = (waiter.clone(), key.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                waiter.wait_for_release(&key, MAX).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        match how {
            "release" => holder.release(&lease).await.expect("release"),
            "save_and_release" => drop(
                holder
                    .save_and_release(&lease, &doc, Bytes::from_static(b"x"), PutMode::Overwrite)
                    .await
                    .expect("save"),
            ),
            _ => drop(holder.break_lock(&key, None).await.expect("break")),
        }
        let waited = waiting.await.expect("joined");
        assert!(
            waited < MAX / 3,
            "{how} in another store woke the waiter (waited {waited:?} of {MAX:?})"
        );
    }
    holder.close().await;
    cleanup(&waiter, &url).await;
}

/// Issue 13 (waiters wake on release): a waiter whose lock is held
/// through the same store waits for that holder's release without asking
/// the database: one acquire for the holder, one for the waiter, however
/// long the holder works. Before, it asked at every backoff step (and in
/// SQLite each refused ask during the holder's save slept in SQLite's busy
/// handler).
async fn a_waiter_behind_a_holder_of_this_store_asks_once(dialect: Dialect) {
    let Some(url) = url(dialect) else {
        return;
    };
    let store = open(&url, &prefix()).await;
    let (_run, doc, key) = ids();
    runstate_conformance::check_a_local_waiter_asks_once(Arc::new(store.clone()), &key, &doc, TTL)
        .await;
    cleanup(&store, &url).await;
}

each_dialect!(a_waiter_behind_a_holder_of_this_store_asks_once:
    postgres_a_waiter_behind_a_holder_of_this_store_asks_once => Dialect::Postgres,
    mysql_a_waiter_behind_a_holder_of_this_store_asks_once => Dialect::MySql,
    sqlite_a_waiter_behind_a_holder_of_this_store_asks_once => Dialect::Sqlite,
);

/// Issue 13: a release announced on the channel (`NOTIFY`) does not end
/// the wait of a waiter whose lock is held through the same store: it may
/// be the late echo of the release that handed the lock to that holder,
/// and a holder of this store is released through it. (Taken for a
/// release, it sent the waiter asking, refused, while the holder worked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_announced_release_does_not_end_a_local_wait() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let counting = Arc::new(runstate_conformance::CountingLock::new(Arc::new(
        store.clone(),
    )));
    let (run, doc, key) = ids();
    // The store listens while this watch lives.
    let _watch = store.watch(&run).await.expect("watch");
    let lease = counting
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("holder");
    let waiting = {
        let (counting, key) = (Arc::clone(&counting), key.clone());
        tokio::spawn(async move {
            counting
                .acquire(
                    &key,
                    &Owner::for_this_process(),
                    TTL,
                    &WaitPolicy::with_timeout(Duration::from_secs(600)).with_backoff(
                        Duration::from_millis(1),
                        Duration::from_secs(600),
                        2.0,
                    ),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // What the previous holder's release announced, arriving late.
    let mut conn = raw(&url).await;
    raw_run(
        &mut conn,
        format!("SELECT pg_notify('{prefix}events', 'r {run} {doc}')"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counting.counts.acquires.load(Ordering::SeqCst),
        1,
        "the waiter asked while the holder of this store worked"
    );
    counting.release(&lease).await.expect("release");
    let next = waiting.await.expect("joined").expect("the waiter's turn");
    assert!(next.fence() > lease.fence());
    assert_eq!(counting.counts.acquires.load(Ordering::SeqCst), 2);
    counting.release(&next).await.expect("release");
    drop(conn);
    cleanup(&store, &url).await;
}

/// Issue 13: a dropped watch or subscription stops its share of the
/// listener; once the last is gone (and the linger passed) the listening
/// connection is closed: nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropped_feeds_close_the_listener() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let mut admin = raw(&url).await;
    let listening = format!(
        "SELECT count(*)::bigint FROM pg_stat_activity WHERE query LIKE 'LISTEN%{prefix}events%'"
    );
    let (run, _doc, _key) = ids();
    let watch = store.watch(&run).await.expect("watch");
    let sub = store.subscribe(&run, Replay::All).await.expect("subscribe");
    let second = store.watch(&run).await.expect("watch");
    assert_eq!(
        raw_count(&mut admin, listening.clone()).await,
        1,
        "one listening connection, shared"
    );
    drop(watch);
    drop(sub);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        raw_count(&mut admin, listening.clone()).await,
        1,
        "still listening for the remaining watch"
    );
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw_count(&mut admin, listening.clone()).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the listener outlived its last feed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And comes back for the next one.
    let mut watch = store.watch(&run).await.expect("watch again");
    let v = store
        .put_bytes(
            &run,
            &DocName::new("x").expect("valid"),
            Bytes::from_static(b"x"),
        )
        .await
        .expect("put");
    match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        Ok(Some(Ok(WatchEvent::Changed { version, .. }))) => assert_eq!(version, v),
        other => panic!("{other:?}"),
    }
    let _ = admin.close().await;
    cleanup(&store, &url).await;
}

/// Issue 13 §2: the history keeps the newest `status_history` messages; a
/// subscriber whose next messages were trimmed before it read them gets a
/// `Resync`, then the messages still there, in order.
async fn status_history_is_trimmed_and_gaps_resync(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let store = open_config(
        config(&url, &prefix())
            .with_status_history(5)
            .with_watch_interval(Duration::from_secs(3)),
    )
    .await;
    let (run, _doc, _key) = ids();
    store.publish(&run, "wepp", "m0").await.expect("publish");
    let mut live = store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    // Its follower reads once at once, then every 3 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=12 {
        store
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    let mut all = store.subscribe(&run, Replay::All).await.expect("subscribe");
    assert_eq!(
        status_texts(&mut all, 5, Duration::from_secs(5)).await,
        ["m8", "m9", "m10", "m11", "m12"]
    );
    if dialect != Dialect::Postgres {
        // The follower polls every 3 s: by then m1..m7 were trimmed.
        assert_eq!(
            status_texts(&mut live, 6, Duration::from_secs(10)).await,
            ["RESYNC", "m8", "m9", "m10", "m11", "m12"],
            "a gap is marked"
        );
    }
    cleanup(&store, &url).await;
}

each_dialect!(status_history_is_trimmed_and_gaps_resync:
    postgres_status_history_is_trimmed => Dialect::Postgres,
    mysql_status_history_is_trimmed_and_gaps_resync => Dialect::MySql,
    sqlite_status_history_is_trimmed_and_gaps_resync => Dialect::Sqlite,
);

/// The texts of the next `n` events of `sub` (`RESYNC` for a gap), or of
/// those that came each within `within` of the last.
async fn status_texts(
    sub: &mut runstate_core::Subscription,
    n: usize,
    within: Duration,
) -> Vec<String> {
    let mut texts = Vec::with_capacity(n);
    while texts.len() < n {
        let Ok(event) = tokio::time::timeout(within, sub.next()).await else {
            break;
        };
        let event = event.expect("open").expect("no error");
        texts.push(match event {
            StatusEvent::Message(m) => m.text,
            _ => "RESYNC".to_owned(),
        });
    }
    texts
}

/// Review finding: a history kept longer than a feed buffers
/// (`status_history` past `FEED_CAPACITY`) is replayed whole to a
/// subscriber that reads only once it is all there, then followed; the
/// replay was pushed into a feed of `FEED_CAPACITY`, so the newest
/// messages were dropped for a `Resync`. The room comes from the rows, not
/// from the reader's own `status_history`.
async fn a_history_longer_than_the_feed_buffer_is_replayed_whole(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let store = open_config(config(&url, &prefix).with_status_history(5_000)).await;
    let (run, _doc, _key) = ids();
    let count = runstate_core::events::FEED_CAPACITY + 200;
    for i in 1..=count {
        store
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    let expected: Vec<String> = (1..=count).map(|i| format!("m{i}")).collect();
    let mut all = store.subscribe(&run, Replay::All).await.expect("subscribe");
    // Everything is read from the table before the first `next`.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_texts(&mut all, count, Duration::from_secs(5)).await,
        expected,
        "the whole history"
    );
    // And it follows on.
    store.publish(&run, "wepp", "after").await.expect("publish");
    assert_eq!(
        status_texts(&mut all, 1, Duration::from_secs(5)).await,
        ["after"]
    );
    let mut last = store
        .subscribe(&run, Replay::Last(count))
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut newest = expected[1..].to_vec();
    newest.push("after".to_owned());
    assert_eq!(
        status_texts(&mut last, count, Duration::from_secs(5)).await,
        newest,
        "the last {count}"
    );
    // A reader that keeps a shorter history (set lower since, or another
    // process's setting) still gets every row there is: rows are trimmed
    // only at the run's next publish.
    let reader = open_config(config(&url, &prefix).with_status_history(100)).await;
    let mut all = reader
        .subscribe(&run, Replay::All)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_texts(&mut all, count + 1, Duration::from_secs(5)).await,
        [expected, vec!["after".to_owned()]].concat(),
        "every row, whatever the reader's own setting"
    );
    cleanup(&store, &url).await;
}

each_dialect!(a_history_longer_than_the_feed_buffer_is_replayed_whole:
    postgres_a_history_longer_than_the_feed_buffer_is_replayed_whole => Dialect::Postgres,
    mysql_a_history_longer_than_the_feed_buffer_is_replayed_whole => Dialect::MySql,
    sqlite_a_history_longer_than_the_feed_buffer_is_replayed_whole => Dialect::Sqlite,
);

/// Review finding: the room for a replay was first counted from every
/// message the run ever had rather than the rows kept, so a reader that
/// stopped reading a long-lived run buffered everything published after it
/// (up to millions of messages) instead of getting a `Resync` once its
/// buffer was full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_of_a_long_lived_run_gets_resync() {
    let Some(url) = url(Dialect::Sqlite) else {
        return;
    };
    let prefix = prefix();
    let buffer = runstate_core::events::FEED_CAPACITY;
    // A run with many messages, 5 of them kept.
    let trimming = open_config(config(&url, &prefix).with_status_history(5)).await;
    let (run, _doc, _key) = ids();
    for i in 1..=buffer + 100 {
        trimming
            .publish(&run, "wepp", &format!("old{i}"))
            .await
            .expect("publish");
    }
    let reader = open_config(
        config(&url, &prefix)
            .with_status_history(5)
            .with_watch_interval(Duration::from_millis(50)),
    )
    .await;
    let mut all = reader
        .subscribe(&run, Replay::All)
        .await
        .expect("subscribe");
    // More than a buffer's worth, kept whole, while the reader reads none.
    let keeping = open_config(config(&url, &prefix).with_status_history(100_000)).await;
    let more = buffer + 200;
    for i in 1..=more {
        keeping
            .publish(&run, "wepp", &format!("new{i}"))
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let texts = status_texts(&mut all, 5 + more + 1, Duration::from_secs(5)).await;
    assert!(
        texts.iter().any(|t| t == "RESYNC"),
        "a stalled reader gets a Resync; it got {} messages",
        texts.len()
    );
    assert!(texts.len() <= 5 + buffer + 2, "{} buffered", texts.len());
    cleanup(&keeping, &url).await;
}

/// `delete_run` deletes the run's milestones and attributes with its
/// documents, keeps its status history and its fence watermarks (a stale
/// holder stays fenced after the run is deleted and created again).
async fn delete_run_keeps_what_it_should(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let store = open(&url, &prefix()).await;
    let (run, doc, key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    store
        .claim(&key, Fence(7), Some(&doc), GetOptions::new())
        .await
        .expect("claim");
    store
        .mark(&run, "build_climate", SystemTime::now())
        .await
        .expect("mark");
    store.set_attr(&run, "has_sbs", "true").await.expect("attr");
    store.publish(&run, "wepp", "done").await.expect("publish");
    assert_eq!(store.delete_run(&run).await.expect("delete"), 1);
    assert_eq!(
        store.milestones(&run).await.expect("milestones"),
        runstate_core::Milestones::default()
    );
    let error = store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"stale"),
            PutOptions::create().with_foreign_lease(&foreign(&key, 6)),
        )
        .await
        .expect_err("the watermark survived");
    assert_eq!(error.kind(), ErrorKind::Fenced);
    let mut history = store.subscribe(&run, Replay::All).await.expect("subscribe");
    match tokio::time::timeout(Duration::from_secs(5), history.next()).await {
        Ok(Some(Ok(StatusEvent::Message(m)))) => assert_eq!(m.text, "done"),
        other => panic!("the history is kept: {other:?}"),
    }
    cleanup(&store, &url).await;
}

each_dialect!(delete_run_keeps_what_it_should:
    postgres_delete_run_keeps_what_it_should => Dialect::Postgres,
    mysql_delete_run_keeps_what_it_should => Dialect::MySql,
    sqlite_delete_run_keeps_what_it_should => Dialect::Sqlite,
);

/// Milestones keep a timestamp to the nanosecond, and read WEPPcloud's
/// `time.time()` strings (seconds with a fraction) written by others.
async fn milestone_timestamps_round_trip(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let (run, _doc, _key) = ids();
    let at = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789);
    store.mark(&run, "build_climate", at).await.expect("mark");
    let mut conn = raw(&url).await;
    raw_run(
        &mut conn,
        format!(
            "INSERT INTO {prefix}milestones (run, kind, name, value) \
             VALUES ('r', 'timestamps', 'run_wepp', '1795000100.5')"
        ),
    )
    .await;
    let _ = conn.close().await;
    let got = store.milestones(&run).await.expect("milestones");
    assert_eq!(got.timestamps["build_climate"], at);
    assert_eq!(
        got.timestamps["run_wepp"],
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_100_500)
    );
    let error = store
        .mark(
            &run,
            "ancient",
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
        )
        .await
        .expect_err("before 1970");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    let long = "é".repeat(30_000);
    store
        .set_attr(&run, "notes", &long)
        .await
        .expect("60 kB of UTF-8");
    assert_eq!(
        store.milestones(&run).await.expect("milestones").attrs["notes"],
        long
    );
    cleanup(&store, &url).await;
}

each_dialect!(milestone_timestamps_round_trip:
    postgres_milestone_timestamps_round_trip => Dialect::Postgres,
    mysql_milestone_timestamps_round_trip => Dialect::MySql,
    sqlite_milestone_timestamps_round_trip => Dialect::Sqlite,
);

/// A store made before the events migration (its record and tables
/// removed, as they were then) is upgraded in place on open: documents
/// kept, the new features work.
async fn old_store_is_upgraded(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let (run, doc, key) = ids();
    let v = store
        .put_bytes(&run, &doc, Bytes::from_static(b"kept"))
        .await
        .expect("put");
    store.close().await;
    let latest = match dialect {
        Dialect::MySql => 3,
        _ => 2,
    };
    let mut conn = raw(&url).await;
    for table in ["watermarks", "status", "status_seq", "milestones"] {
        raw_run(&mut conn, format!("DROP TABLE {prefix}{table}")).await;
    }
    if dialect == Dialect::MySql {
        for procedure in ["claim", "foreign_put", "publish"] {
            raw_run(&mut conn, format!("DROP PROCEDURE {prefix}{procedure}")).await;
        }
    }
    raw_run(
        &mut conn,
        format!("DELETE FROM {prefix}schema_migrations WHERE version = {latest}"),
    )
    .await;
    let error = SqlStore::open(config(&url, &prefix).with_migrate(false))
        .await
        .expect("the old schema opens")
        .claim(&key, Fence(1), Some(&doc), GetOptions::new())
        .await
        .expect_err("no watermarks before the migration");
    assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
    let store = open(&url, &prefix).await;
    assert_eq!(
        raw_count(
            &mut conn,
            format!("SELECT CAST(MAX(version) AS SIGNED) FROM {prefix}schema_migrations").replace(
                "AS SIGNED",
                if dialect == Dialect::MySql {
                    "AS SIGNED"
                } else {
                    "AS BIGINT"
                }
            ),
        )
        .await,
        latest
    );
    let _ = conn.close().await;
    let claimed = store
        .claim(&key, Fence(1), Some(&doc), GetOptions::new())
        .await
        .expect("claim")
        .expect("kept");
    assert_eq!(claimed.version, v);
    store.publish(&run, "wepp", "after").await.expect("publish");
    store.set_attr(&run, "a", "b").await.expect("attr");
    cleanup(&store, &url).await;
}

each_dialect!(old_store_is_upgraded:
    postgres_old_store_is_upgraded => Dialect::Postgres,
    mysql_old_store_is_upgraded => Dialect::MySql,
    sqlite_old_store_is_upgraded => Dialect::Sqlite,
);

/// The capabilities say what the store does, and the watch interval is a
/// URL option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_declare_the_new_contract() {
    for dialect in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
        let Some(url) = url(dialect) else { continue };
        let glue = if url.contains('?') { '&' } else { '?' };
        let store = open(&format!("{url}{glue}watch_ms=40"), &prefix()).await;
        let caps = store.capabilities().clone();
        assert!(
            caps.foreign_fencing && caps.native_conditional_get,
            "{dialect}"
        );
        assert!(caps.status && caps.milestones, "{dialect}");
        let expected = match dialect {
            Dialect::Postgres => WatchMode::Native { every_write: true },
            _ => WatchMode::Polling(Duration::from_millis(40)),
        };
        assert_eq!(caps.watch, expected, "{dialect}");
        // Both kinds of lease on one save: refused, nothing written.
        let (run, doc, key) = ids();
        let own = store
            .try_acquire(&key, &Owner::for_this_process(), TTL)
            .await
            .expect("acquire");
        let error = store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"x"),
                PutOptions::overwrite()
                    .with_lease(&own)
                    .with_foreign_lease(&foreign(&key, 1)),
            )
            .await
            .expect_err("both");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        assert!(store.get_bytes(&run, &doc).await.expect("get").is_none());
        cleanup(&store, &url).await;
    }
}

/// `Arc<dyn Lock>` keeps every new method (no default `Unsupported`
/// behind a pointer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_new_methods_through_a_trait_object() {
    let Some(url) = url(Dialect::Sqlite) else {
        return;
    };
    let store = open(&url, &prefix()).await;
    let dynamic: Arc<dyn Lock> = Arc::new(store.clone());
    let (run, doc, key) = ids();
    assert!(
        dynamic
            .claim(&key, Fence(1), Some(&doc), GetOptions::new())
            .await
            .expect("claim")
            .is_none()
    );
    dynamic.publish(&run, "t", "x").await.expect("publish");
    dynamic.set_attr(&run, "a", "b").await.expect("attr");
    drop(dynamic.watch(&run).await.expect("watch"));
    cleanup(&store, &url).await;
}

/// Bounds given in code longer than any server takes (`Duration::MAX`) are
/// brought down to `MAX_BOUND` instead of panicking when the store opens
/// (the pool's bound was `acquire_timeout + timeout`, which overflowed),
/// on every dialect: the store opens, writes and waits as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bounds_in_code_are_the_longest_bound() {
    for dialect in [Dialect::Sqlite, Dialect::Postgres, Dialect::MySql] {
        let Some(url) = url(dialect) else {
            continue;
        };
        let config = config(&url, &prefix())
            .with_timeout(Duration::MAX)
            .with_acquire_timeout(Duration::MAX)
            .with_watch_interval(Duration::MAX);
        let store = open_config(config).await;
        let (run, doc, key) = ids();
        store
            .put_bytes(&run, &doc, Bytes::from("x"))
            .await
            .expect("put");
        let owner = Owner::for_this_process();
        let lease = store
            .try_acquire(&key, &owner, Duration::from_secs(5))
            .await
            .expect("acquire");
        store.release(&lease).await.expect("release");
        cleanup(&store, &url).await;
    }
}
