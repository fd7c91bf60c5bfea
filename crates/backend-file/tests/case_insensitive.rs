//! Run ids and document names that differ only by case, on a store whose
//! root ignores case (casefold ext4, CIFS, vfat): `Ron` and `ron` would be
//! one folder or one file there, so the spelling that does not exist is
//! refused with `InvalidKey`, naming both, and nothing is written.
//!
//! Staged for real on a case-insensitive passthrough FUSE file system
//! (`tests/support/casefold_fs.py`, on `mfusepy` and libfuse 3), mounted in
//! a private mount namespace, when the machine allows it; this machine's
//! kernel has neither casefolding (`CONFIG_UNICODE`) nor vfat. The
//! decision itself is tested everywhere with the setting forced on a
//! case-sensitive temporary folder.
//!
//! The FUSE test needs root (it mounts without `fusermount3`, in a mount
//! namespace made with `unshare`), `/dev/fuse`, libfuse 3, python3 with
//! `venv`, and, the first time, PyPI: it installs `mfusepy` into
//! `target/services/casefold/venv`. Without any of these it prints a loud
//! `SKIPPED` line, or fails when `RUNSTATE_REQUIRE_FUSE` is set.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutMode, PutOptions, RunId, Store, StoreExt,
};
use runstate_file::{CaseSensitivity, FileConfig, FileStore, SaveStep};

fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "runstate-case-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&root).expect("temp root");
    root
}

fn run(id: &str) -> RunId {
    RunId::new(id).expect("valid")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid")
}

const TTL: Duration = Duration::from_secs(60);

/// Everything under `dir`: each path with its kind, modification time and
/// (for files) content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (bool, i64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).expect("read folder") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            let content = if meta.is_file() {
                let mut bytes = Vec::new();
                fs::File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut bytes))
                    .expect("read");
                bytes
            } else {
                Vec::new()
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let relative = path.strip_prefix(dir).expect("inside").to_owned();
            out.insert(
                relative,
                (meta.is_dir(), meta.mtime(), meta.mtime_nsec(), content),
            );
        }
    }
    out
}

fn assert_refused<T: std::fmt::Debug>(
    outcome: runstate_core::Result<T>,
    asked: &str,
    existing: &str,
    what: &str,
) {
    let error = outcome.expect_err(what);
    assert_eq!(error.kind(), ErrorKind::InvalidKey, "{what}: {error}");
    let text = error.to_string();
    assert!(
        text.contains(&format!("`{asked}`")) && text.contains(&format!("`{existing}`")),
        "{what}: the error names both spellings ({asked}, {existing}): {text}"
    );
}

/// On `store` (whose root ignores case, or is configured to), with files
/// really kept under `backing`: makes the run `Ron` with the document
/// `Wepp` and a lock record for `Climate`, then checks that every other
/// spelling is refused without writing anything, that a failed
/// `save_and_release` still lets its lease go, and that exact spellings
/// and new names keep working.
async fn other_spellings_are_refused(store: &FileStore, backing: &Path) {
    assert!(store.ignores_case());
    let owner = Owner::for_this_process();
    let stored = store
        .put_bytes(&run("Ron"), &doc("Wepp"), Bytes::from_static(b"{\"a\":1}"))
        .await
        .expect("put Ron/Wepp");
    let climate = store
        .try_acquire(&LockKey::Doc(run("Ron"), doc("Climate")), &owner, TTL)
        .await
        .expect("lock Ron/Climate");
    store.release(&climate).await.expect("release");
    let before = snapshot(backing);

    // A run id that differs only by case from the run folder `Ron`.
    let ron = run("ron");
    assert_refused(
        store.get_bytes(&ron, &doc("Wepp")).await,
        "ron",
        "Ron",
        "get",
    );
    for name in ["Wepp", "Soils"] {
        assert_refused(
            store
                .put_bytes(&ron, &doc(name), Bytes::from_static(b"{}"))
                .await,
            "ron",
            "Ron",
            "put",
        );
    }
    assert_refused(
        store.delete(&ron, &doc("Wepp"), None).await,
        "ron",
        "Ron",
        "delete",
    );
    assert_refused(
        store.list_docs(&ron, None, 10).await,
        "ron",
        "Ron",
        "list_docs",
    );
    assert_refused(store.delete_run(&ron).await, "ron", "Ron", "delete_run");
    assert_refused(
        store.list_locks(Some(&ron)).await,
        "ron",
        "Ron",
        "list_locks",
    );
    for key in [
        LockKey::Run(ron.clone()),
        LockKey::Doc(ron.clone(), doc("Wepp")),
    ] {
        assert_refused(
            store.try_acquire(&key, &owner, TTL).await,
            "ron",
            "Ron",
            "try_acquire",
        );
        assert_refused(store.inspect(&key).await, "ron", "Ron", "inspect");
        assert_refused(
            store.break_lock(&key, None).await,
            "ron",
            "Ron",
            "break_lock",
        );
    }
    assert_refused(
        store
            .acquire_and_load(
                &LockKey::Doc(ron.clone(), doc("Wepp")),
                &doc("Wepp"),
                &owner,
                TTL,
                Default::default(),
            )
            .await,
        "ron",
        "Ron",
        "acquire_and_load",
    );

    // Document names that differ only by case from the document `Wepp` and
    // from the locked document `Climate`, in the run `Ron`.
    let r = run("Ron");
    for (asked, existing) in [("wepp", "Wepp"), ("WEPP", "Wepp"), ("climate", "Climate")] {
        let d = doc(asked);
        assert_refused(store.get_bytes(&r, &d).await, asked, existing, "get");
        assert_refused(
            store.put_bytes(&r, &d, Bytes::from_static(b"{}")).await,
            asked,
            existing,
            "put",
        );
        assert_refused(
            store
                .put(&r, &d, Bytes::from_static(b"{}"), PutOptions::create())
                .await,
            asked,
            existing,
            "put(Create)",
        );
        assert_refused(store.delete(&r, &d, None).await, asked, existing, "delete");
        let key = LockKey::Doc(r.clone(), d.clone());
        assert_refused(
            store.try_acquire(&key, &owner, TTL).await,
            asked,
            existing,
            "try_acquire",
        );
        assert_refused(
            store
                .acquire_and_load(&key, &d, &owner, TTL, Default::default())
                .await,
            asked,
            existing,
            "acquire_and_load",
        );
        assert_refused(store.inspect(&key).await, asked, existing, "inspect");
        assert_refused(
            store.break_lock(&key, None).await,
            asked,
            existing,
            "break_lock",
        );
    }
    assert_eq!(
        snapshot(backing),
        before,
        "refused calls wrote nothing under {}",
        backing.display()
    );

    // A save refused for its spelling still releases the lease it was made
    // under.
    let lease = store
        .try_acquire(&LockKey::Run(r.clone()), &owner, TTL)
        .await
        .expect("lock the run");
    assert_refused(
        store
            .save_and_release(
                &lease,
                &doc("wepp"),
                Bytes::from_static(b"{}"),
                PutMode::Overwrite,
            )
            .await,
        "wepp",
        "Wepp",
        "save_and_release",
    );
    assert!(
        store
            .inspect(&LockKey::Run(r.clone()))
            .await
            .expect("inspect")
            .is_none(),
        "the lease was released"
    );

    // The exact spellings keep working, and so do new names.
    let got = store
        .get_bytes(&r, &doc("Wepp"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!((&got.bytes[..], &got.version), (&b"{\"a\":1}"[..], &stored));
    store
        .put(
            &r,
            &doc("Wepp"),
            Bytes::from_static(b"{\"a\":2}"),
            PutOptions::update(stored),
        )
        .await
        .expect("update Ron/Wepp");
    store
        .put_bytes(&r, &doc("Soils"), Bytes::from_static(b"{}"))
        .await
        .expect("a new document");
    store
        .put_bytes(&run("Mica_flume1"), &doc("ron"), Bytes::from_static(b"{}"))
        .await
        .expect("a new run");
    // Two spellings of one new name in one batch are one file here: the
    // first is written, the second refused as a later save of it would be
    // (and the batch never waits for its own record).
    let mut results = store
        .put_many(
            &run("Mica_flume1"),
            vec![
                runstate_core::PutRequest::new(
                    doc("Yield"),
                    Bytes::from_static(b"1"),
                    PutMode::Create,
                ),
                runstate_core::PutRequest::new(
                    doc("yield"),
                    Bytes::from_static(b"2"),
                    PutMode::Create,
                ),
            ],
        )
        .await
        .expect("a batch");
    let second = results.pop().expect("two results");
    results[0].as_ref().expect("the first spelling");
    assert_refused(second, "yield", "Yield", "put_many");
    let climate = store
        .try_acquire(&LockKey::Doc(r.clone(), doc("Climate")), &owner, TTL)
        .await
        .expect("lock Ron/Climate again");
    store.renew(&climate, TTL).await.expect("renew");
    store.release(&climate).await.expect("release");
    let names: Vec<String> = store
        .list_all_docs(&r)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(names, ["Soils", "Wepp"]);
    let runs: Vec<String> = store
        .list_all_runs()
        .await
        .expect("runs")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(runs, ["Mica_flume1", "Ron"]);
    assert_eq!(store.delete_run(&r).await.expect("delete_run"), 2);
}

/// The decision, forced on a case-sensitive folder: every other spelling
/// is refused as it would be where case is ignored.
#[tokio::test]
async fn forced_case_insensitive_refuses_other_spellings() {
    let root = temp_root("forced");
    let store =
        FileStore::open(FileConfig::new(&root).with_case_sensitivity(CaseSensitivity::Insensitive))
            .await
            .expect("open");
    other_spellings_are_refused(&store, &root).await;
    fs::remove_dir_all(&root).expect("cleanup");
}

/// Another spelling saved while a save is under way (between its first
/// check and its rename: here, while its bytes are written) is seen by the
/// check made again under the record lock, and the save is refused.
#[tokio::test]
async fn a_spelling_made_during_a_save_is_caught_under_the_lock() {
    let root = temp_root("race");
    let twin = root.join("Ron/Wepp.json");
    let planted = Arc::new(AtomicBool::new(false));
    let hook = {
        let (twin, planted) = (twin.clone(), Arc::clone(&planted));
        move |step: SaveStep, path: &Path| {
            let ours = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".wepp.json."));
            if step == SaveStep::Write && ours && !planted.swap(true, Ordering::SeqCst) {
                fs::write(&twin, b"{\"theirs\":1}")?;
            }
            Ok(())
        }
    };
    let store = FileStore::open(
        FileConfig::new(&root)
            .with_case_sensitivity(CaseSensitivity::Insensitive)
            .with_fault_hook(Arc::new(hook)),
    )
    .await
    .expect("open");
    store
        .put_bytes(&run("Ron"), &doc("Soils"), Bytes::from_static(b"{}"))
        .await
        .expect("the run");
    assert_refused(
        store
            .put_bytes(&run("Ron"), &doc("wepp"), Bytes::from_static(b"{}"))
            .await,
        "wepp",
        "Wepp",
        "a save racing another spelling",
    );
    assert!(planted.load(Ordering::SeqCst), "the hook ran");
    assert!(!root.join("Ron/wepp.json").exists(), "nothing was saved");
    assert_eq!(fs::read(&twin).expect("theirs"), b"{\"theirs\":1}");
    let leftovers: Vec<_> = fs::read_dir(root.join("Ron"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().contains("rstmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    fs::remove_dir_all(&root).expect("cleanup");
}

/// The same from a URL option.
#[tokio::test]
async fn the_url_option_forces_it() {
    let root = temp_root("url");
    let url = format!("file://{}?case_insensitive=true", root.display());
    let store = FileStore::open(FileConfig::from_url(&url).expect("url"))
        .await
        .expect("open");
    assert!(store.ignores_case());
    fs::remove_dir_all(&root).expect("cleanup");
}

/// On a case-sensitive folder, detected or configured so, the spellings
/// are different names, as before.
#[tokio::test]
async fn a_case_sensitive_store_keeps_spellings_apart() {
    let root = temp_root("sensitive");
    let detected = FileStore::open_path(&root).await.expect("open");
    assert!(
        !detected.ignores_case(),
        "{} is case-sensitive (tmpfs or ext4 without casefolding)",
        root.display()
    );
    for setting in [CaseSensitivity::Detect, CaseSensitivity::Sensitive] {
        let store = FileStore::open(FileConfig::new(&root).with_case_sensitivity(setting))
            .await
            .expect("open");
        assert!(!store.ignores_case());
        for id in ["Ron", "ron"] {
            store
                .put_bytes(&run(id), &doc(id), Bytes::from(id.as_bytes().to_vec()))
                .await
                .expect("put");
        }
        for id in ["Ron", "ron"] {
            let got = store
                .get_bytes(&run(id), &doc(id))
                .await
                .expect("get")
                .expect("present");
            assert_eq!(&got.bytes[..], id.as_bytes());
        }
    }
    // Forced on afterwards, both existing spellings keep working; only a
    // third spelling is refused.
    let forced =
        FileStore::open(FileConfig::new(&root).with_case_sensitivity(CaseSensitivity::Insensitive))
            .await
            .expect("open");
    for id in ["Ron", "ron"] {
        let got = forced
            .get_bytes(&run(id), &doc(id))
            .await
            .expect("get")
            .expect("present");
        assert_eq!(&got.bytes[..], id.as_bytes());
    }
    let error = forced
        .get_bytes(&run("RON"), &doc("Ron"))
        .await
        .expect_err("a third spelling");
    assert_eq!(error.kind(), ErrorKind::InvalidKey);
    fs::remove_dir_all(&root).expect("cleanup");
}

// ---------------------------------------------------------------------
// A real case-insensitive file system: FUSE in a private mount namespace.
// ---------------------------------------------------------------------

const CHILD_VAR: &str = "RUNSTATE_CASEFOLD_DIR";
const PYTHON_VAR: &str = "RUNSTATE_CASEFOLD_PYTHON";
const REQUIRE_VAR: &str = "RUNSTATE_REQUIRE_FUSE";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/casefold_fs.py")
}

/// `target/services/casefold`, where `mfusepy` is installed.
fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_owned)
        .join("services/casefold")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

/// Whether `python` can load `mfusepy` (and, through it, libfuse); the
/// error output when not.
fn loads_mfusepy(python: &Path) -> Result<(), String> {
    let output = Command::new(python)
        .args(["-c", "import mfusepy"])
        .output()
        .map_err(|e| format!("could not run {}: {e}", python.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The python of a virtual environment with `mfusepy`, installed on first
/// use; `Err` says why the machine cannot stage the file system.
fn prepare() -> Result<PathBuf, String> {
    if !is_root() {
        return Err(
            "it mounts FUSE without fusermount3 in a private mount namespace, \
                    which needs root"
                .to_owned(),
        );
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".to_owned());
    }
    if !Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Err("unshare (util-linux) is missing".to_owned());
    }
    let venv = services_dir().join("venv");
    let python = venv.join("bin/python");
    if loads_mfusepy(&python).is_ok() {
        return Ok(python);
    }
    fs::create_dir_all(services_dir())
        .map_err(|e| format!("creating {}: {e}", services_dir().display()))?;
    // Two test runs sharing the target folder must not install at once.
    let lock = fs::File::create(services_dir().join("install.lock"))
        .map_err(|e| format!("creating the install lock: {e}"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("locking the install lock: {e}"))?;
    if loads_mfusepy(&python).is_ok() {
        return Ok(python);
    }
    eprintln!("installing mfusepy into {}", venv.display());
    if !python.exists() {
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map_err(|e| format!("could not run python3: {e}"))?;
        if !created.success() {
            return Err("python3 -m venv failed (is the venv module installed?)".to_owned());
        }
    }
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--retries",
            "1",
            "--timeout",
            "20",
            "mfusepy>=3.1,<4",
        ])
        .status()
        .map_err(|e| format!("could not run pip: {e}"))?;
    if !installed.success() {
        return Err("pip could not install mfusepy (offline, or PyPI unreachable?)".to_owned());
    }
    loads_mfusepy(&python)
        .map(|()| python)
        .map_err(|e| format!("mfusepy does not load (is libfuse 3 installed?): {e}"))
}

fn skip(why: &str) {
    if std::env::var_os(REQUIRE_VAR).is_some() {
        panic!(
            "{REQUIRE_VAR} is set, but the case-insensitive FUSE file system could not be staged: {why}"
        );
    }
    eprintln!(
        "\n*** SKIPPED a_real_case_insensitive_file_system_is_detected_and_guarded: {why}; \
         only the forced decision was tested ***\n"
    );
}

/// Stages a case-insensitive file system with FUSE, in a copy of this test
/// binary run in a private mount namespace (so no mount can outlive it),
/// and checks detection and refusal there.
#[test]
fn a_real_case_insensitive_file_system_is_detected_and_guarded() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return;
    }
    let python = match prepare() {
        Ok(python) => python,
        Err(why) => return skip(&why),
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "casefold-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&dir).expect("staging folder");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(&exe)
        .args(["--exact", "casefold_child", "--ignored", "--nocapture"])
        .env(CHILD_VAR, &dir)
        .env(PYTHON_VAR, &python)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let _ = fs::remove_dir_all(&dir);
    let Some(status) = status else {
        panic!("the FUSE check did not finish in 300 s:\n{stdout}\n{stderr}");
    };
    if let Some(why) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("casefold-skip: "))
    {
        return skip(why);
    }
    assert!(
        status.success() && stdout.contains("casefold-checked"),
        "the check on a case-insensitive FUSE file system failed ({status}):\n{stdout}\n{stderr}"
    );
}

/// A mounted `casefold_fs.py`, stopped (SIGTERM, by its pid: libfuse then
/// unmounts) when dropped.
struct Mounted {
    child: Child,
    mount_point: PathBuf,
}

impl Mounted {
    /// Mounts `backing` at `mount_point`; `Err` with the script's output
    /// when it does not come up (the machine cannot mount FUSE).
    fn start(
        python: &Path,
        backing: &Path,
        mount_point: &Path,
        read_only: bool,
    ) -> Result<Mounted, String> {
        fs::create_dir_all(mount_point).expect("mount point");
        let log = mount_point.with_extension("log");
        let mut command = Command::new(python);
        command.arg(script());
        if read_only {
            command.arg("--read-only");
        }
        let child = command
            .arg(backing)
            .arg(mount_point)
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", script().display()))?;
        let mut mounted = Mounted {
            child,
            mount_point: mount_point.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mounted.is_mounted() {
            if let Ok(Some(status)) = mounted.child.try_wait() {
                let log = fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "the FUSE file system exited ({status}) without mounting: {}",
                    log.trim().lines().last().unwrap_or("no output")
                ));
            }
            if Instant::now() > deadline {
                return Err("the FUSE file system did not mount within 30 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(mounted)
    }

    fn is_mounted(&self) -> bool {
        let wanted = fs::canonicalize(&self.mount_point).unwrap_or_default();
        fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
            info.lines().any(|line| {
                let mut fields = line.split(' ');
                fields.nth(4) == wanted.to_str() && line.contains(" - fuse")
            })
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run by `a_real_case_insensitive_file_system_is_detected_and_guarded`,
/// in a private mount namespace.
#[test]
#[ignore = "run by a_real_case_insensitive_file_system_is_detected_and_guarded in a mount namespace"]
fn casefold_child() {
    let (Some(dir), Some(python)) = (
        std::env::var_os(CHILD_VAR).map(PathBuf::from),
        std::env::var_os(PYTHON_VAR).map(PathBuf::from),
    ) else {
        return;
    };
    let backing = dir.join("backing");
    fs::create_dir_all(backing.join("empty")).expect("backing folder");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Writable: a new store is detected by a probe, an existing one by
    // its entries.
    let mount = dir.join("rw");
    let mounted = match Mounted::start(&python, &backing, &mount, false) {
        Ok(mounted) => mounted,
        Err(why) => {
            println!("casefold-skip: {why}");
            return;
        }
    };
    assert!(
        fs::metadata(mount.join("EMPTY")).is_ok_and(|m| m.is_dir()),
        "the mount ignores case"
    );
    runtime.block_on(async {
        let root = mount.join("store");
        let store = FileStore::open_path(&root).await.expect("open a new store");
        assert!(
            store.ignores_case(),
            "a new store on a case-insensitive file system is detected by a probe"
        );
        assert_eq!(
            fs::read_dir(&root).expect("list").count(),
            0,
            "the probe was removed"
        );
        // Without the refusals, `ron` would read and write `Ron`'s files.
        other_spellings_are_refused(&store, &backing.join("store")).await;
        store
            .put_bytes(&run("Ron"), &doc("Wepp"), Bytes::from_static(b"{}"))
            .await
            .expect("put");
        let reopened = FileStore::open_path(&root).await.expect("reopen");
        assert!(
            reopened.ignores_case(),
            "an existing store is detected by its entries"
        );
        let forced = FileStore::open(
            FileConfig::new(&root).with_case_sensitivity(CaseSensitivity::Sensitive),
        )
        .await
        .expect("open");
        assert!(!forced.ignores_case(), "the setting overrides detection");
    });
    drop(mounted);

    // Read-only (a share mounted `ro`, a WEPPcloud folder opened with
    // create=false): detected by an existing entry, without writing; an
    // empty folder cannot be told and is taken to be case-sensitive.
    let mount = dir.join("ro");
    let mounted = Mounted::start(&python, &backing, &mount, true).expect("read-only mount");
    runtime.block_on(async {
        let config = |root: PathBuf| {
            FileConfig::new(root)
                .with_create_root(false)
                .with_sweep_on_open(false)
        };
        let store = FileStore::open(config(mount.join("store")))
            .await
            .expect("open read-only");
        assert!(store.ignores_case(), "detected by an existing entry");
        assert_refused(
            store.get_bytes(&run("RON"), &doc("Wepp")).await,
            "RON",
            "Ron",
            "get on a read-only store",
        );
        let got = store
            .get_bytes(&run("Ron"), &doc("Wepp"))
            .await
            .expect("get")
            .expect("present");
        assert_eq!(&got.bytes[..], b"{}");
        let empty = FileStore::open(config(mount.join("empty")))
            .await
            .expect("open an empty read-only root");
        assert!(
            !empty.ignores_case(),
            "an empty root that cannot be written is taken to be case-sensitive"
        );
    });
    drop(mounted);
    println!("casefold-checked");
}
