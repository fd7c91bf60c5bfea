//! A warm listing reads metadata, not contents: listing a run of big
//! documents whose versions are remembered reads far fewer bytes than the
//! documents hold; so does `head`. Measured with this process's `rchar`
//! (bytes read by system calls, `/proc/self/io`), so it has a test binary
//! of its own.

#![cfg(target_os = "linux")]

use std::fs;
use std::time::Duration;

use runstate_core::{Bytes, DocName, RunId, Store, StoreExt};
use runstate_file::{FileConfig, FileStore};

fn bytes_read() -> u64 {
    let io = fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("an rchar line")
}

const DOCS: usize = 8;
const SIZE: usize = 4 << 20;

#[tokio::test]
async fn a_warm_listing_reads_metadata_not_contents() {
    let root = std::env::temp_dir().join(format!(
        "runstate-listing-io-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let store = FileStore::open_path(&root).await.expect("open");
    let run = RunId::new("Mica_flume1").expect("valid");
    for i in 0..DOCS {
        let mut bytes = vec![0u8; SIZE];
        fastrand::fill(&mut bytes);
        store
            .put_bytes(
                &run,
                &DocName::new(format!("controller{i}")).expect("valid"),
                Bytes::from(bytes),
            )
            .await
            .expect("put");
    }
    let total = (DOCS * SIZE) as u64;
    // Past the window in which a fresh file's times may not show a change;
    // the first listing after it hashes each document once.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let cold = store.list_all_docs(&run).await.expect("list");
    assert_eq!(cold.len(), DOCS);

    let before = bytes_read();
    let warm = store.list_all_docs(&run).await.expect("list");
    let same_process = bytes_read() - before;
    assert_eq!(warm, cold);

    // A new store (another process, say) reads the remembered versions.
    let other = FileStore::open(FileConfig::new(&root).with_sweep_on_open(false))
        .await
        .expect("open");
    let before = bytes_read();
    let listed = other.list_all_docs(&run).await.expect("list");
    let other_store = bytes_read() - before;
    assert_eq!(listed, cold);

    // `head` answers from the same metadata and index: no content read,
    // and the listing's version, size and modification time (the file's).
    let before = bytes_read();
    for meta in &cold {
        let stat = store
            .head(&run, &meta.name)
            .await
            .expect("head")
            .expect("present");
        assert_eq!(stat.version, meta.version);
        assert_eq!(stat.size, SIZE as u64);
        let mtime = fs::metadata(root.join(run.as_str()).join(format!("{}.json", meta.name)))
            .expect("stat")
            .modified()
            .expect("mtime");
        assert_eq!(stat.modified, Some(mtime));
        assert_eq!(meta.modified, Some(mtime), "listings carry it too");
    }
    let heads = bytes_read() - before;
    assert!(store.capabilities().modified_times);
    assert!(
        store
            .head(&run, &DocName::new("absent").expect("valid"))
            .await
            .expect("head")
            .is_none()
    );

    eprintln!(
        "listing {DOCS} documents of {total} bytes read {same_process} bytes warm, \
         {other_store} bytes from a new store; head of each read {heads} bytes"
    );
    assert!(heads < total / 100, "head read {heads} of {total} bytes");
    assert!(
        same_process < total / 100,
        "a warm listing read {same_process} of {total} bytes"
    );
    assert!(
        other_store < total / 100,
        "a new store's listing read {other_store} of {total} bytes"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}
