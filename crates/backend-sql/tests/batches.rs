//! Issue 16: native batches on each database. `get_many` is one statement
//! (per 256 names), `put_many` one statement per group of writes on
//! PostgreSQL, one transaction of a few statements on MySQL and one
//! transaction on SQLite; each write still gets exactly the outcome a
//! single `put` would give (its own mode, a row the database refuses
//! failing alone), large batches are split, a document written twice in a
//! batch is written in order, and PostgreSQL announces every batched write.

use std::net::SocketAddr;
use std::time::Duration;

use runstate_conformance::proxy::Proxy;
use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, PutMode, PutRequest, RunId, Store, StoreExt, Version,
    WatchEvent, display_chain,
};
use runstate_sql::{DEFAULT_PREFIX, Dialect, SqlConfig, SqlStore};
use sqlx::{AnyConnection, Connection, Executor};

const DIALECTS: [Dialect; 3] = [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite];

fn prefix() -> String {
    format!("bt{:x}_", fastrand::u32(..))
}

/// The URL of a server of `dialect`, or a fresh SQLite file; `None` when
/// the server is not configured (and not required).
fn url(dialect: Dialect) -> Option<String> {
    match dialect {
        Dialect::Postgres => {
            runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "a batch test")
        }
        Dialect::MySql => {
            runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "a batch test")
        }
        _ => Some(format!(
            "sqlite://{}",
            std::env::temp_dir()
                .join(format!(
                    "runstate-batches-{}-{:x}.db",
                    std::process::id(),
                    fastrand::u64(..)
                ))
                .display()
        )),
    }
}

async fn open(url: &str, prefix: &str) -> SqlStore {
    let config = SqlConfig::from_url(url).expect("url");
    // SQLite files are per test: the default prefix, as the triggers name it.
    let config = if url.starts_with("sqlite:") {
        config
    } else {
        config.with_prefix(prefix).expect("prefix")
    };
    SqlStore::open(config)
        .await
        .unwrap_or_else(|e| panic!("open: {}", display_chain(&e)))
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

async fn raw_run(url: &str, statements: &[String]) {
    sqlx::any::install_default_drivers();
    let mut conn = AnyConnection::connect(url).await.expect("a raw connection");
    for sql in statements {
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    conn.close().await.expect("close");
}

fn run() -> RunId {
    RunId::new("r").expect("valid")
}

fn doc(name: impl Into<String>) -> DocName {
    DocName::new(name.into()).expect("valid")
}

fn creates(names: &[DocName]) -> Vec<PutRequest> {
    names
        .iter()
        .map(|name| PutRequest::new(name.clone(), Bytes::from(name.to_string()), PutMode::Create))
        .collect()
}

/// Round trips on the wire, once the statements are prepared: a batch of
/// 32 creates is one statement on PostgreSQL, and on MySQL a transaction
/// of four (begin, insert, read back the versions, commit); a read of 32
/// documents is one statement on both. (One at a time they were 32.)
async fn a_batch_is_a_few_round_trips(dialect: Dialect, writes: u64) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let (proxy, store) = through_proxy(&url, &prefix).await;
    let names: Vec<DocName> = (0..32).map(|i| doc(format!("d{i:02}"))).collect();
    // The first batch of this shape prepares its statements.
    let warm = RunId::new("warm").expect("valid");
    store.put_many(&warm, creates(&names)).await.expect("warm");
    store
        .get_many(&warm, &names, GetOptions::new())
        .await
        .expect("warm");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = proxy.turns();
    let written = store
        .put_many(&run(), creates(&names))
        .await
        .expect("a batch");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.turns() - before, writes, "32 creates on {dialect}");
    assert!(written.iter().all(Result::is_ok));

    let before = proxy.turns();
    let read = store
        .get_many(&run(), &names, GetOptions::new())
        .await
        .expect("a batch");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.turns() - before, 1, "32 reads on {dialect}");
    for ((name, version), got) in names.iter().zip(&written).zip(read) {
        let got = got.expect("read").expect("present");
        assert_eq!(got.bytes, Bytes::from(name.to_string()));
        assert_eq!(Some(&got.version), version.as_ref().ok());
    }
    cleanup(&store, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_is_a_few_round_trips() {
    a_batch_is_a_few_round_trips(Dialect::Postgres, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_a_batch_is_a_few_round_trips() {
    a_batch_is_a_few_round_trips(Dialect::MySql, 4).await;
}

/// Every mode in one batch, each write with its own outcome: updates at
/// the right version and at a stale one (MySQL then reads back which were
/// made), creates of new and existing documents, an update of an absent
/// one, an overwrite, and a second write of a document after its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_of_a_batch_has_its_own_outcome() {
    for dialect in DIALECTS {
        let Some(url) = url(dialect) else { continue };
        let store = open(&url, &prefix()).await;
        let seed = |name: &str| {
            let store = store.clone();
            let name = doc(name);
            async move {
                store
                    .put_bytes(&run(), &name, Bytes::from_static(b"seed"))
                    .await
                    .expect("seed")
            }
        };
        let (v1, _v2, _v3) = (seed("u1").await, seed("u2").await, seed("c1").await);
        let stale = Version::new("12345");
        let results = store
            .put_many(
                &run(),
                vec![
                    PutRequest::new(doc("u1"), Bytes::from_static(b"u1"), PutMode::Update(v1)),
                    PutRequest::new(
                        doc("u2"),
                        Bytes::from_static(b"u2"),
                        PutMode::Update(stale.clone()),
                    ),
                    PutRequest::new(doc("c1"), Bytes::from_static(b"c1"), PutMode::Create),
                    PutRequest::new(doc("c2"), Bytes::from_static(b"c2"), PutMode::Create),
                    PutRequest::new(
                        doc("gone"),
                        Bytes::from_static(b"g"),
                        PutMode::Update(stale),
                    ),
                    PutRequest::new(doc("o1"), Bytes::from_static(b"o1"), PutMode::Overwrite),
                    PutRequest::new(doc("c2"), Bytes::from_static(b"c2 again"), PutMode::Create),
                    PutRequest::new(
                        doc("o1"),
                        Bytes::from_static(b"o1 again"),
                        PutMode::Overwrite,
                    ),
                ],
            )
            .await
            .expect("a batch");
        let kind = |i: usize| results[i].as_ref().err().map(runstate_core::Error::kind);
        assert_eq!(kind(0), None, "{dialect}: update at its version");
        assert_eq!(kind(1), Some(ErrorKind::Precondition), "{dialect}: stale");
        assert_eq!(kind(2), Some(ErrorKind::AlreadyExists), "{dialect}: exists");
        assert_eq!(kind(3), None, "{dialect}: created");
        assert_eq!(kind(4), Some(ErrorKind::Precondition), "{dialect}: absent");
        assert_eq!(kind(5), None, "{dialect}: overwritten");
        assert_eq!(
            kind(6),
            Some(ErrorKind::AlreadyExists),
            "{dialect}: created before"
        );
        assert_eq!(kind(7), None, "{dialect}: overwritten again");
        let names = ["u1", "u2", "c1", "c2", "gone", "o1"].map(doc);
        let now = store
            .get_many(&run(), &names, GetOptions::new())
            .await
            .expect("read");
        let bytes: Vec<Option<Bytes>> = now
            .into_iter()
            .map(|r| r.expect("read").map(|d| d.bytes))
            .collect();
        let b = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            bytes,
            vec![b("u1"), b("seed"), b("seed"), b("c2"), None, b("o1 again")],
            "{dialect}"
        );
        let o1 = store
            .get_bytes(&run(), &doc("o1"))
            .await
            .expect("get")
            .expect("o1");
        assert_eq!(Some(&o1.version), results[7].as_ref().ok(), "{dialect}");
        cleanup(&store, &url).await;
    }
}

/// A row the database refuses (a constraint or trigger: a full disk or a
/// refusing server would do the same) fails its own write only: the
/// refused group is rolled back and written again one at a time, so the
/// other writes of the batch are made and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_fails_alone() {
    for dialect in DIALECTS {
        let Some(url) = url(dialect) else { continue };
        let prefix = prefix();
        let store = open(&url, &prefix).await;
        let refuse = "run = 'r' AND name = 'bad'";
        let statements = match dialect {
            Dialect::Sqlite => ["INSERT", "UPDATE"]
                .map(|event| {
                    format!(
                        "CREATE TRIGGER refuse_{event} BEFORE {event} ON {DEFAULT_PREFIX}documents \
                         WHEN NEW.run = 'r' AND NEW.name = 'bad' \
                         BEGIN SELECT RAISE(ABORT, 'refused'); END"
                    )
                })
                .to_vec(),
            _ => vec![format!(
                "ALTER TABLE {prefix}documents ADD CONSTRAINT {prefix}refuse CHECK (NOT ({refuse}))"
            )],
        };
        raw_run(&url, &statements).await;
        let results = store
            .put_many(
                &run(),
                vec![
                    PutRequest::new(doc("a"), Bytes::from_static(b"a"), PutMode::Create),
                    PutRequest::new(doc("bad"), Bytes::from_static(b"bad"), PutMode::Create),
                    PutRequest::new(doc("c"), Bytes::from_static(b"c"), PutMode::Overwrite),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{dialect}: a batch: {}", display_chain(&e)));
        assert!(results[0].is_ok(), "{dialect}");
        let refused = results[1].as_ref().expect_err("refused by the database");
        assert_eq!(refused.kind(), ErrorKind::Backend, "{dialect}");
        assert_eq!(refused.doc(), Some(&doc("bad")), "{dialect}");
        assert!(results[2].is_ok(), "{dialect}");
        let now = store
            .get_many(&run(), &["a", "bad", "c"].map(doc), GetOptions::new())
            .await
            .expect("read");
        let present: Vec<bool> = now.iter().map(|r| matches!(r, Ok(Some(_)))).collect();
        assert_eq!(present, [true, false, true], "{dialect}");
        cleanup(&store, &url).await;
    }
}

/// Batches beyond one statement: 300 writes (64 a group) and 600 reads
/// of 300 names (256 a statement, each name asked twice), then documents
/// over the bytes of one group (each goes alone), and a size limit that
/// refuses some documents of a read and not others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_split() {
    for dialect in DIALECTS {
        let Some(url) = url(dialect) else { continue };
        let store = open(&url, &prefix()).await;
        let names: Vec<DocName> = (0..300).map(|i| doc(format!("n{i:03}"))).collect();
        let written = store
            .put_many(&run(), creates(&names))
            .await
            .expect("writes");
        assert!(written.iter().all(Result::is_ok), "{dialect}");
        let twice: Vec<DocName> = names.iter().chain(names.iter().rev()).cloned().collect();
        let read = store
            .get_many(&run(), &twice, GetOptions::new().with_limit(4))
            .await
            .expect("reads");
        assert_eq!(read.len(), 600);
        for (name, got) in twice.iter().zip(read) {
            let i = names.iter().position(|n| n == name).expect("asked");
            match got {
                Ok(Some(stored)) => {
                    assert!(name.as_str().len() <= 4, "{dialect}: {name}");
                    assert_eq!(stored.bytes, Bytes::from(name.to_string()));
                    assert_eq!(Some(&stored.version), written[i].as_ref().ok());
                }
                Err(error) => {
                    assert!(name.as_str().len() > 4, "{dialect}: {name}");
                    assert_eq!(error.kind(), ErrorKind::TooLarge, "{dialect}");
                    assert_eq!(error.doc(), Some(name), "{dialect}");
                }
                Ok(None) => panic!("{dialect}: {name} is missing"),
            }
        }
        // Three documents of 3 MiB: more than one group holds.
        let big: Vec<PutRequest> = (0..3u8)
            .map(|i| {
                PutRequest::new(
                    doc(format!("big{i}")),
                    Bytes::from(vec![i; 3 << 20]),
                    PutMode::Overwrite,
                )
            })
            .collect();
        let written = store.put_many(&run(), big).await.expect("big writes");
        assert!(written.iter().all(Result::is_ok), "{dialect}");
        for i in 0..3u8 {
            let got = store
                .get_bytes(&run(), &doc(format!("big{i}")))
                .await
                .expect("get")
                .expect("present");
            assert!(got.bytes.len() == 3 << 20 && got.bytes.iter().all(|b| *b == i));
        }
        cleanup(&store, &url).await;
    }
}

/// PostgreSQL announces every write of a batch, as it announces a single
/// write (`NOTIFY` from the writing statement), and nothing for the
/// refused ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batched_writes_are_announced() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let store = open(&url, &prefix()).await;
    let existing = store
        .put_bytes(&run(), &doc("x"), Bytes::from_static(b"x"))
        .await
        .expect("seed");
    let mut watch = store.watch(&run()).await.expect("watch");
    let names: Vec<DocName> = (0..3).map(|i| doc(format!("w{i}"))).collect();
    let mut puts = creates(&names);
    puts.push(PutRequest::new(
        doc("x"),
        Bytes::from_static(b"no"),
        PutMode::Create,
    ));
    let written = store.put_many(&run(), puts).await.expect("a batch");
    assert!(written[3].is_err());
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an event in time")
            .expect("the feed is open")
            .expect("an event");
        seen.push(event);
    }
    let mut expected: Vec<WatchEvent> = names
        .iter()
        .zip(&written)
        .map(|(name, version)| WatchEvent::Changed {
            doc: name.clone(),
            version: version.as_ref().expect("written").clone(),
        })
        .collect();
    let key = |e: &WatchEvent| format!("{e:?}");
    seen.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(seen, expected);
    // Nothing for the refused create: the next event is a later write.
    let later = store
        .put_bytes(&run(), &doc("x"), Bytes::from_static(b"later"))
        .await
        .expect("put");
    assert_ne!(later, existing);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event in time")
        .expect("the feed is open")
        .expect("an event");
    assert_eq!(
        next,
        WatchEvent::Changed {
            doc: doc("x"),
            version: later
        }
    );
    cleanup(&store, &url).await;
}

/// Batches written at the same time into one run, as a migration's lanes
/// write them (16 batches of 16 KiB documents at once, their names
/// interleaved): none fails. (MySQL's
/// transactions under REPEATABLE READ took gap locks and deadlocked each
/// other; they run under READ COMMITTED now, and a group that still meets
/// a deadlock is rolled back whole and sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_into_one_run_all_succeed() {
    for dialect in DIALECTS {
        let Some(url) = url(dialect) else { continue };
        let store = open(&url, &prefix()).await;
        for round in 0..8 {
            let run = RunId::new(format!("lanes{round}")).expect("valid");
            let tasks: Vec<_> = (0..16)
                .map(|lane| {
                    let (store, run) = (store.clone(), run.clone());
                    tokio::spawn(async move {
                        let names: Vec<DocName> = (0..8)
                            .map(|i| doc(format!("doc{:05}", i * 16 + lane)))
                            .collect();
                        let puts = names
                            .into_iter()
                            .map(|name| {
                                PutRequest::new(
                                    name,
                                    Bytes::from(vec![7u8; 16 * 1024]),
                                    PutMode::Create,
                                )
                            })
                            .collect();
                        store.put_many(&run, puts).await
                    })
                })
                .collect();
            for task in tasks {
                let written = task
                    .await
                    .expect("joined")
                    .unwrap_or_else(|e| panic!("{dialect}: {}", display_chain(&e)));
                assert!(written.iter().all(Result::is_ok), "{dialect}");
            }
            let listed = store.list_all_docs(&run).await.expect("list");
            assert_eq!(listed.len(), 128, "{dialect}");
        }
        cleanup(&store, &url).await;
    }
}

/// Batches of every mode written at the same time into one run whose
/// documents exist, their names interleaved: creates of existing and new
/// documents, overwrites and updates (inserts that meet existing rows, the
/// case where InnoDB locks most). None fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_batches_into_one_run_all_succeed() {
    for dialect in DIALECTS {
        let Some(url) = url(dialect) else { continue };
        let store = open(&url, &prefix()).await;
        for round in 0..6 {
            let run = RunId::new(format!("mixed{round}")).expect("valid");
            // Every other document exists already.
            let existing: Vec<DocName> = (0..128)
                .step_by(2)
                .map(|i| doc(format!("doc{i:05}")))
                .collect();
            let written = store
                .put_many(&run, creates(&existing))
                .await
                .expect("seed");
            let versions: std::collections::HashMap<DocName, Version> = existing
                .iter()
                .cloned()
                .zip(written.into_iter().map(|w| w.expect("seeded")))
                .collect();
            let versions = std::sync::Arc::new(versions);
            let tasks: Vec<_> = (0..16)
                .map(|lane| {
                    let (store, run, versions) = (store.clone(), run.clone(), versions.clone());
                    tokio::spawn(async move {
                        let puts = (0..8)
                            .map(|i| {
                                let name = doc(format!("doc{:05}", i * 16 + lane));
                                let mode = match (versions.get(&name), i % 3) {
                                    (Some(v), 0) => PutMode::Update(v.clone()),
                                    (_, 1) => PutMode::Overwrite,
                                    _ => PutMode::Create,
                                };
                                PutRequest::new(name, Bytes::from(vec![9u8; 4 * 1024]), mode)
                            })
                            .collect();
                        store.put_many(&run, puts).await
                    })
                })
                .collect();
            for task in tasks {
                task.await
                    .expect("joined")
                    .unwrap_or_else(|e| panic!("{dialect}: {}", display_chain(&e)));
            }
            let listed = store.list_all_docs(&run).await.expect("list");
            assert_eq!(listed.len(), 128, "{dialect}");
        }
        cleanup(&store, &url).await;
    }
}
