//! Case group 2: Overwrite, create-only and update-if-version.

use runstate_core::{Bytes, ErrorKind, PutOptions, StoreExt, Version};

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
