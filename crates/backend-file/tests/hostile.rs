//! Hostile things inside the store: links, FIFOs and devices where lease
//! records, the records lock, the bookkeeping folder or documents belong; a
//! look-alike host in a lease record; permission bits; an unreadable run
//! folder.
//!
//! Calls that could hang on a FIFO or read `/dev/zero` forever run on a
//! runtime of their own under a timeout, and the runtime is shut down
//! without waiting for its blocking threads, so a regression fails the
//! test instead of hanging the suite.

use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutOptions, RunId, Store, StoreExt,
};
use runstate_file::{FileConfig, FileStore};

const OUTSIDE_NOTES: &[u8] = b"my own notes, not runstate's\n";

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-hostile-{tag}-{}-{:x}",
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

/// Runs `body` on a runtime of its own, failing after `limit` instead of
/// hanging; the runtime is then dropped without waiting for a blocking
/// thread that may be stuck.
fn bounded<F: Future<Output = ()> + Send + 'static>(what: &str, limit: Duration, body: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = runtime.block_on(async move { tokio::time::timeout(limit, body).await });
    runtime.shutdown_background();
    assert!(outcome.is_ok(), "{what}: still blocked after {limit:?}");
}

fn assert_denied_naming<T: std::fmt::Debug>(
    outcome: runstate_core::Result<T>,
    path_part: &str,
    what: &str,
) {
    let error = outcome.expect_err(what);
    assert_eq!(error.kind(), ErrorKind::Denied, "{what}: {error}");
    assert!(
        error.to_string().contains(path_part),
        "{what}: the error names the path ({path_part}): {error}"
    );
}

#[test]
fn a_lease_record_linked_out_of_the_root_is_never_written() {
    let root = temp_root("link");
    let outside = temp_root("outside");
    let notes = outside.join("notes.txt");
    fs::write(&notes, OUTSIDE_NOTES).expect("outside file");
    fs::create_dir_all(root.join("r/.runstate")).expect("bookkeeping");
    std::os::unix::fs::symlink(&notes, root.join("r/.runstate/doc.ron.lease")).expect("link");
    std::os::unix::fs::symlink(&notes, root.join("r/.runstate/run.lease")).expect("link");

    let store_root = root.clone();
    bounded(
        "planted record links",
        Duration::from_secs(30),
        async move {
            let store = FileStore::open_path(&store_root).await.expect("open");
            let key = LockKey::Doc(run(), doc("ron"));
            let owner = Owner::for_this_process();
            assert_denied_naming(
                store
                    .try_acquire(&key, &owner, Duration::from_secs(30))
                    .await,
                "doc.ron.lease",
                "try_acquire through a linked record",
            );
            assert_denied_naming(
                store
                    .try_acquire(&LockKey::Run(run()), &owner, Duration::from_secs(30))
                    .await,
                "run.lease",
                "try_acquire of the run lock through a linked record",
            );
            assert_denied_naming(
                store
                    .acquire_and_load(
                        &key,
                        &doc("ron"),
                        &owner,
                        Duration::from_secs(30),
                        Default::default(),
                    )
                    .await,
                "doc.ron.lease",
                "acquire_and_load through a linked record",
            );
            assert_denied_naming(
                store
                    .put_bytes(&run(), &doc("ron"), Bytes::from_static(b"{}"))
                    .await,
                "doc.ron.lease",
                "a save takes the linked record's lock",
            );
            assert_denied_naming(
                store.inspect(&key).await,
                "doc.ron.lease",
                "inspect of a linked record",
            );
            assert_denied_naming(
                store.break_lock(&key, None).await,
                "doc.ron.lease",
                "break_lock of a linked record",
            );
        },
    );
    assert_eq!(
        fs::read(&notes).expect("outside file"),
        OUTSIDE_NOTES,
        "the file outside the root is byte-identical"
    );
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 1);
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(&outside).expect("cleanup");
}

#[test]
fn a_lease_record_linked_to_dev_zero_is_refused_without_reading_it() {
    let root = temp_root("zero");
    fs::create_dir_all(root.join("r/.runstate")).expect("bookkeeping");
    std::os::unix::fs::symlink("/dev/zero", root.join("r/.runstate/doc.ron.lease")).expect("link");
    let store_root = root.clone();
    bounded(
        "a record linked to /dev/zero",
        Duration::from_secs(30),
        async move {
            let store = FileStore::open_path(&store_root).await.expect("open");
            assert_denied_naming(
                store
                    .try_acquire(
                        &LockKey::Doc(run(), doc("ron")),
                        &Owner::for_this_process(),
                        Duration::from_secs(30),
                    )
                    .await,
                "doc.ron.lease",
                "try_acquire through a record linked to /dev/zero",
            );
            assert_denied_naming(
                store.inspect(&LockKey::Doc(run(), doc("ron"))).await,
                "doc.ron.lease",
                "inspect of a record linked to /dev/zero",
            );
        },
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn fifos_in_place_of_a_record_or_a_document_are_refused_without_blocking() {
    let root = temp_root("fifo");
    fs::create_dir_all(root.join("r/.runstate")).expect("bookkeeping");
    mkfifo(&root.join("r/.runstate/doc.ron.lease"));
    mkfifo(&root.join("r/climate.json"));
    let store_root = root.clone();
    bounded("FIFOs in the store", Duration::from_secs(30), async move {
        let store = FileStore::open_path(&store_root).await.expect("open");
        let owner = Owner::for_this_process();
        assert_denied_naming(
            store
                .try_acquire(
                    &LockKey::Doc(run(), doc("ron")),
                    &owner,
                    Duration::from_secs(30),
                )
                .await,
            "doc.ron.lease",
            "try_acquire of a FIFO record",
        );
        assert_denied_naming(
            store.inspect(&LockKey::Doc(run(), doc("ron"))).await,
            "doc.ron.lease",
            "inspect of a FIFO record",
        );

        let climate = doc("climate");
        assert_denied_naming(
            store.get_bytes(&run(), &climate).await,
            "climate.json",
            "get of a FIFO document",
        );
        assert_denied_naming(
            store
                .put_bytes(&run(), &climate, Bytes::from_static(b"{}"))
                .await,
            "climate.json",
            "overwrite of a FIFO document",
        );
        assert_denied_naming(
            store.delete(&run(), &climate, None).await,
            "climate.json",
            "delete of a FIFO document",
        );
        let error = store
            .acquire_and_load(
                &LockKey::Doc(run(), climate.clone()),
                &climate,
                &owner,
                Duration::from_secs(30),
                Default::default(),
            )
            .await
            .expect_err("acquire_and_load of a FIFO document");
        assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
        assert!(
            store
                .inspect(&LockKey::Doc(run(), climate.clone()))
                .await
                .expect("inspect")
                .is_none(),
            "a failed load releases its lease"
        );
        let listed = store.list_all_docs(&run()).await.expect("list");
        assert!(listed.is_empty(), "a FIFO is not a document: {listed:?}");
    });
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The records lock (`records.lock`, under which a document's first
/// record is created and a batch writes a document that has none) linked
/// out of the root, or a FIFO: a batch and a save of a new document are
/// refused with `Denied` naming it, without blocking; nothing is written,
/// outside the root or in it.
#[test]
fn a_records_lock_linked_out_of_the_root_or_a_fifo_is_refused() {
    let outside = temp_root("records-outside");
    let notes = outside.join("notes.txt");
    fs::write(&notes, OUTSIDE_NOTES).expect("outside file");
    for planted in ["link", "fifo"] {
        let root = temp_root(&format!("records-{planted}"));
        fs::create_dir_all(root.join("r/.runstate")).expect("bookkeeping");
        let lock = root.join("r/.runstate/records.lock");
        match planted {
            "link" => std::os::unix::fs::symlink(&notes, &lock).expect("link"),
            _ => mkfifo(&lock),
        }
        let store_root = root.clone();
        bounded(
            &format!("a planted records lock ({planted})"),
            Duration::from_secs(30),
            async move {
                let store = FileStore::open_path(&store_root).await.expect("open");
                let put = runstate_core::PutRequest::new(
                    doc("ron"),
                    Bytes::from_static(b"{}"),
                    runstate_core::PutMode::Create,
                );
                let mut results = store.put_many(&run(), vec![put]).await.expect("a batch");
                assert_denied_naming(
                    results.remove(0),
                    "records.lock",
                    "a batch of a document without a record",
                );
                assert_denied_naming(
                    store
                        .put_bytes(&run(), &doc("climate"), Bytes::from_static(b"{}"))
                        .await,
                    "records.lock",
                    "a save creating a record",
                );
                for name in ["ron", "climate"] {
                    assert_eq!(
                        store.get_bytes(&run(), &doc(name)).await.expect("get"),
                        None
                    );
                }
            },
        );
        let mut left: Vec<String> = fs::read_dir(root.join("r/.runstate"))
            .expect("bookkeeping")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["records.lock"], "{planted}: no record was made");
        fs::remove_dir_all(&root).expect("cleanup");
    }
    assert_eq!(
        fs::read(&notes).expect("outside file"),
        OUTSIDE_NOTES,
        "the file outside the root is byte-identical"
    );
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 1);
    fs::remove_dir_all(&outside).expect("cleanup");
}

#[test]
fn a_bookkeeping_folder_linked_out_of_the_root_is_refused() {
    let root = temp_root("book");
    let outside = temp_root("book-outside");
    fs::create_dir_all(root.join("r")).expect("run folder");
    fs::write(root.join("r/ron.json"), b"{}").expect("a document");
    std::os::unix::fs::symlink(&outside, root.join("r/.runstate")).expect("link");
    let store_root = root.clone();
    bounded(
        "a linked bookkeeping folder",
        Duration::from_secs(30),
        async move {
            let store = FileStore::open_path(&store_root).await.expect("open");
            let owner = Owner::for_this_process();
            assert_denied_naming(
                store
                    .try_acquire(
                        &LockKey::Doc(run(), doc("ron")),
                        &owner,
                        Duration::from_secs(30),
                    )
                    .await,
                ".runstate",
                "try_acquire under a linked bookkeeping folder",
            );
            assert_denied_naming(
                store
                    .put_bytes(&run(), &doc("ron"), Bytes::from_static(b"[]"))
                    .await,
                ".runstate",
                "a save under a linked bookkeeping folder",
            );
            assert_denied_naming(
                store.inspect(&LockKey::Run(run())).await,
                ".runstate",
                "inspect under a linked bookkeeping folder",
            );
            assert_denied_naming(
                store.list_locks(Some(&run())).await,
                ".runstate",
                "list_locks under a linked bookkeeping folder",
            );
        },
    );
    assert_eq!(
        fs::read_dir(&outside).expect("outside").count(),
        0,
        "nothing was written outside the root"
    );
    assert_eq!(fs::read(root.join("r/ron.json")).expect("doc"), b"{}");
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(&outside).expect("cleanup");
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// A record as another machine with our host name would write it: another
/// boot id, `machine_id` as given, unexpired by the wall clock.
fn plant_record(root: &Path, machine_id: Option<&str>) {
    let now = unix_ms();
    let mut held = serde_json::json!({
        "owner": {
            "host": runstate_core::process::hostname(),
            "pid": 1,
            "id": "twin-host-holder",
        },
        "since_ms": now,
        "boot_id": "00000000-0000-4000-8000-000000000000",
        "expires_boot_ns": 1,
        "expires_unix_ms": now + 3_600_000,
    });
    if let Some(machine_id) = machine_id {
        held["machine_id"] = serde_json::Value::from(machine_id);
    }
    let record = serde_json::json!({ "v": 1, "fence": 7, "held": held });
    fs::create_dir_all(root.join("r/.runstate")).expect("bookkeeping");
    fs::write(
        root.join("r/.runstate/run.lease"),
        serde_json::to_vec(&record).expect("json"),
    )
    .expect("record");
}

#[tokio::test]
async fn a_lease_of_another_machine_with_our_host_name_is_not_taken_over() {
    let root = temp_root("twin");
    let store = FileStore::open_path(&root).await.expect("open");
    let key = LockKey::Run(run());
    for machine_id in [Some("f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0"), None] {
        plant_record(&root, machine_id);
        let error = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .expect_err("a live lease of another machine (same host name) is not broken");
        assert_eq!(error.kind(), ErrorKind::Locked, "{machine_id:?}: {error}");
        let holder = error.holder().expect("the holder is reported");
        assert_eq!(holder.owner.id(), "twin-host-holder");
        assert!(
            holder.expires_in > Duration::from_secs(3000),
            "{machine_id:?}: judged by its wall-clock expiry: {holder}"
        );
        let info = store.inspect(&key).await.expect("inspect").expect("held");
        assert_eq!(info.fence.get(), 7);
    }
    // The same machine (equal machine ids), another boot: its holder died
    // with that boot, so the lock is free at once.
    if let Some(ours) = runstate_core::process::machine_id() {
        plant_record(&root, Some(ours));
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .expect("a lease from an earlier boot of this machine is free");
        assert!(lease.fence().get() > 7);
    }
    fs::remove_dir_all(&root).expect("cleanup");
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test]
async fn a_save_keeps_the_documents_permission_bits() {
    let root = temp_root("mode");
    let store = FileStore::open_path(&root).await.expect("open");
    let ron = doc("ron");
    let path = root.join("r/ron.json");
    store
        .put_bytes(&run(), &ron, Bytes::from_static(b"1"))
        .await
        .expect("create");
    // A new document gets today's default: 0644 less the umask, as any
    // file created with mode 0644.
    let probe = root.join("probe");
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&probe)
            .expect("probe");
    }
    assert_eq!(mode_of(&path), mode_of(&probe), "new document");

    for (i, mode) in [0o600, 0o640, 0o664].into_iter().enumerate() {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        let version = store
            .put_bytes(&run(), &ron, Bytes::from(format!("overwrite {i}")))
            .await
            .expect("overwrite");
        assert_eq!(mode_of(&path), mode, "overwrite keeps {mode:o}");
        store
            .put(
                &run(),
                &ron,
                Bytes::from(format!("update {i}")),
                PutOptions::update(version),
            )
            .await
            .expect("update");
        assert_eq!(mode_of(&path), mode, "update keeps {mode:o}");
        let lease = store
            .try_acquire(
                &LockKey::Doc(run(), ron.clone()),
                &Owner::for_this_process(),
                Duration::from_secs(30),
            )
            .await
            .expect("acquire");
        store
            .save_and_release(
                &lease,
                &ron,
                Bytes::from(format!("locked {i}")),
                Default::default(),
            )
            .await
            .expect("save and release");
        assert_eq!(mode_of(&path), mode, "a locked save keeps {mode:o}");
    }
    fs::remove_dir_all(&root).expect("cleanup");
}

const UNREADABLE_VAR: &str = "RUNSTATE_UNREADABLE_ROOT";

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

/// Root ignores permissions, so the check runs in a copy of this test
/// binary re-executed as `nobody`, for whom a run folder of mode 000 is
/// unreadable.
#[test]
fn an_unreadable_run_folder_is_skipped_by_open_and_listings() {
    if std::env::var_os(UNREADABLE_VAR).is_some() {
        return;
    }
    if !is_root() {
        eprintln!(
            "\n*** SKIPPED an_unreadable_run_folder_is_skipped_by_open_and_listings: it \
             re-executes itself as an unprivileged user, which needs root ***\n"
        );
        return;
    }
    let root = temp_root("unreadable");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let exe = std::env::current_exe().expect("test binary");
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "--exact",
            "unreadable_run_folder_child",
            "--ignored",
            "--nocapture",
        ])
        .env(UNREADABLE_VAR, &root)
        .output()
        .expect("setpriv runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    fs::remove_dir_all(&root).expect("cleanup");
    assert!(
        output.status.success(),
        "child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("unreadable-run-folder-skipped"),
        "the child did not confirm:\n{stdout}\n{stderr}"
    );
}

#[test]
#[ignore = "run by an_unreadable_run_folder_is_skipped_by_open_and_listings as an unprivileged user"]
fn unreadable_run_folder_child() {
    let Some(root) = std::env::var_os(UNREADABLE_VAR).map(PathBuf::from) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = FileStore::open_path(&root).await.expect("open");
        let owner = Owner::for_this_process();
        let mut leases = Vec::new();
        for name in ["a", "b", "c"] {
            let run = RunId::new(name).expect("valid");
            store
                .put_bytes(&run, &doc("ron"), Bytes::from_static(b"{}"))
                .await
                .expect("put");
            leases.push(
                store
                    .try_acquire(&LockKey::Run(run), &owner, Duration::from_secs(60))
                    .await
                    .expect("acquire"),
            );
        }
        drop(store);
        fs::set_permissions(root.join("b"), fs::Permissions::from_mode(0o000)).expect("chmod");
        assert!(
            fs::read_dir(root.join("b")).is_err(),
            "run folder b must be unreadable for this user"
        );

        let store = FileStore::open(FileConfig::new(&root))
            .await
            .expect("open (and its sweep) skips the unreadable run folder");
        let runs: Vec<String> = store
            .list_all_runs()
            .await
            .expect("list_runs skips the unreadable run folder")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(runs, ["a", "c"]);
        let locks: Vec<String> = store
            .list_locks(None)
            .await
            .expect("list_locks(None) skips the unreadable run folder")
            .iter()
            .map(|info| info.key.to_string())
            .collect();
        assert_eq!(locks, ["a", "c"]);
        store.sweep().await.expect("sweep skips it");
        fs::set_permissions(root.join("b"), fs::Permissions::from_mode(0o755)).expect("chmod");
    });
    println!("unreadable-run-folder-skipped");
}
