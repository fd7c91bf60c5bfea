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
//! - Every call is bounded by `timeout_ms` on the client, waiting for a
//!   pooled connection by `acquire_timeout_ms`. The server's own statement
//!   timeout is set to it where the server has one (PostgreSQL's
//!   `statement_timeout`; MariaDB's `max_statement_time`, which does not
//!   cover stored procedures; MySQL's `max_execution_time`, which covers
//!   read-only `SELECT`s only): a write the client gave up on may still
//!   be made on those servers (a grant then holds its lock for its TTL;
//!   fences and row locks still order every write).
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
mod engine;
mod errors;
mod feeds;
mod leases;
#[cfg(feature = "postgres")]
mod listen;
mod pool;
mod reads;
mod schema;
mod statements;
mod status;
mod writes;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::events::{check_label, check_text};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode, PutOptions,
    PutRequest, ReleaseSignals, Replay, Result, RunId, Store, StoredDoc, Subscription, Version,
    WatchMode, Watcher, async_trait,
};
use sqlx::any::AnyConnectOptions;
use sqlx::{Any, Row};

pub use config::{
    DEFAULT_PREFIX, DEFAULT_STATUS_HISTORY, DEFAULT_TIMEOUT, DEFAULT_WATCH_INTERVAL, Dialect,
    SqlConfig,
};

use crate::errors::{map_error, map_error_during};
use crate::feeds::{Start, Wake};
use crate::leases::ttl_ms;
use crate::pool::Pool;
use crate::statements::{Statements, Stmt};
use crate::status::{ATTRS, TIMESTAMPS, timestamp_text};

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
///
/// `@@system_time_zone` is the zone's abbreviation when the server
/// started, so `GMT` there may be Europe/London in winter, whose `SYSTEM`
/// clock then moves in March: only UTC's own names pass for it. A session
/// zone named `GMT` is the tz database's, which never moves.
fn time_zone_without_daylight_saving(zone: &str, system: &str) -> bool {
    const UTC: [&str; 5] = [
        "UTC",
        "Etc/UTC",
        "Universal",
        "Zulu",
        "Coordinated Universal Time",
    ];
    let utc =
        |name: &str, also: &[&str]| UTC.iter().chain(also).any(|u| name.eq_ignore_ascii_case(u));
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
    fixed(zone)
        || utc(zone, &["GMT", "Etc/GMT"])
        || (zone.eq_ignore_ascii_case("SYSTEM") && utc(system, &[]))
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
            .map_err(|e| e.at_run(Operation::GetMany, run))
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
            .map_err(|e| e.at_run(Operation::PutMany, run))
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
            .map_err(|e| e.at_run(Operation::ListDocs, run))?;
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
            .map_err(|e| e.at_run(Operation::DeleteRun, run))
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
        outcome.map_err(|e| e.at_run(Operation::Watch, run))
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| e.with_backend(backend).at_run(Operation::Publish, run);
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
            let (last, oldest) = inner.status_last(run).await?;
            let after = match replay {
                Replay::None => last,
                Replay::Last(n) => last.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX)),
                _ => 0,
            };
            // The follower pushes the replay as fast as it reads it, likely
            // before the consumer reads: room for all of it besides the
            // buffer of live messages. Counted from the rows kept (a run's
            // numbers have no gaps), not from the reader's own
            // `status_history`: rows are trimmed only at the run's next
            // publish, by whatever setting the publisher has. Messages
            // trimmed or published meanwhile only shrink the replay or fit
            // in the buffer.
            let replayed = oldest.map_or(0, |oldest| {
                last.saturating_sub(after.max(oldest.saturating_sub(1)))
            });
            let (sender, feed) = Subscription::channel(
                runstate_core::events::FEED_CAPACITY
                    .saturating_add(usize::try_from(replayed).unwrap_or(usize::MAX)),
            );
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
            .map_err(|e: Error| e.at_run(Operation::Subscribe, run))
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| e.with_backend(backend).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        let value = timestamp_text(at).map_err(context)?;
        self.inner
            .set_milestone(run, TIMESTAMPS, task, &value)
            .await
            .map_err(context)
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let backend = self.inner.backend();
        let context = |e: Error| e.with_backend(backend).at_run(Operation::SetAttr, run);
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
            .map_err(|e| e.at_run(Operation::Milestones, run))
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

    /// A lent MySQL pool's sessions must keep a clock without daylight
    /// saving time (see `SqlStore::from_pool`).
    #[test]
    fn only_time_zones_without_daylight_saving_pass() {
        for (zone, system) in [
            ("+00:00", "CET"),
            ("-05:30", "CET"),
            ("UTC", "CET"),
            ("GMT", "CET"),
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
            // Europe/London started in winter (wave-2 review: it passed).
            ("SYSTEM", "GMT"),
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
