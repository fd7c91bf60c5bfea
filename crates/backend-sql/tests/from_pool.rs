//! Issue 15: a store over the application's own sqlx pool
//! ([`SqlStore::from_pool`]), on each database: the schema is created (or
//! its absence reported), the store works on the pool's connections, a
//! pool of another database is refused, and closing the store leaves the
//! pool open.

use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, Lock, LockKey, Owner, PutMode, RunId, Store, StoreExt,
    WatchEvent, display_chain,
};
use runstate_sql::{Dialect, SqlConfig, SqlStore};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

fn prefix() -> String {
    format!("fp{:x}_", fastrand::u32(..))
}

/// The URL of a server of `dialect`, or a fresh SQLite file.
fn url(dialect: Dialect) -> Option<String> {
    match dialect {
        Dialect::Postgres => {
            runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "a pool test")
        }
        Dialect::MySql => {
            runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "a pool test")
        }
        _ => Some(format!(
            "sqlite://{}?mode=rwc",
            std::env::temp_dir()
                .join(format!(
                    "runstate-from-pool-{}-{:x}.db",
                    std::process::id(),
                    fastrand::u64(..)
                ))
                .display()
        )),
    }
}

async fn app_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    let mysql = url.starts_with("mysql:");
    AnyPoolOptions::new()
        .max_connections(3)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if mysql {
                    // What from_pool asks of a MySQL pool.
                    conn.execute("SET time_zone = '+00:00'").await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .expect("the application's pool")
}

async fn store_over_the_applications_pool(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let pool = app_pool(&url).await;
    let prefix = prefix();
    let options = SqlConfig::new(dialect)
        .with_prefix(&prefix)
        .expect("prefix");

    // No schema, migrations off: the check reports it.
    let error = SqlStore::from_pool(pool.clone(), options.clone().with_migrate(false))
        .await
        .expect_err("no tables yet");
    assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
    assert!(
        display_chain(&error).contains("migrations"),
        "{}",
        display_chain(&error)
    );

    // Migrations on: the schema is created, and the store works.
    let store = SqlStore::from_pool(pool.clone(), options.clone())
        .await
        .unwrap_or_else(|e| panic!("{dialect}: {}", display_chain(&e)));
    assert_eq!(store.migrate().await.expect("migrate again"), 0, "applied");
    assert!(store.config().to_string().contains("application pool"));
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("d").expect("valid");
    // Watches work too (PostgreSQL's listener connects as the pool does).
    let mut watch = store.watch(&run).await.expect("watch");
    let version = store
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("put");
    let expected = WatchEvent::Changed {
        doc: doc.clone(),
        version,
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(event))) if event == expected => break,
            // A first look at the run (polling) may come before.
            Ok(Some(Ok(_))) => {}
            other => panic!("{dialect}: no watch event: {other:?}"),
        }
    }
    drop(watch);
    let key = LockKey::Doc(run.clone(), doc.clone());
    let owner = Owner::for_this_process();
    for _ in 0..3 {
        let (lease, stored) = store
            .acquire_and_load(
                &key,
                &doc,
                &owner,
                Duration::from_secs(30),
                GetOptions::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{dialect}: {}", display_chain(&e)));
        let stored = stored.expect("present");
        let n: u32 = std::str::from_utf8(&stored.bytes)
            .expect("utf-8")
            .parse()
            .expect("n");
        store
            .save_and_release(
                &lease,
                &doc,
                Bytes::from((n + 1).to_string()),
                PutMode::Update(stored.version),
            )
            .await
            .expect("save_and_release");
    }
    assert_eq!(
        &store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"3"
    );
    // A second store over the same pool sees the same documents.
    let other = SqlStore::from_pool(pool.clone(), options)
        .await
        .expect("a second store");
    assert!(other.head(&run, &doc).await.expect("head").is_some());

    // Closing the store leaves the application's pool open.
    store.close().await;
    assert!(
        store.get_bytes(&run, &doc).await.is_err(),
        "the store is closed"
    );
    assert!(!pool.is_closed());
    pool.execute("SELECT 1")
        .await
        .expect("the pool still works");
    other.uninstall().await.expect("drop");
    other.close().await;
    pool.close().await;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_over_the_applications_pool() {
    store_over_the_applications_pool(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_store_over_the_applications_pool() {
    store_over_the_applications_pool(Dialect::MySql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_over_the_applications_pool() {
    store_over_the_applications_pool(Dialect::Sqlite).await;
}

/// A pool of another database than the options name is refused, as are
/// settings without a URL handed to `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_another_database_is_refused() {
    let Some(url) = url(Dialect::Sqlite) else {
        return;
    };
    let pool = app_pool(&url).await;
    let error = SqlStore::from_pool(pool.clone(), SqlConfig::new(Dialect::Postgres))
        .await
        .expect_err("another database");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(
        display_chain(&error).contains("sqlite"),
        "{}",
        display_chain(&error)
    );
    let error = SqlStore::open(SqlConfig::new(Dialect::Sqlite))
        .await
        .expect_err("no URL");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(
        display_chain(&error).contains("from_pool"),
        "{}",
        display_chain(&error)
    );
    pool.close().await;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let _ = std::fs::remove_file(path.split('?').next().unwrap_or(path));
    }
}

/// A call cut short inside a transaction (its insert waiting on a row
/// another session holds locked) does not give its connection back to
/// the application's pool: sqlx's ping on release would wait for the
/// insert and hand the next user a connection inside runstate's open
/// transaction, holding its locks. MariaDB's `@@in_transaction` tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_connection_cut_short_in_a_transaction_is_not_given_back() {
    let Some(url) = url(Dialect::MySql) else {
        return;
    };
    let pool = app_pool(&url).await;
    let prefix = prefix();
    let store = SqlStore::from_pool(
        pool.clone(),
        SqlConfig::new(Dialect::MySql)
            .with_prefix(&prefix)
            .expect("prefix")
            .with_timeout(Duration::from_millis(500)),
    )
    .await
    .expect("store");
    let run = RunId::new("r").expect("valid");
    let names: Vec<DocName> = ["a", "b"]
        .iter()
        .map(|n| DocName::new(*n).expect("valid"))
        .collect();
    for name in &names {
        store
            .put_bytes(&run, name, Bytes::from_static(b"0"))
            .await
            .expect("put");
    }
    // Another session holds the row of `b` locked.
    let mut admin = pool.acquire().await.expect("admin");
    admin.execute("START TRANSACTION").await.expect("begin");
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {prefix}documents WHERE run = 'r' AND name = 'b' FOR UPDATE"
        ))))
        .await
        .expect("lock b");
    let puts = names
        .iter()
        .map(|name| {
            runstate_core::PutRequest::new(
                name.clone(),
                Bytes::from_static(b"1"),
                PutMode::Overwrite,
            )
        })
        .collect();
    let outcome = store.put_many(&run, puts).await;
    let cut_short = match &outcome {
        Err(error) => error.kind() == ErrorKind::Timeout,
        Ok(results) => results
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| e.kind() == ErrorKind::Timeout)),
    };
    assert!(cut_short, "the batch waited past its bound: {outcome:?}");
    admin.execute("COMMIT").await.expect("commit");
    drop(admin);
    // Every connection the application's pool lends now is outside any
    // transaction.
    for _ in 0..3 {
        let mut conn = pool.acquire().await.expect("a connection");
        let open: i64 = sqlx::query_scalar("SELECT CAST(@@in_transaction AS SIGNED)")
            .fetch_one(&mut *conn)
            .await
            .expect("in_transaction");
        assert_eq!(open, 0, "a connection inside runstate's transaction");
    }
    store.uninstall().await.expect("drop");
    pool.close().await;
}
