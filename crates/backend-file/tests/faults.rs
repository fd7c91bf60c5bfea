//! Fault injection: each filesystem step of a save fails in turn; the save
//! returns the error, the previous document is intact, no temporary file is
//! left, and the next save succeeds.

use std::path::Path;
use std::sync::{Arc, Mutex};

use runstate_core::{Bytes, DocName, ErrorKind, PutOptions, RunId, Store, StoreExt, display_chain};
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
