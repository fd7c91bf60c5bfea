//! Writing documents: a `put`, a save under this store's lease or under
//! one granted by another lock service (checked against its watermark),
//! batches of writes (multi-row statements, or on SQLite one statement
//! per write in one transaction), a run's deletion, and the errors of a
//! write refused by its mode or too large.

use std::collections::HashMap;
use std::time::Duration;

use runstate_core::batch::{groups, settle, waves};
use runstate_core::{
    DocName, Error, ErrorKind, Lease, Operation, PutMode, PutRequest, Result, RunId, Version,
};
use sqlx::any::AnyRow;

use crate::config::Dialect;
use crate::errors::is_transaction_conflict;
use crate::leases::fence_i64;
use crate::statements::{self, FencedKind};
use crate::{
    BATCH_BYTES, BATCH_ROWS, GROUP_TRIES, Inner, P, lock_doc, new_version, query, unexpected,
};

impl Inner {
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

    pub(crate) async fn put(
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
    pub(crate) async fn foreign_put(
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
            return Err(
                Error::below_watermark(key, lease.fence(), None).with_backend(self.backend())
            );
        }
        if !written {
            return Err(self.refused(mode));
        }
        Ok(Version::new(version.to_string()))
    }

    /// Deletes a run's documents and its milestones; returns how many
    /// documents there were.
    pub(crate) async fn delete_run(&self, run: &RunId) -> Result<u64> {
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

    /// A write fenced by `lease`. With `release`, the lease is given up
    /// whatever happens, unless it is no longer this grant (`Fenced`,
    /// `LeaseLost`): in the writing statement or transaction where the
    /// database allows, otherwise right after; and when the write fails
    /// early (a lease that does not cover `doc`, a document over the size
    /// limit) or with an error (a constraint or trigger refusing the row,
    /// a full disk, a lost connection, which in PostgreSQL also undoes the
    /// release made by the same statement), by a release of its own.
    pub(crate) async fn fenced_put(
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
            && !error.is_lease_lost()
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

    /// Writes several documents of `run` (see [`Store::put_many`](runstate_core::Store::put_many)), each
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
    pub(crate) async fn put_many(
        &self,
        run: &RunId,
        puts: &[PutRequest],
    ) -> Result<Vec<Result<Version>>> {
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
                Err(error)
                    if tries < GROUP_TRIES && is_transaction_conflict(self.dialect, &error) =>
                {
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
