//! The conformance suite on object_store's `InMemory`, which honours
//! conditional puts (and `If-None-Match` reads): no server needed. Every
//! case opens [`S3Store::from_object_store`] on one in-memory store shared
//! by the process (each case under its own key prefix), behind the wrapper
//! that can make documents unwritable.
//!
//! An in-memory store lives in one process, so the multi-process cases
//! skip here, saying so ([`Harness::CROSS_PROCESS`]); they run on a real S3
//! server in `conformance.rs`, through the same S3 client code.

mod support;

use std::sync::{Arc, OnceLock};

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, Lock, RunId, async_trait};
use runstate_s3::object_store::ObjectStore;
use runstate_s3::object_store::memory::InMemory;
use runstate_s3::{S3Config, S3Store};

struct Memory;

/// The in-memory store of this process.
fn shared() -> Arc<dyn ObjectStore> {
    static SHARED: OnceLock<Arc<InMemory>> = OnceLock::new();
    Arc::clone(SHARED.get_or_init(|| Arc::new(InMemory::new()))) as Arc<dyn ObjectStore>
}

async fn open(namespace: &str) -> Result<S3Store, Error> {
    let config = S3Config::new("memory").with_prefix(namespace)?;
    S3Store::from_object_store(support::with_unwritable(shared()), config).await
}

#[async_trait]
impl Harness for Memory {
    const BACKEND: &'static str = "s3-memory";
    const URL_VAR: Option<&'static str> = None;
    const CROSS_PROCESS: bool = false;

    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
        Ok(Some(Arc::new(open(namespace).await?) as Arc<dyn Lock>))
    }

    async fn cleanup(namespace: &str) -> Result<(), Error> {
        open(namespace).await?.purge_prefix().await?;
        Ok(())
    }

    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        support::make_unwritable(format!("{namespace}/{run}/{doc}.json"));
        Ok(true)
    }
}

runstate_conformance::suite!(Memory);
