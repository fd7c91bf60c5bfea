//! The conformance suite against a real Redis server (`RUNSTATE_REDIS_URL`),
//! each case under its own random key prefix.

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{Error, Lock, async_trait};
use runstate_redis::{RedisConfig, RedisStore};

/// The variable holding the server's URL.
const URL_VAR: &str = "RUNSTATE_REDIS_URL";

struct Redis;

async fn open(namespace: &str) -> Result<Option<RedisStore>, Error> {
    let Ok(url) = std::env::var(URL_VAR) else {
        return Ok(None);
    };
    let config = RedisConfig::from_url(&url)?.with_prefix(format!("rstest:{namespace}"))?;
    RedisStore::open(config).await.map(Some)
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
}

runstate_conformance::suite!(Redis);
