//! The connection pool: lends connections and takes them back without a
//! round trip of its own.
//!
//! sqlx's pool pings a connection before lending it (`test_before_acquire`)
//! and again every time it comes back, so each statement costs up to three
//! round trips and a "two round-trip" locked update costs four to six. This
//! pool sends nothing itself. A connection goes back to the idle list as it
//! is when its last statement finished with a reply (rows, or a refusal by
//! the database); it is dropped when that statement failed on the
//! connection or never finished (a timeout or a cancelled call, whose reply
//! may still be on the wire). A connection that broke while idle (a server
//! restart, a killed backend) is found by the next statement that uses it,
//! which fails with a retryable error and drops it: callers retry retryable
//! errors anyway. Idle connections are closed after [`IDLE_TIMEOUT`], every
//! connection after [`MAX_LIFETIME`], as sqlx's pool does by default.
//!
//! A store made by `SqlStore::from_pool` lends the connections of the
//! application's sqlx pool instead ([`Pool::shared`]): one whose last
//! statement did not finish cleanly, or that may hold an open transaction,
//! is closed rather than given back (sqlx's own ping on release would not
//! notice an open transaction).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyQueryResult, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Connection, Execute, Executor};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::Dialect;
use crate::errors::leaves_connection_usable;

/// An idle connection older than this (since its last use) is closed
/// instead of lent.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// A connection older than this (since it was opened) is closed instead of
/// lent or kept.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How long closing an expired connection politely may take.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

struct Idle {
    conn: AnyConnection,
    opened: Instant,
    used: Instant,
}

/// Connections to one database, at most `max` at a time.
pub(crate) struct Pool {
    dialect: Dialect,
    options: AnyConnectOptions,
    /// Run on every new connection; each with whether it may fail.
    setup: Vec<(String, bool)>,
    /// One permit per connection that may be lent at once.
    permits: Semaphore,
    /// Most recently used last: lent first, so the others age out.
    idle: Mutex<Vec<Idle>>,
    acquire_timeout: Duration,
    /// The application's pool, whose connections are lent instead.
    shared: Option<AnyPool>,
}

/// A lent connection: one of ours, or one of the application's pool.
enum Conn {
    Own(AnyConnection),
    Shared(PoolConnection<Any>),
}

impl Pool {
    pub(crate) fn new(
        dialect: Dialect,
        options: AnyConnectOptions,
        setup: Vec<(String, bool)>,
        max: u32,
        acquire_timeout: Duration,
    ) -> Pool {
        Pool {
            dialect,
            options,
            setup,
            permits: Semaphore::new(usize::try_from(max.max(1)).unwrap_or(1)),
            idle: Mutex::new(Vec::new()),
            acquire_timeout,
            shared: None,
        }
    }

    /// Lends the connections of the application's `pool`: as many at once
    /// as it holds, its own settings (size, lifetimes, session setup) in
    /// force. Closing this pool leaves `pool` open.
    pub(crate) fn shared(dialect: Dialect, pool: AnyPool, acquire_timeout: Duration) -> Pool {
        let max = pool.options().get_max_connections();
        Pool {
            dialect,
            options: (*pool.connect_options()).clone(),
            setup: Vec::new(),
            permits: Semaphore::new(usize::try_from(max.max(1)).unwrap_or(1)),
            idle: Mutex::new(Vec::new()),
            acquire_timeout,
            shared: Some(pool),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lends a connection: an idle one, or a new one when none is idle and
    /// fewer than `max` are open.
    ///
    /// # Errors
    /// `PoolTimedOut` when none became free (and connected) within the
    /// acquire timeout; `PoolClosed` after [`Pool::close`]; the connect
    /// error or the session setup's error of a new connection.
    pub(crate) async fn get(&self) -> Result<Lent<'_>, sqlx::Error> {
        match tokio::time::timeout(self.acquire_timeout, self.get_unbounded()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    async fn get_unbounded(&self) -> Result<Lent<'_>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        if let Some(shared) = &self.shared {
            let conn = shared.acquire().await?;
            return Ok(Lent::new(self, Conn::Shared(conn), Instant::now(), permit));
        }
        loop {
            let Some(idle) = self.idle().pop() else { break };
            let now = Instant::now();
            if now.duration_since(idle.used) < IDLE_TIMEOUT
                && now.duration_since(idle.opened) < MAX_LIFETIME
            {
                return Ok(Lent::new(self, Conn::Own(idle.conn), idle.opened, permit));
            }
            let _ = tokio::time::timeout(CLOSE_BOUND, idle.conn.close()).await;
        }
        let mut conn = self.options.connect().await?;
        for (statement, may_fail) in &self.setup {
            let outcome = conn
                .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone())))
                .await;
            if let Err(e) = outcome
                && !may_fail
            {
                return Err(e);
            }
        }
        Ok(Lent::new(self, Conn::Own(conn), Instant::now(), permit))
    }

    /// Refuses further loans and closes the idle connections; connections
    /// lent now are closed when they come back. The application's pool
    /// ([`Pool::shared`]) stays open: its connections lent now go back to
    /// it as usual.
    pub(crate) async fn close(&self) {
        self.permits.close();
        let idle = std::mem::take(&mut *self.idle());
        for idle in idle {
            let _ = tokio::time::timeout(CLOSE_BOUND, idle.conn.close()).await;
        }
    }
}

/// A lent connection. Dropped, it goes back to its pool if its last
/// statement finished with a reply and no transaction is open; otherwise
/// it is closed.
pub(crate) struct Lent<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    opened: Instant,
    /// Whether the last statement finished with a reply.
    reusable: bool,
    /// Whether a transaction may be open on it.
    in_transaction: bool,
    /// Held until the connection is back in the idle list (fields drop
    /// after `Drop::drop`), so a waiter woken by it finds the connection.
    _permit: SemaphorePermit<'a>,
}

impl<'a> Lent<'a> {
    fn new(pool: &'a Pool, conn: Conn, opened: Instant, permit: SemaphorePermit<'a>) -> Lent<'a> {
        Lent {
            pool,
            conn: Some(conn),
            opened,
            reusable: true,
            in_transaction: false,
            _permit: permit,
        }
    }

    fn conn(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        match self.conn.as_mut() {
            Some(Conn::Own(conn)) => Ok(conn),
            Some(Conn::Shared(conn)) => Ok(&mut **conn),
            None => Err(sqlx::Error::PoolClosed),
        }
    }

    /// Runs one statement that returns no rows (or whose rows are not
    /// wanted).
    pub(crate) async fn execute<'q, E>(
        &mut self,
        statement: E,
    ) -> Result<AnyQueryResult, sqlx::Error>
    where
        E: Execute<'q, Any> + 'q,
    {
        self.reusable = false;
        let outcome = self.conn()?.execute(statement).await;
        self.settle(&outcome);
        outcome
    }

    /// Runs one statement and returns its first row, if any.
    pub(crate) async fn fetch_optional<'q, E>(
        &mut self,
        statement: E,
    ) -> Result<Option<AnyRow>, sqlx::Error>
    where
        E: Execute<'q, Any> + 'q,
    {
        self.reusable = false;
        let outcome = self.conn()?.fetch_optional(statement).await;
        self.settle(&outcome);
        outcome
    }

    /// Runs one statement and returns all its rows.
    pub(crate) async fn fetch_all<'q, E>(
        &mut self,
        statement: E,
    ) -> Result<Vec<AnyRow>, sqlx::Error>
    where
        E: Execute<'q, Any> + 'q,
    {
        self.reusable = false;
        let outcome = self.conn()?.fetch_all(statement).await;
        self.settle(&outcome);
        outcome
    }

    /// Begins a transaction with `statement` (`BEGIN IMMEDIATE`, say). Until
    /// [`Lent::end`] ends it, the connection is not taken back.
    pub(crate) async fn begin(&mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        self.in_transaction = true;
        let outcome = self.execute(sqlx::raw_sql(statement)).await;
        if let Err(sqlx::Error::Database(_)) = &outcome {
            // Refused by the database (busy, say): nothing was begun.
            self.in_transaction = false;
        }
        outcome.map(drop)
    }

    /// Ends a transaction with `statement` (`COMMIT` or `ROLLBACK`).
    pub(crate) async fn end(&mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        let outcome = self.execute(sqlx::raw_sql(statement)).await;
        if outcome.is_ok() {
            self.in_transaction = false;
        }
        outcome.map(drop)
    }

    /// The connection itself, for work that spans statements (migrations).
    /// It is not taken back unless [`Lent::keep`] says so afterwards.
    pub(crate) fn raw(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        self.reusable = false;
        self.conn()
    }

    /// Marks the connection clean (or not) after work done through
    /// [`Lent::raw`] or a transaction ended by the caller.
    pub(crate) fn keep(&mut self, reusable: bool) {
        self.reusable = reusable;
    }

    fn settle<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        self.reusable = match outcome {
            Ok(_) => true,
            Err(error) => leaves_connection_usable(self.pool.dialect, error),
        };
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let clean = self.reusable && !self.in_transaction;
        let conn = match self.conn.take() {
            None => return,
            Some(Conn::Shared(mut conn)) => {
                // Given back to the application's pool only when clean;
                // otherwise closed (sqlx's ping on release would take a
                // connection with an open transaction back).
                if !clean {
                    conn.close_on_drop();
                }
                return;
            }
            Some(Conn::Own(conn)) => conn,
        };
        // One past its lifetime goes back too: the next loan closes it
        // politely.
        if clean && !self.pool.permits.is_closed() {
            self.pool.idle().push(Idle {
                conn,
                opened: self.opened,
                used: Instant::now(),
            });
        }
        // Otherwise the connection is dropped, which closes its socket
        // without a goodbye: its state is unknown, so nothing more is sent.
    }
}
