//! Case group 8: A holder that stalls past its TTL cannot overwrite newer data.

use std::time::Duration;

use runstate_core::{Bytes, ErrorKind, LockKey, PutMode, PutOptions, StoreExt};

use super::expect_kind;
use crate::Ctx;

async fn stale_holder(ctx: &Ctx, key: LockKey) {
    let doc = ctx.doc("watershed");
    let run = key.run().clone();
    let v0 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"original"))
        .await
        .expect("seed");
    let (a, b) = (ctx.owner(), ctx.owner());

    let (lease_a, loaded) = ctx
        .store
        .acquire_and_load(
            &key,
            &doc,
            &a,
            Duration::from_millis(300),
            Default::default(),
        )
        .await
        .expect("A acquires");
    assert_eq!(loaded.expect("A loads").version, v0);

    // A stalls past its TTL.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let lease_b = ctx
        .store
        .try_acquire(&key, &b, Duration::from_secs(10))
        .await
        .expect("B takes over");
    assert!(lease_b.fence() > lease_a.fence());
    let vb = ctx
        .store
        .save_and_release(
            &lease_b,
            &doc,
            Bytes::from_static(b"from B"),
            PutMode::Update(v0.clone()),
        )
        .await
        .expect("B saves");

    let error = expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"from stale A"),
                PutOptions::overwrite().with_lease(&lease_a),
            )
            .await,
        ErrorKind::Fenced,
    );
    assert!(!error.is_retryable(), "Fenced is final");
    assert_eq!(
        error.lock(),
        Some(lease_a.key()),
        "the refusal names its lock"
    );
    // A paused right after checking its own deadline: its lease dated now,
    // so only the store's fence check can refuse it.
    let paused = lease_a.renewed(lease_a.ttl(), std::time::Instant::now());
    for mode in [PutMode::Overwrite, PutMode::Update(v0.clone())] {
        expect_kind(
            ctx.store
                .put(
                    &run,
                    &doc,
                    Bytes::from_static(b"from paused A"),
                    PutOptions::mode(mode).with_lease(&paused),
                )
                .await,
            ErrorKind::Fenced,
        );
    }
    expect_kind(
        ctx.store
            .save_and_release(
                &lease_a,
                &doc,
                Bytes::from_static(b"from stale A"),
                PutMode::Update(v0),
            )
            .await,
        ErrorKind::Fenced,
    );
    let stored = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&stored.bytes[..], b"from B", "B's data intact");
    assert_eq!(stored.version, vb);
}

/// A (300 ms TTL) stalls; B takes the document lock and saves; A's fenced
/// save is `Fenced`, B's data stays.
pub async fn stale_holder_is_fenced(ctx: Ctx) {
    let key = LockKey::Doc(ctx.run("r"), ctx.doc("watershed"));
    stale_holder(&ctx, key).await;
}

/// The same with a lock on the whole run.
pub async fn stale_run_lock_holder_is_fenced(ctx: Ctx) {
    let key = LockKey::Run(ctx.run("r"));
    stale_holder(&ctx, key).await;
}

/// What every backend promises, `Fencing::VersionOnly` ones included: a
/// fenced save conditional on the version loaded under the lease is refused
/// when the document changed since, and nothing is written. Backends
/// declaring `Fencing::Atomic` must also refuse stale leases outright,
/// which the stale-holder cases check for all backends.
pub async fn fenced_save_is_conditional_on_the_loaded_version(ctx: Ctx) {
    let caps = ctx.store.capabilities().clone();
    assert!(!caps.backend.is_empty(), "a backend names itself");
    assert!(
        caps.conditional_put && caps.leases,
        "the suite needs conditional writes and leases"
    );
    let (run, doc) = (ctx.run("r"), ctx.doc("soils"));
    let key = LockKey::Doc(run.clone(), doc.clone());
    let v0 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"v0"))
        .await
        .expect("seed");
    let (lease, loaded) = ctx
        .store
        .acquire_and_load(
            &key,
            &doc,
            &ctx.owner(),
            std::time::Duration::from_secs(30),
            Default::default(),
        )
        .await
        .expect("acquire");
    assert_eq!(loaded.expect("present").version, v0);
    let v1 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"v1 by an unlocked writer"))
        .await
        .expect("an unfenced writer");
    expect_kind(
        ctx.store
            .save_and_release(
                &lease,
                &doc,
                Bytes::from_static(b"v2 from a stale read"),
                PutMode::Update(v0),
            )
            .await,
        ErrorKind::Precondition,
    );
    let stored = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        (stored.version, &stored.bytes[..]),
        (v1, &b"v1 by an unlocked writer"[..])
    );
    assert!(
        ctx.store.inspect(&key).await.expect("inspect").is_none(),
        "released"
    );
}
