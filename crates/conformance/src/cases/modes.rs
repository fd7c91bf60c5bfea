//! Case group 2: Overwrite, create-only and update-if-version.

use runstate_core::{Bytes, ErrorKind, PutMode, PutOptions, StoreExt, Version};

use super::expect_kind;
use crate::Ctx;

/// An overwrite replaces the bytes and the version.
pub async fn overwrite_replaces(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v1 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"one"))
        .await
        .expect("put");
    let v2 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"two"))
        .await
        .expect("put");
    assert_ne!(v1, v2);
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&got.bytes[..], b"two");
    assert_eq!(got.version, v2);
}

/// `Create` of an absent document writes it.
pub async fn create_absent_succeeds(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v = ctx
        .store
        .put(&run, &doc, Bytes::from_static(b"new"), PutOptions::create())
        .await
        .expect("create");
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&got.bytes[..], b"new");
    assert_eq!(got.version, v);
}

/// `Create` of an existing document fails with `AlreadyExists` and changes
/// nothing.
pub async fn create_existing_already_exists(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"first"))
        .await
        .expect("put");
    let error = expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"second"),
                PutOptions::create(),
            )
            .await,
        ErrorKind::AlreadyExists,
    );
    assert_eq!(error.doc(), Some(&doc), "the error names the document");
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&got.bytes[..], b"first");
    assert_eq!(got.version, v);
}

/// `Update` with the current version writes and returns a new version.
pub async fn update_current_version_succeeds(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v1 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"a"))
        .await
        .expect("put");
    let v2 = ctx
        .store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"b"),
            PutOptions::update(v1.clone()),
        )
        .await
        .expect("update");
    assert_ne!(v1, v2);
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&got.bytes[..], b"b");
    assert_eq!(got.version, v2);
}

/// `Update` with a stale version fails with `Precondition` and the stored
/// bytes stay.
pub async fn update_stale_version_precondition(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v1 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"a"))
        .await
        .expect("put");
    let v2 = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"b"))
        .await
        .expect("put");
    expect_kind(
        ctx.store
            .put(&run, &doc, Bytes::from_static(b"c"), PutOptions::update(v1))
            .await,
        ErrorKind::Precondition,
    );
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&got.bytes[..], b"b");
    assert_eq!(got.version, v2);
}

/// `Update` of an absent document fails with `Precondition`, also after the
/// document was deleted.
pub async fn update_absent_precondition(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let made_up = Version::new("1");
    expect_kind(
        ctx.store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"x"),
                PutOptions::update(made_up),
            )
            .await,
        ErrorKind::Precondition,
    );
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
    let v = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"a"))
        .await
        .expect("put");
    assert!(ctx.store.delete(&run, &doc, None).await.expect("delete"));
    expect_kind(
        ctx.store
            .put(&run, &doc, Bytes::from_static(b"b"), PutOptions::update(v))
            .await,
        ErrorKind::Precondition,
    );
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
}

/// Versions follow contents: what put returns is what get and list report,
/// and a chain of updates each based on the last read succeeds.
pub async fn versions_track_contents(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let mut version = ctx
        .store
        .put(&run, &doc, Bytes::from_static(b"0"), PutOptions::create())
        .await
        .expect("create");
    let mut seen = vec![version.clone()];
    for i in 1..=5u32 {
        let got = ctx
            .store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .expect("present");
        assert_eq!(got.version, version);
        version = ctx
            .store
            .put(
                &run,
                &doc,
                Bytes::from(i.to_string()),
                PutOptions::update(got.version),
            )
            .await
            .expect("update");
        assert!(!seen.contains(&version), "a new content gets a new version");
        seen.push(version.clone());
    }
    let listed = ctx.store.list_all_docs(&run).await.expect("list");
    assert_eq!(listed[0].version, version);
    assert_eq!(listed[0].size, 1);
}

/// Batches: `put_many` gives one result per document, each all or nothing
/// and conditional on its own mode (a refused one does not stop the
/// others); `get_many` one result per name, in order, absent and over the
/// limit included.
pub async fn batches_are_per_document(ctx: Ctx) {
    use runstate_core::{GetOptions, PutRequest};
    let run = ctx.run("batch");
    let (a, b, c, d) = (ctx.doc("a"), ctx.doc("b"), ctx.doc("c"), ctx.doc("d"));
    let vb = ctx
        .store
        .put_bytes(&run, &b, Bytes::from_static(b"b0"))
        .await
        .expect("seed");
    let vc = ctx
        .store
        .put_bytes(&run, &c, Bytes::from_static(b"c0"))
        .await
        .expect("seed");
    let results = ctx
        .store
        .put_many(
            &run,
            vec![
                PutRequest::new(a.clone(), Bytes::from_static(b"a1"), PutMode::Create),
                PutRequest::new(b.clone(), Bytes::from_static(b"b1"), PutMode::Create),
                PutRequest::new(
                    c.clone(),
                    Bytes::from_static(b"c1"),
                    PutMode::Update(Version::new("stale")),
                ),
                PutRequest::new(b.clone(), Bytes::from_static(b"b2"), PutMode::Update(vb)),
                PutRequest::new(d.clone(), Bytes::from(vec![b'd'; 5000]), PutMode::Overwrite),
            ],
        )
        .await
        .expect("a batch");
    assert_eq!(results.len(), 5);
    let va = results[0].as_ref().expect("create a").clone();
    assert_eq!(
        results[1].as_ref().expect_err("b exists").kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        results[2]
            .as_ref()
            .expect_err("c is not at that version")
            .kind(),
        ErrorKind::Precondition
    );
    let vb2 = results[3].as_ref().expect("update b").clone();
    results[4].as_ref().expect("overwrite d");
    let absent = ctx.doc("absent");
    let got = ctx
        .store
        .get_many(
            &run,
            &[a.clone(), b.clone(), absent, c.clone(), d.clone()],
            GetOptions::new().with_limit(4096),
        )
        .await
        .expect("a batch");
    assert_eq!(got.len(), 5);
    let stored = |i: usize| got[i].as_ref().expect("read").clone();
    assert_eq!(
        stored(0).map(|s| (s.bytes, s.version)),
        Some((Bytes::from_static(b"a1"), va))
    );
    assert_eq!(
        stored(1).map(|s| (s.bytes, s.version)),
        Some((Bytes::from_static(b"b2"), vb2))
    );
    assert!(stored(2).is_none());
    assert_eq!(
        stored(3).map(|s| (s.bytes, s.version)),
        Some((Bytes::from_static(b"c0"), vc))
    );
    assert_eq!(
        got[4].as_ref().expect_err("over the limit").kind(),
        ErrorKind::TooLarge
    );
    assert!(
        ctx.store
            .get_many(&run, &[], GetOptions::new())
            .await
            .expect("empty")
            .is_empty()
    );
    assert!(
        ctx.store
            .put_many(&run, Vec::new())
            .await
            .expect("empty")
            .is_empty()
    );
}
