//! Fault tests: a restarted server, killed connections, a stalled server,
//! WEPPcloud's locks, and secrets that never show. Faults that restart or
//! pause a server use a private one; the shared server only ever sees its
//! own connections killed.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_conformance::faults;
use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutOptions, RunId, Store, StoreExt,
    display_chain,
};
use runstate_redis::{RedisConfig, RedisStore, WeppcloudLocks};
use support::OwnRedis;

const URL_VAR: &str = "RUNSTATE_REDIS_URL";

fn shared_url() -> Option<String> {
    runstate_conformance::server_url("redis", URL_VAR, "a Redis fault test")
}

fn prefix() -> String {
    format!("rsfault:{:012x}", fastrand::u64(..) >> 16)
}

async fn increments_through_faults<F, Fut>(
    store: &RedisStore,
    total: u64,
    at: &[u64],
    fault: F,
) -> (u64, Vec<runstate_core::Error>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    faults::increments_through_faults(Arc::new(store.clone()), total, at, fault).await
}

fn assert_clear_and_retryable(errors: &[runstate_core::Error]) {
    faults::assert_clear_and_retryable(errors, "redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run_then_recovery_without_restarting_the_process() {
    let server = std::sync::Mutex::new(OwnRedis::start(true, &[]));
    let url = server.lock().expect("lock").url();
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_timeout(Duration::from_millis(800))
        .with_connect_timeout(Duration::from_millis(500));
    let store = RedisStore::open(config).await.expect("open");
    let (run, doc) = (
        RunId::new("probe").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let outage_errors = std::sync::Mutex::new(Vec::new());
    let (acked, errors) = increments_through_faults(&store, 150, &[50, 100], || {
        // SIGKILL by PID; calls made while it is down must fail clearly.
        server.lock().expect("lock").kill();
        let (store, run, doc, server, outage_errors) = (
            store.clone(),
            run.clone(),
            doc.clone(),
            &server,
            &outage_errors,
        );
        async move {
            for _ in 0..3 {
                let error = store
                    .get_bytes(&run, &doc)
                    .await
                    .expect_err("the server is down");
                outage_errors.lock().expect("lock").push(error);
            }
            server.lock().expect("lock").start_again();
        }
    })
    .await;
    let outage_errors = outage_errors.into_inner().expect("lock");
    assert_eq!(acked, 150);
    assert_eq!(outage_errors.len(), 6);
    assert_clear_and_retryable(&outage_errors);
    assert_clear_and_retryable(&errors);
    eprintln!(
        "restarts: 2, acknowledged: {acked}, errors while down: {}, errors of updates: {}",
        outage_errors.len(),
        errors.len()
    );
    // Later calls succeed on the same store; scripts were reloaded
    // transparently after the restart emptied the server's script cache.
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("later calls succeed");
    let lease = store
        .try_acquire(
            &LockKey::Run(run.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect("acquire");
    store.release(&lease).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced() {
    let Some(url) = shared_url() else { return };
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(prefix())
        .expect("prefix");
    let store = RedisStore::open(config).await.expect("open");
    let killer = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection of the test's own");
    let kills = std::sync::Mutex::new(Vec::new());
    let (acked, errors) = increments_through_faults(&store, 90, &[30, 60], || {
        let (store, mut killer, kills) = (store.clone(), killer.clone(), &kills);
        async move {
            // Kill exactly the store's own connection on the shared server.
            let id = store.connection_id().await.expect("client id");
            let killed: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut killer)
                .await
                .expect("CLIENT KILL");
            kills.lock().expect("lock").push(killed);
        }
    })
    .await;
    let kills = kills.into_inner().expect("lock");
    assert_eq!(kills, vec![1, 1], "each fault killed one connection");
    assert_eq!(acked, 90);
    assert_clear_and_retryable(&errors);
    store.purge_prefix().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_gives_a_timeout_within_the_bound() {
    let server = OwnRedis::start(false, &[]);
    let timeout = Duration::from_millis(500);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(timeout);
    let store = RedisStore::open(config).await.expect("open");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"before"))
        .await
        .expect("put");

    assert!(
        server
            .command(&["CLIENT", "PAUSE", "3000", "ALL"])
            .starts_with("+OK")
    );
    for attempt in 0..2 {
        let start = Instant::now();
        let error = store.get_bytes(&run, &doc).await.expect_err("stalled");
        let took = start.elapsed();
        assert_eq!(
            error.kind(),
            ErrorKind::Timeout,
            "{}",
            display_chain(&error)
        );
        assert!(error.is_retryable());
        assert!(
            took < timeout + Duration::from_secs(1),
            "attempt {attempt} took {took:?}"
        );
        let error = store
            .try_acquire(
                &LockKey::Run(run.clone()),
                &Owner::for_this_process(),
                Duration::from_secs(5),
            )
            .await
            .expect_err("stalled");
        assert_eq!(error.kind(), ErrorKind::Timeout);
    }
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.get_bytes(&run, &doc).await {
            Ok(Some(d)) => {
                assert_eq!(&d.bytes[..], b"before");
                break;
            }
            other if Instant::now() < deadline => {
                eprintln!("after the pause: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("no recovery after the pause: {other:?}"),
        }
    }
}

const SENTINEL: &str = "S3ntinel-redis-PW-5d1c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show() {
    let server = OwnRedis::start(false, &["--requirepass", SENTINEL]);
    let good = RedisConfig::from_url(&format!("redis://:{SENTINEL}@127.0.0.1:{}/0", server.port))
        .expect("url");
    let store = RedisStore::open(good.clone())
        .await
        .expect("open with the right password");
    store
        .put_bytes(
            &RunId::new("r").expect("valid"),
            &DocName::new("d").expect("valid"),
            Bytes::from_static(b"x"),
        )
        .await
        .expect("put");
    for shown in [
        format!("{store:?}"),
        format!("{good}"),
        format!("{good:?}"),
        format!("{:?}", store.config()),
    ] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
    let wrong = format!("redis://:{SENTINEL}-wrong@127.0.0.1:{}/0", server.port);
    let error = RedisStore::connect(&wrong)
        .await
        .expect_err("wrong password");
    assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
    for shown in [
        display_chain(&error),
        format!("{error:?}"),
        error.to_string(),
    ] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
    let missing = format!("redis://:{SENTINEL}@127.0.0.1:{}/0", support_unused_port());
    let error = RedisStore::open(
        RedisConfig::from_url(&missing)
            .expect("url")
            .with_connect_timeout(Duration::from_millis(300)),
    )
    .await
    .expect_err("nobody listens");
    assert!(error.is_retryable(), "{}", display_chain(&error));
    for shown in [display_chain(&error), format!("{error:?}")] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw connection")
}

fn support_unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weppcloud_locks_are_honoured() {
    let Some(url) = shared_url() else { return };
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(prefix())
        .expect("prefix")
        .with_weppcloud_locks(WeppcloudLocks {
            db: 0,
            ext: "nodb".into(),
        });
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new(format!("wepp-{:x}", fastrand::u64(..))).expect("valid");
    let (climate, ron) = (
        DocName::new("climate").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let v = store
        .put_bytes(&run, &climate, Bytes::from_static(b"{\"before\":1}"))
        .await
        .expect("put");
    store
        .put_bytes(&run, &ron, Bytes::from_static(b"{}"))
        .await
        .expect("put");

    let nodb_key = format!("nodb-lock:{run}:climate.nodb");
    let payload = r#"{"token":"9b2e4c1d","owner":"wepp-worker-3:31337","acquired_at":1795500000,"expires_at":1795521600,"ttl":21600}"#;
    let mut raw = raw_connection(&url).await;
    let _: () = redis::cmd("SET")
        .arg(&nodb_key)
        .arg(payload)
        .arg("EX")
        .arg(60)
        .query_async(&mut raw)
        .await
        .expect("SET");

    let error = store
        .put_bytes(&run, &climate, Bytes::from_static(b"{\"after\":1}"))
        .await
        .expect_err("held by WEPPcloud");
    assert_eq!(error.kind(), ErrorKind::Locked, "{}", display_chain(&error));
    let holder = error.holder().expect("holder shown");
    assert_eq!(
        (holder.owner.host(), holder.owner.pid()),
        ("wepp-worker-3", 31337)
    );
    assert!(
        holder.expires_in > Duration::from_secs(50) && holder.expires_in <= Duration::from_secs(60)
    );
    assert!(error.to_string().contains("WEPPcloud"), "{error}");
    let owner = Owner::for_this_process();
    let doc_lock = LockKey::Doc(run.clone(), climate.clone());
    assert_eq!(
        store
            .try_acquire(&doc_lock, &owner, Duration::from_secs(5))
            .await
            .expect_err("held")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store
            .try_acquire(&LockKey::Run(run.clone()), &owner, Duration::from_secs(5))
            .await
            .expect_err("a run lock covers climate")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store
            .delete(&run, &climate, None)
            .await
            .expect_err("held")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store.delete_run(&run).await.expect_err("held").kind(),
        ErrorKind::Locked
    );
    // Other documents are free.
    store
        .put_bytes(&run, &ron, Bytes::from_static(b"{\"ok\":1}"))
        .await
        .expect("ron is not held");
    let lease = store
        .try_acquire(
            &LockKey::Doc(run.clone(), ron.clone()),
            &owner,
            Duration::from_secs(5),
        )
        .await
        .expect("ron lock");
    store.release(&lease).await.expect("release");
    let stored = store
        .get_bytes(&run, &climate)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        (stored.version, &stored.bytes[..]),
        (v, &b"{\"before\":1}"[..]),
        "nothing written over WEPPcloud's document"
    );

    let _: i64 = redis::cmd("DEL")
        .arg(&nodb_key)
        .query_async(&mut raw)
        .await
        .expect("DEL");
    store
        .put(
            &run,
            &climate,
            Bytes::from_static(b"{\"after\":1}"),
            PutOptions::overwrite(),
        )
        .await
        .expect("free again");
    store.purge_prefix().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_read_well_in_redis_cli() {
    let Some(url) = shared_url() else { return };
    let p = prefix();
    let store = RedisStore::open(
        RedisConfig::from_url(&url)
            .expect("url")
            .with_prefix(&p)
            .expect("prefix"),
    )
    .await
    .expect("open");
    let run = RunId::new("Mica_flume1").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let v = store
        .put_bytes(&run, &doc, Bytes::from_static(b"{\"_name\":\"Mica\"}"))
        .await
        .expect("put");
    let mut raw = raw_connection(&url).await;
    let data: i64 = redis::cmd("HSTRLEN")
        .arg(format!("{p}:{{Mica_flume1}}:doc:ron"))
        .arg("data")
        .query_async(&mut raw)
        .await
        .expect("HSTRLEN");
    assert_eq!(data, 16);
    let version: String = redis::cmd("HGET")
        .arg(format!("{p}:{{Mica_flume1}}:doc:ron"))
        .arg("version")
        .query_async(&mut raw)
        .await
        .expect("HGET");
    assert_eq!(version, v.as_str());
    let lease = store
        .try_acquire(
            &LockKey::Doc(run.clone(), doc.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect("lock");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{p}:{{Mica_flume1}}:lock:ron"))
        .query_async(&mut raw)
        .await
        .expect("PTTL");
    assert!(
        ttl > 0 && ttl <= 5000,
        "lease expiry is the key's TTL: {ttl}"
    );
    let fence: String = redis::cmd("GET")
        .arg(format!("{p}:{{Mica_flume1}}:fence:ron"))
        .query_async(&mut raw)
        .await
        .expect("GET");
    assert_eq!(fence, lease.fence().to_string());
    store.purge_prefix().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_reload_after_the_cache_is_flushed() {
    let server = OwnRedis::start(false, &[]);
    let store = RedisStore::connect(&server.url()).await.expect("open");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"1"))
        .await
        .expect("put");
    assert!(server.command(&["SCRIPT", "FLUSH"]).starts_with("+OK"));
    store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"2"),
            PutOptions::overwrite(),
        )
        .await
        .expect("NOSCRIPT handled");
    let lease = store
        .try_acquire(
            &LockKey::Run(run.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect("acquire");
    store.release(&lease).await.expect("release");
}
