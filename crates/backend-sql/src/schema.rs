//! The schema, as embedded, versioned migrations per dialect, and the
//! runner that applies them once, under a lock, recording each in
//! `<prefix>schema_migrations`. An applied migration is never edited:
//! changes come as new ones.

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
    let mut all = vec![Migration {
        version: 1,
        description: "documents and leases",
        statements,
    }];
    if dialect == Dialect::MySql {
        all.push(Migration {
            version: 2,
            description: "acquire_and_load idempotent by owner, document sent only when granted",
            statements: mysql_acquire_and_load_v2(prefix),
        });
    }
    all.push(Migration {
        // 2 in PostgreSQL and SQLite, 3 in MySQL.
        version: all.len() as i64 + 1,
        description: "fence watermarks, status messages, milestones",
        statements: events_tables(dialect, prefix),
    });
    all
}

/// The tables of split-store fencing and of a run's events, and in MySQL
/// the procedures that use them in one round trip:
///
/// - `<prefix>watermarks (run, doc, fence)`: per lock (`doc` empty for a
///   run lock), the highest fence of a lease granted by another lock
///   service that was claimed here or saved under;
/// - `<prefix>status (run, seq, topic, body, at_ms)`: the bounded history
///   of status messages, `seq` counting a run's messages from 1 without
///   gaps;
/// - `<prefix>status_seq (run, seq)`: the last `seq` given out per run,
///   kept when old messages are trimmed, so numbers never repeat;
/// - `<prefix>milestones (run, kind, name, value)`: `kind` is `timestamps`
///   (value: seconds since the epoch, fractional) or `attrs`.
fn events_tables(dialect: Dialect, prefix: &str) -> Vec<String> {
    let w = format!("{prefix}watermarks");
    let q = format!("{prefix}status_seq");
    let s = format!("{prefix}status");
    let m = format!("{prefix}milestones");
    match dialect {
        Dialect::Postgres => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {w} (
                   run TEXT COLLATE \"C\" NOT NULL,
                   doc TEXT COLLATE \"C\" NOT NULL,
                   fence BIGINT NOT NULL,
                   PRIMARY KEY (run, doc))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {q} (
                   run TEXT COLLATE \"C\" NOT NULL PRIMARY KEY,
                   seq BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {s} (
                   run TEXT COLLATE \"C\" NOT NULL,
                   seq BIGINT NOT NULL,
                   topic TEXT NOT NULL,
                   body TEXT NOT NULL,
                   at_ms BIGINT NOT NULL,
                   PRIMARY KEY (run, seq))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {m} (
                   run TEXT COLLATE \"C\" NOT NULL,
                   kind TEXT COLLATE \"C\" NOT NULL,
                   name TEXT COLLATE \"C\" NOT NULL,
                   value TEXT NOT NULL,
                   PRIMARY KEY (run, kind, name))"
            ),
        ],
        Dialect::Sqlite => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {w} (
                   run TEXT NOT NULL, doc TEXT NOT NULL, fence INTEGER NOT NULL,
                   PRIMARY KEY (run, doc))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {q} (
                   run TEXT NOT NULL PRIMARY KEY, seq INTEGER NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {s} (
                   run TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
                   body TEXT NOT NULL, at_ms INTEGER NOT NULL,
                   PRIMARY KEY (run, seq))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {m} (
                   run TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
                   value TEXT NOT NULL,
                   PRIMARY KEY (run, kind, name))"
            ),
        ],
        Dialect::MySql => {
            let d = format!("{prefix}documents");
            let id = "VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL";
            let text = "MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL";
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {w} (
                       run {id}, doc {id}, fence BIGINT NOT NULL,
                       PRIMARY KEY (run, doc)) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {q} (
                       run {id} PRIMARY KEY, seq BIGINT NOT NULL) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {s} (
                       run {id}, seq BIGINT NOT NULL, topic {id}, body {text},
                       at_ms BIGINT NOT NULL,
                       PRIMARY KEY (run, seq)) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {m} (
                       run {id}, kind VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                       name {id}, value {text},
                       PRIMARY KEY (run, kind, name)) ENGINE=InnoDB"
                ),
                // Raise the watermark (never lower it) and read the
                // document, in one round trip. The raise commits before
                // the read, whose snapshot then sees every earlier commit.
                format!("DROP PROCEDURE IF EXISTS {prefix}claim"),
                format!(
                    "CREATE PROCEDURE {prefix}claim(
                       IN p_run VARCHAR(128), IN p_doc VARCHAR(128), IN p_fence BIGINT,
                       IN p_name VARCHAR(128), IN p_limit BIGINT)
                     BEGIN
                       DECLARE v_mark BIGINT DEFAULT NULL;
                       DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
                       START TRANSACTION;
                       INSERT INTO {w} (run, doc, fence) VALUES (p_run, p_doc, p_fence)
                         ON DUPLICATE KEY UPDATE fence = GREATEST(fence, VALUES(fence));
                       SELECT fence INTO v_mark FROM {w} WHERE run = p_run AND doc = p_doc FOR UPDATE;
                       COMMIT;
                       SELECT CAST(v_mark = p_fence AS SIGNED) AS claimed, d.version, d.size,
                              CASE WHEN d.size <= p_limit THEN d.bytes END AS bytes
                       FROM (SELECT 1 AS one) one
                       LEFT JOIN {d} d ON v_mark = p_fence AND d.run = p_run AND d.name = p_name;
                     END"
                ),
                // A save under a lease granted elsewhere: the watermark is
                // checked and raised, and the document written with its
                // mode's check, in one transaction holding the watermark
                // row, so a claim of a newer fence waits for it or refuses
                // it. The fence is checked first: a stale holder hears
                // that it is stale, not that the document changed.
                format!("DROP PROCEDURE IF EXISTS {prefix}foreign_put"),
                format!(
                    "CREATE PROCEDURE {prefix}foreign_put(
                       IN p_run VARCHAR(128), IN p_name VARCHAR(128), IN p_version BIGINT,
                       IN p_bytes LONGBLOB, IN p_size BIGINT, IN p_doc VARCHAR(128),
                       IN p_fence BIGINT, IN p_mode INT, IN p_expected BIGINT)
                     BEGIN
                       DECLARE v_mark BIGINT DEFAULT NULL;
                       DECLARE v_written BIGINT DEFAULT 0;
                       DECLARE v_duplicate INT DEFAULT 0;
                       DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
                       START TRANSACTION;
                       INSERT INTO {w} (run, doc, fence) VALUES (p_run, p_doc, p_fence)
                         ON DUPLICATE KEY UPDATE fence = GREATEST(fence, VALUES(fence));
                       SELECT fence INTO v_mark FROM {w} WHERE run = p_run AND doc = p_doc FOR UPDATE;
                       IF v_mark = p_fence THEN
                         IF p_mode = 0 THEN
                           INSERT INTO {d} (run, name, version, bytes, size, updated_at)
                             VALUES (p_run, p_name, p_version, p_bytes, p_size, UTC_TIMESTAMP(6))
                             ON DUPLICATE KEY UPDATE version = VALUES(version), bytes = VALUES(bytes),
                               size = VALUES(size), updated_at = VALUES(updated_at);
                           SET v_written = 1;
                         ELSEIF p_mode = 1 THEN
                           BEGIN
                             DECLARE CONTINUE HANDLER FOR 1062 SET v_duplicate = 1;
                             INSERT INTO {d} (run, name, version, bytes, size, updated_at)
                               VALUES (p_run, p_name, p_version, p_bytes, p_size, UTC_TIMESTAMP(6));
                           END;
                           SET v_written = 1 - v_duplicate;
                         ELSE
                           UPDATE {d} SET version = p_version, bytes = p_bytes, size = p_size,
                                  updated_at = UTC_TIMESTAMP(6)
                           WHERE run = p_run AND name = p_name AND version = p_expected;
                           SET v_written = ROW_COUNT();
                         END IF;
                       END IF;
                       COMMIT;
                       SELECT CAST(v_mark = p_fence AS SIGNED) AS accepted, CAST(v_written AS SIGNED) AS written;
                     END"
                ),
                // A status message: the run's counter row (locked until
                // the commit, so publishers of one run take turns and
                // numbers commit in order), the message, and the trim of
                // messages beyond the history, in one transaction.
                format!("DROP PROCEDURE IF EXISTS {prefix}publish"),
                format!(
                    "CREATE PROCEDURE {prefix}publish(
                       IN p_run VARCHAR(128), IN p_topic VARCHAR(128),
                       IN p_body MEDIUMTEXT CHARACTER SET utf8mb4, IN p_at BIGINT, IN p_keep BIGINT)
                     BEGIN
                       DECLARE v_seq BIGINT DEFAULT 0;
                       DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
                       START TRANSACTION;
                       INSERT INTO {q} (run, seq) VALUES (p_run, 1)
                         ON DUPLICATE KEY UPDATE seq = seq + 1;
                       SELECT seq INTO v_seq FROM {q} WHERE run = p_run FOR UPDATE;
                       INSERT INTO {s} (run, seq, topic, body, at_ms)
                         VALUES (p_run, v_seq, p_topic, p_body, p_at);
                       DELETE FROM {s} WHERE run = p_run AND seq <= v_seq - p_keep;
                       COMMIT;
                       SELECT v_seq AS seq;
                     END"
                ),
            ]
        }
    }
}

/// Version 2 of MySQL's `acquire_and_load` procedure (same signature and
/// reply columns as version 1, so callers of either version work with
/// either):
///
/// - acquire is idempotent by owner: a live grant of the same owner id is
///   returned again (same fence and since, expiry restarted); an expired or
///   released one is a new grant (fence + 1);
/// - the document is joined only when the lock was granted, so a refused
///   caller does not download it.
///
/// Each statement of the procedure runs in a transaction of its own
/// (autocommit), so the final `SELECT` takes its snapshot after the grant
/// and sees every commit that preceded it, a document created by the
/// previous holder included.
fn mysql_acquire_and_load_v2(prefix: &str) -> Vec<String> {
    let d = format!("{prefix}documents");
    let l = format!("{prefix}leases");
    vec![
        format!("DROP PROCEDURE IF EXISTS {prefix}acquire_and_load"),
        // The UPDATE takes the row when it is free or already this owner's;
        // the fence and since, which read the old expiry, are assigned
        // before it (assignments run left to right).
        format!(
            "CREATE PROCEDURE {prefix}acquire_and_load(
               IN p_run VARCHAR(128), IN p_doc VARCHAR(128), IN p_owner TEXT,
               IN p_owner_id VARCHAR(64), IN p_ttl BIGINT, IN p_name VARCHAR(128), IN p_limit BIGINT)
             BEGIN
               DECLARE v_now BIGINT DEFAULT {now};
               DECLARE v_granted BIGINT DEFAULT 0;
               DECLARE CONTINUE HANDLER FOR 1062 DO LAST_INSERT_ID(0);
               DO LAST_INSERT_ID(0);
               UPDATE {l} SET
                      fence = IF(expires_at_ms > v_now, LAST_INSERT_ID(fence), LAST_INSERT_ID(fence + 1)),
                      since_ms = IF(expires_at_ms > v_now, since_ms, v_now),
                      owner = p_owner, owner_id = p_owner_id, expires_at_ms = v_now + p_ttl
               WHERE run = p_run AND doc = p_doc
                 AND (expires_at_ms IS NULL OR expires_at_ms <= v_now OR owner_id = p_owner_id);
               IF ROW_COUNT() = 0 AND NOT EXISTS (SELECT 1 FROM {l} WHERE run = p_run AND doc = p_doc) THEN
                 INSERT INTO {l} (run, doc, owner, owner_id, fence, since_ms, expires_at_ms)
                 VALUES (p_run, p_doc, p_owner, p_owner_id, LAST_INSERT_ID(1), v_now, v_now + p_ttl);
               END IF;
               SET v_granted = LAST_INSERT_ID();
               SELECT CAST(v_granted AS SIGNED) AS granted, l.since_ms AS granted_since,
                      l.owner, l.fence, l.since_ms, l.expires_at_ms - v_now AS expires_in,
                      d.version, d.size, CASE WHEN d.size <= p_limit THEN d.bytes END AS bytes
               FROM {l} l LEFT JOIN {d} d ON v_granted > 0 AND d.run = p_run AND d.name = p_name
               WHERE l.run = p_run AND l.doc = p_doc;
             END",
            now = now_ms(Dialect::MySql),
        ),
    ]
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
    let mut statements: Vec<String> = [
        "documents",
        "leases",
        "watermarks",
        "status",
        "status_seq",
        "milestones",
        "schema_migrations",
    ]
    .iter()
    .map(|table| format!("DROP TABLE IF EXISTS {prefix}{table}"))
    .collect();
    if dialect == Dialect::MySql {
        for procedure in ["acquire_and_load", "claim", "foreign_put", "publish"] {
            statements.push(format!("DROP PROCEDURE IF EXISTS {prefix}{procedure}"));
        }
    }
    for statement in statements {
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
            .await
            .map_err(|e| map_error(dialect, e).with_backend(dialect.name()))?;
    }
    Ok(())
}
