//! The conformance suite on cached stores: a store with a cache in front,
//! opened by URL (`…?cache=memory` or `…?cache=<redis URL>`). Each case's
//! own handle has its own cache; `writes_behind_the_back_are_never_lost`
//! writes through a second handle (another cache, as another worker has),
//! and the multi-process cases' children have theirs.
//!
//! - `memory+cache`: the in-memory store with an in-process cache (no
//!   server), its child-process cases skipped;
//! - `file+cache`: files with an in-process cache;
//! - `postgres+rediscache`: PostgreSQL with a Redis cache shared by every
//!   handle and process;
//! - `file+redisclustercache`: files with a cache on the Redis Cluster named
//!   by `RUNSTATE_REDIS_CLUSTER_URL` (a run's entries live on the primary of
//!   its slot).

#[path = "support/urls.rs"]
#[allow(dead_code)] // each test crate uses its own part
mod urls;

use std::sync::Arc;

use runstate::{Error, Lock, async_trait};
use runstate_conformance::Harness;
use urls::{encode, with_option};

fn root(namespace: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("runstate-cached-{namespace}"))
}

async fn open(url: String) -> Result<Option<Arc<dyn Lock>>, Error> {
    let store = runstate::open(&url).await?;
    Ok(Some(store.into_lock()))
}

mod memory_cache {
    use super::*;

    pub struct Cached;

    #[async_trait]
    impl Harness for Cached {
        const BACKEND: &'static str = "memory+cache";
        const URL_VAR: Option<&'static str> = None;
        const CROSS_PROCESS: bool = false;

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            open(format!(
                "memory://cached-{namespace}?cache=memory&cache_bytes=1048576"
            ))
            .await
        }

        async fn cleanup(_namespace: &str) -> Result<(), Error> {
            Ok(())
        }
    }

    runstate_conformance::suite!(Cached);
}

mod file_cache {
    use super::*;

    pub struct Cached;

    #[async_trait]
    impl Harness for Cached {
        const BACKEND: &'static str = "file+cache";
        const URL_VAR: Option<&'static str> = None;

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            open(format!("file://{}?cache=memory", root(namespace).display())).await
        }

        async fn cleanup(namespace: &str) -> Result<(), Error> {
            let _ = std::fs::remove_dir_all(root(namespace));
            Ok(())
        }
    }

    runstate_conformance::suite!(Cached);
}

mod postgres_redis_cache {
    use super::*;

    pub struct Cached;

    fn urls(namespace: &str) -> Option<(String, String)> {
        let postgres = std::env::var("RUNSTATE_POSTGRES_URL").ok()?;
        let redis = std::env::var("RUNSTATE_REDIS_URL").ok()?;
        Some((
            with_option(&postgres, &format!("prefix={namespace}_")),
            with_option(&redis, &format!("prefix=rstest:{namespace}")),
        ))
    }

    #[async_trait]
    impl Harness for Cached {
        const BACKEND: &'static str = "postgres+rediscache";
        const URL_VAR: Option<&'static str> = Some("RUNSTATE_POSTGRES_URL");

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            let Some((postgres, redis)) = urls(namespace) else {
                return Ok(None);
            };
            open(with_option(&postgres, &format!("cache={}", encode(&redis)))).await
        }

        async fn cleanup(namespace: &str) -> Result<(), Error> {
            if let Some((postgres, redis)) = urls(namespace) {
                let store = runstate::sql::SqlStore::connect(&postgres).await?;
                store.uninstall().await?;
                store.close().await;
                runstate::redis::RedisStore::connect(&redis)
                    .await?
                    .purge_prefix()
                    .await?;
            }
            Ok(())
        }
    }

    runstate_conformance::suite!(Cached);
}

mod file_redis_cluster_cache {
    use super::*;

    pub struct Cached;

    const URL_VAR: &str = "RUNSTATE_REDIS_CLUSTER_URL";

    fn cluster(namespace: &str) -> Option<String> {
        let cluster = std::env::var(URL_VAR).ok()?;
        Some(with_option(&cluster, &format!("prefix=rstest:{namespace}")))
    }

    fn files(namespace: &str) -> std::path::PathBuf {
        root(&format!("cluster-{namespace}"))
    }

    #[async_trait]
    impl Harness for Cached {
        const BACKEND: &'static str = "file+redisclustercache";
        const URL_VAR: Option<&'static str> = Some(URL_VAR);

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            let Some(cluster) = cluster(namespace) else {
                return Ok(None);
            };
            open(format!(
                "file://{}?cache={}",
                files(namespace).display(),
                encode(&cluster)
            ))
            .await
        }

        async fn cleanup(namespace: &str) -> Result<(), Error> {
            let _ = std::fs::remove_dir_all(files(namespace));
            if let Some(cluster) = cluster(namespace) {
                runstate::redis::RedisStore::connect(&cluster)
                    .await?
                    .purge_prefix()
                    .await?;
            }
            Ok(())
        }
    }

    runstate_conformance::suite!(Cached);
}
