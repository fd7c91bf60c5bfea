//! Case group 11: watching runs, status messages, milestones. A backend
//! either does each as the contract says or declares it does not
//! ([`Capabilities`](runstate_core::Capabilities)), and the suite checks the
//! declaration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::{
    Bytes, DocName, ErrorKind, Replay, StatusEvent, StoreExt, Version, WatchEvent, WatchMode,
    Watcher,
};

use super::expect_kind;
use crate::Ctx;

/// How long a watch may take to report a write: 1 s, or the polling
/// interval and 1 s.
fn watch_bound(mode: WatchMode) -> Duration {
    match mode {
        WatchMode::Polling(every) => every + Duration::from_secs(1),
        _ => Duration::from_secs(1),
    }
}

/// The consumer of the documented protocol: a watch started first, then a
/// snapshot; events applied; a re-list on `Resync`.
struct Follower {
    watch: Watcher,
    state: BTreeMap<DocName, Version>,
    /// Versions seen per document, in order.
    seen: BTreeMap<DocName, Vec<Version>>,
    resyncs: usize,
}

impl Follower {
    async fn start(ctx: &Ctx, run: &runstate_core::RunId) -> Follower {
        let watch = ctx.store.watch(run).await.expect("watch");
        let state = ctx
            .store
            .list_all_docs(run)
            .await
            .expect("snapshot")
            .into_iter()
            .map(|m| (m.name, m.version))
            .collect();
        Follower {
            watch,
            state,
            seen: BTreeMap::new(),
            resyncs: 0,
        }
    }

    /// Applies events until `done(state)` holds, or `bound` passes with no
    /// progress; returns whether it held.
    async fn follow_until(
        &mut self,
        ctx: &Ctx,
        run: &runstate_core::RunId,
        bound: Duration,
        done: impl Fn(&BTreeMap<DocName, Version>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + bound;
        while !done(&self.state) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(event) = tokio::time::timeout(left, self.watch.next()).await else {
                return false;
            };
            match event
                .expect("the watch stays open")
                .expect("no watch error")
            {
                WatchEvent::Changed { doc, version } => {
                    self.seen
                        .entry(doc.clone())
                        .or_default()
                        .push(version.clone());
                    self.state.insert(doc, version);
                }
                WatchEvent::Deleted { doc } => {
                    self.state.remove(&doc);
                }
                WatchEvent::Resync => {
                    self.resyncs += 1;
                    self.state = ctx
                        .store
                        .list_all_docs(run)
                        .await
                        .expect("re-list")
                        .into_iter()
                        .map(|m| (m.name, m.version))
                        .collect();
                }
                _ => {}
            }
        }
        true
    }
}

/// Every acknowledged write (and delete) is observed within the bound, in
/// order per document: the versions a document is seen with are a
/// subsequence of the versions it was written with, ending with the last
/// one (every one of them, on backends that report every write).
pub async fn watch_sees_every_acknowledged_write(ctx: Ctx) {
    let mode = ctx.store.capabilities().watch;
    let run = ctx.run("watched");
    if mode == WatchMode::None {
        expect_kind(ctx.store.watch(&run).await, ErrorKind::Unsupported);
        return;
    }
    let (a, b, gone) = (ctx.doc("ron"), ctx.doc("climate"), ctx.doc("wepp"));
    ctx.store
        .put_bytes(&run, &gone, Bytes::from_static(b"soon deleted"))
        .await
        .expect("seed");
    let mut follower = Follower::start(&ctx, &run).await;
    let mut written: BTreeMap<DocName, Vec<Version>> = BTreeMap::new();
    for i in 0..10u32 {
        for doc in [&a, &b] {
            let v = ctx
                .store
                .put_bytes(&run, doc, Bytes::from(format!("{doc} {i}")))
                .await
                .expect("write");
            written.entry(doc.clone()).or_default().push(v);
        }
    }
    assert!(ctx.store.delete(&run, &gone, None).await.expect("delete"));
    let expected: BTreeMap<DocName, Version> = written
        .iter()
        .map(|(d, vs)| (d.clone(), vs.last().expect("written").clone()))
        .collect();
    let reached = follower
        .follow_until(
            &ctx,
            &run,
            watch_bound(mode) + Duration::from_secs(2),
            |s| *s == expected,
        )
        .await;
    assert!(
        reached,
        "the watch did not reach the store's state: {:?} vs {expected:?}",
        follower.state
    );
    for (doc, versions) in &written {
        let seen = follower.seen.get(doc).cloned().unwrap_or_default();
        let mut rest = versions.iter();
        for v in &seen {
            assert!(
                rest.any(|w| w == v),
                "{doc}: versions seen out of order or never written: {seen:?} vs {versions:?}"
            );
        }
        if matches!(mode, WatchMode::Native { every_write: true }) && follower.resyncs == 0 {
            assert_eq!(&seen, versions, "{doc}: every write reported");
        }
    }
    assert_eq!(ctx.store.list_all_docs(&run).await.expect("list").len(), 2);
}

/// A consumer that does not keep up gets a `Resync`, not silence, and a
/// re-list then equals the store.
pub async fn watch_overflow_gives_resync(ctx: Ctx) {
    let mode = ctx.store.capabilities().watch;
    let run = ctx.run("flooded");
    if mode == WatchMode::None {
        return;
    }
    let mut follower = Follower::start(&ctx, &run).await;
    // More distinct documents than a feed buffers: polling and native
    // watches alike must overflow while nobody reads.
    let count = runstate_core::events::FEED_CAPACITY + 100;
    let store = Arc::clone(&ctx.store);
    let run2 = run.clone();
    let writes = (0..count).map(move |i| {
        let (store, run) = (Arc::clone(&store), run2.clone());
        async move {
            let doc = DocName::new(format!("d{i:05}")).expect("valid");
            store
                .put_bytes(&run, &doc, Bytes::from_static(b"x"))
                .await
                .expect("write");
        }
    });
    let mut writes = writes.collect::<Vec<_>>();
    while !writes.is_empty() {
        let batch: Vec<_> = writes.drain(..writes.len().min(32)).collect();
        let mut set = tokio::task::JoinSet::new();
        for w in batch {
            set.spawn(w);
        }
        while let Some(done) = set.join_next().await {
            done.expect("joined");
        }
    }
    // Let the producer run into the full buffer.
    tokio::time::sleep(watch_bound(mode)).await;
    let reached = follower
        .follow_until(
            &ctx,
            &run,
            watch_bound(mode) + Duration::from_secs(5),
            |s| s.len() == count,
        )
        .await;
    assert!(
        reached,
        "the follower never caught up: {} of {count}",
        follower.state.len()
    );
    assert!(
        follower.resyncs > 0,
        "an overflow must be marked with Resync"
    );
    let listed: BTreeMap<DocName, Version> = ctx
        .store
        .list_all_docs(&run)
        .await
        .expect("list")
        .into_iter()
        .map(|m| (m.name, m.version))
        .collect();
    assert_eq!(
        follower.state, listed,
        "after the re-list the follower equals the store"
    );
}

/// Status messages: a subscriber replays the history it asks for, in
/// order, then follows live messages; names and sizes are checked.
pub async fn status_replay_then_follow(ctx: Ctx) {
    let run = ctx.run("status");
    if !ctx.store.capabilities().status {
        expect_kind(
            ctx.store.publish(&run, "climate", "x").await,
            ErrorKind::Unsupported,
        );
        expect_kind(
            ctx.store.subscribe(&run, Replay::All).await,
            ErrorKind::Unsupported,
        );
        return;
    }
    for i in 0..5 {
        let topic = if i % 2 == 0 { "climate" } else { "wepp" };
        ctx.store
            .publish(&run, topic, &format!("step {i}"))
            .await
            .expect("publish");
    }
    let texts = |events: &[StatusEvent]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                StatusEvent::Message(m) => Some(m.text.clone()),
                _ => None,
            })
            .collect()
    };
    let take = |mut sub: runstate_core::Subscription, n: usize| async move {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                Ok(Some(Ok(event))) => out.push(event),
                Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
                Ok(None) => panic!("subscription ended"),
                Err(_) => panic!("only {} of {n} events within 3 s: {out:?}", out.len()),
            }
        }
        (sub, out)
    };
    let all = ctx
        .store
        .subscribe(&run, Replay::All)
        .await
        .expect("subscribe");
    let (all, replayed) = take(all, 5).await;
    assert_eq!(
        texts(&replayed),
        (0..5).map(|i| format!("step {i}")).collect::<Vec<_>>()
    );
    if let StatusEvent::Message(first) = &replayed[0] {
        assert_eq!(first.topic, "climate");
        assert!(first.at <= SystemTime::now() + Duration::from_secs(60));
    }
    let last2 = ctx
        .store
        .subscribe(&run, Replay::Last(2))
        .await
        .expect("subscribe");
    let live = ctx
        .store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    let (last2, replayed2) = take(last2, 2).await;
    assert_eq!(texts(&replayed2), ["step 3", "step 4"]);
    for i in 5..8 {
        ctx.store
            .publish(&run, "wepp", &format!("step {i}"))
            .await
            .expect("publish");
    }
    let expect_live: Vec<String> = (5..8).map(|i| format!("step {i}")).collect();
    for sub in [all, last2, live] {
        let (_, events) = take(sub, 3).await;
        assert_eq!(texts(&events), expect_live);
    }
    expect_kind(
        ctx.store.publish(&run, "bad topic", "x").await,
        ErrorKind::InvalidKey,
    );
    expect_kind(
        ctx.store
            .publish(
                &run,
                "climate",
                &"x".repeat(runstate_core::events::MAX_MESSAGE_LEN + 1),
            )
            .await,
        ErrorKind::TooLarge,
    );
    // Another run's messages are not this run's.
    let other = ctx.run("other");
    let sub = ctx
        .store
        .subscribe(&other, Replay::All)
        .await
        .expect("subscribe");
    ctx.store
        .publish(&other, "ron", "theirs")
        .await
        .expect("publish");
    let (_, events) = take(sub, 1).await;
    assert_eq!(texts(&events), ["theirs"]);
}

/// A subscriber that falls behind gets `Resync`, not silence; reading the
/// history again (a new subscription replaying the last messages) then
/// shows the newest messages, in order.
pub async fn status_slow_subscriber_gets_resync(ctx: Ctx) {
    let run = ctx.run("chatty");
    if !ctx.store.capabilities().status {
        return;
    }
    let mut sub = ctx
        .store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    let count = runstate_core::events::FEED_CAPACITY + 100;
    for i in 0..count {
        ctx.store
            .publish(&run, "wepp", &format!("m{i}"))
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resyncs = 0;
    let mut messages = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        match event.expect("no subscription error") {
            StatusEvent::Message(_) => messages += 1,
            _ => resyncs += 1,
        }
    }
    assert!(
        resyncs > 0,
        "falling behind must be marked with Resync ({messages} messages)"
    );
    assert!(messages < count, "not every message fitted");
    let mut again = ctx
        .store
        .subscribe(&run, Replay::Last(3))
        .await
        .expect("subscribe again");
    let mut newest = Vec::new();
    while newest.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(3), again.next()).await {
            Ok(Some(Ok(StatusEvent::Message(m)))) => newest.push(m.text),
            Ok(Some(Ok(_))) => {}
            other => panic!("the history replay stopped: {other:?}"),
        }
    }
    let expected: Vec<String> = (count - 3..count).map(|i| format!("m{i}")).collect();
    assert_eq!(newest, expected);
}

/// Milestones and attributes: set field by field, concurrently, without a
/// lock; read back together; a re-mark replaces.
pub async fn milestones_field_by_field(ctx: Ctx) {
    let run = ctx.run("milestones");
    if !ctx.store.capabilities().milestones {
        expect_kind(
            ctx.store
                .mark(&run, "build_climate", SystemTime::now())
                .await,
            ErrorKind::Unsupported,
        );
        expect_kind(ctx.store.milestones(&run).await, ErrorKind::Unsupported);
        return;
    }
    assert_eq!(
        ctx.store.milestones(&run).await.expect("empty"),
        runstate_core::Milestones::default()
    );
    let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + s);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let (store, run) = (Arc::clone(&ctx.store), run.clone());
        tasks.spawn(async move {
            store
                .mark(&run, &format!("task_{i:02}"), at(i))
                .await
                .expect("mark");
            store
                .set_attr(&run, &format!("attr_{i:02}"), &format!("value {i}"))
                .await
                .expect("set_attr");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("joined");
    }
    ctx.store
        .mark(&run, "task_00", at(100))
        .await
        .expect("re-mark");
    ctx.store
        .set_attr(&run, "has_sbs", "false")
        .await
        .expect("set");
    let got = ctx.store.milestones(&run).await.expect("milestones");
    assert_eq!(got.timestamps.len(), 16);
    assert_eq!(got.attrs.len(), 17);
    assert_eq!(got.timestamps["task_00"], at(100), "a re-mark replaces");
    assert_eq!(got.timestamps["task_07"], at(7));
    assert_eq!(got.attrs["attr_03"], "value 3");
    assert_eq!(got.attrs["has_sbs"], "false");
    expect_kind(
        ctx.store.mark(&run, "../escape", SystemTime::now()).await,
        ErrorKind::InvalidKey,
    );
    let refused = ctx
        .store
        .set_attr(&run, "a b", "x")
        .await
        .expect_err("a name with a space");
    assert_eq!(refused.kind(), ErrorKind::InvalidKey, "{refused}");
    assert_eq!(
        refused.operation(),
        Some(runstate_core::Operation::SetAttr),
        "{refused}"
    );
    assert_eq!(
        ctx.store
            .milestones(&ctx.run("other"))
            .await
            .expect("other run"),
        runstate_core::Milestones::default()
    );
}
