//! Case group 7: Leases: exclusion, renewal, ownership, expiry, fences, inspection,
//! breaking, waiting.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::process::current_stamp;
use runstate_core::{
    Bytes, ErrorKind, Lease, LockExt, LockKey, Owner, PutOptions, Result, StoreExt, WaitPolicy,
};

use super::expect_kind;
use crate::Ctx;

const LONG: Duration = Duration::from_secs(30);

fn doc_key(ctx: &Ctx) -> LockKey {
    LockKey::Doc(ctx.run("r"), ctx.doc("ron"))
}

/// A held lock refuses other owners with `Locked`, naming the holder.
pub async fn lease_held_is_locked_with_holder(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let lease = ctx
        .store
        .try_acquire(&key, &a, Duration::from_secs(10))
        .await
        .expect("A acquires");
    assert_eq!(lease.key(), &key);
    assert_eq!(lease.owner(), &a);
    let error = expect_kind(
        ctx.store.try_acquire(&key, &b, LONG).await,
        ErrorKind::Locked,
    );
    let holder = error.holder().expect("Locked names the holder");
    assert_eq!(holder.owner, a);
    assert_eq!(holder.owner.host(), a.host());
    assert_eq!(holder.owner.pid(), std::process::id());
    assert_eq!(holder.fence, lease.fence());
    assert!(holder.expires_in > Duration::ZERO && holder.expires_in <= Duration::from_secs(10));
    assert!(error.is_retryable(), "Locked is worth retrying");
    ctx.store.release(&lease).await.expect("release");
    ctx.store
        .try_acquire(&key, &b, LONG)
        .await
        .expect("free after release");
}

/// Acquiring again under the owner that holds the lock returns its grant:
/// the same fence, the TTL restarted. (A retry after a lost reply must not
/// wait a whole TTL behind its own grant.) Other owners stay locked out,
/// and one release frees the lock.
pub async fn lease_reacquire_by_owner_returns_its_grant(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let first = ctx
        .store
        .try_acquire(&key, &a, Duration::from_millis(1500))
        .await
        .expect("A acquires");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = ctx
        .store
        .try_acquire(&key, &a, Duration::from_millis(1500))
        .await
        .expect("A acquires again: its own grant");
    assert_eq!(again.fence(), first.fence(), "the same grant");
    let held = ctx
        .store
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("held");
    assert_eq!(held.owner, a);
    assert_eq!(held.fence, first.fence());
    assert!(
        held.expires_in > Duration::from_millis(1000),
        "the TTL restarted: {:?}",
        held.expires_in
    );
    // Past the first grant's TTL, the lock is still A's.
    tokio::time::sleep(Duration::from_millis(700)).await;
    expect_kind(
        ctx.store.try_acquire(&key, &b, LONG).await,
        ErrorKind::Locked,
    );
    let (again2, _) = ctx
        .store
        .acquire_and_load(&key, &ctx.doc("ron"), &a, LONG, Default::default())
        .await
        .expect("acquire_and_load by the holder");
    assert_eq!(again2.fence(), first.fence());
    ctx.store.release(&again2).await.expect("release");
    let next = ctx.store.try_acquire(&key, &b, LONG).await.expect("free");
    assert!(next.fence() > first.fence());
}

/// A TTL outside 1 ms ..= `MAX_TTL` is refused with `InvalidArgument`
/// before anything is written: no lock is left behind (least of all one
/// that never expires), and a held lease is not changed by a refused
/// renewal.
pub async fn lease_absurd_ttl_refused(ctx: Ctx) {
    let key = doc_key(&ctx);
    let a = ctx.owner();
    for ttl in [
        Duration::ZERO,
        runstate_core::MAX_TTL + Duration::from_millis(1),
        Duration::from_secs(u64::MAX / 1000),
        Duration::MAX,
    ] {
        expect_kind(
            ctx.store.try_acquire(&key, &a, ttl).await,
            ErrorKind::InvalidArgument,
        );
        expect_kind(
            ctx.store
                .acquire_and_load(&key, &ctx.doc("ron"), &a, ttl, Default::default())
                .await,
            ErrorKind::InvalidArgument,
        );
        assert!(
            ctx.store.inspect(&key).await.expect("inspect").is_none(),
            "nothing held after a refused TTL of {ttl:?}"
        );
        assert!(ctx.store.list_locks(None).await.expect("list").is_empty());
    }
    let lease = ctx
        .store
        .try_acquire(&key, &a, Duration::from_secs(5))
        .await
        .expect("a sane TTL");
    expect_kind(
        ctx.store.renew(&lease, Duration::MAX).await,
        ErrorKind::InvalidArgument,
    );
    let held = ctx
        .store
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("held");
    assert_eq!(held.fence, lease.fence());
    assert!(held.expires_in <= Duration::from_secs(5));
    ctx.store.release(&lease).await.expect("release");
}

/// A failed save under `save_and_release` still releases the lease: a
/// lease that does not cover the document, a refused condition, and (where
/// the harness can stage it) a document that cannot be written.
pub async fn save_and_release_releases_on_failure(ctx: Ctx) {
    let run = ctx.run("r");
    let (ron, climate) = (ctx.doc("ron"), ctx.doc("climate"));
    let key = LockKey::Doc(run.clone(), ron.clone());
    let free = |what: &'static str| {
        let (store, key) = (Arc::clone(&ctx.store), key.clone());
        async move {
            assert!(
                store.inspect(&key).await.expect("inspect").is_none(),
                "the lease is released after {what}"
            );
        }
    };

    let lease = ctx
        .store
        .try_acquire(&key, &ctx.owner(), LONG)
        .await
        .expect("acquire");
    expect_kind(
        ctx.store
            .save_and_release(
                &lease,
                &climate,
                Bytes::from_static(b"x"),
                Default::default(),
            )
            .await,
        ErrorKind::InvalidArgument,
    );
    free("a save the lease does not cover").await;

    let lease = ctx
        .store
        .try_acquire(&key, &ctx.owner(), LONG)
        .await
        .expect("acquire");
    expect_kind(
        ctx.store
            .save_and_release(
                &lease,
                &ron,
                Bytes::from_static(b"x"),
                runstate_core::PutMode::Update(runstate_core::Version::new("no-such-version")),
            )
            .await,
        ErrorKind::Precondition,
    );
    free("a refused condition").await;

    let broken = ctx.doc("unwritable");
    if !ctx.make_unwritable(&run, &broken).await {
        eprintln!(
            "note: backend `{}` cannot stage an unwritable document; checked the other failures",
            ctx.backend()
        );
        return;
    }
    let broken_key = LockKey::Doc(run.clone(), broken.clone());
    let lease = ctx
        .store
        .try_acquire(&broken_key, &ctx.owner(), LONG)
        .await
        .expect("acquire");
    let error = ctx
        .store
        .save_and_release(
            &lease,
            &broken,
            Bytes::from_static(b"x"),
            Default::default(),
        )
        .await
        .expect_err("a save of an unwritable document fails");
    assert!(
        !matches!(error.kind(), ErrorKind::Fenced | ErrorKind::LeaseLost),
        "the failure is the write's, not the lease's: {error}"
    );
    assert!(
        ctx.store
            .inspect(&broken_key)
            .await
            .expect("inspect")
            .is_none(),
        "the lease is released after a failed write: {error}"
    );
    ctx.store
        .try_acquire(&broken_key, &ctx.owner(), LONG)
        .await
        .expect("another owner takes it at once");
}

/// Renewing keeps the lease past its first TTL, with the same fence.
pub async fn lease_renew_extends(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let ttl = Duration::from_millis(1000);
    let start = Instant::now();
    let lease = ctx.store.try_acquire(&key, &a, ttl).await.expect("acquire");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewed = ctx.store.renew(&lease, ttl).await.expect("renew");
    assert_eq!(renewed.fence(), lease.fence());
    assert!(renewed.expires_at() > lease.expires_at());
    tokio::time::sleep_until((start + Duration::from_millis(1200)).into()).await;
    let error = expect_kind(
        ctx.store.try_acquire(&key, &b, LONG).await,
        ErrorKind::Locked,
    );
    assert_eq!(error.holder().expect("holder").owner, a);
    let again = ctx.store.renew(&renewed, ttl).await.expect("renew again");
    ctx.store.release(&again).await.expect("release");
}

/// Only the owner releases: a forged lease from another owner is refused and
/// the lock stays held.
pub async fn lease_release_by_non_owner_refused(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let lease = ctx
        .store
        .try_acquire(&key, &a, LONG)
        .await
        .expect("acquire");
    let forged = Lease::new(
        key.clone(),
        b.clone(),
        lease.fence(),
        LONG,
        Instant::now(),
        SystemTime::now(),
    );
    expect_kind(ctx.store.release(&forged).await, ErrorKind::LeaseLost);
    expect_kind(ctx.store.renew(&forged, LONG).await, ErrorKind::LeaseLost);
    let holder = ctx
        .store
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("still held");
    assert_eq!(holder.owner, a);
    // The refused release ended nothing: the holder's saves still land (a
    // split store once closed the grant in its document store anyway,
    // fencing the holder out while the lock service still showed it).
    ctx.store
        .put(
            key.run(),
            &ctx.doc("ron"),
            Bytes::from_static(b"still the holder's"),
            PutOptions::overwrite().with_lease(&lease),
        )
        .await
        .expect("the holder still saves after a refused release");
    ctx.store.release(&lease).await.expect("the owner releases");
    assert!(ctx.store.inspect(&key).await.expect("inspect").is_none());
}

/// After the TTL another owner takes the lock over, never before.
pub async fn lease_takeover_after_ttl_not_before(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let start = Instant::now();
    let lease_a = ctx
        .store
        .try_acquire(&key, &a, Duration::from_millis(800))
        .await
        .expect("A");
    tokio::time::sleep(Duration::from_millis(100)).await;
    expect_kind(
        ctx.store.try_acquire(&key, &b, LONG).await,
        ErrorKind::Locked,
    );
    tokio::time::sleep_until((start + Duration::from_millis(1100)).into()).await;
    let lease_b = ctx
        .store
        .try_acquire(&key, &b, LONG)
        .await
        .expect("B after the TTL");
    assert!(lease_b.fence() > lease_a.fence());
    assert!(start.elapsed() >= Duration::from_millis(800));
    assert_eq!(
        ctx.store
            .inspect(&key)
            .await
            .expect("inspect")
            .expect("held")
            .owner,
        b
    );
}

/// Fences strictly increase across holders, releases, expiries and lock
/// kinds.
pub async fn lease_fences_strictly_increase(ctx: Ctx) {
    for key in [doc_key(&ctx), LockKey::Run(ctx.run("r"))] {
        let mut last = None;
        for round in 0..6 {
            let owner = ctx.owner();
            let ttl = if round == 3 {
                Duration::from_millis(200)
            } else {
                LONG
            };
            let lease = ctx
                .store
                .try_acquire(&key, &owner, ttl)
                .await
                .expect("acquire");
            if let Some(previous) = last {
                assert!(
                    lease.fence() > previous,
                    "fence {} after {previous}",
                    lease.fence()
                );
            }
            last = Some(lease.fence());
            if round == 3 {
                tokio::time::sleep(Duration::from_millis(400)).await; // expires instead
            } else {
                ctx.store.release(&lease).await.expect("release");
            }
        }
    }
}

/// Releasing a lease that expired and was taken over says `LeaseLost` and
/// leaves the new holder alone.
pub async fn lease_release_after_loss_reports_lost(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (a, b) = (ctx.owner(), ctx.owner());
    let lease_a = ctx
        .store
        .try_acquire(&key, &a, Duration::from_millis(300))
        .await
        .expect("A");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lease_b = ctx.store.try_acquire(&key, &b, LONG).await.expect("B");
    let error = expect_kind(ctx.store.release(&lease_a).await, ErrorKind::LeaseLost);
    assert!(!error.is_retryable());
    assert_eq!(error.lock(), Some(&key), "the refusal names its lock");
    assert_eq!(
        ctx.store
            .inspect(&key)
            .await
            .expect("inspect")
            .expect("held")
            .owner,
        b
    );
    ctx.store.release(&lease_b).await.expect("B releases");
}

/// Renewing an expired lease is `LeaseLost`, even when nobody took it.
pub async fn lease_renew_after_expiry_is_lost(ctx: Ctx) {
    let key = doc_key(&ctx);
    let a = ctx.owner();
    let lease = ctx
        .store
        .try_acquire(&key, &a, Duration::from_millis(300))
        .await
        .expect("A");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let error = expect_kind(ctx.store.renew(&lease, LONG).await, ErrorKind::LeaseLost);
    assert_eq!(error.lock(), Some(&key), "the refusal names its lock");
    assert!(
        ctx.store.inspect(&key).await.expect("inspect").is_none(),
        "an expired lease is free"
    );
    ctx.store
        .try_acquire(&key, &ctx.owner(), LONG)
        .await
        .expect("free for others");
}

/// Inspect shows the holder (host, pid, id), the fence, since and expiry.
pub async fn lease_inspect_shows_holder(ctx: Ctx) {
    let key = doc_key(&ctx);
    assert!(ctx.store.inspect(&key).await.expect("inspect").is_none());
    let a = ctx.owner();
    let before = SystemTime::now();
    let lease = ctx
        .store
        .try_acquire(&key, &a, Duration::from_secs(20))
        .await
        .expect("acquire");
    let info = ctx
        .store
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("held");
    assert_eq!(info.key, key);
    assert_eq!(info.owner, a);
    assert_eq!(info.owner.id(), a.id());
    assert_eq!(info.fence, lease.fence());
    assert!(
        info.expires_in <= Duration::from_secs(20) && info.expires_in > Duration::from_secs(15)
    );
    // `since` comes from the backend's clock; on one machine it is close to ours.
    let skew = match info.since.duration_since(before) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        skew < Duration::from_secs(60),
        "since is {skew:?} away from now"
    );
    ctx.store.release(&lease).await.expect("release");
    assert!(ctx.store.inspect(&key).await.expect("inspect").is_none());
}

/// Breaking frees the lock, keeps fences increasing, and fences out the
/// broken holder; a break pinned to another fence does nothing.
pub async fn lease_break_frees_and_fences_out(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (run, doc) = (ctx.run("r"), ctx.doc("ron"));
    let (a, b) = (ctx.owner(), ctx.owner());
    let lease_a = ctx.store.try_acquire(&key, &a, LONG).await.expect("A");
    let missed = ctx
        .store
        .break_lock(&key, Some(runstate_core::Fence(lease_a.fence().get() + 1)))
        .await
        .expect("pinned break");
    assert!(
        missed.is_none(),
        "a break pinned to another grant breaks nothing"
    );
    assert_eq!(
        ctx.store
            .inspect(&key)
            .await
            .expect("inspect")
            .expect("held")
            .owner,
        a
    );

    let broken = ctx
        .store
        .break_lock(&key, None)
        .await
        .expect("break")
        .expect("was held");
    assert_eq!(broken.owner, a);
    assert_eq!(broken.fence, lease_a.fence());
    assert!(ctx.store.inspect(&key).await.expect("inspect").is_none());
    assert!(
        ctx.store
            .break_lock(&key, None)
            .await
            .expect("break again")
            .is_none()
    );

    let lease_b = ctx.store.try_acquire(&key, &b, LONG).await.expect("B");
    assert!(lease_b.fence() > lease_a.fence());
    expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"A"),
                PutOptions::overwrite().with_lease(&lease_a),
            )
            .await,
        ErrorKind::Fenced,
    );
    expect_kind(ctx.store.release(&lease_a).await, ErrorKind::LeaseLost);
    ctx.store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"B"),
            PutOptions::overwrite().with_lease(&lease_b),
        )
        .await
        .expect("B's fenced save");
    assert_eq!(
        &ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"B"
    );
}

/// A run lock and a document lock are separate locks; a run lease fences
/// saves of any of its documents, a document lease only its own.
pub async fn lease_run_and_doc_locks_are_distinct(ctx: Ctx) {
    let run = ctx.run("r");
    let (ron, climate) = (ctx.doc("ron"), ctx.doc("climate"));
    let run_key = LockKey::Run(run.clone());
    let doc_key = LockKey::Doc(run.clone(), ron.clone());
    let run_lease = ctx
        .store
        .try_acquire(&run_key, &ctx.owner(), LONG)
        .await
        .expect("run lock");
    let doc_lease = ctx
        .store
        .try_acquire(&doc_key, &ctx.owner(), LONG)
        .await
        .expect("doc lock");

    for doc in [&ron, &climate] {
        ctx.store
            .put(
                &run,
                doc,
                Bytes::from_static(b"under the run lease"),
                PutOptions::overwrite().with_lease(&run_lease),
            )
            .await
            .expect("a run lease covers every document");
    }
    ctx.store
        .put(
            &run,
            &ron,
            Bytes::from_static(b"under the doc lease"),
            PutOptions::overwrite().with_lease(&doc_lease),
        )
        .await
        .expect("a document lease covers its document");
    expect_kind(
        ctx.store
            .put(
                &run,
                &climate,
                Bytes::from_static(b"x"),
                PutOptions::overwrite().with_lease(&doc_lease),
            )
            .await,
        ErrorKind::InvalidArgument,
    );
    let other_run = ctx.run("other");
    expect_kind(
        ctx.store
            .put(
                &other_run,
                &ron,
                Bytes::from_static(b"x"),
                PutOptions::overwrite().with_lease(&run_lease),
            )
            .await,
        ErrorKind::InvalidArgument,
    );
    assert!(
        ctx.store
            .get_bytes(&other_run, &ron)
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(
        &ctx.store
            .get_bytes(&run, &climate)
            .await
            .expect("get")
            .expect("present")
            .bytes[..],
        b"under the run lease"
    );
}

/// A fenced save after releasing the lease is refused.
pub async fn lease_fenced_put_after_release_is_fenced(ctx: Ctx) {
    let key = doc_key(&ctx);
    let (run, doc) = (ctx.run("r"), ctx.doc("ron"));
    let lease = ctx
        .store
        .try_acquire(&key, &ctx.owner(), LONG)
        .await
        .expect("acquire");
    ctx.store.release(&lease).await.expect("release");
    expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"late"),
                PutOptions::overwrite().with_lease(&lease),
            )
            .await,
        ErrorKind::Fenced,
    );
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
}

/// Held locks are listed per run and for the whole store.
pub async fn lease_list_locks_shows_held(ctx: Ctx) {
    let (r1, r2) = (ctx.run("r1"), ctx.run("r2"));
    let k1 = LockKey::Run(r1.clone());
    let k2 = LockKey::Doc(r1.clone(), ctx.doc("climate"));
    let k3 = LockKey::Doc(r2.clone(), ctx.doc("wepp"));
    let mut leases = Vec::new();
    for key in [&k1, &k2, &k3] {
        leases.push(
            ctx.store
                .try_acquire(key, &ctx.owner(), LONG)
                .await
                .expect("acquire"),
        );
    }
    let mut in_r1: Vec<LockKey> = ctx
        .store
        .list_locks(Some(&r1))
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key)
        .collect();
    in_r1.sort();
    let mut expected = vec![k1.clone(), k2.clone()];
    expected.sort();
    assert_eq!(in_r1, expected);
    let all = ctx.store.list_locks(None).await.expect("list all");
    assert_eq!(all.len(), 3);
    for lease in &leases {
        let info = all.iter().find(|i| &i.key == lease.key()).expect("listed");
        assert_eq!(info.owner, *lease.owner());
        assert_eq!(info.fence, lease.fence());
    }
    ctx.store.release(&leases[0]).await.expect("release");
    let after: Vec<LockKey> = ctx
        .store
        .list_locks(Some(&r1))
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(after, vec![k2]);
}

/// A lease whose holder died on this host is broken at once, long before
/// its TTL.
pub async fn lease_dead_holder_is_broken(ctx: Ctx) {
    let Some(ours) = current_stamp() else {
        eprintln!(
            "{}: this platform cannot tell dead processes; skipped",
            ctx.case
        );
        return;
    };
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn `true`");
    let pid = child.id();
    child.wait().expect("wait");
    let stamp = runstate_core::ProcessStamp {
        start_ticks: u64::MAX,
        ..ours.clone()
    };
    let dead = Owner::new(runstate_core::process::hostname(), pid, "dead-owner-1")
        .expect("owner")
        .with_process(Some(stamp));
    assert_eq!(dead.is_dead_here(), Some(true));

    let key = doc_key(&ctx);
    let dead_lease = ctx
        .store
        .try_acquire(&key, &dead, Duration::from_secs(3600))
        .await
        .expect("dead owner");
    let start = Instant::now();
    let lease = ctx
        .store
        .acquire(
            &key,
            &ctx.owner(),
            LONG,
            &WaitPolicy::with_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("a dead holder's lease is broken");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(lease.fence() > dead_lease.fence());
}

/// A blocking acquire gives up after the policy's timeout with `Locked`,
/// naming the holder.
pub async fn acquire_times_out_while_held(ctx: Ctx) {
    let key = doc_key(&ctx);
    let a = ctx.owner();
    ctx.store.try_acquire(&key, &a, LONG).await.expect("A");
    let start = Instant::now();
    let error = expect_kind(
        ctx.store
            .acquire(
                &key,
                &ctx.owner(),
                LONG,
                &WaitPolicy::with_timeout(Duration::from_millis(400)),
            )
            .await,
        ErrorKind::Locked,
    );
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert_eq!(error.holder().expect("holder").owner, a);
}

/// A document lock held by A (for `LONG`), and B waiting for it per
/// `policy` in a task of its own, checked to be still waiting 300 ms on.
async fn held_and_awaited(
    ctx: &Ctx,
    policy: WaitPolicy,
) -> (LockKey, Lease, tokio::task::JoinHandle<Result<Lease>>) {
    let key = doc_key(ctx);
    let lease_a = ctx
        .store
        .try_acquire(&key, &ctx.owner(), LONG)
        .await
        .expect("A");
    let store = Arc::clone(&ctx.store);
    let (waiting_key, b) = (key.clone(), ctx.owner());
    let waiter = tokio::spawn(async move { store.acquire(&waiting_key, &b, LONG, &policy).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "still waiting while A holds the lock"
    );
    (key, lease_a, waiter)
}

/// A blocking acquire gets the lock soon after the holder releases it.
pub async fn acquire_waits_for_release(ctx: Ctx) {
    let (_key, lease_a, waiter) =
        held_and_awaited(&ctx, WaitPolicy::with_timeout(Duration::from_secs(20))).await;
    ctx.store.release(&lease_a).await.expect("A releases");
    let lease_b = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("B gets the lock soon after")
        .expect("joined")
        .expect("B acquires");
    assert!(lease_b.fence() > lease_a.fence());
}

/// A blocking acquire whose holder is in this process (granted through the
/// same store, where waiters wait for its release rather than ask) still
/// gets the lock when that grant is broken through another handle, as an
/// operator in another process would, long before the grant would expire.
pub async fn acquire_sees_a_break_made_elsewhere(ctx: Ctx) {
    // B gives up well before A's grant would expire.
    let (key, lease_a, waiter) = held_and_awaited(&ctx, WaitPolicy::with_timeout(LONG / 2)).await;
    let broken = ctx
        .reopen()
        .await
        .break_lock(&key, None)
        .await
        .expect("break elsewhere")
        .expect("A's grant was held");
    assert_eq!(broken.fence, lease_a.fence());
    let lease_b = waiter
        .await
        .expect("joined")
        .expect("B gets the lock after the break, before A's grant expires");
    assert!(lease_b.fence() > lease_a.fence());
}
