//! Secrets never reach the logs (item 17): every `tracing` event and span
//! field, at every level, of opening stores (good, refused and unreachable
//! servers, a refused option), of operations and of their errors is
//! captured, and no password or option value appears in it. sqlx logs an
//! option it does not know at WARN with its value: such options are refused
//! before sqlx sees them.
//!
//! One test in this binary: it installs the process-wide subscriber.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutMode, Replay, RunId, Store, StoreExt,
    Version, display_chain,
};
use runstate_sql::{SqlConfig, SqlStore};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const PASSWORD: &str = "S3ntinel-logs-PW-91b2";
const OPTION_VALUE: &str = "S3ntinel-logs-OPT-4c7e";

/// Everything logged, as text: level, target, message and every field.
#[derive(Clone, Default)]
struct Capture {
    text: Arc<Mutex<String>>,
    events: Arc<AtomicU64>,
    next_span: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let _ = write!(self.0, " {}={value} / {value:?}", field.name());
    }
}

impl Capture {
    fn line(&self, metadata: &Metadata<'_>, fill: impl FnOnce(&mut Fields<'_>)) {
        let mut line = format!("{} {}:", metadata.level(), metadata.target());
        fill(&mut Fields(&mut line));
        line.push('\n');
        self.text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_str(&line);
    }

    fn text(&self) -> String {
        self.text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.line(span.metadata(), |fields| span.record(fields));
        Id::from_u64(self.next_span.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = String::from("record:");
        values.record(&mut Fields(&mut line));
        line.push('\n');
        self.text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_str(&line);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        self.events.fetch_add(1, Ordering::SeqCst);
        self.line(event.metadata(), |fields| event.record(fields));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn assert_no_secret(text: &str, what: &str) {
    for secret in [PASSWORD, OPTION_VALUE] {
        assert!(
            !text.contains(secret),
            "{what} shows a secret:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// `url` with `user:PASSWORD@` in place of `user@`.
fn with_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, host) = rest.split_once('@').expect("a user");
    format!("{scheme}://{user}:{PASSWORD}@{host}")
}

fn with_option(url: &str, option: &str) -> String {
    let glue = if url.contains('?') { '&' } else { '?' };
    format!("{url}{glue}{option}={OPTION_VALUE}")
}

/// Opens with an option the backend does not pass on: refused, and never
/// logged (before the fix, sqlx got it and logged it with its value).
async fn refused_option(url: &str, option: &str) -> Option<String> {
    match SqlConfig::from_url(&with_option(url, option)) {
        Err(error) => {
            assert_eq!(error.kind(), ErrorKind::Config, "{}", display_chain(&error));
            let shown = format!("{} {error:?}", display_chain(&error));
            assert_no_secret(&shown, "the refusal");
            None
        }
        Ok(config) => {
            let outcome = SqlStore::open(config).await;
            if let Ok(store) = &outcome {
                store.close().await;
            }
            Some(format!("option {option} was not refused: {outcome:?}"))
        }
    }
}

async fn operations(store: &SqlStore) {
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("d").expect("valid");
    let key = LockKey::Doc(run.clone(), doc.clone());
    // Watches and subscriptions (PostgreSQL: the listening connection,
    // opened with the same URL) and a waiter.
    let mut watch = store.watch(&run).await.expect("watch");
    let subscription = store.subscribe(&run, Replay::All).await.expect("subscribe");
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"x"))
        .await
        .expect("put");
    store.publish(&run, "wepp", "step").await.expect("publish");
    let _ = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
    store
        .wait_for_release(&key, Duration::from_millis(50))
        .await;
    drop((watch, subscription));
    let (lease, stored) = store
        .acquire_and_load(
            &key,
            &doc,
            &Owner::for_this_process(),
            Duration::from_secs(30),
            Default::default(),
        )
        .await
        .expect("acquire_and_load");
    let locked = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect_err("held");
    assert_eq!(locked.kind(), ErrorKind::Locked);
    let refused = store
        .save_and_release(
            &lease,
            &doc,
            Bytes::from_static(b"y"),
            PutMode::Update(Version::new("1")),
        )
        .await
        .expect_err("a stale version");
    assert_eq!(refused.kind(), ErrorKind::Precondition);
    assert!(stored.is_some());
    let _ = store.break_lock(&key, None).await.expect("break");
    store.uninstall().await.expect("drop");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_at_any_level() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(capture.clone()).expect("the only subscriber");
    let mut leaks = Vec::new();
    let prefix = format!("logs{:x}_", fastrand::u32(..));

    if let Some(url) =
        runstate_conformance::server_url("postgres", "RUNSTATE_POSTGRES_URL", "the log test")
    {
        // The shared server trusts local connections: any password works.
        let url = with_password(&url);
        leaks.extend(refused_option(&url, "sslpassword").await);
        leaks.extend(refused_option(&url, "target_session_attrs").await);
        let store = SqlStore::open(
            SqlConfig::from_url(&format!(
                "{url}?application_name=logtest&password={PASSWORD}"
            ))
            .expect("documented options")
            .with_prefix(&prefix)
            .expect("prefix"),
        )
        .await
        .expect("open");
        operations(&store).await;
        let unreachable = SqlStore::open(
            SqlConfig::from_url(&format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/test"))
                .expect("url")
                .with_acquire_timeout(Duration::from_secs(2)),
        )
        .await
        .expect_err("nobody listens");
        assert_no_secret(
            &display_chain(&unreachable),
            "an unreachable server's error",
        );
    }
    if let Some(url) =
        runstate_conformance::server_url("mysql", "RUNSTATE_MYSQL_URL", "the log test")
    {
        leaks.extend(refused_option(&url, "password-file").await);
        let store = SqlStore::open(
            SqlConfig::from_url(&url)
                .expect("url")
                .with_prefix(&prefix)
                .expect("prefix"),
        )
        .await
        .expect("open");
        operations(&store).await;
        let refused = SqlStore::open(
            SqlConfig::from_url(&with_password(&url))
                .expect("url")
                .with_timeout(Duration::from_secs(3)),
        )
        .await
        .expect_err("a wrong password");
        assert_eq!(refused.kind(), ErrorKind::Config);
        assert_no_secret(&display_chain(&refused), "a refused password's error");
    }
    let file = std::env::temp_dir().join(format!("runstate-logs-{}.db", std::process::id()));
    let sqlite = format!("sqlite://{}", file.display());
    leaks.extend(refused_option(&sqlite, "key").await);
    let store = SqlStore::connect(&sqlite).await.expect("open");
    operations(&store).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }

    let text = capture.text();
    assert!(
        capture.events.load(Ordering::SeqCst) > 0,
        "the capture works: something was logged"
    );
    assert_no_secret(&text, "the logs");
    assert!(leaks.is_empty(), "{leaks:#?}");
}
