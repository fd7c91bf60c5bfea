//! The conformance suite on Azure Blob Storage's emulator, Azurite, through
//! object_store's Azure client (feature `azure`): conditional puts
//! (`If-None-Match: *`, `If-Match`), the probe, leases and everything else
//! exactly as `az://` uses them.
//!
//! The test starts its own Azurite (blob service only, in memory, on a
//! free loopback port) from `target/services/azurite`
//! (`npm install azurite` there), creates the container, and stops it when
//! the test process ends (Azurite runs under a shell that kills it once
//! this process's end of a pipe closes). Without that install the suite
//! skips, or fails when `RUNSTATE_REQUIRE_BACKENDS` requires `s3-azure`
//! (or `all`).
//!
//! The client is built here rather than from an `az://` URL: the emulator's
//! address and key are set on the builder, where the URL form would read
//! them from the environment (`AZURITE_BLOB_STORAGE_URL`,
//! `AZURE_STORAGE_ACCOUNT_KEY`), which a test must not change. The
//! multi-process cases skip (their child processes would each need the
//! emulator's address).

#![cfg(feature = "azure")]

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use runstate_conformance::Harness;
use runstate_core::{DocName, Error, Lock, RunId, async_trait};
use runstate_s3::object_store::azure::MicrosoftAzureBuilder;
use runstate_s3::object_store::{ClientOptions, ObjectStore};
use runstate_s3::{Provider, S3Config, S3Store};

/// Azurite's well-known development account and key (public, documented
/// by Microsoft; not a secret).
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const CONTAINER: &str = "runstate";

/// A running Azurite: its address, and the shell whose stdin keeps it
/// alive.
struct Azurite {
    addr: SocketAddr,
    _keeper: Mutex<Child>,
}

fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/services/azurite")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Creates the container with a Shared Key request signed by Node's
/// crypto (object_store has no call for it).
fn create_container(dir: &std::path::Path, addr: SocketAddr) {
    let script = r#"
const http = require('http'), crypto = require('crypto');
const [port, account, key, container] = process.argv.slice(1);
const date = new Date().toUTCString(), version = '2021-08-06';
const toSign = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}`, `x-ms-version:${version}`,
  `/${account}/${account}/${container}`, 'restype:container'].join('\n');
const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(toSign, 'utf8').digest('base64');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT',
  path: `/${account}/${container}?restype=container`,
  headers: { 'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
    Authorization: `SharedKey ${account}:${sig}` } }, res => {
  res.resume();
  res.on('end', () => process.exit(res.statusCode === 201 || res.statusCode === 409 ? 0 : 1));
});
req.on('error', () => process.exit(2));
req.end();
"#;
    let status = Command::new("node")
        .current_dir(dir)
        .args([
            "-e",
            script,
            &addr.port().to_string(),
            ACCOUNT,
            KEY,
            CONTAINER,
        ])
        .status()
        .expect("node runs");
    assert!(status.success(), "creating the Azurite container failed");
}

/// Starts Azurite once per test process; `None` when it is not installed.
fn azurite() -> Option<&'static Azurite> {
    static AZURITE: OnceLock<Option<Azurite>> = OnceLock::new();
    AZURITE
        .get_or_init(|| {
            let dir = install_dir();
            let bin = dir.join("node_modules/.bin/azurite-blob");
            if !bin.exists() {
                eprintln!(
                    "\n*** SKIPPED Azurite conformance: {} is missing (npm install azurite in {}) ***\n",
                    bin.display(),
                    dir.display()
                );
                return None;
            }
            let port = free_port();
            let workspace = dir.join(format!("work-{port}"));
            std::fs::create_dir_all(&workspace).expect("a workspace");
            // The shell starts Azurite, waits for its stdin to close (this
            // process ending), then stops it by its PID.
            let mut keeper = Command::new("sh")
                .arg("-c")
                .arg(
                    r#""$0" --blobHost 127.0.0.1 --blobPort "$1" --inMemoryPersistence --skipApiVersionCheck --silent >/dev/null 2>&1 &
p=$!; cat >/dev/null; kill "$p"; rm -rf "$2""#,
                )
                .arg(&bin)
                .arg(port.to_string())
                .arg(&workspace)
                .current_dir(&workspace)
                .stdin(Stdio::piped())
                .spawn()
                .expect("azurite starts");
            if let Some(stdin) = keeper.stdin.as_mut() {
                // Nothing is written: the pipe only has to stay open.
                let _ = stdin.flush();
            }
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "Azurite did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
            create_container(&dir, addr);
            Some(Azurite {
                addr,
                _keeper: Mutex::new(keeper),
            })
        })
        .as_ref()
}

fn client(azurite: &Azurite) -> Result<Arc<dyn ObjectStore>, Error> {
    let store = MicrosoftAzureBuilder::new()
        .with_account(ACCOUNT)
        .with_access_key(KEY)
        .with_container_name(CONTAINER)
        .with_endpoint(format!("http://{}/{ACCOUNT}", azurite.addr))
        .with_allow_http(true)
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(true)
                .with_timeout(Duration::from_secs(10)),
        )
        .build()
        .map_err(|e| {
            Error::new(runstate_core::ErrorKind::Config, "the Azure client").with_source(e)
        })?;
    Ok(Arc::new(store))
}

struct Azure;

async fn open(namespace: &str) -> Result<Option<S3Store>, Error> {
    let Some(azurite) = azurite() else {
        return Ok(None);
    };
    let config = S3Config::new(CONTAINER)
        .with_provider(Provider::Azure)
        .with_prefix(namespace)?;
    let store = support::with_unwritable(client(azurite)?);
    S3Store::from_object_store(store, config).await.map(Some)
}

#[async_trait]
impl Harness for Azure {
    const BACKEND: &'static str = "s3-azure";
    const URL_VAR: Option<&'static str> = None;
    const CROSS_PROCESS: bool = false;

    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
        let store = open(namespace).await?;
        if let Some(store) = &store {
            let report = store.probe_report().expect("the probe ran");
            assert!(
                report.honoured(),
                "Azurite honours conditional puts: {report}"
            );
        }
        Ok(store.map(|s| Arc::new(s) as Arc<dyn Lock>))
    }

    async fn cleanup(namespace: &str) -> Result<(), Error> {
        if let Some(store) = open(namespace).await? {
            store.purge_prefix().await?;
        }
        Ok(())
    }

    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        support::make_unwritable(format!("{namespace}/{run}/{doc}.json"));
        Ok(true)
    }
}

runstate_conformance::suite!(Azure);
