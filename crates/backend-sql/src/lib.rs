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
//! Two tables (and in MySQL one procedure) under a configurable prefix,
//! created by embedded, versioned migrations on first open (or by
//! [`SqlStore::migrate`] for operators who run DDL separately):
//!
//! - `<prefix>documents (run, name, version, bytes, size, updated_at)`,
//!   primary key `(run, name)`, names sorted by bytes;
//! - `<prefix>leases (run, doc, owner, owner_id, fence, since_ms,
//!   expires_at_ms)`, primary key `(run, doc)` (`doc` is empty for a run
//!   lock); a released lease keeps its row, so fences keep increasing;
//! - `<prefix>schema_migrations (version, description, applied_at)`.
//!
//! ## How the promises are kept
//!
//! - Every statement binds its values; only the allowlisted table prefix is
//!   spliced into SQL.
//! - Leases are rows judged by the database's clock, never session advisory
//!   locks (which leak through pools and vanish on disconnect): a lease
//!   stays valid until its expiry even if the connection that took it
//!   dies. Acquire is one statement (insert, or take over an expired row,
//!   returning the fence).
//! - A fenced save checks the lease and the version in the statement that
//!   writes (PostgreSQL: a CTE that locks the lease row; MySQL: a
//!   multi-table `UPDATE`; SQLite: writers are serialized). A locked update
//!   is two round trips: acquire-and-load (PostgreSQL: one statement;
//!   MySQL: a stored procedure) and save-and-release.
//! - Versions are random 64-bit tokens, so a version read before a document
//!   was deleted and created again never matches the new one.
//! - SQLite runs in WAL mode with a busy timeout; several processes on one
//!   host may share the file.
//! - Every call is bounded by `timeout_ms` (also the server's statement
//!   timeout where it has one), waiting for a pooled connection by
//!   `acquire_timeout_ms`.

#![forbid(unsafe_code)]

mod config;
mod errors;
mod schema;
mod statements;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runstate_core::time::from_unix_millis;
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Error, ErrorKind, Fence, GetOptions, Lease, ListPage,
    Lock, LockInfo, LockKey, Operation, Owner, PutMode, PutOptions, ReleaseSignals, Result, RunId,
    Store, StoredDoc, Version, async_trait,
};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyQueryResult, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row};

pub use config::{DEFAULT_PREFIX, DEFAULT_TIMEOUT, Dialect, SqlConfig};

use crate::errors::{map_error, map_error_during};
use crate::statements::{FencedKind, Statements, Stmt};

/// The SQL backend. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct SqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: SqlConfig,
    dialect: Dialect,
    pool: AnyPool,
    /// Where lease-only writes go. SQLite: a pool committing without
    /// waiting for the disk (see `session_setup`); elsewhere `pool` itself.
    lease_pool: AnyPool,
    sql: Statements,
    capabilities: Capabilities,
    signals: ReleaseSignals,
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

fn new_version() -> i64 {
    fastrand::i64(1..i64::MAX)
}

/// The lease row's `doc` column: empty for a run lock.
fn lock_doc(key: &LockKey) -> &str {
    key.doc().map_or("", DocName::as_str)
}

impl SqlStore {
    /// Opens a pool, applies the migrations unless disabled, and checks the
    /// schema is there.
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
        let options: AnyConnectOptions = config
            .driver_url
            .parse()
            .map_err(|e| context(map_error_during(dialect, e, "parsing the database URL")))?;
        let connect = |leases_only: bool, max: u32| {
            let timeout = config.timeout;
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(config.acquire_timeout)
                .after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        for (statement, may_fail) in session_setup(dialect, timeout, leases_only) {
                            let outcome = conn
                                .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
                                .await;
                            if let Err(e) = outcome
                                && !may_fail
                            {
                                return Err(e);
                            }
                        }
                        Ok(())
                    })
                })
                .connect_with(options.clone())
        };
        let bound = config.acquire_timeout + config.timeout;
        let pool = match tokio::time::timeout(bound, connect(false, config.max_connections)).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => return Err(context(map_error_during(dialect, e, "connecting"))),
            Err(_) => return Err(context(timed_out(dialect, bound))),
        };
        let lease_pool = if dialect == Dialect::Sqlite {
            match tokio::time::timeout(bound, connect(true, 2)).await {
                Ok(Ok(pool)) => pool,
                Ok(Err(e)) => return Err(context(map_error_during(dialect, e, "connecting"))),
                Err(_) => return Err(context(timed_out(dialect, bound))),
            }
        } else {
            pool.clone()
        };
        let store = SqlStore {
            inner: Arc::new(Inner {
                sql: Statements::new(dialect, &config.prefix),
                capabilities: Capabilities::full(dialect.name())
                    .with_multi_host(dialect != Dialect::Sqlite)
                    .with_max_document_size(Some(match dialect {
                        Dialect::Postgres | Dialect::Sqlite => 1_000_000_000,
                        Dialect::MySql => 0,
                    })),
                dialect,
                pool,
                lease_pool,
                config,
                signals: ReleaseSignals::new(),
            }),
        };
        if store.inner.config.migrate {
            store.migrate().await?;
        }
        let store = store.with_probed_limits().await?;
        tracing::debug!(database = %store.inner.config, "sql store open");
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
            .bounded(
                inner
                    .pool
                    .fetch_optional(sqlx::raw_sql(sqlx::AssertSqlSafe(probe))),
            )
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        if inner.dialect != Dialect::MySql {
            return Ok(self);
        }
        let row = inner
            .bounded(
                inner
                    .pool
                    .fetch_one(sqlx::raw_sql("SELECT CAST(@@max_allowed_packet AS SIGNED)")),
            )
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        let packet: i64 = row.try_get(0).map_err(|e| map_error(inner.dialect, e))?;
        // Room for the statement and the other columns around the bytes.
        let max = u64::try_from(packet).unwrap_or(0).saturating_sub(64 * 1024);
        let mut inner = Arc::try_unwrap(self.inner)
            .map_err(|_| Error::new(ErrorKind::Backend, "store shared during open"))?;
        inner.capabilities = inner.capabilities.clone().with_max_document_size(Some(max));
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
            .bounded(inner.pool.acquire())
            .await
            .map_err(|e| e.with_operation(Operation::Open))?;
        let wait = inner.config.timeout.max(Duration::from_secs(30));
        tokio::time::timeout(
            wait * 2,
            schema::migrate(&mut conn, dialect, &inner.config.prefix, wait),
        )
        .await
        .map_err(|_| timed_out(dialect, wait * 2).with_operation(Operation::Open))?
    }

    /// Drops every table (and procedure) of this store's prefix. Destroys
    /// all its documents and lease history; for tests and decommissioning.
    ///
    /// # Errors
    /// Database errors.
    pub async fn uninstall(&self) -> Result<()> {
        let inner = &self.inner;
        let mut conn = inner.bounded(inner.pool.acquire()).await?;
        schema::drop_all(&mut conn, inner.dialect, &inner.config.prefix).await
    }

    /// The settings (password redacted when printed).
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// Closes the pool.
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

    async fn bounded<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.timeout, request).await {
            Ok(outcome) => outcome.map_err(|e| map_error(self.dialect, e)),
            Err(_) => Err(timed_out(self.dialect, self.config.timeout)),
        }
    }

    async fn execute(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.bounded(query(stmt, params).execute(&self.pool)).await
    }

    async fn execute_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.bounded(query(stmt, params).execute(&self.lease_pool))
            .await
    }

    async fn fetch_optional_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Option<AnyRow>> {
        self.bounded(query(stmt, params).fetch_optional(&self.lease_pool))
            .await
    }

    async fn fetch_optional(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Option<AnyRow>> {
        self.bounded(query(stmt, params).fetch_optional(&self.pool))
            .await
    }

    async fn fetch_all(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Vec<AnyRow>> {
        self.bounded(query(stmt, params).fetch_all(&self.pool))
            .await
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
        Ok(LockInfo {
            key: key.clone(),
            owner,
            fence: Fence(u64::try_from(self.get_i64(row, at + 1)?).unwrap_or(0)),
            since: from_unix_millis(u64::try_from(self.get_i64(row, at + 2)?).unwrap_or(0)),
            expires_in: Duration::from_millis(
                u64::try_from(self.get_i64(row, at + 3)?).unwrap_or(0),
            ),
        })
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
            Some(bytes) => Ok(Some(StoredDoc {
                bytes: Bytes::from(bytes),
                version: Version::new(version.to_string()),
            })),
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
        let done = self.execute(stmt, &params).await?;
        if matches!(mode, PutMode::Update(_)) && done.rows_affected() == 0 {
            return Err(self.refused(mode));
        }
        Ok(Version::new(version.to_string()))
    }

    /// A write fenced by `lease`; with `release`, the lease is given up in
    /// the same step whether or not the write happened.
    async fn fenced_put(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: &[u8],
        mode: &PutMode,
        release: bool,
    ) -> Result<Version> {
        let run = lease.key().run();
        lease.key().check_covers(run, doc)?;
        self.check_size(bytes)?;
        let version = new_version();
        let fence = i64::try_from(lease.fence().get()).unwrap_or(i64::MAX);
        let kind = match mode {
            PutMode::Overwrite => FencedKind::Overwrite,
            PutMode::Create => FencedKind::Create,
            PutMode::Update(_) => FencedKind::Update,
        };
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
        let stmt = &self.sql.fenced[kind as usize][usize::from(release)];
        let written = match self.dialect {
            Dialect::Postgres => {
                let row = self
                    .fetch_optional(stmt, &params)
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a fenced write"))?;
                let lease_ok = self.get_i64(&row, 0)? > 0;
                let written = self.get_i64(&row, 1)? > 0;
                if !lease_ok {
                    return Err(self.fenced(lease, self.holder(lease.key()).await.ok().flatten()));
                }
                written
            }
            Dialect::Sqlite if release => {
                // One transaction, so one commit (and one fsync) for the
                // write and the release. BEGIN IMMEDIATE takes the write
                // lock first, under the busy timeout.
                let lease_params = [
                    P::T(run.as_str()),
                    P::T(lock_doc(lease.key())),
                    P::T(lease.owner().id()),
                    P::I(fence),
                ];
                let mut tx = self
                    .bounded(self.pool.begin_with("BEGIN IMMEDIATE"))
                    .await?;
                // The write checks the lease itself; the release frees it
                // only if it is still this grant, and says whether it was.
                let written = match self.bounded(query(stmt, &params).execute(&mut *tx)).await {
                    Ok(done) => done.rows_affected() > 0,
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => false,
                    Err(error) => return Err(error),
                };
                let released = self
                    .bounded(query(&self.sql.release, &lease_params).execute(&mut *tx))
                    .await?;
                if released.rows_affected() == 0 {
                    // Not the current grant: the write was refused too.
                    drop(tx);
                    return Err(self.fenced(lease, self.holder(lease.key()).await.ok().flatten()));
                }
                self.bounded(tx.commit()).await?;
                written
            }
            Dialect::MySql | Dialect::Sqlite => {
                let outcome = self.execute(stmt, &params).await;
                // The write statement did not release the lease (MySQL's
                // inserts, SQLite): do it now, also after a refused write.
                let released_in_statement =
                    self.dialect == Dialect::MySql && kind == FencedKind::Update;
                let written = match outcome {
                    Ok(done) => done.rows_affected() > 0,
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => false,
                    Err(error) => {
                        if release {
                            let _ = self.release(lease).await;
                        }
                        return Err(error);
                    }
                };
                if !written {
                    // Refused: tell a lost lease from a failed condition.
                    let current = self
                        .fetch_optional(
                            &self.sql.lease_is_current,
                            &[
                                P::T(run.as_str()),
                                P::T(lock_doc(lease.key())),
                                P::T(lease.owner().id()),
                                P::I(fence),
                            ],
                        )
                        .await?
                        .is_some();
                    if !current {
                        return Err(
                            self.fenced(lease, self.holder(lease.key()).await.ok().flatten())
                        );
                    }
                }
                if release
                    && !(written && released_in_statement)
                    && let Err(error) = self.release(lease).await
                {
                    tracing::debug!(%error, "release after a fenced write");
                }
                written
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
        let ttl_ms = check_ttl(self.dialect, key, ttl)?;
        let owner_json = owner_json(owner)?;
        let params = [
            P::T(key.run().as_str()),
            P::T(lock_doc(key)),
            P::T(&owner_json),
            P::T(owner.id()),
            P::I(ttl_ms),
        ];
        let fence = match self.dialect {
            Dialect::Postgres | Dialect::Sqlite => {
                let row = self
                    .fetch_optional_lease(&self.sql.acquire, &params)
                    .await?;
                match row {
                    Some(row) => self.get_i64(&row, 0)?,
                    None => 0,
                }
            }
            Dialect::MySql => {
                let done = self.execute_lease(&self.sql.acquire, &params).await?;
                done.last_insert_id().unwrap_or(0)
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
            SystemTime::now(),
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
            // Local calls: acquire, then read.
            let lease = self.try_acquire(key, owner, ttl, issued).await?;
            return match self.get(key.run(), doc, options).await {
                Ok(stored) => Ok((lease, stored)),
                Err(error) => {
                    let _ = self.release(&lease).await;
                    Err(error)
                }
            };
        }
        let ttl_ms = check_ttl(self.dialect, key, ttl)?;
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
        let row = self
            .fetch_optional(&self.sql.acquire_and_load, &params)
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
        match self.stored_at(&row, 6, options.limit) {
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
                    Ok(StoredDoc {
                        version: Version::new(self.get_i64(&row, 0)?.to_string()),
                        bytes: Bytes::from(
                            row.try_get::<Vec<u8>, _>(1)
                                .map_err(|e| map_error(self.dialect, e))?,
                        ),
                    })
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

    async fn release(&self, lease: &Lease) -> Result<()> {
        let key = lease.key();
        let fence = i64::try_from(lease.fence().get()).unwrap_or(i64::MAX);
        let params = [
            P::T(key.run().as_str()),
            P::T(lock_doc(key)),
            P::T(lease.owner().id()),
            P::I(fence),
        ];
        let done = self.execute_lease(&self.sql.release, &params).await?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        // Ours but expired: clear it, and say it was lost.
        self.execute_lease(&self.sql.release_lapsed, &params)
            .await?;
        Err(self.lease_lost(lease, self.holder(key).await?, Operation::Release))
    }
}

fn check_ttl(dialect: Dialect, key: &LockKey, ttl: Duration) -> Result<i64> {
    let ttl_ms = ms(ttl);
    if ttl_ms <= 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a lease TTL must be at least 1 ms",
        )
        .with_backend(dialect.name())
        .with_lock(key));
    }
    Ok(ttl_ms)
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
        let outcome = match options.lease {
            None => self.inner.put(run, doc, &bytes, &options.mode).await,
            Some(lease) => {
                lease.key().check_covers(run, doc)?;
                self.inner
                    .fenced_put(lease, doc, &bytes, &options.mode, false)
                    .await
            }
        };
        outcome.map_err(|e| e.at_doc(Operation::Put, run, doc))
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
                        .execute(&inner.sql.delete, &[P::T(run.as_str()), P::T(doc.as_str())])
                        .await?
                }
                Some(v) => {
                    let expected = v.as_str().parse::<i64>().unwrap_or(0);
                    inner
                        .execute(
                            &inner.sql.delete_if,
                            &[P::T(run.as_str()), P::T(doc.as_str()), P::I(expected)],
                        )
                        .await?
                }
            };
            if done.rows_affected() > 0 {
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
            items.push(DocMeta {
                name,
                version: Version::new(inner.get_i64(row, 1)?.to_string()),
                size: u64::try_from(inner.get_i64(row, 2)?).unwrap_or(0),
            });
        }
        Ok(ListPage { items, more })
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
        Ok(ListPage { items, more })
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner;
        let done = inner
            .execute(&inner.sql.delete_run, &[P::T(run.as_str())])
            .await
            .map_err(|e| e.with_operation(Operation::DeleteRun).with_run(run))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Lock for SqlStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let issued = Instant::now();
        self.inner
            .try_acquire(key, owner, ttl, issued)
            .await
            .map_err(|e| e.with_operation(Operation::Acquire).with_lock(key))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let inner = &self.inner;
        let key = lease.key();
        let issued = Instant::now();
        let ttl_ms = check_ttl(inner.dialect, key, ttl)?;
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
        Ok(lease.renewed(ttl, issued))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let outcome = self
            .inner
            .release(lease)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()));
        self.inner.signals.released(lease.key());
        outcome
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
                .execute_lease(
                    &inner.sql.break_fence,
                    &[P::T(key.run().as_str()), P::T(lock_doc(key)), P::I(fence)],
                )
                .await?;
            if done.rows_affected() == 0 {
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
        inner.signals.released(key);
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

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.inner.signals.wait(key, max).await;
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
        self.inner
            .acquire_and_load(key, doc, owner, ttl, options, issued)
            .await
            .map_err(|e| {
                e.with_operation(Operation::AcquireAndLoad)
                    .with_lock(key)
                    .with_doc(doc)
            })
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run();
        let outcome = self
            .inner
            .fenced_put(lease, doc, &bytes, &mode, true)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc));
        self.inner.signals.released(lease.key());
        outcome
    }
}
