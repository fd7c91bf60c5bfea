//! Every SQL statement, per dialect, with the table prefix spliced in once
//! at open (the prefix is allowlisted; everything else is a bind parameter).
//!
//! Time comes from the database's clock only: `{NOW}` is the current time
//! in milliseconds since the epoch by the server (`clock_timestamp()` in
//! PostgreSQL, `NOW(6)` in MySQL, `julianday('now')` in SQLite).
//!
//! In PostgreSQL every statement that changes a document or frees a lock
//! also calls `pg_notify` on the store's channel (see [`channel`]) in a CTE
//! of its own, so the notification costs no round trip and, being sent at
//! commit, exactly when the change is visible. Payloads (run ids and
//! document names never contain a space):
//!
//! | payload | meaning |
//! |---|---|
//! | `c <run> <doc> <version>` | a document was written |
//! | `d <run> <doc>` | a document was deleted |
//! | `r <run> <doc>` | a lock was released or broken (`<doc>` empty for a run lock) |
//! | `s <run> <seq>` | status message `<seq>` was published |
//!
//! Those statements return the affected row count as their first column
//! ([`Stmt::counted`]) instead of a command tag.

use std::sync::Arc;

use crate::config::Dialect;

/// One statement: its SQL, and for each placeholder in order the number of
/// the parameter it takes. PostgreSQL's `$n` can repeat a parameter;
/// MySQL's and SQLite's `?` cannot, so their binds follow this list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stmt {
    /// Shared, so handing it to sqlx on every call copies nothing.
    pub(crate) sql: Arc<str>,
    pub(crate) order: Vec<u16>,
    /// The statement reports the rows it changed as its first column (a
    /// PostgreSQL CTE that also notifies), not in its command tag.
    pub(crate) counted: bool,
}

impl Stmt {
    fn counted(mut self) -> Stmt {
        self.counted = true;
        self
    }
}

/// The PostgreSQL channel of the store with `prefix`: every change of its
/// documents and locks is announced there.
pub(crate) fn channel(prefix: &str) -> String {
    format!("{prefix}events")
}

/// The statements of one store.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    dialect: Dialect,
    prefix: String,
    /// Reads of `2^i` documents of a run in one statement, `i` in
    /// `0..=GET_MANY_LOG2` (see [`Statements::get_many`]).
    get_many: Vec<Stmt>,
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
    /// A document's version, size and modified time (ms since the epoch),
    /// without its bytes.
    pub(crate) head: Stmt,
    pub(crate) list_runs: Stmt,
    pub(crate) delete_run: Stmt,
    /// Takes a free or expired lock: PostgreSQL and SQLite return the grant
    /// (`RETURNING`); MySQL reports it through `LAST_INSERT_ID`.
    pub(crate) acquire: Stmt,
    /// PostgreSQL: acquire and load in one statement; MySQL: the stored
    /// procedure doing the same; SQLite: unused.
    pub(crate) acquire_and_load: Stmt,
    /// MariaDB 10.5+: acquire and load in one `INSERT … RETURNING` (see
    /// [`mariadb_acquire_and_load`]); elsewhere unused.
    pub(crate) acquire_and_load_returning: Stmt,
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
    /// A read that sends the bytes only when the version differs.
    pub(crate) get_if_changed: Stmt,
    /// PostgreSQL: raise the watermark and read, one statement; MySQL: the
    /// procedure doing the same; SQLite: unused (see `mark`).
    pub(crate) claim: Stmt,
    /// SQLite: raise a watermark unless it is above the fence, returning
    /// the fence when it was raised (or equal).
    pub(crate) mark: Stmt,
    /// Writes under a foreign lease, indexed by [`FencedKind`]: PostgreSQL
    /// one statement each, MySQL one procedure; SQLite: `mark` and a plain
    /// write in one transaction.
    pub(crate) foreign: [Stmt; 3],
    /// PostgreSQL: a status message in one statement; MySQL: the
    /// procedure; SQLite: `status_next`, `status_insert`, `status_trim`.
    pub(crate) publish: Stmt,
    pub(crate) status_next: Stmt,
    pub(crate) status_insert: Stmt,
    pub(crate) status_trim: Stmt,
    /// A run's messages after a sequence number, in order.
    pub(crate) status_since: Stmt,
    /// The last sequence number given out for a run, and the oldest
    /// message still kept (NULL when none is).
    pub(crate) status_last: Stmt,
    pub(crate) set_milestone: Stmt,
    pub(crate) milestones: Stmt,
    pub(crate) delete_milestones: Stmt,
}

/// The mode of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FencedKind {
    Overwrite = 0,
    Create = 1,
    Update = 2,
}

impl FencedKind {
    pub(crate) fn of(mode: &runstate_core::PutMode) -> FencedKind {
        match mode {
            runstate_core::PutMode::Overwrite => FencedKind::Overwrite,
            runstate_core::PutMode::Create => FencedKind::Create,
            runstate_core::PutMode::Update(_) => FencedKind::Update,
        }
    }
}

/// Numbered placeholders for PostgreSQL (bound 1..=max), `?` elsewhere
/// (bound in order of appearance).
fn placeholders(dialect: Dialect, sql: &str) -> Stmt {
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut number = 0u16;
            while let Some(digit) = chars.peek().and_then(|d| d.to_digit(10)) {
                number = number * 10 + digit as u16;
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
        counted: false,
    }
}

/// PostgreSQL: `write` (ending in `RETURNING` the columns `notify` reads)
/// and a `pg_notify` per returned row, answering the row count.
fn notifying(write: &str, notify: &str) -> String {
    format!(
        "WITH w AS ({write}), n AS (SELECT pg_notify({{CH}}, {notify}) FROM w) \
         SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM n)"
    )
}

const CHANGED: &str = "'c ' || run || ' ' || name || ' ' || version";
const DELETED: &str = "'d ' || run || ' ' || name";
const RELEASED: &str = "'r ' || run || ' ' || doc";

/// A grant in PostgreSQL and SQLite, with binds $1 run, $2 lock doc, $3
/// owner, $4 owner id, $5 TTL in ms: inserts the lease row, or takes it
/// over when it is free (released or expired: a new grant, fence + 1), or
/// when the same owner id holds it (acquire is idempotent by owner: a live
/// grant of that owner is returned again with the same fence and `since`,
/// its expiry restarted; an expired one is a new grant). `SET` expressions
/// read the row as it was before the update.
const GRANT: &str = "INSERT INTO {L} AS l (run, doc, owner, owner_id, fence, since_ms, expires_at_ms) \
     VALUES ($1, $2, $3, $4, 1, {NOW}, {NOW} + $5) \
     ON CONFLICT (run, doc) DO UPDATE SET owner = excluded.owner, owner_id = excluded.owner_id, \
     fence = CASE WHEN l.owner_id = excluded.owner_id AND l.expires_at_ms > excluded.since_ms \
       THEN l.fence ELSE l.fence + 1 END, \
     since_ms = CASE WHEN l.owner_id = excluded.owner_id AND l.expires_at_ms > excluded.since_ms \
       THEN l.since_ms ELSE excluded.since_ms END, \
     expires_at_ms = excluded.expires_at_ms \
     WHERE l.expires_at_ms IS NULL OR l.expires_at_ms <= excluded.since_ms OR l.owner_id = excluded.owner_id";

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

/// `updated_at` as milliseconds since the Unix epoch. MySQL's is computed
/// without the session's time zone (a pool the application lends may not
/// run in UTC); SQLite's text is rounded to the millisecond it holds.
fn modified_ms(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "(extract(epoch from updated_at) * 1000)::bigint",
        Dialect::MySql => {
            "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', updated_at) DIV 1000 AS SIGNED)"
        }
        Dialect::Sqlite => {
            "CAST(round((julianday(updated_at) - 2440587.5) * 86400000.0) AS INTEGER)"
        }
    }
}

/// The tail of an insert that overwrites an existing document.
fn upsert_tail(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::MySql => {
            "ON DUPLICATE KEY UPDATE version = VALUES(version), bytes = VALUES(bytes), \
             size = VALUES(size), updated_at = VALUES(updated_at)"
        }
        _ => {
            "ON CONFLICT (run, name) DO UPDATE SET version = excluded.version, bytes = excluded.bytes, \
             size = excluded.size, updated_at = excluded.updated_at"
        }
    }
}

/// A statement of the store with `prefix`: tables, channel, clock and
/// procedure prefix filled in, placeholders numbered for `dialect` (see
/// [`placeholders`]).
fn fill(dialect: Dialect, prefix: &str, sql: &str) -> Stmt {
    placeholders(
        dialect,
        &sql.replace("{D}", &format!("{prefix}documents"))
            .replace("{L}", &format!("{prefix}leases"))
            .replace("{W}", &format!("{prefix}watermarks"))
            .replace("{S}", &format!("{prefix}status"))
            .replace("{Q}", &format!("{prefix}status_seq"))
            .replace("{M}", &format!("{prefix}milestones"))
            .replace("{CH}", &format!("'{}'", channel(prefix)))
            .replace("{NOW}", now_ms(dialect))
            .replace("{UPD}", updated_at(dialect))
            .replace("{MOD}", modified_ms(dialect))
            .replace("{P}", prefix),
    )
}

impl Statements {
    pub(crate) fn new(dialect: Dialect, prefix: &str) -> Self {
        let pg = dialect == Dialect::Postgres;
        let now = now_ms(dialect);
        // Fill in tables and clock; numbered placeholders become `?` outside
        // PostgreSQL, so MySQL and SQLite statements list their binds in
        // order of appearance.
        let t = |sql: &str| fill(dialect, prefix, sql);
        let upsert_tail = upsert_tail(dialect);
        let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) VALUES ($1, $2, $3, $4, $5, {UPD})";
        // A write that notifies in PostgreSQL; as it is elsewhere.
        let announced = |sql: &str, returning: &str, notify: &str| {
            if pg {
                t(&notifying(&format!("{sql} RETURNING {returning}"), notify)).counted()
            } else {
                t(sql)
            }
        };
        let put_update = "UPDATE {D} SET version = $3, bytes = $4, size = $5, updated_at = {UPD} \
                          WHERE run = $1 AND name = $2 AND version = $6";
        let free = |condition: &str| {
            announced(
                &format!("UPDATE {{L}} SET expires_at_ms = NULL WHERE {condition}"),
                "run, doc",
                RELEASED,
            )
        };
        let raise = "INSERT INTO {W} AS w (run, doc, fence) VALUES ($1, $2, $3) \
                     ON CONFLICT (run, doc) DO UPDATE SET fence = excluded.fence \
                     WHERE w.fence <= excluded.fence";
        Statements {
            dialect,
            prefix: prefix.to_owned(),
            get_many: (0..=GET_MANY_LOG2)
                .map(|log2| t(&get_many_sql(1 << log2)))
                .collect(),
            get: t(
                "SELECT version, size, CASE WHEN size <= $3 THEN bytes END FROM {D} WHERE run = $1 AND name = $2",
            ),
            get_unlimited: t("SELECT version, bytes FROM {D} WHERE run = $1 AND name = $2"),
            put_overwrite: announced(
                &format!("{insert} {upsert_tail}"),
                "run, name, version",
                CHANGED,
            ),
            put_create: announced(insert, "run, name, version", CHANGED),
            put_update: announced(put_update, "run, name, version", CHANGED),
            delete: announced(
                "DELETE FROM {D} WHERE run = $1 AND name = $2",
                "run, name",
                DELETED,
            ),
            delete_if: announced(
                "DELETE FROM {D} WHERE run = $1 AND name = $2 AND version = $3",
                "run, name",
                DELETED,
            ),
            exists: t("SELECT version FROM {D} WHERE run = $1 AND name = $2"),
            list_docs: t(
                "SELECT name, version, size, {MOD} FROM {D} WHERE run = $1 AND name > $2 ORDER BY name LIMIT $3",
            ),
            head: t("SELECT version, size, {MOD} FROM {D} WHERE run = $1 AND name = $2"),
            list_runs: t("SELECT DISTINCT run FROM {D} WHERE run > $1 ORDER BY run LIMIT $2"),
            // PostgreSQL deletes the run's milestones in the same
            // statement; elsewhere a transaction runs `delete_milestones`
            // too.
            delete_run: if pg {
                t(&format!(
                    "WITH w AS (DELETE FROM {{D}} WHERE run = $1 RETURNING run, name), \
                     gone AS (DELETE FROM {{M}} WHERE run = $1), \
                     n AS (SELECT pg_notify({{CH}}, {DELETED}) FROM w) \
                     SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM n)"
                ))
                .counted()
            } else {
                t("DELETE FROM {D} WHERE run = $1")
            },
            acquire: match dialect {
                // $1 run, $2 doc, $3 owner, $4 owner id, $5 ttl ms.
                Dialect::Postgres | Dialect::Sqlite => {
                    t(&format!("{GRANT} RETURNING fence, since_ms"))
                }
                // MySQL has no RETURNING: the grant's fence (or 0 when the
                // lock is held) comes back as LAST_INSERT_ID in the OK
                // packet.
                Dialect::MySql => t(&mysql_acquire("$1", "$2", "$3", "$4", "$5", now)),
            },
            acquire_and_load: match dialect {
                // $1 run, $2 lock doc, $3 owner, $4 owner id, $5 ttl, $6
                // document to load, $7 size limit. Not granted: the current
                // holder (the CTEs see the snapshot from before the insert).
                //
                // The document is read only once the lease is granted (the
                // EXISTS runs first) and with FOR SHARE, so that a row the
                // previous holder updated is read in its newest committed
                // version even when the grant waited for that holder's
                // save to commit (a plain read would see the statement's
                // older snapshot), and rows are locked in the order
                // save-and-release locks them: lease, then document. A row
                // that holder *inserted* is not in the snapshot at all, so
                // the caller reads an absent document again.
                Dialect::Postgres => t(&format!(
                    "WITH granted AS ({GRANT} RETURNING fence, since_ms), \
                     held AS (SELECT owner, fence, since_ms, expires_at_ms - {{NOW}} AS expires_in \
                       FROM {{L}} WHERE run = $1 AND doc = $2), \
                     loaded AS (SELECT version, size, CASE WHEN size <= $7 THEN bytes END AS bytes \
                       FROM {{D}} WHERE run = $1 AND name = $6 AND EXISTS (SELECT 1 FROM granted) FOR SHARE) \
                     SELECT g.fence, g.since_ms, h.owner, h.fence, h.since_ms, h.expires_in, \
                       d.version, d.size, d.bytes \
                     FROM (SELECT 1 AS one) one \
                     LEFT JOIN granted g ON true \
                     LEFT JOIN held h ON g.fence IS NULL \
                     LEFT JOIN loaded d ON true"
                )),
                Dialect::MySql => t("CALL {P}acquire_and_load($1, $2, $3, $4, $5, $6, $7)"),
                Dialect::Sqlite => Stmt::default(),
            },
            acquire_and_load_returning: match dialect {
                Dialect::MySql => t(&mariadb_acquire_and_load(now)),
                _ => Stmt::default(),
            },
            holder: t(
                "SELECT owner, fence, since_ms, expires_at_ms - {NOW} FROM {L} \
                       WHERE run = $1 AND doc = $2 AND expires_at_ms > {NOW}",
            ),
            renew: t("UPDATE {L} SET expires_at_ms = {NOW} + $5 \
                      WHERE run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms > {NOW}"),
            release: free(
                "run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms > {NOW}",
            ),
            release_lapsed: free(
                "run = $1 AND doc = $2 AND owner_id = $3 AND fence = $4 AND expires_at_ms IS NOT NULL",
            ),
            break_fence: free("run = $1 AND doc = $2 AND fence = $3 AND expires_at_ms IS NOT NULL"),
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
            get_if_changed: t(
                "SELECT version, size, CASE WHEN version <> $3 AND size <= $4 THEN bytes END \
                 FROM {D} WHERE run = $1 AND name = $2",
            ),
            claim: match dialect {
                // $1 run, $2 lock doc, $3 fence, $4 document (empty: none),
                // $5 size limit. The read runs only once the watermark was
                // raised, FOR SHARE as in acquire-and-load (a document
                // updated by a save the raise waited for is read in its
                // newest version; one *created* by it is not in the
                // statement's snapshot, so the caller reads an absent
                // document again).
                Dialect::Postgres => t(&format!(
                    "WITH mark AS ({raise} RETURNING 1 AS ok), \
                     loaded AS (SELECT version, size, CASE WHEN size <= $5 THEN bytes END AS bytes \
                       FROM {{D}} WHERE run = $1 AND name = $4 AND EXISTS (SELECT 1 FROM mark) FOR SHARE) \
                     SELECT (SELECT count(*) FROM mark), d.version, d.size, d.bytes \
                     FROM (SELECT 1 AS one) one LEFT JOIN loaded d ON true"
                )),
                Dialect::MySql => t("CALL {P}claim($1, $2, $3, $4, $5)"),
                Dialect::Sqlite => Stmt::default(),
            },
            mark: t(&format!("{raise} RETURNING fence")),
            foreign: foreign_statements(dialect, &t, upsert_tail),
            publish: match dialect {
                // $1 run, $2 topic, $3 text, $4 at (ms), $5 messages kept.
                Dialect::Postgres => {
                    t("WITH c AS (INSERT INTO {Q} AS q (run, seq) VALUES ($1, 1) \
                       ON CONFLICT (run) DO UPDATE SET seq = q.seq + 1 RETURNING seq), \
                     m AS (INSERT INTO {S} (run, seq, topic, body, at_ms) \
                       SELECT $1, seq, $2, $3, $4 FROM c RETURNING seq), \
                     trimmed AS (DELETE FROM {S} WHERE run = $1 AND seq <= (SELECT seq FROM c) - $5), \
                     n AS (SELECT pg_notify({CH}, 's ' || $1 || ' ' || seq) FROM m) \
                     SELECT (SELECT seq FROM m), (SELECT count(*) FROM n)")
                }
                Dialect::MySql => t("CALL {P}publish($1, $2, $3, $4, $5)"),
                Dialect::Sqlite => Stmt::default(),
            },
            status_next: t("INSERT INTO {Q} AS q (run, seq) VALUES ($1, 1) \
                            ON CONFLICT (run) DO UPDATE SET seq = q.seq + 1 RETURNING seq"),
            status_insert: t(
                "INSERT INTO {S} (run, seq, topic, body, at_ms) VALUES ($1, $2, $3, $4, $5)",
            ),
            status_trim: t("DELETE FROM {S} WHERE run = $1 AND seq <= $2"),
            status_since: t(
                "SELECT seq, topic, body, at_ms FROM {S} WHERE run = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            ),
            status_last: t(
                "SELECT q.seq, (SELECT MIN(s.seq) FROM {S} s WHERE s.run = $1) FROM {Q} q WHERE q.run = $1",
            ),
            set_milestone: t(match dialect {
                Dialect::MySql => {
                    "INSERT INTO {M} (run, kind, name, value) VALUES ($1, $2, $3, $4) \
                     ON DUPLICATE KEY UPDATE value = VALUES(value)"
                }
                _ => {
                    "INSERT INTO {M} (run, kind, name, value) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (run, kind, name) DO UPDATE SET value = excluded.value"
                }
            }),
            milestones: t("SELECT kind, name, value FROM {M} WHERE run = $1"),
            delete_milestones: t("DELETE FROM {M} WHERE run = $1"),
        }
    }
}

/// The largest read of [`Statements::get_many`] is `2^GET_MANY_LOG2`
/// documents; more go in several statements.
pub(crate) const GET_MANY_LOG2: u32 = 8;

/// Reads `n` documents of a run: $1 run, $2 size limit, $3.. the names.
/// Columns: name, version, size, bytes (NULL over the limit).
fn get_many_sql(n: usize) -> String {
    let names: Vec<String> = (0..n).map(|i| format!("${}", i + 3)).collect();
    format!(
        "SELECT name, version, size, CASE WHEN size <= $2 THEN bytes END FROM {{D}} \
         WHERE run = $1 AND name IN ({})",
        names.join(", ")
    )
}

/// The binds of one row of a batched write, in this order after $1 (the
/// run): name, version, bytes, size, mode (0 overwrite, 1 create, 2
/// update), expected version (update).
pub(crate) const BATCH_ROW_BINDS: usize = 6;

/// The placeholder of bind `column` (0-based, see [`BATCH_ROW_BINDS`]) of
/// row `row` of a batched write.
fn bind(row: usize, column: usize) -> String {
    format!("${}", 2 + row * BATCH_ROW_BINDS + column)
}

impl Statements {
    /// A read of `n` documents (at most `2^GET_MANY_LOG2`) in one
    /// statement, and how many names it binds: `n` rounded up to a power
    /// of two (the caller repeats a name to fill the list), so that a
    /// connection prepares few distinct statements. Binds: $1 run, $2 size
    /// limit, then the names.
    pub(crate) fn get_many(&self, n: usize) -> (&Stmt, usize) {
        let slots = n.max(1).next_power_of_two();
        let log2 = slots.trailing_zeros() as usize;
        (&self.get_many[log2.min(self.get_many.len() - 1)], slots)
    }

    /// PostgreSQL: `n` writes of distinct documents of one run in one
    /// statement, each with its own mode (binds: $1 run, then
    /// [`BATCH_ROW_BINDS`] per row). Creates insert unless the document
    /// exists, overwrites upsert, updates change the row only at the
    /// expected version; every written row is announced (`NOTIFY`) as a
    /// single write is. Columns: the name and new version of each row
    /// written, and the notification count. A row the statement did not
    /// return was refused by its condition. The statement is atomic: on
    /// an error nothing of it was written.
    pub(crate) fn put_many_postgres(&self, n: usize) -> Stmt {
        let rows: Vec<String> = (0..n)
            .map(|r| {
                let b = |c| bind(r, c);
                format!(
                    "({}::text, {}::bigint, {}::bytea, {}::bigint, {}::bigint, {}::bigint)",
                    b(0),
                    b(1),
                    b(2),
                    b(3),
                    b(4),
                    b(5)
                )
            })
            .collect();
        let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) \
                      SELECT $1, name, version, bytes, size, {UPD} FROM input";
        fill(
            self.dialect,
            &self.prefix,
            &format!(
                "WITH input (name, version, bytes, size, mode, expected) AS (VALUES {rows}), \
                 created AS ({insert} WHERE mode = 1 ON CONFLICT (run, name) DO NOTHING \
                   RETURNING run, name, version), \
                 overwritten AS ({insert} WHERE mode = 0 {tail} RETURNING run, name, version), \
                 updated AS (UPDATE {{D}} d SET version = i.version, bytes = i.bytes, \
                   size = i.size, updated_at = {{UPD}} FROM input i \
                   WHERE i.mode = 2 AND d.run = $1 AND d.name = i.name AND d.version = i.expected \
                   RETURNING d.run, d.name, d.version), \
                 written AS (SELECT run, name, version FROM created \
                   UNION ALL SELECT run, name, version FROM overwritten \
                   UNION ALL SELECT run, name, version FROM updated), \
                 n AS (SELECT pg_notify({{CH}}, {CHANGED}) FROM written) \
                 SELECT name, version, (SELECT count(*) FROM n) FROM written",
                rows = rows.join(", "),
                tail = upsert_tail(self.dialect),
            ),
        )
    }

    /// MySQL: an insert of `n` rows of one run (binds as
    /// [`put_many_postgres`](Self::put_many_postgres), only name, version,
    /// bytes and size of each row used). `overwrite`: an existing document
    /// is replaced; otherwise it is left exactly as it is (a create: the
    /// version read back in the same transaction tells which rows this
    /// statement inserted).
    pub(crate) fn put_many_mysql_insert(&self, n: usize, overwrite: bool) -> Stmt {
        let rows: Vec<String> = (0..n)
            .map(|r| {
                let b = |c| bind(r, c);
                format!("($1, {}, {}, {}, {}, {{UPD}})", b(0), b(1), b(2), b(3))
            })
            .collect();
        let tail = if overwrite {
            upsert_tail(self.dialect)
        } else {
            // Leaves the row as it is; the row is still locked until the
            // commit, so the read-back sees what this statement left.
            "ON DUPLICATE KEY UPDATE version = version"
        };
        fill(
            self.dialect,
            &self.prefix,
            &format!(
                "INSERT INTO {{D}} (run, name, version, bytes, size, updated_at) VALUES {} {tail}",
                rows.join(", ")
            ),
        )
    }

    /// MySQL: `n` updates of distinct documents of one run, each only at
    /// its expected version, in one statement (binds as
    /// [`put_many_postgres`](Self::put_many_postgres)). The rows it
    /// changed are told by their count, or by their versions read back.
    pub(crate) fn put_many_mysql_update(&self, n: usize) -> Stmt {
        let case = |column: usize| {
            let arms: Vec<String> = (0..n)
                .map(|r| format!("WHEN {} THEN {}", bind(r, 0), bind(r, column)))
                .collect();
            format!("CASE name {} END", arms.join(" "))
        };
        let matches: Vec<String> = (0..n)
            .map(|r| format!("(name = {} AND version = {})", bind(r, 0), bind(r, 5)))
            .collect();
        fill(
            self.dialect,
            &self.prefix,
            &format!(
                "UPDATE {{D}} SET bytes = {}, size = {}, version = {}, updated_at = {{UPD}} \
                 WHERE run = $1 AND ({})",
                case(2),
                case(3),
                case(1),
                matches.join(" OR ")
            ),
        )
    }

    /// MySQL: the versions of `n` documents of one run, read in the
    /// writing transaction (binds as
    /// [`put_many_postgres`](Self::put_many_postgres), names only). A
    /// plain read: the rows this transaction wrote or found (an insert's
    /// duplicate, a matched update) are locked by it, so it reads them as
    /// they are; any other row it did not write, whatever it reads there.
    pub(crate) fn put_many_mysql_versions(&self, n: usize) -> Stmt {
        let names: Vec<String> = (0..n).map(|r| bind(r, 0)).collect();
        fill(
            self.dialect,
            &self.prefix,
            &format!(
                "SELECT name, version FROM {{D}} WHERE run = $1 AND name IN ({})",
                names.join(", ")
            ),
        )
    }
}

/// The MySQL acquire statement, with its five arguments as SQL
/// expressions. A free lock (released or expired) is a new grant, fence +
/// 1; a live grant of the same owner id is returned again (same fence and
/// since, expiry restarted: acquire is idempotent by owner); any other
/// holder leaves the row as it is and LAST_INSERT_ID at 0. Assignments run
/// left to right on the updated row, so the fence, which the conditions
/// decide, is assigned first and `expires_at_ms`, which they read, last
/// (`owner_id` changes before it only when the lock was free, which the
/// last condition tests first).
fn mysql_acquire(
    run: &str,
    doc: &str,
    owner: &str,
    owner_id: &str,
    ttl: &str,
    now: &str,
) -> String {
    let free = "(expires_at_ms IS NULL OR expires_at_ms <= VALUES(since_ms))";
    let mine = "(owner_id = VALUES(owner_id) AND expires_at_ms > VALUES(since_ms))";
    format!(
        "INSERT INTO {{L}} (run, doc, owner, owner_id, fence, since_ms, expires_at_ms) \
         VALUES ({run}, {doc}, {owner}, {owner_id}, LAST_INSERT_ID(1), {now}, {now} + {ttl}) \
         ON DUPLICATE KEY UPDATE \
         fence = IF({free}, LAST_INSERT_ID(fence + 1), IF({mine}, LAST_INSERT_ID(fence), fence + LAST_INSERT_ID(0))), \
         since_ms = IF({free}, VALUES(since_ms), since_ms), \
         owner = IF({free}, VALUES(owner), owner), \
         owner_id = IF({free}, VALUES(owner_id), owner_id), \
         expires_at_ms = IF({free} OR {mine}, VALUES(expires_at_ms), expires_at_ms)"
    )
}

/// MariaDB (10.5+): acquire and load in one statement, the acquire of
/// [`mysql_acquire`] with `RETURNING` (MySQL has no `RETURNING`, so it
/// calls the `acquire_and_load` procedure instead). Binds as the
/// procedure's: $1 run, $2 lock doc, $3 owner, $4 owner id, $5 ttl, $6
/// document to load, $7 size limit. Columns as the procedure's: the granted
/// fence (0: not granted) and its since, the row's holder (owner, fence,
/// since, expires in), then the document, read only when granted.
///
/// After the upsert the row's `owner_id` is the caller's exactly when the
/// lock was granted: a free lock was taken, or the caller's live grant was
/// returned again; a lock held by another owner is left as it was. The
/// document is read by the `RETURNING` clause, after the row is granted (a
/// statement that waited on the previous holder's lease row reads the
/// document that holder committed).
fn mariadb_acquire_and_load(now: &str) -> String {
    let acquire = mysql_acquire("$1", "$2", "$3", "$4", "$5", now);
    let doc = |column: &str| {
        format!(
            "IF(owner_id = $4, (SELECT {column} FROM {{D}} WHERE run = $1 AND name = $6), NULL)"
        )
    };
    format!(
        "{acquire} RETURNING IF(owner_id = $4, fence, 0), since_ms, owner, fence, since_ms, \
         expires_at_ms - {now}, {}, {}, {}",
        doc("version"),
        doc("size"),
        doc("CASE WHEN size <= $7 THEN bytes END"),
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
                format!("{insert} {upsert_tail} RETURNING run, name, version"),
                format!("{insert} ON CONFLICT (run, name) DO NOTHING RETURNING run, name, version"),
                "UPDATE {D} SET version = $3, bytes = $4, size = $5, updated_at = {UPD} \
                 WHERE run = $1 AND name = $2 AND version = $9 AND EXISTS (SELECT 1 FROM lease) \
                 RETURNING run, name, version"
                    .to_owned(),
            ];
            // The change, and a release, are announced in the statement.
            write.map(|w| {
                [false, true].map(|release| {
                    let (freed, count_freed) = if release {
                        (
                            ", freed AS (SELECT pg_notify({CH}, 'r ' || $1 || ' ' || $6) FROM lease)",
                            ", (SELECT count(*) FROM freed)",
                        )
                    } else {
                        ("", "")
                    };
                    t(&format!(
                        "WITH lease AS ({}), written AS ({w}), \
                         changed AS (SELECT pg_notify({{CH}}, {CHANGED}) FROM written){freed} \
                         SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM written), \
                         (SELECT count(*) FROM changed){count_freed}",
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

/// Writes under a lease granted by another lock service. Binds: $1 run,
/// $2 name, $3 version, $4 bytes, $5 size, $6 lock doc, $7 fence, $8
/// expected version (update), $9 mode (MySQL: 0 overwrite, 1 create, 2
/// update).
///
/// PostgreSQL: one statement, whose first CTE raises the watermark (an
/// upsert that takes the row only when its fence is not above the lease's,
/// locking it until the commit) and whose write runs only if it did; the
/// reply says which part refused. MySQL: a procedure doing the same in a
/// transaction. SQLite: unused (`mark` and a plain write in a transaction).
fn foreign_statements(dialect: Dialect, t: &dyn Fn(&str) -> Stmt, upsert_tail: &str) -> [Stmt; 3] {
    match dialect {
        Dialect::Postgres => {
            let insert = "INSERT INTO {D} (run, name, version, bytes, size, updated_at) \
                          SELECT $1, $2, $3, $4, $5, {UPD} WHERE EXISTS (SELECT 1 FROM mark)";
            [
                format!("{insert} {upsert_tail} RETURNING run, name, version"),
                format!("{insert} ON CONFLICT (run, name) DO NOTHING RETURNING run, name, version"),
                "UPDATE {D} SET version = $3, bytes = $4, size = $5, updated_at = {UPD} \
                 WHERE run = $1 AND name = $2 AND version = $8 AND EXISTS (SELECT 1 FROM mark) \
                 RETURNING run, name, version"
                    .to_owned(),
            ]
            .map(|write| {
                t(&format!(
                    "WITH mark AS (INSERT INTO {{W}} AS w (run, doc, fence) VALUES ($1, $6, $7) \
                       ON CONFLICT (run, doc) DO UPDATE SET fence = excluded.fence \
                       WHERE w.fence <= excluded.fence RETURNING 1 AS ok), \
                     written AS ({write}), \
                     changed AS (SELECT pg_notify({{CH}}, {CHANGED}) FROM written) \
                     SELECT (SELECT count(*) FROM mark), (SELECT count(*) FROM written), \
                     (SELECT count(*) FROM changed)"
                ))
            })
        }
        Dialect::MySql => {
            let call = t("CALL {P}foreign_put($1, $2, $3, $4, $5, $6, $7, $9, $8)");
            [call.clone(), call.clone(), call]
        }
        Dialect::Sqlite => [Stmt::default(), Stmt::default(), Stmt::default()],
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
            for stmt in [&s.release, &s.delete_run, &s.put_overwrite, &s.claim] {
                assert!(!stmt.sql.contains('{'), "{}", stmt.sql);
            }
            assert_eq!(s.put_update.counted, dialect == Dialect::Postgres);
        }
        let s = Statements::new(Dialect::Postgres, "zz_");
        for stmt in s.fenced.iter().flatten().chain(&s.foreign) {
            assert!(stmt.sql.contains("pg_notify('zz_events'"), "{}", stmt.sql);
        }
        assert!(s.fenced[0][1].sql.contains("'r ' ||"));
        assert!(!s.fenced[0][0].sql.contains("'r ' ||"));
        let s = Statements::new(Dialect::MySql, "zz_");
        assert_eq!(s.foreign[2].order, vec![1, 2, 3, 4, 5, 6, 7, 9, 8]);
    }
}
