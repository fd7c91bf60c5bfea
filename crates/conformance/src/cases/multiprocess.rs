//! Case group 9: Several OS processes updating one document.

use crate::Ctx;
use crate::child::spawn_children;
use crate::docs::Counter;

/// 4 processes × 100 locked increments of one document: exactly 400, and
/// every increment acknowledged.
pub async fn multi_process_locked_increments(ctx: Ctx) {
    let run_id = ctx.run("shared");
    ctx.client()
        .run(run_id.clone())
        .save(&Counter::default())
        .await
        .expect("seed");
    let acks = spawn_children(&ctx, run_id.as_str(), 4, 100).await;
    let counter: Counter = ctx.client().run(run_id).load().await.expect("load");
    assert_eq!(acks, 400, "acknowledged increments");
    assert_eq!(counter.n, 400, "stored count");
}
