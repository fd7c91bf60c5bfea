//! The operator's commands, driven through the real binary on every
//! backend: `watch` (changes, status messages, resync, how it ends),
//! `status`, `publish`, `mark`, `attr` and `health`.

#[path = "../../runstate/tests/support/mod.rs"]
mod support;

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use runstate::{DocName, LockKey, Owner, RunId};
use serde_json::Value;
use support::{ALL, Places};

/// How long a test waits for one line of a watch (polling backends report
/// within their interval; S3 and MySQL poll).
const LINE_WAIT: Duration = Duration::from_secs(30);

/// A running `runstate watch`, its lines as they come.
struct Watch {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    /// The note it printed once it was following the run.
    ready: String,
}

fn lines(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Watch {
    fn start(url: &str, args: &[&str]) -> Watch {
        let mut command = common::command(Some(url), args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the watch");
        let out = lines(child.stdout.take().expect("stdout"));
        let err = lines(child.stderr.take().expect("stderr"));
        let mut seen = Vec::new();
        let ready = loop {
            match err.recv_timeout(LINE_WAIT) {
                Ok(line) if line.starts_with("runstate: watching") => break line,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("the watch never became ready: {seen:?}");
                }
            }
        };
        Watch {
            child,
            out,
            err,
            ready,
        }
    }

    /// The next event, as JSON.
    fn next(&mut self, what: &str) -> Value {
        match self.out.recv_timeout(LINE_WAIT) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}): {line}")),
            Err(_) => {
                let _ = self.child.kill();
                let err: Vec<String> = self.err.try_iter().collect();
                panic!("{what}: no event within {LINE_WAIT:?}; stderr: {err:?}");
            }
        }
    }

    /// Waits for it to exit and returns its code, and what is left on
    /// standard output.
    fn finish(mut self) -> (i32, Vec<String>, Vec<String>) {
        let status = self.child.wait().expect("wait for the watch");
        let out = self.out.iter().collect();
        let err = self.err.iter().collect();
        (status.code().unwrap_or(-1), out, err)
    }
}

fn put_version(url: &str, run: &str, doc: &str, body: &[u8]) -> String {
    let put = runstate(Some(url), &["put", run, doc, "--json"], Some(body));
    expect(&put, 0);
    json(&put)["version"]
        .as_str()
        .expect("a version")
        .to_owned()
}

#[test]
fn operator_commands_on_every_backend() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for backend in ALL {
        let Some(place) = backend.place("operator_commands_on_every_backend") else {
            continue;
        };
        let outcome = std::panic::catch_unwind(|| {
            let url = place.url.as_str();
            expect(&runstate(Some(url), &["init"], None), 0);
            put_version(url, "Run_W", "ron", b"{}");

            // Only `climate` and its topic: changes of `ron` and messages
            // on other topics are not shown.
            let mut watch = Watch::start(
                url,
                &[
                    "watch",
                    "Run_W",
                    "climate",
                    "--json",
                    "--count",
                    "3",
                    "--timeout",
                    "120s",
                ],
            );
            let status = !watch.ready.contains("no status messages");
            put_version(url, "Run_W", "ron", b"{\"other\": true}");
            let version = put_version(url, "Run_W", "climate", b"{\"step\": 1}");
            let changed = watch.next("changed");
            assert_eq!(changed["event"], "changed", "{backend:?}: {changed}");
            assert_eq!(changed["run"], "Run_W");
            assert_eq!(changed["doc"], "climate");
            assert_eq!(changed["version"], version.as_str());
            if status {
                expect(
                    &runstate(Some(url), &["publish", "Run_W", "ron", "elsewhere"], None),
                    0,
                );
                expect(
                    &runstate(
                        Some(url),
                        &["publish", "Run_W", "climate", "50% done"],
                        None,
                    ),
                    0,
                );
                let message = watch.next("message");
                assert_eq!(message["event"], "message", "{backend:?}: {message}");
                assert_eq!(message["topic"], "climate");
                assert_eq!(message["text"], "50% done");
            }
            expect(&runstate(Some(url), &["rm", "Run_W", "climate"], None), 0);
            let deleted = watch.next("deleted");
            assert_eq!(deleted["event"], "deleted", "{backend:?}: {deleted}");
            assert_eq!(deleted["doc"], "climate");
            if status {
                let (code, rest, err) = watch.finish();
                assert_eq!(code, 0, "{backend:?}: {err:?}");
                assert!(rest.is_empty(), "{rest:?}");
            } else {
                // Without messages, the third event never comes.
                let _ = watch.child.kill();
                let _ = watch.child.wait();
            }

            // Milestones, attributes, a held lock, the last messages.
            expect(
                &runstate(Some(url), &["mark", "Run_W", "build_climate"], None),
                0,
            );
            expect(
                &runstate(Some(url), &["attr", "Run_W", "has_sbs", "false"], None),
                0,
            );
            let store = rt.block_on(runstate::open(url)).expect("open");
            let key = LockKey::Doc(
                RunId::new("Run_W").expect("id"),
                DocName::new("ron").expect("name"),
            );
            let holder = Owner::new("worker-3.example", 3131, "status-holder").expect("owner");
            let lease = store.capabilities().leases.then(|| {
                rt.block_on(store.try_acquire(&key, &holder, Duration::from_secs(60)))
                    .expect("hold a lock")
            });
            let shown = runstate(Some(url), &["status", "Run_W", "--json"], None);
            expect(&shown, 0);
            let shown = json(&shown);
            assert_eq!(shown["documents"], 1, "{backend:?}: {shown:#}");
            assert!(
                shown["milestones"]["build_climate"].is_string(),
                "{backend:?}: {shown:#}"
            );
            assert_eq!(shown["attributes"]["has_sbs"], "false", "{shown:#}");
            if lease.is_some() {
                assert_eq!(shown["locks"][0]["host"], "worker-3.example", "{shown:#}");
                assert_eq!(shown["locks"][0]["doc"], "ron", "{shown:#}");
            }
            if status {
                let texts: Vec<&str> = shown["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .map(|m| m["text"].as_str().expect("text"))
                    .collect();
                assert_eq!(texts, ["elsewhere", "50% done"], "{backend:?}");
            } else {
                assert_eq!(shown["messages"], Value::Null);
            }
            let text = stdout(&runstate(Some(url), &["status", "Run_W"], None));
            assert!(
                text.contains("build_climate") && text.contains("has_sbs"),
                "{text}"
            );
            if let Some(lease) = lease {
                rt.block_on(store.release(&lease)).expect("release");
            }
            expect(&runstate(Some(url), &["status", "No_such_run"], None), 3);

            let health = runstate(Some(url), &["health", "--json"], None);
            expect(&health, 0);
            let health = json(&health);
            assert_eq!(health["status"], "ok", "{backend:?}: {health:#}");
            assert_eq!(health["backend"], backend.name());
            let operations: Vec<&str> = health["latency"]
                .as_array()
                .expect("latency")
                .iter()
                .map(|l| l["operation"].as_str().expect("operation"))
                .collect();
            assert!(
                operations.contains(&"list_runs") && operations.contains(&"get"),
                "{operations:?}"
            );
            assert!(health["latency"][0]["p99_us"].as_u64().is_some());
            eprintln!("{backend:?}: watch, status, publish, mark, attr and health pass");
        });
        rt.block_on(place.cleanup());
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

/// How a watch ends: SIGTERM (exit 0), `--timeout` alone (exit 0),
/// `--count` not reached by `--timeout` (exit 1); `--history` replays.
#[test]
fn watch_ends_cleanly_and_replays_history() {
    let root = temp_root("watch-end");
    let url = file_url(&root);
    put_version(&url, "Run_E", "ron", b"{}");
    for text in ["one", "two", "three"] {
        expect(
            &runstate(Some(&url), &["publish", "Run_E", "ron", text], None),
            0,
        );
    }
    let mut watch = Watch::start(&url, &["watch", "Run_E", "--json", "--history", "2"]);
    let texts: Vec<Value> = (0..2)
        .map(|_| watch.next("history")["text"].clone())
        .collect();
    assert_eq!(texts, ["two", "three"]);
    let pid = watch.child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let (code, _, err) = watch.finish();
    assert_eq!(code, 0, "SIGTERM ends a watch cleanly: {err:?}");

    let timed = runstate(Some(&url), &["watch", "Run_E", "--timeout", "300ms"], None);
    expect(&timed, 0);
    // -q: no note that it is watching, only the error.
    let short = runstate(
        Some(&url),
        &["-q", "watch", "Run_E", "--count", "1", "--timeout", "300ms"],
        None,
    );
    expect(&short, 1);
    assert!(stderr(&short).contains("timed out"), "{}", stderr(&short));
    expect(
        &runstate(Some(&url), &["watch", "Run_E", "--timeout", "soon"], None),
        2,
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `health` of a store that cannot be reached: exit 1, and with --json the
/// report says `failing`; of an in-memory store: ok.
#[test]
fn health_of_an_unreachable_store_is_failing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}/0?connect_timeout_ms=300&timeout_ms=300");
    let health = runstate(Some(&url), &["health", "--json"], None);
    expect(&health, 1);
    let report = json(&health);
    assert_eq!(report["status"], "failing", "{report:#}");
    assert!(report["last_error"]["message"].is_string());
    assert!(!stdout(&health).contains("hunter2") && !stderr(&health).contains("hunter2"));
    let text = runstate(Some(&url), &["health"], None);
    expect(&text, 1);
    assert!(stdout(&text).contains("failing"), "{}", stdout(&text));

    let memory = runstate(Some("memory://"), &["health"], None);
    expect(&memory, 0);
    assert!(
        stdout(&memory).contains("status      ok"),
        "{}",
        stdout(&memory)
    );
}
