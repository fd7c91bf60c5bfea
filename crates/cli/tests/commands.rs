//! The `runstate` commands, driven through the real binary: documents,
//! locks, doctor on every backend, migrate and verify, errors and exit
//! codes, and the memory bound of a migration.

#[path = "../../runstate/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use runstate::{DocName, LockKey, Owner, RunId};
use serde_json::Value;
use support::{ALL, Places};

const BIN: &str = env!("CARGO_BIN_EXE_runstate");

/// Runs the binary with `args`, `RUNSTATE_URL` set to `url` (if any) and
/// `stdin` on standard input.
fn runstate(url: Option<&str>, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("RUNSTATE_URL");
    if let Some(url) = url {
        command.env("RUNSTATE_URL", url);
    }
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the binary");
    if let Some(bytes) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(bytes)
            .expect("write stdin");
    }
    child.wait_with_output().expect("run the binary")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, and that a failure printed one error line, at
/// most one hint line, and no panic or backtrace.
fn expect(output: &Output, expected: i32) {
    let err = stderr(output);
    assert_eq!(
        code(output),
        expected,
        "exit code\nstdout:\n{}\nstderr:\n{err}",
        stdout(output)
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    if expected != 0 {
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines
                .first()
                .is_some_and(|l| l.starts_with("runstate: error: ")),
            "{err}"
        );
        assert!(lines.len() <= 2, "one error line and a hint: {err}");
        if let Some(hint) = lines.get(1) {
            assert!(hint.starts_with("hint: "), "{err}");
        }
    }
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}):\n{}", stdout(output));
    })
}

fn temp_root(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "runstate-cli-{name}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

fn file_url(root: &Path) -> String {
    format!("file://{}", root.display())
}

#[test]
fn help_reads_well() {
    let output = runstate(None, &["--help"], None);
    expect(&output, 0);
    let help = stdout(&output);
    for command in [
        "ls", "cat", "put", "rm", "locks", "unlock", "migrate", "verify", "doctor", "demo",
    ] {
        assert!(
            help.contains(&format!("  {command} ")),
            "{command} in:\n{help}"
        );
    }
    assert!(
        help.contains("Exit codes:") && help.contains("RUNSTATE_URL"),
        "{help}"
    );
    assert!(
        !help.contains("demo-worker"),
        "internal commands stay hidden"
    );
    for command in [
        "ls", "cat", "put", "rm", "locks", "unlock", "migrate", "verify", "doctor", "demo",
    ] {
        let output = runstate(None, &[command, "--help"], None);
        expect(&output, 0);
        assert!(stdout(&output).contains("Usage: runstate"), "{command}");
    }
    // The URL from the environment is never shown (it may hold a password).
    let output = runstate(
        Some("postgres://app:hunter2@db/runs"),
        &["ls", "--help"],
        None,
    );
    assert!(!stdout(&output).contains("hunter2"));
}

#[test]
fn documents_round_trip() {
    let root = temp_root("docs");
    let url = file_url(&root);
    let url = Some(url.as_str());

    let put = runstate(url, &["put", "Mica_flume1", "ron", "-"], Some(b"{\"a\":1}"));
    expect(&put, 0);
    assert!(
        stdout(&put).starts_with("saved Mica_flume1/ron"),
        "{}",
        stdout(&put)
    );
    let file = root.with_extension("input");
    std::fs::write(&file, b"\x00\x01binary\xff").expect("write input");
    let put = runstate(
        url,
        &[
            "--json",
            "put",
            "Mica_flume1",
            "climate",
            file.to_str().expect("utf8"),
        ],
        None,
    );
    expect(&put, 0);
    let saved = json(&put);
    assert_eq!(saved["size"], 9);
    let climate_version = saved["version"].as_str().expect("version").to_owned();

    let ls = runstate(url, &["ls"], None);
    expect(&ls, 0);
    assert_eq!(stdout(&ls), "Mica_flume1\n");
    let ls = runstate(url, &["ls", "Mica_flume1"], None);
    expect(&ls, 0);
    let text = stdout(&ls);
    assert!(
        text.starts_with("NAME") && text.contains("climate") && text.contains("9 B"),
        "{text}"
    );
    let listed = json(&runstate(url, &["ls", "Mica_flume1", "--json"], None));
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    assert_eq!(listed[0]["name"], "climate");
    assert_eq!(listed[0]["version"], climate_version.as_str());

    let cat = runstate(url, &["cat", "Mica_flume1", "climate"], None);
    expect(&cat, 0);
    assert_eq!(cat.stdout, b"\x00\x01binary\xff");

    let again = runstate(url, &["put", "Mica_flume1", "ron", "--create"], Some(b"{}"));
    expect(&again, 4);
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let stale = runstate(
        url,
        &["put", "Mica_flume1", "climate", "--if-version", "0000"],
        Some(b"{}"),
    );
    expect(&stale, 4);
    let current = runstate(
        url,
        &[
            "put",
            "Mica_flume1",
            "climate",
            "--if-version",
            &climate_version,
        ],
        Some(b"{\"b\":2}"),
    );
    expect(&current, 0);

    let missing = runstate(url, &["cat", "Mica_flume1", "ron.nodb"], None);
    expect(&missing, 3);
    assert!(
        stderr(&missing).contains("try `ron`"),
        "{}",
        stderr(&missing)
    );
    expect(&runstate(url, &["ls", "No_such_run"], None), 3);
    let bad = runstate(url, &["cat", "../etc", "passwd"], None);
    expect(&bad, 2);
    assert!(stderr(&bad).contains("position 2"), "{}", stderr(&bad));

    expect(&runstate(url, &["rm", "Mica_flume1", "ron"], None), 0);
    expect(&runstate(url, &["rm", "Mica_flume1", "ron"], None), 3);
    let rm = runstate(url, &["rm", "Mica_flume1"], None);
    expect(&rm, 0);
    assert!(stdout(&rm).contains("1 document"), "{}", stdout(&rm));
    assert_eq!(stdout(&runstate(url, &["ls"], None)), "");

    let oversize = runstate(
        Some(&format!("{}?max_doc_bytes=4", file_url(&root))),
        &["put", "Mica_flume1", "big"],
        Some(b"12345"),
    );
    expect(&oversize, 2);
    assert!(
        stderr(&oversize).contains("max_doc_bytes"),
        "{}",
        stderr(&oversize)
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn locks_are_listed_and_broken_only_with_force() {
    let root = temp_root("locks");
    let base = file_url(&root);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt.block_on(runstate::open(&base)).expect("open");
    let key = LockKey::Doc(
        RunId::new("Test_Watershed_15").expect("id"),
        DocName::new("watershed").expect("name"),
    );
    let holder = Owner::new("worker-7.example", 4242, "holder-id").expect("owner");
    let lease = rt
        .block_on(store.try_acquire(&key, &holder, Duration::from_secs(60)))
        .expect("hold the lock");
    let url = Some(base.as_str());

    let locks = runstate(url, &["locks"], None);
    expect(&locks, 0);
    let text = stdout(&locks);
    assert!(
        text.contains("Test_Watershed_15/watershed")
            && text.contains("worker-7.example")
            && text.contains("4242"),
        "{text}"
    );
    let listed = json(&runstate(
        url,
        &["locks", "Test_Watershed_15", "--json"],
        None,
    ));
    assert_eq!(listed[0]["host"], "worker-7.example");
    assert_eq!(listed[0]["pid"], 4242);
    assert_eq!(listed[0]["fence"], lease.fence().get());
    assert!(
        listed[0]["expires_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 50_000)
    );

    let blocked = runstate(
        Some(&format!("{base}?wait_ms=0")),
        &["put", "Test_Watershed_15", "watershed"],
        Some(b"{}"),
    );
    expect(&blocked, 4);
    let err = stderr(&blocked);
    assert!(
        err.contains("worker-7.example")
            && err.contains("runstate unlock Test_Watershed_15 watershed --force"),
        "{err}"
    );

    let refused = runstate(url, &["unlock", "Test_Watershed_15", "watershed"], None);
    expect(&refused, 2);
    assert!(stderr(&refused).contains("--force") && stderr(&refused).contains("worker-7.example"));
    let broken = runstate(
        url,
        &["unlock", "Test_Watershed_15", "watershed", "--force"],
        None,
    );
    expect(&broken, 0);
    let log = stderr(&broken);
    assert!(
        log.contains("broke the lock on Test_Watershed_15/watershed at "),
        "{log}"
    );
    assert!(log.contains("held by worker-7.example"), "{log}");
    assert_eq!(
        json(&runstate(url, &["locks", "--json"], None)),
        serde_json::json!([])
    );
    expect(
        &runstate(
            url,
            &["unlock", "Test_Watershed_15", "watershed", "--force"],
            None,
        ),
        3,
    );
    // The old holder's save is fenced out.
    let fenced = rt.block_on(store.put(
        key.run(),
        &DocName::new("watershed").expect("name"),
        runstate::Bytes::from_static(b"{}"),
        runstate::PutOptions::overwrite().with_lease(&lease),
    ));
    assert_eq!(
        fenced.expect_err("fenced").kind(),
        runstate::ErrorKind::Fenced
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_input_gets_one_line_and_an_exit_code() {
    let no_url = runstate(None, &["ls"], None);
    expect(&no_url, 2);
    assert!(
        stderr(&no_url).contains("RUNSTATE_URL"),
        "{}",
        stderr(&no_url)
    );

    let unknown = runstate(Some("ftp://host/x"), &["ls"], None);
    expect(&unknown, 2);
    for scheme in ["file:", "sqlite:", "postgres:", "mysql:", "redis:", "s3:"] {
        assert!(stderr(&unknown).contains(scheme), "{}", stderr(&unknown));
    }
    let missing = temp_root("missing");
    for url in [
        file_url(&missing),
        format!("sqlite://{}.db", missing.display()),
    ] {
        let ls = runstate(Some(&url), &["ls"], None);
        expect(&ls, 2);
        assert!(
            !missing.exists() && !missing.with_extension("db").exists(),
            "{url} created"
        );
    }

    let option = runstate(Some("file:///tmp/x?colour=red"), &["ls"], None);
    expect(&option, 2);
    assert!(stderr(&option).contains("colour"), "{}", stderr(&option));

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let redis = runstate(
        Some(&format!("redis://:hunter2@127.0.0.1:{port}/0")),
        &["ls"],
        None,
    );
    expect(&redis, 1);
    assert!(
        stderr(&redis).contains("running and reachable"),
        "{}",
        stderr(&redis)
    );
    assert!(!stderr(&redis).contains("hunter2"), "{}", stderr(&redis));
    let postgres = runstate(
        Some(&format!(
            "postgres://app:hunter2@127.0.0.1:{port}/db?acquire_timeout_ms=300"
        )),
        &["ls"],
        None,
    );
    expect(&postgres, 1);
    assert!(
        !stderr(&postgres).contains("hunter2"),
        "{}",
        stderr(&postgres)
    );
    assert!(
        stderr(&postgres).contains("app:***@"),
        "{}",
        stderr(&postgres)
    );

    let usage = runstate(None, &["migrate", "--to", "file:///tmp/x"], None);
    assert_eq!(code(&usage), 2, "clap usage errors exit 2");
}

#[test]
fn doctor_passes_on_every_backend() {
    for backend in ALL {
        let Some(place) = backend.place("doctor_passes_on_every_backend") else {
            continue;
        };
        let report = runstate(None, &["doctor", &place.url, "--json"], None);
        let text = runstate(Some(&place.url), &["doctor"], None);
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(place.cleanup());
        expect(&report, 0);
        let report = json(&report);
        assert_eq!(report["healthy"], true, "{backend:?}: {report:#}");
        let checks = report["checks"].as_array().expect("checks");
        assert!(checks.len() >= 10, "{backend:?}: {report:#}");
        assert!(
            checks.iter().all(|c| c["passed"] == true),
            "{backend:?}: {report:#}"
        );
        expect(&text, 0);
        let text = stdout(&text);
        assert!(
            text.contains("CAPABILITY") && text.contains("fencing"),
            "{text}"
        );
        assert!(
            text.contains(&format!("backend             {}", backend.name())),
            "{text}"
        );
    }
}

#[test]
fn migrate_and_verify_between_stores() {
    let (from_root, to_db) = (
        temp_root("mig-from"),
        temp_root("mig-to").with_extension("db"),
    );
    let from = format!("{}?ext=nodb", file_url(&from_root));
    let to = format!("sqlite://{}", to_db.display());
    for (run, docs) in [("A_run", 3), ("B_run", 2)] {
        for i in 0..docs {
            let body = format!("{{\"doc\": {i}}}");
            expect(
                &runstate(
                    Some(&from),
                    &["put", run, &format!("doc{i}")],
                    Some(body.as_bytes()),
                ),
                0,
            );
        }
    }

    let dry = runstate(
        Some(&from),
        &["migrate", "--to", &to, "--all", "--dry-run", "--json"],
        None,
    );
    expect(&dry, 0);
    assert_eq!(json(&dry)["dry_run"], true);
    assert_eq!(json(&dry)["documents"], 5);
    assert!(
        !to_db.exists(),
        "a dry run creates nothing, not even the target"
    );
    expect(&runstate(Some(&to), &["ls"], None), 2);
    assert!(!to_db.exists(), "reading commands create nothing");
    // Only a target that does not exist yet is planned into; a target URL
    // that is wrong is an error, dry run or not.
    for bad in ["ftp://example.invalid/x", "file:///tmp/x?no_such_option=1"] {
        expect(
            &runstate(
                Some(&from),
                &["migrate", "--to", bad, "--all", "--dry-run"],
                None,
            ),
            2,
        );
    }

    let report = runstate(
        None,
        &[
            "migrate", "--from", &from, "--to", &to, "--run", "A_run", "--json",
        ],
        None,
    );
    expect(&report, 0);
    assert!(
        stderr(&report).is_empty(),
        "no progress bar off a terminal: {}",
        stderr(&report)
    );
    let report = json(&report);
    assert_eq!(report["documents"], 3);
    assert_eq!(report["verified"], 3);
    assert!(report["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(
        report["documents_per_sec"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
    assert_eq!(stdout(&runstate(Some(&to), &["ls"], None)), "A_run\n");

    let text = runstate(
        None,
        &["migrate", "--from", &from, "--to", &to, "--all"],
        None,
    );
    expect(&text, 0);
    let out = stdout(&text);
    assert!(
        out.contains("RUN") && out.contains("B_run") && out.contains("verified by SHA-256"),
        "{out}"
    );

    let same = runstate(None, &["verify", "--from", &from, "--to", &to], None);
    expect(&same, 0);
    assert!(
        stdout(&same).contains("compared 2 run(s), 5 document(s)"),
        "{}",
        stdout(&same)
    );

    expect(
        &runstate(
            Some(&to),
            &["put", "B_run", "doc1"],
            Some(b"{\"changed\": true}"),
        ),
        0,
    );
    let differs = runstate(
        None,
        &["verify", "--from", &from, "--to", &to, "--json"],
        None,
    );
    assert_eq!(code(&differs), 5);
    let differences = json(&differs)["differences"].clone();
    assert_eq!(differences[0]["kind"], "differs");
    assert_eq!(differences[0]["doc"], "doc1");

    let refused = runstate(
        None,
        &["migrate", "--from", &from, "--to", &to, "--run", "B_run"],
        None,
    );
    expect(&refused, 4);
    assert!(
        stderr(&refused).contains("--overwrite"),
        "{}",
        stderr(&refused)
    );
    expect(
        &runstate(
            None,
            &[
                "migrate",
                "--from",
                &from,
                "--to",
                &to,
                "--run",
                "B_run",
                "--overwrite",
            ],
            None,
        ),
        0,
    );
    expect(
        &runstate(None, &["verify", "--from", &from, "--to", &to], None),
        0,
    );

    let moved = runstate(
        None,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &to,
            "--run",
            "A_run",
            "--delete-source",
            "--json",
        ],
        None,
    );
    expect(&moved, 0);
    assert_eq!(json(&moved)["runs"][0]["source_deleted"], true);
    assert_eq!(stdout(&runstate(Some(&from), &["ls"], None)), "B_run\n");
    expect(
        &runstate(
            None,
            &["migrate", "--from", &from, "--to", &from, "--all"],
            None,
        ),
        2,
    );

    let _ = std::fs::remove_dir_all(&from_root);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", to_db.display()));
    }
}

/// Peak resident memory of a migration of large documents stays within
/// 64 MiB + 2 × the largest document: it streams one document at a time
/// once documents outgrow the in-flight budget. Measured by the binary
/// itself (`VmHWM` of /proc/self/status), as reported in `--json`.
#[test]
fn migration_memory_is_bounded_by_the_largest_document() {
    const LARGEST: u64 = 24 * 1024 * 1024;
    let (from_root, to_root) = (temp_root("mem-from"), temp_root("mem-to"));
    let run = from_root.join("Big_run");
    std::fs::create_dir_all(&run).expect("create the run folder");
    let mut rng = fastrand::Rng::with_seed(11);
    for i in 0..6u64 {
        let size = LARGEST - i * 1024 * 1024;
        let bytes: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
        std::fs::write(run.join(format!("doc{i}.json")), bytes).expect("write a document");
    }
    let report = runstate(
        None,
        &[
            "migrate",
            "--from",
            &file_url(&from_root),
            "--to",
            &file_url(&to_root),
            "--all",
            "--json",
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(&from_root);
    let _ = std::fs::remove_dir_all(&to_root);
    expect(&report, 0);
    let report = json(&report);
    assert_eq!(report["documents"], 6);
    let peak = report["peak_rss_bytes"]
        .as_u64()
        .expect("measured on Linux");
    let bound = 64 * 1024 * 1024 + 2 * LARGEST;
    eprintln!(
        "peak resident memory {} MiB (bound {} MiB)",
        peak >> 20,
        bound >> 20
    );
    assert!(peak <= bound, "peak {peak} > bound {bound}");
}
