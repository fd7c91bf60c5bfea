//! # runstate-sql
//!
//! The SQL backend of runstate on sqlx: PostgreSQL, SQLite and
//! MySQL/MariaDB (cargo features `postgres`, `sqlite`, `mysql`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use runstate_core::{Client, RunId};
//! use runstate_sql::SqlStore;
//!
//! # async fn example() -> runstate_core::Result<()> {
//! let store = SqlStore::connect("postgres://runstate@127.0.0.1:5432/test").await?;
//! let run = Client::new(Arc::new(store)).run(RunId::new("Mica_flume1")?);
//! # Ok(()) }
//! ```
//!
//! ## Schema
//!
//! Tables (and in MySQL procedures) under a configurable prefix, created
//! by embedded, versioned migrations on first open (or by
//! [`SqlStore::migrate`] for operators who run DDL separately); an
//! applied migration is never edited, changes come as new ones.
//!
//! | table | primary key | holds |
//! |---|---|---|
//! | `<prefix>documents (run, name, version, bytes, size, updated_at)` | `(run, name)` | the documents; names sorted by bytes |
//! | `<prefix>leases (run, doc, owner, owner_id, fence, since_ms, expires_at_ms)` | `(run, doc)` | one row per lock (`doc` empty for a run lock); a released lease keeps its row, so fences keep increasing |
//! | `<prefix>watermarks (run, doc, fence)` | `(run, doc)` | per lock, the highest fence of a lease granted by another lock service seen here ([`Store::claim`], [`PutOptions::foreign_lease`]); independent of `leases.fence` |
//! | `<prefix>status (run, seq, topic, body, at_ms)` | `(run, seq)` | the bounded history of status messages; `seq` counts a run's messages from 1 without gaps |
//! | `<prefix>status_seq (run, seq)` | `run` | the last `seq` given out per run (kept when messages are trimmed, so numbers never repeat) |
//! | `<prefix>milestones (run, kind, name, value)` | `(run, kind, name)` | `kind` `timestamps` (value: seconds since the epoch with nine decimals, as WEPPcloud's `timestamps:<task>`) or `attrs` (WEPPcloud's `attrs:<name>`) |
//! | `<prefix>schema_migrations (version, description, applied_at)` | `version` | the migrations applied |
//!
//! | migration | PostgreSQL, SQLite | MySQL |
//! |---|---|---|
//! | documents and leases | 1 | 1 (with the `acquire_and_load` procedure) |
//! | `acquire_and_load` idempotent by owner, sending the document only with a grant | — | 2 |
//! | watermarks, status, milestones | 2 | 3 (with the `claim`, `foreign_put` and `publish` procedures) |
//!
//! What [`Store::delete_run`] does to a run's rows: documents and
//! milestones (run metadata) are deleted together; the status history,
//! the lease rows and the watermarks are kept (fences and watermarks must
//! never go back; messages keep their numbers).
//!
//! ## Watches, status messages, waiters
//!
//! | | PostgreSQL | MySQL, SQLite |
//! |---|---|---|
//! | [`Store::watch`] | `NOTIFY`: every write announced by its own statement, reported one by one ([`WatchMode::Native`] with `every_write`) | listing the run every `watch_ms` ([`WatchMode::Polling`]) |
//! | status followers | woken by `NOTIFY`, then read the new rows | read the new rows every `watch_ms` |
//! | [`Lock::wait_for_release`] | woken by a release in any process (`NOTIFY` on release, save-and-release, break) or through this store | woken by releases through this store; otherwise its backoff |
//! | [`Lock::wait_for_local_release`] | while a grant made through this store holds the lock: woken by its release through this store | the same |
//!
//! A waiting acquire ([`LockExt::acquire`](runstate_core::LockExt::acquire))
//! whose lock is held by a grant of this same store does not ask the
//! database until that grant is released (or expires, or the policy's
//! `max_backoff` passes): an attempt while the holder works would be
//! refused, and would contend with the holder's save (for SQLite, whose
//! writers exclude each other, a refused attempt during a save sleeps in
//! SQLite's busy handler).
//!
//! In PostgreSQL, writes and releases call `pg_notify` on the channel
//! `<prefix>events` inside the writing statement (a CTE of its own: no
//! round trip is added, and the notification goes out when, and only if,
//! the change commits). A store listens on one connection of its own,
//! opened by its first watch, subscription or waiting acquire and closed
//! 2 s after the last one is gone. When that connection is lost (a killed
//! session, a restart, a ping every 30 s that gets no answer), it is
//! replaced; the watches that were listening then get `Resync`, and the
//! subscriptions read the history from where they were. A subscription
//! (any dialect) reads "the messages after the last one delivered", so a
//! late or repeated wake-up loses nothing; it reports `Resync` when its
//! consumer fell behind (its feed overflowed) or when messages it had not
//! read yet were trimmed from the history (a gap in `seq`).
//!
//! The history keeps the newest `status_history` messages per run (1000
//! by default): each publish deletes older ones in its statement or
//! transaction. Age is not a limit: a run that stops publishing keeps its
//! last messages.
//!
//! ## How the promises are kept
//!
//! - Every statement binds its values; only the allowlisted table prefix is
//!   spliced into SQL.
//! - Leases are rows judged by the database's clock, never session advisory
//!   locks (which leak through pools and vanish on disconnect): a lease
//!   stays valid until its expiry even if the connection that took it
//!   dies. Acquire is one statement (insert, or take over a free or expired
//!   row, returning the fence). TTLs are checked by
//!   [`runstate_core::check_ttl`] before anything is sent.
//! - Acquire is idempotent by owner: when the caller's owner id holds the
//!   lock with a live grant, the same statement returns that grant again
//!   (same fence and `since`, expiry restarted from now), so the retry of
//!   an acquire whose reply was lost gets its grant back instead of waiting
//!   a whole TTL behind itself; an expired grant of the same owner is a new
//!   grant (fence + 1).
//! - A fenced save checks the lease and the version in the statement that
//!   writes (PostgreSQL: a CTE that locks the lease row; MySQL: a
//!   multi-table `UPDATE`; SQLite: writers are serialized). A locked update
//!   of an existing document is two round trips: acquire-and-load
//!   (PostgreSQL: one statement; MariaDB 10.5+, found at open: one
//!   `INSERT … ON DUPLICATE KEY UPDATE … RETURNING`; MySQL: a stored
//!   procedure; both MySQL-protocol paths send the document back only
//!   when the lock was granted) and save-and-release.
//! - A waiter granted the lock right after the previous holder *created*
//!   the document loads it: in PostgreSQL the acquire-and-load statement
//!   reads with the snapshot it took before waiting for that holder, in
//!   which an inserted row does not exist, so an absent document is read
//!   again by a new statement (a third round trip only for absent
//!   documents). MySQL's procedure, MariaDB's `RETURNING` and SQLite
//!   read after granting.
//! - `save_and_release` releases the lease whenever the save fails for a
//!   reason other than a lost lease (`Fenced`, `LeaseLost`): a lease that
//!   does not cover the document, a size over the limit, a refused
//!   condition, a row the database refuses (a constraint, a trigger, a full
//!   disk), a lost connection. Where the release is part of the failed
//!   statement (PostgreSQL) or transaction (SQLite), it is made again on
//!   its own.
//! - Versions are random 64-bit tokens, so a version read before a document
//!   was deleted and created again never matches the new one.
//! - SQLite runs in WAL mode with a busy timeout; several processes on one
//!   host may share the file.
//! - Every call is bounded by `timeout_ms` (also the server's statement
//!   timeout where it has one), waiting for a pooled connection by
//!   `acquire_timeout_ms`.
//! - The connection pool sends nothing of its own: no ping before lending
//!   a connection (sqlx's `test_before_acquire`) nor after taking it back
//!   (which sqlx's pool always does), so a statement is one round trip. A
//!   connection goes back to the pool only when its statement finished
//!   with a reply; one cut short (a timeout, a cancelled call) or failed on
//!   the connection is dropped. A connection that broke while idle (a
//!   restarted server, a killed session) fails the next call that uses it
//!   with a retryable error, once; the call after connects afresh. Idle
//!   connections are closed after 10 minutes, all after 30.
//! - A save under a lease granted by another lock service (a split store)
//!   checks and raises the lock's watermark in the writing statement
//!   (PostgreSQL: a CTE whose upsert takes the watermark row only when the
//!   lease's fence is not below it, and locks it until the commit; MySQL:
//!   the `foreign_put` procedure, one transaction holding the row; SQLite:
//!   one transaction, writers being serialized). The fence is checked
//!   before the mode, so a stale holder hears `Fenced`. A claim raises the
//!   watermark and then reads in one round trip (PostgreSQL: one
//!   statement; MySQL: the `claim` procedure, whose read follows the
//!   raise's commit; SQLite: an upsert, then a read).
//! - A conditional read ([`Store::get_if_changed`]) compares the version
//!   in the database, which sends the bytes only when it differs.
//! - Batches are native. [`Store::get_many`] is one statement per 256
//!   distinct names (`name IN (…)`), the size limit applied per row in
//!   the database as a single read applies it. [`Store::put_many`] gives
//!   each write exactly the outcome a single `put` would (its size
//!   checked first, then its own mode's condition, atomically with its
//!   write; a fresh random version each), in few round trips: in
//!   PostgreSQL one statement per group of up to 64 writes of distinct
//!   documents (creates, overwrites and updates each on their own
//!   condition, every write announced by `NOTIFY` from the statement); in
//!   MySQL one READ COMMITTED transaction per group (an insert of the
//!   creates that leaves existing rows alone, an upsert of the
//!   overwrites, one conditional update of the updates, then the versions
//!   of the rows it holds locked read back: a row holding its write's
//!   fresh version is one this transaction wrote; a group that meets a
//!   deadlock is rolled back whole and sent again); in SQLite every write
//!   in order in one transaction (one commit, one `fsync`, for the whole
//!   batch). A document written twice in a batch is written in order, its
//!   second write in a later group. A group the database refuses (a
//!   constraint or trigger, a full disk: nothing of it committed) is
//!   written again one write at a time, so each write gets its own
//!   outcome; a batch is not atomic as a whole.
//! - Milestones and attributes are rows upserted one field at a time: no
//!   lock, and marks of different fields never interfere.
//! - [`Store::head`] is one `SELECT` without the bytes; it and listings
//!   carry each document's modified time (`updated_at`, set by every
//!   write in the writing statement, by the database's clock).
//! - A store can run over the application's own sqlx pool
//!   ([`SqlStore::from_pool`]): same schema check and migrations, its
//!   connections given back only when clean.
//! - URL options the backend does not know are refused, not handed to
//!   sqlx (which would log them with their values); see [`SqlConfig`].
//!   Nothing here logs a URL, a password or an option value.

#![forbid(unsafe_code)]

mod config;
mod errors;
mod feeds;
#[cfg(feature = "postgres")]
mod listen;
mod pool;
mod schema;
mod statements;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::batch::{groups, settle, waves};
use runstate_core::events::{check_label, check_text};
use runstate_core::time::from_unix_millis;
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode, PutOptions,
    PutRequest, ReleaseSignals, Replay, Result, RunId, StatusMessage, Store, StoredDoc,
    Subscription, Version, WatchMode, Watcher, async_trait,
};
use sqlx::any::{AnyConnectOptions, AnyQueryResult, AnyRow};
use sqlx::{Any, Row};

pub use config::{
    DEFAULT_PREFIX, DEFAULT_STATUS_HISTORY, DEFAULT_TIMEOUT, DEFAULT_WATCH_INTERVAL, Dialect,
    SqlConfig,
};

use crate::errors::{map_error, map_error_during};
use crate::feeds::{Start, Wake};
use crate::pool::{Lent, Pool};
use crate::statements::{FencedKind, Statements, Stmt};

/// The SQL backend. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct SqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: SqlConfig,
    dialect: Dialect,
    pool: Arc<Pool>,
    /// Where lease-only writes go. SQLite: a pool committing without
    /// waiting for the disk (see `session_setup`); elsewhere `pool` itself.
    lease_pool: Arc<Pool>,
    sql: Statements,
    /// MariaDB 10.5+ (found at open): acquire-and-load is one
    /// `INSERT … RETURNING` instead of a procedure call.
    acquire_returning: bool,
    capabilities: Capabilities,
    /// Local releases, and in PostgreSQL those announced by the listener.
    signals: Arc<ReleaseSignals>,
    /// PostgreSQL's shared listener (watches, subscriptions, waiters).
    #[cfg(feature = "postgres")]
    hub: Option<Arc<listen::Hub>>,
}

/// A bind parameter.
#[derive(Clone, Copy)]
enum P<'a> {
    T(&'a str),
    I(i64),
    B(&'a [u8]),
}

fn query<'q>(
    stmt: &'q Stmt,
    params: &[P<'q>],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    let mut q = sqlx::query(sqlx::AssertSqlSafe(Arc::clone(&stmt.sql)));
    for n in &stmt.order {
        q = match params[usize::from(*n) - 1] {
            P::T(text) => q.bind(text),
            P::I(number) => q.bind(number),
            P::B(bytes) => q.bind(bytes),
        };
    }
    q
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// At most this many writes go in one statement (or, in MySQL, one
/// transaction) of a batch.
const BATCH_ROWS: usize = 64;

/// About this many bytes of documents go in one statement of a batch (a
/// larger document goes alone).
const BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Tries of one group of a batch that met transaction conflicts.
const GROUP_TRIES: u64 = 4;

fn new_version() -> i64 {
    fastrand::i64(1..i64::MAX)
}

/// The lease row's `doc` column: empty for a run lock.
fn lock_doc(key: &LockKey) -> &str {
    key.doc().map_or("", DocName::as_str)
}

impl SqlStore {
    /// Opens a pool (connecting once, so that bad settings and unreachable
    /// servers fail here), applies the migrations unless disabled, and
    /// checks the schema is there.
    ///
    /// # Errors
    /// `Config` for bad settings, refused credentials or a missing schema
    /// with migrations disabled; `Timeout` or retryable `Backend` errors
    /// when the server cannot be reached.
    pub async fn open(config: SqlConfig) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let dialect = config.dialect;
        let context = |e: Error| {
            e.with_operation(Operation::Open)
                .with_backend(dialect.name())
        };
        if config.driver_url.is_empty() {
            return Err(context(Error::new(
                ErrorKind::Config,
                "these settings have no URL (SqlConfig::new): open a store over the application's pool with SqlStore::from_pool",
            )));
        }
        let options: AnyConnectOptions = config
            .driver_url
            .parse()
            .map_err(|e| context(map_error_during(dialect, e, "parsing the database URL")))?;
        let new_pool = |leases_only: bool, max: u32| {
            Arc::new(Pool::new(
                dialect,
                options.clone(),
                session_setup(dialect, config.timeout, leases_only),
                max,
                config.acquire_timeout,
            ))
        };
        let pool = new_pool(false, config.max_connections);
        let lease_pool = if dialect == Dialect::Sqlite {
            new_pool(true, 2)
        } else {
            Arc::clone(&pool)
        };
        Self::assemble(config, pool, lease_pool).await
    }

    /// A store over a pool the application already has, as tower-sessions'
    /// stores take theirs: its statements run on the pool's connections,
    /// as many at once as the pool holds. Like [`open`](Self::open), it
    /// checks a connection now, applies the migrations unless
    /// `options` disable them, and checks the schema is there.
    ///
    /// The pool is an [`sqlx::AnyPool`] (connected to PostgreSQL, MySQL /
    /// MariaDB or SQLite, with the matching cargo feature on and
    /// [`sqlx::any::install_default_drivers`] called): runstate's
    /// statements run through sqlx's `Any` driver, and sqlx has no way to
    /// lend a `PgPool`'s connections as `Any` ones. `options` is
    /// [`SqlConfig::new`] (or a parsed URL's settings) for the pool's
    /// database; its pool size is ignored.
    ///
    /// The pool's own session settings are in force: runstate bounds every
    /// call by `options`' timeout on the client (a call cut short closes
    /// its connection instead of giving it back) but sets no server-side
    /// statement timeout. A connection that may hold an open transaction or
    /// whose statement did not finish cleanly is closed, not given back.
    /// [`close`](Self::close) leaves the pool open. PostgreSQL's watches
    /// listen on a connection of their own, opened with the pool's
    /// connect options.
    ///
    /// # Errors
    /// `Config` when the pool's database is not `options`' dialect, when a
    /// MySQL session's time zone observes daylight saving time (lease
    /// expiries are read from the session clock: set `time_zone =
    /// '+00:00'` in the pool's `after_connect`), for refused credentials,
    /// or a missing schema with migrations disabled; `Timeout` or retryable
    /// `Backend` errors when the server cannot be reached.
    pub async fn from_pool(pool: sqlx::AnyPool, options: SqlConfig) -> Result<SqlStore> {
        let dialect = options.dialect;
        let context = |e: Error| {
            e.with_operation(Operation::Open)
                .with_backend(dialect.name())
        };
        let url = pool.connect_options().database_url.clone();
        let pool_dialect = match url.scheme() {
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            "sqlite" => Some(Dialect::Sqlite),
            _ => None,
        };
        if pool_dialect != Some(dialect) {
            return Err(context(Error::new(
                ErrorKind::Config,
                format!(
                    "the pool connects to {}, the options are for {dialect}",
                    pool_dialect.map_or("another database", Dialect::name)
                ),
            )));
        }
        let mut config = options;
        // PostgreSQL's listener connects on its own, as the pool does.
        config.driver_url = url.to_string();
        let pool = Arc::new(Pool::shared(dialect, pool, config.acquire_timeout));
        if dialect == Dialect::MySql {
            check_session_time_zone(&pool, config.acquire_timeout + config.timeout)
                .await
                .map_err(context)?;
        }
        Self::assemble(config, Arc::clone(&pool), pool).await
    }

    /// The store over `pool` and `lease_pool`: connects once, applies the
    /// migrations unless disabled, checks the schema and learns limits.
    async fn assemble(
        config: SqlConfig,
        pool: Arc<Pool>,
        lease_pool: Arc<Pool>,
    ) -> Result<SqlStore> {
        let dialect = config.dialect;
        let context = |e: Error| {
            e.with_operation(Operation::Open)
                .with_backend(dialect.name())
        };
        // Connect once now, so that bad settings, refused credentials and
        // an unreachable server fail the open; the connection stays idle.
        let bound = config.acquire_timeout + config.timeout;
        for pool in [&pool, &lease_pool] {
            match tokio::time::timeout(bound, pool.get()).await {
                Ok(Ok(_lent)) => {}
                Ok(Err(e)) => return Err(context(map_error_during(dialect, e, "connecting"))),
                Err(_) => return Err(context(timed_out(dialect, bound))),
            }
        }
        let signals = Arc::new(ReleaseSignals::new());
        #[cfg(feature = "postgres")]
        let hub = match dialect {
            Dialect::Postgres => Some(Arc::new(
                listen::Hub::new(
                    &config.driver_url,
                    statements::channel(&config.prefix),
                    bound,
                    Arc::clone(&signals),
                )
                .map_err(context)?,
            )),
            _ => None,
        };
        let store = SqlStore {
            inner: Arc::new(Inner {
                sql: Statements::new(dialect, &config.prefix),
                acquire_returning: false,
                capabilities: Capabilities::full(dialect.name())
                    .with_multi_host(dialect != Dialect::Sqlite)
                    .with_max_document_size(Some(match dialect {
                        Dialect::Postgres | Dialect::Sqlite => 1_000_000_000,
                        Dialect::MySql => 0,
                    }))
                    .with_foreign_fencing(true)
                    .with_native_conditional_get(true)
                    .with_modified_times(true)
                    .with_status(true)
                    .with_milestones(true)
                    .with_watch(match dialect {
                        Dialect::Postgres => WatchMode::Native { every_write: true },
                        _ => WatchMode::Polling(config.watch_interval),
                    }),
                dialect,
                pool,
                lease_pool,
                config,
                signals,
                #[cfg(feature = "postgres")]
                hub,
            }),
        };
        if store.inner.config.migrate {
            store.migrate().await?;
        }
        let store = store.with_probed_limits().await?;
        // The dialect and prefix only: the URL and its options stay out of
        // logs, redacted or not.
        tracing::debug!(
            dialect = dialect.name(),
            prefix = %store.inner.config.prefix,
            "sql store open"
        );
        Ok(store)
    }

    /// Parses `url` (see [`SqlConfig::from_url`]) and opens the store.
    ///
    /// # Errors
    /// As [`SqlConfig::from_url`] and [`SqlStore::open`].
    pub async fn connect(url: &str) -> Result<SqlStore> {
        Self::open(SqlConfig::from_url(url)?).await
    }

    /// Checks the schema and learns the server's document size limit
    /// (MySQL's `max_allowed_packet`).
    async fn with_probed_limits(self) -> Result<SqlStore> {
        let inner = &self.inner;
        let probe = format!(
            "SELECT COUNT(*) FROM {}documents WHERE 1 = 0",
            inner.config.prefix
        );
        inner
            .bounded(async {
                let mut conn = inner.pool.get().await?;
                conn.fetch_optional(sqlx::raw_sql(sqlx::AssertSqlSafe(probe)))
                    .await
            })
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        if inner.dialect != Dialect::MySql {
            return Ok(self);
        }
        let row = inner
            .bounded(async {
                let mut conn = inner.pool.get().await?;
                conn.fetch_optional(sqlx::raw_sql(
                    "SELECT CAST(@@max_allowed_packet AS SIGNED), CAST(VERSION() AS CHAR)",
                ))
                .await
            })
            .await
            .map_err(|e| e.with_operation(Operation::Open))?
            .ok_or_else(|| unexpected(inner.dialect, "no max_allowed_packet"))?;
        let packet: i64 = row.try_get(0).map_err(|e| map_error(inner.dialect, e))?;
        let version: String = row.try_get(1).map_err(|e| map_error(inner.dialect, e))?;
        // Room for the statement and the other columns around the bytes.
        let max = u64::try_from(packet).unwrap_or(0).saturating_sub(64 * 1024);
        let mut inner = Arc::try_unwrap(self.inner)
            .map_err(|_| Error::new(ErrorKind::Backend, "store shared during open"))?;
        inner.capabilities = inner.capabilities.clone().with_max_document_size(Some(max));
        inner.acquire_returning =
            inner.config.mariadb_returning && mariadb_with_returning(&version);
        tracing::debug!(
            returning = inner.acquire_returning,
            "mysql server flavour probed"
        );
        Ok(SqlStore {
            inner: Arc::new(inner),
        })
    }

    /// Applies the embedded migrations that are not applied yet, under a
    /// database lock so that concurrent openers take turns; returns how many
    /// were applied. For operators who open stores with `migrate=false` and
    /// run DDL separately.
    ///
    /// # Errors
    /// Database errors (permissions, a held migration lock).
    pub async fn migrate(&self) -> Result<usize> {
        let inner = &self.inner;
        let dialect = inner.dialect;
        let mut conn = inner
            .bounded(inner.pool.get())
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        let wait = inner.config.timeout.max(Duration::from_secs(30));
        let raw = conn
            .raw()
            .map_err(|e| map_error(dialect, e).with_operation(Operation::Open))?;
        let outcome = tokio::time::timeout(
            wait * 2,
            schema::migrate(raw, dialect, &inner.config.prefix, wait),
        )
        .await
        .map_err(|_| timed_out(dialect, wait * 2).with_operation(Operation::Open))?;
        // A failed migration may leave its lock (a session-level one in
        // PostgreSQL) on the connection: only a clean one goes back.
        conn.keep(outcome.is_ok());
        outcome
    }

    /// Drops every table (and procedure) of this store's prefix. Destroys
    /// all its documents and lease history; for tests and decommissioning.
    ///
    /// # Errors
    /// Database errors.
    pub async fn uninstall(&self) -> Result<()> {
        let inner = &self.inner;
        let mut conn = inner.bounded(inner.pool.get()).await?;
        let raw = conn.raw().map_err(|e| map_error(inner.dialect, e))?;
        let outcome = schema::drop_all(raw, inner.dialect, &inner.config.prefix).await;
        conn.keep(outcome.is_ok());
        outcome
    }

    /// The settings (password redacted when printed).
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// Closes the pool: idle connections now, lent ones when their call
    /// ends; later calls fail. Watches and subscriptions still open keep
    /// PostgreSQL's listening connection until they are dropped.
    pub async fn close(&self) {
        self.inner.pool.close().await;
        self.inner.lease_pool.close().await;
    }
}

/// Statements run on every new connection, each with whether it may fail
/// without failing the connection. SQLite's lease-only pool
/// commits without waiting for the disk (`synchronous = NORMAL` in WAL
/// mode): a grant survives a process crash, and the next document save's
/// fsync of the log makes it durable; only an OS crash or power loss right
/// after a grant can forget it, as the file backend's lease records can —
/// harmless, since every holder dies with the machine.
fn session_setup(dialect: Dialect, timeout: Duration, leases_only: bool) -> Vec<(String, bool)> {
    let required = |sql: String| (sql, false);
    match dialect {
        Dialect::Postgres => vec![required(format!("SET statement_timeout = {}", ms(timeout)))],
        // MariaDB: max_statement_time (seconds); MySQL: max_execution_time
        // (ms). Each server lacks the other's, so either may fail.
        Dialect::MySql => vec![
            (
                format!(
                    "SET SESSION max_statement_time = {:.3}",
                    timeout.as_secs_f64()
                ),
                true,
            ),
            (
                format!("SET SESSION max_execution_time = {}", ms(timeout)),
                true,
            ),
            required("SET SESSION time_zone = '+00:00'".to_owned()),
        ],
        Dialect::Sqlite => vec![
            required("PRAGMA journal_mode = WAL".to_owned()),
            required(format!("PRAGMA busy_timeout = {}", ms(timeout))),
            required(format!(
                "PRAGMA synchronous = {}",
                if leases_only { "NORMAL" } else { "FULL" }
            )),
        ],
    }
}

/// Whether a MySQL-protocol server whose `VERSION()` is `version` is
/// MariaDB 10.5 or later, which has `INSERT … RETURNING`
/// (`10.11.6-MariaDB-0+deb12u1`; MySQL's, `8.0.36`, names no flavour).
fn mariadb_with_returning(version: &str) -> bool {
    if !version.to_ascii_lowercase().contains("mariadb") {
        return false;
    }
    // Old MariaDB announced itself as `5.5.5-10.x` to MySQL clients.
    let version = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut numbers = version
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (10, 5),
        _ => false,
    }
}

/// Refuses a MySQL session whose time zone observes daylight saving time:
/// lease clocks are read as `UNIX_TIMESTAMP(NOW(6))`, which is ambiguous
/// for an hour a year in such a zone. A fixed offset (`+00:00`, runstate's
/// own sessions), UTC, or `SYSTEM` on a server running in UTC passes.
async fn check_session_time_zone(pool: &Pool, bound: Duration) -> Result<()> {
    let dialect = Dialect::MySql;
    let row = match tokio::time::timeout(bound, async {
        let mut conn = pool.get().await?;
        conn.fetch_optional(sqlx::raw_sql(
            "SELECT CAST(@@session.time_zone AS CHAR), CAST(@@system_time_zone AS CHAR)",
        ))
        .await
    })
    .await
    {
        Ok(outcome) => outcome.map_err(|e| map_error_during(dialect, e, "connecting"))?,
        Err(_) => return Err(timed_out(dialect, bound)),
    };
    let row = row.ok_or_else(|| unexpected(dialect, "no time zone"))?;
    let zone: String = row.try_get(0).map_err(|e| map_error(dialect, e))?;
    let system: String = row.try_get(1).map_err(|e| map_error(dialect, e))?;
    if time_zone_without_daylight_saving(&zone, &system) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "the pool's sessions run in time zone {zone:?}, which may observe daylight saving \
             time; set time_zone = '+00:00' in the pool's after_connect"
        ),
    )
    .with_backend(dialect.name()))
}

/// Whether a MySQL session in time zone `zone` (`@@session.time_zone`),
/// on a server in `system` (`@@system_time_zone`), keeps a clock without
/// daylight saving time: a fixed offset, UTC, or `SYSTEM` in UTC.
fn time_zone_without_daylight_saving(zone: &str, system: &str) -> bool {
    let utc = |name: &str| {
        [
            "UTC",
            "GMT",
            "Etc/UTC",
            "Etc/GMT",
            "Universal",
            "Zulu",
            "Coordinated Universal Time",
        ]
        .iter()
        .any(|u| name.eq_ignore_ascii_case(u))
    };
    let fixed = |name: &str| {
        let b = name.as_bytes();
        matches!(b.first(), Some(b'+' | b'-'))
            && name[1..].split_once(':').is_some_and(|(h, m)| {
                !h.is_empty()
                    && !m.is_empty()
                    && h.bytes().all(|c| c.is_ascii_digit())
                    && m.bytes().all(|c| c.is_ascii_digit())
            })
    };
    fixed(zone) || utc(zone) || (zone.eq_ignore_ascii_case("SYSTEM") && utc(system))
}

fn timed_out(dialect: Dialect, bound: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "no answer from the database within {}",
            runstate_core::time::Short(bound)
        ),
    )
    .with_backend(dialect.name())
    .set_retryable(true)
}

fn unexpected(dialect: Dialect, what: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("unexpected reply from the database: {what}"),
    )
    .with_backend(dialect.name())
}

impl Inner {
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    /// Runs `request` (lending a connection included) within the call
    /// bound. A request cut short drops its connection (see [`pool`]).
    async fn bounded<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.timeout, request).await {
            Ok(outcome) => outcome.map_err(|e| map_error(self.dialect, e)),
            Err(_) => Err(timed_out(self.dialect, self.config.timeout)),
        }
    }

    async fn execute_on(
        &self,
        pool: &Pool,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<AnyQueryResult> {
        self.bounded(async {
            let mut conn = pool.get().await?;
            conn.execute(query(stmt, params)).await
        })
        .await
    }

    async fn fetch_optional_on(
        &self,
        pool: &Pool,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<Option<AnyRow>> {
        self.bounded(async {
            let mut conn = pool.get().await?;
            conn.fetch_optional(query(stmt, params)).await
        })
        .await
    }

    async fn execute(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.execute_on(&self.pool, stmt, params).await
    }

    async fn execute_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.execute_on(&self.lease_pool, stmt, params).await
    }

    async fn fetch_optional_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Option<AnyRow>> {
        self.fetch_optional_on(&self.lease_pool, stmt, params).await
    }

    async fn fetch_optional(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Option<AnyRow>> {
        self.fetch_optional_on(&self.pool, stmt, params).await
    }

    async fn fetch_all(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Vec<AnyRow>> {
        self.bounded(async {
            let mut conn = self.pool.get().await?;
            conn.fetch_all(query(stmt, params)).await
        })
        .await
    }

    /// Runs a statement that changes rows and returns how many: from the
    /// command tag, or from its first column for statements that announce
    /// their change in PostgreSQL ([`Stmt::counted`]).
    async fn affected_on(&self, pool: &Pool, stmt: &Stmt, params: &[P<'_>]) -> Result<u64> {
        if stmt.counted {
            let row = self
                .fetch_optional_on(pool, stmt, params)
                .await?
                .ok_or_else(|| unexpected(self.dialect, "no row count"))?;
            Ok(u64::try_from(self.get_i64(&row, 0)?).unwrap_or(0))
        } else {
            Ok(self.execute_on(pool, stmt, params).await?.rows_affected())
        }
    }

    async fn affected(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<u64> {
        self.affected_on(&self.pool, stmt, params).await
    }

    async fn affected_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<u64> {
        self.affected_on(&self.lease_pool, stmt, params).await
    }

    /// Begins a transaction on a connection of `pool` (SQLite: taking the
    /// write lock at once, under the busy timeout).
    async fn begin<'p>(&'p self, pool: &'p Pool) -> Result<Tx<'p>> {
        let begin = match self.dialect {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::MySql => "START TRANSACTION",
            Dialect::Postgres => "BEGIN",
        };
        self.begin_with(pool, begin).await
    }

    /// Begins a transaction on a connection of `pool` with `begin`.
    async fn begin_with<'p>(&'p self, pool: &'p Pool, begin: &'static str) -> Result<Tx<'p>> {
        let mut conn = self.bounded(pool.get()).await?;
        self.bounded(conn.begin(begin)).await?;
        Ok(Tx { inner: self, conn })
    }

    /// The modified time in column `index` (ms since the epoch, see
    /// `statements::modified_ms`); a time before the epoch reads as it.
    fn modified_at(&self, row: &AnyRow, index: usize) -> Result<SystemTime> {
        Ok(from_unix_millis(
            u64::try_from(self.get_i64(row, index)?).unwrap_or(0),
        ))
    }

    fn get_i64(&self, row: &AnyRow, index: usize) -> Result<i64> {
        row.try_get::<i64, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }

    fn get_opt_i64(&self, row: &AnyRow, index: usize) -> Result<Option<i64>> {
        row.try_get::<Option<i64>, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }

    fn get_text(&self, row: &AnyRow, index: usize) -> Result<String> {
        row.try_get::<String, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }

    /// A holder from columns owner, fence, since, expires-in at `at`.
    fn holder_at(&self, key: &LockKey, row: &AnyRow, at: usize) -> Result<LockInfo> {
        let owner: Owner = serde_json::from_str(&self.get_text(row, at)?)
            .map_err(|_| unexpected(self.dialect, "lease owner"))?;
        Ok(LockInfo::new(
            key.clone(),
            owner,
            Fence(u64::try_from(self.get_i64(row, at + 1)?).unwrap_or(0)),
            from_unix_millis(u64::try_from(self.get_i64(row, at + 2)?).unwrap_or(0)),
            Duration::from_millis(u64::try_from(self.get_i64(row, at + 3)?).unwrap_or(0)),
        ))
    }

    async fn holder(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let row = self
            .fetch_optional(
                &self.sql.holder,
                &[P::T(key.run().as_str()), P::T(lock_doc(key))],
            )
            .await?;
        row.map(|row| self.holder_at(key, &row, 0)).transpose()
    }

    fn locked(&self, key: &LockKey, holder: Option<LockInfo>, op: Operation) -> Error {
        let mut error = Error::new(ErrorKind::Locked, "the lock is held")
            .with_backend(self.backend())
            .with_operation(op)
            .with_lock(key);
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    fn too_large(&self, size: i64, limit: Option<u64>) -> Error {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "document is {size} bytes, over the limit of {}",
                limit.unwrap_or(0)
            ),
        )
        .with_backend(self.backend())
    }

    /// A document from columns version, size, bytes-or-NULL at `at`.
    fn stored_at(&self, row: &AnyRow, at: usize, limit: Option<u64>) -> Result<Option<StoredDoc>> {
        let Some(version) = self.get_opt_i64(row, at)? else {
            return Ok(None);
        };
        let size = self.get_i64(row, at + 1)?;
        let bytes: Option<Vec<u8>> = row
            .try_get(at + 2)
            .map_err(|e| map_error(self.dialect, e))?;
        match bytes {
            Some(bytes) => Ok(Some(StoredDoc::new(
                Bytes::from(bytes),
                Version::new(version.to_string()),
            ))),
            None => Err(self.too_large(size, limit)),
        }
    }

    fn limit(options: GetOptions) -> i64 {
        options
            .limit
            .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
    }

    fn check_size(&self, bytes: &[u8]) -> Result<()> {
        if let Some(max) = self.capabilities.max_document_size
            && bytes.len() as u64 > max
        {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "document is {} bytes, over the database's limit of {max}",
                    bytes.len()
                ),
            )
            .with_backend(self.backend()));
        }
        Ok(())
    }

    fn lease_lost(&self, lease: &Lease, holder: Option<LockInfo>, op: Operation) -> Error {
        let why = match &holder {
            Some(h) if h.fence != lease.fence() => "the lock was taken over by a newer grant",
            Some(_) => "the lock is held by another owner",
            None => "the lease expired, was released or was broken",
        };
        let mut error = Error::new(ErrorKind::LeaseLost, why)
            .with_backend(self.backend())
            .with_operation(op)
            .with_lock(lease.key());
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    fn fenced(&self, lease: &Lease, holder: Option<LockInfo>) -> Error {
        let mut error = Error::new(
            ErrorKind::Fenced,
            format!(
                "lease with fence {} is no longer the current grant of its lock; nothing was written",
                lease.fence()
            ),
        )
        .with_backend(self.backend())
        .with_lock(lease.key());
        if let Some(holder) = holder {
            error = error.with_holder(holder);
        }
        error
    }

    fn refused(&self, mode: &PutMode) -> Error {
        match mode {
            PutMode::Create => Error::new(ErrorKind::AlreadyExists, "the document already exists")
                .with_backend(self.backend()),
            PutMode::Update(v) => Error::new(
                ErrorKind::Precondition,
                format!("the stored version is not the expected {v}"),
            )
            .with_backend(self.backend()),
            PutMode::Overwrite => unexpected(self.dialect, "an overwrite was refused"),
        }
    }

    /// The expected version of an update; a token this backend never made
    /// can match nothing.
    fn expected(mode: &PutMode) -> Option<i64> {
        match mode {
            PutMode::Update(v) => Some(v.as_str().parse().unwrap_or(0)),
            _ => None,
        }
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
    ) -> Result<Version> {
        self.check_size(bytes)?;
        let version = new_version();
        let size = bytes.len() as i64;
        let params = [
            P::T(run.as_str()),
            P::T(doc.as_str()),
            P::I(version),
            P::B(bytes),
            P::I(size),
            P::I(Self::expected(mode).unwrap_or(0)),
        ];
        let stmt = match mode {
            PutMode::Overwrite => &self.sql.put_overwrite,
            PutMode::Create => &self.sql.put_create,
            PutMode::Update(_) => &self.sql.put_update,
        };
        let changed = self.affected(stmt, &params).await?;
        if matches!(mode, PutMode::Update(_)) && changed == 0 {
            return Err(self.refused(mode));
        }
        Ok(Version::new(version.to_string()))
    }

    /// A write under a lease granted by another lock service: refused with
    /// `Fenced` (writing nothing) when the lock's watermark is above the
    /// lease's fence, checked before the mode; otherwise the watermark is
    /// raised to the fence and the write made with its mode's check, all
    /// in one statement (PostgreSQL), procedure call (MySQL) or
    /// transaction (SQLite).
    async fn foreign_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
    ) -> Result<Version> {
        let key = lease.key();
        let run = key.run();
        key.check_covers(run, doc)?;
        self.check_size(bytes)?;
        let fence = fence_i64(lease.fence())?;
        let version = new_version();
        let kind = FencedKind::of(mode);
        let expected = Self::expected(mode).unwrap_or(0);
        let (accepted, written) = match self.dialect {
            Dialect::Postgres | Dialect::MySql => {
                let params = [
                    P::T(run.as_str()),
                    P::T(doc.as_str()),
                    P::I(version),
                    P::B(bytes),
                    P::I(bytes.len() as i64),
                    P::T(lock_doc(key)),
                    P::I(fence),
                    P::I(expected),
                    P::I(kind as i64),
                ];
                let row = self
                    .fetch_optional(&self.sql.foreign[kind as usize], &params)
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a fenced write"))?;
                (
                    self.get_opt_i64(&row, 0)?.unwrap_or(0) > 0,
                    self.get_opt_i64(&row, 1)?.unwrap_or(0) > 0,
                )
            }
            Dialect::Sqlite => {
                let mut tx = self.begin(&self.pool).await?;
                let outcome = async {
                    let raised = tx
                        .fetch_optional(
                            &self.sql.mark,
                            &[P::T(run.as_str()), P::T(lock_doc(key)), P::I(fence)],
                        )
                        .await?
                        .is_some();
                    if !raised {
                        return Ok((false, false));
                    }
                    let params = [
                        P::T(run.as_str()),
                        P::T(doc.as_str()),
                        P::I(version),
                        P::B(bytes),
                        P::I(bytes.len() as i64),
                        P::I(expected),
                    ];
                    let stmt = match kind {
                        FencedKind::Overwrite => &self.sql.put_overwrite,
                        FencedKind::Create => &self.sql.put_create,
                        FencedKind::Update => &self.sql.put_update,
                    };
                    // A refused condition keeps the raised watermark, as in
                    // the other dialects: the lease is current.
                    match tx.execute(stmt, &params).await {
                        Ok(done) => {
                            Ok((true, kind != FencedKind::Update || done.rows_affected() > 0))
                        }
                        Err(error) if error.kind() == ErrorKind::AlreadyExists => Ok((true, false)),
                        Err(error) => Err(error),
                    }
                }
                .await;
                tx.finish(outcome).await?
            }
        };
        if !accepted {
            return Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "lease with fence {} is older than a fence already claimed here for its lock; \
                     nothing was written",
                    lease.fence()
                ),
            )
            .with_backend(self.backend())
            .with_lock(key));
        }
        if !written {
            return Err(self.refused(mode));
        }
        Ok(Version::new(version.to_string()))
    }

    /// Raises `key`'s watermark to `fence` unless it is above it, then
    /// reads `doc` (PostgreSQL: one statement; MySQL: one procedure call;
    /// SQLite: a raise, then a read that sees every commit before it).
    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let run = key.run();
        if let Some(doc) = doc {
            key.check_covers(run, doc)?;
        }
        let fence_value = fence_i64(fence)?;
        let refused = || {
            Error::new(
                ErrorKind::Fenced,
                format!("fence {fence} is older than a fence already claimed here for this lock"),
            )
            .with_backend(self.backend())
            .with_lock(key)
        };
        let loaded = match self.dialect {
            Dialect::Postgres | Dialect::MySql => {
                let row = self
                    .fetch_optional(
                        &self.sql.claim,
                        &[
                            P::T(run.as_str()),
                            P::T(lock_doc(key)),
                            P::I(fence_value),
                            P::T(doc.map_or("", DocName::as_str)),
                            P::I(Self::limit(options)),
                        ],
                    )
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a claim"))?;
                if self.get_opt_i64(&row, 0)?.unwrap_or(0) <= 0 {
                    return Err(refused());
                }
                match doc {
                    None => return Ok(None),
                    Some(_) => self.stored_at(&row, 1, options.limit)?,
                }
            }
            Dialect::Sqlite => {
                let raised = self
                    .fetch_optional_lease(
                        &self.sql.mark,
                        &[P::T(run.as_str()), P::T(lock_doc(key)), P::I(fence_value)],
                    )
                    .await?;
                if raised.is_none() {
                    return Err(refused());
                }
                None
            }
        };
        match (doc, loaded) {
            (None, _) => Ok(None),
            (Some(_), Some(stored)) => Ok(Some(stored)),
            // SQLite reads now; PostgreSQL's statement may have waited for
            // a save that created the document, which its snapshot does
            // not show (as in acquire-and-load): read it again. MySQL's
            // read follows the raise's commit, so absent is absent.
            (Some(doc), None) if self.dialect != Dialect::MySql => {
                self.get(run, doc, options).await
            }
            (Some(_), None) => Ok(None),
        }
    }

    /// Reads `doc` unless its version is `known`: the version column is
    /// compared in the database, which sends the bytes only when it
    /// differs (and the size allows).
    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        // Only a version this backend made can match (it prints as it was
        // parsed); anything else is compared as 0, which no version is.
        let known = known
            .as_str()
            .parse::<i64>()
            .ok()
            .filter(|v| v.to_string() == known.as_str())
            .unwrap_or(0);
        let row = self
            .fetch_optional(
                &self.sql.get_if_changed,
                &[
                    P::T(run.as_str()),
                    P::T(doc.as_str()),
                    P::I(known),
                    P::I(Self::limit(options)),
                ],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Fetched::Absent);
        };
        if self.get_i64(&row, 0)? == known {
            return Ok(Fetched::Unchanged);
        }
        match self.stored_at(&row, 0, options.limit)? {
            Some(stored) => Ok(Fetched::Changed(stored)),
            None => Ok(Fetched::Absent),
        }
    }

    /// Deletes a run's documents and its milestones; returns how many
    /// documents there were.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let params = [P::T(run.as_str())];
        if self.dialect == Dialect::Postgres {
            return self.affected(&self.sql.delete_run, &params).await;
        }
        let mut tx = self.begin(&self.pool).await?;
        let outcome = async {
            tx.execute(&self.sql.delete_milestones, &params).await?;
            Ok(tx
                .execute(&self.sql.delete_run, &params)
                .await?
                .rows_affected())
        }
        .await;
        tx.finish(outcome).await
    }

    /// Appends a status message to `run`'s history, trimming it to the
    /// configured length, and returns its number.
    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<u64> {
        let at = i64::try_from(runstate_core::time::unix_millis(SystemTime::now())).unwrap_or(0);
        let keep = i64::try_from(self.config.status_history).unwrap_or(i64::MAX);
        let seq = match self.dialect {
            Dialect::Postgres | Dialect::MySql => {
                let row = self
                    .fetch_optional(
                        &self.sql.publish,
                        &[
                            P::T(run.as_str()),
                            P::T(topic),
                            P::T(text),
                            P::I(at),
                            P::I(keep),
                        ],
                    )
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a publish"))?;
                self.get_i64(&row, 0)?
            }
            Dialect::Sqlite => {
                // Status messages commit like lease grants (see
                // `session_setup`): a process crash keeps them.
                let mut tx = self.begin(&self.lease_pool).await?;
                let outcome = async {
                    let row = tx
                        .fetch_optional(&self.sql.status_next, &[P::T(run.as_str())])
                        .await?
                        .ok_or_else(|| unexpected(self.dialect, "no message number"))?;
                    let seq = self.get_i64(&row, 0)?;
                    tx.execute(
                        &self.sql.status_insert,
                        &[
                            P::T(run.as_str()),
                            P::I(seq),
                            P::T(topic),
                            P::T(text),
                            P::I(at),
                        ],
                    )
                    .await?;
                    tx.execute(
                        &self.sql.status_trim,
                        &[P::T(run.as_str()), P::I(seq.saturating_sub(keep))],
                    )
                    .await?;
                    Ok(seq)
                }
                .await;
                tx.finish(outcome).await?
            }
        };
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// `run`'s messages numbered after `after`, in order, at most `limit`.
    async fn status_since(
        &self,
        run: &RunId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StatusMessage)>> {
        let rows = self
            .fetch_all(
                &self.sql.status_since,
                &[
                    P::T(run.as_str()),
                    P::I(i64::try_from(after).unwrap_or(i64::MAX)),
                    P::I(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let seq = u64::try_from(self.get_i64(row, 0)?).unwrap_or(0);
                Ok((
                    seq,
                    feeds::message(
                        seq,
                        self.get_text(row, 1)?,
                        self.get_text(row, 2)?,
                        self.get_i64(row, 3)?,
                    ),
                ))
            })
            .collect()
    }

    /// The number of `run`'s last status message (0 before the first).
    async fn status_last(&self, run: &RunId) -> Result<u64> {
        let row = self
            .fetch_optional(&self.sql.status_last, &[P::T(run.as_str())])
            .await?;
        Ok(match row {
            Some(row) => u64::try_from(self.get_i64(&row, 0)?).unwrap_or(0),
            None => 0,
        })
    }

    async fn set_milestone(&self, run: &RunId, kind: &str, name: &str, value: &str) -> Result<()> {
        self.execute(
            &self.sql.set_milestone,
            &[P::T(run.as_str()), P::T(kind), P::T(name), P::T(value)],
        )
        .await
        .map(drop)
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let rows = self
            .fetch_all(&self.sql.milestones, &[P::T(run.as_str())])
            .await?;
        let mut milestones = Milestones::default();
        for row in &rows {
            let (kind, name, value) = (
                self.get_text(row, 0)?,
                self.get_text(row, 1)?,
                self.get_text(row, 2)?,
            );
            match kind.as_str() {
                TIMESTAMPS => {
                    let at = parse_timestamp(&value)
                        .ok_or_else(|| unexpected(self.dialect, "milestone timestamp"))?;
                    milestones.timestamps.insert(name, at);
                }
                ATTRS => {
                    milestones.attrs.insert(name, value);
                }
                // A kind a later version may add.
                _ => {}
            }
        }
        Ok(milestones)
    }

    /// A write fenced by `lease`. With `release`, the lease is given up
    /// whatever happens, unless it is no longer this grant (`Fenced`,
    /// `LeaseLost`): in the writing statement or transaction where the
    /// database allows, otherwise right after; and when the write fails
    /// early (a lease that does not cover `doc`, a document over the size
    /// limit) or with an error (a constraint or trigger refusing the row,
    /// a full disk, a lost connection, which in PostgreSQL also undoes the
    /// release made by the same statement), by a release of its own.
    async fn fenced_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        release: bool,
    ) -> Result<Version> {
        let mut released = false;
        let outcome = self
            .fenced_write(lease, doc, bytes, mode, release, &mut released)
            .await;
        if release
            && !released
            && let Err(error) = &outcome
            && !matches!(error.kind(), ErrorKind::Fenced | ErrorKind::LeaseLost)
            && let Err(release_error) = self.release(lease).await
        {
            tracing::debug!(error = %release_error, "release after a failed save");
        }
        outcome
    }

    /// The write of [`Inner::fenced_put`]; sets `released` once the lease
    /// was given up (or a release was tried) on the way.
    async fn fenced_write(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        release: bool,
        released: &mut bool,
    ) -> Result<Version> {
        let run = lease.key().run();
        lease.key().check_covers(run, doc)?;
        self.check_size(bytes)?;
        let version = new_version();
        let fence = i64::try_from(lease.fence().get()).unwrap_or(i64::MAX);
        let kind = FencedKind::of(mode);
        let params = [
            P::T(run.as_str()),
            P::T(doc.as_str()),
            P::I(version),
            P::B(bytes),
            P::I(bytes.len() as i64),
            P::T(lock_doc(lease.key())),
            P::T(lease.owner().id()),
            P::I(fence),
            P::I(Self::expected(mode).unwrap_or(0)),
        ];
        let lease_params = [
            P::T(run.as_str()),
            P::T(lock_doc(lease.key())),
            P::T(lease.owner().id()),
            P::I(fence),
        ];
        let stmt = &self.sql.fenced[kind as usize][usize::from(release)];
        let written = match self.dialect {
            Dialect::Postgres => {
                // One statement: when it fails, its release is undone too,
                // and `fenced_put` releases.
                let row = self
                    .fetch_optional(stmt, &params)
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a fenced write"))?;
                let lease_ok = self.get_i64(&row, 0)? > 0;
                let written = self.get_i64(&row, 1)? > 0;
                if !lease_ok {
                    return Err(self.fenced(lease, self.holder(lease.key()).await.ok().flatten()));
                }
                *released = release;
                written
            }
            Dialect::Sqlite if release => {
                // One transaction, so one commit (and one fsync) for the
                // write and the release. BEGIN IMMEDIATE takes the write
                // lock first, under the busy timeout.
                let mut conn = self.bounded(self.pool.get()).await?;
                self.bounded(conn.begin("BEGIN IMMEDIATE")).await?;
                // The write checks the lease itself; the release frees it
                // only if it is still this grant, and says whether it was.
                // On any error the transaction is rolled back (or the
                // connection dropped, which rolls it back) and
                // `fenced_put` releases on another connection.
                let written = match self.bounded(conn.execute(query(stmt, &params))).await {
                    Ok(done) => done.rows_affected() > 0,
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => false,
                    Err(error) => {
                        let _ = self.bounded(conn.end("ROLLBACK")).await;
                        return Err(error);
                    }
                };
                let freed = match self
                    .bounded(conn.execute(query(&self.sql.release, &lease_params)))
                    .await
                {
                    Ok(done) => done.rows_affected() > 0,
                    Err(error) => {
                        let _ = self.bounded(conn.end("ROLLBACK")).await;
                        return Err(error);
                    }
                };
                if !freed {
                    // Not the current grant: the write was refused too.
                    let _ = self.bounded(conn.end("ROLLBACK")).await;
                    drop(conn);
                    return Err(self.fenced(lease, self.holder(lease.key()).await.ok().flatten()));
                }
                self.bounded(conn.end("COMMIT")).await?;
                *released = true;
                written
            }
            Dialect::MySql | Dialect::Sqlite => {
                // MySQL's inserts and SQLite without release: the write
                // statement does not release the lease.
                let released_in_statement =
                    self.dialect == Dialect::MySql && kind == FencedKind::Update;
                let written = match self.execute(stmt, &params).await {
                    Ok(done) => done.rows_affected() > 0,
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => false,
                    Err(error) => return Err(error),
                };
                if !written {
                    // Refused: tell a lost lease from a failed condition.
                    let current = self
                        .fetch_optional(&self.sql.lease_is_current, &lease_params)
                        .await?
                        .is_some();
                    if !current {
                        return Err(
                            self.fenced(lease, self.holder(lease.key()).await.ok().flatten())
                        );
                    }
                    return Err(self.refused(mode));
                }
                if release && !released_in_statement {
                    // Saved: a release that fails now only means the lease
                    // runs out by its TTL.
                    if let Err(error) = self.release(lease).await {
                        tracing::debug!(%error, "release after a fenced write");
                    }
                }
                *released = release;
                true
            }
        };
        if written {
            Ok(Version::new(version.to_string()))
        } else {
            Err(self.refused(mode))
        }
    }

    async fn try_acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        issued: Instant,
    ) -> Result<Lease> {
        let ttl_ms = ttl_ms(self.dialect, key, ttl)?;
        let owner_json = owner_json(owner)?;
        let params = [
            P::T(key.run().as_str()),
            P::T(lock_doc(key)),
            P::T(&owner_json),
            P::T(owner.id()),
            P::I(ttl_ms),
        ];
        // The grant's fence, and its start by the database's clock where
        // the reply says it (MySQL's reports the fence only).
        let (fence, since) = match self.dialect {
            Dialect::Postgres | Dialect::Sqlite => {
                let row = self
                    .fetch_optional_lease(&self.sql.acquire, &params)
                    .await?;
                match row {
                    Some(row) => {
                        let since = self.get_i64(&row, 1)?;
                        (
                            self.get_i64(&row, 0)?,
                            from_unix_millis(u64::try_from(since).unwrap_or(0)),
                        )
                    }
                    None => (0, SystemTime::now()),
                }
            }
            Dialect::MySql => {
                let done = self.execute_lease(&self.sql.acquire, &params).await?;
                (done.last_insert_id().unwrap_or(0), SystemTime::now())
            }
        };
        if fence <= 0 {
            return Err(self.locked(key, self.holder(key).await?, Operation::Acquire));
        }
        Ok(Lease::new(
            key.clone(),
            owner.clone(),
            Fence(fence as u64),
            ttl,
            issued,
            since,
        ))
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
        issued: Instant,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        key.check_covers(key.run(), doc)?;
        if self.dialect == Dialect::Sqlite {
            // Local calls: acquire, then read (a read begun after the grant
            // sees every commit that preceded it).
            let lease = self.try_acquire(key, owner, ttl, issued).await?;
            return match self.get(key.run(), doc, options).await {
                Ok(stored) => Ok((lease, stored)),
                Err(error) => {
                    let _ = self.release(&lease).await;
                    Err(error)
                }
            };
        }
        let ttl_ms = ttl_ms(self.dialect, key, ttl)?;
        let owner_json = owner_json(owner)?;
        let params = [
            P::T(key.run().as_str()),
            P::T(lock_doc(key)),
            P::T(&owner_json),
            P::T(owner.id()),
            P::I(ttl_ms),
            P::T(doc.as_str()),
            P::I(Self::limit(options)),
        ];
        let stmt = if self.acquire_returning {
            &self.sql.acquire_and_load_returning
        } else {
            &self.sql.acquire_and_load
        };
        let row = self
            .fetch_optional(stmt, &params)
            .await?
            .ok_or_else(|| unexpected(self.dialect, "no reply to acquire"))?;
        // Columns: granted fence (or NULL/0), its since, then the holder
        // (owner, fence, since, expires in), then the document.
        let granted = self.get_opt_i64(&row, 0)?.unwrap_or(0);
        if granted <= 0 {
            // A holder whose grant is not live in this statement's snapshot
            // won a race the statement waited on: read it afresh.
            let holder = match self.get_opt_i64(&row, 5)? {
                Some(expires_in) if expires_in > 0 => Some(self.holder_at(key, &row, 2)?),
                _ => self.holder(key).await?,
            };
            return Err(self.locked(key, holder, Operation::AcquireAndLoad));
        }
        let since = self.get_opt_i64(&row, 1)?.unwrap_or(0);
        let lease = Lease::new(
            key.clone(),
            owner.clone(),
            Fence(granted as u64),
            ttl,
            issued,
            from_unix_millis(u64::try_from(since).unwrap_or(0)),
        );
        let loaded = match self.stored_at(&row, 6, options.limit) {
            // PostgreSQL: a statement that waited for the previous holder
            // to commit reads with the snapshot it took before waiting. Its
            // `FOR SHARE` follows rows updated since to their newest
            // version, but a row the holder *inserted* is not in that
            // snapshot at all: absent here may mean "created by the grant
            // this one waited for". A new statement's snapshot sees every
            // commit that preceded the grant, so read again. (MySQL's
            // procedure reads the document in a statement of its own, after
            // the grant, so it never misses it; MariaDB's RETURNING reads it
            // after the upsert got the lease row, which InnoDB's read view,
            // taken at that first read, follows; SQLite reads after
            // granting.) Absent documents pay a third round trip, existing
            // ones none.
            Ok(None) if self.dialect == Dialect::Postgres => {
                self.get(key.run(), doc, options).await
            }
            other => other,
        };
        match loaded {
            Ok(stored) => Ok((lease, stored)),
            Err(error) => {
                let _ = self.release(&lease).await;
                Err(error)
            }
        }
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        if options.limit.is_none() {
            let row = self
                .fetch_optional(
                    &self.sql.get_unlimited,
                    &[P::T(run.as_str()), P::T(doc.as_str())],
                )
                .await?;
            return row
                .map(|row| {
                    Ok(StoredDoc::new(
                        Bytes::from(
                            row.try_get::<Vec<u8>, _>(1)
                                .map_err(|e| map_error(self.dialect, e))?,
                        ),
                        Version::new(self.get_i64(&row, 0)?.to_string()),
                    ))
                })
                .transpose();
        }
        let row = self
            .fetch_optional(
                &self.sql.get,
                &[
                    P::T(run.as_str()),
                    P::T(doc.as_str()),
                    P::I(Self::limit(options)),
                ],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => self.stored_at(&row, 0, options.limit),
        }
    }

    /// Reads several documents of `run` (see [`Store::get_many`]): one
    /// statement per `2^GET_MANY_LOG2` distinct names, the size limit
    /// applied per row as [`Inner::get`] applies it.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let limit = Self::limit(options);
        let mut seen = HashSet::new();
        let distinct: Vec<&DocName> = docs.iter().filter(|d| seen.insert(*d)).collect();
        // A document over the limit is kept as its size, so each request
        // for it gets its own error.
        let mut found: HashMap<String, std::result::Result<StoredDoc, i64>> = HashMap::new();
        for chunk in distinct.chunks(1 << statements::GET_MANY_LOG2) {
            let (stmt, slots) = self.sql.get_many(chunk.len());
            let mut params = Vec::with_capacity(slots + 2);
            params.push(P::T(run.as_str()));
            params.push(P::I(limit));
            // The list is padded by repeating the last name.
            params.extend((0..slots).map(|i| P::T(chunk[i.min(chunk.len() - 1)].as_str())));
            for row in self.fetch_all(stmt, &params).await? {
                let name = self.get_text(&row, 0)?;
                let entry = match self.stored_at(&row, 1, options.limit) {
                    Ok(Some(stored)) => Ok(stored),
                    Ok(None) => continue,
                    Err(error) if error.kind() == ErrorKind::TooLarge => {
                        Err(self.get_i64(&row, 2)?)
                    }
                    Err(error) => return Err(error),
                };
                found.insert(name, entry);
            }
        }
        Ok(docs
            .iter()
            .map(|doc| match found.get(doc.as_str()) {
                None => Ok(None),
                Some(Ok(stored)) => Ok(Some(stored.clone())),
                Some(Err(size)) => {
                    Err(self
                        .too_large(*size, options.limit)
                        .at_doc(Operation::Get, run, doc))
                }
            })
            .collect())
    }

    /// Writes several documents of `run` (see [`Store::put_many`]), each
    /// exactly as [`Inner::put`] would: its size checked first, then its
    /// mode's condition, atomically with its write.
    ///
    /// - PostgreSQL: writes of distinct documents go together in one
    ///   statement of up to [`BATCH_ROWS`] rows (and about
    ///   [`BATCH_BYTES`]), which creates, overwrites and updates each row
    ///   on its own condition and announces each write; a batch that
    ///   writes a document twice sends its second write in a later
    ///   statement, after the first (waves).
    /// - MySQL: as PostgreSQL, each group one transaction (READ
    ///   COMMITTED, so that concurrent groups take no gap locks and do not
    ///   deadlock each other): an insert of the creates (leaving existing
    ///   rows as they are), one of the overwrites, one update of the
    ///   updates, then the versions of the created and updated rows read
    ///   back in the transaction, which holds those rows locked (each
    ///   write has a fresh random version, so a row holding it is one this
    ///   transaction wrote), and the commit.
    /// - SQLite: every write in order in one transaction: one commit, one
    ///   `fsync`, for the whole batch.
    ///
    /// A group that meets a transaction conflict (a deadlock, a
    /// serialization failure: rolled back whole) is sent again, up to
    /// [`GROUP_TRIES`] times. When the database refuses a group (a
    /// constraint or trigger refusing a row, a full disk: nothing of the
    /// group was committed), its writes are made again one at a time, so
    /// that each gets its own outcome. Failures that leave the outcome
    /// unknown (a lost connection, a timeout) or that concern the database
    /// rather than a row (busy, conflicts that persist) fail the whole
    /// batch.
    async fn put_many(&self, run: &RunId, puts: &[PutRequest]) -> Result<Vec<Result<Version>>> {
        let mut results: Vec<Option<Result<Version>>> = puts.iter().map(|_| None).collect();
        let mut pending = Vec::with_capacity(puts.len());
        for (i, put) in puts.iter().enumerate() {
            match self.check_size(&put.bytes) {
                Ok(()) => pending.push(i),
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        match self.dialect {
            Dialect::Sqlite => self.put_group(run, puts, &pending, &mut results).await?,
            Dialect::Postgres | Dialect::MySql => {
                // Writes of one document go at most one per statement (a
                // statement cannot write a row twice, and each write must see
                // the earlier one's outcome).
                for wave in waves(puts, pending.iter().copied()) {
                    for group in self.groups(puts, &wave) {
                        self.put_group(run, puts, group, &mut results).await?;
                    }
                }
            }
        }
        // Every write is either refused by its size or in a group, which
        // sets its outcome.
        Ok(settle(
            results,
            puts.iter().map(|put| &put.doc),
            Operation::Put,
            run,
            || unexpected(self.dialect, "a batched write was not made"),
        ))
    }

    /// Splits a wave into groups of at most [`BATCH_ROWS`] writes and
    /// about [`BATCH_BYTES`] (a larger document goes alone; MySQL's
    /// packet limit caps it too).
    fn groups<'w>(&self, puts: &[PutRequest], wave: &'w [usize]) -> Vec<&'w [usize]> {
        let cap = self
            .capabilities
            .max_document_size
            .map_or(BATCH_BYTES, |max| BATCH_BYTES.min(max));
        groups(puts, wave, BATCH_ROWS, cap)
    }

    /// Writes one group of a batch (see [`Inner::put_many`]); a group the
    /// database refused is written again one at a time.
    async fn put_group(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
        results: &mut [Option<Result<Version>>],
    ) -> Result<()> {
        if group.is_empty() {
            return Ok(());
        }
        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            let outcome = match self.dialect {
                Dialect::Postgres => self.put_group_postgres(run, puts, group).await,
                Dialect::MySql => self.put_group_mysql(run, puts, group).await,
                Dialect::Sqlite => self.put_group_sqlite(run, puts, group).await,
            };
            match outcome {
                // A deadlock or serialization failure rolled the group
                // back: nothing of it was written, so it is sent again.
                Err(error) if tries < GROUP_TRIES && conflict_in_the_database(&error) => {
                    tracing::debug!(%error, "a batched write met a transaction conflict; again");
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20 * tries))).await;
                }
                outcome => break outcome,
            }
        };
        match outcome {
            Ok(written) => {
                for (i, outcome) in group.iter().zip(written) {
                    results[*i] = Some(outcome);
                }
                Ok(())
            }
            Err(error) if refused_by_the_database(&error) => {
                tracing::debug!(%error, "a batched write was refused; writing one at a time");
                for &i in group {
                    let put = &puts[i];
                    results[i] = Some(self.put(run, &put.doc, &put.bytes, &put.mode).await);
                }
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// The binds of a group of writes, with their new versions.
    fn batch_params<'a>(
        run: &'a RunId,
        puts: &'a [PutRequest],
        group: &[usize],
        versions: &[i64],
    ) -> Vec<P<'a>> {
        let mut params = Vec::with_capacity(1 + group.len() * statements::BATCH_ROW_BINDS);
        params.push(P::T(run.as_str()));
        for (&i, &version) in group.iter().zip(versions) {
            let put = &puts[i];
            params.extend([
                P::T(put.doc.as_str()),
                P::I(version),
                P::B(&put.bytes),
                P::I(put.bytes.len() as i64),
                P::I(FencedKind::of(&put.mode) as i64),
                P::I(Self::expected(&put.mode).unwrap_or(0)),
            ]);
        }
        params
    }

    /// The outcome of each write of a group, from the versions the rows
    /// hold now: a row holding its write's (fresh, random) version was
    /// written; any other was refused by its condition.
    fn batch_outcomes(
        &self,
        puts: &[PutRequest],
        group: &[usize],
        versions: &[i64],
        now: &HashMap<String, i64>,
    ) -> Vec<Result<Version>> {
        group
            .iter()
            .zip(versions)
            .map(|(&i, &version)| {
                let put = &puts[i];
                if now.get(put.doc.as_str()) == Some(&version) {
                    Ok(Version::new(version.to_string()))
                } else {
                    Err(self.refused(&put.mode))
                }
            })
            .collect()
    }

    /// The name and version columns of rows.
    fn versions_of(&self, rows: &[AnyRow]) -> Result<HashMap<String, i64>> {
        rows.iter()
            .map(|row| Ok((self.get_text(row, 0)?, self.get_i64(row, 1)?)))
            .collect()
    }

    async fn put_group_postgres(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
    ) -> Result<Vec<Result<Version>>> {
        let versions: Vec<i64> = group.iter().map(|_| new_version()).collect();
        let stmt = self.sql.put_many_postgres(group.len());
        let params = Self::batch_params(run, puts, group, &versions);
        let rows = self.fetch_all(&stmt, &params).await?;
        let written = self.versions_of(&rows)?;
        Ok(self.batch_outcomes(puts, group, &versions, &written))
    }

    async fn put_group_mysql(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
    ) -> Result<Vec<Result<Version>>> {
        let versions: Vec<i64> = group.iter().map(|_| new_version()).collect();
        let of_kind = |kind: FencedKind| -> (Vec<usize>, Vec<i64>) {
            group
                .iter()
                .zip(&versions)
                .filter(|(i, _)| FencedKind::of(&puts[**i].mode) == kind)
                .map(|(i, v)| (*i, *v))
                .unzip()
        };
        let (creates, create_versions) = of_kind(FencedKind::Create);
        let (overwrites, overwrite_versions) = of_kind(FencedKind::Overwrite);
        let (updates, update_versions) = of_kind(FencedKind::Update);
        // READ COMMITTED: InnoDB then takes no gap locks for these
        // inserts and updates, which under REPEATABLE READ make concurrent
        // batches of one run deadlock. Nothing here needs a snapshot: the
        // read-back concerns rows this transaction holds locked.
        let mut tx = self
            .begin_with(
                &self.pool,
                "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION",
            )
            .await?;
        let outcome = async {
            if !overwrites.is_empty() {
                let stmt = self.sql.put_many_mysql_insert(overwrites.len(), true);
                tx.execute(
                    &stmt,
                    &Self::batch_params(run, puts, &overwrites, &overwrite_versions),
                )
                .await?;
            }
            if !creates.is_empty() {
                let stmt = self.sql.put_many_mysql_insert(creates.len(), false);
                tx.execute(
                    &stmt,
                    &Self::batch_params(run, puts, &creates, &create_versions),
                )
                .await?;
            }
            // Which updates were made: all or none is told by the count
            // (each matched row gets a new version, so matched = changed);
            // anything between, like the creates, by reading back.
            let mut all_updated = None;
            if !updates.is_empty() {
                let stmt = self.sql.put_many_mysql_update(updates.len());
                let done = tx
                    .execute(
                        &stmt,
                        &Self::batch_params(run, puts, &updates, &update_versions),
                    )
                    .await?
                    .rows_affected();
                if done == 0 {
                    all_updated = Some(false);
                } else if done == updates.len() as u64 {
                    all_updated = Some(true);
                }
            }
            let mut check: Vec<usize> = creates.clone();
            let mut check_versions = create_versions.clone();
            if all_updated.is_none() {
                check.extend(&updates);
                check_versions.extend(&update_versions);
            }
            let mut now = HashMap::new();
            if !check.is_empty() {
                let stmt = self.sql.put_many_mysql_versions(check.len());
                let rows = tx
                    .fetch_all(
                        &stmt,
                        &Self::batch_params(run, puts, &check, &check_versions),
                    )
                    .await?;
                now = self.versions_of(&rows)?;
            }
            for (i, version) in overwrites.iter().zip(&overwrite_versions) {
                now.insert(puts[*i].doc.as_str().to_owned(), *version);
            }
            if all_updated == Some(true) {
                for (i, version) in updates.iter().zip(&update_versions) {
                    now.insert(puts[*i].doc.as_str().to_owned(), *version);
                }
            }
            Ok(now)
        }
        .await;
        let now = tx.finish(outcome).await?;
        Ok(self.batch_outcomes(puts, group, &versions, &now))
    }

    /// SQLite: every write of the group in order, each its single
    /// statement, in one transaction (one commit). A statement refused by
    /// its condition (a create of an existing document) is rolled back
    /// alone, as SQLite does, and is that write's outcome; any other
    /// error rolls the whole transaction back.
    async fn put_group_sqlite(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
    ) -> Result<Vec<Result<Version>>> {
        let mut tx = self.begin(&self.pool).await?;
        let outcome = async {
            let mut outcomes = Vec::with_capacity(group.len());
            for &i in group {
                let put = &puts[i];
                let version = new_version();
                let params = [
                    P::T(run.as_str()),
                    P::T(put.doc.as_str()),
                    P::I(version),
                    P::B(&put.bytes),
                    P::I(put.bytes.len() as i64),
                    P::I(Self::expected(&put.mode).unwrap_or(0)),
                ];
                let stmt = match put.mode {
                    PutMode::Overwrite => &self.sql.put_overwrite,
                    PutMode::Create => &self.sql.put_create,
                    PutMode::Update(_) => &self.sql.put_update,
                };
                outcomes.push(match tx.execute(stmt, &params).await {
                    Ok(done)
                        if matches!(put.mode, PutMode::Update(_)) && done.rows_affected() == 0 =>
                    {
                        Err(self.refused(&put.mode))
                    }
                    Ok(_) => Ok(Version::new(version.to_string())),
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => Err(error),
                    Err(error) => return Err(error),
                });
            }
            Ok(outcomes)
        }
        .await;
        tx.finish(outcome).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let key = lease.key();
        let fence = i64::try_from(lease.fence().get()).unwrap_or(i64::MAX);
        let params = [
            P::T(key.run().as_str()),
            P::T(lock_doc(key)),
            P::T(lease.owner().id()),
            P::I(fence),
        ];
        if self.affected_lease(&self.sql.release, &params).await? > 0 {
            return Ok(());
        }
        // Ours but expired: clear it, and say it was lost.
        self.affected_lease(&self.sql.release_lapsed, &params)
            .await?;
        Err(self.lease_lost(lease, self.holder(key).await?, Operation::Release))
    }
}

/// A transaction: each statement bounded by the call bound. Dropped
/// without [`Tx::commit`] or [`Tx::rollback`], its connection is closed,
/// which rolls it back.
struct Tx<'p> {
    inner: &'p Inner,
    conn: Lent<'p>,
}

impl Tx<'_> {
    async fn execute(&mut self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.inner
            .bounded(self.conn.execute(query(stmt, params)))
            .await
    }

    async fn fetch_optional(&mut self, stmt: &Stmt, params: &[P<'_>]) -> Result<Option<AnyRow>> {
        self.inner
            .bounded(self.conn.fetch_optional(query(stmt, params)))
            .await
    }

    async fn fetch_all(&mut self, stmt: &Stmt, params: &[P<'_>]) -> Result<Vec<AnyRow>> {
        self.inner
            .bounded(self.conn.fetch_all(query(stmt, params)))
            .await
    }

    async fn commit(mut self) -> Result<()> {
        self.inner.bounded(self.conn.end("COMMIT")).await
    }

    async fn rollback(mut self) {
        let _ = self.inner.bounded(self.conn.end("ROLLBACK")).await;
    }

    /// Commits after `outcome` succeeded, rolls back after it failed.
    async fn finish<T>(self, outcome: Result<T>) -> Result<T> {
        match outcome {
            Ok(value) => {
                self.commit().await?;
                Ok(value)
            }
            Err(error) => {
                self.rollback().await;
                Err(error)
            }
        }
    }
}

/// Whether `error` is the database's refusal of a statement or
/// transaction, which then committed nothing, for a reason that concerns
/// its rows (a constraint, a trigger, a full disk), not the database
/// itself (busy, a deadlock, a timeout: retryable) or the connection (the
/// outcome is unknown then).
fn refused_by_the_database(error: &Error) -> bool {
    !error.is_retryable()
        && std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<sqlx::Error>())
            .is_some_and(|source| matches!(source, sqlx::Error::Database(_)))
}

/// Whether `error` is a transaction conflict the database answered (a
/// deadlock, a serialization failure, a lock wait that timed out): the
/// statement or transaction was rolled back, and trying it again may
/// succeed.
fn conflict_in_the_database(error: &Error) -> bool {
    error.is_retryable()
        && error.kind() == ErrorKind::Backend
        && std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<sqlx::Error>())
            .is_some_and(|source| matches!(source, sqlx::Error::Database(_)))
}

/// A fence as the database's BIGINT.
fn fence_i64(fence: Fence) -> Result<i64> {
    i64::try_from(fence.get()).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("fence {fence} is beyond what the database can store"),
        )
    })
}

/// A milestone's timestamp as stored: seconds since the epoch with nine
/// decimals (what WEPPcloud's `time.time()` strings parse as).
fn timestamp_text(at: SystemTime) -> Result<String> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            "a milestone cannot be dated before 1970",
        )
    })?;
    Ok(format!("{}.{:09}", since.as_secs(), since.subsec_nanos()))
}

/// Parses seconds since the epoch, with any number of decimals.
fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    let secs: u64 = secs.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    let nanos: u32 = digits.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// The milestone kinds, as WEPPcloud names its hash fields' prefixes.
const TIMESTAMPS: &str = "timestamps";
const ATTRS: &str = "attrs";

/// The TTL in milliseconds, once [`runstate_core::check_ttl`] accepted it
/// (so the database's clock arithmetic cannot overflow).
fn ttl_ms(dialect: Dialect, key: &LockKey, ttl: Duration) -> Result<i64> {
    runstate_core::check_ttl(ttl).map_err(|e| e.with_backend(dialect.name()).with_lock(key))?;
    Ok(ms(ttl))
}

fn owner_json(owner: &Owner) -> Result<String> {
    serde_json::to_string(owner).map_err(|e| {
        Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
    })
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

#[async_trait]
impl Store for SqlStore {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.inner
            .get(run, doc, options)
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let outcome = match (options.lease, options.foreign_lease) {
            (None, None) => self.inner.put(run, doc, &bytes, &options.mode).await,
            (Some(lease), None) => {
                lease.key().check_covers(run, doc)?;
                self.inner
                    .fenced_put(lease, doc, &bytes, &options.mode, false)
                    .await
            }
            (None, Some(lease)) => {
                lease.key().check_covers(run, doc)?;
                self.inner
                    .foreign_put(lease, doc, &bytes, &options.mode)
                    .await
            }
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::InvalidArgument,
                "a save is fenced by a lease of this store or by a foreign one, not both",
            )
            .with_backend(self.inner.backend())),
        };
        outcome.map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    /// One statement per 256 distinct names (see the crate
    /// documentation); each document's result is what
    /// [`get`](Store::get) would give.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        self.inner
            .get_many(run, docs, options)
            .await
            .map_err(|e| e.with_operation(Operation::GetMany).with_run(run))
    }

    /// Few statements for many writes (see the crate documentation); each
    /// write's result is what [`put`](Store::put) would give.
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        self.inner
            .put_many(run, &puts)
            .await
            .map_err(|e| e.with_operation(Operation::PutMany).with_run(run))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let inner = &self.inner;
        let outcome = async {
            let done = match if_version {
                None => {
                    inner
                        .affected(&inner.sql.delete, &[P::T(run.as_str()), P::T(doc.as_str())])
                        .await?
                }
                Some(v) => {
                    let expected = v.as_str().parse::<i64>().unwrap_or(0);
                    inner
                        .affected(
                            &inner.sql.delete_if,
                            &[P::T(run.as_str()), P::T(doc.as_str()), P::I(expected)],
                        )
                        .await?
                }
            };
            if done > 0 {
                return Ok(true);
            }
            if if_version.is_some()
                && inner
                    .fetch_optional(&inner.sql.exists, &[P::T(run.as_str()), P::T(doc.as_str())])
                    .await?
                    .is_some()
            {
                return Err(Error::new(
                    ErrorKind::Precondition,
                    "the stored version is not the expected one; nothing was deleted",
                )
                .with_backend(inner.backend()));
            }
            Ok(false)
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Delete, run, doc))
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let inner = &self.inner;
        let limit = limit.clamp(1, 10_000);
        let rows = inner
            .fetch_all(
                &inner.sql.list_docs,
                &[
                    P::T(run.as_str()),
                    P::T(after.map_or("", DocName::as_str)),
                    P::I(limit as i64 + 1),
                ],
            )
            .await
            .map_err(|e| e.with_operation(Operation::ListDocs).with_run(run))?;
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let name = DocName::new(inner.get_text(row, 0)?)
                .map_err(|_| unexpected(inner.dialect, "document name"))?;
            items.push(DocMeta::new(
                name,
                Version::new(inner.get_i64(row, 1)?.to_string()),
                u64::try_from(inner.get_i64(row, 2)?).unwrap_or(0),
                Some(inner.modified_at(row, 3)?),
            ));
        }
        Ok(ListPage::new(items, more))
    }

    /// One `SELECT` of the document's row without its bytes.
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let inner = &self.inner;
        let row = inner
            .fetch_optional(&inner.sql.head, &[P::T(run.as_str()), P::T(doc.as_str())])
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))?;
        row.map(|row| {
            Ok(DocStat::new(
                Version::new(inner.get_i64(&row, 0)?.to_string()),
                u64::try_from(inner.get_i64(&row, 1)?).unwrap_or(0),
                Some(inner.modified_at(&row, 2)?),
            ))
        })
        .transpose()
        .map_err(|e: Error| e.at_doc(Operation::Get, run, doc))
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let inner = &self.inner;
        let limit = limit.clamp(1, 10_000);
        let rows = inner
            .fetch_all(
                &inner.sql.list_runs,
                &[
                    P::T(after.map_or("", RunId::as_str)),
                    P::I(limit as i64 + 1),
                ],
            )
            .await
            .map_err(|e| e.with_operation(Operation::ListRuns))?;
        let more = rows.len() > limit;
        let items = rows
            .iter()
            .take(limit)
            .map(|row| {
                RunId::new(inner.get_text(row, 0)?).map_err(|_| unexpected(inner.dialect, "run id"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ListPage::new(items, more))
    }

    /// Deletes the run's documents and, with them, its milestones and
    /// attributes (run metadata); its status history, lock bookkeeping and
    /// fence watermarks are kept.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        self.inner
            .delete_run(run)
            .await
            .map_err(|e| e.with_operation(Operation::DeleteRun).with_run(run))
    }

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        self.inner
            .get_if_changed(run, doc, known, options)
            .await
            .map_err(|e| e.at_doc(Operation::GetIfChanged, run, doc))
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.inner
            .claim(key, fence, doc, options)
            .await
            .map_err(|e| {
                let e = e.with_operation(Operation::Claim).with_lock(key);
                match doc {
                    Some(doc) => e.with_doc(doc),
                    None => e,
                }
            })
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        let outcome = match self.inner.dialect {
            #[cfg(feature = "postgres")]
            Dialect::Postgres => match &self.inner.hub {
                Some(hub) => hub.watch(run.clone()).await,
                None => Err(unexpected(self.inner.dialect, "no listener")),
            },
            _ => {
                runstate_core::events::poll_watch(
                    Arc::new(self.clone()),
                    run.clone(),
                    self.inner.config.watch_interval,
                )
                .await
            }
        };
        outcome.map_err(|e| e.with_operation(Operation::Watch).with_run(run))
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| {
            e.with_backend(backend)
                .with_operation(Operation::Publish)
                .with_run(run)
        };
        check_label("topic", topic).map_err(context)?;
        check_text("status message", text).map_err(context)?;
        self.inner
            .publish(run, topic, text)
            .await
            .map(drop)
            .map_err(context)
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        let inner = &self.inner;
        let outcome = async {
            // PostgreSQL: listen first, so no message published after the
            // starting point below goes unannounced.
            #[cfg(feature = "postgres")]
            let (wake, registration) = match &inner.hub {
                Some(hub) => {
                    let (wake, registration) = hub.follow(run.clone()).await?;
                    (Wake::Notified(wake), Some(registration))
                }
                None => (Wake::Every(inner.config.watch_interval), None),
            };
            #[cfg(not(feature = "postgres"))]
            let (wake, registration) = (Wake::Every(inner.config.watch_interval), None::<()>);
            let last = inner.status_last(run).await?;
            let after = match replay {
                Replay::None => last,
                Replay::Last(n) => last.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX)),
                _ => 0,
            };
            let (sender, feed) = Subscription::channel(runstate_core::events::FEED_CAPACITY);
            let task = tokio::spawn(feeds::follow_status(
                self.clone(),
                run.clone(),
                Start {
                    after,
                    live_from: last,
                },
                wake,
                sender,
            ));
            Ok(feed.keep(Arc::new((
                runstate_core::events::AbortOnDrop(task.abort_handle()),
                registration,
            ))))
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::Subscribe).with_run(run))
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| {
            e.with_backend(backend)
                .with_operation(Operation::Mark)
                .with_run(run)
        };
        check_label("task", task).map_err(context)?;
        let value = timestamp_text(at).map_err(context)?;
        self.inner
            .set_milestone(run, TIMESTAMPS, task, &value)
            .await
            .map_err(context)
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| {
            e.with_backend(backend)
                .with_operation(Operation::Mark)
                .with_run(run)
        };
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        self.inner
            .set_milestone(run, ATTRS, name, value)
            .await
            .map_err(context)
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.inner
            .milestones(run)
            .await
            .map_err(|e| e.with_operation(Operation::Milestones).with_run(run))
    }
}

#[async_trait]
impl Lock for SqlStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        let lease = self
            .inner
            .try_acquire(key, owner, ttl, issued)
            .await
            .map_err(|e| e.with_operation(Operation::Acquire).with_lock(key))?;
        self.inner.signals.granted(&lease);
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let inner = &self.inner;
        let key = lease.key();
        let issued = Instant::now();
        let ttl_ms =
            ttl_ms(inner.dialect, key, ttl).map_err(|e| e.with_operation(Operation::Renew))?;
        let fence = i64::try_from(lease.fence().get()).unwrap_or(i64::MAX);
        let done = inner
            .execute_lease(
                &inner.sql.renew,
                &[
                    P::T(key.run().as_str()),
                    P::T(lock_doc(key)),
                    P::T(lease.owner().id()),
                    P::I(fence),
                    P::I(ttl_ms),
                ],
            )
            .await
            .map_err(|e| e.with_operation(Operation::Renew).with_lock(key))?;
        if done.rows_affected() == 0 {
            return Err(inner.lease_lost(lease, inner.holder(key).await?, Operation::Renew));
        }
        let renewed = lease.renewed(ttl, issued);
        inner.signals.granted(&renewed);
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        // Signalled however this call ends, also when its caller stops
        // waiting for it after the statement was sent.
        let _signal = self.inner.signals.releasing(lease.key(), lease.fence());
        self.inner
            .release(lease)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()))
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner
            .holder(key)
            .await
            .map_err(|e| e.with_operation(Operation::Inspect).with_lock(key))
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let inner = &self.inner;
        let outcome = async {
            let Some(holder) = inner.holder(key).await? else {
                return Ok(None);
            };
            if only_fence.is_some_and(|f| f != holder.fence) {
                return Ok(None);
            }
            let fence = i64::try_from(holder.fence.get()).unwrap_or(i64::MAX);
            let done = inner
                .affected_lease(
                    &inner.sql.break_fence,
                    &[P::T(key.run().as_str()), P::T(lock_doc(key)), P::I(fence)],
                )
                .await?;
            if done == 0 {
                return Ok(None);
            }
            tracing::warn!(
                lock = %key,
                holder = %holder.owner,
                fence = %holder.fence,
                by = %format!("{}:{}", runstate_core::process::hostname(), std::process::id()),
                "lease broken"
            );
            Ok(Some(holder))
        };
        let outcome = outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::BreakLock).with_lock(key));
        if let Ok(Some(broken)) = &outcome {
            inner.signals.released(key, broken.fence);
        }
        outcome
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let inner = &self.inner;
        let rows = match run {
            Some(run) => {
                inner
                    .fetch_all(&inner.sql.list_locks_run, &[P::T(run.as_str())])
                    .await
            }
            None => inner.fetch_all(&inner.sql.list_locks, &[]).await,
        }
        .map_err(|e| e.with_operation(Operation::ListLocks))?;
        rows.iter()
            .map(|row| {
                let run = RunId::new(inner.get_text(row, 0)?)
                    .map_err(|_| unexpected(inner.dialect, "run id"))?;
                let doc = inner.get_text(row, 1)?;
                let key = if doc.is_empty() {
                    LockKey::Run(run)
                } else {
                    LockKey::Doc(
                        run,
                        DocName::new(doc)
                            .map_err(|_| unexpected(inner.dialect, "document name"))?,
                    )
                };
                inner.holder_at(&key, row, 2)
            })
            .collect()
    }

    /// Waits for a release of `key` made through this store (any
    /// dialect) or, in PostgreSQL, announced by any process (`NOTIFY`),
    /// or `max`.
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        #[cfg(feature = "postgres")]
        let _listening = self.inner.hub.as_ref().map(|hub| hub.hold());
        self.inner.signals.wait(key, max).await;
    }

    /// Waits while a grant made through this store holds `key` (see
    /// [`ReleaseSignals::wait_while_held`]). A release announced by the
    /// listener does not end this wait (it may be the echo of an earlier
    /// release); the release through this store does.
    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        self.inner.signals.wait_while_held(key, owner, max).await
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let issued = Instant::now();
        let (lease, stored) = self
            .inner
            .acquire_and_load(key, doc, owner, ttl, options, issued)
            .await
            .map_err(|e| {
                e.with_operation(Operation::AcquireAndLoad)
                    .with_lock(key)
                    .with_doc(doc)
            })?;
        self.inner.signals.granted(&lease);
        Ok((lease, stored))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        // Signalled however this call ends (see `release`).
        let _signal = self.inner.signals.releasing(lease.key(), lease.fence());
        let run = lease.key().run();
        self.inner
            .fenced_put(lease, doc, &bytes, &mode, true)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_parse_weppcloud_strings() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 5);
        let text = timestamp_text(at).expect("after 1970");
        assert_eq!(text, "1795000000.000000005");
        assert_eq!(parse_timestamp(&text), Some(at));
        for (text, expected) in [
            ("1795000100", Some(Duration::from_secs(1_795_000_100))),
            (
                "1795000100.5",
                Some(Duration::from_millis(1_795_000_100_500)),
            ),
            ("1.1234567891", Some(Duration::new(1, 123_456_789))),
            ("", None),
            ("abc", None),
            ("1.-5", None),
            ("-1.5", None),
        ] {
            assert_eq!(
                parse_timestamp(text),
                expected.map(|d| SystemTime::UNIX_EPOCH + d),
                "{text:?}"
            );
        }
        assert_eq!(
            timestamp_text(SystemTime::UNIX_EPOCH - Duration::from_secs(1))
                .expect_err("before 1970")
                .kind(),
            ErrorKind::InvalidArgument
        );
    }

    /// A lent MySQL pool's sessions must keep a clock without daylight
    /// saving time (see `SqlStore::from_pool`).
    #[test]
    fn only_time_zones_without_daylight_saving_pass() {
        for (zone, system) in [
            ("+00:00", "CET"),
            ("-05:30", "CET"),
            ("UTC", "CET"),
            ("SYSTEM", "UTC"),
            ("SYSTEM", "Etc/UTC"),
        ] {
            assert!(
                time_zone_without_daylight_saving(zone, system),
                "{zone} {system}"
            );
        }
        for (zone, system) in [
            ("Europe/Paris", "UTC"),
            ("SYSTEM", "CET"),
            ("SYSTEM", "EST"),
            ("+", "UTC"),
            ("+1:", "UTC"),
        ] {
            assert!(
                !time_zone_without_daylight_saving(zone, system),
                "{zone} {system}"
            );
        }
    }

    #[test]
    fn mariadb_flavour_and_version_are_told() {
        for (version, returning) in [
            ("10.11.19-MariaDB-0+deb12u1", true),
            ("10.5.0-MariaDB", true),
            ("11.4.2-MariaDB-ubu2404", true),
            ("10.4.32-MariaDB", false),
            ("5.5.5-10.11.6-MariaDB", true),
            ("8.0.36", false),
            ("8.4.0-commercial", false),
            ("", false),
        ] {
            assert_eq!(mariadb_with_returning(version), returning, "{version}");
        }
    }
}
