//! The run-level conveniences reach the store: milestones, attributes,
//! status messages and watches through a [`Run`] handle.

use std::sync::Arc;
use std::time::Duration;

use runstate_core::{Client, Replay, RunId, StatusEvent, WatchEvent, memory::MemoryStore};

#[tokio::test]
async fn run_handles_mark_publish_and_watch() {
    let store = Arc::new(MemoryStore::new());
    let run = Client::new(store).run(RunId::new("Mica_flume1").expect("id"));
    let mut watch = run.watch().await.expect("watch");
    run.doc::<u32>("ron")
        .expect("name")
        .save(&7)
        .await
        .expect("save");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event in time")
        .expect("open feed")
        .expect("no error");
    assert!(
        matches!(&event, WatchEvent::Changed { doc, .. } if doc.as_str() == "ron"),
        "{event:?}"
    );

    run.mark("build_climate").await.expect("mark");
    run.set_attr("has_sbs", "false").await.expect("attr");
    let milestones = run.milestones().await.expect("milestones");
    assert!(
        milestones.timestamps.contains_key("build_climate"),
        "{milestones:?}"
    );
    assert_eq!(
        milestones.attrs.get("has_sbs").map(String::as_str),
        Some("false")
    );

    run.publish("climate", "downloading")
        .await
        .expect("publish");
    let mut messages = run.subscribe(Replay::All).await.expect("subscribe");
    let replayed = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a message in time")
        .expect("open feed")
        .expect("no error");
    assert!(
        matches!(&replayed, StatusEvent::Message(m) if m.topic == "climate" && m.text == "downloading"),
        "{replayed:?}"
    );
}
