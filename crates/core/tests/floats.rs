//! A typed document holding a float JSON cannot carry (NaN, an infinity)
//! is refused when saved, and the document stored before stays readable.

use std::sync::Arc;

use runstate_core::{Client, Document, ErrorKind, RunId, memory::MemoryStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    x: f64,
    note: Option<String>,
}

impl Document for Reading {
    const NAME: &'static str = "reading";
}

/// serde_json wrote a NaN as `null`: the save succeeded and every load and
/// update after it failed as `Corrupt`.
#[tokio::test]
async fn a_float_json_cannot_hold_is_refused_and_changes_nothing() {
    let run = Client::new(Arc::new(MemoryStore::new())).run(RunId::new("r").expect("id"));
    let good = Reading { x: 1.5, note: None };
    run.save(&good).await.expect("a finite float");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let refused = run
            .save(&Reading { x: bad, note: None })
            .await
            .expect_err("not representable in JSON");
        assert_eq!(refused.kind(), ErrorKind::InvalidArgument, "{refused}");
        let refused = run
            .doc::<Reading>("reading")
            .expect("name")
            .update(|r| r.x = bad)
            .await
            .expect_err("not representable in JSON");
        assert_eq!(refused.kind(), ErrorKind::InvalidArgument, "{refused}");
    }
    assert_eq!(run.load::<Reading>().await.expect("still readable"), good);
}
