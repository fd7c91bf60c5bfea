//! Issue 16: `get_many` and `put_many` are native on Redis: one pipeline
//! (one round trip) per batch, each write its own conditional
//! transaction, each result exactly what the single call gives, every
//! write announced, a forgotten script loaded again without writing
//! anything twice. Tests that count round trips or flush the script cache
//! use a private server; the others work under a prefix of their own on
//! the shared one (`RUNSTATE_REDIS_URL`).

mod support;

use std::time::Duration;

use runstate_conformance::proxy::Proxy;
use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, PutMode, PutOptions, PutRequest, RunId, Store, StoreExt,
    Version, WatchEvent, Watcher,
};
use runstate_redis::{RedisConfig, RedisStore};
use support::OwnRedis;

fn name(text: &str) -> DocName {
    DocName::new(text).expect("valid")
}

fn put(doc: &DocName, bytes: &'static [u8], mode: PutMode) -> PutRequest {
    PutRequest::new(doc.clone(), Bytes::from_static(bytes), mode)
}

/// The events a watcher has for now: up to `n`, each within 5 s.
async fn events(watcher: &mut Watcher, n: usize) -> Vec<(DocName, Version)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), watcher.next()).await {
            Ok(Some(Ok(WatchEvent::Changed { doc, version }))) => seen.push((doc, version)),
            other => panic!("expected a change, got {other:?}"),
        }
    }
    seen
}

/// Nothing more is reported within a short while.
async fn quiet(watcher: &mut Watcher) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), watcher.next()).await {
        panic!("no more events expected, got {event:?}");
    }
}

/// A batch of 16 writes is one round trip, and so is a batch of 16 reads,
/// with or without a size limit (the default made one per document).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_round_trip() {
    let server = OwnRedis::start(false, &[]);
    let proxy = Proxy::start(server.addr()).await;
    let store = RedisStore::open(RedisConfig::tcp("127.0.0.1", proxy.addr().port()))
        .await
        .expect("open");
    let run = RunId::new("r").expect("valid");
    let docs: Vec<DocName> = (0..16).map(|i| name(&format!("d{i}"))).collect();
    let seeded = store
        .put_bytes(&run, &docs[0], Bytes::from_static(b"seed"))
        .await
        .expect("seed");
    // Every kind of write: an update, creates (scripted) and overwrites
    // (plain transactions).
    let puts: Vec<PutRequest> = docs
        .iter()
        .enumerate()
        .map(|(i, doc)| match i {
            0 => put(doc, b"v1", PutMode::Update(seeded.clone())),
            i if i % 2 == 0 => put(doc, b"v1", PutMode::Create),
            _ => put(doc, b"v1", PutMode::Overwrite),
        })
        .collect();
    let turns = proxy.turns();
    let written = store.put_many(&run, puts).await.expect("a batch");
    assert_eq!(proxy.turns() - turns, 1, "16 writes: one round trip");
    let versions: Vec<Version> = written
        .into_iter()
        .map(|outcome| outcome.expect("written"))
        .collect();
    for options in [GetOptions::new(), GetOptions::new().with_limit(4096)] {
        let turns = proxy.turns();
        let got = store.get_many(&run, &docs, options).await.expect("a batch");
        assert_eq!(
            proxy.turns() - turns,
            1,
            "16 reads ({options:?}): one round trip"
        );
        for (outcome, version) in got.into_iter().zip(&versions) {
            let stored = outcome.expect("read").expect("present");
            assert_eq!((&stored.bytes[..], &stored.version), (&b"v1"[..], version));
        }
    }
}

/// One batch mixing writes that succeed with writes refused by their mode
/// (`Precondition`, `AlreadyExists`) and by the server (a document key of
/// the wrong type): each result is exactly the error the single `put`
/// gives for the same write (same kind, message and context), a refused
/// write stops none of the others, two writes of one document are made in
/// order, and exactly the writes made are announced, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixes_successes_and_refusals() {
    let Some(url) =
        runstate_conformance::server_url("redis", "RUNSTATE_REDIS_URL", "a Redis batch test")
    else {
        return;
    };
    let prefix = format!("rsbatch:{:012x}", fastrand::u64(..) >> 16);
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(prefix.clone())
        .expect("prefix");
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new("mixed").expect("valid");
    let (fresh, taken, stale, current, twice, absent, broken) = (
        name("fresh"),
        name("taken"),
        name("stale"),
        name("current"),
        name("twice"),
        name("absent"),
        name("broken"),
    );
    for doc in [&taken, &stale, &twice] {
        store
            .put_bytes(&run, doc, Bytes::from_static(b"old"))
            .await
            .expect("seed");
    }
    let v_current = store
        .put_bytes(&run, &current, Bytes::from_static(b"old"))
        .await
        .expect("seed");
    let v_twice = store
        .get(&run, &twice, GetOptions::new())
        .await
        .expect("get")
        .expect("there")
        .version;
    // A document key that is not a document hash: every write to it fails
    // with the server's WRONGTYPE (in its script, whatever its mode).
    let mut raw = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw");
    let () = redis::cmd("SET")
        .arg(format!("{prefix}:{{mixed}}:doc:broken"))
        .arg("not a document")
        .query_async(&mut raw)
        .await
        .expect("SET");
    let stale_version = Version::new("0123456789abcdef0123456789abcdef");
    let requests = vec![
        put(&fresh, b"new", PutMode::Create),
        put(&taken, b"new", PutMode::Create),
        put(&stale, b"new", PutMode::Update(stale_version.clone())),
        put(&current, b"new", PutMode::Update(v_current)),
        // The first write of `twice` succeeds; the second, conditional on
        // the version before the first, is then refused.
        put(&twice, b"first", PutMode::Overwrite),
        put(&twice, b"second", PutMode::Update(v_twice.clone())),
        put(&absent, b"new", PutMode::Update(stale_version.clone())),
        put(&broken, b"new", PutMode::Update(stale_version.clone())),
    ];
    let mut watcher = store.watch(&run).await.expect("watch");
    let results = store
        .put_many(&run, requests.clone())
        .await
        .expect("a batch");
    assert_eq!(results.len(), requests.len());
    let written: Vec<usize> = vec![0, 3, 4];
    for (i, (outcome, request)) in results.iter().zip(&requests).enumerate() {
        if written.contains(&i) {
            assert!(outcome.is_ok(), "write {i}: {outcome:?}");
            continue;
        }
        let batched = outcome.as_ref().expect_err("refused");
        // The same write alone, on the same state (nothing refused changed
        // anything), gives the same error.
        let single = store
            .put(
                &run,
                &request.doc,
                request.bytes.clone(),
                PutOptions::mode(request.mode.clone()),
            )
            .await
            .expect_err("refused alone too");
        assert_eq!(batched.to_string(), single.to_string(), "write {i}");
        assert_eq!(batched.is_retryable(), single.is_retryable(), "write {i}");
    }
    let kinds: Vec<Option<ErrorKind>> = results
        .iter()
        .map(|outcome| outcome.as_ref().err().map(runstate_core::Error::kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            None,
            Some(ErrorKind::AlreadyExists),
            Some(ErrorKind::Precondition),
            None,
            None,
            Some(ErrorKind::Precondition),
            Some(ErrorKind::Precondition),
            Some(ErrorKind::Backend),
        ]
    );
    // Exactly the writes made were announced, in order, with the versions
    // they returned.
    let announced = events(&mut watcher, written.len()).await;
    let expected: Vec<(DocName, Version)> = written
        .iter()
        .map(|&i| {
            (
                requests[i].doc.clone(),
                results[i].as_ref().expect("written").clone(),
            )
        })
        .collect();
    assert_eq!(announced, expected);
    quiet(&mut watcher).await;
    // What is stored is what the batch says.
    let got = store
        .get_many(
            &run,
            &[
                fresh.clone(),
                taken,
                stale,
                current.clone(),
                twice.clone(),
                absent,
            ],
            GetOptions::new(),
        )
        .await
        .expect("a batch");
    let contents: Vec<Option<Vec<u8>>> = got
        .iter()
        .map(|outcome| {
            outcome
                .as_ref()
                .expect("read")
                .as_ref()
                .map(|s| s.bytes.to_vec())
        })
        .collect();
    let bytes = |b: &[u8]| Some(b.to_vec());
    assert_eq!(
        contents,
        vec![
            bytes(b"new"),
            bytes(b"old"),
            bytes(b"old"),
            bytes(b"new"),
            bytes(b"first"),
            None
        ]
    );
    // An unconditional overwrite of the broken key fails as the single one
    // does (and indexes and announces nothing, see the review tests).
    let batched = store
        .put_many(&run, vec![put(&broken, b"new", PutMode::Overwrite)])
        .await
        .expect("a batch");
    let single = store
        .put(
            &run,
            &broken,
            Bytes::from_static(b"new"),
            PutOptions::default(),
        )
        .await
        .expect_err("not a document");
    let batched = batched[0].as_ref().expect_err("not a document");
    assert_eq!(batched.to_string(), single.to_string());
    assert_eq!(batched.kind(), ErrorKind::Backend);
    // A read of the broken key fails as the single read does, alone.
    let reads = store
        .get_many(&run, &[broken.clone(), fresh], GetOptions::new())
        .await
        .expect("a batch");
    let single = store
        .get(&run, &broken, GetOptions::new())
        .await
        .expect_err("not a document");
    assert_eq!(
        reads[0].as_ref().expect_err("not a document").to_string(),
        single.to_string()
    );
    assert!(reads[1].as_ref().expect("read").is_some());
    store.purge_prefix().await.expect("purge");
}

/// After `SCRIPT FLUSH` the server no longer knows the scripts: a batch
/// loads them again and sends again only the writes (and limited reads)
/// that were refused for it, so the plain overwrite in the same batch is
/// made, and announced, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_script_is_loaded_again() {
    let server = OwnRedis::start(false, &[]);
    let store = RedisStore::connect(&server.url()).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let (a, b, c) = (name("a"), name("b"), name("c"));
    let vc = store
        .put_bytes(&run, &c, Bytes::from_static(b"c0"))
        .await
        .expect("seed");
    let mut watcher = store.watch(&run).await.expect("watch");
    assert!(server.command(&["SCRIPT", "FLUSH"]).contains("OK"));
    let results = store
        .put_many(
            &run,
            vec![
                put(&a, b"a1", PutMode::Overwrite),
                put(&b, b"b1", PutMode::Create),
                put(&c, b"c1", PutMode::Update(vc)),
            ],
        )
        .await
        .expect("a batch");
    let versions: Vec<Version> = results
        .into_iter()
        .map(|outcome| outcome.expect("written after reloading"))
        .collect();
    // The overwrite went through at once, the scripted writes after the
    // reload: each announced once.
    let announced = events(&mut watcher, 3).await;
    let expected: Vec<(DocName, Version)> = [a.clone(), b.clone(), c.clone()]
        .into_iter()
        .zip(versions.iter().cloned())
        .collect();
    assert_eq!(announced, expected);
    quiet(&mut watcher).await;
    assert!(server.command(&["SCRIPT", "FLUSH"]).contains("OK"));
    let got = store
        .get_many(&run, &[a, b, c], GetOptions::new().with_limit(100))
        .await
        .expect("a batch");
    let read: Vec<Version> = got
        .into_iter()
        .map(|outcome| outcome.expect("read").expect("there").version)
        .collect();
    assert_eq!(read, versions);
}

/// With `wait_replicas` and no replica to acknowledge, every write of a
/// batch that was made fails as the single write does (retryable: made on
/// the primary, maybe lost in a failover), a refused one keeps its own
/// error, and the `WAIT` rides in the batch's one round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_replicas_in_its_round_trip() {
    let server = OwnRedis::start(false, &[]);
    let proxy = Proxy::start(server.addr()).await;
    let config = RedisConfig::tcp("127.0.0.1", proxy.addr().port())
        .with_wait_replicas(1, Duration::from_millis(50));
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let (a, b, c) = (name("a"), name("b"), name("c"));
    let turns = proxy.turns();
    let results = store
        .put_many(
            &run,
            vec![
                put(&a, b"a1", PutMode::Overwrite),
                put(&b, b"b1", PutMode::Create),
                put(&c, b"c1", PutMode::Update(Version::new("nope"))),
            ],
        )
        .await
        .expect("a batch");
    assert_eq!(proxy.turns() - turns, 1, "writes and WAIT: one round trip");
    let single = store
        .put(
            &run,
            &name("d"),
            Bytes::from_static(b"d1"),
            PutOptions::default(),
        )
        .await
        .expect_err("no replica");
    for outcome in &results[..2] {
        let error = outcome.as_ref().expect_err("not replicated");
        assert!(error.is_retryable(), "{error}");
        assert_eq!(error.kind(), single.kind());
        assert_eq!(error.message(), single.message());
    }
    assert_eq!(
        results[2].as_ref().expect_err("refused").kind(),
        ErrorKind::Precondition
    );
    // The writes were made nonetheless.
    let got = store
        .get_many(&run, &[a, b, c], GetOptions::new())
        .await
        .expect("a batch");
    let present: Vec<bool> = got
        .iter()
        .map(|outcome| outcome.as_ref().expect("read").is_some())
        .collect();
    assert_eq!(present, vec![true, true, false]);
}
