//! Listing every run page by page is linear: the root folder is read once,
//! not once per page, while it does not change; and a change is seen.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use runstate_core::{Lock, RunId, Store, StoreExt};
use runstate_file::{FileConfig, FileStore};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-listing-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

const RUNS: usize = 5000;
const PAGE: usize = 10;

#[tokio::test]
async fn paging_through_every_run_reads_the_root_once() {
    let root = temp_root("pages");
    let mut expected = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let id = format!("run{i:05}");
        fs::create_dir(root.join(&id)).expect("run folder");
        fs::write(root.join(&id).join("ron.json"), b"{}").expect("document");
        expected.push(RunId::new(id).expect("valid"));
    }
    // An empty folder and a stray file are not runs.
    fs::create_dir(root.join("empty")).expect("empty folder");
    fs::write(root.join("stray.txt"), b"x").expect("stray file");
    // Past the window in which the root's times may not yet show a change,
    // so its listing can be remembered.
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let store = FileStore::open(FileConfig::new(&root).with_sweep_on_open(false))
        .await
        .expect("open");
    let scans = store.root_scans();
    let mut listed: Vec<RunId> = Vec::with_capacity(RUNS);
    let mut pages = 0;
    loop {
        let page = store.list_runs(listed.last(), PAGE).await.expect("a page");
        pages += 1;
        assert!(page.items.len() <= PAGE);
        listed.extend(page.items);
        if !page.more {
            break;
        }
    }
    assert_eq!(listed, expected);
    assert!(pages >= RUNS / PAGE);
    let read = store.root_scans() - scans;
    assert!(
        read <= 2,
        "{pages} pages read the root {read} times: each page must not rescan it"
    );

    // A run created since is seen by the next listing.
    let late = RunId::new("run99999").expect("valid");
    fs::create_dir(root.join(late.as_str())).expect("late run");
    fs::write(root.join("run99999/ron.json"), b"{}").expect("document");
    let all = store.list_all_runs().await.expect("list");
    assert_eq!(all.len(), RUNS + 1);
    assert_eq!(all.last(), Some(&late));
    // And one removed is gone.
    fs::remove_dir_all(root.join("run00000")).expect("remove a run");
    let all = store.list_all_runs().await.expect("list");
    assert_eq!(all.first().map(RunId::as_str), Some("run00001"));
    assert!(store.list_locks(None).await.expect("locks").is_empty());
    fs::remove_dir_all(&root).expect("cleanup");
}
