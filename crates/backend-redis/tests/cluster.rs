//! The Redis backend on a Redis Cluster: the whole conformance suite on the
//! cluster named by `RUNSTATE_REDIS_CLUSTER_URL` (three primaries, three
//! replicas, started by `cargo xtask test`), each case under its own random
//! key prefix, and a listing over every primary. The tests that start a
//! cluster of their own, to kill, pause or proxy its nodes, are in
//! `tests/cluster_faults.rs`. Every test is named `cluster::…` (`cargo xtask
//! test --backend redis-cluster` selects them by that).

mod cluster {
    use std::sync::Arc;

    use runstate_conformance::Harness;
    use runstate_core::{Bytes, DocName, Error, ErrorKind, Lock, RunId, async_trait};
    use runstate_redis::{RedisConfig, RedisStore};

    /// The variable holding the cluster's URL.
    const URL_VAR: &str = "RUNSTATE_REDIS_CLUSTER_URL";
    /// The backend's name in `RUNSTATE_REQUIRE_BACKENDS`.
    const BACKEND: &str = "redis-cluster";

    struct RedisCluster;

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
        Error::new(ErrorKind::Backend, "raw redis cluster connection failed").with_source(e)
    }

    /// The `redis://host:port` of each node of a `redis+cluster://` URL.
    fn nodes_of(url: &str) -> Vec<String> {
        let rest = url.strip_prefix("redis+cluster://").unwrap_or(url);
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        authority
            .split(',')
            .map(|node| format!("redis://{node}"))
            .collect()
    }

    #[async_trait]
    impl Harness for RedisCluster {
        const BACKEND: &'static str = BACKEND;
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

        /// As in tests/conformance.rs: the document's key becomes a plain
        /// string (through a raw cluster connection), so every save of it
        /// fails with the server's `WRONGTYPE`.
        async fn make_unwritable(
            namespace: &str,
            run: &RunId,
            doc: &DocName,
        ) -> Result<bool, Error> {
            let Ok(url) = std::env::var(URL_VAR) else {
                return Ok(false);
            };
            let mut raw = redis::cluster::ClusterClient::new(nodes_of(&url))
                .map_err(raw_error)?
                .get_async_connection()
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

    runstate_conformance::suite!(RedisCluster);

    /// Runs on the cluster spread over every primary: 60 runs with one
    /// document each are all listed, in order, page by page.
    #[tokio::test]
    async fn runs_on_every_primary_are_listed() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the listing test").is_none() {
            return;
        }
        let namespace = format!("list{:x}", fastrand::u64(..));
        let store = open(&namespace).await.expect("open").expect("configured");
        let doc = DocName::new("d").expect("name");
        let mut ids: Vec<String> = (0..60).map(|i| format!("run{i:03}")).collect();
        for id in &ids {
            let run = RunId::new(id.as_str()).expect("run");
            runstate_core::Store::put(
                &store,
                &run,
                &doc,
                Bytes::from_static(b"x"),
                runstate_core::PutOptions::default(),
            )
            .await
            .expect("put");
        }
        let mut listed = Vec::new();
        let mut after: Option<RunId> = None;
        loop {
            let page = runstate_core::Store::list_runs(&store, after.as_ref(), 7)
                .await
                .expect("list");
            listed.extend(page.items.iter().map(|r| r.as_str().to_owned()));
            if !page.more {
                break;
            }
            after = page.items.last().cloned();
        }
        ids.sort();
        assert_eq!(listed, ids);
        // A run whose last document goes is no longer listed.
        let gone = RunId::new("run000").expect("run");
        runstate_core::Store::delete(&store, &gone, &doc, None)
            .await
            .expect("delete");
        let page = runstate_core::Store::list_runs(&store, None, 1)
            .await
            .expect("list");
        assert_eq!(page.items[0].as_str(), "run001");
        store.purge_prefix().await.expect("purge");
    }

    /// A cache on the cluster forgets every entry of a run wherever the
    /// run's slot is: twelve runs spread over the primaries, each forgotten
    /// with `remove_run`, leave no entry (a `SCAN` sent to whichever node
    /// the client picks found the entries of a third of them).
    #[tokio::test]
    async fn a_cache_forgets_runs_on_every_primary() {
        use runstate_core::{Cache, Cached, StoredDoc, Version};
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the cache test").is_none() {
            return;
        }
        let namespace = format!("cache{:x}", fastrand::u64(..));
        let store = open(&namespace).await.expect("open").expect("configured");
        let cache = runstate_redis::RedisCache::beside(&store, std::time::Duration::from_secs(600));
        let doc = DocName::new("d").expect("name");
        let runs: Vec<RunId> = (0..12)
            .map(|i| RunId::new(format!("run{i:02}")).expect("run"))
            .collect();
        for run in &runs {
            let copy = Cached::new(
                StoredDoc::new(Bytes::from_static(b"x"), Version::new("1")),
                std::time::SystemTime::now(),
            );
            cache.put(run, &doc, copy).await;
            assert!(cache.get(run, &doc).await.is_some(), "{run} not cached");
        }
        for run in &runs {
            cache.remove_run(run).await;
        }
        let mut left = Vec::new();
        for run in &runs {
            if cache.get(run, &doc).await.is_some() {
                left.push(run.as_str());
            }
        }
        assert!(left.is_empty(), "entries left after remove_run: {left:?}");
        store.purge_prefix().await.expect("purge");
    }
}
