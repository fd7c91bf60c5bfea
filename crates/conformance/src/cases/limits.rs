//! Case group 5: Size limits and corrupt documents.

use runstate_core::{Bytes, Codec, ErrorKind, GetOptions, StoreExt};

use super::expect_kind;
use crate::Ctx;
use crate::docs::{BincodeCounter, Counter};

/// A typed save over the limit is `TooLarge` and writes nothing.
pub async fn save_over_limit_too_large(ctx: Ctx) {
    let client = ctx.client().with_limit(1024);
    let run = client.run(ctx.run("r"));
    let big = Counter {
        n: 1,
        note: "x".repeat(2000),
    };
    let error = expect_kind(run.save(&big).await, ErrorKind::TooLarge);
    assert_eq!(error.doc().map(|d| d.as_str()), Some("counter"));
    expect_kind(
        run.update_or_default(|c: &mut Counter| c.note = "y".repeat(2000))
            .await,
        ErrorKind::TooLarge,
    );
    assert!(
        ctx.store
            .get_bytes(run.id(), &ctx.doc("counter"))
            .await
            .expect("get")
            .is_none()
    );
    assert!(ctx.store.list_all_runs().await.expect("runs").is_empty());
    assert!(
        ctx.store.list_locks(None).await.expect("locks").is_empty(),
        "no lease left behind"
    );
    let small = Counter {
        n: 1,
        note: "x".repeat(100),
    };
    run.save(&small).await.expect("under the limit");
    assert_eq!(run.load::<Counter>().await.expect("load"), small);
}

/// A stored document over the limit is refused on load, before it is read.
pub async fn load_over_limit_too_large(ctx: Ctx) {
    let (run_id, doc) = (ctx.run("r"), ctx.doc("counter"));
    let stored = Counter {
        n: 7,
        note: "z".repeat(4000),
    };
    let bytes = Codec::Json.encode(&stored, u64::MAX).expect("encode");
    let len = bytes.len() as u64;
    ctx.store
        .put_bytes(&run_id, &doc, Bytes::from(bytes))
        .await
        .expect("put");

    expect_kind(
        ctx.store
            .get(&run_id, &doc, GetOptions::new().with_limit(len - 1))
            .await,
        ErrorKind::TooLarge,
    );
    let exact = ctx
        .store
        .get(&run_id, &doc, GetOptions::new().with_limit(len))
        .await
        .expect("at the limit");
    assert_eq!(exact.expect("present").bytes.len() as u64, len);

    let run = ctx.client().with_limit(1024).run(run_id.clone());
    expect_kind(run.load::<Counter>().await, ErrorKind::TooLarge);
    expect_kind(
        run.update(|c: &mut Counter| c.n += 1).await,
        ErrorKind::TooLarge,
    );
    assert_eq!(
        ctx.client()
            .run(run_id)
            .load::<Counter>()
            .await
            .expect("load"),
        stored
    );
}

/// Bytes that do not decode are `Corrupt`, naming the run, the document and
/// the codec; nothing is rewritten.
pub async fn corrupt_document_is_corrupt(ctx: Ctx) {
    let (run_id, doc) = (ctx.run("r"), ctx.doc("counter"));
    let v = ctx
        .store
        .put_bytes(&run_id, &doc, Bytes::from_static(b"{\"n\": 1, oops"))
        .await
        .expect("put");
    let run = ctx.client().run(run_id.clone());
    let error = expect_kind(run.load::<Counter>().await, ErrorKind::Corrupt);
    assert_eq!(error.run(), Some(&run_id));
    assert_eq!(error.doc(), Some(&doc));
    assert!(
        error.to_string().contains("json"),
        "names the codec: {error}"
    );
    expect_kind(
        run.update(|c: &mut Counter| c.n += 1).await,
        ErrorKind::Corrupt,
    );
    expect_kind(run.lock::<Counter>().await.map(|_| ()), ErrorKind::Corrupt);
    let after = ctx
        .store
        .get_bytes(&run_id, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(after.version, v, "nothing rewritten");
    assert_eq!(&after.bytes[..], b"{\"n\": 1, oops");
    assert!(
        ctx.store.list_locks(None).await.expect("locks").is_empty(),
        "no lease left behind"
    );
}

/// A document read with the wrong codec is `Corrupt` naming that codec.
pub async fn wrong_codec_is_corrupt(ctx: Ctx) {
    let run = ctx.client().run(ctx.run("r"));
    run.save(&Counter {
        n: 3,
        note: "json".into(),
    })
    .await
    .expect("save as json");
    let error = expect_kind(run.load::<BincodeCounter>().await, ErrorKind::Corrupt);
    assert!(
        error.to_string().contains("bincode"),
        "names the codec: {error}"
    );
    run.save(&BincodeCounter {
        n: 4,
        note: "bin".into(),
    })
    .await
    .expect("save as bincode");
    assert_eq!(run.load::<BincodeCounter>().await.expect("load").n, 4);
    expect_kind(run.load::<Counter>().await, ErrorKind::Corrupt);
}
