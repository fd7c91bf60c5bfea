//! The file backend's own promises: the on-disk layout, WEPPcloud run
//! folders in place, no escape from the root, foreign documents, sweeping,
//! and fences that survive restarts.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Client, DocName, Document, ErrorKind, Lock, LockKey, Owner, PutOptions, RunId, Store,
    StoreExt,
};
use runstate_file::{FileConfig, FileStore};
use serde::{Deserialize, Serialize};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-layout-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

/// `../shared/fixtures/nodb` beside the repository (or `RUNSTATE_FIXTURES`).
fn fixtures() -> PathBuf {
    let dir = std::env::var_os("RUNSTATE_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
        PathBuf::from,
    );
    let nodb = dir.join("nodb");
    assert!(
        nodb.join("Mica_flume1").is_dir(),
        "WEPPcloud fixtures not found at {}; set RUNSTATE_FIXTURES to the shared fixtures folder",
        nodb.display()
    );
    nodb
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create");
    for entry in fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        let mut perms = fs::metadata(to.join(entry.file_name()))
            .expect("meta")
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(to.join(entry.file_name()), perms).expect("chmod");
    }
}

fn snapshot(dir: &Path) -> Vec<(String, SystemTime, u64)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .expect("read")
        .map(|e| {
            let e = e.expect("entry");
            let meta = e.metadata().expect("meta");
            (
                e.file_name().to_string_lossy().into_owned(),
                meta.modified().expect("mtime"),
                meta.len(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The `ron` controller of a WEPPcloud run, as loose JSON.
#[derive(Serialize, Deserialize)]
struct Ron(serde_json::Value);

impl Document for Ron {
    const NAME: &'static str = "ron";
}

#[tokio::test]
async fn weppcloud_run_folder_opens_in_place() {
    let root = temp_root("nodb");
    let source = fixtures().join("Mica_flume1");
    copy_dir(&source, &root.join("Mica_flume1"));
    let before = snapshot(&root.join("Mica_flume1"));

    let store = FileStore::open(FileConfig::new(&root).with_ext("nodb").expect("ext"))
        .await
        .expect("open");
    let run = RunId::new("Mica_flume1").expect("valid");
    assert_eq!(
        store.list_all_runs().await.expect("runs"),
        vec![run.clone()]
    );
    let docs = store.list_all_docs(&run).await.expect("docs");
    let names: Vec<&str> = docs.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "climate",
            "landuse",
            "ron",
            "soils",
            "topaz",
            "unitizer",
            "watershed",
            "wepp"
        ]
    );
    for meta in &docs {
        let original = fs::read(source.join(format!("{}.nodb", meta.name))).expect("fixture");
        let stored = store
            .get_bytes(&run, &meta.name)
            .await
            .expect("get")
            .expect("present");
        assert!(stored.bytes == original, "{} differs", meta.name);
        assert_eq!(meta.size, original.len() as u64);
        assert_eq!(meta.version, stored.version);
    }
    assert_eq!(
        snapshot(&root.join("Mica_flume1")),
        before,
        "reads changed nothing on disk"
    );
    assert!(
        !root.join("Mica_flume1/.runstate").exists(),
        "reads create no bookkeeping"
    );

    // A locked update rewrites exactly that controller.
    let client = Client::new(Arc::new(store.clone()));
    client
        .run(run.clone())
        .update(|ron: &mut Ron| ron.0["_name"] = serde_json::Value::from("Mica flume 1"))
        .await
        .expect("update ron");
    let ron: Ron = client.run(run.clone()).load().await.expect("load");
    assert_eq!(ron.0["_name"], "Mica flume 1");
    assert_eq!(ron.0["py/object"], "wepppy.nodb.ron.Ron");
    for meta in &docs {
        if meta.name.as_str() != "ron" {
            let original = fs::read(source.join(format!("{}.nodb", meta.name))).expect("fixture");
            assert!(
                fs::read(root.join("Mica_flume1").join(format!("{}.nodb", meta.name)))
                    .expect("read")
                    == original
            );
        }
    }
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn run_folder_symlinked_out_of_the_root_is_refused() {
    let root = temp_root("escape");
    let outside = temp_root("outside");
    fs::write(outside.join("ron.json"), b"secret").expect("outside doc");
    std::os::unix::fs::symlink(&outside, root.join("evil")).expect("symlink");
    fs::create_dir(root.join("inner")).expect("inner");
    fs::write(root.join("inner/ron.json"), b"inside").expect("inner doc");
    std::os::unix::fs::symlink(root.join("inner"), root.join("alias")).expect("inner symlink");

    let store = FileStore::open_path(&root).await.expect("open");
    let (evil, ron) = (
        RunId::new("evil").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let error = store.get_bytes(&evil, &ron).await.expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Denied);
    assert!(
        error.to_string().contains("outside the store root"),
        "{error}"
    );
    let error = store
        .put_bytes(
            &evil,
            &DocName::new("new").expect("valid"),
            Bytes::from_static(b"x"),
        )
        .await
        .expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Denied);
    let error = store
        .try_acquire(
            &LockKey::Run(evil.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(1),
        )
        .await
        .expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Denied);
    assert_eq!(
        fs::read_dir(&outside).expect("outside").count(),
        1,
        "nothing written outside the root"
    );

    let alias = RunId::new("alias").expect("valid");
    let inside = store
        .get_bytes(&alias, &ron)
        .await
        .expect("a symlink inside the root is fine")
        .expect("present");
    assert_eq!(&inside.bytes[..], b"inside");
    let runs: Vec<String> = store
        .list_all_runs()
        .await
        .expect("list")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(runs, ["alias", "inner"]);

    // A document that is a symlink is never followed.
    std::os::unix::fs::symlink(outside.join("ron.json"), root.join("inner/link.json"))
        .expect("doc symlink");
    let error = store
        .get_bytes(
            &RunId::new("inner").expect("valid"),
            &DocName::new("link").expect("valid"),
        )
        .await
        .expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Denied);
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(&outside).expect("cleanup");
}

/// Wave-2 review: a run folder link inside the root must lead to a run
/// folder, not to the root itself nor into a bookkeeping folder (a save
/// through `a -> b/.runstate` replaced b's milestones). And with a state
/// folder a link is refused: the link and its target would keep two lock
/// records for one file, so two owners held one lock at once.
#[tokio::test]
async fn run_folder_links_lead_to_run_folders_only() {
    let root = temp_root("links");
    fs::create_dir(root.join("b")).expect("b");
    let store = FileStore::open_path(&root).await.expect("open");
    let b = RunId::new("b").expect("valid");
    store
        .set_attr(&b, "phase", "one")
        .await
        .expect("b's milestone");
    std::os::unix::fs::symlink(root.join("b/.runstate"), root.join("a")).expect("link");
    std::os::unix::fs::symlink(&root, root.join("itself")).expect("link");
    for name in ["a", "itself"] {
        let error = store
            .put_bytes(
                &RunId::new(name).expect("valid"),
                &DocName::new("milestones").expect("valid"),
                Bytes::from_static(b"{}"),
            )
            .await
            .expect_err(name);
        assert_eq!(error.kind(), ErrorKind::Denied, "{name}: {error}");
    }
    let attrs = store.milestones(&b).await.expect("milestones").attrs;
    assert_eq!(
        attrs.get("phase").map(String::as_str),
        Some("one"),
        "{attrs:?}"
    );

    let state = temp_root("links-state");
    fs::create_dir(root.join("inner")).expect("inner");
    std::os::unix::fs::symlink(root.join("inner"), root.join("alias")).expect("link");
    let stated = FileStore::open(
        FileConfig::new(&root)
            .with_state_dir(&state)
            .expect("state_dir"),
    )
    .await
    .expect("open");
    let key = |run: &str| {
        LockKey::Doc(
            RunId::new(run).expect("valid"),
            DocName::new("x").expect("valid"),
        )
    };
    let held = stated
        .try_acquire(
            &key("inner"),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect("the target's lock");
    let error = stated
        .try_acquire(
            &key("alias"),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect_err("the same file's lock, through the link");
    assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
    stated.release(&held).await.expect("release");
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(&state).expect("cleanup");
}

#[tokio::test]
async fn foreign_documents_are_readable_versioned_and_not_rewritten() {
    let root = temp_root("foreign");
    fs::create_dir(root.join("run1")).expect("run");
    fs::write(root.join("run1/climate.json"), b"{\"from\":\"elsewhere\"}").expect("drop in");
    fs::write(root.join("run1/notes.txt"), b"not a document").expect("other file");
    fs::write(root.join("run1/bad name.json"), b"{}").expect("invalid name");
    let store = FileStore::open_path(&root).await.expect("open");
    let before = snapshot(&root.join("run1"));
    let run = RunId::new("run1").expect("valid");
    let climate = DocName::new("climate").expect("valid");
    let docs = store.list_all_docs(&run).await.expect("list");
    assert_eq!(docs.len(), 1, "only valid *.json files are documents");
    let stored = store
        .get_bytes(&run, &climate)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.version, docs[0].version);
    assert_eq!(
        snapshot(&root.join("run1")),
        before,
        "reads rewrite nothing"
    );
    store
        .put(
            &run,
            &climate,
            Bytes::from_static(b"{}"),
            PutOptions::update(stored.version),
        )
        .await
        .expect("its version works for a conditional update");
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn temporary_files_of_dead_writers_are_swept_and_live_ones_kept() {
    let root = temp_root("sweep");
    let store = FileStore::open_path(&root).await.expect("open");
    let run = RunId::new("r").expect("valid");
    store
        .put_bytes(
            &run,
            &DocName::new("d").expect("valid"),
            Bytes::from_static(b"x"),
        )
        .await
        .expect("put");
    drop(store);

    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let stamp = runstate_core::process::current_stamp().expect("linux");
    // The tag the backend puts in this host's temp names: boot and pid namespace.
    let tag = format!(
        "{:016x}",
        xxhash(&format!("{}/{}", stamp.boot_id, stamp.pid_ns))
    );
    let dead = root.join(format!(
        "r/.d.json.rstmp.{tag}.{dead_pid}.{}.00ff",
        stamp.start_ticks + 1
    ));
    let live = root.join(format!(
        "r/.d.json.rstmp.{tag}.{}.{}.00fe",
        std::process::id(),
        stamp.start_ticks
    ));
    let foreign_old = root.join("r/.d.json.rstmp.0123456789abcdef.1.1.00fd");
    let foreign_new = root.join("r/.d.json.rstmp.0123456789abcdef.2.2.00fc");
    for path in [&dead, &live, &foreign_old, &foreign_new] {
        fs::write(path, b"partial").expect("temp");
    }
    let old = fs::File::options()
        .write(true)
        .open(&foreign_old)
        .expect("open");
    old.set_modified(SystemTime::now() - Duration::from_secs(7200))
        .expect("age it");

    FileStore::open_path(&root).await.expect("reopen sweeps");
    assert!(!dead.exists(), "a dead writer's temp file is swept");
    assert!(live.exists(), "a live writer's temp file is kept");
    assert!(
        !foreign_old.exists(),
        "an old temp file of another boot is swept"
    );
    assert!(
        foreign_new.exists(),
        "a recent temp file of another boot is kept"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

fn xxhash(text: &str) -> u64 {
    // Same tag function as the backend uses for temp names.
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

#[tokio::test]
async fn fences_survive_restarts_and_run_deletion() {
    let root = temp_root("fences");
    let run = RunId::new("r").expect("valid");
    let key = LockKey::Doc(run.clone(), DocName::new("d").expect("valid"));
    let mut last = 0;
    for _ in 0..3 {
        let store = FileStore::open_path(&root).await.expect("open");
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .expect("acquire");
        assert!(lease.fence().get() > last);
        last = lease.fence().get();
        store
            .put(
                &run,
                &DocName::new("d").expect("valid"),
                Bytes::from_static(b"x"),
                PutOptions::overwrite().with_lease(&lease),
            )
            .await
            .expect("put");
        store.release(&lease).await.expect("release");
    }
    let store = FileStore::open_path(&root).await.expect("open");
    assert_eq!(store.delete_run(&run).await.expect("delete run"), 1);
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    assert!(
        lease.fence().get() > last,
        "fences keep increasing after the run is deleted"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn a_lease_from_an_earlier_boot_of_this_host_is_free() {
    // "This machine" is known by its machine id; without one, a lease of
    // another boot is judged by its wall-clock expiry instead.
    if runstate_core::process::machine_id().is_none() {
        eprintln!(
            "\n*** SKIPPED a_lease_from_an_earlier_boot_of_this_host_is_free: this host has \
             no machine id ***\n"
        );
        return;
    }
    let root = temp_root("boot");
    let store = FileStore::open_path(&root).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let key = LockKey::Run(run.clone());
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(3600))
        .await
        .expect("acquire");
    let record = root.join("r/.runstate/run.lease");
    let text = fs::read_to_string(&record).expect("record");
    let boot = &runstate_core::process::current_stamp()
        .expect("linux")
        .boot_id;
    fs::write(
        &record,
        text.replace(boot.as_str(), "00000000-0000-0000-0000-000000000000"),
    )
    .expect("rewrite");
    let next = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("free after a reboot");
    assert!(next.fence() > lease.fence());
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn configuration_errors_are_clear() {
    let error = FileConfig::new("/tmp")
        .with_ext("../json")
        .expect_err("bad ext");
    assert_eq!(error.kind(), ErrorKind::Config);
    let root = temp_root("config");
    fs::write(root.join("file"), b"x").expect("file");
    let error = FileStore::open_path(root.join("file"))
        .await
        .expect_err("not a folder");
    assert_eq!(error.kind(), ErrorKind::Config);
    let error = FileStore::open(FileConfig::new(root.join("missing")).with_create_root(false))
        .await
        .expect_err("missing");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("does not exist"), "{error}");
    assert!(!root.join("missing").exists());
    fs::remove_dir_all(&root).expect("cleanup");
}

#[tokio::test]
async fn documents_are_exactly_the_saved_bytes_at_the_documented_path() {
    let root = temp_root("layout");
    let store: Arc<dyn Lock> = Arc::new(FileStore::open_path(&root).await.expect("open"));
    let run = RunId::new("Test_Watershed_15").expect("valid");
    let doc = DocName::new("prescribed_fire.landuse").expect("valid");
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"\x00exact\xff"))
        .await
        .expect("put");
    assert_eq!(
        fs::read(root.join("Test_Watershed_15/prescribed_fire.landuse.json")).expect("file"),
        b"\x00exact\xff"
    );
    let names: Vec<String> = fs::read_dir(root.join("Test_Watershed_15"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, [".runstate", "prescribed_fire.landuse.json"]);
    fs::remove_dir_all(&root).expect("cleanup");
}
