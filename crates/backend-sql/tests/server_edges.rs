//! Edges of the server backends, staged for real: a waiter granted right
//! after its holder created the document (its statement blocked on the
//! holder's uncommitted transaction), lost replies to an acquire (a
//! loopback proxy forwards the request and drops the reply), round trips
//! and bytes on the wire of a locked update, and a save refused before it
//! is sent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use runstate_conformance::proxy::{Proxy, ReplyFault};
use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, Lock, LockExt, LockKey, Owner, PutMode, RunId, Store,
    StoreExt, WaitPolicy, display_chain,
};
use runstate_sql::{Dialect, SqlConfig, SqlStore};
use sqlx::{AnyConnection, Connection, Executor, Row};

const TTL: Duration = Duration::from_secs(60);

fn url(dialect: Dialect) -> Option<String> {
    match dialect {
        Dialect::Postgres => {
            runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "an edge test")
        }
        _ => runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "an edge test"),
    }
}

fn prefix() -> String {
    format!("edge{:x}_", fastrand::u32(..))
}

fn ids() -> (RunId, DocName, LockKey) {
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("d").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    (run, doc, key)
}

async fn open(url: &str, prefix: &str) -> SqlStore {
    SqlStore::open(
        SqlConfig::from_url(url)
            .expect("url")
            .with_prefix(prefix)
            .expect("prefix"),
    )
    .await
    .expect("open")
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

/// Item 8. The previous holder creates the document and frees the lease in
/// one transaction (what a creating `save_and_release` does), which is
/// left open until the waiter's `acquire_and_load` is blocked on the lease
/// row; then it commits. The waiter is granted the lock and must load the
/// new document: in PostgreSQL its statement's snapshot predates the
/// insert, so the row is invisible to it even with `FOR SHARE`.
async fn waiter_loads_the_document_its_holder_created(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let (run, doc, key) = ids();
    let holder = store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("the holder acquires");

    let mut writer = raw(&url).await;
    let mut observer = raw(&url).await;
    let (writer_id, bytes, now) = match dialect {
        Dialect::Postgres => (
            raw_count(&mut writer, "SELECT pg_backend_pid()::bigint".into()).await,
            "decode('68656c6c6f', 'hex')",
            "now()",
        ),
        _ => (
            raw_count(&mut writer, "SELECT CAST(CONNECTION_ID() AS SIGNED)".into()).await,
            "X'68656c6c6f'",
            "UTC_TIMESTAMP(6)",
        ),
    };
    raw_run(&mut writer, "BEGIN".into()).await;
    raw_run(
        &mut writer,
        format!(
            "INSERT INTO {prefix}documents (run, name, version, bytes, size, updated_at) \
             VALUES ('r', 'd', 4242, {bytes}, 5, {now})"
        ),
    )
    .await;
    raw_run(
        &mut writer,
        format!("UPDATE {prefix}leases SET expires_at_ms = NULL WHERE run = 'r' AND doc = 'd'"),
    )
    .await;

    let waiter = {
        let (store, key, doc) = (store.clone(), key.clone(), doc.clone());
        tokio::spawn(async move {
            store
                .acquire_and_load(
                    &key,
                    &doc,
                    &Owner::for_this_process(),
                    TTL,
                    GetOptions::new(),
                )
                .await
        })
    };
    // Wait until the waiter's statement is blocked by the writer's
    // transaction, as the server itself reports it.
    let blocked = match dialect {
        Dialect::Postgres => format!(
            "SELECT count(*)::bigint FROM pg_stat_activity \
             WHERE {writer_id} = ANY(pg_blocking_pids(pid))"
        ),
        _ => format!(
            "SELECT COUNT(*) FROM information_schema.innodb_trx \
             WHERE trx_state = 'LOCK WAIT' AND trx_query LIKE '%{prefix}%'"
        ),
    };
    let since = Instant::now();
    while raw_count(&mut observer, blocked.clone()).await == 0 {
        if waiter.is_finished() {
            let outcome = waiter.await.expect("joined");
            panic!("the waiter did not wait for the lease row: {outcome:?}");
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "the waiter never blocked on the lease row"
        );
        // Not faster: InnoDB refreshes what `innodb_trx` shows only when
        // it was not read for 100 ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    raw_run(&mut writer, "COMMIT".into()).await;

    let (lease, stored) = waiter
        .await
        .expect("joined")
        .unwrap_or_else(|e| panic!("the waiter is granted: {}", display_chain(&e)));
    assert!(lease.fence() > holder.fence());
    let stored = stored.expect("the waiter loads the document created before its grant");
    assert_eq!(&stored.bytes[..], b"hello");
    assert_eq!(stored.version.as_str(), "4242");
    store
        .save_and_release(
            &lease,
            &doc,
            Bytes::from_static(b"next"),
            PutMode::Update(stored.version),
        )
        .await
        .expect("the waiter's save");
    assert_eq!(
        &store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"next"
    );
    let _ = writer.close().await;
    let _ = observer.close().await;
    store.uninstall().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiter_loads_the_document_its_holder_created() {
    waiter_loads_the_document_its_holder_created(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_waiter_loads_the_document_its_holder_created() {
    waiter_loads_the_document_its_holder_created(Dialect::MySql).await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Item 12. The reply to an acquire is lost (the proxy forwards the
/// request, the server grants, the reply never arrives): the caller gets a
/// retryable error, and its retry under the same owner gets that grant
/// back at once (same fence), for `try_acquire` and for `acquire_and_load`
/// retried by `LockExt`'s wait loop; not `Locked` behind itself for a
/// whole TTL.
async fn lost_acquire_reply_is_retried_to_the_same_grant(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let (proxy, store) = through_proxy(&url, &prefix).await;
    let (_run, doc, key) = ids();
    let owner = Owner::for_this_process();
    // Warm up: the statements are prepared on the pooled connection, so
    // the acquire's request is one message naming the owner.
    let warm = LockKey::Doc(RunId::new("warm").expect("valid"), doc.clone());
    let lease = store.try_acquire(&warm, &owner, TTL).await.expect("warm");
    store.release(&lease).await.expect("release");
    let (lease, _) = store
        .acquire_and_load(&warm, &doc, &owner, TTL, GetOptions::new())
        .await
        .expect("warm");
    store.release(&lease).await.expect("release");

    let id = owner.id().as_bytes().to_vec();
    proxy.arm(ReplyFault::drop_when(move |request| contains(request, &id)));
    let error = store
        .try_acquire(&key, &owner, TTL)
        .await
        .expect_err("the reply is lost");
    assert_eq!(proxy.fired(), 1, "the fault fired");
    assert!(error.is_retryable(), "{}", display_chain(&error));
    let granted = store
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("the grant was applied");
    assert_eq!(granted.owner, owner);
    let lease = store
        .try_acquire(&key, &owner, TTL)
        .await
        .unwrap_or_else(|e| panic!("the retry gets its grant back: {}", display_chain(&e)));
    assert_eq!(lease.fence(), granted.fence, "the same grant");
    let other = store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect_err("still held");
    assert_eq!(other.kind(), ErrorKind::Locked);
    store.release(&lease).await.expect("one release frees it");
    assert!(store.inspect(&key).await.expect("inspect").is_none());

    let id = owner.id().as_bytes().to_vec();
    proxy.arm(ReplyFault::drop_when(move |request| contains(request, &id)));
    let policy = WaitPolicy::with_timeout(Duration::from_secs(5));
    let (lease, _) = store
        .acquire_and_load_waiting(&key, &doc, &owner, TTL, GetOptions::new(), &policy)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "acquire_and_load retried after a lost reply: {}",
                display_chain(&e)
            )
        });
    assert_eq!(proxy.fired(), 2, "the second fault fired");
    let held = store.inspect(&key).await.expect("inspect").expect("held");
    assert_eq!(held.fence, lease.fence(), "the grant made by the lost call");
    assert!(lease.fence() > granted.fence);
    store.release(&lease).await.expect("release");
    store.uninstall().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_acquire_reply_is_retried_to_the_same_grant() {
    lost_acquire_reply_is_retried_to_the_same_grant(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_lost_acquire_reply_is_retried_to_the_same_grant() {
    lost_acquire_reply_is_retried_to_the_same_grant(Dialect::MySql).await;
}

/// Item 21. Once the pool is warm, a locked update of an existing document
/// (acquire-and-load, then save-and-release) is exactly two round trips on
/// the wire: no ping before lending a connection, none after taking it
/// back.
async fn locked_update_is_two_round_trips(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let (proxy, store) = through_proxy(&url, &prefix).await;
    let (run, doc, key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"0"))
        .await
        .expect("put");
    let owner = Owner::for_this_process();
    let update = || async {
        let (lease, stored) = store
            .acquire_and_load(&key, &doc, &owner, TTL, GetOptions::new())
            .await
            .expect("acquire_and_load");
        let stored = stored.expect("present");
        let n: u32 = std::str::from_utf8(&stored.bytes)
            .expect("utf-8")
            .parse()
            .expect("a number");
        store
            .save_and_release(
                &lease,
                &doc,
                Bytes::from((n + 1).to_string()),
                PutMode::Update(stored.version),
            )
            .await
            .expect("save_and_release");
    };
    update().await;
    update().await;
    // Whatever the pool does after a call, it has done by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let before = proxy.turns();
        update().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            proxy.turns() - before,
            2,
            "a locked update is two round trips on {dialect}"
        );
    }
    assert_eq!(
        &store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"5"
    );
    store.uninstall().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_locked_update_is_two_round_trips() {
    locked_update_is_two_round_trips(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_locked_update_is_two_round_trips() {
    locked_update_is_two_round_trips(Dialect::MySql).await;
}

/// Item 21. A refused `acquire_and_load` does not download the document:
/// MySQL's procedure joins it only when the lock was granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_refused_acquire_and_load_does_not_download_the_document() {
    let Some(url) = url(Dialect::MySql) else {
        return;
    };
    let prefix = prefix();
    let (proxy, store) = through_proxy(&url, &prefix).await;
    let (run, doc, key) = ids();
    const MIB: usize = 1 << 20;
    store
        .put_bytes(&run, &doc, Bytes::from(vec![7u8; MIB]))
        .await
        .expect("put 1 MiB");
    let holder = store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("the holder acquires");
    let other = Owner::for_this_process();
    for _ in 0..2 {
        let before = proxy.bytes_to_client();
        let error = store
            .acquire_and_load(&key, &doc, &other, TTL, GetOptions::new())
            .await
            .expect_err("held by another owner");
        assert_eq!(error.kind(), ErrorKind::Locked);
        let moved = proxy.bytes_to_client() - before;
        assert!(
            moved < 16 * 1024,
            "a refused acquire_and_load moved {moved} bytes to the client"
        );
    }
    store.release(&holder).await.expect("release");
    let (lease, stored) = store
        .acquire_and_load(&key, &doc, &other, TTL, GetOptions::new())
        .await
        .expect("granted now");
    assert_eq!(stored.expect("loaded when granted").bytes.len(), MIB);
    store.release(&lease).await.expect("release");
    store.uninstall().await.expect("drop");
}

/// Item 7. A save refused before anything is sent (over MySQL's packet
/// limit) still releases the lease of `save_and_release`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_save_and_release_over_the_size_limit_releases() {
    let Some(url) = url(Dialect::MySql) else {
        return;
    };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let (_run, doc, key) = ids();
    let max = store.capabilities().max_document_size.expect("a limit");
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("acquire");
    let error = store
        .save_and_release(
            &lease,
            &doc,
            Bytes::from(vec![0u8; usize::try_from(max).expect("fits") + 1]),
            PutMode::Overwrite,
        )
        .await
        .expect_err("over the limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge);
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "the lease is released after a save refused for its size"
    );
    store
        .try_acquire(&key, &Owner::for_this_process(), TTL)
        .await
        .expect("another owner takes it at once");
    store.uninstall().await.expect("drop");
}

/// Item 21. A pooled connection that broke while idle (its server-side
/// session killed) costs the next call one retryable error, no more: the
/// connection is dropped, and the call after it connects afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_broken_idle_connection_is_one_retryable_error() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let prefix = prefix();
    let store = open(&url, &prefix).await;
    let (run, doc, _key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    let mut admin = raw(&url).await;
    let killed = raw_count(
        &mut admin,
        format!(
            "SELECT count(pg_terminate_backend(pid))::bigint FROM pg_stat_activity \
             WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() AND query LIKE '%{prefix}%'"
        ),
    )
    .await;
    assert!(killed >= 1, "the store's idle connection was killed");
    let mut errors = 0;
    loop {
        match store.get_bytes(&run, &doc).await {
            Ok(stored) => {
                assert_eq!(&stored.expect("present").bytes[..], b"x");
                break;
            }
            Err(error) => {
                assert!(error.is_retryable(), "{}", display_chain(&error));
                errors += 1;
                assert!(errors <= 1, "one error per broken connection");
            }
        }
    }
    let _ = admin.close().await;
    store.uninstall().await.expect("drop");
}

/// Review finding: a session the server ends with an error of its own
/// (PostgreSQL's FATAL `57P05`, idle_session_timeout) is one retryable
/// error, and its connection is not lent again: the next call succeeds on
/// a new one. Before the fix the error was permanent and the dead
/// connection went back to the pool, failing the next call too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_session_ended_by_the_server_is_one_retryable_error() {
    let Some(url) = url(Dialect::Postgres) else {
        return;
    };
    let prefix = prefix();
    let sep = if url.contains('?') { '&' } else { '?' };
    let short = format!("{url}{sep}options[idle_session_timeout]=300ms");
    let store = SqlStore::open(
        SqlConfig::from_url(&short)
            .expect("url")
            .with_prefix(&prefix)
            .expect("prefix")
            .with_max_connections(1),
    )
    .await
    .expect("open");
    let (run, doc, _key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    // The one pooled connection idles past the timeout: the server sends
    // FATAL 57P05 and closes it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let error = store
        .get_bytes(&run, &doc)
        .await
        .expect_err("the session was ended");
    assert!(error.is_retryable(), "{}", display_chain(&error));
    let stored = store
        .get_bytes(&run, &doc)
        .await
        .unwrap_or_else(|e| panic!("a new connection: {}", display_chain(&e)));
    assert_eq!(&stored.expect("present").bytes[..], b"x");
    store.uninstall().await.expect("drop");
}

/// Review finding, MariaDB: a session killed by `KILL CONNECTION` while
/// idle in the pool costs one retryable error, and its connection is not
/// lent again. The store connects as a user of its own, so the test kills
/// only its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_killed_session_is_one_retryable_error() {
    let Some(url) = url(Dialect::MySql) else {
        return;
    };
    let prefix = prefix();
    let user = format!("{prefix}u");
    let mut admin = raw(&url).await;
    raw_run(
        &mut admin,
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"),
    )
    .await;
    let mut parsed = url::Url::parse(&url).expect("url");
    let db = parsed.path().trim_start_matches('/').to_owned();
    raw_run(&mut admin, format!("GRANT ALL ON `{db}`.* TO '{user}'@'%'")).await;
    parsed.set_username(&user).expect("user");
    parsed.set_password(Some("pw")).expect("password");
    let store = SqlStore::open(
        SqlConfig::from_url(parsed.as_str())
            .expect("url")
            .with_prefix(&prefix)
            .expect("prefix")
            .with_max_connections(1),
    )
    .await
    .expect("open");
    let (run, doc, _key) = ids();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    let ids: Vec<i64> = admin
        .fetch_all(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE user = '{user}'"
        ))))
        .await
        .expect("processlist")
        .iter()
        .map(|row| row.try_get::<i64, _>(0).expect("an id"))
        .collect();
    assert!(!ids.is_empty(), "the store's session is listed");
    for id in ids {
        raw_run(&mut admin, format!("KILL CONNECTION {id}")).await;
    }
    let mut errors = 0;
    loop {
        match store.get_bytes(&run, &doc).await {
            Ok(stored) => {
                assert_eq!(&stored.expect("present").bytes[..], b"x");
                break;
            }
            Err(error) => {
                assert!(error.is_retryable(), "{}", display_chain(&error));
                errors += 1;
                assert!(errors <= 1, "one error per killed session");
            }
        }
    }
    store.uninstall().await.expect("drop");
    store.close().await;
    raw_run(&mut admin, format!("DROP USER '{user}'@'%'")).await;
    let _ = admin.close().await;
}

/// `head` is one `SELECT` that leaves the bytes on the server (one round
/// trip, far fewer bytes than the document), and it and listings carry
/// the document's modified time, which a later write moves forward.
async fn head_is_one_statement_without_the_body(dialect: Dialect) {
    let Some(url) = url(dialect) else { return };
    let prefix = prefix();
    let (proxy, store) = through_proxy(&url, &prefix).await;
    assert!(store.capabilities().modified_times);
    let (run, doc, _key) = ids();
    let body = Bytes::from(vec![b'x'; 256 * 1024]);
    let before = std::time::SystemTime::now() - Duration::from_secs(2);
    store
        .put_bytes(&run, &doc, body.clone())
        .await
        .expect("put");
    let after = std::time::SystemTime::now() + Duration::from_secs(2);
    store.head(&run, &doc).await.expect("warm");
    let (turns, bytes) = (proxy.turns(), proxy.bytes_to_client());
    let stat = store
        .head(&run, &doc)
        .await
        .expect("head")
        .expect("present");
    assert_eq!(proxy.turns() - turns, 1, "one round trip on {dialect}");
    assert!(
        proxy.bytes_to_client() - bytes < 4096,
        "no body on {dialect}: {} bytes",
        proxy.bytes_to_client() - bytes
    );
    assert_eq!(stat.size, body.len() as u64);
    let modified = stat.modified.expect("a modified time");
    assert!(before <= modified && modified <= after, "{modified:?}");
    let page = store.list_docs(&run, None, 10).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].modified, Some(modified));
    assert_eq!(page.items[0].version, stat.version);
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
    assert!(again.modified.expect("a time") > modified, "moved forward");
    assert_ne!(again.version, stat.version);
    assert_eq!(again.size, 1);
    let absent = DocName::new("absent").expect("valid");
    assert!(store.head(&run, &absent).await.expect("head").is_none());
    store.uninstall().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_head_is_one_statement_without_the_body() {
    head_is_one_statement_without_the_body(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_head_is_one_statement_without_the_body() {
    head_is_one_statement_without_the_body(Dialect::MySql).await;
}
