//! The conformance suite against a real Redis server (`RUNSTATE_REDIS_URL`),
//! each case under its own random key prefix.

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, Lock, RunId, async_trait};
use runstate_redis::{RedisConfig, RedisStore};

/// The variable holding the server's URL.
const URL_VAR: &str = "RUNSTATE_REDIS_URL";

struct Redis;

fn prefix(namespace: &str) -> String {
    format!("rstest:{namespace}")
}

async fn open(namespace: &str) -> Result<Option<RedisStore>, Error> {
    let Ok(url) = std::env::var(URL_VAR) else {
        return Ok(None);
    };
    let config = RedisConfig::from_url(&url)?.with_prefix(prefix(namespace))?;
    RedisStore::open(config).await.map(Some)
}

fn raw_error(e: redis::RedisError) -> Error {
    Error::new(
        runstate_core::ErrorKind::Backend,
        "raw redis connection failed",
    )
    .with_source(e)
}

#[async_trait]
impl Harness for Redis {
    const BACKEND: &'static str = "redis";
    const URL_VAR: Option<&'static str> = Some(URL_VAR);

    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
        Ok(open(namespace).await?.map(|s| Arc::new(s) as Arc<dyn Lock>))
    }

    async fn cleanup(namespace: &str) -> Result<(), Error> {
        if let Some(store) = open(namespace).await? {
            store.purge_prefix().await?;
        }
        Ok(())
    }

    /// Turns the document's key into a plain string, a key of the wrong
    /// type for a document hash: every save of it then fails with the
    /// server's `WRONGTYPE`, as a refusing server would. (The key layout is
    /// the one documented in the crate: `<prefix>:{<run>}:doc:<name>`.)
    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        let Ok(url) = std::env::var(URL_VAR) else {
            return Ok(false);
        };
        let mut raw = redis::Client::open(url.as_str())
            .map_err(raw_error)?
            .get_multiplexed_async_connection()
            .await
            .map_err(raw_error)?;
        let key = format!("{}:{{{run}}}:doc:{doc}", prefix(namespace));
        let () = redis::cmd("SET")
            .arg(&key)
            .arg("x")
            .query_async(&mut raw)
            .await
            .map_err(raw_error)?;
        Ok(true)
    }
}

runstate_conformance::suite!(Redis);

/// A connection manager on another database than its configuration is
/// refused: the scripts find WEPPcloud's locks (and the store its
/// channels) by the configuration's database, and looked for them in the
/// wrong one.
#[tokio::test]
async fn a_connection_manager_on_another_database_is_refused() {
    use redis::IntoConnectionInfo;
    let Some(url) =
        runstate_conformance::server_url("redis", URL_VAR, "the connection manager database test")
    else {
        return;
    };
    let config = RedisConfig::from_url(&url).expect("config");
    // The manager on the database after the configuration's.
    let info = url
        .as_str()
        .into_connection_info()
        .expect("connection info");
    let other = (info.redis_settings().db() + 1) % 16;
    let settings = info.redis_settings().clone().set_db(other);
    let client = redis::Client::open(info.set_redis_settings(settings)).expect("client");
    let manager = client
        .get_connection_manager()
        .await
        .expect("connection manager");
    let refused = RedisStore::from_connection_manager(manager, config)
        .await
        .expect_err("a manager on another database than the store's");
    assert_eq!(
        refused.kind(),
        runstate_core::ErrorKind::Config,
        "{refused}"
    );
}

/// Issue 15: a store on a `ConnectionManager` the caller already has (bring
/// your own client). Every command goes through it (the store's writes
/// raise its server-side `CLIENT ID`'s command count, so the id the store
/// reports is the caller's connection), and watching still works through the
/// address of the configuration.
#[tokio::test]
async fn a_store_runs_on_the_callers_connection_manager() {
    use runstate_core::{Bytes, PutOptions, Store, WatchEvent};
    let Some(url) =
        runstate_conformance::server_url("redis", URL_VAR, "the bring-your-own-client test")
    else {
        return;
    };
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut manager = client
        .get_connection_manager()
        .await
        .expect("connection manager");
    let callers_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut manager)
        .await
        .expect("client id");
    let namespace = format!("byo{:x}", fastrand::u64(..));
    let config = RedisConfig::from_url(&url)
        .expect("config")
        .with_prefix(prefix(&namespace))
        .expect("prefix");
    let store = RedisStore::from_connection_manager(manager, config)
        .await
        .expect("store");
    assert_eq!(store.connection_id().await.expect("id"), callers_id);
    let run = RunId::new("byo").expect("run");
    let doc = DocName::new("d").expect("doc");
    let mut watcher = store.watch(&run).await.expect("watch");
    let version = store
        .put(&run, &doc, Bytes::from_static(b"x"), PutOptions::default())
        .await
        .expect("put");
    let got = store
        .get(&run, &doc, runstate_core::GetOptions::default())
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.version, version);
    match tokio::time::timeout(std::time::Duration::from_secs(5), watcher.next()).await {
        Ok(Some(Ok(WatchEvent::Changed { .. }))) => {}
        other => panic!("expected the write to be reported, got {other:?}"),
    }
    store.purge_prefix().await.expect("purge");
}
