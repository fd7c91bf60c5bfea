//! The WEPPcloud lock service (issue 14, items 2–4) against a private
//! redis-server on a free loopback port (WEPPcloud's database numbers are
//! fixed, so the shared server is never touched), with WEPPcloud's side
//! played by raw commands exactly as `wepppy/nodb/base.py` sends them.

mod support;

use std::time::{Duration, SystemTime};

use redis::AsyncCommands;
use runstate_core::{
    DocName, ErrorKind, Fence, Lock, LockKey, Owner, Replay, RunId, Store, display_chain,
};
use runstate_redis::WeppcloudService;
use support::OwnRedis;

const ROOT: &str = "/wc1/runs/ab";

fn run() -> RunId {
    RunId::new("ab-wepp-run").expect("valid")
}

fn climate() -> DocName {
    DocName::new("climate").expect("valid")
}

fn redis_available() -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !runstate_conformance::is_required("redis"),
            "redis-server is required (RUNSTATE_REQUIRE_BACKENDS) but not installed"
        );
        eprintln!("*** SKIPPED: redis-server is not installed ***");
    }
    found
}

async fn service(server: &OwnRedis) -> WeppcloudService {
    let url = format!(
        "{}?weppcloud=true&weppcloud_root={ROOT}&prefix=rstest",
        server.url()
    );
    WeppcloudService::connect(&url).await.expect("open")
}

async fn raw(server: &OwnRedis, db: i64) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{}/{db}", server.port))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// WEPPcloud's `lock()`: `SET key payload NX EX ttl` with its payload.
async fn weppcloud_lock(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    let payload = format!(
        r#"{{"token":"{:032x}","owner":"wepp-worker-3:31337","acquired_at":1795500000,"expires_at":1795521600,"ttl":21600}}"#,
        fastrand::u128(..)
    );
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(&payload)
        .arg("NX")
        .arg("EX")
        .arg(21600)
        .query_async(con)
        .await
        .expect("SET");
    set.map(|_| payload)
}

/// WEPPcloud's `unlock()`: compare-and-delete on the payload it read.
async fn weppcloud_unlock(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    payload: &str,
) -> i64 {
    redis::Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
    )
    .key(key)
    .arg(payload)
    .invoke_async(con)
    .await
    .expect("unlock")
}

/// Item 2: runstate's lease on a controller is WEPPcloud's NoDb lock, with
/// WEPPcloud's payload (its fields, types and order, then runstate's),
/// mirrored in `locked:<name>.nodb`, renewed and released only by token;
/// WEPPcloud cannot take it, and runstate cannot take WEPPcloud's. Fences
/// stay runstate's and survive WEPPcloud's `clear_locks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_weppclouds_locks_both_ways() {
    if !redis_available() {
        return;
    }
    let server = OwnRedis::start(false, &[]);
    let locks = service(&server).await;
    let mut db0 = raw(&server, 0).await;
    let key = LockKey::Doc(run(), climate());
    let nodb_key = format!("nodb-lock:{}:climate.nodb", run());
    let owner = Owner::for_this_process();
    let lease = locks
        .try_acquire(&key, &owner, Duration::from_millis(29_500))
        .await
        .expect("acquire");
    let token = lease.token().expect("a token").to_owned();
    let payload: String = db0.get(&nodb_key).await.expect("GET");
    let fields: Vec<&str> = payload
        .trim_start_matches('{')
        .split(',')
        .filter_map(|part| part.split_once(':').map(|(name, _)| name))
        .filter(|name| name.starts_with('"'))
        .take(6)
        .collect();
    assert_eq!(
        fields,
        [
            r#""token""#,
            r#""owner""#,
            r#""acquired_at""#,
            r#""expires_at""#,
            r#""ttl""#,
            r#""runstate""#
        ],
        "WEPPcloud's fields first, in its order: {payload}"
    );
    let json: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
    assert_eq!(json["token"], token.as_str());
    assert_eq!(token.len(), 32);
    assert_eq!(
        json["owner"],
        format!("{}:{}", owner.host(), owner.pid()).as_str()
    );
    let acquired = json["acquired_at"].as_u64().expect("whole seconds");
    assert_eq!(json["ttl"].as_u64(), Some(30), "whole seconds, rounded up");
    assert_eq!(json["expires_at"].as_u64(), Some(acquired + 30));
    assert_eq!(
        json["runstate"]["fence"],
        lease.fence().to_string().as_str()
    );
    assert_eq!(json["runstate"]["owner"]["id"], owner.id());
    let pttl: i64 = db0.pttl(&nodb_key).await.expect("PTTL");
    assert!(pttl > 25_000 && pttl <= 29_500, "{pttl}");
    let mirror: String = db0
        .hget(run().as_str(), "locked:climate.nodb")
        .await
        .expect("HGET");
    assert_eq!(mirror, "true");

    // WEPPcloud cannot take it, nor release it with its own payload.
    assert_eq!(weppcloud_lock(&mut db0, &nodb_key).await, None);
    assert_eq!(weppcloud_unlock(&mut db0, &nodb_key, "not ours").await, 0);
    // Another runstate owner sees runstate's holder; the same owner gets
    // its grant back.
    let other = Owner::for_this_process();
    let refused = locks
        .try_acquire(&key, &other, Duration::from_secs(5))
        .await
        .expect_err("held");
    assert_eq!(refused.kind(), ErrorKind::Locked);
    let holder = refused.holder().expect("holder");
    assert_eq!(
        (holder.owner.id(), holder.fence),
        (owner.id(), lease.fence())
    );
    let again = locks
        .try_acquire(&key, &owner, Duration::from_secs(40))
        .await
        .expect("idempotent by owner");
    assert_eq!(
        (again.fence(), again.token()),
        (lease.fence(), Some(token.as_str()))
    );
    let renewed = locks
        .renew(&lease, Duration::from_secs(60))
        .await
        .expect("renew");
    let pttl: i64 = db0.pttl(&nodb_key).await.expect("PTTL");
    assert!(pttl > 55_000, "{pttl}");
    let json: serde_json::Value =
        serde_json::from_str(&db0.get::<_, String>(&nodb_key).await.expect("GET")).expect("JSON");
    assert_eq!(
        json["token"],
        token.as_str(),
        "renewed by token, same token"
    );
    assert_eq!(json["acquired_at"].as_u64(), Some(acquired));
    assert_eq!(json["ttl"].as_u64(), Some(60));
    locks.release(&renewed).await.expect("release");
    assert!(!db0.exists::<_, bool>(&nodb_key).await.expect("EXISTS"));
    let mirror: String = db0
        .hget(run().as_str(), "locked:climate.nodb")
        .await
        .expect("HGET");
    assert_eq!(mirror, "false");

    // WEPPcloud holds it: runstate never takes it.
    let theirs = weppcloud_lock(&mut db0, &nodb_key)
        .await
        .expect("free for WEPPcloud");
    let error = locks
        .try_acquire(&key, &owner, Duration::from_secs(5))
        .await
        .expect_err("WEPPcloud holds it");
    assert_eq!(error.kind(), ErrorKind::Locked, "{}", display_chain(&error));
    let holder = error.holder().expect("holder");
    assert_eq!(
        (holder.owner.host(), holder.owner.pid(), holder.fence),
        ("wepp-worker-3", 31337, Fence(0))
    );
    assert!(holder.expires_in > Duration::from_secs(21_000));
    assert_eq!(
        locks.inspect(&key).await.expect("inspect").map(|h| h.fence),
        Some(Fence(0))
    );
    let listed = locks.list_locks(Some(&run())).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].owner.host(), "wepp-worker-3");
    assert_eq!(
        locks.release(&lease).await.expect_err("not ours").kind(),
        ErrorKind::LeaseLost
    );
    assert!(
        db0.exists::<_, bool>(&nodb_key).await.expect("EXISTS"),
        "untouched"
    );
    assert_eq!(weppcloud_unlock(&mut db0, &nodb_key, &theirs).await, 1);

    // An operator's clear_locks deletes every nodb-lock:<run>:* key: the
    // fence counter is elsewhere, so the next grant's fence is larger.
    let held = locks
        .try_acquire(&key, &owner, Duration::from_secs(30))
        .await
        .expect("acquire");
    assert!(held.fence() > lease.fence());
    let cleared: Vec<String> = db0
        .keys(format!("nodb-lock:{}:*", run()))
        .await
        .expect("KEYS");
    let _: i64 = db0.del(&cleared).await.expect("DEL");
    assert_eq!(
        locks
            .renew(&held, Duration::from_secs(30))
            .await
            .expect_err("cleared")
            .kind(),
        ErrorKind::LeaseLost
    );
    let next = locks
        .try_acquire(&key, &owner, Duration::from_secs(30))
        .await
        .expect("acquire");
    assert!(next.fence() > held.fence(), "fences survive clear_locks");
    locks.release(&next).await.expect("release");
}

/// Item 3: a release deletes WEPPcloud's cached copy (database 13, key =
/// the file's absolute path as WEPPcloud sees it) before the lock key, in
/// the same script; so do a forced break and `invalidate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_delete_weppclouds_cached_copy() {
    if !redis_available() {
        return;
    }
    let server = OwnRedis::start(false, &[]);
    let locks = service(&server).await;
    let mut db13 = raw(&server, 13).await;
    let cache_key = format!("{ROOT}/{}/climate.nodb", run());
    assert_eq!(locks.cache_key(&run(), &climate()), cache_key);
    let key = LockKey::Doc(run(), climate());
    let owner = Owner::for_this_process();
    for step in ["release", "break", "invalidate"] {
        let _: () = db13
            .set_ex(&cache_key, "{\"py/object\": \"stale\"}", 259_200)
            .await
            .expect("SET");
        let lease = locks
            .try_acquire(&key, &owner, Duration::from_secs(30))
            .await
            .expect("acquire");
        assert!(db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"));
        match step {
            "release" => locks.release(&lease).await.expect("release"),
            "break" => {
                locks
                    .break_lock(&key, None)
                    .await
                    .expect("break")
                    .expect("broken");
            }
            _ => {
                locks
                    .invalidate(&run(), &[climate()])
                    .await
                    .expect("invalidate");
                locks.release(&lease).await.expect("release");
            }
        }
        assert!(
            !db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"),
            "{step}"
        );
    }
    // Other databases are not touched.
    let mut db0 = raw(&server, 0).await;
    assert!(!db0.exists::<_, bool>(&cache_key).await.expect("EXISTS"));
}

/// While WEPPcloud replaces a run (its run-replacement guard), nothing is
/// granted: document and run locks are refused, and writes without a
/// document lease are too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_replacement_guard_refuses_grants_and_writes() {
    if !redis_available() {
        return;
    }
    let server = OwnRedis::start(false, &[]);
    let locks = service(&server).await;
    let mut db0 = raw(&server, 0).await;
    // WEPPcloud's _run_replacement_lock_key, computed the way it does.
    let python = format!(
        "import hashlib; print('nodb:run-replacement:' + hashlib.sha256('run\\0{}'.encode()).hexdigest())",
        run()
    );
    let guard = std::process::Command::new("python3")
        .args(["-c", &python])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .expect("python3 computes WEPPcloud's key");
    let _: () = db0
        .set_ex(&guard, "redis-py-lock-token", 120)
        .await
        .expect("SET");
    let owner = Owner::for_this_process();
    for key in [LockKey::Doc(run(), climate()), LockKey::Run(run())] {
        let error = locks
            .try_acquire(&key, &owner, Duration::from_secs(5))
            .await
            .expect_err("being replaced");
        assert_eq!(error.kind(), ErrorKind::Locked, "{key}");
        assert!(error.to_string().contains("replacing"), "{error}");
    }
    let error = locks
        .check_not_held_by_weppcloud(&run(), &climate(), runstate_core::Operation::Put)
        .await
        .expect_err("being replaced");
    assert_eq!(error.kind(), ErrorKind::Locked);
    let _: i64 = db0.del(&guard).await.expect("DEL");
    let lease = locks
        .try_acquire(
            &LockKey::Doc(run(), climate()),
            &owner,
            Duration::from_secs(5),
        )
        .await
        .expect("free again");
    // runstate's own lease does not count as WEPPcloud's.
    locks
        .check_not_held_by_weppcloud(&run(), &climate(), runstate_core::Operation::Put)
        .await
        .expect("held by runstate, not WEPPcloud");
    locks.release(&lease).await.expect("release");
}

/// Item 4: status messages go to runstate's stream and, as plain text, to
/// WEPPcloud's channel `<run>:<topic>`; milestones and attributes are
/// fields of WEPPcloud's run hash in its formats (whole seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_milestones_land_in_weppclouds_places() {
    if !redis_available() {
        return;
    }
    let server = OwnRedis::start(false, &[]);
    let locks = service(&server).await;
    // WEPPcloud's status clients use database 2.
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}/2", server.port)).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(format!("{}:climate", run()))
        .await
        .expect("SUBSCRIBE");
    locks
        .publish(&run(), "climate", "Building climate: station ID106388")
        .await
        .expect("publish");
    let message = tokio::time::timeout(Duration::from_secs(5), async {
        use futures_core::Stream;
        let stream = pubsub.on_message();
        let mut stream = std::pin::pin!(stream);
        std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await
    })
    .await
    .expect("in time")
    .expect("a message");
    assert_eq!(message.get_channel_name(), format!("{}:climate", run()));
    assert_eq!(
        message.get_payload::<String>().expect("text"),
        "Building climate: station ID106388"
    );
    let mut replay = locks
        .subscribe(&run(), Replay::All)
        .await
        .expect("subscribe");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), replay.next())
            .await
            .expect("replayed")
            .is_some()
    );

    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_007_250);
    locks.mark(&run(), "build_climate", at).await.expect("mark");
    locks
        .set_attr(&run(), "has_sbs", "false")
        .await
        .expect("attr");
    let mut db0 = raw(&server, 0).await;
    let _: () = db0
        .hset(run().as_str(), "locked:climate.nodb", "false")
        .await
        .expect("HSET");
    let stamp: String = db0
        .hget(run().as_str(), "timestamps:build_climate")
        .await
        .expect("HGET");
    assert_eq!(
        stamp, "1795000007",
        "int(time.time()), as RedisPrep writes it"
    );
    let attr: String = db0
        .hget(run().as_str(), "attrs:has_sbs")
        .await
        .expect("HGET");
    assert_eq!(attr, "false");
    let milestones = locks.milestones(&run()).await.expect("milestones");
    assert_eq!(
        milestones.timestamps.get("build_climate"),
        Some(&(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_007)))
    );
    assert_eq!(
        milestones.attrs.get("has_sbs").map(String::as_str),
        Some("false")
    );
    assert_eq!(milestones.attrs.len(), 1, "locked:* is not an attribute");
}

/// Run locks are runstate's own (WEPPcloud has none): they exclude other
/// runstate run locks and leave WEPPcloud's document locks alone. Locks
/// WEPPcloud takes under names runstate cannot express (batch runs,
/// `_pups/` children, folder locks) are not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_locks_and_unnameable_weppcloud_locks() {
    if !redis_available() {
        return;
    }
    let server = OwnRedis::start(false, &[]);
    let locks = service(&server).await;
    let mut db0 = raw(&server, 0).await;
    let owner = Owner::for_this_process();
    let run_lock = LockKey::Run(run());
    let lease = locks
        .try_acquire(&run_lock, &owner, Duration::from_secs(30))
        .await
        .expect("run lock");
    assert_eq!(
        locks
            .try_acquire(
                &run_lock,
                &Owner::for_this_process(),
                Duration::from_secs(5)
            )
            .await
            .expect_err("exclusive")
            .kind(),
        ErrorKind::Locked
    );
    let nodb_key = format!("nodb-lock:{}:climate.nodb", run());
    assert!(
        weppcloud_lock(&mut db0, &nodb_key).await.is_some(),
        "a run lock does not exclude document locks"
    );
    for other in [
        format!("nodb-lock:batch;;b1;;{}:climate.nodb", run()),
        format!(
            "nodb-lock:{}:_pups/omni/scenarios/undisturbed/wepp.nodb",
            run()
        ),
        format!("nodb-lock:{}:runtime-paths/climate", run()),
    ] {
        assert!(weppcloud_lock(&mut db0, &other).await.is_some());
    }
    let listed: Vec<LockKey> = locks
        .list_locks(None)
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(listed, [run_lock.clone(), LockKey::Doc(run(), climate())]);
    locks.release(&lease).await.expect("release");
}
