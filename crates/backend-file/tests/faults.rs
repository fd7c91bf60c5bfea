//! Fault injection: each filesystem step of a save fails in turn; the save
//! returns the error, the previous document is intact, no temporary file is
//! left, the next save succeeds, and a failed `save_and_release` still
//! releases its lease. The root `fsync` that makes a run folder durable is
//! seen by the first save into every folder, whoever created it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutMode, PutOptions, RunId, Store, StoreExt,
    display_chain,
};
use runstate_file::{FileConfig, FileStore, SaveStep};

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("run folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".rstmp.") || n.contains(".rsold."))
        .collect()
}

async fn store_with_faults(root: &Path) -> (FileStore, Arc<Mutex<Option<SaveStep>>>) {
    let armed: Arc<Mutex<Option<SaveStep>>> = Arc::new(Mutex::new(None));
    let trigger = Arc::clone(&armed);
    let hook = Arc::new(move |step: SaveStep, _path: &Path| {
        if *trigger.lock().expect("lock") == Some(step) {
            Err(std::io::Error::other(format!("injected {step:?} failure")))
        } else {
            Ok(())
        }
    });
    let store = FileStore::open(FileConfig::new(root).with_fault_hook(hook))
        .await
        .expect("open");
    (store, armed)
}

/// Wave-2 review: the temporary file of a document kept private (0600)
/// is never readable by others, not even in the instant between its
/// creation and its permission bits being set: a reader that opened it
/// then would read the new bytes through its descriptor later. (It was
/// created 0644, less the umask, and narrowed after.)
#[tokio::test]
async fn a_private_documents_temporary_file_is_private_from_its_creation() {
    use std::os::unix::fs::PermissionsExt;

    let root = std::env::temp_dir().join(format!(
        "runstate-faults-mode-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let hook = {
        let seen = Arc::clone(&seen);
        Arc::new(move |step: SaveStep, path: &Path| {
            if step == SaveStep::Create {
                let mode = std::fs::symlink_metadata(path)?.permissions().mode();
                seen.lock().expect("lock").push(mode & 0o777);
            }
            Ok(())
        })
    };
    let store = FileStore::open(FileConfig::new(&root).with_fault_hook(hook))
        .await
        .expect("open");
    let run = RunId::new("private").expect("valid");
    let doc = DocName::new("credentials").expect("valid");
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"v1"))
        .await
        .expect("seed");
    let path = root.join("private/credentials.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    seen.lock().expect("lock").clear();
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"v2 secret"))
        .await
        .expect("save");
    let seen = seen.lock().expect("lock").clone();
    assert!(!seen.is_empty(), "the hook saw the temporary file");
    assert!(
        seen.iter().all(|mode| mode & 0o077 == 0),
        "readable by others at creation: {:?}",
        seen.iter().map(|m| format!("{m:o}")).collect::<Vec<_>>()
    );
    let kept = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(kept, 0o600, "the document keeps its bits");
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn each_save_step_failing_leaves_the_previous_document() {
    let root = std::env::temp_dir().join(format!(
        "runstate-faults-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let (store, armed) = store_with_faults(&root).await;
    let run = RunId::new("Mica_flume1").expect("valid");
    let doc = DocName::new("soils").expect("valid");
    let dir = root.join("Mica_flume1");

    for (i, step) in [
        SaveStep::Write,
        SaveStep::Fsync,
        SaveStep::Rename,
        SaveStep::DirFsync,
    ]
    .into_iter()
    .enumerate()
    {
        let previous = format!("previous {i}");
        let v = store
            .put_bytes(&run, &doc, Bytes::from(previous.clone()))
            .await
            .expect("seed");

        *armed.lock().expect("lock") = Some(step);
        for options in [PutOptions::overwrite(), PutOptions::update(v.clone())] {
            let error = store
                .put(&run, &doc, Bytes::from(format!("failed {step:?}")), options)
                .await
                .expect_err("the injected failure is returned");
            assert_eq!(error.kind(), ErrorKind::Backend, "{step:?}");
            assert!(
                !error.is_retryable(),
                "{step:?}: never retried into success"
            );
            assert!(
                display_chain(&error).contains("injected"),
                "{step:?}: the cause is kept: {}",
                display_chain(&error)
            );
            let stored = store
                .get_bytes(&run, &doc)
                .await
                .expect("get")
                .expect("present");
            assert_eq!(
                stored.bytes,
                Bytes::from(previous.clone()),
                "{step:?}: previous document intact"
            );
            assert_eq!(stored.version, v, "{step:?}");
            assert_eq!(
                leftovers(&dir),
                Vec::<String>::new(),
                "{step:?}: temporary file left"
            );
        }

        // A create that fails leaves no document at all.
        let fresh = DocName::new(format!("fresh{i}")).expect("valid");
        store
            .put(&run, &fresh, Bytes::from_static(b"x"), PutOptions::create())
            .await
            .expect_err("the injected failure is returned");
        assert!(
            store.get_bytes(&run, &fresh).await.expect("get").is_none(),
            "{step:?}: failed create left a document"
        );

        *armed.lock().expect("lock") = None;
        let next = format!("next {i}");
        store
            .put_bytes(&run, &doc, Bytes::from(next.clone()))
            .await
            .expect("the next save succeeds");
        assert_eq!(
            store
                .get_bytes(&run, &doc)
                .await
                .expect("get")
                .expect("present")
                .bytes,
            Bytes::from(next)
        );
        assert_eq!(leftovers(&dir), Vec::<String>::new());
    }
    assert_eq!(store.capabilities().backend, "file");
    std::fs::remove_dir_all(&root).expect("cleanup");
}

fn temp_root(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "runstate-faults-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

/// A store whose hook records every step it sees (with its path) and fails
/// the armed one.
async fn store_recording_steps(
    root: &Path,
) -> (
    FileStore,
    Arc<Mutex<Option<SaveStep>>>,
    Arc<Mutex<Vec<(SaveStep, std::path::PathBuf)>>>,
) {
    let armed: Arc<Mutex<Option<SaveStep>>> = Arc::new(Mutex::new(None));
    let seen: Arc<Mutex<Vec<(SaveStep, std::path::PathBuf)>>> = Arc::new(Mutex::new(Vec::new()));
    let (trigger, log) = (Arc::clone(&armed), Arc::clone(&seen));
    let hook = Arc::new(move |step: SaveStep, path: &Path| {
        log.lock().expect("lock").push((step, path.to_owned()));
        if *trigger.lock().expect("lock") == Some(step) {
            Err(std::io::Error::other(format!("injected {step:?} failure")))
        } else {
            Ok(())
        }
    });
    let store = FileStore::open(FileConfig::new(root).with_fault_hook(hook))
        .await
        .expect("open");
    (store, armed, seen)
}

fn root_syncs(seen: &Mutex<Vec<(SaveStep, std::path::PathBuf)>>, root: &Path) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|(step, path)| *step == SaveStep::RootFsync && path == root)
        .count()
}

/// A save's durability does not depend on who created the run folder: the
/// first save this store makes into a folder someone else created (a
/// process that was killed before its own `fsync`, or whose `fsync`
/// failed) makes the folder's entry in the root durable; a failure of
/// that `fsync` fails the save, and the next save tries again.
#[tokio::test]
async fn the_first_save_into_a_folder_made_by_someone_else_syncs_the_root() {
    let root = temp_root("rootsync");
    let (store, armed, seen) = store_recording_steps(&root).await;
    let doc = DocName::new("ron").expect("valid");

    std::fs::create_dir(root.join("foreign")).expect("a folder made by someone else");
    let foreign = RunId::new("foreign").expect("valid");
    store
        .put_bytes(&foreign, &doc, Bytes::from_static(b"1"))
        .await
        .expect("save");
    assert_eq!(
        root_syncs(&seen, &root),
        1,
        "the root is synced before the save reports success"
    );
    store
        .put_bytes(&foreign, &doc, Bytes::from_static(b"2"))
        .await
        .expect("save");
    assert_eq!(root_syncs(&seen, &root), 1, "once per folder");

    // A folder this store creates is synced once too.
    let own = RunId::new("own").expect("valid");
    store
        .put_bytes(&own, &doc, Bytes::from_static(b"1"))
        .await
        .expect("save");
    store
        .put_bytes(&own, &doc, Bytes::from_static(b"2"))
        .await
        .expect("save");
    assert_eq!(root_syncs(&seen, &root), 2);

    // A failing root fsync fails the save (nothing written) and is retried.
    std::fs::create_dir(root.join("failing")).expect("another foreign folder");
    let failing = RunId::new("failing").expect("valid");
    *armed.lock().expect("lock") = Some(SaveStep::RootFsync);
    let error = store
        .put_bytes(&failing, &doc, Bytes::from_static(b"1"))
        .await
        .expect_err("the failed root fsync fails the save");
    assert_eq!(error.kind(), ErrorKind::Backend);
    assert!(
        display_chain(&error).contains("injected RootFsync"),
        "{}",
        display_chain(&error)
    );
    assert!(
        store
            .get_bytes(&failing, &doc)
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(leftovers(&root.join("failing")), Vec::<String>::new());
    *armed.lock().expect("lock") = None;
    let before = root_syncs(&seen, &root);
    store
        .put_bytes(&failing, &doc, Bytes::from_static(b"2"))
        .await
        .expect("the next save syncs the root again and succeeds");
    assert_eq!(root_syncs(&seen, &root), before + 1);

    // Another store (another process, say) syncs it once for itself.
    let (other, _, other_seen) = store_recording_steps(&root).await;
    other
        .put_bytes(&foreign, &doc, Bytes::from_static(b"3"))
        .await
        .expect("save");
    assert_eq!(root_syncs(&other_seen, &root), 1);
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// `save_and_release` gives the lease back whatever step of the save fails
/// (here the write of the bytes, as on a full disk), so a failed save never
/// keeps its lock until the TTL runs out.
#[tokio::test]
async fn save_and_release_releases_its_lease_when_a_step_fails() {
    let root = temp_root("release");
    let (store, armed) = store_with_faults(&root).await;
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    for kind in [
        LockKey::Doc(run.clone(), doc.clone()),
        LockKey::Run(run.clone()),
    ] {
        for step in [
            SaveStep::Write,
            SaveStep::Fsync,
            SaveStep::Rename,
            SaveStep::DirFsync,
        ] {
            let lease = store
                .try_acquire(&kind, &Owner::for_this_process(), Duration::from_secs(3600))
                .await
                .expect("acquire");
            *armed.lock().expect("lock") = Some(step);
            let error = store
                .save_and_release(&lease, &doc, Bytes::from_static(b"x"), PutMode::Overwrite)
                .await
                .expect_err("the injected failure is returned");
            *armed.lock().expect("lock") = None;
            assert_eq!(error.kind(), ErrorKind::Backend, "{step:?}: {error}");
            assert!(
                store.inspect(&kind).await.expect("inspect").is_none(),
                "{kind}: the lease is released after a failed {step:?}"
            );
        }
    }
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// A batch is one group commit: every document staged and synced, renamed
/// under its record, then one `fsync` of the run folder for all of them
/// (the default `put_many`, one save after another, synced the folder once
/// per document).
#[tokio::test]
async fn a_batch_syncs_its_run_folder_once() {
    use runstate_core::PutRequest;

    let root = temp_root("batch-once");
    let (store, _armed, seen) = store_recording_steps(&root).await;
    let run = RunId::new("Mica_flume1").expect("valid");
    store
        .put_bytes(
            &run,
            &DocName::new("seed").expect("valid"),
            Bytes::from("x"),
        )
        .await
        .expect("the run folder exists");
    seen.lock().expect("lock").clear();
    let puts = (0..8)
        .map(|i| {
            PutRequest::new(
                DocName::new(format!("d{i}")).expect("valid"),
                Bytes::from(format!("document {i}")),
                PutMode::Create,
            )
        })
        .collect();
    let results = store.put_many(&run, puts).await.expect("a batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let count = |wanted: SaveStep| {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|(step, _)| *step == wanted)
            .count()
    };
    assert_eq!(count(SaveStep::Fsync), 8, "each document synced");
    assert_eq!(count(SaveStep::Rename), 8);
    assert_eq!(
        count(SaveStep::DirFsync),
        1,
        "one folder sync for the batch"
    );
    for i in 0..8 {
        assert_eq!(
            store
                .get_bytes(&run, &DocName::new(format!("d{i}")).expect("valid"))
                .await
                .expect("get")
                .expect("present")
                .bytes,
            Bytes::from(format!("document {i}"))
        );
    }
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// Each step of a batch failing: every write of the batch fails with the
/// injected cause, every document is as it was (an existing one intact, a
/// new one absent, even after a failed folder `fsync`, which puts back
/// every document it had renamed), no temporary file is left, and the next
/// batch succeeds.
#[tokio::test]
async fn each_step_of_a_batch_failing_leaves_every_document() {
    use runstate_core::PutRequest;

    let root = temp_root("batch-steps");
    let (store, armed) = store_with_faults(&root).await;
    let run = RunId::new("Mica_flume1").expect("valid");
    let dir = root.join("Mica_flume1");
    let (soils, climate) = (
        DocName::new("soils").expect("valid"),
        DocName::new("climate").expect("valid"),
    );
    for (i, step) in [
        SaveStep::Write,
        SaveStep::Fsync,
        SaveStep::Rename,
        SaveStep::DirFsync,
    ]
    .into_iter()
    .enumerate()
    {
        let fresh = DocName::new(format!("fresh{i}")).expect("valid");
        let before = [format!("soils {i}"), format!("climate {i}")];
        let vs = store
            .put_bytes(&run, &soils, Bytes::from(before[0].clone()))
            .await
            .expect("seed");
        let vc = store
            .put_bytes(&run, &climate, Bytes::from(before[1].clone()))
            .await
            .expect("seed");
        let batch = || {
            vec![
                PutRequest::new(soils.clone(), Bytes::from("new soils"), PutMode::Overwrite),
                PutRequest::new(
                    climate.clone(),
                    Bytes::from("new climate"),
                    PutMode::Update(vc.clone()),
                ),
                PutRequest::new(fresh.clone(), Bytes::from("new"), PutMode::Create),
            ]
        };
        *armed.lock().expect("lock") = Some(step);
        let results = store.put_many(&run, batch()).await.expect("a batch");
        assert_eq!(results.len(), 3);
        for result in &results {
            let error = result.as_ref().expect_err("the injected failure");
            assert_eq!(error.kind(), ErrorKind::Backend, "{step:?}");
            assert!(
                display_chain(error).contains("injected"),
                "{step:?}: the cause is kept: {}",
                display_chain(error)
            );
        }
        for (doc, bytes, version) in [(&soils, &before[0], &vs), (&climate, &before[1], &vc)] {
            let stored = store
                .get_bytes(&run, doc)
                .await
                .expect("get")
                .expect("present");
            assert_eq!(stored.bytes, Bytes::from(bytes.clone()), "{step:?}: {doc}");
            assert_eq!(&stored.version, version, "{step:?}: {doc}");
        }
        assert!(
            store.get_bytes(&run, &fresh).await.expect("get").is_none(),
            "{step:?}: a failed create left a document"
        );
        assert_eq!(
            leftovers(&dir),
            Vec::<String>::new(),
            "{step:?}: temporary file left"
        );
        *armed.lock().expect("lock") = None;
        let results = store.put_many(&run, batch()).await.expect("a batch");
        assert!(results.iter().all(Result::is_ok), "{step:?}: {results:?}");
        assert_eq!(
            store
                .get_bytes(&run, &fresh)
                .await
                .expect("get")
                .expect("present")
                .bytes,
            Bytes::from("new")
        );
    }
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// A batch takes the records of its documents within one lock timeout for
/// the whole group: records held elsewhere (another process's `flock`)
/// fail their own writes with `Timeout` after that one wait, not one wait
/// each, and the other writes of the batch succeed.
#[tokio::test]
async fn busy_records_cost_a_batch_one_lock_timeout() {
    use runstate_core::PutRequest;
    use std::time::Instant;

    let root = temp_root("batch-busy");
    let timeout = Duration::from_millis(400);
    let store = FileStore::open(FileConfig::new(&root).with_lock_timeout(timeout))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume1").expect("valid");
    let name = |i: usize| DocName::new(format!("d{i}")).expect("valid");
    for i in 0..8 {
        store
            .put_bytes(&run, &name(i), Bytes::from("old"))
            .await
            .expect("seed");
    }
    // Another process's locks on four records, as `flock` sees them (a
    // descriptor of its own).
    let book = root.join("Mica_flume1").join(".runstate");
    let held: Vec<std::fs::File> = [1, 3, 5, 7]
        .iter()
        .map(|i| {
            let file = std::fs::File::open(book.join(format!("doc.d{i}.lease"))).expect("record");
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .expect("flock");
            file
        })
        .collect();
    let puts = (0..8)
        .map(|i| PutRequest::new(name(i), Bytes::from("new"), PutMode::Overwrite))
        .collect();
    let start = Instant::now();
    let results = store.put_many(&run, puts).await.expect("a batch");
    let took = start.elapsed();
    for (i, result) in results.iter().enumerate() {
        let stored = store
            .get_bytes(&run, &name(i))
            .await
            .expect("get")
            .expect("present")
            .bytes;
        if i % 2 == 1 {
            let error = result.as_ref().expect_err("its record is busy");
            assert_eq!(error.kind(), ErrorKind::Timeout, "d{i}: {error}");
            assert_eq!(stored, Bytes::from("old"), "d{i}");
        } else {
            result.as_ref().expect("its record is free");
            assert_eq!(stored, Bytes::from("new"), "d{i}");
        }
    }
    // One wait for the group (each record alone would be 4 × 400 ms).
    assert!(
        took < timeout * 5 / 2,
        "the batch waited {took:?} for four busy records"
    );
    assert_eq!(leftovers(&root.join("Mica_flume1")), Vec::<String>::new());
    drop(held);
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// A batch that meets a busy record holds no other record while it waits
/// for it: the free documents are written first and their records let go,
/// so their leases are renewed meanwhile. (Before, the records taken so
/// far were held for the whole wait: `d0` was not written, and its lease
/// not renewed, until `d1`'s holder let go.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_for_a_busy_record_holds_no_other() {
    use runstate_core::PutRequest;
    use std::time::Instant;

    let root = temp_root("batch-waits-alone");
    let store = FileStore::open(FileConfig::new(&root).with_lock_timeout(Duration::from_secs(10)))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume3").expect("valid");
    let (d0, d1) = (
        DocName::new("d0").expect("valid"),
        DocName::new("d1").expect("valid"),
    );
    for doc in [&d0, &d1] {
        store
            .put_bytes(&run, doc, Bytes::from("old"))
            .await
            .expect("seed");
    }
    let owner = Owner::for_this_process();
    let lease = store
        .try_acquire(
            &LockKey::Doc(run.clone(), d0.clone()),
            &owner,
            Duration::from_secs(30),
        )
        .await
        .expect("a lease of d0");
    // Another process's lock on d1's record, as `flock` sees it.
    let record = root
        .join("Mica_flume3")
        .join(".runstate")
        .join("doc.d1.lease");
    let held = std::fs::File::open(&record).expect("record");
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).expect("flock");

    let batch = {
        let (store, run, d0, d1) = (store.clone(), run.clone(), d0.clone(), d1.clone());
        tokio::spawn(async move {
            let puts = vec![
                PutRequest::new(d0, Bytes::from("new"), PutMode::Overwrite),
                PutRequest::new(d1, Bytes::from("new"), PutMode::Overwrite),
            ];
            store.put_many(&run, puts).await
        })
    };
    // d0 is written while d1's record is still held (well within the
    // 10 s lock timeout the batch waits for d1).
    let start = Instant::now();
    loop {
        let now = store
            .get_bytes(&run, &d0)
            .await
            .expect("get")
            .expect("present");
        if now.bytes == "new" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "d0 not written while the batch waits for d1"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let renewed = store
        .renew(&lease, Duration::from_secs(30))
        .await
        .expect("renewed meanwhile");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "renewed while the batch waits"
    );
    drop(held);
    let results = batch.await.expect("the batch").expect("a batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stored = store
        .get_bytes(&run, &d1)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.bytes, Bytes::from("new"));
    store.release(&renewed).await.expect("release");
    std::fs::remove_dir_all(&root).expect("cleanup");
}

/// A lock timeout too long to add to the clock (`Duration::MAX`: wait for
/// ever) is a wait without a deadline in a batch too, as in every other
/// call; the group's deadline used to overflow and panic its thread.
#[tokio::test]
async fn a_batch_under_an_endless_lock_timeout_is_written() {
    use runstate_core::PutRequest;

    let root = temp_root("batch-endless");
    let store = FileStore::open(FileConfig::new(&root).with_lock_timeout(Duration::MAX))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume2").expect("valid");
    let doc = DocName::new("ron").expect("valid");
    let puts = vec![PutRequest::new(
        doc.clone(),
        Bytes::from("new"),
        PutMode::Overwrite,
    )];
    let results = store.put_many(&run, puts).await.expect("a batch");
    assert!(results[0].is_ok(), "{results:?}");
    let stored = store.get_bytes(&run, &doc).await.expect("get");
    assert_eq!(stored.map(|d| d.bytes), Some(Bytes::from("new")));
    std::fs::remove_dir_all(&root).expect("cleanup");
}
