//! No secret reaches a log line, at any level, on any backend: every
//! `tracing` event and span field and every `log` record emitted by
//! runstate and its drivers during open, operations and failures is
//! captured at TRACE and searched for the secrets involved (passwords in
//! URLs, secret-looking options, the S3 secret key, and the contents of
//! documents).
//!
//! Everything runs in one test, because the capture is process-global.

mod support;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use runstate::{Document, RunId, StoreExt, display_chain};
use serde::{Deserialize, Serialize};
use support::{Backend, Places};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Everything logged, one line per event, span or record.
static LOG: Mutex<String> = Mutex::new(String::new());

fn append(line: &str) {
    LOG.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push_str(line);
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let _ = write!(self.0, " {}={}", field.name(), display_chain(value));
    }
}

/// A subscriber that keeps every span and event, at every level.
struct Capture {
    next: AtomicU64,
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields(format!(
            "span {} {}:",
            span.metadata().target(),
            span.metadata().name()
        ));
        span.record(&mut fields);
        append(&fields.0);
        append("\n");
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut fields = Fields("span record:".to_owned());
        values.record(&mut fields);
        append(&fields.0);
        append("\n");
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut fields);
        append(&fields.0);
        append("\n");
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// The same for the `log` crate, which some drivers use.
struct LogCapture;

impl log::Log for LogCapture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        append(&format!(
            "log {} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        ));
    }
    fn flush(&self) {}
}

fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing::subscriber::set_global_default(Capture {
            next: AtomicU64::new(0),
        })
        .expect("the only subscriber of this test binary");
        log::set_boxed_logger(Box::new(LogCapture)).expect("the only logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Distinct secrets, each unlikely to appear by chance.
const URL_PASSWORD: &str = "UrlPw-q7Zr2/xy9Z?kk4Q";
/// A password without URL delimiters, which parses: the servers refuse it
/// (or, with trust authentication, ignore it).
const PLAIN_PASSWORD: &str = "PlainPw-Hx8Qm";
const OPTION_SECRET: &str = "OptSecret-9Wm4";
const S3_SECRET_KEY: &str = "S3Key-3Tn8pL";
const DOC_SECRET: &str = "DocSecret-5Hb1";
const REDIS_PASSWORD: &str = "RedisPw-6Qx0";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Climate {
    station: String,
    years: u32,
}

impl Document for Climate {
    const NAME: &'static str = "climate";
}

/// `url` with `user:password@` (user kept when there is one).
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a server URL");
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => (user.split(':').next().unwrap_or(""), rest),
        None => ("", rest),
    };
    format!("{scheme}://{user}:{password}@{rest}")
}

/// `url` with the option `name=value` added.
fn with_option(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{name}={value}")
}

/// Opens, writes, reads, updates, decodes badly and deletes on `url`;
/// every failure is formatted (Display, Debug, chain) into the log too,
/// since errors end up in logs.
async fn exercise(url: &str) {
    let store = match runstate::open(url).await {
        Ok(store) => store,
        Err(error) => {
            append(&format!(
                "open error: {error} | {error:?} | {}\n",
                display_chain(&error)
            ));
            return;
        }
    };
    append(&format!("store: {store:?} {}\n", store.url()));
    let run = store.client().run(RunId::new("secrets").expect("valid"));
    let steps = async {
        run.save(&Climate {
            station: DOC_SECRET.to_owned(),
            years: 1,
        })
        .await?;
        run.update(|c: &mut Climate| c.years += 1).await?;
        let mut guard = run.lock::<Climate>().await?;
        guard.years += 1;
        guard.commit().await?;
        let _ = run.load::<Climate>().await?;
        // A document that does not decode: its bytes must not be quoted.
        let name = runstate::DocName::new("climate").expect("valid");
        store
            .put_bytes(
                run.id(),
                &name,
                bytes::Bytes::from(format!("{{\"station\":1,\"years\":\"{DOC_SECRET}\"}}")),
            )
            .await?;
        if let Err(error) = run.load::<Climate>().await {
            append(&format!(
                "decode error: {error} | {error:?} | {}\n",
                display_chain(&error)
            ));
        }
        store.list_all_docs(run.id()).await?;
        store.delete_run(run.id()).await?;
        runstate::Result::<()>::Ok(())
    };
    if let Err(error) = steps.await {
        append(&format!(
            "operation error: {error} | {error:?} | {}\n",
            display_chain(&error)
        ));
    }
}

/// A private Redis that requires a password, stopped by PID on drop.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    _dir: std::path::PathBuf,
}

impl PrivateRedis {
    fn start() -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("runstate-secrets-redis-{port}"));
        std::fs::create_dir_all(&dir).ok()?;
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--requirepass",
                REDIS_PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(PrivateRedis {
                    child,
                    port,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Marks the child process that does the work.
const CHILD_VAR: &str = "RUNSTATE_SECRETS_CHILD";

/// The S3 backend reads its secret key from the environment, which a
/// running test cannot change without `unsafe` (forbidden here): the test
/// runs itself again as a child process with the key set.
#[test]
fn no_secret_reaches_a_log_line_on_any_backend() {
    if std::env::var_os(CHILD_VAR).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(check_every_backend());
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new(exe)
        .args([
            "no_secret_reaches_a_log_line_on_any_backend",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_VAR, "1")
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("{stderr}");
}

async fn check_every_backend() {
    install();
    let mut places = Vec::new();
    for backend in support::ALL {
        let Some(place) = backend.place("no_secret_reaches_a_log_line_on_any_backend") else {
            continue;
        };
        places.push(place);
    }
    for place in &places {
        let url = &place.url;
        match place.backend {
            Backend::Postgres | Backend::Mysql => {
                // A password the server ignores (trust) or refuses (MariaDB's
                // root has none): both the operation and the error paths.
                exercise(&with_password(url, URL_PASSWORD)).await;
                exercise(&with_password(url, PLAIN_PASSWORD)).await;
                // A secret-looking option: refused or passed on, never shown.
                exercise(&with_option(url, "sslpassword", OPTION_SECRET)).await;
                exercise(&with_option(url, "password", OPTION_SECRET)).await;
                // Nothing listens on port 9: a connection error with a password.
                let unreachable = with_password(url, PLAIN_PASSWORD)
                    .replace(":5432/", ":9/")
                    .replace(":3306/", ":9/");
                exercise(&with_option(
                    &with_option(&unreachable, "timeout_ms", "500"),
                    "acquire_timeout_ms",
                    "500",
                ))
                .await;
                exercise(url).await;
            }
            Backend::Redis => {
                // The shared server has no password: AUTH is refused.
                exercise(&with_password(url, URL_PASSWORD)).await;
                exercise(&with_password(url, PLAIN_PASSWORD)).await;
                exercise(&with_option(url, "password", OPTION_SECRET)).await;
                exercise(url).await;
            }
            Backend::S3 => {
                // moto accepts any key; the secret key must never show.
                assert_eq!(
                    std::env::var("AWS_SECRET_ACCESS_KEY").as_deref(),
                    Ok(S3_SECRET_KEY)
                );
                exercise(url).await;
                exercise(&with_option(url, "secret_access_key", OPTION_SECRET)).await;
                let unreachable = url
                    .split_once("endpoint=")
                    .map(|(head, tail)| {
                        let rest = tail.split_once('&').map_or("", |(_, r)| r);
                        format!("{head}endpoint=http://127.0.0.1:9&{rest}&timeout_ms=500&retries=0")
                    })
                    .unwrap_or_else(|| url.clone());
                exercise(&unreachable).await;
            }
            Backend::File | Backend::Sqlite => {
                exercise(url).await;
                exercise(&with_option(url, "password", OPTION_SECRET)).await;
            }
            _ => {}
        }
    }
    if let Some(redis) = PrivateRedis::start() {
        let base = format!(
            "redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0?prefix=rssecret",
            redis.port
        );
        exercise(&base).await;
        exercise(&base.replace(REDIS_PASSWORD, URL_PASSWORD)).await;
        exercise(&base.replace(REDIS_PASSWORD, PLAIN_PASSWORD)).await;
    } else if runstate_conformance::is_required("redis") {
        panic!("cannot start a private redis-server with a password");
    }
    for place in &places {
        place.cleanup().await;
    }

    let log = LOG.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(path) = std::env::var_os("RUNSTATE_SECRETS_LOG") {
        std::fs::write(path, &log).expect("write the captured log");
    }
    assert!(
        log.lines().count() > 50 && log.contains("DEBUG"),
        "the capture must see the drivers' and runstate's events:\n{log}"
    );
    for secret in [
        URL_PASSWORD,
        PLAIN_PASSWORD,
        OPTION_SECRET,
        S3_SECRET_KEY,
        DOC_SECRET,
        REDIS_PASSWORD,
    ] {
        let found: Vec<&str> = log.lines().filter(|l| l.contains(secret)).take(5).collect();
        assert!(
            found.is_empty(),
            "secret {secret:?} reached the log:\n{}",
            found.join("\n")
        );
    }
    // The pieces of a password split at its `/` and `?` must not show either.
    for piece in ["q7Zr2", "xy9Z", "kk4Q"] {
        assert!(
            !log.contains(piece),
            "a piece of a password reached the log: {piece}"
        );
    }
    eprintln!(
        "captured {} log lines, {} bytes; no secret among them",
        log.lines().count(),
        log.len()
    );
}
