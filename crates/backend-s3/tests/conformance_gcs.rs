//! The conformance suite on a stand-in for Google Cloud Storage's
//! conditional writes ([`support::gcs::GcsLike`] on object_store's
//! `InMemory`: updates must name a generation, listings carry none), opened
//! as `gs://` opens GCS ([`Provider::Gcs`]). No GCS server or emulator is
//! reachable from this machine, so this checks the backend's side of the
//! GCS protocol (an update by ETag made a compare-and-swap on the
//! generation), not Google's servers.
//!
//! As on `InMemory`, the multi-process cases skip.

mod support;

use std::sync::{Arc, OnceLock};

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, Lock, RunId, async_trait};
use runstate_s3::object_store::ObjectStore;
use runstate_s3::object_store::memory::InMemory;
use runstate_s3::{Provider, S3Config, S3Store};

struct GcsLike;

fn shared() -> Arc<dyn ObjectStore> {
    static SHARED: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    Arc::clone(SHARED.get_or_init(|| support::gcs::GcsLike::wrap(Arc::new(InMemory::new()))))
}

async fn open(namespace: &str) -> Result<S3Store, Error> {
    let config = S3Config::new("gcs-like")
        .with_provider(Provider::Gcs)
        .with_prefix(namespace)?;
    S3Store::from_object_store(support::with_unwritable(shared()), config).await
}

#[async_trait]
impl Harness for GcsLike {
    const BACKEND: &'static str = "s3-gcs-like";
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

runstate_conformance::suite!(GcsLike);

/// Wave-2 review, finding 9: on GCS the probe asks the server itself
/// whether it honours a generation condition. A stand-in that ignores the
/// generation an update names is caught (no conditional writes, no
/// leases); one that honours it passes. (The probe's update named a wrong
/// ETag, which the GCS wrapper refused on its own after a `HEAD`, so the
/// server's answer never counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_asks_a_gcs_server_itself() {
    for (blind, honoured) in [(false, true), (true, false)] {
        let objects = if blind {
            support::gcs::GcsLike::wrap_blind(Arc::new(InMemory::new()))
        } else {
            support::gcs::GcsLike::wrap(Arc::new(InMemory::new()))
        };
        let config = S3Config::new("gcs-like")
            .with_provider(Provider::Gcs)
            .with_prefix("probe")
            .expect("prefix");
        let store = S3Store::from_object_store(objects, config)
            .await
            .expect("open");
        let report = store.probe_report().expect("probed");
        assert_eq!(report.honoured(), honoured, "blind {blind}: {report}");
        assert_eq!(report.update_if_match, honoured, "blind {blind}: {report}");
        assert_eq!(runstate_core::Store::capabilities(&store).leases, honoured);
    }
}
