//! Statements and transactions, each bounded by the store's call bound,
//! and reading rows.

use std::future::Future;
use std::time::SystemTime;

use runstate_core::Result;
use runstate_core::time::from_unix_millis;
use sqlx::Row;
use sqlx::any::{AnyQueryResult, AnyRow};

use crate::config::Dialect;
use crate::errors::map_error;
use crate::pool::{Lent, Pool};
use crate::statements::Stmt;
use crate::{Inner, P, query, timed_out, unexpected};

impl Inner {
    pub(crate) fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    /// Runs `request` (lending a connection included) within the call
    /// bound. A request cut short drops its connection (see [`pool`](crate::pool)).
    pub(crate) async fn bounded<T>(
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

    pub(crate) async fn execute(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<AnyQueryResult> {
        self.execute_on(&self.pool, stmt, params).await
    }

    pub(crate) async fn execute_lease(
        &self,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<AnyQueryResult> {
        self.execute_on(&self.lease_pool, stmt, params).await
    }

    pub(crate) async fn fetch_optional_lease(
        &self,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<Option<AnyRow>> {
        self.fetch_optional_on(&self.lease_pool, stmt, params).await
    }

    pub(crate) async fn fetch_optional(
        &self,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<Option<AnyRow>> {
        self.fetch_optional_on(&self.pool, stmt, params).await
    }

    pub(crate) async fn fetch_all(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<Vec<AnyRow>> {
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

    pub(crate) async fn affected(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<u64> {
        self.affected_on(&self.pool, stmt, params).await
    }

    pub(crate) async fn affected_lease(&self, stmt: &Stmt, params: &[P<'_>]) -> Result<u64> {
        self.affected_on(&self.lease_pool, stmt, params).await
    }

    /// Begins a transaction on a connection of `pool` (SQLite: taking the
    /// write lock at once, under the busy timeout).
    pub(crate) async fn begin<'p>(&'p self, pool: &'p Pool) -> Result<Tx<'p>> {
        let begin = match self.dialect {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::MySql => "START TRANSACTION",
            Dialect::Postgres => "BEGIN",
        };
        self.begin_with(pool, begin).await
    }

    /// Begins a transaction on a connection of `pool` with `begin`.
    pub(crate) async fn begin_with<'p>(
        &'p self,
        pool: &'p Pool,
        begin: &'static str,
    ) -> Result<Tx<'p>> {
        let mut conn = self.bounded(pool.get()).await?;
        self.bounded(conn.begin(begin)).await?;
        Ok(Tx { inner: self, conn })
    }

    /// The modified time in column `index` (ms since the epoch, see
    /// `statements::modified_ms`); a time before the epoch reads as it.
    pub(crate) fn modified_at(&self, row: &AnyRow, index: usize) -> Result<SystemTime> {
        Ok(from_unix_millis(
            u64::try_from(self.get_i64(row, index)?).unwrap_or(0),
        ))
    }

    pub(crate) fn get_i64(&self, row: &AnyRow, index: usize) -> Result<i64> {
        row.try_get::<i64, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }

    pub(crate) fn get_opt_i64(&self, row: &AnyRow, index: usize) -> Result<Option<i64>> {
        row.try_get::<Option<i64>, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }

    pub(crate) fn get_text(&self, row: &AnyRow, index: usize) -> Result<String> {
        row.try_get::<String, _>(index)
            .map_err(|e| map_error(self.dialect, e))
    }
}

/// A transaction: each statement bounded by the call bound. Dropped
/// without [`Tx::commit`] or [`Tx::rollback`], its connection is closed,
/// which rolls it back.
pub(crate) struct Tx<'p> {
    inner: &'p Inner,
    conn: Lent<'p>,
}

impl Tx<'_> {
    pub(crate) async fn execute(
        &mut self,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<AnyQueryResult> {
        self.inner
            .bounded(self.conn.execute(query(stmt, params)))
            .await
    }

    pub(crate) async fn fetch_optional(
        &mut self,
        stmt: &Stmt,
        params: &[P<'_>],
    ) -> Result<Option<AnyRow>> {
        self.inner
            .bounded(self.conn.fetch_optional(query(stmt, params)))
            .await
    }

    pub(crate) async fn fetch_all(&mut self, stmt: &Stmt, params: &[P<'_>]) -> Result<Vec<AnyRow>> {
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
    pub(crate) async fn finish<T>(self, outcome: Result<T>) -> Result<T> {
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
