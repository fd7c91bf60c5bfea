//! Case group 6: Races that must end at an exact count.

use std::sync::Arc;

use runstate_core::{Bytes, ErrorKind, PutOptions, StoreExt};
use tokio::task::JoinSet;

use crate::Ctx;
use crate::docs::Counter;

/// 16 tasks `Create` the same document: exactly one wins, and its bytes are
/// what is stored.
pub async fn race_create_exactly_one_wins(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("contested"));
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = JoinSet::new();
    for i in 0..16u32 {
        let (store, run, doc, barrier) = (
            Arc::clone(&ctx.store),
            run.clone(),
            doc.clone(),
            Arc::clone(&barrier),
        );
        tasks.spawn(async move {
            barrier.wait().await;
            let outcome = store
                .put(
                    &run,
                    &doc,
                    Bytes::from(format!("writer {i}")),
                    PutOptions::create(),
                )
                .await;
            (i, outcome)
        });
    }
    let mut winners = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, outcome) = done.expect("joined");
        match outcome {
            Ok(version) => winners.push((i, version)),
            Err(error) => assert_eq!(error.kind(), ErrorKind::AlreadyExists, "{error}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create wins");
    let (winner, version) = &winners[0];
    let stored = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.bytes, Bytes::from(format!("writer {winner}")));
    assert_eq!(&stored.version, version);
}

/// 8 tasks × 50 compare-and-swap increments with retry: exactly 400.
pub async fn race_cas_increments_exact(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("cas"));
    ctx.store
        .put(&run, &doc, Bytes::from_static(b"0"), PutOptions::create())
        .await
        .expect("create");
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let (store, run, doc) = (Arc::clone(&ctx.store), run.clone(), doc.clone());
        tasks.spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..50 {
                loop {
                    let current = store
                        .get_bytes(&run, &doc)
                        .await
                        .expect("get")
                        .expect("present");
                    let n: u64 = std::str::from_utf8(&current.bytes)
                        .expect("utf8")
                        .parse()
                        .expect("number");
                    match store
                        .put(
                            &run,
                            &doc,
                            Bytes::from((n + 1).to_string()),
                            PutOptions::update(current.version),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(error) if error.kind() == ErrorKind::Precondition => {
                            conflicts += 1;
                            tokio::task::yield_now().await;
                        }
                        Err(error) => panic!("unexpected: {error}"),
                    }
                }
            }
            conflicts
        });
    }
    let mut conflicts = 0;
    while let Some(done) = tasks.join_next().await {
        conflicts += done.expect("joined");
    }
    let stored = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&stored.bytes[..], b"400", "after {conflicts} conflicts");
}

/// 8 tasks × 50 locked increments through the typed API: exactly 400.
pub async fn race_locked_increments_exact(ctx: Ctx) {
    let run_id = ctx.run("r");
    ctx.client()
        .run(run_id.clone())
        .save(&Counter::default())
        .await
        .expect("save");
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let run = ctx.client().run(run_id.clone());
        tasks.spawn(async move {
            for _ in 0..50 {
                run.update(|c: &mut Counter| c.n += 1)
                    .await
                    .expect("locked increment");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("joined");
    }
    let counter: Counter = ctx.client().run(run_id).load().await.expect("load");
    assert_eq!(counter.n, 400);
}

/// One client shared by 8 tasks × 25 locked increments: exactly 200. The
/// client's owner is shared, so each update must take the lock under an
/// owner of its own, or two tasks would "hold" it at once.
pub async fn race_one_client_shared_by_tasks(ctx: Ctx) {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let run = ctx.client().run(ctx.run("r"));
    run.save(&Counter::default()).await.expect("save");
    // With real exclusion no locked update is ever refused and redone, so
    // the closure runs exactly once per increment, and never two at once.
    let calls = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let run = run.clone();
        let (calls, inside, most) = (Arc::clone(&calls), Arc::clone(&inside), Arc::clone(&most));
        tasks.spawn(async move {
            for _ in 0..25 {
                run.update(|c: &mut Counter| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    c.n += 1;
                })
                .await
                .expect("locked increment");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("joined");
    }
    assert_eq!(run.load::<Counter>().await.expect("load").n, 200);
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two tasks held the lock at once"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        200,
        "an update was refused and redone"
    );
}

/// The creation window, staged: a holder locks a document that does not
/// exist yet, four waiters start (`lock_or_default`) and line up,
/// then the holder creates the document and releases. Every waiter is
/// granted the lock right after a creation it did not see start, and must
/// load the document (a guard on an absent one would commit `Create` and
/// fail with `AlreadyExists`; an `update` would report `NotFound`). Then
/// the same with free racers, `update_or_default` and guards mixed.
pub async fn race_updates_before_the_document_exists(ctx: Ctx) {
    use std::sync::atomic::Ordering;
    let counting = Arc::new(crate::CountingLock::new(Arc::clone(&ctx.store)));
    let counts = Arc::clone(&counting.counts);
    let client = runstate_core::Client::new(counting).with_wait(
        runstate_core::WaitPolicy::with_timeout(std::time::Duration::from_secs(120)),
    );
    let run_id = ctx.run("staged");
    let holder = client
        .run(run_id.clone())
        .lock_or_default::<Counter>()
        .await
        .expect("the holder locks the absent document");
    assert!(holder.version().is_none(), "absent");
    let mut waiters = JoinSet::new();
    for _ in 0..4 {
        let run = client.run(run_id.clone());
        waiters.spawn(async move {
            let mut guard = run
                .lock_or_default::<Counter>()
                .await
                .expect("a waiter locks");
            let loaded = guard.version().is_some();
            guard.n += 1;
            guard.commit().await.expect("the waiter commits");
            loaded
        });
    }
    // The first waiter in line waits (for the holder's release, without
    // asking, where the backend knows its own grants; else with backoff);
    // the others line up behind it in this process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counts.waits.load(Ordering::SeqCst) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiters never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Time for the others to take their places in the line.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut holder = holder;
    holder.n = 100;
    holder.commit().await.expect("the holder creates it");
    while let Some(done) = waiters.join_next().await {
        assert!(
            done.expect("joined"),
            "a waiter granted after the creation loaded nothing"
        );
    }
    assert_eq!(
        client.run(run_id).load::<Counter>().await.expect("load").n,
        104
    );

    let run_id = ctx.run("r");
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = JoinSet::new();
    for task in 0..8u64 {
        let run = ctx.client().run(run_id.clone());
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            for i in 0..10u64 {
                if (task + i) % 2 == 0 {
                    run.update_or_default(|c: &mut Counter| c.n += 1)
                        .await
                        .expect("update_or_default");
                } else {
                    let mut guard = run
                        .lock_or_default::<Counter>()
                        .await
                        .expect("lock_or_default");
                    guard.n += 1;
                    guard.commit().await.expect("commit");
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("joined");
    }
    let counter: Counter = ctx.client().run(run_id).load().await.expect("load");
    assert_eq!(counter.n, 80);
}
