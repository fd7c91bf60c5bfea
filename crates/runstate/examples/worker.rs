//! A worker updating a run under leases: several tasks (they could be
//! processes on several hosts sharing the store) increment one document
//! with locked updates, and one holds the lock across a long step with a
//! guard. No update is lost.
//!
//! ```sh
//! cargo run -p runstate --example worker                      # files in a temporary folder
//! cargo run -p runstate --example worker -- postgres://…/db   # any store URL
//! ```

use std::time::Duration;

use runstate::{Document, RunId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Wepp {
    runs: u64,
    last_worker: String,
}

impl Document for Wepp {
    const NAME: &'static str = "wepp";
}

#[tokio::main]
async fn main() -> runstate::Result<()> {
    let temp = std::env::temp_dir().join(format!("runstate-example-worker-{}", std::process::id()));
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("file://{}", temp.display()));
    let store = runstate::open(&url).await?;
    let run = store.client().run(RunId::new("Mica_flume1")?);

    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let run = run.clone();
        workers.spawn(async move {
            for _ in 0..10 {
                // acquire → load → mutate → fenced save → release, retried
                // on contention.
                run.update_or_default(|w: &mut Wepp| {
                    w.runs += 1;
                    w.last_worker = format!("worker {worker}");
                })
                .await?;
            }
            runstate::Result::<()>::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("a worker panicked")?;
    }

    // A long step under one lock: the guard renews its lease meanwhile.
    let mut wepp = run.lock::<Wepp>().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    wepp.runs += 1;
    wepp.last_worker = "the long step".into();
    wepp.commit().await?;

    let wepp: Wepp = run.load().await?;
    println!(
        "{} runs recorded, the last by {}",
        wepp.runs, wepp.last_worker
    );
    assert_eq!(wepp.runs, 41, "no update lost");
    let _ = std::fs::remove_dir_all(&temp);
    Ok(())
}
