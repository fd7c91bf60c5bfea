//! Fixes from the line-by-line review of the Redis backend: status gaps
//! after a reconnect, a load that fails after its grant, lock waiters'
//! round trips, channels per database, and TLS (`rediss://`). Tests that
//! keep the listener away or count commands use a private server; the
//! others work under a prefix of their own on the shared one
//! (`RUNSTATE_REDIS_URL`).

mod support;

use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, Lock, LockKey, Owner, Replay, RunId, StatusEvent, Store,
    StoreExt, Subscription,
};
use runstate_redis::{RedisConfig, RedisStore};
use support::OwnRedis;

const URL_VAR: &str = "RUNSTATE_REDIS_URL";

fn shared_url() -> Option<String> {
    runstate_conformance::server_url("redis", URL_VAR, "a Redis review test")
}

fn prefix() -> String {
    format!("rsreview:{:012x}", fastrand::u64(..) >> 16)
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw connection")
}

async fn open(config: RedisConfig) -> RedisStore {
    RedisStore::open(
        config
            .with_timeout(Duration::from_millis(2000))
            .with_connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect("open")
}

/// A store on the shared server under prefix `p`.
async fn open_prefixed(url: &str, p: &str) -> RedisStore {
    open(
        RedisConfig::from_url(url)
            .expect("url")
            .with_prefix(p)
            .expect("prefix"),
    )
    .await
}

/// Sets `key` to a plain string, as another client could: a key of the
/// wrong type for a document hash.
async fn not_a_document(con: &mut redis::aio::MultiplexedConnection, key: impl redis::ToRedisArgs) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg("not a document")
        .query_async(con)
        .await
        .expect("set");
}

/// The next event of a subscription within 10 s.
async fn next(sub: &mut Subscription) -> StatusEvent {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an event in time")
        .expect("the feed stays open")
        .expect("no feed error")
}

fn text_of(event: StatusEvent) -> String {
    match event {
        StatusEvent::Message(m) => m.text,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Keeps the store's listener away: new connections need a password (the
/// ones already open stay authenticated), then the listener's connection
/// is killed. [`let_back`] lets it reconnect.
async fn keep_listener_away(admin: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("review-only")
        .query_async(admin)
        .await
        .expect("requirepass");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(admin)
        .await
        .expect("kill the listener");
    assert_eq!(killed, 1, "exactly the one listener");
}

async fn let_back(admin: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query_async(admin)
        .await
        .expect("no password");
}

/// Waits until someone listens on `channel`.
async fn wait_subscribed(admin: &mut redis::aio::MultiplexedConnection, channel: &str) {
    for _ in 0..200 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(admin)
            .await
            .expect("numsub");
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nobody subscribed to {channel}");
}

// ---- 1. Status gaps after a reconnect ----

/// A subscriber whose last message was trimmed away while its listener was
/// away, with newer messages still there, gets `Resync` before them: an
/// inclusive `XRANGE <last> + COUNT 1` finds the first newer entry and
/// took it for the last one "still there", so the gap went unreported.
/// Nodes of one entry make `MAXLEN ~` exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_history_was_trimmed_meanwhile_gets_resync() {
    let server = OwnRedis::start(false, &["--stream-node-max-entries", "1"]);
    let config = RedisConfig::from_url(&format!("{}?status_history=2", server.url())).expect("url");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    let mut admin = raw(&server.url()).await;
    let run = RunId::new("r").expect("valid");
    writer.publish(&run, "wepp", "a0").await.expect("publish");
    let mut sub = store
        .subscribe(&run, Replay::Last(1))
        .await
        .expect("subscribe");
    assert_eq!(text_of(next(&mut sub).await), "a0");

    keep_listener_away(&mut admin).await;
    for i in 1..=5 {
        writer
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    // a0 and m1..m3 are gone, m4 and m5 are left.
    let_back(&mut admin).await;
    assert_eq!(
        next(&mut sub).await,
        StatusEvent::Resync,
        "the gap is reported"
    );
    assert_eq!(text_of(next(&mut sub).await), "m4");
    assert_eq!(text_of(next(&mut sub).await), "m5");
    writer.publish(&run, "wepp", "live").await.expect("publish");
    assert_eq!(text_of(next(&mut sub).await), "live");
}

/// The same when the stream was empty as the subscription started and the
/// listener missed messages trimmed by age (`status_minutes`, exact):
/// fewer messages are left than the cap, which was taken for "nothing
/// trimmed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_from_an_empty_stream_gets_resync_after_age_trimming() {
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_status_history(1000, Some(Duration::from_millis(300)))
        .expect("history");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    let mut admin = raw(&server.url()).await;
    let run = RunId::new("r").expect("valid");
    let mut sub = store.subscribe(&run, Replay::All).await.expect("subscribe");

    keep_listener_away(&mut admin).await;
    writer.publish(&run, "wepp", "old").await.expect("publish");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Trims "old" (older than 300 ms) as it is appended.
    writer.publish(&run, "wepp", "new").await.expect("publish");
    let_back(&mut admin).await;
    assert_eq!(
        next(&mut sub).await,
        StatusEvent::Resync,
        "the gap is reported"
    );
    assert_eq!(text_of(next(&mut sub).await), "new");
}

/// No `Resync` when nothing was lost: the listener reconnects after its
/// last message aged out on a quiet run, and after a gap whose messages
/// are all still there; the next event is the next message each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_that_lost_nothing_gives_no_resync() {
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_status_history(1000, Some(Duration::from_millis(300)))
        .expect("history");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    let mut admin = raw(&server.url()).await;
    let run = RunId::new("r").expect("valid");
    let mut sub = store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    writer
        .publish(&run, "wepp", "first")
        .await
        .expect("publish");
    assert_eq!(text_of(next(&mut sub).await), "first");

    // A quiet run: "first" ages out (the server would trim it at the next
    // publish; here by hand, before the listener goes away).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _: i64 = redis::cmd("XTRIM")
        .arg("runstate:{r}:status")
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut admin)
        .await
        .expect("trim");
    keep_listener_away(&mut admin).await;
    let_back(&mut admin).await;
    // The listener back and its gap read done before the next message
    // (published earlier it would be read from the stream behind a
    // trimmed last message: an honest Resync, not what this checks).
    wait_subscribed(&mut admin, "runstate:{r}:status:live").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writer
        .publish(&run, "wepp", "second")
        .await
        .expect("publish");
    assert_eq!(text_of(next(&mut sub).await), "second", "no Resync first");

    keep_listener_away(&mut admin).await;
    writer
        .publish(&run, "wepp", "third")
        .await
        .expect("publish");
    let_back(&mut admin).await;
    assert_eq!(
        text_of(next(&mut sub).await),
        "third",
        "read from the stream"
    );
    writer
        .publish(&run, "wepp", "fourth")
        .await
        .expect("publish");
    assert_eq!(text_of(next(&mut sub).await), "fourth");
}

/// A run deleted while the listener was away, after a message the
/// subscriber had not heard: `delete_run` deletes the stream whole, so
/// nothing was read after the last message heard, and that was taken for
/// "nothing missed". The subscriber gets `Resync` before the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deleted_while_the_listener_was_away_gives_resync() {
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url()).expect("url");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    let mut admin = raw(&server.url()).await;
    let run = RunId::new("r").expect("valid");
    writer.publish(&run, "wepp", "a0").await.expect("publish");
    let mut sub = store
        .subscribe(&run, Replay::Last(1))
        .await
        .expect("subscribe");
    assert_eq!(text_of(next(&mut sub).await), "a0");

    keep_listener_away(&mut admin).await;
    writer.publish(&run, "wepp", "m1").await.expect("publish");
    writer.delete_run(&run).await.expect("delete the run");
    let_back(&mut admin).await;
    wait_subscribed(&mut admin, "runstate:{r}:status:live").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writer.publish(&run, "wepp", "live").await.expect("publish");
    assert_eq!(
        next(&mut sub).await,
        StatusEvent::Resync,
        "m1 was never heard"
    );
    assert_eq!(text_of(next(&mut sub).await), "live");
}

/// No `Resync` after a reconnect for a subscription on a run that never
/// published (nothing was missed, and no stream is there): the check for a
/// deleted stream must not report one that never was, or every idle
/// subscriber would reload at every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_on_a_run_that_never_published_gives_no_resync() {
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url()).expect("url");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    let mut admin = raw(&server.url()).await;
    let run = RunId::new("idle").expect("valid");
    let mut sub = store.subscribe(&run, Replay::All).await.expect("subscribe");
    keep_listener_away(&mut admin).await;
    let_back(&mut admin).await;
    wait_subscribed(&mut admin, "runstate:{idle}:status:live").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writer
        .publish(&run, "wepp", "first")
        .await
        .expect("publish");
    assert_eq!(text_of(next(&mut sub).await), "first", "no Resync first");
}

// ---- 2. A load that fails after its grant ----

/// `acquire_and_load` whose grant succeeded but whose read failed (the
/// document's key of the wrong type, a corrupt version, with and without a
/// size limit) releases the grant before it returns the error: another
/// owner gets the lock at once instead of waiting out the TTL behind a
/// grant nobody holds. A document too large for the limit is refused
/// before anything is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_fails_after_its_grant_releases_it() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let run = RunId::new("r").expect("valid");
    let ttl = Duration::from_secs(60);
    let cases: [(&str, GetOptions); 5] = [
        ("wrongtype", GetOptions::new()),
        ("wrongtype", GetOptions::new().with_limit(1 << 20)),
        ("badversion", GetOptions::new()),
        ("badversion", GetOptions::new().with_limit(1 << 20)),
        ("toolarge", GetOptions::new().with_limit(4)),
    ];
    for (i, (shape, options)) in cases.into_iter().enumerate() {
        let doc = DocName::new(format!("d{i}")).expect("valid");
        let key = format!("{p}:{{r}}:doc:d{i}");
        match shape {
            "wrongtype" => {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg("x")
                    .query_async(&mut con)
                    .await
                    .expect("set");
            }
            "badversion" => {
                let _: () = redis::cmd("HSET")
                    .arg(&key)
                    .arg("version")
                    .arg(&b"\xff\xfe"[..])
                    .arg("data")
                    .arg("{}")
                    .query_async(&mut con)
                    .await
                    .expect("hset");
            }
            _ => {
                store
                    .put_bytes(&run, &doc, Bytes::from_static(b"larger than four"))
                    .await
                    .expect("put");
            }
        }
        for lock in [
            LockKey::Doc(run.clone(), doc.clone()),
            LockKey::Run(run.clone()),
        ] {
            let failed = store
                .acquire_and_load(&lock, &doc, &Owner::for_this_process(), ttl, options)
                .await;
            let error = failed.expect_err("the load fails");
            if shape == "toolarge" {
                assert_eq!(error.kind(), ErrorKind::TooLarge);
            }
            let other = store
                .try_acquire(&lock, &Owner::for_this_process(), ttl)
                .await
                .unwrap_or_else(|e| {
                    panic!("{shape} {options:?} {lock}: the lock stayed held after `{e}`")
                });
            store.release(&other).await.expect("release");
        }
    }
    store.purge_prefix().await.expect("cleanup");
}

// ---- 4. Channels per database ----

/// Two stores with one prefix on databases 0 and 1 of one server: a write,
/// a release and a status message on one are not heard by the other
/// (channels are server-wide, keys are per database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_on_two_databases_do_not_hear_each_other() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let base = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(&p)
        .expect("prefix");
    let zero = open(base.clone().with_db(0)).await;
    let one = open(base.with_db(1)).await;
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let mut watch = zero.watch(&run).await.expect("watch");
    let mut sub = zero.subscribe(&run, Replay::None).await.expect("subscribe");
    one.put_bytes(&run, &doc, Bytes::from_static(b"db1"))
        .await
        .expect("put on db 1");
    one.publish(&run, "wepp", "db1")
        .await
        .expect("publish on db 1");
    let lease = one
        .try_acquire(
            &LockKey::Run(run.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(60),
        )
        .await
        .expect("acquire on db 1");
    one.release(&lease).await.expect("release on db 1");
    let mine = zero
        .put_bytes(&run, &doc, Bytes::from_static(b"db0"))
        .await
        .expect("put on db 0");
    zero.publish(&run, "wepp", "db0")
        .await
        .expect("publish on db 0");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event")
        .expect("open")
        .expect("no error");
    assert_eq!(
        event,
        runstate_core::WatchEvent::Changed {
            doc: doc.clone(),
            version: mine
        },
        "the first event is db 0's own write"
    );
    assert_eq!(
        text_of(next(&mut sub).await),
        "db0",
        "the first message is db 0's own"
    );
    zero.purge_prefix().await.expect("cleanup");
    one.purge_prefix().await.expect("cleanup");
}

// ---- 3. Lock waiters' round trips ----

/// Calls of each command the server has served so far (`INFO
/// commandstats`), summed over the names given.
async fn calls(admin: &mut redis::aio::MultiplexedConnection, names: &[&str]) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("info");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            names.contains(&name).then_some(())?;
            rest.split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A waiter blocked on a held lock asks the server a bounded number of
/// times: with the default policy (sleeps from 2 ms growing to 200 ms) a
/// 3-second wait is about 25 attempts, never hundreds. (A guard: the
/// plain wait was bounded before the review too; the next test is the
/// case that was not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_asks_a_bounded_number_of_times() {
    use runstate_core::{LockExt, WaitPolicy};
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url()).expect("url");
    let holder = open(config.clone()).await;
    let waiter = open(config).await;
    let mut admin = raw(&server.url()).await;
    let key = LockKey::Run(RunId::new("r").expect("valid"));
    let lease = holder
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
        .await
        .expect("holder");
    let scripts = ["evalsha", "eval"];
    let before = calls(&mut admin, &scripts).await;
    let started = std::time::Instant::now();
    let refused = waiter
        .acquire(
            &key,
            &Owner::for_this_process(),
            Duration::from_secs(60),
            &WaitPolicy::with_timeout(Duration::from_secs(3)),
        )
        .await
        .expect_err("held all along");
    assert_eq!(refused.kind(), ErrorKind::Locked);
    let attempts = calls(&mut admin, &scripts).await - before;
    eprintln!(
        "3 s wait: {attempts} script calls in {:?}",
        started.elapsed()
    );
    assert!(attempts <= 40, "{attempts} attempts in a 3 s wait");
    holder.release(&lease).await.expect("release");
}

/// A release that timed out (the server paused, then the connection
/// killed, so it never ran) left the grant held, but this process took it
/// for released: its waiter then found "its blocker released" after every
/// refusal and asked again without sleeping, hundreds of times a second,
/// until the grant expired. It must keep to its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_timed_out_does_not_send_waiters_spinning() {
    use runstate_core::{LockExt, WaitPolicy};
    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_millis(300));
    let store = RedisStore::open(config).await.expect("open");
    let mut admin = raw(&server.url()).await;
    let key = LockKey::Run(RunId::new("r").expect("valid"));
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
        .await
        .expect("holder");
    let id = store.connection_id().await.expect("id");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .expect("pause");
    let failed = store
        .release(&lease)
        .await
        .expect_err("the release times out");
    assert_eq!(failed.kind(), ErrorKind::Timeout, "{failed}");
    // The release never runs: its connection goes before the pause ends.
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut admin)
        .await
        .expect("kill");
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .expect("unpause");
    let held: i64 = redis::cmd("EXISTS")
        .arg("runstate:{r}:lock")
        .query_async(&mut admin)
        .await
        .expect("exists");
    assert_eq!(held, 1, "still held");

    let scripts = ["evalsha", "eval"];
    let before = calls(&mut admin, &scripts).await;
    let refused = store
        .acquire(
            &key,
            &Owner::for_this_process(),
            Duration::from_secs(60),
            &WaitPolicy::with_timeout(Duration::from_secs(2)),
        )
        .await
        .expect_err("held all along");
    assert_eq!(refused.kind(), ErrorKind::Locked, "{refused}");
    let attempts = calls(&mut admin, &scripts).await - before;
    eprintln!("2 s wait behind a grant whose release timed out: {attempts} script calls");
    assert!(attempts <= 30, "{attempts} attempts in a 2 s wait");
}

// ---- 5. A native head ----

/// `head` gives a document's version and size without sending its bytes
/// (the default read the whole document): one round trip of a few dozen
/// bytes for a 1 MiB document, and `None` for a missing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_reads_no_bytes() {
    use runstate_conformance::proxy::Proxy;
    let server = OwnRedis::start(false, &[]);
    let proxy = Proxy::start(server.addr()).await;
    let store = RedisStore::open(RedisConfig::tcp("127.0.0.1", proxy.addr().port()))
        .await
        .expect("open");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("big").expect("valid"),
    );
    let version = store
        .put_bytes(&run, &doc, Bytes::from(vec![7u8; 1 << 20]))
        .await
        .expect("put");
    let (bytes, turns) = (proxy.bytes_to_client(), proxy.turns());
    let stat = store.head(&run, &doc).await.expect("head").expect("there");
    assert_eq!(
        (stat.version, stat.size, stat.modified),
        (version, 1 << 20, None)
    );
    let sent = proxy.bytes_to_client() - bytes;
    assert!(sent < 1000, "head sent {sent} bytes");
    assert_eq!(proxy.turns() - turns, 1, "one round trip");
    let missing = DocName::new("missing").expect("valid");
    assert!(store.head(&run, &missing).await.expect("head").is_none());
}

/// A WEPPcloud NoDb lock set without an expiry (`PTTL` -1) was shown with
/// `expires_in` zero, which the wait loop takes as "expiring now" and so
/// retried every millisecond for the whole wait. A holder with no expiry
/// is shown as lasting at least `MAX_TTL`, and the waiter keeps to its
/// backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_without_expiry_does_not_send_waiters_spinning() {
    use runstate_core::{LockExt, WaitPolicy};
    let server = OwnRedis::start(false, &[]);
    let config =
        RedisConfig::from_url(&format!("{}?weppcloud_locks=0", server.url())).expect("url");
    let store = open(config).await;
    let mut admin = raw(&server.url()).await;
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("climate").expect("valid"),
    );
    let _: () = redis::cmd("SET")
        .arg("nodb-lock:r:climate.nodb")
        .arg(r#"{"token":"t","owner":"wepp-worker-3:31337"}"#)
        .query_async(&mut admin)
        .await
        .expect("a NoDb lock without expiry");
    let key = LockKey::Doc(run, doc);
    let scripts = ["evalsha", "eval"];
    let before = calls(&mut admin, &scripts).await;
    let refused = store
        .acquire(
            &key,
            &Owner::for_this_process(),
            Duration::from_secs(60),
            &WaitPolicy::with_timeout(Duration::from_secs(2)),
        )
        .await
        .expect_err("held all along");
    assert_eq!(refused.kind(), ErrorKind::Locked, "{refused}");
    let attempts = calls(&mut admin, &scripts).await - before;
    eprintln!("2 s wait behind a lock without expiry: {attempts} script calls");
    assert!(attempts <= 30, "{attempts} attempts in a 2 s wait");
    let holder = refused.holder().expect("holder");
    assert!(holder.expires_in >= runstate_core::MAX_TTL, "{holder:?}");
}

// ---- 6. A write the server refuses changes nothing ----

/// A write to a document whose key holds something else (a plain string
/// another client `SET` there) fails with the server's `WRONGTYPE` and
/// changes nothing else: the run's document index and the store's run
/// index stay as they were, and nothing is announced to watchers. This
/// holds for the plain overwrite (no lease, no condition) as for the
/// conditional writes, alone and in a batch. (The plain overwrite used to
/// index the document and announce a version that was never written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_server_refuses_indexes_and_announces_nothing() {
    use runstate_core::{PutMode, PutOptions, PutRequest, Version, WatchEvent};
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let run = RunId::new("hostile").expect("valid");
    let broken = DocName::new("broken").expect("valid");
    not_a_document(&mut con, format!("{p}:{{hostile}}:doc:broken")).await;
    let mut watcher = store.watch(&run).await.expect("watch");
    let stale = Version::new("0123456789abcdef0123456789abcdef");
    let modes = [
        PutMode::Overwrite,
        PutMode::Create,
        PutMode::Update(stale.clone()),
    ];
    for mode in &modes {
        let error = store
            .put(
                &run,
                &broken,
                Bytes::from_static(b"{}"),
                PutOptions::mode(mode.clone()),
            )
            .await
            .expect_err("refused by the server");
        assert_eq!(error.kind(), ErrorKind::Backend, "{mode:?}: {error}");
        let batch = store
            .put_many(
                &run,
                vec![PutRequest::new(
                    broken.clone(),
                    Bytes::from_static(b"{}"),
                    mode.clone(),
                )],
            )
            .await
            .expect("a batch");
        assert_eq!(
            batch[0].as_ref().expect_err("refused").kind(),
            ErrorKind::Backend,
            "{mode:?} in a batch"
        );
    }
    let docs = store.list_all_docs(&run).await.expect("list docs");
    assert!(
        docs.is_empty(),
        "a refused write indexed its document: {docs:?}"
    );
    let runs = store.list_runs(None, 100).await.expect("list runs");
    assert!(
        runs.items.is_empty(),
        "a refused write indexed its run: {:?}",
        runs.items
    );
    let kept: String = redis::cmd("GET")
        .arg(format!("{p}:{{hostile}}:doc:broken"))
        .query_async(&mut con)
        .await
        .expect("get");
    assert_eq!(kept, "not a document", "nothing written over it");
    // The next event a watcher hears is a real write's, not a refused one's.
    let fine = DocName::new("fine").expect("valid");
    let written = store
        .put_bytes(&run, &fine, Bytes::from_static(b"{}"))
        .await
        .expect("a fine write");
    let first = tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("an event in time")
        .expect("the feed stays open")
        .expect("no feed error");
    assert_eq!(
        first,
        WatchEvent::Changed {
            doc: fine,
            version: written
        },
        "a refused write was announced"
    );
    store.purge_prefix().await.expect("cleanup");
}

/// Whatever another client left at the run's staging key (a plain string,
/// a hash with fields of its own) never reaches a document: every staged
/// write (conditional, leased, in a batch) stages into a fresh key and
/// places exactly its own bytes. (A string there made the write's `HSET`
/// fail while its script still renamed the string over the document and
/// announced it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_sits_at_the_staging_key_never_reaches_a_document() {
    use runstate_core::{PutMode, PutOptions, PutRequest};
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let run = RunId::new("staged").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let staging = format!("{p}:{{staged}}:staging");
    let mut version = store
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("seed");
    for (i, hostile) in ["string", "hash"].into_iter().cycle().take(8).enumerate() {
        if hostile == "string" {
            not_a_document(&mut con, &staging).await;
        } else {
            let _: () = redis::cmd("HSET")
                .arg(&staging)
                .arg("stray")
                .arg("field")
                .query_async(&mut con)
                .await
                .expect("hset");
        }
        let bytes = Bytes::from(format!("{}", i + 1));
        version = match i / 2 {
            0 => store
                .put(
                    &run,
                    &doc,
                    bytes.clone(),
                    PutOptions::update(version.clone()),
                )
                .await
                .unwrap_or_else(|e| panic!("{hostile}: conditional put: {e}")),
            1 => {
                let lease = store
                    .try_acquire(
                        &LockKey::Doc(run.clone(), doc.clone()),
                        &Owner::for_this_process(),
                        Duration::from_secs(30),
                    )
                    .await
                    .expect("acquire");
                store
                    .save_and_release(&lease, &doc, bytes.clone(), PutMode::Overwrite)
                    .await
                    .unwrap_or_else(|e| panic!("{hostile}: save_and_release: {e}"))
            }
            2 => store
                .put_many(
                    &run,
                    vec![PutRequest::new(
                        doc.clone(),
                        bytes.clone(),
                        PutMode::Update(version.clone()),
                    )],
                )
                .await
                .expect("a batch")
                .remove(0)
                .unwrap_or_else(|e| panic!("{hostile}: batched put: {e}")),
            _ => store
                .put(&run, &doc, bytes.clone(), PutOptions::overwrite())
                .await
                .unwrap_or_else(|e| panic!("{hostile}: overwrite: {e}")),
        };
        let stored = store
            .get(&run, &doc, GetOptions::new())
            .await
            .expect("get")
            .expect("there");
        assert_eq!(stored.bytes, bytes, "{hostile}, write {i}");
        assert_eq!(stored.version, version, "{hostile}, write {i}");
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("{p}:{{staged}}:doc:ron"))
            .query_async(&mut con)
            .await
            .expect("hkeys");
        assert_eq!(fields.len(), 2, "only a document's fields: {fields:?}");
    }
    store.purge_prefix().await.expect("cleanup");
}

/// A name in a run's index whose key is not a document hash (another
/// client's `SET` there) is not a document: listings skip it, as they skip
/// a name without its document, instead of failing the whole listing with
/// `WRONGTYPE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_skips_a_key_that_is_not_a_document() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let run = RunId::new("listed").expect("valid");
    for name in ["a", "c"] {
        store
            .put_bytes(
                &run,
                &DocName::new(name).expect("valid"),
                Bytes::from_static(b"{}"),
            )
            .await
            .expect("put");
    }
    not_a_document(&mut con, format!("{p}:{{listed}}:doc:b")).await;
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{p}:{{listed}}:docs"))
        .arg(0)
        .arg("b")
        .query_async(&mut con)
        .await
        .expect("zadd");
    let listed: Vec<String> = store
        .list_all_docs(&run)
        .await
        .expect("the listing does not fail")
        .into_iter()
        .map(|meta| meta.name.as_str().to_owned())
        .collect();
    assert_eq!(listed, ["a", "c"]);
    store.purge_prefix().await.expect("cleanup");
}

/// The server's clock in µs (`TIME`).
async fn server_us(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(con).await.expect("TIME");
    s * 1_000_000 + us
}

/// A new grant's fence is `max(counter + 1, server clock in µs)`, the two
/// compared as decimal strings inside the acquire script: a counter ahead
/// of the clock is followed by counter + 1, exactly, even past 2^53 (as
/// long as the clock, or longer); a counter behind it (shorter, or as long
/// and smaller) gives way to the clock; a counter not written the
/// script's way (a leading zero) is compared by number. The grant's
/// `since` is the server's clock in ms, and the counter keeps the fence
/// granted. Times are the server's own (`TIME`), read around each grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fence_passes_both_its_counter_and_the_clock() {
    use std::time::UNIX_EPOCH;

    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let key = LockKey::Doc(
        RunId::new("r").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let counter = format!("{p}:{{r}}:fence:ron");
    let setter = con.clone();
    let grant_after = |set: Option<String>| {
        let (store, key, counter) = (&store, &key, &counter);
        let mut con = setter.clone();
        async move {
            if let Some(value) = set {
                let () = redis::cmd("SET")
                    .arg(counter)
                    .arg(value)
                    .query_async(&mut con)
                    .await
                    .expect("set the counter");
            }
            let lease = store
                .try_acquire(key, &Owner::for_this_process(), Duration::from_secs(5))
                .await
                .expect("grant");
            store.release(&lease).await.expect("release");
            let stored: String = redis::cmd("GET")
                .arg(counter)
                .query_async(&mut con)
                .await
                .expect("get the counter");
            assert_eq!(stored, lease.fence().0.to_string(), "the counter keeps it");
            lease
        }
    };
    // The clock: on a first grant, after a shorter counter, after grants
    // of the clock (a hundred, so that microseconds below 100000, which
    // need their leading zeros, come up), and after a counter with a
    // leading zero that is behind the clock.
    let mut sets = vec![None, Some("42".to_owned())];
    sets.extend((0..100).map(|_| None));
    sets.push(Some("0042".to_owned()));
    for set in sets {
        let before = server_us(&mut con).await;
        let lease = grant_after(set).await;
        let after = server_us(&mut con).await;
        let fence = lease.fence().0;
        assert!(
            (before..=after).contains(&fence),
            "fence {fence} is the server's clock in µs ({before} ..= {after})"
        );
        let since = lease
            .since()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_micros();
        assert_eq!(
            u128::from(fence / 1000) * 1000,
            since,
            "'since' is the grant's clock in ms"
        );
    }
    // As long as the clock and a second behind it: the clock.
    let behind = server_us(&mut con).await - 1_000_000;
    let fence = grant_after(Some(behind.to_string())).await.fence().0;
    assert!(fence > behind + 1_000_000, "fence {fence} after {behind}");
    // Ahead of the clock: the counter's next, exactly, with carries and
    // past 2^53; a leading zero compared by number.
    let ahead = server_us(&mut con).await + 3_600_000_000;
    for (counter, next) in [
        (ahead.to_string(), ahead + 1),
        ("8999999999999999".to_owned(), 9_000_000_000_000_000),
        ("10000000000000000".to_owned(), 10_000_000_000_000_001),
        ("18446744073709551614".to_owned(), u64::MAX),
        ("05000000000000000".to_owned(), 5_000_000_000_000_001),
    ] {
        assert_eq!(
            grant_after(Some(counter.clone())).await.fence().0,
            next,
            "after {counter}"
        );
    }
    store.purge_prefix().await.expect("cleanup");
}

/// A grant written by an older version of this backend has no `since`:
/// it is derived as now - (ttl - pttl) by the server's clock, for a
/// waiter that finds it held (`Locked`, with the holder), for its owner
/// taking it again (and then kept in the grant), and for a save under a
/// lease that is not that grant (`Fenced`, with the holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_since_is_dated_by_its_expiry() {
    use runstate_core::{Fence, Lease, PutMode};
    use std::time::{Instant, UNIX_EPOCH};

    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let mut con = raw(&url).await;
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lock = format!("{p}:{{r}}:lock:ron");
    let holder = Owner::new("old-host", 4242, "old-holder").expect("owner");
    // Granted 30 s ago with a 60 s TTL, by a version that wrote no 'since'.
    let () = redis::cmd("HSET")
        .arg(&lock)
        .arg("owner")
        .arg(serde_json::to_string(&holder).expect("json"))
        .arg("oid")
        .arg(holder.id())
        .arg("fence")
        .arg("7")
        .arg("ttl")
        .arg("60000")
        .query_async(&mut con)
        .await
        .expect("an old grant");
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&lock)
        .arg(30_000)
        .query_async(&mut con)
        .await
        .expect("its expiry");
    let ms = |at: std::time::SystemTime| {
        u64::try_from(
            at.duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_millis(),
        )
        .expect("fits")
    };
    let dated = |since: u64, now_us: u64| {
        let expected = now_us / 1000 - 30_000;
        assert!(
            since.abs_diff(expected) < 2_000,
            "since {since} is 30 s before the server's clock ({expected})"
        );
    };
    let now = server_us(&mut con).await;
    let error = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(5))
        .await
        .expect_err("held");
    assert_eq!(error.kind(), ErrorKind::Locked);
    let held = error.holder().expect("the holder");
    assert_eq!(held.fence, Fence(7));
    dated(ms(held.since), now);
    // A save under a lease that is not that grant: fenced, with the holder.
    let stale = Lease::new(
        key.clone(),
        Owner::for_this_process(),
        Fence(6),
        Duration::from_secs(5),
        Instant::now(),
        std::time::SystemTime::now(),
    );
    let error = store
        .save_and_release(&stale, &doc, Bytes::from_static(b"{}"), PutMode::Overwrite)
        .await
        .expect_err("not the grant");
    assert_eq!(error.kind(), ErrorKind::Fenced);
    dated(ms(error.holder().expect("the holder").since), now);
    // Its owner takes it again: same fence, the derived 'since', kept.
    let lease = store
        .try_acquire(&key, &holder, Duration::from_secs(5))
        .await
        .expect("the owner's own grant");
    assert_eq!(lease.fence(), Fence(7));
    dated(ms(lease.since()), now);
    let kept: String = redis::cmd("HGET")
        .arg(&lock)
        .arg("since")
        .query_async(&mut con)
        .await
        .expect("kept");
    assert_eq!(kept, ms(lease.since()).to_string());
    store.release(&lease).await.expect("release");
    store.purge_prefix().await.expect("cleanup");
}

/// Bounds given in code longer than anything means (`Duration::MAX`) are
/// brought down to `MAX_BOUND` instead of panicking: the store used to
/// panic as it opened (`connect_timeout * 3`, `Instant::now() + timeout`)
/// and, with `WAIT`, at every save (`wait_timeout + timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bounds_in_code_are_the_longest_bound() {
    let Some(url) = shared_url() else {
        return;
    };
    let p = prefix();
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(&p)
        .expect("prefix")
        .with_timeout(Duration::MAX)
        .with_connect_timeout(Duration::MAX)
        .with_wait_replicas(0, Duration::MAX);
    let bounds = (config.timeout(), config.wait_replicas());
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new("endless").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    store
        .put_bytes(&run, &doc, Bytes::from("x"))
        .await
        .expect("put");
    let got = store.get_bytes(&run, &doc).await.expect("get");
    assert_eq!(got.map(|d| d.bytes), Some(Bytes::from("x")));
    store.delete_run(&run).await.expect("delete the run");
    let longest = runstate_core::options::MAX_BOUND;
    assert_eq!(bounds, (longest, (0, longest)));
}

/// A cache TTL given in code past what Redis takes (`Duration::MAX`) is
/// brought down to [`MAX_CACHE_TTL`]: before, the `PEXPIRE` was refused
/// inside the cache write's transaction, so the copy was kept with no
/// expiry at all (`PTTL` -1).
#[tokio::test]
async fn an_endless_cache_ttl_is_the_longest_one() {
    use runstate_core::{Cache, Cached, StoredDoc, Version};
    let Some(url) = shared_url() else {
        return;
    };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let run = RunId::new("cached").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let key = format!("{p}:cache:{{cached}}:ron");
    let mut con = raw(&url).await;
    for (ttl, longest) in [
        (Duration::MAX, runstate_redis::MAX_CACHE_TTL),
        (Duration::ZERO, Duration::from_millis(1)),
    ] {
        let cache = runstate_redis::RedisCache::beside(&store, ttl);
        let copy = Cached::new(
            StoredDoc::new(Bytes::from("x"), Version::new("v1")),
            std::time::SystemTime::now(),
        );
        cache.put(&run, &doc, copy).await;
        let left: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("PTTL");
        let longest = i64::try_from(longest.as_millis()).expect("fits");
        // -2: gone already (1 ms); otherwise an expiry within the bound.
        assert!(
            left == -2 || (0..=longest).contains(&left),
            "PTTL {left} with a TTL of {ttl:?}"
        );
        if ttl == Duration::MAX {
            assert!(left > longest - 60_000, "PTTL {left}");
        }
    }
    let _: u64 = redis::cmd("UNLINK")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("UNLINK");
}

/// A touch (a validation found the copy current) only moves the copy's
/// known-at time forward: a touch that comes late made it look older than
/// a later validation had found it (harmless for the bound, but it cost
/// stale-tolerant readers a round trip), and a touch of a replaced copy
/// changes nothing.
#[tokio::test]
async fn a_late_touch_never_makes_a_cached_copy_older() {
    use runstate_core::{Cache, Cached, StoredDoc, Version};
    use std::time::{SystemTime, UNIX_EPOCH};
    let Some(url) = shared_url() else {
        return;
    };
    let p = prefix();
    let store = open_prefixed(&url, &p).await;
    let cache = runstate_redis::RedisCache::beside(&store, Duration::from_secs(60));
    let run = RunId::new("touched").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    // Whole milliseconds, as the cache keeps them.
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let now = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits");
    let v1 = Version::new("v1");
    let copy = Cached::new(StoredDoc::new(Bytes::from("x"), v1.clone()), at(now));
    cache.put(&run, &doc, copy).await;
    cache.touch(&run, &doc, &v1, at(now - 5_000)).await;
    assert_eq!(
        cache.version(&run, &doc).await,
        Some((v1.clone(), at(now))),
        "moved back"
    );
    cache.touch(&run, &doc, &v1, at(now + 5)).await;
    assert_eq!(
        cache.version(&run, &doc).await,
        Some((v1.clone(), at(now + 5))),
        "not moved forward"
    );
    cache
        .touch(&run, &doc, &Version::new("v0"), at(now + 10))
        .await;
    assert_eq!(
        cache.version(&run, &doc).await,
        Some((v1, at(now + 5))),
        "another version's touch"
    );
    store.purge_prefix().await.expect("cleanup");
}

// ---- 7. A channel the server refuses ----

/// Review finding: one channel the server will not subscribe for the
/// store's user (an ACL whose channel patterns leave it out) made it refuse
/// the listener's whole `SUBSCRIBE`; the listener reconnected and met the
/// same refusal again, so every subscription of the store, allowed ones
/// too, timed out while the refused one was wanted (and lingered). Now the
/// refused subscription fails at once with `Denied` and the others are
/// served on the same connection (no `Resync`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_server_refuses_holds_up_no_other_subscription() {
    let (_server, store, writer) = acl_stores().await;
    let ok1 = RunId::new("ok1").expect("valid");
    let ok2 = RunId::new("ok2").expect("valid");
    let other = RunId::new("other").expect("valid");

    let started = std::time::Instant::now();
    let (allowed, refused) = tokio::join!(
        store.subscribe(&ok1, Replay::None),
        store.subscribe(&other, Replay::None)
    );
    let Err(error) = refused else {
        panic!("the refused channel was subscribed")
    };
    assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
    let mut sub = allowed.expect("the allowed channel is served");
    let Err(error) = store.watch(&other).await else {
        panic!("the refused channel was watched")
    };
    assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
    // Another allowed run, while the refused channel would still linger.
    let mut sub2 = store
        .subscribe(&ok2, Replay::None)
        .await
        .expect("another allowed channel is served");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no call waited for its bound: {:?}",
        started.elapsed()
    );
    writer.publish(&ok1, "wepp", "one").await.expect("publish");
    writer.publish(&ok2, "wepp", "two").await.expect("publish");
    // A `Resync` first (the listener reconnected) fails here.
    assert_eq!(text_of(next(&mut sub).await), "one");
    assert_eq!(text_of(next(&mut sub2).await), "two");
}

/// A private server whose user `worker` (password `pw`) may touch every key
/// and the channels of runs `ok…` under the prefix `acl` only
/// (`resetchannels` first: Redis 6.2 allows every channel by default), with
/// two stores on it as that user: one that follows, one that writes.
async fn acl_stores() -> (OwnRedis, RedisStore, RedisStore) {
    let server = OwnRedis::start(
        false,
        &[
            "--user",
            "worker",
            "on",
            ">pw",
            "~*",
            "resetchannels",
            "&acl:{ok*",
            "+@all",
        ],
    );
    let url = format!("redis://worker:pw@127.0.0.1:{}/0", server.port);
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix("acl")
        .expect("prefix");
    let store = open(config.clone()).await;
    let writer = open(config).await;
    (server, store, writer)
}

/// Waits for `feed` to end with the server's refusal of its channel.
async fn ends_refused<T: runstate_core::events::Resyncable + std::fmt::Debug>(
    feed: &mut runstate_core::Feed<T>,
    what: &str,
) {
    let ended = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap_or_else(|_| panic!("the {what} ends in time"));
    match ended {
        Some(Err(error)) => assert_eq!(error.kind(), ErrorKind::Denied, "{error}"),
        other => panic!("expected the refusal, got {other:?}"),
    }
}

/// The same, from the other side: a feed already following a channel the
/// server stops allowing (its user's channel patterns changed; Redis drops
/// the listener's connection) ends with the refusal once the listener is
/// back, instead of waiting for ever; the channels still allowed are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_whose_channel_is_refused_later_ends_with_the_refusal() {
    let (server, store, writer) = acl_stores().await;
    let ok1 = RunId::new("ok1").expect("valid");
    let ok2 = RunId::new("ok2").expect("valid");
    let mut sub = store
        .subscribe(&ok1, Replay::None)
        .await
        .expect("subscribe");
    let mut watch = store.watch(&ok1).await.expect("watch");
    let mut kept = store
        .subscribe(&ok2, Replay::None)
        .await
        .expect("subscribe");
    server.command(&["ACL", "SETUSER", "worker", "resetchannels", "&acl:{ok2*"]);
    ends_refused(&mut sub, "subscription").await;
    ends_refused(&mut watch, "watcher").await;
    writer.publish(&ok2, "wepp", "two").await.expect("publish");
    // The reconnect was heard: nothing was missed, so no Resync.
    assert_eq!(text_of(next(&mut kept).await), "two");
}

/// Purging a store leaves the keys of a store whose prefix extends its own
/// (`p:q` beside `p`): its pattern `p:*` used to match them and delete
/// that store's documents.
#[tokio::test]
async fn a_purge_leaves_stores_of_longer_prefixes_alone() {
    let Some(url) = shared_url() else { return };
    let outer = prefix();
    let inner = format!("{outer}:q");
    let (a, b) = (
        open_prefixed(&url, &outer).await,
        open_prefixed(&url, &inner).await,
    );
    let run = RunId::new("r").expect("run");
    let doc = DocName::new("d").expect("doc");
    for store in [&a, &b] {
        store
            .put_bytes(&run, &doc, Bytes::from_static(b"x"))
            .await
            .expect("put");
    }
    assert!(a.purge_prefix().await.expect("purge") > 0);
    assert!(
        a.get(&run, &doc, GetOptions::default())
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        b.get(&run, &doc, GetOptions::default())
            .await
            .expect("get")
            .is_some(),
        "the longer prefix's document was deleted"
    );
    assert_eq!(b.list_all_runs().await.expect("runs"), vec![run]);
    b.purge_prefix().await.expect("purge");
}

/// A store on the shared server under a prefix of its own, with the run
/// `r` and the document name `d`.
async fn fresh_store() -> Option<(RedisStore, RunId, DocName)> {
    let url = shared_url()?;
    Some((
        open_prefixed(&url, &prefix()).await,
        RunId::new("r").expect("run"),
        DocName::new("d").expect("doc"),
    ))
}

/// A conditional delete naming an empty version (stored versions never
/// are) is refused: the empty version used to mean "any", and the document
/// was deleted.
#[tokio::test]
async fn a_delete_naming_an_empty_version_deletes_nothing() {
    let Some((store, run, doc)) = fresh_store().await else {
        return;
    };
    let version = store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    let refused = store
        .delete(&run, &doc, Some(&runstate_core::Version::new("")))
        .await
        .expect_err("an empty version is never the stored one");
    assert_eq!(refused.kind(), ErrorKind::Precondition, "{refused}");
    assert!(
        store
            .delete(&run, &doc, Some(&version))
            .await
            .expect("delete")
    );
    store.purge_prefix().await.expect("purge");
}

/// A document over what one Redis value holds is `TooLarge` before
/// anything is sent (the server closed the connection instead, failing
/// every request sharing it, which came back as a retryable network
/// error), and the lease of a save-and-release is given back.
#[tokio::test]
async fn a_document_over_a_redis_value_is_refused_before_sending() {
    let Some((store, run, doc)) = fresh_store().await else {
        return;
    };
    // 512 MiB + 1 of zeroes, never touched: the allocator maps it lazily.
    let huge = Bytes::from(vec![0u8; 512 * 1024 * 1024 + 1]);
    let refused = store
        .put_bytes(&run, &doc, huge.clone())
        .await
        .expect_err("over 512 MiB");
    assert_eq!(refused.kind(), ErrorKind::TooLarge, "{refused}");
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    let refused = store
        .save_and_release(
            &lease,
            &doc,
            huge.clone(),
            runstate_core::PutMode::Overwrite,
        )
        .await
        .expect_err("over 512 MiB");
    assert_eq!(refused.kind(), ErrorKind::TooLarge, "{refused}");
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "released"
    );
    assert!(
        store
            .get(&run, &doc, GetOptions::default())
            .await
            .expect("get")
            .is_none()
    );
    // A cache beside the store keeps no such copy, and forgets the one
    // before it (it sent it, and the closed connection failed the store's
    // calls too).
    use runstate_core::{Cache, Cached, StoredDoc, Version};
    let cache = runstate_redis::RedisCache::beside(&store, Duration::from_secs(600));
    let cached = |bytes: Bytes, version: &str| {
        Cached::new(
            StoredDoc::new(bytes, Version::new(version)),
            std::time::SystemTime::now(),
        )
    };
    cache
        .put(&run, &doc, cached(Bytes::from_static(b"x"), "1"))
        .await;
    assert!(
        cache.get(&run, &doc).await.is_some(),
        "a small copy is kept"
    );
    cache.put(&run, &doc, cached(huge, "2")).await;
    assert!(
        cache.get(&run, &doc).await.is_none(),
        "the older copy is forgotten"
    );
    assert!(
        store.get(&run, &doc, GetOptions::default()).await.is_ok(),
        "the connection lives"
    );
    store.purge_prefix().await.expect("purge");
}

/// With `wait_replicas`, a `claim` (the watermark of a fence granted by
/// another lock service) waits for the replicas as grants and saves do:
/// it returned at once, so a failover could lose the raised watermark and
/// let the older holder's late save through. The shared server has no
/// replica, so the claim is made on it and reported unreplicated.
#[tokio::test]
async fn a_claim_waits_for_the_replicas() {
    let Some(url) = shared_url() else { return };
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut raw(&url).await)
        .await
        .expect("info");
    if !info.contains("connected_slaves:0") {
        eprintln!("the shared server has replicas: the unreplicated claim cannot be staged");
        return;
    }
    let p = prefix();
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(&p)
        .expect("prefix")
        .with_wait_replicas(1, Duration::from_millis(50));
    let store = open(config).await;
    let run = RunId::new("r").expect("run");
    let doc = DocName::new("d").expect("doc");
    let key = LockKey::Doc(run.clone(), doc.clone());
    for load in [None, Some(&doc)] {
        let refused = store
            .claim(
                &key,
                runstate_core::Fence(1_000),
                load,
                GetOptions::default(),
            )
            .await
            .expect_err("no replica acknowledged the claim");
        assert_eq!(refused.kind(), ErrorKind::Backend, "{refused}");
        assert!(refused.is_retryable(), "{refused}");
        assert!(refused.to_string().contains("replicas"), "{refused}");
    }
    store.purge_prefix().await.expect("purge");
}
