//! The file store beside a running WEPPcloud (issue 14), on copies of the
//! real run folder `Mica_flume1`: legacy `<name>.nodb.lock` files are held
//! locks (refused, listed, broken only by a forced unlock), `READONLY`
//! refuses writes, same-size rewrites move the modification time, new
//! runs get `nodb.version`, and `state_dir` keeps run folders to their
//! documents.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runstate_core::{
    Bytes, Client, DocName, Document, ErrorKind, Fence, GetOptions, Lock, LockKey, Owner,
    PutOptions, Replay, RunId, Store, StoreExt,
};
use runstate_file::{FileConfig, FileStore, LOCK_FILE_HOLDER, WeppcloudFiles};
use serde::{Deserialize, Serialize};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "runstate-wepp-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `../shared/fixtures/nodb/Mica_flume1` beside the repository (or under
/// `RUNSTATE_FIXTURES`).
fn fixture() -> PathBuf {
    let dir = std::env::var_os("RUNSTATE_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
        PathBuf::from,
    );
    let run = dir.join("nodb/Mica_flume1");
    assert!(
        run.is_dir(),
        "WEPPcloud fixture not found at {}; set RUNSTATE_FIXTURES to the shared fixtures folder",
        run.display()
    );
    run
}

/// A root holding a writable copy of `Mica_flume1` (the fixture is never
/// written).
fn copy_of_mica(tag: &str) -> PathBuf {
    let root = temp_dir(tag);
    let to = root.join("Mica_flume1");
    fs::create_dir_all(&to).expect("run folder");
    for entry in fs::read_dir(fixture()).expect("read fixture") {
        let entry = entry.expect("entry");
        let bytes = fs::read(entry.path()).expect("read");
        fs::write(to.join(entry.file_name()), bytes).expect("copy");
    }
    root
}

fn mica() -> RunId {
    RunId::new("Mica_flume1").expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

async fn open_nodb(root: &Path, extra: &str) -> FileStore {
    let url = format!("file://{}?ext=nodb{extra}", root.display());
    FileStore::open(FileConfig::from_url(&url).expect("url"))
        .await
        .expect("open")
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Issue 14, item 1: a lock file held by WEPPcloud refuses every acquire
/// and write of its document (and of the run lock), with WEPPcloud as the
/// holder, and nothing is written. Without the change the acquire is
/// granted and the save lands over WEPPcloud's controller.
#[tokio::test]
async fn a_lock_file_refuses_acquires_saves_and_deletes() {
    let root = copy_of_mica("refuse");
    let dir = root.join("Mica_flume1");
    fs::write(dir.join("ron.nodb.lock"), "1712345678.5").expect("lock file");
    let before = fs::read(dir.join("ron.nodb")).expect("ron");
    let store = open_nodb(&root, "").await;
    let owner = Owner::for_this_process();
    let ron = LockKey::Doc(mica(), doc("ron"));
    let ttl = Duration::from_secs(10);

    let error = store
        .try_acquire(&ron, &owner, ttl)
        .await
        .expect_err("WEPPcloud holds ron");
    assert_eq!(error.kind(), ErrorKind::Locked, "{error}");
    let holder = error.holder().expect("the holder is shown");
    assert_eq!(holder.owner.host(), LOCK_FILE_HOLDER);
    assert_eq!(holder.fence, Fence(0));
    let since = holder
        .since
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!((since - 1_712_345_678.5).abs() < 1e-3, "since {since}");
    assert!(
        holder.expires_in >= Duration::from_secs(3600),
        "never about to expire"
    );
    assert!(error.to_string().contains("ron.nodb.lock"), "{error}");
    assert_eq!(
        store
            .acquire_and_load(&ron, &doc("ron"), &owner, ttl, GetOptions::new())
            .await
            .expect_err("held")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store
            .try_acquire(&LockKey::Run(mica()), &owner, ttl)
            .await
            .expect_err("the run lock covers ron")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store
            .claim(&ron, Fence(7), Some(&doc("ron")), GetOptions::new())
            .await
            .expect_err("a split store's grant is refused too")
            .kind(),
        ErrorKind::Locked
    );
    let error = store
        .put(
            &mica(),
            &doc("ron"),
            Bytes::from_static(b"{}"),
            PutOptions::overwrite(),
        )
        .await
        .expect_err("an unlocked save is refused");
    assert_eq!(error.kind(), ErrorKind::Locked, "{error}");
    assert_eq!(
        error.holder().map(|h| h.owner.host().to_owned()),
        Some(LOCK_FILE_HOLDER.to_owned())
    );
    assert_eq!(
        store
            .delete(&mica(), &doc("ron"), None)
            .await
            .expect_err("held")
            .kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        store.delete_run(&mica()).await.expect_err("held").kind(),
        ErrorKind::Locked
    );
    assert_eq!(
        fs::read(dir.join("ron.nodb")).expect("ron"),
        before,
        "nothing written"
    );
    for name in names_in(&fixture()) {
        assert!(dir.join(&name).exists(), "{name} was not deleted");
    }
    assert_eq!(
        fs::read_to_string(dir.join("ron.nodb.lock")).expect("kept"),
        "1712345678.5",
        "runstate never removes a lock file by itself"
    );
    // The other controllers are free.
    let climate = LockKey::Doc(mica(), doc("climate"));
    let lease = store
        .try_acquire(&climate, &owner, ttl)
        .await
        .expect("free");
    store
        .save_and_release(
            &lease,
            &doc("climate"),
            Bytes::from_static(b"{\"py/object\": \"x\"}"),
            runstate_core::PutMode::Overwrite,
        )
        .await
        .expect("climate is not held");
    // A lock file that is a symlink (never followed) is a lock all the same.
    std::os::unix::fs::symlink("/etc/passwd", dir.join("soils.nodb.lock")).expect("link");
    assert_eq!(
        store
            .put(
                &mica(),
                &doc("soils"),
                Bytes::from_static(b"{}"),
                PutOptions::overwrite()
            )
            .await
            .expect_err("held through a link")
            .kind(),
        ErrorKind::Locked
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Issue 14, item 1: `list_locks` (what `runstate locks` prints) shows a
/// lock file with its age, and `break_lock` (`runstate unlock --force`)
/// removes it, after which the document can be locked again; a waiter's
/// break pinned to a runstate fence leaves it alone. Without the change
/// nothing is listed and nothing is broken.
#[tokio::test]
async fn lock_files_are_listed_and_broken_only_by_a_forced_unlock() {
    let root = copy_of_mica("list");
    let dir = root.join("Mica_flume1");
    fs::write(dir.join("climate.nodb.lock"), "1712345678.25").expect("lock file");
    let store = open_nodb(&root, "").await;
    let climate = LockKey::Doc(mica(), doc("climate"));
    for locks in [
        store.list_locks(Some(&mica())).await.expect("list run"),
        store.list_locks(None).await.expect("list all"),
    ] {
        assert_eq!(locks.len(), 1, "{locks:?}");
        assert_eq!(locks[0].key, climate);
        assert_eq!(locks[0].owner.host(), LOCK_FILE_HOLDER);
        let age = SystemTime::now()
            .duration_since(locks[0].since)
            .expect("in the past");
        assert!(age > Duration::from_secs(86_400), "its age shows: {age:?}");
    }
    assert_eq!(
        store
            .inspect(&climate)
            .await
            .expect("inspect")
            .map(|h| h.owner.host().to_owned()),
        Some(LOCK_FILE_HOLDER.to_owned())
    );
    // A break pinned to a runstate grant never removes WEPPcloud's file.
    assert_eq!(
        store
            .break_lock(&climate, Some(Fence(12)))
            .await
            .expect("break"),
        None
    );
    assert!(dir.join("climate.nodb.lock").exists());
    let broken = store
        .break_lock(&climate, None)
        .await
        .expect("forced unlock")
        .expect("something was broken");
    assert_eq!(broken.owner.host(), LOCK_FILE_HOLDER);
    assert!(!dir.join("climate.nodb.lock").exists(), "removed");
    assert!(store.list_locks(None).await.expect("list").is_empty());
    let owner = Owner::for_this_process();
    let lease = store
        .try_acquire(&climate, &owner, Duration::from_secs(5))
        .await
        .expect("free after the forced unlock");
    store.release(&lease).await.expect("release");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Wave-2 review: a lock "file" that is a folder holds its document, as
/// for WEPPcloud (which only asks whether the name exists), everywhere
/// alike: saves and acquires of the document and of the run are refused,
/// listings show it, and a forced unlock refuses to remove a folder
/// (`Denied`), leaving it and its contents. (Listings and the run lock
/// skipped it, and a forced unlock failed with an I/O error.)
#[tokio::test]
async fn a_lock_folder_holds_its_document_everywhere_alike() {
    let root = copy_of_mica("lock-folder");
    let dir = root.join("Mica_flume1");
    fs::create_dir(dir.join("climate.nodb.lock")).expect("lock folder");
    fs::write(dir.join("climate.nodb.lock/inside"), "x").expect("inside");
    let store = open_nodb(&root, "").await;
    let climate = LockKey::Doc(mica(), doc("climate"));
    let owner = Owner::for_this_process();
    for key in [climate.clone(), LockKey::Run(mica())] {
        let error = store
            .try_acquire(&key, &owner, Duration::from_secs(5))
            .await
            .expect_err("held by the lock folder");
        assert_eq!(error.kind(), ErrorKind::Locked, "{key}: {error}");
    }
    let locks = store.list_locks(Some(&mica())).await.expect("list");
    assert_eq!(
        locks.iter().map(|l| &l.key).collect::<Vec<_>>(),
        [&climate],
        "{locks:?}"
    );
    let error = store
        .break_lock(&climate, None)
        .await
        .expect_err("a folder is not removed");
    assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
    assert!(dir.join("climate.nodb.lock/inside").exists(), "left alone");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// `weppcloud=false` makes lock files ordinary files again (and `weppcloud
/// =true` honours them with any extension).
#[tokio::test]
async fn the_weppcloud_option_forces_lock_files_on_or_off() {
    let root = copy_of_mica("off");
    let dir = root.join("Mica_flume1");
    fs::write(dir.join("wepp.nodb.lock"), "1712345678").expect("lock file");
    let off = open_nodb(&root, "&weppcloud=false").await;
    assert!(!off.config().weppcloud_neighbour());
    off.put(
        &mica(),
        &doc("wepp"),
        Bytes::from_static(b"{}"),
        PutOptions::overwrite(),
    )
    .await
    .expect("ignored when off");
    assert!(off.list_locks(None).await.expect("list").is_empty());

    let json_root = temp_dir("json");
    fs::create_dir_all(json_root.join("r")).expect("run");
    fs::write(json_root.join("r/a.json.lock"), "1712345678").expect("lock file");
    let on = FileStore::open(FileConfig::new(&json_root).with_weppcloud(WeppcloudFiles::On))
        .await
        .expect("open");
    assert_eq!(
        on.put(
            &RunId::new("r").expect("valid"),
            &doc("a"),
            Bytes::from_static(b"{}"),
            PutOptions::overwrite()
        )
        .await
        .expect_err("on with ext=json")
        .kind(),
        ErrorKind::Locked
    );
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(&json_root).expect("cleanup");
}

/// A waiter on a document held by a lock file backs off (a lock file
/// announces nothing) instead of spinning, and gets `Locked` with
/// WEPPcloud as the holder when its wait runs out.
#[tokio::test]
async fn waiters_back_off_behind_a_lock_file() {
    let root = copy_of_mica("wait");
    fs::write(root.join("Mica_flume1/topaz.nodb.lock"), "1712345678").expect("lock file");
    let store = open_nodb(&root, "").await;
    let key = LockKey::Doc(mica(), doc("topaz"));
    let started = std::time::Instant::now();
    store
        .wait_for_release(&key, Duration::from_millis(300))
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "no early return while the lock file is there"
    );
    let error = runstate_core::LockExt::acquire(
        &store,
        &key,
        &Owner::for_this_process(),
        Duration::from_secs(5),
        &runstate_core::WaitPolicy::with_timeout(Duration::from_millis(300)),
    )
    .await
    .expect_err("still held");
    assert_eq!(error.kind(), ErrorKind::Locked);
    fs::remove_dir_all(&root).expect("cleanup");
}

/// WEPPcloud's `READONLY` marker refuses every write of the run with
/// `Denied`; reads and leases still work (a read-only run can be migrated
/// out).
#[tokio::test]
async fn a_readonly_run_refuses_writes() {
    let root = copy_of_mica("readonly");
    let dir = root.join("Mica_flume1");
    fs::write(dir.join("READONLY"), "").expect("marker");
    let store = open_nodb(&root, "").await;
    let error = store
        .put(
            &mica(),
            &doc("ron"),
            Bytes::from_static(b"{}"),
            PutOptions::overwrite(),
        )
        .await
        .expect_err("read-only");
    assert_eq!(error.kind(), ErrorKind::Denied, "{error}");
    assert!(error.to_string().contains("READONLY"), "{error}");
    assert_eq!(
        store
            .delete(&mica(), &doc("ron"), None)
            .await
            .expect_err("read-only")
            .kind(),
        ErrorKind::Denied
    );
    assert_eq!(
        store
            .delete_run(&mica())
            .await
            .expect_err("read-only")
            .kind(),
        ErrorKind::Denied
    );
    let owner = Owner::for_this_process();
    let lease = store
        .try_acquire(&LockKey::Run(mica()), &owner, Duration::from_secs(5))
        .await
        .expect("leases still work");
    assert!(
        store
            .get_bytes(&mica(), &doc("ron"))
            .await
            .expect("get")
            .is_some()
    );
    store.release(&lease).await.expect("release");
    assert_eq!(
        fs::read(dir.join("ron.nodb")).expect("ron"),
        fs::read(fixture().join("ron.nodb")).expect("fixture"),
        "unchanged"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

/// WEPPcloud trusts a cached controller while the file's (mtime, size) is
/// unchanged (some versions: while its mtime is): a rewrite must move the
/// modification time forward, even when the file's time is ahead of the
/// clock (an NFS server's clock, a quick rewrite within one timestamp
/// tick). Without the change the new file gets the current time, behind
/// the old one.
#[tokio::test]
async fn rewrites_move_the_modification_time_forward() {
    let root = copy_of_mica("mtime");
    let path = root.join("Mica_flume1/wepp.nodb");
    let store = open_nodb(&root, "").await;
    let size = fs::metadata(&path).expect("meta").len();
    let ahead = SystemTime::now() + Duration::from_secs(30);
    fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_times(fs::FileTimes::new().set_modified(ahead))
        .expect("set time");
    let same_size = vec![b' '; usize::try_from(size).expect("small")];
    store
        .put(
            &mica(),
            &doc("wepp"),
            Bytes::from(same_size),
            PutOptions::overwrite(),
        )
        .await
        .expect("save");
    let after = fs::metadata(&path).expect("meta");
    assert_eq!(after.len(), size);
    assert!(
        after.modified().expect("mtime") >= ahead + Duration::from_millis(1),
        "the signature changed: {:?} after {:?}",
        after.modified(),
        ahead
    );
    // Another size moves it forward as well: some WEPPcloud versions
    // refresh their in-process copy on the time alone, which a file
    // system with coarse timestamps leaves equal within one tick. (The
    // file system's own time was kept, behind the old one.)
    let before = after.modified().expect("mtime");
    store
        .put(
            &mica(),
            &doc("wepp"),
            Bytes::from_static(b"{}"),
            PutOptions::overwrite(),
        )
        .await
        .expect("save");
    let moved = fs::metadata(&path)
        .expect("meta")
        .modified()
        .expect("mtime");
    assert!(
        moved >= before + Duration::from_millis(1),
        "{moved:?} after {before:?}"
    );
    // By the smallest step this file system keeps (nanoseconds here), not
    // a whole second each time: the time runs ahead of the clock no more
    // than it must.
    assert!(
        moved < before + Duration::from_secs(1),
        "{moved:?} after {before:?}"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

/// A run runstate creates gets `nodb.version` = `1000` before its first
/// controller, so WEPPcloud never takes it for a legacy run; a legacy run
/// (controllers, no marker) stays unmarked and an existing marker is never
/// changed.
#[tokio::test]
async fn new_runs_are_marked_with_nodb_version() {
    let root = copy_of_mica("version");
    let store = open_nodb(&root, "").await;
    let new = RunId::new("fresh-run").expect("valid");
    store
        .put(
            &new,
            &doc("ron"),
            Bytes::from_static(b"{}"),
            PutOptions::create(),
        )
        .await
        .expect("save");
    assert_eq!(
        fs::read_to_string(root.join("fresh-run/nodb.version")).expect("marker"),
        "1000\n"
    );
    store
        .put(
            &mica(),
            &doc("ron"),
            Bytes::from_static(b"{}"),
            PutOptions::overwrite(),
        )
        .await
        .expect("save");
    store
        .put(
            &mica(),
            &doc("newdoc"),
            Bytes::from_static(b"{}"),
            PutOptions::create(),
        )
        .await
        .expect("save");
    assert!(
        !root.join("Mica_flume1/nodb.version").exists(),
        "a legacy run stays a legacy run"
    );
    fs::write(root.join("fresh-run/nodb.version"), "1001\n").expect("newer");
    store
        .put(
            &new,
            &doc("climate"),
            Bytes::from_static(b"{}"),
            PutOptions::create(),
        )
        .await
        .expect("save");
    assert_eq!(
        fs::read_to_string(root.join("fresh-run/nodb.version")).expect("marker"),
        "1001\n",
        "never downgraded"
    );
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The `ron` controller, as loose JSON.
#[derive(Serialize, Deserialize)]
struct Ron(serde_json::Value);

impl Document for Ron {
    const NAME: &'static str = "ron";
}

/// Issue 14, item 5: with `state_dir`, locked updates, leases, status
/// messages, milestones and the version index live under
/// `<state_dir>/<run>/`: the run folder written in place holds exactly its
/// `.nodb` files afterwards (no `.runstate`, no temporary file), and a
/// lease on a run that has no folder yet does not create one. Without the
/// change the URL option is refused (and everything goes to `.runstate`).
#[tokio::test]
async fn state_dir_leaves_run_folders_to_their_documents() {
    let root = copy_of_mica("state");
    let state = temp_dir("state-dir").join("bookkeeping");
    let store = open_nodb(&root, &format!("&state_dir={}", state.display())).await;
    let store = Arc::new(store);
    let client = Client::new(Arc::clone(&store) as Arc<dyn Lock>);
    let run = client.run(mica());
    for _ in 0..3 {
        run.update(|ron: &mut Ron| {
            ron.0["_rs_counter"] =
                serde_json::json!(ron.0["_rs_counter"].as_u64().unwrap_or(0) + 1);
        })
        .await
        .expect("locked update");
    }
    assert_eq!(run.load::<Ron>().await.expect("load").0["_rs_counter"], 3);
    store
        .publish(&mica(), "climate", "building")
        .await
        .expect("publish");
    store
        .mark(&mica(), "build_climate", SystemTime::now())
        .await
        .expect("mark");
    store.list_all_docs(&mica()).await.expect("listing (index)");
    let mut status = store
        .subscribe(&mica(), Replay::All)
        .await
        .expect("subscribe");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), status.next())
            .await
            .expect("replayed")
            .is_some()
    );
    let owner = Owner::for_this_process();
    let held = store
        .try_acquire(
            &LockKey::Doc(mica(), doc("wepp")),
            &owner,
            Duration::from_secs(30),
        )
        .await
        .expect("acquire");
    let locks = store.list_locks(None).await.expect("list");
    assert_eq!(locks.len(), 1, "{locks:?}");
    let elsewhere = RunId::new("not-yet").expect("valid");
    let lease = store
        .try_acquire(
            &LockKey::Run(elsewhere.clone()),
            &owner,
            Duration::from_secs(30),
        )
        .await
        .expect("acquire");
    assert!(
        !root.join("not-yet").exists(),
        "no run folder made for a lease"
    );
    assert_eq!(store.list_locks(None).await.expect("list").len(), 2);
    store.release(&lease).await.expect("release");
    store.release(&held).await.expect("release");

    assert_eq!(
        names_in(&root.join("Mica_flume1")),
        names_in(&fixture()),
        "only the controllers are in the run folder"
    );
    let book = names_in(&state.join("Mica_flume1"));
    for expected in [
        "doc.ron.lease",
        "doc.wepp.lease",
        "status.log",
        "milestones.json",
    ] {
        assert!(book.iter().any(|n| n == expected), "{expected} in {book:?}");
    }
    assert!(state.join("not-yet/run.lease").exists());
    // Reopened, the leases' fences go on from the state folder.
    drop(client);
    let again = open_nodb(&root, &format!("&state_dir={}", state.display())).await;
    let lease = again
        .try_acquire(
            &LockKey::Doc(mica(), doc("ron")),
            &owner,
            Duration::from_secs(5),
        )
        .await
        .expect("acquire");
    assert!(lease.fence() > Fence(3), "fence {}", lease.fence());
    again.release(&lease).await.expect("release");
    assert_eq!(names_in(&root.join("Mica_flume1")), names_in(&fixture()));
    fs::remove_dir_all(&root).expect("cleanup");
    fs::remove_dir_all(state.parent().expect("parent")).expect("cleanup");
}
