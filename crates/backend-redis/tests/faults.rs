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

// ---- Issue 11: every promise holds at the edges ----

/// The shared server's address, for a proxy in front of it.
fn shared_addr(url: &str) -> std::net::SocketAddr {
    let config = RedisConfig::from_url(url).expect("url");
    let runstate_redis::Address::Tcp { host, port } = config.address() else {
        panic!("the lost-reply test needs a TCP server URL");
    };
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}")
        .parse()
        .expect("a loopback address")
}

async fn pttl(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(raw)
        .await
        .expect("PTTL")
}

/// Item 9: a refused TTL is refused before anything is sent (no round trip
/// through the proxy) and leaves no lock hash behind, least of all one
/// without an expiry, on the raw keys; a refused renewal keeps the lease's
/// expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_ttls_leave_no_lock_without_expiry() {
    use runstate_conformance::proxy::Proxy;

    let Some(url) = shared_url() else { return };
    let p = prefix();
    let proxy = Proxy::start(shared_addr(&url)).await;
    let store = RedisStore::open(
        RedisConfig::tcp("127.0.0.1", proxy.addr().port())
            .with_db(RedisConfig::from_url(&url).expect("url").db())
            .with_prefix(&p)
            .expect("prefix"),
    )
    .await
    .expect("open");
    let mut raw = raw_connection(&url).await;
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lock_key = format!("{p}:{{r}}:lock:ron");
    let owner = Owner::for_this_process();
    for ttl in [
        Duration::ZERO,
        Duration::from_micros(999),
        runstate_core::MAX_TTL + Duration::from_millis(1),
        Duration::from_secs(u64::MAX / 1000),
        Duration::MAX,
    ] {
        let sent = proxy.turns();
        let error = store
            .try_acquire(&key, &owner, ttl)
            .await
            .expect_err("refused");
        assert_eq!(
            error.kind(),
            ErrorKind::InvalidArgument,
            "{ttl:?}: {}",
            display_chain(&error)
        );
        let error = store
            .acquire_and_load(&key, &doc, &owner, ttl, Default::default())
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{ttl:?}");
        assert_eq!(proxy.turns(), sent, "{ttl:?} refused before sending");
        assert_eq!(
            pttl(&mut raw, &lock_key).await,
            -2,
            "no lock key after a refused TTL of {ttl:?}"
        );
    }
    let lease = store
        .try_acquire(&key, &owner, Duration::from_secs(5))
        .await
        .expect("a sane TTL");
    for ttl in [
        Duration::ZERO,
        runstate_core::MAX_TTL + Duration::from_millis(1),
        Duration::MAX,
    ] {
        let sent = proxy.turns();
        let error = store.renew(&lease, ttl).await.expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{ttl:?}");
        assert_eq!(proxy.turns(), sent, "{ttl:?} refused before sending");
        let left = pttl(&mut raw, &lock_key).await;
        assert!(
            left > 0 && left <= 5000,
            "the lease keeps its expiry after a refused renewal: PTTL {left}"
        );
    }
    store.release(&lease).await.expect("release");
    store.purge_prefix().await.expect("cleanup");
}

/// Item 10: fences strictly increase across a restart from an older RDB
/// snapshot, whose fence counter is behind the fences granted since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_increase_across_a_restart_from_an_older_snapshot() {
    let mut server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_millis(800))
        .with_connect_timeout(Duration::from_millis(500));
    let store = RedisStore::open(config).await.expect("open");
    let key = LockKey::Doc(
        RunId::new("r").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let grant = || async {
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(5))
            .await?;
        store.release(&lease).await?;
        Ok::<_, runstate_core::Error>(lease.fence())
    };
    let snapshotted = grant().await.expect("grant");
    assert!(server.command(&["SAVE"]).starts_with("+OK"), "snapshot");
    let mut granted = vec![snapshotted];
    for _ in 0..5 {
        granted.push(grant().await.expect("grant"));
    }
    assert!(granted.windows(2).all(|w| w[0] < w[1]), "{granted:?}");
    // SIGKILL: the grants after the snapshot are lost with the server.
    server.kill();
    server.start_again();
    let counter = server.command(&["GET", "runstate:{r}:fence:ron"]);
    assert!(
        counter.contains(&format!("\r\n{snapshotted}\r\n")),
        "the server came back with the snapshot's counter: {counter:?}"
    );
    let mut attempts = 0;
    let after = loop {
        match grant().await {
            Ok(fence) => break fence,
            Err(e) if e.is_retryable() && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("grant after the restart: {}", display_chain(&e)),
        }
    };
    let highest = *granted.iter().max().expect("granted");
    assert!(
        after > highest,
        "fence {after} after the restart must exceed every fence granted before ({highest})"
    );
}

/// Item 12: an acquire whose grant was applied but whose reply was lost is
/// a retryable error, and the same owner's retry gets that grant back at
/// once (same fence, same `since`), instead of `Locked` behind itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_acquire_reply_gives_the_grant_back_to_its_owner() {
    use runstate_conformance::proxy::{Proxy, ReplyFault};
    use runstate_core::{LockExt, WaitPolicy};

    let Some(url) = shared_url() else { return };
    let proxy = Proxy::start(shared_addr(&url)).await;
    let shared = RedisConfig::from_url(&url).expect("url");
    let p = prefix();
    let config = RedisConfig::tcp("127.0.0.1", proxy.addr().port())
        .with_db(shared.db())
        .with_prefix(&p)
        .expect("prefix")
        .with_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1));
    let store = RedisStore::open(config)
        .await
        .expect("open through the proxy");
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"{}"))
        .await
        .expect("put");

    for (round, load) in [(0, false), (1, true)] {
        let key = match load {
            false => LockKey::Doc(run.clone(), doc.clone()),
            true => LockKey::Run(run.clone()),
        };
        let lock_key = match load {
            false => format!("{p}:{{r}}:lock:ron"),
            true => format!("{p}:{{r}}:lock\r\n"),
        };
        let owner = Owner::for_this_process();
        let ttl = Duration::from_secs(30);
        let needle = lock_key.into_bytes();
        proxy.arm(ReplyFault::drop_when(move |request| {
            request
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        }));
        let lost = if load {
            store
                .acquire_and_load(&key, &doc, &owner, ttl, Default::default())
                .await
                .map(|(lease, _)| lease)
        } else {
            store.try_acquire(&key, &owner, ttl).await
        };
        assert_eq!(proxy.fired(), round + 1, "the reply was lost");
        let error = lost.expect_err("the reply never arrived");
        assert!(
            error.is_retryable(),
            "a lost reply is retryable: {}",
            display_chain(&error)
        );
        // The grant was applied: the lock is held by this very owner.
        let mut held = None;
        for _ in 0..20 {
            match store.inspect(&key).await {
                Ok(info) => {
                    held = info;
                    break;
                }
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("inspect: {}", display_chain(&e)),
            }
        }
        let held = held.expect("the lost grant was applied");
        assert_eq!(held.owner, owner);

        let again = store
            .acquire(&key, &owner, ttl, &WaitPolicy::no_wait())
            .await
            .expect("the owner gets its grant back at once");
        assert_eq!(again.fence(), held.fence, "the same grant");
        assert_eq!(again.since(), held.since, "the grant's time is kept");
        let (again, loaded) = store
            .acquire_and_load(&key, &doc, &owner, ttl, Default::default())
            .await
            .expect("acquire_and_load by the holder");
        assert_eq!(again.fence(), held.fence);
        assert_eq!(&loaded.expect("loaded").bytes[..], b"{}");
        let other = store
            .try_acquire(&key, &Owner::for_this_process(), ttl)
            .await
            .expect_err("another owner still waits");
        assert_eq!(other.kind(), ErrorKind::Locked);
        store.release(&again).await.expect("release");
        let next = store
            .try_acquire(&key, &Owner::for_this_process(), ttl)
            .await
            .expect("free after the release");
        assert!(next.fence() > held.fence);
        store.release(&next).await.expect("release");
    }
    store.purge_prefix().await.expect("cleanup");
}

/// Item 7: a save the server refuses as a whole (a transaction aborted
/// before the script ran: here, a server out of memory) still releases its
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_and_release_releases_when_the_server_refuses_the_save() {
    let server = OwnRedis::start(false, &["--maxmemory-policy", "noeviction"]);
    let store = RedisStore::connect(&server.url()).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    // From now on every command that may grow memory is refused with OOM.
    assert!(
        server
            .command(&["CONFIG", "SET", "maxmemory", "1"])
            .starts_with("+OK")
    );
    let error = store
        .save_and_release(
            &lease,
            &doc,
            Bytes::from_static(b"{\"a\":1}"),
            Default::default(),
        )
        .await
        .expect_err("the server is out of memory");
    assert!(
        !matches!(error.kind(), ErrorKind::Fenced | ErrorKind::LeaseLost),
        "{}",
        display_chain(&error)
    );
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "the lease is released after the refused save: {}",
        display_chain(&error)
    );
    assert!(
        server
            .command(&["CONFIG", "SET", "maxmemory", "0"])
            .starts_with("+OK")
    );
    assert!(store.get_bytes(&run, &doc).await.expect("get").is_none());
}

/// Item 14: listing the locks of every run takes a few round trips, not one
/// per run (a private server, so the keyspace is only this test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_the_locks_of_many_runs_takes_few_round_trips() {
    use runstate_conformance::proxy::Proxy;

    const RUNS: usize = 500;
    let server = OwnRedis::start(false, &[]);
    let proxy = Proxy::start(server.addr()).await;
    let store = RedisStore::open(RedisConfig::tcp("127.0.0.1", proxy.addr().port()))
        .await
        .expect("open through the proxy");
    let owner = Owner::for_this_process();
    let mut leases = Vec::new();
    for i in 0..RUNS {
        let run = RunId::new(format!("run{i:04}")).expect("valid");
        let key = if i % 2 == 0 {
            LockKey::Run(run)
        } else {
            LockKey::Doc(run, DocName::new("climate").expect("valid"))
        };
        leases.push(
            store
                .try_acquire(&key, &owner, Duration::from_secs(60))
                .await
                .expect("acquire"),
        );
    }
    // A released lock is not listed.
    let released = leases.pop().expect("a lease");
    store.release(&released).await.expect("release");

    let before = proxy.turns();
    let locks = store.list_locks(None).await.expect("list");
    let turns = proxy.turns() - before;
    assert_eq!(locks.len(), RUNS - 1);
    let mut expected: Vec<LockKey> = leases.iter().map(|l| l.key().clone()).collect();
    expected.sort();
    let listed: Vec<LockKey> = locks.iter().map(|l| l.key.clone()).collect();
    assert_eq!(listed, expected, "every held lock, in key order");
    for (info, lease) in locks.iter().zip(&expected) {
        assert_eq!(&info.key, lease);
        assert_eq!(info.owner, owner);
    }
    assert!(
        turns <= 20,
        "listing the locks of {RUNS} runs took {turns} round trips"
    );
    eprintln!("list_locks(None) of {RUNS} runs: {turns} round trips");

    // One run's locks: one script call.
    let run = RunId::new("run0000").expect("valid");
    let before = proxy.turns();
    let one = store.list_locks(Some(&run)).await.expect("list one run");
    assert_eq!(proxy.turns() - before, 1);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].key, LockKey::Run(run));
}

// ---- Round 2: the listener connection ----

/// The next event of a feed within `secs`.
async fn next_of<T: runstate_core::events::Resyncable>(
    feed: &mut runstate_core::Feed<T>,
    secs: u64,
) -> T {
    tokio::time::timeout(Duration::from_secs(secs), feed.next())
        .await
        .expect("an event in time")
        .expect("the feed stays open")
        .expect("no feed error")
}

/// Issue 13 §1: the listener's connection killed by the server (`CLIENT
/// KILL TYPE pubsub`, on a private server whose only pub/sub client it is):
/// the watcher gets `Resync`, its re-list finds the write made meanwhile,
/// and later writes are reported again; the status subscription loses
/// nothing (it re-reads the stream from its last message) and needs no
/// `Resync`. Twice, so the second connection recovers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_gives_resync_and_carries_on() {
    use runstate_core::{Replay, StatusEvent, WatchEvent};

    let server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_millis(800))
        .with_connect_timeout(Duration::from_millis(500));
    let store = RedisStore::open(config).await.expect("open");
    let writer = RedisStore::connect(&server.url()).await.expect("writer");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let mut watch = store.watch(&run).await.expect("watch");
    let mut sub = store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    let v = writer
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("put");
    assert_eq!(
        next_of(&mut watch, 5).await,
        WatchEvent::Changed {
            doc: doc.clone(),
            version: v
        }
    );
    writer
        .publish(&run, "wepp", "before")
        .await
        .expect("publish");
    match next_of(&mut sub, 5).await {
        StatusEvent::Message(m) => assert_eq!(m.text, "before"),
        other => panic!("expected a message, got {other:?}"),
    }
    for round in 0..2 {
        let killed = server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.starts_with(":1"), "one listener killed: {killed:?}");
        // Made while the listener reconnects.
        writer
            .publish(&run, "wepp", &format!("during {round}"))
            .await
            .expect("publish");
        let missed = writer
            .put_bytes(&run, &doc, Bytes::from(format!("during {round}")))
            .await
            .expect("put");
        assert_eq!(
            next_of(&mut watch, 10).await,
            WatchEvent::Resync,
            "round {round}: the gap is marked"
        );
        let listed = store.list_all_docs(&run).await.expect("re-list");
        assert_eq!(listed[0].version, missed, "the re-list finds the write");
        match next_of(&mut sub, 10).await {
            StatusEvent::Message(m) => assert_eq!(m.text, format!("during {round}")),
            other => panic!("round {round}: expected the missed message, got {other:?}"),
        }
        let after = writer
            .put_bytes(&run, &doc, Bytes::from(format!("after {round}")))
            .await
            .expect("put");
        assert_eq!(
            next_of(&mut watch, 5).await,
            WatchEvent::Changed {
                doc: doc.clone(),
                version: after
            },
            "round {round}: events flow again"
        );
        writer
            .publish(&run, "wepp", &format!("after {round}"))
            .await
            .expect("publish");
        match next_of(&mut sub, 5).await {
            StatusEvent::Message(m) => assert_eq!(m.text, format!("after {round}")),
            other => panic!("round {round}: expected a live message, got {other:?}"),
        }
    }
}

/// Issue 13 §1: the server itself killed and restarted: the listener
/// reconnects by itself (with backoff while the server is down), the
/// watcher gets `Resync` and then the writes made after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_a_server_restart() {
    use runstate_core::WatchEvent;

    let mut server = OwnRedis::start(false, &[]);
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_millis(800))
        .with_connect_timeout(Duration::from_millis(500));
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let mut watch = store.watch(&run).await.expect("watch");
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.start_again();
    assert_eq!(next_of(&mut watch, 15).await, WatchEvent::Resync);
    let mut attempts = 0;
    let v = loop {
        match store
            .put_bytes(&run, &doc, Bytes::from_static(b"after"))
            .await
        {
            Ok(v) => break v,
            Err(e) if e.is_retryable() && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after the restart: {}", display_chain(&e)),
        }
    };
    assert_eq!(
        next_of(&mut watch, 5).await,
        WatchEvent::Changed { doc, version: v }
    );
}
