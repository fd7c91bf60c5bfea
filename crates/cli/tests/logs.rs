//! Logs an operator can see, driven through the real binary: warnings on
//! standard error by default (the file backend's sweeps, the S3 server
//! that ignores conditional writes), `-v`/`-q`/`RUST_LOG` adjusting them,
//! `--log-format json`, and no secret in any line at any verbosity.

#[path = "../../runstate/tests/support/mod.rs"]
mod support;

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use support::{Backend, Places};

/// Leaves a temporary file of a writer that died long ago on another host
/// in a run folder: what the file backend sweeps when it opens.
fn leave_a_dead_writers_temp(root: &Path) {
    let run = root.join("Run_S");
    let temp = run.join(".ron.json.rstmp.0123456789abcdef.4242.1.00000000deadbeef");
    std::fs::write(&temp, b"{\"half\":").expect("write a temporary file");
    let old = SystemTime::now() - Duration::from_secs(3 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&temp)
        .and_then(|f| f.set_modified(old))
        .expect("age it");
}

const SWEPT: &str = "removed a temporary file left by a dead writer";

#[test]
fn warnings_reach_stderr_by_default_and_flags_adjust_them() {
    let root = temp_root("logs");
    let url = file_url(&root);
    expect(
        &runstate(Some(&url), &["put", "Run_S", "ron"], Some(b"{}")),
        0,
    );

    // Default: the sweep is reported, the listing is untouched.
    leave_a_dead_writers_temp(&root);
    let ls = runstate(Some(&url), &["ls"], None);
    assert_eq!(code(&ls), 0);
    assert_eq!(stdout(&ls), "Run_S\n");
    assert!(stderr(&ls).contains(SWEPT), "{}", stderr(&ls));
    assert!(stderr(&ls).contains("WARN") || stderr(&ls).contains("INFO"));

    // -q: errors only.
    leave_a_dead_writers_temp(&root);
    let quiet = runstate(Some(&url), &["-q", "ls"], None);
    assert_eq!(code(&quiet), 0);
    assert_eq!(stderr(&quiet), "", "-q");

    // RUST_LOG turns it off for that crate, or on for another.
    leave_a_dead_writers_temp(&root);
    let mut command = common::command(Some(&url), &["ls"]);
    command.env("RUST_LOG", "runstate_file=off");
    let off = common::run(command, None);
    assert_eq!(stderr(&off), "", "RUST_LOG=runstate_file=off");

    // JSON lines for machines.
    leave_a_dead_writers_temp(&root);
    let machine = runstate(Some(&url), &["--log-format", "json", "ls"], None);
    assert_eq!(code(&machine), 0);
    let lines: Vec<serde_json::Value> = stderr(&machine)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == SWEPT
            && l["level"] == "INFO"
            && l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("runstate_file"))),
        "{lines:?}"
    );

    // -v shows notices of every crate (a new SQLite store's migrations),
    // which the default leaves out; -vv debug (the command's own steps).
    let db = root.with_extension("db");
    let sqlite = format!("sqlite://{}", db.display());
    let quiet_init = runstate(Some(&sqlite), &["init"], None);
    expect(&quiet_init, 0);
    assert!(
        !stderr(&quiet_init).contains("migration applied"),
        "{}",
        stderr(&quiet_init)
    );
    let _ = std::fs::remove_file(&db);
    let loud_init = runstate(Some(&sqlite), &["-v", "init"], None);
    expect(&loud_init, 0);
    assert!(
        stderr(&loud_init).contains("migration applied"),
        "{}",
        stderr(&loud_init)
    );
    let debug = runstate(Some(&url), &["-vv", "ls"], None);
    assert!(
        stderr(&debug).contains("opening the store"),
        "{}",
        stderr(&debug)
    );
    assert!(stderr(&debug).contains("DEBUG"), "{}", stderr(&debug));
    // A bad RUST_LOG directive is reported and skipped.
    let mut command = common::command(Some(&url), &["ls"]);
    command.env("RUST_LOG", "runstate_file=loud");
    let bad = common::run(command, None);
    assert_eq!(code(&bad), 0);
    assert!(
        stderr(&bad).contains("ignoring the RUST_LOG directive"),
        "{}",
        stderr(&bad)
    );

    // A failed command still prints one error line (and its hint) by
    // default: the failed call is not logged twice.
    let missing = runstate(Some(&url), &["cat", "Run_S", "nothing"], None);
    expect(&missing, 3);
    let _ = std::fs::remove_dir_all(&root);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// A loopback proxy to an S3 server that drops the conditional headers
/// (`If-None-Match`, `If-Match`) of every request: a server that ignores
/// conditional writes, as some S3-compatible ones do.
fn ignoring_conditions(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let address = listener.local_addr().expect("proxy address");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let (Ok(mut client_write), Ok(mut server_read)) =
                (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_read, &mut client_write);
                let _ = client_write.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || forward_requests(client, server));
        }
    });
    address
}

/// Forwards HTTP/1.1 requests from `client` to `server`, without their
/// conditional headers. Bodies are sent with Content-Length (what
/// object_store does); a chunked one ends the connection.
fn forward_requests(client: TcpStream, mut server: TcpStream) {
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("if-none-match:") || lower.starts_with("if-match:") {
                continue;
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                return;
            }
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
            let end = line == "\r\n";
            head.extend_from_slice(line.as_bytes());
            if end {
                break;
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        head.extend_from_slice(&body);
        if server.write_all(&head).is_err() {
            return;
        }
    }
}

#[test]
fn an_s3_server_that_ignores_conditional_writes_is_a_warning() {
    let Some(base) =
        runstate_conformance::server_url("s3", "RUNSTATE_S3_URL", "s3 ignored-conditions warning")
    else {
        return;
    };
    let mut url = url::Url::parse(&base).expect("a valid S3 URL");
    let endpoint = url
        .query_pairs()
        .find(|(name, _)| name == "endpoint")
        .map(|(_, value)| value.into_owned())
        .expect("the test server's endpoint");
    let upstream: SocketAddr = url::Url::parse(&endpoint)
        .expect("endpoint URL")
        .socket_addrs(|| None)
        .expect("endpoint address")[0];
    let proxy = ignoring_conditions(upstream);
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(n, v)| {
            let v = if n == "endpoint" {
                format!("http://{proxy}")
            } else {
                v.into_owned()
            };
            (n.into_owned(), v)
        })
        .collect();
    let path = format!(
        "{}/warn{:08x}",
        url.path().trim_end_matches('/'),
        fastrand::u32(..)
    );
    url.set_path(&path);
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let ls = runstate(Some(url.as_str()), &["ls"], None);
    assert_eq!(code(&ls), 0, "{}", stderr(&ls));
    let err = stderr(&ls);
    assert!(
        err.contains("S3 server ignores conditional writes") && err.contains("WARN"),
        "{err}"
    );
    let quiet = runstate(Some(url.as_str()), &["-q", "ls"], None);
    assert_eq!(code(&quiet), 0);
    assert_eq!(stderr(&quiet), "");
}

/// Passwords, in the URL or the environment, appear in no line at any
/// verbosity, on any backend, in text or JSON logs, whether the command
/// succeeds or fails.
#[test]
fn no_secret_in_any_log_line() {
    const SECRET: &str = "Zq9SecretPw7";
    let mut urls: Vec<(String, String)> = Vec::new();
    let mut places = Vec::new();
    for backend in [Backend::Postgres, Backend::Mysql, Backend::Redis] {
        let Some(place) = backend.place("no_secret_in_any_log_line") else {
            continue;
        };
        let mut url = url::Url::parse(&place.url).expect("a server URL");
        if url.username().is_empty() && backend != Backend::Redis {
            url.set_username("runstate").expect("a user");
        }
        url.set_password(Some(SECRET)).expect("a password");
        urls.push((backend.name().to_owned(), url.to_string()));
        places.push(place);
    }
    if let Some(place) = Backend::S3.place("no_secret_in_any_log_line") {
        urls.push(("s3".to_owned(), place.url.clone()));
        places.push(place);
    }
    let root = temp_root("secrets");
    urls.push((
        "file+redis locks".to_owned(),
        format!(
            "{}?locks={}&cache={}",
            file_url(&root),
            support::encode(&format!("redis://:{SECRET}@127.0.0.1:6379/0")),
            support::encode(&format!("redis://:{SECRET}@127.0.0.1:6379/0")),
        ),
    ));
    for (what, url) in &urls {
        for args in [
            vec!["-vv", "init"],
            vec!["-vv", "put", "Run_P", "ron"],
            vec!["-vvv", "ls", "Run_P"],
            vec!["-vv", "--log-format", "json", "stat", "Run_P", "ron"],
            vec!["-vv", "health", "--json"],
            vec!["-vv", "doctor"],
        ] {
            let mut command = common::command(Some(url), &args);
            // S3 reads its secret from the environment.
            command.env("AWS_SECRET_ACCESS_KEY", SECRET);
            let output = common::run(command, Some(b"{}"));
            for line in stdout(&output).lines().chain(stderr(&output).lines()) {
                assert!(!line.contains(SECRET), "{what} {args:?}: {line}");
            }
            assert!(
                !stderr(&output).contains("panicked"),
                "{what} {args:?}: {}",
                stderr(&output)
            );
        }
        eprintln!("{what}: no secret in any line");
    }
    let _ = std::fs::remove_dir_all(&root);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for place in &places {
        rt.block_on(place.cleanup());
    }
}
