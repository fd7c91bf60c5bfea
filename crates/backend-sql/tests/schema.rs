//! Migrations, the table prefix, limits of each database, and secrets.

use std::time::Duration;

use runstate_core::{Bytes, DocName, ErrorKind, GetOptions, RunId, Store, StoreExt, display_chain};
use runstate_sql::{SqlConfig, SqlStore};

fn prefix() -> String {
    format!("schema{:x}_", fastrand::u32(..))
}

fn sqlite_url(tag: &str) -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "runstate-schema-{tag}-{}-{:x}.db",
        std::process::id(),
        fastrand::u64(..)
    ));
    (format!("sqlite://{}", path.display()), path)
}

async fn migrations_on_demand(url: &str) {
    let config = SqlConfig::from_url(url)
        .expect("url")
        .with_prefix(prefix())
        .expect("prefix");
    let error = SqlStore::open(config.clone().with_migrate(false))
        .await
        .expect_err("no tables yet");
    assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
    assert!(
        display_chain(&error).contains("migrations"),
        "says what to do: {}",
        display_chain(&error)
    );

    // Several processes opening at once take turns; all succeed.
    let opens = (0..4).map(|_| SqlStore::open(config.clone()));
    let stores: Vec<SqlStore> = futures_join(opens)
        .await
        .into_iter()
        .map(|r| r.expect("open"))
        .collect();
    assert_eq!(
        stores[0].migrate().await.expect("migrate again"),
        0,
        "already applied"
    );
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    stores[1]
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert_eq!(
        &stores[2]
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"x"
    );
    let bare = SqlStore::open(config.clone().with_migrate(false))
        .await
        .expect("tables exist now");
    bare.uninstall().await.expect("drop");
}

async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrations_on_demand_and_concurrent() {
    let (url, path) = sqlite_url("migrate");
    migrations_on_demand(&url).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_on_demand_and_concurrent() {
    let Some(url) =
        runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "a schema test")
    else {
        return;
    };
    migrations_on_demand(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_migrations_on_demand_and_concurrent() {
    let Some(url) =
        runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "a schema test")
    else {
        return;
    };
    migrations_on_demand(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_is_created_and_shared() {
    let (url, path) = sqlite_url("create");
    assert!(!path.exists());
    let a = SqlStore::connect(&url).await.expect("creates the database");
    let b = SqlStore::connect(&url).await.expect("opens it again");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    a.put_bytes(&run, &doc, Bytes::from_static(b"shared"))
        .await
        .expect("put");
    assert_eq!(
        &b.get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"shared"
    );
    assert!(path.exists());
    assert!(!a.capabilities().multi_host);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_knows_its_packet_limit() {
    let Some(url) =
        runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "a schema test")
    else {
        return;
    };
    let store = SqlStore::open(
        SqlConfig::from_url(&url)
            .expect("url")
            .with_prefix(prefix())
            .expect("prefix"),
    )
    .await
    .expect("open");
    let max = store.capabilities().max_document_size.expect("a limit");
    assert!(
        max > 8 << 20,
        "max_allowed_packet leaves room for 8 MiB documents: {max}"
    );
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("big").expect("valid"),
    );
    let error = store
        .put_bytes(
            &run,
            &doc,
            Bytes::from(vec![0u8; usize::try_from(max).expect("fits") + 1]),
        )
        .await
        .expect_err("over the limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge);
    assert!(
        store
            .get(&run, &doc, GetOptions::new())
            .await
            .expect("get")
            .is_none(),
        "nothing written"
    );
    store.uninstall().await.expect("drop");
}

const SENTINEL: &str = "S3ntinel-sql-PW-0c4f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_password_never_shows() {
    let Some(url) =
        runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "a schema test")
    else {
        return;
    };
    let host = url.split('@').next_back().expect("host part");
    let wrong = format!("mysql://root:{SENTINEL}@{host}");
    let config = SqlConfig::from_url(&wrong)
        .expect("url")
        .with_timeout(Duration::from_secs(3));
    for shown in [config.to_string(), format!("{config:?}")] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
    let error = SqlStore::open(config).await.expect_err("wrong password");
    assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
    for shown in [display_chain(&error), format!("{error:?}")] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_password_never_shows() {
    let Some(url) =
        runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "a schema test")
    else {
        return;
    };
    // The shared server trusts local connections, so the password is
    // accepted and must still never be shown.
    let with_password = url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{SENTINEL}@"),
        1,
    );
    let store = SqlStore::open(
        SqlConfig::from_url(&with_password)
            .expect("url")
            .with_prefix(prefix())
            .expect("prefix"),
    )
    .await
    .expect("open");
    for shown in [
        format!("{store:?}"),
        store.config().to_string(),
        format!("{:?}", store.config()),
    ] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
    store.uninstall().await.expect("drop");
    let unreachable = format!("postgres://postgres:{SENTINEL}@127.0.0.1:1/test");
    let error = SqlStore::open(
        SqlConfig::from_url(&unreachable)
            .expect("url")
            .with_acquire_timeout(Duration::from_secs(2)),
    )
    .await
    .expect_err("nobody listens");
    assert!(error.is_retryable(), "{}", display_chain(&error));
    for shown in [display_chain(&error), format!("{error:?}")] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
}

/// SQLite's `head` and listings carry the modified time `updated_at`
/// holds (text, to the millisecond), read back as the time it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_head_and_list_carry_modified_times() {
    let (url, path) = sqlite_url("modified");
    let store = SqlStore::connect(&url).await.expect("open");
    assert!(store.capabilities().modified_times);
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let before = std::time::SystemTime::now() - Duration::from_secs(2);
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"hello"))
        .await
        .expect("put");
    let after = std::time::SystemTime::now() + Duration::from_secs(2);
    let stat = store
        .head(&run, &doc)
        .await
        .expect("head")
        .expect("present");
    assert_eq!(stat.size, 5);
    let modified = stat.modified.expect("a modified time");
    assert!(before <= modified && modified <= after, "{modified:?}");
    let page = store.list_docs(&run, None, 10).await.expect("list");
    assert_eq!(page.items[0].modified, Some(modified));
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"y"))
        .await
        .expect("put again");
    let again = store
        .head(&run, &doc)
        .await
        .expect("head")
        .expect("present");
    assert!(again.modified.expect("a time") > modified);
    let absent = DocName::new("absent").expect("valid");
    assert!(store.head(&run, &absent).await.expect("head").is_none());
    store.close().await;
    let _ = std::fs::remove_file(&path);
}
