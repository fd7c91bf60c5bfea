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
//! | `file` (default) | `file:///path/to/root` | [`file::FileStore`]: one folder per run, one file per document |
//! | `sqlite` (default) | `sqlite://path/to/file.db` | `sql::SqlStore` on SQLite, created when missing |
//! | `postgres` | `postgres://user:password@host/db` | `sql::SqlStore` on PostgreSQL |
//! | `mysql` | `mysql://user:password@host/db` (or `mariadb://`) | `sql::SqlStore` on MySQL 8 / MariaDB 10.5+ |
//! | `redis` | `redis://[:password@]host[:port][/db]`, `unix:///path.sock` (or `redis+unix://`) | `redis::RedisStore`: every operation one server-side script |
//! | `redis-tls` | `rediss://…` | TLS for the Redis backend |
//! | `s3` | `s3://bucket/prefix` | `s3::S3Store`: objects, leases from conditional writes |
//! | `bincode` | | the bincode 2 codec for typed documents |
//! | `full` | | every backend above but `redis-tls`, and `bincode` |
//!
//! ## URLs
//!
//! [`open`] (or [`open_env`], which reads `RUNSTATE_URL`) picks the backend
//! by the URL's scheme. A scheme whose feature is off is a
//! [`Config`](ErrorKind::Config) error naming the feature to enable; an
//! unknown scheme is one listing the known schemes. Options go in the
//! query string; an option a backend does not know is an error, except on
//! the SQL backend, which passes it on to the database driver (`sslmode`,
//! …).
//!
//! | option | backends | default | meaning |
//! |---|---|---|---|
//! | `ttl_ms` | all | 30000 | lease TTL of locked updates and guards ([`AnyStore::client`]), of `runstate put`/`rm`, and of migrations (the source URL's) |
//! | `wait_ms` | all | 30000 | how long to wait for a busy lock before failing with `Locked` (migrations: the source URL's) |
//! | `max_doc_bytes` | all | 16777216 | size limit of typed documents (on save and on load) and of `runstate put` |
//! | `ext` | file, s3 | `json` | document extension (`<run>/<name>.<ext>`); `nodb` opens WEPPcloud run folders in place |
//! | `create` | file | `true` | create the root folder when missing |
//! | `sweep` | file | `true` | remove temporary files of killed writers on open |
//! | `weppcloud` | file | `auto` (on with `ext=nodb`) | a neighbour of a running WEPPcloud: its `<name>.nodb.lock` files are held locks, `READONLY` refuses writes, rewrites change the file's (mtime, size), new runs get `nodb.version` |
//! | `state_dir` | file | none | bookkeeping (leases, version index, status, milestones) under `<state_dir>/<run>/`, not in the run folders |
//! | `locks` | all | none | a split store: documents here, leases from the store this (percent-encoded) URL names; see [`split`] |
//! | `weppcloud=true` | redis, as `locks` of a file store | | WEPPcloud mode: leases are WEPPcloud's NoDb locks, its cache is kept coherent (options `weppcloud_root`, `weppcloud_cache_db`); see [`weppcloud`](crate#beside-a-running-weppcloud) |
//! | `prefix` | redis, sql | `runstate` / `runstate_` | namespace: key prefix (Redis), table prefix (SQL); on S3 the URL path is the prefix |
//! | `timeout_ms` | redis, sql, s3 | 5000 / 5000 / 10000 | bound on every call (on SQL also the server's statement timeout) |
//! | `connect_timeout_ms` | redis | 5000 | bound on connecting and reconnecting |
//! | `db` | redis | 0 | database number, for `unix://` URLs (TCP URLs put it in the path) |
//! | `weppcloud_locks`, `weppcloud_ext` | redis | off, `nodb` | honour WEPPcloud's `nodb-lock:<run>:<name>.<ext>` keys in that database |
//! | `acquire_timeout_ms` | sql | 5000 | bound on waiting for a pooled connection |
//! | `max_connections` | sql | 10 (SQLite: 4) | pool size |
//! | `migrate` | sql | `true` | apply the embedded schema migrations on open |
//! | `endpoint` | s3 | AWS (or `AWS_ENDPOINT_URL`) | an S3-compatible server, e.g. `http://127.0.0.1:9000` |
//! | `region` | s3 | `AWS_REGION`, else `us-east-1` | |
//! | `allow_http` | s3 | `false` | allow a plain-HTTP endpoint |
//! | `retries` | s3 | 3 | retries of a transient failure |
//! | `probe` | s3 | `true` | check on open that the server honours conditional writes |
//! | `skew_pct` | s3 | 10 | clock-skew margin of lease expiry, in percent of the TTL |
//!
//! ## Beside a running WEPPcloud
//!
//! `file:///wc1/runs/ab?ext=nodb&state_dir=/var/lib/runstate/ab&locks=redis%3A%2F%2Fwepp-redis%3A6379%2F0%3Fweppcloud%3Dtrue`
//! opens WEPPcloud's run folders in place with WEPPcloud's own Redis as the
//! lock service: runstate's locks on controllers are WEPPcloud's NoDb
//! locks, its writes keep WEPPcloud's cache coherent, and run folders hold
//! only the controllers. See the `weppcloud` module (features `file` and
//! `redis`) and the README.
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
