//! runstate beside a running WEPPcloud (issue 14), through `runstate::open`
//! on copies of the real run folder `Mica_flume1`, against a private
//! redis-server on a free loopback port (started and stopped by its PID by
//! the test, so WEPPcloud's fixed database numbers never touch the shared
//! server):
//!
//! - `python_workers_and_runstate_workers_share_controllers`: the proof.
//!   Python workers speaking WEPPcloud's lock-and-cache protocol as its
//!   source does (`tests/support/weppcloud_worker.py`, with the `redis`
//!   package from the virtual environment `cargo xtask test` makes under
//!   target/) run concurrently with runstate workers on the same
//!   controllers: the counters equal all acknowledged updates of both
//!   sides, hold intervals never overlap per controller, and after every
//!   runstate write WEPPcloud's cached copy is absent or equals the file.
//! - lock files through split stores, writes refused while WEPPcloud holds
//!   a controller, the cache deleted by every kind of write, batch and
//!   child runs refused, and a run migrated in place with `state_dir`.

#[path = "support/urls.rs"]
#[allow(dead_code)] // each test crate uses its own part
mod urls;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use redis::AsyncCommands;
use runstate::file::LOCK_FILE_HOLDER;
use runstate::migrate::{MigrateOptions, Selection, migrate};
use runstate::{
    AnyStore, Bytes, DocName, ErrorKind, GetOptions, LockExt, LockKey, Owner, PutMode, PutOptions,
    RunId, StoreExt, WaitPolicy,
};
use runstate_conformance::is_required;
use urls::encode;

/// A redis-server of this test's own, on a free loopback port, its files
/// under target/; killed by its PID when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    /// `None` (after a loud message) when redis-server is not installed
    /// and not required.
    fn start() -> Option<OwnRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "runstate-wepp-redis-{port}-{:x}",
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let child = match Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--daemonize", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                assert!(
                    !is_required("redis"),
                    "redis-server is required (RUNSTATE_REQUIRE_BACKENDS) but cannot start: {error}"
                );
                eprintln!("*** SKIPPED: redis-server cannot start: {error} ***");
                return None;
            }
        };
        let server = OwnRedis { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "own redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn url(&self, db: i64) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    async fn connection(&self, db: i64) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url(db))
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture() -> PathBuf {
    let dir = std::env::var_os("RUNSTATE_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
        PathBuf::from,
    );
    let run = dir.join("nodb/Mica_flume1");
    assert!(
        run.is_dir(),
        "WEPPcloud fixture not found at {}",
        run.display()
    );
    run
}

/// A fresh folder holding `runs/Mica_flume1` (a writable copy; the
/// fixture is never written) and an empty `state/`.
fn workspace(tag: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!(
        "runstate-wepp-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let run = base.join("runs/Mica_flume1");
    std::fs::create_dir_all(&run).expect("run folder");
    std::fs::create_dir_all(base.join("state")).expect("state folder");
    for entry in std::fs::read_dir(fixture()).expect("fixture") {
        let entry = entry.expect("entry");
        let bytes = std::fs::read(entry.path()).expect("read");
        std::fs::write(run.join(entry.file_name()), bytes).expect("copy");
    }
    base
}

/// The URL a WEPPcloud deployment uses: its run folders in place, the
/// bookkeeping outside them, its Redis as the lock service.
fn weppcloud_url(base: &Path, server: &OwnRedis) -> String {
    format!(
        "file://{}?ext=nodb&state_dir={}&locks={}",
        base.join("runs").display(),
        base.join("state").display(),
        encode(&format!("{}?weppcloud=true&prefix=rstest", server.url(0)))
    )
}

fn mica() -> RunId {
    RunId::new("Mica_flume1").expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

/// The Python of the virtual environment `cargo xtask test` prepares (or
/// `RUNSTATE_WEPPCLOUD_PYTHON`), when it can import `redis`.
fn python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("RUNSTATE_WEPPCLOUD_PYTHON").map(PathBuf::from),
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/services/weppcloud-python/venv/bin/python"),
        ),
    ];
    let found = candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import redis"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            !is_required("redis") && !is_required("weppcloud"),
            "the WEPPcloud worker test is required (RUNSTATE_REQUIRE_BACKENDS) but no Python with \
             the `redis` package was found: run `cargo xtask test`, which installs it into \
             target/services/weppcloud-python, or set RUNSTATE_WEPPCLOUD_PYTHON"
        );
        eprintln!("*** SKIPPED the WEPPcloud worker test: no Python with the `redis` package ***");
    }
    found
}

/// One side's hold of a controller's lock, by the wall clock.
#[derive(Debug, Clone)]
struct Hold {
    side: &'static str,
    doc: String,
    start: f64,
    end: f64,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// A JSON object without WEPPcloud's signature fields.
fn without_signature(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = value.as_object_mut() {
        fields.remove("_nodb_mtime");
        fields.remove("_nodb_size");
    }
    value
}

/// What can be said of WEPPcloud's cached copy of a controller right now:
/// `Ok` when it is absent, or when it describes the file (its signature
/// is the file's and its content the file's), or when its signature is not
/// the file's (WEPPcloud ignores it then); `Err` when it passes WEPPcloud's
/// signature check but holds other content: a stale copy a worker would
/// use. With `strict`, a copy whose signature is not the file's is an
/// error too (nobody else may have written meanwhile).
fn check_cache(cached: Option<String>, file: &Path, strict: bool) -> Result<(), String> {
    let Some(cached) = cached else {
        return Ok(());
    };
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(file).map_err(|e| e.to_string())?;
    let mtime = meta
        .modified()
        .map_err(|e| e.to_string())?
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    let value: serde_json::Value = serde_json::from_str(&cached).map_err(|e| e.to_string())?;
    let signed = value["_nodb_size"].as_u64() == Some(meta.len())
        && value["_nodb_mtime"]
            .as_f64()
            .is_some_and(|m| (m - mtime).abs() <= 1e-6);
    if !signed {
        return if strict {
            Err(format!(
                "a cached copy not of the file: {}",
                cached.chars().take(200).collect::<String>()
            ))
        } else {
            Ok(())
        };
    }
    let on_disk: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if without_signature(value) == without_signature(on_disk) {
        Ok(())
    } else {
        Err("a stale cached copy carries the file's signature".to_owned())
    }
}

/// Issue 14, item 6: Python workers speaking WEPPcloud's protocol and
/// runstate workers update the same controllers of a copy of
/// `Mica_flume1` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_workers_and_runstate_workers_share_controllers() {
    let Some(python) = python() else { return };
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("proof");
    let store = runstate::open(&weppcloud_url(&base, &server))
        .await
        .expect("open");
    assert_eq!(store.capabilities().backend, "file+weppcloud");
    let docs = ["climate", "wepp", "ron"];
    let wd = base.join("runs/Mica_flume1");
    let (workers, iterations) = (2, 36);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/weppcloud_worker.py");
    let mut children = Vec::new();
    let (ready, readied) = std::sync::mpsc::channel();
    let mut readers = Vec::new();
    for seed in 0..workers {
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(server.port.to_string())
            .arg(&wd)
            .arg("Mica_flume1")
            .arg(docs.join(","))
            .arg(iterations.to_string())
            .arg(seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a Python worker");
        let stdout = child.stdout.take().expect("stdout");
        let ready = ready.clone();
        // "ready" once connected, then one JSON line per update.
        readers.push(std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next().and_then(|line| line.ok());
            let _ = ready.send(first.as_deref() == Some("ready"));
            lines.map_while(|line| line.ok()).collect::<Vec<String>>()
        }));
        children.push(child);
    }
    drop(ready);
    for _ in 0..workers {
        let ok = readied
            .recv_timeout(Duration::from_secs(60))
            .expect("a Python worker got ready");
        assert!(ok, "a Python worker could not start");
    }
    // Every worker of both sides starts now.
    for child in &mut children {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("start it");
        stdin.flush().expect("flush");
    }

    let holds = Arc::new(Mutex::new(Vec::<Hold>::new()));
    let cache_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (store, holds, failures) = (
            store.clone(),
            Arc::clone(&holds),
            Arc::clone(&cache_failures),
        );
        let (wd, url) = (wd.clone(), server.url(13));
        tasks.push(tokio::spawn(async move {
            let mut cache = redis::Client::open(url)
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let owner = Owner::for_this_process();
            let mut done: HashMap<String, u64> = HashMap::new();
            for i in 0..iterations {
                let name = docs[(i + worker) % docs.len()];
                let key = LockKey::Doc(mica(), doc(name));
                let (lease, stored) = store
                    .acquire_and_load_waiting(
                        &key,
                        &doc(name),
                        &owner,
                        Duration::from_secs(30),
                        GetOptions::new(),
                        &WaitPolicy::with_timeout(Duration::from_secs(120)),
                    )
                    .await
                    .expect("acquire and load");
                let start = now_secs();
                let stored = stored.expect("the controller exists");
                let mut value: serde_json::Value =
                    serde_json::from_slice(&stored.bytes).expect("JSON");
                let count = value["_rs_counter"].as_u64().unwrap_or(0) + 1;
                value["_rs_counter"] = serde_json::json!(count);
                let bytes = Bytes::from(serde_json::to_vec(&value).expect("encode"));
                // A step that takes a while, as a real one does.
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..4000))).await;
                let path = wd.join(format!("{name}.nodb"));
                let cache_key = path.display().to_string();
                if i % 2 == 0 {
                    // A save, then the cache looked at under the lock: nobody
                    // else can write, so a cached copy must be of this file.
                    store
                        .put(
                            &mica(),
                            &doc(name),
                            bytes,
                            PutOptions::update(stored.version.clone()).with_lease(&lease),
                        )
                        .await
                        .expect("save under the lease");
                    let cached: Option<String> = cache.get(&cache_key).await.expect("GET");
                    if let Err(why) = check_cache(cached, &path, true) {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("{name} (locked): {why}"));
                    }
                    let end = now_secs();
                    store.release(&lease).await.expect("release");
                    holds.lock().expect("lock").push(Hold {
                        side: "runstate",
                        doc: name.into(),
                        start,
                        end,
                    });
                } else {
                    let end = now_secs();
                    store
                        .save_and_release(
                            &lease,
                            &doc(name),
                            bytes,
                            PutMode::Update(stored.version),
                        )
                        .await
                        .expect("save and release");
                    holds.lock().expect("lock").push(Hold {
                        side: "runstate",
                        doc: name.into(),
                        start,
                        end,
                    });
                    // Others may write now: a cached copy must never pass
                    // WEPPcloud's signature check with stale content.
                    let cached: Option<String> = cache.get(&cache_key).await.expect("GET");
                    if let Err(why) = check_cache(cached, &path, false) {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("{name}: {why}"));
                    }
                }
                *done.entry(name.to_owned()).or_default() += 1;
            }
            done
        }));
    }

    let mut acknowledged: HashMap<String, u64> = HashMap::new();
    for task in tasks {
        for (name, n) in task.await.expect("a runstate worker") {
            *acknowledged.entry(name).or_default() += n;
        }
    }
    let mut python_holds = Vec::new();
    for (child, reader) in children.into_iter().zip(readers) {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("a Python worker");
        assert!(
            output.status.success(),
            "a Python worker failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in reader.join().expect("the reader") {
            let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            let name = record["doc"].as_str().expect("doc").to_owned();
            *acknowledged.entry(name.clone()).or_default() += 1;
            python_holds.push(Hold {
                side: "python",
                doc: name,
                start: record["start"].as_f64().expect("start"),
                end: record["end"].as_f64().expect("end"),
            });
        }
    }
    assert_eq!(
        python_holds.len(),
        workers * iterations,
        "every Python update acknowledged"
    );

    // The counters equal every acknowledged update of both sides.
    for name in docs {
        let stored = store
            .get_bytes(&mica(), &doc(name))
            .await
            .expect("get")
            .expect("present");
        let value: serde_json::Value = serde_json::from_slice(&stored.bytes).expect("JSON");
        assert_eq!(
            value["_rs_counter"].as_u64(),
            acknowledged.get(name).copied(),
            "{name}: no update lost"
        );
    }
    // Nobody wrote while the other held the lock.
    let mut all: Vec<Hold> = holds.lock().expect("lock").clone();
    all.extend(python_holds);
    for name in docs {
        let mut mine: Vec<&Hold> = all.iter().filter(|h| h.doc == name).collect();
        mine.sort_by(|a, b| a.start.total_cmp(&b.start));
        for pair in mine.windows(2) {
            assert!(
                pair[0].end <= pair[1].start,
                "{name}: {:?} and {:?} held the lock at once",
                pair[0],
                pair[1]
            );
        }
        assert!(
            mine.iter().any(|h| h.side == "python") && mine.iter().any(|h| h.side == "runstate")
        );
    }
    let failures = cache_failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "stale cached copies: {failures:?}");
    // WEPPcloud's mirror says every controller is free again.
    let mut db0 = server.connection(0).await;
    for name in docs {
        let mirror: String = db0
            .hget("Mica_flume1", format!("locked:{name}.nodb"))
            .await
            .expect("HGET");
        assert_eq!(mirror, "false", "{name}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Issue 14, item 3: every kind of runstate write deletes WEPPcloud's
/// cached copy (key: the file's absolute path as WEPPcloud sees it,
/// defaulting to the root's own), and writes made without the
/// controller's lease are refused while a WEPPcloud worker holds it.
/// Without the change the cached copy stays and the save lands over the
/// worker's controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_delete_the_cache_and_respect_weppclouds_locks() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("cache");
    let store = runstate::open(&weppcloud_url(&base, &server))
        .await
        .expect("open");
    let mut db0 = server.connection(0).await;
    let mut db13 = server.connection(13).await;
    let path = base.join("runs/Mica_flume1/climate.nodb");
    let cache_key = path.display().to_string();
    let stale = || async {
        let mut db13 = server.connection(13).await;
        let _: () = db13
            .set_ex(&cache_key, "{\"py/object\": \"stale\"}", 259_200)
            .await
            .expect("SET");
    };
    let climate = doc("climate");
    let key = LockKey::Doc(mica(), climate.clone());
    let owner = Owner::for_this_process();
    let client = store.client_config().clone();

    stale().await;
    store
        .put(
            &mica(),
            &climate,
            Bytes::from_static(b"{\"a\": 1}"),
            PutOptions::overwrite(),
        )
        .await
        .expect("unlocked put");
    assert!(
        !db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"),
        "put"
    );

    stale().await;
    let lease = store
        .try_acquire(&key, &owner, client.ttl)
        .await
        .expect("acquire");
    store
        .save_and_release(
            &lease,
            &climate,
            Bytes::from_static(b"{\"a\": 2}"),
            PutMode::Overwrite,
        )
        .await
        .expect("save and release");
    assert!(
        !db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"),
        "save_and_release"
    );

    stale().await;
    let run_lease = store
        .try_acquire(&LockKey::Run(mica()), &owner, client.ttl)
        .await
        .expect("run lock");
    store
        .put(
            &mica(),
            &climate,
            Bytes::from_static(b"{\"a\": 3}"),
            PutOptions::overwrite().with_lease(&run_lease),
        )
        .await
        .expect("save under the run lease");
    assert!(
        !db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"),
        "run lease"
    );

    // A WEPPcloud worker takes the controller.
    let nodb_key = "nodb-lock:Mica_flume1:climate.nodb";
    let token = "5d41402abc4b2a76b9719d911017c592";
    let payload = r#"{"token":"5d41402abc4b2a76b9719d911017c592","owner":"wepp-worker-1:4242","acquired_at":1795500000,"expires_at":1795521600,"ttl":21600}"#;
    let set: Option<String> = redis::cmd("SET")
        .arg(nodb_key)
        .arg(payload)
        .arg("NX")
        .arg("EX")
        .arg(60)
        .query_async(&mut db0)
        .await
        .expect("SET");
    assert!(set.is_some());
    let before = std::fs::read(&path).expect("read");
    for (what, outcome) in [
        (
            "unlocked put",
            store
                .put(
                    &mica(),
                    &climate,
                    Bytes::from_static(b"{}"),
                    PutOptions::overwrite(),
                )
                .await
                .map(drop),
        ),
        (
            "put under the run lease",
            store
                .put(
                    &mica(),
                    &climate,
                    Bytes::from_static(b"{}"),
                    PutOptions::overwrite().with_lease(&run_lease),
                )
                .await
                .map(drop),
        ),
        (
            "delete",
            store.delete(&mica(), &climate, None).await.map(drop),
        ),
        ("delete_run", store.delete_run(&mica()).await.map(drop)),
        (
            "acquire",
            store.try_acquire(&key, &owner, client.ttl).await.map(drop),
        ),
    ] {
        let error = outcome.expect_err(what);
        assert_eq!(error.kind(), ErrorKind::Locked, "{what}: {error}");
        let holder = error.holder().expect("WEPPcloud's worker is shown");
        assert_eq!(
            (holder.owner.host(), holder.owner.pid()),
            ("wepp-worker-1", 4242),
            "{what}"
        );
        // The worker's token is its proof of holding the lock (WEPPcloud's
        // unlock and dump guard check it): never shown.
        let shown = format!("{} {error:?}", runstate::display_chain(&error));
        assert!(!shown.contains(token), "{what}: {shown}");
    }
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "nothing written"
    );
    let locks = store.list_locks(Some(&mica())).await.expect("list");
    assert!(
        locks
            .iter()
            .any(|l| l.key == key && l.owner.host() == "wepp-worker-1"),
        "runstate locks shows WEPPcloud's worker: {locks:?}"
    );
    assert!(!format!("{locks:?}").contains(token), "{locks:?}");
    store.release(&run_lease).await.expect("release");
    let _: i64 = db0.del(nodb_key).await.expect("DEL");

    // Status and milestones reach WEPPcloud's places through the facade.
    store
        .mark(&mica(), "build_climate", SystemTime::now())
        .await
        .expect("mark");
    let stamp: String = db0
        .hget("Mica_flume1", "timestamps:build_climate")
        .await
        .expect("HGET");
    assert!(stamp.parse::<u64>().is_ok(), "whole seconds: {stamp}");
    // The run folder holds the controllers only (and no bookkeeping).
    assert!(!base.join("runs/Mica_flume1/.runstate").exists());
    let _ = std::fs::remove_dir_all(&base);
}

/// A lease WEPPcloud's operator cleared (`clear_locks` deletes every
/// `nodb-lock:<run>:*` key) while its holder still thinks it holds it,
/// and that a worker took since: the holder's saves are refused with
/// `Fenced` (as every store refuses a stale holder), nothing written, as
/// WEPPcloud refuses its own dumps after
/// losing a lock. Without the check the file store's fences (which never
/// see WEPPcloud's grants) let the save land while the worker holds the
/// controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_cleared_by_weppcloud_never_writes() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("cleared");
    let store = runstate::open(&weppcloud_url(&base, &server))
        .await
        .expect("open");
    let mut db0 = server.connection(0).await;
    let path = base.join("runs/Mica_flume1/wepp.nodb");
    let before = std::fs::read(&path).expect("read");
    let key = LockKey::Doc(mica(), doc("wepp"));
    let owner = Owner::for_this_process();
    for how in ["put", "save_and_release"] {
        let lease = store
            .try_acquire(&key, &owner, Duration::from_secs(60))
            .await
            .expect("acquire");
        // clear_locks, then a worker's lock().
        let _: i64 = db0
            .del("nodb-lock:Mica_flume1:wepp.nodb")
            .await
            .expect("DEL");
        let set: Option<String> = redis::cmd("SET")
            .arg("nodb-lock:Mica_flume1:wepp.nodb")
            .arg(r#"{"token":"aa","owner":"wepp-worker-2:77","acquired_at":1,"expires_at":2,"ttl":1}"#)
            .arg("NX")
            .arg("EX")
            .arg(60)
            .query_async(&mut db0)
            .await
            .expect("SET");
        assert!(set.is_some());
        let outcome = match how {
            "put" => {
                store
                    .put(
                        &mica(),
                        &doc("wepp"),
                        Bytes::from_static(b"{\"late\": true}"),
                        PutOptions::overwrite().with_lease(&lease),
                    )
                    .await
            }
            _ => {
                store
                    .save_and_release(
                        &lease,
                        &doc("wepp"),
                        Bytes::from_static(b"{\"late\": true}"),
                        PutMode::Overwrite,
                    )
                    .await
            }
        };
        let error = outcome.expect_err("the lease is gone");
        assert_eq!(error.kind(), ErrorKind::Fenced, "{how}: {error}");
        assert_eq!(
            error.holder().map(|h| h.owner.host().to_owned()),
            Some("wepp-worker-2".to_owned()),
            "{how}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "{how}: nothing written"
        );
        assert!(
            db0.exists::<_, bool>("nodb-lock:Mica_flume1:wepp.nodb")
                .await
                .expect("EXISTS"),
            "{how}: the worker's lock is left alone"
        );
        let _: i64 = db0
            .del("nodb-lock:Mica_flume1:wepp.nodb")
            .await
            .expect("DEL");
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Issue 14, item 1, through split stores: a lock file makes the split
/// store's acquire fail with WEPPcloud's holder and give its fresh grant
/// back (the lock service's key is gone again), lists it, and a forced
/// unlock removes it. Without the change the grant stays taken (or the
/// acquire succeeds) and nothing is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_stores_honour_lock_files() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("lockfile");
    std::fs::write(base.join("runs/Mica_flume1/ron.nodb.lock"), "1712345678.5").expect("lock file");
    let generic = format!(
        "file://{}?ext=nodb&locks=memory%3A%2F%2Fwepp-lockfile-{:x}",
        base.join("runs").display(),
        fastrand::u64(..)
    );
    let stores: Vec<(&str, AnyStore)> = vec![
        (
            "weppcloud",
            runstate::open(&weppcloud_url(&base, &server))
                .await
                .expect("open"),
        ),
        ("generic", runstate::open(&generic).await.expect("open")),
    ];
    let key = LockKey::Doc(mica(), doc("ron"));
    let mut db0 = server.connection(0).await;
    for (name, store) in &stores {
        let owner = Owner::for_this_process();
        let error = store
            .try_acquire(&key, &owner, Duration::from_secs(10))
            .await
            .expect_err("WEPPcloud holds ron by its lock file");
        assert_eq!(error.kind(), ErrorKind::Locked, "{name}: {error}");
        assert_eq!(
            error.holder().map(|h| h.owner.host().to_owned()),
            Some(LOCK_FILE_HOLDER.to_owned()),
            "{name}"
        );
        assert!(
            !db0.exists::<_, bool>("nodb-lock:Mica_flume1:ron.nodb")
                .await
                .expect("EXISTS"),
            "{name}: the fresh grant was given back"
        );
        assert_eq!(
            store
                .inspect(&key)
                .await
                .expect("inspect")
                .map(|h| h.owner.host().to_owned()),
            Some(LOCK_FILE_HOLDER.to_owned()),
            "{name}"
        );
        let listed = store.list_locks(None).await.expect("list");
        assert!(
            listed
                .iter()
                .any(|l| l.key == key && l.owner.host() == LOCK_FILE_HOLDER),
            "{name}: {listed:?}"
        );
        // A waiter gives up with WEPPcloud's holder, having backed off.
        let started = Instant::now();
        let waited = store
            .acquire(
                &key,
                &owner,
                Duration::from_secs(10),
                &WaitPolicy::with_timeout(Duration::from_millis(400)),
            )
            .await
            .expect_err("still held");
        assert_eq!(waited.kind(), ErrorKind::Locked, "{name}");
        assert!(started.elapsed() >= Duration::from_millis(350), "{name}");
    }
    let (_, store) = &stores[0];
    let broken = store
        .break_lock(&key, None)
        .await
        .expect("forced unlock")
        .expect("broken");
    assert_eq!(broken.owner.host(), LOCK_FILE_HOLDER);
    assert!(!base.join("runs/Mica_flume1/ron.nodb.lock").exists());
    for (name, store) in &stores {
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{name}: free after the forced unlock: {e}"));
        store.release(&lease).await.expect("release");
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Runs WEPPcloud names under ids runstate cannot express are refused
/// clearly: a root inside `_pups` cannot be opened in WEPPcloud mode, and
/// a controller of a run group is neither written nor loaded under a
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_child_runs_are_refused() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("groups");
    let pups = base.join("runs/Mica_flume1/_pups/omni/scenarios");
    std::fs::create_dir_all(&pups).expect("pups");
    let url = format!(
        "file://{}?ext=nodb&locks={}",
        pups.display(),
        encode(&format!("{}?weppcloud=true", server.url(0)))
    );
    let error = runstate::open(&url).await.expect_err("child runs");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("_pups"), "{error}");

    let store = runstate::open(&weppcloud_url(&base, &server))
        .await
        .expect("open");
    let grouped = Bytes::from_static(b"{\"py/object\": \"wepppy.nodb.ron.Ron\", \"_run_group\": \"batch\", \"_group_name\": \"spring\"}");
    let error = store
        .put(
            &mica(),
            &doc("ron"),
            grouped.clone(),
            PutOptions::overwrite(),
        )
        .await
        .expect_err("a batch run's controller");
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    std::fs::write(base.join("runs/Mica_flume1/wepp.nodb"), &grouped).expect("write");
    let owner = Owner::for_this_process();
    let key = LockKey::Doc(mica(), doc("wepp"));
    let error = store
        .acquire_and_load(
            &key,
            &doc("wepp"),
            &owner,
            Duration::from_secs(10),
            GetOptions::new(),
        )
        .await
        .expect_err("loaded under a lease");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "the grant was given back"
    );
    // A controller stored in the layout of current WEPPcloud versions
    // (its fields under jsonpickle's `py/state`) is refused whatever a
    // call brings: a write of bytes that do not say so, a delete, its
    // lock, a save under the run lease, the run's deletion. (Only the
    // bytes a write brought were checked, and only at their top.)
    let climate = doc("climate");
    let stored = br#"{"py/object": "wepppy.nodb.core.climate.Climate", "py/state": {"_run_group": "batch", "_group_name": "spring", "wd": "/wc1/batch/spring/_base"}}"#;
    let path = base.join("runs/Mica_flume1/climate.nodb");
    std::fs::write(&path, stored).expect("write");
    let bare = Bytes::from_static(b"{}");
    let refusals = [
        (
            "put",
            store
                .put(&mica(), &climate, bare.clone(), PutOptions::overwrite())
                .await
                .map(drop),
        ),
        (
            "delete",
            store.delete(&mica(), &climate, None).await.map(drop),
        ),
        (
            "acquire",
            store
                .try_acquire(
                    &LockKey::Doc(mica(), climate.clone()),
                    &owner,
                    Duration::from_secs(10),
                )
                .await
                .map(drop),
        ),
        ("delete_run", store.delete_run(&mica()).await.map(drop)),
    ];
    for (what, outcome) in refusals {
        let error = outcome.expect_err(what);
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{what}: {error}");
    }
    let run_lease = store
        .try_acquire(&LockKey::Run(mica()), &owner, Duration::from_secs(10))
        .await
        .expect("the run lock");
    let error = store
        .save_and_release(&run_lease, &climate, bare, PutMode::Overwrite)
        .await
        .expect_err("a save under the run lease");
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        stored,
        "nothing written"
    );
    assert!(
        store
            .inspect(&LockKey::Run(mica()))
            .await
            .expect("inspect")
            .is_none(),
        "the run lease was given back"
    );
    // Without WEPPcloud mode, a Redis URL cannot be weppcloud=true itself.
    let error = runstate::open(&format!("{}?weppcloud=true", server.url(0)))
        .await
        .expect_err("not a document store");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("lock service"), "{error}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Issue 14, item 5: a run migrated into a WEPPcloud root with `state_dir`
/// holds only its `.nodb` controllers afterwards, plus WEPPcloud's own
/// `nodb.version` marker that a new run must carry (see the file backend);
/// every lease, index and temporary file stayed out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_migrated_in_place_holds_only_its_controllers() {
    let base = workspace("migrate");
    let source = runstate::open(&format!("file://{}?ext=nodb", base.join("runs").display()))
        .await
        .expect("source");
    let target_root = base.join("target");
    let target = runstate::open(&format!(
        "file://{}?ext=nodb&state_dir={}",
        target_root.display(),
        base.join("state").display()
    ))
    .await
    .expect("target");
    let report = migrate(
        &*source,
        &*target,
        &MigrateOptions::new(Selection::Runs(vec![mica()])),
        &(),
    )
    .await
    .expect("migrate");
    assert_eq!(report.documents, 8);
    let mut names: Vec<String> = std::fs::read_dir(target_root.join("Mica_flume1"))
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = std::fs::read_dir(fixture())
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    expected.push("nodb.version".to_owned());
    expected.sort();
    assert_eq!(names, expected);
    for entry in std::fs::read_dir(fixture()).expect("read") {
        let entry = entry.expect("entry");
        assert_eq!(
            std::fs::read(target_root.join("Mica_flume1").join(entry.file_name())).expect("copy"),
            std::fs::read(entry.path()).expect("fixture"),
            "byte-exact"
        );
    }
    assert!(
        base.join("state/Mica_flume1").is_dir(),
        "the bookkeeping is in the state folder"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// The parts of a WEPPcloud store built by hand, for tests that put a
/// wrapper around one of them: the file store of the run folders under
/// `base` (bookkeeping in `base/state`) and the WEPPcloud lock service on
/// `server`'s database 0.
async fn weppcloud_parts(
    server: &OwnRedis,
    base: &Path,
) -> (Arc<dyn runstate::Lock>, runstate::redis::WeppcloudService) {
    use runstate::file::{FileConfig, FileStore};
    use runstate::redis::{WeppcloudConfig, WeppcloudService};

    let root = base.join("runs");
    let files = FileConfig::from_url(&format!(
        "file://{}?ext=nodb&state_dir={}",
        root.display(),
        base.join("state").display()
    ))
    .expect("file config");
    let files: Arc<dyn runstate::Lock> = Arc::new(FileStore::open(files).await.expect("files"));
    let config =
        WeppcloudConfig::from_url(&format!("{}?weppcloud=true&prefix=rstest", server.url(0)))
            .expect("weppcloud config")
            .with_root(&root)
            .expect("root");
    let service = WeppcloudService::open(config).await.expect("service");
    (files, service)
}

/// A WEPPcloud store of `docs` and `locks` (the parts, or wrappers of
/// them), the file store `files` keeping the document locks.
fn weppcloud_store(
    docs: Arc<dyn runstate::Store>,
    locks: Arc<dyn runstate::Lock>,
    files: Arc<dyn runstate::Lock>,
    service: runstate::redis::WeppcloudService,
) -> runstate::weppcloud::WeppcloudStore {
    let split = runstate::split::SplitStore::new(docs, locks)
        .expect("split")
        .with_document_locks(files);
    runstate::weppcloud::WeppcloudStore::new(split, service)
}

/// Wave-2 review: a write of a controller checks WEPPcloud's lock, then
/// stages its bytes (written and synced: tens of milliseconds on a network
/// file system), then renames. A worker that takes the lock after the check
/// and dumps before the rename, and still holds the lock, must keep its
/// dump: the write is made conditional on the version read before the
/// check, so it is refused, checked again, and the worker's lock refuses
/// it. Played by the file store's fault hook at the staged file's `fsync`,
/// for an unlocked put, a put under the run lease and a save-and-release
/// under the run lease, and right before the rename (after the version was
/// checked, where only the entry's inode shows the dump). (Before, each
/// replaced the worker's dump while the worker held the lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_never_replaces_a_dump_made_after_its_check() {
    use runstate::file::{FaultHook, FileConfig, FileStore, SaveStep};
    use runstate::{Lock as _, Store as _};
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("window");
    let root = base.join("runs");
    let controller = root.join("Mica_flume1/climate.nodb");
    let nodb_key = "nodb-lock:Mica_flume1:climate.nodb";
    // The worker's dump in round `n` (each round's differs from the last).
    let worker_dump =
        |n: u64| format!(r#"{{"py/object": "wepppy.nodb.core.climate.Climate", "worker": {n}}}"#);
    // Armed: at the next staged file's fsync, a worker takes the lock
    // and dumps, and keeps holding the lock.
    let armed = Arc::new(AtomicBool::new(false));
    // Where the worker dumps: at the staged file's fsync, or right before
    // the rename (after the version was checked under the record).
    let at_rename = Arc::new(AtomicBool::new(false));
    let round = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hook: FaultHook = {
        let (armed, at_rename, round, controller, url) = (
            Arc::clone(&armed),
            Arc::clone(&at_rename),
            Arc::clone(&round),
            controller.clone(),
            server.url(0),
        );
        Arc::new(move |step: SaveStep, _: &Path| {
            let here = if at_rename.load(Ordering::SeqCst) {
                SaveStep::Rename
            } else {
                SaveStep::Fsync
            };
            if step == here && armed.swap(false, Ordering::SeqCst) {
                let mut con = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .map_err(std::io::Error::other)?;
                redis::cmd("SET")
                    .arg(nodb_key)
                    .arg(r#"{"token":"0123456789abcdef0123456789abcdef","owner":"wepp-worker-1:4242"}"#)
                    .arg("EX")
                    .arg(60)
                    .query::<()>(&mut con)
                    .map_err(std::io::Error::other)?;
                let staged = controller.with_extension("nodb.worker");
                std::fs::write(&staged, worker_dump(round.load(Ordering::SeqCst)))?;
                std::fs::rename(&staged, &controller)?;
            }
            Ok(())
        })
    };
    let files = FileConfig::from_url(&format!(
        "file://{}?ext=nodb&state_dir={}",
        root.display(),
        base.join("state").display()
    ))
    .expect("file config")
    .with_fault_hook(hook);
    let files: Arc<dyn runstate::Lock> = Arc::new(FileStore::open(files).await.expect("files"));
    let service = runstate::redis::WeppcloudService::open(
        runstate::redis::WeppcloudConfig::from_url(&format!(
            "{}?weppcloud=true&prefix=rstest",
            server.url(0)
        ))
        .expect("weppcloud config")
        .with_root(&root)
        .expect("root"),
    )
    .await
    .expect("service");
    let locks: Arc<dyn runstate::Lock> = Arc::new(service.clone());
    let store = weppcloud_store(Arc::clone(&files) as _, locks, files, service);
    let mut db0 = server.connection(0).await;
    let climate = doc("climate");
    let owner = Owner::for_this_process();
    for way in [
        "unlocked put",
        "put under the run lease",
        "save_and_release under the run lease",
        "unlocked put, the dump right before the rename",
    ] {
        let _: i64 = db0.del(nodb_key).await.expect("DEL");
        let n = round.fetch_add(1, Ordering::SeqCst) + 1;
        at_rename.store(way.ends_with("rename"), Ordering::SeqCst);
        armed.store(true, Ordering::SeqCst);
        let bytes = Bytes::from_static(br#"{"runstate": 1}"#);
        let outcome = match way {
            "unlocked put" | "unlocked put, the dump right before the rename" => store
                .put(&mica(), &climate, bytes, PutOptions::overwrite())
                .await
                .map(drop),
            _ => {
                let run_lease = store
                    .try_acquire(&LockKey::Run(mica()), &owner, Duration::from_secs(30))
                    .await
                    .expect("run lock");
                let outcome = if way.starts_with("put") {
                    store
                        .put(
                            &mica(),
                            &climate,
                            bytes,
                            PutOptions::overwrite().with_lease(&run_lease),
                        )
                        .await
                        .map(drop)
                } else {
                    store
                        .save_and_release(&run_lease, &climate, bytes, PutMode::Overwrite)
                        .await
                        .map(drop)
                };
                let _ = store.release(&run_lease).await;
                outcome
            }
        };
        assert!(!armed.load(Ordering::SeqCst), "{way}: the worker dumped");
        let error = outcome.expect_err(way);
        assert_eq!(error.kind(), ErrorKind::Locked, "{way}: {error}");
        assert_eq!(
            std::fs::read_to_string(&controller).expect("read"),
            worker_dump(n),
            "{way}: the worker's dump stays"
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// A lock service whose releases fail without reaching the server (a
/// connection lost at that moment): everything else is the real one's.
#[derive(Debug)]
struct ReleaseFails(Arc<dyn runstate::Lock>);

#[runstate::async_trait]
impl runstate::Store for ReleaseFails {
    fn capabilities(&self) -> &runstate::Capabilities {
        self.0.capabilities()
    }
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> runstate::Result<Option<runstate::StoredDoc>> {
        self.0.get(run, doc, options).await
    }
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> runstate::Result<runstate::Version> {
        self.0.put(run, doc, bytes, options).await
    }
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&runstate::Version>,
    ) -> runstate::Result<bool> {
        self.0.delete(run, doc, if_version).await
    }
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> runstate::Result<runstate::ListPage<runstate::DocMeta>> {
        self.0.list_docs(run, after, limit).await
    }
    async fn list_runs(
        &self,
        after: Option<&RunId>,
        limit: usize,
    ) -> runstate::Result<runstate::ListPage<RunId>> {
        self.0.list_runs(after, limit).await
    }
    async fn delete_run(&self, run: &RunId) -> runstate::Result<u64> {
        self.0.delete_run(run).await
    }
}

#[runstate::async_trait]
impl runstate::Lock for ReleaseFails {
    async fn try_acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
    ) -> runstate::Result<runstate::Lease> {
        self.0.try_acquire(key, owner, ttl).await
    }
    async fn renew(
        &self,
        lease: &runstate::Lease,
        ttl: Duration,
    ) -> runstate::Result<runstate::Lease> {
        self.0.renew(lease, ttl).await
    }
    async fn release(&self, lease: &runstate::Lease) -> runstate::Result<()> {
        let _ = lease;
        Err(runstate::Error::new(
            ErrorKind::Backend,
            "connection lost before the release was sent",
        ))
    }
    async fn inspect(&self, key: &LockKey) -> runstate::Result<Option<runstate::LockInfo>> {
        self.0.inspect(key).await
    }
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<runstate::Fence>,
    ) -> runstate::Result<Option<runstate::LockInfo>> {
        self.0.break_lock(key, only_fence).await
    }
    async fn list_locks(&self, run: Option<&RunId>) -> runstate::Result<Vec<runstate::LockInfo>> {
        self.0.list_locks(run).await
    }
}

/// A locked save whose release fails still leaves no stale cached copy:
/// the controller's lock stays in WEPPcloud's Redis until it expires, and
/// the worker that takes it then must read the file, not the copy cached
/// before the save. Without the fix the copy stays (the release script
/// that deletes it never ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_after_a_save_still_deletes_the_cached_copy() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("release-fails");
    let (files, service) = weppcloud_parts(&server, &base).await;
    let locks: Arc<dyn runstate::Lock> = Arc::new(ReleaseFails(Arc::new(service.clone())));
    let store = weppcloud_store(Arc::clone(&files) as _, locks, files, service);

    let climate = doc("climate");
    let cache_key = base
        .join("runs/Mica_flume1/climate.nodb")
        .display()
        .to_string();
    let mut db13 = server.connection(13).await;
    let _: () = db13
        .set_ex(&cache_key, "{\"py/object\": \"stale\"}", 259_200)
        .await
        .expect("SET");
    let key = LockKey::Doc(mica(), climate.clone());
    let (lease, _) = runstate::Lock::acquire_and_load(
        &store,
        &key,
        &climate,
        &Owner::for_this_process(),
        Duration::from_secs(30),
        GetOptions::new(),
    )
    .await
    .expect("acquire and load");
    runstate::Lock::save_and_release(
        &store,
        &lease,
        &climate,
        Bytes::from_static(b"{\"a\": 1}"),
        PutMode::Overwrite,
    )
    .await
    .expect("the save succeeds; only the release failed");
    assert!(
        !db13.exists::<_, bool>(&cache_key).await.expect("EXISTS"),
        "WEPPcloud's cached copy outlived a save whose release failed"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// A document store that, when asked to delete a run, first tries what a
/// WEPPcloud worker does to start on a controller (`SET NX` of its NoDb
/// lock) and records whether it got it, then deletes.
struct DeleteWitness {
    inner: Arc<dyn runstate::Store>,
    redis: redis::aio::MultiplexedConnection,
    /// Whether the worker got the lock, once per deletion.
    worker_got_it: Mutex<Vec<bool>>,
}

impl std::fmt::Debug for DeleteWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeleteWitness")
    }
}

#[runstate::async_trait]
impl runstate::Store for DeleteWitness {
    fn capabilities(&self) -> &runstate::Capabilities {
        self.inner.capabilities()
    }
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> runstate::Result<Option<runstate::StoredDoc>> {
        self.inner.get(run, doc, options).await
    }
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> runstate::Result<runstate::Version> {
        self.inner.put(run, doc, bytes, options).await
    }
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&runstate::Version>,
    ) -> runstate::Result<bool> {
        self.inner.delete(run, doc, if_version).await
    }
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> runstate::Result<runstate::ListPage<runstate::DocMeta>> {
        self.inner.list_docs(run, after, limit).await
    }
    async fn list_runs(
        &self,
        after: Option<&RunId>,
        limit: usize,
    ) -> runstate::Result<runstate::ListPage<RunId>> {
        self.inner.list_runs(after, limit).await
    }
    async fn claim(
        &self,
        key: &LockKey,
        fence: runstate::Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> runstate::Result<Option<runstate::StoredDoc>> {
        self.inner.claim(key, fence, doc, options).await
    }
    async fn delete_run(&self, run: &RunId) -> runstate::Result<u64> {
        let key = format!("nodb-lock:{run}:climate.nodb");
        let payload = r#"{"token":"7d41402abc4b2a76b9719d911017c592","owner":"wepp-worker-2:4343","acquired_at":1795500000,"expires_at":1795521600,"ttl":21600}"#;
        let mut redis = self.redis.clone();
        let got: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(payload)
            .arg("NX")
            .arg("EX")
            .arg(60)
            .query_async(&mut redis)
            .await
            .expect("SET");
        if got.is_some() {
            // Let the deletion go on as it would have.
            let _: i64 = redis.del(&key).await.expect("DEL");
        }
        self.worker_got_it
            .lock()
            .expect("not poisoned")
            .push(got.is_some());
        self.inner.delete_run(run).await
    }
}

/// `delete_run` beside WEPPcloud holds WEPPcloud's lock of every
/// controller while it deletes: a worker starting on a controller then
/// (here, right as the document store deletes) cannot take its lock.
/// Before, the locks were only checked before the deletion, and the
/// worker got the lock and worked in a run being deleted. After the
/// deletion the locks are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_run_holds_every_controller_while_it_deletes() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("delete-run-locks");
    let (files, service) = weppcloud_parts(&server, &base).await;
    let witness = Arc::new(DeleteWitness {
        inner: Arc::clone(&files) as _,
        redis: server.connection(0).await,
        worker_got_it: Mutex::new(Vec::new()),
    });
    let locks: Arc<dyn runstate::Lock> = Arc::new(service.clone());
    let store = weppcloud_store(Arc::clone(&witness) as _, locks, files, service);

    let deleted = runstate::Store::delete_run(&store, &mica())
        .await
        .expect("delete the run");
    assert!(deleted > 0, "the controllers were deleted");
    assert_eq!(
        *witness.worker_got_it.lock().expect("not poisoned"),
        [false],
        "a worker took a controller's lock while the run was being deleted"
    );
    let mut db0 = server.connection(0).await;
    let left: Vec<String> = db0.keys("nodb-lock:Mica_flume1:*").await.expect("KEYS");
    assert!(left.is_empty(), "the locks were given back: {left:?}");
    let _ = std::fs::remove_dir_all(&base);
}

/// `delete_run` beside WEPPcloud forgets the run's milestones but keeps
/// `attrs:loaded`, WEPPcloud's mark that its run hash was filled from the
/// run folder's `redisprep.dump`: without it, WEPPcloud's next request
/// loads every deleted field back from that file, which the deletion
/// keeps (it is no controller). (The mark was deleted with the rest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_run_leaves_weppcloud_nothing_to_load_back() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("delete-run-loaded");
    let store = runstate::open(&weppcloud_url(&base, &server))
        .await
        .expect("open");
    let dump = base.join("runs/Mica_flume1/redisprep.dump");
    std::fs::write(
        &dump,
        r#"{"attrs:loaded": "true", "attrs:has_sbs": "false", "timestamps:build_climate": "1712515667"}"#,
    )
    .expect("dump");
    let mut db0 = server.connection(0).await;
    let _: () = db0
        .hset_multiple(
            "Mica_flume1",
            &[
                ("attrs:loaded", "true"),
                ("attrs:has_sbs", "false"),
                ("timestamps:build_climate", "1712515667"),
                ("locked:ron.nodb", "false"),
            ],
        )
        .await
        .expect("HSET");
    store.delete_run(&mica()).await.expect("delete the run");
    let mut fields: HashMap<String, String> = db0.hgetall("Mica_flume1").await.expect("HGETALL");
    // The lock mirrors (`locked:<name>.nodb`) are WEPPcloud's too, and
    // written by the locks the deletion took.
    assert_eq!(
        fields.get("locked:ron.nodb").map(String::as_str),
        Some("false")
    );
    fields.retain(|field, _| !field.starts_with("locked:"));
    assert_eq!(
        fields,
        HashMap::from([("attrs:loaded".to_owned(), "true".to_owned())]),
        "the milestones are gone, WEPPcloud's mark stays"
    );
    assert!(dump.exists(), "the dump is no controller");
    let _ = std::fs::remove_dir_all(&base);
}

/// A deletion refused half way (another runstate holder has the last
/// controller, so the checks of WEPPcloud's workers pass and the locks of
/// the controllers before it are taken) gives back every lock it took,
/// deletes nothing, and names the deletion in its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delete_run_gives_back_the_locks_it_took() {
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let base = workspace("delete-run-refused");
    let (files, service) = weppcloud_parts(&server, &base).await;
    let locks: Arc<dyn runstate::Lock> = Arc::new(service.clone());
    let store = weppcloud_store(Arc::clone(&files) as _, locks, files, service);
    let last = LockKey::Doc(mica(), doc("wepp"));
    let holder = Owner::for_this_process();
    let held = runstate::Lock::try_acquire(&store, &last, &holder, Duration::from_secs(30))
        .await
        .expect("another holder takes the last controller");

    let error = runstate::Store::delete_run(&store, &mica())
        .await
        .expect_err("refused while a controller is held");
    assert_eq!(error.kind(), ErrorKind::Locked, "{error}");
    assert_eq!(
        error.operation(),
        Some(runstate::Operation::DeleteRun),
        "{error}"
    );
    assert_eq!(
        error.holder().map(|h| h.owner.id()),
        Some(holder.id()),
        "the other holder is named: {error}"
    );
    let mut db0 = server.connection(0).await;
    let left: Vec<String> = db0.keys("nodb-lock:Mica_flume1:*").await.expect("KEYS");
    assert_eq!(
        left,
        ["nodb-lock:Mica_flume1:wepp.nodb"],
        "only the other holder's lock is left"
    );
    for entry in std::fs::read_dir(fixture()).expect("fixture") {
        let name = entry.expect("entry").file_name();
        assert!(
            base.join("runs/Mica_flume1").join(&name).is_file(),
            "{name:?} deleted by a refused deletion"
        );
    }
    runstate::Lock::release(&store, &held)
        .await
        .expect("release");
    let _ = std::fs::remove_dir_all(&base);
}
