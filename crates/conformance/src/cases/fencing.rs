//! Case group 12: what a store must do to hold the documents of a split
//! store (fence watermarks for leases granted elsewhere), and conditional
//! reads (what a cache validates a hit with).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::{
    Bytes, ErrorKind, Fence, Fetched, GetOptions, Lease, LockKey, Owner, PutMode, PutOptions,
    StoreExt,
};

use super::expect_kind;
use crate::Ctx;

/// A lease as another lock service would have granted it.
fn foreign(key: &LockKey, fence: u64) -> Lease {
    Lease::new(
        key.clone(),
        Owner::for_this_process(),
        Fence(fence),
        Duration::from_secs(30),
        Instant::now(),
        SystemTime::now(),
    )
}

/// With [`Capabilities::foreign_fencing`](runstate_core::Capabilities): a
/// claim raises the lock's watermark and reads the document in one step;
/// a save under a foreign lease below the watermark is `Fenced` and writes
/// nothing; at or above it, it writes (and raises the watermark); a claim
/// below the watermark is `Fenced`. Watermarks are per lock. Without it,
/// claims and foreign-fenced saves are `Unsupported`.
pub async fn foreign_fences_are_checked_by_the_store(ctx: Ctx) {
    let (run, doc) = (ctx.run("split"), ctx.doc("climate"));
    let key = LockKey::Doc(run.clone(), doc.clone());
    let v0 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"v0"))
        .await
        .expect("seed");
    if !ctx.store.capabilities().foreign_fencing {
        expect_kind(
            ctx.store
                .claim(&key, Fence(1), Some(&doc), GetOptions::new())
                .await,
            ErrorKind::Unsupported,
        );
        return;
    }
    let old = foreign(&key, 5);
    let loaded = ctx
        .store
        .claim(&key, old.fence(), Some(&doc), GetOptions::new())
        .await
        .expect("claim 5")
        .expect("the document");
    assert_eq!(loaded.version, v0);
    // A newer grant claims before the old holder saves.
    let new = foreign(&key, 9);
    let seen = ctx
        .store
        .claim(&key, new.fence(), Some(&doc), GetOptions::new())
        .await
        .expect("claim 9")
        .expect("the document");
    assert_eq!(seen.version, v0);
    // The stalled old holder is refused even though the new one has not
    // written, whatever its mode; the fence is checked first, so a stale
    // holder hears `Fenced`, not that the document changed.
    for mode in [
        PutMode::Update(v0.clone()),
        PutMode::Overwrite,
        PutMode::Update(runstate_core::Version::new("not-the-version")),
        PutMode::Create,
    ] {
        let error = expect_kind(
            ctx.store
                .put(
                    &run,
                    &doc,
                    Bytes::from_static(b"stale"),
                    PutOptions::mode(mode).with_foreign_lease(&old),
                )
                .await,
            ErrorKind::Fenced,
        );
        assert!(!error.is_retryable());
        assert_eq!(error.lock(), Some(&key), "the refusal names its lock");
    }
    expect_kind(
        ctx.store
            .claim(&key, Fence(7), Some(&doc), GetOptions::new())
            .await,
        ErrorKind::Fenced,
    );
    assert_eq!(
        &ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"v0",
        "nothing written by a refused holder"
    );
    // The current holder saves, conditional on its version as ever.
    let v1 = ctx
        .store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"v1"),
            PutOptions::update(v0.clone()).with_foreign_lease(&new),
        )
        .await
        .expect("the current holder saves");
    expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"v2"),
                PutOptions::update(v0).with_foreign_lease(&new),
            )
            .await,
        ErrorKind::Precondition,
    );
    // A later grant's save raises the watermark by itself.
    let later = foreign(&key, 12);
    ctx.store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"v3"),
            PutOptions::update(v1).with_foreign_lease(&later),
        )
        .await
        .expect("a later grant saves");
    expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"late"),
                PutOptions::overwrite().with_foreign_lease(&new),
            )
            .await,
        ErrorKind::Fenced,
    );
    // Watermarks are per lock: another document's lock is untouched, and
    // a run lock's watermark is its own.
    let other = ctx.doc("soils");
    let other_key = LockKey::Doc(run.clone(), other.clone());
    ctx.store
        .put(
            &run,
            &other,
            Bytes::from_static(b"s"),
            PutOptions::create().with_foreign_lease(&foreign(&other_key, 1)),
        )
        .await
        .expect("another lock starts low");
    let run_key = LockKey::Run(run.clone());
    assert!(
        ctx.store
            .claim(&run_key, Fence(2), None, GetOptions::new())
            .await
            .expect("run lock claim")
            .is_none()
    );
    // A lease must cover what it saves.
    expect_kind(
        ctx.store
            .put(
                &run,
                &other,
                Bytes::from_static(b"x"),
                PutOptions::overwrite().with_foreign_lease(&later),
            )
            .await,
        ErrorKind::InvalidArgument,
    );
}

/// `get_if_changed`: `Unchanged` for the stored version (without the
/// bytes, where the backend says so), `Changed` with the bytes after a
/// write, `Absent` once deleted; the size limit still applies.
pub async fn conditional_get_validates_a_version(ctx: Ctx) {
    let (run, doc) = (ctx.run("cached"), ctx.doc("watershed"));
    let v1 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"one"))
        .await
        .expect("put");
    assert_eq!(
        ctx.store
            .get_if_changed(&run, &doc, &v1, GetOptions::new())
            .await
            .expect("check"),
        Fetched::Unchanged
    );
    let v2 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from(vec![b'z'; 4096]))
        .await
        .expect("put");
    match ctx
        .store
        .get_if_changed(&run, &doc, &v1, GetOptions::new())
        .await
        .expect("check")
    {
        Fetched::Changed(stored) => {
            assert_eq!(stored.version, v2);
            assert_eq!(stored.bytes.len(), 4096);
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    expect_kind(
        ctx.store
            .get_if_changed(&run, &doc, &v1, GetOptions::new().with_limit(100))
            .await,
        ErrorKind::TooLarge,
    );
    let small_limit = ctx
        .store
        .get_if_changed(&run, &doc, &v2, GetOptions::new().with_limit(100))
        .await;
    if ctx.store.capabilities().native_conditional_get {
        assert_eq!(
            small_limit.expect("an unchanged document is not read, whatever its size"),
            Fetched::Unchanged
        );
    }
    ctx.store.delete(&run, &doc, None).await.expect("delete");
    assert_eq!(
        ctx.store
            .get_if_changed(&run, &doc, &v2, GetOptions::new())
            .await
            .expect("check"),
        Fetched::Absent
    );
}

/// Another client writes "behind the back" of this store (a cache in front
/// of it, if it has one, never hears of it): every read still returns the
/// newest version, and neither an optimistic nor a locked update is ever
/// computed from a stale copy without being refused and redone.
pub async fn writes_behind_the_back_are_never_lost(ctx: Ctx) {
    use crate::docs::Counter;
    let other = ctx.reopen().await;
    let run_id = ctx.run("shared");
    let here = ctx.client().run(run_id.clone());
    let there = runstate_core::Client::new(Arc::clone(&other)).run(run_id.clone());
    here.save(&Counter::default()).await.expect("seed");
    assert_eq!(here.load::<Counter>().await.expect("warm").n, 0);
    for round in 1..=5u64 {
        // The other client moves the counter on.
        there
            .update(|c: &mut Counter| c.n += 10)
            .await
            .expect("the other client's update");
        let seen = here.load::<Counter>().await.expect("load").n;
        assert_eq!(
            seen,
            round * 10 + (round - 1) * 2,
            "a read after another's write sees it"
        );
        // An optimistic update from a possibly stale copy is redone on
        // fresh data; then a locked one.
        here.update_optimistic(|c: &mut Counter| c.n += 1)
            .await
            .expect("optimistic update");
        here.update(|c: &mut Counter| c.n += 1)
            .await
            .expect("locked update");
    }
    let stored: Counter = there.load().await.expect("load");
    assert_eq!(stored.n, 5 * 10 + 5 * 2, "no update lost on either side");
    // An optimistic update that changes nothing against a stale copy still
    // looks at the store: the other side's value must not be "kept" by it.
    there
        .save(&Counter {
            n: 7,
            note: String::new(),
        })
        .await
        .expect("behind the back");
    here.update_optimistic(|c: &mut Counter| c.n = 7)
        .await
        .expect("no-op");
    here.update_optimistic(|c: &mut Counter| c.n = 1000)
        .await
        .expect("set");
    assert_eq!(there.load::<Counter>().await.expect("load").n, 1000);
}
