//! `rediss://` against a private TLS redis-server whose certificate comes
//! from a CA made for the test (`openssl`), trusted through the URL's
//! `tls_ca` option. The test build also compiles rustls's aws-lc-rs
//! provider beside the *ring* one this crate enables (a dev-dependency),
//! as a program with the S3 backend does: rustls then cannot pick a
//! provider by itself, and the store must install one.

#![cfg(feature = "tls")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runstate_core::{Bytes, DocName, RunId, Store, StoreExt, WatchEvent};
use runstate_redis::{RedisConfig, RedisStore};

/// A TLS-only redis-server on a free port, stopped by its PID.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=runstate test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts the server, or says why it cannot (a redis-server built without
/// TLS exits at once).
fn start() -> Result<TlsRedis, String> {
    let port = free_port();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runstate-tls-redis-{port}-{:x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    certificates(&dir);
    let log = dir.join("redis.log");
    let path = |name: &str| dir.join(name).display().to_string();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &path(""),
            "--logfile",
            &path("redis.log"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server cannot start: {e}"))?;
    let mut server = TlsRedis { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.child.try_wait() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "redis-server exited ({status}); TLS support? {said}"
            ));
        }
        if std::net::TcpStream::connect(("127.0.0.1", server.port)).is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.child.kill();
    Err("redis-server with TLS did not start listening".to_owned())
}

/// A real `rediss://` connection with both rustls providers compiled in:
/// the store's connection and its listener's (a watcher hears a write) go
/// over TLS, trusting only the CA given by `tls_ca`; without it (the web
/// roots) the same server is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_connects_with_a_private_ca_and_two_crypto_providers() {
    let server = match start() {
        Ok(server) => server,
        Err(why) if runstate_conformance::is_required("redis") => {
            panic!("redis is required but a TLS redis-server cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("\n*** SKIPPED rediss:// test: {why} ***\n");
            return;
        }
    };
    let ca = server.dir.join("ca.crt");
    let url = format!(
        "rediss://127.0.0.1:{}/0?tls_ca={}",
        server.port,
        ca.display()
    );
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_connect_timeout(Duration::from_secs(3));
    assert!(config.to_string().contains("tls_ca="), "{config}");
    let store = RedisStore::open(config.clone())
        .await
        .expect("open over TLS");
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let mut watch = store.watch(&run).await.expect("watch over TLS");
    let version = store
        .put_bytes(&run, &doc, Bytes::from_static(b"secret"))
        .await
        .expect("put");
    let stored = store
        .get_bytes(&run, &doc)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored.bytes.as_ref(), b"secret");
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event")
        .expect("open")
        .expect("no error");
    assert_eq!(event, WatchEvent::Changed { doc, version });

    let untrusted = RedisConfig::from_url(&format!("rediss://127.0.0.1:{}/0", server.port))
        .expect("url")
        .with_connect_timeout(Duration::from_secs(3));
    assert!(
        RedisStore::open(untrusted).await.is_err(),
        "a certificate from an unknown CA is refused"
    );
    let missing = config.with_tls_ca(server.dir.join("nowhere.pem"));
    let error = RedisStore::open(missing)
        .await
        .expect_err("a missing CA file");
    assert_eq!(error.kind(), runstate_core::ErrorKind::Config, "{error}");
}

/// `tls_ca` is a `rediss://` option with a path; on a plain `redis://` URL
/// (where it could only be a mistake) it is refused.
#[test]
fn tls_ca_needs_a_tls_url() {
    let refused = RedisConfig::from_url("redis://127.0.0.1:6379/0?tls_ca=/etc/ca.pem")
        .expect_err("plain TCP");
    assert_eq!(
        refused.kind(),
        runstate_core::ErrorKind::Config,
        "{refused}"
    );
    let empty = RedisConfig::from_url("rediss://127.0.0.1:6379/0?tls_ca=").expect_err("no path");
    assert_eq!(empty.kind(), runstate_core::ErrorKind::Config, "{empty}");
    let config = RedisConfig::from_url("rediss://127.0.0.1:6379/0?tls_ca=/etc/ca.pem").expect("ok");
    assert_eq!(
        config.to_string(),
        "rediss://127.0.0.1:6379/0?tls_ca=/etc/ca.pem"
    );
}
