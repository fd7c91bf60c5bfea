//! Reads are bounded: a document larger than the store's limit is never
//! read into memory (a sparse 1 TiB file lists, and is refused with typed
//! errors, instead of aborting the process), and remembered versions never
//! outlive the content they describe.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, GetOptions, Lock, LockKey, Owner, PutOptions, RunId, Store,
    StoreExt, Version,
};
use runstate_file::{DEFAULT_MAX_DOCUMENT_SIZE, FileConfig, FileStore};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-limits-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

fn run() -> RunId {
    RunId::new("r").expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

const TIB: u64 = 1 << 40;

#[tokio::test]
async fn a_sparse_terabyte_document_is_listed_and_refused_never_read() {
    let root = temp_root("sparse");
    let store = FileStore::open_path(&root).await.expect("open");
    assert_eq!(
        store.capabilities().max_document_size,
        Some(DEFAULT_MAX_DOCUMENT_SIZE)
    );
    let small = store
        .put_bytes(&run(), &doc("small"), Bytes::from_static(b"{}"))
        .await
        .expect("put");
    let huge = doc("huge");
    fs::File::create(root.join("r/huge.json"))
        .expect("create")
        .set_len(TIB)
        .expect("a sparse 1 TiB file");

    // Listed, with its size and a version made from its metadata.
    let listed = store.list_all_docs(&run()).await.expect("list_docs");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].name, huge);
    assert_eq!(listed[0].size, TIB);
    assert!(
        listed[0].version.as_str().starts_with("over-limit-"),
        "{:?}",
        listed[0].version
    );
    assert_eq!(listed[1].version, small);
    // `head` knows it as the listing does, without reading it.
    let stat = store
        .head(&run(), &huge)
        .await
        .expect("head of a document over the limit")
        .expect("present");
    assert_eq!((stat.version, stat.size), (listed[0].version.clone(), TIB));
    assert_eq!(stat.modified, listed[0].modified);
    assert!(stat.modified.is_some());
    assert_eq!(
        store.list_all_runs().await.expect("runs"),
        vec![run()],
        "the run lists"
    );

    let error = store
        .get_bytes(&run(), &huge)
        .await
        .expect_err("get without a limit is bounded by the store's");
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    let error = store
        .get(&run(), &huge, GetOptions::new().with_limit(u64::MAX))
        .await
        .expect_err("and with a larger limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");

    for version in [listed[0].version.clone(), Version::new("anything")] {
        let error = store
            .put(
                &run(),
                &huge,
                Bytes::from_static(b"{}"),
                PutOptions::update(version.clone()),
            )
            .await
            .expect_err("its version cannot be checked");
        assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
        let error = store
            .delete(&run(), &huge, Some(&version))
            .await
            .expect_err("its version cannot be checked");
        assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    }
    let error = store
        .put(
            &run(),
            &huge,
            Bytes::from_static(b"{}"),
            PutOptions::create(),
        )
        .await
        .expect_err("it exists");
    assert_eq!(error.kind(), ErrorKind::AlreadyExists);

    let owner = Owner::for_this_process();
    let key = LockKey::Doc(run(), huge.clone());
    let error = store
        .acquire_and_load(
            &key,
            &huge,
            &owner,
            Duration::from_secs(30),
            Default::default(),
        )
        .await
        .expect_err("a locked load is bounded too");
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "and releases its lease"
    );
    assert_eq!(
        fs::metadata(root.join("r/huge.json")).expect("stat").len(),
        TIB,
        "nothing changed it"
    );

    // An overwrite replaces it; a plain delete removes it.
    store
        .put_bytes(&run(), &huge, Bytes::from_static(b"[]"))
        .await
        .expect("overwrite");
    fs::File::options()
        .write(true)
        .open(root.join("r/huge.json"))
        .expect("open")
        .set_len(TIB)
        .expect("sparse again");
    assert!(store.delete(&run(), &huge, None).await.expect("delete"));
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn the_size_limit_is_configurable_and_enforced_on_saves() {
    let root = temp_root("config");
    let url = format!("file://{}?max_document_bytes=1024", root.display());
    let store = FileStore::open(FileConfig::from_url(&url).expect("url"))
        .await
        .expect("open");
    assert_eq!(store.capabilities().max_document_size, Some(1024));
    store
        .put_bytes(&run(), &doc("fits"), Bytes::from(vec![b'x'; 1024]))
        .await
        .expect("at the limit");
    let error = store
        .put_bytes(&run(), &doc("big"), Bytes::from(vec![b'x'; 1025]))
        .await
        .expect_err("over the limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge);
    assert!(
        !root.join("r/big.json").exists(),
        "nothing written: {error}"
    );
    fs::write(root.join("r/dropped.json"), vec![b'y'; 2048]).expect("dropped in");
    let error = store
        .get_bytes(&run(), &doc("dropped"))
        .await
        .expect_err("over the limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge);
    let listed = store.list_all_docs(&run()).await.expect("list");
    let dropped = listed
        .iter()
        .find(|m| m.name.as_str() == "dropped")
        .expect("listed");
    assert_eq!(dropped.size, 2048);
    assert!(dropped.version.as_str().starts_with("over-limit-"));
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Past the window in which a file's times may not yet show a change.
const SETTLE: Duration = Duration::from_millis(2300);

/// A remembered version is dropped when the file changes, even in place,
/// with the same size, and with its modification time put back: the
/// status-change time still tells.
#[tokio::test]
async fn a_document_rewritten_in_place_gets_a_new_version() {
    let root = temp_root("stale");
    let store = FileStore::open_path(&root).await.expect("open");
    let ron = doc("ron");
    let first = store
        .put_bytes(&run(), &ron, Bytes::from_static(b"{\"n\":1}"))
        .await
        .expect("put");
    tokio::time::sleep(SETTLE).await;
    let listed = store.list_all_docs(&run()).await.expect("list");
    assert_eq!(listed[0].version, first);
    assert!(
        root.join("r/.runstate/docs.index").exists(),
        "the settled version is remembered"
    );

    // Another program rewrites it in place: same inode, same size, and it
    // even restores the modification time.
    let path = root.join("r/ron.json");
    let mtime = fs::metadata(&path)
        .expect("stat")
        .modified()
        .expect("mtime");
    let mut file = fs::File::options().write(true).open(&path).expect("open");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(b"{\"n\":2}").expect("rewrite");
    file.set_modified(mtime).expect("put the mtime back");
    drop(file);
    let stored = store
        .get_bytes(&run(), &ron)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&stored.bytes[..], b"{\"n\":2}");
    assert_ne!(stored.version, first);

    let listed = store.list_all_docs(&run()).await.expect("list");
    assert_eq!(listed[0].version, stored.version, "this process");
    let fresh = FileStore::open_path(&root).await.expect("open");
    let listed = fresh.list_all_docs(&run()).await.expect("list");
    assert_eq!(listed[0].version, stored.version, "from the index file");

    // The listed version works for a conditional update.
    store
        .put(
            &run(),
            &ron,
            Bytes::from_static(b"{\"n\":3}"),
            PutOptions::update(listed[0].version.clone()),
        )
        .await
        .expect("update with the listed version");
    // A rewrite right after a listing (within a timestamp tick) is caught
    // too: the listing remembered nothing that recent.
    let listed = store.list_all_docs(&run()).await.expect("list");
    fs::write(&path, b"{\"n\":4}").expect("rewrite at once");
    let stored = store
        .get_bytes(&run(), &ron)
        .await
        .expect("get")
        .expect("present");
    let again = store.list_all_docs(&run()).await.expect("list");
    assert_eq!(again[0].version, stored.version);
    assert_ne!(again[0].version, listed[0].version);
    fs::remove_dir_all(&root).expect("cleanup");
}
