//! The schema, as embedded, versioned migrations per dialect, and the
//! runner that applies them once, under a lock, recording each in
//! `<prefix>schema_migrations`.

use std::time::Duration;

use runstate_core::{Error, ErrorKind, Operation};
use sqlx::{AnyConnection, Executor, Row};

use crate::config::Dialect;
use crate::errors::{map_error, map_error_during};
use crate::statements::now_ms;

/// One migration: its version, what it does, and its DDL statements.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) description: &'static str,
    pub(crate) statements: Vec<String>,
}

/// The migrations of `dialect`, with tables named by `prefix`.
pub(crate) fn migrations(dialect: Dialect, prefix: &str) -> Vec<Migration> {
    let d = format!("{prefix}documents");
    let l = format!("{prefix}leases");
    let statements = match dialect {
        Dialect::Postgres => vec![
            // "C" collation: runs and names sort by bytes, as the contract says.
            format!(
                "CREATE TABLE IF NOT EXISTS {d} (
                   run TEXT COLLATE \"C\" NOT NULL,
                   name TEXT COLLATE \"C\" NOT NULL,
                   version BIGINT NOT NULL,
                   bytes BYTEA NOT NULL,
                   size BIGINT NOT NULL,
                   updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                   PRIMARY KEY (run, name))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {l} (
                   run TEXT COLLATE \"C\" NOT NULL,
                   doc TEXT COLLATE \"C\" NOT NULL,
                   owner TEXT NOT NULL,
                   owner_id TEXT NOT NULL,
                   fence BIGINT NOT NULL,
                   since_ms BIGINT NOT NULL,
                   expires_at_ms BIGINT,
                   PRIMARY KEY (run, doc))"
            ),
        ],
        Dialect::MySql => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {d} (
                   run VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                   name VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                   version BIGINT NOT NULL,
                   bytes LONGBLOB NOT NULL,
                   size BIGINT NOT NULL,
                   updated_at DATETIME(6) NOT NULL,
                   PRIMARY KEY (run, name)) ENGINE=InnoDB"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {l} (
                   run VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                   doc VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                   owner TEXT NOT NULL,
                   owner_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                   fence BIGINT NOT NULL,
                   since_ms BIGINT NOT NULL,
                   expires_at_ms BIGINT NULL,
                   PRIMARY KEY (run, doc)) ENGINE=InnoDB"
            ),
            // Acquire and load in one round trip: MySQL has neither
            // RETURNING nor data-modifying CTEs. The common case (the lock
            // was granted before) is one conditional UPDATE, which InnoDB
            // does far more cheaply than INSERT … ON DUPLICATE KEY UPDATE;
            // the first grant of a lock inserts its row, and when two first
            // grants race the loser's duplicate key just means "held".
            // LAST_INSERT_ID carries the granted fence (0: not granted).
            format!("DROP PROCEDURE IF EXISTS {prefix}acquire_and_load"),
            format!(
                "CREATE PROCEDURE {prefix}acquire_and_load(
                   IN p_run VARCHAR(128), IN p_doc VARCHAR(128), IN p_owner TEXT,
                   IN p_owner_id VARCHAR(64), IN p_ttl BIGINT, IN p_name VARCHAR(128), IN p_limit BIGINT)
                 BEGIN
                   DECLARE v_now BIGINT DEFAULT {now};
                   DECLARE CONTINUE HANDLER FOR 1062 DO LAST_INSERT_ID(0);
                   DO LAST_INSERT_ID(0);
                   UPDATE {l} SET owner = p_owner, owner_id = p_owner_id, fence = LAST_INSERT_ID(fence + 1),
                          since_ms = v_now, expires_at_ms = v_now + p_ttl
                   WHERE run = p_run AND doc = p_doc AND (expires_at_ms IS NULL OR expires_at_ms <= v_now);
                   IF ROW_COUNT() = 0 AND NOT EXISTS (SELECT 1 FROM {l} WHERE run = p_run AND doc = p_doc) THEN
                     INSERT INTO {l} (run, doc, owner, owner_id, fence, since_ms, expires_at_ms)
                     VALUES (p_run, p_doc, p_owner, p_owner_id, LAST_INSERT_ID(1), v_now, v_now + p_ttl);
                   END IF;
                   SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS granted, l.since_ms AS granted_since,
                          l.owner, l.fence, l.since_ms, l.expires_at_ms - v_now AS expires_in,
                          d.version, d.size, CASE WHEN d.size <= p_limit THEN d.bytes END AS bytes
                   FROM {l} l LEFT JOIN {d} d ON d.run = p_run AND d.name = p_name
                   WHERE l.run = p_run AND l.doc = p_doc;
                 END",
                now = now_ms(Dialect::MySql),
            ),
        ],
        Dialect::Sqlite => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {d} (
                   run TEXT NOT NULL,
                   name TEXT NOT NULL,
                   version INTEGER NOT NULL,
                   bytes BLOB NOT NULL,
                   size INTEGER NOT NULL,
                   updated_at TEXT NOT NULL,
                   PRIMARY KEY (run, name))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {l} (
                   run TEXT NOT NULL,
                   doc TEXT NOT NULL,
                   owner TEXT NOT NULL,
                   owner_id TEXT NOT NULL,
                   fence INTEGER NOT NULL,
                   since_ms INTEGER NOT NULL,
                   expires_at_ms INTEGER,
                   PRIMARY KEY (run, doc))"
            ),
        ],
    };
    vec![Migration {
        version: 1,
        description: "documents and leases",
        statements,
    }]
}

fn migrations_table(dialect: Dialect, prefix: &str) -> String {
    let applied_at = match dialect {
        Dialect::Postgres => "TIMESTAMPTZ NOT NULL DEFAULT now()",
        Dialect::MySql => "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
        Dialect::Sqlite => "TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {prefix}schema_migrations (
           version BIGINT PRIMARY KEY,
           description VARCHAR(200) NOT NULL,
           applied_at {applied_at})"
    )
}

fn migration_error(error: sqlx::Error, dialect: Dialect, what: &str) -> Error {
    map_error_during(dialect, error, what).with_operation(Operation::Open)
}

/// Applies the migrations not yet applied, on one connection, holding a
/// lock so that processes opening the store at once take turns: an
/// advisory lock in PostgreSQL, `GET_LOCK` in MySQL, the write lock
/// (`BEGIN IMMEDIATE`) in SQLite. Returns how many were applied.
pub(crate) async fn migrate(
    conn: &mut AnyConnection,
    dialect: Dialect,
    prefix: &str,
    wait: Duration,
) -> Result<usize, Error> {
    let name = format!("{prefix}migrations");
    let wait_secs = wait.as_secs().max(1);
    match dialect {
        Dialect::Postgres => {
            conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SELECT pg_advisory_lock(hashtext('{name}'))"
            ))))
            .await
            .map_err(|e| migration_error(e, dialect, "taking the migration lock"))?;
        }
        Dialect::MySql => {
            let row = conn
                .fetch_one(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SELECT GET_LOCK('{name}', {wait_secs})"
                ))))
                .await
                .map_err(|e| migration_error(e, dialect, "taking the migration lock"))?;
            let got: Option<i64> = row.try_get(0).ok();
            if got != Some(1) {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "another process holds the migration lock",
                )
                .with_backend(dialect.name())
                .with_operation(Operation::Open)
                .set_retryable(true));
            }
        }
        Dialect::Sqlite => {
            conn.execute(sqlx::raw_sql("BEGIN IMMEDIATE"))
                .await
                .map_err(|e| migration_error(e, dialect, "taking the write lock"))?;
        }
    }
    let outcome = apply(conn, dialect, prefix).await;
    let unlock = match dialect {
        Dialect::Postgres => format!("SELECT pg_advisory_unlock(hashtext('{name}'))"),
        Dialect::MySql => format!("SELECT RELEASE_LOCK('{name}')"),
        Dialect::Sqlite => if outcome.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        }
        .to_owned(),
    };
    let unlocked = conn
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(unlock)))
        .await;
    let applied = outcome?;
    unlocked.map_err(|e| migration_error(e, dialect, "releasing the migration lock"))?;
    Ok(applied)
}

async fn apply(conn: &mut AnyConnection, dialect: Dialect, prefix: &str) -> Result<usize, Error> {
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(migrations_table(
        dialect, prefix,
    ))))
    .await
    .map_err(|e| migration_error(e, dialect, "creating the migrations table"))?;
    let rows = conn
        .fetch_all(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {prefix}schema_migrations"
        ))))
        .await
        .map_err(|e| migration_error(e, dialect, "reading applied migrations"))?;
    let applied: Vec<i64> = rows
        .iter()
        .filter_map(|r| r.try_get::<i64, _>(0).ok())
        .collect();
    let mut count = 0;
    for migration in migrations(dialect, prefix) {
        if applied.contains(&migration.version) {
            continue;
        }
        for statement in &migration.statements {
            conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone())))
                .await
                .map_err(|e| {
                    migration_error(
                        e,
                        dialect,
                        &format!(
                            "migration {} ({})",
                            migration.version, migration.description
                        ),
                    )
                })?;
        }
        conn.execute(sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {prefix}schema_migrations (version, description) VALUES ({}, '{}')",
            migration.version, migration.description
        ))))
        .await
        .map_err(|e| migration_error(e, dialect, "recording a migration"))?;
        tracing::info!(
            version = migration.version,
            description = migration.description,
            prefix,
            "migration applied"
        );
        count += 1;
    }
    Ok(count)
}

/// Drops every object of the schema (tables and, in MySQL, the procedure).
pub(crate) async fn drop_all(
    conn: &mut AnyConnection,
    dialect: Dialect,
    prefix: &str,
) -> Result<(), Error> {
    let mut statements = vec![
        format!("DROP TABLE IF EXISTS {prefix}documents"),
        format!("DROP TABLE IF EXISTS {prefix}leases"),
        format!("DROP TABLE IF EXISTS {prefix}schema_migrations"),
    ];
    if dialect == Dialect::MySql {
        statements.push(format!("DROP PROCEDURE IF EXISTS {prefix}acquire_and_load"));
    }
    for statement in statements {
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
            .await
            .map_err(|e| map_error(dialect, e).with_backend(dialect.name()))?;
    }
    Ok(())
}
