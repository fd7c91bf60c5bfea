//! Document records and batch writes: a batch (`put_many`, which
//! migrations use) creates no lease record for a document that has none,
//! and writes it under the run's `records.lock` instead; every record is
//! created under that lock, so a batch and a record holder never write one
//! document at the same time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutMode, PutRequest, RunId, Store, StoreExt,
};
use runstate_file::{FileConfig, FileStore, SaveStep};

/// A store root under the temporary folder, removed on drop (also when a
/// test fails).
struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        Root(std::env::temp_dir().join(format!(
            "runstate-records-{tag}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        )))
    }
}

impl std::ops::Deref for Root {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The lease records in the bookkeeping folder `book`, sorted.
fn records_in(book: &Path) -> Vec<String> {
    names(book)
        .into_iter()
        .filter(|n| n.ends_with(".lease"))
        .collect()
}

/// `path` (created when missing) locked through a descriptor of its own,
/// as another process's `flock` holds it, until the file is dropped.
fn held_elsewhere(path: &Path) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("a file to lock");
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).expect("flock");
    file
}

fn doc(i: usize) -> DocName {
    DocName::new(format!("d{i}")).expect("valid")
}

/// A batch of new documents leaves one file per document and no record
/// (before, each document's write created `doc.<name>.lease` beside it: two
/// files per document, which is most of what a migration into this store
/// costs on this machine). A record appears when something needs it, a
/// lease here, and a batch then writes the document under that record.
#[tokio::test]
async fn a_batch_creates_no_record_for_a_document_that_has_none() {
    let root = Root::new("none");
    let store = FileStore::open(FileConfig::new(&*root))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume1").expect("valid");
    let puts = (0..8)
        .map(|i| PutRequest::new(doc(i), Bytes::from(format!("v{i}")), PutMode::Create))
        .collect();
    let results = store.put_many(&run, puts).await.expect("a batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for i in 0..8 {
        let stored = store
            .get_bytes(&run, &doc(i))
            .await
            .expect("get")
            .expect("present");
        assert_eq!(stored.bytes, Bytes::from(format!("v{i}")));
    }
    let book = root.join("Mica_flume1").join(".runstate");
    assert_eq!(
        records_in(&book),
        Vec::<String>::new(),
        "no record was needed"
    );
    assert!(book.join("records.lock").is_file(), "{:?}", names(&book));

    // A lease needs d3's record; the next batch writes d3 under it, and a
    // holder of the record (another process's `flock`) makes it wait.
    let key = LockKey::Doc(run.clone(), doc(3));
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("a lease of d3");
    assert!(book.join("doc.d3.lease").is_file());
    store.release(&lease).await.expect("release");
    let held = held_elsewhere(&book.join("doc.d3.lease"));
    let store =
        FileStore::open(FileConfig::new(&*root).with_lock_timeout(Duration::from_millis(300)))
            .await
            .expect("open");
    let puts = [3, 4]
        .into_iter()
        .map(|i| PutRequest::new(doc(i), Bytes::from("new"), PutMode::Overwrite))
        .collect();
    let results = store.put_many(&run, puts).await.expect("a batch");
    let error = results[0].as_ref().expect_err("d3's record is held");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    results[1].as_ref().expect("d4 has no record to wait for");
    drop(held);
    assert_eq!(records_in(&book), ["doc.d3.lease"]);
}

/// While another process holds a run's records lock, a batch does not
/// write a document of that run that has no record, and no record is
/// created for a single save either: both fail with a retryable `Timeout`
/// within the lock timeout and change nothing. (Before, neither looked at
/// the lock.)
#[tokio::test]
async fn a_held_records_lock_holds_up_unrecorded_writes() {
    let root = Root::new("held");
    let timeout = Duration::from_millis(300);
    let store = FileStore::open(FileConfig::new(&*root).with_lock_timeout(timeout))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume2").expect("valid");
    // d0 has a record (a single save made it), d1 has none.
    store
        .put_bytes(&run, &doc(0), Bytes::from("old"))
        .await
        .expect("seed");
    let batch = vec![PutRequest::new(doc(1), Bytes::from("old"), PutMode::Create)];
    let results = store.put_many(&run, batch).await.expect("a batch");
    results[0].as_ref().expect("seeded");

    let book = root.join("Mica_flume2").join(".runstate");
    let held = held_elsewhere(&book.join("records.lock"));

    let start = Instant::now();
    let puts = (0..2)
        .map(|i| PutRequest::new(doc(i), Bytes::from("new"), PutMode::Overwrite))
        .collect();
    let results = store.put_many(&run, puts).await.expect("a batch");
    results[0].as_ref().expect("d0's record is free");
    let error = results[1].as_ref().expect_err("d1 needs the records lock");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable(), "{error}");
    let error = store
        .put_bytes(&run, &doc(2), Bytes::from("new"))
        .await
        .expect_err("d2's record cannot be created");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    // Two waits of one lock timeout each, and a few `fsync`s.
    assert!(
        start.elapsed() < timeout * 10,
        "two lock timeouts of {timeout:?} took {:?}",
        start.elapsed()
    );
    for (i, expected) in [(0, Some("new")), (1, Some("old")), (2, None)] {
        let stored = store.get_bytes(&run, &doc(i)).await.expect("get");
        assert_eq!(stored.map(|d| d.bytes), expected.map(Bytes::from), "d{i}");
    }
    let run_dir = root.join("Mica_flume2");
    let leftovers: Vec<String> = names(&run_dir)
        .into_iter()
        .filter(|n| n.contains(".rstmp."))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
    assert!(!book.join("doc.d1.lease").exists());
    assert!(!book.join("doc.d2.lease").exists());

    drop(held);
    store
        .put_bytes(&run, &doc(2), Bytes::from("new"))
        .await
        .expect("the lock is free again");
}

/// A batch creating a document that has no record and a single save
/// creating it (which creates its record) race, 10 times on two stores of
/// one root: each save starts when the batch is about to rename (a fault
/// hook, which then waits up to 300 ms for the save to end). Exactly one
/// of each pair succeeds and the other is told the document exists. The
/// batch is sure the record does not exist only under the records lock,
/// and a record is created only under it, so the save waits for the batch
/// to finish. (Creating the record without that lock lets the save check
/// and rename inside the batch's pause: both succeed.)
#[test]
fn a_batch_and_a_save_of_a_new_document_never_both_create_it() {
    let root = Root::new("race");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (at_rename, renaming) = mpsc::channel::<()>();
    let (saved, save_done) = mpsc::channel::<()>();
    let hook_ends = Mutex::new((at_rename, save_done));
    let pause = Arc::new(move |step: SaveStep, _: &Path| {
        if step == SaveStep::Rename {
            let ends = hook_ends.lock().expect("hook");
            let _ = ends.0.send(());
            let _ = ends.1.recv_timeout(Duration::from_millis(300));
        }
        Ok(())
    });
    let batcher = runtime
        .block_on(FileStore::open(
            FileConfig::new(&*root).with_fault_hook(pause),
        ))
        .expect("open");
    let saver = runtime
        .block_on(FileStore::open(FileConfig::new(&*root)))
        .expect("open");
    let run = RunId::new("Mica_flume3").expect("valid");
    // The run folder and its bookkeeping exist before the races start.
    runtime
        .block_on(saver.put_bytes(&run, &DocName::new("ron").expect("valid"), Bytes::new()))
        .expect("seed");
    drop(runtime);
    let rounds = 10;
    let batches = {
        let run = run.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            (0..rounds)
                .map(|i| {
                    let put = PutRequest::new(doc(i), Bytes::from("batch"), PutMode::Create);
                    let mut results = runtime
                        .block_on(batcher.put_many(&run, vec![put]))
                        .expect("a batch");
                    results.remove(0).map(|_| ())
                })
                .collect::<Vec<_>>()
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let saves: Vec<_> = (0..rounds)
        .map(|i| {
            renaming
                .recv_timeout(Duration::from_secs(30))
                .expect("the batch reached its rename");
            let outcome = runtime
                .block_on(saver.put(
                    &run,
                    &doc(i),
                    Bytes::from("save"),
                    runstate_core::PutOptions::create(),
                ))
                .map(|_| ());
            let _ = saved.send(());
            outcome
        })
        .collect();
    let batches = batches.join().expect("batches");
    for (i, (batch, save)) in batches.iter().zip(&saves).enumerate() {
        let loser = match (batch, save) {
            (Ok(()), Err(error)) | (Err(error), Ok(())) => error,
            _ => panic!("d{i}: exactly one creation may succeed: {batch:?} / {save:?}"),
        };
        assert_eq!(loser.kind(), ErrorKind::AlreadyExists, "d{i}: {loser}");
    }
}

/// A batch whose documents without a record find the records lock held
/// does not wait for it holding the records of its other documents: those
/// are written and let go first (a lease of one is renewed meanwhile),
/// then the lock is waited for and the rest written when it comes free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_the_records_lock_holding_no_record() {
    let root = Root::new("waits");
    let store = FileStore::open(FileConfig::new(&*root).with_lock_timeout(Duration::from_secs(10)))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume4").expect("valid");
    // d0 has a record (a single save made it), d1 has none.
    store
        .put_bytes(&run, &doc(0), Bytes::from("old"))
        .await
        .expect("seed");
    let lease = store
        .try_acquire(
            &LockKey::Doc(run.clone(), doc(0)),
            &Owner::for_this_process(),
            Duration::from_secs(30),
        )
        .await
        .expect("a lease of d0");
    let book = root.join("Mica_flume4").join(".runstate");
    let held = held_elsewhere(&book.join("records.lock"));

    let batch = {
        let (store, run) = (store.clone(), run.clone());
        tokio::spawn(async move {
            let puts = (0..2)
                .map(|i| PutRequest::new(doc(i), Bytes::from("new"), PutMode::Overwrite))
                .collect();
            store.put_many(&run, puts).await
        })
    };
    let start = Instant::now();
    loop {
        let now = store
            .get_bytes(&run, &doc(0))
            .await
            .expect("get")
            .expect("present");
        if now.bytes == "new" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "d0 not written while the batch waits for the records lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let renewed = store
        .renew(&lease, Duration::from_secs(30))
        .await
        .expect("renewed while the batch waits");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "renewed while the batch waits"
    );
    assert_eq!(
        store.get_bytes(&run, &doc(1)).await.expect("get"),
        None,
        "d1 waits for the records lock"
    );
    drop(held);
    let results = batch.await.expect("the batch").expect("a batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stored = store
        .get_bytes(&run, &doc(1))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.bytes, Bytes::from("new"));
    assert!(!book.join("doc.d1.lease").exists(), "d1 got no record");
    store.release(&renewed).await.expect("release");
}

/// Deletes create no record either: a document written by a batch (no
/// record) is deleted, conditionally or with its whole run, under the
/// run's records lock, and leaves no record behind (before, each delete
/// created the record it then locked, which a run's bookkeeping keeps for
/// ever). While another process holds the records lock, such a delete or
/// `delete_run` fails with `Timeout` and keeps the documents; a document
/// with a record is deleted meanwhile.
#[tokio::test]
async fn deletes_create_no_record() {
    let root = Root::new("deletes");
    let timeout = Duration::from_millis(300);
    let store = FileStore::open(FileConfig::new(&*root).with_lock_timeout(timeout))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume5").expect("valid");
    let puts = (0..4)
        .map(|i| PutRequest::new(doc(i), Bytes::from(format!("v{i}")), PutMode::Create))
        .collect();
    let results = store.put_many(&run, puts).await.expect("a batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // d3 gets a record (a single save makes one).
    store
        .put_bytes(&run, &doc(3), Bytes::from("v3'"))
        .await
        .expect("a save");
    let book = root.join("Mica_flume5").join(".runstate");
    assert_eq!(records_in(&book), ["doc.d3.lease"]);

    let held = held_elsewhere(&book.join("records.lock"));
    let error = store
        .delete(&run, &doc(0), None)
        .await
        .expect_err("d0 has no record: the records lock is needed");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(
        store
            .delete(&run, &doc(3), None)
            .await
            .expect("d3 has a record"),
        "d3 deleted"
    );
    let error = store
        .delete_run(&run)
        .await
        .expect_err("d0 has no record: the records lock is needed");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    for i in 0..3 {
        assert!(
            store.get_bytes(&run, &doc(i)).await.expect("get").is_some(),
            "d{i} kept"
        );
    }
    drop(held);
    assert_eq!(records_in(&book), ["doc.d3.lease"]);

    let v1 = store
        .get_bytes(&run, &doc(1))
        .await
        .expect("get")
        .expect("present")
        .version;
    let v2 = store
        .get_bytes(&run, &doc(2))
        .await
        .expect("get")
        .expect("present")
        .version;
    assert!(store.delete(&run, &doc(0), None).await.expect("d0 deleted"));
    assert_eq!(
        records_in(&book),
        ["doc.d3.lease"],
        "a delete made a record"
    );
    let error = store
        .delete(&run, &doc(1), Some(&v2))
        .await
        .expect_err("d1 is not at d2's version");
    assert_eq!(error.kind(), ErrorKind::Precondition, "{error}");
    assert!(
        store
            .delete(&run, &doc(1), Some(&v1))
            .await
            .expect("d1 deleted on its version")
    );
    assert_eq!(
        records_in(&book),
        ["doc.d3.lease"],
        "a conditional delete made a record"
    );
    assert_eq!(store.delete_run(&run).await.expect("the run deleted"), 1);
    for i in 0..4 {
        assert_eq!(
            store.get_bytes(&run, &doc(i)).await.expect("get"),
            None,
            "d{i}"
        );
    }
    assert_eq!(
        records_in(&book),
        ["doc.d3.lease"],
        "delete_run made a record"
    );
}
