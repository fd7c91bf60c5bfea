//! Leases: grants (an acquire-and-load reads the document in the same
//! round trip), releases, a foreign lease's watermark, holders, and the
//! errors of a busy, lost or fenced lease.

use std::time::{Duration, Instant, SystemTime};

use runstate_core::time::from_unix_millis;
use runstate_core::{
    DocName, Error, ErrorKind, Fence, GetOptions, Lease, LockInfo, LockKey, Operation, Owner,
    Result, StoredDoc,
};
use sqlx::any::AnyRow;

use crate::config::Dialect;
use crate::{Inner, P, lock_doc, ms, unexpected};

impl Inner {
    /// A holder from columns owner, fence, since, expires-in at `at`.
    pub(crate) fn holder_at(&self, key: &LockKey, row: &AnyRow, at: usize) -> Result<LockInfo> {
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

    pub(crate) async fn holder(&self, key: &LockKey) -> Result<Option<LockInfo>> {
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

    pub(crate) fn lease_lost(
        &self,
        lease: &Lease,
        holder: Option<LockInfo>,
        op: Operation,
    ) -> Error {
        Error::lease_lost(lease, holder)
            .with_backend(self.backend())
            .with_operation(op)
    }

    pub(crate) fn fenced(&self, lease: &Lease, holder: Option<LockInfo>) -> Error {
        Error::fenced(lease, holder).with_backend(self.backend())
    }

    /// Raises `key`'s watermark to `fence` unless it is above it, then
    /// reads `doc` (PostgreSQL: one statement; MySQL: one procedure call;
    /// SQLite: a raise, then a read that sees every commit before it).
    pub(crate) async fn claim(
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
        let refused = || Error::below_watermark(key, fence, None).with_backend(self.backend());
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

    pub(crate) async fn try_acquire(
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

    pub(crate) async fn acquire_and_load(
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

    pub(crate) async fn release(&self, lease: &Lease) -> Result<()> {
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

/// A fence as the database's BIGINT.
pub(crate) fn fence_i64(fence: Fence) -> Result<i64> {
    i64::try_from(fence.get()).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("fence {fence} is beyond what the database can store"),
        )
    })
}

/// The TTL in milliseconds, once [`runstate_core::check_ttl`] accepted it
/// (so the database's clock arithmetic cannot overflow).
pub(crate) fn ttl_ms(dialect: Dialect, key: &LockKey, ttl: Duration) -> Result<i64> {
    runstate_core::check_ttl(ttl).map_err(|e| e.with_backend(dialect.name()).with_lock(key))?;
    Ok(ms(ttl))
}

fn owner_json(owner: &Owner) -> Result<String> {
    serde_json::to_string(owner).map_err(|e| {
        Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
    })
}
