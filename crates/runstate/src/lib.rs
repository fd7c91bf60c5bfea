//! # runstate
//!
//! Keep the state of long-running jobs ("runs") as named documents in
//! pluggable storage backends: one contract, many backends, proven by one
//! conformance suite against real servers.
//!
//! This is the crate applications depend on. It re-exports the contract
//! from [`runstate_core`] and, behind cargo features, the backends:
//!
//! | feature | backend | |
//! |---|---|---|
//! | `file` (default) | [`file::FileStore`] | one folder per run, one file per document |
//! | `sqlite` (default) | `sql::SqlStore` | `sqlite://path`, created when missing |
//! | `postgres` | `sql::SqlStore` | `postgres://…` |
//! | `mysql` | `sql::SqlStore` | `mysql://…` / `mariadb://…` |
//! | `redis` | `redis::RedisStore` | every operation one server-side script |
//! | `redis-tls` | — | `rediss://` for the Redis backend |
//! | `s3` | `s3::S3Store` | objects in a bucket, leases from conditional writes |
//! | `bincode` | — | the bincode 2 codec for typed documents |
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

pub use runstate_core::*;

/// The file backend ([`runstate_file`]).
#[cfg(feature = "file")]
pub mod file {
    pub use runstate_file::*;
}

/// The SQL backend (`runstate-sql`): PostgreSQL, SQLite, MySQL/MariaDB.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub mod sql {
    pub use runstate_sql::*;
}

/// The S3 backend (`runstate-s3`).
#[cfg(feature = "s3")]
pub mod s3 {
    pub use runstate_s3::*;
}

/// The Redis backend (`runstate-redis`).
#[cfg(feature = "redis")]
pub mod redis {
    pub use runstate_redis::*;
}

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
