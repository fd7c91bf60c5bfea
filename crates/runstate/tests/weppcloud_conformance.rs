//! The conformance suite on the WEPPcloud composition (issue 14): a file
//! store of `.nodb` controllers with WEPPcloud's own Redis as the lock
//! service (`file:///runs?ext=nodb&state_dir=…&locks=redis://…/0?weppcloud=true`),
//! opened by `runstate::open` as a deployment opens it.
//!
//! WEPPcloud's keys are not namespaced (`nodb-lock:<run>:<name>.nodb` and
//! the run hash in database 0, cached copies in database 13, status
//! channels in database 2), and the suite's cases name their runs plainly
//! (`milestones`, `head`, …), so every case gets a redis-server of its own
//! on a free loopback port: started by the case's first `open`, found by
//! its child processes through a file in the case's folder, and stopped by
//! its PID in `cleanup`. Milestones are whole seconds in WEPPcloud's run
//! hash; the suite's milestone case uses whole seconds, so it holds as is.

#![cfg(all(feature = "file", feature = "redis"))]

#[path = "support/urls.rs"]
#[allow(dead_code)] // each test crate uses its own part
mod urls;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate::{Error, ErrorKind, Lock, async_trait};
use runstate_conformance::{Harness, is_required};
use urls::encode;

/// The case's folder: `runs/` (the root), `state/` (bookkeeping), the
/// server's files and `redis.port` / `redis.pid`.
fn folder(namespace: &str) -> PathBuf {
    std::env::temp_dir().join(format!("runstate-wepp-conf-{namespace}"))
}

fn setup_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Backend, format!("{what}: {error}"))
}

/// The port of the case's redis-server, starting it unless a process of
/// the case did already; `None` when redis-server cannot run and is not
/// required.
fn server(namespace: &str) -> Result<Option<u16>, Error> {
    let dir = folder(namespace);
    let port_file = dir.join("redis.port");
    if let Ok(port) = std::fs::read_to_string(&port_file) {
        return port
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| setup_error("redis.port", e));
    }
    std::fs::create_dir_all(dir.join("runs")).map_err(|e| setup_error("case folder", e))?;
    std::fs::create_dir_all(dir.join("state")).map_err(|e| setup_error("state folder", e))?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| setup_error("a free port", e))?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(
                !is_required("weppcloud"),
                "redis-server is required (RUNSTATE_REQUIRE_BACKENDS) but cannot start: {error}"
            );
            eprintln!("*** SKIPPED: redis-server cannot start: {error} ***");
            return Ok(None);
        }
    };
    std::fs::write(dir.join("redis.pid"), child.id().to_string())
        .map_err(|e| setup_error("redis.pid", e))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(setup_error("redis-server", "did not start in 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Written last: a child process that finds it finds a running server.
    std::fs::write(&port_file, port.to_string()).map_err(|e| setup_error("redis.port", e))?;
    Ok(Some(port))
}

/// The WEPPcloud composition, one redis-server per case.
pub struct Weppcloud;

#[async_trait]
impl Harness for Weppcloud {
    const BACKEND: &'static str = "weppcloud";
    const URL_VAR: Option<&'static str> = None;

    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
        let Some(port) = server(namespace)? else {
            return Ok(None);
        };
        let dir = folder(namespace);
        let url = format!(
            "file://{}?ext=nodb&state_dir={}&locks={}",
            dir.join("runs").display(),
            dir.join("state").display(),
            encode(&format!(
                "redis://127.0.0.1:{port}/0?weppcloud=true&prefix=rstest"
            ))
        );
        let store = runstate::open(&url).await?;
        Ok(Some(store.into_lock()))
    }

    async fn cleanup(namespace: &str) -> Result<(), Error> {
        let dir = folder(namespace);
        if let Ok(pid) = std::fs::read_to_string(dir.join("redis.pid")) {
            // The server this case started, by its PID.
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

runstate_conformance::suite!(Weppcloud);
