//! Issue 16 on S3: batches as concurrent requests, a locked update that
//! reads its document with its grant, and versions that prove the bytes
//! (an ETag that is their MD5). Races are staged with the wrapping object
//! store of `support` on object_store's `InMemory`; the ETag check runs
//! against a real S3 server (moto, `RUNSTATE_S3_URL`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, Lock, LockKey, Owner, PutMode, PutRequest, RunId, Store,
    StoreExt, Version,
};
use runstate_s3::object_store::ObjectStore;
use runstate_s3::object_store::memory::InMemory;
use runstate_s3::{S3Config, S3Store, version_is_md5_of};

use support::{Faulty, Gate, Op};

const LONG: Duration = Duration::from_secs(30);

/// How long a request that is sent at once may take to reach its gate:
/// far beyond any scheduling delay, and never reached when the request
/// waits for a held one (the test then fails instead of hanging).
const ARRIVES: Duration = Duration::from_secs(10);

fn run() -> RunId {
    RunId::new("r").expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

async fn store_on(objects: Arc<dyn ObjectStore>) -> S3Store {
    let config = S3Config::new("memory")
        .with_prefix("t")
        .expect("prefix")
        .with_skew_pct(0);
    S3Store::from_object_store(objects, config)
        .await
        .expect("open on memory")
}

/// Waits for a held request to arrive, failing the test when it does not.
async fn arrives(gate: &Gate, what: &str) {
    tokio::time::timeout(ARRIVES, gate.arrived())
        .await
        .unwrap_or_else(|_| panic!("{what} was not sent while the other request was held"));
}

/// A locked update's `acquire_and_load` sends the document `GET` with the
/// lease `PUT` that grants it, not after it: with the grant's `PUT` held,
/// the `GET` still reaches the server, both for a lock seen for the first
/// time and for one this store released (the cached path). One round
/// trip of four is saved; nothing is added (`edges.rs` counts requests).
/// (Before, the `GET` waited for the grant: it never arrived here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_update_reads_its_document_with_its_grant() {
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faulty = Faulty::new(Arc::clone(&memory));
    let store = store_on(faulty.clone()).await;
    let v0 = store
        .put_bytes(&run(), &doc("ron"), Bytes::from_static(b"0"))
        .await
        .expect("seed");
    let key = LockKey::Doc(run(), doc("ron"));
    let owner = Owner::for_this_process();
    let mut version = v0;
    for pass in ["first grant", "retaken after a release"] {
        let grant = faulty.hold(Op::Put, "t/.runstate/locks/r/doc.ron.lease");
        let read = faulty.hold(Op::Get, "t/r/ron.json");
        let task = {
            let (store, key, owner) = (store.clone(), key.clone(), owner.clone());
            tokio::spawn(async move {
                store
                    .acquire_and_load(&key, &doc("ron"), &owner, LONG, GetOptions::new())
                    .await
            })
        };
        arrives(&grant, "the grant").await;
        arrives(&read, &format!("the document read ({pass})")).await;
        read.open();
        grant.open();
        let (lease, loaded) = task.await.expect("joined").expect("acquire and load");
        let loaded = loaded.expect("the document");
        assert_eq!(loaded.version, version, "{pass}");
        version = store
            .save_and_release(
                &lease,
                &doc("ron"),
                Bytes::from_static(b"1"),
                PutMode::Update(loaded.version),
            )
            .await
            .expect("save and release");
    }
}

/// The read sent with a grant is used only when that grant's write
/// succeeds. Here this store's cached grant is refused (another store took
/// the lock, saved and released after this store's release, while the
/// read sent with the refused grant had already been answered with the
/// old bytes): the lock is then granted from the lease object as read,
/// and the document returned is the one read with that grant, the other
/// store's save, never the stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sent_with_a_refused_grant_is_not_used() {
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faulty = Faulty::new(Arc::clone(&memory));
    let a = store_on(faulty.clone()).await;
    let b = store_on(Arc::clone(&memory)).await;
    let key = LockKey::Doc(run(), doc("ron"));
    a.put_bytes(&run(), &doc("ron"), Bytes::from_static(b"old"))
        .await
        .expect("seed");
    let owner = Owner::for_this_process();
    let lease = a.try_acquire(&key, &owner, LONG).await.expect("acquire");
    a.release(&lease).await.expect("release: cached by a");

    // A's cached grant is held after the read it carries was answered.
    let grant = faulty.hold(Op::Put, "t/.runstate/locks/r/doc.ron.lease");
    let task = {
        let (a, key, owner) = (a.clone(), key.clone(), owner.clone());
        tokio::spawn(async move {
            a.acquire_and_load(&key, &doc("ron"), &owner, LONG, GetOptions::new())
                .await
        })
    };
    arrives(&grant, "the cached grant").await;
    // Let the read sent with it be answered (old bytes) before B saves.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = Owner::for_this_process();
    let (lease_b, loaded) = b
        .acquire_and_load(&key, &doc("ron"), &other, LONG, GetOptions::new())
        .await
        .expect("B acquires");
    let new = b
        .save_and_release(
            &lease_b,
            &doc("ron"),
            Bytes::from_static(b"new"),
            PutMode::Update(loaded.expect("present").version),
        )
        .await
        .expect("B saves");
    grant.open();
    let (lease, loaded) = task.await.expect("joined").expect("A acquires");
    let loaded = loaded.expect("the document");
    assert_eq!(
        loaded.bytes,
        Bytes::from_static(b"new"),
        "B's save, not the stale read"
    );
    assert_eq!(loaded.version, new);
    assert!(lease.fence() > lease_b.fence(), "a new grant after B's");
    a.release(&lease).await.expect("release");
}

/// `get_many` and `put_many` send their requests concurrently: with the
/// first request of a batch held, the last one still reaches the server.
/// (The default one-at-a-time batches never sent it.) Each result is the
/// single operation's, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_send_their_requests_concurrently() {
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faulty = Faulty::new(Arc::clone(&memory));
    let store = store_on(faulty.clone()).await;
    let names: Vec<DocName> = (0..4).map(|i| doc(&format!("d{i}"))).collect();

    let first = faulty.hold(Op::Put, "t/r/d0.json");
    let last = faulty.hold(Op::Put, "t/r/d3.json");
    let puts = names
        .iter()
        .map(|name| PutRequest::new(name.clone(), Bytes::from(name.to_string()), PutMode::Create))
        .collect();
    let task = {
        let store = store.clone();
        tokio::spawn(async move { store.put_many(&run(), puts).await })
    };
    arrives(&first, "the first write").await;
    arrives(&last, "the last write").await;
    first.open();
    last.open();
    let written = task.await.expect("joined").expect("a batch");
    assert_eq!(written.len(), 4);
    let versions: Vec<Version> = written.into_iter().map(|v| v.expect("created")).collect();

    let first = faulty.hold(Op::Get, "t/r/d0.json");
    let last = faulty.hold(Op::Get, "t/r/d3.json");
    let task = {
        let (store, names) = (store.clone(), names.clone());
        tokio::spawn(async move { store.get_many(&run(), &names, GetOptions::new()).await })
    };
    arrives(&first, "the first read").await;
    arrives(&last, "the last read").await;
    first.open();
    last.open();
    let read = task.await.expect("joined").expect("a batch");
    for ((name, version), got) in names.iter().zip(&versions).zip(read) {
        let got = got.expect("read").expect("present");
        assert_eq!(got.bytes, Bytes::from(name.to_string()));
        assert_eq!(&got.version, version);
    }
}

/// Writes of one document in a batch keep their order (later ones see
/// the earlier ones' outcome, as one at a time), while the others go
/// concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_document_in_a_batch_keep_their_order() {
    let store = store_on(Arc::new(InMemory::new())).await;
    let a = doc("a");
    let results = store
        .put_many(
            &run(),
            vec![
                PutRequest::new(a.clone(), Bytes::from_static(b"1"), PutMode::Create),
                PutRequest::new(doc("b"), Bytes::from_static(b"b"), PutMode::Create),
                PutRequest::new(a.clone(), Bytes::from_static(b"2"), PutMode::Create),
                PutRequest::new(a.clone(), Bytes::from_static(b"3"), PutMode::Overwrite),
                PutRequest::new(
                    a.clone(),
                    Bytes::from_static(b"4"),
                    PutMode::Update(Version::new("\"stale\"")),
                ),
            ],
        )
        .await
        .expect("a batch");
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
    assert_eq!(
        results[2].as_ref().expect_err("a exists").kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        results[4].as_ref().expect_err("stale").kind(),
        ErrorKind::Precondition
    );
    let now = store.get_bytes(&run(), &a).await.expect("get").expect("a");
    assert_eq!(now.bytes, Bytes::from_static(b"3"));
    assert_eq!(Some(&now.version), results[3].as_ref().ok());
}

/// On a real S3 server a single-part `PUT` returns the MD5 of the body as
/// its ETag: the version of a write proves its bytes, and no other bytes.
/// Versions that are not an MD5 (object_store's `InMemory` counts, a
/// multipart ETag, a weak one) prove nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_proves_the_bytes_only_when_it_is_their_md5() {
    let memory = store_on(Arc::new(InMemory::new())).await;
    let v = memory
        .put_bytes(&run(), &doc("m"), Bytes::from_static(b"bytes"))
        .await
        .expect("put");
    assert!(!version_is_md5_of(&v, b"bytes"), "InMemory's ETag {v}");
    // The MD5 of "bytes" is 4b3a6218bb3e3a7303e8a171a60fcf92.
    let md5 = "4b3a6218bb3e3a7303e8a171a60fcf92";
    assert!(version_is_md5_of(
        &Version::new(format!("\"{md5}\"")),
        b"bytes"
    ));
    assert!(version_is_md5_of(
        &Version::new(format!("\"{}\"", md5.to_uppercase())),
        b"bytes"
    ));
    for not in [
        md5.to_owned(),
        format!("W/\"{md5}\""),
        format!("\"{md5}-1\""),
        "\"\"".to_owned(),
        "\"".to_owned(),
    ] {
        assert!(!version_is_md5_of(&Version::new(&not), b"bytes"), "{not}");
    }
    assert!(!version_is_md5_of(
        &Version::new(format!("\"{md5}\"")),
        b"other"
    ));

    let Some(url) = runstate_conformance::server_url("s3", "RUNSTATE_S3_URL", "md5-etag") else {
        return;
    };
    let config = S3Config::from_url(&url).expect("the URL parses");
    let prefix = format!("{}/md5-etag-{:x}", config.prefix(), fastrand::u64(..));
    let store = S3Store::open(config.with_prefix(prefix).expect("prefix"))
        .await
        .expect("open");
    let body = Bytes::from(vec![7u8; 100_000]);
    let v = store
        .put_bytes(&run(), &doc("m"), body.clone())
        .await
        .expect("put");
    assert!(version_is_md5_of(&v, &body), "the server's ETag {v}");
    assert!(!version_is_md5_of(&v, &body[1..]));
    let many = store
        .put_many(
            &run(),
            vec![PutRequest::new(doc("n"), body.clone(), PutMode::Create)],
        )
        .await
        .expect("a batch");
    let v = many[0].as_ref().expect("created");
    assert!(version_is_md5_of(v, &body), "the server's ETag {v}");
    store.purge_prefix().await.expect("cleanup");
}
