//! The conditional-write probe: against a stand-in server that accepts
//! `If-None-Match` / `If-Match` and ignores them, the backend refuses to
//! offer conditional writes and leases; against a real server (moto) it
//! offers them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, Fetched, GetOptions, Lock, LockKey, Owner, PutOptions, RunId, Store,
    StoreExt,
};
use runstate_s3::{S3Config, S3Store};

/// A tiny HTTP/1.1 server that stores objects and ignores every
/// conditional header, like the servers the probe exists to catch.
fn careless_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let objects: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let objects = Arc::clone(&objects);
            std::thread::spawn(move || serve(stream, &objects));
        }
    });
    port
}

fn serve(stream: TcpStream, objects: &Mutex<HashMap<String, Vec<u8>>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let key = target.split('?').next().unwrap_or("").to_owned();
        let mut objects = objects.lock().expect("lock");
        let response = match method.as_str() {
            "PUT" => {
                let etag = format!("\"{:x}\"", body.len() * 31 + objects.len());
                objects.insert(key, body);
                format!("HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: 0\r\n\r\n").into_bytes()
            }
            "DELETE" => {
                objects.remove(&key);
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_vec()
            }
            "GET" | "HEAD" => match objects.get(&key) {
                Some(data) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nETag: \"{:x}\"\r\nContent-Length: {}\r\nLast-Modified: Tue, 24 Nov 2026 10:00:00 GMT\r\n\r\n",
                        data.len(),
                        data.len()
                    )
                    .into_bytes();
                    if method == "GET" {
                        r.extend_from_slice(data);
                    }
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            },
            _ => b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_conditions_gets_no_locks() {
    let port = careless_server();
    require_credentials();
    let config = S3Config::new("careless")
        .with_endpoint(format!("http://127.0.0.1:{port}"), true)
        .with_timeout(Duration::from_secs(5));
    let store = S3Store::open(config).await.expect("open");
    let report = store.probe_report().expect("probed on open");
    assert!(!report.honoured(), "{report}");
    assert!(!report.create_only, "{report}");
    let caps = store.capabilities();
    assert!(!caps.conditional_put && !caps.leases && !caps.milestones);

    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let error = store
        .put(&run, &doc, Bytes::from_static(b"x"), PutOptions::create())
        .await
        .expect_err("create-only refused");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(
        error.to_string().contains("ignores conditional writes"),
        "{error}"
    );
    let error = store
        .try_acquire(
            &LockKey::Run(run.clone()),
            &Owner::for_this_process(),
            Duration::from_secs(5),
        )
        .await
        .expect_err("no leases");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    // Milestones are changed by compare-and-swap: not without conditions.
    let error = store
        .mark(&run, "build_climate", std::time::SystemTime::now())
        .await
        .expect_err("no milestones");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    let error = store.milestones(&run).await.expect_err("no milestones");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    // Plain writes and reads still work.
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"plain"))
        .await
        .expect("overwrite");
    let stored = store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(&stored.bytes[..], b"plain");
    // It ignores If-None-Match on reads too (200 with the body): the
    // version is compared, so the answer is still right.
    assert_eq!(
        store
            .get_if_changed(&run, &doc, &stored.version, GetOptions::new())
            .await
            .expect("check"),
        Fetched::Unchanged
    );
}

/// object_store signs every request with credentials from the
/// environment; without any it would ask the instance metadata service,
/// which is not on loopback. `cargo xtask test` sets fake local ones.
fn require_credentials() {
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            std::env::var_os(name).is_some(),
            "{name} must be set to run the S3 tests (cargo xtask test sets fake local ones)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_gets_locks() {
    let Some(url) =
        runstate_conformance::server_url("s3", "RUNSTATE_S3_URL", "a_real_server_gets_locks")
    else {
        return;
    };
    let config = S3Config::from_url(&url).expect("url");
    let prefix = format!("{}/probe-{:x}", config.prefix(), fastrand::u64(..));
    let store = S3Store::open(config.with_prefix(prefix).expect("prefix"))
        .await
        .expect("open");
    let report = store.probe_report().expect("probed on open");
    assert!(report.honoured(), "{report}");
    assert!(store.doctor().await.expect("doctor again").honoured());
    let caps = store.capabilities();
    assert!(caps.conditional_put && caps.leases && !caps.conditional_delete);
    let key = LockKey::Run(RunId::new("r").expect("valid"));
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(5))
        .await
        .expect("lease");
    store.release(&lease).await.expect("release");
    store.purge_prefix().await.expect("cleanup");
}
