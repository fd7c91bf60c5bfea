//! The conformance suite against a real S3 server (`RUNSTATE_S3_URL`, for
//! example moto's server mode started by `cargo xtask test`), each case
//! under its own key prefix. The store is opened on the S3 client behind a
//! wrapper that can make chosen documents unwritable
//! ([`Harness::make_unwritable`]).

mod support;

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, Lock, RunId, async_trait};
use runstate_s3::{S3Config, S3Store};

const URL_VAR: &str = "RUNSTATE_S3_URL";

struct S3;

async fn open(namespace: &str) -> Result<Option<S3Store>, Error> {
    let Ok(url) = std::env::var(URL_VAR) else {
        return Ok(None);
    };
    let config = S3Config::from_url(&url)?;
    let prefix = if config.prefix().is_empty() {
        namespace.to_owned()
    } else {
        format!("{}/{namespace}", config.prefix())
    };
    // The parent process probed the server when it opened the case; its
    // child processes (the multi-process cases) skip the probe, which would
    // only load a shared test server while the case waits for them.
    let child = std::env::var_os(runstate_conformance::CHILD_VAR).is_some();
    let config = config.with_prefix(prefix)?.with_probe(!child);
    let client = support::with_unwritable(config.object_store()?);
    S3Store::from_object_store(client, config).await.map(Some)
}

#[async_trait]
impl Harness for S3 {
    const BACKEND: &'static str = "s3";
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

    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        support::make_unwritable(format!("{namespace}/{run}/{doc}.json"));
        Ok(true)
    }
}

runstate_conformance::suite!(S3);
