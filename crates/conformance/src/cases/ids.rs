//! Case group 4: Identifiers: every bad one refused before anything is written.

use runstate_core::{Bytes, DocName, ErrorKind, IdProblem, InvalidId, RunId, StoreExt};

use super::expect_kind;
use crate::Ctx;
use crate::docs::Escaping;

/// The bad identifiers of the contract.
fn bad_ids() -> Vec<String> {
    vec![
        String::new(),
        ".".into(),
        "..".into(),
        "../x".into(),
        "a/b".into(),
        "/abs".into(),
        "a\\b".into(),
        "a\0b".into(),
        "%2e%2e".into(),
        "a b".into(),
        "é".into(),
        "\u{202e}txt.exe".into(),
        "x".repeat(129),
        ".hidden".into(),
    ]
}

fn invalid_id(error: &runstate_core::Error) -> &InvalidId {
    std::error::Error::source(error)
        .and_then(|s| s.downcast_ref::<InvalidId>())
        .expect("an InvalidKey error carries an InvalidId source")
}

/// Every bad run id is `InvalidKey`; nothing is written.
pub async fn invalid_run_ids_rejected(ctx: Ctx) {
    for bad in bad_ids() {
        let error = expect_kind(RunId::new(&bad), ErrorKind::InvalidKey);
        invalid_id(&error);
        let parsed: Result<RunId, _> =
            serde_json::from_value(serde_json::Value::String(bad.clone()));
        assert!(parsed.is_err(), "deserializing {bad:?} must fail");
    }
    // A real document saved beside the attempts proves the store works and
    // holds exactly that one run.
    let good = ctx.run("good");
    ctx.store
        .put_bytes(&good, &ctx.doc("d"), Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert_eq!(ctx.store.list_all_runs().await.expect("runs"), vec![good]);
}

/// Every bad document name is `InvalidKey`, including a typed document
/// whose name escapes; nothing is written.
pub async fn invalid_doc_names_rejected(ctx: Ctx) {
    for bad in bad_ids() {
        let error = expect_kind(DocName::new(&bad), ErrorKind::InvalidKey);
        invalid_id(&error);
    }
    let run = ctx.client().run(ctx.run("r"));
    let error = expect_kind(run.save(&Escaping::default()).await, ErrorKind::InvalidKey);
    assert_eq!(
        error.run().map(RunId::as_str),
        Some("r"),
        "the error names the run"
    );
    expect_kind(run.load::<Escaping>().await, ErrorKind::InvalidKey);
    expect_kind(
        run.update(|e: &mut Escaping| e.x += 1).await,
        ErrorKind::InvalidKey,
    );
    assert!(ctx.store.list_all_runs().await.expect("runs").is_empty());
    assert!(ctx.store.list_locks(None).await.expect("locks").is_empty());
}

/// The error says which byte, where.
pub async fn invalid_key_names_byte_and_position(ctx: Ctx) {
    let error = expect_kind(RunId::new("Test_Watershed/15"), ErrorKind::InvalidKey);
    assert_eq!(
        invalid_id(&error).problem,
        IdProblem::BadByte {
            byte: b'/',
            position: 14
        }
    );
    let text = error.to_string();
    assert!(
        text.contains("0x2f") && text.contains("position 14"),
        "{text}"
    );
    let error = expect_kind(DocName::new("a\u{202e}b"), ErrorKind::InvalidKey);
    assert!(
        error.to_string().contains("\\u{202e}"),
        "shown escaped: {error}"
    );
    assert!(ctx.store.list_all_runs().await.expect("runs").is_empty());
}

/// Real WEPPcloud ids work as runs and as documents.
pub async fn real_ids_round_trip(ctx: Ctx) {
    let ids = [
        "Test_Watershed_15",
        "CedarRiver_Obs.MultDaymet",
        "prescribed_fire.landuse",
        "rlew-appreciated-tremolo",
    ];
    for id in ids {
        let run = ctx.run(id);
        for name in ids {
            let doc = ctx.doc(name);
            ctx.store
                .put_bytes(&run, &doc, Bytes::from(format!("{id}/{name}")))
                .await
                .expect("put");
        }
    }
    let mut runs: Vec<&str> = ids.to_vec();
    runs.sort_unstable();
    let listed = ctx.store.list_all_runs().await.expect("runs");
    assert_eq!(listed.iter().map(RunId::as_str).collect::<Vec<_>>(), runs);
    for id in ids {
        let docs = ctx.store.list_all_docs(&ctx.run(id)).await.expect("docs");
        assert_eq!(
            docs.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            runs
        );
        let got = ctx
            .store
            .get_bytes(&ctx.run(id), &ctx.doc(ids[1]))
            .await
            .expect("get")
            .expect("present");
        assert_eq!(got.bytes, Bytes::from(format!("{id}/{}", ids[1])));
    }
}
