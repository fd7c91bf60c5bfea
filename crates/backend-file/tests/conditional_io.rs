//! A conditional read of an unchanged document reads metadata, not its
//! content: `get_if_changed` answers from the version index. Measured
//! with this process's `rchar` (bytes read by system calls,
//! `/proc/self/io`), so it has a test binary of its own.

#![cfg(target_os = "linux")]

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use runstate_core::{Bytes, DocName, ErrorKind, Fetched, GetOptions, RunId, Store, StoreExt};
use runstate_file::{FileConfig, FileStore};

fn bytes_read() -> u64 {
    let io = fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("an rchar line")
}

const SIZE: usize = 4 << 20;
const CHECKS: u64 = 20;

#[tokio::test]
async fn an_unchanged_document_is_validated_without_reading_it() {
    let root = std::env::temp_dir().join(format!(
        "runstate-conditional-io-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let store = FileStore::open_path(&root).await.expect("open");
    assert!(store.capabilities().native_conditional_get);
    let run = RunId::new("Mica_flume1").expect("valid");
    let doc = DocName::new("watershed").expect("valid");
    let mut bytes = vec![0u8; SIZE];
    fastrand::fill(&mut bytes);
    let version = store
        .put_bytes(&run, &doc, Bytes::from(bytes))
        .await
        .expect("put");
    // Past the window in which a fresh file's times may not show a change;
    // the first check after it reads the document once and remembers it.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let check = |store: FileStore, limit: Option<u64>| {
        let (run, doc, version) = (run.clone(), doc.clone(), version.clone());
        async move {
            let options = limit.map_or_else(GetOptions::new, |l| GetOptions::new().with_limit(l));
            store
                .get_if_changed(&run, &doc, &version, options)
                .await
                .expect("check")
        }
    };
    assert_eq!(check(store.clone(), None).await, Fetched::Unchanged);

    let before = bytes_read();
    for _ in 0..CHECKS {
        assert_eq!(check(store.clone(), None).await, Fetched::Unchanged);
    }
    let warm = bytes_read() - before;
    eprintln!("{CHECKS} checks of an unchanged {SIZE}-byte document read {warm} bytes");
    assert!(
        warm < (SIZE as u64) / 100,
        "{CHECKS} checks read {warm} bytes of a {SIZE}-byte document"
    );
    // Whatever its size: the limit applies to what is read, and nothing is.
    assert_eq!(check(store.clone(), Some(10)).await, Fetched::Unchanged);

    // Another store (another process, say) finds the remembered version in
    // the bookkeeping folder.
    let other = FileStore::open(FileConfig::new(&root).with_sweep_on_open(false))
        .await
        .expect("open");
    let before = bytes_read();
    assert_eq!(check(other.clone(), None).await, Fetched::Unchanged);
    let cold = bytes_read() - before;
    eprintln!("a new store's check read {cold} bytes");
    assert!(
        cold < (SIZE as u64) / 100,
        "a new store's check read {cold} bytes of a {SIZE}-byte document"
    );

    // Rewritten in place, same size, modification time put back: the
    // status-change time gives it away, and the new content is read.
    let path = root.join("Mica_flume1/watershed.json");
    let modified = fs::metadata(&path)
        .expect("stat")
        .modified()
        .expect("mtime");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(b"rewritten in place").expect("write");
        file.set_modified(modified).expect("put the time back");
    }
    assert!(
        fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime")
            == modified
    );
    match check(other.clone(), None).await {
        Fetched::Changed(stored) => {
            assert_eq!(stored.bytes.len(), SIZE);
            assert!(stored.bytes.starts_with(b"rewritten in place"));
            assert_ne!(stored.version, version);
            assert_eq!(
                store
                    .get_bytes(&run, &doc)
                    .await
                    .expect("get")
                    .expect("present")
                    .version,
                stored.version
            );
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    let error = other
        .get_if_changed(&run, &doc, &version, GetOptions::new().with_limit(10))
        .await
        .expect_err("a changed document over the limit");
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    fs::remove_file(&path).expect("remove");
    assert_eq!(check(other, None).await, Fetched::Absent);
    fs::remove_dir_all(&root).expect("cleanup");
}
