//! The `runstate` commands, driven through the real binary: documents,
//! locks, doctor on every backend, migrate and verify, errors and exit
//! codes, one way to name stores and runs, JSON everywhere, completions
//! and manual pages, colour, and the memory bound of a migration.

#[path = "../../runstate/tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use common::*;
use runstate::{DocName, LockKey, Owner, RunId};
use support::{ALL, Places};

/// Every command `runstate --help` lists.
const COMMANDS: [&str; 20] = [
    "ls",
    "cat",
    "stat",
    "put",
    "rm",
    "locks",
    "unlock",
    "watch",
    "status",
    "publish",
    "mark",
    "attr",
    "migrate",
    "verify",
    "doctor",
    "health",
    "init",
    "demo",
    "completions",
    "man",
];

#[test]
fn help_reads_well() {
    let output = runstate(None, &["--help"], None);
    expect(&output, 0);
    let help = stdout(&output);
    for command in COMMANDS {
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
    for command in COMMANDS {
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
    let rm = runstate(url, &["rm", "Mica_flume1", "--all"], None);
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

    // clap's refusals read like every other error: one line and a hint.
    let usage = runstate(None, &["migrate", "--to", "file:///tmp/x"], None);
    expect(&usage, 2);
    assert!(stderr(&usage).contains("--from"), "{}", stderr(&usage));
    let typo = runstate(None, &["lss"], None);
    expect(&typo, 2);
    assert!(stderr(&typo).contains("hint: "), "{}", stderr(&typo));
}

#[test]
fn doctor_passes_on_every_backend() {
    for backend in ALL {
        let Some(place) = backend.place("doctor_passes_on_every_backend") else {
            continue;
        };
        // Doctor probes existing stores only: `init` makes this one.
        let init = runstate(None, &["init", "--url", &place.url, "--json"], None);
        let report = runstate(None, &["doctor", "--url", &place.url, "--json"], None);
        let text = runstate(Some(&place.url), &["doctor"], None);
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(place.cleanup());
        expect(&init, 0);
        assert_eq!(json(&init)["backend"], backend.name());
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
        None,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &to,
            "--all",
            "--dry-run",
            "--json",
        ],
        None,
    );
    expect(&dry, 0);
    assert_eq!(json(&dry)["dry_run"], true);
    assert_eq!(json(&dry)["documents"], 5);
    // A run named twice is planned once, as the migration copies it once
    // (the plan into a target that does not exist yet listed it twice).
    let twice = runstate(
        None,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &to,
            "--run",
            "A_run",
            "--run",
            "A_run",
            "--dry-run",
            "--json",
        ],
        None,
    );
    expect(&twice, 0);
    let twice = json(&twice);
    assert_eq!(twice["runs"].as_array().map(Vec::len), Some(1), "{twice:#}");
    assert_eq!(twice["documents"], 3, "{twice:#}");
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
                None,
                &[
                    "migrate",
                    "--from",
                    &from,
                    "--to",
                    bad,
                    "--all",
                    "--dry-run",
                ],
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

    let same = runstate(
        None,
        &["verify", "--from", &from, "--to", &to, "--all"],
        None,
    );
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
        &["verify", "--from", &from, "--to", &to, "--all", "--json"],
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
        &runstate(
            None,
            &["verify", "--from", &from, "--to", &to, "--all"],
            None,
        ),
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

/// Copies into S3 proven by the MD5 the server computed are not said to
/// be verified by SHA-256: the summary counts the two ways apart, as the
/// JSON report does. Before, every copy was "verified by SHA-256".
#[test]
fn copies_proven_by_md5_are_said_to_be() {
    let Some(place) = support::Backend::S3.place("copies_proven_by_md5_are_said_to_be") else {
        return;
    };
    let from_root = temp_root("mig-md5");
    let from = file_url(&from_root);
    for i in 0..3 {
        let body = format!("{{\"doc\": {i}}}");
        expect(
            &runstate(
                Some(&from),
                &["put", "A_run", &format!("doc{i}")],
                Some(body.as_bytes()),
            ),
            0,
        );
    }
    let text = runstate(
        None,
        &["migrate", "--from", &from, "--to", &place.url, "--all"],
        None,
    );
    let report = runstate(
        None,
        &[
            "verify", "--from", &from, "--to", &place.url, "--all", "--json",
        ],
        None,
    );
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(place.cleanup());
    let _ = std::fs::remove_dir_all(&from_root);
    expect(&text, 0);
    let out = stdout(&text);
    assert!(
        out.contains("3 verified (0 by SHA-256, 3 by the target's MD5)"),
        "{out}"
    );
    assert!(!out.contains("verified by SHA-256"), "{out}");
    expect(&report, 0);
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
    // Two copies of the largest document in flight (read, and read back to
    // verify), plus one freed buffer of that size glibc may keep: after a
    // large mmap'd block is freed its dynamic mmap threshold rises, so the
    // next ones come from the heap and are not returned at once (measured
    // 112.7 MiB once against a bound of 64 MiB + 2 × largest).
    let bound = 64 * 1024 * 1024 + 3 * LARGEST;
    eprintln!(
        "peak resident memory {} MiB (bound {} MiB)",
        peak >> 20,
        bound >> 20
    );
    assert!(peak <= bound, "peak {peak} > bound {bound}");
}

/// `rm RUN` used to delete the whole run with no confirmation: now it
/// needs `--all` (or `--yes`), says how many documents would go, and
/// deletes nothing without it.
#[test]
fn rm_of_a_whole_run_needs_all_and_says_how_many() {
    let root = temp_root("rm-all");
    let url = file_url(&root);
    let url = Some(url.as_str());
    for doc in ["ron", "climate", "wepp"] {
        expect(&runstate(url, &["put", "Run_A", doc], Some(b"{}")), 0);
    }
    let refused = runstate(url, &["rm", "Run_A"], None);
    expect(&refused, 2);
    let err = stderr(&refused);
    assert!(
        err.contains("3 document(s)") && err.contains("--all"),
        "{err}"
    );
    assert_eq!(
        json(&runstate(url, &["ls", "Run_A", "--json"], None))
            .as_array()
            .map(Vec::len),
        Some(3),
        "nothing deleted"
    );
    // A run that does not exist is "not found", --all or not.
    expect(&runstate(url, &["rm", "No_such_run"], None), 3);
    expect(&runstate(url, &["rm", "No_such_run", "--all"], None), 3);
    // --all with a document is a contradiction.
    expect(&runstate(url, &["rm", "Run_A", "ron", "--all"], None), 2);

    let one = runstate(url, &["rm", "Run_A", "wepp", "--json"], None);
    expect(&one, 0);
    assert_eq!(
        json(&one),
        serde_json::json!({"run": "Run_A", "doc": "wepp", "deleted": 1})
    );
    let all = runstate(url, &["rm", "Run_A", "--yes", "--json"], None);
    expect(&all, 0);
    assert_eq!(
        json(&all),
        serde_json::json!({"run": "Run_A", "deleted": 2})
    );
    assert_eq!(stdout(&runstate(url, &["ls"], None)), "");
    let _ = std::fs::remove_dir_all(&root);
}

/// `doctor` on a URL with a typo used to create the store and write into
/// it. Now it opens existing stores only, says how to create one, and
/// writes only into its scratch run, whose documents it removes.
#[test]
fn doctor_opens_existing_stores_only_and_writes_only_its_scratch_run() {
    let typo = temp_root("doctor-typo");
    for url in [file_url(&typo), format!("sqlite://{}.db", typo.display())] {
        let refused = runstate(None, &["doctor", "--url", &url], None);
        expect(&refused, 2);
        assert!(
            stderr(&refused).contains("runstate init --url"),
            "{}",
            stderr(&refused)
        );
        assert!(
            !typo.exists() && !typo.with_extension("db").exists(),
            "{url} created"
        );
    }
    // The store is named like everywhere else; a positional URL says so.
    let positional = runstate(None, &["doctor", &file_url(&typo)], None);
    expect(&positional, 2);
    assert!(
        stderr(&positional).contains("doctor --url"),
        "{}",
        stderr(&positional)
    );
    assert!(!typo.exists());

    let root = temp_root("doctor-existing");
    let url = file_url(&root);
    expect(
        &runstate(Some(&url), &["put", "Real_run", "ron"], Some(b"{\"a\":1}")),
        0,
    );
    let before = tree(&root);
    let real_run = std::fs::read(root.join("Real_run").join("ron.json")).expect("read");
    let doctor = runstate(Some(&url), &["doctor", "--json"], None);
    expect(&doctor, 0);
    assert_eq!(json(&doctor)["healthy"], true);
    // Nothing outside the scratch run changed; the scratch run keeps only
    // its lease bookkeeping, and no documents.
    let after: Vec<String> = tree(&root)
        .into_iter()
        .filter(|p| !p.starts_with("runstate-doctor"))
        .collect();
    assert_eq!(after, before);
    assert_eq!(
        std::fs::read(root.join("Real_run").join("ron.json")).expect("read"),
        real_run
    );
    assert_eq!(stdout(&runstate(Some(&url), &["ls"], None)), "Real_run\n");
    expect(&runstate(Some(&url), &["ls", "runstate-doctor"], None), 3);
    let _ = std::fs::remove_dir_all(&root);
}

/// One way to name stores and runs: `--url`/`RUNSTATE_URL` for one store,
/// `--from`/`--to` for two (never `--url`), `--run ID…` or `--all` for
/// `migrate` and `verify` (never an implicit all); the demo never touches
/// the store of `--url`.
#[test]
fn stores_and_runs_are_named_one_way() {
    let (a, b) = (temp_root("name-a"), temp_root("name-b"));
    let (url_a, url_b) = (file_url(&a), file_url(&b));
    expect(
        &runstate(Some(&url_a), &["put", "Run_A", "ron"], Some(b"{}")),
        0,
    );
    expect(
        &runstate(Some(&url_b), &["put", "Run_A", "ron"], Some(b"{}")),
        0,
    );

    // verify used to compare every run when none was named.
    let implicit = runstate(None, &["verify", "--from", &url_a, "--to", &url_b], None);
    expect(&implicit, 2);
    assert!(stderr(&implicit).contains("--run"), "{}", stderr(&implicit));
    let implicit = runstate(None, &["migrate", "--from", &url_a, "--to", &url_b], None);
    assert_eq!(code(&implicit), 2, "{}", stderr(&implicit));
    let both = runstate(
        None,
        &[
            "verify", "--from", &url_a, "--to", &url_b, "--all", "--run", "Run_A",
        ],
        None,
    );
    assert_eq!(code(&both), 2);
    expect(
        &runstate(
            None,
            &["verify", "--from", &url_a, "--to", &url_b, "--run", "Run_A"],
            None,
        ),
        0,
    );
    // Two stores are named with --from and --to: --url is refused, and
    // RUNSTATE_URL is not taken for the source.
    let typed = runstate(
        None,
        &["--url", &url_a, "verify", "--to", &url_b, "--all"],
        None,
    );
    assert_eq!(code(&typed), 2, "{}", stderr(&typed));
    let typed = runstate(
        None,
        &[
            "--url", &url_a, "migrate", "--from", &url_a, "--to", &url_b, "--all",
        ],
        None,
    );
    expect(&typed, 2);
    assert!(stderr(&typed).contains("--from"), "{}", stderr(&typed));
    let from_env = runstate(Some(&url_a), &["migrate", "--to", &url_b, "--all"], None);
    assert_eq!(code(&from_env), 2, "{}", stderr(&from_env));
    let mut command = common::command(None, &["verify", "--all"]);
    command
        .env("RUNSTATE_FROM_URL", &url_a)
        .env("RUNSTATE_TO_URL", &url_b);
    expect(&common::run(command, None), 0);
    // The demo runs on its own folder, never on --url's store.
    let demo = runstate(None, &["--url", &url_a, "demo", "--workers", "1"], None);
    expect(&demo, 2);
    assert!(stderr(&demo).contains("--root"), "{}", stderr(&demo));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

/// `--json` is honoured by `cat` (JSON, text or base64 content), `stat`,
/// `rm`, `init`, `ls -l` and the status commands; `cat --pretty` indents
/// JSON and refuses anything else.
#[test]
fn every_command_speaks_json_and_cat_pretty_prints() {
    let root = temp_root("json");
    let url = file_url(&root);
    let url = Some(url.as_str());
    let init = runstate(url, &["init", "--json"], None);
    expect(&init, 0);
    assert_eq!(json(&init)["created"], true);
    assert_eq!(
        json(&runstate(url, &["init", "--json"], None))["created"],
        false
    );
    let put = runstate(
        url,
        &["put", "R", "ron", "--json"],
        Some(b"{\"b\":[1,2],\"a\":\"x\"}"),
    );
    let version = json(&put)["version"].clone();
    expect(
        &runstate(url, &["put", "R", "notes"], Some(b"plain text")),
        0,
    );
    expect(
        &runstate(url, &["put", "R", "blob"], Some(b"\x00\x01binary\xff")),
        0,
    );

    let cat = runstate(url, &["cat", "R", "ron", "--json"], None);
    expect(&cat, 0);
    let cat = json(&cat);
    assert_eq!(cat["json"], serde_json::json!({"a": "x", "b": [1, 2]}));
    assert_eq!(cat["version"], version);
    assert_eq!(cat["size"], 19);
    assert_eq!(
        json(&runstate(url, &["cat", "R", "notes", "--json"], None))["text"],
        "plain text"
    );
    assert_eq!(
        json(&runstate(url, &["cat", "R", "blob", "--json"], None))["base64"],
        "AAFiaW5hcnn/"
    );

    let pretty = runstate(url, &["cat", "R", "ron", "--pretty"], None);
    expect(&pretty, 0);
    assert_eq!(
        stdout(&pretty),
        "{\n  \"b\": [\n    1,\n    2\n  ],\n  \"a\": \"x\"\n}\n"
    );
    let not_json = runstate(url, &["cat", "R", "blob", "--pretty"], None);
    expect(&not_json, 2);
    assert!(
        stderr(&not_json).contains("not JSON"),
        "{}",
        stderr(&not_json)
    );
    assert!(not_json.stdout.is_empty());

    let stat = runstate(url, &["stat", "R", "ron", "--json"], None);
    expect(&stat, 0);
    let stat = json(&stat);
    assert_eq!(stat["version"], version);
    assert_eq!(stat["size"], 19);
    assert_eq!(stat["lock"], serde_json::Value::Null);
    expect(&runstate(url, &["stat", "R", "nothing"], None), 3);

    for (args, key) in [
        (
            vec!["publish", "R", "climate", "50% done", "--json"],
            "topic",
        ),
        (vec!["mark", "R", "build_climate", "--json"], "task"),
        (vec!["attr", "R", "has_sbs", "false", "--json"], "name"),
    ] {
        let output = runstate(url, &args, None);
        expect(&output, 0);
        assert!(json(&output)[key].is_string(), "{}", stdout(&output));
    }
    let completions = runstate(url, &["completions", "bash", "--json"], None);
    expect(&completions, 2);
    let _ = std::fs::remove_dir_all(&root);
}

/// `stat RUN DOC`: version, size, modification time (where the backend
/// records it) and who holds the document's lock.
#[test]
fn stat_shows_the_lock_holder() {
    let root = temp_root("stat");
    let url = file_url(&root);
    expect(
        &runstate(Some(&url), &["put", "R", "climate"], Some(b"{}")),
        0,
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt.block_on(runstate::open(&url)).expect("open");
    let key = LockKey::Doc(
        RunId::new("R").expect("id"),
        DocName::new("climate").expect("name"),
    );
    let holder = Owner::new("worker-9.example", 4343, "stat-holder").expect("owner");
    let lease = rt
        .block_on(store.try_acquire(&key, &holder, Duration::from_secs(60)))
        .expect("hold the lock");
    let stat = runstate(Some(&url), &["stat", "R", "climate", "--json"], None);
    expect(&stat, 0);
    let stat = json(&stat);
    assert_eq!(stat["lock"]["host"], "worker-9.example");
    assert_eq!(stat["lock"]["pid"], 4343);
    assert_eq!(stat["lock"]["fence"], lease.fence().get());
    assert_eq!(stat["size"], 2);
    if let Some(modified) = stat["modified_unix_ms"].as_u64() {
        let now = runstate::time::unix_millis(std::time::SystemTime::now());
        assert!(modified <= now && now - modified < 600_000, "{stat:#}");
    }
    let text = stdout(&runstate(Some(&url), &["stat", "R", "climate"], None));
    assert!(
        text.contains("version") && text.contains("held by worker-9.example:4343"),
        "{text}"
    );
    rt.block_on(store.release(&lease)).expect("release");
    let _ = std::fs::remove_dir_all(&root);
}

/// `ls` lists runs by name, `-l` with their document counts and sizes, a
/// glob selects runs or documents, `--limit` bounds the output.
#[test]
fn ls_counts_sizes_globs_and_limits() {
    let root = temp_root("ls");
    let url = file_url(&root);
    let url = Some(url.as_str());
    for (run, docs) in [("Mica_flume1", 3), ("Mica_flume2", 1), ("Other_run", 2)] {
        for i in 0..docs {
            expect(
                &runstate(url, &["put", run, &format!("doc{i}")], Some(b"12345")),
                0,
            );
        }
    }
    expect(
        &runstate(url, &["put", "Other_run", "climate"], Some(b"1")),
        0,
    );
    assert_eq!(
        stdout(&runstate(url, &["ls"], None)),
        "Mica_flume1\nMica_flume2\nOther_run\n"
    );
    assert_eq!(
        stdout(&runstate(url, &["ls", "Mica*"], None)),
        "Mica_flume1\nMica_flume2\n"
    );
    let limited = runstate(url, &["ls", "--limit", "2"], None);
    expect(&limited, 0);
    assert_eq!(stdout(&limited), "Mica_flume1\nMica_flume2\n");
    assert!(stderr(&limited).contains("--limit"), "{}", stderr(&limited));

    let long = runstate(url, &["ls", "-l", "--json"], None);
    expect(&long, 0);
    let long = json(&long);
    assert_eq!(long[0]["run"], "Mica_flume1");
    assert_eq!(long[0]["documents"], 3);
    assert_eq!(long[0]["bytes"], 15);
    assert_eq!(long[2]["documents"], 3);
    assert!(long[2].get("modified").is_some());
    let text = stdout(&runstate(url, &["ls", "-l", "Mica_flume?"], None));
    assert!(
        text.starts_with("RUN")
            && text.contains("MODIFIED")
            && text.contains("2 run(s), 4 document(s)"),
        "{text}"
    );

    let docs = runstate(url, &["ls", "Other_run", "doc*", "--json"], None);
    expect(&docs, 0);
    let docs = json(&docs);
    let names: Vec<&str> = docs
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["doc0", "doc1"]);
    let docs = json(&runstate(
        url,
        &["ls", "Other_run", "--limit", "1", "--json"],
        None,
    ));
    assert_eq!(docs.as_array().map(Vec::len), Some(1));
    assert!(docs[0].get("modified").is_some());
    expect(&runstate(url, &["ls", "Mica*", "doc*"], None), 2);
    let _ = std::fs::remove_dir_all(&root);
}

/// `completions SHELL` prints a completion script, `man [COMMAND]` a roff
/// page.
#[test]
fn completions_and_manual_pages() {
    let bash = runstate(None, &["completions", "bash"], None);
    expect(&bash, 0);
    assert!(
        stdout(&bash).contains("_runstate()") && stdout(&bash).contains("watch"),
        "bash"
    );
    let zsh = runstate(None, &["completions", "zsh"], None);
    expect(&zsh, 0);
    assert!(stdout(&zsh).starts_with("#compdef runstate"));
    let fish = runstate(None, &["completions", "fish"], None);
    expect(&fish, 0);
    assert!(stdout(&fish).contains("complete -c runstate"));
    let tcsh = runstate(None, &["completions", "tcsh"], None);
    expect(&tcsh, 2);
    assert!(stderr(&tcsh).contains("bash"), "{}", stderr(&tcsh));

    let man = runstate(None, &["man"], None);
    expect(&man, 0);
    let page = stdout(&man);
    assert!(
        page.starts_with(".ie") || page.contains(".TH runstate"),
        "{page}"
    );
    assert!(page.contains(".TH runstate 1"), "{page}");
    for command in ["watch", "health", "migrate"] {
        assert!(page.contains(command), "{command}");
    }
    let watch = runstate(None, &["man", "watch"], None);
    expect(&watch, 0);
    assert!(
        stdout(&watch).contains(".TH runstate-watch 1"),
        "{}",
        stdout(&watch)
    );
    assert!(stdout(&watch).contains("\\-\\-count"), "{}", stdout(&watch));
    expect(&runstate(None, &["man", "nope"], None), 2);
}

/// Runs `args` under a pseudo-terminal (util-linux `script`), so standard
/// output and error are a terminal; returns what it printed.
fn on_a_terminal(envs: &[(&str, &str)], args: &[&str]) -> String {
    let line = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = std::process::Command::new("script");
    command
        .args(["-qec", &line, "/dev/null"])
        .env_remove("NO_COLOR")
        .env("TERM", "xterm");
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = common::run(command, None);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Colour on a terminal only: never in a pipe, never with NO_COLOR or
/// `--color never`, always with `--color always`.
#[test]
fn colour_only_on_a_terminal() {
    let bad = ["--url", "ftp://nowhere/x", "ls"];
    let piped = runstate(None, &bad, None);
    expect(&piped, 2);
    assert!(!stderr(&piped).contains('\x1b'), "{:?}", stderr(&piped));
    let help = runstate(None, &["--help"], None);
    assert!(!stdout(&help).contains('\x1b'));
    let forced = runstate(
        None,
        &["--color", "always", "--url", "ftp://nowhere/x", "ls"],
        None,
    );
    assert_eq!(code(&forced), 2);
    assert!(stderr(&forced).contains("\x1b["), "{:?}", stderr(&forced));

    assert!(
        std::process::Command::new("script")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "util-linux `script` is needed to run a command on a terminal"
    );
    let terminal = on_a_terminal(&[], &bad);
    assert!(terminal.contains("\x1b["), "{terminal:?}");
    assert!(terminal.contains("error:"), "{terminal:?}");
    let no_color = on_a_terminal(&[("NO_COLOR", "1")], &bad);
    assert!(
        no_color.contains("error:") && !no_color.contains('\x1b'),
        "{no_color:?}"
    );
    let never = on_a_terminal(&[], &["--color", "never", "--url", "ftp://nowhere/x", "ls"]);
    assert!(
        never.contains("error:") && !never.contains('\x1b'),
        "{never:?}"
    );
    let help = on_a_terminal(&[("NO_COLOR", "1")], &["--help"]);
    assert!(help.contains("Usage") && !help.contains('\x1b'), "{help:?}");
}

/// `migrate --jobs N` copies several runs at once; `--keep-going` goes on
/// past a run that fails, reports it, and exits 5 (without it, the first
/// failure stops the migration with its own exit code).
#[test]
fn migrate_keeps_going_past_a_failed_run() {
    let (from_root, to_root) = (temp_root("keep-from"), temp_root("keep-to"));
    let (from, to) = (file_url(&from_root), file_url(&to_root));
    for run in ["A_run", "B_run", "C_run", "D_run"] {
        for doc in ["ron", "climate"] {
            expect(
                &runstate(Some(&from), &["put", run, doc], Some(run.as_bytes())),
                0,
            );
        }
    }
    // B_run on the target differs: a migration without --overwrite refuses it.
    expect(
        &runstate(Some(&to), &["put", "B_run", "ron"], Some(b"other")),
        0,
    );

    let stops = runstate(
        None,
        &[
            "migrate", "--from", &from, "--to", &to, "--all", "--jobs", "2",
        ],
        None,
    );
    expect(&stops, 4);

    let going = runstate(
        None,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &to,
            "--all",
            "--jobs",
            "3",
            "--keep-going",
            "--json",
        ],
        None,
    );
    expect(&going, 5);
    assert!(stderr(&going).contains("B_run"), "{}", stderr(&going));
    let report = json(&going);
    assert_eq!(report["failed"][0]["run"], "B_run", "{report:#}");
    assert_eq!(report["failed"][0]["kind"], "already exists", "{report:#}");
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(1));
    for run in ["A_run", "C_run", "D_run"] {
        expect(
            &runstate(
                None,
                &["verify", "--from", &from, "--to", &to, "--run", run],
                None,
            ),
            0,
        );
    }
    let text = runstate(
        None,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &to,
            "--all",
            "--keep-going",
        ],
        None,
    );
    expect(&text, 5);
    assert!(stdout(&text).contains("FAILED  B_run"), "{}", stdout(&text));
    let _ = std::fs::remove_dir_all(&from_root);
    let _ = std::fs::remove_dir_all(&to_root);
}

/// `ls -l`, `ls RUN` and `stat` show when documents were last written,
/// from the listing's modification times on a backend that records them
/// (the file backend: each file's mtime).
#[test]
fn modified_times_show_in_ls_and_stat() {
    let root = temp_root("modified");
    let url = file_url(&root);
    let url = Some(url.as_str());
    let before = runstate::time::unix_millis(std::time::SystemTime::now());
    for doc in ["climate", "ron"] {
        expect(&runstate(url, &["put", "Mod_run", doc], Some(b"{}")), 0);
    }
    let after = runstate::time::unix_millis(std::time::SystemTime::now());
    // File systems may keep coarser times than the clock reads: a little
    // slack either side.
    let within = |ms: u64| ms + 2_000 >= before && ms <= after + 2_000;

    let long = json(&runstate(url, &["ls", "-l", "--json"], None));
    let modified = long[0]["modified_unix_ms"].as_u64();
    assert!(modified.is_some_and(within), "ls -l: {long:#}");
    assert!(
        long[0]["modified"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{long:#}"
    );
    let text = stdout(&runstate(url, &["ls", "-l"], None));
    let row = text.lines().nth(1).expect("a run row");
    assert!(!row.trim_end().ends_with('-'), "ls -l shows a time: {text}");

    let docs = json(&runstate(url, &["ls", "Mod_run", "--json"], None));
    for doc in docs.as_array().expect("array") {
        let modified = doc["modified_unix_ms"].as_u64();
        assert!(modified.is_some_and(within), "ls RUN: {docs:#}");
    }

    let stat = json(&runstate(url, &["stat", "Mod_run", "ron", "--json"], None));
    let modified = stat["modified_unix_ms"].as_u64();
    assert!(modified.is_some_and(within), "stat: {stat:#}");
    let text = stdout(&runstate(url, &["stat", "Mod_run", "ron"], None));
    assert!(!text.contains("unknown"), "stat shows a time: {text}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Beside a running WEPPcloud: a legacy `<name>.nodb.lock` file in a run
/// folder opened with `ext=nodb` is a held lock. `put` and `rm` of that
/// controller exit 4 naming the holder and leave the file alone, `locks`
/// lists it with its age, `unlock` without `--force` refuses, and
/// `unlock --force` removes the lock file (and nothing else), after which
/// the save goes through.
#[test]
fn weppcloud_lock_files_are_held_locks_on_the_command_line() {
    let root = temp_root("nodb-locks");
    let run = root.join("Mica_flume1");
    std::fs::create_dir_all(&run).expect("run folder");
    std::fs::write(run.join("climate.nodb"), br#"{"years": 1}"#).expect("controller");
    std::fs::write(run.join("climate.nodb.lock"), b"1733371200.0").expect("lock file");
    let url = format!("{}?ext=nodb&wait_ms=0", file_url(&root));
    let url = Some(url.as_str());

    let refused = runstate(
        url,
        &["put", "Mica_flume1", "climate"],
        Some(br#"{"years": 2}"#),
    );
    expect(&refused, 4);
    assert!(
        stderr(&refused).contains("weppcloud"),
        "{}",
        stderr(&refused)
    );
    let removal = runstate(url, &["rm", "Mica_flume1", "climate"], None);
    expect(&removal, 4);
    assert_eq!(
        std::fs::read(run.join("climate.nodb")).expect("still there"),
        br#"{"years": 1}"#
    );

    let locks = runstate(url, &["locks", "Mica_flume1"], None);
    expect(&locks, 0);
    let text = stdout(&locks);
    assert!(
        text.contains("Mica_flume1/climate") && text.contains("weppcloud"),
        "{text}"
    );
    let listed = json(&runstate(url, &["locks", "Mica_flume1", "--json"], None));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
    assert!(
        listed[0]["since_unix_ms"].is_u64() || listed[0]["age_ms"].is_u64(),
        "a lock file's age is shown: {listed:#}"
    );

    expect(
        &runstate(url, &["unlock", "Mica_flume1", "climate"], None),
        2,
    );
    assert!(run.join("climate.nodb.lock").exists());
    expect(
        &runstate(url, &["unlock", "Mica_flume1", "climate", "--force"], None),
        0,
    );
    assert!(!run.join("climate.nodb.lock").exists());
    expect(
        &runstate(
            url,
            &["put", "Mica_flume1", "climate"],
            Some(br#"{"years": 2}"#),
        ),
        0,
    );
    assert_eq!(
        std::fs::read(run.join("climate.nodb")).expect("saved"),
        br#"{"years": 2}"#
    );
    // runstate never makes a lock file of its own.
    assert!(!run.join("climate.nodb.lock").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// `publish R T -` reads at most one message's worth of its input: endless
/// input is refused once over the limit (it used to be read to its end,
/// growing without bound), and input that is not UTF-8 is a usage error
/// (exit 2, not 1).
#[test]
fn publish_reads_no_more_input_than_a_message_holds() {
    use std::io::Write as _;
    let root = temp_root("publish-input");
    let url = file_url(&root);
    let mut child = command(Some(&url), &["publish", "R", "t", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runstate runs");
    let mut stdin = child.stdin.take().expect("stdin");
    // Up to 64 MiB, stopped by the pipe closing when the command exits.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 64 * 1024 * 1024 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let output = child.wait_with_output().expect("it exits");
    let sent = writer.join().expect("writer");
    expect(&output, 2);
    assert!(stderr(&output).contains("over"), "{}", stderr(&output));
    assert!(
        sent < 8 * 1024 * 1024,
        "it read {sent} bytes of endless input"
    );
    let not_utf8 = runstate(Some(&url), &["publish", "R", "t", "-"], Some(b"\xff\xfe"));
    expect(&not_utf8, 2);
}
