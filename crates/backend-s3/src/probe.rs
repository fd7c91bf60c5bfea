//! The conditional-write probe ("doctor").
//!
//! Some S3-compatible servers accept `If-None-Match` and `If-Match` and
//! silently ignore them, which would turn every lock into one that always
//! succeeds. The probe races conflicting conditional writes on a scratch key
//! and reports whether the server refused the ones it must refuse.

use std::fmt;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReport {
    /// A second create-only write (`If-None-Match: *`) of an existing key
    /// was refused.
    pub create_only: bool,
    /// A write conditional on the version the object had before its last
    /// change (`If-Match` on its ETag; on GCS, on its generation) was
    /// refused.
    pub update_if_match: bool,
    /// Of 8 concurrent create-only writes of one new key, exactly one won.
    pub exclusive_race: bool,
}

impl ProbeReport {
    /// Whether conditional writes, and so leases, can be trusted.
    pub fn honoured(&self) -> bool {
        self.create_only && self.update_if_match && self.exclusive_race
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "honoured" } else { "IGNORED" };
        write!(
            f,
            "If-None-Match: {}; If-Match: {}; concurrent creates: {}",
            yes(self.create_only),
            yes(self.update_if_match),
            if self.exclusive_race {
                "one winner"
            } else {
                "SEVERAL WINNERS"
            }
        )
    }
}

/// Runs the probe under `scratch` (a prefix only the probe uses) and
/// removes what it wrote.
pub(crate) async fn probe(
    store: &Arc<dyn ObjectStore>,
    scratch: &Path,
) -> Result<ProbeReport, object_store::Error> {
    let key = scratch.clone().join(format!("p{:016x}", fastrand::u64(..)));
    let create = PutOptions::from(PutMode::Create);
    let first = store
        .put_opts(&key, PutPayload::from_static(b"first"), create.clone())
        .await?;
    let create_only = matches!(
        store
            .put_opts(&key, PutPayload::from_static(b"second"), create.clone())
            .await,
        Err(object_store::Error::AlreadyExists { .. })
    );
    // An update conditional on the version the first write returned, once
    // the object changed: its ETag, and its generation where the server
    // returns one. Naming the generation itself makes the GCS wrapper
    // (`GenerationMatch`) send it as it is, so the server, not the
    // wrapper's own comparison of ETags, is what must refuse.
    store
        .put_opts(
            &key,
            PutPayload::from_static(b"third"),
            PutOptions::default(),
        )
        .await?;
    let wrong = PutOptions::from(PutMode::Update(UpdateVersion {
        e_tag: Some(
            first
                .e_tag
                .unwrap_or_else(|| "\"runstate-probe-no-such-etag\"".to_owned()),
        ),
        version: first.version,
    }));
    let update_if_match = matches!(
        store
            .put_opts(&key, PutPayload::from_static(b"fourth"), wrong)
            .await,
        Err(object_store::Error::Precondition { .. })
    );
    let raced = scratch.clone().join(format!("r{:016x}", fastrand::u64(..)));
    let attempts = (0..8).map(|i| {
        let (store, raced, create) = (Arc::clone(store), raced.clone(), create.clone());
        tokio::spawn(async move {
            store
                .put_opts(&raced, PutPayload::from(format!("racer {i}")), create)
                .await
                .is_ok()
        })
    });
    let mut winners = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        if attempt.await.unwrap_or(false) {
            winners += 1;
        }
    }
    for path in [&key, &raced] {
        let _ = store.delete(path).await;
    }
    Ok(ProbeReport {
        create_only,
        update_if_match,
        exclusive_race: winners == 1,
    })
}
