//! The conformance suite against a real S3 server (`RUNSTATE_S3_URL`, for
//! example moto's server mode started by `cargo xtask test`), each case
//! under its own key prefix.

use std::sync::Arc;

use runstate_conformance::Harness;
use runstate_core::{Error, Lock, async_trait};
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
    S3Store::open(config.with_prefix(prefix)?).await.map(Some)
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
}

runstate_conformance::suite!(S3);
