//! An optimistic update whose closure changes nothing runs it once when
//! nobody else writes.

use std::sync::Arc;

use runstate_core::{Client, Document, RunId, memory::MemoryStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    n: u64,
}

impl Document for Meta {
    const NAME: &'static str = "meta";
}

/// The first read may come from a cache; a closure that changed nothing
/// was run a second time on a fresh read, on every store, with nobody else
/// writing (the docs promise more runs only under contention). The store's
/// version is now asked instead.
#[tokio::test]
async fn an_unchanged_optimistic_update_runs_its_closure_once() {
    let run = Client::new(Arc::new(MemoryStore::new())).run(RunId::new("r").expect("id"));
    run.save(&Meta { n: 1 }).await.expect("seed");
    let mut calls = 0;
    run.update_optimistic(|m: &mut Meta| {
        calls += 1;
        m.n
    })
    .await
    .expect("update");
    assert_eq!(calls, 1, "the closure ran again with nobody else writing");
    // A change still saves.
    run.update_optimistic(|m: &mut Meta| m.n += 1)
        .await
        .expect("update");
    assert_eq!(run.load::<Meta>().await.expect("load").n, 2);
}
