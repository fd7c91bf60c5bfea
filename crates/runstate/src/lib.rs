//! # runstate
//!
//! Keep the state of long-running jobs ("runs") as named documents in
//! pluggable storage backends: one contract, many backends, proven by one
//! conformance suite against real servers.
//!
//! This is the crate applications depend on. It re-exports the contract
//! from [`runstate_core`] and, behind cargo features, the backends; it opens
//! any of them by URL ([`open`]), and moves runs between them
//! ([`migrate()`](migrate::migrate)).
//!
//! | feature | URL | backend |
//! |---|---|---|
//! | `file` (default) | `file:///path/to/root`, `file:relative/root` | [`file::FileStore`]: one folder per run, one file per document |
//! | `sqlite` (default) | `sqlite://path/to/file.db`, `sqlite:///abs/path.db` | `sql::SqlStore` on SQLite, created when missing |
//! | `postgres` | `postgres://user:password@host/db` (or `postgresql://`) | `sql::SqlStore` on PostgreSQL |
//! | `mysql` | `mysql://user:password@host/db` (or `mariadb://`) | `sql::SqlStore` on MySQL 8 / MariaDB 10.5+ |
//! | `redis` | `redis://[:password@]host[:port][/db]`, `unix:///path.sock` (or `redis+unix://`), `redis+cluster://host:port,host:port/` | `redis::RedisStore`: every operation one server-side script |
//! | `redis-tls` | `rediss://…` | TLS for the Redis backend |
//! | `s3` | `s3://bucket/prefix` | `s3::S3Store`: objects, leases from conditional writes |
//! | `gcs`, `azure` | `gs://bucket/prefix`, `az://container/prefix?account=…` | the S3 backend on Google Cloud Storage and Azure Blob Storage |
//! | (always) | `memory://` or `memory://name` | [`memory::MemoryStore`]: this process's memory, no server, no files |
//! | `bincode` | | the bincode 2 codec for typed documents |
//! | `metrics` | | [`layers::Metrics`]: counters and latency histograms on the `metrics` crate |
//! | `full` | | `file`, `sqlite`, `postgres`, `mysql`, `redis`, `s3`, `bincode`, `metrics` |
//!
//! ## URLs
//!
//! [`open`] (or [`open_env`], which reads `RUNSTATE_URL`) picks the backend
//! by the URL's scheme. A scheme whose feature is off is a
//! [`Config`](ErrorKind::Config) error naming the feature to enable; an
//! unknown scheme is one listing the known schemes. Options go in the
//! query string, form-encoded (`%XX`, `+`); each is parsed once, by name
//! ([`options::UrlOptions`]): an option given twice, a value that is not
//! what the option takes, and an option nobody knows are `Config` errors
//! naming the option (and listing the known ones), never showing the value
//! of an option that holds a secret. The SQL backend alone passes options
//! it does not know on to the database driver (`sslmode`, …).
//!
//! The facade's own options, on any URL (taken out before the backend
//! reads the rest):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `ttl_ms` | 30000 | lease TTL of locked updates and guards ([`AnyStore::client`]), of `runstate put`/`rm`, and of migrations (the source URL's); 1 to 86400000 |
//! | `wait_ms` | 30000 | how long to wait for a busy lock before failing with `Locked` (migrations: the source URL's); 0 to 86400000 |
//! | `max_doc_bytes` | 16777216 | size limit of typed documents (on save and on load) and of `runstate put` |
//! | `locks` | none | a [split store](#split-stores): documents from this URL's store, leases from the store the option's value (a URL, percent-encoded) names |
//! | `cache` | none | a [cache](#caches) in front of the store: `memory` (in this process) or a Redis URL (percent-encoded; shared by every worker that reaches it) |
//! | `cache_bytes` | 67108864 | the byte budget of `cache=memory` (refused with any other cache) |
//!
//! Inside `locks=`, the lock service's URL takes its backend's options
//! (`prefix`, …) and `ttl_ms`/`wait_ms` (the leases' settings, given on
//! one URL or the other, not both); `locks`, `cache`, `cache_bytes` and
//! `max_doc_bytes` belong on the document store's URL and are refused
//! there. `weppcloud=true` there makes the lock service WEPPcloud's own
//! locks ([Beside a running WEPPcloud](#beside-a-running-weppcloud));
//! `weppcloud=false` is a plain lock service.
//!
//! Each backend's options:
//!
//! | option | backends | default | meaning |
//! |---|---|---|---|
//! | `ext` | file, s3 | `json` | document extension (`<run>/<name>.<ext>`); `nodb` opens WEPPcloud run folders in place |
//! | `create` | file | `true` | create the root folder when missing |
//! | `sweep` | file | `true` | remove temporary files of killed writers on open |
//! | `max_document_bytes` | file | 1073741824 | largest document the file store saves or reads |
//! | `lock_timeout_ms` | file | 10000 | longest wait for another process's `flock` on a lease record (`Timeout`, retryable) |
//! | `case_insensitive` | file | `auto` | whether the root's file system ignores the case of names (`auto` detects it on open) |
//! | `watch` | file | `inotify` | how `watch` learns of changes: `inotify` (this host's writes) or `poll` (listing every `poll_ms`: a file system written from several hosts) |
//! | `poll_ms` | file | 250 | the interval of `watch=poll`, and of status subscriptions re-reading their log |
//! | `status_messages`, `status_bytes` | file | 1000, 1048576 | status log rotation: the history keeps the last 1000–2000 messages, about twice `status_bytes` at most |
//! | `weppcloud` | file | `auto` (on with `ext=nodb`) | a neighbour of a running WEPPcloud: its `<name>.nodb.lock` files are held locks, `READONLY` refuses writes, rewrites change the file's (mtime, size), new runs get `nodb.version` |
//! | `state_dir` | file | none | bookkeeping (leases, version index, status, milestones) under `<state_dir>/<run>/`, not in the run folders |
//! | `prefix` | redis, sql | `runstate` / `runstate_` | namespace: key prefix (Redis), table prefix (SQL); on S3 the URL path is the prefix |
//! | `timeout_ms` | redis, sql, s3 | 5000 / 5000 / 10000 | bound on every call (on SQL also the server's statement timeout) |
//! | `connect_timeout_ms` | redis | 5000 | bound on connecting and reconnecting |
//! | `db` | redis | 0 | database number, for `unix://` URLs (TCP URLs put it in the path) |
//! | `weppcloud_locks`, `weppcloud_ext` | redis | off, `nodb` | a Redis *document store* that honours WEPPcloud's `nodb-lock:<run>:<name>.<ext>` keys in that database |
//! | `status_history` | redis, sql | 1000 | status messages kept per run |
//! | `status_minutes` | redis | off | also drop status messages older than this |
//! | `wait_replicas`, `wait_timeout_ms` | redis | 0 (off), 1000 | after every save and grant, `WAIT` for this many replicas (failover safety) |
//! | `tls_ca` | redis | built-in roots | `rediss://`: a PEM file of the certificate authorities to trust |
//! | `acquire_timeout_ms` | sql | 5000 | bound on waiting for a pooled connection |
//! | `max_connections` | sql | 10 (SQLite: 4) | pool size |
//! | `migrate` | sql | `true` | apply the embedded schema migrations on open |
//! | `watch_ms` | sql, s3 | 250 / 1000 | how often a polling watch lists the run (MySQL, SQLite, S3) and a status subscription reads the history (MySQL, SQLite); PostgreSQL is told by `NOTIFY` |
//! | `endpoint` | s3 | the cloud's (or `AWS_ENDPOINT_URL`) | an S3-compatible server, e.g. `http://127.0.0.1:9000`, or an emulator |
//! | `region` | s3 | `AWS_REGION`, else `us-east-1` | |
//! | `account`, `use_emulator` | s3 (`az:`) | `AZURE_STORAGE_ACCOUNT_NAME`, `false` | the storage account; Azurite |
//! | `allow_http` | s3 | `false` | allow a plain-HTTP endpoint |
//! | `retries` | s3 | 3 | retries of a transient failure |
//! | `probe` | s3 | `true` | check on open that the server honours conditional writes |
//! | `skew_pct` | s3 | 10 | clock-skew margin of lease expiry, in percent of the TTL |
//! | `weppcloud=true` | redis, inside `locks=` of a file store | | WEPPcloud mode: leases are WEPPcloud's NoDb locks; with `weppcloud_root` (the run folders as WEPPcloud's workers see them; default the root's absolute path), `weppcloud_cache_db` (13), `weppcloud_ext` (the file store's `ext`) |
//!
//! `memory://` takes the facade's options only. Each backend crate
//! documents its options in full (`runstate::file`, `runstate::redis`,
//! `runstate::sql`, `runstate::s3`).
//!
//! [`open_with`]`(url, `[`OpenMode::Existing`]`)` opens only a store that
//! exists: a missing root folder or SQLite file is an error and nothing is
//! created (the command line opens this way for everything that only
//! reads).
//!
//! Passwords never appear in `Debug`, `Display` or errors:
//! [`AnyStore::url`] shows the URL with them replaced by `***`. S3
//! credentials come from the standard AWS environment variables.
//!
//! ```no_run
//! # async fn demo() -> runstate::Result<()> {
//! use runstate::{Document, RunId};
//! # #[derive(serde::Serialize, serde::Deserialize, Default)]
//! # struct Climate { years: u32 }
//! # impl Document for Climate { const NAME: &'static str = "climate"; }
//! let store = runstate::open("postgres://app@db.internal/runs?prefix=wepp_&ttl_ms=60000").await?;
//! let run = store.client().run(RunId::new("Mica_flume1")?);
//! run.update_or_default(|c: &mut Climate| c.years += 1).await?;
//! # Ok(()) }
//! ```
//!
//! ## Split stores
//!
//! Documents in one backend, leases from another ([`split::SplitStore`]):
//! for workers on several hosts sharing one folder, give the file store a
//! lock service every host reaches (Redis, PostgreSQL). Fencing stays with
//! the store that holds the bytes: it keeps the highest fence it has seen
//! per lock and refuses a lower one atomically with the write, and every
//! grant raises it *before* its holder reads. The capabilities say what
//! the pair gives: `Fencing::Atomic` when the document store keeps fence
//! watermarks (file, SQL, Redis, memory), `VersionOnly` on S3; multi-host
//! when the lock service is and the documents are shared by hosts (a
//! server, or the file store's folder; not in-process or SQLite documents).
//!
//! ```text
//! file:///geodata/runs?ext=nodb&locks=redis%3A%2F%2Fcache%3A6379%2F0%3Fprefix%3Dwepp
//! file:///geodata/runs?locks=redis://cache:6379/0          (unencoded: no ? or & of its own)
//! ```
//!
//! ## Caches
//!
//! `cache=memory` or `cache=<redis URL>` puts a [`cache::CachedStore`] in
//! front: a hit is validated with a conditional read that sends no bytes
//! when the copy is current ([`Store::get_if_changed`]), writes through it
//! update it, locked updates always load from the store under their lease,
//! and every save stays conditional on a version, so a stale copy costs a
//! retry, never an update. [`Run::update_optimistic`] (mutate the cached
//! copy, save conditional on its version, retry on `Precondition`) is one
//! round trip when nobody else wrote: for short changes; the locked update
//! still excludes others for long steps.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate::Result<()> {
//! use runstate::{Document, RunId};
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! struct Progress { steps: u32 }
//! impl Document for Progress { const NAME: &'static str = "progress"; }
//!
//! // In this process's memory, with a cache in front and leases of 5 s.
//! let store = runstate::open("memory://crate-docs?cache=memory&cache_bytes=1048576&ttl_ms=5000").await?;
//! let run = store.client().run(RunId::new("Mica_flume1")?);
//! run.update_or_default(|p: &mut Progress| p.steps += 1).await?;
//! run.update_optimistic(|p: &mut Progress| p.steps += 1).await?;
//! assert_eq!(run.load::<Progress>().await?.steps, 2);
//! # Ok(()) }
//! ```
//!
//! ## Layers and health
//!
//! Every store [`open`] returns is wrapped in [`layers::Observed`]: one
//! `tracing` span per call (backend, operation, run, document, fence,
//! bytes, outcome, duration; at DEBUG) and the figures of
//! [`AnyStore::health`] (ok / degraded / failing, the last error, p50/p99
//! per operation, calls in flight, failed lease renewals;
//! [`layers::HealthReport`] serializes for machines, as
//! `runstate health --json` prints it). Layers forward every method of the
//! contract, so a backend's one-round-trip combined operations stay one.
//!
//! ## Watch, status and milestones
//!
//! [`Store::watch`] streams a run's changes ([`WatchEvent`]; `Resync`
//! whenever events may have been missed: subscribe, then list, then apply
//! events newer than the listing). [`Store::publish`] and
//! [`Store::subscribe`] carry status messages with a bounded, replayable
//! history ([`Replay`]). [`Store::mark`], [`Store::set_attr`] and
//! [`Store::milestones`] record a run's milestones and attributes, field
//! by field, without a lock. [`Capabilities`] says what each backend does
//! natively, by polling, or not at all (`watch`, `status`, `milestones`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate::Result<()> {
//! use runstate::{Replay, RunId, StatusEvent};
//! let store = runstate::open("memory://").await?;
//! let run = store.client().run(RunId::new("Mica_flume1")?);
//! run.mark("build_climate").await?;
//! run.set_attr("has_sbs", "false").await?;
//! assert_eq!(run.milestones().await?.attrs["has_sbs"], "false");
//! run.publish("climate", "50% done").await?;
//! let mut messages = run.subscribe(Replay::All).await?;
//! match messages.next().await {
//!     Some(Ok(StatusEvent::Message(m))) => assert_eq!(m.text, "50% done"),
//!     other => panic!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! ## Beside a running WEPPcloud
//!
//! `file:///wc1/runs/ab?ext=nodb&state_dir=/var/lib/runstate/ab&locks=redis%3A%2F%2Fwepp-redis%3A6379%2F0%3Fweppcloud%3Dtrue`
//! opens WEPPcloud's run folders in place with WEPPcloud's own Redis as the
//! lock service: runstate's locks on controllers are WEPPcloud's NoDb
//! locks, its writes keep WEPPcloud's cache coherent, and run folders hold
//! only the controllers. It passes the whole conformance suite. See the
//! `weppcloud` module (features `file` and `redis`) and the README.
//!
//! ## Moving runs
//!
//! [`migrate::migrate`] copies runs between any two stores byte-exact,
//! under the source run's lease, verified by SHA-256, resumable;
//! [`migrate::verify`] compares them. The `runstate migrate` and
//! `runstate verify` commands are these functions.
//!
//! ```no_run
//! # async fn demo() -> runstate::Result<()> {
//! use runstate::migrate::{migrate, MigrateOptions, Selection};
//! use runstate::RunId;
//! let laptop = runstate::open("file:///home/me/runs?ext=nodb").await?;
//! let lab = runstate::open("postgres://lab-db/runs").await?;
//! let options = MigrateOptions::new(Selection::Runs(vec![RunId::new("Mica_flume1")?]));
//! let report = migrate(&*laptop, &*lab, &options, &()).await?;
//! println!("{} documents, {:.1} MB/s", report.documents, report.mb_per_sec());
//! # Ok(()) }
//! ```
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use runstate::{Client, Document, RunId};
//! use runstate::file::FileStore;
//!
//! #[derive(Serialize, Deserialize, Default)]
//! struct Climate {
//!     station: String,
//!     years: u32,
//! }
//!
//! impl Document for Climate {
//!     const NAME: &'static str = "climate";
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate::Result<()> {
//! # let root = std::env::temp_dir().join(format!("runstate-facade-doc-{}", std::process::id()));
//! let store = FileStore::open_path(&root).await?;
//! let run = Client::new(Arc::new(store)).run(RunId::new("Mica_flume1")?);
//!
//! // A locked read-modify-write: acquire → load → mutate → fenced save → release.
//! run.update_or_default(|c: &mut Climate| {
//!     c.station = "ID106388".into();
//!     c.years += 30;
//! })
//! .await?;
//!
//! // Or hold the lock across several steps.
//! let mut climate = run.lock::<Climate>().await?;
//! climate.years += 1;
//! climate.commit().await?;
//!
//! assert_eq!(run.load::<Climate>().await?.years, 31);
//! # std::fs::remove_dir_all(&root).ok();
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
// docs.rs builds with every feature and marks what each item needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cache;
pub mod doctor;
pub mod layers;
pub mod migrate;
mod open;
pub mod split;
#[cfg(all(feature = "file", feature = "redis"))]
pub mod weppcloud;

pub use open::{
    AnyStore, OpenMode, Scheme, URL_VAR, is_missing_store, open, open_env, open_with, redact_url,
};
pub use runstate_core::*;

/// The file backend ([`runstate_file`]).
#[cfg(feature = "file")]
#[cfg_attr(docsrs, doc(cfg(feature = "file")))]
pub mod file {
    pub use runstate_file::*;
}

/// The SQL backend (`runstate-sql`): PostgreSQL, SQLite, MySQL/MariaDB.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub mod sql {
    pub use runstate_sql::*;
}

/// The S3 backend (`runstate-s3`).
#[cfg(feature = "s3")]
#[cfg_attr(docsrs, doc(cfg(feature = "s3")))]
pub mod s3 {
    pub use runstate_s3::*;
}

/// The Redis backend (`runstate-redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis {
    pub use runstate_redis::*;
}

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
