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
    let run = ctx.client().run(ctx.run("r"));
    run.save(&Counter::default()).await.expect("save");
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let run = run.clone();
        tasks.spawn(async move {
            for _ in 0..25 {
                run.update(|c: &mut Counter| c.n += 1)
                    .await
                    .expect("locked increment");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("joined");
    }
    assert_eq!(run.load::<Counter>().await.expect("load").n, 200);
}

/// 8 tasks start their locked increments before the document exists
/// (`update_or_default` and `lock_or_default` each create it when absent):
/// exactly one creation wins, every other racer is granted the lock right
/// after it and must load the new document, never see it absent (which
/// would fail `update` with `NotFound` or a guard's commit with
/// `AlreadyExists`).
pub async fn race_updates_before_the_document_exists(ctx: Ctx) {
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
