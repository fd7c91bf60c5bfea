//! Helpers for backends' fault tests: locked updates that keep going
//! through server restarts and dropped connections, and prove no update
//! was lost or doubled.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_core::{Client, Document, Error, ErrorKind, Lock, RunId, WaitPolicy};
use serde::{Deserialize, Serialize};

/// The document of [`increments_through_faults`]: a count and the token of
/// the last increment, which tells whether an increment whose call failed
/// was applied anyway.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tally {
    /// Increments applied.
    pub n: u64,
    /// Token of the last increment applied.
    pub last: String,
}

impl Document for Tally {
    const NAME: &'static str = "tally";
}

/// Runs `total` locked increments of a [`Tally`] in run `faulty`, calling
/// `fault` before increment `i` for each `i` in `at`. An increment whose
/// call failed is resolved by reading the document back (its token says
/// whether it was applied) and retried if it was not. Returns how many were
/// acknowledged and every error seen, after checking that the stored count
/// equals the acknowledged increments.
///
/// # Panics
/// When no progress is made for two minutes, or the final count differs.
pub async fn increments_through_faults<F, Fut>(
    store: Arc<dyn Lock>,
    total: u64,
    at: &[u64],
    mut fault: F,
) -> (u64, Vec<Error>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let client = Client::new(store)
        .with_ttl(Duration::from_secs(1))
        .with_wait(WaitPolicy::with_timeout(Duration::from_millis(300)));
    let run = client.run(RunId::new("faulty").expect("valid"));
    run.save(&Tally::default()).await.expect("seed");
    let mut acked = 0;
    let mut errors = Vec::new();
    let mut faulted = Vec::new();
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while i < total {
        assert!(
            Instant::now() < deadline,
            "no progress: {} errors, last: {:?}",
            errors.len(),
            errors.last()
        );
        if at.contains(&i) && !faulted.contains(&i) {
            faulted.push(i);
            fault().await;
        }
        let token = format!("inc-{i}");
        let outcome = run
            .update(|t: &mut Tally| {
                t.n += 1;
                t.last.clone_from(&token);
            })
            .await;
        match outcome {
            Ok(()) => {
                acked += 1;
                i += 1;
            }
            Err(error) => {
                errors.push(error);
                let read_deadline = Instant::now() + Duration::from_secs(30);
                let applied = loop {
                    match run.load::<Tally>().await {
                        Ok(t) => break t.last == token,
                        Err(_) if Instant::now() < read_deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("the server never came back: {e}"),
                    }
                };
                if applied {
                    acked += 1;
                    i += 1;
                }
            }
        }
    }
    let final_count = run.load::<Tally>().await.expect("final").n;
    assert_eq!(
        final_count, acked,
        "final count equals the acknowledged updates"
    );
    (acked, errors)
}

/// Asserts every error is one a caller may retry (or a busy lock) and
/// names `backend`.
///
/// # Panics
/// On the first error that is not.
pub fn assert_clear_and_retryable(errors: &[Error], backend: &str) {
    for error in errors {
        let text = runstate_core::display_chain(error);
        assert!(
            error.is_retryable() || error.kind() == ErrorKind::Locked,
            "not retryable: {text}"
        );
        assert_eq!(error.backend(), Some(backend), "{text}");
    }
}
