//! Case group 3: Delete, list and delete a run.

use std::sync::Arc;
use std::time::Duration;

use runstate_core::{Bytes, DocName, ErrorKind, GetOptions, Lock, RunId, StoreExt, Version};
use tokio::task::JoinSet;

use super::expect_kind;
use crate::Ctx;

/// Puts many documents with bounded concurrency; returns their versions in
/// input order.
async fn put_many(store: &Arc<dyn Lock>, items: Vec<(RunId, DocName, Bytes)>) -> Vec<Version> {
    const IN_FLIGHT: usize = 32;
    let mut versions = vec![None; items.len()];
    let mut tasks = JoinSet::new();
    for (i, (run, doc, bytes)) in items.into_iter().enumerate() {
        if tasks.len() >= IN_FLIGHT {
            let (j, v) = tasks.join_next().await.expect("a task").expect("joined");
            versions[j] = Some(v);
        }
        let store = Arc::clone(store);
        tasks.spawn(async move { (i, store.put_bytes(&run, &doc, bytes).await.expect("put")) });
    }
    while let Some(done) = tasks.join_next().await {
        let (j, v) = done.expect("joined");
        versions[j] = Some(v);
    }
    versions
        .into_iter()
        .map(|v| v.expect("every put finished"))
        .collect()
}

/// Deleting an absent document (or in an absent run) is not an error.
pub async fn delete_absent_is_ok(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    assert!(!ctx.store.delete(&run, &doc, None).await.expect("delete"));
    ctx.store
        .put_bytes(&run, &ctx.doc("other"), Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert!(!ctx.store.delete(&run, &doc, None).await.expect("delete"));
    assert!(
        !ctx.store
            .delete(&run, &doc, Some(&Version::new("1")))
            .await
            .expect("delete")
    );
}

/// A delete removes the document; a run with no documents left is not
/// listed.
pub async fn delete_removes_document(ctx: Ctx) {
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    ctx.store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert_eq!(
        ctx.store.list_all_runs().await.expect("runs"),
        vec![run.clone()]
    );
    assert!(ctx.store.delete(&run, &doc, None).await.expect("delete"));
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        ctx.store
            .list_all_docs(&run)
            .await
            .expect("docs")
            .is_empty()
    );
    assert!(ctx.store.list_all_runs().await.expect("runs").is_empty());
}

/// A conditional delete with a stale version is refused and deletes
/// nothing (or the backend says it cannot delete conditionally).
pub async fn delete_if_version_stale_refused(ctx: Ctx) {
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
    let expected = if ctx.store.capabilities().conditional_delete {
        ErrorKind::Precondition
    } else {
        ErrorKind::Unsupported
    };
    expect_kind(ctx.store.delete(&run, &doc, Some(&v1)).await, expected);
    let got = ctx
        .store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!(got.version, v2);
    assert_eq!(&got.bytes[..], b"b");
}

/// A conditional delete with the current version deletes.
pub async fn delete_if_version_current(ctx: Ctx) {
    if !ctx.store.capabilities().conditional_delete {
        eprintln!(
            "{}: conditional delete not supported by {}, checked by the stale case",
            ctx.case,
            ctx.backend()
        );
        return;
    }
    let (run, doc) = (ctx.run("r"), ctx.doc("d"));
    let v = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"a"))
        .await
        .expect("put");
    assert!(
        ctx.store
            .delete(&run, &doc, Some(&v))
            .await
            .expect("delete")
    );
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
}

/// A run of 1,000 documents lists completely, in order, with sizes and
/// versions, whole and in pages.
pub async fn list_docs_1000(ctx: Ctx) {
    let run = ctx.run("big-run");
    let items: Vec<_> = (0..1000)
        .map(|i| {
            let bytes = Bytes::from(format!("doc {i}").repeat(1 + i % 3));
            (run.clone(), ctx.doc(&format!("d{i:04}")), bytes)
        })
        .collect();
    let expected: Vec<(DocName, u64)> = items
        .iter()
        .map(|(_, d, b)| (d.clone(), b.len() as u64))
        .collect();
    let versions = put_many(&ctx.store, items).await;

    let listed = ctx.store.list_all_docs(&run).await.expect("list");
    assert_eq!(listed.len(), 1000);
    for (i, meta) in listed.iter().enumerate() {
        assert_eq!(meta.name, expected[i].0, "order at {i}");
        assert_eq!(meta.size, expected[i].1, "size of {}", meta.name);
        assert_eq!(meta.version, versions[i], "version of {}", meta.name);
    }

    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let page = ctx
            .store
            .list_docs(
                &run,
                paged.last().map(|m: &runstate_core::DocMeta| &m.name),
                100,
            )
            .await
            .expect("page");
        assert!(page.items.len() <= 100, "a page holds at most the limit");
        pages += 1;
        paged.extend(page.items);
        if !page.more {
            break;
        }
        assert!(pages < 1000, "paging must end");
    }
    assert_eq!(paged, listed);
}

/// A store of 1,000 runs lists completely and in order, whole and in pages.
pub async fn list_runs_1000(ctx: Ctx) {
    let doc = ctx.doc("ron");
    let items: Vec<_> = (0..1000)
        .map(|i| {
            (
                ctx.run(&format!("run-{i:04}")),
                doc.clone(),
                Bytes::from_static(b"{}"),
            )
        })
        .collect();
    let mut expected: Vec<RunId> = items.iter().map(|(r, _, _)| r.clone()).collect();
    expected.sort();
    put_many(&ctx.store, items).await;

    assert_eq!(ctx.store.list_all_runs().await.expect("list"), expected);
    let mut paged: Vec<RunId> = Vec::new();
    loop {
        let page = ctx.store.list_runs(paged.last(), 250).await.expect("page");
        assert!(page.items.len() <= 250);
        paged.extend(page.items);
        if !page.more {
            break;
        }
    }
    assert_eq!(paged, expected);
}

/// Pages resume strictly after the cursor, in byte order of names.
pub async fn list_pages_resume_after(ctx: Ctx) {
    let run = ctx.run("r");
    let names = [
        "A", "Z", "_x", "a", "a-b", "a.b", "a_b", "b", "z", "0", "9.9",
    ];
    for name in names {
        ctx.store
            .put_bytes(&run, &ctx.doc(name), Bytes::from_static(b"x"))
            .await
            .expect("put");
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    let all: Vec<String> = ctx
        .store
        .list_all_docs(&run)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(all, sorted, "byte order");
    let page = ctx
        .store
        .list_docs(&run, Some(&ctx.doc("a-b")), 3)
        .await
        .expect("page");
    let got: Vec<String> = page.items.iter().map(|m| m.name.to_string()).collect();
    let at = sorted.iter().position(|n| *n == "a-b").expect("present") + 1;
    assert_eq!(got, sorted[at..at + 3].to_vec());
    assert!(page.more);
    let last = ctx
        .store
        .list_docs(&run, Some(&ctx.doc("z")), 3)
        .await
        .expect("page");
    assert!(last.items.is_empty());
    assert!(!last.more);
}

/// Listing a run that does not exist is empty, not an error.
pub async fn list_docs_absent_run_empty(ctx: Ctx) {
    let page = ctx
        .store
        .list_docs(&ctx.run("nothing-here"), None, 10)
        .await
        .expect("list");
    assert!(page.items.is_empty());
    assert!(!page.more);
    assert!(ctx.store.list_all_runs().await.expect("runs").is_empty());
}

/// Deleting a run removes its documents and its milestones and nothing
/// else, also from a caching store's cache (a read allowing an hour's
/// staleness, which a cached copy would answer without asking the store,
/// finds none of them: on a Redis Cluster cache, the entries are on the
/// primary of the run's slot, not wherever a keyless command lands) and
/// from a split store's lock service where it keeps the milestones. The
/// run can be used again afterwards.
pub async fn delete_run_removes_documents(ctx: Ctx) {
    let (doomed, kept) = (ctx.run("doomed"), ctx.run("kept"));
    let stale = GetOptions::default().with_max_staleness(Duration::from_secs(3600));
    for i in 0..5 {
        let doc = ctx.doc(&format!("d{i}"));
        ctx.store
            .put_bytes(&doomed, &doc, Bytes::from_static(b"x"))
            .await
            .expect("put");
        assert!(
            ctx.store
                .get(&doomed, &doc, stale)
                .await
                .expect("get")
                .is_some()
        );
    }
    ctx.store
        .put_bytes(&kept, &ctx.doc("d0"), Bytes::from_static(b"keep"))
        .await
        .expect("put");
    // Its milestones go with it, where the store keeps them.
    let milestones = ctx.store.capabilities().milestones;
    if milestones {
        ctx.store
            .mark(&doomed, "built", std::time::SystemTime::now())
            .await
            .expect("mark");
    }
    assert_eq!(ctx.store.delete_run(&doomed).await.expect("delete run"), 5);
    if milestones {
        let left = ctx.store.milestones(&doomed).await.expect("milestones");
        assert!(
            left.timestamps.is_empty(),
            "the deleted run's milestones are left: {left:?}"
        );
    }
    for i in 0..5 {
        let doc = ctx.doc(&format!("d{i}"));
        assert_eq!(
            ctx.store.get(&doomed, &doc, stale).await.expect("get"),
            None,
            "{doc} of the deleted run is still served"
        );
    }
    assert!(
        ctx.store
            .list_all_docs(&doomed)
            .await
            .expect("docs")
            .is_empty()
    );
    assert_eq!(
        ctx.store.list_all_runs().await.expect("runs"),
        vec![kept.clone()]
    );
    let kept_doc = ctx
        .store
        .get_bytes(&kept, &ctx.doc("d0"))
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(&kept_doc.bytes[..], b"keep");
    assert_eq!(ctx.store.delete_run(&doomed).await.expect("again"), 0);
    ctx.store
        .put_bytes(&doomed, &ctx.doc("d9"), Bytes::from_static(b"y"))
        .await
        .expect("reuse");
    assert_eq!(
        ctx.store.list_all_docs(&doomed).await.expect("docs").len(),
        1
    );
}

/// `head` reports what a listing reports — version and size, without the
/// bytes — and `None` for an absent document; where the backend declares
/// [`modified_times`](runstate_core::Capabilities::modified_times), both
/// carry the time of the last write (within a few seconds: servers may
/// round it to whole seconds and keep their own clock).
pub async fn head_and_listing_agree(ctx: Ctx) {
    use std::time::SystemTime;
    let run = ctx.run("head");
    let doc = ctx.doc("ron");
    assert_eq!(ctx.store.head(&run, &doc).await.expect("head absent"), None);
    let before = SystemTime::now();
    ctx.store
        .put_bytes(&run, &doc, Bytes::from_static(b"first"))
        .await
        .expect("put");
    let version = ctx
        .store
        .put_bytes(&run, &doc, Bytes::from_static(b"second!"))
        .await
        .expect("put");
    let after = SystemTime::now();
    let stat = ctx
        .store
        .head(&run, &doc)
        .await
        .expect("head")
        .expect("present");
    assert_eq!(stat.version, version);
    assert_eq!(stat.size, 7);
    let listed = ctx.store.list_all_docs(&run).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!((&listed[0].version, listed[0].size), (&version, 7));
    if ctx.store.capabilities().modified_times {
        let slack = Duration::from_secs(3);
        let lower = before.checked_sub(slack).expect("a time after the epoch");
        let upper = after + slack;
        for (what, modified) in [("head", stat.modified), ("listing", listed[0].modified)] {
            let modified = modified.unwrap_or_else(|| panic!("{what} has no modification time"));
            assert!(
                (lower..=upper).contains(&modified),
                "{what}: modified {modified:?} is not within the write's window {before:?}..{after:?}"
            );
        }
    }
    ctx.store.delete(&run, &doc, None).await.expect("delete");
    assert_eq!(
        ctx.store.head(&run, &doc).await.expect("head deleted"),
        None
    );
}
