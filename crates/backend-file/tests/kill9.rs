//! kill -9 torture: a child process saves 64 KiB–1 MiB documents under
//! leases, and in batches of all of them (`put_many`, one folder `fsync`
//! per batch), in a loop and is killed with SIGKILL at random instants, 200
//! times. Afterwards every document is one complete version that was
//! written, no lease stays stuck, and no temporary file survives the next
//! open.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockExt, LockKey, Owner, PutOptions, RunId, Store, StoreExt,
    WaitPolicy,
};
use runstate_file::{FileConfig, FileStore};

const ROOT_VAR: &str = "RUNSTATE_KILL9_ROOT";
const SEED_VAR: &str = "RUNSTATE_KILL9_SEED";
const KILLS: u64 = 200;
const DOCS: [&str; 3] = ["climate", "watershed", "wepp"];
const TTL: Duration = Duration::from_secs(5);
const MARK: &[u8] = b"runstate-kill9 ";

fn run_id() -> RunId {
    RunId::new("torture").expect("valid")
}

/// The bytes of write `seq` of child `seed`: a header naming them, then a
/// 64 KiB block of noise derived from both, repeated with each copy stamped
/// with its index, `len` bytes in all. Cheap to make, so the writer spends
/// its time saving.
fn content(seed: u64, seq: u64, len: usize) -> Vec<u8> {
    const BLOCK: usize = 64 * 1024;
    let mut bytes = format!("runstate-kill9 {seed} {seq} {len}\n").into_bytes();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003) ^ seq);
    let mut block = vec![0u8; BLOCK];
    rng.fill(&mut block);
    let mut index = 0u64;
    while bytes.len() < len {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let take = (len - bytes.len()).min(BLOCK);
        bytes.extend_from_slice(&block[..take]);
        index += 1;
    }
    bytes
}

/// Checks that `bytes` is exactly one version some child wrote.
fn assert_complete(doc: &str, bytes: &[u8]) {
    assert!(
        bytes.starts_with(MARK),
        "{doc}: not a version that was written (len {})",
        bytes.len()
    );
    let header_end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .expect("a header line");
    let header = std::str::from_utf8(&bytes[MARK.len()..header_end]).expect("utf8 header");
    let fields: Vec<u64> = header
        .split(' ')
        .map(|f| f.parse().expect("number"))
        .collect();
    let (seed, seq, len) = (fields[0], fields[1], fields[2] as usize);
    assert_eq!(bytes.len(), len, "{doc}: torn (seed {seed}, seq {seq})");
    assert!(
        bytes == content(seed, seq, len).as_slice(),
        "{doc}: bytes differ from what was written"
    );
}

#[test]
#[ignore = "child process of kill_nine_torture"]
fn kill9_child_writer() {
    let (Ok(root), Ok(seed)) = (std::env::var(ROOT_VAR), std::env::var(SEED_VAR)) else {
        return;
    };
    let seed: u64 = seed.parse().expect("seed");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = FileStore::open(FileConfig::new(root)).await.expect("open");
        let owner = Owner::for_this_process();
        let mut rng = fastrand::Rng::with_seed(seed);
        let run = run_id();
        // Tells the parent the writing loop starts, so its kill lands in it.
        println!("writing");
        for seq in 0.. {
            if seq % 3 == 2 {
                // A batch of every document: one group, one folder sync.
                let puts = DOCS
                    .iter()
                    .map(|name| {
                        let len = rng.usize(64 * 1024..=1024 * 1024);
                        runstate_core::PutRequest::new(
                            DocName::new(*name).expect("valid"),
                            Bytes::from(content(seed, seq, len)),
                            runstate_core::PutMode::Overwrite,
                        )
                    })
                    .collect();
                for result in store.put_many(&run, puts).await.expect("a batch") {
                    result.expect("a batched write");
                }
                continue;
            }
            let name = DOCS[rng.usize(..DOCS.len())];
            let doc = DocName::new(name).expect("valid");
            let len = rng.usize(64 * 1024..=1024 * 1024);
            let bytes = Bytes::from(content(seed, seq, len));
            let key = LockKey::Doc(run.clone(), doc.clone());
            let lease = store
                .acquire(
                    &key,
                    &owner,
                    TTL,
                    &WaitPolicy::with_timeout(Duration::from_secs(30)),
                )
                .await
                .expect("acquire");
            if seq % 2 == 0 {
                store
                    .save_and_release(&lease, &doc, bytes, runstate_core::PutMode::Overwrite)
                    .await
                    .expect("save and release");
            } else {
                let current = store.get_bytes(&run, &doc).await.expect("get");
                let options = match current {
                    Some(stored) => PutOptions::update(stored.version),
                    None => PutOptions::create(),
                };
                store
                    .put(&run, &doc, bytes, options.with_lease(&lease))
                    .await
                    .expect("put");
                store.release(&lease).await.expect("release");
            }
        }
    });
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.contains(".rstmp.") || n.contains(".rsold."))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kill_nine_torture() {
    let root = std::env::temp_dir().join(format!(
        "runstate-kill9-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&root).expect("root");
    let exe = std::env::current_exe().expect("test binary");
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut killed_mid_save = 0;
    for seed in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "kill9_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ROOT_VAR, &root)
            .env(SEED_VAR, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the writer");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        while !line.contains("writing") {
            line.clear();
            if stdout
                .read_line(&mut line)
                .expect("read the child's stdout")
                == 0
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.u64(0..60_000)));
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut stderr));
            panic!("writer {seed} exited by itself ({status}) before the kill:\n{stderr}");
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let dir = root.join("torture");
        if !temp_files(&dir).is_empty() {
            killed_mid_save += 1;
        }
    }
    eprintln!("{KILLS} writers killed, {killed_mid_save} of them in the middle of a save");
    assert!(
        killed_mid_save > 0,
        "no kill landed in the middle of a save; the test proves nothing"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store: Arc<dyn Lock> = Arc::new(
            FileStore::open(FileConfig::new(&root))
                .await
                .expect("reopen"),
        );
        let dir = root.join("torture");
        assert_eq!(
            temp_files(&dir),
            Vec::<PathBuf>::new(),
            "temporary files left after the next open"
        );

        let run = run_id();
        let docs = store.list_all_docs(&run).await.expect("list");
        assert!(!docs.is_empty(), "the writers saved nothing");
        for meta in &docs {
            let stored = store
                .get_bytes(&run, &meta.name)
                .await
                .expect("get")
                .expect("present");
            assert_complete(meta.name.as_str(), &stored.bytes);
        }

        for name in DOCS {
            let key = LockKey::Doc(run.clone(), DocName::new(name).expect("valid"));
            let start = Instant::now();
            let lease = store
                .acquire(
                    &key,
                    &Owner::for_this_process(),
                    TTL,
                    &WaitPolicy::with_timeout(TTL + Duration::from_secs(2)),
                )
                .await
                .unwrap_or_else(|e| panic!("lease on {name} stuck past its TTL: {e}"));
            // The last writer died holding it at most: on this host that is
            // detected at once, without waiting for the TTL.
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{name}: waited {:?}",
                start.elapsed()
            );
            store.release(&lease).await.expect("release");
            let error = store
                .try_acquire(&key, &Owner::for_this_process(), TTL)
                .await
                .map(|_| ());
            assert!(error.is_ok() || error.is_err_and(|e| e.kind() == ErrorKind::Locked));
        }
    });
    std::fs::remove_dir_all(&root).expect("cleanup");
}
