//! Every SQL statement, per dialect, with the table prefix spliced in once
//! at open (the prefix is allowlisted; everything else is a bind parameter).
//!
//! Time comes from the database's clock only: `{NOW}` is the current time
//! in milliseconds since the epoch by the server (`clock_timestamp()` in
//! PostgreSQL, `NOW(6)` in MySQL, `julianday('now')` in SQLite).

use std::sync::Arc;

use crate::config::Dialect;

/// One statement: its SQL, and for each placeholder in order the number of
/// the parameter it takes. PostgreSQL's `$n` can repeat a parameter;
/// MySQL's and SQLite's `?` cannot, so their binds follow this list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stmt {
    /// Shared, so handing it to sqlx on every call copies nothing.
    pub(crate) sql: Arc<str>,
    pub(crate) order: Vec<u8>,
}

/// The statements of one store.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    pub(crate) get: Stmt,
    /// A read without a size limit: fewer columns, nothing to compare.
    pub(crate) get_unlimited: Stmt,
    pub(crate) put_overwrite: Stmt,
    pub(crate) put_create: Stmt,
    pub(crate) put_update: Stmt,
    pub(crate) delete: Stmt,
    pub(crate) delete_if: Stmt,
    pub(crate) exists: Stmt,
    pub(crate) list_docs: Stmt,
    pub(crate) list_runs: Stmt,
    pub(crate) delete_run: Stmt,
    /// Takes a free or expired lock: PostgreSQL and SQLite return the grant
    /// (`RETURNING`); MySQL reports it through `LAST_INSERT_ID`.
    pub(crate) acquire: Stmt,
    /// PostgreSQL: acquire and load in one statement; MySQL: the stored
    /// procedure doing the same; SQLite: unused.
    pub(crate) acquire_and_load: Stmt,
    pub(crate) holder: Stmt,
    pub(crate) renew: Stmt,
    pub(crate) release: Stmt,
    pub(crate) release_lapsed: Stmt,
    pub(crate) break_fence: Stmt,
    pub(crate) list_locks: Stmt,
    pub(crate) list_locks_run: Stmt,
    pub(crate) lease_is_current: Stmt,
    /// Fenced writes, indexed by [`FencedKind`] and whether they release.
    pub(crate) fenced: [[Stmt; 2]; 3],
}

/// The mode of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FencedKind {
    Overwrite = 0,
    Create = 1,
    Update = 2,
}

/// Numbered placeholders for PostgreSQL (bound 1..=max), `?` elsewhere
/// (bound in order of appearance).
fn placeholders(dialect: Dialect, sql: &str) -> Stmt {
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut number = 0u8;
            while let Some(digit) = chars.peek().and_then(|d| d.to_digit(10)) {
                number = number * 10 + digit as u8;
                chars.next();
            }
            order.push(number);
            if dialect == Dialect::Postgres {
                out.push_str(&format!("${number}"));
            } else {
                out.push('?');
            }
        } else {
            out.push(c);
        }
    }
    if dialect == Dialect::Postgres {
        let max = order.iter().copied().max().unwrap_or(0);
        order = (1..=max).collect();
    }
    Stmt {
        sql: out.into(),
        order,
    }
}

pub(crate) fn now_ms(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        Dialect::MySql => "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000 AS SIGNED)",
        Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

fn updated_at(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "now()",
        Dialect::MySql => "UTC_TIMESTAMP(6)",
        Dialect::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    }
}

impl Statements {
    pub(crate) fn new(dialect: Dialect, prefix: &str) -> Self {
        let d = format!("{prefix}documents");
        let l = format!("{prefix}leases");
        let now = now_ms(dialect);
        let upd = updated_at(dialect);
        // Fill in tables and clock; numbered placeholders become `?` outside
        // PostgreSQL, so MySQL and SQLite statements list their binds in
        // order of appearance.
        let t = |sql: &str| {
            placeholders(
                dialect,
                &sql.replace("{D}", &d)
                    .replace("{L}", &l)
                    .replace("{NOW}", now)
                    .replace("{UPD}", upd)
                    .replace("{P}", prefix),
            )
        };
        let upsert_tail = match dialect {
            Dialect::MySql => {
                "ON DUPLICATE KEY UPDATE version = VALUES(version), bytes = VALUES(bytes), \
                               size = VALUES(size), updated_at = VALUES(updated_at)"
            }
            _ => {
                "ON CONFLICT (run, name) DO UPDATE SET version = excluded.version, bytes = excluded.bytes, \
                  size = excluded.size, updated_at = excluded.updated_at"
            }
        };
        let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) VALUES ($1, $2, $3, $4, $5, {UPD})";
        Statements {
            get: t(
                "SELECT version, size, CASE WHEN size <= $3 THEN bytes END FROM {D} WHERE run = $1 AND name = $2",
            ),
            get_unlimited: t("SELECT version, bytes FROM {D} WHERE run = $1 AND name = $2"),
            put_overwrite: t(&format!("{insert} {upsert_tail}")),
            put_create: t(insert),
            put_update: t(
                "UPDATE {D} SET version = $3, bytes = $4, size = $5, updated_at = {UPD} \
                           WHERE run = $1 AND name = $2 AND version = $6",
            ),
            delete: t("DELETE FROM {D} WHERE run = $1 AND name = $2"),
            delete_if: t("DELETE FROM {D} WHERE run = $1 AND name = $2 AND version = $3"),
            exists: t("SELECT version FROM {D} WHERE run = $1 AND name = $2"),
            list_docs: t(
                "SELECT name, version, size FROM {D} WHERE run = $1 AND name > $2 ORDER BY name LIMIT $3",
            ),
            list_runs: t("SELECT DISTINCT run FROM {D} WHERE run > $1 ORDER BY run LIMIT $2"),
            delete_run: t("DELETE FROM {D} WHERE run = $1"),
            acquire: match dialect {
                // $1 run, $2 doc, $3 owner, $4 owner id, $5 ttl ms.
                Dialect::Postgres | Dialect::Sqlite => t(
                    "INSERT INTO {L} AS l (run, doc, owner, owner_id, fence, since_ms, expires_at_ms) \
                     VALUES ($1, $2, $3, $4, 1, {NOW}, {NOW} + $5) \
                     ON CONFLICT (run, doc) DO UPDATE SET owner = excluded.owner, owner_id = excluded.owner_id, \
                     fence = l.fence + 1, since_ms = excluded.since_ms, expires_at_ms = excluded.expires_at_ms \
                     WHERE l.expires_at_ms IS NULL OR l.expires_at_ms <= excluded.since_ms \
                     RETURNING fence, since_ms",
                ),
                // MySQL has no RETURNING: the grant's fence (or 0 when the
                // lock is held) comes back as LAST_INSERT_ID in the OK
                // packet. Assignments run left to right, so expires_at_ms,
                // which the condition reads, is assigned last.
                Dialect::MySql => t(&mysql_acquire("$1", "$2", "$3", "$4", "$5", now)),
            },
            acquire_and_load: match dialect {
                // $1 run, $2 lock doc, $3 owner, $4 owner id, $5 ttl, $6
                // document to load, $7 size limit. Not granted: the current
                // holder (the CTEs see the snapshot from before the insert).
                //
                // The document is read only once the lease is granted (the
                // EXISTS runs first) and with FOR SHARE, so it is the newest
                // committed version even when the grant waited for the
                // previous holder's save to commit (a plain read would see
                // the statement's older snapshot), and rows are locked in
                // the order save-and-release locks them: lease, then
                // document.
                Dialect::Postgres => t("WITH granted AS ( \
                       INSERT INTO {L} AS l (run, doc, owner, owner_id, fence, since_ms, expires_at_ms) \
                       VALUES ($1, $2, $3, $4, 1, {NOW}, {NOW} + $5) \
                       ON CONFLICT (run, doc) DO UPDATE SET owner = excluded.owner, owner_id = excluded.owner_id, \
                       fence = l.fence + 1, since_ms = excluded.since_ms, expires_at_ms = excluded.expires_at_ms \
                       WHERE l.expires_at_ms IS NULL OR l.expires_at_ms <= excluded.since_ms \
                       RETURNING fence, since_ms), \
                     held AS (SELECT owner, fence, since_ms, expires_at_ms - {NOW} AS expires_in \
                       FROM {L} WHERE run = $1 AND doc = $2), \
                     loaded AS (SELECT version, size, CASE WHEN size <= $7 THEN bytes END AS bytes \
                       FROM {D} WHERE run = $1 AND name = $6 AND EXISTS (SELECT 1 FROM granted) FOR SHARE) \
                     SELECT g.fence, g.since_ms, h.owner, h.fence, h.since_ms, h.expires_in, \
                       d.version, d.size, d.bytes \
                     FROM (SELECT 1 AS one) one \
                     LEFT JOIN granted g ON true \
                     LEFT JOIN held h ON g.fence IS NULL \
                     LEFT JOIN loaded d ON true"),
                Dialect::MySql => t("CALL {P}acquire_and_load($1, $2, $3, $4, $5, $6, $7)"),
                Dialect::Sqlite => Stmt::default(),
            },
            holder: t(
                "SELECT owner, fence, since_ms, expires_at_ms - {NOW} FROM {L} \
                       WHERE run = $1 AND doc = $2 AND expires_at_ms > {NOW}",
            ),
            renew: t("UPDATE {L} SET expires_at_ms = {NOW} + $5 \
                      WHERE run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms > {NOW}"),
            release: t("UPDATE {L} SET expires_at_ms = NULL \
                        WHERE run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms > {NOW}"),
            release_lapsed: t("UPDATE {L} SET expires_at_ms = NULL \
                               WHERE run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms IS NOT NULL"),
            break_fence: t("UPDATE {L} SET expires_at_ms = NULL \
                            WHERE run = $1 AND doc = $2 AND fence = $3 AND expires_at_ms IS NOT NULL"),
            list_locks: t(
                "SELECT run, doc, owner, fence, since_ms, expires_at_ms - {NOW} FROM {L} \
                           WHERE expires_at_ms > {NOW} ORDER BY run, doc",
            ),
            list_locks_run: t(
                "SELECT run, doc, owner, fence, since_ms, expires_at_ms - {NOW} FROM {L} \
                               WHERE run = $1 AND expires_at_ms > {NOW} ORDER BY run, doc",
            ),
            lease_is_current: t("SELECT fence FROM {L} \
                                 WHERE run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms > {NOW}"),
            fenced: fenced_statements(dialect, &t, upsert_tail),
        }
    }
}

/// The MySQL acquire statement, with its five arguments as SQL
/// expressions.
fn mysql_acquire(
    run: &str,
    doc: &str,
    owner: &str,
    owner_id: &str,
    ttl: &str,
    now: &str,
) -> String {
    let free = "(expires_at_ms IS NULL OR expires_at_ms <= VALUES(since_ms))";
    format!(
        "INSERT INTO {{L}} (run, doc, owner, owner_id, fence, since_ms, expires_at_ms) \
         VALUES ({run}, {doc}, {owner}, {owner_id}, LAST_INSERT_ID(1), {now}, {now} + {ttl}) \
         ON DUPLICATE KEY UPDATE \
         owner = IF({free}, VALUES(owner), owner), \
         owner_id = IF({free}, VALUES(owner_id), owner_id), \
         fence = IF({free}, LAST_INSERT_ID(fence + 1), fence + LAST_INSERT_ID(0)), \
         since_ms = IF({free}, VALUES(since_ms), since_ms), \
         expires_at_ms = IF({free}, VALUES(expires_at_ms), expires_at_ms)"
    )
}

/// Fenced writes. Binds: $1 run, $2 name, $3 version, $4 bytes, $5 size,
/// $6 lock doc, $7 owner id, $8 fence, $9 expected version (update).
///
/// PostgreSQL does it all in one statement: a CTE locks the lease row
/// (`FOR SHARE`, or an `UPDATE` that also releases it), the write runs
/// only if that row qualified, and the reply says which part failed. MySQL
/// updates document and lease in one multi-table `UPDATE` (or inserts with
/// `INSERT … SELECT … LOCK IN SHARE MODE`). SQLite serializes writers, so a
/// plain `EXISTS` check in the writing statement is atomic.
fn fenced_statements(
    dialect: Dialect,
    t: &dyn Fn(&str) -> Stmt,
    upsert_tail: &str,
) -> [[Stmt; 2]; 3] {
    let lease_where =
        "run = $1 AND doc = $6 AND owner_id = $7 AND fence = $8 AND expires_at_ms > {NOW}";
    match dialect {
        Dialect::Postgres => {
            let lease = |release: bool| {
                if release {
                    format!(
                        "UPDATE {{L}} SET expires_at_ms = NULL WHERE {lease_where} RETURNING 1 AS ok"
                    )
                } else {
                    format!("SELECT 1 AS ok FROM {{L}} WHERE {lease_where} FOR SHARE")
                }
            };
            let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) \
                          SELECT $1, $2, $3, $4, $5, {UPD} WHERE EXISTS (SELECT 1 FROM lease)";
            let write = [
                format!("{insert} {upsert_tail} RETURNING 1"),
                format!("{insert} ON CONFLICT (run, name) DO NOTHING RETURNING 1"),
                "UPDATE {D} SET version = $3, bytes = $4, size = $5, updated_at = {UPD} \
                 WHERE run = $1 AND name = $2 AND version = $9 AND EXISTS (SELECT 1 FROM lease) RETURNING 1"
                    .to_owned(),
            ];
            write.map(|w| {
                [false, true].map(|release| {
                    t(&format!(
                        "WITH lease AS ({}), written AS ({w}) \
                         SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM written)",
                        lease(release)
                    ))
                })
            })
        }
        Dialect::MySql => {
            let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) \
                          SELECT $1, $2, $3, $4, $5, {UPD} FROM {L} \
                          WHERE run = $1 AND doc = $6 AND owner_id = $7 AND fence = $8 AND expires_at_ms > {NOW} \
                          LOCK IN SHARE MODE";
            let update = |release: bool| {
                format!(
                    "UPDATE {{D}} d JOIN {{L}} l ON l.run = d.run AND l.doc = $6 \
                     SET d.version = $3, d.bytes = $4, d.size = $5, d.updated_at = {{UPD}}{} \
                     WHERE d.run = $1 AND d.name = $2 AND d.version = $9 \
                     AND l.owner_id = $7 AND l.fence = $8 AND l.expires_at_ms > {{NOW}}",
                    if release {
                        ", l.expires_at_ms = NULL"
                    } else {
                        ""
                    }
                )
            };
            [
                [
                    t(&format!("{insert} {upsert_tail}")),
                    t(&format!("{insert} {upsert_tail}")),
                ],
                [t(insert), t(insert)],
                [t(&update(false)), t(&update(true))],
            ]
        }
        Dialect::Sqlite => {
            let exists = format!("EXISTS (SELECT 1 FROM {{L}} WHERE {lease_where})");
            let insert = format!(
                "INSERT INTO {{D}} (run, name, version, bytes, size, updated_at) \
                 SELECT $1, $2, $3, $4, $5, {{UPD}} WHERE {exists}"
            );
            let overwrite = t(&format!("{insert} {upsert_tail}"));
            let create = t(&insert);
            let update = t(&format!(
                "UPDATE {{D}} SET version = $3, bytes = $4, size = $5, updated_at = {{UPD}} \
                 WHERE run = $1 AND name = $2 AND version = $9 AND {exists}"
            ));
            [
                [overwrite.clone(), overwrite],
                [create.clone(), create],
                [update.clone(), update],
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_question_marks_outside_postgres() {
        let s = placeholders(Dialect::MySql, "a = $1 AND b = $12 AND c = $1");
        assert_eq!(
            (&*s.sql, s.order),
            ("a = ? AND b = ? AND c = ?", vec![1, 12, 1])
        );
        let s = placeholders(Dialect::Postgres, "a = $2 AND b = $1 AND c = $2");
        assert_eq!(
            (&*s.sql, s.order),
            ("a = $2 AND b = $1 AND c = $2", vec![1, 2])
        );
    }

    #[test]
    fn prefix_is_spliced_everywhere() {
        for dialect in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
            let s = Statements::new(dialect, "zz_");
            assert!(s.get.sql.contains("zz_documents"));
            assert!(s.acquire.sql.contains("zz_leases"));
            assert!(!s.get.sql.contains("{D}") && !s.acquire.sql.contains("{NOW}"));
        }
    }
}
